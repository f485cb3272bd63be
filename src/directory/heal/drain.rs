//! Peers leaving: drained by the operator, shedding space above the
//! high-water mark, distrusted after failed audits; and removed.
//!
//! - **Drain** (`meshdisk peer drain NAME`, a `drain/<name>` record): the
//!   peer is *leaving*. Its shards still count and are read, new
//!   placements and repairs avoid it, and repair moves each of its shards
//!   to another peer: the new holder copies the shard from it (verified
//!   against the segment root), and only then does the record name the
//!   new holder. So redundancy never drops below what it was; the copy
//!   left behind is erased by the collector after its grace (it
//!   reconciles leaving peers every pass).
//! - **High water**: a peer whose used space reaches [`HIGH_WATER`]
//!   percent (`--drain-above`) gets no new shards, and sheds shards the
//!   same way until what records name on it is below the low-water mark
//!   ([`LOW_WATER_GAP`] points lower). Not a full drain: only the excess
//!   moves.
//! - **Failed audits** ([`super::audit`]): the peer is drained with the
//!   reason `audits`, and its shards are not trusted: they count as lost,
//!   so repair rebuilds them from the other holders rather than copying
//!   them from it.
//! - **Remove** (`meshdisk peer remove NAME`): refused while any record
//!   names the peer (it holds shards redundancy needs), with how many.
//!   Then its records go (`peers/`, `peerid/`, `drain/`, `audit/`), a
//!   `removed/` record refuses its heartbeats, and its peer id is never
//!   given again (`peerslot/` stays).

use std::collections::{HashMap, HashSet};

use crate::api::*;
use crate::directory::Directory;
use crate::directory::heal::health::HolderState;
use crate::directory::meta::{Compare, MetaStore, Op, Txn};
use crate::directory::schema::*;

/// Default high-water mark: percent of a peer's capacity used.
pub const HIGH_WATER: u8 = 90;

/// The low-water mark is this many percentage points under the high one.
pub const LOW_WATER_GAP: u8 = 5;

/// Bytes of `capacity` at the low-water mark for `high_water` percent.
pub fn low_water(capacity: u64, high_water: u8) -> u64 {
    let pct = u64::from(high_water.saturating_sub(LOW_WATER_GAP));
    (u128::from(capacity) * u128::from(pct) / 100) as u64
}

impl<S: MetaStore> Directory<S> {
    pub(in crate::directory) fn high_water(&self) -> u8 {
        self.high_water.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a peer's report puts it at or above the high-water mark.
    pub(in crate::directory) fn above_high_water(&self, report: &PeerReport) -> bool {
        report.capacity > 0
            && u128::from(report.used) * 100 >= u128::from(report.capacity) * u128::from(self.high_water())
    }

    /// Every drain record, by peer name.
    pub(in crate::directory) async fn drains(&self) -> Result<HashMap<String, DrainRecord>, Remote> {
        let mut out = HashMap::new();
        for e in self.meta.list(b"drain/").await? {
            let name = String::from_utf8_lossy(&e.key[b"drain/".len()..]).into_owned();
            out.insert(name, dec("drain", &e.value)?);
        }
        Ok(out)
    }

    /// Peers whose shards are moving off: drained, or above the high-water
    /// mark (the collector reconciles them every pass).
    pub(in crate::directory) async fn leaving_peers(&self) -> Result<HashSet<String>, Remote> {
        let mut out: HashSet<String> = self.drains().await?.into_keys().collect();
        for (name, r) in self.peers().await? {
            if self.above_high_water(&r.report) {
                out.insert(name);
            }
        }
        Ok(out)
    }

    /// Starts (or stops) draining `peer` for `reason`. Starting again keeps
    /// the first start's time; a drain for failed audits is not cancelled
    /// by a later operator drain, only by `cancel`.
    pub(in crate::directory) async fn drain_peer(
        &self,
        peer: &str,
        reason: DrainReason,
        cancel: bool,
    ) -> Result<DirResponse, Remote> {
        if self.meta.get(&peer_id_key(peer)).await?.is_none() {
            return Err(Remote::new(ErrorKind::NotFound, format!("no peer named {peer} in this cluster")));
        }
        let k = key("drain", peer);
        if cancel {
            self.meta.txn(Txn::new().then(Op::Delete { key: k })).await?;
            tracing::info!("peer {peer}: drain cancelled");
            return Ok(DirResponse::Done);
        }
        let rec = DrainRecord { reason, since_ms: self.now() };
        // A drain for failed audits replaces an operator's (in one write:
        // never a moment without either); any other keeps the first.
        let existing = self.meta.get(&k).await?;
        let when = match &existing {
            None => Compare::Absent(k.clone()),
            Some(e)
                if reason == DrainReason::Audits
                    && dec::<DrainRecord>("drain", &e.value)?.reason != reason =>
            {
                Compare::ModRevision(k.clone(), e.mod_revision)
            }
            Some(_) => return Ok(DirResponse::Done),
        };
        let out = self
            .meta
            .txn(Txn::new().when(when).then(Op::Put { key: k, value: enc(&rec), lease: None }))
            .await?;
        if out.succeeded {
            tracing::warn!("peer {peer}: draining ({})", reason.as_str());
            self.repair_wake.notify_one();
        }
        Ok(DirResponse::Done)
    }

    /// Removes `peer`, if no record names it.
    pub(in crate::directory) async fn remove_peer(&self, peer: &str) -> Result<DirResponse, Remote> {
        let Some(id_entry) = self.meta.get(&peer_id_key(peer)).await? else {
            return Err(Remote::new(ErrorKind::NotFound, format!("no peer named {peer} in this cluster")));
        };
        let id = u16::from_be_bytes(
            id_entry
                .value
                .as_slice()
                .try_into()
                .map_err(|_| internal(format!("corrupt peer id of {peer}")))?,
        );
        let view = self.peer_view().await?;
        let scan = self.scan_health(&view).await?;
        // A lost peer holds nothing anyone reaches: records naming it
        // count those shards lost either way.
        let lost = view.by_id.get(&id).is_some_and(|p| p.state == HolderState::Lost && p.drain.is_none());
        if let Some(t) = scan.needed.get(&id).filter(|t| t.segments > 0 && !lost) {
            return Err(Remote::new(
                ErrorKind::Conflict,
                format!(
                    "peer {peer} still holds {} shards ({}) that segments need for full redundancy: drain it first with `meshdisk peer drain {peer} --wait`, then remove it",
                    t.segments,
                    crate::size::human(t.bytes)
                ),
            ));
        }
        // Compared so two removals do not race. A placement racing this
        // one may still name the peer: that segment then counts the shard
        // lost (no peer has the id any more) and repair rebuilds it.
        let txn = Txn::new()
            .when(Compare::ModRevision(peer_id_key(peer), id_entry.mod_revision))
            .then(Op::Delete { key: peer_id_key(peer) })
            .then(Op::Delete { key: key("peers", peer) })
            .then(Op::Delete { key: key("drain", peer) })
            .then(Op::Delete { key: key("audit", peer) })
            .then(Op::Put {
                key: key("removed", peer),
                value: enc(&RemovedRecord { at_ms: self.now() }),
                lease: None,
            });
        if !self.meta.txn(txn).await?.succeeded {
            return Err(Remote::new(
                ErrorKind::Conflict,
                format!("peer {peer} changed meanwhile; try again"),
            ));
        }
        tracing::warn!("peer {peer} (peer id {id}) removed from the cluster");
        Ok(DirResponse::Done)
    }

    /// Whether `peer` was removed.
    pub(in crate::directory) async fn removed(&self, peer: &str) -> Result<bool, Remote> {
        Ok(self.meta.get(&key("removed", peer)).await?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_low_water_mark_is_five_points_under_the_high_one() {
        assert_eq!(low_water(1000, 90), 850);
        assert_eq!(low_water(200, 100), 190);
        assert_eq!(low_water(100, 3), 0);
    }
}
