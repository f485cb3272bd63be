//! The compactor: frees the segments the volume no longer needs, and
//! rewrites the live blocks of mostly-dead ones so they can be freed.
//!
//! Segments are never modified: an overwrite or a TRIM only lowers the old
//! segment's live count in the map. A round of the compactor:
//!
//! ```text
//! settle the map's live counts (fetching the pages that takes)
//! under the commit turn: every segment the directory has a record of
//!   that the volume no longer reaches (no live block, no checkpoint page,
//!   not named by the root, not the checkpoint's head or index) is dropped
//!   (DropSegments); the directory erases it after its grace
//! if the space held is too much for the live data (the policy):
//!   victims (fewest live blocks first, never a segment the root names)
//!   their summaries ─► the entries the map still points at ─► those
//!   blocks' ciphertext from the data shards, proven
//!   packed into new segments with their ORIGINAL addresses and sequences
//!   ─► one commit (under the commit turn, like the committer's)
//! ```
//!
//! **Why moving cannot lose or resurrect a write.** A moved block keeps
//! its sequence, so the XTS tweak (address, sequence) still decrypts it and
//! the map's "highest wins" order places it: a write or TRIM made after
//! the compactor read the victim has a higher sequence and wins over the
//! moved copy, whichever commits first; the moved copy beats the victim's
//! only by its higher segment id, on the same sequence. The victim is
//! dropped only in a later round, once the map (settled, after the move
//! committed) says nothing reaches it. Dropping happens under the commit
//! turn, so the set of records and the map it is compared with are of the
//! same commit. A crash anywhere leaves the victim reached by the root
//! until a move commits.
//!
//! **Throttled against foreground I/O**: a round moves at most
//! [`ROUND_BLOCKS`], its commit waits for the commit turn like any other
//! (so user commits interleave), and a busy round is followed by a pause
//! of twice its length. **Unless writes outrun it**: when the blocks on
//! the peers (held, and dropped but not erased yet) plus those queued in
//! the local log pass [`WRITES_WAIT`] × live, new writes wait (up to 5 s
//! each) for a round to free space, and the compactor runs without
//! pauses, so a steady overwrite load keeps within the bound at the cost
//! of write speed, as a full log-structured disk must. Writes wait at
//! admission, not commits: what is already acknowledged commits (and
//! FLUSH returns) at full speed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::cache::{MapCache, NeedPage};
use super::compaction::policy::{Policy, SPACE_BOUND, SegmentState, TRIGGER, reserve_segments};
use super::layout::{PackedBlock, Packer};
use super::map::{Mapping, Target};
use super::root::SegmentRef;
use super::summary::SummaryEntry;
use super::volume::{Inner, Space};
use crate::api::MAX_COMMIT_OPS;
use crate::codec::segment::BLOCK_SIZE;
use crate::codec::sequence::{SegmentId, Sequence};
use crate::sys::worker::{Pacing, State, Status, Worker};

/// Blocks one round moves at most (8 full segments of the default size).
pub(super) const ROUND_BLOCKS: u64 = 8 * 1024;

/// Past this many blocks held per live block, commits of new writes wait
/// for compaction: between the policy's trigger and the bound, so a steady
/// overwrite load holds the space within the bound.
pub(super) const WRITES_WAIT: f64 = TRIGGER + (SPACE_BOUND - TRIGGER) * 2.0 / 3.0;

impl Inner {
    /// True when new writes should wait for compaction: the blocks on the
    /// peers (held, and dropped but not erased yet) exceed [`WRITES_WAIT`]
    /// × live (with a trigger set above the default, a little above that
    /// trigger), the blocks queued to be committed counted on both sides
    /// (they are held once committed, and live unless they overwrite: a
    /// volume being filled never waits, and commits do not wait, so the
    /// queue stays short under load).
    pub(super) fn writes_wait(&self, space: Space) -> bool {
        let queued = self.local.lock().expect("local").queued_blocks();
        let limit = WRITES_WAIT.max(self.config.compact_above * 1.015);
        space.live > 0
            && (space.held + space.collecting + queued) as f64 > limit * (space.live + queued) as f64
    }

    /// Waits (at most [`WAIT_FOR_COMPACTION`]) while [`Self::writes_wait`]:
    /// a write admitted now would take the volume past the space bound
    /// once committed. Writes slow to the pace compaction frees space; a
    /// compactor that cannot progress slows them, never stops them.
    pub(super) async fn wait_for_compaction(&self) {
        let started = tokio::time::Instant::now();
        loop {
            let space = *self.space.lock().expect("space");
            let left = WAIT_FOR_COMPACTION.saturating_sub(started.elapsed());
            if left.is_zero() || !self.writes_wait(space) || self.stop.is_cancelled() {
                return;
            }
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(200)), self.compacted.notified()).await;
        }
    }
}

/// Longest a write waits for compaction.
const WAIT_FOR_COMPACTION: Duration = Duration::from_secs(5);

/// Bytes each peer keeps free for compaction (writes get ENOSPC first):
/// one shard of each segment a round may write ([`reserve_segments`]).
pub fn reserve_bytes(k: usize, blocks_per_shard: u32) -> u64 {
    let segment_blocks = k as u64 * u64::from(blocks_per_shard);
    reserve_segments(ROUND_BLOCKS, segment_blocks) * u64::from(blocks_per_shard) * BLOCK_SIZE as u64
}

/// Victims read at once.
const GATHER_AT_ONCE: usize = 8;

/// A round runs at least this often, and after every commit.
const PERIOD: Duration = Duration::from_secs(2);

/// A busy round is followed by a pause this many times its length,
/// unless writes are waiting for it.
const TRANQUILITY: u32 = 2;

pub(super) const PACING: Pacing =
    Pacing { tranquility: 0, backoff: Duration::from_millis(500), max_backoff: Duration::from_secs(30) };

/// A block to move: where it is, and what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Live {
    address: u64,
    sequence: Sequence,
    slot: u32,
}

impl Inner {
    /// Runs `f` on the map, fetching the pages it asks for (each inserted
    /// only if the index still points where it was fetched from: a
    /// checkpoint installed meanwhile moved it).
    async fn with_map<T>(
        &self,
        mut f: impl FnMut(&mut MapCache) -> Result<T, NeedPage>,
    ) -> Result<T, String> {
        loop {
            let need = match f(&mut self.map.lock().expect("map")) {
                Ok(t) => return Ok(t),
                Err(NeedPage(fetch)) => fetch,
            };
            let fetched =
                self.read_metadata(need.segment.id, need.segment.root, need.first_slot, need.blocks).await;
            let mut map = self.map.lock().expect("map");
            if map.index().fetch(need.page) != Some(need) {
                // Moved by a checkpoint meanwhile (its old segment may be
                // gone): ask again.
                continue;
            }
            let bytes = fetched.map_err(|e| format!("map page {}: {e}", need.page))?;
            map.insert_page(need.page, &bytes).map_err(|e| e.to_string())?;
        }
    }

    /// Every segment the volume reaches, the map's live counts settled:
    /// its map's, and its checkpoint's head and index continuations.
    async fn segments_reached(&self) -> Result<BTreeSet<SegmentId>, String> {
        let mut reached = self.with_map(|m| m.settle().map(|()| m.reached().expect("settled"))).await?;
        reached.extend(self.checkpoint_parts.lock().expect("parts").iter().copied());
        Ok(reached)
    }

    /// Drops (at the directory) every segment it has a record of that the
    /// volume no longer reaches; the count dropped. Under the commit turn,
    /// so no commit lands between reading the records and the map.
    pub(super) async fn drop_unreached(&self) -> Result<usize, String> {
        // Most pages fetched before the turn, so commits wait less.
        let started = std::time::Instant::now();
        self.with_map(MapCache::settle).await?;
        let settled = started.elapsed();
        let _turn = self.commit_turn.lock().await;
        if started.elapsed() > std::time::Duration::from_secs(1) {
            tracing::debug!(
                "volume {}: dropping unreached segments waited {settled:.0?} for the map, {:.0?} for the commit turn",
                self.name,
                started.elapsed() - settled
            );
        }
        if self.fenced.lock().expect("fenced").is_some() || *self.suspended.borrow() {
            return Ok(0);
        }
        let listed = self.recorded.lock().expect("recorded").is_some();
        if !listed {
            let ids = self.client.list_segments(&self.name).await.map_err(|e| e.to_string())?;
            *self.recorded.lock().expect("recorded") = Some(ids.into_iter().collect());
        }
        let reached = self.segments_reached().await?;
        let dead: Vec<SegmentId> = {
            let recorded = self.recorded.lock().expect("recorded");
            let recorded = recorded.as_ref().expect("listed above");
            recorded.difference(&reached).copied().collect()
        };
        let epoch = self.epoch.load(std::sync::atomic::Ordering::Relaxed);
        for chunk in dead.chunks(MAX_COMMIT_OPS) {
            self.client.drop_segments(&self.name, epoch, chunk.to_vec()).await.map_err(|e| e.to_string())?;
            let mut recorded = self.recorded.lock().expect("recorded");
            let mut holders = self.holders.lock().expect("holders");
            for id in chunk {
                recorded.as_mut().expect("listed above").remove(id);
                holders.remove(id);
            }
        }
        if !dead.is_empty() {
            tracing::debug!("volume {}: dropped {} segments no root reaches", self.name, dead.len());
        }
        Ok(dead.len())
    }

    /// The blocks of each victim the map still points at (each victim's in
    /// slot order). Summaries are read a few at a time; the map is asked in
    /// address order over all of them, so a small map cache loads each
    /// page once.
    async fn live_in(&self, victims: &[SegmentRef]) -> Result<Vec<Vec<Live>>, String> {
        let mut summaries = Vec::with_capacity(victims.len());
        for chunk in victims.chunks(GATHER_AT_ONCE) {
            let read = super::attach::join_all(chunk.iter().map(|v| self.read_summary(*v)).collect()).await;
            for s in read {
                summaries.push(s?);
            }
        }
        let mut wanted: Vec<(u64, usize, Live)> = Vec::new();
        for (i, summary) in summaries.iter().enumerate() {
            for e in &summary.entries {
                let SummaryEntry::Data { start, len, slot, sequence } = *e else { continue };
                for n in 0..len {
                    let sequence = sequence.checked_add(n).ok_or("a summary's sequences overflow")?;
                    let live = Live { address: start + n, sequence, slot: slot + n as u32 };
                    wanted.push((live.address, i, live));
                }
            }
        }
        wanted.sort_by_key(|(address, i, _)| (*address, *i));
        let mut out = vec![Vec::new(); victims.len()];
        for (address, i, l) in wanted {
            let want = Mapping {
                sequence: l.sequence,
                target: Target::Data { segment: victims[i].id, slot: l.slot },
            };
            if self.with_map(|m| m.lookup(address)).await? == Some(want) {
                out[i].push(l);
            }
        }
        for live in &mut out {
            live.sort_by_key(|l| l.slot);
        }
        Ok(out)
    }

    /// The ciphertext, as stored, of `live` blocks of `victim` (in slot
    /// order).
    async fn read_live(&self, victim: SegmentRef, live: Vec<Live>) -> Result<Vec<(Live, Vec<u8>)>, String> {
        if live.is_empty() {
            return Ok(Vec::new());
        }
        // Runs of slots, gaps of a few blocks read through (fewer calls).
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for l in &live {
            match runs.last_mut() {
                Some((_, end)) if l.slot >= *end && l.slot - *end < 16 => *end = l.slot + 1,
                _ => runs.push((l.slot, l.slot + 1)),
            }
        }
        let mut data: HashMap<u32, Vec<u8>> = HashMap::new();
        for (first, end) in runs {
            let bytes =
                self.read_slots(victim.id, victim.root, first, end).await.map_err(|e| e.to_string())?;
            for (i, b) in bytes.chunks_exact(BLOCK_SIZE).enumerate() {
                data.insert(first + i as u32, b.to_vec());
            }
        }
        live.into_iter().map(|l| Ok((l, data.remove(&l.slot).ok_or("a live slot was not read")?))).collect()
    }

    /// Moves the live blocks of `victims` into new segments and commits
    /// them; the blocks moved.
    async fn move_live(&self, victims: &[SegmentRef]) -> Result<u64, String> {
        let started = tokio::time::Instant::now();
        let live = self.live_in(victims).await?;
        let mut blocks: Vec<(Live, Vec<u8>)> = Vec::new();
        let mut work: Vec<(SegmentRef, Vec<Live>)> = victims.iter().copied().zip(live).collect();
        while !work.is_empty() {
            let batch: Vec<_> = work.drain(..work.len().min(GATHER_AT_ONCE)).collect();
            let read =
                super::attach::join_all(batch.into_iter().map(|(v, l)| self.read_live(v, l)).collect()).await;
            for r in read {
                blocks.extend(r?);
            }
        }
        if blocks.is_empty() {
            return Ok(0);
        }
        // Address order, as the committer packs: sequential reads stay so.
        blocks.sort_by_key(|(l, _)| l.address);
        let mut packers = Vec::new();
        let mut p = Packer::new(self.k, self.m, self.blocks_per_shard);
        for (l, data) in &blocks {
            if !p.fits_block(0) {
                packers.push(std::mem::replace(&mut p, Packer::new(self.k, self.m, self.blocks_per_shard)));
            }
            p.push_block(PackedBlock { address: l.address, sequence: l.sequence, data });
        }
        if !p.is_empty() {
            packers.push(p);
        }
        tracing::debug!(
            "volume {}: compaction gathered {} blocks in {:?}",
            self.name,
            blocks.len(),
            started.elapsed()
        );
        let _turn = self.commit_turn.lock().await;
        if let Some(why) = self.fenced.lock().expect("fenced").clone() {
            return Err(why);
        }
        if *self.suspended.borrow() {
            return Err("the write lease may have lapsed: waiting for it".into());
        }
        match self.commit_packed(packers, None).await {
            Ok(()) => Ok(blocks.len() as u64),
            Err(e) => {
                self.map.lock().expect("map").abandon_checkpoint();
                Err(e.to_string())
            }
        }
    }
}

/// The compactor worker of one attached volume (see the module doc).
pub(super) struct Compactor {
    pub(super) inner: Arc<Inner>,
    /// Data blocks each segment was written with (k × blocks per shard).
    pub(super) capacity: HashMap<SegmentId, u64>,
    pub(super) moved: u64,
    pub(super) dropped: u64,
    /// Held and live blocks at the last round.
    pub(super) held: u64,
    pub(super) live: u64,
    /// The highest segment a snapshot reaches (see [`Self::pins`]).
    pub(super) pinned_up_to: Option<SegmentId>,
    /// Blocks of dropped segments not erased yet, at the last round.
    pub(super) collecting: u64,
}

impl Compactor {
    pub(super) fn new(inner: Arc<Inner>) -> Self {
        Self {
            inner,
            capacity: HashMap::new(),
            moved: 0,
            dropped: 0,
            held: 0,
            live: 0,
            pinned_up_to: None,
            collecting: 0,
        }
    }

    /// The data blocks of every recorded segment, asking the directory for
    /// the records of those not known yet.
    async fn capacities(&mut self) -> Result<(), String> {
        let unknown: Vec<SegmentId> = {
            let recorded = self.inner.recorded.lock().expect("recorded");
            let Some(recorded) = recorded.as_ref() else { return Ok(()) };
            self.capacity.retain(|s, _| recorded.contains(s));
            recorded.iter().copied().filter(|s| !self.capacity.contains_key(s)).collect()
        };
        for chunk in unknown.chunks(crate::api::MAX_SEGMENTS_PER_CALL) {
            let records = self
                .inner
                .client
                .segment_records(&self.inner.name, chunk.to_vec())
                .await
                .map_err(|e| e.to_string())?;
            for (id, r) in chunk.iter().zip(records) {
                // A record gone since the listing: dropped by a takeover's
                // writer; the next round lists again only if fenced.
                let blocks = r.map_or(0, |r| self.inner.k as u64 * u64::from(r.shard_blocks));
                self.capacity.insert(*id, blocks);
            }
        }
        Ok(())
    }

    /// Victims for one round, by the policy (never a segment the root
    /// names: it stays until a checkpoint covers it).
    fn victims(&self) -> Vec<SegmentRef> {
        let segment_blocks = self.inner.k as u64 * u64::from(self.inner.blocks_per_shard);
        // The policy (docs/ARCHITECTURE.md, "Compaction policy and its
        // bounds"), at the trigger the attach was given.
        let policy = Policy { trigger: self.inner.config.compact_above, ..Policy::DEFAULT };
        if !policy.should_compact(self.held, self.live, segment_blocks) {
            return Vec::new();
        }
        let map = self.inner.map.lock().expect("map");
        let Some(live) = map.segments() else { return Vec::new() };
        let candidates: Vec<SegmentState> = self
            .capacity
            .iter()
            // Segments of no live block the map still needs hold pages of
            // the checkpoint: only a checkpoint frees them.
            .filter(|(s, cap)| **cap > 0 && !map.is_recent(**s) && live.contains_key(*s))
            .map(|(s, cap)| SegmentState {
                id: *s,
                live_blocks: live[s],
                capacity: *cap,
                pinned: self.pinned_up_to.is_some_and(|p| *s <= p),
            })
            .collect();
        let now = map.highest().1;
        policy
            .victims(&candidates, now, ROUND_BLOCKS)
            .into_iter()
            .filter_map(|s| Some(SegmentRef { id: s, root: map.root_of(s)? }))
            .collect()
    }

    /// Counts the space held and live, and says so to the committer: the
    /// volume's own segments only (a clone's inherited ones are its
    /// ancestor's space), a segment a snapshot pins counted as all live
    /// (nothing frees it while the snapshot stays).
    fn count(&mut self) {
        let map = self.inner.map.lock().expect("map");
        if let Some(live) = map.segments() {
            self.held = self.capacity.values().sum();
            self.live = self
                .capacity
                .iter()
                .map(|(s, cap)| match self.pinned_up_to {
                    Some(p) if *s <= p => *cap,
                    _ => live.get(s).copied().unwrap_or(0),
                })
                .sum();
            let mut space = self.inner.space.lock().expect("space");
            space.held = self.held;
            space.live = self.live;
            space.collecting = self.collecting;
        }
    }

    /// The highest segment any snapshot of the volume reaches: every
    /// segment of the volume at or below it is kept by one.
    /// Also the blocks of dropped segments the directory has not erased
    /// yet (they take room on the peers until it does).
    async fn pins(&mut self) -> Result<(), String> {
        // One call that reads a few keys and the dropped records: a round
        // runs after every commit, and `volume info` (which walks every
        // record of the volume) cost the directory more than the commit.
        let (pinned_up_to, collecting) =
            self.inner.client.compaction_inputs(&self.inner.name).await.map_err(|e| e.to_string())?;
        self.pinned_up_to = pinned_up_to.map(SegmentId::from_raw);
        let (k, m) = (self.inner.k as u64, self.inner.m as u64);
        self.collecting = collecting.bytes * k / (k + m) / BLOCK_SIZE as u64;
        Ok(())
    }

    async fn round(&mut self) -> Result<State, String> {
        self.dropped += self.inner.drop_unreached().await? as u64;
        self.pins().await?;
        self.capacities().await?;
        self.count();
        self.inner.compacted.notify_waiters();
        let victims = self.victims();
        if victims.is_empty() {
            return Ok(State::Idle);
        }
        let started = tokio::time::Instant::now();
        let moved = self.inner.move_live(&victims).await?;
        self.moved += moved;
        if moved == 0 {
            return Ok(State::Idle);
        }
        tracing::debug!(
            "volume {}: compaction moved {moved} blocks out of {} segments in {:?} (held {} blocks for {} live)",
            self.inner.name,
            victims.len(),
            started.elapsed(),
            self.held,
            self.live
        );
        // Drop the victims now that nothing reaches them.
        self.dropped += self.inner.drop_unreached().await? as u64;
        self.capacities().await?;
        self.count();
        self.inner.compacted.notify_waiters();
        Ok(State::Busy)
    }
}

impl Worker for Compactor {
    type Error = String;

    fn name(&self) -> String {
        format!("compact {}", self.inner.name)
    }

    fn status(&self) -> Status {
        Status {
            queue: None,
            progress: Some(format!(
                "{} blocks held for {} live; {} moved, {} segments dropped",
                self.held, self.live, self.moved, self.dropped
            )),
        }
    }

    async fn work(&mut self, stop: &CancellationToken) -> Result<State, String> {
        if self.inner.fenced.lock().expect("fenced").is_some() {
            return Ok(State::Done);
        }
        let started = tokio::time::Instant::now();
        let state = self.round().await?;
        // Yield to foreground I/O (twice the round's time), unless writes
        // wait for this round.
        let space = *self.inner.space.lock().expect("space");
        if state == State::Busy && !self.inner.writes_wait(space) {
            tokio::select! {
                _ = tokio::time::sleep(started.elapsed() * TRANQUILITY) => {}
                _ = stop.cancelled() => {}
            }
        }
        Ok(state)
    }

    async fn wait_for_work(&mut self) -> State {
        tokio::select! {
            _ = self.inner.compact_wake.notified() => {}
            _ = tokio::time::sleep(PERIOD) => {}
        }
        State::Busy
    }
}
