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
use meshdisk::membership::ca::Role;
use meshdisk::nbd::server::bind_unix;
use meshdisk::nbd::{Server, ServerConfig};
use meshdisk::size::{human, parse_duration, parse_size};
use meshdisk::sys::uring::Uring;
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
    /// Run the cluster's directory (first start creates the cluster).
    Directory(DirectoryArgs),
    /// Lend disk space to a cluster.
    Peer(PeerArgs),
    /// Join a cluster as a client (or admin) and save the credential.
    Join(JoinArgs),
    /// Join tokens (admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Peers, capacity and volumes at a glance.
    Status(StatusArgs),
    /// Create, list, inspect and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// A whole cluster on this machine: a directory, 6 peers and volume
    /// `demo`, attached and served over NBD. Start here.
    Demo(DemoArgs),
    /// Serve a volume over NBD: take its lease, replay its log, serve
    /// until SIGINT/SIGTERM or `meshdisk detach`.
    Attach(AttachArgs),
    /// Stop the `meshdisk attach` of a volume on this machine: it flushes,
    /// releases the lease and exits.
    Detach(DetachArgs),
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
    /// Shard put and get throughput from this client to every peer.
    Cluster(BenchClusterArgs),
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume; its key comes from a key file (made if missing) or
    /// a passphrase.
    Create(VolumeCreateArgs),
    /// Every volume.
    List(VolumeListArgs),
    /// A volume's geometry, lease, allocated size and stripe health.
    Info(VolumeNameArgs),
    /// Delete a volume; peers erase its shards.
    Delete(VolumeDeleteArgs),
}

#[derive(Args)]
struct VolumeCreateArgs {
    #[command(flatten)]
    credential: CredentialArg,
    name: String,
    /// The disk's size (a multiple of 4 KiB): 100G, 2T, ...
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Data shards per stripe.
    #[arg(long, default_value_t = 4)]
    k: u8,
    /// Parity shards per stripe: this many peers may be lost.
    #[arg(long, default_value_t = 2)]
    m: u8,
    #[arg(long, value_parser = parse_size, default_value = "256K")]
    shard_size: u64,
    /// Repair a stripe when fewer shards than this are healthy (default k+1).
    #[arg(long)]
    repair_threshold: Option<u8>,
    /// What FLUSH waits for: remote (peers and the stripe map) or local
    /// (this machine's log only).
    #[arg(long, default_value = "remote")]
    durability: String,
    /// The volume key file; a new key is written there if it does not exist.
    #[arg(long, conflicts_with = "passphrase", required_unless_present = "passphrase")]
    key_file: Option<PathBuf>,
    /// Derive the key from a passphrase (asked for, or MESHDISK_PASSPHRASE).
    #[arg(long)]
    passphrase: bool,
}

#[derive(Args)]
struct VolumeListArgs {
    #[command(flatten)]
    credential: CredentialArg,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct VolumeNameArgs {
    #[command(flatten)]
    credential: CredentialArg,
    name: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct VolumeDeleteArgs {
    #[command(flatten)]
    credential: CredentialArg,
    name: String,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a one-time join token.
    Create(TokenCreateArgs),
}

#[derive(Args)]
struct CredentialArg {
    /// A member's credential file (the admin's is DIRECTORY-DATA/admin.cred).
    #[arg(long, env = "MESHDISK_CREDENTIAL")]
    credential: PathBuf,
}

#[derive(Args)]
struct DirectoryArgs {
    /// Where the directory keeps its state, CA and credentials.
    #[arg(long)]
    data: PathBuf,
    /// UDP address to serve QUIC on.
    #[arg(long, default_value = "0.0.0.0:7400")]
    listen: std::net::SocketAddr,
    /// The address members should use (host:port), if not --listen.
    #[arg(long)]
    advertise: Option<String>,
    /// The cluster's name (first start only).
    #[arg(long, default_value = "meshdisk")]
    cluster: String,
    /// A peer silent this long is down.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    peer_timeout: std::time::Duration,
    /// Space reserved for a stripe being written is released after this.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    reservation_ttl: std::time::Duration,
    /// A volume's write lease lapses this long after its holder's last renewal.
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    lease_ttl: std::time::Duration,
}

#[derive(Args)]
struct PeerArgs {
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
    /// shards of a stripe while there are other domains.
    #[arg(long)]
    failure_domain: Option<String>,
    /// UDP address to serve QUIC on.
    #[arg(long, default_value = "0.0.0.0:0")]
    listen: std::net::SocketAddr,
    /// The address clients should use, if not --listen.
    #[arg(long)]
    advertise: Option<std::net::SocketAddr>,
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    heartbeat: std::time::Duration,
}

#[derive(Args)]
struct JoinArgs {
    /// The directory's address (host:port).
    #[arg(long)]
    directory: String,
    #[arg(long, env = "MESHDISK_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// Where to save the credential (never overwritten).
    #[arg(long)]
    credential: PathBuf,
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "client")]
    role: Role,
}

#[derive(Args)]
struct TokenCreateArgs {
    #[command(flatten)]
    credential: CredentialArg,
    /// What the token lets a machine join as: peer, client or admin.
    #[arg(long, default_value = "peer")]
    role: Role,
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    ttl: std::time::Duration,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    credential: CredentialArg,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchClusterArgs {
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
    #[arg(long, value_delimiter = ',', default_value = "put,get,clean")]
    phases: Vec<String>,
    #[arg(long)]
    json: bool,
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
struct AttachArgs {
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
    /// This attach's state: write-ahead log, cache, lease note
    /// (default: ~/.local/state/meshdisk/NAME).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Local cache size (whole stripes).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    cache_size: u64,
    /// Take the volume over from its current holder (its writes are then refused).
    #[arg(long)]
    force: bool,
    /// Export name clients ask for (the empty name always works too).
    #[arg(long, default_value = "")]
    export: String,
}

#[derive(Args)]
struct DemoArgs {
    /// Where the demo keeps everything (reused by the next run).
    #[arg(long, default_value = "./meshdisk-demo")]
    state: PathBuf,
    /// The demo volume's size (first run only).
    #[arg(long, value_parser = parse_size, default_value = "4G")]
    size: u64,
    /// Space each of the 6 peers lends.
    #[arg(long, value_parser = parse_size, default_value = "4G")]
    capacity: u64,
    #[arg(long, value_parser = parse_size, default_value = "512M")]
    cache_size: u64,
    /// Also serve NBD over TCP on this address (e.g. 127.0.0.1:10809).
    #[arg(long)]
    listen: Option<String>,
}

#[derive(Args)]
struct DetachArgs {
    /// The volume.
    name: String,
    /// The attach's state folder, if not the default.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
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
        Command::Detach(args) => return finish(detach(args)),
        Command::Serve(_)
        | Command::Attach(_)
        | Command::Demo(_)
        | Command::Directory(_)
        | Command::Peer(_)
        | Command::Join(_)
        | Command::Token(_)
        | Command::Status(_)
        | Command::Volume(_)
        | Command::Bench(BenchCommand::Cluster(_)) => {}
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
        Command::Attach(args) => runtime.block_on(attach(args)),
        Command::Demo(a) => runtime.block_on(async {
            let config = meshdisk::cli::demo::DemoConfig {
                state: a.state,
                size: a.size,
                peers: 6,
                capacity: a.capacity,
                cache_size: a.cache_size,
                listen: a.listen,
            };
            meshdisk::cli::demo::run(config, stop_on_signals()?).await
        }),
        Command::Directory(args) => runtime.block_on(directory(args)),
        Command::Peer(args) => runtime.block_on(peer(args)),
        Command::Join(args) => runtime.block_on(join(args)),
        Command::Token(TokenCommand::Create(args)) => runtime.block_on(token_create(args)),
        Command::Status(args) => runtime.block_on(status(args)),
        Command::Volume(cmd) => runtime.block_on(volume(cmd)),
        Command::Bench(BenchCommand::Cluster(args)) => runtime.block_on(bench_cluster(args)),
        Command::Key(_) | Command::Detach(_) | Command::Bench(BenchCommand::Codec(_)) => {
            unreachable!("handled before the runtime starts")
        }
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

/// A token cancelled by the first SIGINT or SIGTERM.
fn stop_on_signals() -> Result<tokio_util::sync::CancellationToken, String> {
    let stop = tokio_util::sync::CancellationToken::new();
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let s = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: stopping"),
            _ = sigint.recv() => info!("SIGINT: stopping"),
        }
        s.cancel();
    });
    Ok(stop)
}

async fn directory(args: DirectoryArgs) -> Result<(), String> {
    let config = meshdisk::directory::DirectoryConfig {
        data: args.data,
        listen: args.listen,
        advertise: args.advertise,
        cluster: args.cluster,
        peer_timeout: args.peer_timeout,
        reservation_ttl: args.reservation_ttl,
        lease_ttl: args.lease_ttl,
    };
    let stop = stop_on_signals()?;
    meshdisk::directory::run(config, stop).await.map_err(|e| e.to_string())
}

async fn peer(args: PeerArgs) -> Result<(), String> {
    if args.capacity == 0 {
        return Err("--capacity must be more than 0".into());
    }
    let config = meshdisk::peer::PeerConfig {
        data: args.data,
        directory: args.directory,
        join: args.join,
        name: args.name,
        capacity: args.capacity,
        failure_domain: args.failure_domain,
        listen: args.listen,
        advertise: args.advertise,
        heartbeat: args.heartbeat,
    };
    let stop = stop_on_signals()?;
    meshdisk::peer::run(config, stop).await.map_err(|e| e.to_string())
}

async fn join(args: JoinArgs) -> Result<(), String> {
    if args.credential.exists() {
        return Err(format!(
            "{} exists already: this machine has joined (remove the file to join again)",
            args.credential.display()
        ));
    }
    let cred = meshdisk::client::join::join(&args.directory, &args.token, args.role, args.name)
        .await
        .map_err(|e| e.to_string())?;
    cred.save(&args.credential).map_err(|e| e.to_string())?;
    eprintln!(
        "joined cluster {} as {} {}; credential saved to {} (mode 0600)",
        cred.cluster,
        cred.role.as_str(),
        cred.node,
        args.credential.display()
    );
    Ok(())
}

fn client(arg: &CredentialArg) -> Result<meshdisk::client::Client, String> {
    let cred =
        meshdisk::membership::credential::Credential::load(&arg.credential).map_err(|e| e.to_string())?;
    meshdisk::client::Client::new(cred).map_err(|e| e.to_string())
}

async fn token_create(args: TokenCreateArgs) -> Result<(), String> {
    let c = client(&args.credential)?;
    let (token, _) = c.create_token(args.role, args.ttl).await.map_err(|e| e.to_string())?;
    println!("{token}");
    let dir = &c.credential().directory;
    let how = match args.role {
        Role::Peer => format!("meshdisk peer --directory {dir} --join TOKEN --data DIR --capacity SIZE"),
        _ => format!(
            "meshdisk join --directory {dir} --token TOKEN --credential FILE --role {}",
            args.role.as_str()
        ),
    };
    eprintln!("one-time token for a {}, valid {:?}; use it as:\n  {how}", args.role.as_str(), args.ttl);
    Ok(())
}

async fn status(args: StatusArgs) -> Result<(), String> {
    let c = client(&args.credential)?;
    let s = c.status().await.map_err(|e| e.to_string())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?);
    } else {
        print!("{}", meshdisk::cli::status::render(&s));
    }
    Ok(())
}

async fn volume(cmd: VolumeCommand) -> Result<(), String> {
    use meshdisk::api::{Durability, VolumeSpec};
    use meshdisk::codec::key::KdfParams;
    match cmd {
        VolumeCommand::Create(a) => {
            let durability = match a.durability.as_str() {
                "remote" => Durability::Remote,
                "local" => Durability::Local,
                other => return Err(format!("--durability must be remote or local, not {other:?}")),
            };
            let shard_size =
                u32::try_from(a.shard_size).map_err(|_| "--shard-size is too large".to_string())?;
            let threshold = a.repair_threshold.unwrap_or((a.k + 1).min(a.k.saturating_add(a.m)));
            let mut id = [0u8; 16];
            getrandom::fill(&mut id).map_err(|e| e.to_string())?;
            let (key, kdf, made) = if a.passphrase {
                let kdf = KdfParams::generate().map_err(|e| e.to_string())?;
                let pass = meshdisk::cli::passphrase::read("passphrase for the new volume: ", true)?;
                (
                    VolumeKey::from_passphrase(pass.as_bytes(), &kdf).map_err(|e| e.to_string())?,
                    Some(kdf),
                    false,
                )
            } else {
                let path = a.key_file.clone().expect("clap requires --key-file without --passphrase");
                if path.exists() {
                    (VolumeKey::read_file(&path).map_err(|e| e.to_string())?, None, false)
                } else {
                    let key = VolumeKey::generate().map_err(|e| e.to_string())?;
                    key.write_new_file(&path).map_err(|e| e.to_string())?;
                    (key, None, true)
                }
            };
            let spec = VolumeSpec {
                name: a.name.clone(),
                id,
                size: a.size,
                k: a.k,
                m: a.m,
                shard_size,
                repair_threshold: threshold,
                key_check: key.check_value(&id).0,
                kdf,
                durability,
            };
            let c = client(&a.credential)?;
            c.create_volume(spec).await.map_err(|e| e.to_string())?;
            if made {
                eprintln!(
                    "wrote a new volume key to {} (mode 0600). Back it up: without it the volume cannot be read.",
                    a.key_file.as_ref().expect("a key file").display()
                );
            }
            eprintln!(
                "created volume {}: {}, k={} m={}, {} shards, repair below {} healthy shards, durability {}",
                a.name,
                human(a.size),
                a.k,
                a.m,
                human(a.shard_size),
                threshold,
                durability.as_str()
            );
            Ok(())
        }
        VolumeCommand::List(a) => {
            let s = client(&a.credential)?.status().await.map_err(|e| e.to_string())?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s.volumes).map_err(|e| e.to_string())?);
            } else {
                print!("{}", meshdisk::cli::status::render_volumes(&s.volumes));
            }
            Ok(())
        }
        VolumeCommand::Info(a) => {
            let info = client(&a.credential)?.volume_info(&a.name).await.map_err(|e| e.to_string())?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&info).map_err(|e| e.to_string())?);
            } else {
                print!("{}", meshdisk::cli::status::render_volume_info(&info));
            }
            Ok(())
        }
        VolumeCommand::Delete(a) => {
            if !a.yes {
                use std::io::BufRead;
                eprint!("delete volume {} and all its data? type its name to confirm: ", a.name);
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line).map_err(|e| e.to_string())?;
                if line.trim() != a.name {
                    return Err("not confirmed; nothing was deleted".into());
                }
            }
            client(&a.credential)?.delete_volume(&a.name).await.map_err(|e| e.to_string())?;
            eprintln!("deleted volume {}; the directory erases its shards from the peers", a.name);
            Ok(())
        }
    }
}

async fn bench_cluster(args: BenchClusterArgs) -> Result<(), String> {
    use meshdisk::cli::bench_cluster::{ClusterBench, Phase};
    let shard_size = usize::try_from(args.shard_size).map_err(|_| "--shard-size is too large".to_string())?;
    if shard_size == 0 || shard_size % 64 != 0 || shard_size > 16 << 20 {
        return Err("--shard-size must be a multiple of 64 bytes, at most 16M".into());
    }
    if !(args.seconds > 0.0 && args.seconds <= 600.0) {
        return Err("--seconds must be more than 0 and at most 600".into());
    }
    if !(1..=256).contains(&args.depth) {
        return Err("--depth must be 1 to 256".into());
    }
    let phases = args
        .phases
        .iter()
        .map(|p| match p.as_str() {
            "put" => Ok(Phase::Put),
            "get" => Ok(Phase::Get),
            "clean" => Ok(Phase::Clean),
            other => Err(format!("unknown phase {other:?} (put, get, clean)")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let config = ClusterBench {
        shard_size,
        duration: std::time::Duration::from_secs_f64(args.seconds),
        depth: args.depth,
        phases,
    };
    let c = client(&args.credential)?;
    let json = args.json;
    let results = meshdisk::cli::bench_cluster::run(&c, &config, |r| {
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
        let rows: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "phase": r.phase.as_str(),
                    "peers": r.peers,
                    "shards": r.shards,
                    "bytes": r.bytes,
                    "seconds": r.seconds,
                    "gib_per_s": r.gib_per_s(),
                    "cpu_seconds": r.cpu_seconds,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
    }
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
        run(backend, &Listen::of(&args), format!("memory ({})", human(size)), stop_on_signals()?).await
    } else {
        let path = args.file.clone().expect("clap requires --file without --memory");
        let ring = Uring::new(256).map_err(|e| format!("setting up io_uring: {e}"))?;
        let backend =
            FileBackend::open(&ring, &path, args.size, args.read_only).map_err(|e| e.to_string())?;
        let what = format!("file {} ({})", path.display(), human(backend.size()));
        run(Arc::new(backend), &Listen::of(&args), what, stop_on_signals()?).await
    }
}

/// Where an NBD server listens and what it calls its export.
struct Listen {
    listen: String,
    socket: Option<PathBuf>,
    export: String,
    description: Option<String>,
    read_only: bool,
}

impl Listen {
    fn of(args: &ServeArgs) -> Self {
        Self {
            listen: args.listen.clone(),
            socket: args.socket.clone(),
            export: args.export.clone(),
            description: args.description.clone(),
            read_only: args.read_only,
        }
    }
}

/// The default state folder of an attach of `volume`.
fn default_state_dir(volume: &str) -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("meshdisk").join(volume)
}

async fn attach(a: AttachArgs) -> Result<(), String> {
    use meshdisk::volume::{Volume, VolumeConfig};
    let c = client(&a.credential)?;
    let record = c.volume(&a.name).await.map_err(|e| e.to_string())?;
    let key = match &a.key_file {
        Some(path) => VolumeKey::read_file(path).map_err(|e| e.to_string())?,
        None => {
            let Some(kdf) = &record.spec.kdf else {
                return Err(format!(
                    "volume {} was created with a key file, not a passphrase: give --key-file",
                    a.name
                ));
            };
            let pass = meshdisk::cli::passphrase::read(&format!("passphrase of volume {}: ", a.name), false)?;
            VolumeKey::from_passphrase(pass.as_bytes(), kdf).map_err(|e| e.to_string())?
        }
    };
    let state = a.cache_dir.clone().unwrap_or_else(|| default_state_dir(&a.name));
    let pidfile = state.join("attach.pid");
    if let Ok(pid) = std::fs::read_to_string(&pidfile)
        && let Ok(pid) = pid.trim().parse::<i32>()
        && pid != std::process::id() as i32
        && alive(pid)
        && std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "meshdisk")
    {
        return Err(format!(
            "{} is in use by meshdisk attach (pid {pid}): run `meshdisk detach {}` first, or give another --cache-dir",
            state.display(),
            a.name
        ));
    }
    let mut config = VolumeConfig::new(state.clone(), a.cache_size);
    config.force = a.force;
    let volume = Volume::open(c, &a.name, &key, config).await.map_err(|e| e.to_string())?;
    drop(key);
    std::fs::write(&pidfile, format!("{}\n", std::process::id()))
        .map_err(|e| format!("{}: {e}", pidfile.display()))?;
    let spec = &volume.record().spec;
    info!(
        "attached volume {} ({}, k={} m={}, durability {}) with lease epoch {}; state in {}",
        spec.name,
        human(spec.size),
        spec.k,
        spec.m,
        spec.durability.as_str(),
        volume.epoch(),
        state.display()
    );
    let socket = match (&a.socket, &a.listen) {
        (Some(s), _) => Some(s.clone()),
        (None, None) => Some(state.join("nbd.sock")),
        (None, Some(_)) => None,
    };
    let listen = Listen {
        listen: a.listen.clone().unwrap_or_else(|| "none".into()),
        socket,
        export: a.export.clone(),
        description: Some(format!("meshdisk volume {}", spec.name)),
        read_only: false,
    };
    let what = format!("volume {}", spec.name);
    let served = run(Arc::new(volume.clone()), &listen, what, stop_on_signals()?).await;
    let closed = volume.close().await.map_err(|e| format!("detaching: {e}"));
    let _ = std::fs::remove_file(&pidfile);
    served?;
    closed?;
    info!("volume {} detached: everything is on the peers and the lease is released", a.name);
    Ok(())
}

/// The process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

fn detach(a: &DetachArgs) -> Result<(), String> {
    let state = a.cache_dir.clone().unwrap_or_else(|| default_state_dir(&a.name));
    let pidfile = state.join("attach.pid");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("volume {} is not attached from {}", a.name, state.display()))?;
    // SAFETY: kill(2) with a pid read from our own pid file and SIGTERM.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        let _ = std::fs::remove_file(&pidfile);
        return Err(format!("volume {} is not attached (its attach process {pid} is gone)", a.name));
    }
    eprintln!("detaching volume {} (pid {pid}): flushing to the peers…", a.name);
    let start = std::time::Instant::now();
    while alive(pid) {
        if start.elapsed() > std::time::Duration::from_secs(300) {
            return Err(format!("attach (pid {pid}) is still flushing after 5 minutes"));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    eprintln!("detached volume {}", a.name);
    Ok(())
}

async fn run<B: Backend>(
    backend: Arc<B>,
    args: &Listen,
    what: String,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
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

    stop.cancelled().await;
    info!("finishing in-flight requests");
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
