//! The map as an attach uses it: a checkpoint, a bounded cache of its
//! pages, and the recent summaries layered on top.
//!
//! Attaching a 1 TiB volume reads the root, the checkpoint's index (page →
//! where, live counts) and the summaries of the segments written since the
//! checkpoint; no map page. A lookup that needs a page the cache does not
//! hold answers [`NeedPage`]: the caller fetches those blocks from peers,
//! proves them against the segment root the answer names, decrypts them
//! and hands the bytes to [`MapCache::insert_page`], which checks them
//! against the hash the index records and refuses anything else. Nothing
//! here does I/O, so all of it is tested against a plain [`BlockMap`].
//!
//! **Two layers, and the answer is their maximum.** The *base* is the
//! checkpoint: its pages, exactly as written, [`capacity`](MapCache::new)
//! of them at most in memory (least recently used evicted first). The
//! *overlay* is a [`BlockMap`] of the entries of every summary applied
//! since (few: the writer checkpoints periodically, and the root lists at
//! most [`MAX_SEGMENTS_SINCE`](super::root::MAX_SEGMENTS_SINCE) segments).
//! Since "highest sequence wins" is a maximum, a block's mapping is the
//! greater of its base and overlay mappings, whatever order things came in.
//!
//! **Why recent entries are kept apart rather than applied to pages.** A
//! loaded page is never modified, so every page in memory is clean: it can
//! be evicted at any time and fetched again with the same bytes and hash,
//! and the page bound holds without exception (pinning dirty pages instead
//! would let a burst of random writes over many pages break the bound
//! until the next checkpoint). The price is a second lookup in the overlay,
//! which is small; merging happens once per changed page, when
//! [`checkpoint`](MapCache::checkpoint) writes it.
//!
//! **Live counts.** The index carries each segment's live blocks at the
//! checkpoint. Each page the overlay touches keeps a *delta* (its merged
//! page's blocks per segment minus its base page's). When a summary
//! comes in and the page's base is at hand, each entry's part in the page
//! moves counts as it lands: the blocks it wins over the merged page
//! (base and overlay, only the runs under the entry) leave their segments
//! for its own. A page whose base is not at hand is marked unsettled, and
//! its delta is recomputed from a whole merge when the page is next
//! loaded or when the counts are asked for ([`settle`](MapCache::settle),
//! the compactor's round). Counts are exact once no page is unsettled,
//! and [`live_blocks`](MapCache::live_blocks) says `None` until then.
//!
//! **Checkpointing** rewrites only the pages the overlay touches: each is
//! its base page with the overlay's entries applied. Pages come in one at
//! a time through the same [`NeedPage`] protocol, kept as they are made,
//! so even a one-page cache gets there. The writer places the
//! [`PendingCheckpoint`]'s blobs, [`finish`](PendingCheckpoint::finish)es
//! the index, commits, then [`install`](MapCache::install)s it: the
//! summaries it covers leave the overlay, pages the checkpoint did not
//! rewrite stay cached, and the pages it rewrote stay loaded as merged
//! (each checked against the hash the new index records), so the commits
//! after a checkpoint neither fetch them back nor fall back to whole-page
//! merges for their live counts.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::checkpoint::{
    CheckpointError, CheckpointIndex, INDEX_HEADER_LEN, LIVE_ENTRY_LEN, PAGE_ENTRY_LEN, PageBlob, PageFetch,
    PageRef, SEGMENT_ENTRY_LEN,
};
use super::map::{BlockMap, Entry, Extent, MapError, MapPage, Mapping, PAGE_BLOCKS};
use super::root::{SegmentRef, SegmentRoot};
use super::summary::Summary;
use crate::codec::sequence::{SegmentId, Sequence};

/// The answer needs a page the cache does not hold: fetch it (the blocks,
/// proven against the segment root, decrypted) and
/// [`insert`](MapCache::insert_page) it, then ask again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeedPage(pub PageFetch);

/// Per segment, a change of live blocks.
type Delta = HashMap<SegmentId, i64>;

/// A checkpoint in the making: pages merged so far.
struct Staging {
    highest_sequence: Sequence,
    highest_segment: SegmentId,
    /// The summaries applied when it began: all of them are in every
    /// staged page, so the checkpoint covers them.
    covers: BTreeSet<SegmentId>,
    /// Page → its merged blob (`None`: now empty) and its delta.
    staged: BTreeMap<u64, (Option<PageBlob>, Delta)>,
    /// The first merged pages (up to the capacity) with their blobs'
    /// hashes, kept loaded once the checkpoint is installed (they are its
    /// pages).
    pages: Vec<(MapPage, [u8; 32])>,
}

/// The checkpoint [`MapCache::checkpoint`] made: pages to write, and what
/// the index needs besides their places.
#[derive(Debug)]
pub struct PendingCheckpoint {
    /// The changed pages, to write into segments.
    pub blobs: Vec<PageBlob>,
    volume_blocks: u64,
    highest_sequence: Sequence,
    highest_segment: SegmentId,
    /// Unchanged pages, where they were, with their segments' roots.
    kept: Vec<(u64, PageRef, SegmentRoot)>,
    live: BTreeMap<SegmentId, (u64, SegmentRoot)>,
    covers: BTreeSet<SegmentId>,
}

impl PendingCheckpoint {
    /// The new index, given where each blob was written (its page, its
    /// segment with that segment's root, its first slot).
    pub fn finish(
        &self,
        placed: impl IntoIterator<Item = (u64, SegmentRef, u32)>,
    ) -> Result<CheckpointIndex, CheckpointError> {
        let blobs: HashMap<u64, &PageBlob> = self.blobs.iter().map(|b| (b.page, b)).collect();
        let mut pages = self.kept.clone();
        let mut seen = BTreeSet::new();
        for (page, segment, first_slot) in placed {
            let blob = blobs.get(&page).ok_or(CheckpointError::Placement(page))?;
            if !seen.insert(page) {
                return Err(CheckpointError::Placement(page));
            }
            let range =
                super::checkpoint::BlockRange { segment: segment.id, first_slot, blocks: blob.blocks() };
            pages.push((page, PageRef { range, hash: blob.hash }, segment.root));
        }
        if let Some(b) = self.blobs.iter().find(|b| !seen.contains(&b.page)) {
            return Err(CheckpointError::Placement(b.page));
        }
        CheckpointIndex::from_placed(
            self.volume_blocks,
            self.highest_sequence,
            self.highest_segment,
            pages,
            self.live.iter().map(|(s, (n, root))| (*s, *n, *root)),
        )
    }

    /// Bytes of the index [`finish`](Self::finish) gives when the blobs
    /// go into `page_segments` segments new to the index (the writer
    /// lays the checkpoint out before the segments' roots exist).
    pub fn index_len(&self, page_segments: usize) -> usize {
        let mut segments: BTreeSet<SegmentId> = self.kept.iter().map(|(_, r, _)| r.range.segment).collect();
        segments.extend(self.live.keys().copied());
        INDEX_HEADER_LEN
            + PAGE_ENTRY_LEN * (self.kept.len() + self.blobs.len())
            + SEGMENT_ENTRY_LEN * (segments.len() + page_segments)
            + LIVE_ENTRY_LEN * self.live.len()
    }

    /// The summaries (by segment) the checkpoint includes.
    pub fn covers(&self) -> &BTreeSet<SegmentId> {
        &self.covers
    }
}

/// The volume's map, paged (see the module doc).
pub struct MapCache {
    index: CheckpointIndex,
    capacity: usize,
    /// Loaded base pages → (page, last use).
    clean: HashMap<u64, (MapPage, u64)>,
    /// Last use → page, oldest first.
    lru: BTreeMap<u64, u64>,
    tick: u64,
    /// Summaries applied since the checkpoint, by segment, with the
    /// segment's root.
    recent: BTreeMap<SegmentId, (Summary, SegmentRoot)>,
    overlay: BlockMap,
    /// Each page the overlay touches: its delta, exact while the page is
    /// settled (an unsettled page's is replaced when it is settled).
    deltas: HashMap<u64, Delta>,
    /// Pages the overlay changed since they were last settled.
    unsettled: BTreeSet<u64>,
    /// Live blocks per segment: the index's plus every page's delta.
    live: HashMap<SegmentId, i64>,
    highest_sequence: Sequence,
    highest_segment: SegmentId,
    staging: Option<Staging>,
    /// What the last pending checkpoint covers, until it is installed.
    pending_covers: Option<BTreeSet<SegmentId>>,
    /// The pages the last pending checkpoint wrote (the first, up to the
    /// capacity), decoded, until it is installed: they stay loaded, so the
    /// commits after a checkpoint do not fetch back what this attach just
    /// wrote.
    pending_pages: Vec<(MapPage, [u8; 32])>,
}

impl MapCache {
    /// The map of a checkpoint (or [`CheckpointIndex::empty`]) with room
    /// for `capacity` pages (at least one).
    pub fn new(index: CheckpointIndex, capacity: usize) -> Self {
        let live = index.live.iter().map(|(s, n)| (*s, *n as i64)).collect();
        Self {
            overlay: BlockMap::new(index.volume_blocks),
            highest_sequence: index.highest_sequence,
            highest_segment: index.highest_segment,
            index,
            capacity: capacity.max(1),
            clean: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            recent: BTreeMap::new(),
            deltas: HashMap::new(),
            unsettled: BTreeSet::new(),
            live,
            staging: None,
            pending_covers: None,
            pending_pages: Vec::new(),
        }
    }

    /// The checkpoint's index the cache pages from.
    pub fn index(&self) -> &CheckpointIndex {
        &self.index
    }

    /// The volume's size in blocks.
    pub fn blocks(&self) -> u64 {
        self.index.volume_blocks
    }

    /// Pages in memory (never more than the capacity).
    pub fn loaded_pages(&self) -> usize {
        self.clean.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The highest sequence and segment id applied (or checkpointed).
    pub fn highest(&self) -> (Sequence, SegmentId) {
        (self.highest_sequence, self.highest_segment)
    }

    /// The summaries applied since the checkpoint, by segment.
    pub fn recent(&self) -> impl Iterator<Item = &Summary> + '_ {
        self.recent.values().map(|(s, _)| s)
    }

    /// Drops a loaded page (memory pressure); it is fetched again when
    /// needed. Always safe: loaded pages are never modified.
    pub fn evict(&mut self, page: u64) {
        if let Some((_, used)) = self.clean.remove(&page) {
            self.lru.remove(&used);
        }
    }

    /// Checks `bytes` against the hash the index records for `page`,
    /// decodes them and keeps the page, evicting the least recently used
    /// beyond the capacity. Refuses bytes that are not exactly the
    /// checkpoint's (forged, altered, another checkpoint's).
    pub fn insert_page(&mut self, page: u64, bytes: &[u8]) -> Result<(), CheckpointError> {
        let decoded = self.index.open_page(page, bytes)?;
        self.keep_loaded(page, decoded);
        if self.unsettled.contains(&page) {
            self.settle_page(page);
        }
        Ok(())
    }

    /// Keeps `decoded` (checked to be the index's page `page`) loaded,
    /// evicting the least recently used beyond the capacity.
    fn keep_loaded(&mut self, page: u64, decoded: MapPage) {
        self.evict(page);
        while self.clean.len() >= self.capacity {
            let Some((_, oldest)) = self.lru.pop_first() else { break };
            self.clean.remove(&oldest);
        }
        self.tick += 1;
        self.clean.insert(page, (decoded, self.tick));
        self.lru.insert(self.tick, page);
    }

    /// The base page `page` (`None`: empty in the checkpoint), marked used.
    fn base(&mut self, page: u64) -> Result<Option<&MapPage>, NeedPage> {
        let Some(fetch) = self.index.fetch(page) else { return Ok(None) };
        let Some((_, used)) = self.clean.get_mut(&page) else { return Err(NeedPage(fetch)) };
        self.lru.remove(used);
        self.tick += 1;
        *used = self.tick;
        self.lru.insert(self.tick, page);
        Ok(self.clean.get(&page).map(|(p, _)| p))
    }

    /// True if the base of `page` is at hand (loaded, or empty).
    fn base_ready(&self, page: u64) -> bool {
        !self.index.pages.contains_key(&page) || self.clean.contains_key(&page)
    }

    /// The mapping of `address` (`None`: never written).
    pub fn lookup(&mut self, address: u64) -> Result<Option<Mapping>, NeedPage> {
        let recent = self.overlay.lookup(address);
        let page = MapPage::index_of(address);
        let base = self.base(page)?.and_then(|p| p.lookup((address & (PAGE_BLOCKS - 1)) as u32));
        Ok(match (base, recent) {
            (Some(b), Some(r)) => Some(if r.beats(&b) { r } else { b }),
            (b, r) => b.or(r),
        })
    }

    /// The extents covering a prefix of `start .. start+len`, in order,
    /// never-written ranges included: all of it, or up to the first page
    /// not in memory, with that page to fetch. The caller fetches it and
    /// asks again from where the extents end, so a range over more pages
    /// than the cache holds still completes.
    pub fn lookup_range(&mut self, start: u64, len: u64) -> (Vec<Extent>, Option<NeedPage>) {
        let end = start.saturating_add(len).min(super::map::ADDRESS_LIMIT);
        let mut out = Vec::new();
        let mut cursor = start;
        while cursor < end {
            let page = MapPage::index_of(cursor);
            let page_end = ((page + 1) * PAGE_BLOCKS).min(end);
            let base = match self.base(page) {
                Ok(b) => b.map(|p| p.extents(cursor, page_end)).unwrap_or_default(),
                Err(need) => return (out, Some(need)),
            };
            let recent: Vec<Extent> =
                self.overlay.page(page).map(|p| p.extents(cursor, page_end)).unwrap_or_default();
            if recent.is_empty() {
                out.extend(with_gaps(cursor, page_end, base));
            } else {
                // Few runs: merge them in a scratch map (highest wins).
                let mut scratch = BlockMap::new(super::map::ADDRESS_LIMIT);
                for e in base.iter().chain(&recent) {
                    let entry = e.entry().expect("page extents are written");
                    scratch.apply(&entry).expect("page extents are valid entries");
                }
                out.extend(scratch.lookup_range(cursor, page_end - cursor));
            }
            cursor = page_end;
        }
        (merge_adjacent(out), None)
    }

    /// Applies a summary (a segment committed since the checkpoint, whose
    /// root is `root`): all of it, or none if an entry reaches past the
    /// volume's end. Re-applying one is a no-op.
    pub fn apply_summary(&mut self, summary: &Summary, root: SegmentRoot) -> Result<(), MapError> {
        for entry in summary.entries() {
            self.overlay.check(&entry)?;
        }
        for entry in summary.entries() {
            let (start, end) = (entry.start(), entry.start() + entry.len());
            for page in MapPage::index_of(start)..=MapPage::index_of(end - 1) {
                let (lo, hi) = ((page * PAGE_BLOCKS).max(start), ((page + 1) * PAGE_BLOCKS).min(end));
                if self.unsettled.contains(&page) || !self.base_ready(page) {
                    self.unsettled.insert(page);
                } else {
                    self.count_overwrite(page, &entry, lo, hi);
                }
            }
            self.overlay.apply(&entry)?;
            let top = match entry {
                Entry::Data { sequence, len, .. } => sequence.checked_add(len - 1).unwrap_or(sequence),
                Entry::Zero { sequence, .. } => sequence,
            };
            self.highest_sequence = self.highest_sequence.max(top);
        }
        self.highest_segment = self.highest_segment.max(summary.segment);
        self.recent.insert(summary.segment, (summary.clone(), root));
        Ok(())
    }

    /// Moves live blocks for `entry`'s part `lo..hi` in `page` (settled,
    /// its base at hand), before the overlay takes it: the blocks it wins
    /// over the merged page leave their segments for its own. Only the
    /// runs within `lo..hi` are looked at, so a commit of a few random
    /// blocks costs a few lookups, however many runs the page holds (a
    /// whole-page merge here made small commits cost 30 ms of CPU each).
    fn count_overwrite(&mut self, page: u64, entry: &Entry, lo: u64, hi: u64) {
        let mut scratch = BlockMap::new(super::map::ADDRESS_LIMIT);
        let base = self.clean.get(&page).map(|(p, _)| p.extents(lo, hi)).unwrap_or_default();
        let recent = self.overlay.page(page).map(|p| p.extents(lo, hi)).unwrap_or_default();
        for e in base.iter().chain(&recent) {
            scratch
                .apply(&e.entry().expect("page extents are written"))
                .expect("page extents are valid entries");
        }
        let whole = Extent { start: entry.start(), len: entry.len(), first: Some(entry.first()) };
        let part = Extent { start: lo, len: hi - lo, first: whole.at(lo - entry.start()) };
        let part = part.entry().expect("a slice of an entry is an entry");
        let applied = scratch.apply(&part).expect("a slice of a valid entry is valid");
        let mut moved: Vec<(SegmentId, i64)> =
            applied.released.iter().map(|&(s, n)| (s, -(n as i64))).collect();
        if let (Entry::Data { segment, .. }, true) = (part, applied.won > 0) {
            moved.push((segment, applied.won as i64));
        }
        let delta = self.deltas.entry(page).or_default();
        for &(s, n) in &moved {
            let d = delta.entry(s).or_default();
            *d += n;
            if *d == 0 {
                delta.remove(&s);
            }
            let l = self.live.entry(s).or_default();
            *l += n;
            if *l == 0 {
                self.live.remove(&s);
            }
        }
    }

    /// The page `page` with the overlay applied, and its delta (blocks per
    /// segment, merged minus base). The base must be at hand.
    fn merged(&self, page: u64) -> (MapPage, Delta) {
        let base = self.clean.get(&page).map(|(p, _)| p);
        let mut scratch = BlockMap::new(super::map::ADDRESS_LIMIT);
        let (lo, hi) = (page * PAGE_BLOCKS, (page + 1) * PAGE_BLOCKS);
        let recent = self.overlay.page(page).map(|p| p.extents(lo, hi)).unwrap_or_default();
        for e in base.map(|p| p.extents(lo, hi)).unwrap_or_default().iter().chain(&recent) {
            scratch
                .apply(&e.entry().expect("page extents are written"))
                .expect("page extents are valid entries");
        }
        let merged = scratch.page(page).cloned().unwrap_or_else(|| MapPage::new(page));
        let mut delta: Delta = merged.segment_blocks().into_iter().map(|(s, n)| (s, n as i64)).collect();
        for (s, n) in base.map(MapPage::segment_blocks).unwrap_or_default() {
            *delta.entry(s).or_default() -= n as i64;
        }
        delta.retain(|_, n| *n != 0);
        (merged, delta)
    }

    /// Recomputes `page`'s delta (its base at hand).
    fn settle_page(&mut self, page: u64) {
        let (_, delta) = self.merged(page);
        for (s, n) in self.deltas.remove(&page).unwrap_or_default() {
            *self.live.entry(s).or_default() -= n;
        }
        for (s, n) in &delta {
            *self.live.entry(*s).or_default() += n;
        }
        self.live.retain(|_, n| *n != 0);
        self.deltas.insert(page, delta);
        self.unsettled.remove(&page);
    }

    /// Brings the live counts up to date, asking for the pages it needs
    /// one at a time.
    pub fn settle(&mut self) -> Result<(), NeedPage> {
        while let Some(&page) = self.unsettled.first() {
            if !self.base_ready(page) {
                return Err(NeedPage(self.index.fetch(page).expect("a page not at hand is in the index")));
            }
            self.settle_page(page);
        }
        Ok(())
    }

    /// The root of `segment` if the map can reach it: a segment of the
    /// checkpoint's or one applied since. Blocks read from it are proven
    /// against this root.
    pub fn root_of(&self, segment: SegmentId) -> Option<SegmentRoot> {
        self.recent.get(&segment).map(|(_, r)| *r).or_else(|| self.index.segments.get(&segment).copied())
    }

    /// Blocks the map still reaches in `segment`; `None` while some page is
    /// unsettled ([`Self::settle`]).
    pub fn live_blocks(&self, segment: SegmentId) -> Option<u64> {
        self.unsettled.is_empty().then(|| self.live.get(&segment).map_or(0, |&n| n as u64))
    }

    /// Every segment the map reaches, with its live blocks; `None` while
    /// some page is unsettled.
    pub fn segments(&self) -> Option<HashMap<SegmentId, u64>> {
        self.unsettled.is_empty().then(|| self.live.iter().map(|(s, n)| (*s, *n as u64)).collect())
    }

    /// Every segment the map needs: those holding live blocks, the pages of
    /// its checkpoint, or a summary applied since (the root names those).
    /// `None` while some page is unsettled. The checkpoint's head and index
    /// continuations are the caller's to add.
    pub fn reached(&self) -> Option<BTreeSet<SegmentId>> {
        if !self.unsettled.is_empty() {
            return None;
        }
        let mut out: BTreeSet<SegmentId> = self.live.keys().copied().collect();
        out.extend(self.recent.keys().copied());
        out.extend(self.index.pages.values().map(|r| r.range.segment));
        Some(out)
    }

    /// True if `segment`'s summary was applied since the checkpoint (the
    /// root names it until the next checkpoint).
    pub fn is_recent(&self, segment: SegmentId) -> bool {
        self.recent.contains_key(&segment)
    }

    /// The next checkpoint: every page the overlay changed, merged, and the
    /// live counts they give. Asks for base pages one at a time; what it
    /// merged is kept between calls, so call again after each insert.
    pub fn checkpoint(&mut self) -> Result<PendingCheckpoint, NeedPage> {
        let mut staging = self.staging.take().unwrap_or_else(|| Staging {
            highest_sequence: self.highest_sequence,
            highest_segment: self.highest_segment,
            covers: self.recent.keys().copied().collect(),
            staged: BTreeMap::new(),
            pages: Vec::new(),
        });
        let dirty: Vec<u64> = self.overlay.pages().map(MapPage::index).collect();
        for page in dirty {
            if staging.staged.contains_key(&page) {
                continue;
            }
            if let Err(need) = self.base(page) {
                self.staging = Some(staging);
                return Err(need);
            }
            let (merged, delta) = self.merged(page);
            let blob = (!merged.is_empty()).then(|| PageBlob::of(&merged));
            // Only the first `capacity` stay loaded at install: the rest
            // are not kept decoded (a checkpoint may rewrite far more pages
            // than the cache holds).
            if let Some(b) = blob.as_ref().filter(|_| staging.pages.len() < self.capacity) {
                staging.pages.push((merged, b.hash));
            }
            staging.staged.insert(page, (blob, delta));
        }
        let mut live: HashMap<SegmentId, i64> =
            self.index.live.iter().map(|(s, n)| (*s, *n as i64)).collect();
        for (_, delta) in staging.staged.values() {
            for (s, n) in delta {
                *live.entry(*s).or_default() += n;
            }
        }
        let root_of = |s: &SegmentId| {
            self.recent.get(s).map(|(_, r)| *r).or_else(|| self.index.segments.get(s).copied())
        };
        let live = live
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| (s, (n as u64, root_of(&s).expect("a live segment is in the index or recent"))))
            .collect();
        let kept = self
            .index
            .pages
            .iter()
            .filter(|(p, _)| !staging.staged.contains_key(p))
            .map(|(&p, r)| (p, *r, self.index.segments[&r.range.segment]))
            .collect();
        self.pending_covers = Some(staging.covers.clone());
        self.pending_pages = staging.pages;
        Ok(PendingCheckpoint {
            blobs: staging.staged.into_values().filter_map(|(b, _)| b).collect(),
            volume_blocks: self.index.volume_blocks,
            highest_sequence: staging.highest_sequence,
            highest_segment: staging.highest_segment,
            kept,
            live,
            covers: staging.covers,
        })
    }

    /// Drops a checkpoint in the making (the writer gave up on it).
    pub fn abandon_checkpoint(&mut self) {
        self.staging = None;
        self.pending_covers = None;
        self.pending_pages.clear();
    }

    /// Switches to a committed checkpoint: the summaries it covers leave
    /// the overlay (those applied while it was made stay, applying twice
    /// being harmless), pages it did not rewrite stay loaded.
    pub fn install(&mut self, index: CheckpointIndex) -> Result<(), CheckpointError> {
        if index.volume_blocks != self.index.volume_blocks {
            return Err(CheckpointError::VolumeSize {
                index: index.volume_blocks,
                volume: self.index.volume_blocks,
            });
        }
        let covers = self.pending_covers.take();
        self.staging = None;
        self.recent.retain(|id, _| match &covers {
            Some(c) => !c.contains(id),
            None => *id > index.highest_segment,
        });
        let stale: Vec<u64> =
            self.clean.keys().copied().filter(|p| self.index.pages.get(p) != index.pages.get(p)).collect();
        for page in stale {
            self.evict(page);
        }
        self.highest_sequence = self.highest_sequence.max(index.highest_sequence);
        self.highest_segment = self.highest_segment.max(index.highest_segment);
        self.live = index.live.iter().map(|(s, n)| (*s, *n as i64)).collect();
        self.index = index;
        self.overlay = BlockMap::new(self.index.volume_blocks);
        self.deltas.clear();
        self.unsettled.clear();
        // The pages this attach merged for the checkpoint are its pages
        // (checked: the index records their hash), so they stay loaded,
        // up to the capacity.
        let made = std::mem::take(&mut self.pending_pages);
        for (page, hash) in made.into_iter().take(self.capacity) {
            let i = page.index();
            if self.index.pages.get(&i).is_some_and(|r| r.hash == hash) {
                self.keep_loaded(i, page);
            }
        }
        let recent = std::mem::take(&mut self.recent);
        for (summary, root) in recent.values() {
            // It applied once to a map of this very size, so it applies again.
            self.apply_summary(summary, *root).expect("a summary applied once applies again");
        }
        Ok(())
    }
}

/// `extents` (written, in order, within `start..end`) with the gaps
/// between them as never-written extents.
fn with_gaps(start: u64, end: u64, extents: Vec<Extent>) -> Vec<Extent> {
    let mut out = Vec::with_capacity(extents.len() * 2 + 1);
    let mut cursor = start;
    for e in extents {
        if e.start > cursor {
            out.push(Extent { start: cursor, len: e.start - cursor, first: None });
        }
        cursor = e.start + e.len;
        out.push(e);
    }
    if cursor < end {
        out.push(Extent { start: cursor, len: end - cursor, first: None });
    }
    out
}

/// Joins never-written extents that meet at a page boundary.
fn merge_adjacent(extents: Vec<Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        match out.last_mut() {
            Some(prev) if prev.first.is_none() && e.first.is_none() && prev.start + prev.len == e.start => {
                prev.len += e.len;
            }
            _ => out.push(e),
        }
    }
    out
}
