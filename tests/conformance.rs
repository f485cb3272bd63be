//! One conformance suite, run against every backend: whatever sits behind
//! the NBD server must behave like a disk. A seeded random sequence of
//! operations runs against the backend and a plain byte-array model at
//! once; every read must match the model, every hole must read as zeroes.

use std::sync::Arc;

use bytes::Bytes;
use meshdisk::backend::file::FileBackend;
use meshdisk::backend::memory::MemoryBackend;
use meshdisk::backend::{Backend, ReadPiece, ZeroFlags};
use meshdisk::sys::uring::Uring;

use common::Rng;

const SIZE: u64 = 8 << 20;

/// The model: the bytes we expect, and which of them are defined (a TRIM
/// leaves its range undefined until it is written again).
struct Model {
    data: Vec<u8>,
    defined: Vec<bool>,
}

fn random_range(rng: &mut Rng, size: u64) -> (u64, u32) {
    // Mostly small and unaligned, sometimes large and aligned, often
    // crossing the backends' internal chunk boundaries.
    let len = match rng.below(4) {
        0 => rng.below(100) + 1,
        1 => rng.below(70_000) + 1,
        2 => 4096 * (rng.below(64) + 1),
        _ => 1 << 20,
    };
    let offset = match rng.below(3) {
        0 => rng.below(size - len),
        _ => (rng.below(size - len) / 4096) * 4096,
    };
    (offset, len as u32)
}

/// Reads `offset..offset + len` of the disk, which the model holds from
/// `at` on.
async fn check_read<B: Backend>(b: &B, m: &Model, offset: u64, at: u64, len: u32) {
    let data = b.read(offset, len).await.expect("read");
    assert_eq!(data.len(), len as usize, "read length at {offset}+{len}");
    let got = data.to_vec();
    for (i, (&g, (&want, &defined))) in
        got.iter().zip(m.data[at as usize..].iter().zip(&m.defined[at as usize..])).enumerate()
    {
        if defined && g != want {
            panic!("byte {} differs: got {g:#x}, want {want:#x} (read {offset}+{len})", offset + i as u64);
        }
    }
    for piece in &data.pieces {
        if let ReadPiece::Data(d) = piece {
            assert!(!d.is_empty(), "empty data piece");
        }
    }
}

/// A seeded random sequence against one model, which may be carried from
/// one backend to another (a volume detached here and attached there).
/// The model is the disk, or windows of it: `span` bytes at each of
/// `windows` (a large disk written in a few places), each operation inside
/// one window.
struct Run {
    m: Model,
    rng: Rng,
    seed: u64,
    step: usize,
    size: u64,
    windows: Vec<u64>,
    span: u64,
}

impl Run {
    fn new(seed: u64) -> Self {
        Self::windowed(seed, SIZE, vec![0], SIZE)
    }

    fn windowed(seed: u64, size: u64, windows: Vec<u64>, span: u64) -> Self {
        assert!(windows.iter().all(|w| w + span <= size));
        let model = (span * windows.len() as u64) as usize;
        Self {
            m: Model { data: vec![0; model], defined: vec![true; model] },
            rng: Rng(seed | 1),
            seed,
            step: 0,
            size,
            windows,
            span,
        }
    }

    async fn steps<B: Backend>(&mut self, b: &B, ops: usize) {
        assert_eq!(b.size(), self.size);
        let (m, rng, seed) = (&mut self.m, &mut self.rng, self.seed);
        for _ in 0..ops {
            let step = self.step;
            self.step += 1;
            let (at, len) = random_range(rng, self.span);
            let w = if self.windows.len() > 1 { rng.below(self.windows.len() as u64) as usize } else { 0 };
            let offset = self.windows[w] + at;
            let at = w as u64 * self.span + at;
            let (o, l) = (at as usize, len as usize);
            match rng.below(10) {
                0..=3 => {
                    let data: Vec<u8> = (0..len).map(|i| (seed as u8) ^ (step as u8) ^ (i as u8)).collect();
                    b.write(offset, Bytes::from(data.clone()), rng.below(4) == 0).await.expect("write");
                    m.data[o..o + l].copy_from_slice(&data);
                    m.defined[o..o + l].fill(true);
                }
                4..=6 => check_read(b, m, offset, at, len).await,
                7 => {
                    b.trim(offset, len, false).await.expect("trim");
                    m.defined[o..o + l].fill(false);
                }
                8 => {
                    let flags = ZeroFlags { fua: false, may_trim: rng.below(2) == 0, fast: false };
                    b.write_zeroes(offset, len, flags).await.expect("write zeroes");
                    m.data[o..o + l].fill(0);
                    m.defined[o..o + l].fill(true);
                }
                _ => {
                    let extents = b.block_status(offset, len).await.expect("block status");
                    assert!(!extents.is_empty(), "at least one extent");
                    let mut pos = offset;
                    for e in &extents {
                        assert!(e.length > 0);
                        if e.zero {
                            let n = e.length.min(offset + u64::from(len) - pos) as u32;
                            let got = b.read(pos, n).await.unwrap().to_vec();
                            assert!(got.iter().all(|&x| x == 0), "extent at {pos} claims zeroes");
                        }
                        pos += e.length;
                    }
                    b.flush().await.expect("flush");
                }
            }
        }
    }

    /// Every byte of the disk against the model.
    async fn check_all<B: Backend>(&self, b: &B) {
        for (w, &start) in self.windows.iter().enumerate() {
            for off in (0..self.span).step_by(1 << 20) {
                let len = (self.span - off).min(1 << 20) as u32;
                check_read(b, &self.m, start + off, w as u64 * self.span + off, len).await;
            }
        }
    }
}

async fn model_run<B: Backend>(b: Arc<B>, seed: u64, ops: usize) {
    let mut run = Run::new(seed);
    run.steps(&*b, ops).await;
    run.check_all(&*b).await;
}

async fn concurrent_writers<B: Backend>(b: Arc<B>) {
    // 32 tasks write interleaved 4 KiB blocks at once; none may lose another's.
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..32u64 {
                let off = (i * 32 + t) * 4096;
                b.write(off, Bytes::from(vec![t as u8 + 1; 4096]), false).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    b.flush().await.unwrap();
    let all = b.read(0, 32 * 32 * 4096).await.unwrap().to_vec();
    for (block, chunk) in all.chunks(4096).enumerate() {
        let want = (block as u64 % 32) as u8 + 1;
        assert!(chunk.iter().all(|&x| x == want), "block {block}");
    }
}

async fn edges<B: Backend>(b: Arc<B>) {
    // Zero-length calls do nothing; the last byte is reachable.
    b.write(SIZE, Bytes::new(), false).await.unwrap();
    assert!(b.read(SIZE, 0).await.unwrap().is_empty());
    b.trim(SIZE, 0, false).await.unwrap();
    b.write(SIZE - 1, Bytes::from_static(b"z"), true).await.unwrap();
    assert_eq!(b.read(SIZE - 1, 1).await.unwrap().to_vec(), b"z");
    // A fresh disk reads as zeroes and says so.
    let ext = b.block_status(0, 1 << 20).await.unwrap();
    assert!(ext.iter().map(|e| e.length).sum::<u64>() <= 1 << 20);
    // FAST_ZERO either zeroes or refuses, never half-does.
    b.write(0, Bytes::from(vec![7; 8192]), false).await.unwrap();
    match b.write_zeroes(0, 8192, ZeroFlags { fast: true, ..Default::default() }).await {
        Ok(()) => assert_eq!(b.read(0, 8192).await.unwrap().to_vec(), vec![0; 8192]),
        Err(_) => assert_eq!(b.read(0, 8192).await.unwrap().to_vec(), vec![7; 8192]),
    }
    assert!(b.features().flush && b.features().multi_conn);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn file_backend(dir: &tempfile::TempDir) -> Arc<FileBackend> {
    let ring = Uring::new(64).unwrap();
    Arc::new(FileBackend::open(&ring, &dir.path().join("disk.img"), Some(SIZE), false).unwrap())
}

#[test]
fn memory_backend_conforms() {
    let rt = runtime();
    for seed in [1, 2, 3] {
        rt.block_on(model_run(Arc::new(MemoryBackend::new(SIZE)), seed, 600));
    }
    rt.block_on(concurrent_writers(Arc::new(MemoryBackend::new(SIZE))));
    rt.block_on(edges(Arc::new(MemoryBackend::new(SIZE))));
}

#[test]
fn file_backend_conforms() {
    let rt = runtime();
    for seed in [1, 2, 3] {
        let dir = tempfile::tempdir().unwrap();
        rt.block_on(async { model_run(file_backend(&dir), seed, 600).await });
    }
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async { concurrent_writers(file_backend(&dir)).await });
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async { edges(file_backend(&dir)).await });
}

#[test]
fn file_backend_refuses_bad_opens() {
    let ring = Uring::new(8).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.img");
    let err = FileBackend::open(&ring, &missing, None, false).err().expect("missing file without size");
    assert!(err.to_string().contains("nope.img"), "{err}");
    std::fs::write(&missing, b"").unwrap();
    let err = FileBackend::open(&ring, &missing, None, false).err().expect("empty file");
    assert!(err.to_string().contains("give a size"), "{err}");
    let ro = FileBackend::open(&ring, &missing, Some(4096), true).err().expect("read-only cannot grow");
    assert!(ro.to_string().contains("less than"), "{ro}");
}

mod common;

/// The log-structured volume on a real directory and six real peers,
/// through its own folder A, then detached and attached from folder B
/// (another machine), then from A again: the model carries over, every
/// read matches it, and A's older copies are never served.
#[test]
fn the_log_structured_volume_conforms_across_machines() {
    use meshdisk::volume::v2::{Config, Volume};
    let mut c = common::cluster::Cluster::start("conform", &[]);
    for i in 0..6 {
        c.add_peer("1G", &format!("d{i}"));
    }
    c.wait_all_up(6);
    c.create_volume("disk", "8M", 4, 2);
    let key_file = c.root.path().join("disk.key");
    let key = runtime().block_on(async { common::cluster::data_key(&c.client(), "disk", &key_file).await });
    let config = |folder: &str| {
        let mut config = Config::new(c.root.path().join(folder), 1 << 20);
        config.log_size = 16 << 20;
        config.io_timeout = std::time::Duration::from_secs(20);
        // The conformance of reads and writes, in-process (unoptimized):
        // compaction has its own tests with the release binary
        // (tests/compaction.rs, tests/snapshots.rs, tests/model.rs); here it
        // made this run 230 s instead of 26 (left for the next issue).
        config.compact_above = 100.0;
        config
    };
    let rt = runtime();
    rt.block_on(async {
        let mut run = Run::new(7);
        for (folder, ops) in [("a", 300), ("b", 300), ("a", 300)] {
            let v = Volume::open(c.client(), "disk", &key, config(folder)).await.unwrap();
            run.check_all(&v).await;
            run.steps(&v, ops).await;
            run.check_all(&v).await;
            v.close(std::time::Duration::from_secs(30)).await.unwrap();
        }
        let v = Arc::new(Volume::open(c.client(), "disk", &key, config("c")).await.unwrap());
        run.check_all(&*v).await;
        concurrent_writers(v.clone()).await;
        edges(v.clone()).await;
        Arc::try_unwrap(v).ok().expect("one owner").close(std::time::Duration::from_secs(30)).await.unwrap();
    });
}

/// The same across machines on a volume larger than one map page with map
/// checkpoints written every few segments and a map cache of one page:
/// writes scattered over three pages (one window straddles a page
/// boundary), so checkpoints rewrite pages fetched back from peers, reads
/// evict and fetch pages again, and each attach loads the map through the
/// last checkpoint. Every read matches the model. A second volume of
/// two-block shards (segments of 8 blocks, 6 of them free for metadata)
/// has checkpoints far larger than a segment: indexes continued over
/// several segments, heads in segments of their own, pages in segments
/// as large as they need.
#[test]
fn the_log_structured_volume_checkpoints_and_pages_its_map() {
    let mut c = common::cluster::Cluster::start("ckpt", &[]);
    for i in 0..6 {
        c.add_peer("2G", &format!("d{i}"));
    }
    c.wait_all_up(6);
    c.create_volume("big", "600M", 4, 2);
    let rt = runtime();
    rt.block_on(checkpointed_runs(&c, "big", 11, 2 << 20, &[("a", 300), ("b", 300), ("a", 200), ("c", 0)]));
    let key = c.root.path().join("small.key");
    let cred = c.admin_cred();
    let (ok, _, err) = c.cli(&[
        "volume",
        "create",
        "small",
        "--size",
        "600M",
        "--k",
        "4",
        "--m",
        "2",
        "--shard-size",
        "8K",
        "--key-file",
        key.to_str().unwrap(),
        "--credential",
        cred.to_str().unwrap(),
    ]);
    assert!(ok, "volume create failed: {err}");
    rt.block_on(checkpointed_runs(&c, "small", 12, 8 << 20, &[("s1", 150), ("s2", 150), ("s3", 0)]));
}

/// Runs the model over volume `name` (600 MiB) from each folder in turn,
/// checkpointing every 3 segments with a one-page map cache; checks every
/// byte at each attach and detach, and that checkpoints were written.
async fn checkpointed_runs(
    c: &common::cluster::Cluster,
    name: &str,
    seed: u64,
    span: u64,
    rounds: &[(&str, usize)],
) {
    use meshdisk::volume::v2::root::{RootKey, RootRecord};
    use meshdisk::volume::v2::{Config, Volume};
    const MIB: u64 = 1 << 20;
    let key = common::cluster::data_key(&c.client(), name, &c.root.path().join(format!("{name}.key"))).await;
    let config = |folder: &str| {
        let mut config = Config::new(c.root.path().join(folder), 1 << 20);
        config.log_size = 16 << 20;
        config.io_timeout = std::time::Duration::from_secs(20);
        config.checkpoint_segments = 3;
        config.map_cache = 1;
        // This test is about checkpoints and paging, with an in-process
        // (unoptimized) volume; compaction has its own tests
        // (tests/compaction.rs, tests/snapshots.rs, tests/model.rs). With a
        // one-page map cache and a checkpoint every 3 segments it took this
        // test past its 300 s limit (every round settles and looks up
        // across pages the cache cannot hold): off here, written down as
        // left for the next issue.
        config.compact_above = 100.0;
        config
    };
    let windows = vec![0, 256 * MIB - span / 2, 300 * MIB, 600 * MIB - span];
    let mut run = Run::windowed(seed, 600 * MIB, windows, span);
    let client = c.client();
    let root_key = RootKey::derive(&key);
    let mut checkpoints = std::collections::BTreeSet::new();
    for &(folder, ops) in rounds {
        let v = Volume::open(c.client(), name, &key, config(folder)).await.unwrap();
        run.check_all(&v).await;
        for _ in 0..ops.div_ceil(25) {
            run.steps(&v, 25).await;
            let sealed = client.root(name).await.unwrap().expect("a root").sealed;
            let root = RootRecord::open(&sealed, &root_key, &v.record().spec.id).unwrap();
            if let Some(at) = root.checkpoint {
                checkpoints.insert(at.segment.id);
                // The head's segment is the last of the commit that wrote
                // it, whose segments the checkpoint does not include.
                assert!(root.since.iter().any(|s| s.id == at.segment.id), "{root:?}");
            }
        }
        run.check_all(&v).await;
        v.close(std::time::Duration::from_secs(30)).await.unwrap();
    }
    assert!(checkpoints.len() >= 3, "volume {name}: only {} checkpoints seen", checkpoints.len());
}
