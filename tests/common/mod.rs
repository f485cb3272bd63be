//! Shared harness for the integration tests: start `meshdisk serve` as a
//! real process, find the external tools, run them, and a minimal raw NBD
//! client for the protocol-abuse tests.
//!
//! Tools that are missing make a test skip with a message, unless
//! `MESHDISK_REQUIRE_E2E=1` (CI), where they make it fail.

#![allow(dead_code)]

pub mod cluster;
pub mod fs;
pub mod heal;
pub mod rawclient;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary under test: `$MESHDISK_BIN` (tools/test points it at the
/// release build) or the one cargo built for this test run.
pub fn meshdisk_bin() -> PathBuf {
    std::env::var_os("MESHDISK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_meshdisk")))
}

pub fn require_e2e() -> bool {
    std::env::var("MESHDISK_REQUIRE_E2E").is_ok_and(|v| v == "1")
}

/// True if every tool is on PATH. Otherwise skips (returns false) or, in
/// CI, fails the test.
pub fn have_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| which(t).is_none()).collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!("missing tools {missing:?}: run tools/test, which installs them");
    if require_e2e() {
        panic!("{msg} (MESHDISK_REQUIRE_E2E=1)");
    }
    eprintln!("SKIP: {msg}");
    false
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// PATH with /usr/bin first, so Debian's python3 (which has the libnbd
/// bindings `nbdsh` needs) wins over any other python3.
pub fn system_path() -> String {
    format!("/usr/bin:/usr/sbin:/sbin:{}", std::env::var("PATH").unwrap_or_default())
}

/// Runs a command, failing the test with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

pub fn stdout_of(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).expect("utf-8 output")
}

/// Runs an `nbdsh` script with the handle `h` already connected to `uri`
/// (libnbd's strict client-side checks off, so the server sees bad input).
pub fn nbdsh(uri: &str, script: &str) -> String {
    let prelude =
        format!("h.set_strict_mode(0)\nh.add_meta_context(\"base:allocation\")\nh.connect_uri({uri:?})\n");
    stdout_of(Command::new("nbdsh").env("PATH", system_path()).arg("-c").arg(format!("{prelude}{script}")))
}

/// Starts `cmd` so that its process dies with this test process, even
/// when the test process is SIGKILLed (a nextest timeout): the child gets
/// `PR_SET_PDEATHSIG` = SIGKILL. The kernel sends that signal when the
/// *thread* that forked the child exits, not the process, and tests spawn
/// from threads that end (the test's own under `cargo test`, a tokio
/// blocking thread): so every child is forked by one spawner thread that
/// lives as long as the process (its channel's sender is in a static and
/// never dropped).
pub fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    use std::sync::{Mutex, OnceLock};
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("test-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the spawner thread");
        Mutex::new(tx)
    });
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl, getppid and _exit in the forked child before exec are
    // async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died between the fork and the prctl: no signal
            // will come.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner.lock().unwrap().send((cmd, tx)).expect("the spawner thread is running");
    rx.recv().expect("the spawner thread answers")
}

/// A running `meshdisk serve`, stopped with SIGTERM on drop.
pub struct Served {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub tcp_uri: String,
    pub unix_uri: String,
    pub socket: PathBuf,
    pub tcp_addr: String,
}

impl Served {
    /// `meshdisk serve --listen 127.0.0.1:0 --socket DIR/nbd.sock EXTRA...`
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, extra)
    }

    pub fn memory(size: &str) -> Self {
        Self::start(&["--memory", size])
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        let socket = dir.path().join("nbd.sock");
        let mut cmd = Command::new(meshdisk_bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--socket"])
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_tied(cmd).expect("spawn meshdisk serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[meshdisk] {line}");
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut tcp_uri, mut unix_uri) = (String::new(), String::new());
        while tcp_uri.is_empty() || unix_uri.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("nbd://") => tcp_uri = line,
                Ok(line) if line.starts_with("nbd+unix://") => unix_uri = line,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait();
                    panic!("meshdisk serve did not print its URIs ({status:?})");
                }
            }
        }
        let tcp_addr = tcp_uri.trim_start_matches("nbd://").split('/').next().unwrap().to_string();
        Self { child: Some(child), dir, tcp_uri, unix_uri, socket, tcp_addr }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM, then wait for exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("already stopped");
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("meshdisk serve did not exit within 40 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_file(path: &Path) -> String {
    let out = stdout_of(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap().to_string()
}

/// A small seeded generator (xorshift) for reproducible random tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
