//! Shard faults: a shard its holder found bad (scrub, or a read that
//! failed its hash) or that failed an audit is **forgotten** from its
//! segment's record, so the segment counts it missing and repair rebuilds
//! it like a shard on a lost peer.
//!
//! Forgetting is one compare-and-set that clears the record's slot for
//! that index, and only while the record still names the faulty holder
//! there (a repair or a drain may have moved the index meanwhile, or the
//! segment been freed: then there is nothing to forget). The bad copy
//! stays on its holder until the collector's reconciliation erases it: it
//! is a copy no record names, erased once the index has an up holder
//! again ([`super::collector`]'s rule for replaced copies), so a
//! holder whose rebuild of that very index is in flight keeps it. A
//! rebuild on the same holder replaces the bad copy in place.
//!
//! A slot is cleared only while at least k others stay named: below that
//! nothing could rebuild it, and clearing would only drop the pointer to
//! a copy that may read again (a wrong record, a disk back).
//!
//! A slot cleared by mistake (a false report) costs a rebuild, never
//! data: the other shards still prove the segment, and the cleared holder
//! is read no more.
//!
//! **Repeats.** A holder may report the same bad copy twice (its first
//! answer was lost and it retried; it crashed before noting the answer;
//! an audit found the copy first). By then repair may have rebuilt the
//! shard on that very holder and named it again: forgetting once more
//! would throw the good copy away. So a holder's report of a shard
//! forgotten from it within [`REPEAT_WINDOW`] is taken as a repeat and
//! ignored. The price: a rebuilt copy that rots within the hour is found
//! by the next audit or scrub instead. (In memory: a directory restart
//! forgets the window, and a repeat then costs one rebuild.)

use crate::api::*;
use crate::codec::segment::SegmentShardKey;
use crate::directory::Directory;
use crate::directory::meta::{Compare, MetaStore, Op, Txn};
use crate::directory::schema::*;

/// Tries at forgetting one shard while its record keeps changing.
const TRIES: usize = 8;

/// A holder's report of a shard forgotten from it less than this long ago
/// is a repeat (its answer was lost and it reported again, or it reports
/// what an audit already found), not news: the slot may name it again
/// for a good copy rebuilt there meanwhile, which must not be forgotten.
pub const REPEAT_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

impl<S: MetaStore> Directory<S> {
    /// Forgets shard `key` from its record if the record names `holder`
    /// (a peer id) for it; whether it did. Wakes repair.
    pub(in crate::directory) async fn forget_shard(
        &self,
        key: &SegmentShardKey,
        holder: u16,
        why: &str,
    ) -> Result<bool, Remote> {
        let skey = segment_key(&key.volume, key.segment);
        let Some(k) = self.volume_k(&key.volume).await? else { return Ok(false) };
        for _ in 0..TRIES {
            let Some(entry) = self.meta.get(&skey).await? else { return Ok(false) };
            let mut record = SegmentRecord::decode(&entry.value)
                .map_err(|x| internal(format!("segment {}: {x}", key.segment)))?;
            let Some(slot) = record.peers.get_mut(usize::from(key.index)) else { return Ok(false) };
            if *slot != holder || holder == 0 {
                return Ok(false);
            }
            *slot = 0;
            // Only while repair can rebuild it from the others: a slot
            // cleared with fewer than k left named gains nothing, and
            // loses the pointer to a copy that may be readable again (a
            // fault that is not the shard's: a wrong record, a disk back).
            let named = record.peers.iter().filter(|&&p| p != 0).count();
            if named < k {
                tracing::warn!(
                    "shard {} of segment {} (volume {}) on peer id {holder} is bad ({why}), but only {named} other shards are named: kept in the record, nothing could rebuild it",
                    key.index,
                    key.segment,
                    hex::encode(key.volume),
                );
                return Ok(false);
            }
            let value = record.encode().map_err(|e| internal(format!("segment {}: {e}", key.segment)))?;
            let txn = Txn::new().when(Compare::ModRevision(skey.clone(), entry.mod_revision)).then(Op::Put {
                key: skey.clone(),
                value,
                lease: None,
            });
            if self.meta.txn(txn).await?.succeeded {
                tracing::warn!(
                    "shard {} of segment {} (volume {}) on peer id {holder} is bad ({why}): forgotten, repair rebuilds it",
                    key.index,
                    key.segment,
                    hex::encode(key.volume),
                );
                self.repair.lock().expect("not poisoned").forgotten += 1;
                self.forgotten_at.lock().expect("not poisoned").insert((*key, holder), self.now());
                self.repair_wake.notify_one();
                return Ok(true);
            }
        }
        Err(Remote::new(
            ErrorKind::Conflict,
            format!("segment {}: its record kept changing; report again", key.segment),
        ))
    }

    /// A peer's report of its own bad shards.
    pub(in crate::directory) async fn shard_faults(
        &self,
        node: &str,
        faults: Vec<ShardFault>,
    ) -> Result<DirResponse, Remote> {
        if faults.len() > MAX_FAULTS_PER_CALL {
            return Err(Remote::new(
                ErrorKind::Invalid,
                format!("at most {MAX_FAULTS_PER_CALL} shard faults per call, {} reported", faults.len()),
            ));
        }
        let Some(&holder) = self.peer_ids().await?.get(node) else {
            return Err(Remote::new(ErrorKind::NotFound, format!("peer {node} has no peer id")));
        };
        let now = self.now();
        let window = REPEAT_WINDOW.as_millis() as u64;
        for f in faults {
            let repeat = {
                let mut recent = self.forgotten_at.lock().expect("not poisoned");
                recent.retain(|_, at| now.saturating_sub(*at) < window);
                recent.contains_key(&(f.shard, holder))
            };
            if repeat {
                tracing::debug!(
                    "{node} reports shard {} of segment {} again: forgotten already",
                    f.shard.index,
                    f.shard.segment
                );
                continue;
            }
            self.forget_shard(&f.shard, holder, &format!("{node}: {}", f.problem)).await?;
        }
        Ok(DirResponse::Done)
    }
}
