//! Copies: which stored copy of a shard a listing saw, so that an erase
//! decided from that listing takes that copy only. A shard stored again
//! since (a rebuild onto this peer, which replaces the old copy in place)
//! is a new copy, and is kept: the directory's collector erases leftover
//! copies while repair may be storing that very shard here again.
//!
//! A copy's id is its location (data file, offset, length): the store
//! appends, and never reuses a location.

use super::index::{Location, SegmentEntry, SegmentIndexKey};
use super::{SEGMENTS, ShardStore, StoreError};
use crate::api::CopyId;
use crate::codec::key::VOLUME_ID_LEN;
use crate::codec::segment::SegmentShardKey;
use redb::ReadableDatabase;

impl ShardStore {
    /// [`Self::list`], with each shard's copy.
    pub fn list_copies(
        &self,
        volume: &[u8; VOLUME_ID_LEN],
        after: Option<SegmentShardKey>,
        limit: usize,
    ) -> Result<Vec<(SegmentShardKey, CopyId)>, StoreError> {
        let keys = self.list(volume, after, limit)?;
        let txn = self.inner.db.begin_read().map_err(|e| self.io(e))?;
        let index = txn.open_table(SEGMENTS).map_err(|e| self.io(e))?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            // Deleted between the two reads: left out.
            if let Some(v) = index.get(&SegmentIndexKey::encode(&k)[..]).map_err(|e| self.io(e))? {
                let entry = SegmentEntry::decode(v.value()).map_err(|e| self.io(e))?;
                out.push((k, entry.loc.encode()));
            }
        }
        Ok(out)
    }

    /// Deletes shard `key` at `epoch` if `copy` is still the copy stored:
    /// whether it deleted it.
    pub async fn delete_copy(
        &self,
        key: &SegmentShardKey,
        epoch: u64,
        copy: CopyId,
    ) -> Result<bool, StoreError> {
        let loc = Location::decode(&copy).map_err(|e| self.io(e))?;
        self.delete_if(key, epoch, Some(loc)).await
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::codec::segment::{BLOCK_SIZE, SegmentGeometry, SegmentShardHeader, ShardRoot};
    use crate::codec::sequence::SegmentId;
    use crate::sys::uring::Uring;

    fn shard(fill: u8) -> Bytes {
        let payload = vec![fill; BLOCK_SIZE];
        let header = SegmentShardHeader {
            volume_id: [7; 16],
            segment: SegmentId::from_raw(9),
            geometry: SegmentGeometry::new(4, 2, 1).unwrap(),
            index: 1,
            roots: vec![ShardRoot::of(&payload); 6],
        };
        let mut b = header.encode();
        b.extend_from_slice(&payload);
        Bytes::from(b)
    }

    #[tokio::test]
    async fn an_erase_of_a_listed_copy_keeps_a_copy_stored_since() {
        let ring = Uring::new(16).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = ShardStore::open(&ring, dir.path(), 1 << 30).unwrap();
        let key = store.put(shard(1), 1).await.unwrap();
        let listed = store.list_copies(&[7; 16], None, 10).unwrap();
        assert_eq!(listed.len(), 1);
        let (k, old) = listed[0];
        assert_eq!(k, key);
        // Stored again (a rebuild onto this peer): a new copy.
        store.put(shard(1), 1).await.unwrap();
        let (_, new) = store.list_copies(&[7; 16], None, 10).unwrap()[0];
        assert_ne!(old, new);
        assert!(!store.delete_copy(&key, 1, old).await.unwrap(), "the new copy is kept");
        assert!(store.get(&key).await.is_ok());
        assert!(store.delete_copy(&key, 1, new).await.unwrap());
        assert!(store.list_copies(&[7; 16], None, 10).unwrap().is_empty());
        // Fencing still holds.
        store.put(shard(2), 5).await.unwrap();
        let (_, c) = store.list_copies(&[7; 16], None, 10).unwrap()[0];
        assert!(matches!(store.delete_copy(&key, 4, c).await, Err(StoreError::Fenced { .. })));
    }
}
