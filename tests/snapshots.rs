//! Snapshots, clones and rollback end to end: a directory, six peers and
//! `meshdisk attach` as real processes, the CLI as a user types it.
//!
//! A volume is written in three rounds with snapshots between them, and
//! overwritten enough that compaction runs; then: a snapshot is served
//! read-only (`attach NAME@SNAP`) while the volume stays attached and
//! equals the volume at its time; a clone diverges from its parent
//! independently, both ways; a rollback needs the volume detached, and
//! the folder that wrote after the snapshot serves the snapshot's bytes
//! afterwards, not its own cached newer ones; deleting what clones or
//! snapshots depend on is refused; deleting them frees the peers.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Proc};
use common::rawclient::RawClient;
use common::{Rng, meshdisk_bin};

const VOLUME: &str = "disk";
const SIZE: u64 = 16 << 20;
const BLOCK: u64 = 4096;
const WRITE: u16 = 1;
const FLUSH: u16 = 3;
const EPERM: u32 = 1;

struct Setup {
    c: Cluster,
    key: PathBuf,
}

/// A running attach and one NBD connection to it.
struct Attached {
    proc: Proc,
    folder: String,
    name: String,
    conn: RawClient,
    cookie: u64,
}

impl Setup {
    fn new() -> Self {
        let mut c = Cluster::start("snaps", &["--lease-ttl", "4s", "--drop-grace", "1s"]);
        for i in 0..6 {
            c.add_peer("1G", &format!("disk{i}"));
        }
        c.wait_all_up(6);
        c.create_volume(VOLUME, "16M", 4, 2);
        let key = c.root.path().join(format!("{VOLUME}.key"));
        Self { c, key }
    }

    /// `meshdisk volume ARGS...` with the admin credential; (ok, stdout, stderr).
    fn volume(&self, args: &[&str]) -> (bool, String, String) {
        let cred = self.c.admin_cred();
        let mut all = vec!["volume"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--credential", cred.to_str().unwrap()]);
        self.c.cli(&all)
    }

    fn volume_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.volume(args);
        assert!(ok, "volume {args:?} failed: {err}");
        format!("{out}{err}")
    }

    fn attach(&self, name: &str, folder: &str) -> Attached {
        let state = self.c.root.path().join(folder);
        let mut cmd = Command::new(meshdisk_bin());
        cmd.args(["attach", name, "--credential"])
            .arg(self.c.admin_cred())
            .arg("--key-file")
            .arg(&self.key)
            .arg("--cache-dir")
            .arg(&state)
            .arg("--socket")
            .arg(state.join("nbd.sock"))
            .args(["--cache-size", "4M", "--log-size", "16M"]);
        let mut proc = Proc::spawn(&format!("attach-{folder}"), &mut cmd);
        proc.wait_for("nbd+unix://", Duration::from_secs(60));
        let conn = RawClient::handshake(&state.join("nbd.sock"), false);
        Attached { proc, folder: folder.into(), name: name.into(), conn, cookie: 0 }
    }

    fn detach(&self, a: Attached) {
        let Attached { mut proc, folder, name, conn, .. } = a;
        drop(conn);
        let state = self.c.root.path().join(&folder);
        let (ok, _, err) = self.c.cli(&["detach", &name, "--cache-dir", state.to_str().unwrap()]);
        assert!(ok, "detach {name}: {err}");
        let (status, out) = proc.wait_exit(Duration::from_secs(60));
        assert!(status.success(), "the attach of {name} did not stop cleanly: {out}");
    }

    /// Bytes the peers use (every shard of every volume).
    fn used(&self) -> u64 {
        self.c.status().peers.iter().map(|p| p.used).sum()
    }
}

impl Attached {
    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.cookie += 1;
        self.conn.request(0, WRITE, self.cookie, offset, data.len() as u32, data);
        let (err, cookie) = self.conn.simple_reply();
        assert_eq!(cookie, self.cookie);
        err
    }

    fn flush(&mut self) {
        self.cookie += 1;
        self.conn.request(0, FLUSH, self.cookie, 0, 0, &[]);
        assert_eq!(self.conn.simple_reply(), (0, self.cookie), "flush");
    }

    fn device(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SIZE as usize);
        for off in (0..SIZE).step_by(1 << 20) {
            self.cookie += 1;
            out.extend(self.conn.read_simple(self.cookie, off, 1 << 20));
        }
        out
    }

    /// Writes `blocks` random 4 KiB blocks (some runs longer) into
    /// `model` and the device, then flushes.
    fn scribble(&mut self, model: &mut [u8], rng: &mut Rng, blocks: u64) {
        for _ in 0..blocks {
            let at = rng.below(SIZE / BLOCK) * BLOCK;
            let len = (BLOCK * (1 + rng.below(3))).min(SIZE - at);
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            assert_eq!(self.write(at, &data), 0, "write at {at}");
            model[at as usize..(at + len) as usize].copy_from_slice(&data);
        }
        self.flush();
    }
}

fn same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap() as u64;
        panic!("{what}: the block at {} differs", at / BLOCK * BLOCK);
    }
}

#[test]
fn snapshots_clones_and_rollback_keep_each_state_apart_through_compaction() {
    let s = Setup::new();
    let mut rng = Rng(0x51a9_5eed);
    let mut model = vec![0u8; SIZE as usize];
    let mut a = s.attach(VOLUME, "a");
    // Round one, then snapshot s1 of the attached volume.
    let fill: Vec<u8> = (0..SIZE).map(|_| rng.next() as u8).collect();
    for off in (0..SIZE).step_by(1 << 20) {
        assert_eq!(a.write(off, &fill[off as usize..off as usize + (1 << 20)]), 0);
    }
    model.copy_from_slice(&fill);
    a.flush();
    let at_s1 = model.clone();
    s.volume_ok(&["snapshot", VOLUME, "s1"]);
    // Round two: overwritten several times over (compaction runs), s2.
    a.scribble(&mut model, &mut rng, 3 * SIZE / BLOCK);
    let at_s2 = model.clone();
    s.volume_ok(&["snapshot", VOLUME, "s2"]);
    let (ok, _, err) = s.volume(&["snapshot", VOLUME, "s2"]);
    assert!(!ok && err.contains("s2"), "a second snapshot named s2 was not refused: {err}");
    // Round three.
    a.scribble(&mut model, &mut rng, SIZE / BLOCK);
    same(&a.device(), &model, "the volume after three rounds");

    // Each snapshot serves, read-only, what the volume held at its time,
    // while the volume stays attached.
    for (snap, want) in [("s1", &at_s1), ("s2", &at_s2)] {
        let name = format!("{VOLUME}@{snap}");
        let mut r = s.attach(&name, &format!("read-{snap}"));
        same(&r.device(), want, &name);
        assert_eq!(r.write(0, &[1; 4096]), EPERM, "a write to {name} was not refused");
        s.detach(r);
    }
    let listed = s.volume_ok(&["snapshots", VOLUME]);
    assert!(listed.contains("disk@s1") && listed.contains("disk@s2"), "{listed}");

    // A clone of s1 diverges from its parent, both ways.
    s.volume_ok(&["clone", &format!("{VOLUME}@s1"), "copy", "--key-file", s.key.to_str().unwrap()]);
    let mut clone_model = at_s1.clone();
    let mut c = s.attach("copy", "c");
    same(&c.device(), &clone_model, "the clone as made");
    c.scribble(&mut clone_model, &mut rng, SIZE / BLOCK);
    a.scribble(&mut model, &mut rng, SIZE / BLOCK / 4);
    same(&c.device(), &clone_model, "the clone after both wrote");
    same(&a.device(), &model, "the parent after both wrote");
    s.detach(c);
    let c = s.attach("copy", "c2");
    let mut c = c;
    same(&c.device(), &clone_model, "the clone attached elsewhere");
    s.detach(c);
    let listed = s.volume_ok(&["snapshots", VOLUME]);
    assert!(listed.lines().any(|l| l.starts_with("disk@s1") && l.contains("copy")), "{listed}");

    // What others depend on cannot go.
    let (ok, _, err) = s.volume(&["delete", &format!("{VOLUME}@s1")]);
    assert!(!ok && err.contains("copy"), "deleting s1 under its clone was not refused: {err}");

    // A rollback needs the volume detached.
    let (ok, _, err) = s.volume(&["rollback", VOLUME, "s2", "--key-file", s.key.to_str().unwrap()]);
    assert!(!ok && err.contains("detach"), "a rollback of an attached volume was not refused: {err}");
    s.detach(a);
    let (ok, _, err) = s.volume(&["delete", VOLUME, "--yes"]);
    assert!(!ok && err.contains("s1"), "deleting a volume with snapshots was not refused: {err}");
    s.volume_ok(&["rollback", VOLUME, "s2", "--key-file", s.key.to_str().unwrap()]);
    // The folder that wrote rounds three and four serves s2's bytes now.
    let mut a = s.attach(VOLUME, "a");
    same(&a.device(), &at_s2, "the volume rolled back to s2, from the folder that wrote past it");
    let mut model = at_s2.clone();
    a.scribble(&mut model, &mut rng, SIZE / BLOCK / 4);
    s.detach(a);
    let mut b = s.attach(VOLUME, "b");
    same(&b.device(), &model, "the rolled-back volume written again, attached elsewhere");
    s.detach(b);

    // Deleting the clone, then the snapshots, frees their space.
    let before = s.used();
    s.volume_ok(&["delete", "copy", "--yes"]);
    s.volume_ok(&["delete", &format!("{VOLUME}@s1")]);
    s.volume_ok(&["delete", &format!("{VOLUME}@s2")]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut after = s.used();
    while after * 10 > before * 7 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        after = s.used();
    }
    assert!(after * 10 <= before * 7, "the peers still use {after} bytes of {before} after the deletes");
    let mut b = s.attach(VOLUME, "b");
    same(&b.device(), &model, "the volume after its snapshots went");
    s.detach(b);
}

#[test]
fn compaction_racing_commits_snapshots_and_their_deletion_never_loses_or_resurrects_a_block() {
    let s = Setup::new();
    let mut rng = Rng(0x0dd_ba11);
    let mut model = vec![0u8; SIZE as usize];
    let mut a = s.attach(VOLUME, "a");
    let mut kept: Vec<(String, Vec<u8>)> = Vec::new();
    for round in 0..6 {
        // Enough overwrites that compaction moves blocks of the segments
        // the snapshots below reach, while commits keep coming.
        a.scribble(&mut model, &mut rng, SIZE / BLOCK);
        let name = format!("r{round}");
        s.volume_ok(&["snapshot", VOLUME, &name]);
        kept.push((name, model.clone()));
        // More writes race the compaction of what the snapshot now keeps.
        a.scribble(&mut model, &mut rng, SIZE / BLOCK / 2);
        if kept.len() > 2 {
            let (old, _) = kept.remove(0);
            s.volume_ok(&["delete", &format!("{VOLUME}@{old}")]);
        }
        same(&a.device(), &model, &format!("the volume at round {round}"));
        let (snap, want) = &kept[rng.below(kept.len() as u64) as usize];
        let name = format!("{VOLUME}@{snap}");
        let mut r = s.attach(&name, "read");
        same(&r.device(), want, &format!("{name} at round {round}"));
        s.detach(r);
    }
    s.detach(a);
    let mut b = s.attach(VOLUME, "b");
    same(&b.device(), &model, "the volume attached elsewhere at the end");
    s.detach(b);
    for (snap, want) in &kept {
        let name = format!("{VOLUME}@{snap}");
        let mut r = s.attach(&name, "read");
        same(&r.device(), want, &name);
        s.detach(r);
    }
}
