//! Putting a shard (with its outboard kept in the index entry) and reading
//! it back: whole, by block range with a proof, or its header alone, never
//! answering with bytes that fail their root.

use bytes::Bytes;

use super::{ShardStore, StoreError};
use crate::codec::segment::*;

/// Shards up to this size are hashed on the async thread that received
/// them (a thread hop costs more than hashing 64 KiB).
const INLINE_HASH_BYTES: usize = 64 << 10;

impl ShardStore {
    /// Stores one segment shard (header + payload, as `encode_segment`
    /// makes it), durably, for a writer holding fencing `epoch` on its
    /// volume. The store cannot check the segment root (nobody told it),
    /// only that the payload hashes to the header's own root; it computes
    /// the outboard here and keeps it in the index entry, so a block read
    /// needs one index lookup and the blocks' bytes, and the outboard is
    /// committed with the entry (no entry without its outboard).
    pub async fn put(&self, shard: Bytes, epoch: u64) -> Result<SegmentShardKey, StoreError> {
        self.check()?;
        let started = std::time::Instant::now();
        let bytes = shard.clone();
        let check = move || -> Result<_, SegmentError> {
            let (header, payload) = parse_segment_shard(&bytes)?;
            let outboard = ShardOutboard::compute(payload)?;
            if outboard.root() != header.own_root() {
                return Err(SegmentError::ShardRootMismatch { index: header.index });
            }
            Ok((SegmentShardKey::of(&header), super::index::SegmentEntry::tail(&outboard)))
        };
        // A small shard (a FLUSH's short segment) is hashed here, in tens
        // of microseconds; hashing up to 16 MiB goes off the async threads.
        let checked = if shard.len() <= INLINE_HASH_BYTES {
            check()
        } else {
            tokio::task::spawn_blocking(check)
                .await
                .map_err(|e| self.io(format!("hashing a segment shard: {e}")))?
        };
        let (key, tail) = checked?;
        let hashed = started.elapsed();
        self.append(key, shard, epoch, tail).await?;
        tracing::debug!("put {key:?}: hashed {hashed:.0?}, stored {:.0?}", started.elapsed());
        Ok(key)
    }

    /// A segment shard (header + payload) as stored, its payload checked
    /// against its own root and its header against the key asked for (the
    /// reader checks the header against the segment root).
    pub async fn get(&self, key: &SegmentShardKey) -> Result<Bytes, StoreError> {
        self.check()?;
        let entry = self.entry(key)?.ok_or(StoreError::NotFound(*key))?;
        let loc = entry.loc;
        let bytes = match self.read_location(loc, "a segment shard").await {
            Ok(bytes) => bytes,
            Err(e) => {
                self.recheck(key, loc, unreadable(key, e)).await?;
                return Box::pin(self.get(key)).await;
            }
        };
        let checked = match parse_segment_shard(&bytes) {
            Ok((header, _)) if SegmentShardKey::of(&header) != *key => {
                Err(StoreError::Misplaced { key: *key, found: SegmentShardKey::of(&header) })
            }
            Ok((header, payload)) => {
                if header.own_root() == entry.outboard.root() && header.own_root().matches(payload) {
                    Ok(())
                } else {
                    let source = SegmentError::ShardRootMismatch { index: header.index };
                    Err(StoreError::Corrupt { key: *key, source })
                }
            }
            Err(source) => Err(StoreError::Corrupt { key: *key, source }),
        };
        if let Err(e) = checked {
            self.recheck(key, loc, e).await?;
            return Box::pin(self.get(key)).await;
        }
        Ok(Bytes::from(bytes))
    }

    /// Blocks `first .. first + count` of a segment shard with their proof
    /// against its root (`codec::segment::prove`'s format). Reads only those
    /// blocks' bytes; the outboard comes from the index entry. The blocks and
    /// the hashes on their path are checked against the stored root while
    /// proving, so a rotten local copy answers `SegmentCorrupt`, never bytes.
    pub async fn get_blocks(
        &self,
        key: &SegmentShardKey,
        first: u32,
        count: u32,
    ) -> Result<Bytes, StoreError> {
        self.check()?;
        let entry = self.entry(key)?.ok_or(StoreError::NotFound(*key))?;
        let blocks = entry.blocks();
        let end = first.checked_add(count).filter(|&end| count > 0 && end <= blocks);
        let Some(end) = end else {
            return Err(StoreError::BlockRange { first, count, blocks });
        };
        let at = entry.payload_offset().map_err(|e| self.io(e))? + u64::from(first) * BLOCK_SIZE as u64;
        let read = self.read_at(entry.loc.data_file, at, count as usize * BLOCK_SIZE, "segment shard blocks");
        let bytes = match read.await {
            Ok(bytes) => bytes,
            Err(e) => {
                self.recheck(key, entry.loc, unreadable(key, e)).await?;
                return Box::pin(self.get_blocks(key, first, count)).await;
            }
        };
        let outboard = entry.outboard;
        let proved = if count <= 16 {
            prove_range(&bytes, &outboard, first..end)
        } else {
            // Hashing many blocks: off the async threads.
            tokio::task::spawn_blocking(move || prove_range(&bytes, &outboard, first..end))
                .await
                .map_err(|e| self.io(format!("proving blocks: {e}")))?
        };
        match proved {
            Ok(proof) => Ok(Bytes::from(proof)),
            Err(source) => {
                self.recheck(key, entry.loc, StoreError::Corrupt { key: *key, source }).await?;
                Box::pin(self.get_blocks(key, first, count)).await
            }
        }
    }

    /// A segment shard's header alone (all k + m shard roots and the
    /// geometry: what a reader needs once per segment to check block
    /// proofs). The reader checks it against the segment root; a header
    /// naming another shard is refused here.
    pub async fn get_header(&self, key: &SegmentShardKey) -> Result<Bytes, StoreError> {
        self.check()?;
        let entry = self.entry(key)?.ok_or(StoreError::NotFound(*key))?;
        let at = entry.loc.offset;
        let len = entry.payload_offset().map_err(|e| self.io(e))? - at;
        let bytes = match self.read_at(entry.loc.data_file, at, len as usize, "a segment shard header").await
        {
            Ok(bytes) => bytes,
            Err(e) => {
                self.recheck(key, entry.loc, unreadable(key, e)).await?;
                return Box::pin(self.get_header(key)).await;
            }
        };
        let checked = match parse_header(&bytes) {
            Ok(header) if SegmentShardKey::of(&header) != *key => {
                Err(StoreError::Misplaced { key: *key, found: SegmentShardKey::of(&header) })
            }
            Ok(header) if header.own_root() != entry.outboard.root() => Err(StoreError::Corrupt {
                key: *key,
                source: SegmentError::ShardRootMismatch { index: header.index },
            }),
            Ok(_) => Ok(()),
            Err(source) => Err(StoreError::Corrupt { key: *key, source }),
        };
        if let Err(e) = checked {
            self.recheck(key, entry.loc, e).await?;
            return Box::pin(self.get_header(key)).await;
        }
        Ok(Bytes::from(bytes))
    }
}

/// A failed read of shard `key`'s bytes, as the shard's fault.
fn unreadable(key: &SegmentShardKey, e: StoreError) -> StoreError {
    let message = match e {
        StoreError::Io { message, .. } => message,
        other => other.to_string(),
    };
    StoreError::Unreadable { key: *key, message }
}
