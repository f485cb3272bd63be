//! The store's index entries (redb tables `index` and `segments`,
//! docs/formats.md): which shard a key names, and where its bytes are.

use crate::codec::segment::{BLOCK_SIZE, SegmentShardKey, ShardOutboard, ShardRoot, VolumeId};
use crate::codec::shard::ShardKey;

/// The store's index key of a shard.
pub(super) struct IndexKey;

impl IndexKey {
    /// Big-endian, so the index sorts by volume, stripe, generation, index.
    pub(super) fn encode(key: &ShardKey) -> [u8; 33] {
        let mut b = [0u8; 33];
        b[..16].copy_from_slice(&key.volume);
        b[16..24].copy_from_slice(&key.stripe.to_be_bytes());
        b[24..32].copy_from_slice(&key.generation.to_be_bytes());
        b[32] = key.index;
        b
    }

    pub(super) fn decode(b: &[u8]) -> Result<ShardKey, String> {
        if b.len() != 33 {
            return Err(format!("corrupt index key of {} bytes", b.len()));
        }
        Ok(ShardKey {
            volume: b[..16].try_into().expect("16 bytes"),
            stripe: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            generation: u64::from_be_bytes(b[24..32].try_into().expect("8 bytes")),
            index: b[32],
        })
    }
}

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

/// Which table an entry lives in, and its key there: stripe shards in
/// `index`, segment shards (second design) in `segments`. The rest of the
/// store (append, group commit, fencing, capacity, delete) is the same for
/// both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Slot {
    Stripe(ShardKey),
    Segment(SegmentShardKey),
}

impl Slot {
    pub(super) fn volume(&self) -> &VolumeId {
        match self {
            Slot::Stripe(k) => &k.volume,
            Slot::Segment(k) => &k.volume,
        }
    }

    /// The entry's key in its table.
    pub(super) fn key(&self) -> Vec<u8> {
        match self {
            Slot::Stripe(k) => IndexKey::encode(k).to_vec(),
            Slot::Segment(k) => SegmentIndexKey::encode(k).to_vec(),
        }
    }

    /// Where the shard's bytes are, from an entry of this slot's table.
    pub(super) fn location(&self, value: &[u8]) -> Result<Location, String> {
        match self {
            Slot::Stripe(_) => Location::decode(value),
            Slot::Segment(_) => SegmentEntry::decode(value).map(|e| e.loc),
        }
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
