//! The store's index entries (redb table `segments`, docs/formats.md):
//! which shard a key names, where its bytes are, its root and outboard.

use crate::codec::segment::{BLOCK_SIZE, SegmentShardKey, ShardOutboard, ShardRoot};
use crate::codec::sequence::SegmentId;

/// Where a shard's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Location {
    pub(super) data_file: u32,
    pub(super) offset: u64,
    pub(super) len: u32,
}

impl Location {
    pub(super) fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&self.data_file.to_le_bytes());
        b[4..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub(super) fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() != 16 {
            return Err(format!("corrupt index entry of {} bytes", b.len()));
        }
        Ok(Self {
            data_file: u32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
            offset: u64::from_le_bytes(b[4..12].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
        })
    }
}

/// The store's key of a segment shard (table `segments`).
pub(super) struct SegmentIndexKey;

impl SegmentIndexKey {
    /// Volume ‖ segment id (big-endian) ‖ index: one volume's segment
    /// shards sort together, by segment, then index.
    pub(super) fn encode(key: &SegmentShardKey) -> [u8; 25] {
        let mut b = [0u8; 25];
        b[..16].copy_from_slice(&key.volume);
        b[16..24].copy_from_slice(&key.segment.raw().to_be_bytes());
        b[24] = key.index;
        b
    }

    pub(super) fn decode(b: &[u8]) -> Result<SegmentShardKey, String> {
        let b: &[u8; 25] =
            b.try_into().map_err(|_| format!("corrupt segment index key of {} bytes", b.len()))?;
        Ok(SegmentShardKey {
            volume: b[..16].try_into().expect("16 bytes"),
            segment: SegmentId::from_raw(u64::from_be_bytes(b[16..24].try_into().expect("8 bytes"))),
            index: b[24],
        })
    }
}

/// A segment shard's entry: where its bytes are (header + payload, as
/// received), its own root, and its outboard (the hash pairs that prove a
/// block range; `(n − 1) × 64` bytes, so they also give `n`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SegmentEntry {
    pub(super) loc: Location,
    pub(super) outboard: ShardOutboard,
}

impl SegmentEntry {
    /// What follows the location in the entry: root ‖ outboard hashes.
    pub(super) fn tail(outboard: &ShardOutboard) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + outboard.hashes().len());
        b.extend_from_slice(&outboard.root().0);
        b.extend_from_slice(outboard.hashes());
        b
    }

    pub(super) fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < 48 || !(b.len() - 48).is_multiple_of(64) {
            return Err(format!("corrupt segment index entry of {} bytes", b.len()));
        }
        let loc = Location::decode(&b[..16])?;
        let root = ShardRoot(b[16..48].try_into().expect("32 bytes"));
        let blocks = u32::try_from((b.len() - 48) / 64 + 1).map_err(|e| e.to_string())?;
        let outboard = ShardOutboard::from_parts(root, blocks, b[48..].to_vec())
            .map_err(|e| format!("corrupt segment index entry: {e}"))?;
        Ok(Self { loc, outboard })
    }

    /// Blocks in the shard's payload.
    pub(super) fn blocks(&self) -> u32 {
        self.outboard.blocks()
    }

    /// Where the payload starts in the data file: the header is what
    /// precedes the `n` blocks.
    pub(super) fn payload_offset(&self) -> Result<u64, String> {
        let payload = u64::from(self.blocks()) * BLOCK_SIZE as u64;
        let header = u64::from(self.loc.len).checked_sub(payload).ok_or_else(|| {
            format!("corrupt segment index entry: {} bytes cannot hold {payload}", self.loc.len)
        })?;
        Ok(self.loc.offset + header)
    }
}
