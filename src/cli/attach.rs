//! `meshdisk attach` and `meshdisk detach`. An attach takes the volume's
//! lease, replays its log and serves it over NBD; its state folder holds
//! the log, the cache, the lease note and `attach.pid`, which is how
//! `detach` (and a second attach of the same folder) finds it.
//!
//! SIGUSR1 asks a running attach what it has moved so far (as `dd` answers
//! it with its progress): it logs its traffic line and writes it to
//! `traffic.json` in the state folder (replaced whole, never half written):
//! client requests served, bytes written and committed, moved by
//! compaction, sent to the peers as shards, and the UDP bytes its QUIC
//! connections sent and received (`network_sent`, `network_received`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tracing::info;

use crate::cli::serve::{Listen, serve_nbd};
use crate::cli::{CliError, CredentialArg, STOP_GRACE, stop_on_signals};
use crate::size::{human, parse_duration, parse_size};
use crate::volume::v2::{Config, Volume};

#[derive(Args)]
pub struct AttachArgs {
    #[command(flatten)]
    credential: CredentialArg,
    /// The volume.
    name: String,
    /// The volume's key file.
    #[arg(long, conflicts_with = "passphrase", required_unless_present = "passphrase")]
    key_file: Option<PathBuf>,
    /// The volume's passphrase (asked for, or MESHDISK_PASSPHRASE).
    #[arg(long)]
    passphrase: bool,
    /// Serve NBD on this unix socket (default: CACHE-DIR/nbd.sock when
    /// there is no --listen).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Serve NBD on this TCP address too (e.g. 127.0.0.1:10809).
    #[arg(long)]
    listen: Option<String>,
    /// This attach's state: local log, block cache, lease and freshness
    /// notes (default: ~/.local/state/meshdisk/NAME).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Block cache: clean blocks read from the peers.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    cache_size: u64,
    /// Local log: writes not yet on the peers, and recent ones kept as a
    /// cache of this machine's writes.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    log_size: u64,
    /// Block-map pages kept in memory (each maps 256 MiB of the volume);
    /// the rest is read from the peers when needed.
    #[arg(long, default_value_t = 64)]
    map_cache: usize,
    /// Compact while the volume's segments hold more than this many times
    /// its live data (1.4: at most 1.43 × live data × (k+m)/k on the
    /// peers, at most 2 × (k+m)/k bytes sent per byte written; lower holds
    /// less space and sends more).
    #[arg(long, value_parser = parse_ratio, default_value_t = crate::volume::v2::compaction::policy::TRIGGER)]
    compact_above: f64,
    /// Drop this folder's unflushed writes if the volume was written
    /// elsewhere since they were made (otherwise the attach is refused).
    #[arg(long)]
    discard_local: bool,
    /// How long a detach (or Ctrl-C) tries to flush to the peers before
    /// exiting with the writes left in the local log.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    detach_timeout: Duration,
    /// Take the volume over from its current holder (its writes are then refused).
    #[arg(long)]
    force: bool,
    /// Export name clients ask for (the empty name always works too).
    #[arg(long, default_value = "")]
    export: String,
}

#[derive(Args)]
pub struct DetachArgs {
    /// The volume.
    name: String,
    /// The attach's state folder, if not the default.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

/// `--compact-above`: a ratio of at least 1.
fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if (1.0..=100.0).contains(&x) => Ok(x),
        _ => Err(format!("must be a number from 1 to 100 (times the live data), not {text}")),
    }
}

/// The default state folder of an attach of `volume`:
/// `$XDG_STATE_HOME/meshdisk/VOLUME`, else `~/.local/state/meshdisk/VOLUME`.
fn default_state_dir(volume: &str) -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("meshdisk").join(volume)
}

/// `meshdisk attach`: serves until SIGINT/SIGTERM (which `detach` sends),
/// then flushes everything to the peers and releases the lease. The flush
/// gets `--detach-timeout`; the whole stop at most that plus
/// [`STOP_GRACE`] and a directory call's timeout, then the process exits
/// whatever the cluster does (the writes not yet on the peers stay in the
/// local log).
pub async fn attach(a: AttachArgs) -> Result<(), CliError> {
    // Listened for before anything else: SIGUSR1's default action would
    // end the process.
    let usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .map_err(CliError::io("listening for SIGUSR1"))?;
    let c = a.credential.client()?;
    // VOLUME@SNAPSHOT serves a snapshot, read-only, from its own folder.
    let (name, snapshot) = match crate::cli::snapshot::split(&a.name) {
        Some((v, s)) => (v.to_string(), Some(s.to_string())),
        None => (a.name.clone(), None),
    };
    let record = c.volume(&name).await?;
    let key = crate::cli::unlock::data_key(&record, a.key_file.as_deref())?;
    let state = a.cache_dir.clone().unwrap_or_else(|| default_state_dir(&a.name));
    let pidfile = state.join("attach.pid");
    if let Ok(pid) = std::fs::read_to_string(&pidfile)
        && let Ok(pid) = pid.trim().parse::<i32>()
        && pid != std::process::id() as i32
        && alive(pid)
        && std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "meshdisk")
    {
        return Err(CliError::StateInUse { state, pid, volume: a.name });
    }
    let mut config = Config::new(state.clone(), a.cache_size);
    config.force = a.force;
    config.log_size = a.log_size;
    config.map_cache = a.map_cache.max(1);
    config.discard_local = a.discard_local;
    config.snapshot = snapshot.clone();
    config.compact_above = a.compact_above;
    let volume = Volume::open(c, &name, &key, config).await?;
    drop(key);
    std::fs::write(&pidfile, format!("{}\n", std::process::id())).map_err(CliError::io(pidfile.display()))?;
    tokio::spawn(report_traffic(usr1, volume.clone(), state.join("traffic.json")));
    let spec = &volume.record().spec;
    match &snapshot {
        Some(snap) => info!(
            "attached snapshot {}@{snap} ({}, k={} m={}) read-only; state in {}",
            spec.name,
            human(spec.size),
            spec.k,
            spec.m,
            state.display()
        ),
        None => info!(
            "attached volume {} ({}, k={} m={}, durability {}) with lease epoch {}; state in {}",
            spec.name,
            human(spec.size),
            spec.k,
            spec.m,
            spec.durability.as_str(),
            volume.epoch(),
            state.display()
        ),
    }
    let socket = match (&a.socket, &a.listen) {
        (Some(s), _) => Some(s.clone()),
        (None, None) => Some(state.join("nbd.sock")),
        (None, Some(_)) => None,
    };
    let listen = Listen {
        listen: a.listen.clone().unwrap_or_else(|| "none".into()),
        socket,
        export: a.export.clone(),
        description: Some(format!("meshdisk volume {}", a.name)),
        read_only: snapshot.is_some(),
    };
    let what = format!("volume {}", a.name);
    // The detach timeout bounds the whole flush: the server's (requests in
    // flight, then a flush) and the close's, which gets what is left.
    let stop = stop_on_signals(Some(a.detach_timeout + STOP_GRACE + Duration::from_secs(10)))?;
    let stopped_at = {
        let stop = stop.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            Instant::now()
        })
    };
    let served = serve_nbd(Arc::new(volume.clone()), &listen, what, stop, Some(a.detach_timeout)).await;
    let spent = stopped_at.await.map_or(Duration::ZERO, |at| at.elapsed());
    let left = a.detach_timeout.saturating_sub(spent).max(Duration::from_secs(1));
    let closed = volume.close(left).await.map_err(CliError::Detach);
    let _ = std::fs::remove_file(&pidfile);
    closed?;
    served?;
    info!("volume {} detached: everything is on the peers and the lease is released", a.name);
    Ok(())
}

/// On each SIGUSR1: the attach's traffic so far, logged and written to
/// `path` (through a temporary file and a rename: a reader sees the old
/// report or the new one, never part of one).
async fn report_traffic(mut usr1: tokio::signal::unix::Signal, volume: Volume, path: PathBuf) {
    while usr1.recv().await.is_some() {
        let t = volume.traffic().await;
        info!("SIGUSR1: this attach so far: {}", t.summary());
        let json = serde_json::to_string_pretty(&t).expect("plain numbers serialize");
        let tmp = path.with_extension("json.tmp");
        let written = std::fs::write(&tmp, json + "\n").and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!("writing {}: {e}", path.display());
        }
    }
}

/// The process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// `meshdisk detach`: SIGTERM to the attach named in the pid file, then
/// wait (up to 5 minutes) while it flushes and exits.
pub fn detach(a: &DetachArgs) -> Result<(), CliError> {
    let state = a.cache_dir.clone().unwrap_or_else(|| default_state_dir(&a.name));
    let pidfile = state.join("attach.pid");
    let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse::<i32>().ok()) else {
        return Err(CliError::NotAttached { volume: a.name.clone(), state });
    };
    // SAFETY: kill(2) with a pid read from our own pid file and SIGTERM.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        let _ = std::fs::remove_file(&pidfile);
        return Err(CliError::AttachGone { volume: a.name.clone(), pid });
    }
    eprintln!("detaching volume {} (pid {pid}): flushing to the peers…", a.name);
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > Duration::from_secs(300) {
            return Err(CliError::StillFlushing(pid));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("detached volume {}", a.name);
    Ok(())
}
