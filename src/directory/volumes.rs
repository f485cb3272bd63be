//! Volumes: creating, describing and deleting them, and the write lease
//! that lets one writer at a time commit a volume's root. Each lease
//! raises the volume's epoch; a writer that was taken over holds an old
//! epoch and is refused here ([`Directory::check_writer`]) as on the peers.

use super::Directory;
use super::meta::{self, Compare, MetaError, MetaStore, Op, Txn};
use super::schema::*;
use crate::api::*;
use crate::codec::segment::SegmentGeometry;
use crate::codec::segment::header::header_len;
use crate::codec::sequence::SegmentId;
use crate::membership::ca::check_label;

/// Store entries read per page when walking a volume's records.
const PAGE: usize = 1000;

impl<S: MetaStore> Directory<S> {
    pub(super) async fn create_volume(&self, spec: VolumeSpec) -> Result<DirResponse, Remote> {
        if !spec.lineage.is_empty() {
            return Err(Remote::new(
                ErrorKind::Invalid,
                "a new volume has no lineage: a clone is made by `volume clone` (CloneVolume)",
            ));
        }
        check_spec(&spec)?;
        let record = VolumeRecord { spec, epoch: 0, created_ms: self.now() };
        self.store_volume(record, Txn::new()).await
    }

    /// Stores a new volume's record (checked by [`check_spec`]) and its
    /// `ids/` entry, with whatever `more` compares and writes (a clone's
    /// root): refused `Conflict` if the name or the id is taken.
    pub(super) async fn store_volume(&self, record: VolumeRecord, more: Txn) -> Result<DirResponse, Remote> {
        let k = key("volumes", &record.spec.name);
        let ikey = id_key(&record.spec.id);
        let name = record.spec.name.clone();
        let mut txn = Txn::new()
            .when(Compare::Absent(k.clone()))
            .when(Compare::Absent(ikey.clone()))
            .when(Compare::Absent(gc_key(&record.spec.id)))
            .then(Op::Put { key: k.clone(), value: enc(&record), lease: None })
            .then(Op::Put { key: ikey.clone(), value: name.as_bytes().to_vec(), lease: None });
        txn.compare.extend(more.compare);
        txn.ops.extend(more.ops);
        let out = self.meta.txn(txn).await?;
        if !out.succeeded {
            let why = if self.meta.get(&k).await?.is_some() {
                format!("a volume named {name} exists already")
            } else if self.meta.get(&ikey).await?.is_some()
                || self.meta.get(&gc_key(&record.spec.id)).await?.is_some()
            {
                "that volume id is taken: volume ids must be new random numbers".to_string()
            } else {
                format!("what volume {name} was made from changed meanwhile: try again")
            };
            return Err(Remote::new(ErrorKind::Conflict, why));
        }
        tracing::info!("volume {name} created");
        Ok(DirResponse::Volume(record))
    }

    /// `meshdisk volume passwd`: swaps the volume's key slots if they are
    /// still the ones the caller unlocked. The directory cannot open them
    /// (it never holds a key); it checks they parse, so every volume record
    /// keeps a set that `attach` can at least try.
    pub(super) async fn set_key_slots(
        &self,
        volume: &str,
        expected: &[u8],
        slots: Vec<u8>,
    ) -> Result<DirResponse, Remote> {
        check_key_slots(&slots)?;
        let vkey = key("volumes", volume);
        // The record also changes when a lease is taken (its epoch): retry
        // then, as long as the slots are still the expected ones.
        for _ in 0..16 {
            let Some((mut v, rev)) = self.get::<VolumeRecord>("volume", &vkey).await? else {
                return Err(Remote::new(ErrorKind::NotFound, format!("no volume named {volume}")));
            };
            if v.spec.key_slots != expected {
                return Err(Remote::new(
                    ErrorKind::Conflict,
                    format!(
                        "the key slots of volume {volume} changed since they were read (another `meshdisk volume passwd`?): nothing was changed; run it again"
                    ),
                ));
            }
            v.spec.key_slots = slots.clone();
            let out = self
                .meta
                .txn(Txn::new().when(Compare::ModRevision(vkey.clone(), rev)).then(Op::Put {
                    key: vkey.clone(),
                    value: enc(&v),
                    lease: None,
                }))
                .await?;
            if out.succeeded {
                tracing::info!("volume {volume}: key slots changed");
                return Ok(DirResponse::Volume(v));
            }
        }
        Err(Remote::new(ErrorKind::Conflict, format!("volume {volume}: the record kept changing; try again")))
    }

    pub(super) async fn volume(&self, name: &str) -> Result<VolumeRecord, Remote> {
        match self.get::<VolumeRecord>("volume", &key("volumes", name)).await? {
            Some((v, _)) => Ok(v),
            None => Err(Remote::new(ErrorKind::NotFound, format!("no volume named {name}"))),
        }
    }

    /// A volume's live write lease and its store entry.
    pub(super) async fn lease_of(&self, volume: &str) -> Result<Option<(VolumeLease, meta::Entry)>, Remote> {
        match self.meta.get(&key("leases", volume)).await? {
            Some(e) => Ok(Some((dec("lease", &e.value)?, e))),
            None => Ok(None),
        }
    }

    /// Only the lease holder commits roots of a volume that has ever been
    /// attached (epoch > 0); a writer that was taken over is fenced here as
    /// it is on the peers.
    /// Returns the compare that keeps the lease as it was seen.
    pub(super) async fn check_writer(
        &self,
        who: &str,
        v: &VolumeRecord,
        epoch: u64,
    ) -> Result<Compare, Remote> {
        let lkey = key("leases", &v.spec.name);
        if v.epoch == 0 && epoch == 0 {
            return Ok(Compare::Absent(lkey));
        }
        match self.lease_of(&v.spec.name).await? {
            Some((l, e)) if l.holder == who && l.epoch == v.epoch && l.epoch == epoch => {
                Ok(Compare::ModRevision(lkey, e.mod_revision))
            }
            Some((l, _)) => Err(Remote::new(
                ErrorKind::Fenced,
                format!(
                    "volume {} is now written by {} (epoch {}): this writer was taken over and must stop",
                    v.spec.name, l.holder, l.epoch
                ),
            )),
            None => Err(Remote::new(
                ErrorKind::Fenced,
                format!("the write lease on volume {} lapsed: attach again", v.spec.name),
            )),
        }
    }

    pub(super) async fn acquire(
        &self,
        who: &str,
        volume: &str,
        force: bool,
        resume: Option<u64>,
        host: &str,
    ) -> Result<DirResponse, Remote> {
        let vkey = key("volumes", volume);
        let lkey = key("leases", volume);
        for _ in 0..16 {
            let Some((mut v, vrev)) = self.get::<VolumeRecord>("volume", &vkey).await? else {
                return Err(Remote::new(ErrorKind::NotFound, format!("no volume named {volume}")));
            };
            let current = self.lease_of(volume).await?;
            if let Some((l, _)) = &current
                && !(l.holder == who && resume == Some(l.epoch))
                && !force
            {
                return Err(Remote::new(
                    ErrorKind::Conflict,
                    format!(
                        "volume {volume} is attached by {} on {} (for {:.0} s, epoch {}): detach it there, or attach with --force to take it over (its writes are then refused)",
                        l.holder,
                        l.host,
                        self.now().saturating_sub(l.since_ms) as f64 / 1000.0,
                        l.epoch
                    ),
                ));
            }
            v.epoch += 1;
            let lease = self.meta.grant_lease(self.timing.lease_ttl).await?;
            let took_over =
                current.as_ref().is_some_and(|(l, _)| !(l.holder == who && resume == Some(l.epoch)));
            let rec = VolumeLease {
                took_over,
                holder: who.to_owned(),
                host: host.to_owned(),
                epoch: v.epoch,
                since_ms: self.now(),
                ttl_ms: self.timing.lease_ttl.as_millis() as u64,
            };
            let held = match &current {
                Some((_, e)) => Compare::ModRevision(lkey.clone(), e.mod_revision),
                None => Compare::Absent(lkey.clone()),
            };
            let out = self
                .meta
                .txn(
                    Txn::new()
                        .when(Compare::ModRevision(vkey.clone(), vrev))
                        .when(held)
                        .then(Op::Put { key: vkey.clone(), value: enc(&v), lease: None })
                        .then(Op::Put { key: lkey.clone(), value: enc(&rec), lease: Some(lease) }),
                )
                .await?;
            if !out.succeeded {
                let _ = self.meta.revoke(lease).await;
                continue;
            }
            if let Some((old, e)) = current {
                if let Some(l) = e.lease {
                    let _ = self.meta.revoke(l).await;
                }
                tracing::warn!(
                    "volume {volume}: {who} took the write lease over from {} (epoch {})",
                    old.holder,
                    v.epoch
                );
            } else {
                tracing::info!("volume {volume}: write lease to {who}, epoch {}", v.epoch);
            }
            return Ok(DirResponse::Lease(rec));
        }
        Err(Remote::new(ErrorKind::Conflict, format!("volume {volume}: the lease kept changing; try again")))
    }

    pub(super) async fn renew(&self, who: &str, volume: &str, epoch: u64) -> Result<DirResponse, Remote> {
        match self.lease_of(volume).await? {
            Some((l, e)) if l.holder == who && l.epoch == epoch => {
                let id = e.lease.ok_or_else(|| internal("a volume lease without a store lease"))?;
                match self.meta.keep_alive(id).await {
                    Ok(()) => Ok(DirResponse::Lease(l)),
                    Err(MetaError::LeaseNotFound(_)) => Err(Remote::new(
                        ErrorKind::Fenced,
                        format!("the write lease on volume {volume} lapsed: attach again"),
                    )),
                    Err(e) => Err(e.into()),
                }
            }
            Some((l, _)) => Err(Remote::new(
                ErrorKind::Fenced,
                format!(
                    "volume {volume} was taken over by {} (epoch {}; yours was {epoch}): stop writing",
                    l.holder, l.epoch
                ),
            )),
            None => Err(Remote::new(
                ErrorKind::Fenced,
                format!("the write lease on volume {volume} lapsed: attach again"),
            )),
        }
    }

    pub(super) async fn release_lease(
        &self,
        who: &str,
        volume: &str,
        epoch: u64,
    ) -> Result<DirResponse, Remote> {
        if let Some((l, e)) = self.lease_of(volume).await?
            && l.holder == who
            && l.epoch == epoch
            && let Some(id) = e.lease
        {
            match self.meta.revoke(id).await {
                Ok(()) | Err(MetaError::LeaseNotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            tracing::info!("volume {volume}: {who} released the write lease");
        }
        Ok(DirResponse::Done)
    }

    pub(super) async fn volume_info(&self, volume: &str) -> Result<DirResponse, Remote> {
        let record = self.volume(volume).await?;
        let lease = self.lease_of(volume).await?.map(|(l, _)| l);
        let view = self.peer_view().await?;
        let rules = super::heal::repair::rules(&record.spec);
        let mut health = Health::default();
        // Records the head dropped that snapshots keep: counted for
        // health (snapshot reads need them), not in `allocated`.
        let kept = self.kept_segments(&record.spec.id).await?;
        let mut allocated = 0;
        // Its own records, then those it inherits from each ancestor (ids
        // up to that ancestor's highest, above the next one's).
        let mut ranges = vec![(record.spec.id, None::<SegmentId>, None::<SegmentId>)];
        for (i, a) in record.spec.lineage.iter().enumerate() {
            let above = record.spec.lineage.get(i + 1).map(|b| SegmentId::from_raw(b.highest_segment));
            ranges.push((a.id, above, Some(SegmentId::from_raw(a.highest_segment))));
        }
        for (owner, above, upto) in ranges {
            let own = owner == record.spec.id;
            let prefix = segment_prefix(&owner);
            let mut after: Option<Vec<u8>> = above.map(|a| segment_key(&owner, a));
            'pages: loop {
                let page = self.meta.list_range(&prefix, after.as_deref(), PAGE).await?;
                let Some(last) = page.last() else { break };
                after = Some(last.key.clone());
                for e in page {
                    let Some(id) = parse_segment_key(&prefix, &e.key) else { continue };
                    if upto.is_some_and(|u| id > u) {
                        break 'pages;
                    }
                    let r = SegmentRecord::decode(&e.value)
                        .map_err(|e| internal(format!("volume {volume}: {e}")))?;
                    let shard = shard_len(&record.spec, &r);
                    if own && !kept.contains_key(&id) {
                        allocated += shard * r.peers.iter().filter(|&&p| p != 0).count() as u64;
                    }
                    let a = view.assess(&r, rules);
                    health.count(a.health, shard * r.peers.len() as u64);
                    health.misplaced += u64::from(a.misplaced);
                    if !a.rebuild.is_empty() {
                        health.to_repair.add(shard * a.rebuild.len() as u64);
                    }
                }
            }
        }
        let collecting = self.collecting(&record.spec, &view).await?;
        Ok(DirResponse::VolumeInfo(Box::new(VolumeInfo { record, lease, allocated, health, collecting })))
    }

    /// What the attach's compactor weighs each round (it asks after every
    /// commit): the highest segment a snapshot reaches and the dropped
    /// segments still collecting. Two key reads and a walk of the
    /// volume's `dead/` records, where `volume info` walks all its records.
    pub(super) async fn compaction_inputs(&self, volume: &str) -> Result<DirResponse, Remote> {
        let record = self.volume(volume).await?;
        let pins = self.snapshot_pins(&record.spec.id).await?.set.snapshots;
        let pinned_up_to = pins.iter().map(|p| p.highest_segment).max();
        let view = self.peer_view().await?;
        let collecting = self.collecting(&record.spec, &view).await?;
        Ok(DirResponse::CompactionInputs { pinned_up_to, collecting })
    }

    /// The volume's dropped segments the collector has not erased yet,
    /// and the bytes of their shards on peers that are up.
    async fn collecting(
        &self,
        spec: &VolumeSpec,
        view: &super::heal::repair::PeerView,
    ) -> Result<Collecting, Remote> {
        let mut collecting = Collecting::default();
        let prefix = dead_prefix(&spec.id);
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.meta.list_range(&prefix, after.as_deref(), PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for e in page {
                let dead: DeadSegment = dec("dropped segment", &e.value)?;
                collecting.segments += 1;
                // Only shards on peers that are up: those are erased once
                // the grace is over. A down peer's wait for it to return
                // (or to be lost): counting them would hold the writer's
                // back-pressure on space no one can free meanwhile.
                let up = dead
                    .record
                    .peers
                    .iter()
                    .filter(|&&p| p != 0 && view.by_id.get(&p).is_some_and(|p| p.state.is_up()))
                    .count() as u64;
                collecting.bytes += shard_len(spec, &dead.record) * up;
            }
        }
        Ok(collecting)
    }

    pub(super) async fn delete_volume(&self, volume: &str) -> Result<DirResponse, Remote> {
        let vkey = key("volumes", volume);
        let Some((v, vrev)) = self.get::<VolumeRecord>("volume", &vkey).await? else {
            return Err(Remote::new(ErrorKind::NotFound, format!("no volume named {volume}")));
        };
        if let Some((l, _)) = self.lease_of(volume).await? {
            return Err(Remote::new(
                ErrorKind::Conflict,
                format!("volume {volume} is attached by {}: detach it first", l.holder),
            ));
        }
        let pins = self.snapshot_pins(&v.spec.id).await?;
        if !pins.set.snapshots.is_empty() {
            let names: Vec<&str> = pins.set.snapshots.iter().map(|p| p.name.as_str()).collect();
            return Err(Remote::new(
                ErrorKind::Conflict,
                format!(
                    "volume {volume} has snapshots ({}): delete them first (`meshdisk volume delete {volume}@SNAPSHOT`)",
                    names.join(", ")
                ),
            ));
        }
        let out = self
            .meta
            .txn(
                Txn::new()
                    .when(Compare::ModRevision(vkey.clone(), vrev))
                    .when(Compare::Absent(key("leases", volume)))
                    .when(pins.unchanged)
                    .then(Op::Delete { key: vkey })
                    .then(Op::Delete { key: id_key(&v.spec.id) })
                    .then(Op::Delete { key: root_key(&v.spec.id) })
                    .then(Op::DeletePrefix { prefix: segment_prefix(&v.spec.id) })
                    // The gc/ entry erases every shard of the volume, those
                    // of its dropped segments too.
                    .then(Op::DeletePrefix { prefix: dead_prefix(&v.spec.id) })
                    .then(Op::Delete { key: floor_key(&v.spec.id) })
                    // Left by a snapshot deletion that stopped halfway;
                    // their records went with `segs/` above. A clone's
                    // inherited segments are its ancestors' records, and
                    // the gc/ entry erases only shards of this volume's id.
                    .then(Op::DeletePrefix { prefix: kept_prefix(&v.spec.id) })
                    .then(Op::Put { key: gc_key(&v.spec.id), value: v.spec.id.to_vec(), lease: None }),
            )
            .await?;
        if !out.succeeded {
            return Err(Remote::new(
                ErrorKind::Conflict,
                format!("volume {volume} changed meanwhile: try again"),
            ));
        }
        tracing::info!("volume {volume} deleted; its shards are being erased from the peers");
        self.gc.notify_one();
        Ok(DirResponse::Done)
    }
}

/// Checks a new volume's spec as `volume create` and `volume clone` need:
/// a valid name, geometry, size, repair threshold and key slots that parse.
pub(super) fn check_spec(spec: &VolumeSpec) -> Result<(), Remote> {
    let invalid = |m: String| Remote::new(ErrorKind::Invalid, m);
    check_label(&spec.name).map_err(|e| invalid(e.to_string()))?;
    crate::codec::Geometry::new(usize::from(spec.k), usize::from(spec.m), spec.shard_size as usize)
        .map_err(|e| invalid(e.to_string()))?;
    if !(spec.shard_size as usize).is_multiple_of(crate::codec::SECTOR_SIZE) {
        return Err(invalid(format!(
            "the shard size must be a multiple of {} bytes",
            crate::codec::SECTOR_SIZE
        )));
    }
    if spec.size == 0 || !spec.size.is_multiple_of(crate::codec::SECTOR_SIZE as u64) {
        return Err(invalid("the size must be a positive multiple of 4 KiB".into()));
    }
    if spec.repair_threshold < spec.k || spec.repair_threshold > spec.k + spec.m {
        return Err(invalid(format!(
            "the repair threshold must be between k={} and k+m={}",
            spec.k,
            spec.k + spec.m
        )));
    }
    check_key_slots(&spec.key_slots)
}

/// Bytes on peers of one shard of `record`, a segment of a volume of
/// `spec`'s geometry (header included).
pub(super) fn shard_len(spec: &VolumeSpec, record: &SegmentRecord) -> u64 {
    let (k, all) = (usize::from(spec.k), usize::from(spec.k + spec.m));
    SegmentGeometry::new(k, all - k, u32::from(record.shard_blocks).max(1))
        .map_or(0, |g| (header_len(g) + g.shard_len()) as u64)
}

/// Bytes on peers of every shard `record` names.
pub(super) fn stored_len(spec: &VolumeSpec, record: &SegmentRecord) -> u64 {
    shard_len(spec, record) * record.peers.iter().filter(|&&p| p != 0).count() as u64
}

/// Refuses key slots that do not parse (`Invalid`, with the parser's reason).
fn check_key_slots(bytes: &[u8]) -> Result<(), Remote> {
    crate::codec::keyslot::KeySlots::parse(bytes)
        .map(drop)
        .map_err(|e| Remote::new(ErrorKind::Invalid, format!("the volume's key slots: {e}")))
}
