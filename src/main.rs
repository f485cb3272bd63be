//! The `meshdisk` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use meshdisk::backend::Backend;
use meshdisk::backend::file::FileBackend;
use meshdisk::backend::memory::MemoryBackend;
use meshdisk::codec::bench::{self, BenchConfig};
use meshdisk::codec::{Geometry, SECTOR_SIZE, VolumeKey};
use meshdisk::nbd::server::bind_unix;
use meshdisk::nbd::{Server, ServerConfig};
use meshdisk::size::parse_size;
use meshdisk::uring::Uring;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

#[derive(Parser)]
#[command(
    name = "meshdisk",
    version,
    about = "Spare disk space on ordinary computers as one encrypted, self-healing virtual disk"
)]
struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `debug` or `meshdisk=trace`.
    #[arg(long, global = true, env = "MESHDISK_LOG", default_value = "info")]
    log: String,
    /// Worker threads for network and protocol work: 0 means one per core;
    /// 1 runs everything on one thread (no cross-thread wake-ups, which
    /// can be faster on very small machines). Disk I/O has its own thread.
    /// For `bench codec`: threads of the all-cores stages.
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a RAM disk or a file over NBD (no cluster, no encryption).
    Serve(ServeArgs),
    /// Volume keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Measure this machine.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Write a new random 512-bit volume key to FILE (mode 0600; never overwrites).
    Generate {
        /// Where to write the key. Keep it safe: without it the volume's data is gone.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Throughput of each codec stage (encrypt, erasure code, hash) and of
    /// the whole write and read pipelines, per core and on every core.
    Codec(BenchCodecArgs),
}

#[derive(Args)]
struct BenchCodecArgs {
    /// Data shards per stripe.
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Parity shards per stripe.
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
struct ServeArgs {
    /// Serve a sparse disk of this size held in RAM (e.g. 1G).
    #[arg(long, value_parser = parse_size, conflicts_with = "file", required_unless_present = "file")]
    memory: Option<u64>,
    /// Serve this file or block device through io_uring.
    #[arg(long)]
    file: Option<PathBuf>,
    /// With --file: create the file, or extend it (sparsely), to this size.
    #[arg(long, value_parser = parse_size, requires = "file")]
    size: Option<u64>,
    /// TCP address to listen on, or `none`. Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: String,
    /// Also (or only) listen on this unix socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Export name clients ask for (the empty name always works too).
    #[arg(long, default_value = "")]
    export: String,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Description shown by `nbdinfo` and other clients.
    #[arg(long)]
    description: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that need no async runtime.
    match &cli.command {
        Command::Key(KeyCommand::Generate { file }) => return finish(key_generate(file)),
        Command::Bench(BenchCommand::Codec(args)) => return finish(bench_codec(args, cli.threads)),
        Command::Serve(_) => {}
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let threads = cli.threads;
    let built = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b.enable_all().build()
    };
    let runtime = match built {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("starting the async runtime: {e}")),
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Key(_) | Command::Bench(_) => unreachable!("handled before the runtime starts"),
    };
    finish(result)
}

fn finish(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn key_generate(file: &std::path::Path) -> Result<(), String> {
    let key = VolumeKey::generate().map_err(|e| e.to_string())?;
    key.write_new_file(file).map_err(|e| e.to_string())?;
    eprintln!(
        "wrote a new 512-bit volume key to {} (mode 0600). Back it up: without it the volume cannot be read.",
        file.display()
    );
    Ok(())
}

/// `threads` is the global `--threads`: how many threads the all-cores
/// stages use (0: one per core).
fn bench_codec(args: &BenchCodecArgs, threads: usize) -> Result<(), String> {
    let shard_size = usize::try_from(args.shard_size).map_err(|_| "--shard-size is too large".to_string())?;
    let geometry = Geometry::new(args.k, args.m, shard_size).map_err(|e| e.to_string())?;
    if shard_size % SECTOR_SIZE != 0 {
        return Err(format!(
            "--shard-size must be a multiple of {SECTOR_SIZE} (one sector), got {shard_size}"
        ));
    }
    if !(args.seconds > 0.0 && args.seconds <= 600.0) {
        return Err("--seconds must be more than 0 and at most 600".into());
    }
    let threads = match threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    let config =
        BenchConfig { geometry, duration: std::time::Duration::from_secs_f64(args.seconds), threads };
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
    })
    .map_err(|e| e.to_string())?;
    let out =
        if json { bench::render_json(&config, &results) } else { bench::render_table(&config, &results) };
    println!("{}", out.trim_end());
    Ok(())
}

fn fail(message: &str) -> ExitCode {
    eprintln!("meshdisk: error: {message}");
    ExitCode::FAILURE
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    if let Some(size) = args.memory {
        if size == 0 {
            return Err("--memory must be larger than 0".into());
        }
        let backend = Arc::new(MemoryBackend::new(size));
        run(backend, &args, format!("memory ({})", human(size))).await
    } else {
        let path = args.file.clone().expect("clap requires --file without --memory");
        let ring = Uring::new(256).map_err(|e| format!("setting up io_uring: {e}"))?;
        let backend =
            FileBackend::open(&ring, &path, args.size, args.read_only).map_err(|e| e.to_string())?;
        let what = format!("file {} ({})", path.display(), human(backend.size()));
        run(Arc::new(backend), &args, what).await
    }
}

async fn run<B: Backend>(backend: Arc<B>, args: &ServeArgs, what: String) -> Result<(), String> {
    let config = ServerConfig {
        export_name: args.export.clone(),
        description: args.description.clone(),
        read_only: args.read_only,
        ..Default::default()
    };
    let server = Server::new(backend, config);
    let mut uris = Vec::new();
    let mut listeners = tokio::task::JoinSet::new();

    if args.listen != "none" {
        let listener = tokio::net::TcpListener::bind(&args.listen).await.map_err(|e| {
            format!("listening on {}: {e} (choose another with --listen, or --listen none)", args.listen)
        })?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        uris.push(format!("nbd://{addr}/{}", uri_escape(&args.export)));
        let s = server.clone();
        listeners.spawn(async move { s.serve_tcp(listener).await });
    }
    if let Some(path) = &args.socket {
        let listener = bind_unix(path).map_err(|e| format!("listening on {}: {e}", path.display()))?;
        uris.push(format!("nbd+unix:///{}?socket={}", uri_escape(&args.export), path.display()));
        let s = server.clone();
        listeners.spawn(async move { s.serve_unix(listener).await });
    }
    if uris.is_empty() {
        return Err("nothing to listen on: give --socket PATH or a --listen address".into());
    }

    info!("serving {what} as export {:?}", args.export);
    let mut stdout = std::io::stdout().lock();
    for uri in &uris {
        let _ = writeln!(stdout, "{uri}");
    }
    let _ = stdout.flush();
    drop(stdout);

    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: finishing in-flight requests"),
        _ = sigint.recv() => info!("SIGINT: finishing in-flight requests"),
    }
    let flushed = server.shutdown().await;
    while listeners.join_next().await.is_some() {}
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    flushed.map_err(|e| format!("final flush failed: {e}"))?;
    info!("stopped cleanly");
    Ok(())
}

/// Percent-encodes an export name for the path of an NBD URI.
fn uri_escape(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[u]) }
}
