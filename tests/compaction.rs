//! Compaction end to end: a directory, six peers and `meshdisk attach` as
//! real processes; a small volume filled to 70% and overwritten with
//! random 4 KiB writes several times over. The space the volume holds on
//! the peers must come back within the bound (1.43 × live data ×
//! (k+m)/k) while every byte stays what was last written, through a
//! re-attach from another folder.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Proc};
use common::rawclient::RawClient;
use common::{Rng, meshdisk_bin};
use meshdisk::api::PeerAddr;

const VOLUME: &str = "packed";
const SIZE: u64 = 32 << 20;
const BLOCK: u64 = 4096;
const WRITE: u16 = 1;
const FLUSH: u16 = 3;
const K: u64 = 4;
const M: u64 = 2;

struct Setup {
    c: Cluster,
    key: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let mut c = Cluster::start("compact", &["--lease-ttl", "4s", "--drop-grace", "1s"]);
        for i in 0..6 {
            c.add_peer("1G", &format!("disk{i}"));
        }
        c.wait_all_up(6);
        c.create_volume(VOLUME, "32M", K as u8, M as u8);
        let key = c.root.path().join(format!("{VOLUME}.key"));
        Self { c, key }
    }

    fn attach(&self, folder: &str) -> (Proc, RawClient) {
        let state = self.c.root.path().join(folder);
        let mut cmd = Command::new(meshdisk_bin());
        cmd.args(["attach", VOLUME, "--credential"])
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
        (proc, conn)
    }

    fn detach(&self, folder: &str, mut proc: Proc, conn: RawClient) {
        drop(conn);
        let state = self.c.root.path().join(folder);
        let (ok, _, err) = self.c.cli(&["detach", VOLUME, "--cache-dir", state.to_str().unwrap()]);
        assert!(ok, "detach: {err}");
        let (status, out) = proc.wait_exit(Duration::from_secs(60));
        assert!(status.success(), "the attach did not stop cleanly: {out}");
    }

    /// What the peers hold of the volume: (shards, shards no segment
    /// record names on that peer, bytes the peers report used).
    fn on_peers(&self) -> (usize, usize, u64) {
        let status = self.c.status();
        let used = status.peers.iter().map(|p| p.used).sum();
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let client = self.c.client();
            let id = client.volume(VOLUME).await.unwrap().spec.id;
            let ids = client.list_segments(VOLUME).await.unwrap();
            let mut named = HashSet::new();
            let mut peer_ids = HashSet::new();
            for chunk in ids.chunks(1000) {
                let records = client.segment_records(VOLUME, chunk.to_vec()).await.unwrap();
                for (seg, r) in chunk.iter().zip(records) {
                    // Dropped between the listing and this read (the
                    // compactor runs on): not live, and the caller polls
                    // again until the peers and the records agree.
                    let Some(r) = r else { continue };
                    for (index, peer) in r.peers.into_iter().enumerate() {
                        named.insert((*seg, index as u8, peer));
                        peer_ids.insert(peer);
                    }
                }
            }
            let slots = client.peer_slots(peer_ids.into_iter().filter(|&p| p != 0).collect()).await.unwrap();
            let id_of: HashMap<String, u16> =
                slots.into_iter().flatten().map(|s| (s.addr.name, s.id)).collect();
            let (mut shards, mut stray) = (0, 0);
            for p in &status.peers {
                let addr = PeerAddr { name: p.name.clone(), addr: p.addr };
                let mut after = None;
                loop {
                    let keys = client.list_shards(&addr, id, after, 1000).await.unwrap();
                    for k in &keys {
                        shards += 1;
                        let named_here =
                            id_of.get(&p.name).is_some_and(|&pid| named.contains(&(k.segment, k.index, pid)));
                        stray += usize::from(!named_here);
                    }
                    if keys.len() < 1000 {
                        break;
                    }
                    after = keys.last().copied();
                }
            }
            (shards, stray, used)
        })
    }

    /// Bytes the volume's segments hold on the peers (every shard).
    fn allocated(&self) -> u64 {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async { self.c.client().volume_info(VOLUME).await.unwrap().allocated })
    }
}

fn write(conn: &mut RawClient, cookie: &mut u64, offset: u64, data: &[u8]) {
    *cookie += 1;
    conn.request(0, WRITE, *cookie, offset, data.len() as u32, data);
    assert_eq!(conn.simple_reply(), (0, *cookie), "write at {offset}");
}

fn flush(conn: &mut RawClient, cookie: &mut u64) {
    *cookie += 1;
    conn.request(0, FLUSH, *cookie, 0, 0, &[]);
    assert_eq!(conn.simple_reply(), (0, *cookie), "flush");
}

fn check(conn: &mut RawClient, cookie: &mut u64, model: &[u8], when: &str) {
    for off in (0..SIZE).step_by(1 << 20) {
        *cookie += 1;
        let got = conn.read_simple(*cookie, off, 1 << 20);
        let want = &model[off as usize..off as usize + (1 << 20)];
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap() as u64 + off;
            panic!("{when}: the block at {} differs from the last write", at / BLOCK * BLOCK);
        }
    }
}

#[test]
fn overwriting_a_volume_many_times_keeps_its_space_within_the_bound_and_every_byte() {
    let s = Setup::new();
    let (proc, mut conn) = s.attach("a");
    let mut cookie = 0;
    let mut rng = Rng(0x5eed_c0de);
    let mut model = vec![0u8; SIZE as usize];
    // Fill 70%, 1 MiB at a time.
    let live_blocks = SIZE / BLOCK * 7 / 10;
    for off in (0..live_blocks * BLOCK).step_by(1 << 20) {
        let len = (live_blocks * BLOCK - off).min(1 << 20) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        write(&mut conn, &mut cookie, off, &data);
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    flush(&mut conn, &mut cookie);
    let filled = s.allocated();
    // Random 4 KiB overwrites of the live 70%, four times its size.
    let started = Instant::now();
    let mut peak = 0;
    for i in 0..live_blocks * 4 {
        let block = rng.below(live_blocks);
        let data: Vec<u8> = (0..BLOCK).map(|_| rng.next() as u8).collect();
        write(&mut conn, &mut cookie, block * BLOCK, &data);
        model[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize].copy_from_slice(&data);
        if i % 4096 == 0 {
            flush(&mut conn, &mut cookie);
            peak = peak.max(s.allocated());
        }
    }
    flush(&mut conn, &mut cookie);
    let written = started.elapsed();
    // The compactor catches up: the space comes within the bound.
    let live = live_blocks * BLOCK;
    let bound = (1.43 * live as f64 * (K + M) as f64 / K as f64) as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut allocated = s.allocated();
    while allocated > bound && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        allocated = s.allocated();
    }
    eprintln!(
        "filled: {filled} bytes; during the overwrites at most {peak} ({:.2}×); after {} overwrites in {:.1} s: {allocated} bytes held for {live} live ({:.2}×, bound {bound})",
        peak as f64 * K as f64 / (K + M) as f64 / live as f64,
        live_blocks * 4,
        written.as_secs_f64(),
        allocated as f64 * K as f64 / (K + M) as f64 / live as f64
    );
    assert!(allocated <= bound, "{allocated} bytes held on the peers, more than the bound {bound}");
    // The dropped segments' shards are erased once their grace is over:
    // the peers hold exactly what the records name, within the bound.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = s.on_peers();
    while (seen.1 > 0 || seen.2 > bound) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        seen = s.on_peers();
    }
    let (shards, stray, used) = seen;
    eprintln!("on the peers: {shards} shards, {stray} named by no record, {used} bytes used");
    assert_eq!(stray, 0, "shards no record names are still on the peers");
    assert!(used <= bound, "the peers use {used} bytes, more than the bound {bound}");
    check(&mut conn, &mut cookie, &model, "after compaction");
    s.detach("a", proc, conn);
    // Another folder (another machine) reads the same bytes.
    let (proc, mut conn) = s.attach("b");
    check(&mut conn, &mut cookie, &model, "attached elsewhere");
    s.detach("b", proc, conn);
}

#[test]
fn peers_truly_full_answer_enospc_and_lose_nothing_flushed() {
    // Six peers of 32 MiB (each keeps compaction's reserve from new
    // writes) under a 256 MiB volume: it cannot all be written.
    let mut c = Cluster::start("full", &["--lease-ttl", "4s", "--drop-grace", "1s"]);
    for i in 0..6 {
        c.add_peer("32M", &format!("disk{i}"));
    }
    c.wait_all_up(6);
    c.create_volume(VOLUME, "256M", K as u8, M as u8);
    let s = Setup { key: c.root.path().join(format!("{VOLUME}.key")), c };
    let (proc, mut conn) = s.attach("a");
    let mut cookie = 0;
    let mut rng = Rng(0xf011);
    let mut flushed = 0u64;
    let mut model = Vec::new();
    let mut refused = None;
    for off in (0..SIZE * 8).step_by(1 << 20) {
        let data: Vec<u8> = (0..1 << 20).map(|_| rng.next() as u8).collect();
        cookie += 1;
        conn.request(0, WRITE, cookie, off, data.len() as u32, &data);
        let (err, got) = conn.simple_reply();
        assert_eq!(got, cookie);
        if err != 0 {
            refused = Some(("write", err));
            break;
        }
        model.extend_from_slice(&data);
        if (off >> 20) % 4 == 3 {
            cookie += 1;
            conn.request(0, FLUSH, cookie, 0, 0, &[]);
            let (err, got) = conn.simple_reply();
            assert_eq!(got, cookie);
            if err != 0 {
                refused = Some(("flush", err));
                break;
            }
            flushed = off + (1 << 20);
        }
    }
    let (what, err) = refused.expect("256 MiB fitted on peers with room for about 96 MiB of data");
    assert_eq!(err, 28, "a {what} on full peers was answered {err}, not ENOSPC");
    assert!(flushed >= 32 << 20, "only {flushed} bytes went in before ENOSPC");
    // Everything flushed before reads back.
    for off in (0..flushed).step_by(1 << 20) {
        cookie += 1;
        let got = conn.read_simple(cookie, off, 1 << 20);
        assert!(got[..] == model[off as usize..off as usize + (1 << 20)], "flushed data at {off} changed");
    }
    drop(conn);
    let mut proc = proc;
    proc.kill();
}
