//! Where a checkpoint goes in the commit that writes it.
//!
//! A checkpoint is written by an ordinary commit, in segments of its own
//! besides the commit's data segments, in this order (which is also the
//! order of their ids):
//!
//! ```text
//! data segments ─► page segments ─► continuation segments ─► head's segment
//!  (all but the     (0 data slots,   (0 data slots: the       (the last data
//!   last)            map pages)       index, when it does      segment when the
//!                                     not fit in the head)     head fits in its
//!                                                              room, else a
//!                                                              segment of its own)
//! ```
//!
//! Each part names the segment roots of the parts before it (the index
//! names the pages' segments, the head the continuations'), and a
//! segment's root depends on every block in it, so a part's segment is
//! encoded after those it names. Pages are packed in order into segments
//! of the volume's full size; a page larger than that (up to
//! [`MAX_PAGE_BLOCKS`](super::checkpoint::MAX_PAGE_BLOCKS), on a volume
//! of small shards) gets a segment of its own as large as it needs. The
//! index goes inline in the head when the head's segment has room for
//! both; otherwise all of it goes into continuation segments, each full
//! but the last, and the head only lists them.
//!
//! Nothing here does I/O: [`CheckpointLayout::plan`] only counts blocks.

use super::checkpoint::{CONTINUATION_LEN, HEAD_FIXED_LEN};
use super::reader::BLOCK;

/// How many segments a checkpoint takes, and what goes where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointLayout {
    /// The page segments, in write order: the pages each holds (indices
    /// into the blobs planned for), from slot 0 on, in order.
    pub pages: Vec<Vec<usize>>,
    /// Blocks of each continuation extent, one segment each, in index
    /// order (each full but the last); empty: the index is inline.
    pub continuations: Vec<u32>,
    /// Blocks of the head.
    pub head_blocks: u32,
    /// The head goes after the data slots of the commit's last data
    /// segment; otherwise into a segment of its own.
    pub head_with_data: bool,
}

impl CheckpointLayout {
    /// The layout of a checkpoint whose page blobs take `blobs` blocks
    /// each and whose index is `index_len` bytes, in segments holding
    /// `room` metadata blocks at the volume's full size when they hold no
    /// data, after a last data segment with `data_room` blocks to spare
    /// (`None`: the commit has no data segment).
    pub fn plan(blobs: &[u32], index_len: usize, room: u32, data_room: Option<u32>) -> Self {
        let room = room.max(1);
        let mut pages: Vec<Vec<usize>> = Vec::new();
        let mut used = 0u64;
        for (i, &b) in blobs.iter().enumerate() {
            match pages.last_mut() {
                Some(group) if used + u64::from(b) <= u64::from(room) => group.push(i),
                _ => {
                    pages.push(vec![i]);
                    used = 0;
                }
            }
            used += u64::from(b);
        }
        let blocks = |bytes: usize| bytes.div_ceil(BLOCK) as u32;
        let data_room = data_room.unwrap_or(0);
        let inline = blocks(HEAD_FIXED_LEN + index_len);
        if inline <= room.max(data_room) {
            return Self {
                pages,
                continuations: Vec::new(),
                head_blocks: inline,
                head_with_data: inline <= data_room,
            };
        }
        let total = blocks(index_len);
        let continuations: Vec<u32> = (0..total.div_ceil(room)).map(|i| room.min(total - i * room)).collect();
        let head_blocks = blocks(HEAD_FIXED_LEN + CONTINUATION_LEN * continuations.len());
        Self { pages, continuations, head_blocks, head_with_data: head_blocks <= data_room }
    }

    /// Segments the checkpoint adds to the commit.
    pub fn extra_segments(&self) -> usize {
        self.pages.len() + self.continuations.len() + usize::from(!self.head_with_data)
    }

    /// The index's bytes each continuation holds (unpadded), in order.
    pub fn split_index<'a>(&self, index: &'a [u8]) -> Vec<&'a [u8]> {
        let mut rest = index;
        self.continuations
            .iter()
            .map(|&b| {
                let (part, tail) = rest.split_at((b as usize * BLOCK).min(rest.len()));
                rest = tail;
                part
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::sequence::SegmentId;
    use crate::volume::v2::checkpoint::{CheckpointIndex, Continuation, IndexHead};
    use crate::volume::v2::root::{SegmentRef, SegmentRoot};

    #[test]
    fn pages_are_packed_in_order_and_a_large_one_stands_alone() {
        let l = CheckpointLayout::plan(&[3, 4, 2, 20, 1, 9], 1000, 10, Some(5));
        assert_eq!(l.pages, vec![vec![0, 1, 2], vec![3], vec![4, 5]]);
        assert!(l.continuations.is_empty());
        assert_eq!(l.head_blocks, 1);
        assert!(l.head_with_data);
        assert_eq!(l.extra_segments(), 3);
    }

    #[test]
    fn the_head_takes_its_own_segment_when_the_data_has_no_room() {
        let l = CheckpointLayout::plan(&[1], 5000, 10, Some(1));
        assert_eq!((l.head_blocks, l.head_with_data), (2, false));
        assert_eq!(l.extra_segments(), 2);
        let l = CheckpointLayout::plan(&[], 10, 10, None);
        assert!(!l.head_with_data);
        assert_eq!(l.extra_segments(), 1);
    }

    #[test]
    fn a_large_index_goes_into_full_continuations_the_head_names() {
        // 10 blocks and a bit: 4 + 4 + 3 blocks of continuation.
        let index: Vec<u8> = (0..10 * BLOCK + 100).map(|i| i as u8).collect();
        let l = CheckpointLayout::plan(&[], index.len(), 4, Some(2));
        assert_eq!(l.continuations, vec![4, 4, 3]);
        assert_eq!((l.head_blocks, l.head_with_data), (1, true));
        let parts = l.split_index(&index);
        assert_eq!(parts.concat(), index);
        // The split is the one IndexHead::split accepts.
        let conts: Vec<Continuation> = l
            .continuations
            .iter()
            .enumerate()
            .map(|(i, &blocks)| Continuation {
                segment: SegmentRef {
                    id: SegmentId::new(1, 5 + i as u64).unwrap(),
                    root: SegmentRoot([i as u8; 32]),
                },
                first_slot: 0,
                blocks,
            })
            .collect();
        let (head, split) = IndexHead::split(&index, 0, conts).unwrap();
        assert_eq!(split.iter().map(Vec::as_slice).collect::<Vec<_>>(), parts);
        assert_eq!(head.encode().len(), l.head_blocks as usize * BLOCK);
    }

    #[test]
    fn an_index_that_fits_the_head_is_inline() {
        let index = CheckpointIndex::empty(1 << 20).encode();
        let l = CheckpointLayout::plan(&[], index.len(), 4, Some(1));
        assert!(l.continuations.is_empty());
        assert_eq!(IndexHead::inline(&index).encode().len(), l.head_blocks as usize * BLOCK);
        // Exactly at the room's edge, and one byte past it.
        let l = CheckpointLayout::plan(&[], 4 * BLOCK - HEAD_FIXED_LEN, 4, None);
        assert!(l.continuations.is_empty() && l.head_blocks == 4);
        let l = CheckpointLayout::plan(&[], 4 * BLOCK - HEAD_FIXED_LEN + 1, 4, None);
        assert_eq!((l.continuations, l.head_blocks), (vec![4], 1));
    }
}
