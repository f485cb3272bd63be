//! The model-based test of the volume: a seeded random sequence of writes
//! (aligned, unaligned, larger than a segment), trims, zeroes and flushes
//! over three NBD connections at once, with the disruptions a volume lives
//! through: detach and attach from folder A or B (laptop → desktop →
//! laptop), SIGKILL of the attach, `--force` takeovers, and the directory
//! paused for longer than the lease's time to live.
//!
//! After every step each block must equal the model: while nothing
//! crashed, exactly the last acknowledged write; after a SIGKILL or a
//! takeover, its version at the last completed FLUSH or one acknowledged
//! after it (never an older one, never anything else). Then the model
//! takes what the device holds and goes on.
//!
//! `MESHDISK_MODEL_STEPS` (default 300) and `MESHDISK_MODEL_SEED` pick the
//! run; `tools/crash-test` runs it for as long as asked.

mod common;

use common::Rng;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Proc};
use common::meshdisk_bin;
use common::rawclient::RawClient;

const SIZE: u64 = 32 << 20;
const BLOCK: usize = 4096;
const VOLUME: &str = "model";
const CONNECTIONS: usize = 3;
const TTL_SECS: u64 = 3;

const READ: u16 = 0;
const WRITE: u16 = 1;
const FLUSH: u16 = 3;
const TRIM: u16 = 4;
const WRITE_ZEROES: u16 = 6;

/// What each block may read as.
struct Model {
    /// Every acknowledged write applied: what a read must return while
    /// nothing crashed.
    now: Vec<u8>,
    /// Hashes of each block's versions acknowledged since the last
    /// completed FLUSH, and its version at that FLUSH.
    since_flush: HashMap<usize, Vec<blake3::Hash>>,
    at_flush: Vec<u8>,
    /// Every version ever acknowledged (block, hash) → the order it came in,
    /// to name where a wrong block came from.
    history: HashMap<(usize, blake3::Hash), usize>,
    step: usize,
}

impl Model {
    fn new() -> Self {
        Self {
            now: vec![0; SIZE as usize],
            since_flush: HashMap::new(),
            at_flush: vec![0; SIZE as usize],
            history: HashMap::new(),
            step: 0,
        }
    }

    /// A write (or zeroes) of `data` at `offset` was acknowledged.
    fn acked(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.now[o..o + data.len()].copy_from_slice(data);
        for b in o / BLOCK..(o + data.len()).div_ceil(BLOCK) {
            let h = blake3::hash(&self.now[b * BLOCK..(b + 1) * BLOCK]);
            self.since_flush.entry(b).or_default().push(h);
            let n = self.step;
            self.history.entry((b, h)).or_insert(n);
        }
    }

    /// A FLUSH completed: every acknowledged write is durable.
    fn flushed(&mut self) {
        self.at_flush.copy_from_slice(&self.now);
        self.since_flush.clear();
    }

    /// After a crash or takeover: `device` must hold, in every block, its
    /// version at the last FLUSH or one acknowledged since. The model then
    /// takes the device's contents (all of it is durable now: the attach
    /// that follows starts from it).
    fn settle(&mut self, device: &[u8], what: &str) {
        for b in 0..SIZE as usize / BLOCK {
            let got = &device[b * BLOCK..(b + 1) * BLOCK];
            if got == &self.at_flush[b * BLOCK..(b + 1) * BLOCK] {
                continue;
            }
            let h = blake3::hash(got);
            let ok = self.since_flush.get(&b).is_some_and(|v| v.contains(&h));
            assert!(
                ok,
                "{what}: block {b} holds neither its flushed version nor one acknowledged since (first bytes {:02x?}, an older version acknowledged at step {:?} ({} versions in all); flushed {:02x?}, latest {:02x?})",
                &got[..8],
                self.history.get(&(b, h)),
                self.history.len(),
                &self.at_flush[b * BLOCK..b * BLOCK + 8],
                &self.now[b * BLOCK..b * BLOCK + 8]
            );
        }
        self.now.copy_from_slice(device);
        self.flushed();
    }
}

struct Attached {
    proc: Proc,
    folder: &'static str,
    conns: Vec<RawClient>,
    cookie: u64,
}

struct World {
    c: Cluster,
    key: PathBuf,
    attached: Option<Attached>,
    /// Folders the other folder attached after: only their unflushed
    /// writes may be refused ("attached elsewhere"). A refusal anywhere
    /// else drops writes nobody overtook, and fails the test.
    overtaken: std::collections::HashSet<&'static str>,
}

impl World {
    fn folder(&self, name: &str) -> PathBuf {
        self.c.root.path().join(name)
    }

    fn command(&self, folder: &str, extra: &[&str]) -> Command {
        let state = self.folder(folder);
        let mut cmd = Command::new(meshdisk_bin());
        cmd.args(["attach", VOLUME, "--credential"])
            .arg(self.c.admin_cred())
            .arg("--key-file")
            .arg(&self.key)
            .arg("--cache-dir")
            .arg(&state)
            .arg("--socket")
            .arg(state.join("nbd.sock"))
            .args(["--cache-size", "4M", "--log-size", "16M"])
            // Compaction all the time: its moves race every other step.
            .args(["--compact-above", "1.05"])
            .args(extra);
        cmd
    }

    /// Attaches from `folder`; if it refuses because the folder's
    /// unflushed writes were overtaken, says so and attaches again
    /// dropping them (what a user told by the message would do).
    fn attach(&mut self, folder: &'static str, extra: &[&str]) {
        assert!(self.attached.is_none());
        let mut proc = Proc::spawn(&format!("attach-{folder}"), &mut self.command(folder, extra));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = proc.output();
            if out.contains("nbd+unix://") {
                break;
            }
            if out.contains("--discard-local") && out.contains("attached elsewhere") {
                assert!(
                    self.overtaken.contains(folder),
                    "attach from {folder} refused its own unflushed writes, though no other folder attached since: {out}"
                );
                let _ = proc.wait_exit(Duration::from_secs(10));
                let mut with: Vec<&str> = extra.to_vec();
                with.push("--discard-local");
                proc = Proc::spawn(&format!("attach-{folder}"), &mut self.command(folder, &with));
                continue;
            }
            assert!(Instant::now() < deadline, "attach from {folder} did not serve: {out}");
            std::thread::sleep(Duration::from_millis(20));
        }
        if std::env::var_os("MESHDISK_MODEL_TRACE").is_some() {
            eprintln!("--- attach in {folder} {extra:?}:\n{}", proc.output());
        }
        self.overtaken.remove(folder);
        self.overtaken.insert(if folder == "a" { "b" } else { "a" });
        let socket = self.folder(folder).join("nbd.sock");
        let conns = (0..CONNECTIONS).map(|_| RawClient::handshake(&socket, false)).collect();
        self.attached = Some(Attached { proc, folder, conns, cookie: 1 });
    }

    fn a(&mut self) -> &mut Attached {
        self.attached.as_mut().expect("attached")
    }

    fn detach(&mut self) {
        let mut a = self.attached.take().expect("attached");
        drop(std::mem::take(&mut a.conns));
        let state = self.folder(a.folder);
        let (ok, _, err) = self.c.cli(&["detach", VOLUME, "--cache-dir", state.to_str().unwrap()]);
        assert!(ok, "detach: {err}");
        let (status, out) = a.proc.wait_exit(Duration::from_secs(60));
        assert!(status.success(), "the attach did not stop cleanly: {out}");
    }

    fn kill(&mut self) -> &'static str {
        let mut a = self.attached.take().expect("attached");
        drop(std::mem::take(&mut a.conns));
        a.proc.kill();
        if std::env::var_os("MESHDISK_MODEL_TRACE").is_some() {
            eprintln!("--- attach in {} (killed):\n{}", a.folder, a.proc.output());
        }
        a.folder
    }

    /// The whole device, read over connection 0.
    fn device(&mut self) -> Vec<u8> {
        let a = self.a();
        let mut out = Vec::with_capacity(SIZE as usize);
        for off in (0..SIZE).step_by(1 << 20) {
            a.cookie += 1;
            out.extend(a.conns[0].read_simple(a.cookie, off, 1 << 20));
        }
        out
    }
}

impl Attached {
    /// Sends one request on connection `c`.
    fn send(&mut self, c: usize, flags: u16, kind: u16, offset: u64, len: u32, data: &[u8]) -> u64 {
        self.cookie += 1;
        self.conns[c].request(flags, kind, self.cookie, offset, len, data);
        self.cookie
    }

    fn reply(&mut self, c: usize, cookie: u64, what: &str) {
        let (err, got) = self.conns[c].simple_reply();
        assert_eq!((err, got), (0, cookie), "{what}");
    }
}

/// A clone of the volume: its name, the snapshot it came from, what it
/// must hold.
struct Clone {
    name: String,
    from: String,
    content: Vec<u8>,
}

/// One of `items` at random, if any.
fn pick<'a, T>(items: &'a [T], rng: &mut Rng) -> Option<&'a T> {
    (!items.is_empty()).then(|| &items[rng.below(items.len() as u64) as usize])
}

impl World {
    /// `meshdisk volume ARGS...` with the admin credential; its output.
    fn volume_ok(&self, args: &[&str]) -> String {
        let cred = self.c.admin_cred();
        let mut all = vec!["volume"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--credential", cred.to_str().unwrap()]);
        let (ok, out, err) = self.c.cli(&all);
        assert!(ok, "volume {args:?}: {err}");
        out
    }

    /// A second attach (a snapshot or a clone) from `folder` beside the
    /// volume's, with one connection.
    fn side_attach(&self, name: &str, folder: &str) -> (Proc, RawClient) {
        let state = self.folder(folder);
        let mut cmd = Command::new(meshdisk_bin());
        cmd.args(["attach", name, "--credential"])
            .arg(self.c.admin_cred())
            .arg("--key-file")
            .arg(&self.key)
            .arg("--cache-dir")
            .arg(&state)
            .arg("--socket")
            .arg(state.join("nbd.sock"))
            .args(["--cache-size", "4M", "--log-size", "16M", "--compact-above", "1.05"]);
        let mut proc = Proc::spawn(&format!("attach-{folder}"), &mut cmd);
        proc.wait_for("nbd+unix://", Duration::from_secs(60));
        (proc, RawClient::handshake(&state.join("nbd.sock"), false))
    }

    fn side_detach(&self, name: &str, folder: &str, mut proc: Proc, conn: RawClient) {
        drop(conn);
        let state = self.folder(folder);
        let (ok, _, err) = self.c.cli(&["detach", name, "--cache-dir", state.to_str().unwrap()]);
        assert!(ok, "detach {name}: {err}");
        let (status, out) = proc.wait_exit(Duration::from_secs(60));
        assert!(status.success(), "the attach of {name} did not stop cleanly: {out}");
    }

    /// The whole device of `name` (a snapshot or a clone), attached from
    /// `folder` for the read.
    fn side_device(&self, name: &str, folder: &str) -> Vec<u8> {
        let (proc, mut conn) = self.side_attach(name, folder);
        let mut out = Vec::with_capacity(SIZE as usize);
        for (i, off) in (0..SIZE).step_by(1 << 20).enumerate() {
            out.extend(conn.read_simple(i as u64 + 1, off, 1 << 20));
        }
        self.side_detach(name, folder, proc, conn);
        out
    }

    /// Writes a few ranges to clone `c` (flushed), checks it reads them.
    fn side_write(&self, c: &mut Clone, rng: &mut Rng) {
        let folder = format!("folder-{}", c.name);
        let (proc, mut conn) = self.side_attach(&c.name, &folder);
        let mut cookie = 0;
        for _ in 0..1 + rng.below(4) {
            let (offset, len) = range(rng);
            let data = fill(rng, len as usize);
            cookie += 1;
            conn.request(0, WRITE, cookie, offset, len, &data);
            assert_eq!(conn.simple_reply(), (0, cookie), "a write to clone {}", c.name);
            c.content[offset as usize..offset as usize + len as usize].copy_from_slice(&data);
        }
        cookie += 1;
        conn.request(0, FLUSH, cookie, 0, 0, &[]);
        assert_eq!(conn.simple_reply(), (0, cookie), "a flush of clone {}", c.name);
        for off in (0..SIZE).step_by(1 << 20) {
            cookie += 1;
            let got = conn.read_simple(cookie, off, 1 << 20);
            assert!(
                got[..] == c.content[off as usize..off as usize + (1 << 20)],
                "clone {} at {off}",
                c.name
            );
        }
        self.side_detach(&c.name, &folder, proc, conn);
    }
}

/// A range: mostly small and unaligned, sometimes several segments long.
fn range(rng: &mut Rng) -> (u64, u32) {
    let len = match rng.below(5) {
        0 => rng.below(6000) + 1,
        1 => BLOCK as u64 * (rng.below(16) + 1),
        2 => rng.below(200_000) + 1,
        3 => BLOCK as u64 * (rng.below(256) + 1),
        _ => 1 << 20,
    };
    let offset =
        if rng.below(2) == 0 { rng.below(SIZE - len) } else { rng.below((SIZE - len) / 4096) * 4096 };
    (offset, len as u32)
}

/// One write of a random range over connection 0, acknowledged.
fn acked_write(w: &mut World, m: &mut Model, rng: &mut Rng, label: &str) {
    let r = range(rng);
    let d = fill(rng, r.1 as usize);
    let a = w.a();
    let ck = a.send(0, 0, WRITE, r.0, r.1, &d);
    a.reply(0, ck, label);
    m.acked(r.0, &d);
}

fn fill(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

fn overlaps(a: (u64, u32), b: (u64, u32)) -> bool {
    a.0 < b.0 + u64::from(b.1) && b.0 < a.0 + u64::from(a.1)
}

fn run(seed: u64, steps: usize) {
    let mut c = Cluster::start("model", &["--lease-ttl", &format!("{TTL_SECS}s")]);
    for i in 0..6 {
        c.add_peer("2G", &format!("d{i}"));
    }
    c.wait_all_up(6);
    c.create_volume(VOLUME, "32M", 4, 2);
    let key = c.root.path().join(format!("{VOLUME}.key"));
    let mut w = World { c, key, attached: None, overtaken: Default::default() };
    let mut m = Model::new();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut here: &'static str = "a";
    w.attach(here, &[]);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    // Snapshots kept (name, the model when taken) and clones made of them.
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut clones: Vec<Clone> = Vec::new();
    let heavy = std::env::var_os("MESHDISK_MODEL_KILLS").is_some();
    for step in 0..steps {
        // MESHDISK_MODEL_KILLS=1 (tools/crash-test): a third of the steps
        // end in a SIGKILL.
        let roll = if heavy && rng.below(3) == 0 { 85 + rng.below(15) } else { rng.below(100) };
        let what = match roll {
            0..=37 => "writes",
            38..=44 => "trim",
            45..=49 => "zeroes",
            50..=58 => "flush",
            59..=71 => "read",
            72..=74 => "snapshot",
            75..=76 => "check-snapshot",
            77 => "rollback",
            78..=79 => "clone",
            80..=84 => "move",
            85..=89 => "kill",
            90..=93 => "takeover",
            94..=95 => "pause",
            _ => "kill-flushed",
        };
        *counts.entry(what).or_default() += 1;
        let label = format!("seed {seed} step {step} ({what}, in folder {here})");
        eprintln!("{label}");
        m.step = step;
        match what {
            "writes" => {
                // One write per connection at once, on ranges that do not
                // overlap (overlapping writes in flight may land either way).
                let mut ranges: Vec<(u64, u32)> = Vec::new();
                for _ in 0..CONNECTIONS {
                    let r = range(&mut rng);
                    if ranges.iter().all(|x| !overlaps(*x, r)) {
                        ranges.push(r);
                    }
                }
                let datas: Vec<Vec<u8>> = ranges.iter().map(|r| fill(&mut rng, r.1 as usize)).collect();
                let a = w.a();
                let cookies: Vec<u64> = ranges
                    .iter()
                    .zip(&datas)
                    .enumerate()
                    .map(|(i, (r, d))| a.send(i, 0, WRITE, r.0, r.1, d))
                    .collect();
                for (i, ck) in cookies.iter().enumerate() {
                    a.reply(i, *ck, &label);
                }
                for (r, d) in ranges.iter().zip(&datas) {
                    m.acked(r.0, d);
                }
            }
            "trim" | "zeroes" => {
                let r = range(&mut rng);
                let kind = if what == "trim" { TRIM } else { WRITE_ZEROES };
                let a = w.a();
                let ck = a.send(1, 0, kind, r.0, r.1, &[]);
                a.reply(1, ck, &label);
                // This volume reads a trimmed range as zeroes.
                m.acked(r.0, &vec![0; r.1 as usize]);
            }
            "flush" => {
                // On any connection: it covers writes acknowledged on all.
                let cn = rng.below(CONNECTIONS as u64) as usize;
                let a = w.a();
                let ck = a.send(cn, 0, FLUSH, 0, 0, &[]);
                a.reply(cn, ck, &label);
                m.flushed();
            }
            "read" => {
                let r = range(&mut rng);
                let a = w.a();
                a.cookie += 1;
                let ck = a.cookie;
                let got = a.conns[2].read_simple(ck, r.0, r.1);
                let want = &m.now[r.0 as usize..r.0 as usize + r.1 as usize];
                if got != want {
                    let first = got.iter().zip(want).position(|(x, y)| x != y).unwrap();
                    panic!(
                        "{label}: read at {}+{} differs from the model at byte {}",
                        r.0,
                        r.1,
                        r.0 + first as u64
                    );
                }
            }
            "move" => {
                // Detach (everything flushed), attach from the other folder.
                w.detach();
                m.flushed();
                here = if here == "a" { "b" } else { "a" };
                w.attach(here, &[]);
            }
            "kill" => {
                // SIGKILL, then attach again from the same folder (its log
                // resumes) or, after the lease lapses, from the other one.
                let folder = w.kill();
                if rng.below(2) == 0 {
                    w.attach(folder, &[]);
                } else {
                    here = if folder == "a" { "b" } else { "a" };
                    std::thread::sleep(Duration::from_secs(TTL_SECS + 1));
                    w.attach(here, &[]);
                }
                let device = w.device();
                m.settle(&device, &label);
            }
            "kill-flushed" => {
                // A FLUSH, a few writes, SIGKILL, a takeover elsewhere: the
                // flushed state plus any of the later writes.
                let a = w.a();
                let ck = a.send(0, 0, FLUSH, 0, 0, &[]);
                a.reply(0, ck, &label);
                m.flushed();
                acked_write(&mut w, &mut m, &mut rng, &label);
                w.kill();
                here = if here == "a" { "b" } else { "a" };
                w.attach(here, &["--force"]);
                let device = w.device();
                m.settle(&device, &label);
            }
            "takeover" => {
                // Another machine takes the volume by force while this one
                // still runs: the old one's writes are refused from then on.
                let old = w.attached.take().expect("attached");
                here = if old.folder == "a" { "b" } else { "a" };
                w.attach(here, &["--force"]);
                let mut old = old;
                let probe = fill(&mut rng, BLOCK);
                let ck = old.send(0, 0, WRITE, 0, BLOCK as u32, &probe);
                let (write_err, got) = old.conns[0].simple_reply();
                assert_eq!(got, ck);
                let ck = old.send(0, 0, FLUSH, 0, 0, &[]);
                let (flush_err, got) = old.conns[0].simple_reply();
                assert_eq!(got, ck);
                // It may not have noticed yet when the write came (the
                // write is then acknowledged), but it must not make it
                // durable: the write or the flush is refused.
                assert!(
                    write_err != 0 || flush_err != 0,
                    "{label}: the taken-over attach acknowledged a write and flushed it"
                );
                // Having refused, it knows: it serves nothing more, not even
                // reads (the other machine may have written since).
                let ck = old.send(0, 0, READ, 0, BLOCK as u32, &[]);
                let (read_err, got) = old.conns[0].simple_reply();
                assert_eq!(got, ck);
                assert_ne!(read_err, 0, "{label}: the taken-over attach served a read");
                drop(std::mem::take(&mut old.conns));
                old.proc.kill();
                let device = w.device();
                m.settle(&device, &label);
            }
            "snapshot" => {
                // Flushed first, so the snapshot (the last commit) is
                // exactly the model; at most three kept, the oldest (and
                // any clone of it) deleted.
                let a = w.a();
                let ck = a.send(0, 0, FLUSH, 0, 0, &[]);
                a.reply(0, ck, &label);
                m.flushed();
                let name = format!("s{step}");
                w.volume_ok(&["snapshot", VOLUME, &name]);
                snaps.push((name, m.now.clone()));
                if snaps.len() > 3 {
                    let (old, _) = snaps.remove(0);
                    while let Some(i) = clones.iter().position(|c: &Clone| c.from == old) {
                        let gone = clones.remove(i);
                        w.volume_ok(&["delete", &gone.name, "--yes"]);
                    }
                    w.volume_ok(&["delete", &format!("{VOLUME}@{old}")]);
                }
            }
            "check-snapshot" => {
                // Served read-only beside the attached volume, it is the
                // model as it was when taken.
                if let Some((name, want)) = pick(&snaps, &mut rng) {
                    let got = w.side_device(&format!("{VOLUME}@{name}"), "snap");
                    assert!(&got == want, "{label}: snapshot {name} differs from the model at its time");
                }
            }
            "rollback" => {
                // Detached, rolled back: the volume is the snapshot again,
                // whatever the attaching folder wrote and cached since.
                if let Some((name, want)) = pick(&snaps, &mut rng).map(|(n, c)| (n.clone(), c.clone())) {
                    w.detach();
                    w.volume_ok(&["rollback", VOLUME, &name, "--key-file", w.key.to_str().unwrap()]);
                    m.now.copy_from_slice(&want);
                    m.flushed();
                    w.attach(here, &[]);
                    let device = w.device();
                    assert!(
                        device == m.now,
                        "{label}: the volume rolled back to {name} is not that snapshot"
                    );
                }
            }
            "clone" => {
                // A clone of a snapshot, written on its own: it must keep
                // its own writes, and the parent none of them.
                if let Some((from, content)) = pick(&snaps, &mut rng).map(|(n, c)| (n.clone(), c.clone())) {
                    let name = format!("copy{step}");
                    let key = w.key.to_str().unwrap().to_string();
                    w.volume_ok(&["clone", &format!("{VOLUME}@{from}"), &name, "--key-file", &key]);
                    let mut clone = Clone { name, from, content };
                    w.side_write(&mut clone, &mut rng);
                    clones.push(clone);
                }
            }
            "pause" => {
                // The directory stops for longer than the lease lives: the
                // attach waits, then goes on (nobody else took the volume).
                w.c.directory.signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_secs(TTL_SECS + 2));
                w.c.directory.signal(libc::SIGCONT);
                acked_write(&mut w, &mut m, &mut rng, &label);
                let a = w.a();
                let ck = a.send(1, 0, FLUSH, 0, 0, &[]);
                a.reply(1, ck, &format!("{label}: a flush after the directory came back"));
                m.flushed();
            }
            _ => unreachable!(),
        }
    }
    // The end: everything on the device is the model, and after a detach
    // an attach from the other folder sees the same.
    let device = w.device();
    assert!(device == m.now, "seed {seed}: the device differs from the model at the end");
    // Every clone kept its own writes through everything the parent did.
    for c in &clones {
        let got = w.side_device(&c.name, &format!("folder-{}", c.name));
        assert!(got == c.content, "seed {seed}: clone {} differs from its model", c.name);
    }
    w.detach();
    w.attach(if here == "a" { "b" } else { "a" }, &[]);
    let device = w.device();
    assert!(device == m.now, "seed {seed}: another folder sees something else");
    w.detach();
    eprintln!("seed {seed}: {steps} steps {counts:?}");
    let kills = counts.get("kill").unwrap_or(&0)
        + counts.get("kill-flushed").unwrap_or(&0)
        + counts.get("takeover").unwrap_or(&0);
    eprintln!("MODEL seed={seed} steps={steps} sigkills={kills} mismatches=0");
}

#[test]
fn the_volume_keeps_every_flushed_write_through_moves_kills_takeovers_and_pauses() {
    let steps = std::env::var("MESHDISK_MODEL_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    let seed = std::env::var("MESHDISK_MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    run(seed, steps);
}
