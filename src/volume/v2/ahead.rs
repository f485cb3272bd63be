//! Blocks fetched ahead of a sequential reader, held in memory until read.
//!
//! Read-ahead ([`readahead`](super::readahead)) fetches the next stretch of
//! a stream before it is asked for. Those blocks are read once, soon, and
//! rarely again: putting them in the on-disk [block cache](super::blocks)
//! would cost a disk write, a tag and a disk read per block and push out
//! the blocks that are read again (random reads) — the reason bcache lets
//! sequential I/O bypass its cache. So they wait here, as ciphertext keyed
//! by (address, sequence) like the block cache, and the read that wants one
//! takes it out. Oldest first out past the budget (a fetch nobody read).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

use crate::codec::sequence::Sequence;

/// What a stream's windows can hold at once, with room to spare: 8 streams
/// × 4 MiB windows.
pub const AHEAD_MAX_BYTES: usize = 64 << 20;

#[derive(Default)]
struct Held {
    blocks: HashMap<(u64, Sequence), Bytes>,
    order: VecDeque<(u64, Sequence)>,
    bytes: usize,
}

/// See the module doc.
pub struct FetchedAhead {
    held: Mutex<Held>,
    max: usize,
}

impl FetchedAhead {
    pub fn new(max_bytes: usize) -> Self {
        Self { held: Mutex::new(Held::default()), max: max_bytes }
    }

    /// Holds `ciphertext` of block `address` at `sequence`.
    pub fn hold(&self, address: u64, sequence: Sequence, ciphertext: Bytes) {
        let mut h = self.held.lock().expect("not poisoned");
        h.bytes += ciphertext.len();
        match h.blocks.insert((address, sequence), ciphertext) {
            Some(old) => h.bytes -= old.len(),
            None => h.order.push_back((address, sequence)),
        }
        while h.bytes > self.max {
            let Some(k) = h.order.pop_front() else { break };
            if let Some(b) = h.blocks.remove(&k) {
                h.bytes -= b.len();
            }
        }
        // Taken blocks leave their keys in `order`: drop them before they
        // outnumber what is held.
        if h.order.len() > 2 * h.blocks.len() + 1024 {
            let Held { blocks, order, .. } = &mut *h;
            order.retain(|k| blocks.contains_key(k));
        }
    }

    pub fn contains(&self, address: u64, sequence: Sequence) -> bool {
        self.held.lock().expect("not poisoned").blocks.contains_key(&(address, sequence))
    }

    /// Block `address` at exactly `sequence`, if held; it is no longer held.
    pub fn take(&self, address: u64, sequence: Sequence) -> Option<Bytes> {
        let mut h = self.held.lock().expect("not poisoned");
        let b = h.blocks.remove(&(address, sequence))?;
        h.bytes -= b.len();
        // Its key stays in `order` until pruned or it comes up (then it
        // evicts nothing, or a later hold of the same version early).
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(c: u64) -> Sequence {
        Sequence::new(1, c).unwrap()
    }

    #[test]
    fn a_block_is_taken_once_at_its_exact_sequence_and_the_oldest_go_past_the_budget() {
        let a = FetchedAhead::new(3 * 4096);
        a.hold(1, seq(5), Bytes::from(vec![1; 4096]));
        assert!(a.take(1, seq(6)).is_none(), "another version is never served");
        assert_eq!(a.take(1, seq(5)).unwrap()[0], 1);
        assert!(a.take(1, seq(5)).is_none(), "taken once");
        for i in 0..5u64 {
            a.hold(10 + i, seq(i + 1), Bytes::from(vec![i as u8; 4096]));
        }
        assert_eq!(a.held.lock().unwrap().bytes, 3 * 4096);
        assert!(!a.contains(10, seq(1)) && !a.contains(11, seq(2)));
        assert!(a.contains(12, seq(3)) && a.contains(14, seq(5)));
        // Blocks held and taken forever: the bookkeeping stays bounded.
        for i in 0..10_000u64 {
            a.hold(100 + i, seq(i + 1), Bytes::from(vec![0; 4096]));
            assert!(a.take(100 + i, seq(i + 1)).is_some());
        }
        let h = a.held.lock().unwrap();
        assert!(h.order.len() <= 2 * h.blocks.len() + 1025, "{}", h.order.len());
        assert!(h.bytes <= 3 * 4096);
    }
}
