//! What the local log holds, indexed: the newest local version of every
//! block, and the writes a commit has yet to carry to the peers.
//!
//! The index is a [`BlockMap`] whose "segments" are log records (record
//! number as the id, block in the record as the slot), so it keeps the
//! highest sequence of every block as the committed map does, and a read
//! takes the higher of the two: a local write newer than the last commit
//! wins, a commit from the log's own writes ties (same sequence, same
//! bytes) and the local copy is read, a block the log no longer holds
//! comes from the committed map.
//!
//! ```text
//! write  sequence allocated (in flight) ─► log append ─► insert: index +
//!        queue, no longer in flight (one step, under one lock)
//! commit take(): the queue, and the watermark W: every sequence ≤ W is
//!        in the queue taken or in an earlier commit (a write still in
//!        flight holds W below its sequence)
//!        current(): the parts of a queued write no newer write replaced
//! ```

use std::collections::{BTreeMap, HashMap};

use super::log::LogPos;
use super::map::{BlockMap, Entry, Extent, MapError, Mapping, Target};
use crate::codec::sequence::{SegmentId, Sequence};

/// A write the next commit carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queued {
    /// Blocks `address..address + blocks` in log record `record`, block i
    /// with sequence `sequence + i`.
    Write { record: u64, address: u64, blocks: u64, sequence: Sequence },
    /// Blocks `address..address + blocks` zeroed at `sequence`.
    Zero { address: u64, blocks: u64, sequence: Sequence },
}

impl Queued {
    /// Blocks it holds (a zeroed range counts as one).
    fn blocks(&self) -> u64 {
        match *self {
            Queued::Write { blocks, .. } => blocks,
            Queued::Zero { .. } => 1,
        }
    }

    fn first(&self) -> Sequence {
        match *self {
            Queued::Write { sequence, .. } | Queued::Zero { sequence, .. } => sequence,
        }
    }
}

/// A piece of a queued write that is still the newest version of its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Current {
    /// Blocks `address..address + blocks`, from block `first` of `record`.
    Write {
        record: u64,
        first: u32,
        address: u64,
        blocks: u64,
        sequence: Sequence,
    },
    Zero {
        address: u64,
        blocks: u64,
        sequence: Sequence,
    },
}

/// Where a block's local version is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalBlock {
    /// Block `block` of the record at `pos`.
    Log {
        pos: LogPos,
        block: u32,
    },
    Zero,
}

/// See the module doc.
pub struct LocalIndex {
    map: BlockMap,
    /// Record number → where it is.
    records: HashMap<u64, LogPos>,
    next_record: u64,
    queue: Vec<Queued>,
    /// Blocks in `queue` (a zeroed range counts as one).
    queue_blocks: u64,
    /// First sequences of the writes in flight (allocated, not inserted).
    in_flight: BTreeMap<Sequence, usize>,
}

fn record_id(record: u64) -> SegmentId {
    SegmentId::from_raw(record)
}

impl LocalIndex {
    pub fn new(blocks: u64) -> Self {
        Self {
            map: BlockMap::new(blocks),
            records: HashMap::new(),
            next_record: 1,
            queue: Vec::new(),
            queue_blocks: 0,
            in_flight: BTreeMap::new(),
        }
    }

    /// A write of sequences from `first` is under way.
    pub fn begin(&mut self, first: Sequence) {
        *self.in_flight.entry(first).or_default() += 1;
    }

    /// The write begun at `first` ended without being inserted (failed).
    pub fn abandon(&mut self, first: Sequence) {
        if let Some(n) = self.in_flight.get_mut(&first) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(&first);
            }
        }
    }

    /// Records the write at `pos` (begun at `sequence`), queues it for the
    /// next commit unless `committed` (a replayed record a root already
    /// holds), and ends its flight.
    pub fn insert_write(
        &mut self,
        pos: LogPos,
        address: u64,
        blocks: u64,
        sequence: Sequence,
        committed: bool,
    ) -> Result<(), MapError> {
        let record = self.next_record;
        let entry =
            Entry::Data { start: address, len: blocks, segment: record_id(record), slot: 0, sequence };
        self.map.check(&entry)?;
        self.next_record += 1;
        self.records.insert(record, pos);
        self.map.apply(&entry)?;
        let q = Queued::Write { record, address, blocks, sequence };
        if !committed {
            self.queue.push(q);
            self.queue_blocks += blocks;
        }
        self.abandon(sequence);
        Ok(())
    }

    /// [`Self::insert_write`] for zeroes.
    pub fn insert_zero(
        &mut self,
        address: u64,
        blocks: u64,
        sequence: Sequence,
        committed: bool,
    ) -> Result<(), MapError> {
        self.map.apply(&Entry::Zero { start: address, len: blocks, sequence })?;
        if !committed {
            self.queue.push(Queued::Zero { address, blocks, sequence });
            self.queue_blocks += 1;
        }
        self.abandon(sequence);
        Ok(())
    }

    /// Writes waiting for a commit.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Blocks waiting for a commit (a zeroed range counts as one).
    pub fn queued_blocks(&self) -> u64 {
        self.queue_blocks
    }

    /// The oldest part of the queue, up to about `max_blocks` blocks (at
    /// least one write), for a commit, and the watermark it reaches: every
    /// sequence up to it is in what is returned or was committed before.
    /// `last` is the last sequence allocated.
    pub fn take(&mut self, last: Sequence, max_blocks: u64) -> (Vec<Queued>, Sequence) {
        let mut blocks = 0;
        let mut n = 0;
        for q in &self.queue {
            let b = q.blocks();
            if n > 0 && blocks + b > max_blocks {
                break;
            }
            blocks += b;
            n += 1;
        }
        let rest = self.queue.split_off(n);
        let taken = std::mem::replace(&mut self.queue, rest);
        self.queue_blocks -= blocks;
        let below = self
            .in_flight
            .keys()
            .next()
            .copied()
            .into_iter()
            .chain(self.queue.iter().map(Queued::first))
            .min();
        let watermark = match below {
            Some(first) => Sequence::from_raw(first.raw() - 1),
            None => last,
        };
        (taken, watermark)
    }

    /// Puts back what a failed commit took, ahead of what came since.
    pub fn untake(&mut self, mut taken: Vec<Queued>) {
        self.queue_blocks += taken.iter().map(Queued::blocks).sum::<u64>();
        taken.append(&mut self.queue);
        self.queue = taken;
    }

    /// The parts of the writes `taken` (one commit's) that no other write
    /// of `taken` replaced. A write replaced only by one still queued is
    /// carried too: the commit claims its watermark for it, and the newer
    /// write may not be committed before a crash.
    pub fn current_among(&self, taken: &[Queued]) -> Vec<Current> {
        let mut map = BlockMap::new(self.map.blocks());
        for q in taken {
            let entry = match *q {
                Queued::Write { record, address, blocks, sequence } => {
                    Entry::Data { start: address, len: blocks, segment: record_id(record), slot: 0, sequence }
                }
                Queued::Zero { address, blocks, sequence } => {
                    Entry::Zero { start: address, len: blocks, sequence }
                }
            };
            map.apply(&entry).expect("a queued write was a valid entry");
        }
        taken.iter().flat_map(|q| Self::current_in(&map, q)).collect()
    }

    /// The parts of `q` that are still the newest local version.
    pub fn current(&self, q: &Queued) -> Vec<Current> {
        Self::current_in(&self.map, q)
    }

    fn current_in(map: &BlockMap, q: &Queued) -> Vec<Current> {
        let (address, blocks) = match *q {
            Queued::Write { address, blocks, .. } | Queued::Zero { address, blocks, .. } => (address, blocks),
        };
        let mut out = Vec::new();
        for e in map.lookup_range(address, blocks) {
            let Some(first) = e.first else { continue };
            match (*q, first.target) {
                (Queued::Write { record, address: a, sequence, .. }, Target::Data { segment, slot })
                    if segment == record_id(record)
                        && Some(first.sequence) == sequence.checked_add(e.start - a) =>
                {
                    out.push(Current::Write {
                        record,
                        first: slot,
                        address: e.start,
                        blocks: e.len,
                        sequence: first.sequence,
                    });
                }
                (Queued::Zero { sequence, .. }, Target::Zero) if first.sequence == sequence => {
                    out.push(Current::Zero { address: e.start, blocks: e.len, sequence });
                }
                _ => {}
            }
        }
        out
    }

    /// Where record `record` is.
    pub fn record(&self, record: u64) -> Option<LogPos> {
        self.records.get(&record).copied()
    }

    /// The local versions of blocks `start..start + len`: extents, with
    /// the log position of each data extent's first block.
    pub fn lookup(&self, start: u64, len: u64) -> Vec<(Extent, Option<LocalBlock>)> {
        self.map
            .lookup_range(start, len)
            .into_iter()
            .map(|e| {
                let at = e.first.map(|m| self.locate(m));
                (e, at)
            })
            .collect()
    }

    fn locate(&self, m: Mapping) -> LocalBlock {
        match m.target {
            Target::Zero => LocalBlock::Zero,
            Target::Data { segment, slot } => {
                LocalBlock::Log { pos: self.records[&segment.raw()], block: slot }
            }
        }
    }

    /// Forgets the records of log files `kept` says are gone (released):
    /// their blocks are committed, and read from the committed map now.
    /// Queued writes are never in a released file.
    pub fn forget_files(&mut self, kept: impl Fn(u32) -> bool) {
        if self.records.values().all(|p| kept(p.file)) {
            return;
        }
        let mut map = BlockMap::new(self.map.blocks());
        for e in self.map.extents() {
            let keep = match e.first.map(|m| m.target) {
                Some(Target::Data { segment, .. }) => kept(self.records[&segment.raw()].file),
                Some(Target::Zero) => true,
                None => false,
            };
            if keep && let Some(entry) = e.entry() {
                map.apply(&entry).expect("an extent of a valid map applies");
            }
        }
        self.records.retain(|_, p| kept(p.file));
        self.map = map;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(c: u64) -> Sequence {
        Sequence::new(1, c).unwrap()
    }

    fn pos(file: u32, offset: u32) -> LogPos {
        LogPos { file, offset }
    }

    #[test]
    fn a_newer_write_replaces_the_older_in_what_a_commit_carries() {
        let mut x = LocalIndex::new(1000);
        x.begin(seq(1));
        x.insert_write(pos(1, 0), 10, 4, seq(1), false).unwrap(); // 10..14 @1..4
        x.begin(seq(5));
        x.insert_write(pos(1, 100), 12, 1, seq(5), false).unwrap(); // 12 @5
        x.begin(seq(6));
        x.insert_zero(13, 10, seq(6), false).unwrap(); // 13..23 @6
        let (q, w) = x.take(seq(6), u64::MAX);
        assert_eq!(w, seq(6));
        assert_eq!(q.len(), 3);
        assert_eq!(
            x.current(&q[0]),
            vec![Current::Write { record: 1, first: 0, address: 10, blocks: 2, sequence: seq(1) }]
        );
        assert_eq!(
            x.current(&q[1]),
            vec![Current::Write { record: 2, first: 0, address: 12, blocks: 1, sequence: seq(5) }]
        );
        assert_eq!(x.current(&q[2]), vec![Current::Zero { address: 13, blocks: 10, sequence: seq(6) }]);
        assert_eq!(x.queued(), 0);
    }

    #[test]
    fn a_write_in_flight_holds_the_watermark_below_it() {
        let mut x = LocalIndex::new(1000);
        x.begin(seq(1));
        x.begin(seq(2));
        x.insert_write(pos(1, 0), 0, 1, seq(2), false).unwrap();
        let (q, w) = x.take(seq(2), u64::MAX);
        assert_eq!(q.len(), 1);
        assert_eq!(w, Sequence::from_raw(seq(1).raw() - 1), "sequence 1 is still in flight");
        x.insert_write(pos(1, 50), 5, 1, seq(1), false).unwrap();
        let (q, w) = x.take(seq(2), u64::MAX);
        assert_eq!(q.len(), 1);
        assert_eq!(w, seq(2));
        // A partial take holds the watermark below what it left.
        x.begin(seq(7));
        x.insert_write(pos(1, 60), 7, 3, seq(7), false).unwrap();
        x.begin(seq(10));
        x.insert_write(pos(1, 70), 9, 3, seq(10), false).unwrap();
        let (q, w) = x.take(seq(12), 3);
        assert_eq!(q.len(), 1);
        assert_eq!(w, seq(9));
        let (q, w) = x.take(seq(12), 3);
        assert_eq!(q.len(), 1);
        assert_eq!(w, seq(12));
        // A failed write ends its flight too.
        x.begin(seq(13));
        x.abandon(seq(13));
        assert_eq!(x.take(seq(13), u64::MAX).1, seq(13));
    }

    #[test]
    fn a_write_replaced_only_by_one_left_queued_is_carried_by_its_commit() {
        let mut x = LocalIndex::new(1000);
        x.begin(seq(1));
        x.insert_write(pos(1, 0), 10, 2, seq(1), false).unwrap(); // 10..12 @1,2
        x.begin(seq(3));
        x.insert_write(pos(1, 100), 10, 1, seq(3), false).unwrap(); // 10 @3
        // The commit takes only the first write (a bounded take).
        let (taken, w) = x.take(seq(3), 2);
        assert_eq!(taken.len(), 1);
        assert_eq!(w, seq(2), "the watermark covers the first write");
        // Its block 10 is replaced by a write left queued: still carried.
        assert_eq!(
            x.current_among(&taken),
            vec![Current::Write { record: 1, first: 0, address: 10, blocks: 2, sequence: seq(1) }]
        );
        assert_eq!(x.current(&taken[0]).len(), 1, "the local view sees only block 11 as current");
    }

    #[test]
    fn released_files_are_forgotten_and_untaken_writes_come_first() {
        let mut x = LocalIndex::new(1000);
        x.begin(seq(1));
        x.insert_write(pos(1, 0), 0, 2, seq(1), false).unwrap();
        x.begin(seq(3));
        x.insert_write(pos(2, 0), 1, 2, seq(3), false).unwrap();
        let (taken, _) = x.take(seq(3), u64::MAX);
        x.begin(seq(5));
        x.insert_zero(50, 1, seq(5), false).unwrap();
        x.untake(taken);
        let (q, _) = x.take(seq(5), u64::MAX);
        assert!(matches!(q[0], Queued::Write { record: 1, .. }) && matches!(q[2], Queued::Zero { .. }));
        x.forget_files(|f| f >= 2);
        let found = x.lookup(0, 3);
        assert_eq!(found[0].0.first, None, "block 0 was only in file 1");
        assert_eq!(found[1].1, Some(LocalBlock::Log { pos: pos(2, 0), block: 0 }));
    }
}
