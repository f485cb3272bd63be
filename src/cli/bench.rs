//! `meshdisk bench codec` (this machine's codec stages, no cluster; the
//! measuring is [`crate::codec::bench`]), `meshdisk bench cluster`
//! (shard transfers to every peer; the measuring is [`bench_cluster`]) and
//! `meshdisk bench compaction` (the compaction policy on a simulated
//! volume; the simulator is [`crate::volume::v2::compaction::sim`]) and
//! `meshdisk bench directory` (root commits from many volumes at once; the
//! measuring is [`bench_directory`]).

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use crate::cli::bench_cluster::{self, ClusterBench, Phase};
use crate::cli::bench_directory::{self, DirectoryBench};
use crate::cli::{CliError, CredentialArg};
use crate::codec::bench::{self, BenchConfig};
use crate::codec::{Geometry, SECTOR_SIZE};
use crate::size::parse_size;
use crate::volume::v2::compaction::policy::{Order, Policy, TRIGGER};
use crate::volume::v2::compaction::sim::{self, Workload};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Throughput of each codec stage (encrypt, erasure code, hash) and of
    /// the whole write and read pipelines, per core and on every core.
    Codec(BenchCodecArgs),
    /// Shard put and get throughput from this client to every peer.
    Cluster(BenchClusterArgs),
    /// The compaction policy on a simulated volume (no I/O): peak and final
    /// space held over live data, and write amplification, per workload
    /// and policy.
    Compaction(BenchCompactionArgs),
    /// Root commits per second the directory sustains from many volumes
    /// committing at once (placement and compare-and-set, as an attach
    /// sends them; nothing is put to the peers).
    Directory(BenchDirectoryArgs),
}

#[derive(Args)]
pub struct BenchDirectoryArgs {
    #[command(flatten)]
    credential: CredentialArg,
    /// Volumes created and committing at once, one commit in flight each.
    #[arg(long, default_value_t = 16)]
    volumes: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Data segments per commit (1: a small write and a flush).
    #[arg(long, default_value_t = 1)]
    segments: u32,
    /// Leave the volumes in place at the end (they are deleted otherwise).
    #[arg(long)]
    keep: bool,
    /// Commits alone: without the compactor rounds each commit wakes.
    #[arg(long)]
    no_compactor: bool,
    #[arg(long)]
    json: bool,
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

#[derive(Args)]
pub struct BenchCompactionArgs {
    /// The volume's size in 4 KiB blocks.
    #[arg(long, default_value_t = 1 << 18)]
    blocks: u64,
    /// Data blocks per segment.
    #[arg(long, default_value_t = 1000)]
    segment_blocks: u32,
    /// The fraction of the volume filled (sequentially) before the
    /// overwrites.
    #[arg(long, default_value_t = 0.7)]
    fill: f64,
    /// Random single-block overwrites of the filled blocks.
    #[arg(long, default_value_t = 10_000_000)]
    writes: u64,
    /// Workloads, a run each: uniform, or hotcold (90% of the writes to
    /// 10% of the blocks).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "uniform,hotcold")]
    workload: Vec<WorkloadArg>,
    /// Victim orders, a run each per workload.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cost-benefit,greedy")]
    policy: Vec<OrderArg>,
    /// Compact while held blocks exceed this many times the live blocks
    /// (`inf`: never compact).
    #[arg(long, default_value_t = TRIGGER)]
    trigger: f64,
    /// Moved blocks per round, at most (default: one segment's worth).
    #[arg(long)]
    round_blocks: Option<u64>,
    #[arg(long, default_value_t = 13)]
    seed: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum WorkloadArg {
    Uniform,
    Hotcold,
}

#[derive(Clone, Copy, ValueEnum)]
enum OrderArg {
    CostBenefit,
    Greedy,
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

/// `meshdisk bench compaction`: a line per (workload, policy) run as it
/// ends (no async runtime needed).
pub fn compaction(args: &BenchCompactionArgs) -> Result<(), CliError> {
    if !(2..=u64::from(u32::MAX)).contains(&args.blocks) {
        return Err(CliError::Argument("--blocks must be 2 to 2^32 - 1".into()));
    }
    if args.segment_blocks == 0 {
        return Err(CliError::Argument("--segment-blocks must be at least 1".into()));
    }
    if !(args.fill > 0.0 && args.fill <= 1.0) {
        return Err(CliError::Argument("--fill must be more than 0 and at most 1".into()));
    }
    if args.trigger.is_nan() || args.trigger < 1.0 {
        return Err(CliError::Argument("--trigger must be at least 1".into()));
    }
    println!(
        "{} blocks, segments of {}, filled to {}, {} overwrites, trigger {}",
        args.blocks, args.segment_blocks, args.fill, args.writes, args.trigger
    );
    println!(
        "{:<8} {:<12} {:>10} {:>11} {:>8} {:>10} {:>9} {:>12}",
        "workload", "policy", "peak space", "final space", "WA", "steady WA", "victim u", "writes/s"
    );
    for workload in &args.workload {
        let workload = match workload {
            WorkloadArg::Uniform => Workload::Uniform,
            WorkloadArg::Hotcold => Workload::HOT_COLD,
        };
        for order in &args.policy {
            let order = match order {
                OrderArg::CostBenefit => Order::CostBenefit,
                OrderArg::Greedy => Order::Greedy,
            };
            let config = sim::Config {
                blocks: args.blocks,
                segment_blocks: args.segment_blocks,
                fill: args.fill,
                writes: args.writes,
                workload,
                policy: Policy { order, trigger: args.trigger, ..Policy::DEFAULT },
                round_blocks: args.round_blocks.unwrap_or(u64::from(args.segment_blocks)),
                seed: args.seed,
            };
            let r = sim::run(&config);
            println!(
                "{:<8} {:<12} {:>10.4} {:>11.4} {:>8.4} {:>10.4} {:>9.3} {:>12.0}",
                workload.name(),
                order.as_str(),
                r.peak_space,
                r.final_space,
                r.write_amplification,
                r.steady_write_amplification,
                r.mean_victim_utilization,
                r.writes_per_second
            );
        }
    }
    Ok(())
}

/// `meshdisk bench directory`: one line, or one JSON object.
pub async fn directory(args: BenchDirectoryArgs) -> Result<(), CliError> {
    let duration = duration(args.seconds)?;
    if !(1..=1024).contains(&args.volumes) {
        return Err(CliError::Argument("--volumes must be 1 to 1024".into()));
    }
    // A checkpoint commit adds one segment.
    if !(1..crate::api::MAX_COMMIT_SEGMENTS as u32).contains(&args.segments) {
        return Err(CliError::Argument(format!(
            "--segments must be 1 to {}",
            crate::api::MAX_COMMIT_SEGMENTS - 1
        )));
    }
    let config = DirectoryBench {
        volumes: args.volumes,
        duration,
        segments: args.segments,
        clean: !args.keep,
        compactor: !args.no_compactor,
    };
    let credential = args.credential;
    let r = bench_directory::run(|| credential.client(), &config).await?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} volumes: {} commits in {:.1} s: {:.0} commits/s, p50 {:.2} ms, p99 {:.2} ms (placement p50 {:.2} ms, compare-and-set p50 {:.2} ms p99 {:.2} ms), roots of {:.0} bytes on average, {} compactor rounds (p50 {:.2} ms), {:.2} CPU-s (this process)",
            r.volumes,
            r.commits,
            r.seconds,
            r.commits_per_s,
            r.p50_ms,
            r.p99_ms,
            r.place_p50_ms,
            r.cas_p50_ms,
            r.cas_p99_ms,
            r.mean_root_bytes,
            r.compactor_rounds,
            r.compactor_round_p50_ms,
            r.cpu_seconds
        );
    }
    Ok(())
}
