//! The command line: the `meshdisk` commands, one file per family.
//!
//! `main` parses [`Cli`], sets up logging and the async runtime, and hands
//! the [`Command`] to [`run`]. Each family file holds its clap arguments
//! and the code of its commands: [`serve`] (a RAM disk or file over NBD,
//! and the NBD listening that `attach` shares), [`attach`] (attach and
//! detach), [`peer`], [`directory`], [`volume`] (volumes and keys),
//! [`admin`] (join, tokens, status), [`bench`](mod@bench), [`demo`]. [`render`] draws
//! the tables people read; [`passphrase`] asks for a passphrase. Every
//! command fails with a [`CliError`], printed once by `main`.

pub mod admin;
pub mod attach;
pub mod bench;
pub mod bench_cluster;
pub mod bench_directory;
pub mod demo;
pub mod directory;
mod error;
pub mod passphrase;
pub mod peer;
pub mod render;
pub mod repair;
pub mod scrub;
pub mod serve;
pub mod snapshot;
pub mod unlock;
pub mod volume;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use error::CliError;

use crate::client::Client;
use crate::membership::credential::Credential;

#[derive(Parser)]
#[command(
    name = "meshdisk",
    version,
    about = "Spare disk space on ordinary computers as one encrypted, self-healing virtual disk"
)]
pub struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `debug` or `meshdisk=trace`.
    #[arg(long, global = true, env = "MESHDISK_LOG", default_value = "info")]
    pub log: String,
    /// Worker threads for network and protocol work: 0 means one per core;
    /// 1 runs everything on one thread (no cross-thread wake-ups, which
    /// can be faster on very small machines). Disk I/O has its own thread.
    /// For `bench codec`: threads of the all-cores stages.
    #[arg(long, global = true, env = "MESHDISK_THREADS", default_value_t = 0)]
    pub threads: usize,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the cluster's directory (first start creates the cluster).
    Directory(directory::DirectoryArgs),
    /// Lend disk space to a cluster.
    Peer(peer::PeerArgs),
    /// Join a cluster as a client (or admin) and save the credential.
    Join(admin::JoinArgs),
    /// Join tokens (admin).
    #[command(subcommand)]
    Token(admin::TokenCommand),
    /// Peers, capacity and volumes at a glance: starts with the verdict
    /// (HEALTH_OK, degraded, repairing, at risk, data lost).
    Status(admin::StatusArgs),
    /// What repair is doing; `--wait` follows it until full redundancy.
    Repair(repair::RepairArgs),
    /// The peers' scrub (re-hashing every shard): status, pause, resume,
    /// start a pass now.
    #[command(subcommand)]
    Scrub(scrub::ScrubAction),
    /// Create, list, inspect and delete volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// A whole cluster on this machine: a directory, 6 peers and volume
    /// `demo`, attached and served over NBD. Start here.
    Demo(demo::DemoArgs),
    /// Serve a volume over NBD: take its lease, replay its log, serve
    /// until SIGINT/SIGTERM or `meshdisk detach`.
    Attach(attach::AttachArgs),
    /// Stop the `meshdisk attach` of a volume on this machine: it flushes,
    /// releases the lease and exits.
    Detach(attach::DetachArgs),
    /// Serve a RAM disk or a file over NBD (no cluster, no encryption).
    Serve(serve::ServeArgs),
    /// Volume keys.
    #[command(subcommand)]
    Key(volume::KeyCommand),
    /// Measure this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Runs a command. `threads` is the global `--threads` (`bench codec`
/// uses it for its all-cores stages). `main` runs `key`, `detach`, `bench
/// codec` and `bench compaction` without an async runtime, calling their
/// functions directly; here they run like the others.
pub async fn run(command: Command, threads: usize) -> Result<(), CliError> {
    match command {
        Command::Directory(args) => directory::run(args).await,
        Command::Peer(args) => peer::run(args).await,
        Command::Join(args) => admin::join(args).await,
        Command::Token(admin::TokenCommand::Create(args)) => admin::token_create(args).await,
        Command::Status(args) => admin::status(args).await,
        Command::Repair(args) => repair::run(args).await,
        Command::Scrub(action) => scrub::run(action).await,
        Command::Volume(cmd) => volume::run(cmd).await,
        Command::Demo(args) => demo::run(args.into(), stop_on_signals(Some(demo::STOP_GRACE))?).await,
        Command::Attach(args) => attach::attach(args).await,
        Command::Detach(args) => attach::detach(&args),
        Command::Serve(args) => serve::run(args).await,
        Command::Key(cmd) => volume::key(&cmd),
        Command::Bench(bench::BenchCommand::Codec(args)) => bench::codec(&args, threads),
        Command::Bench(bench::BenchCommand::Cluster(args)) => bench::cluster(args).await,
        Command::Bench(bench::BenchCommand::Compaction(args)) => bench::compaction(&args),
        Command::Bench(bench::BenchCommand::Directory(args)) => bench::directory(args).await,
    }
}

/// The credential a command acts with.
#[derive(Args)]
pub struct CredentialArg {
    /// A member's credential file (the admin's is DIRECTORY-DATA/admin.cred).
    #[arg(long, env = "MESHDISK_CREDENTIAL")]
    pub credential: PathBuf,
}

impl CredentialArg {
    /// A client of the cluster, acting as this credential's member.
    pub fn client(&self) -> Result<Client, CliError> {
        Ok(Client::new(Credential::load(&self.credential)?)?)
    }
}

/// How long a directory or a peer may take to stop after SIGTERM or
/// SIGINT, whatever the rest of the cluster does: its workers get
/// [`worker::STOP_WAIT`](crate::sys::worker::STOP_WAIT), then it exits.
/// An attach gets its `--detach-timeout` on top, for the flush.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// A token cancelled by the first SIGINT or SIGTERM: how the long-running
/// commands (serve, attach, directory, peer, demo) learn to stop cleanly.
///
/// With a `grace`, stopping is bounded: a process still running `grace`
/// after the signal exits with status 1, saying so, whatever it was
/// waiting for (a peer that never answers, a stuck disk). Each command
/// bounds its own waits well within its grace and says what it abandons;
/// this is the backstop. The watch is a plain thread, so it fires even if
/// the async runtime is wedged.
pub fn stop_on_signals(grace: Option<Duration>) -> Result<CancellationToken, CliError> {
    let stop = CancellationToken::new();
    let mut sigterm = signal(SignalKind::terminate()).map_err(CliError::io("listening for SIGTERM"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(CliError::io("listening for SIGINT"))?;
    let s = stop.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        };
        // Cancelled before anything else: nothing this task does after
        // may keep the process from stopping.
        s.cancel();
        if let Some(grace) = grace {
            exit_after(grace, name);
        }
        info!("{name}: stopping");
        // A second Ctrl-C: exit at once (a second SIGTERM changes nothing).
        // An attach's acknowledged writes are in its local log, which the
        // next attach from the folder sends.
        sigint.recv().await;
        let _ = writeln!(
            std::io::stderr(),
            "second Ctrl-C: exiting at once (writes not yet on the peers stay in the local log; the next attach from this folder sends them)"
        );
        std::process::exit(130);
    });
    Ok(stop)
}

/// Exits the process with status 1 if it is still running `grace` from now.
fn exit_after(grace: Duration, signal: &'static str) {
    let watch = std::thread::Builder::new().name("stop-watch".into()).spawn(move || {
        std::thread::sleep(grace);
        let _ = writeln!(
            std::io::stderr(),
            "meshdisk: still stopping {} s after {signal}: exiting without waiting further",
            grace.as_secs()
        );
        std::process::exit(1);
    });
    if let Err(e) = watch {
        tracing::warn!("cannot bound the shutdown ({e}): stopping without a deadline");
    }
}
