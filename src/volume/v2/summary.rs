//! A segment's summary: what the segment's slots hold, and the trims and
//! zeroes committed with it.
//!
//! The summary is the segment's own account of itself, written (encrypted)
//! in its trailing blocks. Applying a segment to the map is applying its
//! summary's entries ([`Summary::apply_to`]), in any order, any number of
//! times (the map keeps the highest sequence of every block). So a commit
//! adds only its segments' summaries to the volume's metadata; the map is
//! rebuilt from the last checkpoint plus the summaries of the segments
//! written since.
//!
//! ```text
//! segment 1.7, 5 data slots:
//!   data  blocks 100..104  slots 0..4  sequences 2.50..2.54
//!   data  block  9         slot  4     sequence  2.55
//!   zero  blocks 0..1024               sequence  2.56
//! ```
//!
//! Every slot `0..slots` holds exactly one block: the parser refuses a
//! summary that leaves a slot out or names one twice.

use super::map::{BlockMap, Entry, MapError};
use super::reader::{Reader, is_block_padding};
use crate::codec::sequence::{SegmentId, Sequence};

/// The first four bytes of an encoded summary.
pub const MAGIC: [u8; 4] = *b"MDSM";
/// The summary format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the summary header.
pub const HEADER_LEN: usize = 24;
/// Bytes of one encoded entry.
pub const ENTRY_LEN: usize = 32;
/// Most data slots a segment may have: 2^20 (4 GiB of 4 KiB blocks).
pub const MAX_SLOTS: u32 = 1 << 20;

const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;

/// One line of a summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SummaryEntry {
    /// Blocks `start..start+len` are in slots `slot..`, with sequences
    /// `sequence..` (each advances by one per block).
    Data { start: u64, len: u64, slot: u32, sequence: Sequence },
    /// Blocks `start..start+len` read as zeroes from `sequence` on.
    Zero { start: u64, len: u64, sequence: Sequence },
}

/// Errors from building or parsing a summary.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SummaryError {
    #[error("segment summary truncated: {len} bytes, {need} needed")]
    Truncated { len: usize, need: usize },
    #[error("not a segment summary (magic {0:02x?}, expected \"MDSM\")")]
    Magic([u8; 4]),
    #[error("segment summary format version {0} is not supported (this meshdisk reads version {VERSION})")]
    Version(u16),
    #[error("segment summary has unknown flags {0:#06x}")]
    Flags(u16),
    #[error("segment summary names {0} data slots, more than {MAX_SLOTS}")]
    Slots(u32),
    #[error("segment summary entry {entry}: {reason}")]
    BadEntry { entry: u32, reason: &'static str },
    #[error("segment summary entry {entry}: {source}")]
    Range { entry: u32, source: MapError },
    #[error("segment summary slot {slot} is named twice")]
    SlotTwice { slot: u32 },
    #[error("segment summary covers {covered} of its {slots} data slots")]
    SlotsUncovered { covered: u64, slots: u32 },
    #[error("segment summary has {0} bytes after its entries that are not zero padding to a 4 KiB block")]
    Trailing(usize),
}

/// What one segment holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub segment: SegmentId,
    /// Data slots in the segment; entries cover each exactly once.
    pub slots: u32,
    pub entries: Vec<SummaryEntry>,
}

impl SummaryEntry {
    /// The map entry this line states for `segment`.
    pub fn to_entry(self, segment: SegmentId) -> Entry {
        match self {
            SummaryEntry::Data { start, len, slot, sequence } => {
                Entry::Data { start, len, segment, slot, sequence }
            }
            SummaryEntry::Zero { start, len, sequence } => Entry::Zero { start, len, sequence },
        }
    }
}

impl Summary {
    /// The map entries the summary states.
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        self.entries.iter().map(|e| e.to_entry(self.segment))
    }

    /// Applies every entry to `map`, or none if one is refused (past the
    /// volume's end); returns the blocks that now map to this summary's
    /// entries.
    pub fn apply_to(&self, map: &mut BlockMap) -> Result<u64, MapError> {
        for entry in self.entries() {
            map.check(&entry)?;
        }
        let mut won = 0;
        for entry in self.entries() {
            won += map.apply(&entry)?.won;
        }
        Ok(won)
    }

    /// Checks what the parser checks: each entry in range, every slot
    /// covered exactly once.
    pub fn validate(&self) -> Result<(), SummaryError> {
        if self.slots > MAX_SLOTS {
            return Err(SummaryError::Slots(self.slots));
        }
        let mut used: Vec<(u32, u64)> = Vec::new();
        for (i, entry) in self.entries().enumerate() {
            let i = i as u32;
            entry.validate().map_err(|source| SummaryError::Range { entry: i, source })?;
            if let Entry::Data { slot, len, .. } = entry {
                if u64::from(slot) + len > u64::from(self.slots) {
                    return Err(SummaryError::BadEntry {
                        entry: i,
                        reason: "slots past the segment's data slots",
                    });
                }
                used.push((slot, len));
            }
        }
        used.sort_unstable();
        let mut next = 0u64;
        for (slot, len) in used {
            if u64::from(slot) < next {
                return Err(SummaryError::SlotTwice { slot });
            }
            if u64::from(slot) > next {
                break;
            }
            next += len;
        }
        if next != u64::from(self.slots) {
            return Err(SummaryError::SlotsUncovered { covered: next, slots: self.slots });
        }
        Ok(())
    }

    /// The summary's bytes (see docs/formats.md).
    ///
    /// # Panics
    /// If the summary is invalid ([`Self::validate`]): writing a summary no
    /// reader accepts is a bug.
    pub fn encode(&self) -> Vec<u8> {
        if let Err(e) = self.validate() {
            panic!("encoding an invalid segment summary: {e}");
        }
        let mut b = Vec::with_capacity(HEADER_LEN + ENTRY_LEN * self.entries.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&self.segment.raw().to_le_bytes());
        b.extend_from_slice(&self.slots.to_le_bytes());
        b.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for entry in &self.entries {
            let (kind, slot, start, len, sequence) = match *entry {
                SummaryEntry::Data { start, len, slot, sequence } => (KIND_DATA, slot, start, len, sequence),
                SummaryEntry::Zero { start, len, sequence } => (KIND_ZERO, 0, start, len, sequence),
            };
            b.extend_from_slice(&[kind, 0, 0, 0]);
            b.extend_from_slice(&slot.to_le_bytes());
            b.extend_from_slice(&start.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(&sequence.raw().to_le_bytes());
        }
        b
    }

    /// Parses a summary, strictly (every check of [`Self::validate`], known
    /// kinds, zero reserved bytes); the bytes may be followed by zero
    /// padding to a whole 4 KiB block. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, SummaryError> {
        let truncated = |need| SummaryError::Truncated { len: bytes.len(), need };
        let mut r = Reader::new(bytes);
        let magic = r.array::<4>().ok_or(truncated(HEADER_LEN))?;
        if magic != MAGIC {
            return Err(SummaryError::Magic(magic));
        }
        let version = r.u16().ok_or(truncated(HEADER_LEN))?;
        if version != VERSION {
            return Err(SummaryError::Version(version));
        }
        let (Some(flags), Some(segment), Some(slots), Some(count)) = (r.u16(), r.u64(), r.u32(), r.u32())
        else {
            return Err(truncated(HEADER_LEN));
        };
        if flags != 0 {
            return Err(SummaryError::Flags(flags));
        }
        if slots > MAX_SLOTS {
            return Err(SummaryError::Slots(slots));
        }
        let need = (count as usize).saturating_mul(ENTRY_LEN).saturating_add(HEADER_LEN);
        if bytes.len() < need {
            return Err(truncated(need));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count {
            let (Some(kind), Some(pad), Some(slot), Some(start), Some(len), Some(seq)) =
                (r.u8(), r.array::<3>(), r.u32(), r.u64(), r.u64(), r.u64())
            else {
                return Err(truncated(need));
            };
            let bad = |reason| SummaryError::BadEntry { entry: i, reason };
            if pad != [0; 3] {
                return Err(bad("non-zero reserved bytes"));
            }
            let sequence = Sequence::from_raw(seq);
            entries.push(match kind {
                KIND_DATA => SummaryEntry::Data { start, len, slot, sequence },
                KIND_ZERO if slot == 0 => SummaryEntry::Zero { start, len, sequence },
                KIND_ZERO => return Err(bad("a zero entry names a slot")),
                _ => return Err(bad("unknown kind")),
            });
        }
        if !is_block_padding(r.position(), r.rest()) {
            return Err(SummaryError::Trailing(r.rest().len()));
        }
        let summary = Summary { segment: SegmentId::from_raw(segment), slots, entries };
        summary.validate()?;
        Ok(summary)
    }
}
