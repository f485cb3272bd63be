//! Compaction: taking back the space that overwritten and trimmed blocks
//! leave in immutable segments, by moving a segment's live blocks into a
//! new segment and freeing the old one.
//!
//! A segment is never rewritten in place, so every overwrite leaves a dead
//! block behind in some older segment; the map counts, per segment, the
//! blocks still live there ([`MapCache::live_blocks`]). Without compaction
//! the space on peers grows with every write; with it, the volume pays in
//! traffic: each block moved is sent to peers again. Issue 13 bounds both,
//! for random 4 KiB overwrites of a volume filled to 70%: the data blocks
//! held stay within 1.43 × the live blocks at every moment, and the blocks
//! sent (user writes and moved blocks) stay within 2 × the user's.
//!
//! - [`policy`] decides, from what the attach knows (each segment's id,
//!   live blocks, capacity, and whether a snapshot pins it), when to
//!   compact and which segments to move: the code the worker calls.
//! - [`sim`] runs that policy on a simulated volume (no I/O, millions of
//!   writes a second) and measures both bounds; its tests check them in
//!   CI, and `meshdisk bench compaction` prints the figures.
//!
//! One round, for a segment of 1000 blocks of which 400 are still live:
//!
//! ```text
//! before  segment 5.7  [a b c . . d . e ...]   400 live of 1000 held
//! move    segment 5.31 [a b c d e ...]         400 written (moved, same
//!                                              sequences, same ciphertext)
//! commit  the map points a..e at 5.31; 5.7 is freed
//! after   400 held for 400 live: 600 blocks freed for 400 sent
//! ```
//!
//! [`MapCache::live_blocks`]: super::cache::MapCache::live_blocks

pub mod policy;
pub mod sim;
