//! Scrub end to end (issue 15): a directory, six peers and `meshdisk
//! attach` as real processes, real NBD clients (nbdcopy), and rot made by
//! flipping bytes inside shard payloads in the peers' data files (the
//! peers stopped meanwhile, as a disk rots under a machine that is off).
//!
//! Both tests end the same way: the directory forgot exactly the rotten
//! shards (`repair.forgotten`), repair rebuilt them (every segment whole,
//! `HEALTH_OK`), and every byte reads back exactly from a fresh folder (so
//! from the peers, not from a cache).

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Proc};
use common::{have_tools, meshdisk_bin, pattern, system_path};
use meshdisk::api::{ClusterStatus, Verdict};
use meshdisk::codec::sequence::SegmentId;

const PEERS: usize = 6;
const BLOCK: usize = 4096;
const SEGMENTS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("segments");

/// A shard as one peer's index names it.
#[derive(Clone, Debug)]
struct Shard {
    peer: usize,
    segment: SegmentId,
    index: u8,
    data_file: u32,
    /// Where its payload starts in the data file, and its blocks.
    payload: u64,
    blocks: u64,
}

struct Setup {
    c: Cluster,
    names: Vec<String>,
}

impl Setup {
    /// A cluster of six peers (one failure domain each) with
    /// `peer_args`, and volume `vault` (k = 4, m = 2) holding `len` bytes
    /// of a known pattern, written over NBD and detached.
    fn new(name: &str, peer_args: &[&str], len: usize) -> (Self, Vec<u8>) {
        let mut c =
            Cluster::start(name, &["--peer-timeout", "2s", "--lease-ttl", "4s", "--audit-every", "0"]);
        c.peer_args = peer_args.iter().map(|s| s.to_string()).collect();
        let names = (0..PEERS).map(|i| c.add_peer("1G", &format!("disk{i}"))).collect();
        c.wait_all_up(PEERS);
        c.create_volume("vault", &format!("{}M", len >> 20), 4, 2);
        let s = Self { c, names };
        let data = pattern(0x15_0001, len);
        let file = s.c.root.path().join("pattern.img");
        std::fs::write(&file, &data).unwrap();
        let (mut a, uri) = s.attach("a");
        common::run(Command::new("nbdcopy").env("PATH", system_path()).arg("--flush").arg(&file).arg(&uri));
        s.detach(&mut a, "a");
        (s, data)
    }

    /// `meshdisk attach vault` from its own folder; the process and URI.
    fn attach(&self, folder: &str) -> (Proc, String) {
        let state = self.c.root.path().join(folder);
        let socket = state.join("nbd.sock");
        let mut cmd = Command::new(meshdisk_bin());
        cmd.args(["attach", "vault", "--credential"])
            .arg(self.c.admin_cred())
            .arg("--key-file")
            .arg(self.c.root.path().join("vault.key"))
            .arg("--cache-dir")
            .arg(&state)
            .arg("--socket")
            .arg(&socket)
            .args(["--cache-size", "4M", "--log-size", "16M"]);
        let mut proc = Proc::spawn(&format!("attach-{folder}"), &mut cmd);
        proc.wait_for("nbd+unix://", Duration::from_secs(60));
        (proc, format!("nbd+unix:///?socket={}", socket.display()))
    }

    fn detach(&self, a: &mut Proc, folder: &str) {
        let dir = self.c.root.path().join(folder);
        let (ok, _, err) = self.c.cli(&["detach", "vault", "--cache-dir", dir.to_str().unwrap()]);
        assert!(ok, "detach: {err}");
        let (status, out) = a.wait_exit(Duration::from_secs(60));
        assert!(status.success(), "the attach did not stop cleanly:\n{out}");
        // The NBD server logs each request it failed: rot must never make
        // one fail.
        let failed: Vec<&str> = out
            .lines()
            .filter(|l| ["read", "write", "flush", "trim"].iter().any(|c| l.contains(&format!("{c} failed"))))
            .collect();
        assert!(failed.is_empty(), "the attach failed requests:\n{}", failed.join("\n"));
    }

    /// The live segments of `vault` (those its root names).
    fn live(&self) -> HashSet<SegmentId> {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async { self.c.client().list_segments("vault").await.unwrap() }).into_iter().collect()
    }

    /// Peer `peer`'s shards of `vault`'s live segments, from its index
    /// (the peer must be stopped: redb locks its file).
    fn shards_on(&self, peer: usize, live: &HashSet<SegmentId>) -> Vec<Shard> {
        use redb::{ReadableDatabase, ReadableTable};
        let volume = self.volume_id();
        let db = redb::Database::open(self.c.peer_dir(peer).join("store/index.redb")).unwrap();
        let txn = db.begin_read().unwrap();
        let mut out = Vec::new();
        for row in txn.open_table(SEGMENTS).unwrap().iter().unwrap() {
            let (k, v) = row.unwrap();
            let (k, v) = (k.value(), v.value());
            let segment = SegmentId::from_raw(u64::from_be_bytes(k[16..24].try_into().unwrap()));
            if k[..16] != volume[..] || !live.contains(&segment) {
                continue;
            }
            let data_file = u32::from_le_bytes(v[..4].try_into().unwrap());
            let offset = u64::from_le_bytes(v[4..12].try_into().unwrap());
            let len = u64::from(u32::from_le_bytes(v[12..16].try_into().unwrap()));
            // Root (32 bytes), then (n − 1) hash pairs of 64.
            let blocks = (v.len() as u64 - 48) / 64 + 1;
            let payload = offset + len - blocks * BLOCK as u64;
            out.push(Shard { peer, segment, index: k[24], data_file, payload, blocks });
        }
        out
    }

    fn volume_id(&self) -> [u8; 16] {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async { self.c.client().volume("vault").await.unwrap() }).spec.id
    }

    /// Flips a byte in every block of `shard`'s payload (in its data file).
    fn rot(&self, shard: &Shard) {
        let path = self.c.peer_dir(shard.peer).join(format!("store/data/{:08}.dat", shard.data_file));
        let mut bytes = std::fs::read(&path).unwrap();
        for b in 0..shard.blocks {
            let at = (shard.payload + b * BLOCK as u64) as usize + 123;
            bytes[at] ^= 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();
        eprintln!("rotted shard {} of segment {} on {}", shard.index, shard.segment, self.names[shard.peer]);
    }

    fn restart(&mut self, peer: usize) {
        self.names[peer] = self.c.restart_peer(peer, "1G", &format!("disk{peer}"));
    }

    fn scrub(&self, args: &[&str]) -> String {
        let cred = self.c.admin_cred();
        let mut all = vec!["scrub"];
        all.extend_from_slice(args);
        all.extend(["--credential", cred.to_str().unwrap()]);
        let (ok, out, err) = self.c.cli(&all);
        assert!(ok, "scrub {args:?}: {err}");
        out
    }

    /// Waits until the directory forgot `n` shards and repair has rebuilt
    /// them: every segment whole, `HEALTH_OK`.
    fn wait_repaired(&self, n: u64, timeout: Duration) -> ClusterStatus {
        self.c.wait_status(&format!("{n} bad shards forgotten and rebuilt"), timeout, |s| {
            s.repair.forgotten == n
                && s.verdict == Verdict::HealthOk
                && s.health.segments > 0
                && s.health.whole == s.health.segments
                && s.health.to_repair.segments == 0
                && s.scrub.unreported == 0
        })
    }

    /// Reads the whole volume from a fresh folder and compares it.
    fn read_back(&self, folder: &str, want: &[u8]) {
        let (mut a, uri) = self.attach(folder);
        let out = self.c.root.path().join(format!("{folder}.img"));
        common::run(Command::new("nbdcopy").env("PATH", system_path()).arg(&uri).arg(&out));
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), want.len());
        if got != want {
            let bad = got.chunks(BLOCK).zip(want.chunks(BLOCK)).filter(|(a, b)| a != b).count();
            panic!("{bad} blocks read back differ from what was written");
        }
        self.detach(&mut a, folder);
    }
}

/// Issue 15's bitrot test: bytes flipped in five shards on two peers'
/// disks; `meshdisk scrub start` has every peer check every shard, the
/// two report the five, the directory forgets them, repair rebuilds them,
/// and a fresh folder reads every byte exactly. On the way: a `scrub
/// pause --for` ends by itself, and `meshdisk status` says what scrub
/// found.
#[test]
fn bitrot_on_two_peers_is_found_by_scrub_and_repaired() {
    if !have_tools(&["nbdcopy"]) {
        return;
    }
    let started = Instant::now();
    let (mut s, data) = Setup::new("scrub-bitrot", &[], 8 << 20);
    let live = s.live();
    // Rot on two peers: three shards on one, two on the other, all of
    // distinct segments (so each stays readable from the others).
    let (x, y) = (1, 4);
    s.c.peers[x].stop();
    s.c.peers[y].stop();
    let on_x = s.shards_on(x, &live);
    let on_y = s.shards_on(y, &live);
    let mut used = HashSet::new();
    let mut rotten = Vec::new();
    for (shards, n) in [(&on_x, 3), (&on_y, 2)] {
        for sh in shards.iter().filter(|sh| used.insert(sh.segment)).take(n) {
            s.rot(sh);
            rotten.push(sh.clone());
        }
    }
    assert_eq!(rotten.len(), 5, "peers {x} and {y} hold shards of 5 distinct live segments");
    s.restart(x);
    s.restart(y);

    // A pause with a duration ends by itself.
    let out = s.scrub(&["pause", "--for", "3s"]);
    assert!(out.contains("paused for 3s"), "{out}");
    s.c.wait_status("every peer's scrub paused", Duration::from_secs(10), |st| {
        st.peers.iter().all(|p| p.scrub.as_ref().is_some_and(|r| r.paused))
            && st.scrub.paused_until_ms.is_some()
    });
    let paused_at = Instant::now();
    s.c.wait_status("the pause over", Duration::from_secs(15), |st| {
        st.peers.iter().all(|p| p.scrub.as_ref().is_some_and(|r| !r.paused))
            && st.scrub.paused_until_ms.is_none()
    });
    assert!(paused_at.elapsed() <= Duration::from_secs(10), "the pause lasted {:?}", paused_at.elapsed());
    // Nothing was scrubbed yet: a pass is weeks away.
    let before = s.c.status();
    assert_eq!((before.scrub.found, before.repair.forgotten), (0, 0), "{:#?}", before.scrub);

    s.scrub(&["start"]);
    let t = Instant::now();
    let st = s.c.wait_status("a pass done on every peer", Duration::from_secs(30), |st| {
        st.peers.iter().all(|p| p.scrub.as_ref().is_some_and(|r| r.passes >= 1))
    });
    eprintln!("every peer finished a pass {:.1} s after scrub start", t.elapsed().as_secs_f64());
    for p in &st.peers {
        let r = p.scrub.as_ref().unwrap();
        let expect = if p.name == s.names[x] {
            3
        } else if p.name == s.names[y] {
            2
        } else {
            0
        };
        assert_eq!(r.found, expect, "{}: {r:?}", p.name);
    }
    let st = s.wait_repaired(5, Duration::from_secs(60));
    eprintln!("rebuilt {:.1} s after scrub start: {:#?}", t.elapsed().as_secs_f64(), st.repair);
    assert_eq!(st.scrub.found, 5);
    let cred = s.c.admin_cred();
    let (ok, text, err) = s.c.cli(&["status", "--credential", cred.to_str().unwrap()]);
    assert!(ok, "{err}");
    let line = text.lines().find(|l| l.starts_with("scrub: ")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.ends_with("; 5 bad shards found, 0 not yet reported"), "{line}");
    assert!(line.contains("every peer finished a pass in the last"), "{line}");
    let out = s.scrub(&["status"]);
    assert!(out.starts_with("scrub: "), "{out}");

    s.read_back("fresh", &data);
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}

/// A client read that hits a rotten shard reads around it (the read
/// returns the right bytes), and the peer reports the shard, so it is
/// rebuilt, not only skipped. Scrub is effectively off (its first pass is
/// weeks away): only the read can have found it.
#[test]
fn a_rotten_shard_a_read_hits_is_reported_and_rebuilt() {
    if !have_tools(&["nbdcopy"]) {
        return;
    }
    let started = Instant::now();
    let (mut s, data) = Setup::new("scrub-read", &["--scrub-every", "60d"], 8 << 20);
    let live = s.live();
    let x = 2;
    s.c.peers[x].stop();
    // Data shards (index < k) are what reads read; rot those of three
    // live segments on one peer.
    let rotten: Vec<Shard> = s.shards_on(x, &live).into_iter().filter(|sh| sh.index < 4).take(3).collect();
    assert_eq!(rotten.len(), 3, "peer {x} holds data shards of three live segments");
    for sh in &rotten {
        s.rot(sh);
    }
    s.restart(x);
    s.read_back("fresh", &data);
    let st = s.c.status();
    let found = st.peers.iter().find(|p| p.name == s.names[x]).and_then(|p| p.scrub.clone()).unwrap();
    assert!(found.found >= 1, "the read found no bad shard: {found:?}");
    assert_eq!(found.passes, 0, "no scrub pass ran: {found:?}");
    assert!(found.pass_started_ms.is_none(), "no scrub pass ran: {found:?}");
    // What the read found is reported and rebuilt.
    let st = s.c.wait_status("the bad shards the read hit forgotten", Duration::from_secs(30), |st| {
        st.repair.forgotten >= 1 && st.scrub.unreported == 0
    });
    let n = st.repair.forgotten;
    assert!(n <= 3, "only the three rotten shards can be forgotten: {n}");
    s.wait_repaired(n, Duration::from_secs(60));
    s.read_back("fresh-again", &data);
    eprintln!(
        "{n} of 3 rotten shards hit by the read and rebuilt; total {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
