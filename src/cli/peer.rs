//! `meshdisk peer`: lend disk space to a cluster (the service is
//! [`crate::peer`]; this is its command line).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::cli::{CliError, STOP_GRACE, stop_on_signals};
use crate::peer::PeerConfig;
use crate::size::{parse_duration, parse_size};

#[derive(Args)]
pub struct PeerArgs {
    /// Where the peer keeps its identity and shards.
    #[arg(long)]
    data: PathBuf,
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
    #[arg(long, value_parser = parse_size)]
    capacity: u64,
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
    /// Re-hash every shard stored here about this often (each pass starts
    /// 0.9–1.25 × this after the last one started, spread over it).
    #[arg(long, value_parser = parse_duration, default_value = "28d")]
    scrub_every: Duration,
    /// The most bytes per second a scrub reads (0: no cap; a pass asked
    /// for with `meshdisk scrub start` runs at this rate).
    #[arg(long, value_parser = parse_size, default_value = "32M")]
    scrub_rate: u64,
}

/// `meshdisk peer`: runs until SIGINT/SIGTERM.
pub async fn run(args: PeerArgs) -> Result<(), CliError> {
    if args.capacity == 0 {
        return Err(CliError::Argument("--capacity must be more than 0".into()));
    }
    let config = PeerConfig {
        data: args.data,
        directory: args.directory,
        join: args.join,
        name: args.name,
        capacity: args.capacity,
        failure_domain: args.failure_domain,
        listen: args.listen,
        advertise: args.advertise,
        heartbeat: args.heartbeat,
        scrub: crate::peer::scrub::ScrubConfig { every: args.scrub_every, rate: args.scrub_rate },
    };
    let stop = stop_on_signals(Some(STOP_GRACE))?;
    Ok(crate::peer::run(config, stop).await?)
}
