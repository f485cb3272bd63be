//! `meshdisk bench codec` (this machine's codec stages, no cluster; the
//! measuring is [`crate::codec::bench`]) and `meshdisk bench cluster`
//! (shard transfers to every peer; the measuring is [`bench_cluster`]).

use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;

use crate::cli::bench_cluster::{self, ClusterBench, Phase};
use crate::cli::{CliError, CredentialArg};
use crate::codec::bench::{self, BenchConfig};
use crate::codec::{Geometry, SECTOR_SIZE};
use crate::size::parse_size;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Throughput of each codec stage (encrypt, erasure code, hash) and of
    /// the whole write and read pipelines, per core and on every core.
    Codec(BenchCodecArgs),
    /// Shard put and get throughput from this client to every peer.
    Cluster(BenchClusterArgs),
}

#[derive(Args)]
pub struct BenchCodecArgs {
    /// Data shards per segment.
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Parity shards per segment.
    #[arg(long, default_value_t = 2)]
    m: usize,
    /// Bytes per shard (a multiple of 4 KiB).
    #[arg(long, value_parser = parse_size, default_value = "256K")]
    shard_size: u64,
    /// Seconds to measure each stage.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BenchClusterArgs {
    #[command(flatten)]
    credential: CredentialArg,
    #[arg(long, value_parser = parse_size, default_value = "256K")]
    shard_size: u64,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Calls in flight per peer.
    #[arg(long, default_value_t = 32)]
    depth: usize,
    /// Phases, in order: put, get, clean.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "put,get,clean")]
    phases: Vec<Phase>,
    #[arg(long)]
    json: bool,
}

/// Checks `--seconds` (more than 0, at most 10 minutes).
fn duration(seconds: f64) -> Result<Duration, CliError> {
    if !(seconds > 0.0 && seconds <= 600.0) {
        return Err(CliError::Argument("--seconds must be more than 0 and at most 600".into()));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `meshdisk bench codec` (no async runtime needed). `threads` is the
/// global `--threads`: how many threads the all-cores stages use (0: one
/// per core).
pub fn codec(args: &BenchCodecArgs, threads: usize) -> Result<(), CliError> {
    let shard_size = usize::try_from(args.shard_size)
        .map_err(|_| CliError::Argument("--shard-size is too large".into()))?;
    let geometry = Geometry::new(args.k, args.m, shard_size)?;
    if shard_size % SECTOR_SIZE != 0 {
        return Err(CliError::Argument(format!(
            "--shard-size must be a multiple of {SECTOR_SIZE} (one sector), got {shard_size}"
        )));
    }
    let duration = duration(args.seconds)?;
    let threads = match threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    let config = BenchConfig { geometry, duration, threads };
    let json = args.json;
    let results = bench::run(&config, |r| {
        if !json {
            eprintln!(
                "  {} ({} thread{}): {:.2} GiB/s",
                r.stage,
                r.threads,
                if r.threads == 1 { "" } else { "s" },
                r.gib_per_s()
            );
        }
    })?;
    let out =
        if json { bench::render_json(&config, &results) } else { bench::render_table(&config, &results) };
    println!("{}", out.trim_end());
    Ok(())
}

/// One phase of `bench cluster --json`.
#[derive(Serialize)]
struct PhaseRow {
    phase: Phase,
    peers: usize,
    shards: u64,
    bytes: u64,
    seconds: f64,
    gib_per_s: f64,
    cpu_seconds: f64,
}

/// `meshdisk bench cluster`: a line per phase as it ends, or one JSON
/// array at the end.
pub async fn cluster(args: BenchClusterArgs) -> Result<(), CliError> {
    let shard_size = usize::try_from(args.shard_size)
        .map_err(|_| CliError::Argument("--shard-size is too large".into()))?;
    if shard_size == 0 || shard_size % 64 != 0 || shard_size > 16 << 20 {
        return Err(CliError::Argument("--shard-size must be a multiple of 64 bytes, at most 16M".into()));
    }
    let duration = duration(args.seconds)?;
    if !(1..=256).contains(&args.depth) {
        return Err(CliError::Argument("--depth must be 1 to 256".into()));
    }
    let config = ClusterBench { shard_size, duration, depth: args.depth, phases: args.phases };
    let c = args.credential.client()?;
    let json = args.json;
    let results = bench_cluster::run(&c, &config, |r| {
        if !json {
            println!(
                "{:<6} {} peers {:>8} shards {:>8.3} GiB/s {:>6.2} CPU-s/GiB (this process) {:>6.1} s",
                r.phase.as_str(),
                r.peers,
                r.shards,
                r.gib_per_s(),
                r.cpu_s_per_gib(),
                r.seconds
            );
        }
    })
    .await?;
    if json {
        let rows: Vec<PhaseRow> = results
            .iter()
            .map(|r| PhaseRow {
                phase: r.phase,
                peers: r.peers,
                shards: r.shards,
                bytes: r.bytes,
                seconds: r.seconds,
                gib_per_s: r.gib_per_s(),
                cpu_seconds: r.cpu_seconds,
            })
            .collect();
        println!("{}", serde_json::to_string(&rows)?);
    }
    Ok(())
}
