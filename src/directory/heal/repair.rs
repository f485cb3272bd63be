//! Repair: rebuilds the shards of segments that lost them, without the
//! volume key and without an operator.
//!
//! A **round** scans every segment record (every volume's, those snapshots
//! keep and clones inherit included) and assesses each with
//! [`health::assess`] against what the directory knows of the peers now.
//! The segments to repair are queued most at risk first (fewest shards on
//! up peers, then fewest on peers not lost, then the oldest: the lowest
//! key). The worker then repairs them `inflight` at a time:
//!
//! ```text
//! read the record again (skip it if it is gone: freed meanwhile)
//! choose new holders: up peers holding no shard of the segment, with
//!     room, domains holding fewest of its shards first
//! each new holder: Rebuild ─► it reads k verified shards from the
//!     holders, rebuilds its own, stores it durably at the volume's epoch
//! record the new holders with compare-and-set on the record's revision
//!     ─► lost the race (the segment was dropped or the volume deleted
//!        meanwhile): erase the new shards, leave the record alone
//! ```
//!
//! So a segment is recorded on a new holder only after that holder stored
//! it, and a segment freed meanwhile is never resurrected nor half
//! updated. The shard a moved index leaves behind (a crowded peer or
//! domain) is one no record names: reconciliation erases it after the
//! collection grace, by which time readers holding the old record moved on.
//!
//! **Pacing** ([`RepairConfig`]): at most `inflight` segments at once. The
//! peers report the client calls they serve per second, and every attach
//! the requests its clients made, with each lease renewal; while either
//! adds up to [`BUSY_CLIENT_OPS`] / [`BUSY_VOLUME_OPS`] or more, repair
//! yields (unless the segment it is
//! on is critical): a quarter of `inflight`, and after each batch a pause
//! of `tranquility` times the batch's duration. `rate` caps the rebuilt
//! bytes per second. The queue is rebuilt by a
//! fresh scan when it runs dry, or every [`RESCAN`] so a segment that
//! became critical meanwhile goes first.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::collector::Eraser;
use super::health::{self, Assessment, HolderState, HolderView, Rules};
use crate::api::*;
use crate::client::{Client, ClientError};
use crate::codec::segment::{SegmentRoot, SegmentShardKey};
use crate::codec::sequence::SegmentId;
use crate::directory::Directory;
use crate::directory::meta::{Compare, MetaStore, Op, Txn};
use crate::directory::placement::{Candidate, choose_beside};
use crate::directory::schema::*;
use crate::directory::volumes::shard_len;
use crate::sys::worker::{Pacing, State, Status, Worker};

/// The queue is rebuilt from a fresh scan at least this often.
pub const RESCAN: Duration = Duration::from_secs(30);

/// Segment records read per page of a scan.
const PAGE: usize = 1000;

/// Clients are busy when the peers that are up together served at least
/// this many of their calls per second (by their last heartbeats)...
pub const BUSY_CLIENT_OPS: u64 = 20;

/// ... or the attached volumes' holders served at least this many of
/// their clients' requests per second (reported with their lease
/// renewals): an attach absorbs most I/O in its log and cache, so the
/// peers alone see too little of it.
pub const BUSY_VOLUME_OPS: u64 = 20;

/// How hard repair works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RepairConfig {
    /// Segments repaired at once (a quarter of it, at least one, while
    /// clients are busy).
    pub inflight: usize,
    /// Rebuilt bytes per second at most (0: no cap).
    pub rate: u64,
    /// While clients are busy, after a batch that took `t`, pause
    /// `t × tranquility`.
    pub tranquility: u32,
    /// How often an idle worker scans for segments to repair.
    pub period: Duration,
}

impl Default for RepairConfig {
    fn default() -> Self {
        Self { inflight: 4, rate: 0, tranquility: 2, period: Duration::from_secs(5) }
    }
}

/// What repair asks of the peers: a rebuild, and (as the collector does)
/// erasing a shard it stored for a segment freed meanwhile.
pub trait Rebuilder: Eraser {
    /// Has `target` rebuild shard `shard` from `sources` (or copy it from a
    /// source holding that index) and store it at `epoch`; the bytes it read.
    fn rebuild(
        &self,
        target: &PeerAddr,
        shard: SegmentShardKey,
        root: SegmentRoot,
        epoch: u64,
        need: u8,
        sources: Vec<ShardSource>,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send;
}

impl Rebuilder for Client {
    async fn rebuild(
        &self,
        target: &PeerAddr,
        shard: SegmentShardKey,
        root: SegmentRoot,
        epoch: u64,
        need: u8,
        sources: Vec<ShardSource>,
    ) -> Result<u64, ClientError> {
        self.rebuild_shard(target, shard, &root, epoch, need, sources).await
    }
}

/// A peer as one moment of the directory sees it.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub id: u16,
    pub addr: PeerAddr,
    pub state: HolderState,
    pub domain: String,
    pub capacity: u64,
    pub free: u64,
    pub load: u32,
    /// Client calls per second at its last report.
    pub client_ops: u32,
    pub used: u64,
    /// Why it is leaving, if it is.
    pub drain: Option<DrainReason>,
    /// Its used space is at or above the high-water mark: it sheds shards
    /// and takes no new ones.
    pub above_high_water: bool,
}

impl PeerInfo {
    /// Whether shards are best stored here: up, staying, below the
    /// high-water mark.
    fn takes_shards(&self) -> bool {
        self.state == HolderState::Up && !self.above_high_water
    }
}

/// Every known peer by small id, at one moment.
#[derive(Clone, Debug, Default)]
pub struct PeerView {
    pub by_id: HashMap<u16, PeerInfo>,
}

impl PeerView {
    fn holder(&self, id: u16) -> Option<HolderView> {
        self.by_id.get(&id).map(|p| HolderView { state: p.state, domain: p.domain.clone() })
    }

    /// Whether a peer that takes shards is in a domain outside `used`.
    fn free_domain(&self, used: &HashSet<String>) -> bool {
        self.by_id.values().any(|p| p.takes_shards() && !used.contains(&p.domain))
    }

    /// Client calls per second over the peers that are up: how busy the
    /// cluster is with foreground I/O.
    pub fn client_ops(&self) -> u64 {
        self.by_id.values().filter(|p| p.state.is_up()).map(|p| u64::from(p.client_ops)).sum()
    }

    pub(in crate::directory) fn assess(&self, record: &SegmentRecord, rules: Rules) -> Assessment {
        health::assess(record, rules, |id| self.holder(id), |used| self.free_domain(used))
    }
}

/// A volume as a scan needs it, by id.
#[derive(Clone, Debug)]
struct VolumeFacts {
    spec: VolumeSpec,
    epoch: u64,
}

/// A volume's geometry and repair threshold, for [`health::assess`].
pub(in crate::directory) fn rules(spec: &VolumeSpec) -> Rules {
    let (k, m) = (usize::from(spec.k), usize::from(spec.m));
    Rules { k, m, threshold: usize::from(spec.repair_threshold).clamp(k, k + m) }
}

/// A segment to repair, as a scan found it.
#[derive(Clone, Debug)]
pub struct RepairJob {
    pub volume: [u8; VOLUME_ID_LEN],
    pub segment: SegmentId,
    pub urgency: (usize, usize),
    /// One more lost peer from unreadable: repaired at full speed.
    pub critical: bool,
    /// Bytes of the shards it would rebuild or move.
    pub bytes: u64,
    /// Shards to move off a peer above the high-water mark: (index, the
    /// holder the record named when scanned).
    pub sheds: Vec<(usize, u16)>,
    /// Only moves (off leaving peers or above the high-water mark):
    /// redundancy is whole meanwhile.
    pub moving: bool,
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    pub health: Health,
    pub volumes: HashMap<[u8; VOLUME_ID_LEN], Health>,
    /// Most urgent first.
    pub jobs: Vec<RepairJob>,
    /// Per peer id: the shards records name it for, and their bytes.
    pub needed: HashMap<u16, Tally>,
}

/// How one segment's repair ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Repaired {
    /// Shards stored and recorded.
    pub shards: u64,
    pub bytes: u64,
    pub read: u64,
    /// Shards that could not be made (no room, sources unreadable, the
    /// target failed): the next round tries again.
    pub failed: u64,
    /// The segment was freed (or changed) meanwhile: what was stored was
    /// erased again.
    pub raced: bool,
}

impl<S: MetaStore> Directory<S> {
    /// Every known peer as it is now.
    pub(in crate::directory) async fn peer_view(&self) -> Result<PeerView, Remote> {
        let now = self.now();
        let ids = self.peer_ids().await?;
        let drains = self.drains().await?;
        let mut view = PeerView::default();
        for (name, r) in self.peers().await? {
            let Some(&id) = ids.get(&name) else { continue };
            let drain = drains.get(&name).map(|d| d.reason);
            let state = match (self.state(&r, now), drain) {
                // Not trusted: its shards are rebuilt from the others.
                (_, Some(DrainReason::Audits)) => HolderState::Distrusted,
                (PeerState::Up, Some(DrainReason::Operator)) => HolderState::Leaving,
                (PeerState::Up, None) => HolderState::Up,
                (PeerState::Down | PeerState::Failed, _) => HolderState::Down,
                (PeerState::Lost, _) => HolderState::Lost,
            };
            view.by_id.insert(
                id,
                PeerInfo {
                    id,
                    addr: PeerAddr { name, addr: r.report.addr },
                    state,
                    domain: r.report.failure_domain.clone(),
                    capacity: r.report.capacity,
                    free: r.report.capacity.saturating_sub(r.report.used),
                    load: r.report.load,
                    client_ops: r.report.client_ops,
                    used: r.report.used,
                    drain,
                    above_high_water: self.above_high_water(&r.report),
                },
            );
        }
        Ok(view)
    }

    /// The k of the volume with id `id`, if it exists.
    pub(in crate::directory) async fn volume_k(
        &self,
        id: &[u8; VOLUME_ID_LEN],
    ) -> Result<Option<usize>, Remote> {
        Ok(self.volume_facts(id).await?.map(|v| usize::from(v.spec.k)))
    }

    /// The volume with id `id`, if it exists.
    async fn volume_facts(&self, id: &[u8; VOLUME_ID_LEN]) -> Result<Option<VolumeFacts>, Remote> {
        let Some(name) = self.meta.get(&id_key(id)).await? else { return Ok(None) };
        let name = String::from_utf8_lossy(&name.value).into_owned();
        Ok(self
            .get::<VolumeRecord>("volume", &key("volumes", &name))
            .await?
            .map(|(v, _)| VolumeFacts { spec: v.spec, epoch: v.epoch }))
    }

    /// Assesses every segment record against `view`: the cluster's and
    /// each volume's health, and the segments to repair, most urgent first.
    pub(in crate::directory) async fn scan_health(&self, view: &PeerView) -> Result<Scan, Remote> {
        let mut scan = Scan::default();
        let mut facts: HashMap<[u8; VOLUME_ID_LEN], Option<VolumeFacts>> = HashMap::new();
        let mut after: Option<Vec<u8>> = None;
        let mut jobs: Vec<(RepairJob, Vec<u8>)> = Vec::new();
        // Peers above the high-water mark: shards they could shed, up to
        // what would bring their used space to the low-water mark (the
        // exact need, from what records name, is known after the scan).
        let mut shed_room: HashMap<u16, u64> = view
            .by_id
            .values()
            .filter(|p| p.above_high_water && p.state == HolderState::Up)
            .map(|p| (p.id, p.used.saturating_sub(super::drain::low_water(p.capacity, self.high_water()))))
            .collect();
        let mut sheds: Vec<(u16, u64, RepairJob, Vec<u8>)> = Vec::new();
        // A uniform sample of the records, for audits to challenge.
        let (mut sample, mut seen) = (Vec::new(), 0u64);
        loop {
            let page = self.meta.list_range(b"segs/", after.as_deref(), PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for e in page {
                let Some((volume, segment)) = parse_any_segment_key(&e.key) else {
                    return Err(internal(format!("a malformed segment key {:?}", e.key)));
                };
                if let std::collections::hash_map::Entry::Vacant(e) = facts.entry(volume) {
                    e.insert(self.volume_facts(&volume).await?);
                }
                let Some(v) = &facts[&volume] else { continue };
                let record = SegmentRecord::decode(&e.value)
                    .map_err(|x| internal(format!("segment {segment} of volume {}: {x}", v.spec.name)))?;
                let a = view.assess(&record, rules(&v.spec));
                seen += 1;
                super::audit::sample(&mut sample, seen, (volume, segment), || self.random());
                let shard = shard_len(&v.spec, &record);
                let bytes = shard * record.peers.len() as u64;
                let mut named = HashSet::new();
                for &id in record.peers.iter().filter(|&&id| id != 0) {
                    if named.insert(id) {
                        scan.needed.entry(id).or_default().add(shard);
                    }
                }
                let mut h = Health::default();
                h.count(a.health, bytes);
                h.misplaced += u64::from(a.misplaced);
                let job = |bytes: u64, moving: bool, sheds: Vec<(usize, u16)>| RepairJob {
                    volume,
                    segment,
                    urgency: if moving { (usize::MAX, usize::MAX) } else { health::urgency(&a) },
                    critical: a.health == SegmentHealth::Critical,
                    bytes,
                    sheds,
                    moving,
                };
                if !a.rebuild.is_empty() {
                    let rebuilt = shard * a.rebuild.len() as u64;
                    h.to_repair.add(rebuilt);
                    jobs.push((job(rebuilt, false, Vec::new()), e.key.clone()));
                } else if !a.moves.is_empty() {
                    let moved = shard * a.moves.len() as u64;
                    h.to_move.add(moved);
                    jobs.push((job(moved, true, Vec::new()), e.key.clone()));
                } else if a.health == SegmentHealth::Whole || a.health == SegmentHealth::Degraded {
                    // One shard of a peer above the high-water mark moves,
                    // if it still has room to shed.
                    let on = record
                        .peers
                        .iter()
                        .enumerate()
                        .find(|(_, id)| shed_room.get(id).is_some_and(|&left| left > 0));
                    if let Some((i, &id)) = on {
                        let left = shed_room.get_mut(&id).expect("found above");
                        *left = left.saturating_sub(shard);
                        sheds.push((id, shard, job(shard, true, vec![(i, id)]), e.key.clone()));
                    }
                }
                scan.health.merge(&h);
                scan.volumes.entry(volume).or_default().merge(&h);
            }
        }
        // Shed only what brings the shards records name to the low-water
        // mark (what a peer holds beyond them is the collector's).
        let mut need: HashMap<u16, u64> = HashMap::new();
        for p in view.by_id.values().filter(|p| shed_room.contains_key(&p.id)) {
            let named = scan.needed.get(&p.id).map_or(0, |t| t.bytes);
            need.insert(p.id, named.saturating_sub(super::drain::low_water(p.capacity, self.high_water())));
        }
        for (id, shard, job, key) in sheds {
            let left = need.get_mut(&id).expect("shedding peers only");
            if *left == 0 {
                continue;
            }
            *left = left.saturating_sub(shard);
            let mut h = Health::default();
            h.to_move.add(shard);
            scan.health.merge(&h);
            scan.volumes.entry(job.volume).or_default().merge(&h);
            jobs.push((job, key));
        }
        jobs.sort_by(|(a, ka), (b, kb)| a.urgency.cmp(&b.urgency).then_with(|| ka.cmp(kb)));
        scan.jobs = jobs.into_iter().map(|(j, _)| j).collect();
        *self.audit_sample.lock().expect("not poisoned") = sample;
        Ok(scan)
    }

    /// Repairs one segment (see the module documentation). `debits` holds
    /// the bytes this round already sent to each peer (their reports lag).
    pub(in crate::directory) async fn repair_segment<R: Rebuilder>(
        &self,
        job: &RepairJob,
        view: &PeerView,
        debits: &std::sync::Mutex<HashMap<u16, u64>>,
        rebuilder: &R,
    ) -> Result<Repaired, Remote> {
        let mut out = Repaired::default();
        let Some(v) = self.volume_facts(&job.volume).await? else { return Ok(out) };
        let skey = segment_key(&job.volume, job.segment);
        let Some(entry) = self.meta.get(&skey).await? else { return Ok(out) };
        let record = SegmentRecord::decode(&entry.value)
            .map_err(|x| internal(format!("segment {} of volume {}: {x}", job.segment, v.spec.name)))?;
        let a = view.assess(&record, rules(&v.spec));
        // Rebuilds first; else moves off leaving peers; else what the scan
        // chose to shed off a full peer, if the record still names it.
        let make: Vec<usize> = if !a.rebuild.is_empty() {
            a.rebuild.clone()
        } else if !a.moves.is_empty() {
            a.moves.clone()
        } else {
            job.sheds.iter().filter(|&&(i, id)| record.peers.get(i) == Some(&id)).map(|&(i, _)| i).collect()
        };
        if make.is_empty() {
            return Ok(out);
        }
        let shard_bytes = shard_len(&v.spec, &record);
        // New holders: up, holding no shard of this segment, with room;
        // domains holding fewer of the segment's shards first.
        let named: HashSet<u16> = record.peers.iter().copied().filter(|&p| p != 0).collect();
        let open: Vec<&PeerInfo> = {
            let debits = debits.lock().expect("not poisoned");
            let mut open: Vec<&PeerInfo> = view
                .by_id
                .values()
                .filter(|p| p.state == HolderState::Up && !named.contains(&p.id))
                .filter(|p| p.free.saturating_sub(debits.get(&p.id).copied().unwrap_or(0)) >= shard_bytes)
                .collect();
            open.sort_by_key(|p| p.id);
            // Peers above the high-water mark take a rebuilt shard only
            // when too few others can. A moved one goes only where it
            // leaves room below the low-water mark: a move must not make
            // its target shed in turn.
            let roomy = open.iter().filter(|p| !p.above_high_water).count();
            if a.rebuild.is_empty() {
                let low = |p: &PeerInfo| super::drain::low_water(p.capacity, self.high_water());
                open.retain(|p| {
                    let debit = debits.get(&p.id).copied().unwrap_or(0);
                    !p.above_high_water && p.used.saturating_add(debit).saturating_add(shard_bytes) <= low(p)
                });
            } else if roomy >= make.len() {
                open.retain(|p| !p.above_high_water);
            }
            open
        };
        let mut taken: HashMap<String, usize> = HashMap::new();
        for (i, &id) in record.peers.iter().enumerate() {
            if id == 0 || make.contains(&i) {
                continue;
            }
            if let Some(p) = view.by_id.get(&id).filter(|p| p.state != HolderState::Lost) {
                *taken.entry(p.domain.clone()).or_default() += 1;
            }
        }
        let candidates: Vec<Candidate> = open
            .iter()
            .map(|p| Candidate {
                name: p.addr.name.clone(),
                domain: p.domain.clone(),
                capacity: p.capacity,
                free: p.free,
                load: p.load,
                rtt_micros: None,
            })
            .collect();
        let n = make.len().min(candidates.len());
        if n == 0 {
            out.failed = make.len() as u64;
            tracing::info!(
                "repair of segment {} of volume {}: no up peer without a shard of it has {} bytes free",
                job.segment,
                v.spec.name,
                shard_bytes
            );
            return Ok(out);
        }
        let picked = choose_beside(&candidates, n, shard_bytes, &taken, || self.random())
            .map_err(|e| internal(format!("repair placement: {e}")))?;
        {
            let mut debits = debits.lock().expect("not poisoned");
            for &i in &picked {
                *debits.entry(open[i].id).or_default() += shard_bytes;
            }
        }
        // Sources: every shard on an up peer, least loaded first.
        let mut sources: Vec<(u32, ShardSource)> = record
            .peers
            .iter()
            .enumerate()
            .filter_map(|(i, &id)| {
                let p = view.by_id.get(&id).filter(|p| p.state.is_up())?;
                Some((p.load, ShardSource { index: i as u8, peer: p.addr.clone() }))
            })
            .collect();
        sources.sort_by_key(|(load, s)| (*load, s.index));
        let sources: Vec<ShardSource> = sources.into_iter().map(|(_, s)| s).collect();
        let root = SegmentRoot(record.root);
        let calls = make.iter().zip(&picked).map(|(&index, &pick)| {
            let target = open[pick];
            let key = SegmentShardKey { volume: job.volume, segment: job.segment, index: index as u8 };
            let sources = sources.clone();
            async move {
                let r = rebuilder.rebuild(&target.addr, key, root, v.epoch, v.spec.k, sources).await;
                (index, target, key, r)
            }
        });
        let mut stored: Vec<(usize, &PeerInfo, SegmentShardKey)> = Vec::new();
        for (index, target, key, r) in crate::sys::join_all(calls.collect()).await {
            match r {
                Ok(read) => {
                    out.read += read;
                    stored.push((index, target, key));
                }
                Err(e) => {
                    out.failed += 1;
                    tracing::info!(
                        "repair of shard {index} of segment {} of volume {} on {}: {e}",
                        job.segment,
                        v.spec.name,
                        target.addr.name
                    );
                }
            }
        }
        out.failed += (make.len() - n) as u64;
        if stored.is_empty() {
            return Ok(out);
        }
        let mut new = record.clone();
        for (index, target, _) in &stored {
            new.peers[*index] = target.id;
        }
        let value = new.encode().map_err(|e| internal(format!("segment {}: {e}", job.segment)))?;
        let txn = Txn::new().when(Compare::ModRevision(skey.clone(), entry.mod_revision)).then(Op::Put {
            key: skey,
            value,
            lease: None,
        });
        if self.meta.txn(txn).await?.succeeded {
            out.shards = stored.len() as u64;
            out.bytes = shard_bytes * out.shards;
            return Ok(out);
        }
        // Freed (or changed) meanwhile: nothing may name what was stored.
        out.raced = true;
        for (_, target, key) in stored {
            if let Err(e) = rebuilder.erase(&target.addr, key, v.epoch).await {
                // Reconciliation erases it later (no record names it).
                tracing::info!("erasing a repaired shard of a freed segment from {}: {e}", target.addr.name);
            }
        }
        Ok(out)
    }

    /// One whole round, one segment at a time (tests): scans, repairs
    /// every segment found, and returns the totals.
    #[cfg(test)]
    pub(in crate::directory) async fn repair_round<R: Rebuilder>(
        &self,
        rebuilder: &R,
    ) -> Result<Repaired, Remote> {
        let view = self.peer_view().await?;
        let scan = self.scan_health(&view).await?;
        let debits = std::sync::Mutex::new(HashMap::new());
        let mut total = Repaired::default();
        for job in &scan.jobs {
            let r = self.repair_segment(job, &view, &debits, rebuilder).await?;
            total.shards += r.shards;
            total.bytes += r.bytes;
            total.read += r.read;
            total.failed += r.failed;
            total.raced |= r.raced;
        }
        Ok(total)
    }
}

/// Starts the repair worker on the directory's runner.
pub(in crate::directory) fn start<S: MetaStore, R: Rebuilder>(
    dir: &Arc<Directory<S>>,
    rebuilder: R,
    config: RepairConfig,
) {
    let period = config.period.min(dir.timing.peer_timeout).max(Duration::from_millis(100));
    // The worker paces itself (by the clients' load); the runner only
    // backs off after errors.
    let pacing = Pacing { tranquility: 0, backoff: period, max_backoff: period * 4 };
    let worker = RepairWorker {
        dir: dir.clone(),
        rebuilder,
        config,
        period,
        queue: VecDeque::new(),
        scanned: None,
        recent: VecDeque::new(),
        busy: false,
    };
    dir.workers.spawn_paced(worker, pacing);
}

/// The repair worker: scans, then repairs its queue a batch per step.
pub struct RepairWorker<S: MetaStore, R: Rebuilder> {
    dir: Arc<Directory<S>>,
    rebuilder: R,
    config: RepairConfig,
    period: Duration,
    queue: VecDeque<RepairJob>,
    /// When the queue was made.
    scanned: Option<Instant>,
    /// (when, bytes) of the last minute's rebuilt shards, for the rate.
    recent: VecDeque<(Instant, u64)>,
    /// Whether the last batch yielded to busy clients.
    busy: bool,
}

impl<S: MetaStore, R: Rebuilder> RepairWorker<S, R> {
    fn publish(&mut self, in_flight: u64) {
        let now = Instant::now();
        if self.queue.is_empty() && in_flight == 0 {
            // Idle: the next round's rate starts afresh.
            self.recent.clear();
        }
        while self.recent.front().is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(60)) {
            self.recent.pop_front();
        }
        let window = self
            .recent
            .front()
            .map_or(Duration::ZERO, |(t, _)| now.duration_since(*t))
            .max(Duration::from_secs(1));
        let rate = (self.recent.iter().map(|(_, b)| b).sum::<u64>() as f64 / window.as_secs_f64()) as u64;
        let (mut queued, mut moving) = (Tally::default(), Tally::default());
        for j in &self.queue {
            if j.moving { &mut moving } else { &mut queued }.add(j.bytes);
        }
        let mut p = self.dir.repair.lock().expect("not poisoned");
        p.queued = queued;
        p.moving = moving;
        let queued =
            Tally { segments: queued.segments + moving.segments, bytes: queued.bytes + moving.bytes };
        p.in_flight = in_flight;
        p.rate = rate;
        p.eta_secs = (queued.segments + in_flight > 0 && rate > 0).then(|| queued.bytes.div_ceil(rate));
    }

    async fn rescan(&mut self) -> Result<(), Remote> {
        let view = self.dir.peer_view().await?;
        let scan = self.dir.scan_health(&view).await?;
        self.queue = scan.jobs.into();
        self.scanned = Some(Instant::now());
        self.dir.repair.lock().expect("not poisoned").scanned_ms = self.dir.now();
        if !self.queue.is_empty() {
            tracing::info!(
                "repair: {} segments to repair ({} critical, {} below threshold, {} misplaced)",
                self.queue.len(),
                scan.health.critical,
                scan.health.below_threshold,
                scan.health.misplaced
            );
        }
        self.publish(0);
        Ok(())
    }

    async fn batch(&mut self) -> Result<(), Remote> {
        let started = Instant::now();
        let view = self.dir.peer_view().await?;
        // Yield to clients while they are busy, unless data is at risk.
        let critical = self.queue.front().is_some_and(|j| j.critical);
        let busy =
            !critical && (view.client_ops() >= BUSY_CLIENT_OPS || self.dir.client_load() >= BUSY_VOLUME_OPS);
        let inflight = if busy { (self.config.inflight / 4).max(1) } else { self.config.inflight.max(1) };
        let take = inflight.min(self.queue.len());
        let jobs: Vec<RepairJob> = self.queue.drain(..take).collect();
        self.publish(jobs.len() as u64);
        let debits = std::sync::Mutex::new(HashMap::new());
        let (dir, rebuilder) = (&self.dir, &self.rebuilder);
        let results = crate::sys::join_all(
            jobs.iter().map(|job| dir.repair_segment(job, &view, &debits, rebuilder)).collect(),
        )
        .await;
        let mut bytes = 0;
        {
            let mut p = self.dir.repair.lock().expect("not poisoned");
            for r in results {
                match r {
                    Ok(r) => {
                        p.shards += r.shards;
                        p.bytes += r.bytes;
                        p.read_bytes += r.read;
                        p.failed += r.failed;
                        p.raced += u64::from(r.raced);
                        bytes += r.bytes;
                    }
                    Err(e) => {
                        p.failed += 1;
                        tracing::warn!("repair: {e}");
                    }
                }
            }
        }
        self.recent.push_back((Instant::now(), bytes));
        self.publish(0);
        let took = started.elapsed();
        let mut pause = if busy { took * self.config.tranquility } else { Duration::ZERO };
        if self.config.rate > 0 {
            let due = Duration::from_secs_f64(bytes as f64 / self.config.rate as f64);
            pause = pause.max(due.saturating_sub(took));
        }
        self.busy = busy;
        tokio::time::sleep(pause).await;
        Ok(())
    }
}

impl<S: MetaStore, R: Rebuilder> Worker for RepairWorker<S, R> {
    type Error = Remote;

    fn name(&self) -> String {
        "repair".into()
    }

    fn status(&self) -> Status {
        let p = self.dir.repair.lock().expect("not poisoned");
        Status {
            queue: Some(self.queue.len() as u64),
            progress: Some(format!(
                "{} shards rebuilt ({}), {}/s{}; {} failed, {} raced",
                p.shards,
                crate::size::human(p.bytes),
                crate::size::human(p.rate),
                if self.busy { ", yielding to clients" } else { "" },
                p.failed,
                p.raced
            )),
        }
    }

    fn initial_state(&self) -> State {
        // The first scan after a period: a directory that just started has
        // heard from no peer yet, and would see every segment unavailable.
        State::Idle
    }

    async fn work(&mut self, stop: &CancellationToken) -> Result<State, Remote> {
        let stale = self.scanned.is_none_or(|t| t.elapsed() >= RESCAN);
        if self.queue.is_empty() || stale {
            tokio::select! {
                r = self.rescan() => r?,
                () = stop.cancelled() => return Ok(State::Done),
            }
            if self.queue.is_empty() {
                return Ok(State::Idle);
            }
        }
        tokio::select! {
            r = self.batch() => r?,
            () = stop.cancelled() => return Ok(State::Done),
        }
        Ok(if self.queue.is_empty() { State::Idle } else { State::Busy })
    }

    async fn wait_for_work(&mut self) -> State {
        tokio::select! {
            () = tokio::time::sleep(self.period) => {}
            () = self.dir.repair_wake.notified() => {}
        }
        self.scanned = None;
        State::Busy
    }
}
