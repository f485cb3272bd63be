//! The shard store's tests: put, get, prove, list, delete, restarts,
//! fencing, capacity, rot on disk.

use super::*;
use crate::codec::segment::{BLOCK_SIZE, SegmentShardHeader, ShardRoot, parse_segment_shard};

/// Shard `index` of segment `segment` (k = 4, m = 2) of volume
/// `[volume; 16]`: `blocks` blocks of `fill`. The store checks only that
/// the payload hashes to the shard's own root, so the other roots are
/// copies of it.
fn shard(volume: u8, segment: u64, index: u8, fill: u8, blocks: u32) -> Bytes {
    let payload = vec![fill; blocks as usize * BLOCK_SIZE];
    let header = SegmentShardHeader {
        volume_id: [volume; 16],
        segment: SegmentId::from_raw(segment),
        geometry: SegmentGeometry::new(4, 2, blocks).unwrap(),
        index,
        roots: vec![ShardRoot::of(&payload); 6],
    };
    let mut b = header.encode();
    b.extend_from_slice(&payload);
    Bytes::from(b)
}

fn key(volume: u8, segment: u64, index: u8) -> SegmentShardKey {
    SegmentShardKey { volume: [volume; 16], segment: SegmentId::from_raw(segment), index }
}

/// Every shard of `volume` in the store.
fn list(store: &ShardStore, volume: u8) -> Vec<SegmentShardKey> {
    store.list(&[volume; 16], None, usize::MAX).unwrap()
}

fn open(ring: &Uring, dir: &Path, capacity: u64) -> ShardStore {
    ShardStore::open_with_data_file_limit(ring, dir, capacity, 4096).unwrap()
}

#[tokio::test]
async fn put_get_list_delete_and_space_accounting() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(&ring, dir.path(), 1 << 20);
    let a = shard(1, 7, 0, 0xaa, 4);
    let b = shard(1, 7, 1, 0xbb, 4);
    let other = shard(2, 0, 0, 0xcc, 1);
    let ka = store.put(a.clone(), 1).await.unwrap();
    let kb = store.put(b.clone(), 1).await.unwrap();
    store.put(other.clone(), 1).await.unwrap();
    assert_eq!(store.get(&ka).await.unwrap(), a);
    assert_eq!(store.get(&kb).await.unwrap(), b);
    assert_eq!(list(&store, 1), vec![ka, kb]);
    assert_eq!(store.used().unwrap(), (a.len() + b.len() + other.len()) as u64);
    // Writing the same shard again replaces it: space is not counted
    // twice, and the old copy's bytes are punched out of its data file.
    let before = store.locate(&ka).unwrap().unwrap();
    store.put(a.clone(), 1).await.unwrap();
    assert_eq!(store.used().unwrap(), (a.len() + b.len() + other.len()) as u64);
    let after = store.locate(&ka).unwrap().unwrap();
    assert_ne!(before, after);
    let file = std::fs::read(data_file_path(dir.path(), before.data_file)).unwrap();
    let old = &file[before.offset as usize..][..before.len as usize];
    assert!(old.iter().all(|&x| x == 0), "the replaced copy was not punched");
    assert!(store.delete(&ka, 1).await.unwrap());
    assert!(!store.delete(&ka, 1).await.unwrap());
    assert!(matches!(store.get(&ka).await, Err(StoreError::NotFound(_))));
    assert_eq!(store.used().unwrap(), (b.len() + other.len()) as u64);
    assert_eq!(list(&store, 1), vec![kb]);
}

/// Ten shards put into a store in `dir` (then closed): with 4096-byte
/// data files and shards longer than that, ten data files.
async fn ten_shards_in(ring: &Uring, dir: &Path) -> Vec<(SegmentShardKey, Bytes)> {
    let store = open(ring, dir, 1 << 20);
    let mut kept = Vec::new();
    for i in 0..10u8 {
        let s = shard(3, u64::from(i), 0, i, 1);
        kept.push((store.put(s.clone(), 1).await.unwrap(), s));
    }
    kept
}

#[tokio::test]
async fn everything_survives_a_restart_across_data_files() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kept = ten_shards_in(&ring, dir.path()).await;
    let files = std::fs::read_dir(dir.path().join("data")).unwrap().count();
    assert!(files >= 3, "{files} data files");
    let store = open(&ring, dir.path(), 1 << 20);
    for (key, bytes) in &kept {
        assert_eq!(&store.get(key).await.unwrap(), bytes);
    }
    assert_eq!(store.used().unwrap(), kept.iter().map(|(_, b)| b.len() as u64).sum::<u64>());
    // New writes go on after the last data file's end.
    let more = shard(3, 99, 0, 9, 2);
    let k = store.put(more.clone(), 1).await.unwrap();
    assert_eq!(store.get(&k).await.unwrap(), more);
    assert_eq!(store.get(&kept[0].0).await.unwrap(), kept[0].1);
}

#[tokio::test]
async fn a_delete_fences_older_writers_of_the_volume() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(&ring, dir.path(), 1 << 20);
    let a = shard(4, 0, 0, 1, 4);
    let stored = store.put(a.clone(), 3).await.unwrap();
    // The collector erases at the largest epoch; nothing older writes
    // the volume again, and deleting what is gone is no error.
    assert!(store.delete(&stored, u64::MAX).await.unwrap());
    assert!(!store.delete(&stored, u64::MAX).await.unwrap());
    assert!(matches!(store.put(a.clone(), 3).await, Err(StoreError::Fenced { got: 3, newest: u64::MAX })));
    // Even a delete of a shard that was never stored raises the epoch.
    let other = key(8, 0, 0);
    assert!(!store.delete(&other, 5).await.unwrap());
    assert!(matches!(store.put(shard(8, 0, 0, 1, 4), 4).await, Err(StoreError::Fenced { .. })));
    assert_eq!(store.used().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_share_commits_and_respect_capacity() {
    // Several rounds: a put admitted while a batch's index commit is being
    // booked must not see that batch counted twice (a spurious Full).
    for _ in 0..10 {
        concurrent_puts_round().await;
    }
}

async fn concurrent_puts_round() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let one = shard(1, 0, 0, 0, 16).len() as u64;
    // Room for exactly 40 of the 64 shards put at once.
    let store = ShardStore::open_with_data_file_limit(&ring, dir.path(), 40 * one, 8 * one).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64u64 {
        let store = store.clone();
        tasks.spawn(async move { store.put(shard(1, i, 0, i as u8, 16), 1).await });
    }
    let results = tasks.join_all().await;
    let stored: Vec<SegmentShardKey> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    assert_eq!(stored.len(), 40, "{results:?}");
    assert!(results.iter().filter_map(|r| r.as_ref().err()).all(|e| matches!(e, StoreError::Full { .. })));
    assert_eq!(store.used().unwrap(), 40 * one);
    drop(store);
    let store = ShardStore::open_with_data_file_limit(&ring, dir.path(), 40 * one, 8 * one).unwrap();
    for key in &stored {
        let got = store.get(key).await.unwrap();
        let n = key.segment.raw();
        assert_eq!(got, shard(1, n, 0, n as u8, 16));
    }
    assert_eq!(list(&store, 1), {
        let mut s = stored.clone();
        s.sort();
        s
    });
}

/// Small shards (written by the committer) and big ones (written by their
/// put through the ring) put at once, across data files, land byte for
/// byte, are counted once and are all there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_and_big_shards_put_at_once_land_across_data_files() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // 1 to 17 blocks: both sides of COMMITTER_WRITES_BYTES (16 blocks and a header).
    let blocks = |i: u64| (i % 17) as u32 + 1;
    assert!(shard(1, 0, 0, 0, 15).len() <= COMMITTER_WRITES_BYTES);
    assert!(shard(1, 0, 0, 0, 16).len() > COMMITTER_WRITES_BYTES);
    let store = ShardStore::open_with_data_file_limit(&ring, dir.path(), 1 << 30, 256 << 10).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..96u64 {
        let store = store.clone();
        tasks.spawn(async move {
            let s = shard(2, i, (i % 6) as u8, i as u8, blocks(i));
            (store.put(s.clone(), 1).await.unwrap(), s)
        });
    }
    let kept = tasks.join_all().await;
    let total: u64 = kept.iter().map(|(_, s)| s.len() as u64).sum();
    assert_eq!(store.used().unwrap(), total);
    for (key, s) in &kept {
        assert_eq!(&store.get(key).await.unwrap(), s);
    }
    let files = std::fs::read_dir(dir.path().join("data")).unwrap().count();
    assert!(files >= 4, "{files} data files");
    drop(store);
    let store = ShardStore::open_with_data_file_limit(&ring, dir.path(), 1 << 30, 256 << 10).unwrap();
    assert_eq!(store.used().unwrap(), total);
    for (key, s) in &kept {
        assert_eq!(&store.get(key).await.unwrap(), s);
    }
    assert_eq!(list(&store, 2).len(), kept.len());
}

/// A process that died with small shards queued (their ranges claimed,
/// their bytes never written by the committer) leaves holes: one between
/// acknowledged shards, one past the last. After the restart the tail is
/// the data file's length, so the next put reuses the range past the last
/// shard written, and every acknowledged shard is intact and counted once.
#[tokio::test]
async fn ranges_claimed_but_never_written_before_a_crash_are_harmless() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = ShardStore::open_with_data_file_limit(&ring, dir.path(), 1 << 30, 1 << 30).unwrap();
    let a = shard(4, 1, 0, 0xa1, 2);
    let ka = store.put(a.clone(), 1).await.unwrap();
    // Claimed as a queued small put does, then never written.
    store.inner.tail.lock().await.end += 20_000;
    let b = shard(4, 2, 0, 0xb2, 3);
    let kb = store.put(b.clone(), 1).await.unwrap();
    let b_at = store.locate(&kb).unwrap().unwrap();
    assert_eq!(b_at.offset, a.len() as u64 + 20_000);
    store.inner.tail.lock().await.end += 20_000;
    drop(store);

    let store = ShardStore::open_with_data_file_limit(&ring, dir.path(), 1 << 30, 1 << 30).unwrap();
    let c = shard(4, 3, 0, 0xc3, 1);
    let kc = store.put(c.clone(), 1).await.unwrap();
    let c_at = store.locate(&kc).unwrap().unwrap();
    assert_eq!(c_at.data_file, b_at.data_file);
    assert_eq!(c_at.offset, b_at.offset + u64::from(b_at.len), "the tail is the data file's length");
    for (k, s) in [(&ka, &a), (&kb, &b), (&kc, &c)] {
        assert_eq!(&store.get(k).await.unwrap(), s);
    }
    assert_eq!(store.used().unwrap(), (a.len() + b.len() + c.len()) as u64);
    assert_eq!(list(&store, 4), vec![ka, kb, kc]);
}

#[tokio::test]
async fn full_stores_and_older_epochs_are_refused_clearly() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let one = shard(4, 0, 0, 1, 4).len() as u64;
    let store = open(&ring, dir.path(), 2 * one);
    store.put(shard(4, 0, 0, 1, 4), 5).await.unwrap();
    store.put(shard(4, 1, 0, 1, 4), 5).await.unwrap();
    let err = store.put(shard(4, 2, 0, 1, 4), 5).await.unwrap_err();
    assert!(matches!(err, StoreError::Full { need, .. } if need == one), "{err}");
    assert!(err.to_string().contains("store is full"), "{err}");
    store.delete(&key(4, 0, 0), 5).await.unwrap();
    // Epoch 5 was seen for volume 4: 4 is fenced, 5 and 6 are fine, then 5 is fenced.
    let err = store.put(shard(4, 2, 0, 1, 4), 4).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { got: 4, newest: 5 }), "{err}");
    assert!(err.to_string().contains("took the volume over"), "{err}");
    store.put(shard(4, 2, 0, 1, 4), 6).await.unwrap();
    // A fenced writer cannot delete either.
    let k2 = key(4, 2, 0);
    assert!(matches!(store.delete(&k2, 5).await, Err(StoreError::Fenced { got: 5, newest: 6 })));
    store.delete(&k2, 6).await.unwrap();
    assert!(matches!(
        store.put(shard(4, 2, 0, 1, 4), 5).await,
        Err(StoreError::Fenced { got: 5, newest: 6 })
    ));
    // Another volume has its own epochs.
    store.put(shard(5, 0, 0, 1, 4), 1).await.unwrap();
}

use crate::codec::segment::{EncodedSegment, SegmentGeometry, SegmentId, encode_segment, verify_blocks};

/// A segment of volume `[volume; 16]`, k data and m parity shards of
/// `n` blocks each, its data area a pattern from `seed`.
fn segment(volume: u8, id: u64, (k, m, n): (usize, usize, u32), seed: u64) -> EncodedSegment {
    let g = SegmentGeometry::new(k, m, n).unwrap();
    let data = crate::codec::bench::pattern(g.data_area_len(), seed);
    encode_segment(g, &[volume; 16], SegmentId::from_raw(id), &data).unwrap()
}

fn key_of(shard: &[u8]) -> SegmentShardKey {
    SegmentShardKey::of(&parse_segment_shard(shard).unwrap().0)
}

/// Checks blocks `first..first+count` of a stored shard against the
/// shard the test put there, through its proof.
async fn blocks_match(store: &ShardStore, shard: &[u8], first: u32, count: u32) {
    let (header, payload) = parse_segment_shard(shard).unwrap();
    let n = header.geometry.blocks_per_shard();
    let proof = store.get_blocks(&key_of(shard), first, count).await.unwrap();
    let got = verify_blocks(&header.own_root(), n, first..first + count, &proof).unwrap();
    let range = first as usize * BLOCK_SIZE..(first + count) as usize * BLOCK_SIZE;
    assert_eq!(got, &payload[range], "blocks {first}+{count}");
}

#[tokio::test]
async fn a_whole_segment_is_put_got_proved_listed_and_survives_a_restart() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(&ring, dir.path(), 1 << 20);
    let seg = segment(1, 42, (3, 2, 9), 7);
    let mut keys = Vec::new();
    for s in &seg.shards {
        keys.push(store.put(Bytes::from(s.clone()), 1).await.unwrap());
    }
    assert_eq!(keys, seg.shards.iter().map(|s| key_of(s)).collect::<Vec<_>>());
    let all = seg.shards.iter().map(Vec::len).sum::<usize>();
    assert_eq!(store.used().unwrap(), all as u64);
    // Listing pages in key order: by segment, then index.
    assert_eq!(list(&store, 1), keys);
    assert_eq!(store.list(&[1; 16], None, 2).unwrap(), keys[..2]);
    assert_eq!(store.list(&[1; 16], Some(keys[1]), 2).unwrap(), keys[2..4]);
    assert_eq!(store.list(&[1; 16], Some(keys[4]), 2).unwrap(), []);
    assert_eq!(list(&store, 2), []);
    let mut store = store;
    for reopen in [false, true] {
        if reopen {
            drop(store);
            store = open(&ring, dir.path(), 1 << 20);
        }
        for s in &seg.shards {
            let got = store.get(&key_of(s)).await.unwrap();
            assert_eq!(&got[..], &s[..]);
            crate::codec::segment::verify_shard(&got, &seg.root).unwrap();
            for (first, count) in [(0, 1), (3, 1), (8, 1), (0, 9), (2, 5), (7, 2)] {
                blocks_match(&store, s, first, count).await;
            }
        }
        assert_eq!(store.used().unwrap(), all as u64, "reopened: {reopen}");
    }
    // Ranges outside the shard are refused, not clipped.
    for (first, count) in [(0, 0), (9, 1), (8, 2), (u32::MAX, 2)] {
        let err = store.get_blocks(&keys[0], first, count).await.unwrap_err();
        assert!(matches!(err, StoreError::BlockRange { blocks: 9, .. }), "{first}+{count}: {err}");
    }
    // Putting a shard again replaces it (space counted once), a delete
    // frees it, and what is gone is not found.
    store.put(Bytes::from(seg.shards[1].clone()), 1).await.unwrap();
    assert_eq!(store.used().unwrap(), all as u64);
    assert!(store.delete(&keys[1], 1).await.unwrap());
    assert!(!store.delete(&keys[1], 1).await.unwrap());
    assert_eq!(store.used().unwrap(), (all - seg.shards[1].len()) as u64);
    assert!(matches!(store.get(&keys[1]).await, Err(StoreError::NotFound(_))));
    assert!(matches!(store.get_blocks(&keys[1], 0, 1).await, Err(StoreError::NotFound(_))));
    assert!(matches!(store.get_header(&keys[1]).await, Err(StoreError::NotFound(_))));
    assert_eq!(list(&store, 1), [keys[0], keys[2], keys[3], keys[4]]);
    blocks_match(&store, &seg.shards[2], 4, 3).await;
}

#[tokio::test]
async fn a_segment_shard_rotten_on_disk_is_never_served() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(&ring, dir.path(), 1 << 20);
    let seg = segment(2, 1, (2, 1, 8), 3);
    let shard = &seg.shards[0];
    let key = store.put(Bytes::from(shard.clone()), 1).await.unwrap();
    // Flip one byte of block 5 in the data file behind the store's back.
    let entry = store.entry(&key).unwrap().unwrap();
    let file = data_file_path(dir.path(), entry.loc.data_file);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = entry.payload_offset().unwrap() as usize + 5 * BLOCK_SIZE + 100;
    bytes[at] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    for (first, count) in [(5, 1), (4, 2), (0, 8)] {
        let err = store.get_blocks(&key, first, count).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { source: SegmentError::OutboardMismatch, .. }),
            "{first}+{count}: {err}"
        );
    }
    let err = store.get(&key).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("corrupt"), "{err}");
    // Blocks that are not rotten still prove: a block read reads only
    // its blocks (scrubbing finds the rest).
    blocks_match(&store, shard, 0, 5).await;
    blocks_match(&store, shard, 6, 2).await;
}

#[tokio::test]
async fn shards_are_checked_fenced_and_counted() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seg = segment(3, 9, (2, 1, 2), 5);
    let one = seg.shards[0].len() as u64;
    let store = open(&ring, dir.path(), 2 * one);
    // A payload that does not hash to the header's own root is refused
    // before anything is written.
    let mut bad = seg.shards[0].clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let err = store.put(Bytes::from(bad), 1).await.unwrap_err();
    assert!(matches!(err, StoreError::BadShard(SegmentError::ShardRootMismatch { index: 0 })), "{err}");
    let err = store.put(Bytes::from(vec![0u8; 100]), 1).await.unwrap_err();
    assert!(matches!(err, StoreError::BadShard(SegmentError::BadMagic(_))), "{err}");
    assert_eq!(store.used().unwrap(), 0);
    // Epochs: one per volume.
    let k0 = store.put(Bytes::from(seg.shards[0].clone()), 5).await.unwrap();
    let err = store.put(Bytes::from(seg.shards[1].clone()), 4).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { got: 4, newest: 5 }), "{err}");
    assert!(matches!(
        store.put(shard(3, 0, 0, 1, 4), 4).await,
        Err(StoreError::Fenced { got: 4, newest: 5 })
    ));
    assert!(matches!(store.delete(&k0, 4).await, Err(StoreError::Fenced { got: 4, newest: 5 })));
    let k1 = store.put(Bytes::from(seg.shards[1].clone()), 6).await.unwrap();
    // Capacity counts segment shards (header + payload).
    let err = store.put(Bytes::from(seg.shards[2].clone()), 6).await.unwrap_err();
    assert!(matches!(err, StoreError::Full { need, .. } if need == one), "{err}");
    // A delete at the largest epoch keeps older writers out for good,
    // even of a shard never stored.
    assert!(store.delete(&k1, u64::MAX).await.unwrap());
    let never = SegmentShardKey { index: 2, ..k1 };
    assert!(!store.delete(&never, u64::MAX).await.unwrap());
    assert!(matches!(
        store.put(Bytes::from(seg.shards[1].clone()), 6).await,
        Err(StoreError::Fenced { got: 6, newest: u64::MAX })
    ));
    assert_eq!(store.used().unwrap(), one);
}

/// Flips one byte of block `block` of stored shard `key`, behind the
/// store's back.
fn rot(store: &ShardStore, dir: &Path, key: &SegmentShardKey, block: usize) {
    let entry = store.entry(key).unwrap().unwrap();
    let file = data_file_path(dir, entry.loc.data_file);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = entry.payload_offset().unwrap() as usize + block * BLOCK_SIZE + 100;
    bytes[at] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
}

#[tokio::test]
async fn scrub_state_and_faults_survive_a_restart() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(&ring, dir.path(), 1 << 20);
    assert_eq!(store.scrub_state().unwrap(), ScrubState::default());
    let seg = segment(1, 5, (2, 1, 4), 9);
    let mut keys = Vec::new();
    for s in &seg.shards {
        keys.push(store.put(Bytes::from(s.clone()), 1).await.unwrap());
    }
    store.put(shard(0, 3, 0, 1, 1), 1).await.unwrap();
    // The listing runs across volumes, in key order, paged, with lengths.
    let all = store.list_all(None, 10).unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(all[0].0, key(0, 3, 0));
    assert_eq!(all[1..].iter().map(|(k, _)| *k).collect::<Vec<_>>(), keys);
    assert_eq!(all[1].1, seg.shards[0].len() as u64);
    assert_eq!(store.list_all(Some(all[1].0), 2).unwrap(), all[2..4]);
    assert_eq!(store.list_all(Some(all[3].0), 2).unwrap(), []);

    // A sound shard checks, also against its segment's root; the wrong
    // root makes it bad.
    assert_eq!(
        store.verify(&keys[0], Some(seg.root)).await.unwrap(),
        Checked::Sound(seg.shards[0].len() as u64)
    );
    assert_eq!(store.verify(&key(9, 9, 9), None).await.unwrap(), Checked::Gone);
    let wrong = crate::codec::segment::SegmentRoot([7; 32]);
    assert!(matches!(store.verify(&keys[2], Some(wrong)).await.unwrap(), Checked::Bad(..)));
    // A rotten one is bad, and a read that hits rot records it too.
    rot(&store, dir.path(), &keys[1], 2);
    assert!(matches!(store.verify(&keys[1], None).await.unwrap(), Checked::Bad(..)));
    rot(&store, dir.path(), &keys[0], 1);
    assert!(store.get_blocks(&keys[0], 1, 1).await.is_err());
    blocks_match(&store, &seg.shards[0], 2, 2).await;
    // Each found again, by the scrub and by reads: still one fault each.
    assert!(matches!(store.verify(&keys[2], Some(wrong)).await.unwrap(), Checked::Bad(..)));
    assert!(matches!(store.verify(&keys[1], None).await.unwrap(), Checked::Bad(..)));
    assert!(matches!(store.get(&keys[1]).await, Err(StoreError::Corrupt { .. })));
    assert!(store.get_blocks(&keys[0], 1, 1).await.is_err());
    assert!(matches!(store.verify(&keys[0], None).await.unwrap(), Checked::Bad(..)));
    assert_eq!(store.scrub_state().unwrap().found, 3);
    assert_eq!(store.pending_faults().unwrap().len(), 3);
    let state = ScrubState {
        cursor: Some(keys[1]),
        pass_started_ms: Some(1000),
        requested: true,
        checked: 12345,
        passes: 3,
        last_started_ms: Some(10),
        last_ended_ms: Some(20),
        next_ms: Some(99_000),
        start_seen: Some(77),
        found: 0,
    };
    store.save_scrub(&state).unwrap();
    drop(store);

    let store = open(&ring, dir.path(), 1 << 20);
    // Recorded once each, however often found.
    assert_eq!(store.scrub_state().unwrap(), ScrubState { found: 3, ..state });
    let faults = store.pending_faults().unwrap();
    let mut bad: Vec<SegmentShardKey> = faults.iter().map(|f| f.key).collect();
    bad.sort();
    assert_eq!(bad, [keys[0], keys[1], keys[2]]);
    // Acknowledged faults are gone; one whose shard was replaced by a
    // good copy (a rebuild here) is dropped, not reported.
    store.acknowledge_faults(&faults[..1]).unwrap();
    store.put(Bytes::from(seg.shards[1].clone()), 1).await.unwrap();
    let left: Vec<SegmentShardKey> = store.pending_faults().unwrap().iter().map(|f| f.key).collect();
    let expect: Vec<SegmentShardKey> =
        bad.into_iter().filter(|k| *k != faults[0].key && *k != keys[1]).collect();
    assert_eq!(left, expect);
    // A cleared cursor and pass survive too.
    let between =
        ScrubState { cursor: None, pass_started_ms: None, requested: false, ..store.scrub_state().unwrap() };
    store.save_scrub(&between).unwrap();
    drop(store);
    let store = open(&ring, dir.path(), 1 << 20);
    assert_eq!(store.scrub_state().unwrap(), between);
}

#[tokio::test]
async fn an_unreadable_shard_is_a_fault_not_a_stop() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // 4096-byte data files: each of these shards gets its own.
    let store = open(&ring, dir.path(), 1 << 20);
    let a = store.put(shard(1, 1, 0, 0xaa, 1), 1).await.unwrap();
    let b = store.put(shard(1, 2, 0, 0xbb, 1), 1).await.unwrap();
    let c = store.put(shard(1, 3, 0, 0xcc, 1), 1).await.unwrap();
    let lost = store.locate(&b).unwrap().unwrap().data_file;
    assert!(lost != store.locate(&a).unwrap().unwrap().data_file);
    assert!(lost != store.locate(&c).unwrap().unwrap().data_file, "B's data file must not be the tail");
    drop(store);
    // B's data file is lost behind the store's back.
    std::fs::remove_file(data_file_path(dir.path(), lost)).unwrap();

    let store = open(&ring, dir.path(), 1 << 20);
    match store.verify(&b, None).await.unwrap() {
        Checked::Bad(0, why) => assert!(why.starts_with("unreadable"), "{why}"),
        other => panic!("B: {other:?}"),
    }
    let pending: Vec<SegmentShardKey> = store.pending_faults().unwrap().iter().map(|f| f.key).collect();
    assert_eq!(pending, [b]);
    assert!(matches!(store.verify(&a, None).await.unwrap(), Checked::Sound(_)));
    assert!(matches!(store.verify(&c, None).await.unwrap(), Checked::Sound(_)));
    // A read of B answers that it is bad (so readers read around it) and
    // does not poison the store.
    store.acknowledge_faults(&store.pending_faults().unwrap()).unwrap();
    let err = store.get(&b).await.unwrap_err();
    assert!(matches!(err, StoreError::Unreadable { key, .. } if key == b), "{err}");
    assert_eq!(store.pending_faults().unwrap().iter().map(|f| f.key).collect::<Vec<_>>(), [b]);
    store.acknowledge_faults(&store.pending_faults().unwrap()).unwrap();
    let err = store.get_blocks(&b, 0, 1).await.unwrap_err();
    assert!(matches!(err, StoreError::Unreadable { .. }), "{err}");
    assert_eq!(store.pending_faults().unwrap().len(), 1);
    store.acknowledge_faults(&store.pending_faults().unwrap()).unwrap();
    let err = store.get_header(&b).await.unwrap_err();
    assert!(matches!(err, StoreError::Unreadable { .. }), "{err}");
    assert_eq!(store.pending_faults().unwrap().len(), 1);
    assert_eq!(store.get(&a).await.unwrap(), shard(1, 1, 0, 0xaa, 1));
    store.put(shard(1, 4, 0, 0xdd, 1), 1).await.unwrap();
    // Found four times, recorded anew after each acknowledgement.
    assert_eq!(store.scrub_state().unwrap().found, 4);
    // A rebuild replaces the lost copy: readable again, nothing to report.
    store.put(shard(1, 2, 0, 0xbb, 1), 1).await.unwrap();
    assert_eq!(store.get(&b).await.unwrap(), shard(1, 2, 0, 0xbb, 1));
    assert!(store.pending_faults().unwrap().is_empty());
}
