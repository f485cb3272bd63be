//! Stopping, whatever the rest of the cluster does: every long-running
//! process exits within a bounded time of SIGTERM even when the processes
//! it talks to were SIGKILLed, and even when nobody reads its output any
//! more (its parent died). Real processes on loopback.

mod common;

use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Proc};
use common::{meshdisk_bin, spawn_tied};

/// How long any process may take to exit after SIGTERM here (an attach
/// with `--detach-timeout 3s`: 3 s of flush, then its workers'
/// [`STOP_WAIT`](meshdisk::sys::worker::STOP_WAIT) at most).
const BOUND: Duration = Duration::from_secs(15);

/// SIGTERM, then wait for the exit; its status, output and how long it took.
fn term(p: &mut Proc) -> (std::process::ExitStatus, String, Duration) {
    let start = Instant::now();
    p.signal(libc::SIGTERM);
    let (status, out) = p.wait_exit(BOUND);
    (status, out, start.elapsed())
}

/// Writes 4 KiB blocks with a flush every 16 until the attach goes away.
fn write_until_gone(socket: &Path) {
    let Ok(mut sock) = UnixStream::connect(socket) else { return };
    let Ok(export) = nbd::client::handshake(&mut sock, b"") else { return };
    let mut c = nbd::client::NbdClient::new(&mut sock, &export);
    for i in 0u64.. {
        let block = [(i % 251) as u8; 4096];
        if c.seek(SeekFrom::Start((i % 4096) * 4096)).is_err() || c.write_all(&block).is_err() {
            return;
        }
        if i % 16 == 15 && c.flush().is_err() {
            return;
        }
    }
}

#[test]
fn each_process_stops_in_bounded_time_when_the_others_were_killed() {
    let mut c = Cluster::start("stop", &["--lease-ttl", "4s"]);
    for i in 0..4 {
        c.add_peer("1G", &format!("disk{i}"));
    }
    c.wait_all_up(4);
    c.create_volume("disk", "64M", 2, 1);
    let state = c.root.path().join("attach");
    let socket = state.join("nbd.sock");
    let mut cmd = Command::new(meshdisk_bin());
    cmd.args(["attach", "disk", "--credential"])
        .arg(c.admin_cred())
        .arg("--key-file")
        .arg(c.root.path().join("disk.key"))
        .arg("--cache-dir")
        .arg(&state)
        .arg("--socket")
        .arg(&socket)
        .args(["--cache-size", "16M", "--detach-timeout", "3s"]);
    let mut attach = Proc::spawn("attach", &mut cmd);
    attach.wait_for("nbd+unix://", Duration::from_secs(60));
    let writer = {
        let socket = socket.clone();
        std::thread::spawn(move || write_until_gone(&socket))
    };
    std::thread::sleep(Duration::from_secs(1));

    // A directory whose peers are gone (all but the last, which is next).
    for p in &mut c.peers[..3] {
        p.kill();
    }
    let (status, out, took) = term(&mut c.directory);
    assert!(status.success(), "the directory failed to stop ({status}):\n{out}");
    assert!(out.contains("SIGTERM: stopping"), "{out}");
    eprintln!("directory stopped in {took:.1?}");

    // A peer whose directory is gone.
    let (status, out, took) = term(&mut c.peers[3]);
    assert!(status.success(), "the peer failed to stop ({status}):\n{out}");
    assert!(out.contains("SIGTERM: stopping"), "{out}");
    eprintln!("peer stopped in {took:.1?}");

    // An attach with writes in flight and nothing left to flush them to:
    // it exits after its detach timeout, saying its writes are kept in
    // the local log, which the next attach from the folder sends.
    let (status, out, took) = term(&mut attach);
    eprintln!("attach stopped in {took:.1?}");
    assert_eq!(status.code(), Some(1), "the attach cannot have detached cleanly:\n{out}");
    assert!(took >= Duration::from_secs(3), "the attach gave up before its detach timeout: {took:?}\n{out}");
    assert!(
        out.contains("are only in the local log")
            && out.contains("the next attach from this folder sends them"),
        "{out}"
    );
    writer.join().unwrap();
}

/// The cause of processes left running for an hour after a test was
/// killed: with stderr closed, every log line panicked, the first one in
/// the signal handler before it asked the process to stop.
#[test]
fn a_process_whose_output_nobody_reads_still_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(meshdisk_bin());
    cmd.args(["directory", "--cluster", "orphan", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("directory"))
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_tied(cmd).unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("directory listening on") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "the directory exited before listening");
    }
    // Its reader gone, as when the test process that spawned it died.
    drop(stdout);
    drop(child.stderr.take());
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > BOUND {
            let _ = child.kill();
            panic!("the directory did not stop within {BOUND:?} of SIGTERM with its stderr closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}
