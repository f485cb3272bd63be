//! The garbage collector: erases from the peers the shards nothing points
//! to any more.
//!
//! Today one queue in the store feeds it (see the key schema in
//! [`super::super`]): `gc/<volume id>`, a deleted volume. Every peer is
//! asked for all the volume's shards and erases them at the largest epoch
//! (so a fenced writer's late put cannot land afterwards); the entry goes
//! after a pass in which every peer was up and held none (a put admitted
//! before the delete may still land, so one erasing pass is not enough). A
//! peer that left the cluster holds nothing anyone can reach and is not
//! waited for. Segments of a live volume that no root reaches any more
//! (compacted, or stored by a commit that failed) are the next issue's.
//!
//! A pass is planned from the store (`plan_deleted` gives a list of
//! [`DeletedErasure`]s) and then carried out through an [`Eraser`] (the
//! cluster client; a fake in tests). The [`Collector`] runs a pass whenever
//! the directory notifies it (a volume deleted) or [`PERIOD`] has passed,
//! as a [`Worker`] on the directory's runner.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::api::*;
use crate::client::{Client, ClientError};
use crate::codec::segment::SegmentShardKey;
use crate::directory::Directory;
use crate::directory::meta::{self, Compare, MetaStore, Op, Txn};
use crate::sys::worker::{Pacing, State, Status, Worker};

/// A pass runs at least this often, and whenever the directory has news.
pub const PERIOD: Duration = Duration::from_secs(5);

/// Shard keys asked of a peer per call.
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
    /// refuses a delete from an epoch older than one it has seen).
    fn erase(
        &self,
        peer: &PeerAddr,
        key: SegmentShardKey,
        epoch: u64,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
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

    async fn erase(&self, peer: &PeerAddr, key: SegmentShardKey, epoch: u64) -> Result<(), ClientError> {
        self.delete_shard(peer, key, epoch).await.map(|_existed| ())
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
    /// One pass over the queue; returns how many entries are left.
    pub(in crate::directory) async fn collect_once<E: Eraser>(&self, eraser: &E) -> Result<u64, Remote> {
        self.collect_deleted(eraser).await
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
