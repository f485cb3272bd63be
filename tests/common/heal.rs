//! The harness of the healing tests (repair, drain, audits, scrub): a
//! cluster of real processes with its peers by index, attaches from
//! folders (machines), and checks of the segment records, the status and
//! the bytes.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::cluster::{Cluster, Proc};
use super::{meshdisk_bin, system_path};
use meshdisk::api::{PeerAddr, PeerState, SegmentRecord, VolumeInfo};
use meshdisk::codec::sequence::SegmentId;

pub const K: usize = 4;
pub const M: usize = 2;
pub const BLOCK: u64 = 4096;
pub const WRITE: u16 = 1;
pub const FLUSH: u16 = 3;

/// A cluster, its peers by index (their names), and what the tests did
/// to it.
pub struct Setup {
    pub c: Cluster,
    /// Peer names, by index in `c.peers`.
    pub names: Vec<String>,
    /// Names of the peers killed for good.
    pub killed: HashSet<String>,
}

/// A running attach of one volume from one folder.
pub struct Attached {
    pub proc: Proc,
    pub volume: String,
    pub folder: PathBuf,
    pub socket: PathBuf,
}

impl Attached {
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Setup {
    pub fn new(cluster: &str, peers: usize, dir_args: &[&str]) -> Self {
        let c = Cluster::start(cluster, dir_args);
        let mut s = Self { c, names: Vec::new(), killed: HashSet::new() };
        for _ in 0..peers {
            s.add_peer();
        }
        s.c.wait_all_up(peers);
        s
    }

    /// Joins a new peer (a machine added to replace dead ones), each in its
    /// own failure domain; its index.
    pub fn add_peer(&mut self) -> usize {
        let i = self.c.peers.len();
        let name = self.c.add_peer("1G", &format!("disk{i}"));
        self.names.push(name);
        i
    }

    /// SIGKILLs peer `i`: it never comes back.
    pub fn kill(&mut self, i: usize) {
        self.c.peers[i].kill();
        self.killed.insert(self.names[i].clone());
        eprintln!("killed {} (peer{i})", self.names[i]);
    }

    pub fn key(&self, volume: &str) -> PathBuf {
        self.c.root.path().join(format!("{volume}.key"))
    }

    /// `meshdisk attach VOLUME` from `folder` (its own state: another
    /// folder is another machine), serving on a unix socket and, with
    /// `tcp`, on 127.0.0.1 too; small local log and cache, so reads reach
    /// the peers. `extra`: more attach flags.
    pub fn attach(&self, volume: &str, folder: &str, tcp: Option<u16>, extra: &[&str]) -> Attached {
        let state = self.c.root.path().join(folder);
        let socket = state.join("nbd.sock");
        let mut cmd = Command::new(meshdisk_bin());
        cmd.args(["attach", volume, "--credential"])
            .arg(self.c.admin_cred())
            .arg("--key-file")
            .arg(self.key(volume))
            .arg("--cache-dir")
            .arg(&state)
            .arg("--socket")
            .arg(&socket)
            .args(["--cache-size", "4M", "--log-size", "16M"])
            .args(extra);
        if let Some(port) = tcp {
            cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
        }
        let mut proc = Proc::spawn(&format!("attach-{volume}-{folder}"), &mut cmd);
        proc.wait_for("nbd+unix://", Duration::from_secs(60));
        Attached { proc, volume: volume.into(), folder: state, socket }
    }

    /// `meshdisk detach`: flushes everything to the peers; the attach must
    /// stop cleanly, and must not have failed a single request.
    pub fn detach(&self, a: Attached) {
        let Attached { mut proc, volume, folder, .. } = a;
        let (ok, _, err) = self.c.cli(&["detach", &volume, "--cache-dir", folder.to_str().unwrap()]);
        assert!(ok, "detach {volume}: {err}");
        let (status, out) = proc.wait_exit(Duration::from_secs(90));
        assert!(status.success(), "the attach of {volume} did not stop cleanly:\n{out}");
        no_failed_requests(&out, &volume);
    }

    /// `meshdisk volume info VOLUME --json`, parsed.
    pub fn info(&self, volume: &str) -> VolumeInfo {
        let cred = self.c.admin_cred();
        let (ok, out, err) =
            self.c.cli(&["volume", "info", volume, "--json", "--credential", cred.to_str().unwrap()]);
        assert!(ok, "volume info {volume}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("volume info --json is not valid: {e}\n{out}"))
    }

    /// Every live segment record of `volume` (those a commit dropped while
    /// they were read left out), and every peer id any of
    /// them names resolved to its name (`None`: no such peer any more).
    pub fn records(&self, volume: &str) -> (Vec<(SegmentId, SegmentRecord)>, PeerNames) {
        runtime().block_on(async {
            let client = self.c.client();
            let ids = client.list_segments(volume).await.unwrap();
            let mut out = Vec::new();
            for chunk in ids.chunks(1000) {
                let records = client.segment_records(volume, chunk.to_vec()).await.unwrap();
                // A segment listed but gone by now was dropped meanwhile
                // (a commit or compaction replaced it).
                out.extend(chunk.iter().zip(records).filter_map(|(seg, r)| Some((*seg, r?))));
            }
            let named: Vec<u16> = {
                let mut n: Vec<u16> =
                    out.iter().flat_map(|(_, r)| r.peers.iter().copied()).filter(|&p| p != 0).collect();
                n.sort_unstable();
                n.dedup();
                n
            };
            let slots = client.peer_slots(named.clone()).await.unwrap();
            let names = named.into_iter().zip(slots).map(|(id, s)| (id, s.map(|s| s.addr.name))).collect();
            (out, names)
        })
    }

    /// Names of the peers the directory sees up.
    pub fn up(&self) -> HashSet<String> {
        self.c.status().peers.into_iter().filter(|p| p.state == PeerState::Up).map(|p| p.name).collect()
    }

    /// Waits until the directory sees every killed peer in `state`.
    pub fn wait_killed(&self, state: PeerState, timeout: Duration) {
        let killed = self.killed.clone();
        self.c.wait_status(&format!("the killed peers {state:?}"), timeout, |s| {
            killed.iter().all(|k| s.peers.iter().any(|p| &p.name == k && p.state == state))
        });
    }

    /// Waits until `volume info` says every segment of `volume` is whole
    /// and nothing is left to repair; how long that took.
    pub fn wait_whole(&self, volume: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let h = self.info(volume).health;
            if h.segments > 0 && h.whole == h.segments && h.to_repair.segments == 0 {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "{volume} was not whole again within {timeout:?}: {h:#?}\nrepair: {:#?}",
                self.c.status().repair
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Every segment record of `volume` names k + m distinct peers, each
    /// up, none of them killed. Returns how many segments there are.
    pub fn check_records(&self, volume: &str) -> usize {
        let (records, names) = self.records(volume);
        let up = self.up();
        for (seg, r) in &records {
            assert_eq!(r.peers.len(), K + M, "segment {seg} of {volume}: {r:?}");
            let distinct: HashSet<u16> = r.peers.iter().copied().collect();
            assert!(
                !r.peers.contains(&0) && distinct.len() == K + M,
                "segment {seg} of {volume} is not on k + m distinct peers: {:?}",
                r.peers
            );
            for id in &r.peers {
                let name = names[id].as_deref().unwrap_or_else(|| {
                    panic!("segment {seg} of {volume} names peer id {id}, which no peer has")
                });
                assert!(
                    !self.killed.contains(name),
                    "segment {seg} of {volume} names {name}, killed for good"
                );
                assert!(up.contains(name), "segment {seg} of {volume} names {name}, which is not up");
            }
        }
        records.len()
    }

    /// Peer indices (among those alive) by how many of `volume`'s
    /// segments they hold, most first.
    pub fn holders_by_count(&self, volume: &str) -> Vec<(usize, usize)> {
        let (records, names) = self.records(volume);
        let mut count: HashMap<String, usize> = HashMap::new();
        for (_, r) in &records {
            for id in &r.peers {
                if let Some(Some(name)) = names.get(id) {
                    *count.entry(name.clone()).or_default() += 1;
                }
            }
        }
        let mut out: Vec<(usize, usize)> = (0..self.names.len())
            .filter(|&i| !self.killed.contains(&self.names[i]))
            .map(|i| (i, count.get(&self.names[i]).copied().unwrap_or(0)))
            .collect();
        out.sort_by_key(|&(i, n)| (std::cmp::Reverse(n), i));
        out
    }

    /// Of the live peers among `among`, the pair holding shards of the
    /// most segments of `volume` together, and those segments.
    pub fn pair_sharing_most(&self, volume: &str, among: &[usize]) -> ((usize, usize), HashSet<SegmentId>) {
        let (records, names) = self.records(volume);
        let holds = |i: usize, r: &SegmentRecord| {
            r.peers.iter().any(|id| names.get(id).is_some_and(|n| n.as_deref() == Some(&self.names[i])))
        };
        let mut best: Option<((usize, usize), HashSet<SegmentId>)> = None;
        for (x, &a) in among.iter().enumerate() {
            for &b in &among[x + 1..] {
                let both: HashSet<SegmentId> =
                    records.iter().filter(|(_, r)| holds(a, r) && holds(b, r)).map(|(s, _)| *s).collect();
                if best.as_ref().is_none_or(|(_, s)| both.len() > s.len()) {
                    best = Some(((a, b), both));
                }
            }
        }
        best.expect("two peers to choose from")
    }

    /// Shards on the up peers that no record names there: of `volume`
    /// (each must be named by its segment's record for its index and that
    /// peer) and of every volume in `deleted` (none may be left).
    pub fn stray_shards(&self, volume: &str, deleted: &[[u8; 16]]) -> Vec<String> {
        let (records, names) = self.records(volume);
        let id_of: HashMap<String, u16> =
            names.iter().filter_map(|(id, n)| n.clone().map(|n| (n, *id))).collect();
        let named: HashSet<(SegmentId, u8, u16)> = records
            .iter()
            .flat_map(|(seg, r)| r.peers.iter().enumerate().map(move |(i, p)| (*seg, i as u8, *p)))
            .collect();
        let status = self.c.status();
        runtime().block_on(async {
            let client = self.c.client();
            let id = client.volume(volume).await.unwrap().spec.id;
            let mut stray = Vec::new();
            for p in status.peers.iter().filter(|p| p.state == PeerState::Up) {
                let addr = PeerAddr { name: p.name.clone(), addr: p.addr };
                for (vol, live) in std::iter::once((id, true)).chain(deleted.iter().map(|d| (*d, false))) {
                    let mut after = None;
                    loop {
                        let keys = client.list_shards(&addr, vol, after, 1000).await.unwrap();
                        for k in &keys {
                            let ok = live
                                && id_of
                                    .get(&p.name)
                                    .is_some_and(|&pid| named.contains(&(k.segment, k.index, pid)));
                            if !ok {
                                let of = if live { volume } else { "a deleted volume" };
                                stray.push(format!(
                                    "{}: shard {} of segment {} of {of}",
                                    p.name, k.index, k.segment
                                ));
                            }
                        }
                        if keys.len() < 1000 {
                            break;
                        }
                        after = keys.last().copied();
                    }
                }
            }
            stray
        })
    }

    /// `meshdisk status` (the text) must start with the verdict line; waits
    /// until that verdict is `HEALTH_OK`.
    pub fn wait_health_ok(&self, timeout: Duration) -> String {
        let cred = self.c.admin_cred();
        let start = Instant::now();
        loop {
            let (ok, out, err) = self.c.cli(&["status", "--credential", cred.to_str().unwrap()]);
            assert!(ok, "status: {err}");
            let first = out.lines().next().unwrap_or_default().to_owned();
            let verdicts = ["HEALTH_OK", "degraded", "repairing", "at risk", "data lost"];
            assert!(
                verdicts.iter().any(|v| first.starts_with(v)),
                "status does not start with a verdict:\n{out}"
            );
            if first == "HEALTH_OK" {
                return out;
            }
            assert!(start.elapsed() < timeout, "status did not say HEALTH_OK within {timeout:?}:\n{out}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Peer names by peer id (`None`: no peer has that id any more).
pub type PeerNames = HashMap<u16, Option<String>>;

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// The NBD server logs each request it failed (`read failed: ...`): a
/// repair must never make one fail.
pub fn no_failed_requests(log: &str, volume: &str) {
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| {
            ["read", "write", "flush", "trim", "write zeroes"]
                .iter()
                .any(|c| l.contains(&format!("{c} failed")))
        })
        .collect();
    assert!(failed.is_empty(), "the attach of {volume} failed requests:\n{}", failed.join("\n"));
}

/// A TCP port that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Copies `file` onto the device at `uri` with nbdcopy.
pub fn nbdcopy_to(file: &Path, uri: &str) {
    super::run(Command::new("nbdcopy").env("PATH", system_path()).arg("--flush").arg(file).arg(uri));
}

/// Reads the whole device at `uri` with nbdcopy and compares it with `want`.
pub fn nbdcopy_check(uri: &str, dir: &Path, want: &[u8], when: &str) {
    let out = dir.join("read-back.img");
    let _ = std::fs::remove_file(&out);
    super::run(Command::new("nbdcopy").env("PATH", system_path()).arg(uri).arg(&out));
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), want.len(), "{when}: the device's size");
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap() as u64;
        let bad = got.chunks(BLOCK as usize).zip(want.chunks(BLOCK as usize)).filter(|(a, b)| a != b).count();
        panic!("{when}: {bad} blocks differ from what was written, the first at {}", at / BLOCK * BLOCK);
    }
}

/// fio on the `nbd` engine: seeded random 64 KiB writes over `size` bytes
/// with a crc32c in every block, then every block read back and verified
/// (`verify_only`: only the reading and verifying, of blocks an earlier
/// run with the same seed wrote). Writes are paced to `rate` so the run
/// lasts long enough to kill a peer under it.
pub fn fio_command(uri: &str, size: &str, rate: &str, verify_only: bool) -> Command {
    let mut cmd = Command::new("fio");
    cmd.env("PATH", system_path())
        .args(["--ioengine=nbd", "--output-format=normal", "--verify=crc32c", "--verify_fatal=1"])
        .args(["--verify_state_save=0", "--name=heal", "--rw=randwrite", "--bs=64k", "--iodepth=8"])
        .args(["--randseed=14", &format!("--size={size}"), &format!("--rate=,{rate}")])
        .arg(format!("--uri={uri}"));
    if verify_only {
        cmd.arg("--verify_only");
    }
    cmd
}

/// fio's output says it verified without errors.
pub fn fio_passed(out: &str) {
    assert!(!out.contains("verify:") || !out.contains("bad"), "fio's verify failed:\n{out}");
    assert!(!out.contains("err=") || out.contains("err= 0"), "fio reported errors:\n{out}");
    assert!(out.contains("READ:"), "fio read the blocks back:\n{out}");
}
