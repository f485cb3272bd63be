//! Segments and their shards: what a volume stores on the peers.
//!
//! A **segment** is written once and never modified. Its data area is
//! `k × blocks_per_shard` encrypted 4 KiB blocks, laid out shard-major, so
//! data shard `i` holds data-area blocks `[i·n, (i+1)·n)` and one block lives
//! whole in one data shard at a known offset. `m` parity shards of the same
//! size are Reed-Solomon over the data shards (on ciphertext: nothing here
//! needs a key).
//!
//! ```text
//! data area (k·n blocks) ──split──► k data payloads ──RS──► m parity payloads
//!                                         │                       │
//!                      shard root = blake3(payload) of each of the k + m
//!                                         │
//!   segment root = blake3("meshdisk segment root v1" ‖ volume ‖ segment ‖
//!                         k ‖ m ‖ n ‖ all k + m shard roots)
//!
//! shard = header (volume, segment, index, k, m, n, all k + m shard roots)
//!       ‖ payload (n × 4 KiB)
//! ```
//!
//! Every shard carries the roots of all its siblings, so a shard verifies
//! ALONE against the 32-byte segment root: its header hashes to the segment
//! root, and its payload hashes to its own root in that header
//! ([`verify_shard`]). Repair, scrub and rebuild need only that root
//! ([`rebuild`]). A shard's root is the ordinary blake3 hash of its payload,
//! and blake3 is a tree: [`tree`] keeps the tree's inner hashes beside a
//! shard (the outboard) and proves any range of its 4 KiB blocks against the
//! same root, so a 4 KiB read fetches 4 KiB plus a few hashes
//! ([`prove`], [`verify_blocks`]).
//!
//! Files: [`header`] is the byte format and its strict parser, [`code`] the
//! erasure coding (encode and keyless rebuild), [`tree`] the verified range
//! reads. The layouts are drawn in docs/formats.md ("Segment shard").

pub mod code;
pub mod header;
pub mod tree;

use std::fmt;

use super::erasure::{ErasureError, GeometryError, MAX_DATA_SHARDS, MAX_PARITY_SHARDS, MAX_SHARD_SIZE};
use super::key::VOLUME_ID_LEN;

pub use code::{EncodedSegment, Rebuilt, SegmentCodec, data_shards, encode_segment, rebuild};
pub use header::{
    SegmentShardHeader, header_len, parse_header, parse_segment_shard, segment_root, verify_header,
    verify_shard,
};
pub use tree::{ShardOutboard, prove, prove_range, verify_blocks};

/// Every block of the volume, and of a segment, is this many bytes.
pub const BLOCK_SIZE: usize = 4096;
/// Most blocks in one shard (16 MiB, the erasure code's largest shard).
pub const MAX_BLOCKS_PER_SHARD: u32 = (MAX_SHARD_SIZE / BLOCK_SIZE) as u32;

/// A volume's id, as in every other format.
pub type VolumeId = [u8; VOLUME_ID_LEN];

/// A segment's id: unique in its volume, never reused, allocated as
/// (epoch:24 | counter:40) by the volume ([`crate::codec::sequence`]).
pub use crate::codec::sequence::SegmentId;

/// Which segment shard: volume, segment, index in the segment. What a peer
/// stores a segment shard under; ordered by volume, segment, index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct SegmentShardKey {
    pub volume: VolumeId,
    /// On the wire as its raw `u64` (every `u64` is a valid id).
    #[serde(with = "segment_id_raw")]
    pub segment: SegmentId,
    pub index: u8,
}

impl SegmentShardKey {
    pub fn of(h: &SegmentShardHeader) -> Self {
        Self { volume: h.volume_id, segment: h.segment, index: h.index }
    }
}

/// serde for a [`SegmentId`] as its raw number, so the id type itself need
/// not know serde.
mod segment_id_raw {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::SegmentId;

    pub fn serialize<S: Serializer>(id: &SegmentId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(id.raw())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SegmentId, D::Error> {
        Ok(SegmentId::from_raw(u64::deserialize(d)?))
    }
}

/// A segment's shape: k data shards, m parity shards, `blocks_per_shard`
/// 4 KiB blocks in each. Valid by construction (the erasure code's limits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SegmentGeometry {
    k: u8,
    m: u8,
    blocks_per_shard: u32,
}

impl SegmentGeometry {
    pub fn new(k: usize, m: usize, blocks_per_shard: u32) -> Result<Self, SegmentError> {
        if !(1..=MAX_DATA_SHARDS).contains(&k) {
            return Err(GeometryError::DataShards(k).into());
        }
        if m > MAX_PARITY_SHARDS {
            return Err(GeometryError::ParityShards(m).into());
        }
        if !(1..=MAX_BLOCKS_PER_SHARD).contains(&blocks_per_shard) {
            return Err(SegmentError::BlocksPerShard(blocks_per_shard));
        }
        Ok(Self { k: k as u8, m: m as u8, blocks_per_shard })
    }

    /// Data shards.
    pub fn k(&self) -> usize {
        usize::from(self.k)
    }

    /// Parity shards.
    pub fn m(&self) -> usize {
        usize::from(self.m)
    }

    /// All shards, k + m.
    pub fn shards(&self) -> usize {
        self.k() + self.m()
    }

    pub fn blocks_per_shard(&self) -> u32 {
        self.blocks_per_shard
    }

    /// Bytes of one shard's payload.
    pub fn shard_len(&self) -> usize {
        self.blocks_per_shard as usize * BLOCK_SIZE
    }

    /// Blocks in the data area, k × blocks per shard.
    pub fn data_blocks(&self) -> u64 {
        self.k() as u64 * u64::from(self.blocks_per_shard)
    }

    /// Bytes of the data area, k × shard length.
    pub fn data_area_len(&self) -> usize {
        self.k() * self.shard_len()
    }

    /// Where data-area block `block` lives: (data shard, block in that
    /// shard). `None` past the data area.
    pub fn locate(&self, block: u64) -> Option<(usize, u32)> {
        if block >= self.data_blocks() {
            return None;
        }
        let n = u64::from(self.blocks_per_shard);
        Some(((block / n) as usize, (block % n) as u32))
    }

    /// The same shape for the erasure code.
    pub(crate) fn erasure(&self) -> super::erasure::Geometry {
        super::erasure::Geometry::new(self.k(), self.m(), self.shard_len())
            .expect("segment geometry is within the erasure code's limits")
    }
}

/// blake3 of one shard's payload: the root of its hash tree.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ShardRoot(pub [u8; 32]);

impl ShardRoot {
    pub fn of(payload: &[u8]) -> Self {
        Self(*blake3::hash(payload).as_bytes())
    }

    /// True if `payload` hashes to this root (constant-time compare).
    pub fn matches(&self, payload: &[u8]) -> bool {
        blake3::hash(payload) == blake3::Hash::from_bytes(self.0)
    }
}

/// The one hash a segment's every shard verifies against.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SegmentRoot(pub [u8; 32]);

macro_rules! hex_debug {
    ($t:ident) => {
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({}…)"), &hex::encode(self.0)[..16])
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }
    };
}
hex_debug!(ShardRoot);
hex_debug!(SegmentRoot);

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("segment shard truncated: {len} bytes, at least {need} needed")]
    Truncated { len: usize, need: usize },
    #[error("not a meshdisk segment shard (magic {0:02x?}, expected \"MDSG\")")]
    BadMagic([u8; 4]),
    #[error(
        "segment shard format version {0} is not supported (this meshdisk reads version {v}); upgrade meshdisk",
        v = header::VERSION
    )]
    UnsupportedVersion(u16),
    #[error("segment shard header has unknown flags {0:#04x}")]
    Flags(u8),
    #[error("segment shard header has non-zero reserved bytes (offsets 40..48)")]
    ReservedBytes,
    #[error("segment geometry: {0}")]
    Geometry(#[from] GeometryError),
    #[error("blocks per shard must be 1 to {MAX_BLOCKS_PER_SHARD}, got {0}")]
    BlocksPerShard(u32),
    #[error("shard index {index} is out of range for k={k} m={m}")]
    Index { index: u8, k: u8, m: u8 },
    #[error("segment shard header length {got} is wrong: k={k} m={m} need {expected}")]
    HeaderLength { got: u16, expected: usize, k: u8, m: u8 },
    #[error("segment shard header lists {got} shard roots, k + m = {expected}")]
    RootCount { got: usize, expected: usize },
    #[error("segment shard payload is {actual} bytes, its header says {expected}")]
    PayloadSize { expected: usize, actual: usize },
    #[error("segment shard header does not match the segment root (wrong segment, or altered)")]
    SegmentRootMismatch,
    #[error("shard {index}'s payload does not match its root (corrupt or altered)")]
    ShardRootMismatch { index: u8 },
    #[error("expected shard {expected} of the segment, got shard {got}")]
    WrongIndex { expected: usize, got: u8 },
    #[error("segment data area is {actual} bytes, the geometry needs {expected}")]
    DataAreaSize { expected: usize, actual: usize },
    #[error("expected {expected} shard positions (k + m), got {got}")]
    ShardCount { expected: usize, got: usize },
    #[error("{verified} shards verify, {needed} are needed to rebuild the segment")]
    TooFewShards { verified: usize, needed: usize },
    #[error("the segment's shards have geometry {found:?}, this codec is for {codec:?}")]
    GeometryMismatch { codec: SegmentGeometry, found: SegmentGeometry },
    #[error("rebuilt shard {index} does not match its root (erasure decoding went wrong)")]
    RebuildMismatch { index: usize },
    #[error("erasure coding: {0}")]
    Erasure(#[from] ErasureError),
    #[error("block range {start}..{end} is not a non-empty range within the shard's {blocks} blocks")]
    BlockRange { start: u32, end: u32, blocks: u32 },
    #[error("shard outboard is {actual} bytes, {expected} expected for {blocks} blocks")]
    OutboardSize { expected: usize, actual: usize, blocks: u32 },
    #[error("the stored shard or its outboard does not match the shard root (corrupt local copy)")]
    OutboardMismatch,
    #[error("block proof does not match the shard root (corrupt, altered, or for another range)")]
    ProofMismatch,
    #[error("block proof is truncated")]
    ProofTruncated,
    #[error("block proof has {0} bytes after its end")]
    ProofTrailing(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_limits_reuse_the_erasure_codes() {
        let g = SegmentGeometry::new(4, 2, 256).unwrap();
        assert_eq!((g.k(), g.m(), g.shards(), g.blocks_per_shard()), (4, 2, 6, 256));
        assert_eq!((g.shard_len(), g.data_area_len(), g.data_blocks()), (1 << 20, 4 << 20, 1024));
        assert!(SegmentGeometry::new(1, 0, 1).is_ok());
        assert!(SegmentGeometry::new(64, 32, MAX_BLOCKS_PER_SHARD).is_ok());
        assert!(matches!(
            SegmentGeometry::new(0, 2, 1),
            Err(SegmentError::Geometry(GeometryError::DataShards(0)))
        ));
        assert!(matches!(
            SegmentGeometry::new(65, 2, 1),
            Err(SegmentError::Geometry(GeometryError::DataShards(65)))
        ));
        assert!(matches!(
            SegmentGeometry::new(4, 33, 1),
            Err(SegmentError::Geometry(GeometryError::ParityShards(33)))
        ));
        assert!(matches!(SegmentGeometry::new(4, 2, 0), Err(SegmentError::BlocksPerShard(0))));
        assert!(matches!(SegmentGeometry::new(4, 2, 4097), Err(SegmentError::BlocksPerShard(4097))));
        let msg = SegmentGeometry::new(4, 2, 0).unwrap_err().to_string();
        assert!(msg.contains("1 to 4096") && msg.contains("got 0"), "{msg}");
    }

    #[test]
    fn a_data_block_lives_in_one_data_shard_shard_major() {
        let g = SegmentGeometry::new(3, 1, 4).unwrap();
        assert_eq!(g.locate(0), Some((0, 0)));
        assert_eq!(g.locate(3), Some((0, 3)));
        assert_eq!(g.locate(4), Some((1, 0)));
        assert_eq!(g.locate(11), Some((2, 3)));
        assert_eq!(g.locate(12), None);
    }
}
