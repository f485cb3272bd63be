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
//! **Map checkpoints.** When the root would name more than
//! `Config::checkpoint_segments` segments since its checkpoint, the commit
//! also writes one: the map pages its summaries changed (base pages
//! fetched from peers one at a time, so a one-page cache gets there), in
//! segments of their own after the data segments, then the index (inline
//! in the head, or in continuation segments before it), then the head, in
//! the commit's last segment ([`super::checkpoint_layout`]). The new root
//! points at the head and names only this commit's segments, the ones
//! above the highest segment the checkpoint includes. Once the root is
//! swapped the map installs the checkpoint, then applies this commit's
//! summaries. A checkpoint that cannot be made (a page out of reach, more
//! segments than a commit carries) is put off to a later commit while the
//! root has room.
//!
//! A commit that fails puts what it took back at the head of the queue; the
//! segments it stored are orphans (no root reaches them) for collection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::cache::{NeedPage, PendingCheckpoint};
use super::checkpoint::{CheckpointIndex, Continuation, IndexHead, PageBlob};
use super::checkpoint_layout::CheckpointLayout;
use super::layout::{PackedBlock, Packer};
use super::local::{Current, Queued};
use super::log::{Base, NewRecord};
use super::remote::Holder;
use super::root::{
    CheckpointRef, MAX_SEGMENTS_SINCE, RootCopy, RootKey, RootRecord, SegmentRef, SegmentRoot,
};
use super::summary::Summary;
use super::volume::Inner;
use crate::api::{ErrorKind, MAX_COMMIT_SEGMENTS, RootCommit, SegmentRecord};
use crate::backend;
use crate::codec::segment::{BLOCK_SIZE, EncodedSegment, SegmentCodec, SegmentGeometry};
use crate::codec::sequence::{SegmentId, Sequence};
use crate::codec::xts::SectorCipher;
use crate::sys::worker::{Pacing, State, Status, Worker};

/// Segments one commit carries at most (the directory takes 100).
const COMMIT_SEGMENTS: usize = 32;
/// Sequences a synced Base reserves beyond what a commit needs (64 GiB of
/// block writes), so most commits need no sync of the log first.
const RESERVE_SEQUENCES: u64 = 1 << 24;
/// Segment ids it reserves beyond the commit's.
const RESERVE_SEGMENTS: u64 = 1 << 16;

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

/// A checkpoint a commit writes: the map's pending one, laid out.
struct CheckpointPlan {
    pending: PendingCheckpoint,
    layout: CheckpointLayout,
    index_len: usize,
}

impl CheckpointPlan {
    /// Lays `pending` out after `packers`' segments, in segments of k ×
    /// `blocks_per_shard` blocks.
    fn new(
        pending: PendingCheckpoint,
        k: usize,
        m: usize,
        blocks_per_shard: u32,
        packers: &[Packer],
    ) -> Self {
        let room = u32::try_from(Packer::new(k, m, blocks_per_shard).metadata_room()).unwrap_or(u32::MAX);
        let data_room = packers.last().map(|p| u32::try_from(p.metadata_room()).unwrap_or(u32::MAX));
        let blobs: Vec<u32> = pending.blobs.iter().map(PageBlob::blocks).collect();
        // The page segments come first, then the index's length is known.
        let page_segments = CheckpointLayout::plan(&blobs, 0, room, data_room).pages.len();
        let index_len = pending.index_len(page_segments);
        let layout = CheckpointLayout::plan(&blobs, index_len, room, data_room);
        Self { pending, layout, index_len }
    }
}

/// A checkpoint a commit wrote: its index, where its head is, and the
/// segments holding the index's continuations.
type Written = (CheckpointIndex, CheckpointRef, Vec<SegmentId>);

/// What a commit's segments are made with.
struct Encoder {
    k: usize,
    m: usize,
    blocks_per_shard: u32,
    volume_id: [u8; 16],
    cipher: SectorCipher,
    /// The root the commit continues, its writer's epoch, and the key its
    /// copy in the last segment is sealed with.
    prev: RootRecord,
    epoch: u64,
    root_key: RootKey,
}

impl Encoder {
    /// Lays out, erasure-codes and hashes one segment; `metadata` (whole
    /// blocks, plaintext) goes after its data slots.
    fn seal(&self, p: Packer, id: SegmentId, metadata: &[u8]) -> Result<Sealed, String> {
        self.seal_with(p, id, metadata, &[])
    }

    /// [`Self::seal`], the segment's trailer carrying `root_copy`.
    fn seal_with(
        &self,
        p: Packer,
        id: SegmentId,
        metadata: &[u8],
        root_copy: &[u8],
    ) -> Result<Sealed, String> {
        let (geometry, area, summary) =
            p.finish(id, metadata, root_copy, &self.cipher).map_err(|e| e.to_string())?;
        // The erasure code's tables and buffers are costly to make: each
        // blocking thread keeps the last geometry's (full segments share one).
        thread_local! {
            static CODEC: std::cell::RefCell<Option<SegmentCodec>> = const { std::cell::RefCell::new(None) };
        }
        let encoded = CODEC.with_borrow_mut(|codec| {
            if codec.as_ref().is_none_or(|c| c.geometry() != geometry) {
                *codec = Some(SegmentCodec::new(geometry));
            }
            codec.as_mut().expect("made above").encode_shards(&self.volume_id, id, area)
        });
        let encoded = encoded.map_err(|e| e.to_string())?;
        Ok(Sealed { id, geometry, encoded, summary })
    }

    fn empty(&self) -> Packer {
        Packer::new(self.k, self.m, self.blocks_per_shard)
    }

    /// The copy of the commit's root that its last segment, `carrier`,
    /// carries: the root less the carrier (see [`RootCopy`]). `before` are
    /// the commit's other segments, `top` the highest sequence it packs,
    /// `checkpoint` where the head of a checkpoint written into the
    /// carrier lies (first slot, blocks).
    fn root_copy(
        &self,
        carrier: SegmentId,
        before: &[Sealed],
        top: Option<Sequence>,
        checkpoint: Option<(u32, u32)>,
    ) -> RootCopy {
        let prev = &self.prev;
        let own = before.iter().map(|s| SegmentRef { id: s.id, root: s.encoded.root });
        let (checkpoint, since, inherited) = match checkpoint {
            Some((first_slot, blocks)) => {
                let at = SegmentRef { id: carrier, root: SegmentRoot::default() };
                (Some(CheckpointRef { segment: at, first_slot, blocks }), own.collect(), 0)
            }
            None => (prev.checkpoint, own.collect(), prev.since.len() as u32),
        };
        let partial = RootRecord {
            volume_id: self.volume_id,
            epoch: self.epoch,
            commit: prev.commit + 1,
            highest_sequence: top.map_or(prev.highest_sequence, |t| prev.highest_sequence.max(t)),
            highest_segment: prev.highest_segment.max(carrier),
            checkpoint,
            since,
        };
        RootCopy { partial, inherited }
    }

    /// The commit's segments in write order, `ids` taken in that order;
    /// with a checkpoint (see [`super::checkpoint_layout`]), also its
    /// index and where its head is; and the copy of its root that the last
    /// segment carries, from which the root itself is made (so the two
    /// never differ).
    fn commit(
        &self,
        mut packers: Vec<Packer>,
        checkpoint: Option<CheckpointPlan>,
        ids: Vec<SegmentId>,
    ) -> Result<(Vec<Sealed>, Option<Written>, RootCopy), String> {
        let top = packers.iter().filter_map(Packer::highest_sequence).max();
        let mut ids = ids.into_iter();
        let mut next = move || ids.next().ok_or_else(|| "fewer segment ids than segments".to_string());
        let Some(CheckpointPlan { pending, layout, index_len }) = checkpoint else {
            let last = packers.pop().ok_or("a commit without segments")?;
            let mut sealed =
                packers.into_iter().map(|p| self.seal(p, next()?, &[])).collect::<Result<Vec<_>, _>>()?;
            let id = next()?;
            let copy = self.root_copy(id, &sealed, top, None);
            sealed.push(self.seal_with(last, id, &[], &copy.seal(&self.root_key))?);
            return Ok((sealed, None, copy));
        };
        let carrier = if layout.head_with_data { packers.pop() } else { None };
        let mut out =
            packers.into_iter().map(|p| self.seal(p, next()?, &[])).collect::<Result<Vec<_>, _>>()?;
        // The pages.
        let mut placed = Vec::with_capacity(pending.blobs.len());
        for group in &layout.pages {
            let id = next()?;
            let mut metadata = Vec::new();
            let mut slots = Vec::with_capacity(group.len());
            for &i in group {
                let blob = &pending.blobs[i];
                slots.push((blob.page, (metadata.len() / BLOCK_SIZE) as u32));
                metadata.extend_from_slice(&blob.bytes);
            }
            let s = self.seal(self.empty(), id, &metadata)?;
            let segment = SegmentRef { id, root: s.encoded.root };
            placed.extend(slots.into_iter().map(|(page, slot)| (page, segment, slot)));
            out.push(s);
        }
        // The index, inline in the head or in continuations before it.
        let index = pending.finish(placed).map_err(|e| e.to_string())?;
        let bytes = index.encode();
        if bytes.len() != index_len {
            return Err(format!("the checkpoint index is {} bytes, {index_len} were laid out", bytes.len()));
        }
        let mut parts = Vec::new();
        let head = if layout.continuations.is_empty() {
            IndexHead::inline(&bytes)
        } else {
            let mut continuations = Vec::with_capacity(layout.continuations.len());
            for (part, &blocks) in layout.split_index(&bytes).into_iter().zip(&layout.continuations) {
                let id = next()?;
                let mut metadata = part.to_vec();
                metadata.resize(blocks as usize * BLOCK_SIZE, 0);
                let s = self.seal(self.empty(), id, &metadata)?;
                continuations.push(Continuation {
                    segment: SegmentRef { id, root: s.encoded.root },
                    first_slot: 0,
                    blocks,
                });
                parts.push(id);
                out.push(s);
            }
            IndexHead::split(&bytes, 0, continuations).map_err(|e| e.to_string())?.0
        };
        // The head, in the commit's last segment.
        let head = head.encode();
        let carrier = carrier.unwrap_or_else(|| self.empty());
        let first_slot = carrier.data_slots();
        let id = next()?;
        let blocks = (head.len() / BLOCK_SIZE) as u32;
        let copy = self.root_copy(id, &out, top, Some((first_slot, blocks)));
        let s = self.seal_with(carrier, id, &head, &copy.seal(&self.root_key))?;
        let at = CheckpointRef { segment: SegmentRef { id, root: s.encoded.root }, first_slot, blocks };
        out.push(s);
        Ok((out, Some((index, at, parts)), copy))
    }
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
    pub(super) fn commit_blocks(&self) -> u64 {
        // A segment of n = k x bps blocks holds at least n - n/128 - 2 data
        // blocks (the summary takes 32 bytes per entry even when every
        // block is its own entry, the trailer one block, padding at most
        // one), so this many blocks are at most COMMIT_SEGMENTS segments.
        let n = self.k as u64 * u64::from(self.blocks_per_shard);
        let per_segment = n.saturating_sub(n.div_ceil(128) + 2).max(1);
        COMMIT_SEGMENTS as u64 * per_segment
    }

    /// Segments since the checkpoint past which a commit writes one: the
    /// setting, or fewer (down to 16) for a volume of few segments. The
    /// segments the root names cannot be dropped before a checkpoint
    /// covers them, so on a small volume they would hold more space than
    /// compaction frees; a small volume's checkpoint is a few pages.
    fn checkpoint_due(&self) -> usize {
        let held = self.recorded.lock().expect("recorded").as_ref().map_or(usize::MAX, |r| r.len());
        (held / 8).max(16).min(self.config.checkpoint_segments)
    }

    /// Blocks one log record holds at most: a write larger is cut, so one
    /// record never packs into more than a quarter of a commit's segments.
    pub(super) fn record_blocks(&self) -> u64 {
        (self.commit_blocks() / 4).clamp(1, 256)
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
                // A checkpoint in the making is dropped (made again next time).
                self.map.lock().expect("map").abandon_checkpoint();
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
        self.commit_packed(packers, Some(watermark)).await
    }

    /// Commits `packers` (with a map checkpoint when due): ids, place,
    /// put, seal, compare-and-set, then the map, freshness and log. With a
    /// `watermark` (user writes), the log notes that every sequence up to
    /// it is committed; compaction moves blocks already committed and has
    /// none. The caller holds the commit turn.
    pub(super) async fn commit_packed(
        &self,
        packers: Vec<Packer>,
        watermark: Option<Sequence>,
    ) -> Result<(), CommitError> {
        let prev = self.root.lock().expect("root").clone();
        let started = Instant::now();
        // A checkpoint when the root's list would grow past the setting: the
        // new root then names only this commit's segments.
        let mut checkpoint = None;
        let mut put_off = None;
        if prev.since.len() + packers.len() > self.checkpoint_due() {
            match self.plan_checkpoint(&prev, &packers).await {
                Ok(plan) => checkpoint = Some(plan),
                Err(why) => {
                    self.map.lock().expect("map").abandon_checkpoint();
                    tracing::warn!("volume {}: map checkpoint put off: {why}", self.name);
                    put_off = Some(why);
                }
            }
        }
        if checkpoint.is_none() && prev.since.len() + packers.len() > MAX_SEGMENTS_SINCE {
            return Err(io(format!(
                "the root names as many segments as it can, and no map checkpoint was written{}",
                put_off.map_or(String::new(), |why| format!(": {why}"))
            )));
        }
        let count = packers.len() + checkpoint.as_ref().map_or(0, |c| c.layout.extra_segments());
        if count == 0 {
            // Everything taken was overwritten since by writes still
            // queued, which a later commit carries.
            return Ok(());
        }
        // Ids, noted in the log before any is used.
        let ids: Vec<SegmentId> = {
            let mut s = self.segment_ids.lock().expect("segment ids");
            (0..count).map(|_| s.next()).collect::<Result<_, _>>().map_err(io)?
        };
        // Every sequence and segment id that may leave the machine must be
        // durable in the log first: after a power cut a resumed epoch then
        // never reuses one (an XTS tweak would repeat). A synced Base
        // reserves ahead, so most commits find theirs covered and need no
        // sync; the log keeps that Base's file (later, unsynced Bases
        // alone would not do).
        let need =
            (*ids.last().expect("a commit has a segment"), self.sequences.lock().expect("sequences").last());
        let reserved = *self.reserved.lock().expect("reserved");
        if need.0 > reserved.0 || need.1 > reserved.1 {
            let floor = Base {
                epoch: prev.epoch,
                commit: prev.commit,
                segment_floor: need.0.checked_add(RESERVE_SEGMENTS).unwrap_or(need.0),
                sequence_floor: need.1.checked_add(RESERVE_SEQUENCES).unwrap_or(need.1),
            };
            let pos = self.log.append(&[NewRecord::Base(floor)]).await.map_err(io)?[0];
            self.log.sync().await.map_err(io)?;
            self.log.keep(pos);
            let mut r = self.reserved.lock().expect("reserved");
            *r = (r.0.max(floor.segment_floor), r.1.max(floor.sequence_floor));
        }
        // Lay out, erasure-code and hash, off the async threads.
        let encoder = Encoder {
            k: self.k,
            m: self.m,
            blocks_per_shard: self.blocks_per_shard,
            volume_id: self.record.spec.id,
            cipher: self.cipher.clone(),
            prev: prev.clone(),
            epoch: self.epoch.load(Ordering::Relaxed),
            root_key: self.root_key.clone(),
        };
        let planned = started.elapsed();
        let (mut sealed, written, copy) =
            tokio::task::spawn_blocking(move || encoder.commit(packers, checkpoint, ids))
                .await
                .map_err(io)?
                .map_err(io)?;
        let encoded = started.elapsed();
        let shard_bytes = sealed.iter().map(|s| s.geometry.shard_len() as u64).max().unwrap_or(0);
        let sending: u64 =
            sealed.iter().flat_map(|s| s.encoded.shards.iter()).map(|shard| shard.len() as u64).sum();
        // New writes leave compaction the room of a round on every peer
        // (they get ENOSPC first), so compaction can always free space.
        let keep_free = match watermark {
            Some(_) => super::compactor::reserve_bytes(self.k, self.blocks_per_shard),
            None => 0,
        };
        let epoch = self.epoch.load(Ordering::Relaxed);
        // New writes only: the compactor's commits (no watermark, no
        // reserve kept free) ask every time and leave the kept set alone.
        let small =
            watermark.is_some() && sealed.len() == 1 && shard_bytes <= super::placed::SMALL_SHARD_BYTES;
        let width = self.k + self.m;
        let kept = small
            .then(|| self.placed_ahead.lock().expect("placed").take(Instant::now(), epoch, keep_free))
            .flatten();
        let placements = match kept {
            Some(p) => vec![p],
            None => {
                let ask = |count: u32, bytes: u64| {
                    self.client.place_segments(&self.name, epoch, count, bytes, Vec::new(), keep_free)
                };
                let asked_at = Instant::now();
                let got = match small {
                    // Asked with the room of AHEAD segments, a nearly full
                    // cluster may refuse, or place on fewer than k + m
                    // peers, what it has room for once: then ask for one.
                    true => match ask(super::placed::AHEAD, super::placed::SMALL_SHARD_BYTES).await {
                        Err(e) if e.kind() == Some(ErrorKind::Full) => ask(1, shard_bytes).await,
                        Ok(got) if got.first().is_none_or(|p| p.peers.len() < width) => {
                            ask(1, shard_bytes).await
                        }
                        r => r,
                    },
                    false => ask(sealed.len() as u32, shard_bytes).await,
                };
                let mut got = got.map_err(|e| match e.kind() {
                    Some(ErrorKind::Fenced) => CommitError::Fenced(e.to_string()),
                    // Too few peers with room: ENOSPC for the client, as a
                    // full disk would be.
                    Some(ErrorKind::Full) => {
                        CommitError::Failed(backend::ErrorKind::Full, format!("placing segments: {e}"))
                    }
                    _ => unavailable(format!("placing segments: {e}")),
                })?;
                if small && got.len() > 1 {
                    let mut rest = got.split_off(1);
                    // Only full placements are kept (a narrow one stores
                    // the segment below its redundancy until repair).
                    rest.retain(|p| p.peers.len() == width);
                    self.placed_ahead.lock().expect("placed").keep(asked_at, epoch, keep_free, rest);
                }
                got
            }
        };
        if placements.len() != sealed.len() {
            return Err(unavailable("the directory placed fewer segments than asked"));
        }
        let placed = started.elapsed();
        let mut spares: Vec<Holder> = Vec::new();
        for p in &placements {
            for s in &p.peers {
                self.peers.lock().expect("peers").insert(s.id, s.addr.clone());
                if !spares.iter().any(|h| h.0 == s.id) {
                    spares.push((s.id, s.addr.clone()));
                }
            }
        }
        // Put the segments, all at once (a commit has at most MAX_COMMIT_SEGMENTS).
        let mut puts = tokio::task::JoinSet::new();
        for (i, (s, p)) in sealed.iter_mut().zip(&placements).enumerate() {
            let peers: Vec<Holder> = p.peers.iter().map(|x| (x.id, x.addr.clone())).collect();
            let (io, spares, k, epoch, id) =
                (self.io.clone(), spares.clone(), self.k, self.epoch.load(Ordering::Relaxed), s.id);
            let root = s.encoded.root;
            let encoded = std::mem::replace(&mut s.encoded, EncodedSegment { root, shards: Vec::new() });
            puts.spawn(async move { (i, io.put(id, k, encoded, &peers, spares, epoch).await) });
        }
        let mut records: Vec<Vec<u16>> = vec![Vec::new(); sealed.len()];
        while let Some(j) = puts.join_next().await {
            let (i, r) = j.map_err(io)?;
            let named = placements[i].peers.len();
            if r.as_ref().map_or(true, |h| h.iter().take(named).any(Option::is_none)) {
                // A peer the placement named failed or was slow: the
                // cluster changed, so ask again.
                self.placed_ahead.lock().expect("placed").forget();
            }
            let holders = r.map_err(|e| match e.kind() {
                backend::ErrorKind::Fenced => CommitError::Fenced(e.to_string()),
                k => CommitError::Failed(k, e.to_string()),
            })?;
            records[i] = holders.iter().map(|h| h.as_ref().map_or(0, |h| h.0)).collect();
        }
        self.traffic.sent.fetch_add(sending, Ordering::Relaxed);
        let stored = started.elapsed();
        // The new root: the copy the last segment carries, with the
        // segments it inherits (none after a checkpoint: the segments since
        // are exactly those above the highest it includes, this commit's)
        // and that carrier put back.
        let carrier = sealed.last().expect("a commit has a segment");
        let inherited = prev
            .since
            .get(..copy.inherited as usize)
            .ok_or_else(|| io("the root copy inherits more than the root names"))?;
        let next =
            copy.root(inherited, SegmentRef { id: carrier.id, root: carrier.encoded.root }).map_err(io)?;
        let sealed_root = next.seal(&self.root_key);
        let commit = RootCommit {
            volume: self.name.clone(),
            epoch: self.epoch.load(Ordering::Relaxed),
            expected: (prev.commit > 0).then_some((prev.epoch, prev.commit)),
            sealed: sealed_root,
            segments: sealed
                .iter()
                .zip(&records)
                .map(|(s, peers)| {
                    let record = SegmentRecord {
                        peers: peers.clone(),
                        shard_blocks: s.geometry.blocks_per_shard() as u16,
                        root: s.encoded.root.0,
                    };
                    (s.id, record)
                })
                .collect(),
            dropped: Vec::new(),
        };
        debug_assert!(commit.segments.len() <= MAX_COMMIT_SEGMENTS);
        self.swap_root(commit).await?;
        tracing::debug!(
            "volume {}: commit {} of {} segments{}: planned {planned:.0?}, encoded {encoded:.0?}, placed {placed:.0?}, stored {stored:.0?}, root swapped {:.0?}",
            self.name,
            next.commit,
            sealed.len(),
            if watermark.is_some() { "" } else { " (compaction)" },
            started.elapsed()
        );
        // Committed. From here nothing goes back to the queue: the root is
        // the new one whatever else fails, and a failure below leaves this
        // attach's state unsure, so it stops (fenced) rather than go on.
        *self.root.lock().expect("root") = next.clone();
        let after =
            |e: String| CommitError::Diverged(format!("after commit {} landed: {e}; re-attach", next.commit));
        // The map (the new checkpoint first: it drops the summaries it
        // includes, then this commit's go on top), the freshness note, the
        // log.
        {
            let mut map = self.map.lock().expect("map");
            if let Some((index, at, parts)) = written {
                map.install(index).map_err(|e| after(e.to_string()))?;
                *self.checkpoint_parts.lock().expect("parts") =
                    std::iter::once(at.segment.id).chain(parts).collect();
            }
            for s in &sealed {
                map.apply_summary(&s.summary, s.encoded.root).map_err(|e| after(e.to_string()))?;
            }
        }
        {
            let mut holders = self.holders.lock().expect("holders");
            for (s, peers) in sealed.iter().zip(records) {
                holders.insert(s.id, peers);
            }
        }
        self.remember(&next).map_err(|e| after(format!("noting the root's freshness: {e}")))?;
        let base = Base {
            epoch: next.epoch,
            commit: next.commit,
            segment_floor: next.highest_segment,
            sequence_floor: self.sequences.lock().expect("sequences").last(),
        };
        if let Some(recorded) = self.recorded.lock().expect("recorded").as_mut() {
            recorded.extend(sealed.iter().map(|s| s.id));
        }
        let blocks: u64 = sealed.iter().map(|s| u64::from(s.summary.slots)).sum::<u64>() * BLOCK_SIZE as u64;
        let counter = if watermark.is_some() { &self.traffic.written } else { &self.traffic.moved };
        counter.fetch_add(blocks, Ordering::Relaxed);
        self.space.lock().expect("space").held +=
            sealed.iter().map(|s| s.geometry.data_blocks()).sum::<u64>();
        self.compact_wake.notify_one();
        let mut records = vec![NewRecord::Base(base)];
        records.extend(watermark.map(|sequence| NewRecord::Committed { sequence }));
        self.log.append(&records).await.map_err(|e| after(e.to_string()))?;
        Ok(())
    }

    /// Makes the map's next checkpoint (fetching the base pages it needs,
    /// one at a time) and lays it out after `packers`' segments.
    async fn plan_checkpoint(&self, prev: &RootRecord, packers: &[Packer]) -> Result<CheckpointPlan, String> {
        // Each page is inserted and used under one hold of the lock: the
        // checkpoint keeps what it merged, so it progresses even when reads
        // evict the page right after.
        let mut made = self.map.lock().expect("map").checkpoint();
        let pending = loop {
            match made {
                Ok(p) => break p,
                Err(NeedPage(f)) => {
                    let bytes = self
                        .read_metadata(f.segment.id, f.segment.root, f.first_slot, f.blocks)
                        .await
                        .map_err(|e| format!("map page {}: {e}", f.page))?;
                    let mut map = self.map.lock().expect("map");
                    map.insert_page(f.page, &bytes).map_err(|e| e.to_string())?;
                    made = map.checkpoint();
                }
            }
        };
        // The new root drops the segments the checkpoint includes from its
        // list: it must include every one the old root names.
        if let Some(s) = prev.since.iter().find(|s| !pending.covers().contains(&s.id)) {
            return Err(format!("the map has not applied segment {} yet", s.id));
        }
        let plan = CheckpointPlan::new(pending, self.k, self.m, self.blocks_per_shard, packers);
        if packers.len() + plan.layout.extra_segments() > MAX_COMMIT_SEGMENTS {
            return Err(format!(
                "it takes {} segments besides the commit's {}, more than a commit carries ({MAX_COMMIT_SEGMENTS})",
                plan.layout.extra_segments(),
                packers.len()
            ));
        }
        Ok(plan)
    }

    /// Packs what of `taken` is still the newest local version into
    /// segments (at most [`COMMIT_SEGMENTS`] of them: `take` bounded it).
    async fn pack(&self, taken: &[Queued]) -> Result<Vec<Packer>, CommitError> {
        let mut currents: Vec<(Current, Option<super::log::LogPos>)> = {
            let local = self.local.lock().expect("local");
            local
                .current_among(taken)
                .into_iter()
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
        let mut p = Packer::new(self.k, self.m, self.blocks_per_shard);
        for (c, pos) in currents {
            match c {
                Current::Zero { address, blocks, sequence } => {
                    if !p.fits_zero(0) {
                        out.push(std::mem::replace(
                            &mut p,
                            Packer::new(self.k, self.m, self.blocks_per_shard),
                        ));
                    }
                    p.push_zero(address, blocks, sequence);
                }
                Current::Write { first, address, blocks, sequence, .. } => {
                    let pos = pos.ok_or_else(|| io("a queued write's log record is gone"))?;
                    let (_, data) = self.log.read_record(pos).await.map_err(io)?;
                    for i in 0..blocks {
                        if !p.fits_block(0) {
                            out.push(std::mem::replace(
                                &mut p,
                                Packer::new(self.k, self.m, self.blocks_per_shard),
                            ));
                        }
                        let b = (u64::from(first) + i) as usize;
                        p.push_block(PackedBlock {
                            address: address + i,
                            sequence: sequence.checked_add(i).expect("a record's sequences fit"),
                            data: data.block(b),
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
                    Some(ErrorKind::Fenced | ErrorKind::Conflict) => {
                        // Our own earlier try may have landed (then the
                        // lease may have lapsed, or the retry found its own
                        // root): read the root until it is known (a guess
                        // either way would fence a writer whose commit
                        // landed), or until the volume stops.
                        let mut landed = None;
                        let mut pause = Duration::from_millis(50);
                        while landed.is_none() && !self.stop.is_cancelled() {
                            match self.client.root(&self.name).await {
                                Ok(r) => landed = Some(r.is_some_and(|r| r.sealed == commit.sealed)),
                                Err(why) => {
                                    tracing::warn!(
                                        "volume {}: reading the root after a refused commit: {why}; retrying",
                                        self.name
                                    );
                                    tokio::select! {
                                        _ = tokio::time::sleep(pause) => {}
                                        _ = self.stop.cancelled() => {}
                                    }
                                    pause = (pause * 2).min(Duration::from_secs(2));
                                }
                            }
                        }
                        return match (landed, e.kind()) {
                            (Some(true), _) => Ok(()),
                            (Some(false), Some(ErrorKind::Fenced)) => Err(CommitError::Fenced(e.to_string())),
                            (Some(false), _) => Err(CommitError::Diverged(format!(
                                "the volume's root changed under this writer ({e}): another machine wrote it; re-attach"
                            ))),
                            (None, _) => Err(unavailable(format!(
                                "the commit was refused ({e}) and the volume stopped before the root could be read to see why"
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::codec::key::VolumeKey;
    use crate::codec::segment::{SegmentRoot, parse_segment_shard};
    use crate::volume::v2::cache::MapCache;
    use crate::volume::v2::layout::{self, Trailer};
    use crate::volume::v2::map::BlockMap;
    use crate::volume::v2::summary::SummaryEntry;

    fn seq(c: u64) -> Sequence {
        Sequence::new(3, c).unwrap()
    }

    /// A summary of `n` one-block writes two blocks apart from `start`:
    /// `n` runs in the map.
    fn scattered(segment: SegmentId, start: u64, n: u32, first_seq: u64) -> Summary {
        let entries = (0..n)
            .map(|i| SummaryEntry::Data {
                start: start + 2 * u64::from(i),
                len: 1,
                slot: i,
                sequence: seq(first_seq + u64::from(i)),
            })
            .collect();
        Summary { segment, slots: n, entries }
    }

    /// A commit's segments as peers would hold them: each one's data area
    /// by id, with its root and geometry.
    fn areas(sealed: &[Sealed]) -> HashMap<SegmentId, (SegmentRoot, SegmentGeometry, Vec<u8>)> {
        sealed
            .iter()
            .map(|s| {
                let area: Vec<u8> = s.encoded.shards[..s.geometry.k()]
                    .iter()
                    .flat_map(|sh| parse_segment_shard(sh).unwrap().1.to_vec())
                    .collect();
                (s.id, (s.encoded.root, s.geometry, area))
            })
            .collect()
    }

    fn encoder(key: &VolumeKey, prev: RootRecord) -> Encoder {
        Encoder {
            k: 2,
            m: 1,
            blocks_per_shard: 2,
            volume_id: [7; 16],
            cipher: SectorCipher::new(key),
            epoch: prev.epoch,
            prev,
            root_key: RootKey::derive(key),
        }
    }

    /// The root a commit's segments carry, rebuilt as a directory rebuild
    /// would: only the last segment has a copy, which, with the previous
    /// root's segments since and the carrier, is the root.
    fn copied_root(
        key: &VolumeKey,
        sealed: &[Sealed],
        previous_since: &[SegmentRef],
    ) -> Result<RootRecord, crate::codec::root::RootError> {
        let cipher = SectorCipher::new(key);
        let areas = areas(sealed);
        let mut copies = Vec::new();
        for s in sealed {
            let (_, g, area) = &areas[&s.id];
            let last = (g.data_blocks() - 1) as u32;
            let mut t = area[last as usize * BLOCK_SIZE..].to_vec();
            layout::open_metadata(&cipher, s.id, last, &mut t);
            let trailer = Trailer::decode(&t, s.id, *g).unwrap();
            if let Some(bytes) = trailer.root_copy(&t) {
                copies.push((s.id, RootCopy::open(bytes, &RootKey::derive(key), &[7; 16])?));
            }
        }
        assert_eq!(copies.len(), 1, "one copy per commit");
        let (carrier, copy) = copies.pop().unwrap();
        let last = sealed.last().unwrap();
        assert_eq!(carrier, last.id, "in the commit's last segment");
        copy.root(previous_since, SegmentRef { id: last.id, root: last.encoded.root })
    }

    #[test]
    fn a_commit_without_a_checkpoint_carries_its_root_after_the_previous_ones() {
        let key = VolumeKey::from_bytes(&(0..64).collect::<Vec<u8>>()).unwrap();
        let previous_since: Vec<SegmentRef> = (1..=3)
            .map(|n| SegmentRef { id: SegmentId::new(2, n).unwrap(), root: SegmentRoot([n as u8; 32]) })
            .collect();
        let checkpoint = CheckpointRef { segment: previous_since[0], first_slot: 2, blocks: 1 };
        let prev = RootRecord {
            volume_id: [7; 16],
            epoch: 2,
            commit: 9,
            highest_sequence: Sequence::new(2, 77).unwrap(),
            highest_segment: SegmentId::new(2, 3).unwrap(),
            checkpoint: Some(checkpoint),
            since: previous_since.clone(),
        };
        let mut enc = encoder(&key, prev);
        enc.epoch = 3;
        // Three segments' worth of blocks (2 × 2 blocks: 2 data blocks each).
        let data = vec![1u8; BLOCK_SIZE];
        let mut packers = Vec::new();
        for i in 0..3u64 {
            let mut p = Packer::new(2, 1, 2);
            p.push_block(PackedBlock { address: 10 * i, sequence: seq(100 + i), data: &data });
            packers.push(p);
        }
        let ids: Vec<SegmentId> = (1..=3).map(|n| SegmentId::new(3, n).unwrap()).collect();
        let (sealed, written, _) = enc.commit(packers, None, ids.clone()).unwrap();
        assert!(written.is_none());
        let root = copied_root(&key, &sealed, &previous_since).unwrap();
        let mut since = previous_since.clone();
        since.extend(sealed.iter().map(|s| SegmentRef { id: s.id, root: s.encoded.root }));
        let want = RootRecord {
            volume_id: [7; 16],
            epoch: 3,
            commit: 10,
            highest_sequence: seq(102),
            highest_segment: ids[2],
            checkpoint: Some(checkpoint),
            since,
        };
        assert_eq!(root, want);
        // Against a previous root naming other segments, it does not rebuild.
        assert!(
            copied_root(&key, &sealed, &previous_since[..2]).is_err(),
            "the copy names how many segments it inherits"
        );
    }

    /// Tiny segments (2 × 2 blocks: 2 blocks of metadata room) so the
    /// checkpoint needs every kind of segment: a page larger than a
    /// segment, a continued index, and a head after a data segment's data.
    #[test]
    fn a_checkpoint_written_with_a_commit_reads_back_from_its_head() {
        let key = VolumeKey::from_bytes(&(0..64).collect::<Vec<u8>>()).unwrap();
        let blocks = 4 << 16;
        let mut cache = MapCache::new(CheckpointIndex::empty(blocks), 1);
        let mut model = BlockMap::new(blocks);
        // Page 0 of 400 runs (4 blocks encoded), pages 1 and 3 small, in
        // many segments (a long live table: the index is continued).
        let mut summaries = vec![scattered(SegmentId::new(3, 1).unwrap(), 0, 400, 1)];
        for i in 0..200u64 {
            let page = if i % 2 == 0 { 1 } else { 3 };
            summaries.push(scattered(SegmentId::new(3, 2 + i).unwrap(), (page << 16) + 4 * i, 1, 1000 + i));
        }
        for s in &summaries {
            s.apply_to(&mut model).unwrap();
            cache.apply_summary(s, SegmentRoot([s.segment.raw() as u8; 32])).unwrap();
        }
        let pending = cache.checkpoint().unwrap();
        assert_eq!(pending.blobs.len(), 3);
        let prev = RootRecord {
            volume_id: [7; 16],
            epoch: 3,
            commit: 41,
            highest_sequence: seq(4000),
            highest_segment: SegmentId::new(3, 299).unwrap(),
            checkpoint: None,
            since: vec![SegmentRef { id: SegmentId::new(3, 299).unwrap(), root: SegmentRoot([2; 32]) }],
        };
        let encoder = encoder(&key, prev);
        // The commit's own data: one block, so its segment has room for a
        // one-block head.
        let data = vec![5u8; BLOCK_SIZE];
        let mut p = Packer::new(2, 1, 2);
        p.push_block(PackedBlock { address: 9, sequence: seq(5000), data: &data });
        let plan = CheckpointPlan::new(pending, 2, 1, 2, std::slice::from_ref(&p));
        assert!(plan.layout.continuations.len() > 1, "{:?}", plan.layout);
        assert!(plan.layout.head_with_data, "{:?}", plan.layout);
        let count = 1 + plan.layout.extra_segments();
        let ids: Vec<SegmentId> = (0..count as u64).map(|i| SegmentId::new(3, 300 + i).unwrap()).collect();
        let (sealed, written, _) = encoder.commit(vec![p], Some(plan), ids.clone()).unwrap();
        let (index, at, _) = written.unwrap();
        // Written in id order, the head in the last segment, after its data.
        assert_eq!(sealed.iter().map(|s| s.id).collect::<Vec<_>>(), ids);
        assert_eq!((at.segment.id, at.first_slot), (*ids.last().unwrap(), 1));
        assert!(sealed.iter().any(|s| s.geometry.blocks_per_shard() > 2), "a page larger than a segment");
        let areas = areas(&sealed);
        let cipher = SectorCipher::new(&key);
        let read = |id: SegmentId, root: SegmentRoot, first: u32, n: u32| {
            let (r, _, area) = &areas[&id];
            assert_eq!(*r, root, "proven against the root the reader holds");
            let mut b = area[first as usize * BLOCK_SIZE..(first + n) as usize * BLOCK_SIZE].to_vec();
            layout::open_metadata(&cipher, id, first, &mut b);
            b
        };
        // The last segment carries the commit's root: the checkpoint resets
        // the segments since to the commit's own.
        let root = copied_root(&key, &sealed, &[]).unwrap();
        assert_eq!((root.epoch, root.commit, root.highest_sequence), (3, 42, seq(5000)));
        assert_eq!(root.checkpoint, Some(at));
        assert_eq!(
            root.since,
            sealed.iter().map(|s| SegmentRef { id: s.id, root: s.encoded.root }).collect::<Vec<_>>()
        );
        assert_eq!(root.highest_segment, *ids.last().unwrap());
        // Every segment's trailer and summary read back.
        for s in &sealed {
            let (_, g, area) = &areas[&s.id];
            let last = (g.data_blocks() - 1) as u32;
            let mut t = area[last as usize * BLOCK_SIZE..].to_vec();
            layout::open_metadata(&cipher, s.id, last, &mut t);
            let trailer = Trailer::decode(&t, s.id, *g).unwrap();
            let mut sb =
                area[trailer.summary_slot as usize * BLOCK_SIZE..last as usize * BLOCK_SIZE].to_vec();
            layout::open_metadata(&cipher, s.id, trailer.summary_slot, &mut sb);
            assert_eq!(layout::decode_summary(&trailer, &sb).unwrap(), s.summary);
        }
        // The head, its continuations, the index: as an attach reads them.
        let head =
            IndexHead::decode(&read(at.segment.id, at.segment.root, at.first_slot, at.blocks)).unwrap();
        let parts: Vec<Vec<u8>> = head
            .continuations
            .iter()
            .map(|c| read(c.segment.id, c.segment.root, c.first_slot, c.blocks))
            .collect();
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let loaded = head.assemble(&refs).unwrap();
        assert_eq!(loaded, index);
        assert_eq!(
            loaded.highest_segment,
            SegmentId::new(3, 201).unwrap(),
            "below every segment of the commit"
        );
        assert_eq!(loaded.live_counts(), model.segments().collect::<HashMap<_, _>>());
        // Every page, fetched through a one-page cache, maps as the model.
        let mut paged = MapCache::new(loaded, 1);
        for a in (0..blocks).step_by(7).chain(0..800) {
            let got = loop {
                match paged.lookup(a) {
                    Ok(m) => break m,
                    Err(NeedPage(f)) => {
                        let bytes = read(f.segment.id, f.segment.root, f.first_slot, f.blocks);
                        paged.insert_page(f.page, &bytes).unwrap();
                    }
                }
            };
            assert_eq!(got, model.lookup(a), "block {a}");
        }
    }
}
