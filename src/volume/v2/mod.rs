//! The volume (issue 12's design, the one `attach` and `demo` serve): its
//! pure core (sequences, the block map, segment summaries and the root
//! record, no I/O), its local side (the [`log`](log::LocalLog), the
//! write-back buffer, and the [`block cache`](blocks::BlockCache) of clean
//! blocks, both holding the segments' ciphertext on the attaching machine),
//! and the wiring that serves NBD from them and commits to the cluster.
//!
//! **Writes are versioned, not placed.** Every block write (and every TRIM
//! or WRITE_ZEROES) gets a [`Sequence`](crate::codec::sequence::Sequence): the writer's
//! fencing epoch in the high 24 bits, a counter in the low 40, so a newer
//! writer's sequences are above every older writer's. The block's XTS tweak
//! is (address, sequence), so no two versions of a block share a tweak, and
//! a block moved between segments (compaction, repair) keeps its sequence
//! and its ciphertext.
//!
//! **The map keeps the highest sequence of every block.** A commit packs
//! uncommitted blocks of any addresses into an immutable segment and writes its
//! [`Summary`](summary::Summary): which address each slot holds, with which
//! sequence, and the trims committed with it. The [`BlockMap`](map::BlockMap)
//! is the result of applying summaries (and, on the attaching machine, the
//! local log); since "highest sequence wins" is a maximum, the order in
//! which entries are applied and repeats do not matter. The map is
//! checkpointed as [`MapPage`](map::MapPage)s (2^16 blocks each) so it can
//! be paged, and it counts each segment's live blocks, which compaction
//! needs. A [`CheckpointIndex`](checkpoint::CheckpointIndex) says where
//! each page lies and what it hashes to; the [`MapCache`](cache::MapCache)
//! keeps a bounded number of pages in memory with the summaries since the
//! checkpoint on top, and asks its caller for the pages it lacks.
//!
//! **One root reaches everything.** The [`RootRecord`](root::RootRecord)
//! names the latest checkpoint and the segments written since, each with
//! the one 32-byte root its shards verify against, and carries a MAC keyed
//! from the volume key. A commit stores its segments, then swaps the root
//! at the directory by compare-and-set; the attach folder remembers the
//! newest root it has seen ([`Freshness`](root::Freshness)) and refuses an
//! older one.
//!
//! **Each range's redundancy is visible.** The [`health_map`] walks a
//! range's blocks to the segments holding their newest versions and asks
//! the directory how those segments stand: NBD's `meshdisk:health`
//! context (`nbdinfo --map=meshdisk:health`).
//!
//! A small example, two writers one after the other:
//!
//! ```text
//! epoch 3 writes blocks 10..12   sequences 3.1, 3.2    segment 3.1 slots 0, 1
//! epoch 3 trims  block  11       sequence  3.3         (in segment 3.2's summary)
//! root: commit 8, highest 3.3, since [3.1, 3.2]
//! epoch 4 (the next attach) writes block 10: sequence 4.1 > 3.3, segment 4.1 slot 0
//! map: 10 → segment 4.1 slot 0 @4.1, 11 → zero @3.3;
//!      segment 3.1 has 0 live blocks left, whatever order 3.1, 3.2 and 4.1
//!      are applied in
//! ```

mod ahead;
mod attach;
pub mod blocks;
pub mod cache;
pub mod checkpoint;
pub mod checkpoint_layout;
mod commit;
pub mod compaction;
mod compactor;
pub mod health_map;
mod io;
mod keeper;
pub mod layout;
pub mod lineage;
pub mod local;
pub mod log;
pub mod map;
mod placed;
mod readahead;
mod reader;
pub mod remote;
pub mod root;
pub mod summary;
mod volume;

pub use attach::AttachError;
pub use compactor::reserve_bytes;
pub use remote::Timing;
pub use volume::{Config, TrafficReport, Volume};

#[cfg(test)]
mod blocks_tests;
#[cfg(test)]
mod checkpoint_tests;
#[cfg(test)]
mod log_tests;
#[cfg(test)]
mod tests;
