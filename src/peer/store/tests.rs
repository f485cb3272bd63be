//! The shard store's tests: stripe and segment shards, restarts, fencing,
//! capacity, rot on disk.

use super::*;
use crate::codec::segment::{BLOCK_SIZE, parse_segment_shard};
use crate::codec::shard::{ShardHash, ShardHeader};

fn shard(volume: u8, stripe: u64, generation: u64, index: u8, fill: u8, units: u32) -> Bytes {
    let payload = vec![fill; units as usize * 64];
    let header = ShardHeader {
        volume_id: [volume; 16],
        stripe,
        generation,
        index,
        k: 4,
        m: 2,
        payload_len: units * 64,
        payload_hash: ShardHash::of(&payload),
    };
    let mut b = header.encode().to_vec();
    b.extend_from_slice(&payload);
    Bytes::from(b)
}

fn open(ring: &Uring, dir: &Path, capacity: u64) -> ShardStore {
    ShardStore::open_with_data_file_limit(ring, dir, capacity, 4096).unwrap()
}

#[tokio::test]
async fn put_get_list_delete_and_space_accounting() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(&ring, dir.path(), 1 << 20);
    let a = shard(1, 7, 1, 0, 0xaa, 4);
    let b = shard(1, 7, 1, 1, 0xbb, 4);
    let other = shard(2, 0, 1, 0, 0xcc, 1);
    let ka = store.put(a.clone(), 1).await.unwrap();
    let kb = store.put(b.clone(), 1).await.unwrap();
    store.put(other.clone(), 1).await.unwrap();
    assert_eq!(store.get(&ka).await.unwrap(), a);
    assert_eq!(store.get(&kb).await.unwrap(), b);
    assert_eq!(store.list(&[1; 16]).unwrap(), vec![ka, kb]);
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
    assert_eq!(store.list(&[1; 16]).unwrap(), vec![kb]);
}

/// Ten shards put into a store in `dir` (then closed): with 4096-byte
/// data files and 1120-byte shards, several data files.
async fn ten_shards_in(ring: &Uring, dir: &Path) -> Vec<(ShardKey, Bytes)> {
    let store = open(ring, dir, 1 << 20);
    let mut kept = Vec::new();
    for i in 0..10u8 {
        let s = shard(3, u64::from(i), 1, 0, i, 16);
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
    let more = shard(3, 99, 1, 0, 9, 2);
    let k = store.put(more.clone(), 1).await.unwrap();
    assert_eq!(store.get(&k).await.unwrap(), more);
    assert_eq!(store.get(&kept[0].0).await.unwrap(), kept[0].1);
}

#[tokio::test]
async fn a_store_from_before_the_rename_to_data_files_opens_with_every_shard() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kept = ten_shards_in(&ring, dir.path()).await;
    // Put it back into the old layout: segments/NNNNNNNN.seg and the
    // counter named "segment".
    let data = dir.path().join("data");
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        std::fs::rename(&path, path.with_extension("seg")).unwrap();
    }
    std::fs::rename(&data, dir.path().join("segments")).unwrap();
    {
        let db = Database::create(dir.path().join("index.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut c = txn.open_table(COUNTERS).unwrap();
            let n = c.remove("data_file").unwrap().unwrap().value();
            assert!(n >= 3, "{n} data files");
            c.insert("segment", n).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = open(&ring, dir.path(), 1 << 20);
    assert!(!dir.path().join("segments").exists());
    for (key, bytes) in &kept {
        assert_eq!(&store.get(key).await.unwrap(), bytes);
    }
    // New shards go after the old ones, never over them.
    let more = shard(3, 99, 1, 0, 9, 2);
    let k = store.put(more.clone(), 1).await.unwrap();
    assert_eq!(store.get(&k).await.unwrap(), more);
    for (key, bytes) in &kept {
        assert_eq!(&store.get(key).await.unwrap(), bytes);
    }
    drop(store);
    // An older store beside a newer one is refused, not mixed.
    std::fs::create_dir(dir.path().join("segments")).unwrap();
    std::fs::write(dir.path().join("segments/00000001.seg"), b"x").unwrap();
    let err = ShardStore::open(&ring, dir.path(), 1 << 20).unwrap_err();
    assert!(err.to_string().contains("move one of them away"), "{err}");
}

#[tokio::test]
async fn a_delete_fences_older_writers_of_the_volume() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(&ring, dir.path(), 1 << 20);
    let a = shard(4, 0, 1, 0, 1, 4);
    let key = store.put(a.clone(), 3).await.unwrap();
    // The collector erases at the largest epoch; nothing older writes
    // the volume again, and deleting what is gone is no error.
    assert!(store.delete(&key, u64::MAX).await.unwrap());
    assert!(!store.delete(&key, u64::MAX).await.unwrap());
    assert!(matches!(store.put(a.clone(), 3).await, Err(StoreError::Fenced { got: 3, newest: u64::MAX })));
    // Even a delete of a shard that was never stored raises the epoch.
    let other = ShardKey { volume: [8; 16], stripe: 0, generation: 1, index: 0 };
    assert!(!store.delete(&other, 5).await.unwrap());
    assert!(matches!(store.put(shard(8, 0, 1, 0, 1, 4), 4).await, Err(StoreError::Fenced { .. })));
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
    let one = shard(1, 0, 1, 0, 0, 16).len() as u64;
    // Room for exactly 40 of the 64 shards put at once.
    let store = ShardStore::open_with_data_file_limit(&ring, dir.path(), 40 * one, 8 * one).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64u64 {
        let store = store.clone();
        tasks.spawn(async move { store.put(shard(1, i, 1, 0, i as u8, 16), 1).await });
    }
    let results = tasks.join_all().await;
    let stored: Vec<ShardKey> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    assert_eq!(stored.len(), 40, "{results:?}");
    assert!(results.iter().filter_map(|r| r.as_ref().err()).all(|e| matches!(e, StoreError::Full { .. })));
    assert_eq!(store.used().unwrap(), 40 * one);
    drop(store);
    let store = ShardStore::open_with_data_file_limit(&ring, dir.path(), 40 * one, 8 * one).unwrap();
    for key in &stored {
        let got = store.get(key).await.unwrap();
        assert_eq!(got, shard(1, key.stripe, 1, 0, key.stripe as u8, 16));
    }
    assert_eq!(store.list(&[1; 16]).unwrap(), {
        let mut s = stored.clone();
        s.sort();
        s
    });
}

#[tokio::test]
async fn full_stores_and_older_epochs_are_refused_clearly() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let one = shard(4, 0, 1, 0, 1, 4).len() as u64;
    let store = open(&ring, dir.path(), 2 * one);
    store.put(shard(4, 0, 1, 0, 1, 4), 5).await.unwrap();
    store.put(shard(4, 1, 1, 0, 1, 4), 5).await.unwrap();
    let err = store.put(shard(4, 2, 1, 0, 1, 4), 5).await.unwrap_err();
    assert!(matches!(err, StoreError::Full { need, .. } if need == one), "{err}");
    assert!(err.to_string().contains("store is full"), "{err}");
    store.delete(&ShardKey { volume: [4; 16], stripe: 0, generation: 1, index: 0 }, 5).await.unwrap();
    // Epoch 5 was seen for volume 4: 4 is fenced, 5 and 6 are fine, then 5 is fenced.
    let err = store.put(shard(4, 2, 1, 0, 1, 4), 4).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { got: 4, newest: 5 }), "{err}");
    assert!(err.to_string().contains("took the volume over"), "{err}");
    store.put(shard(4, 2, 1, 0, 1, 4), 6).await.unwrap();
    // A fenced writer cannot delete either.
    let k2 = ShardKey { volume: [4; 16], stripe: 2, generation: 1, index: 0 };
    assert!(matches!(store.delete(&k2, 5).await, Err(StoreError::Fenced { got: 5, newest: 6 })));
    store.delete(&k2, 6).await.unwrap();
    assert!(matches!(
        store.put(shard(4, 2, 1, 0, 1, 4), 5).await,
        Err(StoreError::Fenced { got: 5, newest: 6 })
    ));
    // Another volume has its own epochs.
    store.put(shard(5, 0, 1, 0, 1, 4), 1).await.unwrap();
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
async fn segment_shards_beside_stripe_shards_put_get_prove_and_survive_a_restart() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(&ring, dir.path(), 1 << 20);
    let seg = segment(1, 42, (3, 2, 9), 7);
    let stripe = shard(1, 0, 1, 0, 0xaa, 4);
    let stripe_key = store.put(stripe.clone(), 1).await.unwrap();
    let mut keys = Vec::new();
    for s in &seg.shards {
        keys.push(store.put_segment_shard(Bytes::from(s.clone()), 1).await.unwrap());
    }
    assert_eq!(keys, seg.shards.iter().map(|s| key_of(s)).collect::<Vec<_>>());
    let all = stripe.len() + seg.shards.iter().map(Vec::len).sum::<usize>();
    assert_eq!(store.used().unwrap(), all as u64);
    // Listing is of stripe shards; a stripe shard and a segment shard
    // never answer for each other.
    assert_eq!(store.list(&[1; 16]).unwrap(), vec![stripe_key]);
    let mut store = store;
    for reopen in [false, true] {
        if reopen {
            drop(store);
            store = open(&ring, dir.path(), 1 << 20);
        }
        assert_eq!(store.get(&stripe_key).await.unwrap(), stripe);
        for s in &seg.shards {
            let got = store.get_segment_shard(&key_of(s)).await.unwrap();
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
    store.put_segment_shard(Bytes::from(seg.shards[1].clone()), 1).await.unwrap();
    assert_eq!(store.used().unwrap(), all as u64);
    assert!(store.delete_segment_shard(&keys[1], 1).await.unwrap());
    assert!(!store.delete_segment_shard(&keys[1], 1).await.unwrap());
    assert_eq!(store.used().unwrap(), (all - seg.shards[1].len()) as u64);
    assert!(matches!(store.get_segment_shard(&keys[1]).await, Err(StoreError::SegmentNotFound(_))));
    assert!(matches!(store.get_blocks(&keys[1], 0, 1).await, Err(StoreError::SegmentNotFound(_))));
    // The stripe shard did not move.
    assert_eq!(store.get(&stripe_key).await.unwrap(), stripe);
    blocks_match(&store, &seg.shards[2], 4, 3).await;
}

#[tokio::test]
async fn a_segment_shard_rotten_on_disk_is_never_served() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(&ring, dir.path(), 1 << 20);
    let seg = segment(2, 1, (2, 1, 8), 3);
    let shard = &seg.shards[0];
    let key = store.put_segment_shard(Bytes::from(shard.clone()), 1).await.unwrap();
    // Flip one byte of block 5 in the data file behind the store's back.
    let entry = store.segment_entry(&key).unwrap().unwrap();
    let file = data_file_path(dir.path(), entry.loc.data_file);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = entry.payload_offset().unwrap() as usize + 5 * BLOCK_SIZE + 100;
    bytes[at] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    for (first, count) in [(5, 1), (4, 2), (0, 8)] {
        let err = store.get_blocks(&key, first, count).await.unwrap_err();
        assert!(
            matches!(err, StoreError::SegmentCorrupt { source: SegmentError::OutboardMismatch, .. }),
            "{first}+{count}: {err}"
        );
    }
    let err = store.get_segment_shard(&key).await.unwrap_err();
    assert!(matches!(err, StoreError::SegmentCorrupt { .. }), "{err}");
    assert!(err.to_string().contains("corrupt"), "{err}");
    // Blocks that are not rotten still prove: a block read reads only
    // its blocks (scrubbing finds the rest).
    blocks_match(&store, shard, 0, 5).await;
    blocks_match(&store, shard, 6, 2).await;
}

#[tokio::test]
async fn segment_shards_are_fenced_checked_and_counted_like_stripe_shards() {
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
    let err = store.put_segment_shard(Bytes::from(bad), 1).await.unwrap_err();
    assert!(
        matches!(err, StoreError::BadSegmentShard(SegmentError::ShardRootMismatch { index: 0 })),
        "{err}"
    );
    let err = store.put_segment_shard(Bytes::from(vec![0u8; 100]), 1).await.unwrap_err();
    assert!(matches!(err, StoreError::BadSegmentShard(SegmentError::BadMagic(_))), "{err}");
    // A stripe shard is not a segment shard, and the other way round.
    assert!(matches!(
        store.put_segment_shard(shard(3, 0, 1, 0, 1, 4), 1).await,
        Err(StoreError::BadSegmentShard(_))
    ));
    assert!(matches!(store.put(Bytes::from(seg.shards[0].clone()), 1).await, Err(StoreError::BadShard(_))));
    assert_eq!(store.used().unwrap(), 0);
    // Epochs: one per volume, for both kinds of shard.
    let k0 = store.put_segment_shard(Bytes::from(seg.shards[0].clone()), 5).await.unwrap();
    let err = store.put_segment_shard(Bytes::from(seg.shards[1].clone()), 4).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { got: 4, newest: 5 }), "{err}");
    assert!(matches!(
        store.put(shard(3, 0, 1, 0, 1, 4), 4).await,
        Err(StoreError::Fenced { got: 4, newest: 5 })
    ));
    assert!(matches!(
        store.delete_segment_shard(&k0, 4).await,
        Err(StoreError::Fenced { got: 4, newest: 5 })
    ));
    let k1 = store.put_segment_shard(Bytes::from(seg.shards[1].clone()), 6).await.unwrap();
    // Capacity counts segment shards (header + payload).
    let err = store.put_segment_shard(Bytes::from(seg.shards[2].clone()), 6).await.unwrap_err();
    assert!(matches!(err, StoreError::Full { need, .. } if need == one), "{err}");
    // A delete at the largest epoch keeps older writers out for good,
    // even of a shard never stored.
    assert!(store.delete_segment_shard(&k1, u64::MAX).await.unwrap());
    let never = SegmentShardKey { index: 2, ..k1 };
    assert!(!store.delete_segment_shard(&never, u64::MAX).await.unwrap());
    assert!(matches!(
        store.put_segment_shard(Bytes::from(seg.shards[1].clone()), 6).await,
        Err(StoreError::Fenced { got: 6, newest: u64::MAX })
    ));
    assert_eq!(store.used().unwrap(), one);
}

#[tokio::test]
async fn bad_shards_are_refused_and_rot_on_disk_is_caught() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(&ring, dir.path(), 1 << 20);
    let mut bad = shard(6, 0, 1, 0, 7, 2).to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        store.put(Bytes::from(bad), 1).await,
        Err(StoreError::BadShard(ShardError::HashMismatch))
    ));
    assert_eq!(store.used().unwrap(), 0, "a refused shard takes no space");
    let good = shard(6, 0, 1, 0, 7, 2);
    let key = store.put(good, 1).await.unwrap();
    // Flip a payload byte in the data file behind the store's back.
    let file = data_file_path(dir.path(), 1);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x10;
    std::fs::write(&file, &bytes).unwrap();
    let err = store.get(&key).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { source: ShardError::HashMismatch, .. }), "{err}");
}
