//! The garbage collector: erases from the peers the shards nothing points
//! to any more.
//!
//! Two queues in the store feed it (see the key schema in [`super::super`]):
//!
//! - `old/<volume id>/<stripe><generation>`: a generation superseded by a
//!   commit or dropped by a trim. Its shards are deleted from the peers
//!   that hold them, at the volume's current epoch (so a fenced writer's
//!   late put cannot survive); the entry goes once every holder confirmed.
//!   A holder that is down keeps the entry queued; a holder that left the
//!   cluster holds nothing anyone can reach and is skipped.
//! - `gc/<volume id>`: a deleted volume. Every peer is asked for all the
//!   volume's shards and erases them; the entry goes after a pass in which
//!   every peer was up and held none (a put admitted before the delete may
//!   still land, so one erasing pass is not enough).
//!
//! A pass is planned from the store (`plan_old` gives an [`OldPlan`],
//! `plan_deleted` a list of [`DeletedErasure`]s) and then carried out through an [`Eraser`]
//! (the cluster client; a fake in tests). The [`Collector`] runs a pass
//! whenever the directory notifies it (a volume deleted, a generation
//! superseded or dropped) or [`PERIOD`] has passed, as a
//! [`Worker`] on the directory's runner.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::api::*;
use crate::client::{Client, ClientError};
use crate::codec::shard::ShardKey;
use crate::directory::Directory;
use crate::directory::meta::{self, Compare, MetaStore, Op, Txn};
use crate::directory::schema::*;
use crate::sys::worker::{Pacing, State, Status, Worker};

/// A pass runs at least this often, and whenever the directory has news.
pub const PERIOD: Duration = Duration::from_secs(5);

/// At most this many old generations are being erased at once.
const IN_FLIGHT: usize = 32;

/// What the collector asks of the peers.
pub trait Eraser: Clone + Send + Sync + 'static {
    type Error: std::fmt::Display + Send;

    /// Every shard of `volume` that `peer` holds.
    fn shards(
        &self,
        peer: &PeerAddr,
        volume: [u8; VOLUME_ID_LEN],
    ) -> impl Future<Output = Result<Vec<ShardKey>, Self::Error>> + Send;

    /// Deletes one shard from `peer`, as a writer at `epoch` (a peer
    /// refuses a delete from an epoch older than one it has seen).
    fn erase(
        &self,
        peer: &PeerAddr,
        key: ShardKey,
        epoch: u64,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

impl Eraser for Client {
    type Error = ClientError;

    async fn shards(
        &self,
        peer: &PeerAddr,
        volume: [u8; VOLUME_ID_LEN],
    ) -> Result<Vec<ShardKey>, ClientError> {
        self.list_shards(peer, volume).await
    }

    async fn erase(&self, peer: &PeerAddr, key: ShardKey, epoch: u64) -> Result<(), ClientError> {
        self.delete_shard(peer, key, epoch).await.map(|_existed| ())
    }
}

/// A superseded generation and how to erase it.
#[derive(Debug)]
pub struct OldErasure {
    /// Its queue entry, dequeued once the erasure is complete.
    pub entry: meta::Entry,
    /// The volume's current epoch.
    pub epoch: u64,
    /// Each shard of the generation on a peer that is up.
    pub shards: Vec<(PeerAddr, ShardKey)>,
    /// False if a holder is down: erasing `shards` is not enough.
    pub complete: bool,
}

/// What a pass over the superseded generations does.
#[derive(Debug, Default)]
pub struct OldPlan {
    /// Entries whose volume was deleted since: forgotten (the deleted
    /// volume's collection erases every shard it had).
    pub orphans: Vec<meta::Entry>,
    pub erasures: Vec<OldErasure>,
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

/// Starts the collector on the directory's runner.
pub(in crate::directory) fn start<S: MetaStore, E: Eraser>(dir: &Arc<Directory<S>>, eraser: E) {
    // After a failed pass, the next one comes a period later, as when the
    // collector was a hand-written loop.
    let pacing = Pacing { tranquility: 0, backoff: PERIOD, max_backoff: PERIOD };
    dir.workers.spawn_paced(Collector { dir: dir.clone(), eraser, waited: false, queued: 0 }, pacing);
}

/// The collector as a [`Worker`]: one pass per `work`, then idle until the
/// directory notifies it or [`PERIOD`] passes.
pub struct Collector<S: MetaStore, E: Eraser> {
    dir: Arc<Directory<S>>,
    eraser: E,
    /// Whether the first wait is over: the first pass comes after it, as
    /// every other (a directory that just started has no peer up yet).
    waited: bool,
    /// Queue entries left after the last pass.
    queued: u64,
}

impl<S: MetaStore, E: Eraser> Worker for Collector<S, E> {
    type Error = Remote;

    fn name(&self) -> String {
        "collector".into()
    }

    fn status(&self) -> Status {
        Status { queue: Some(self.queued), progress: None }
    }

    async fn work(&mut self, stop: &CancellationToken) -> Result<State, Remote> {
        if self.waited {
            // A pass cut short by the stop is safe: an entry leaves its
            // queue only once its erasure is complete.
            self.queued = tokio::select! {
                left = self.dir.collect_once(&self.eraser) => left?,
                () = stop.cancelled() => return Ok(State::Done),
            };
        }
        Ok(State::Idle)
    }

    async fn wait_for_work(&mut self) -> State {
        tokio::select! {
            () = self.dir.gc.notified() => {}
            () = tokio::time::sleep(PERIOD) => {}
        }
        self.waited = true;
        State::Busy
    }
}

impl<S: MetaStore> Directory<S> {
    /// One pass over both queues; returns how many entries are left.
    pub(in crate::directory) async fn collect_once<E: Eraser>(&self, eraser: &E) -> Result<u64, Remote> {
        let old = self.collect_old(eraser).await?;
        let deleted = self.collect_deleted(eraser).await?;
        Ok(old + deleted)
    }

    /// Plans the erasure of the superseded and dropped generations.
    pub(in crate::directory) async fn plan_old(&self) -> Result<OldPlan, Remote> {
        let mut plan = OldPlan::default();
        let old = self.meta.list(b"old/").await?;
        if old.is_empty() {
            return Ok(plan);
        }
        let now = self.now();
        let peers: HashMap<String, PeerRecord> = self.peers().await?.into_iter().collect();
        let mut epochs: HashMap<[u8; VOLUME_ID_LEN], Option<u64>> = HashMap::new();
        for entry in old {
            let Some((id, stripe, _)) = parse_old_key(&entry.key) else { continue };
            let epoch = match epochs.get(&id) {
                Some(e) => *e,
                None => {
                    let e = match self.meta.get(&id_key(&id)).await? {
                        Some(name) => self
                            .get::<VolumeRecord>(
                                "volume",
                                &key("volumes", &String::from_utf8_lossy(&name.value)),
                            )
                            .await?
                            .map(|(v, _)| v.epoch),
                        None => None,
                    };
                    epochs.insert(id, e);
                    e
                }
            };
            let Some(epoch) = epoch else {
                plan.orphans.push(entry);
                continue;
            };
            let rec: StripeRecord = dec("stripe", &entry.value)?;
            let mut shards = Vec::new();
            let mut complete = true;
            for (index, (name, hash)) in rec.peers.iter().zip(&rec.hashes).enumerate() {
                if hash.is_none() {
                    continue;
                }
                match peers.get(name) {
                    Some(p) if self.state(p, now) == PeerState::Up => shards.push((
                        PeerAddr { name: name.clone(), addr: p.report.addr },
                        ShardKey { volume: id, stripe, generation: rec.generation, index: index as u8 },
                    )),
                    // A peer that left the cluster holds nothing we can reach.
                    None => {}
                    Some(_) => complete = false,
                }
            }
            plan.erasures.push(OldErasure { entry, epoch, shards, complete });
        }
        Ok(plan)
    }

    /// Erases the shards of superseded and dropped generations. A shard
    /// on a peer that is down or fails stays queued for the next pass.
    /// Returns how many entries are left.
    async fn collect_old<E: Eraser>(&self, eraser: &E) -> Result<u64, Remote> {
        let plan = self.plan_old().await?;
        for entry in plan.orphans {
            self.meta.txn(Txn::new().then(Op::Delete { key: entry.key })).await?;
        }
        let mut left = plan.erasures.len() as u64;
        let mut erasing = tokio::task::JoinSet::new();
        for job in plan.erasures {
            let eraser = eraser.clone();
            erasing.spawn(async move {
                let mut all = job.complete;
                for (peer, key) in job.shards {
                    if let Err(e) = eraser.erase(&peer, key, job.epoch).await {
                        tracing::debug!("erasing an old shard from {}: {e}", peer.name);
                        all = false;
                    }
                }
                all.then_some(job.entry)
            });
            if erasing.len() >= IN_FLIGHT
                && let Some(Ok(Some(entry))) = erasing.join_next().await
            {
                self.dequeue(entry).await?;
                left -= 1;
            }
        }
        while let Some(done) = erasing.join_next().await {
            if let Ok(Some(entry)) = done {
                self.dequeue(entry).await?;
                left -= 1;
            }
        }
        Ok(left)
    }

    /// Plans the erasure of deleted volumes.
    pub(in crate::directory) async fn plan_deleted(&self) -> Result<Vec<DeletedErasure>, Remote> {
        let deleted = self.meta.list(b"gc/").await?;
        if deleted.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.now();
        let peers = self.peers().await?;
        let all_up = peers.iter().all(|(_, r)| self.state(r, now) == PeerState::Up);
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
                    let keys = eraser.shards(peer, job.volume).await?;
                    for k in &keys {
                        // The largest epoch: nobody writes this volume again.
                        eraser.erase(peer, *k, u64::MAX).await?;
                    }
                    Ok::<usize, E::Error>(keys.len())
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
