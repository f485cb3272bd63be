//! The health map over NBD (issue 15): `nbdinfo --map=meshdisk:health`
//! and libnbd's block status against a real directory, real peers and
//! `meshdisk attach`, a peer SIGKILLed as machines die.
//!
//! The `meshdisk:health` context says, per range, how redundantly the
//! range's newest data is stored (docs/formats.md): 0 whole, 1 degraded,
//! 2 at risk, 3 unavailable, 4 lost, plus 8 while it is only in the
//! attaching machine's local log. Unwritten ranges are whole.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Proc};
use common::{Served, have_tools, meshdisk_bin, stdout_of, system_path};
use meshdisk::api::PeerState;

const HEALTH: &str = "meshdisk:health";
const MIB: u64 = 1 << 20;
/// The volume's size, and what the test writes at its start.
const SIZE: u64 = 16 * MIB;
const WRITTEN: u64 = 64 << 10;

/// `nbdinfo --map[=CONTEXT] URI`: (offset, length, value) rows.
fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u32)> {
    let map = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".into(),
    };
    let out = stdout_of(Command::new("nbdinfo").env("PATH", system_path()).args([&map, uri]));
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let num =
                |i: usize| f[i].parse::<u64>().unwrap_or_else(|e| panic!("{map} row {l:?}: {e}\n{out}"));
            (num(0), num(1), num(2) as u32)
        })
        .collect()
}

/// The rows cover the disk, in order, adjacent values differ (merged).
fn check_rows(rows: &[(u64, u64, u32)], what: &str) {
    let mut at = 0;
    for (i, &(offset, length, value)) in rows.iter().enumerate() {
        assert_eq!(offset, at, "{what}: rows do not follow each other: {rows:?}");
        assert!(length > 0, "{what}: empty row: {rows:?}");
        if i > 0 {
            assert_ne!(value, rows[i - 1].2, "{what}: equal neighbours are not merged: {rows:?}");
        }
        at += length;
    }
    assert_eq!(at, SIZE, "{what}: rows do not cover the disk: {rows:?}");
}

/// `meshdisk attach VOLUME` on a unix socket in the cluster's folder `a`.
fn attach(c: &Cluster, volume: &str) -> (Proc, String) {
    let state = c.root.path().join("a");
    let socket = state.join("nbd.sock");
    let key: PathBuf = c.root.path().join(format!("{volume}.key"));
    let mut cmd = Command::new(meshdisk_bin());
    cmd.args(["attach", volume, "--credential"])
        .arg(c.admin_cred())
        .arg("--key-file")
        .arg(key)
        .arg("--cache-dir")
        .arg(&state)
        .arg("--socket")
        .arg(&socket)
        .args(["--cache-size", "4M", "--log-size", "16M"]);
    let mut proc = Proc::spawn(&format!("attach-{volume}"), &mut cmd);
    proc.wait_for("nbd+unix://", Duration::from_secs(60));
    (proc, format!("nbd+unix:///?socket={}", socket.display()))
}

/// Polls the health map until `want` says yes; the rows it said yes to.
fn wait_map(
    uri: &str,
    what: &str,
    timeout: Duration,
    want: impl Fn(&[(u64, u64, u32)]) -> bool,
) -> Vec<(u64, u64, u32)> {
    let start = Instant::now();
    loop {
        let rows = nbdinfo_map(uri, Some(HEALTH));
        check_rows(&rows, what);
        if want(&rows) {
            eprintln!("{what} after {:.1} s: {rows:?}", start.elapsed().as_secs_f64());
            return rows;
        }
        assert!(start.elapsed() < timeout, "the health map did not show {what} within {timeout:?}: {rows:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One libnbd connection selecting both contexts: writes the first
/// WRITTEN bytes, asks block status at once (the write is only in the
/// local log: commits wait up to two seconds for more), flushes, asks
/// again. Prints one JSON object per answer: context name to its flat
/// [length, flags, ...] list.
const LOCAL_THEN_FLUSHED: &str = r#"
import json, nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("meshdisk:health")
h.connect_uri(URI)
def status():
    got = {}
    def cb(context, offset, entries, err):
        got[context] = list(entries)
        return 0
    h.block_status(1 << 20, 0, cb)
    return got
h.pwrite(b"\xa5" * WRITTEN, 0)
print(json.dumps(status()))
h.flush()
print(json.dumps(status()))
h.shutdown()
"#;

/// Issue 15's health-map test. Five peers (one per failure domain), a
/// k=2 m=2 volume (repair threshold 4), 64 KiB written and flushed: the
/// map says whole everywhere. A peer holding shards of every segment is
/// SIGKILLed: once the directory sees it down the written range is
/// degraded (1) and the rest of the disk still whole; once it is lost,
/// repair rebuilds its shards on the fifth peer and the map says whole
/// again. Before the flush, the written range carries the local-log flag
/// (8); `base:allocation` is answered beside it on the same connection
/// and on its own (`nbdinfo --map`), and both contexts are listed.
#[test]
fn the_health_map_goes_degraded_when_a_peer_dies_and_whole_after_repair() {
    if !have_tools(&["nbdinfo", "nbdsh"]) {
        return;
    }
    let started = Instant::now();
    let mut c = Cluster::start("health-map", &["--peer-timeout", "2s", "--peer-lost-after", "10s"]);
    let names: Vec<String> = (0..5).map(|i| c.add_peer("1G", &format!("disk{i}"))).collect();
    c.wait_all_up(5);
    c.create_volume("hm", "16M", 2, 2);
    let (attached, uri) = attach(&c, "hm");

    // Both contexts are listed (LIST_META_CONTEXT with no query).
    let info = stdout_of(Command::new("nbdinfo").env("PATH", system_path()).arg(&uri));
    assert!(info.contains("base:allocation") && info.contains(HEALTH), "nbdinfo:\n{info}");
    eprintln!("nbdinfo:\n{info}");
    // An empty disk is whole (nothing to lose) and all hole.
    assert_eq!(nbdinfo_map(&uri, Some(HEALTH)), vec![(0, SIZE, 0)]);
    assert_eq!(nbdinfo_map(&uri, None), vec![(0, SIZE, 3)]);

    // Written but not yet committed: only in the local log (8); flushed:
    // on the peers, whole (0). base:allocation answers in the same reply.
    let script =
        LOCAL_THEN_FLUSHED.replace("WRITTEN", &WRITTEN.to_string()).replace("URI", &format!("{uri:?}"));
    let out = stdout_of(Command::new("nbdsh").env("PATH", system_path()).args(["-c", &script]));
    let answers: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(answers.len(), 2, "nbdsh:\n{out}");
    let rest = MIB - WRITTEN;
    assert_eq!(answers[0][HEALTH], serde_json::json!([WRITTEN, 8, rest, 0]), "before the flush: {out}");
    assert_eq!(answers[1][HEALTH], serde_json::json!([MIB, 0]), "after the flush: {out}");
    for a in &answers {
        assert_eq!(a["base:allocation"], serde_json::json!([WRITTEN, 0, rest, 3]), "{out}");
    }
    assert_eq!(nbdinfo_map(&uri, Some(HEALTH)), vec![(0, SIZE, 0)]);
    assert_eq!(nbdinfo_map(&uri, None), vec![(0, WRITTEN, 0), (WRITTEN, SIZE - WRITTEN, 3)]);

    // A peer holding a shard of every segment of the volume (each segment
    // is on four of the five) dies.
    let (victim, segments) = runtime().block_on(async {
        let client = c.client();
        let ids = client.list_segments("hm").await.unwrap();
        let records = client.segment_records("hm", ids.clone()).await.unwrap();
        let mut common: Option<HashSet<u16>> = None;
        for r in records.iter().flatten() {
            let here: HashSet<u16> = r.peers.iter().copied().collect();
            common = Some(common.map_or(here.clone(), |c| &c & &here));
        }
        let common = common.expect("the flush committed segments");
        let id = *common.iter().min().expect("a peer holds a shard of every segment");
        let slot = client.peer_slots(vec![id]).await.unwrap().remove(0).unwrap();
        (names.iter().position(|n| *n == slot.addr.name).unwrap(), ids.len())
    });
    eprintln!(
        "killing {} (peer{victim}), which holds a shard of each of the {segments} segments",
        names[victim]
    );
    c.peers[victim].kill();
    let down = Instant::now();
    // Down (after --peer-timeout), not yet lost: degraded, the rest whole.
    let rows =
        wait_map(&uri, "degraded", Duration::from_secs(15), |rows| rows.first().is_some_and(|r| r.2 == 1));
    assert_eq!(rows, vec![(0, WRITTEN, 1), (WRITTEN, SIZE - WRITTEN, 0)]);
    let text =
        stdout_of(Command::new("nbdinfo").env("PATH", system_path()).args(["--map=meshdisk:health", &uri]));
    eprintln!("nbdinfo --map=meshdisk:health with {} down:\n{text}", names[victim]);
    let status = c.status();
    let state = status.peers.iter().find(|p| p.name == names[victim]).map(|p| p.state);
    assert_eq!(state, Some(PeerState::Down), "degraded while the peer is down, before it is lost");
    assert!(down.elapsed() < Duration::from_secs(10), "seen degraded only after the peer could be lost");

    // Lost after --peer-lost-after: repair rebuilds its shards on the
    // fifth peer, and the map is whole again, as volume info says.
    wait_map(&uri, "whole again", Duration::from_secs(40), |rows| rows == [(0, SIZE, 0)]);
    let cred = c.admin_cred();
    let (ok, out, err) = c.cli(&["volume", "info", "hm", "--json", "--credential", cred.to_str().unwrap()]);
    assert!(ok, "volume info: {err}");
    let info: meshdisk::api::VolumeInfo = serde_json::from_str(&out).unwrap();
    assert_eq!(info.health.whole, info.health.segments, "{:?}", info.health);
    assert!(c.status().repair.shards > 0, "the whole map came from a repair");
    // base:allocation is unchanged by all this.
    assert_eq!(nbdinfo_map(&uri, None), vec![(0, WRITTEN, 0), (WRITTEN, SIZE - WRITTEN, 3)]);
    let log = attached.output();
    assert!(!log.contains("block status failed"), "the attach failed a block status:\n{log}");
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}

/// A backend with no redundancy to report (RAM, a file) does not offer
/// the context: nbdinfo lists only base:allocation and refuses to map
/// meshdisk:health, while `--map` works as before.
#[test]
fn a_server_without_a_health_map_does_not_offer_the_context() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let s = Served::memory("16M");
    let info = stdout_of(Command::new("nbdinfo").env("PATH", system_path()).arg(&s.unix_uri));
    assert!(info.contains("base:allocation") && !info.contains(HEALTH), "nbdinfo:\n{info}");
    let out = Command::new("nbdinfo")
        .env("PATH", system_path())
        .args(["--map=meshdisk:health", &s.unix_uri])
        .output()
        .unwrap();
    assert!(!out.status.success(), "nbdinfo mapped a context the server does not offer");
    assert_eq!(nbdinfo_map(&s.unix_uri, None), vec![(0, SIZE, 3)]);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}
