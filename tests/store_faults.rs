//! Faults in the peer's shard store: a disk that fills up under it (a
//! write fails) poisons the store, and everything acknowledged before the
//! fault is still there after a restart. The small disk is a tmpfs mounted
//! for the test (needs root, as the filesystem tests do).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use meshdisk::codec::segment::{SegmentGeometry, SegmentId, SegmentShardHeader, ShardRoot};
use meshdisk::peer::store::{ShardStore, StoreError};
use meshdisk::sys::uring::Uring;

/// Shard 0 of segment `n` of volume `[9; 16]`: 4 blocks (16 KiB) of `fill`.
/// The store checks only that the payload hashes to the shard's own root.
fn shard(n: u64, fill: u8) -> Bytes {
    let payload = vec![fill; 16 * 1024];
    let header = SegmentShardHeader {
        volume_id: [9; 16],
        segment: SegmentId::new(1, n + 1).unwrap(),
        geometry: SegmentGeometry::new(4, 2, 4).unwrap(),
        index: 0,
        roots: vec![ShardRoot::of(&payload); 6],
    };
    let mut b = header.encode();
    b.extend_from_slice(&payload);
    Bytes::from(b)
}

/// A tmpfs of `size` at `dir`, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(Self(dir.to_owned()));
        }
        let msg = "cannot mount a tmpfs (the shard-store fault test needs root)";
        if common::require_e2e() {
            panic!("{msg} (MESHDISK_REQUIRE_E2E=1)");
        }
        eprintln!("SKIP: {msg}");
        None
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A store in `data` whose data files live on a 64 KiB disk (the index
/// stays on the big one); `None` where the disk cannot be mounted.
fn store_on_a_small_disk(data: &Path) -> Option<(SmallDisk, Uring, ShardStore)> {
    let disk = SmallDisk::mount(&data.join("data"), "64k")?;
    let ring = Uring::new(64).unwrap();
    let store = ShardStore::open(&ring, data, 1 << 30).unwrap();
    Some((disk, ring, store))
}

#[tokio::test]
async fn a_full_disk_poisons_the_store_and_loses_nothing_acknowledged() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("store");
    let Some((_disk, ring, store)) = store_on_a_small_disk(&data) else { return };
    let mut acked = Vec::new();
    let mut failure = None;
    for stripe in 0..16 {
        let s = shard(stripe, stripe as u8);
        match store.put(s.clone(), 1).await {
            Ok(key) => acked.push((key, s)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("a 64 KiB disk cannot hold 16 shards of 16 KiB");
    assert!(matches!(failure, StoreError::Io { .. }), "{failure}");
    assert!(!acked.is_empty(), "some shards fit before the disk filled");
    // Poisoned: nothing more is served or accepted, and the error says why.
    let err = store.get(&acked[0].0).await.unwrap_err();
    assert!(matches!(err, StoreError::Poisoned { .. }), "{err}");
    assert!(err.to_string().contains("No space left"), "{err}");
    assert!(matches!(store.put(shard(99, 0), 1).await, Err(StoreError::Poisoned { .. })));
    drop(store);

    // A restart (on the same, still full disk) serves every acknowledged shard.
    let store = ShardStore::open(&ring, &data, 1 << 30).unwrap();
    for (key, bytes) in &acked {
        assert_eq!(&store.get(key).await.unwrap(), bytes);
    }
    assert_eq!(store.list(&[9; 16], None, usize::MAX).unwrap().len(), acked.len());
}

/// A put whose caller gave up once it was queued (a client that timed
/// out): the group committer writes its shard, and when that write fails
/// the store is poisoned all the same, with nobody left to hear of it.
/// The first failed write must stop the store before any later batch is
/// written, synced and acknowledged.
#[tokio::test]
async fn a_failed_write_poisons_the_store_when_its_put_was_dropped() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("store");
    let Some((_disk, _ring, store)) = store_on_a_small_disk(&data) else { return };
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    for stripe in 0..16 {
        // One poll takes the put as far as the commit queue (its shard,
        // small, is the committer's to write); then the caller gives up.
        // Once a write has failed, a put is refused at once instead.
        let mut put = std::pin::pin!(store.put(shard(stripe, stripe as u8), 1));
        match put.as_mut().poll(&mut cx) {
            std::task::Poll::Pending | std::task::Poll::Ready(Err(StoreError::Poisoned { .. })) => {}
            std::task::Poll::Ready(other) => panic!("a put waits for its group commit: {other:?}"),
        }
    }
    // A 64 KiB disk cannot hold 16 shards of 16 KiB: one of those writes
    // failed, and the store says so from then on.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match store.used() {
            Err(StoreError::Poisoned { first, .. }) => {
                assert!(first.contains("No space left"), "{first}");
                break;
            }
            Err(e) => panic!("{e}"),
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Ok(used) => {
                panic!("a write failed (the disk is full) yet the store is not poisoned: {used} bytes used")
            }
        }
    }
    assert!(matches!(store.put(shard(99, 0), 1).await, Err(StoreError::Poisoned { .. })));
}
