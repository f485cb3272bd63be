//! Snapshots, clones and rollbacks: the directory's side.
//!
//! A **snapshot** (`snaps/<volume id>/<name>`) is a copy of the volume's
//! sealed root at the moment it was taken, with that root's highest
//! segment and sequence. It copies whatever root is committed, whoever
//! holds the lease: a snapshot of an attached volume is crash-consistent,
//! holding what its last commit holds (writes not yet committed are not
//! in it, as after a crash).
//!
//! **What a snapshot pins, without lists.** The segments a snapshot's
//! root reaches are never listed; they follow from two numbers. A segment
//! record `S` of volume `V` is reached by snapshot `X` of `V` iff
//! `S ≤ X.highest_segment` and `V`'s head had not dropped `S` when `X` was
//! taken. Why this is exact: every commit adds only segments above the
//! highest segment of the root it replaces (CommitRoot refuses others, and
//! a rollback may not lower the highest segment), so every record with an
//! id at or below `X.highest_segment` existed when `X` was taken, and one
//! the head had not dropped then is one `X`'s root could reach (a record
//! the writer had not yet dropped though its root no longer reached it is
//! counted too: pinning more is safe, pinning less is not).
//!
//! The "when" of a drop is the head's commit number: a commit drops at
//! its new root's number (the first root not reaching them), `DropSegments`
//! at the current root's (the writer's root no longer reaches them; if it
//! stopped earlier, the number is only larger, which pins more). So when
//! the head drops `S` at commit `c` while some snapshot `X` has
//! `S ≤ X.highest_segment` and `X.commit < c`, `S`'s record stays in
//! `segs/` (reads of the snapshot need it) and a marker
//! `kept/<volume id>/<seg>` says since which commit the head no longer
//! reaches it; otherwise the record moves to `dead/` as it always did.
//! Every drop compares the volume's snapshot set (`snapset/<volume id>`,
//! the snapshots in brief) as it read it, so a snapshot taken or deleted
//! meanwhile makes it read again.
//!
//! **Deleting a snapshot** removes its record from the set, then sweeps
//! the volume's `kept/` markers page by page: a record no remaining
//! snapshot pins moves to `dead/` (collected after the drop grace). A
//! crash between pages leaves markers that only over-pin; the next
//! deletion (of any snapshot of the volume, or of this one again: the
//! sweep runs even when the snapshot is gone) finishes them. A snapshot
//! with clones is not deleted: the clones read its segments.
//!
//! **A clone** is a new volume whose lineage names its parent and
//! snapshot (and the parent's own lineage after it). Its first root is
//! the snapshot's, sealed by the caller for the clone's id and key, at the
//! snapshot root's epoch with commit 1; its record starts at that epoch,
//! so its first writer's epoch, sequences and segment ids are above
//! everything it inherits. Segment ids up to `lineage[0].highest_segment`
//! are its ancestors' records (`SegmentRecords` answers them from there);
//! its own are above. Its drops, listings, floor and reconciliation
//! concern its own records only, by its own volume id, and deleting it
//! erases only shards of its id. A volume with snapshots cannot be
//! deleted, so an ancestor outlives its clones.
//!
//! **A rollback** is a new commit: a root the writer (holding the lease)
//! made of the snapshot's replaces the current one by compare-and-set, as
//! CommitRoot does, and the snapshot's pinned segments count as the
//! head's again (their `kept/` markers go, in the same transaction when
//! they fit in one, else in pages before it: a marker removed too early
//! makes a record the head's, which the attach drops again at open, so
//! that failure only over-pins). The new root keeps the head's highest
//! segment and sequence (or higher): a sequence is never reused
//! (invariant 1) and segment ids stay above every record's. The records
//! the head had and the snapshot does not reach are dropped by the attach
//! (it drops, at open, every record its root does not reach).

use std::collections::HashMap;

use super::Directory;
use super::meta::{Compare, MetaStore, Op, Txn};
use super::roots::{conflict, show};
use super::schema::*;
use super::volumes::{check_spec, stored_len};
use crate::api::*;
use crate::codec::root::UnverifiedRoot;
use crate::codec::sequence::SegmentId;
use crate::membership::ca::check_label;

/// Most snapshots one volume keeps (each drop reads them all).
pub const MAX_SNAPSHOTS: usize = 64;

/// Store entries read, and markers swept, per page.
const PAGE: usize = 1000;

/// Markers a rollback removes in its own transaction; more go in pages
/// before it.
const REVIVE_IN_COMMIT: usize = MAX_COMMIT_OPS - 1;

/// A volume's snapshot set as read, and the compare that keeps it so.
pub(super) struct Pins {
    pub(super) set: SnapshotSet,
    pub(super) unchanged: Compare,
}

fn invalid(message: impl Into<String>) -> Remote {
    Remote::new(ErrorKind::Invalid, message)
}

fn no_snapshot(volume: &str, snapshot: &str) -> Remote {
    Remote::new(ErrorKind::NotFound, format!("volume {volume} has no snapshot named {snapshot}"))
}

impl<S: MetaStore> Directory<S> {
    /// The volume's snapshot set and the compare that keeps it as read.
    pub(super) async fn snapshot_pins(&self, volume: &[u8; VOLUME_ID_LEN]) -> Result<Pins, Remote> {
        let k = snapset_key(volume);
        Ok(match self.meta.get(&k).await? {
            Some(e) => Pins {
                set: dec("snapshot set", &e.value)?,
                unchanged: Compare::ModRevision(k, e.mod_revision),
            },
            None => Pins { set: SnapshotSet::default(), unchanged: Compare::Absent(k) },
        })
    }

    /// Every `kept/` marker of the volume, with its store revision.
    pub(super) async fn kept_segments(
        &self,
        volume: &[u8; VOLUME_ID_LEN],
    ) -> Result<HashMap<SegmentId, KeptSegment>, Remote> {
        let prefix = kept_prefix(volume);
        let mut out = HashMap::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.meta.list_range(&prefix, after.as_deref(), PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for e in page {
                let id = parse_segment_key(&prefix, &e.key)
                    .ok_or_else(|| internal(format!("a malformed kept-segment key {:?}", e.key)))?;
                out.insert(id, dec("kept segment", &e.value)?);
            }
        }
        Ok(out)
    }

    async fn snapshot_record(
        &self,
        volume: &[u8; VOLUME_ID_LEN],
        name: &str,
    ) -> Result<Option<(SnapshotRecord, u64)>, Remote> {
        self.get::<SnapshotRecord>("snapshot", &snapshot_key(volume, name)).await
    }

    /// The volumes cloned from `volume`'s snapshots (`snapshot`'s only, if
    /// given): (snapshot, clone) names.
    async fn clones_of(
        &self,
        volume: &[u8; VOLUME_ID_LEN],
        snapshot: Option<&str>,
    ) -> Result<Vec<(String, String)>, Remote> {
        let mut out = Vec::new();
        for v in self.list::<VolumeRecord>("volume", b"volumes/").await? {
            if let Some(a) = v.spec.lineage.first()
                && &a.id == volume
                && snapshot.is_none_or(|s| s == a.snapshot)
            {
                out.push((a.snapshot.clone(), v.spec.name));
            }
        }
        Ok(out)
    }

    pub(super) async fn create_snapshot(&self, volume: &str, snapshot: &str) -> Result<DirResponse, Remote> {
        check_label(snapshot).map_err(|e| invalid(format!("snapshot name: {e}")))?;
        let v = self.volume(volume).await?;
        let id = v.spec.id;
        for _ in 0..16 {
            let Some((root, rrev)) = self.get::<RootState>("root", &root_key(&id)).await? else {
                return Err(invalid(format!(
                    "volume {volume} has never committed: there is nothing to snapshot yet"
                )));
            };
            let pins = self.snapshot_pins(&id).await?;
            if pins.set.snapshots.iter().any(|p| p.name == snapshot) {
                return Err(Remote::new(
                    ErrorKind::Conflict,
                    format!("volume {volume} has a snapshot named {snapshot} already"),
                ));
            }
            if pins.set.snapshots.len() >= MAX_SNAPSHOTS {
                return Err(invalid(format!(
                    "volume {volume} has {MAX_SNAPSHOTS} snapshots, the most it may keep: delete one first"
                )));
            }
            let parsed = UnverifiedRoot::parse(&root.sealed)
                .map_err(|e| internal(format!("volume {volume}: the stored root does not parse: {e}")))?;
            let record = SnapshotRecord {
                name: snapshot.to_owned(),
                created_ms: self.now(),
                highest_segment: parsed.highest_segment().raw(),
                highest_sequence: parsed.highest_sequence().raw(),
                root,
            };
            let mut set = pins.set;
            set.snapshots.push(SnapshotPin {
                name: snapshot.to_owned(),
                commit: record.root.commit,
                highest_segment: record.highest_segment,
            });
            let skey = snapshot_key(&id, snapshot);
            let out = self
                .meta
                .txn(
                    Txn::new()
                        .when(Compare::ModRevision(root_key(&id), rrev))
                        .when(pins.unchanged)
                        .when(Compare::Absent(skey.clone()))
                        .then(Op::Put { key: skey, value: enc(&record), lease: None })
                        .then(Op::Put { key: snapset_key(&id), value: enc(&set), lease: None }),
                )
                .await?;
            if out.succeeded {
                tracing::info!(
                    "volume {volume}: snapshot {snapshot} of (epoch {}, commit {})",
                    record.root.epoch,
                    record.root.commit
                );
                let info = self.snapshot_infos(&v).await?.into_iter().find(|i| i.name == snapshot);
                return info.map(DirResponse::Snapshot).ok_or_else(|| {
                    Remote::new(ErrorKind::Conflict, format!("snapshot {snapshot} was deleted meanwhile"))
                });
            }
            // A commit (or another snapshot) came between: take it again.
        }
        Err(Remote::new(ErrorKind::Conflict, format!("volume {volume} kept changing: try again")))
    }

    pub(super) async fn list_snapshots(&self, volume: &str) -> Result<DirResponse, Remote> {
        let v = self.volume(volume).await?;
        Ok(DirResponse::Snapshots(self.snapshot_infos(&v).await?))
    }

    /// The volume's snapshots as `volume snapshots` shows them, oldest
    /// first. `reaches` and `exclusive` count the volume's own records (a
    /// clone's inherited segments are counted by its ancestor's snapshot).
    async fn snapshot_infos(&self, v: &VolumeRecord) -> Result<Vec<SnapshotInfo>, Remote> {
        let id = v.spec.id;
        let pins = self.snapshot_pins(&id).await?.set.snapshots;
        let mut infos = Vec::with_capacity(pins.len());
        for p in &pins {
            let Some((r, _)) = self.snapshot_record(&id, &p.name).await? else {
                return Err(internal(format!(
                    "volume {}: snapshot {} is listed but has no record",
                    v.spec.name, p.name
                )));
            };
            infos.push(SnapshotInfo {
                name: r.name,
                created_ms: r.created_ms,
                epoch: r.root.epoch,
                commit: r.root.commit,
                highest_segment: r.highest_segment,
                reaches: 0,
                exclusive: 0,
                clones: Vec::new(),
            });
        }
        if pins.is_empty() {
            return Ok(infos);
        }
        let kept = self.kept_segments(&id).await?;
        let prefix = segment_prefix(&id);
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.meta.list_range(&prefix, after.as_deref(), PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for e in page {
                let seg = parse_segment_key(&prefix, &e.key)
                    .ok_or_else(|| internal(format!("a malformed segment key {:?}", e.key)))?;
                let record = SegmentRecord::decode(&e.value)
                    .map_err(|e| internal(format!("volume {}: segment {seg}: {e}", v.spec.name)))?;
                let bytes = stored_len(&v.spec, &record);
                // The head's records were not dropped: as if at the end of time.
                let dropped_at = kept.get(&seg).map_or(u64::MAX, |k| k.dropped_at);
                let reached: Vec<usize> =
                    (0..pins.len()).filter(|&i| pins[i].pins(seg, dropped_at)).collect();
                for &i in &reached {
                    infos[i].reaches += bytes;
                }
                if kept.contains_key(&seg) && reached.len() == 1 {
                    infos[reached[0]].exclusive += bytes;
                }
            }
        }
        for (snapshot, clone) in self.clones_of(&id, None).await? {
            if let Some(i) = infos.iter_mut().find(|i| i.name == snapshot) {
                i.clones.push(clone);
            }
        }
        Ok(infos)
    }

    pub(super) async fn snapshot_root(&self, volume: &str, snapshot: &str) -> Result<DirResponse, Remote> {
        let v = self.volume(volume).await?;
        match self.snapshot_record(&v.spec.id, snapshot).await? {
            Some((r, _)) => Ok(DirResponse::Root(Some(r.root))),
            None => Err(no_snapshot(volume, snapshot)),
        }
    }

    /// Deletes a snapshot (not while a clone is made from it), then
    /// releases what only it pinned. Runs the sweep even when the
    /// snapshot is gone already, so a deletion that stopped halfway is
    /// finished by asking again (which then answers `NotFound`).
    pub(super) async fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<DirResponse, Remote> {
        let v = self.volume(volume).await?;
        let id = v.spec.id;
        let mut found = false;
        for attempt in 0.. {
            let Some((_, srev)) = self.snapshot_record(&id, snapshot).await? else { break };
            let clones: Vec<String> =
                self.clones_of(&id, Some(snapshot)).await?.into_iter().map(|(_, c)| c).collect();
            if !clones.is_empty() {
                return Err(Remote::new(
                    ErrorKind::Conflict,
                    format!(
                        "snapshot {volume}@{snapshot} has clones ({}): delete them first, they read its segments",
                        clones.join(", ")
                    ),
                ));
            }
            let pins = self.snapshot_pins(&id).await?;
            let mut set = pins.set;
            set.snapshots.retain(|p| p.name != snapshot);
            let skey = snapshot_key(&id, snapshot);
            // A clone made meanwhile rewrites the snapshot's record, so
            // this compare refuses the deletion and the next look finds it.
            let mut txn = Txn::new()
                .when(Compare::ModRevision(skey.clone(), srev))
                .when(pins.unchanged)
                .then(Op::Delete { key: skey });
            txn = txn.then(if set.snapshots.is_empty() {
                Op::Delete { key: snapset_key(&id) }
            } else {
                Op::Put { key: snapset_key(&id), value: enc(&set), lease: None }
            });
            if self.meta.txn(txn).await?.succeeded {
                found = true;
                tracing::info!("volume {volume}: snapshot {snapshot} deleted");
                break;
            }
            if attempt >= 16 {
                return Err(Remote::new(
                    ErrorKind::Conflict,
                    format!("volume {volume} kept changing: try again"),
                ));
            }
        }
        let released = self.sweep_kept(&id).await?;
        if released > 0 {
            tracing::info!("volume {volume}: {released} segments no snapshot pins any more were dropped");
        }
        if found { Ok(DirResponse::Done) } else { Err(no_snapshot(volume, snapshot)) }
    }

    /// Moves to `dead/` every kept record of the volume that no snapshot
    /// pins any more, a page per transaction; how many.
    pub(super) async fn sweep_kept(&self, volume: &[u8; VOLUME_ID_LEN]) -> Result<u64, Remote> {
        let prefix = kept_prefix(volume);
        let mut released = 0;
        let mut after: Option<Vec<u8>> = None;
        let mut retries = 0;
        loop {
            let pins = self.snapshot_pins(volume).await?;
            let page = self.meta.list_range(&prefix, after.as_deref(), PAGE).await?;
            let Some(last) = page.last() else { break };
            let last = last.key.clone();
            let now = self.now();
            let mut txn = Txn::new().when(pins.unchanged);
            for e in &page {
                let seg = parse_segment_key(&prefix, &e.key)
                    .ok_or_else(|| internal(format!("a malformed kept-segment key {:?}", e.key)))?;
                let kept: KeptSegment = dec("kept segment", &e.value)?;
                if pins.set.snapshots.iter().any(|p| p.pins(seg, kept.dropped_at)) {
                    continue;
                }
                // A rollback may revive it meanwhile: compare the marker.
                txn = txn
                    .when(Compare::ModRevision(e.key.clone(), e.mod_revision))
                    .then(Op::Delete { key: e.key.clone() });
                let skey = segment_key(volume, seg);
                if let Some(s) = self.meta.get(&skey).await? {
                    let record = SegmentRecord::decode(&s.value).map_err(|e| {
                        internal(format!("segment {seg} of volume {}: {e}", hex::encode(volume)))
                    })?;
                    let dead = DeadSegment { dropped_ms: now, record };
                    txn = txn
                        .when(Compare::ModRevision(skey.clone(), s.mod_revision))
                        .then(Op::Put { key: dead_key(volume, seg), value: enc(&dead), lease: None })
                        .then(Op::Delete { key: skey });
                }
            }
            let moving = txn.ops.iter().filter(|op| matches!(op, Op::Put { .. })).count() as u64;
            if txn.ops.is_empty() || self.meta.txn(txn).await?.succeeded {
                released += moving;
                after = Some(last);
                retries = 0;
                continue;
            }
            retries += 1;
            if retries > 16 {
                return Err(Remote::new(
                    ErrorKind::Conflict,
                    format!("volume {}: the kept segments kept changing: try again", hex::encode(volume)),
                ));
            }
        }
        Ok(released)
    }

    /// A clone of `spec.lineage[0]`'s snapshot, starting from `sealed`.
    pub(super) async fn clone_volume(
        &self,
        spec: VolumeSpec,
        sealed: Vec<u8>,
    ) -> Result<DirResponse, Remote> {
        check_spec(&spec)?;
        let name = spec.name.clone();
        let Some(from) = spec.lineage.first().cloned() else {
            return Err(invalid(format!(
                "clone {name}: its lineage is empty: it must name the parent and snapshot"
            )));
        };
        let parent = self.volume(&from.volume).await?;
        let what = format!("clone {name} of {}@{}", from.volume, from.snapshot);
        if parent.spec.id != from.id {
            return Err(invalid(format!(
                "{what}: the lineage names volume id {}, but {} is {}",
                hex::encode(from.id),
                from.volume,
                hex::encode(parent.spec.id)
            )));
        }
        let Some((snap, srev)) = self.snapshot_record(&parent.spec.id, &from.snapshot).await? else {
            return Err(no_snapshot(&from.volume, &from.snapshot));
        };
        if (from.highest_segment, from.highest_sequence) != (snap.highest_segment, snap.highest_sequence) {
            return Err(invalid(format!(
                "{what}: the lineage says highest segment {} and sequence {}, the snapshot's root {} and {}",
                from.highest_segment, from.highest_sequence, snap.highest_segment, snap.highest_sequence
            )));
        }
        if spec.lineage[1..] != parent.spec.lineage[..] {
            return Err(invalid(format!(
                "{what}: the lineage after the parent must be the parent's own ({} ancestors), as recorded",
                parent.spec.lineage.len()
            )));
        }
        let (p, c) = (&parent.spec, &spec);
        if (c.size, c.k, c.m, c.shard_size) != (p.size, p.k, p.m, p.shard_size) {
            return Err(invalid(format!(
                "{what}: a clone has its parent's geometry (size {}, k={}, m={}, shard size {}), not size {}, k={}, m={}, shard size {}",
                p.size, p.k, p.m, p.shard_size, c.size, c.k, c.m, c.shard_size
            )));
        }
        let root = UnverifiedRoot::parse(&sealed)
            .map_err(|e| invalid(format!("{what}: the root does not parse: {e}")))?;
        if root.volume_id() != &spec.id {
            return Err(invalid(format!(
                "{what}: the root is for volume id {}, not the clone's ({})",
                hex::encode(root.volume_id()),
                hex::encode(spec.id)
            )));
        }
        // The clone's writers start above the snapshot's epoch: its
        // record starts there, and the root claims it.
        if (root.epoch(), root.commit()) != (snap.root.epoch, 1) {
            return Err(invalid(format!(
                "{what}: the root must be at the snapshot's epoch {} with commit 1, not (epoch {}, commit {})",
                snap.root.epoch,
                root.epoch(),
                root.commit()
            )));
        }
        if (root.highest_segment().raw(), root.highest_sequence().raw())
            != (snap.highest_segment, snap.highest_sequence)
        {
            return Err(invalid(format!(
                "{what}: the root's highest segment and sequence must be the snapshot's ({} and {}), not {} and {}",
                snap.highest_segment,
                snap.highest_sequence,
                root.highest_segment().raw(),
                root.highest_sequence().raw()
            )));
        }
        let state = RootState { sealed, epoch: root.epoch(), commit: 1 };
        let record = VolumeRecord { spec, epoch: state.epoch, created_ms: self.now() };
        let skey = snapshot_key(&parent.spec.id, &from.snapshot);
        // Rewriting the snapshot's record (unchanged) makes a deletion of
        // it racing this clone fail its compare.
        let more = Txn::new()
            .when(Compare::ModRevision(skey.clone(), srev))
            .when(Compare::Absent(root_key(&record.spec.id)))
            .then(Op::Put { key: skey, value: enc(&snap), lease: None })
            .then(Op::Put { key: root_key(&record.spec.id), value: enc(&state), lease: None });
        let out = self.store_volume(record, more).await?;
        tracing::info!("{what} created");
        Ok(out)
    }

    /// Rolls `volume` back to `snapshot` (see the module documentation).
    /// The markers to remove are read before the transaction, which
    /// compares the root, the lease and the snapshot set but not every
    /// marker: the writer (the only one who drops) must not drop segments
    /// while it rolls back.
    pub(super) async fn rollback(
        &self,
        who: &str,
        volume: &str,
        snapshot: &str,
        epoch: u64,
        expected: (u64, u64),
        sealed: Vec<u8>,
    ) -> Result<DirResponse, Remote> {
        let vkey = key("volumes", volume);
        let Some((v, vrev)) = self.get::<VolumeRecord>("volume", &vkey).await? else {
            return Err(Remote::new(ErrorKind::NotFound, format!("no volume named {volume}")));
        };
        let lease_unchanged = self.check_writer(who, &v, epoch).await?;
        let id = v.spec.id;
        let Some((snap, srev)) = self.snapshot_record(&id, snapshot).await? else {
            return Err(no_snapshot(volume, snapshot));
        };
        let root = UnverifiedRoot::parse(&sealed)
            .map_err(|e| invalid(format!("volume {volume}: the rollback's root does not parse: {e}")))?;
        if root.volume_id() != &id {
            return Err(invalid(format!(
                "the rollback's root is for volume id {}, not volume {volume}'s ({})",
                hex::encode(root.volume_id()),
                hex::encode(id)
            )));
        }
        if root.epoch() != epoch {
            return Err(invalid(format!(
                "volume {volume}: the rollback's root is sealed at epoch {}, by a writer at epoch {epoch}",
                root.epoch()
            )));
        }
        let commit = expected.1.checked_add(1).ok_or_else(|| invalid("commit numbers are exhausted"))?;
        if root.commit() != commit {
            return Err(invalid(format!(
                "volume {volume}: the rollback's root has commit {}, but it replaces ({}) so it must be {commit}",
                root.commit(),
                show(Some(expected))
            )));
        }
        // The markers of what the snapshot pins: the head reaches those
        // records again.
        let pin = SnapshotPin {
            name: snap.name.clone(),
            commit: snap.root.commit,
            highest_segment: snap.highest_segment,
        };
        let mut revive: Vec<Vec<u8>> = self
            .kept_segments(&id)
            .await?
            .into_iter()
            .filter(|(seg, k)| pin.pins(*seg, k.dropped_at))
            .map(|(seg, _)| kept_key(&id, seg))
            .collect();
        revive.sort();
        let rkey = root_key(&id);
        let skey = snapshot_key(&id, snapshot);
        let current = self.get::<RootState>("root", &rkey).await?;
        let Some((now_root, rrev)) = current.filter(|(r, _)| (r.epoch, r.commit) == expected) else {
            let current = self.get::<RootState>("root", &rkey).await?;
            return Err(conflict(volume, Some(expected), current.map(|(r, _)| (r.epoch, r.commit))));
        };
        let head = UnverifiedRoot::parse(&now_root.sealed)
            .map_err(|e| internal(format!("volume {volume}: the stored root does not parse: {e}")))?;
        if root.highest_segment() < head.highest_segment()
            || root.highest_sequence() < head.highest_sequence()
        {
            return Err(invalid(format!(
                "volume {volume}: the rollback's root claims highest segment {} and sequence {}, below the current root's ({} and {}): a rollback keeps the head's (a sequence is never reused, and new segments stay above every record)",
                root.highest_segment(),
                root.highest_sequence(),
                head.highest_segment(),
                head.highest_sequence()
            )));
        }
        // More markers than one transaction takes: the first ones go
        // before, under the lease (too early only over-pins, see above).
        while revive.len() > REVIVE_IN_COMMIT {
            let rest = revive.split_off(REVIVE_IN_COMMIT);
            let page = std::mem::replace(&mut revive, rest);
            let mut txn =
                Txn::new().when(lease_unchanged.clone()).when(Compare::ModRevision(skey.clone(), srev));
            txn.ops = page.into_iter().map(|key| Op::Delete { key }).collect();
            if !self.meta.txn(txn).await?.succeeded {
                let v = self.volume(volume).await?;
                self.check_writer(who, &v, epoch).await?;
                return Err(Remote::new(
                    ErrorKind::Conflict,
                    format!("volume {volume}: snapshot {snapshot} changed during the rollback; try again"),
                ));
            }
        }
        let state = RootState { sealed, epoch, commit };
        let pins = self.snapshot_pins(&id).await?;
        let mut txn = Txn::new();
        if epoch == 0 {
            txn = txn.when(Compare::ModRevision(vkey.clone(), vrev));
        }
        txn = txn
            .when(lease_unchanged)
            .when(Compare::ModRevision(rkey.clone(), rrev))
            .when(Compare::ModRevision(skey, srev))
            .when(pins.unchanged)
            .then(Op::Put { key: rkey.clone(), value: enc(&state), lease: None });
        txn.ops.extend(revive.into_iter().map(|key| Op::Delete { key }));
        if !self.commit_grouped(txn).await?.succeeded {
            let v = self.volume(volume).await?;
            self.check_writer(who, &v, epoch).await?;
            let now = self.get::<RootState>("root", &rkey).await?.map(|(r, _)| (r.epoch, r.commit));
            if now != Some(expected) {
                return Err(conflict(volume, Some(expected), now));
            }
            return Err(Remote::new(
                ErrorKind::Conflict,
                format!("volume {volume}: its snapshots changed during the rollback; try again"),
            ));
        }
        tracing::info!("volume {volume}: rolled back to snapshot {snapshot} as commit {commit}");
        Ok(DirResponse::Committed { commit })
    }
}
