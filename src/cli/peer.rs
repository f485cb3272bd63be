//! `meshdisk peer`: lend disk space to a cluster (the service is
//! [`crate::peer`]; this is its command line), and the admin's
//! `meshdisk peer drain NAME [--wait]` and `meshdisk peer remove NAME`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::api::{ClusterStatus, PeerStatus};
use crate::cli::{CliError, CredentialArg, STOP_GRACE, render, stop_on_signals};
use crate::peer::PeerConfig;
use crate::size::{human, parse_duration, parse_size};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct PeerArgs {
    #[command(subcommand)]
    action: Option<PeerCommand>,
    /// Where the peer keeps its identity and shards.
    #[arg(long, required = true)]
    data: Option<PathBuf>,
    /// The directory's address (host:port); needed to join.
    #[arg(long)]
    directory: Option<String>,
    /// A join token (first start only).
    #[arg(long, env = "MESHDISK_JOIN_TOKEN", hide_env_values = true)]
    join: Option<String>,
    /// The name to join under (default: peer-N, chosen by the directory).
    #[arg(long)]
    name: Option<String>,
    /// How much space to lend: 500G, 2T, ...
    #[arg(long, value_parser = parse_size, required = true)]
    capacity: Option<u64>,
    /// Peers in one failure domain (a machine, a house) never hold two
    /// shards of a segment while there are other domains.
    #[arg(long)]
    failure_domain: Option<String>,
    /// UDP address to serve QUIC on.
    #[arg(long, default_value = "0.0.0.0:0")]
    listen: SocketAddr,
    /// The address clients should use, if not --listen.
    #[arg(long)]
    advertise: Option<SocketAddr>,
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    heartbeat: Duration,
    /// For tests of audits only: misbehave on purpose.
    #[arg(long, hide = true, value_enum)]
    fault: Option<crate::peer::Fault>,
    /// Re-hash every shard stored here about this often (each pass starts
    /// 0.9–1.25 × this after the last one started, spread over it).
    #[arg(long, value_parser = parse_duration, default_value = "28d")]
    scrub_every: Duration,
    /// The most bytes per second a scrub reads (0: no cap; a pass asked
    /// for with `meshdisk scrub start` runs at this rate).
    #[arg(long, value_parser = parse_size, default_value = "32M")]
    scrub_rate: u64,
}

/// What an admin does to a peer.
#[derive(Subcommand)]
pub enum PeerCommand {
    /// Move every shard off a peer (copied to others, then recorded, so
    /// redundancy never drops); new shards avoid it. Then `peer remove`.
    Drain(DrainArgs),
    /// Remove a peer from the cluster; refused while it holds shards that
    /// segments need for full redundancy (drain it first).
    Remove(RemoveArgs),
}

#[derive(Args)]
pub struct DrainArgs {
    #[command(flatten)]
    credential: CredentialArg,
    /// The peer's name (as `meshdisk status` lists it).
    name: String,
    /// Follow the drain until no segment needs a shard on it.
    #[arg(long)]
    wait: bool,
    /// Stop draining it: it takes new shards again.
    #[arg(long, conflicts_with = "wait")]
    cancel: bool,
    /// With --wait: give up after this long (exit status 1).
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    timeout: Duration,
}

#[derive(Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    credential: CredentialArg,
    /// The peer's name.
    name: String,
}

fn peer_in<'a>(s: &'a ClusterStatus, name: &str) -> Result<&'a PeerStatus, CliError> {
    s.peers.iter().find(|p| p.name == name).ok_or_else(|| CliError::Argument(format!("no peer named {name}")))
}

/// `meshdisk peer drain`.
async fn drain(args: DrainArgs) -> Result<(), CliError> {
    let client = args.credential.client()?;
    client.drain_peer(&args.name, args.cancel).await?;
    if args.cancel {
        println!("peer {} is no longer draining: it takes new shards again", args.name);
        return Ok(());
    }
    let mut s = client.status().await?;
    let p = peer_in(&s, &args.name)?;
    let first = p.needed;
    println!("draining peer {}: {} shards ({}) to move", args.name, first.segments, human(first.bytes));
    if !args.wait {
        return Ok(());
    }
    let start = std::time::Instant::now();
    let mut last = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        let p = peer_in(&s, &args.name)?;
        if p.needed.segments == 0 {
            break;
        }
        if last.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "drain of {}: {} shards ({}) left; {}",
                args.name,
                p.needed.segments,
                human(p.needed.bytes),
                render::repair_line(&s.repair)
            );
            last = std::time::Instant::now();
        }
        if start.elapsed() >= args.timeout {
            return Err(CliError::Argument(format!(
                "peer {} still holds {} needed shards after {}: {}",
                args.name,
                p.needed.segments,
                render::eta(args.timeout.as_secs()),
                render::verdict_line(&s)
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        s = client.status().await?;
    }
    let p = peer_in(&s, &args.name)?;
    println!(
        "peer {} is drained in {}: no segment needs it; its {} of copies are erased after the collection grace, and `meshdisk peer remove {}` may remove it",
        args.name,
        render::eta(start.elapsed().as_secs()),
        human(p.used),
        args.name
    );
    Ok(())
}

/// `meshdisk peer remove`.
async fn remove(args: RemoveArgs) -> Result<(), CliError> {
    let client = args.credential.client()?;
    client.remove_peer(&args.name).await?;
    println!("peer {} removed from the cluster", args.name);
    Ok(())
}

/// `meshdisk peer`: runs until SIGINT/SIGTERM (or an admin's subcommand).
pub async fn run(args: PeerArgs) -> Result<(), CliError> {
    match args.action {
        Some(PeerCommand::Drain(a)) => return drain(a).await,
        Some(PeerCommand::Remove(a)) => return remove(a).await,
        None => {}
    }
    let (Some(data), Some(capacity)) = (args.data, args.capacity) else {
        return Err(CliError::Argument("--data and --capacity are needed to run a peer".into()));
    };
    if capacity == 0 {
        return Err(CliError::Argument("--capacity must be more than 0".into()));
    }
    let config = PeerConfig {
        data,
        directory: args.directory,
        join: args.join,
        name: args.name,
        capacity,
        failure_domain: args.failure_domain,
        listen: args.listen,
        advertise: args.advertise,
        heartbeat: args.heartbeat,
        fault: args.fault,
        scrub: crate::peer::scrub::ScrubConfig { every: args.scrub_every, rate: args.scrub_rate },
    };
    let stop = stop_on_signals(Some(STOP_GRACE))?;
    Ok(crate::peer::run(config, stop).await?)
}
