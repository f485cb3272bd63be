//! The garbage collector: erases from the peers the shards nothing points
//! to any more.
//!
//! Three kinds of garbage, three rules (the keys are in the schema of
//! [`super::super`]):
//!
//! - **Deleted volumes** (`gc/<volume id>`): every peer is asked for all
//!   the volume's shards and erases them at the largest epoch (nobody
//!   writes the volume again, and a fenced writer's late put cannot land
//!   afterwards); the entry goes after a pass in which every peer was up
//!   and held none (a put admitted before the delete may still land, so
//!   one erasing pass is not enough).
//! - **Dropped segments** (`dead/<volume id>/<seg>`): a commit (or
//!   `DropSegments`) that drops a segment's record moves it here, in the
//!   same transaction, with the time (unless a snapshot pins it: then the
//!   record stays, marked `kept/`, and comes here when the last snapshot
//!   pinning it is deleted). Once the **drop grace** (`--drop-grace`)
//!   has passed, each shard is erased from the peer the record names for
//!   it, at the volume's current lease epoch; the entry goes once every
//!   holder has answered (erased, or did not have it). A holder that is
//!   down keeps the entry for a later pass; one that left the cluster (no
//!   peer slot, or its record removed) holds nothing anyone reaches and is
//!   not waited for. The grace lets an attach finish reading a segment its
//!   own commit just dropped.
//! - **Orphans**, found by **reconciliation** (every `--reconcile-every`,
//!   the first soon after the directory starts): every up peer lists its
//!   shards of every volume the directory knows (by its id: a clone's
//!   inherited segments are its ancestors' shards and records, and a kept
//!   record is a record), and each shard is classified by [`classify`]: (a) its record names this peer for its
//!   index: live; (b) its record names another peer for that index (a put
//!   that went to a spare while the slow one landed too, the copy a repair
//!   moved away): orphan, but only while the peer named for that index is
//!   up (while it is lost, down or none was stored, repair may yet record
//!   this very copy: a rebuild whose answer was lost, retried on the same
//!   peer); (c) no
//!   record but a `dead/` entry: left to the dead queue; (d) no record, at
//!   or below the volume's root's highest segment or its floor: a failed
//!   commit's, orphan; (e) no record, above: maybe a commit in flight, so
//!   an orphan only once seen for the grace. Every orphan is erased only
//!   when a pass sees it as one and it was first seen at least the grace
//!   earlier (first sightings are kept in memory: a directory restart only
//!   delays). Before erasing a (d) or (e) shard the collector durably
//!   raises the volume's floor (`segfloor/`) to its id, and reads its
//!   record once more: `CommitRoot` refuses any new record at or below
//!   the floor, so a commit in flight longer than the grace can never land
//!   a record for an erased shard.
//!
//! Why the erase epoch is the volume's current one, not the largest:
//! peers keep the newest epoch they saw per volume and refuse older puts,
//! so an erase at `u64::MAX` would fence the live volume's writer for
//! good. An erase at the current epoch fences nobody the directory would
//! not fence; one refused because a newer writer came meanwhile is retried
//! in the next pass.
//!
//! Nothing to release for dead clients: placement reserves nothing
//! (`PlaceSegments` only picks peers with room; the space is taken by the
//! put), so a client that dies between placing and putting leaves no
//! reservation, only possibly orphan shards, which reconciliation finds.
//!
//! Not yet: a peer's shards of a volume the directory no longer knows (a
//! deleted volume whose `gc/` entry went while that peer was away) are not
//! found, as reconciliation asks peers only about known volumes (a peer
//! call listing a peer's volumes would find them). Repair names a new
//! holder in a record only after that holder stored the shard; the copy a
//! move leaves behind is then case (b), erased after the grace.
//!
//! A pass is planned from the store and carried out through an [`Eraser`]
//! (the cluster client; a fake in tests). The [`Collector`] runs a pass
//! whenever the directory notifies it (a volume deleted) or its period has
//! passed, as a [`Worker`] on the directory's runner.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::api::*;
use crate::client::{Client, ClientError};
use crate::codec::root::UnverifiedRoot;
use crate::codec::segment::SegmentShardKey;
use crate::codec::sequence::SegmentId;
use crate::directory::Directory;
use crate::directory::meta::{self, Compare, MetaStore, Op, Txn};
use crate::directory::schema::*;
use crate::sys::worker::{Pacing, State, Status, Worker};

/// A pass runs at least this often (more often if the grace or the
/// reconciliation period is shorter), and whenever the directory has news.
pub const PERIOD: Duration = Duration::from_secs(5);

/// The first reconciliation comes at most this long after the start
/// (peers have reported by then).
pub const FIRST_RECONCILE: Duration = Duration::from_secs(60);

/// Shard keys asked of a peer per call, and store entries read per page.
const PAGE: u32 = 1000;

/// What the collector asks of the peers.
pub trait Eraser: Clone + Send + Sync + 'static {
    type Error: std::fmt::Display + Send;

    /// Up to `limit` shards of `volume` that `peer` holds, in key order,
    /// after `after`.
    fn shards(
        &self,
        peer: &PeerAddr,
        volume: [u8; VOLUME_ID_LEN],
        after: Option<SegmentShardKey>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<SegmentShardKey>, Self::Error>> + Send;

    /// Deletes one shard from `peer`, as a writer at `epoch` (a peer
    /// refuses a delete from an epoch older than one it has seen); whether
    /// it was there.
    fn erase(
        &self,
        peer: &PeerAddr,
        key: SegmentShardKey,
        epoch: u64,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// [`Self::shards`], with each shard's copy (`None`: this eraser
    /// cannot tell copies apart).
    fn copies(
        &self,
        peer: &PeerAddr,
        volume: [u8; VOLUME_ID_LEN],
        after: Option<SegmentShardKey>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<(SegmentShardKey, Option<CopyId>)>, Self::Error>> + Send {
        async move { Ok(self.shards(peer, volume, after, limit).await?.into_iter().map(|k| (k, None)).collect()) }
    }

    /// [`Self::erase`], of that copy only when one is named: a copy
    /// stored since is kept (`Ok(false)`).
    fn erase_copy(
        &self,
        peer: &PeerAddr,
        key: SegmentShardKey,
        epoch: u64,
        copy: Option<CopyId>,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send {
        async move {
            let _ = copy;
            self.erase(peer, key, epoch).await
        }
    }
}

impl Eraser for Client {
    type Error = ClientError;

    async fn shards(
        &self,
        peer: &PeerAddr,
        volume: [u8; VOLUME_ID_LEN],
        after: Option<SegmentShardKey>,
        limit: u32,
    ) -> Result<Vec<SegmentShardKey>, ClientError> {
        self.list_shards(peer, volume, after, limit).await
    }

    async fn erase(&self, peer: &PeerAddr, key: SegmentShardKey, epoch: u64) -> Result<bool, ClientError> {
        self.delete_shard(peer, key, epoch).await
    }

    async fn copies(
        &self,
        peer: &PeerAddr,
        volume: [u8; VOLUME_ID_LEN],
        after: Option<SegmentShardKey>,
        limit: u32,
    ) -> Result<Vec<(SegmentShardKey, Option<CopyId>)>, ClientError> {
        Ok(self
            .list_copies(peer, volume, after, limit)
            .await?
            .into_iter()
            .map(|(k, c)| (k, Some(c)))
            .collect())
    }

    async fn erase_copy(
        &self,
        peer: &PeerAddr,
        key: SegmentShardKey,
        epoch: u64,
        copy: Option<CopyId>,
    ) -> Result<bool, ClientError> {
        match copy {
            Some(c) => self.delete_copy(peer, key, epoch, c).await,
            None => self.delete_shard(peer, key, epoch).await,
        }
    }
}

/// A deleted volume and whom to ask for its shards.
#[derive(Debug)]
pub struct DeletedErasure {
    pub entry: meta::Entry,
    pub volume: [u8; VOLUME_ID_LEN],
    /// Every peer that is up now.
    pub peers: Vec<PeerAddr>,
    /// False if a known peer is down: the entry stays for a later pass.
    pub all_up: bool,
}

/// What a shard a peer holds is, by the directory's records (see the
/// module documentation, cases (a) to (e)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardClass {
    /// (a) Its record names this peer for this index.
    Live,
    /// (b) Its record names another peer (or none) for this index.
    Replaced,
    /// (c) No record; the segment was dropped and waits in `dead/`.
    Dropped,
    /// (d) No record, at or below the root's highest segment or the floor:
    /// no commit can add it any more.
    Failed,
    /// (e) No record, above the root's highest: maybe a commit in flight.
    Unrecorded,
}

impl ShardClass {
    /// Whether it is erased once it has been one for the grace.
    pub fn is_orphan(self) -> bool {
        matches!(self, Self::Replaced | Self::Failed | Self::Unrecorded)
    }
}

/// Classifies shard `key` held by the peer with small id `holder` (`None`:
/// it has none, so no record names it), given the segment's record, whether
/// a `dead/` entry exists, and `highest`: the larger of the volume's root's
/// highest segment and its floor.
pub fn classify(
    key: &SegmentShardKey,
    holder: Option<u16>,
    record: Option<&SegmentRecord>,
    dead: bool,
    highest: SegmentId,
) -> ShardClass {
    match record {
        Some(r) => match (r.peers.get(usize::from(key.index)), holder) {
            (Some(&named), Some(h)) if named != 0 && named == h => ShardClass::Live,
            _ => ShardClass::Replaced,
        },
        None if dead => ShardClass::Dropped,
        None if key.segment <= highest => ShardClass::Failed,
        None => ShardClass::Unrecorded,
    }
}

/// Whether an orphan of class `class` is surplus: always, except a
/// `Replaced` copy of an index whose recorded holder is not up (lost, down,
/// or none stored). That index is repair's to rebuild, and repair may
/// record this very copy (a rebuild that stored it but whose answer was
/// lost, tried again on the same peer): erasing it then could leave the
/// record naming a holder without its shard. It becomes surplus once the
/// index has an up holder again (another peer, or its own one back).
fn surplus(
    key: &SegmentShardKey,
    class: ShardClass,
    record: Option<&SegmentRecord>,
    up: &HashSet<u16>,
) -> bool {
    if class != ShardClass::Replaced {
        return true;
    }
    match record.map(|r| r.peers.get(usize::from(key.index))) {
        Some(Some(&named)) => named != 0 && up.contains(&named),
        // An index past the record: nothing will ever record it.
        _ => true,
    }
}

/// One pass over the dropped segments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeadPass {
    /// Entries left: in their grace, or with a holder down.
    pub left: u64,
    /// Shards erased (that were there).
    pub erased: u64,
}

/// One reconciliation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcilePass {
    /// Shards listed by the peers.
    pub checked: u64,
    /// Orphans seen for the first time.
    pub found: u64,
    /// Orphans erased.
    pub erased: u64,
}

/// Orphan shards seen, by holder and key: when first seen (the
/// directory's clock). In memory: after a restart they are seen anew, so a
/// restart only delays an erasure.
#[derive(Debug, Default)]
pub struct Orphans {
    /// When first seen, and which copy.
    first_seen: HashMap<(String, SegmentShardKey), (u64, Option<CopyId>)>,
}

impl Orphans {
    /// How many orphans are being watched.
    pub fn len(&self) -> usize {
        self.first_seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.first_seen.is_empty()
    }
}

/// Starts the collector on the directory's runner.
pub(in crate::directory) fn start<S: MetaStore, E: Eraser>(dir: &Arc<Directory<S>>, eraser: E) {
    let t = dir.timing;
    let period =
        PERIOD.min(t.drop_grace).min(t.collect_grace).min(t.reconcile_every).max(Duration::from_millis(100));
    // After a failed pass, the next one comes a period later.
    let pacing = Pacing { tranquility: 0, backoff: period, max_backoff: period };
    let first = dir.now() + t.reconcile_every.min(FIRST_RECONCILE).as_millis() as u64;
    let collector = Collector {
        dir: dir.clone(),
        eraser,
        period,
        waited: false,
        queued: 0,
        next_reconcile_ms: first,
        next_leaving_ms: 0,
        orphans: Orphans::default(),
        totals: (0, 0, 0),
    };
    dir.workers.spawn_paced(collector, pacing);
}

/// The collector as a [`Worker`]: one pass per `work`, then idle until the
/// directory notifies it or its period passes.
pub struct Collector<S: MetaStore, E: Eraser> {
    dir: Arc<Directory<S>>,
    eraser: E,
    period: Duration,
    /// Whether the first wait is over: the first pass comes after it, as
    /// every other (a directory that just started has no peer up yet).
    waited: bool,
    /// Queue entries (deleted volumes, dropped segments) left after the
    /// last pass.
    queued: u64,
    /// When the next reconciliation is due (the directory's clock).
    next_reconcile_ms: u64,
    /// When leaving peers may be reconciled again.
    next_leaving_ms: u64,
    orphans: Orphans,
    /// Since the start: shards of dropped segments erased, orphans found,
    /// orphans erased.
    totals: (u64, u64, u64),
}

impl<S: MetaStore, E: Eraser> Collector<S, E> {
    async fn pass(&mut self) -> Result<(), Remote> {
        let deleted = self.dir.collect_deleted(&self.eraser).await?;
        let dead = self.dir.collect_dead(&self.eraser).await?;
        self.queued = deleted + dead.left;
        self.totals.0 += dead.erased;
        // Peers that are leaving (or shedding space) are reconciled every
        // pass: the copies moved off them go once their grace is over, so a
        // drain ends with the peer holding nothing.
        // (At most every half grace: a copy goes a grace after it was
        // first seen, so listing them more often only costs.)
        let now = self.dir.now();
        let due = now >= self.next_reconcile_ms;
        let leaving =
            if due || now < self.next_leaving_ms { None } else { Some(self.dir.leaving_peers().await?) };
        if let Some(only) = leaving.as_ref().filter(|l| !l.is_empty()) {
            let r = self.dir.reconcile(&self.eraser, &mut self.orphans, Some(only)).await?;
            self.totals.1 += r.found;
            self.totals.2 += r.erased;
            let half = (self.dir.timing.collect_grace / 2).max(self.period);
            self.next_leaving_ms = now + half.as_millis() as u64;
        }
        if due {
            let r = self.dir.reconcile(&self.eraser, &mut self.orphans, None).await?;
            self.totals.1 += r.found;
            self.totals.2 += r.erased;
            self.next_reconcile_ms = self.dir.now() + self.dir.timing.reconcile_every.as_millis() as u64;
            if r.found + r.erased > 0 {
                tracing::info!(
                    "reconciliation: {} shards checked, {} new orphans, {} erased, {} watched",
                    r.checked,
                    r.found,
                    r.erased,
                    self.orphans.len()
                );
            }
        }
        Ok(())
    }
}

impl<S: MetaStore, E: Eraser> Worker for Collector<S, E> {
    type Error = Remote;

    fn name(&self) -> String {
        "collector".into()
    }

    fn status(&self) -> Status {
        let (erased, found, orphans) = self.totals;
        Status {
            queue: Some(self.queued),
            progress: Some(format!(
                "{erased} shards of dropped segments erased; {found} orphans found, {orphans} erased, {} watched",
                self.orphans.len()
            )),
        }
    }

    async fn work(&mut self, stop: &CancellationToken) -> Result<State, Remote> {
        if self.waited {
            // A pass cut short by the stop is safe: an entry leaves its
            // queue only once its erasure is complete, and an orphan is
            // erased only after its floor is durable.
            tokio::select! {
                done = self.pass() => done?,
                () = stop.cancelled() => return Ok(State::Done),
            }
        }
        Ok(State::Idle)
    }

    async fn wait_for_work(&mut self) -> State {
        tokio::select! {
            () = self.dir.gc.notified() => {}
            () = tokio::time::sleep(self.period) => {}
        }
        self.waited = true;
        State::Busy
    }
}

/// A holder named by a segment record, as a pass finds it.
enum Holder {
    Up(PeerAddr),
    /// Known but down (or failed): asked again in a later pass.
    Away,
    /// No slot, or its peer record is gone: it left the cluster.
    Gone,
}

impl<S: MetaStore> Directory<S> {
    /// One pass over deleted volumes and dropped segments (not
    /// reconciliation); returns how many queue entries are left.
    #[cfg(test)]
    pub(in crate::directory) async fn collect_once<E: Eraser>(&self, eraser: &E) -> Result<u64, Remote> {
        Ok(self.collect_deleted(eraser).await? + self.collect_dead(eraser).await?.left)
    }

    /// Plans the erasure of deleted volumes.
    pub(in crate::directory) async fn plan_deleted(&self) -> Result<Vec<DeletedErasure>, Remote> {
        let deleted = self.meta.list(b"gc/").await?;
        if deleted.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.now();
        let peers = self.peers().await?;
        // A lost peer is not waited for (it may never come back; if it
        // does, what it holds of the volume is not found: see "Not yet"
        // above).
        let all_up = peers.iter().all(|(_, r)| matches!(self.state(r, now), PeerState::Up | PeerState::Lost));
        let up: Vec<PeerAddr> = peers
            .iter()
            .filter(|(_, r)| self.state(r, now) == PeerState::Up)
            .map(|(name, r)| PeerAddr { name: name.clone(), addr: r.report.addr })
            .collect();
        Ok(deleted
            .into_iter()
            .filter_map(|entry| {
                let volume = <[u8; VOLUME_ID_LEN]>::try_from(entry.value.as_slice()).ok()?;
                Some(DeletedErasure { entry, volume, peers: up.clone(), all_up })
            })
            .collect())
    }

    /// One pass over deleted volumes; returns how many are left.
    async fn collect_deleted<E: Eraser>(&self, eraser: &E) -> Result<u64, Remote> {
        let mut left = 0;
        for job in self.plan_deleted().await? {
            let mut clean = job.all_up;
            for peer in &job.peers {
                let erased = async {
                    // Page by page, in key order, so a pass ends.
                    let (mut n, mut after) = (0, None);
                    loop {
                        let keys = eraser.shards(peer, job.volume, after, PAGE).await?;
                        let Some(&last) = keys.last() else { return Ok::<usize, E::Error>(n) };
                        for k in &keys {
                            // The largest epoch: nobody writes this volume again.
                            eraser.erase(peer, *k, u64::MAX).await?;
                        }
                        n += keys.len();
                        after = Some(last);
                    }
                };
                match erased.await {
                    Ok(0) => {}
                    Ok(n) => {
                        // Another pass must find nothing (a put admitted
                        // before the erase may still have been committed).
                        clean = false;
                        tracing::info!("erased {n} shards of a deleted volume from {}", peer.name);
                    }
                    Err(e) => {
                        clean = false;
                        tracing::info!("erasing a deleted volume's shards from {}: {e}", peer.name);
                    }
                }
            }
            if clean {
                self.dequeue(job.entry).await?;
            } else {
                left += 1;
            }
        }
        Ok(left)
    }

    /// The peer with small id `id`, as a pass finds it (`names` caches the
    /// `peerslot/` lookups of a pass).
    async fn holder(&self, id: u16, names: &mut HashMap<u16, Option<String>>) -> Result<Holder, Remote> {
        if let std::collections::hash_map::Entry::Vacant(v) = names.entry(id) {
            let slot = self.meta.get(&peer_slot_key(id)).await?;
            v.insert(slot.map(|e| String::from_utf8_lossy(&e.value).into_owned()));
        }
        let Some(name) = names[&id].clone() else { return Ok(Holder::Gone) };
        Ok(match self.get::<PeerRecord>("peer", &key("peers", &name)).await? {
            None => Holder::Gone,
            Some((r, _)) => match self.state(&r, self.now()) {
                PeerState::Up => Holder::Up(PeerAddr { name, addr: r.report.addr }),
                // Its shards were rebuilt elsewhere; if it ever comes
                // back, reconciliation erases what no record names.
                PeerState::Lost => Holder::Gone,
                PeerState::Down | PeerState::Failed => Holder::Away,
            },
        })
    }

    /// The epoch erasures of volume `id` go at: its current (last granted)
    /// epoch; `None` if the volume is gone.
    async fn erase_epoch(&self, id: &[u8; VOLUME_ID_LEN]) -> Result<Option<u64>, Remote> {
        let Some(name) = self.meta.get(&id_key(id)).await? else { return Ok(None) };
        let name = String::from_utf8_lossy(&name.value).into_owned();
        Ok(self.get::<VolumeRecord>("volume", &key("volumes", &name)).await?.map(|(v, _)| v.epoch))
    }

    /// One pass over the dropped segments: erases the shards of those whose
    /// grace is over, page by page.
    pub(in crate::directory) async fn collect_dead<E: Eraser>(&self, eraser: &E) -> Result<DeadPass, Remote> {
        let grace = self.timing.drop_grace.as_millis() as u64;
        let mut pass = DeadPass::default();
        let mut names = HashMap::new();
        let mut epochs: HashMap<[u8; VOLUME_ID_LEN], Option<u64>> = HashMap::new();
        // Holders whose erase failed in this pass (a peer just killed still
        // counts as up until the peer timeout).
        let mut unreachable: HashSet<u16> = HashSet::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.meta.list_range(b"dead/", after.as_deref(), PAGE as usize).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for entry in page {
                let Some((volume, segment)) = parse_dead_key(&entry.key) else {
                    return Err(internal(format!("a malformed dropped-segment key {:?}", entry.key)));
                };
                let dead: DeadSegment = dec("dropped segment", &entry.value)?;
                if self.now() < dead.dropped_ms.saturating_add(grace) {
                    pass.left += 1;
                    continue;
                }
                let epoch = match epochs.get(&volume) {
                    Some(e) => *e,
                    None => *epochs.entry(volume).or_insert(self.erase_epoch(&volume).await?),
                };
                let Some(epoch) = epoch else {
                    // Deleted meanwhile: its gc/ entry erases every shard.
                    self.dequeue(entry).await?;
                    continue;
                };
                let mut complete = true;
                let mut erasures = Vec::new();
                // Indices whose shard is gone (erased, or its holder left).
                let mut done: Vec<usize> = Vec::new();
                for (index, &id) in dead.record.peers.iter().enumerate() {
                    if id == 0 {
                        continue;
                    }
                    let key = SegmentShardKey { volume, segment, index: index as u8 };
                    match self.holder(id, &mut names).await? {
                        Holder::Gone => done.push(index),
                        // One that failed earlier in this pass is not
                        // asked again: each try may cost a whole timeout.
                        Holder::Up(_) if unreachable.contains(&id) => complete = false,
                        Holder::Away => complete = false,
                        Holder::Up(peer) => erasures.push((id, index, peer, key)),
                    }
                }
                // The holders of one segment at once.
                let answers = crate::sys::join_all(
                    erasures.iter().map(|(_, _, peer, key)| eraser.erase(peer, *key, epoch)).collect(),
                )
                .await;
                for ((id, index, peer, _), answer) in erasures.iter().zip(answers) {
                    match answer {
                        Ok(existed) => {
                            pass.erased += u64::from(existed);
                            done.push(*index);
                        }
                        Err(e) => {
                            complete = false;
                            unreachable.insert(*id);
                            tracing::info!(
                                "erasing shard {index} of dropped segment {segment} from {}: {e}",
                                peer.name
                            );
                        }
                    }
                }
                if complete {
                    self.dequeue(entry).await?;
                } else {
                    pass.left += 1;
                    if !done.is_empty() {
                        // What is left names only the shards still to
                        // erase (what `volume info` counts as collecting).
                        let mut left = dead.clone();
                        for i in done {
                            left.record.peers[i] = 0;
                        }
                        self.meta
                            .txn(
                                Txn::new()
                                    .when(Compare::ModRevision(entry.key.clone(), entry.mod_revision))
                                    .then(Op::Put { key: entry.key, value: enc(&left), lease: None }),
                            )
                            .await?;
                    }
                }
            }
        }
        Ok(pass)
    }

    /// Reconciles every up peer's shards (or only those of the peers in
    /// `only`) of every volume with the records, erasing orphans seen for
    /// the grace (see the module documentation).
    pub(in crate::directory) async fn reconcile<E: Eraser>(
        &self,
        eraser: &E,
        orphans: &mut Orphans,
        only: Option<&HashSet<String>>,
    ) -> Result<ReconcilePass, Remote> {
        let grace = self.timing.collect_grace.as_millis() as u64;
        let mut pass = ReconcilePass::default();
        let now = self.now();
        let up: Vec<PeerAddr> = self
            .up_peers()
            .await?
            .into_iter()
            .map(|(name, r)| PeerAddr { name, addr: r.report.addr })
            .collect();
        let ids = self.peer_ids().await?;
        // Every peer serving reads counts as a holder (a copy is surplus
        // once another one holds its index), though only `only`'s are
        // listed; one drained for failed audits does not (repair rebuilds
        // its indices, maybe on the peer holding this copy).
        let view = self.peer_view().await?;
        let up_ids: HashSet<u16> = view.by_id.values().filter(|p| p.state.is_up()).map(|p| p.id).collect();
        let up: Vec<PeerAddr> = up.into_iter().filter(|p| only.is_none_or(|o| o.contains(&p.name))).collect();
        // Orphans seen in this pass, and the (peer, volume) listings that
        // completed: a sighting not renewed by a complete listing is
        // forgotten (the shard is gone, or became live).
        let mut seen_now: HashSet<(String, SegmentShardKey)> = HashSet::new();
        let mut listed: HashSet<(String, [u8; VOLUME_ID_LEN])> = HashSet::new();
        for v in self.list::<VolumeRecord>("volume", b"volumes/").await? {
            let volume = v.spec.id;
            for peer in &up {
                // The root is read before any record, so a record absent
                // when read was not added by a commit the root already
                // counts (CommitRoot refuses ids at or below it).
                let root_highest = match self.get::<RootState>("root", &root_key(&volume)).await? {
                    Some((r, _)) => UnverifiedRoot::parse(&r.sealed)
                        .map_err(|e| internal(format!("volume {}: the stored root: {e}", v.spec.name)))?
                        .highest_segment(),
                    None => SegmentId::ZERO,
                };
                let highest = root_highest.max(self.segment_floor(&volume).await?.id);
                let holder = ids.get(&peer.name).copied();
                let mut after = None;
                let complete = loop {
                    let listed = match eraser.copies(peer, volume, after, PAGE).await {
                        Ok(listed) => listed,
                        Err(e) => {
                            tracing::info!("reconciling {} on {}: {e}", v.spec.name, peer.name);
                            break false;
                        }
                    };
                    let Some(&(last, _)) = listed.last() else { break true };
                    after = Some(last);
                    pass.checked += listed.len() as u64;
                    let mut due = Vec::new();
                    for (k, copy) in listed {
                        let record = self.segment_record(&k).await?;
                        let dead =
                            record.is_none() && self.meta.get(&dead_key(&volume, k.segment)).await?.is_some();
                        let class = classify(&k, holder, record.as_ref(), dead, highest);
                        if !class.is_orphan() || !surplus(&k, class, record.as_ref(), &up_ids) {
                            continue;
                        }
                        // A copy stored since the first sighting is new:
                        // its grace starts again.
                        let seen = orphans.first_seen.entry((peer.name.clone(), k)).or_insert_with(|| {
                            pass.found += 1;
                            (now, copy)
                        });
                        if seen.1 != copy {
                            *seen = (now, copy);
                        }
                        let at = seen.0;
                        seen_now.insert((peer.name.clone(), k));
                        if now >= at.saturating_add(grace) {
                            due.push((k, class, copy));
                        }
                    }
                    if due.is_empty() {
                        continue;
                    }
                    // No new record can name an unrecorded shard once the
                    // floor is above it; read the record again after.
                    let unrecorded =
                        due.iter().filter(|(_, c, _)| *c != ShardClass::Replaced).map(|(k, _, _)| k.segment);
                    if let Some(top) = unrecorded.max()
                        && !self.raise_floor(&volume, top).await?
                    {
                        break false; // the volume was deleted meanwhile
                    }
                    let Some(epoch) = self.erase_epoch(&volume).await? else { break false };
                    for (k, class, copy) in due {
                        // Read the record once more: a commit may have
                        // landed it before the floor rose, repair may
                        // have recorded this copy or lost the holder.
                        let skey = segment_key(&k.volume, k.segment);
                        let now_entry = self.meta.get(&skey).await?;
                        let now_record = match &now_entry {
                            Some(e) => Some(
                                SegmentRecord::decode(&e.value)
                                    .map_err(|e| internal(format!("segment {}: {e}", k.segment)))?,
                            ),
                            None => None,
                        };
                        let still = match class {
                            ShardClass::Replaced => {
                                now_record.as_ref().is_some_and(|r| {
                                    classify(&k, holder, Some(r), false, highest) == ShardClass::Replaced
                                }) && surplus(&k, class, now_record.as_ref(), &up_ids)
                            }
                            _ => now_record.is_none(),
                        };
                        if !still {
                            continue;
                        }
                        // A repair may be storing this very index on this
                        // very peer now (a move back onto it, a rebuild
                        // picking it): rewriting the record unchanged, on
                        // the revision just judged, makes that repair's
                        // compare-and-set fail (it then erases what it
                        // stored), and one that landed first makes this
                        // write fail (the copy is live: kept).
                        if let (ShardClass::Replaced, Some(e)) = (class, &now_entry) {
                            let txn = Txn::new()
                                .when(Compare::ModRevision(skey.clone(), e.mod_revision))
                                .then(Op::Put { key: skey.clone(), value: e.value.clone(), lease: None });
                            if !self.meta.txn(txn).await?.succeeded {
                                continue;
                            }
                        }
                        // Only the copy judged: one stored since (a repair
                        // storing this index here again) is kept.
                        match eraser.erase_copy(peer, k, epoch, copy).await {
                            // Not erased: gone already, or stored anew
                            // since it was listed (judged again from the
                            // next listing).
                            Ok(erased) => {
                                orphans.first_seen.remove(&(peer.name.clone(), k));
                                seen_now.remove(&(peer.name.clone(), k));
                                if !erased {
                                    continue;
                                }
                                pass.erased += 1;
                                tracing::info!(
                                    "erased orphan shard {} of segment {} of volume {} from {} ({class:?})",
                                    k.index,
                                    k.segment,
                                    v.spec.name,
                                    peer.name
                                );
                            }
                            Err(e) => tracing::info!("erasing an orphan shard from {}: {e}", peer.name),
                        }
                    }
                };
                if complete {
                    listed.insert((peer.name.clone(), volume));
                }
            }
        }
        orphans.first_seen.retain(|(peer, k), _| {
            seen_now.contains(&(peer.clone(), *k)) || !listed.contains(&(peer.clone(), k.volume))
        });
        Ok(pass)
    }

    /// The record of the segment `k` is a shard of, if it has one.
    pub(in crate::directory) async fn segment_record(
        &self,
        k: &SegmentShardKey,
    ) -> Result<Option<SegmentRecord>, Remote> {
        match self.meta.get(&segment_key(&k.volume, k.segment)).await? {
            Some(e) => Ok(Some(
                SegmentRecord::decode(&e.value)
                    .map_err(|e| internal(format!("segment {}: {e}", k.segment)))?,
            )),
            None => Ok(None),
        }
    }

    /// Raises volume `volume`'s segment floor to at least `to`, durably;
    /// false if the volume is gone.
    async fn raise_floor(&self, volume: &[u8; VOLUME_ID_LEN], to: SegmentId) -> Result<bool, Remote> {
        for _ in 0..16 {
            let Some(named) = self.meta.get(&id_key(volume)).await? else { return Ok(false) };
            let floor = self.segment_floor(volume).await?;
            if floor.id >= to {
                return Ok(true);
            }
            let out = self
                .meta
                .txn(
                    Txn::new()
                        .when(Compare::ModRevision(named.key, named.mod_revision))
                        .when(floor.unchanged)
                        .then(Op::Put {
                            key: floor_key(volume),
                            value: to.raw().to_be_bytes().to_vec(),
                            lease: None,
                        }),
                )
                .await?;
            if out.succeeded {
                return Ok(true);
            }
        }
        Err(internal(format!("volume {}: the segment floor kept changing", hex::encode(volume))))
    }

    /// Removes a collector's queue entry, unless it changed since it was read.
    async fn dequeue(&self, entry: meta::Entry) -> Result<(), Remote> {
        self.meta
            .txn(
                Txn::new()
                    .when(Compare::ModRevision(entry.key.clone(), entry.mod_revision))
                    .then(Op::Delete { key: entry.key }),
            )
            .await?;
        Ok(())
    }
}
