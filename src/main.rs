//! The `meshdisk` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use meshdisk::backend::Backend;
use meshdisk::backend::file::FileBackend;
use meshdisk::backend::memory::MemoryBackend;
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
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a RAM disk or a file over NBD (no cluster, no encryption).
    Serve(ServeArgs),
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
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
