//! The block map: for every block address, where its newest version lives.
//!
//! An address maps to a [`Mapping`]: a sequence and either a slot of a
//! segment's data area ([`Target::Data`]) or "reads as zeroes"
//! ([`Target::Zero`], from TRIM or WRITE_ZEROES). An address never written
//! maps to nothing and reads as zeroes too.
//!
//! **The highest sequence wins.** [`BlockMap::apply`] keeps, per block, the
//! mapping with the greatest key `(sequence, zero < data, segment, slot)`;
//! the tie-breaks after the sequence only matter for a block that
//! compaction or repair copied to a newer segment (same sequence, same
//! tweak): the copy in the newer segment wins. Taking a maximum is
//! commutative and idempotent, so applying the same entries in any order,
//! any number of times, gives the same map: replaying a log over summaries,
//! applying segments out of order, or re-applying a segment after a crash
//! is safe by construction.
//!
//! **Runs.** The map is stored as runs in which the address, the slot and
//! the sequence all advance by one per block (a data run), or in which
//! every block has the same sequence (a zero run). A sequential write of a
//! segment's worth of blocks is one run; a random write is one run per
//! block; a TRIM of a whole volume is one run per page. Runs are kept
//! maximal (adjacent runs that continue each other are merged), so the
//! representation of a map is unique: two maps with the same contents are
//! equal as values, and their encodings are equal byte for byte.
//!
//! **Pages.** Runs never cross a [`MapPage`] boundary: page `p` holds the
//! runs of addresses `p·2^16 .. (p+1)·2^16` (256 MiB of volume), encodes
//! to bytes alone and decodes alone, so a checkpoint is a set of pages and
//! a bounded cache of pages can later load the ones a read needs. For the
//! same reason, the per-segment live-block counts (which a checkpoint will
//! store in a table of its own) are kept beside the pages, not in them.
//!
//! ```
//! use meshdisk::volume::v2::map::{BlockMap, Entry, Target};
//! use meshdisk::codec::sequence::{SegmentId, Sequence};
//! let seg = SegmentId::new(1, 1).unwrap();
//! let mut map = BlockMap::new(1 << 20); // a 4 GiB volume
//! // Blocks 100..108 written in slots 0..8 with sequences 1.10 .. 1.17.
//! map.apply(&Entry::Data { start: 100, len: 8, segment: seg, slot: 0, sequence: Sequence::new(1, 10).unwrap() }).unwrap();
//! // A TRIM of 104..106 at 1.20 wins over 1.14 and 1.15 ...
//! map.apply(&Entry::Zero { start: 104, len: 2, sequence: Sequence::new(1, 20).unwrap() }).unwrap();
//! // ... and a late replay of an older write of 104 loses.
//! map.apply(&Entry::Data { start: 104, len: 1, segment: seg, slot: 9, sequence: Sequence::new(1, 3).unwrap() }).unwrap();
//! assert_eq!(map.lookup(104).unwrap().target, Target::Zero);
//! assert_eq!(map.lookup(107).unwrap().target, Target::Data { segment: seg, slot: 7 });
//! assert_eq!(map.live_blocks(seg), 6);
//! ```

use std::collections::{BTreeMap, HashMap};

use super::reader::{Reader, is_block_padding};
use crate::codec::sequence::{SegmentId, Sequence};

/// Log2 of the blocks one page covers.
pub const PAGE_SHIFT: u32 = 16;
/// Blocks one page covers: 2^16 (256 MiB of 4 KiB blocks).
pub const PAGE_BLOCKS: u64 = 1 << PAGE_SHIFT;
/// Data addresses are below 2^63 (metadata blocks use the top bit in their
/// XTS tweak).
pub const ADDRESS_LIMIT: u64 = 1 << 63;

/// The first four bytes of an encoded map page.
pub const PAGE_MAGIC: [u8; 4] = *b"MDMP";
/// The page format version this code writes and reads.
pub const PAGE_VERSION: u16 = 1;
/// Bytes of a page header.
pub const PAGE_HEADER_LEN: usize = 24;
/// Bytes of one encoded run.
pub const RUN_LEN: usize = 32;

const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;

/// Where a block's version lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// In slot `slot` (block index in the data area) of `segment`.
    Data { segment: SegmentId, slot: u32 },
    /// Nowhere: the block reads as zeroes (TRIM, WRITE_ZEROES).
    Zero,
}

/// A block's newest version: its sequence and where it lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    pub sequence: Sequence,
    pub target: Target,
}

impl Mapping {
    /// The total order "highest wins" uses (see the module doc).
    fn key(&self) -> (u64, u8, u64, u32) {
        match self.target {
            Target::Zero => (self.sequence.raw(), 0, 0, 0),
            Target::Data { segment, slot } => (self.sequence.raw(), 1, segment.raw(), slot),
        }
    }

    /// True if this mapping wins over `other` (strictly: equal keys keep
    /// what is there, which makes re-applying an entry a no-op).
    pub fn beats(&self, other: &Mapping) -> bool {
        self.key() > other.key()
    }

    /// The mapping of the block `n` blocks further in the same run.
    fn advance(&self, n: u64) -> Option<Mapping> {
        match self.target {
            Target::Zero => Some(*self),
            Target::Data { segment, slot } => Some(Mapping {
                sequence: self.sequence.checked_add(n)?,
                target: Target::Data { segment, slot: u32::try_from(u64::from(slot).checked_add(n)?).ok()? },
            }),
        }
    }
}

/// One update of the map, as a summary or a log record states it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Entry {
    /// Blocks `start .. start+len` in slots `slot ..` of `segment`, with
    /// sequences `sequence ..`: each advances by one per block.
    Data { start: u64, len: u64, segment: SegmentId, slot: u32, sequence: Sequence },
    /// Blocks `start .. start+len` read as zeroes, all at `sequence`.
    Zero { start: u64, len: u64, sequence: Sequence },
}

impl Entry {
    pub fn start(&self) -> u64 {
        match *self {
            Entry::Data { start, .. } | Entry::Zero { start, .. } => start,
        }
    }

    pub fn len(&self) -> u64 {
        match *self {
            Entry::Data { len, .. } | Entry::Zero { len, .. } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The mapping of the entry's first block.
    pub fn first(&self) -> Mapping {
        match *self {
            Entry::Data { segment, slot, sequence, .. } => {
                Mapping { sequence, target: Target::Data { segment, slot } }
            }
            Entry::Zero { sequence, .. } => Mapping { sequence, target: Target::Zero },
        }
    }

    /// Refuses an empty entry, one past the address limit, and a data entry
    /// whose slots or sequences would overflow.
    pub fn validate(&self) -> Result<(), MapError> {
        let (start, len) = (self.start(), self.len());
        if len == 0 {
            return Err(MapError::EmptyEntry { start });
        }
        if start.checked_add(len).is_none_or(|end| end > ADDRESS_LIMIT) {
            return Err(MapError::AddressRange { start, len });
        }
        if let Entry::Data { slot, sequence, .. } = *self {
            if u64::from(slot) + (len - 1) > u64::from(u32::MAX) {
                return Err(MapError::SlotOverflow { start, len, slot });
            }
            if sequence.checked_add(len - 1).is_none() {
                return Err(MapError::SequenceOverflow { start, len, sequence });
            }
        }
        Ok(())
    }
}

/// Errors from applying entries and from decoding pages.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("map entry at block {start} covers no blocks")]
    EmptyEntry { start: u64 },
    #[error("map entry of {len} blocks at {start} goes past the highest block address 2^63")]
    AddressRange { start: u64, len: u64 },
    #[error("map entry of {len} blocks at {start} from slot {slot} runs past the last slot")]
    SlotOverflow { start: u64, len: u64, slot: u32 },
    #[error(
        "map entry of {len} blocks at {start} from sequence {sequence} runs past its epoch's last sequence"
    )]
    SequenceOverflow { start: u64, len: u64, sequence: Sequence },
    #[error("map entry of {len} blocks at {start} goes past the volume's end ({blocks} blocks)")]
    PastEnd { start: u64, len: u64, blocks: u64 },
    #[error("map page truncated: {len} bytes, {need} needed")]
    PageTruncated { len: usize, need: usize },
    #[error("not a map page (magic {0:02x?}, expected \"MDMP\")")]
    PageMagic([u8; 4]),
    #[error("map page format version {0} is not supported (this meshdisk reads version {PAGE_VERSION})")]
    PageVersion(u16),
    #[error("map page has unknown flags {0:#06x}")]
    PageFlags(u16),
    #[error("map page has non-zero reserved bytes")]
    PageReserved,
    #[error("map page index {0} is past the highest block address")]
    PageIndex(u64),
    #[error("map page has {0} runs, more than the {PAGE_BLOCKS} blocks it covers")]
    RunCount(u32),
    #[error("map page run {run}: {reason}")]
    BadRun { run: u32, reason: &'static str },
    #[error("map page has {0} bytes after its runs that are not zero padding to a 4 KiB block")]
    PageTrailing(usize),
    #[error("map page {0} given twice")]
    DuplicatePage(u64),
}

/// A run of blocks inside one page (see the module doc): `len` blocks
/// whose first maps to `first` and the rest follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub len: u32,
    pub first: Mapping,
}

impl Run {
    /// The mapping of the block `off` blocks into the run. Runs are
    /// validated when made, so this cannot overflow.
    fn at(&self, off: u32) -> Mapping {
        self.first.advance(u64::from(off)).expect("runs are validated when made")
    }

    fn slice(&self, off: u32, len: u32) -> Run {
        Run { len, first: self.at(off) }
    }

    /// True if `next`, starting right after this run, continues it.
    fn continued_by(&self, next: &Run) -> bool {
        self.first.advance(u64::from(self.len)) == Some(next.first)
    }

    /// True if the run's blocks stay in range (slots and sequences).
    fn valid(&self) -> bool {
        self.len >= 1 && self.first.advance(u64::from(self.len) - 1).is_some()
    }
}

/// A contiguous range of addresses with one run's worth of mappings, or
/// never written (`first` is `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
    /// The mapping of `start`; the next blocks follow it as in a [`Run`].
    pub first: Option<Mapping>,
}

impl Extent {
    /// The mapping of block `start + off`.
    pub fn at(&self, off: u64) -> Option<Mapping> {
        self.first.and_then(|m| m.advance(off))
    }

    /// The map entry stating this extent (`None` if never written).
    pub fn entry(&self) -> Option<Entry> {
        let first = self.first?;
        let (start, len, sequence) = (self.start, self.len, first.sequence);
        Some(match first.target {
            Target::Data { segment, slot } => Entry::Data { start, len, segment, slot, sequence },
            Target::Zero => Entry::Zero { start, len, sequence },
        })
    }
}

/// Where the newest version of a block is, by [`newest_runs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Newest {
    /// The local log's (newer than the committed map's, or not in it).
    Local(Mapping),
    /// The committed map's.
    Committed(Mapping),
    /// Never written.
    Never,
}

/// Blocks `first..end` in runs of (blocks, where the newest version of
/// each is), from the local index's extents and the committed map's, each
/// covering exactly that range. The local version wins when it is newer;
/// at one sequence the commit carried it, and the committed one is named.
/// Neighbouring runs are not merged.
pub fn newest_runs(local: &[Extent], committed: &[Extent], first: u64, end: u64) -> Vec<(u64, Newest)> {
    let mut out = Vec::new();
    let (mut li, mut ci) = (0, 0);
    let mut a = first;
    while a < end {
        while local[li].start + local[li].len <= a {
            li += 1;
        }
        while committed[ci].start + committed[ci].len <= a {
            ci += 1;
        }
        let l = local[li].at(a - local[li].start);
        let c = committed[ci].at(a - committed[ci].start);
        let newest = match (l, c) {
            (Some(l), c) if c.is_none_or(|c| l.sequence > c.sequence) => Newest::Local(l),
            (_, Some(c)) => Newest::Committed(c),
            (_, None) => Newest::Never,
        };
        let run_end = (local[li].start + local[li].len).min(committed[ci].start + committed[ci].len).min(end);
        out.push((run_end - a, newest));
        a = run_end;
    }
    out
}

/// The runs of one 2^16-block range of addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapPage {
    index: u64,
    /// Offset in the page → run. Maximal, non-overlapping, within the page.
    runs: BTreeMap<u32, Run>,
}

impl MapPage {
    pub fn new(index: u64) -> Self {
        Self { index, runs: BTreeMap::new() }
    }

    /// Which page holds `address`.
    pub fn index_of(address: u64) -> u64 {
        address >> PAGE_SHIFT
    }

    pub fn index(&self) -> u64 {
        self.index
    }

    /// The first address the page covers.
    pub fn base(&self) -> u64 {
        self.index << PAGE_SHIFT
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The runs, by offset in the page.
    pub fn runs(&self) -> impl Iterator<Item = (u32, &Run)> + '_ {
        self.runs.iter().map(|(&off, run)| (off, run))
    }

    /// The run covering `off`, with its start.
    fn run_at(&self, off: u32) -> Option<(u32, &Run)> {
        let (&start, run) = self.runs.range(..=off).next_back()?;
        (off < start + run.len).then_some((start, run))
    }

    pub fn lookup(&self, off: u32) -> Option<Mapping> {
        self.run_at(off).map(|(start, run)| run.at(off - start))
    }

    /// The written extents of this page within the addresses
    /// `start .. end`, clipped to them, in order (never-written gaps left
    /// out).
    pub fn extents(&self, start: u64, end: u64) -> Vec<Extent> {
        let base = self.base();
        let (lo, hi) = (start.max(base), end.min(base + PAGE_BLOCKS));
        if lo >= hi {
            return Vec::new();
        }
        let off = (lo - base) as u32;
        let from = self.run_at(off).map_or(off, |(s, _)| s);
        let mut out = Vec::new();
        for (&s, run) in self.runs.range(from..) {
            let (rs, re) = (base + u64::from(s), base + u64::from(s) + u64::from(run.len));
            if rs >= hi {
                break;
            }
            let (os, oe) = (rs.max(lo), re.min(hi));
            out.push(Extent { start: os, len: oe - os, first: Some(run.at((os - rs) as u32)) });
        }
        out
    }

    /// Blocks this page maps to each segment.
    pub fn segment_blocks(&self) -> HashMap<SegmentId, u64> {
        let mut counts = HashMap::new();
        for run in self.runs.values() {
            if let Target::Data { segment, .. } = run.first.target {
                *counts.entry(segment).or_default() += u64::from(run.len);
            }
        }
        counts
    }

    /// Applies `new` at offset `lo`; calls `live(segment, delta)` for every
    /// change of a segment's live blocks; returns the blocks `new` won.
    fn apply(&mut self, lo: u32, new: Run, live: &mut impl FnMut(SegmentId, i64)) -> u64 {
        let hi = lo + new.len;
        let mut overlapping: Vec<(u32, Run)> = Vec::new();
        if let Some((start, run)) = self.runs.range(..lo).next_back()
            && start + run.len > lo
        {
            overlapping.push((*start, *run));
        }
        overlapping.extend(self.runs.range(lo..hi).map(|(s, r)| (*s, *r)));
        for (start, _) in &overlapping {
            self.runs.remove(start);
        }
        let mut count = |m: &Mapping, n: u32, sign: i64| {
            if let Target::Data { segment, .. } = m.target {
                live(segment, sign * i64::from(n));
            }
        };
        let mut pieces: Vec<(u32, Run)> = Vec::new();
        let mut won = 0u64;
        let mut cursor = lo;
        for (start, run) in overlapping {
            let end = start + run.len;
            if start < lo {
                pieces.push((start, run.slice(0, lo - start)));
            }
            let (os, oe) = (start.max(lo), end.min(hi));
            if cursor < os {
                let gap = new.slice(cursor - lo, os - cursor);
                count(&gap.first, gap.len, 1);
                won += u64::from(gap.len);
                pieces.push((cursor, gap));
            }
            let old = run.slice(os - start, oe - os);
            let cand = new.slice(os - lo, oe - os);
            // The blocks `cand` wins form a prefix or a suffix of the
            // overlap (both sequences are constant or advance by one, so
            // their difference is monotone; see the module doc).
            let wins = |i: u32| cand.at(i).beats(&old.at(i));
            let n = oe - os;
            let (from, to) = match (wins(0), wins(n - 1)) {
                (true, true) => (0, n),
                (false, false) => (0, 0),
                (true, false) => (0, partition(n, |i| !wins(i))),
                (false, true) => (partition(n, wins), n),
            };
            if from > 0 {
                pieces.push((os, old.slice(0, from)));
            }
            if to > from {
                let (lost, gained) = (old.slice(from, to - from), cand.slice(from, to - from));
                count(&lost.first, lost.len, -1);
                count(&gained.first, gained.len, 1);
                won += u64::from(to - from);
                pieces.push((os + from, gained));
            }
            if to < n {
                pieces.push((os + to, old.slice(to, n - to)));
            }
            if end > hi {
                pieces.push((hi, run.slice(hi - start, end - hi)));
            }
            cursor = oe;
        }
        if cursor < hi {
            let gap = new.slice(cursor - lo, hi - cursor);
            count(&gap.first, gap.len, 1);
            won += u64::from(gap.len);
            pieces.push((cursor, gap));
        }
        for (start, run) in pieces {
            self.runs.insert(start, run);
        }
        self.coalesce(lo, hi);
        won
    }

    /// Merges runs that continue each other between the run before `lo`
    /// and the run at `hi`, keeping runs maximal.
    fn coalesce(&mut self, lo: u32, hi: u32) {
        let from = self.runs.range(..lo).next_back().map_or(lo, |(s, _)| *s);
        let span: Vec<(u32, Run)> = self.runs.range(from..=hi).map(|(s, r)| (*s, *r)).collect();
        let mut merged: Vec<(u32, Run)> = Vec::with_capacity(span.len());
        for (start, run) in span {
            match merged.last_mut() {
                Some((s, prev)) if *s + prev.len == start && prev.continued_by(&run) => {
                    prev.len += run.len;
                    self.runs.remove(&start);
                }
                _ => merged.push((start, run)),
            }
        }
        for (start, run) in merged {
            self.runs.insert(start, run);
        }
    }

    /// The page's bytes: header, then its runs (see docs/formats.md).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(PAGE_HEADER_LEN + RUN_LEN * self.runs.len());
        b.extend_from_slice(&PAGE_MAGIC);
        b.extend_from_slice(&PAGE_VERSION.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&self.index.to_le_bytes());
        b.extend_from_slice(&(self.runs.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for (&off, run) in &self.runs {
            let (kind, slot, segment) = match run.first.target {
                Target::Data { segment, slot } => (KIND_DATA, slot, segment.raw()),
                Target::Zero => (KIND_ZERO, 0, 0),
            };
            b.extend_from_slice(&off.to_le_bytes());
            b.extend_from_slice(&run.len.to_le_bytes());
            b.extend_from_slice(&[kind, 0, 0, 0]);
            b.extend_from_slice(&slot.to_le_bytes());
            b.extend_from_slice(&run.first.sequence.raw().to_le_bytes());
            b.extend_from_slice(&segment.to_le_bytes());
        }
        b
    }

    /// Parses a page, strictly: every field in range, runs sorted, within
    /// the page, not overlapping and maximal (so `decode(encode(p)) == p`
    /// and `encode(decode(b))` is `b` without its padding). The bytes may
    /// be followed by zero padding to a whole 4 KiB block. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, MapError> {
        let truncated = |need| MapError::PageTruncated { len: bytes.len(), need };
        let mut r = Reader::new(bytes);
        let magic = r.array::<4>().ok_or(truncated(PAGE_HEADER_LEN))?;
        if magic != PAGE_MAGIC {
            return Err(MapError::PageMagic(magic));
        }
        let version = r.u16().ok_or(truncated(PAGE_HEADER_LEN))?;
        if version != PAGE_VERSION {
            return Err(MapError::PageVersion(version));
        }
        let flags = r.u16().ok_or(truncated(PAGE_HEADER_LEN))?;
        let index = r.u64().ok_or(truncated(PAGE_HEADER_LEN))?;
        let count = r.u32().ok_or(truncated(PAGE_HEADER_LEN))?;
        let reserved = r.u32().ok_or(truncated(PAGE_HEADER_LEN))?;
        if flags != 0 {
            return Err(MapError::PageFlags(flags));
        }
        if reserved != 0 {
            return Err(MapError::PageReserved);
        }
        if index >= ADDRESS_LIMIT >> PAGE_SHIFT {
            return Err(MapError::PageIndex(index));
        }
        if u64::from(count) > PAGE_BLOCKS {
            return Err(MapError::RunCount(count));
        }
        let need = PAGE_HEADER_LEN + RUN_LEN * count as usize;
        if bytes.len() < need {
            return Err(truncated(need));
        }
        let mut page = MapPage::new(index);
        let mut prev: Option<(u32, Run)> = None;
        for i in 0..count {
            let bad = |reason| MapError::BadRun { run: i, reason };
            let (Some(off), Some(len), Some(kind), Some(pad), Some(slot), Some(seq), Some(segment)) =
                (r.u32(), r.u32(), r.u8(), r.array::<3>(), r.u32(), r.u64(), r.u64())
            else {
                return Err(truncated(need));
            };
            let target = match kind {
                KIND_DATA => Target::Data { segment: SegmentId::from_raw(segment), slot },
                KIND_ZERO if slot == 0 && segment == 0 => Target::Zero,
                KIND_ZERO => return Err(bad("a zero run names a slot or a segment")),
                _ => return Err(bad("unknown kind")),
            };
            if pad != [0; 3] {
                return Err(bad("non-zero reserved bytes"));
            }
            let run = Run { len, first: Mapping { sequence: Sequence::from_raw(seq), target } };
            if !run.valid() {
                return Err(bad("empty, or its slots or sequences overflow"));
            }
            if u64::from(off) + u64::from(len) > PAGE_BLOCKS {
                return Err(bad("runs past the end of the page"));
            }
            if let Some((ps, pr)) = prev {
                if off < ps + pr.len {
                    return Err(bad("overlaps or precedes the run before it"));
                }
                if off == ps + pr.len && pr.continued_by(&run) {
                    return Err(bad("continues the run before it (runs are stored merged)"));
                }
            }
            prev = Some((off, run));
            page.runs.insert(off, run);
        }
        if !is_block_padding(r.position(), r.rest()) {
            return Err(MapError::PageTrailing(r.rest().len()));
        }
        Ok(page)
    }
}

/// The first index `i` in `0..n` for which `past(i)` holds, given that it
/// is false then true (monotone) and `past(n - 1)` holds.
fn partition(n: u32, past: impl Fn(u32) -> bool) -> u32 {
    let (mut lo, mut hi) = (0, n - 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if past(mid) { hi = mid } else { lo = mid + 1 }
    }
    lo
}

/// What one [`BlockMap::apply`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Blocks of the entry that now map to it.
    pub won: u64,
    /// Segments that lost live blocks to the entry, and how many each.
    pub released: Vec<(SegmentId, u64)>,
}

/// The whole block map of a volume of `blocks` blocks: pages by index,
/// and live blocks per segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMap {
    /// Entries past the volume's end are refused: a summary that says
    /// otherwise is damaged, and a huge TRIM must not make pages without
    /// end.
    blocks: u64,
    pages: BTreeMap<u64, MapPage>,
    live: HashMap<SegmentId, u64>,
}

impl BlockMap {
    /// An empty map (nothing written) of a volume of `blocks` blocks (at
    /// most 2^63).
    pub fn new(blocks: u64) -> Self {
        Self { blocks: blocks.min(ADDRESS_LIMIT), pages: BTreeMap::new(), live: HashMap::new() }
    }

    /// The volume's size in blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// A map made of whole pages (a loaded checkpoint); live counts are
    /// recomputed from the pages.
    pub fn from_pages(blocks: u64, pages: impl IntoIterator<Item = MapPage>) -> Result<Self, MapError> {
        let mut map = Self::new(blocks);
        for page in pages {
            if let Some((off, run)) = page.runs.iter().next_back() {
                let (start, len) = (page.base() + u64::from(*off), u64::from(run.len));
                if start + len > map.blocks {
                    return Err(MapError::PastEnd { start, len, blocks: map.blocks });
                }
            }
            for (_, run) in page.runs() {
                if let Target::Data { segment, .. } = run.first.target {
                    *map.live.entry(segment).or_default() += u64::from(run.len);
                }
            }
            let index = page.index;
            if page.is_empty() {
                continue;
            }
            if map.pages.insert(index, page).is_some() {
                return Err(MapError::DuplicatePage(index));
            }
        }
        Ok(map)
    }

    /// Refuses an entry [`Self::apply`] would refuse ([`Entry::validate`],
    /// or past the volume's end), without applying it.
    pub fn check(&self, entry: &Entry) -> Result<(), MapError> {
        entry.validate()?;
        let (start, len) = (entry.start(), entry.len());
        if start + len > self.blocks {
            return Err(MapError::PastEnd { start, len, blocks: self.blocks });
        }
        Ok(())
    }

    /// Applies one entry: every block takes it if it beats the block's
    /// current mapping (see the module doc).
    pub fn apply(&mut self, entry: &Entry) -> Result<Applied, MapError> {
        self.check(entry)?;
        let mut applied = Applied::default();
        let (mut address, end) = (entry.start(), entry.start() + entry.len());
        let mut first = entry.first();
        let live = &mut self.live;
        let mut on_live = |segment: SegmentId, delta: i64| {
            let n = live.entry(segment).or_default();
            *n = n.checked_add_signed(delta).expect("live counts follow the map");
            if *n == 0 {
                live.remove(&segment);
            }
            if delta < 0 {
                match applied.released.iter_mut().find(|(s, _)| *s == segment) {
                    Some((_, n)) => *n += delta.unsigned_abs(),
                    None => applied.released.push((segment, delta.unsigned_abs())),
                }
            }
        };
        let mut won = 0;
        while address < end {
            let index = MapPage::index_of(address);
            let off = (address & (PAGE_BLOCKS - 1)) as u32;
            let len = (end - address).min(PAGE_BLOCKS - u64::from(off));
            let run = Run { len: len as u32, first };
            let page = self.pages.entry(index).or_insert_with(|| MapPage::new(index));
            won += page.apply(off, run, &mut on_live);
            address += len;
            first = first.advance(len).unwrap_or(first);
        }
        applied.won = won;
        Ok(applied)
    }

    /// The mapping of `address`, or `None` if it was never written.
    pub fn lookup(&self, address: u64) -> Option<Mapping> {
        let page = self.pages.get(&MapPage::index_of(address))?;
        page.lookup((address & (PAGE_BLOCKS - 1)) as u32)
    }

    /// The extents covering `start .. start+len` exactly, in order, never
    /// written ranges included (with `first: None`).
    pub fn lookup_range(&self, start: u64, len: u64) -> Vec<Extent> {
        let end = start.saturating_add(len).min(ADDRESS_LIMIT);
        let mut out = Vec::new();
        let mut cursor = start;
        let push_gap = |out: &mut Vec<Extent>, from: u64, to: u64| {
            if from < to {
                out.push(Extent { start: from, len: to - from, first: None });
            }
        };
        if start >= end {
            return out;
        }
        for (&index, page) in self.pages.range(MapPage::index_of(start)..=MapPage::index_of(end - 1)) {
            let base = index << PAGE_SHIFT;
            let lo = start.max(base) - base;
            // Runs overlapping [lo, end): the one covering lo, then those after.
            let first = page.run_at(lo as u32).map(|(s, _)| s).unwrap_or(lo as u32);
            for (&s, run) in page.runs.range(first..) {
                let (rs, re) = (base + u64::from(s), base + u64::from(s) + u64::from(run.len));
                if rs >= end {
                    break;
                }
                let (os, oe) = (rs.max(cursor), re.min(end));
                if os >= oe {
                    continue;
                }
                push_gap(&mut out, cursor, os);
                out.push(Extent { start: os, len: oe - os, first: Some(run.at((os - rs) as u32)) });
                cursor = oe;
            }
        }
        push_gap(&mut out, cursor, end);
        out
    }

    /// Every written extent (data or zero), in address order.
    pub fn extents(&self) -> impl Iterator<Item = Extent> + '_ {
        self.pages.values().flat_map(|page| {
            let base = page.base();
            page.runs().map(move |(off, run)| Extent {
                start: base + u64::from(off),
                len: u64::from(run.len),
                first: Some(run.first),
            })
        })
    }

    /// Blocks the map still reaches in `segment`.
    pub fn live_blocks(&self, segment: SegmentId) -> u64 {
        self.live.get(&segment).copied().unwrap_or(0)
    }

    /// Every segment the map reaches, with its live blocks (any order).
    pub fn segments(&self) -> impl Iterator<Item = (SegmentId, u64)> + '_ {
        self.live.iter().map(|(s, n)| (*s, *n))
    }

    /// The pages (the checkpoint's content), by index.
    pub fn pages(&self) -> impl Iterator<Item = &MapPage> + '_ {
        self.pages.values().filter(|p| !p.is_empty())
    }

    /// The page holding `index`, if any run is in it.
    pub fn page(&self, index: u64) -> Option<&MapPage> {
        self.pages.get(&index).filter(|p| !p.is_empty())
    }
}
