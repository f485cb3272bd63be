//! Repair end to end (issue 14): a directory, peers and `meshdisk attach`
//! as real processes, real NBD clients (fio, nbdcopy) and peers killed
//! with SIGKILL, as machines die.
//!
//! Every test asserts the same three things after its failures: the
//! volume's segments are whole again (`volume info --json`: every segment
//! on k + m distinct up peers, nothing left to repair) with no operator
//! step; every segment record names k + m distinct peers that are up (none
//! of the killed ones); and every byte reads back exactly, from a fresh
//! folder (another machine), so from the peers and not from a cache.
//!
//! The directory runs with short timers (`--peer-timeout 2s
//! --peer-lost-after 4s`) so a peer is lost seconds after it dies, except
//! where the test is about what happens before it is lost.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::cluster::Proc;
use common::heal::*;
use common::rawclient::RawClient;
use common::{Rng, have_tools, pattern};
use meshdisk::api::{PeerState, SegmentRecord};
use meshdisk::codec::sequence::SegmentId;

/// Issue 14's first test. Seven peers, a k=4 m=2 volume attached over
/// NBD on 127.0.0.1, fio writing and verifying 32 MiB (128 segments'
/// worth of data) at a paced rate; the peer holding the most shards is
/// SIGKILLed while fio writes. The directory declares it lost after 4 s
/// and rebuilds its shards elsewhere, while fio goes on writing and then
/// reads everything back. No request fails, fio's verify passes, every
/// segment ends on k + m distinct up peers without an operator, the
/// status says `HEALTH_OK`, and fio's blocks verify again from a fresh
/// folder, read from the peers.
#[test]
fn a_peer_killed_for_good_under_fio_verify_is_rebuilt_without_an_operator() {
    if !have_tools(&["fio"]) {
        return;
    }
    let started = Instant::now();
    let mut s =
        Setup::new("heal-fio", 7, &["--peer-timeout", "2s", "--peer-lost-after", "4s", "--lease-ttl", "4s"]);
    s.c.create_volume("vm", "64M", K as u8, M as u8);
    let port = free_tcp_port();
    let a = s.attach("vm", "a", Some(port), &[]);
    let uri = format!("nbd://127.0.0.1:{port}");
    let mut fio = Proc::spawn("fio-vm", &mut fio_command(&uri, "32M", "4m", false));
    // Some segments on the peers first, so the victim holds shards.
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.records("vm").0.len() < 12 {
        assert!(Instant::now() < deadline, "fio wrote no segments in 60 s:\n{}", fio.output());
        assert!(
            fio.child.try_wait().unwrap().is_none(),
            "fio ended before a peer was killed:\n{}",
            fio.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (victim, holds) = s.holders_by_count("vm")[0];
    s.kill(victim);
    assert!(
        fio.child.try_wait().unwrap().is_none(),
        "fio ended before the peer was killed: pace it slower:\n{}",
        fio.output()
    );
    eprintln!("{} held shards of {holds} segments", s.names[victim]);
    s.wait_killed(PeerState::Lost, Duration::from_secs(30));
    let (status, out) = fio.wait_exit(Duration::from_secs(180));
    assert!(status.success(), "fio failed ({status}):\n{out}");
    fio_passed(&out);
    let fio_done = started.elapsed();
    let took = s.wait_whole("vm", Duration::from_secs(90));
    let segments = s.check_records("vm");
    let status = s.wait_health_ok(Duration::from_secs(30));
    let repair = s.c.status().repair;
    eprintln!(
        "fio done at {:.1} s; whole {:.1} s later: {segments} segments on k + m distinct up peers; {} shards rebuilt ({} bytes, {} read), {} failed, {} raced\n{status}",
        fio_done.as_secs_f64(),
        took.as_secs_f64(),
        repair.shards,
        repair.bytes,
        repair.read_bytes,
        repair.failed,
        repair.raced
    );
    assert!(repair.shards > 0, "nothing was rebuilt, yet a peer holding shards died");
    no_failed_requests(&a.proc.output(), "vm");
    s.detach(a);
    // From another folder, every block comes from the peers.
    let port = free_tcp_port();
    let b = s.attach("vm", "b", Some(port), &[]);
    let out = common::stdout_of(&mut fio_command(&format!("nbd://127.0.0.1:{port}"), "32M", "4m", true));
    fio_passed(&out);
    s.detach(b);
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}

/// Durability over time (issue 14): k=4 m=2 on 8 peers; kill 2 peers
/// (the pair sharing the most segments), wait until repair made every
/// segment whole again, kill 2 more, wait, kill 2 more: 6 of the 8
/// original peers gone, never more than m at once. Eight peers less six
/// leaves two, fewer than the k + m = 6 a segment needs on distinct peers,
/// so, as a real cluster replaces dead machines, two fresh peers join
/// after each of the first two rounds (the cluster is 8, 6, 8, 6, 8, 6
/// peers up). The data were written once, before the first kill; at the
/// end a fresh folder (another machine) reads every byte back exactly,
/// from shards that are all rebuilt ones on peers that joined after the
/// write, or survivors.
#[test]
fn durability_over_time_kill_pairs_of_peers_six_of_eight() {
    if !have_tools(&["nbdcopy"]) {
        return;
    }
    let started = Instant::now();
    let mut s = Setup::new(
        "heal-pairs",
        8,
        &["--peer-timeout", "2s", "--peer-lost-after", "4s", "--lease-ttl", "4s"],
    );
    s.c.create_volume("vault", "48M", K as u8, M as u8);
    let data = pattern(0x14_0002, 48 << 20);
    let file = s.c.root.path().join("pattern.img");
    std::fs::write(&file, &data).unwrap();
    let a = s.attach("vault", "a", None, &[]);
    nbdcopy_to(&file, &a.uri());
    s.detach(a);
    s.wait_whole("vault", Duration::from_secs(30));
    let originals: Vec<usize> = (0..8).collect();
    for round in 0..3 {
        let alive: Vec<usize> =
            originals.iter().copied().filter(|&i| !s.killed.contains(&s.names[i])).collect();
        let ((x, y), both) = s.pair_sharing_most("vault", &alive);
        s.kill(x);
        s.kill(y);
        let t = Instant::now();
        s.wait_killed(PeerState::Lost, Duration::from_secs(30));
        s.wait_whole("vault", Duration::from_secs(90));
        let took = t.elapsed();
        let segments = s.check_records("vault");
        eprintln!(
            "round {}: killed {} and {} ({} segments on both); whole again {:.1} s after the kill: {segments} segments on k + m distinct up peers",
            round + 1,
            s.names[x],
            s.names[y],
            both.len(),
            took.as_secs_f64()
        );
        if round < 2 {
            let (p, q) = (s.add_peer(), s.add_peer());
            eprintln!("joined {} and {}", s.names[p], s.names[q]);
        }
    }
    let gone = originals.iter().filter(|&&i| s.killed.contains(&s.names[i])).count();
    assert_eq!(gone, 6, "six of the eight original peers are gone");
    let b = s.attach("vault", "b", None, &[]);
    nbdcopy_check(&b.uri(), s.c.root.path(), &data, "after 6 of 8 peers died");
    s.detach(b);
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}

/// A segment down to k shards is repaired before `peer_lost_after`
/// (issue 14): with `--peer-lost-after 10m`, two peers (m) holding shards
/// of the same segments die at once. The segments that had a shard on
/// both are down to k = 4 on up peers, one failure from unreadable:
/// repair rebuilds both their missing shards within a minute, long before
/// either peer counts as lost. The segments that had a shard on only one
/// of them are left degraded: a peer silent for less than
/// `peer_lost_after` may be rebooting, and one missing shard (of m = 2)
/// does not start a repair storm. Every byte reads back exactly.
#[test]
fn a_segment_down_to_k_shards_is_repaired_before_peer_lost_after() {
    if !have_tools(&["nbdcopy"]) {
        return;
    }
    let started = Instant::now();
    let mut s = Setup::new(
        "heal-critical",
        8,
        &["--peer-timeout", "2s", "--peer-lost-after", "10m", "--lease-ttl", "4s"],
    );
    s.c.create_volume("tight", "24M", K as u8, M as u8);
    let data = pattern(0x14_0003, 24 << 20);
    let file = s.c.root.path().join("pattern.img");
    std::fs::write(&file, &data).unwrap();
    let a = s.attach("tight", "a", None, &[]);
    nbdcopy_to(&file, &a.uri());
    s.detach(a);
    s.wait_whole("tight", Duration::from_secs(30));
    let all: Vec<usize> = (0..8).collect();
    let ((x, y), both) = s.pair_sharing_most("tight", &all);
    let (before, names) = s.records("tight");
    let id_of = |i: usize| *names.iter().find(|(_, n)| n.as_deref() == Some(&s.names[i])).unwrap().0;
    let (ix, iy) = (id_of(x), id_of(y));
    let one: HashSet<SegmentId> = before
        .iter()
        .filter(|(_, r)| r.peers.contains(&ix) != r.peers.contains(&iy))
        .map(|(seg, _)| *seg)
        .collect();
    assert!(!both.is_empty(), "no two peers share a segment");
    s.kill(x);
    s.kill(y);
    let killed_at = Instant::now();
    s.wait_killed(PeerState::Down, Duration::from_secs(30));
    // `meshdisk repair --wait` follows repair until nothing is left to
    // rebuild (the segments with one shard on a down peer only wait).
    let cred = s.c.admin_cred();
    let (ok, out, err) =
        s.c.cli(&["repair", "--wait", "--timeout", "60s", "--credential", cred.to_str().unwrap()]);
    assert!(ok, "repair --wait failed: {out}{err}");
    assert!(out.starts_with("repair done in "), "{out}");
    // Repaired once every segment that was on both has its k + m shards
    // on distinct up peers again.
    let deadline = killed_at + Duration::from_secs(60);
    loop {
        let (now, names) = s.records("tight");
        let up = s.up();
        let whole = |r: &SegmentRecord| {
            let distinct: HashSet<u16> = r.peers.iter().copied().collect();
            distinct.len() == K + M
                && r.peers.iter().all(|id| names[id].as_deref().is_some_and(|n| up.contains(n)))
        };
        let left = now.iter().filter(|(seg, r)| both.contains(seg) && !whole(r)).count();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} of the {} segments down to k shards were not repaired within 60 s: {:#?}\nrepair: {:#?}",
            both.len(),
            s.info("tight").health,
            s.c.status().repair
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let took = killed_at.elapsed();
    let h = s.info("tight").health;
    eprintln!(
        "{} segments on both killed peers repaired {:.1} s after the kill; {} on one of them left degraded; health {h:?}",
        both.len(),
        took.as_secs_f64(),
        one.len()
    );
    assert_eq!((h.critical, h.unavailable, h.lost), (0, 0, 0), "{h:#?}");
    assert_eq!(h.to_repair.segments, 0, "nothing is to repair before the peers are lost: {h:#?}");
    // Still before `peer_lost_after`: the killed peers are down, not lost,
    // and the segments with one shard on them wait for it.
    s.wait_killed(PeerState::Down, Duration::from_secs(1));
    assert_eq!(h.degraded as usize, one.len(), "segments with one shard on a down peer wait: {h:#?}");
    assert_eq!(h.whole + h.degraded, h.segments, "{h:#?}");
    let (after, names) = s.records("tight");
    for (seg, r) in &after {
        if one.contains(seg) {
            let was = &before.iter().find(|(b, _)| b == seg).unwrap().1;
            assert_eq!(&r.peers, &was.peers, "segment {seg} was moved off a peer that is only down");
        } else {
            for id in &r.peers {
                let name = names[id].as_deref().unwrap();
                assert!(!s.killed.contains(name), "segment {seg} names {name}, which is down");
            }
        }
    }
    let b = s.attach("tight", "b", None, &[]);
    nbdcopy_check(&b.uri(), s.c.root.path(), &data, "with two peers down");
    s.detach(b);
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}

/// Repair racing compaction, deletion and commits (issue 14): the first
/// half of one volume is overwritten block by block with compaction eager
/// (`--compact-above 1.05`: it drops and rewrites segments all the time)
/// while the peer holding most of its shards dies and is declared lost:
/// repair rebuilds the same segments the commits and compaction drop (and
/// the second half's, which nothing rewrites, so repair surely has work
/// while compaction runs), and a second
/// volume is deleted meanwhile (the collector erases its shards while
/// repair scans its records). At the end: the volume's segments are all
/// whole and no record names the dead peer; its contents equal the model
/// through the attach and from a fresh folder; and once the collector's
/// graces are over, the up peers hold no shard a record does not name
/// there, and nothing of the deleted volume (a repair that lost its race
/// erased what it stored: nothing freed was resurrected).
#[test]
fn repair_racing_compaction_deletion_and_commits_never_loses_or_resurrects() {
    let started = Instant::now();
    let mut s = Setup::new(
        "heal-race",
        7,
        &[
            "--peer-timeout",
            "2s",
            "--peer-lost-after",
            "4s",
            "--lease-ttl",
            "4s",
            "--drop-grace",
            "1s",
            "--collect-grace",
            "2s",
            "--reconcile-every",
            "2s",
        ],
    );
    const SIZE: u64 = 16 << 20;
    s.c.create_volume("live", "16M", K as u8, M as u8);
    s.c.create_volume("doomed", "8M", K as u8, M as u8);
    let doomed_id = runtime().block_on(async { s.c.client().volume("doomed").await.unwrap().spec.id });
    let mut rng = Rng(0x14_0004);
    let mut cookie = 0u64;
    // The doomed volume: written, detached, deleted later.
    let d = s.attach("doomed", "d", None, &[]);
    let mut conn = RawClient::handshake(&d.socket, false);
    for off in (0..8u64 << 20).step_by(1 << 20) {
        let data: Vec<u8> = (0..1 << 20).map(|_| rng.next() as u8).collect();
        write(&mut conn, &mut cookie, off, &data);
    }
    flush(&mut conn, &mut cookie);
    drop(conn);
    s.detach(d);
    let doomed = s.info("doomed").health;
    assert!(
        doomed.segments > 0 && doomed.whole == doomed.segments,
        "the doomed volume is on the peers: {doomed:?}"
    );
    // The live volume: filled, then overwritten.
    let a = s.attach("live", "a", None, &["--compact-above", "1.05"]);
    let mut conn = RawClient::handshake(&a.socket, false);
    let mut model = vec![0u8; SIZE as usize];
    for off in (0..SIZE).step_by(1 << 20) {
        let data: Vec<u8> = (0..1 << 20).map(|_| rng.next() as u8).collect();
        write(&mut conn, &mut cookie, off, &data);
        model[off as usize..off as usize + (1 << 20)].copy_from_slice(&data);
    }
    flush(&mut conn, &mut cookie);
    let (victim, _) = s.holders_by_count("live")[0];
    let mut killed_at = None;
    let mut deleted = false;
    let mut overwrites = 0u64;
    // Overwrite until the peer has been lost for a while and repair has
    // caught up with what the overwrites leave: at least 25 s of writes.
    let write_for = Duration::from_secs(25);
    let t = Instant::now();
    while t.elapsed() < write_for {
        for _ in 0..256 {
            let block = rng.below(SIZE / BLOCK / 2);
            let data: Vec<u8> = (0..BLOCK).map(|_| rng.next() as u8).collect();
            write(&mut conn, &mut cookie, block * BLOCK, &data);
            model[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize].copy_from_slice(&data);
            overwrites += 1;
        }
        flush(&mut conn, &mut cookie);
        if killed_at.is_none() && t.elapsed() > Duration::from_secs(3) {
            s.kill(victim);
            killed_at = Some(Instant::now());
        }
        if !deleted && killed_at.is_some_and(|k| k.elapsed() > Duration::from_secs(5)) {
            let cred = s.c.admin_cred();
            let (ok, _, err) =
                s.c.cli(&["volume", "delete", "doomed", "--yes", "--credential", cred.to_str().unwrap()]);
            assert!(ok, "volume delete doomed: {err}");
            deleted = true;
        }
    }
    assert!(deleted, "the doomed volume was deleted while the live one was written");
    let repair = s.c.status().repair;
    eprintln!(
        "{overwrites} 4 KiB overwrites in {:.1} s; repair meanwhile: {} shards rebuilt, {} failed, {} raced",
        t.elapsed().as_secs_f64(),
        repair.shards,
        repair.failed,
        repair.raced
    );
    s.wait_killed(PeerState::Lost, Duration::from_secs(10));
    let took = s.wait_whole("live", Duration::from_secs(90));
    assert!(s.c.status().repair.shards > 0, "repair rebuilt nothing: it raced nothing");
    let segments = s.check_records("live");
    eprintln!("whole {:.1} s after the writes stopped: {segments} segments", took.as_secs_f64());
    check(&mut conn, &mut cookie, &model, SIZE, "through the attach that wrote");
    drop(conn);
    no_failed_requests(&a.proc.output(), "live");
    s.detach(a);
    let b = s.attach("live", "b", None, &[]);
    let mut conn = RawClient::handshake(&b.socket, false);
    check(&mut conn, &mut cookie, &model, SIZE, "from a fresh folder");
    drop(conn);
    s.detach(b);
    // After the graces: no stray shard, nothing of the deleted volume.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stray = s.stray_shards("live", &[doomed_id]);
    while !stray.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        stray = s.stray_shards("live", &[doomed_id]);
    }
    assert!(
        stray.is_empty(),
        "{} shards on up peers are named by no record:\n{}",
        stray.len(),
        stray.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    let repair = s.c.status().repair;
    eprintln!(
        "no stray shards; repair in all: {} shards rebuilt, {} failed, {} raced; total {:.1} s",
        repair.shards,
        repair.failed,
        repair.raced,
        started.elapsed().as_secs_f64()
    );
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

fn check(conn: &mut RawClient, cookie: &mut u64, model: &[u8], size: u64, when: &str) {
    for off in (0..size).step_by(1 << 20) {
        *cookie += 1;
        let got = conn.read_simple(*cookie, off, 1 << 20);
        let want = &model[off as usize..off as usize + (1 << 20)];
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap() as u64 + off;
            panic!("{when}: the block at {} differs from the last write", at / BLOCK * BLOCK);
        }
    }
}
