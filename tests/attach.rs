//! Volumes end to end: a directory and six peers as real processes,
//! `meshdisk attach` serving a volume over NBD, and real clients (fio,
//! nbdcopy, nbdsh, the `nbd` crate) on the other side.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Proc};
use common::rawclient::RawClient;
use common::{have_tools, meshdisk_bin, nbdsh, pattern, run, sha256_file};

const VOLUME: &str = "disk";

/// A cluster of six peers (one failure domain each) with volume `disk`
/// (k=4, m=2, 64 KiB shards: 256 KiB stripes).
struct Setup {
    c: Cluster,
}

/// A running `meshdisk attach`.
struct Attached {
    proc: Proc,
    state: PathBuf,
    uri: String,
    socket: PathBuf,
}

impl Setup {
    fn new(size: &str) -> Self {
        let mut c = Cluster::start("vols", &["--lease-ttl", "4s"]);
        for i in 0..6 {
            c.add_peer("2G", &format!("disk{i}"));
        }
        c.wait_all_up(6);
        c.create_volume(VOLUME, size, 4, 2);
        Self { c }
    }

    fn key(&self) -> PathBuf {
        self.c.root.path().join(format!("{VOLUME}.key"))
    }

    fn state(&self, name: &str) -> PathBuf {
        self.c.root.path().join(name)
    }

    fn attach_command(&self, state: &Path, key: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(meshdisk_bin());
        cmd.args(["attach", VOLUME, "--credential"])
            .arg(self.c.admin_cred())
            .arg("--key-file")
            .arg(key)
            .arg("--cache-dir")
            .arg(state)
            .arg("--socket")
            .arg(state.join("nbd.sock"));
        if !extra.contains(&"--cache-size") {
            cmd.args(["--cache-size", "16M"]);
        }
        cmd.args(extra);
        cmd
    }

    /// Attaches from state folder `name`; waits until it serves.
    fn attach(&self, name: &str, extra: &[&str]) -> Attached {
        let state = self.state(name);
        let mut proc =
            Proc::spawn(&format!("attach-{name}"), &mut self.attach_command(&state, &self.key(), extra));
        let line = proc.wait_for("nbd+unix://", Duration::from_secs(60));
        let socket = state.join("nbd.sock");
        Attached { proc, state, uri: line.trim().to_owned(), socket }
    }

    /// `meshdisk detach`; the attach must exit 0.
    fn detach(&self, mut a: Attached) {
        let (ok, _, err) = self.c.cli(&["detach", VOLUME, "--cache-dir", a.state.to_str().unwrap()]);
        assert!(ok, "detach failed: {err}");
        let (status, out) = a.proc.wait_exit(Duration::from_secs(60));
        assert!(status.success(), "attach did not stop cleanly: {out}");
    }
}

/// The whole device's sha256, read by nbdcopy.
fn device_sha(uri: &str, dir: &Path, name: &str) -> String {
    let out = dir.join(name);
    run(Command::new("nbdcopy").arg(uri).arg(&out));
    let sha = sha256_file(&out);
    std::fs::remove_file(&out).unwrap();
    sha
}

fn fio(uri: &str, args: &[&str]) -> String {
    let out = Command::new("fio")
        .args(["--ioengine=nbd", &format!("--uri={uri}"), "--output-format=terse", "--terse-version=3"])
        .args(["--verify_fatal=1", "--exitall_on_error=1"])
        .args(args)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fio {args:?} failed:\n{text}");
    text
}

#[test]
fn fio_verifies_sequential_random_mixed_and_parallel_io() {
    if !have_tools(&["fio"]) {
        return;
    }
    let s = Setup::new("256M");
    let a = s.attach("a", &[]);
    let jobs: [&[&str]; 4] = [
        &["--name=seq", "--rw=write", "--bs=1m", "--iodepth=16", "--size=48m", "--verify=crc32c"],
        &[
            "--name=rand",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=32m",
            "--offset=64m",
            "--verify=crc32c",
        ],
        &[
            "--name=mixed",
            "--rw=randrw",
            "--bs=16k",
            "--iodepth=32",
            "--size=32m",
            "--offset=112m",
            "--verify=crc32c",
            "--verify_backlog=256",
        ],
        &[
            "--name=conns",
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=8",
            "--numjobs=4",
            "--size=16m",
            "--offset=160m",
            "--offset_increment=16m",
            "--verify=crc32c",
        ],
    ];
    for job in jobs {
        fio(&a.uri, job);
    }
    // Everything again, from the peers this time: detach (flushes every
    // stripe), attach from another folder with an empty cache, verify only.
    let before = device_sha(&a.uri, s.c.root.path(), "before.img");
    s.detach(a);
    let b = s.attach("b", &[]);
    for job in jobs {
        let mut args: Vec<&str> = job.to_vec();
        args.push("--verify_only");
        fio(&b.uri, &args);
    }
    assert_eq!(device_sha(&b.uri, s.c.root.path(), "after.img"), before);
    s.detach(b);
}

#[test]
fn a_volume_moves_between_machines_and_keeps_every_byte() {
    if !have_tools(&["nbdcopy", "nbdsh"]) {
        return;
    }
    let s = Setup::new("64M");
    let a = s.attach("laptop", &[]);
    let src = s.c.root.path().join("src.img");
    let mut image = pattern(5, 64 << 20);
    // Leave holes: a stripe never written reads as zeroes and is not stored.
    image[8 << 20..16 << 20].fill(0);
    std::fs::write(&src, &image).unwrap();
    run(Command::new("nbdcopy").arg(&src).arg(&a.uri));
    // Unaligned writes are read-modify-write of whole sectors.
    let out = nbdsh(
        &a.uri,
        "h.pwrite(b'x' * 1000, 12345)\nh.pwrite(b'y' * 5000, (20 << 20) + 4000)\nh.flush()\nprint('WROTE')",
    );
    assert!(out.contains("WROTE"), "{out}");
    image[12345..13345].fill(b'x');
    image[(20 << 20) + 4000..(20 << 20) + 9000].fill(b'y');
    std::fs::write(&src, &image).unwrap();
    let expected = sha256_file(&src);
    assert_eq!(device_sha(&a.uri, s.c.root.path(), "a.img"), expected);
    s.detach(a);
    // 56 MiB of data (the 8 MiB hole is never written) on 4 + 2 shards.
    let stored = stored_bytes(&s);
    let data = (56u64 << 20) * 6 / 4;
    assert!(stored >= data && stored < data + (data / 10), "a hole is not stored: {stored} bytes for {data}");

    // Another machine: its own log and cache, same key.
    let b = s.attach("desktop", &[]);
    assert_eq!(device_sha(&b.uri, s.c.root.path(), "b.img"), expected);
    // The zeroed range is a hole: BLOCK_STATUS says so, and no shards exist.
    let out = nbdsh(
        &b.uri,
        "seen = []\n\
         h.block_status(8 << 20, 8 << 20, lambda c, o, e, err: seen.extend(e) or 0)\n\
         print('EXTENTS', seen)",
    );
    assert!(out.contains("EXTENTS [8388608, 3]"), "the zeroed range should be one hole: {out}");
    // TRIM of whole stripes drops them; WRITE_ZEROES of whole stripes too.
    let out = nbdsh(
        &b.uri,
        "h.trim(4 << 20, 32 << 20)\nh.zero(4 << 20, 40 << 20)\nh.flush()\n\
         assert h.pread(4 << 20, 40 << 20) == bytes(4 << 20)\n\
         assert h.pread(4 << 20, 32 << 20) == bytes(4 << 20)\nprint('ZEROED')",
    );
    assert!(out.contains("ZEROED"), "{out}");
    // Zeroes and trims are entries of a summary, not data: next to nothing
    // more is stored.
    s.detach(b);
    let after = stored_bytes(&s);
    assert!(after < stored + (1 << 20), "zeroing stored data: {stored} then {after} bytes");
}

/// Bytes the peers store, once their heartbeats have caught up (two
/// readings a second apart agree).
fn stored_bytes(s: &Setup) -> u64 {
    let total = || s.c.status().peers.iter().map(|p| p.used).sum::<u64>();
    let mut last = total();
    loop {
        std::thread::sleep(Duration::from_millis(1000));
        let now = total();
        if now == last {
            return now;
        }
        last = now;
    }
}

#[test]
fn one_writer_at_a_time_and_a_takeover_fences_the_old_one() {
    if !have_tools(&["nbdsh"]) {
        return;
    }
    let s = Setup::new("16M");
    let mut a = s.attach("first", &[]);
    let out = nbdsh(&a.uri, "h.pwrite(b'a' * 4096, 0)\nh.flush()\nprint('OK')");
    assert!(out.contains("OK"), "{out}");

    // A second attach (another folder) is refused and says who holds it.
    let state = s.state("second");
    let out = s.attach_command(&state, &s.key(), &[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is attached by admin on") && err.contains("--force"), "{err}");

    // --force takes it over; the old holder's writes are refused from then on.
    let b = s.attach("second", &["--force"]);
    let out = nbdsh(
        &a.uri,
        "try:\n    h.pwrite(b'b' * 4096, 0)\n    h.flush()\n    print('WRITTEN')\nexcept nbd.Error as e:\n    print('REFUSED', e)",
    );
    assert!(out.contains("REFUSED"), "the old holder must not write after a takeover: {out}");
    let out = nbdsh(&b.uri, "print('DATA', bytes(h.pread(1, 0)))");
    assert!(out.contains("DATA b'a'"), "{out}");
    a.proc.kill();
    s.detach(b);
}

#[test]
fn fast_zero_of_whole_blocks_is_done_and_of_part_of_one_refused() {
    const BLOCK: u32 = 4096;
    const WRITE_ZEROES: u16 = 6;
    const FAST_ZERO: u16 = 1 << 4;
    const ENOTSUP: u32 = 95;
    let s = Setup::new("16M");
    let a = s.attach("a", &[]);
    let mut c = RawClient::handshake(&a.socket, false);
    assert!(c.tflags & (1 << 11) != 0, "FAST_ZERO advertised on a volume");
    let len = 64 * BLOCK;
    let data = pattern(5, len as usize);
    c.request(0, 1, 1, 0, len, &data);
    assert_eq!(c.simple_reply(), (0, 1));
    // Part of a block would be a read-modify-write: refused, nothing written.
    for (cookie, offset, len) in [(2, 100, 8192), (3, 100, 10), (4, 4096, 6000)] {
        c.request(FAST_ZERO, WRITE_ZEROES, cookie, offset, len, &[]);
        assert_eq!(c.simple_reply(), (ENOTSUP, cookie), "fast zero of {len} bytes at {offset}");
    }
    assert!(c.read_simple(5, 0, len) == data, "a refused fast zero wrote something");
    // Whole blocks are one zero entry: done.
    c.request(FAST_ZERO, WRITE_ZEROES, 6, 0, 16 * BLOCK, &[]);
    assert_eq!(c.simple_reply(), (0, 6));
    // Without FAST_ZERO, part of a block is zeroed the slow way.
    c.request(0, WRITE_ZEROES, 7, u64::from(20 * BLOCK) + 100, 8192, &[]);
    assert_eq!(c.simple_reply(), (0, 7));
    let mut want = data.clone();
    want[..16 * BLOCK as usize].fill(0);
    want[20 * BLOCK as usize + 100..][..8192].fill(0);
    c.request(0, 3, 8, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (0, 8), "flush");
    assert!(c.read_simple(9, 0, len) == want, "zeroed ranges read back as zeroes, the rest intact");
    drop(c);
    s.detach(a);
}

#[test]
fn a_wrong_key_is_refused_before_anything_is_served() {
    let s = Setup::new("16M");
    let other = s.c.root.path().join("other.key");
    assert!(s.c.cli(&["key", "generate", other.to_str().unwrap()]).0);
    let state = s.state("w");
    let out = s.attach_command(&state, &other, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("volume disk: this key file is not one of the volume's keys"), "{err}");
    assert!(!state.join("nbd.sock").exists(), "nothing may be served");
}

/// Writes 4 KiB blocks (each tagged with its block number and a version)
/// at random through the `nbd` crate's client, flushing now and then,
/// until the connection breaks; records what each block may hold.
struct Writer {
    /// Per block: the version durable at the last completed flush.
    durable: Vec<u32>,
    /// Per block: versions written since (any may have landed).
    since: Vec<Vec<u32>>,
    flushes: u32,
    /// Flushes completed, for a killer thread to watch.
    flushed: std::sync::Arc<std::sync::atomic::AtomicU32>,
    next: u32,
}

const BLOCKS: usize = 4096; // 16 MiB

fn block(b: usize, version: u32) -> Vec<u8> {
    let mut v = pattern(u64::from(version) << 20 | b as u64, 4096);
    v[..4].copy_from_slice(&(b as u32).to_le_bytes());
    v[4..8].copy_from_slice(&version.to_le_bytes());
    v
}

impl Writer {
    fn new() -> Self {
        Self {
            durable: vec![0; BLOCKS],
            since: vec![Vec::new(); BLOCKS],
            flushes: 0,
            flushed: Default::default(),
            next: 1,
        }
    }

    fn run(&mut self, socket: &Path, seed: u64) {
        let Ok(mut sock) = UnixStream::connect(socket) else { return };
        let Ok(export) = nbd::client::handshake(&mut sock, b"") else { return };
        let mut c = nbd::client::NbdClient::new(&mut sock, &export);
        let mut x = seed | 1;
        loop {
            for _ in 0..16 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = (x % BLOCKS as u64) as usize;
                let version = self.next;
                self.next += 1;
                self.since[b].push(version);
                if c.seek(SeekFrom::Start(b as u64 * 4096)).is_err()
                    || c.write_all(&block(b, version)).is_err()
                {
                    return;
                }
            }
            if c.flush().is_err() {
                return;
            }
            self.flushes += 1;
            self.flushed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for (d, s) in self.durable.iter_mut().zip(self.since.iter_mut()) {
                if let Some(&last) = s.last() {
                    *d = last;
                }
                s.clear();
            }
        }
    }

    /// Every block holds its durable version or one written after it.
    fn check(&self, a: &Attached) {
        let mut sock = UnixStream::connect(&a.socket).unwrap();
        let export = nbd::client::handshake(&mut sock, b"").unwrap();
        let mut c = nbd::client::NbdClient::new(&mut sock, &export);
        let mut buf = vec![0u8; BLOCKS * 4096];
        c.seek(SeekFrom::Start(0)).unwrap();
        if let Err(e) = c.read_exact(&mut buf) {
            panic!("reading the volume back: {e}\nattach said:\n{}", a.proc.output());
        }
        for (b, got) in buf.chunks(4096).enumerate() {
            let version = u32::from_le_bytes(got[4..8].try_into().unwrap());
            let ok_versions: Vec<u32> =
                std::iter::once(self.durable[b]).chain(self.since[b].iter().copied()).collect();
            let matches = if version == 0 && got.iter().all(|&x| x == 0) {
                self.durable[b] == 0
            } else {
                ok_versions.contains(&version) && got == block(b, version).as_slice()
            };
            assert!(
                matches,
                "block {b}: holds version {version}, allowed {ok_versions:?} (durable {})",
                self.durable[b]
            );
        }
    }

    /// After a check, what is on disk is durable.
    fn settle(&mut self, socket: &Path) {
        let mut sock = UnixStream::connect(socket).unwrap();
        let export = nbd::client::handshake(&mut sock, b"").unwrap();
        let mut c = nbd::client::NbdClient::new(&mut sock, &export);
        let mut buf = vec![0u8; BLOCKS * 4096];
        c.seek(SeekFrom::Start(0)).unwrap();
        c.read_exact(&mut buf).unwrap();
        for (b, got) in buf.chunks(4096).enumerate() {
            self.durable[b] = u32::from_le_bytes(got[4..8].try_into().unwrap());
            self.since[b].clear();
        }
        // Pin what was read: a flush makes it durable as it is.
        c.flush().unwrap();
    }
}

#[test]
fn sigkill_of_attach_never_loses_a_flushed_write() {
    let iterations: usize =
        std::env::var("MESHDISK_CRASH_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let s = Setup::new("16M");
    let mut w = Writer::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let started = Instant::now();
    for i in 0..iterations {
        let a = s.attach("crash", &[]);
        if i > 0 {
            w.check(&a);
            w.settle(&a.socket);
        }
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        // At a random moment after this round's first completed flush.
        let kill_after = Duration::from_millis((seed >> 33) % 500);
        let socket = a.socket.clone();
        let pid = a.proc.child.id();
        let flushed = w.flushed.clone();
        let start = flushed.load(std::sync::atomic::Ordering::Relaxed);
        let killer = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while flushed.load(std::sync::atomic::Ordering::Relaxed) == start && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(kill_after);
            // SAFETY: kill(2) on the attach process this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        });
        w.run(&socket, seed);
        killer.join().unwrap();
        let mut a = a;
        let _ = a.proc.child.wait();
    }
    let a = s.attach("crash", &[]);
    w.check(&a);
    eprintln!(
        "{iterations} SIGKILLs of attach in {:.0?}: {} flushes completed, {} writes",
        started.elapsed(),
        w.flushes,
        w.next - 1
    );
    assert!(w.flushes >= iterations as u32, "every round must have completed a flush before its SIGKILL");
    s.detach(a);
}

#[test]
fn losing_m_peers_is_harmless_and_m_plus_one_is_an_error_until_they_return() {
    if !have_tools(&["fio", "nbdsh"]) {
        return;
    }
    // k + m + 1 peers: with m lost, k + 1 (the write quorum) remain, so
    // writes go on. (With exactly k + m, commits wait for a peer to come
    // back, as Ceph's min_size = k + 1 makes writes wait; the local log
    // holds the writes meanwhile.)
    let mut s = Setup::new("64M");
    s.c.add_peer("2G", "disk6");
    s.c.wait_all_up(7);
    // A small local log: what was written is soon only on the peers.
    let a = s.attach("a", &["--log-size", "8M"]);
    // Write more than the cache holds, so reads must come from the peers.
    fio(
        &a.uri,
        &[
            "--name=fill",
            "--rw=write",
            "--bs=1m",
            "--iodepth=8",
            "--size=64m",
            "--verify=crc32c",
            "--do_verify=0",
        ],
    );
    let out = nbdsh(&a.uri, "h.flush()\nprint('FLUSHED')");
    assert!(out.contains("FLUSHED"), "{out}");
    // Two peers (m) die while fio verifies and writes: no error at all.
    let uri = a.uri.clone();
    let verify = std::thread::spawn(move || {
        fio(
            &uri,
            &["--name=fill", "--rw=write", "--bs=1m", "--size=64m", "--verify=crc32c", "--verify_only"],
        );
        fio(
            &uri,
            &["--name=more", "--rw=randwrite", "--bs=64k", "--iodepth=16", "--size=16m", "--verify=crc32c"],
        );
    });
    std::thread::sleep(Duration::from_millis(300));
    s.c.peers[0].kill();
    s.c.peers[1].kill();
    verify.join().expect("fio with m peers down");
    // More than m of a segment's holders down: reads of stripes not in the
    // cache fail with EIO (never wrong data). Repair has by now rebuilt
    // the segments that lost two shards (k left: critical, repaired at
    // once), so a third peer alone no longer takes any segment below k;
    // two more at once do take the segments that lost one shard (their
    // peer is down, not lost, so nothing was rebuilt) down to k - 1.
    s.c.peers[2].kill();
    s.c.peers[3].kill();
    // (Each unreadable stripe takes the peers' connect timeout to fail:
    // stop after a few.)
    let script = "import errno\nbad = 0\nfor i in range(64):\n    try:\n        h.pread(65536, i << 20)\n    except nbd.Error as e:\n        assert e.errnum == errno.EIO, e\n        bad += 1\n        if bad == 3:\n            break\nprint('BAD', bad)";
    let out = nbdsh(&a.uri, script);
    let bad: u32 =
        out.split("BAD ").nth(1).and_then(|t| t.trim().parse().ok()).unwrap_or_else(|| panic!("{out}"));
    assert!(bad > 0, "with m+1 peers down, uncached stripes cannot be read: {out}");
    // They come back: everything reads again, and verifies.
    for i in 0..4 {
        s.c.restart_peer(i, "2G", &format!("disk{i}"));
    }
    fio(
        &a.uri,
        &["--name=more", "--rw=randwrite", "--bs=64k", "--size=16m", "--verify=crc32c", "--verify_only"],
    );
    s.detach(a);
}

#[test]
fn a_tampered_shard_is_caught_and_the_read_still_succeeds() {
    if !have_tools(&["nbdcopy"]) {
        return;
    }
    let s = Setup::new("16M");
    let a = s.attach("a", &[]);
    let src = s.c.root.path().join("src.img");
    std::fs::write(&src, pattern(77, 16 << 20)).unwrap();
    run(Command::new("nbdcopy").arg(&src).arg(&a.uri));
    s.detach(a);
    // Flip bytes all over one peer's data files (its shards).
    let mut flipped = 0;
    for entry in walk(&s.c.peer_dir(0)) {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".dat") {
            continue;
        }
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&entry).unwrap();
        let len = f.metadata().unwrap().len();
        let mut at = 4096;
        while at < len {
            let mut b = [0u8; 1];
            f.seek(SeekFrom::Start(at)).unwrap();
            f.read_exact(&mut b).unwrap();
            b[0] ^= 0x5a;
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&b).unwrap();
            flipped += 1;
            at += 32 * 1024;
        }
    }
    assert!(flipped > 0, "no shard files found under {}", s.c.peer_dir(0).display());
    let b = s.attach("b", &[]);
    assert_eq!(device_sha(&b.uri, s.c.root.path(), "b.img"), sha256_file(&src));
    s.detach(b);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn filesystem_on_a_volume(mkfs: &[&str], fsck: &[&str]) {
    use common::fs::{check_filesystem, fill_filesystem, make_tree};
    let s = Setup::new("512M");
    let dir = s.c.root.path();
    let src = dir.join("src");
    let files = make_tree(&src);
    let a = s.attach("a", &["--cache-size", "64M"]);
    fill_filesystem(dir, &a.uri, mkfs, &src);
    // Detach, and attach again from another folder: everything from the peers.
    s.detach(a);
    let b = s.attach("b", &["--cache-size", "64M"]);
    check_filesystem(dir, &b.uri, fsck, &files);
    s.detach(b);
}

#[test]
fn ext4_on_a_volume_survives_detach_and_attach_elsewhere() {
    if !have_tools(&["nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "mount"]) {
        return;
    }
    filesystem_on_a_volume(&["mkfs.ext4", "-q", "-F"], &["e2fsck", "-fn"]);
}

#[test]
fn xfs_on_a_volume_survives_detach_and_attach_elsewhere() {
    if !have_tools(&["nbdfuse", "fusermount3", "mkfs.xfs", "xfs_repair", "mount"]) {
        return;
    }
    filesystem_on_a_volume(&["mkfs.xfs", "-q", "-f"], &["xfs_repair", "-n"]);
}

#[test]
fn sigkill_of_peers_and_of_the_directory_never_loses_a_flushed_write() {
    let iterations: usize =
        std::env::var("MESHDISK_CRASH_CLUSTER_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(9);
    let mut s = Setup::new("16M");
    let mut w = Writer::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..iterations {
        let a = s.attach("crash", &[]);
        if i > 0 {
            w.check(&a);
            w.settle(&a.socket);
        }
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let socket = a.socket.clone();
        let writer_seed = seed;
        let mut writer = std::mem::replace(&mut w, Writer::new());
        let running = std::thread::spawn(move || {
            writer.run(&socket, writer_seed);
            writer
        });
        std::thread::sleep(Duration::from_millis(100 + (seed >> 33) % 400));
        let victim = (seed >> 20) as usize % 6;
        match i % 3 {
            0 => {
                s.c.peers[victim].kill();
                std::thread::sleep(Duration::from_millis(300));
                s.c.restart_peer(victim, "2G", &format!("disk{victim}"));
            }
            1 => {
                s.c.directory.kill();
                std::thread::sleep(Duration::from_millis(300));
                s.c.restart_directory();
            }
            _ => {
                s.c.peers[victim].kill();
                s.c.directory.kill();
                std::thread::sleep(Duration::from_millis(300));
                s.c.restart_directory();
                s.c.restart_peer(victim, "2G", &format!("disk{victim}"));
            }
        }
        // Let the writer go on against the recovered cluster, then end it
        // with a SIGKILL of attach too.
        std::thread::sleep(Duration::from_millis(300));
        let mut a = a;
        a.proc.kill();
        w = running.join().unwrap();
    }
    let a = s.attach("crash", &[]);
    w.check(&a);
    assert!(w.flushes > 0, "the writer never completed a flush");
    s.detach(a);
}

#[test]
fn a_stalled_peer_loses_its_shards_to_another_one_long_tail() {
    if !have_tools(&["nbdsh"]) {
        return;
    }
    let mut s = Setup::new("16M");
    s.c.add_peer("2G", "disk6");
    s.c.wait_all_up(7);
    let a = s.attach("a", &[]);
    // One peer stops answering (but its heartbeats stop too only later):
    // every put to it times out and goes to the spare peer instead.
    s.c.peers[0].signal(libc::SIGSTOP);
    let started = Instant::now();
    let out = nbdsh(&a.uri, "h.pwrite(b'q' * (4 << 20), 0)\nh.flush()\nprint('FLUSHED')");
    assert!(out.contains("FLUSHED"), "{out}");
    let took = started.elapsed();
    s.c.peers[0].signal(libc::SIGCONT);
    assert!(took < Duration::from_secs(20), "the flush waited {took:?} for a stalled peer");
    // Every segment written has all k + m shards stored (none left out).
    let info =
        s.c.cli(&["volume", "info", VOLUME, "--json", "--credential", s.c.admin_cred().to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&info.1).unwrap();
    let segments = v["health"]["segments"].as_u64().unwrap();
    assert!(segments >= 16, "4 MiB in segments of 256 KiB: {}", info.1);
    assert_eq!(v["health"]["whole"].as_u64(), Some(segments), "no shard may be missing: {}", info.1);
    assert!(a.proc.output().contains("sending it to"), "{}", a.proc.output());
    s.detach(a);
}
