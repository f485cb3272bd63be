//! Tests of the block cache: exact (address, sequence) hits, tags checked,
//! the bound, persistence, concurrency.

use std::sync::Arc;

use bytes::Bytes;

use super::blocks::*;
use crate::codec::key::VolumeKey;
use crate::codec::segment::BLOCK_SIZE;
use crate::codec::sequence::Sequence;
use crate::sys::uring::Uring;

const VOL: [u8; 16] = [5; 16];

fn key() -> VolumeKey {
    VolumeKey::from_bytes(&(0..64).map(|i| (i * 3) as u8).collect::<Vec<_>>()).unwrap()
}

fn seq(counter: u64) -> Sequence {
    Sequence::new(2, counter).unwrap()
}

/// A block's ciphertext, a function of (address, sequence).
fn block(address: u64, sequence: Sequence) -> Bytes {
    let seed = address.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ sequence.raw();
    Bytes::from((0..BLOCK_SIZE).map(|i| (seed >> (i % 8 * 8)) as u8 ^ i as u8).collect::<Vec<_>>())
}

fn open(ring: &Uring, dir: &std::path::Path, slots: u64) -> BlockCache {
    BlockCache::open(dir, &key(), &VOL, ring, slots * BLOCK_SIZE as u64).unwrap()
}

#[tokio::test]
async fn a_block_is_served_only_for_its_own_sequence() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = open(&ring, dir.path(), 32);
    cache.put(10, seq(5), block(10, seq(5))).await.unwrap();
    assert_eq!(cache.get(10, seq(5)).await.unwrap(), block(10, seq(5)));
    assert_eq!(cache.get(10, seq(4)).await, None, "an older version");
    assert_eq!(cache.get(10, seq(6)).await, None, "a newer version");
    assert_eq!(cache.get(11, seq(5)).await, None, "another block");
    // A newer version replaces it; the old one is gone.
    cache.put(10, seq(9), block(10, seq(9))).await.unwrap();
    assert_eq!(cache.get(10, seq(5)).await, None);
    assert_eq!(cache.get(10, seq(9)).await.unwrap(), block(10, seq(9)));
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.entries, stats.refused), (2, 1, 0));
    cache.forget(10);
    assert_eq!(cache.get(10, seq(9)).await, None);
    assert!(matches!(
        cache.put(1, seq(1), Bytes::from(vec![0; 100])).await,
        Err(CacheError::BlockLength(100))
    ));
    assert!(matches!(
        BlockCache::open(dir.path(), &key(), &VOL, &ring, 8 * BLOCK_SIZE as u64),
        Err(CacheError::TooSmall { .. })
    ));
}

#[tokio::test]
async fn a_tampered_slot_or_index_entry_is_refused() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = open(&ring, dir.path(), 16);
    for a in 0..4 {
        cache.put(a, seq(a + 1), block(a, seq(a + 1))).await.unwrap();
    }
    drop(cache);
    let data = dir.path().join("blocks.dat");
    let mut bytes = std::fs::read(&data).unwrap();
    // Flip one byte in every slot that holds something: whichever block
    // went where, its slot no longer matches its tag.
    let mut flipped = 0;
    for chunk in bytes.chunks_mut(BLOCK_SIZE) {
        if chunk.iter().any(|&b| b != 0) && flipped < 2 {
            chunk[1000] ^= 1;
            flipped += 1;
        }
    }
    std::fs::write(&data, &bytes).unwrap();
    let cache = open(&ring, dir.path(), 16);
    let mut good = 0;
    for a in 0..4 {
        if let Some(b) = cache.get(a, seq(a + 1)).await {
            assert_eq!(b, block(a, seq(a + 1)));
            good += 1;
        }
    }
    assert_eq!(good, 2);
    assert_eq!(cache.stats().refused, 2);
    assert_eq!(cache.stats().entries, 2, "refused entries are dropped");
    drop(cache);

    // Rewriting an index entry to claim another sequence (or address)
    // does not make the slot serve it.
    let idx = dir.path().join("blocks.idx");
    let mut bytes = std::fs::read(&idx).unwrap();
    let mut rewritten = Vec::new();
    for e in bytes[INDEX_HEADER_LEN..].chunks_mut(ENTRY_LEN) {
        let sequence = u64::from_le_bytes(e[8..16].try_into().unwrap());
        if sequence != 0 {
            let address = u64::from_le_bytes(e[..8].try_into().unwrap());
            e[8..16].copy_from_slice(&(sequence + 1).to_le_bytes());
            rewritten.push((address, Sequence::from_raw(sequence + 1)));
        }
    }
    assert_eq!(rewritten.len(), 2);
    std::fs::write(&idx, &bytes).unwrap();
    let cache = open(&ring, dir.path(), 16);
    for (address, sequence) in rewritten {
        assert_eq!(cache.get(address, sequence).await, None);
    }
    assert_eq!(cache.stats().refused, 2);
}

#[tokio::test]
async fn entries_survive_a_restart_but_not_another_key_volume_or_size() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = open(&ring, dir.path(), 16);
    cache.put(7, seq(3), block(7, seq(3))).await.unwrap();
    drop(cache);
    let cache = open(&ring, dir.path(), 16);
    assert_eq!(cache.get(7, seq(3)).await.unwrap(), block(7, seq(3)));
    drop(cache);
    let other =
        BlockCache::open(dir.path(), &VolumeKey::generate().unwrap(), &VOL, &ring, 16 * 4096).unwrap();
    assert_eq!(other.stats().entries, 0);
    drop(other);
    let cache = open(&ring, dir.path(), 16);
    assert_eq!(cache.get(7, seq(3)).await, None, "the other key's open cleared it");
    cache.put(7, seq(3), block(7, seq(3))).await.unwrap();
    drop(cache);
    let other = BlockCache::open(dir.path(), &key(), &[6; 16], &ring, 16 * 4096).unwrap();
    assert_eq!(other.stats().entries, 0);
    drop(other);
    let cache = open(&ring, dir.path(), 16);
    cache.put(7, seq(3), block(7, seq(3))).await.unwrap();
    drop(cache);
    let bigger = open(&ring, dir.path(), 32);
    assert_eq!((bigger.slot_count(), bigger.stats().entries), (32, 0));
}

#[tokio::test]
async fn the_cache_is_bounded_and_gives_read_blocks_a_second_chance() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = open(&ring, dir.path(), 16);
    cache.put(0, seq(1), block(0, seq(1))).await.unwrap();
    for a in 1..200u64 {
        assert!(cache.get(0, seq(1)).await.is_some(), "block 0 evicted at {a}");
        cache.put(a, seq(a + 1), block(a, seq(a + 1))).await.unwrap();
        assert!(cache.stats().entries <= 16);
    }
    assert_eq!(cache.stats().entries, 16);
    let held = {
        let mut n = 0;
        for a in 0..200u64 {
            if let Some(b) = cache.get(a, seq(a + 1)).await {
                assert_eq!(b, block(a, seq(a + 1)));
                n += 1;
            }
        }
        n
    };
    assert_eq!(held, 16);
    assert_eq!(std::fs::metadata(dir.path().join("blocks.dat")).unwrap().len(), 16 * 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_gets_and_puts_only_ever_return_the_version_asked_for() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(open(&ring, dir.path(), 16));
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            let mut hits = 0;
            for i in 0..300u64 {
                // 24 addresses, 3 versions each, over 16 slots.
                let address = (t * 7 + i * 13) % 24;
                let sequence = seq(1 + (t + i) % 3);
                if i % 3 == 0 {
                    cache.put(address, sequence, block(address, sequence)).await.unwrap();
                } else if let Some(b) = cache.get(address, sequence).await {
                    assert_eq!(b, block(address, sequence), "{address} at {sequence}");
                    hits += 1;
                }
            }
            hits
        }));
    }
    let mut hits = 0;
    for t in tasks {
        hits += t.await.unwrap();
    }
    let stats = cache.stats();
    assert_eq!(stats.refused, 0);
    assert!(stats.entries <= 16);
    assert_eq!(stats.hits, hits);
    assert!(hits > 0);
}
