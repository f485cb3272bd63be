//! The map's checkpoint: where every map page lies, reachable from the root.
//!
//! A commit adds only its segments' summaries to the volume's metadata;
//! every so often (LFS style) the writer also writes a **checkpoint**: the
//! pages the summaries since the last one changed (unchanged pages keep
//! their old place) and a new **index** naming, for every non-empty page,
//! where its bytes are and their blake3 hash. An attach reads the index,
//! not the map: a page is fetched when a read first needs it
//! ([`MapCache`](super::cache::MapCache)).
//!
//! **Everything is reachable from the MAC'd root.** The root record's
//! [`CheckpointRef`](super::root::CheckpointRef) names the segment (with
//! its segment root) and the blocks holding the index's **head**; the head
//! names the segments (with their roots) and blocks of the index's
//! continuation, if it did not fit in the head, and the hash of the whole
//! index; the index names the segments (with their roots) holding pages,
//! and each page's hash. So block proofs check every fetched block against
//! a root the reader trusts, and the hashes check the decrypted bytes end
//! to end: a page or index from another checkpoint, another place or a
//! forger is refused by name ([`CheckpointError::PageHash`]).
//!
//! ```text
//! root ──(segment 5.9, root R9, slots 40..41)──▶ head: index length, hash H,
//!                                                  continuation: 5.8 (R8) slots 0..300
//!                                                  inline: index bytes 0..4000
//! index = inline ‖ continuation; blake3(index) = H
//!   pages:    0 → 5.7 slots 0..3   hash h0      segments: 5.7 → R7
//!             3 → 5.7 slots 3..4   hash h3      live:     4.2 → 9000 blocks …
//! ```
//!
//! **An index larger than the head** (a volume with many pages or many
//! live segments) goes on in *continuation extents*: ranges of blocks in
//! segments written before the head's, listed in the head with their
//! segment roots, so they can all be fetched at once (a two-level index,
//! not a chain). The head holds the index's first bytes inline after that
//! list; a small volume's index is its head alone.
//!
//! Pages and continuation blocks lie in segments written before the head's
//! segment, because the index names their segment roots and a segment's
//! root depends on every block in it. They are metadata blocks: "slot"
//! here is a block index in the segment's data area, past the data slots
//! its summary covers.

use std::collections::{BTreeMap, HashMap};

use super::map::{ADDRESS_LIMIT, BlockMap, MapPage, PAGE_BLOCKS, PAGE_HEADER_LEN, RUN_LEN};
use super::reader::{BLOCK, Reader, is_block_padding};
use super::root::{SegmentRef, SegmentRoot};
use crate::codec::sequence::{SegmentId, Sequence};

/// The first four bytes of a checkpoint index.
pub const INDEX_MAGIC: [u8; 4] = *b"MDCI";
/// The first four bytes of a checkpoint head.
pub const HEAD_MAGIC: [u8; 4] = *b"MDCH";
/// The format version (index and head) this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the index header.
pub const INDEX_HEADER_LEN: usize = 48;
/// Bytes of one page entry.
pub const PAGE_ENTRY_LEN: usize = 56;
/// Bytes of one segment entry.
pub const SEGMENT_ENTRY_LEN: usize = 40;
/// Bytes of one live-table entry.
pub const LIVE_ENTRY_LEN: usize = 16;
/// Bytes of the head's fixed part.
pub const HEAD_FIXED_LEN: usize = 64;
/// Bytes of one continuation extent in the head.
pub const CONTINUATION_LEN: usize = 48;
/// Most continuation extents a head may list.
pub const MAX_CONTINUATIONS: u32 = 4096;
/// Most blocks a page's encoding takes: a page of 2^16 one-block runs.
pub const MAX_PAGE_BLOCKS: u32 = (PAGE_HEADER_LEN + RUN_LEN * PAGE_BLOCKS as usize).div_ceil(BLOCK) as u32;

/// Where a range of metadata blocks lies: `blocks` blocks from block
/// `first_slot` of `segment`'s data area.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockRange {
    pub segment: SegmentId,
    pub first_slot: u32,
    pub blocks: u32,
}

/// Where a page lies and what its bytes (padded to whole blocks) hash to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRef {
    pub range: BlockRange,
    pub hash: [u8; 32],
}

/// What a reader needs to fetch and check one page: the blocks, the
/// segment root they must prove against, and the hash of their plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageFetch {
    pub page: u64,
    pub segment: SegmentRef,
    pub first_slot: u32,
    pub blocks: u32,
    pub hash: [u8; 32],
}

/// A page encoded for writing: its bytes padded with zeroes to whole
/// blocks, and their hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBlob {
    pub page: u64,
    pub bytes: Vec<u8>,
    pub hash: [u8; 32],
}

impl PageBlob {
    pub fn of(page: &MapPage) -> Self {
        let mut bytes = page.encode();
        bytes.resize(bytes.len().div_ceil(BLOCK) * BLOCK, 0);
        let hash = *blake3::hash(&bytes).as_bytes();
        Self { page: page.index(), bytes, hash }
    }

    /// Blocks the blob takes (at most [`MAX_PAGE_BLOCKS`]).
    pub fn blocks(&self) -> u32 {
        (self.bytes.len() / BLOCK) as u32
    }
}

/// Every non-empty page of `map`, encoded.
pub fn page_blobs(map: &BlockMap) -> Vec<PageBlob> {
    map.pages().map(PageBlob::of).collect()
}

/// Errors from building, parsing and using a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("map checkpoint {what} truncated: {len} bytes, {need} needed")]
    Truncated { what: &'static str, len: usize, need: usize },
    #[error("not a map checkpoint {what} (magic {found:02x?})")]
    Magic { what: &'static str, found: [u8; 4] },
    #[error("map checkpoint format version {0} is not supported (this meshdisk reads version {VERSION})")]
    Version(u16),
    #[error("map checkpoint {what} has unknown flags {flags:#06x}")]
    Flags { what: &'static str, flags: u16 },
    #[error("map checkpoint {what}: {reason}")]
    Invalid { what: &'static str, reason: &'static str },
    #[error("map checkpoint {what} has {len} bytes after its end that are not zero padding to a 4 KiB block")]
    Trailing { what: &'static str, len: usize },
    #[error(
        "map checkpoint index does not match the hash its head records: altered, or from another checkpoint"
    )]
    IndexHash,
    #[error("map checkpoint continuation {0} has the wrong length")]
    ContinuationLength(usize),
    #[error("map page {0} is not in the checkpoint")]
    UnknownPage(u64),
    #[error(
        "map page {page}: {len} bytes do not match the hash the checkpoint records for it (forged, altered, or from another checkpoint); refused"
    )]
    PageHash { page: u64, len: usize },
    #[error("map page {page}: the checkpoint's bytes for it hold page {found}")]
    PageMismatch { page: u64, found: u64 },
    #[error("map page {page}: {source}")]
    Page { page: u64, source: super::map::MapError },
    #[error("map page {0} placed twice, or not placed")]
    Placement(u64),
    #[error("map checkpoint is for a volume of {index} blocks, not {volume}")]
    VolumeSize { index: u64, volume: u64 },
}

const INDEX: &str = "index";
const HEAD: &str = "head";

/// The index of one checkpoint (see the module doc and docs/formats.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointIndex {
    /// The volume's size in blocks.
    pub volume_blocks: u64,
    /// The highest sequence of an entry the pages include.
    pub highest_sequence: Sequence,
    /// The highest segment id whose summary the pages include: the root's
    /// segments since the checkpoint are the ones above it.
    pub highest_segment: SegmentId,
    /// Every non-empty page, by index.
    pub pages: BTreeMap<u64, PageRef>,
    /// The root of every segment holding pages or live blocks (exactly
    /// those): everything a reader of this checkpoint's map may fetch is
    /// proven against a root it reached from the volume's MAC'd root.
    pub segments: BTreeMap<SegmentId, SegmentRoot>,
    /// Live blocks per segment (segments with none left out).
    pub live: BTreeMap<SegmentId, u64>,
}

impl CheckpointIndex {
    /// The index of an empty map: nothing checkpointed yet.
    pub fn empty(volume_blocks: u64) -> Self {
        Self {
            volume_blocks: volume_blocks.min(ADDRESS_LIMIT),
            highest_sequence: Sequence::ZERO,
            highest_segment: SegmentId::ZERO,
            pages: BTreeMap::new(),
            segments: BTreeMap::new(),
            live: BTreeMap::new(),
        }
    }

    /// The index of a whole map whose pages `place` puts somewhere: it is
    /// given each page's blob and says where the blob lies (its segment,
    /// with that segment's root, and first slot). Returns the index and the
    /// blobs to write. A writer that must know all blobs before it can name
    /// segment roots uses [`page_blobs`] and [`Self::from_placed`].
    pub fn build(
        map: &BlockMap,
        highest_sequence: Sequence,
        highest_segment: SegmentId,
        mut place: impl FnMut(&PageBlob) -> (SegmentRef, u32),
        root_of: impl Fn(SegmentId) -> SegmentRoot,
    ) -> Result<(Self, Vec<PageBlob>), CheckpointError> {
        let blobs = page_blobs(map);
        let placed: Vec<(PageRef, u64, SegmentRoot)> = blobs
            .iter()
            .map(|b| {
                let (segment, first_slot) = place(b);
                let range = BlockRange { segment: segment.id, first_slot, blocks: b.blocks() };
                (PageRef { range, hash: b.hash }, b.page, segment.root)
            })
            .collect();
        let index = Self::from_placed(
            map.blocks(),
            highest_sequence,
            highest_segment,
            placed.into_iter().map(|(r, p, root)| (p, r, root)),
            map.segments().map(|(s, n)| (s, n, root_of(s))),
        )?;
        Ok((index, blobs))
    }

    /// An index from pages already placed (page, where, the root of its
    /// segment) and the live counts (with each segment's root); checks
    /// what the parser checks.
    pub fn from_placed(
        volume_blocks: u64,
        highest_sequence: Sequence,
        highest_segment: SegmentId,
        pages: impl IntoIterator<Item = (u64, PageRef, SegmentRoot)>,
        live: impl IntoIterator<Item = (SegmentId, u64, SegmentRoot)>,
    ) -> Result<Self, CheckpointError> {
        let mut index = Self::empty(volume_blocks);
        index.highest_sequence = highest_sequence;
        index.highest_segment = highest_segment;
        for (page, r, root) in pages {
            if index.pages.insert(page, r).is_some() {
                return Err(CheckpointError::Placement(page));
            }
            if index.segments.insert(r.range.segment, root).is_some_and(|old| old != root) {
                return Err(invalid(INDEX, "one segment placed with two roots"));
            }
        }
        for (segment, n, root) in live {
            if n == 0 {
                continue;
            }
            index.live.insert(segment, n);
            if index.segments.insert(segment, root).is_some_and(|old| old != root) {
                return Err(invalid(INDEX, "one segment listed with two roots"));
            }
        }
        index.validate()?;
        Ok(index)
    }

    /// Checks what the parser checks about the fields.
    pub fn validate(&self) -> Result<(), CheckpointError> {
        let bad = |reason| Err(invalid(INDEX, reason));
        if self.volume_blocks > ADDRESS_LIMIT {
            return bad("volume size past the highest block address");
        }
        let page_count = self.volume_blocks.div_ceil(PAGE_BLOCKS);
        for (&page, r) in &self.pages {
            if page >= page_count {
                return bad("a page past the volume's end");
            }
            let BlockRange { segment, first_slot, blocks } = r.range;
            if blocks == 0 || blocks > MAX_PAGE_BLOCKS {
                return bad("a page of no blocks, or more than a page can take");
            }
            if u64::from(first_slot) + u64::from(blocks) > u64::from(u32::MAX) {
                return bad("a page runs past the last slot");
            }
            if !self.segments.contains_key(&segment) {
                return bad("a page in a segment the index does not list");
            }
        }
        let used: std::collections::BTreeSet<SegmentId> =
            self.pages.values().map(|r| r.range.segment).chain(self.live.keys().copied()).collect();
        if used.len() != self.segments.len() || used.iter().any(|s| !self.segments.contains_key(s)) {
            return bad("a listed segment holds neither a page nor live blocks, or a live one is not listed");
        }
        if self.live.values().any(|&n| n == 0) {
            return bad("a live-table entry of zero blocks");
        }
        let total = self.live.values().try_fold(0u64, |a, &n| a.checked_add(n));
        if total.is_none_or(|t| t > self.volume_blocks) {
            return bad("more live blocks than the volume has");
        }
        Ok(())
    }

    /// What a reader fetches to load `page` (`None`: the page is empty).
    pub fn fetch(&self, page: u64) -> Option<PageFetch> {
        let r = self.pages.get(&page)?;
        let root = *self.segments.get(&r.range.segment)?;
        Some(PageFetch {
            page,
            segment: SegmentRef { id: r.range.segment, root },
            first_slot: r.range.first_slot,
            blocks: r.range.blocks,
            hash: r.hash,
        })
    }

    /// Checks a page's bytes (what the blocks [`Self::fetch`] named
    /// decrypt to) against the recorded hash, then decodes them.
    pub fn open_page(&self, page: u64, bytes: &[u8]) -> Result<MapPage, CheckpointError> {
        let r = self.pages.get(&page).ok_or(CheckpointError::UnknownPage(page))?;
        if bytes.len() != r.range.blocks as usize * BLOCK
            || blake3::hash(bytes) != blake3::Hash::from_bytes(r.hash)
        {
            return Err(CheckpointError::PageHash { page, len: bytes.len() });
        }
        let decoded = MapPage::decode(bytes).map_err(|source| CheckpointError::Page { page, source })?;
        if decoded.index() != page {
            return Err(CheckpointError::PageMismatch { page, found: decoded.index() });
        }
        let end =
            decoded.runs().last().map(|(off, run)| decoded.base() + u64::from(off) + u64::from(run.len));
        if end.is_none_or(|end| end > self.volume_blocks) {
            return Err(invalid(INDEX, "a page that is empty or past the volume's end"));
        }
        Ok(decoded)
    }

    /// The live counts as a map.
    pub fn live_counts(&self) -> HashMap<SegmentId, u64> {
        self.live.iter().map(|(s, n)| (*s, *n)).collect()
    }

    /// The index's bytes (docs/formats.md), exact: no padding.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(
            INDEX_HEADER_LEN
                + PAGE_ENTRY_LEN * self.pages.len()
                + SEGMENT_ENTRY_LEN * self.segments.len()
                + LIVE_ENTRY_LEN * self.live.len(),
        );
        b.extend_from_slice(&INDEX_MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&self.volume_blocks.to_le_bytes());
        b.extend_from_slice(&self.highest_sequence.raw().to_le_bytes());
        b.extend_from_slice(&self.highest_segment.raw().to_le_bytes());
        b.extend_from_slice(&(self.pages.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.segments.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.live.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for (&page, r) in &self.pages {
            b.extend_from_slice(&page.to_le_bytes());
            b.extend_from_slice(&r.range.segment.raw().to_le_bytes());
            b.extend_from_slice(&r.range.first_slot.to_le_bytes());
            b.extend_from_slice(&r.range.blocks.to_le_bytes());
            b.extend_from_slice(&r.hash);
        }
        for (id, root) in &self.segments {
            b.extend_from_slice(&id.raw().to_le_bytes());
            b.extend_from_slice(&root.0);
        }
        for (id, n) in &self.live {
            b.extend_from_slice(&id.raw().to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
        }
        b
    }

    /// Parses an index, strictly: entries sorted by strictly increasing
    /// key, every field in range, every page's segment listed and every
    /// listed segment holding a page, nothing after the last entry (the
    /// head carries the exact length). Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, CheckpointError> {
        let truncated = |need| CheckpointError::Truncated { what: INDEX, len: bytes.len(), need };
        let mut r = Reader::new(bytes);
        let magic = r.array::<4>().ok_or(truncated(INDEX_HEADER_LEN))?;
        if magic != INDEX_MAGIC {
            return Err(CheckpointError::Magic { what: INDEX, found: magic });
        }
        let version = r.u16().ok_or(truncated(INDEX_HEADER_LEN))?;
        if version != VERSION {
            return Err(CheckpointError::Version(version));
        }
        let (
            Some(flags),
            Some(volume_blocks),
            Some(seq),
            Some(seg),
            Some(np),
            Some(ns),
            Some(nl),
            Some(reserved),
        ) = (r.u16(), r.u64(), r.u64(), r.u64(), r.u32(), r.u32(), r.u32(), r.u32())
        else {
            return Err(truncated(INDEX_HEADER_LEN));
        };
        if flags != 0 {
            return Err(CheckpointError::Flags { what: INDEX, flags });
        }
        if reserved != 0 {
            return Err(invalid(INDEX, "non-zero reserved bytes"));
        }
        let need = INDEX_HEADER_LEN as u64
            + PAGE_ENTRY_LEN as u64 * u64::from(np)
            + SEGMENT_ENTRY_LEN as u64 * u64::from(ns)
            + LIVE_ENTRY_LEN as u64 * u64::from(nl);
        if (bytes.len() as u64) < need {
            return Err(truncated(usize::try_from(need).unwrap_or(usize::MAX)));
        }
        if bytes.len() as u64 > need {
            return Err(CheckpointError::Trailing { what: INDEX, len: (bytes.len() as u64 - need) as usize });
        }
        let mut index = Self::empty(volume_blocks);
        if volume_blocks > ADDRESS_LIMIT {
            return Err(invalid(INDEX, "volume size past the highest block address"));
        }
        index.highest_sequence = Sequence::from_raw(seq);
        index.highest_segment = SegmentId::from_raw(seg);
        let short = || truncated(need as usize);
        let mut last: Option<u64> = None;
        for _ in 0..np {
            let (Some(page), Some(segment), Some(first_slot), Some(blocks), Some(hash)) =
                (r.u64(), r.u64(), r.u32(), r.u32(), r.array::<32>())
            else {
                return Err(short());
            };
            if last.is_some_and(|l| page <= l) {
                return Err(invalid(INDEX, "pages not in strictly increasing order"));
            }
            last = Some(page);
            let range = BlockRange { segment: SegmentId::from_raw(segment), first_slot, blocks };
            index.pages.insert(page, PageRef { range, hash });
        }
        let mut last: Option<u64> = None;
        for _ in 0..ns {
            let (Some(id), Some(root)) = (r.u64(), r.array::<32>()) else {
                return Err(short());
            };
            if last.is_some_and(|l| id <= l) {
                return Err(invalid(INDEX, "segments not in strictly increasing order"));
            }
            last = Some(id);
            index.segments.insert(SegmentId::from_raw(id), SegmentRoot(root));
        }
        let mut last: Option<u64> = None;
        for _ in 0..nl {
            let (Some(id), Some(n)) = (r.u64(), r.u64()) else {
                return Err(short());
            };
            if last.is_some_and(|l| id <= l) {
                return Err(invalid(INDEX, "live table not in strictly increasing order"));
            }
            last = Some(id);
            index.live.insert(SegmentId::from_raw(id), n);
        }
        index.validate()?;
        Ok(index)
    }
}

fn invalid(what: &'static str, reason: &'static str) -> CheckpointError {
    CheckpointError::Invalid { what, reason }
}

/// One continuation extent of an index: blocks in a segment written
/// before the head's, with that segment's root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Continuation {
    pub segment: SegmentRef,
    pub first_slot: u32,
    pub blocks: u32,
}

/// The checkpoint's head: what the root record's checkpoint blocks hold.
/// The index is `inline ‖ continuation 0 ‖ continuation 1 ‖ …`, each
/// continuation full but the last, which holds the rest (more than its
/// blocks less one, so no extent is wasted) followed by zero padding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexHead {
    /// Bytes of the whole index.
    pub length: u64,
    /// blake3 of the whole index.
    pub hash: [u8; 32],
    pub continuations: Vec<Continuation>,
    /// The index's first bytes.
    pub inline: Vec<u8>,
}

impl IndexHead {
    /// The head of `index` (its bytes) when the blocks `continuations`
    /// name hold all but the first `inline_len` bytes; returns the head
    /// and the bytes each continuation holds (unpadded).
    pub fn split(
        index: &[u8],
        inline_len: usize,
        continuations: Vec<Continuation>,
    ) -> Result<(Self, Vec<Vec<u8>>), CheckpointError> {
        let inline_len = inline_len.min(index.len());
        let mut rest = &index[inline_len..];
        let mut parts = Vec::with_capacity(continuations.len());
        for (i, c) in continuations.iter().enumerate() {
            let cap = c.blocks as usize * BLOCK;
            let take = if i + 1 == continuations.len() { rest.len() } else { cap };
            if take > cap || take == 0 || take <= cap.saturating_sub(BLOCK) || rest.len() < take {
                return Err(CheckpointError::ContinuationLength(i));
            }
            parts.push(rest[..take].to_vec());
            rest = &rest[take..];
        }
        if !rest.is_empty() {
            return Err(CheckpointError::ContinuationLength(continuations.len()));
        }
        let head = Self {
            length: index.len() as u64,
            hash: *blake3::hash(index).as_bytes(),
            continuations,
            inline: index[..inline_len].to_vec(),
        };
        head.validate()?;
        Ok((head, parts))
    }

    /// The head alone holding the whole index.
    pub fn inline(index: &[u8]) -> Self {
        Self::split(index, index.len(), Vec::new()).expect("an inline head is always valid").0
    }

    fn validate(&self) -> Result<(), CheckpointError> {
        let bad = |reason| Err(invalid(HEAD, reason));
        if self.continuations.len() > MAX_CONTINUATIONS as usize {
            return bad("too many continuation extents");
        }
        let rest = self.length.checked_sub(self.inline.len() as u64);
        let Some(rest) = rest else { return bad("inline bytes longer than the index") };
        let mut left = rest;
        for (i, c) in self.continuations.iter().enumerate() {
            if c.blocks == 0 || u64::from(c.first_slot) + u64::from(c.blocks) > u64::from(u32::MAX) {
                return bad("a continuation of no blocks, or past the last slot");
            }
            let cap = u64::from(c.blocks) * BLOCK as u64;
            let last = i + 1 == self.continuations.len();
            let take = if last { left } else { cap };
            if take > cap || take <= cap - BLOCK as u64 || left < take {
                return bad("continuation lengths do not add up to the index");
            }
            left -= take;
        }
        if left != 0 {
            return bad("continuation lengths do not add up to the index");
        }
        Ok(())
    }

    /// Bytes of the continuation `i` holds (before its padding).
    pub fn continuation_len(&self, i: usize) -> Option<usize> {
        let c = self.continuations.get(i)?;
        let full = c.blocks as usize * BLOCK;
        if i + 1 < self.continuations.len() {
            return Some(full);
        }
        let before: u64 = self.continuations[..i].iter().map(|c| u64::from(c.blocks) * BLOCK as u64).sum();
        usize::try_from(self.length - self.inline.len() as u64 - before).ok()
    }

    /// The head's bytes (docs/formats.md), padded with zeroes to whole blocks.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(
            HEAD_FIXED_LEN + CONTINUATION_LEN * self.continuations.len() + self.inline.len(),
        );
        b.extend_from_slice(&HEAD_MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&(self.continuations.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.length.to_le_bytes());
        b.extend_from_slice(&(self.inline.len() as u64).to_le_bytes());
        b.extend_from_slice(&self.hash);
        for c in &self.continuations {
            b.extend_from_slice(&c.segment.id.raw().to_le_bytes());
            b.extend_from_slice(&c.segment.root.0);
            b.extend_from_slice(&c.first_slot.to_le_bytes());
            b.extend_from_slice(&c.blocks.to_le_bytes());
        }
        b.extend_from_slice(&self.inline);
        b.resize(b.len().div_ceil(BLOCK) * BLOCK, 0);
        b
    }

    /// Parses a head, strictly (the bytes may be followed by zero padding
    /// to a whole block). Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, CheckpointError> {
        let truncated = |need| CheckpointError::Truncated { what: HEAD, len: bytes.len(), need };
        let mut r = Reader::new(bytes);
        let magic = r.array::<4>().ok_or(truncated(HEAD_FIXED_LEN))?;
        if magic != HEAD_MAGIC {
            return Err(CheckpointError::Magic { what: HEAD, found: magic });
        }
        let version = r.u16().ok_or(truncated(HEAD_FIXED_LEN))?;
        if version != VERSION {
            return Err(CheckpointError::Version(version));
        }
        let (Some(flags), Some(count), Some(reserved), Some(length), Some(inline_len), Some(hash)) =
            (r.u16(), r.u32(), r.u32(), r.u64(), r.u64(), r.array::<32>())
        else {
            return Err(truncated(HEAD_FIXED_LEN));
        };
        if flags != 0 {
            return Err(CheckpointError::Flags { what: HEAD, flags });
        }
        if reserved != 0 {
            return Err(invalid(HEAD, "non-zero reserved bytes"));
        }
        if count > MAX_CONTINUATIONS {
            return Err(invalid(HEAD, "too many continuation extents"));
        }
        let need = (HEAD_FIXED_LEN + CONTINUATION_LEN * count as usize) as u64 + inline_len;
        if (bytes.len() as u64) < need {
            return Err(truncated(usize::try_from(need).unwrap_or(usize::MAX)));
        }
        let mut continuations = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let (Some(id), Some(root), Some(first_slot), Some(blocks)) =
                (r.u64(), r.array::<32>(), r.u32(), r.u32())
            else {
                return Err(truncated(need as usize));
            };
            let segment = SegmentRef { id: SegmentId::from_raw(id), root: SegmentRoot(root) };
            continuations.push(Continuation { segment, first_slot, blocks });
        }
        let inline = r.take(inline_len as usize).ok_or(truncated(need as usize))?.to_vec();
        if !is_block_padding(r.position(), r.rest()) {
            return Err(CheckpointError::Trailing { what: HEAD, len: r.rest().len() });
        }
        let head = Self { length, hash, continuations, inline };
        head.validate()?;
        Ok(head)
    }

    /// The index from the head and its continuations' bytes (each as
    /// fetched: its blocks, padding included), checked against the hash.
    pub fn assemble(&self, parts: &[&[u8]]) -> Result<CheckpointIndex, CheckpointError> {
        if parts.len() != self.continuations.len() {
            return Err(CheckpointError::ContinuationLength(parts.len().min(self.continuations.len())));
        }
        let mut index = self.inline.clone();
        for (i, part) in parts.iter().enumerate() {
            let c = &self.continuations[i];
            let len = self.continuation_len(i).ok_or(CheckpointError::ContinuationLength(i))?;
            if part.len() != c.blocks as usize * BLOCK || part[len..].iter().any(|&b| b != 0) {
                return Err(CheckpointError::ContinuationLength(i));
            }
            index.extend_from_slice(&part[..len]);
        }
        if index.len() as u64 != self.length || blake3::hash(&index) != blake3::Hash::from_bytes(self.hash) {
            return Err(CheckpointError::IndexHash);
        }
        CheckpointIndex::decode(&index)
    }
}
