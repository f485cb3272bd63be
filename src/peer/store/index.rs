//! The store's index entries (redb table `index`, docs/formats.md): which
//! shard a key names, and where its bytes are.

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
