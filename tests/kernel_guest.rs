//! End-to-end tests with a real Linux kernel NBD client.
//!
//! Both tests boot a Debian cloud kernel under QEMU (TCG) with
//! `kernel-setup/guest-test.sh`, pointed at a unix socket that serves NBD.
//! Inside the guest, `nbd-client` attaches /dev/nbd0 through a virtio-serial
//! port that QEMU connects to that socket; the guest builds an ext4, writes
//! files, checks it with `e2fsck -fn`, remounts and verifies every file,
//! does O_DIRECT raw I/O past the filesystem, detaches and prints
//! `MESHDISK-GUEST-RESULT: ok ...`. The host then copies the export out
//! with `nbdcopy` and checks it with `e2fsck -fn` and the raw pattern.
//!
//! - `kernel_nbd_client_ext4_roundtrip`: the server is
//!   `meshdisk serve --memory 1G --listen none --socket <tmp>/nbd.sock`.
//! - `kernel_nbd_client_ext4_on_an_attached_volume`: the server is
//!   `meshdisk attach` of a k=4 m=2 volume on a directory and six peers,
//!   all real processes. After the guest is done the volume is detached
//!   and attached again from another cache folder (another machine: empty
//!   log, empty cache), and the host's checks read through that second
//!   attach, so the filesystem they see came from the peers.
//!
//! Needs the guest cache made by `kernel-setup/fetch-guest.sh` (kernel,
//! initramfs, QEMU), `nbdcopy` and `e2fsck`. Without them a test prints a
//! skip notice and passes, unless `MESHDISK_REQUIRE_E2E=1`, which turns
//! every missing prerequisite into a failure. `MESHDISK_FETCH_GUEST=1` runs
//! fetch-guest.sh first. `MESHDISK_BIN` overrides the meshdisk binary
//! (default: this crate's bin).
//!
//! Run: `cargo test --test kernel_guest -- --nocapture`
#![cfg(target_os = "linux")]

mod common;

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Proc};

/// Guest test budget; the guest normally finishes in ~15-30 s under TCG.
const GUEST_TIMEOUT_SECS: u64 = 300;
/// Host-side tools (nbdcopy, e2fsck) budget.
const TOOL_TIMEOUT: Duration = Duration::from_secs(180);

fn require_e2e() -> bool {
    env::var("MESHDISK_REQUIRE_E2E").is_ok_and(|v| v == "1")
}

/// Missing prerequisite: fail under MESHDISK_REQUIRE_E2E=1, otherwise skip.
/// Returns normally only when skipping (callers then `return`).
fn skip_or_fail(what: &str) {
    if require_e2e() {
        panic!("kernel_guest: {what} (MESHDISK_REQUIRE_E2E=1, so this is a failure)");
    }
    eprintln!("kernel_guest: SKIPPED: {what} (set MESHDISK_REQUIRE_E2E=1 to make this fail)");
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn guest_cache() -> PathBuf {
    if let Some(c) = env::var_os("MESHDISK_GUEST_CACHE") {
        return PathBuf::from(c);
    }
    let home = env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/meshdisk-guest")
}

/// The guest cache is usable when guest.env exists and every path it names
/// (kernel, initramfs, qemu) is present.
fn guest_cache_ready(cache: &Path) -> Result<(), String> {
    let envfile = cache.join("guest.env");
    let text = fs::read_to_string(&envfile)
        .map_err(|e| format!("guest cache not ready: cannot read {}: {e}", envfile.display()))?;
    for key in ["GUEST_KERNEL", "GUEST_INITRD", "QEMU_BIN"] {
        let val = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(|v| v.trim_matches('\''))
            .ok_or_else(|| format!("{} has no {key}", envfile.display()))?;
        if !Path::new(val).exists() {
            return Err(format!("guest cache incomplete: {val} ({key}) is missing"));
        }
    }
    Ok(())
}

/// Finds an executable on PATH, also looking in the sbin folders that a
/// non-root PATH often lacks (e2fsck lives in /sbin).
fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        env::var_os("PATH").map(|p| env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Kills the child on drop, so a panicking test never leaks the server.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a command to completion with a wall-clock limit, capturing output.
fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Result<Output, String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {desc}: {e}"))?;
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut out_pipe = child.stdout.take().expect("stdout piped");
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status: ExitStatus = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{desc} did not finish within {limit:?}; killed"));
            }
            Ok(None) => thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("waiting for {desc}: {e}")),
        }
    };
    Ok(Output { status, stdout: out_t.join().unwrap_or_default(), stderr: err_t.join().unwrap_or_default() })
}

fn server_logs(dir: &Path) -> String {
    let out = fs::read_to_string(dir.join("server.stdout")).unwrap_or_default();
    let err = fs::read_to_string(dir.join("server.stderr")).unwrap_or_default();
    format!("--- server stdout ---\n{out}\n--- server stderr ---\n{err}")
}

/// Waits until the server's socket exists, accepts a connection and sends
/// the NBD newstyle greeting magic.
fn wait_for_server(server: &mut Child, sock: &Path, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_err = String::from("socket file not created");
    while Instant::now() < deadline {
        if let Ok(Some(st)) = server.try_wait() {
            panic!("meshdisk server exited early with {st}\n{}", server_logs(dir));
        }
        if sock.exists() {
            match UnixStream::connect(sock) {
                Ok(mut s) => {
                    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                    let mut magic = [0u8; 8];
                    match s.read_exact(&mut magic) {
                        Ok(()) if &magic == b"NBDMAGIC" => return,
                        Ok(()) => panic!(
                            "server on {} did not send the NBD greeting (got {magic:?})\n{}",
                            sock.display(),
                            server_logs(dir)
                        ),
                        Err(e) => last_err = format!("reading greeting: {e}"),
                    }
                }
                Err(e) => last_err = format!("connect: {e}"),
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "meshdisk server did not come up on {} within 30 s ({last_err})\n{}",
        sock.display(),
        server_logs(dir)
    );
}

/// Asks the server to stop with SIGTERM (via kill(1): the test uses no libc
/// crate) and expects a clean exit within 30 s.
fn stop_server(mut server: KillOnDrop, dir: &Path) {
    let pid = server.0.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().is_ok_and(|s| s.success());
    if !sent {
        eprintln!("kernel_guest: could not send SIGTERM to {pid}; killing the server");
        return; // KillOnDrop
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match server.0.try_wait() {
            Ok(Some(st)) => {
                assert!(st.success(), "server did not stop cleanly on SIGTERM ({st})\n{}", server_logs(dir));
                return;
            }
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
            _ => panic!("server did not exit within 30 s of SIGTERM\n{}", server_logs(dir)),
        }
    }
}

/// Value of `key=` in the guest's result line.
fn result_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The guest writes `raw_len` bytes of 32-byte records
/// `meshdisk-raw-%018d\n` at `raw_offset` with O_DIRECT.
fn expected_raw_pattern(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(format!("meshdisk-raw-{i:018}\n").as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The guest cache, once every prerequisite is there; `None` when the test
/// is skipped (never under `MESHDISK_REQUIRE_E2E=1`, which fails instead).
fn guest_prerequisites() -> Option<PathBuf> {
    let root = manifest_dir();
    let cache = guest_cache();
    if env::var("MESHDISK_FETCH_GUEST").is_ok_and(|v| v == "1") {
        let st = Command::new(root.join("kernel-setup/fetch-guest.sh"))
            .arg(&cache)
            .status()
            .expect("run kernel-setup/fetch-guest.sh");
        assert!(st.success(), "kernel-setup/fetch-guest.sh failed: {st}");
    }
    if let Err(why) = guest_cache_ready(&cache) {
        skip_or_fail(&format!(
            "{why}; run kernel-setup/fetch-guest.sh {} to download the guest kernel/QEMU",
            cache.display()
        ));
        return None;
    }
    // Checked before the guest runs: its ~20 s are wasted without them.
    if find_tool("nbdcopy").is_none() || find_tool("e2fsck").is_none() {
        skip_or_fail("host verification needs nbdcopy (libnbd-bin) and e2fsck (e2fsprogs)");
        return None;
    }
    Some(cache)
}

/// What the guest reported in its `ok` line.
struct GuestResult {
    line: String,
    /// The export's size as the guest's block device saw it.
    size: u64,
    raw_offset: u64,
    raw_len: usize,
}

/// Boots the guest against the NBD server on `sock` and waits for its `ok`
/// line. `logs` says what the server printed, for the failure messages.
fn run_guest(cache: &Path, sock: &Path, dir: &Path, logs: &dyn Fn() -> String) -> GuestResult {
    let started = Instant::now();
    let out = run_with_timeout(
        Command::new(manifest_dir().join("kernel-setup/guest-test.sh"))
            .arg("--socket")
            .arg(sock)
            .arg("--cache")
            .arg(cache)
            .args(["--timeout", &GUEST_TIMEOUT_SECS.to_string()])
            .arg("--log")
            .arg(dir.join("console.log")),
        Duration::from_secs(GUEST_TIMEOUT_SECS + 60),
    )
    .unwrap_or_else(|e| panic!("guest-test.sh: {e}\n{}", logs()));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    println!("--- guest-test.sh stdout ---\n{stdout}--- guest-test.sh stderr ---\n{stderr}");
    println!("kernel_guest: guest run took {:.1?}", started.elapsed());

    let result = stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .rfind(|l| l.starts_with("MESHDISK-GUEST-RESULT:"))
        .map(str::to_owned);
    assert!(
        out.status.success() && result.as_deref().is_some_and(|l| l.starts_with("MESHDISK-GUEST-RESULT: ok")),
        "guest test failed (exit {}): result line {:?}\n{}",
        out.status,
        result,
        logs()
    );
    let line = result.expect("checked above");
    let field = |key: &str| -> u64 {
        result_field(&line, key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}= in the guest's result line {line:?}"))
    };
    GuestResult {
        size: field("size"),
        raw_offset: field("raw_offset"),
        raw_len: field("raw_len") as usize,
        line,
    }
}

/// Copies the export on `sock` into `img` with `nbdcopy`.
fn copy_export(sock: &Path, img: &Path, logs: &dyn Fn() -> String) {
    let nbdcopy = find_tool("nbdcopy").expect("checked by guest_prerequisites");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let copy = run_with_timeout(Command::new(&nbdcopy).arg(&uri).arg(img), TOOL_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert!(
        copy.status.success(),
        "nbdcopy {uri} failed ({}): {}{}\n{}",
        copy.status,
        text(&copy.stdout),
        text(&copy.stderr),
        logs()
    );
}

/// Copies the export on `sock` out and checks it on the host: `size` bytes
/// (what the guest saw too), a clean `e2fsck -fn`, and the guest's raw
/// records at their offset. Returns the image's sha256.
fn check_export(
    sock: &Path,
    dir: &Path,
    guest: &GuestResult,
    size: u64,
    logs: &dyn Fn() -> String,
) -> String {
    let e2fsck = find_tool("e2fsck").expect("checked by guest_prerequisites");
    let img = dir.join("export.img");
    copy_export(sock, &img, logs);
    let copied = fs::metadata(&img).expect("export.img").len();
    assert_eq!(copied, size, "exported image should be {size} bytes");
    assert_eq!(guest.size, copied, "guest and host disagree on the size");

    let fsck = run_with_timeout(Command::new(&e2fsck).arg("-fn").arg(&img), TOOL_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    println!("--- host e2fsck -fn ---\n{}{}", text(&fsck.stdout), text(&fsck.stderr));
    assert!(fsck.status.success(), "host e2fsck -fn reports problems ({})", fsck.status);

    let mut f = fs::File::open(&img).expect("open export.img");
    f.seek(SeekFrom::Start(guest.raw_offset)).expect("seek");
    let mut got = vec![0u8; guest.raw_len];
    f.read_exact(&mut got).expect("read raw region");
    assert!(
        got == expected_raw_pattern(guest.raw_len),
        "raw pattern written by the guest at offset {} is not in the export",
        guest.raw_offset
    );
    drop(f);
    let sha = common::sha256_file(&img);
    fs::remove_file(&img).expect("remove export.img");
    sha
}

#[test]
fn kernel_nbd_client_ext4_roundtrip() {
    let Some(cache) = guest_prerequisites() else { return };
    let bin = common::meshdisk_bin();
    assert!(bin.is_file(), "server binary {} not found", bin.display());

    let tmp = tempfile::Builder::new().prefix("meshdisk-kguest").tempdir().expect("tempdir");
    let dir = tmp.path();
    let sock = dir.join("nbd.sock");

    // --- server -------------------------------------------------------------
    let child = Command::new(&bin)
        .args([OsStr::new("serve"), "--memory".as_ref(), "1G".as_ref()])
        .args(["--listen", "none", "--socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("server.stdout")).expect("log file"))
        .stderr(fs::File::create(dir.join("server.stderr")).expect("log file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let mut server = KillOnDrop(child);
    wait_for_server(&mut server.0, &sock, dir);
    eprintln!("kernel_guest: server {} up on {}", bin.display(), sock.display());

    // --- guest --------------------------------------------------------------
    let guest = run_guest(&cache, &sock, dir, &|| server_logs(dir));
    if let Ok(Some(st)) = server.0.try_wait() {
        panic!("meshdisk server died during the guest run ({st})\n{}", server_logs(dir));
    }

    // --- host-side verification of the export --------------------------------
    check_export(&sock, dir, &guest, 1 << 30, &|| server_logs(dir));

    stop_server(server, dir);
    println!("kernel_guest: OK ({})", guest.line);
}

/// The volume of the attached-volume test: small, since TCG emulates every
/// guest I/O and the guest needs only 64 MiB (its files, then 4 MiB raw).
const VOLUME: &str = "guestdisk";
const VOLUME_SIZE: u64 = 256 << 20;

/// A running `meshdisk attach` of [`VOLUME`] from one cache folder.
struct Attached {
    proc: Proc,
    state: PathBuf,
    socket: PathBuf,
}

/// `meshdisk attach` from cache folder `name` under the cluster's root;
/// returns once it serves.
fn attach(c: &Cluster, name: &str) -> Attached {
    let state = c.root.path().join(name);
    let socket = state.join("nbd.sock");
    let mut cmd = Command::new(common::meshdisk_bin());
    cmd.args(["attach", VOLUME, "--credential"])
        .arg(c.admin_cred())
        .arg("--key-file")
        .arg(c.root.path().join(format!("{VOLUME}.key")))
        .arg("--cache-dir")
        .arg(&state)
        .args(["--cache-size", "16M", "--socket"])
        .arg(&socket);
    let mut proc = Proc::spawn(&format!("attach-{name}"), &mut cmd);
    proc.wait_for("nbd+unix://", Duration::from_secs(60));
    Attached { proc, state, socket }
}

/// `meshdisk detach`: the attach flushes everything to the peers, releases
/// the lease and must exit 0.
fn detach(c: &Cluster, mut a: Attached) {
    let (ok, _, err) = c.cli(&["detach", VOLUME, "--cache-dir", a.state.to_str().unwrap()]);
    assert!(ok, "detach failed: {err}");
    let (status, out) = a.proc.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "attach did not stop cleanly: {out}");
}

#[test]
fn kernel_nbd_client_ext4_on_an_attached_volume() {
    let Some(cache) = guest_prerequisites() else { return };
    let started = Instant::now();
    let mut c = Cluster::start("kguest", &[]);
    for i in 0..6 {
        c.add_peer("1G", &format!("disk{i}"));
    }
    c.wait_all_up(6);
    c.create_volume(VOLUME, "256M", 4, 2);
    let mut laptop = attach(&c, "laptop");
    eprintln!(
        "kernel_guest: volume {VOLUME} attached on {} after {:.1?}",
        laptop.socket.display(),
        started.elapsed()
    );

    let guest = run_guest(&cache, &laptop.socket, c.root.path(), &|| laptop.proc.output());
    if let Ok(Some(st)) = laptop.proc.child.try_wait() {
        panic!("meshdisk attach died during the guest run ({st})\n{}", laptop.proc.output());
    }
    // What the guest left, as the machine that wrote it serves it.
    let written = c.root.path().join("laptop.img");
    copy_export(&laptop.socket, &written, &|| laptop.proc.output());
    let written_sha = common::sha256_file(&written);
    fs::remove_file(&written).expect("remove laptop.img");
    detach(&c, laptop);

    // Another machine: its own cache folder, so every block the checks
    // read comes from the peers, not from the first folder's log.
    let desktop = attach(&c, "desktop");
    let read_back =
        check_export(&desktop.socket, c.root.path(), &guest, VOLUME_SIZE, &|| desktop.proc.output());
    // e2fsck checks the structure only: every byte of the files (and of
    // the rest of the device) must be what the first machine served too.
    assert_eq!(read_back, written_sha, "the volume read from the peers differs from what the guest wrote");
    detach(&c, desktop);
    println!("kernel_guest: OK on an attached volume in {:.1?} ({})", started.elapsed(), guest.line);
}
