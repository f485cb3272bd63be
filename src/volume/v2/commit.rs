//! Commits: the queued writes of the local log packed into segments,
//! stored on peers, and made the volume's state by one compare-and-set of
//! its root at the directory.
//!
//! ```text
//! take the queue's oldest part + its watermark W (every sequence ≤ W is
//!   in it or committed before)
//! pack what of it is still the newest local version: ciphertext from the
//!   log into data slots, zero ranges into the summary (layout::Packer)
//! note the segment ids in the log (a resumed epoch never reuses one)
//! place (one call for every segment) ─► erasure-code + hash ─► put at
//!   quorum, holders as they answered
//! root: commit + 1, the new segments since the checkpoint ─► seal (MAC)
//!   ─► compare-and-set (retried with the SAME bytes until the directory
//!   answers for certain: two roots never share an (epoch, commit))
//! apply the summaries to the map, remember the freshness, log
//!   "Committed W", wake the flushes waiting for ≤ W
//! ```
//!
//! A commit that fails puts what it took back at the head of the queue; the
//! segments it stored are orphans (no root reaches them) for collection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::layout::{PackedBlock, Packer};
use super::local::{Current, Queued};
use super::log::{Base, NewRecord};
use super::remote::Holder;
use super::root::{MAX_SEGMENTS_SINCE, RootRecord, SegmentRef};
use super::summary::Summary;
use super::volume::Inner;
use crate::api::{ErrorKind, MAX_COMMIT_SEGMENTS, RootCommit, SegmentRecord};
use crate::backend;
use crate::codec::segment::{BLOCK_SIZE, EncodedSegment, SegmentCodec, SegmentGeometry};
use crate::codec::sequence::{SegmentId, Sequence};
use crate::sys::worker::{Pacing, State, Status, Worker};

/// Segments one commit carries at most (the directory takes 100).
const COMMIT_SEGMENTS: usize = 32;

/// Why a commit failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum CommitError {
    /// Refused for the lease's epoch: lapsed, or taken over (the lease
    /// keeper finds out which).
    #[error("{0}")]
    Fenced(String),
    /// The root moved under this writer: another machine wrote the
    /// volume. Stop for good.
    #[error("{0}")]
    Diverged(String),
    #[error("{1}")]
    Failed(backend::ErrorKind, String),
}

impl CommitError {
    fn kind(&self) -> backend::ErrorKind {
        match self {
            CommitError::Fenced(_) | CommitError::Diverged(_) => backend::ErrorKind::Fenced,
            CommitError::Failed(k, _) => *k,
        }
    }
}

fn unavailable(why: impl ToString) -> CommitError {
    CommitError::Failed(backend::ErrorKind::Unavailable, why.to_string())
}

fn io(why: impl ToString) -> CommitError {
    CommitError::Failed(backend::ErrorKind::Io, why.to_string())
}

/// A packed segment on its way to the peers.
struct Sealed {
    id: SegmentId,
    geometry: SegmentGeometry,
    encoded: EncodedSegment,
    summary: Summary,
}

impl Inner {
    /// Blocks a commit takes at most.
    fn commit_blocks(&self) -> u64 {
        COMMIT_SEGMENTS as u64 * self.k as u64 * u64::from(self.blocks_per_shard)
    }

    /// One commit of the queue's oldest part; `Ok(true)` if more waits.
    pub(super) async fn commit_once(&self) -> Result<bool, CommitError> {
        let _turn = self.commit_turn.lock().await;
        if let Some(why) = self.fenced.lock().expect("fenced").clone() {
            return Err(CommitError::Diverged(why));
        }
        if *self.suspended.borrow() {
            return Err(unavailable("the write lease may have lapsed: waiting for it"));
        }
        self.urgent.store(false, Ordering::Relaxed);
        let (taken, watermark) = {
            let s = self.sequences.lock().expect("sequences");
            self.local.lock().expect("local").take(s.last(), self.commit_blocks())
        };
        if taken.is_empty() {
            self.reached(watermark);
            self.release_log(watermark).await;
            return Ok(false);
        }
        match self.commit_taken(&taken, watermark).await {
            Ok(()) => {
                *self.commit_failure.lock().expect("failure") = None;
                self.reached(watermark);
                self.release_log(watermark).await;
                Ok(self.local.lock().expect("local").queued() > 0)
            }
            Err(e) => {
                self.local.lock().expect("local").untake(taken);
                match &e {
                    CommitError::Diverged(why) => self.fence(why.clone()),
                    // The lease keeper decides: lapsed (take it again,
                    // commit under the new epoch) or taken over (fence).
                    CommitError::Fenced(_) => self.lease_doubt.notify_one(),
                    CommitError::Failed(..) => {}
                }
                *self.commit_failure.lock().expect("failure") = Some((e.kind(), e.to_string()));
                // Wake flushes so they see the failure.
                self.committed.send_modify(|_| {});
                Err(e)
            }
        }
    }

    fn reached(&self, watermark: Sequence) {
        self.committed.send_if_modified(|w| {
            let raise = watermark > *w;
            if raise {
                *w = watermark;
            }
            raise
        });
    }

    /// Frees log files once they are mostly committed copies: the log is
    /// the cache of this machine's writes until it needs the room.
    async fn release_log(&self, watermark: Sequence) {
        if self.log.used_bytes() < self.config.log_size / 2 {
            return;
        }
        match self.log.release(watermark).await {
            Ok(gone) if !gone.is_empty() => {
                self.local.lock().expect("local").forget_files(|f| !gone.contains(&f));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("volume {}: releasing log files: {e}", self.name),
        }
    }

    async fn commit_taken(&self, taken: &[Queued], watermark: Sequence) -> Result<(), CommitError> {
        let packers = self.pack(taken).await?;
        let prev = self.root.lock().expect("root").clone();
        if prev.since.len() + packers.len() > MAX_SEGMENTS_SINCE {
            return Err(CommitError::Failed(
                backend::ErrorKind::Io,
                "the root names as many segments as it can: a map checkpoint is needed (not yet written by this version)".into(),
            ));
        }
        // Ids, noted in the log before any is used.
        let ids: Vec<SegmentId> = {
            let mut s = self.segment_ids.lock().expect("segment ids");
            (0..packers.len()).map(|_| s.next()).collect::<Result<_, _>>().map_err(io)?
        };
        let floor = Base {
            epoch: prev.epoch,
            commit: prev.commit,
            segment_floor: *ids.last().expect("a commit has a segment"),
            sequence_floor: self.sequences.lock().expect("sequences").last(),
        };
        self.log.append(&[NewRecord::Base(floor)]).await.map_err(io)?;
        // Synced before any of it leaves: after a power cut, every sequence
        // and segment id that may be on a peer is still in the log, so a
        // resumed epoch never reuses one (an XTS tweak would repeat).
        self.log.sync().await.map_err(io)?;
        // Lay out, erasure-code and hash, off the async threads.
        let (cipher, volume_id, m) = (self.cipher.clone(), self.record.spec.id, self.m);
        let mut sealed: Vec<Sealed> = tokio::task::spawn_blocking(move || {
            packers
                .into_iter()
                .zip(ids)
                .map(|(p, id)| {
                    let (geometry, area, summary) =
                        p.finish(id, m, &[], &cipher).map_err(|e| e.to_string())?;
                    let encoded = SegmentCodec::new(geometry)
                        .encode(&volume_id, id, &area)
                        .map_err(|e| e.to_string())?;
                    Ok(Sealed { id, geometry, encoded, summary })
                })
                .collect::<Result<Vec<_>, String>>()
        })
        .await
        .map_err(io)?
        .map_err(io)?;
        let shard_bytes = sealed.iter().map(|s| s.geometry.shard_len() as u64).max().unwrap_or(0);
        let placements = self
            .client
            .place_segments(&self.name, self.epoch.load(Ordering::Relaxed), sealed.len() as u32, shard_bytes, Vec::new())
            .await
            .map_err(|e| match e.kind() {
                Some(ErrorKind::Fenced) => CommitError::Fenced(e.to_string()),
                _ => unavailable(format!("placing segments: {e}")),
            })?;
        if placements.len() != sealed.len() {
            return Err(unavailable("the directory placed fewer segments than asked"));
        }
        let mut spares: Vec<Holder> = Vec::new();
        for p in &placements {
            for s in &p.peers {
                self.peers.lock().expect("peers").insert(s.id, s.addr.clone());
                if !spares.iter().any(|h| h.0 == s.id) {
                    spares.push((s.id, s.addr.clone()));
                }
            }
        }
        // Put the segments, all at once (a commit has at most COMMIT_SEGMENTS).
        let mut puts = tokio::task::JoinSet::new();
        for (i, (s, p)) in sealed.iter_mut().zip(&placements).enumerate() {
            let peers: Vec<Holder> = p.peers.iter().map(|x| (x.id, x.addr.clone())).collect();
            let (io, spares, k, epoch, id) = (self.io.clone(), spares.clone(), self.k, self.epoch.load(Ordering::Relaxed), s.id);
            let root = s.encoded.root;
            let encoded = std::mem::replace(&mut s.encoded, EncodedSegment { root, shards: Vec::new() });
            puts.spawn(async move { (i, io.put(id, k, &encoded, &peers, spares, epoch).await) });
        }
        let mut records: Vec<Vec<u16>> = vec![Vec::new(); sealed.len()];
        while let Some(j) = puts.join_next().await {
            let (i, r) = j.map_err(io)?;
            let holders = r.map_err(|e| match e.kind() {
                backend::ErrorKind::Fenced => CommitError::Fenced(e.to_string()),
                k => CommitError::Failed(k, e.to_string()),
            })?;
            records[i] = holders.iter().map(|h| h.as_ref().map_or(0, |h| h.0)).collect();
        }
        // The new root.
        let mut since = prev.since.clone();
        since.extend(sealed.iter().map(|s| SegmentRef { id: s.id, root: s.encoded.root }));
        let top = sealed
            .iter()
            .flat_map(|s| s.summary.entries.iter())
            .map(|e| match *e {
                super::summary::SummaryEntry::Data { sequence, len, .. } => {
                    sequence.checked_add(len - 1).unwrap_or(sequence)
                }
                super::summary::SummaryEntry::Zero { sequence, .. } => sequence,
            })
            .max()
            .unwrap_or(Sequence::ZERO);
        let next = RootRecord {
            volume_id: self.record.spec.id,
            epoch: self.epoch.load(Ordering::Relaxed),
            commit: prev.commit + 1,
            highest_sequence: prev.highest_sequence.max(top),
            highest_segment: prev.highest_segment.max(sealed.last().expect("segments").id),
            checkpoint: prev.checkpoint,
            since,
        };
        let sealed_root = next.seal(&self.root_key);
        let commit = RootCommit {
            volume: self.name.clone(),
            epoch: self.epoch.load(Ordering::Relaxed),
            expected: (prev.commit > 0).then_some((prev.epoch, prev.commit)),
            sealed: sealed_root,
            segments: sealed
                .iter()
                .zip(&records)
                .map(|(s, peers)| (s.id, SegmentRecord { peers: peers.clone(), root: s.encoded.root.0 }))
                .collect(),
            dropped: Vec::new(),
        };
        debug_assert!(commit.segments.len() <= MAX_COMMIT_SEGMENTS);
        self.swap_root(commit).await?;
        // Committed: the map, the freshness note, the log.
        {
            let mut map = self.map.lock().expect("map");
            for s in &sealed {
                map.apply_summary(&s.summary, s.encoded.root).map_err(io)?;
            }
        }
        {
            let mut holders = self.holders.lock().expect("holders");
            for (s, peers) in sealed.iter().zip(records) {
                holders.insert(s.id, peers);
            }
        }
        self.remember(&next).map_err(io)?;
        let base = Base {
            epoch: next.epoch,
            commit: next.commit,
            segment_floor: next.highest_segment,
            sequence_floor: self.sequences.lock().expect("sequences").last(),
        };
        *self.root.lock().expect("root") = next;
        self.log
            .append(&[NewRecord::Base(base), NewRecord::Committed { sequence: watermark }])
            .await
            .map_err(io)?;
        Ok(())
    }

    /// Packs what of `taken` is still the newest local version into
    /// segments (at most [`COMMIT_SEGMENTS`] of them: `take` bounded it).
    async fn pack(&self, taken: &[Queued]) -> Result<Vec<Packer>, CommitError> {
        let mut currents: Vec<(Current, Option<super::log::LogPos>)> = {
            let local = self.local.lock().expect("local");
            taken
                .iter()
                .flat_map(|q| local.current(q))
                .map(|c| {
                    let pos = match c {
                        Current::Write { record, .. } => local.record(record),
                        Current::Zero { .. } => None,
                    };
                    (c, pos)
                })
                .collect()
        };
        // Address order: a sequential read of the volume reads segments
        // sequentially.
        currents.sort_by_key(|(c, _)| match *c {
            Current::Write { address, .. } | Current::Zero { address, .. } => address,
        });
        let mut out = Vec::new();
        let mut p = Packer::new(self.k, self.blocks_per_shard);
        for (c, pos) in currents {
            match c {
                Current::Zero { address, blocks, sequence } => {
                    if !p.fits_zero(0) {
                        out.push(std::mem::replace(&mut p, Packer::new(self.k, self.blocks_per_shard)));
                    }
                    p.push_zero(address, blocks, sequence);
                }
                Current::Write { first, address, blocks, sequence, .. } => {
                    let pos = pos.ok_or_else(|| io("a queued write's log record is gone"))?;
                    let (_, data) = self.log.read_record(pos).await.map_err(io)?;
                    for i in 0..blocks {
                        if !p.fits_block(0) {
                            out.push(std::mem::replace(&mut p, Packer::new(self.k, self.blocks_per_shard)));
                        }
                        let b = (u64::from(first) + i) as usize;
                        p.push_block(PackedBlock {
                            address: address + i,
                            sequence: sequence.checked_add(i).expect("a record's sequences fit"),
                            data: &data[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE],
                        });
                    }
                }
            }
        }
        if !p.is_empty() {
            out.push(p);
        }
        Ok(out)
    }

    /// The compare-and-set of the root, retried with the same bytes until
    /// the directory answers for certain (an unanswered call may have
    /// landed: sealing a different root for the same commit could then
    /// fork the volume).
    async fn swap_root(&self, commit: RootCommit) -> Result<(), CommitError> {
        let mut pause = Duration::from_millis(50);
        loop {
            match self.client.commit_root(commit.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) => match e.kind() {
                    Some(ErrorKind::Fenced) => return Err(CommitError::Fenced(e.to_string())),
                    Some(ErrorKind::Conflict) => {
                        // Our own earlier try may have landed.
                        return match self.client.root(&self.name).await {
                            Ok(Some(r)) if r.sealed == commit.sealed => Ok(()),
                            _ => Err(CommitError::Diverged(format!(
                                "the volume's root changed under this writer ({e}): another machine wrote it; re-attach"
                            ))),
                        };
                    }
                    Some(ErrorKind::Invalid) => {
                        return Err(io(format!("the directory refused the commit: {e}")));
                    }
                    _ if self.stop.is_cancelled() => {
                        return Err(unavailable(format!("the directory did not answer the commit: {e}")));
                    }
                    _ => {
                        tracing::warn!("volume {}: committing: {e}; retrying", self.name);
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                },
            }
        }
    }
}

/// The worker that commits: when a flush asks, when a commit's worth of
/// blocks is queued, or when the oldest queued write is `commit_age` old.
pub(super) struct Committer {
    pub(super) inner: Arc<Inner>,
    pub(super) since: Option<tokio::time::Instant>,
    pub(super) commits: u64,
}

pub(super) const PACING: Pacing =
    Pacing { tranquility: 0, backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(2) };

impl Worker for Committer {
    type Error = String;

    fn name(&self) -> String {
        format!("commit {}", self.inner.name)
    }

    fn status(&self) -> Status {
        Status {
            queue: Some(self.inner.local.lock().expect("local").queued() as u64),
            progress: Some(format!("{} commits", self.commits)),
        }
    }

    async fn work(&mut self, _stop: &CancellationToken) -> Result<State, String> {
        match self.inner.commit_once().await {
            Ok(more) => {
                self.commits += 1;
                self.since = None;
                Ok(if more { State::Busy } else { State::Idle })
            }
            Err(CommitError::Diverged(_)) => Ok(State::Done),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn wait_for_work(&mut self) -> State {
        loop {
            let due = self.since.map(|t| t + self.inner.config.commit_age);
            let woke = async {
                match due {
                    Some(at) => {
                        tokio::select! {
                            _ = self.inner.wake.notified() => false,
                            _ = tokio::time::sleep_until(at) => true,
                        }
                    }
                    None => {
                        self.inner.wake.notified().await;
                        false
                    }
                }
            };
            let aged = woke.await;
            let (queued, blocks) = {
                let l = self.inner.local.lock().expect("local");
                (l.queued(), l.queued_blocks())
            };
            if self.inner.urgent.load(Ordering::Relaxed) || aged || blocks >= self.inner.commit_blocks() {
                return State::Busy;
            }
            if queued > 0 && self.since.is_none() {
                self.since = Some(tokio::time::Instant::now());
            }
        }
    }
}
