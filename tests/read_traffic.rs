//! What a random 4 KiB read costs on the network (issue 16's goal: a read
//! of a block in a healthy segment whose map page is resident moves at most
//! 16 KiB). A directory and six peers as real processes, a k=4 m=2 volume
//! of 1 MiB shards (the defaults) written through `meshdisk attach` and
//! detached, then attached again from a fresh folder (a cold block cache:
//! another machine) and read by `nbdsh` one block at a time at random
//! addresses. The bytes are the attach's own count of the UDP bytes its
//! QUIC connections sent and received (`traffic.json`, written on
//! SIGUSR1): QUIC headers, ACKs, proofs and the calls' framing included.
//!
//! Why the bound means something: a read that fetched its data shard whole
//! would move over 1 MiB, 64 times the bound; reads hedged to the other
//! shards (decoding from k = 4 of them) move about 5 × 4.6 KiB ≈ 23 KiB
//! each. A few such reads among the 256 would hide in the mean, so the
//! attach's own counters pin the blocks down too: exactly one 4 KiB block
//! fetched per read, nothing fetched ahead. And a 1 MiB read at the end
//! shows the count sees bulk transfers (it moves more than its blocks).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Proc};
use common::{Rng, have_tools, meshdisk_bin, nbdsh, pattern, run};

const VOLUME: &str = "disk";
const BLOCK: u64 = 4096;
/// The volume: one map page (2^16 blocks, 256 MiB) maps all of it.
const VOLUME_BYTES: u64 = 64 << 20;
/// Random reads measured.
const READS: usize = 256;
/// Issue 16's bound, in bytes per read.
const BOUND: u64 = 16 << 10;

/// The attach's counters that matter here, from its `traffic.json`.
#[derive(Clone, Copy, Debug)]
struct Traffic {
    requests: u64,
    fetched: u64,
    fetched_ahead: u64,
    network: u64,
}

impl Traffic {
    fn minus(self, o: Traffic) -> Traffic {
        Traffic {
            requests: self.requests - o.requests,
            fetched: self.fetched - o.fetched,
            fetched_ahead: self.fetched_ahead - o.fetched_ahead,
            network: self.network - o.network,
        }
    }
}

/// Asks the attach for its traffic (SIGUSR1) and reads the report it
/// writes to its state folder.
fn traffic(attach: &Proc, state: &Path) -> Traffic {
    let path = state.join("traffic.json");
    let _ = std::fs::remove_file(&path);
    attach.signal(libc::SIGUSR1);
    let start = Instant::now();
    let text = loop {
        if let Ok(t) = std::fs::read_to_string(&path) {
            break t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no traffic.json after SIGUSR1:\n{}",
            attach.output()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let field = |name: &str| v[name].as_u64().unwrap_or_else(|| panic!("no {name} in {text}"));
    Traffic {
        requests: field("requests"),
        fetched: field("fetched"),
        fetched_ahead: field("fetched_ahead"),
        network: field("network_sent") + field("network_received"),
    }
}

fn attach(c: &Cluster, state: &Path) -> (Proc, String) {
    let key = c.root.path().join(format!("{VOLUME}.key"));
    let mut cmd = Command::new(meshdisk_bin());
    cmd.args(["attach", VOLUME, "--credential"])
        .arg(c.admin_cred())
        .arg("--key-file")
        .arg(&key)
        .arg("--cache-dir")
        .arg(state)
        .args(["--cache-size", "64M"]);
    let mut proc = Proc::spawn("attach", &mut cmd);
    let uri = proc.wait_for("nbd+unix://", Duration::from_secs(60)).trim().to_owned();
    (proc, uri)
}

/// `meshdisk detach`; the attach must exit 0. Its output.
fn detach(c: &Cluster, mut a: Proc, state: &Path) -> String {
    let (ok, _, err) = c.cli(&["detach", VOLUME, "--cache-dir", state.to_str().unwrap()]);
    assert!(ok, "detach failed: {err}");
    let (status, out) = a.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "attach did not stop cleanly: {out}");
    out
}

/// Waits until the attach moves less than 2 KiB in a second (its opening
/// calls are over), for at most 30 s.
fn settle(a: &Proc, state: &Path) {
    let start = Instant::now();
    let mut last = traffic(a, state);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = traffic(a, state);
        if now.network - last.network < 2048 {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the attach never went quiet: {now:?}");
        last = now;
    }
}

/// `READS` distinct blocks, none next to another (nor to block 0, read to
/// load the map page), so no read continues another and read-ahead has
/// nothing to follow.
fn random_blocks() -> Vec<u64> {
    let blocks = VOLUME_BYTES / BLOCK;
    let mut rng = Rng(0x5eed_4b1d);
    let mut taken = std::collections::BTreeSet::from([0u64]);
    let mut out = Vec::with_capacity(READS);
    while out.len() < READS {
        let b = rng.below(blocks);
        let near = taken.range(b.saturating_sub(1)..=b + 1).next().is_some();
        if !near {
            taken.insert(b);
            out.push(b);
        }
    }
    out
}

#[test]
fn a_random_4k_read_with_its_map_page_resident_moves_at_most_16_kib() {
    if !have_tools(&["nbdsh", "nbdcopy"]) {
        return;
    }
    let mut c = Cluster::start("netread", &[]);
    for i in 0..6 {
        c.add_peer("2G", &format!("disk{i}"));
    }
    c.wait_all_up(6);
    let key = c.root.path().join(format!("{VOLUME}.key"));
    let cred = c.admin_cred();
    let (ok, _, err) = c.cli(&[
        "volume",
        "create",
        VOLUME,
        "--size",
        "64M",
        "--shard-size",
        "1M",
        "--key-file",
        key.to_str().unwrap(),
        "--credential",
        cred.to_str().unwrap(),
    ]);
    assert!(ok, "volume create failed: {err}");

    // Write the whole volume, commit it (the detach flushes), detach.
    let data = pattern(16, VOLUME_BYTES as usize);
    let image: PathBuf = c.root.path().join("image");
    std::fs::write(&image, &data).unwrap();
    let writer_state = c.root.path().join("writer");
    let (w, uri) = attach(&c, &writer_state);
    run(Command::new("nbdcopy").arg(&image).arg(&uri));
    detach(&c, w, &writer_state);

    // Another machine: a fresh folder, nothing cached.
    let state = c.root.path().join("reader");
    let (a, uri) = attach(&c, &state);
    // One read loads the map page; then wait for the opening to be over.
    let got = c.root.path().join("got");
    nbdsh(&uri, &format!("open({got:?}, 'wb').write(h.pread(4096, 0))"));
    assert!(std::fs::read(&got).unwrap() == data[..BLOCK as usize], "block 0 read back wrong");
    settle(&a, &state);

    let blocks = random_blocks();
    let offsets: Vec<String> = blocks.iter().map(|b| (b * BLOCK).to_string()).collect();
    let script = format!(
        "f = open({got:?}, 'wb')\nfor o in [{}]:\n    f.write(h.pread(4096, o))\nf.close()",
        offsets.join(",")
    );
    let mut expected = Vec::with_capacity(READS * BLOCK as usize);
    for &b in &blocks {
        expected.extend_from_slice(&data[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize]);
    }

    let before = traffic(&a, &state);
    let start = Instant::now();
    nbdsh(&uri, &script);
    let window = start.elapsed();
    let reads = traffic(&a, &state).minus(before);
    assert!(std::fs::read(&got).unwrap() == expected, "the random reads returned wrong data");

    // Nothing read for a while (at least 5 s: keep-alives go every 2 s):
    // what moves anyway, scaled to the reads' window. Printed, not
    // subtracted.
    let idle_for = window.max(Duration::from_secs(5));
    let before_idle = traffic(&a, &state);
    std::thread::sleep(idle_for);
    let idle = traffic(&a, &state).minus(before_idle);
    let idle_share = idle.network as f64 * window.as_secs_f64() / idle_for.as_secs_f64();

    let per_read = reads.network as f64 / READS as f64;
    eprintln!(
        "{READS} random 4 KiB reads in {:.2} s: {} network bytes, {per_read:.0} bytes ({:.2} KiB) per read \
         (bound {BOUND}); idle: {} bytes in {:.1} s, {idle_share:.0} in as long as the reads took",
        window.as_secs_f64(),
        reads.network,
        per_read / 1024.0,
        idle.network,
        idle_for.as_secs_f64(),
    );
    assert_eq!(reads.requests, READS as u64, "one request per read: {reads:?}");
    assert_eq!(reads.fetched_ahead, 0, "random single-block reads fetched ahead: {reads:?}");
    assert_eq!(reads.fetched, READS as u64 * BLOCK, "each read fetched exactly its block: {reads:?}");
    assert!(
        reads.network <= READS as u64 * BOUND,
        "{per_read:.0} network bytes per 4 KiB read, over the bound of {BOUND} ({reads:?})"
    );

    // The count is not blind to bulk: one 1 MiB read of blocks not cached
    // moves at least the blocks it fetched.
    let stretch = 8192..8192 + 256u64;
    let cached = blocks.iter().filter(|b| stretch.contains(b)).count() as u64;
    let before = traffic(&a, &state);
    nbdsh(&uri, &format!("open({got:?}, 'wb').write(h.pread({}, {}))", 256 * BLOCK, stretch.start * BLOCK));
    let bulk = traffic(&a, &state).minus(before);
    let want = &data[(stretch.start * BLOCK) as usize..(stretch.end * BLOCK) as usize];
    assert!(std::fs::read(&got).unwrap() == want, "the 1 MiB read returned wrong data");
    eprintln!("one 1 MiB read: {} network bytes, {} of blocks fetched", bulk.network, bulk.fetched);
    assert_eq!(bulk.fetched, (256 - cached) * BLOCK, "{bulk:?}");
    assert!(bulk.network > bulk.fetched, "the network count missed the blocks: {bulk:?}");

    // The attach's own summary at detach has the network bytes too.
    let out = detach(&c, a, &state);
    let line =
        out.lines().find(|l| l.contains("this attach:")).unwrap_or_else(|| panic!("no summary:\n{out}"));
    assert!(line.contains("network: ") && !line.contains("network: 0 bytes"), "{line}");
    eprintln!("{line}");
}
