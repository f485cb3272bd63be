//! `meshdisk directory`: run the cluster's directory (the service is
//! [`crate::directory`]; this is its command line).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::cli::{CliError, STOP_GRACE, stop_on_signals};
use crate::directory::DirectoryConfig;
use crate::directory::heal::repair::RepairConfig;
use crate::size::{parse_duration, parse_size};

#[derive(Args)]
pub struct DirectoryArgs {
    /// Where the directory keeps its state, CA and credentials.
    #[arg(long)]
    data: PathBuf,
    /// UDP address to serve QUIC on.
    #[arg(long, default_value = "0.0.0.0:7400")]
    listen: SocketAddr,
    /// The address members should use (host:port), if not --listen.
    #[arg(long)]
    advertise: Option<String>,
    /// The cluster's name (first start only).
    #[arg(long, default_value = "meshdisk")]
    cluster: String,
    /// A peer silent this long is down.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    peer_timeout: Duration,
    /// A peer silent this long is lost: repair rebuilds its shards on other
    /// peers (a shorter silence is a reboot or a flaky link, and waits).
    /// A segment down to k shards on up peers is repaired at once.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    peer_lost_after: Duration,
    /// Segments repaired at once while clients are idle.
    #[arg(long, default_value_t = RepairConfig::default().inflight)]
    repair_inflight: usize,
    /// Cap on rebuilt shard bytes per second, e.g. 50MiB (0: none).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    repair_rate: u64,
    /// While clients are busy (their calls to peers), repair works on a
    /// quarter of --repair-inflight segments at a time and, after each
    /// batch that took t, pauses this many times t. Segments one lost peer
    /// from unreadable are repaired at full speed.
    #[arg(long, default_value_t = RepairConfig::default().tranquility)]
    repair_tranquility: u32,
    /// A volume's write lease lapses this long after its holder's last renewal.
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    lease_ttl: Duration,
    /// Shards of a segment its volume dropped (no root or snapshot reaches
    /// it any more) are erased from the peers this long after the drop:
    /// the writer's reads of it in flight finish first.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    drop_grace: Duration,
    /// Orphan shards (no segment record names them: failed commits,
    /// replaced puts) are erased no sooner than this after they were first
    /// seen: commits in flight land first.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    collect_grace: Duration,
    /// How often every peer's shards are compared with the segment records
    /// to find orphans (failed commits, replaced puts).
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    reconcile_every: Duration,
    /// Time between two audits: a random block of a random shard is asked
    /// of its holder with its hash proof (about 4.5 KiB each). A peer that
    /// fails is drained and its shards rebuilt from the others (0: no
    /// audits).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    audit_every: Duration,
    /// Percent of a peer's capacity used at or above which it gets no new
    /// shards and sheds shards to others until 5 points below.
    #[arg(long, default_value_t = crate::directory::heal::drain::HIGH_WATER,
          value_parser = clap::value_parser!(u8).range(50..=100))]
    drain_above: u8,
}

/// `meshdisk directory`: runs until SIGINT/SIGTERM.
pub async fn run(args: DirectoryArgs) -> Result<(), CliError> {
    let config = DirectoryConfig {
        data: args.data,
        listen: args.listen,
        advertise: args.advertise,
        cluster: args.cluster,
        peer_timeout: args.peer_timeout,
        peer_lost_after: args.peer_lost_after,
        lease_ttl: args.lease_ttl,
        drop_grace: args.drop_grace,
        collect_grace: args.collect_grace,
        reconcile_every: args.reconcile_every,
        audit_every: args.audit_every,
        high_water: args.drain_above,
        repair: RepairConfig {
            inflight: args.repair_inflight.max(1),
            rate: args.repair_rate,
            tranquility: args.repair_tranquility,
            ..RepairConfig::default()
        },
    };
    let stop = stop_on_signals(Some(STOP_GRACE))?;
    Ok(crate::directory::run(config, stop).await?)
}
