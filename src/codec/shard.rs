//! The shard format: what a peer stores and sends, header then payload.
//!
//! A shard is one of a stripe's k + m pieces: a header of [`HEADER_LEN`]
//! bytes that says whose and which piece it is, then the payload (ciphertext
//! for a data shard, parity for a parity shard). All integers are
//! little-endian. The byte-by-byte layout is drawn in docs/formats.md:
//!
//! ```text
//!  0  magic "MDSH"        4   44 payload length      4
//!  4  format version (1)  2   48 payload hash       32  blake3(payload)
//!  6  header length (96)  2   80 reserved (zero)     8
//!  8  volume id          16   88 header check        8  blake3(bytes 0..88)[..8]
//! 24  stripe index        8
//! 32  generation          8
//! 40  shard index         1
//! 41  k                   1
//! 42  m                   1
//! 43  flags (zero)        1
//! ```
//!
//! The payload hash is plain blake3, not keyed: peers hold no key but
//! verify every shard on write and on read, and the directory's stripe map
//! records the same hash, so a peer that returns an old or altered shard is
//! caught by whoever reads it. The header check catches a damaged header
//! before any field of it is trusted. [`ShardHeader::parse`] is strict:
//! every malformed header is a typed [`ShardError`], never a panic (fuzzed
//! by `fuzz/fuzz_targets/shard_header.rs`).

use std::fmt;

use super::erasure::{GeometryError, MAX_DATA_SHARDS, MAX_PARITY_SHARDS, MAX_SHARD_SIZE, SHARD_ALIGN};
use super::key::VOLUME_ID_LEN;

/// The first four bytes of every shard.
pub const MAGIC: [u8; 4] = *b"MDSH";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 96;

const CHECKED_LEN: usize = 88;

/// blake3 of a shard's payload.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ShardHash(pub [u8; 32]);

impl ShardHash {
    pub fn of(payload: &[u8]) -> Self {
        Self(*blake3::hash(payload).as_bytes())
    }

    /// True if `payload` hashes to this value (constant-time compare).
    pub fn matches(&self, payload: &[u8]) -> bool {
        blake3::hash(payload) == blake3::Hash::from_bytes(self.0)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for ShardHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShardHash({}…)", &self.to_hex()[..16])
    }
}

impl fmt::Display for ShardHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Everything a shard says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    pub volume_id: [u8; VOLUME_ID_LEN],
    pub stripe: u64,
    pub generation: u64,
    /// 0..k are data shards, k..k+m parity shards.
    pub index: u8,
    pub k: u8,
    pub m: u8,
    pub payload_len: u32,
    pub payload_hash: ShardHash,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("shard truncated: {len} bytes, at least {need} needed")]
    Truncated { len: usize, need: usize },
    #[error("not a meshdisk shard (magic {0:02x?}, expected \"MDSH\")")]
    BadMagic([u8; 4]),
    #[error(
        "shard format version {0} is not supported (this meshdisk reads version {VERSION}); upgrade meshdisk"
    )]
    UnsupportedVersion(u16),
    #[error("shard header length {0} is wrong for format version {VERSION} (expected {HEADER_LEN})")]
    HeaderLength(u16),
    #[error("shard header is damaged (header check mismatch)")]
    HeaderCheck,
    #[error("shard header has unknown flags {0:#04x}")]
    Flags(u8),
    #[error("shard header has non-zero reserved bytes (offsets 80..88)")]
    ReservedBytes,
    #[error("shard header geometry: {0}")]
    Geometry(#[from] GeometryError),
    #[error("shard index {index} is out of range for k={k} m={m}")]
    Index { index: u8, k: u8, m: u8 },
    #[error("shard payload length {0} is not a positive multiple of {SHARD_ALIGN} up to {MAX_SHARD_SIZE}")]
    PayloadLength(u32),
    #[error("shard payload is {actual} bytes, header says {header}")]
    PayloadSize { header: u32, actual: usize },
    #[error("shard payload does not match its hash (corrupt or altered)")]
    HashMismatch,
}

impl ShardHeader {
    /// Checks the fields' ranges (everything except the payload).
    pub fn validate(&self) -> Result<(), ShardError> {
        // In the order docs/formats.md gives: k and m, index, payload length.
        let (k, m) = (usize::from(self.k), usize::from(self.m));
        if !(1..=MAX_DATA_SHARDS).contains(&k) {
            return Err(GeometryError::DataShards(k).into());
        }
        if m > MAX_PARITY_SHARDS {
            return Err(GeometryError::ParityShards(m).into());
        }
        if usize::from(self.index) >= k + m {
            return Err(ShardError::Index { index: self.index, k: self.k, m: self.m });
        }
        let len = self.payload_len as usize;
        if len == 0 || !len.is_multiple_of(SHARD_ALIGN) || len > MAX_SHARD_SIZE {
            return Err(ShardError::PayloadLength(self.payload_len));
        }
        Ok(())
    }

    /// The header's bytes.
    ///
    /// # Panics
    /// If the header is invalid ([`Self::validate`]); writing a shard no
    /// reader accepts is a bug.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        if let Err(e) = self.validate() {
            panic!("encoding an invalid shard header: {e}");
        }
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        b[8..24].copy_from_slice(&self.volume_id);
        b[24..32].copy_from_slice(&self.stripe.to_le_bytes());
        b[32..40].copy_from_slice(&self.generation.to_le_bytes());
        b[40] = self.index;
        b[41] = self.k;
        b[42] = self.m;
        b[43] = 0; // flags
        b[44..48].copy_from_slice(&self.payload_len.to_le_bytes());
        b[48..80].copy_from_slice(&self.payload_hash.0);
        // 80..88 reserved, zero.
        let check = header_check(&b[..CHECKED_LEN]);
        b[CHECKED_LEN..HEADER_LEN].copy_from_slice(&check);
        b
    }

    /// Parses and checks a header from the first [`HEADER_LEN`] bytes of
    /// `bytes` (anything after is ignored; see [`parse_shard`]).
    pub fn parse(bytes: &[u8]) -> Result<Self, ShardError> {
        if bytes.len() < 8 {
            return Err(ShardError::Truncated { len: bytes.len(), need: HEADER_LEN });
        }
        let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(ShardError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(ShardError::UnsupportedVersion(version));
        }
        let header_len = u16::from_le_bytes([bytes[6], bytes[7]]);
        if usize::from(header_len) != HEADER_LEN {
            return Err(ShardError::HeaderLength(header_len));
        }
        if bytes.len() < HEADER_LEN {
            return Err(ShardError::Truncated { len: bytes.len(), need: HEADER_LEN });
        }
        let b = &bytes[..HEADER_LEN];
        if header_check(&b[..CHECKED_LEN]) != b[CHECKED_LEN..HEADER_LEN] {
            return Err(ShardError::HeaderCheck);
        }
        if b[43] != 0 {
            return Err(ShardError::Flags(b[43]));
        }
        if b[80..88].iter().any(|&x| x != 0) {
            return Err(ShardError::ReservedBytes);
        }
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let header = Self {
            volume_id: b[8..24].try_into().expect("16 bytes"),
            stripe: u64_at(24),
            generation: u64_at(32),
            index: b[40],
            k: b[41],
            m: b[42],
            payload_len: u32::from_le_bytes(b[44..48].try_into().expect("4 bytes")),
            payload_hash: ShardHash(b[48..80].try_into().expect("32 bytes")),
        };
        header.validate()?;
        Ok(header)
    }

    /// Checks that `payload` is this shard's: its length and its hash.
    pub fn verify_payload(&self, payload: &[u8]) -> Result<(), ShardError> {
        if payload.len() != self.payload_len as usize {
            return Err(ShardError::PayloadSize { header: self.payload_len, actual: payload.len() });
        }
        if !self.payload_hash.matches(payload) {
            return Err(ShardError::HashMismatch);
        }
        Ok(())
    }
}

/// Parses a whole shard (header then exactly `payload_len` bytes) and
/// verifies the payload against the header's hash.
pub fn parse_shard(bytes: &[u8]) -> Result<(ShardHeader, &[u8]), ShardError> {
    let header = ShardHeader::parse(bytes)?;
    let payload = &bytes[HEADER_LEN..];
    header.verify_payload(payload)?;
    Ok((header, payload))
}

fn header_check(bytes: &[u8]) -> [u8; 8] {
    blake3::hash(bytes).as_bytes()[..8].try_into().expect("8 of 32 bytes")
}

/// Which shard: volume, stripe, generation, index in the stripe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ShardKey {
    pub volume: [u8; VOLUME_ID_LEN],
    pub stripe: u64,
    pub generation: u64,
    pub index: u8,
}

impl ShardKey {
    pub fn of(h: &ShardHeader) -> Self {
        Self { volume: h.volume_id, stripe: h.stripe, generation: h.generation, index: h.index }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(payload: &[u8]) -> ShardHeader {
        ShardHeader {
            volume_id: *b"0123456789abcdef",
            stripe: 0x0102_0304_0506_0708,
            generation: 42,
            index: 5,
            k: 4,
            m: 2,
            payload_len: payload.len() as u32,
            payload_hash: ShardHash::of(payload),
        }
    }

    fn shard(payload: &[u8]) -> Vec<u8> {
        let mut v = sample(payload).encode().to_vec();
        v.extend_from_slice(payload);
        v
    }

    /// Rewrites the header check after a deliberate edit, so a test reaches
    /// the field check behind it.
    fn reseal(b: &mut [u8]) {
        let c = header_check(&b[..CHECKED_LEN]);
        b[CHECKED_LEN..HEADER_LEN].copy_from_slice(&c);
    }

    #[test]
    fn layout_is_as_documented() {
        let payload = vec![7u8; 128];
        let b = shard(&payload);
        assert_eq!(&b[0..4], b"MDSH");
        assert_eq!(&b[4..6], &[1, 0]);
        assert_eq!(&b[6..8], &[96, 0]);
        assert_eq!(&b[8..24], b"0123456789abcdef");
        assert_eq!(&b[24..32], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[32..40], &42u64.to_le_bytes());
        assert_eq!(&b[40..44], &[5, 4, 2, 0]);
        assert_eq!(&b[44..48], &128u32.to_le_bytes());
        assert_eq!(&b[48..80], blake3::hash(&payload).as_bytes());
        assert_eq!(&b[80..88], &[0; 8]);
        assert_eq!(&b[88..96], &blake3::hash(&b[..88]).as_bytes()[..8]);
        assert_eq!(&b[96..], &payload[..]);
        let (h, p) = parse_shard(&b).unwrap();
        assert_eq!(h, sample(&payload));
        assert_eq!(p, &payload[..]);
    }

    #[test]
    fn every_malformation_is_its_own_error() {
        let payload = vec![1u8; 64];
        let good = shard(&payload);
        let edit = |f: &dyn Fn(&mut Vec<u8>), reseal_it: bool| {
            let mut b = good.clone();
            f(&mut b);
            if reseal_it {
                reseal(&mut b);
            }
            parse_shard(&b).unwrap_err()
        };
        assert_eq!(parse_shard(&good[..3]).unwrap_err(), ShardError::Truncated { len: 3, need: 96 });
        assert_eq!(parse_shard(&good[..50]).unwrap_err(), ShardError::Truncated { len: 50, need: 96 });
        assert_eq!(edit(&|b| b[0] = b'X', false), ShardError::BadMagic(*b"XDSH"));
        assert_eq!(edit(&|b| b[4] = 2, false), ShardError::UnsupportedVersion(2));
        assert_eq!(edit(&|b| b[6] = 64, false), ShardError::HeaderLength(64));
        assert_eq!(edit(&|b| b[30] ^= 1, false), ShardError::HeaderCheck);
        assert_eq!(edit(&|b| b[43] = 1, true), ShardError::Flags(1));
        assert_eq!(edit(&|b| b[85] = 1, true), ShardError::ReservedBytes);
        assert_eq!(edit(&|b| b[41] = 0, true), ShardError::Geometry(GeometryError::DataShards(0)));
        assert_eq!(edit(&|b| b[42] = 33, true), ShardError::Geometry(GeometryError::ParityShards(33)));
        assert_eq!(edit(&|b| b[40] = 6, true), ShardError::Index { index: 6, k: 4, m: 2 });
        assert_eq!(edit(&|b| b[44] = 65, true), ShardError::PayloadLength(65));
        // Several faults at once: the first in the documented order wins.
        assert_eq!(
            edit(
                &|b| {
                    b[41] = 0;
                    b[44] = 65
                },
                true
            ),
            ShardError::Geometry(GeometryError::DataShards(0))
        );
        assert_eq!(
            edit(
                &|b| {
                    b[40] = 9;
                    b[44] = 65
                },
                true
            ),
            ShardError::Index { index: 9, k: 4, m: 2 }
        );
        assert_eq!(
            edit(&|b| b[44..48].copy_from_slice(&0u32.to_le_bytes()), true),
            ShardError::PayloadLength(0)
        );
        assert_eq!(
            edit(&|b| b[44..48].copy_from_slice(&(32u32 << 20).to_le_bytes()), true),
            ShardError::PayloadLength(32 << 20)
        );
        assert_eq!(edit(&|b| b.truncate(96 + 63), false), ShardError::PayloadSize { header: 64, actual: 63 });
        assert_eq!(edit(&|b| b.push(0), false), ShardError::PayloadSize { header: 64, actual: 65 });
        assert_eq!(edit(&|b| b[100] ^= 0x80, false), ShardError::HashMismatch);
    }

    #[test]
    #[should_panic(expected = "invalid shard header")]
    fn encoding_an_invalid_header_is_a_bug() {
        let mut h = sample(&[0u8; 64]);
        h.index = 9;
        h.encode();
    }

    proptest! {
        #[test]
        fn valid_headers_round_trip(
            volume_id in any::<[u8; 16]>(), stripe in any::<u64>(), generation in any::<u64>(),
            k in 1u8..=64, m in 0u8..=32, index_seed in any::<u8>(), units in 1u32..=1024, hash in any::<[u8; 32]>(),
        ) {
            let h = ShardHeader {
                volume_id, stripe, generation, index: index_seed % (k + m), k, m,
                payload_len: units * 64, payload_hash: ShardHash(hash),
            };
            prop_assert_eq!(ShardHeader::parse(&h.encode()).unwrap(), h);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_shard(&bytes);
            let _ = ShardHeader::parse(&bytes);
        }

        #[test]
        fn any_single_bit_flip_in_a_shard_is_caught(bit in 0usize..(96 + 64) * 8) {
            let mut b = shard(&[9u8; 64]);
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(parse_shard(&b).is_err());
        }
    }
}
