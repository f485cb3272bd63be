//! `meshdisk demo`: a whole cluster on one machine. A directory and six
//! peers run as child processes (each with its own data folder and
//! capacity, its log in `STATE/logs/`), volume `demo` (k=4, m=2) is
//! created with a generated key on the first run, and this process
//! attaches it and serves it over NBD. Ctrl-C detaches (everything is
//! flushed to the peers) and stops the children; the next run reuses the
//! state, data included.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::api::{Durability, ErrorKind, PeerState, VolumeSpec};
use crate::cli::CliError;
use crate::client::Client;
use crate::membership::ca::Role;
use crate::membership::credential::Credential;
use crate::size::{human, parse_size};
use crate::volume::v2::{Config, Volume};

#[derive(Args)]
pub struct DemoArgs {
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

impl From<DemoArgs> for DemoConfig {
    fn from(a: DemoArgs) -> Self {
        Self {
            state: a.state,
            size: a.size,
            peers: 6,
            capacity: a.capacity,
            cache_size: a.cache_size,
            listen: a.listen,
        }
    }
}

/// How the demo's cluster failed to come up.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{name} did not start within 30 s; see {}", .log.display())]
    SlowStart { name: String, log: PathBuf },
    #[error("{name} exited ({status}); see {}", .log.display())]
    Exited { name: String, status: std::process::ExitStatus, log: PathBuf },
    #[error("the peers did not all report to the directory within 30 s")]
    PeersNotUp,
    #[error("{} is not a port number", .0.display())]
    BadPortFile(PathBuf),
}

/// What `meshdisk demo` builds.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    pub state: PathBuf,
    pub size: u64,
    pub peers: usize,
    pub capacity: u64,
    pub cache_size: u64,
    /// Also serve NBD over TCP here.
    pub listen: Option<String>,
}

pub const VOLUME: &str = "demo";

/// How long the demo's stop tries to flush the volume to the peers.
const DETACH_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the demo may take to stop: the flush, a directory call to
/// release the lease, and its children's stops (each bounded by
/// [`STOP_GRACE`](crate::cli::STOP_GRACE)).
pub const STOP_GRACE: Duration = Duration::from_secs(60 + 30);

/// A child process whose stdout we watch for a line.
struct Proc {
    name: String,
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, logs: &Path) -> Result<Self, CliError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("{name}.log")))
            .map_err(CliError::io(logs.display()))?;
        cmd.stdout(Stdio::piped()).stderr(log).stdin(Stdio::null());
        // SAFETY: prctl in the forked child before exec; async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                // Ctrl-C reaches the terminal's whole process group: keep
                // the children out of it, the demo stops them in order
                // once the volume is flushed.
                libc::setpgid(0, 0);
                // The children go when the demo goes, even on SIGKILL.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(CliError::io(format_args!("starting {name}")))?;
        let out = child.stdout.take().expect("piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { name: name.to_owned(), child, lines })
    }

    fn wait_line(&mut self, needle: &str, logs: &Path) -> Result<String, DemoError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = || logs.join(format!("{}.log", self.name));
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(_) if Instant::now() >= deadline => {
                    return Err(DemoError::SlowStart { name: self.name.clone(), log: log() });
                }
                Err(_) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        return Err(DemoError::Exited { name: self.name.clone(), status, log: log() });
                    }
                }
            }
        }
    }

    fn stop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The directory's port, chosen on the first run and kept.
fn directory_port(state: &Path) -> Result<u16, CliError> {
    let path = state.join("directory.port");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok(text.trim().parse().map_err(|_| DemoError::BadPortFile(path))?);
    }
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_err(CliError::io("finding a free port"))?
        .port();
    std::fs::write(&path, format!("{port}\n")).map_err(CliError::io(path.display()))?;
    Ok(port)
}

/// The children, stopped in reverse order when dropped.
struct Children(Vec<Proc>);

impl Drop for Children {
    fn drop(&mut self) {
        for p in self.0.iter_mut().rev() {
            p.stop();
        }
    }
}

/// Runs the demo until `stop`.
pub async fn run(config: DemoConfig, stop: CancellationToken) -> Result<(), CliError> {
    let state = std::path::absolute(&config.state).map_err(CliError::io(config.state.display()))?;
    let logs = state.join("logs");
    std::fs::create_dir_all(&logs).map_err(CliError::io(logs.display()))?;
    let exe = std::env::current_exe().map_err(CliError::io("finding the meshdisk binary"))?;
    let port = directory_port(&state)?;
    let dir_addr = format!("127.0.0.1:{port}");
    let mut children = Children(Vec::new());

    eprintln!("meshdisk demo: state in {}", state.display());
    let mut cmd = Command::new(&exe);
    cmd.args(["directory", "--cluster", "demo", "--listen", &dir_addr, "--peer-timeout", "3s", "--data"])
        .arg(state.join("directory"));
    let mut directory = Proc::spawn("directory", &mut cmd, &logs)?;
    directory.wait_line("directory listening on", &logs)?;
    children.0.push(directory);
    eprintln!("  directory on {dir_addr}");

    let client = Client::new(Credential::load(&state.join("directory/admin.cred"))?)?;
    for i in 1..=config.peers {
        let name = format!("peer-{i}");
        let data = state.join("peers").join(&name);
        let mut cmd = Command::new(&exe);
        cmd.args(["peer", "--directory", &dir_addr, "--listen", "127.0.0.1:0", "--name", &name])
            .args(["--capacity", &config.capacity.to_string(), "--failure-domain", &format!("disk-{i}")])
            .arg("--data")
            .arg(&data);
        if !data.join("identity.cred").exists() {
            let (token, _) = client.create_token(Role::Peer, Duration::from_secs(600)).await?;
            cmd.env("MESHDISK_JOIN_TOKEN", token);
        }
        let mut p = Proc::spawn(&name, &mut cmd, &logs)?;
        let line = p.wait_line(" listening on ", &logs)?;
        children.0.push(p);
        eprintln!("  {}", line.trim());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = client.status().await?;
        if s.peers.iter().filter(|p| p.state == PeerState::Up).count() >= config.peers {
            break;
        }
        if Instant::now() > deadline {
            return Err(DemoError::PeersNotUp.into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let key_path = state.join("demo.key");
    let key = match client.volume(VOLUME).await {
        Ok(record) => crate::cli::unlock::data_key(&record, Some(&key_path))?,
        Err(e) if e.kind() == Some(ErrorKind::NotFound) => {
            let mut id = [0u8; 16];
            getrandom::fill(&mut id)?;
            let (file, _) = crate::cli::unlock::key_file_or_new(&key_path)?;
            let first = crate::codec::keyslot::NewSlot::KeyFile(&file);
            let (key, key_check, key_slots) = crate::cli::unlock::new_volume_keys(&first, &id)?;
            let spec = VolumeSpec {
                name: VOLUME.into(),
                id,
                size: config.size,
                k: 4,
                m: 2,
                // Segments of 4 MiB of data (k = 4 shards of 1 MiB).
                shard_size: 1 << 20,
                repair_threshold: 6,
                key_check,
                key_slots,
                durability: Durability::Remote,
                lineage: Vec::new(),
            };
            client.create_volume(spec).await?;
            eprintln!(
                "  created volume {VOLUME} ({}, k=4 m=2), key in {}",
                human(config.size),
                key_path.display()
            );
            key
        }
        Err(e) => return Err(e.into()),
    };
    // A lease left by a killed demo is resumed from this folder's note.
    let vc = Config::new(state.join("attach"), config.cache_size);
    let volume = Volume::open(client.clone(), VOLUME, &key, vc).await?;
    drop(key);

    let socket = state.join("nbd.sock");
    let server = crate::nbd::Server::new(
        Arc::new(volume.clone()),
        crate::nbd::ServerConfig { description: Some("meshdisk demo volume".into()), ..Default::default() },
    );
    let unix = crate::nbd::server::bind_unix(&socket).map_err(CliError::io(socket.display()))?;
    let mut listeners = tokio::task::JoinSet::new();
    let s = server.clone();
    listeners.spawn(async move { s.serve_unix(unix).await });
    let mut tcp_uri = None;
    if let Some(addr) = &config.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(CliError::io(format_args!("listening on {addr}")))?;
        tcp_uri = Some(format!(
            "nbd://{}",
            l.local_addr().map_err(CliError::io("reading the TCP listener's address"))?
        ));
        let s = server.clone();
        listeners.spawn(async move { s.serve_tcp(l).await });
    }
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    println!("{uri}");
    if let Some(t) = &tcp_uri {
        println!("{t}");
    }
    eprintln!("{}", usage(&uri, &socket, &state));
    stop.cancelled().await;
    // From here on stderr may be closed (the terminal gone): no `eprintln!`,
    // which panics then.
    let _ = writeln!(std::io::stderr(), "stopping: flushing the volume to the peers…");
    let start = Instant::now();
    let flushed = server.shutdown_within(DETACH_TIMEOUT).await;
    while listeners.join_next().await.is_some() {}
    drop(server);
    let _ = std::fs::remove_file(&socket);
    let left = DETACH_TIMEOUT.saturating_sub(start.elapsed()).max(Duration::from_secs(1));
    let closed = volume.close(left).await;
    drop(children);
    flushed.map_err(CliError::Flush)?;
    closed.map_err(CliError::Detach)?;
    let _ = writeln!(
        std::io::stderr(),
        "stopped cleanly; run `meshdisk demo` again to pick up where you left off"
    );
    Ok(())
}

fn usage(uri: &str, socket: &Path, state: &Path) -> String {
    let s = socket.display();
    let st = state.display();
    format!(
        r#"
volume "demo" is served at {uri}

  look at it:        nbdinfo '{uri}'
  a filesystem:      mkdir -p /tmp/demo-nbd /mnt/demo
                     nbdfuse /tmp/demo-nbd/disk --unix {s} &
                     mkfs.ext4 /tmp/demo-nbd/disk && mount -o loop /tmp/demo-nbd/disk /mnt/demo
  kernel block dev:  modprobe nbd   (kernel-setup/README.md has the details)
                     nbd-client -unix {s} /dev/nbd0 -b 4096 -C 4
  a VM disk:         qemu-system-x86_64 ... -drive file={uri},format=raw,if=virtio
  benchmark:         fio --ioengine=nbd --uri='{uri}' --name=w --rw=randwrite --bs=4k --iodepth=32 --size=1g
  cluster state:     meshdisk status --credential {st}/directory/admin.cred

Ctrl-C detaches (everything is flushed to the peers) and stops the cluster.
"#
    )
}
