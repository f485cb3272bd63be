//! The volumes' records: each volume's root, swapped by
//! compare-and-set; its live segments' records; where new segments go; and
//! the grouping that makes many commits one durable write.
//!
//! The directory never has a volume key. It parses a new root with
//! [`UnverifiedRoot`] only to check what it can check without the key (the
//! volume id, the writer's epoch, the commit number one above the root it
//! replaces) and keeps it as it came ([`RootState`]); the attach verifies
//! the MAC and its freshness.
//!
//! A [`RootCommit`] is one transaction: the volume record and the writer's
//! lease as read ([`Directory::check_writer`]), the current root as
//! expected (absent, or at the mod revision read after checking its
//! (epoch, commit)), then the new root, the new segment records and the
//! dropped ones. Commits are **grouped** ([`CommitQueue`]): whoever finds
//! no batch being made durable takes every commit waiting and applies them
//! with [`MetaStore::txn_batch`], one write transaction, one fsync; the
//! commits arriving meanwhile wait and go together in the next one. Each
//! commit's compares see the commits before it in its batch, so two
//! commits of one root in one batch cannot both succeed: the second sees
//! the first's root and is refused `Conflict`.
//!
//! A dropped segment's record is not deleted but moved to `dead/` with
//! the time (the same transaction), where the collector erases its shards
//! after the collection grace; or, while a snapshot pins it, it stays and
//! is marked `kept/` (`snapshots.rs` says which snapshot pins what). A
//! clone's segment ids up to its parent's snapshot's highest are its
//! ancestors' records ([`owner`]): read from there, never dropped by it. A commit may add only segments above
//! max(the replaced root's highest segment, the volume's floor): the
//! attach allocates every new id above its root's (invariant 8), and the
//! collector raises the floor before it erases a shard nobody recorded,
//! so a commit that was in flight longer than the grace can never record
//! an erased segment (it is refused `Invalid`). The commit compares the
//! floor as read; if the collector raises it meanwhile, the commit is
//! checked again against the new floor.

use std::collections::HashSet;

use tokio::sync::oneshot;

use super::Directory;
use super::meta::{self, Compare, MetaStore, Op, Txn, TxnOutcome};
use super::placement::choose_at_least;
use super::schema::*;
use crate::api::*;
use crate::codec::root::UnverifiedRoot;
use crate::codec::sequence::SegmentId;

/// The room a placement needs on each peer: a shard, and what must stay
/// free beside it (compaction's reserve, for commits of new writes).
#[derive(Clone, Copy, Debug)]
pub(super) struct Room {
    pub(super) shard_bytes: u64,
    pub(super) keep_free: u64,
}

/// Commits waiting for the next durable batch, and whose turn it is to
/// make one.
#[derive(Default)]
pub(super) struct CommitQueue {
    waiting: std::sync::Mutex<Vec<Pending>>,
    /// Held while a batch is being made durable.
    turn: tokio::sync::Mutex<()>,
}

struct Pending {
    txn: Txn,
    done: oneshot::Sender<Result<TxnOutcome, Remote>>,
}

impl CommitQueue {
    /// How many commits wait for the next batch (tests watch it).
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.waiting.lock().expect("not poisoned").len()
    }

    /// Holds the turn, so commits pile up until it is dropped (tests).
    #[cfg(test)]
    pub(super) async fn hold(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.turn.lock().await
    }
}

/// The writes that drop segment records, and the compares that keep the
/// records moved to `dead/` as they were read.
pub(super) struct Drops {
    pub(super) ops: Vec<Op>,
    pub(super) unchanged: Vec<Compare>,
}

/// A volume's segment floor (`segfloor/`): no new segment record at or
/// below `id`.
pub(super) struct Floor {
    pub(super) id: SegmentId,
    pub(super) unchanged: Compare,
}

/// Whose record segment `id` of volume `spec` is: a clone's own above
/// its parent's snapshot's highest segment, below it the ancestor's
/// whose range holds it (nearest first: ids up to `lineage[i]`'s highest
/// and above `lineage[i + 1]`'s belong to `lineage[i]`).
pub(super) fn owner(spec: &VolumeSpec, id: SegmentId) -> &[u8; VOLUME_ID_LEN] {
    let id = id.raw();
    let mut owner = &spec.id;
    for a in &spec.lineage {
        if id > a.highest_segment {
            break;
        }
        owner = &a.id;
    }
    owner
}

fn invalid(message: impl Into<String>) -> Remote {
    Remote::new(ErrorKind::Invalid, message)
}

fn not_found(volume: &str) -> Remote {
    Remote::new(ErrorKind::NotFound, format!("no volume named {volume}"))
}

pub(super) fn show(root: Option<(u64, u64)>) -> String {
    match root {
        Some((epoch, commit)) => format!("epoch {epoch}, commit {commit}"),
        None => "none".into(),
    }
}

/// The root is not the one the commit replaces: another commit won.
pub(super) fn conflict(volume: &str, expected: Option<(u64, u64)>, current: Option<(u64, u64)>) -> Remote {
    Remote::new(
        ErrorKind::Conflict,
        format!(
            "volume {volume}: this commit replaces the root ({}) but the directory's root is ({}): another commit got there first; read the root again",
            show(expected),
            show(current)
        ),
    )
}

impl<S: MetaStore> Directory<S> {
    /// Applies `txn` in the next durable batch of commits and returns its
    /// outcome. Whoever gets the turn commits everything waiting (its own
    /// commit may already have gone in an earlier batch; then it finds
    /// nothing to do). If that caller is cancelled mid-batch, the batch's
    /// other callers get an error saying the outcome is unknown.
    pub(super) async fn commit_grouped(&self, txn: Txn) -> Result<TxnOutcome, Remote> {
        let (done, outcome) = oneshot::channel();
        self.commits.waiting.lock().expect("not poisoned").push(Pending { txn, done });
        {
            let _turn = self.commits.turn.lock().await;
            let batch = std::mem::take(&mut *self.commits.waiting.lock().expect("not poisoned"));
            if !batch.is_empty() {
                let (txns, senders): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.txn, p.done)).unzip();
                match self.meta.txn_batch(txns).await {
                    Ok(outs) => {
                        for (s, out) in senders.into_iter().zip(outs) {
                            let _ = s.send(out.map_err(Remote::from));
                        }
                    }
                    Err(e) => {
                        let e = Remote::from(e);
                        for s in senders {
                            let _ = s.send(Err(e.clone()));
                        }
                    }
                }
            }
        }
        outcome.await.unwrap_or_else(|_| {
            Err(internal(
                "the batch carrying this commit was abandoned: its outcome is unknown; read the root",
            ))
        })
    }

    pub(super) async fn get_root(&self, volume: &str) -> Result<DirResponse, Remote> {
        let v = self.volume(volume).await?;
        Ok(DirResponse::Root(self.get::<RootState>("root", &root_key(&v.spec.id)).await?.map(|(r, _)| r)))
    }

    pub(super) async fn commit_root(&self, who: &str, c: RootCommit) -> Result<DirResponse, Remote> {
        let RootCommit { volume, epoch, expected, sealed, segments, dropped } = c;
        let vkey = key("volumes", &volume);
        let Some((v, vrev)) = self.get::<VolumeRecord>("volume", &vkey).await? else {
            return Err(not_found(&volume));
        };
        let lease_unchanged = self.check_writer(who, &v, epoch).await?;
        if segments.len() > MAX_COMMIT_SEGMENTS {
            return Err(invalid(format!(
                "volume {volume}: a commit may add at most {MAX_COMMIT_SEGMENTS} segment records, not {}",
                segments.len()
            )));
        }
        let ops = 1 + segments.len() + dropped.len();
        if ops > MAX_COMMIT_OPS {
            return Err(invalid(format!(
                "volume {volume}: a commit may make at most {MAX_COMMIT_OPS} writes (the root, new and dropped segment records), not {ops}"
            )));
        }
        let root = UnverifiedRoot::parse(&sealed)
            .map_err(|e| invalid(format!("volume {volume}: the new root does not parse: {e}")))?;
        if root.volume_id() != &v.spec.id {
            return Err(invalid(format!(
                "the new root is for volume id {}, not volume {volume}'s ({})",
                hex::encode(root.volume_id()),
                hex::encode(v.spec.id)
            )));
        }
        if root.epoch() != epoch {
            return Err(invalid(format!(
                "volume {volume}: the new root is sealed at epoch {}, by a writer at epoch {epoch}",
                root.epoch()
            )));
        }
        let next = match expected {
            Some((_, c)) => c.checked_add(1).ok_or_else(|| invalid("commit numbers are exhausted"))?,
            None => 1,
        };
        if root.commit() != next {
            return Err(invalid(format!(
                "volume {volume}: the new root has commit {}, but it replaces ({}) so it must be {next}",
                root.commit(),
                show(expected)
            )));
        }
        let commit = root.commit();
        let rkey = root_key(&v.spec.id);
        let mut named: HashSet<SegmentId> = HashSet::new();
        let mut records = Vec::with_capacity(segments.len());
        for (id, record) in &segments {
            if !named.insert(*id) {
                return Err(invalid(format!("volume {volume}: the commit names segment {id} twice")));
            }
            let value =
                record.encode().map_err(|e| invalid(format!("volume {volume}: segment {id}: {e}")))?;
            records.push(Op::Put { key: segment_key(&v.spec.id, *id), value, lease: None });
        }
        for id in &dropped {
            if !named.insert(*id) {
                return Err(invalid(format!("volume {volume}: the commit names segment {id} twice")));
            }
        }
        // The collector may raise the floor, and a snapshot may be taken or
        // deleted, while this commit waits: the commit then fails its
        // compare and is checked again against what changed (a few times;
        // the floor moves once per collector pass).
        for attempt in 0.. {
            let current = self.get::<RootState>("root", &rkey).await?;
            let root_as_expected = match (&current, expected) {
                (None, None) => Compare::Absent(rkey.clone()),
                (Some((r, rev)), Some(e)) if (r.epoch, r.commit) == e => {
                    Compare::ModRevision(rkey.clone(), *rev)
                }
                _ => return Err(conflict(&volume, expected, current.map(|(r, _)| (r.epoch, r.commit)))),
            };
            let floor = self.segment_floor(&v.spec.id).await?;
            let below = match &current {
                Some((r, _)) => UnverifiedRoot::parse(&r.sealed)
                    .map_err(|e| internal(format!("volume {volume}: the stored root does not parse: {e}")))?
                    .highest_segment(),
                None => SegmentId::ZERO,
            }
            .max(floor.id);
            if let Some((id, _)) = segments.iter().find(|(id, _)| *id <= below) {
                return Err(invalid(format!(
                    "volume {volume}: segment {id} is not above {below} (the highest segment of the root this commit replaces, or of orphan shards the collector erased): a commit adds only segments newer than its root, and this one was in flight longer than the collection grace; attach again"
                )));
            }
            // The segments the new root no longer reaches were last
            // reached by the one it replaces: dropped at `commit`.
            let pins = self.snapshot_pins(&v.spec.id).await?;
            let drops = self.drop_ops(&v.spec, &dropped, commit, &pins.set).await?;
            let records_unchanged = drops.unchanged.clone();
            let state = RootState { sealed: sealed.clone(), epoch, commit };
            // The lease, not the volume record, says who may write: a grant
            // rewrites the lease key, and so fails this compare, while a
            // change of key slots (`volume passwd` during a commit) rewrites
            // only the record and must not fail a commit. Without a lease
            // (epoch 0) the record stands in for it.
            let mut txn = Txn::new();
            if epoch == 0 {
                txn = txn.when(Compare::ModRevision(vkey.clone(), vrev));
            }
            txn = txn
                .when(lease_unchanged.clone())
                .when(root_as_expected)
                .when(floor.unchanged)
                .when(pins.unchanged.clone())
                .then(Op::Put { key: rkey.clone(), value: enc(&state), lease: None });
            txn.compare.extend(drops.unchanged);
            txn.ops.extend(records.iter().cloned());
            txn.ops.extend(drops.ops);
            let bytes: usize = txn
                .ops
                .iter()
                .map(|op| match op {
                    Op::Put { key, value, .. } => key.len() + value.len(),
                    Op::Delete { key } => key.len(),
                    Op::DeletePrefix { prefix } => prefix.len(),
                })
                .sum();
            if bytes > meta::MAX_VALUE {
                return Err(invalid(format!(
                    "volume {volume}: the commit is {bytes} bytes, more than {}",
                    meta::MAX_VALUE
                )));
            }
            let out = self.commit_grouped(txn).await?;
            if out.succeeded {
                break;
            }
            if attempt < 4
                && (self.segment_floor(&v.spec.id).await?.id != floor.id
                    || self.snapshot_pins(&v.spec.id).await?.unchanged != pins.unchanged
                    || !self.still(&records_unchanged).await?)
            {
                continue;
            }
            // Something changed since it was read: say what.
            let v = self.volume(&volume).await?;
            self.check_writer(who, &v, epoch).await?;
            let now = self.get::<RootState>("root", &root_key(&v.spec.id)).await?;
            return Err(conflict(&volume, expected, now.map(|(r, _)| (r.epoch, r.commit))));
        }
        Ok(DirResponse::Committed { commit })
    }

    pub(super) async fn segment_records(
        &self,
        volume: &str,
        ids: &[SegmentId],
    ) -> Result<DirResponse, Remote> {
        if ids.len() > MAX_SEGMENTS_PER_CALL {
            return Err(invalid(format!("at most {MAX_SEGMENTS_PER_CALL} segment records per call")));
        }
        let v = self.volume(volume).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(match self.meta.get(&segment_key(owner(&v.spec, *id), *id)).await? {
                Some(e) => Some(
                    SegmentRecord::decode(&e.value)
                        .map_err(|e| internal(format!("volume {volume}: segment {id}: {e}")))?,
                ),
                None => None,
            });
        }
        Ok(DirResponse::SegmentRecords(out))
    }

    /// Drops segment records outside a commit: the writer holding the
    /// lease at `epoch` says its root no longer reaches them.
    pub(super) async fn drop_segments(
        &self,
        who: &str,
        volume: &str,
        epoch: u64,
        ids: Vec<SegmentId>,
    ) -> Result<DirResponse, Remote> {
        if ids.len() > MAX_COMMIT_OPS {
            return Err(invalid(format!("volume {volume}: drop at most {MAX_COMMIT_OPS} segments per call")));
        }
        let v = self.volume(volume).await?;
        let lease_unchanged = self.check_writer(who, &v, epoch).await?;
        let mut named: HashSet<SegmentId> = HashSet::new();
        for id in &ids {
            if !named.insert(*id) {
                return Err(invalid(format!("volume {volume}: segment {id} is named twice")));
            }
        }
        for _ in 0..4 {
            // The writer's root no longer reaches them: its commit number
            // is (at or after) when they were dropped. Read after the
            // snapshots, so a snapshot taken meanwhile is of this root or
            // a newer one, which does not reach them either.
            let pins = self.snapshot_pins(&v.spec.id).await?;
            let dropped_at = match self.get::<RootState>("root", &root_key(&v.spec.id)).await? {
                Some((r, _)) => r.commit,
                None => 0,
            };
            let mut txn = Txn::new().when(lease_unchanged.clone()).when(pins.unchanged.clone());
            let drops = self.drop_ops(&v.spec, &ids, dropped_at, &pins.set).await?;
            txn.compare.extend(drops.unchanged);
            txn.ops = drops.ops;
            if self.meta.txn(txn).await?.succeeded {
                return Ok(DirResponse::Done);
            }
            let v = self.volume(volume).await?;
            self.check_writer(who, &v, epoch).await?;
        }
        Err(Remote::new(
            ErrorKind::Conflict,
            format!("volume {volume}: the lease or the snapshots changed while dropping segments; try again"),
        ))
    }

    /// The ids of `volume`'s segment records after `after`, at most `limit`.
    pub(super) async fn list_segments(
        &self,
        volume: &str,
        after: Option<u64>,
        limit: u32,
    ) -> Result<DirResponse, Remote> {
        if limit == 0 || limit as usize > MAX_SEGMENTS_PER_CALL {
            return Err(invalid(format!("list 1 to {MAX_SEGMENTS_PER_CALL} segments per call, not {limit}")));
        }
        let v = self.volume(volume).await?;
        let prefix = segment_prefix(&v.spec.id);
        let mut start = after.map(|a| segment_key(&v.spec.id, SegmentId::from_raw(a)));
        let mut out = Vec::new();
        // The head's records only: those it dropped that a snapshot keeps
        // are skipped, and the page filled past them (a short page is
        // the last).
        while out.len() < limit as usize {
            let page = self.meta.list_range(&prefix, start.as_deref(), limit as usize - out.len()).await?;
            let Some(last) = page.last() else { break };
            start = Some(last.key.clone());
            for e in page {
                let id = parse_segment_key(&prefix, &e.key).ok_or_else(|| {
                    internal(format!("volume {volume}: a malformed segment key {:?}", e.key))
                })?;
                if self.meta.get(&kept_key(&v.spec.id, id)).await?.is_none() {
                    out.push(id);
                }
            }
        }
        Ok(DirResponse::SegmentIds(out))
    }

    /// Whether every `ModRevision` compare in `compares` still holds.
    pub(super) async fn still(&self, compares: &[Compare]) -> Result<bool, Remote> {
        for c in compares {
            if let Compare::ModRevision(k, rev) = c
                && self.meta.get(k).await?.map(|e| e.mod_revision) != Some(*rev)
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The writes that drop `ids`' records, which the head no longer
    /// reaches since its commit `dropped_at`. A record a snapshot of `set`
    /// pins stays, marked `kept/`; any other moves to `dead/`, stamped
    /// with the time, where the collector erases its shards once the grace
    /// is over. A record already marked kept keeps its mark (it was
    /// dropped earlier: the earlier commit is the true one). A clone's
    /// inherited segments (ids up to its parent's snapshot's highest) are
    /// not its records: nothing is written for them. Read outside the
    /// transaction: only the writer adds or drops its volume's records, the
    /// caller compares the snapshot set as read, and a record dropped twice
    /// meanwhile is queued twice, harmlessly (one key). Repair rewrites
    /// records (new holders): the caller also compares each record moved
    /// to `dead/` as read ([`Drops::unchanged`]), so the `dead/` entry
    /// names the holders the collector must erase.
    pub(super) async fn drop_ops(
        &self,
        spec: &VolumeSpec,
        ids: &[SegmentId],
        dropped_at: u64,
        set: &SnapshotSet,
    ) -> Result<Drops, Remote> {
        let volume = &spec.id;
        let now = self.now();
        let mut ops = Vec::with_capacity(2 * ids.len());
        let mut unchanged = Vec::new();
        for &id in ids {
            if owner(spec, id) != volume {
                continue;
            }
            let skey = segment_key(volume, id);
            let Some(e) = self.meta.get(&skey).await? else {
                ops.push(Op::Delete { key: skey });
                continue;
            };
            let kkey = kept_key(volume, id);
            if self.meta.get(&kkey).await?.is_some() {
                continue;
            }
            if set.snapshots.iter().any(|p| p.pins(id, dropped_at)) {
                let kept = KeptSegment { dropped_at, dropped_ms: now };
                ops.push(Op::Put { key: kkey, value: enc(&kept), lease: None });
                continue;
            }
            let record = SegmentRecord::decode(&e.value)
                .map_err(|e| internal(format!("segment {id} of volume {}: {e}", hex::encode(volume))))?;
            let dead = DeadSegment { dropped_ms: now, record };
            unchanged.push(Compare::ModRevision(skey.clone(), e.mod_revision));
            ops.push(Op::Put { key: dead_key(volume, id), value: enc(&dead), lease: None });
            ops.push(Op::Delete { key: skey });
        }
        Ok(Drops { ops, unchanged })
    }

    /// The volume's segment floor and the compare that keeps it as read.
    pub(super) async fn segment_floor(&self, volume: &[u8; VOLUME_ID_LEN]) -> Result<Floor, Remote> {
        let fkey = floor_key(volume);
        Ok(match self.meta.get(&fkey).await? {
            Some(e) => {
                let raw: [u8; 8] = e.value.as_slice().try_into().map_err(|_| {
                    internal(format!("volume {}: a corrupt segment floor", hex::encode(volume)))
                })?;
                Floor {
                    id: SegmentId::from_raw(u64::from_be_bytes(raw)),
                    unchanged: Compare::ModRevision(fkey, e.mod_revision),
                }
            }
            None => Floor { id: SegmentId::ZERO, unchanged: Compare::Absent(fkey) },
        })
    }

    pub(super) async fn peer_slots(&self, ids: &[u16]) -> Result<DirResponse, Remote> {
        if ids.len() > MAX_SEGMENTS_PER_CALL {
            return Err(invalid(format!("at most {MAX_SEGMENTS_PER_CALL} peer ids per call")));
        }
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            let Some(e) = self.meta.get(&peer_slot_key(id)).await? else {
                out.push(None);
                continue;
            };
            let name = String::from_utf8_lossy(&e.value).into_owned();
            out.push(
                self.get::<PeerRecord>("peer", &key("peers", &name))
                    .await?
                    .map(|(r, _)| PeerSlot { id, addr: PeerAddr { name, addr: r.report.addr } }),
            );
        }
        Ok(DirResponse::PeerSlots(out))
    }

    /// Places `count` segments: each on k + m distinct peers that are up,
    /// not excluded, with the room asked for (counting the segments placed
    /// before it in this call). Nothing is reserved or written.
    pub(super) async fn place_segments(
        &self,
        who: &str,
        volume: &str,
        epoch: u64,
        count: u32,
        room: Room,
        exclude: &[u16],
    ) -> Result<DirResponse, Remote> {
        let Room { shard_bytes, keep_free } = room;
        if count == 0 || count as usize > MAX_SEGMENTS_PER_CALL {
            return Err(invalid(format!(
                "place 1 to {MAX_SEGMENTS_PER_CALL} segments per call, not {count}"
            )));
        }
        let v = self.volume(volume).await?;
        self.check_writer(who, &v, epoch).await?;
        let (up, candidates) = self.candidates(who).await?;
        let known = self.peer_ids().await?;
        let mut open = Vec::new();
        for ((name, rec), c) in up.into_iter().zip(candidates) {
            // A peer without an id gets one at its next heartbeat (or was
            // removed just now): not a candidate meanwhile.
            let Some(&id) = known.get(&name) else { continue };
            if !exclude.contains(&id) {
                let full = self.above_high_water(&rec.report);
                open.push((PeerSlot { id, addr: PeerAddr { name, addr: rec.report.addr } }, c, full));
            }
        }
        let n = usize::from(v.spec.k) + usize::from(v.spec.m);
        // Fewer than k + m peers up: the segment goes to those there are,
        // down to its write quorum (k + 1); repair stores the rest later.
        let quorum = usize::from(v.spec.k) + 1;
        let mut placements = Vec::with_capacity(count as usize);
        let mut candidates: Vec<_> = open.iter().map(|(_, c, _)| c.clone()).collect();
        // Peers above the high-water mark take shards only when the others
        // cannot take all k + m: shedding them would be pointless
        // otherwise, but a full cluster still fills to the last byte.
        let roomy: Vec<usize> = (0..open.len()).filter(|&i| !open[i].2).collect();
        for _ in 0..count {
            let need = shard_bytes.saturating_add(keep_free);
            let preferred = if roomy.len() < open.len() && roomy.len() >= n {
                let some: Vec<_> = roomy.iter().map(|&i| candidates[i].clone()).collect();
                choose_at_least(&some, n, n, need, || self.random())
                    .ok()
                    .map(|picked| picked.into_iter().map(|j| roomy[j]).collect::<Vec<usize>>())
            } else {
                None
            };
            let picked = match preferred {
                Some(picked) => picked,
                None => {
                    // Too few peers up is an outage (it passes when they
                    // return); enough up but too few with room is a full
                    // cluster.
                    let kind = if candidates.len() < quorum.min(n) {
                        ErrorKind::Unavailable
                    } else {
                        ErrorKind::Full
                    };
                    choose_at_least(&candidates, n, quorum, need, || self.random()).map_err(|e| {
                        Remote::new(
                            kind,
                            format!("volume {volume}: {e} (not counting {} excluded)", exclude.len()),
                        )
                    })?
                }
            };
            for &i in &picked {
                candidates[i].free = candidates[i].free.saturating_sub(shard_bytes);
            }
            placements.push(SegmentPlacement { peers: picked.iter().map(|&i| open[i].0.clone()).collect() });
        }
        Ok(DirResponse::SegmentPlacements(placements))
    }
}
