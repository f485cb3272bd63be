//! The segment shard format: a header naming the shard and carrying all its
//! siblings' roots, then the payload. Little-endian; drawn in docs/formats.md
//! ("Segment shard"):
//!
//! ```text
//!  0  magic "MDSG"          4   36  shard index             1
//!  4  format version (1)    2   37  k                       1
//!  6  header length         2   38  m                       1
//!  8  volume id            16   39  flags (zero)            1
//! 24  segment id            8   40  reserved (zero)         8
//! 32  blocks per shard      4   48  k + m shard roots  32 each
//! 48 + 32·(k+m)  payload: blocks per shard × 4096 bytes
//! ```
//!
//! There is no header check of its own:
//! every field a reader acts on is either checked by the parser (magic,
//! version, length, flags, reserved, ranges) or hashed into the segment
//! root ([`segment_root`]), which every reader holds, from the volume's
//! MAC'd root record or, for repair, the directory's segment record.
//! [`parse_segment_shard`] never panics (fuzzed by
//! `fuzz/fuzz_targets/segment_shard.rs`); [`verify_shard`] is what makes a
//! shard trusted.

use super::{BLOCK_SIZE, SegmentError, SegmentGeometry, SegmentId, SegmentRoot, ShardRoot, VolumeId};

/// The first four bytes of every segment shard ("MeshDisk SeGment").
pub const MAGIC: [u8; 4] = *b"MDSG";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Header bytes before the shard roots.
pub const FIXED_LEN: usize = 48;
/// Bytes of each shard root.
pub const ROOT_LEN: usize = 32;
/// The segment root's domain string: a segment root never equals a hash of
/// anything else meshdisk hashes (shard payloads are also never this short:
/// at most 54 + 32·96 bytes are hashed here, a payload is at least 4096).
pub const SEGMENT_ROOT_DOMAIN: &[u8; 24] = b"meshdisk segment root v1";

/// Header length for a geometry: the fixed part and k + m roots.
pub fn header_len(g: SegmentGeometry) -> usize {
    FIXED_LEN + ROOT_LEN * g.shards()
}

/// The one hash over everything a segment's shards must agree on.
pub fn segment_root(
    volume_id: &VolumeId,
    segment: SegmentId,
    geometry: SegmentGeometry,
    roots: &[ShardRoot],
) -> SegmentRoot {
    let mut h = blake3::Hasher::new();
    h.update(SEGMENT_ROOT_DOMAIN);
    h.update(volume_id);
    h.update(&segment.raw().to_le_bytes());
    h.update(&[geometry.k() as u8, geometry.m() as u8]);
    h.update(&geometry.blocks_per_shard().to_le_bytes());
    for r in roots {
        h.update(&r.0);
    }
    SegmentRoot(*h.finalize().as_bytes())
}

/// Everything a segment shard says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentShardHeader {
    pub volume_id: VolumeId,
    pub segment: SegmentId,
    pub geometry: SegmentGeometry,
    /// 0..k are data shards, k..k+m parity shards.
    pub index: u8,
    /// The roots of all k + m shards of the segment, in index order.
    pub roots: Vec<ShardRoot>,
}

impl SegmentShardHeader {
    /// Checks what the types do not: index and root count.
    pub fn validate(&self) -> Result<(), SegmentError> {
        let g = self.geometry;
        if usize::from(self.index) >= g.shards() {
            return Err(SegmentError::Index { index: self.index, k: g.k() as u8, m: g.m() as u8 });
        }
        if self.roots.len() != g.shards() {
            return Err(SegmentError::RootCount { got: self.roots.len(), expected: g.shards() });
        }
        Ok(())
    }

    /// This header's length in bytes: where the payload starts.
    pub fn encoded_len(&self) -> usize {
        header_len(self.geometry)
    }

    /// The root this shard's payload hashes to.
    pub fn own_root(&self) -> ShardRoot {
        self.roots[usize::from(self.index)]
    }

    pub fn segment_root(&self) -> SegmentRoot {
        segment_root(&self.volume_id, self.segment, self.geometry, &self.roots)
    }

    /// Writes the header into `out`, which must be exactly [`Self::encoded_len`]
    /// bytes.
    ///
    /// # Panics
    /// If the header is invalid ([`Self::validate`]) or `out` has the wrong
    /// length: writing a shard no reader accepts is a bug.
    pub fn encode_into(&self, out: &mut [u8]) {
        if let Err(e) = self.validate() {
            panic!("encoding an invalid segment shard header: {e}");
        }
        assert_eq!(out.len(), self.encoded_len(), "segment shard header buffer");
        let g = self.geometry;
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&(self.encoded_len() as u16).to_le_bytes());
        out[8..24].copy_from_slice(&self.volume_id);
        out[24..32].copy_from_slice(&self.segment.raw().to_le_bytes());
        out[32..36].copy_from_slice(&g.blocks_per_shard().to_le_bytes());
        out[36] = self.index;
        out[37] = g.k() as u8;
        out[38] = g.m() as u8;
        out[39] = 0; // flags
        out[40..48].fill(0); // reserved
        for (slot, root) in out[FIXED_LEN..].chunks_exact_mut(ROOT_LEN).zip(&self.roots) {
            slot.copy_from_slice(&root.0);
        }
    }

    /// The header's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0; self.encoded_len()];
        self.encode_into(&mut out);
        out
    }
}

/// Parses a whole segment shard: header, then exactly `blocks_per_shard ×
/// 4096` bytes of payload. Checks, in this order, each failure its own
/// error: length (8 bytes), magic, version, length (the fixed 48 bytes),
/// flags, reserved bytes, k and m, blocks per shard, index < k + m, header
/// length, length (the whole header), payload length. It does NOT check
/// any hash: that is [`verify_shard`].
pub fn parse_segment_shard(bytes: &[u8]) -> Result<(SegmentShardHeader, &[u8]), SegmentError> {
    let (header, len) = parse_fields(bytes)?;
    let payload = &bytes[len..];
    if payload.len() != header.geometry.shard_len() {
        return Err(SegmentError::PayloadSize {
            expected: header.geometry.shard_len(),
            actual: payload.len(),
        });
    }
    debug_assert_eq!(header.geometry.shard_len() % BLOCK_SIZE, 0);
    Ok((header, payload))
}

/// Parses a segment shard's header alone (exactly its bytes, no payload),
/// with the checks of [`parse_segment_shard`]; no hash is checked.
pub fn parse_header(bytes: &[u8]) -> Result<SegmentShardHeader, SegmentError> {
    let (header, len) = parse_fields(bytes)?;
    if bytes.len() != len {
        return Err(SegmentError::PayloadSize { expected: 0, actual: bytes.len() - len });
    }
    Ok(header)
}

/// A header alone, checked against the segment root `expected`: what a
/// reader keeps per segment to check block proofs against the shard roots.
pub fn verify_header(bytes: &[u8], expected: &SegmentRoot) -> Result<SegmentShardHeader, SegmentError> {
    let header = parse_header(bytes)?;
    if blake3::Hash::from_bytes(header.segment_root().0) != blake3::Hash::from_bytes(expected.0) {
        return Err(SegmentError::SegmentRootMismatch);
    }
    Ok(header)
}

/// The header's fields and its length; `bytes` holds at least the header.
fn parse_fields(bytes: &[u8]) -> Result<(SegmentShardHeader, usize), SegmentError> {
    if bytes.len() < 8 {
        return Err(SegmentError::Truncated { len: bytes.len(), need: FIXED_LEN });
    }
    let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(SegmentError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != VERSION {
        return Err(SegmentError::UnsupportedVersion(version));
    }
    if bytes.len() < FIXED_LEN {
        return Err(SegmentError::Truncated { len: bytes.len(), need: FIXED_LEN });
    }
    let b = &bytes[..FIXED_LEN];
    if b[39] != 0 {
        return Err(SegmentError::Flags(b[39]));
    }
    if b[40..48].iter().any(|&x| x != 0) {
        return Err(SegmentError::ReservedBytes);
    }
    let (index, k, m) = (b[36], b[37], b[38]);
    let blocks = u32::from_le_bytes(b[32..36].try_into().expect("4 bytes"));
    let geometry = SegmentGeometry::new(usize::from(k), usize::from(m), blocks)?;
    if usize::from(index) >= geometry.shards() {
        return Err(SegmentError::Index { index, k, m });
    }
    let len = header_len(geometry);
    let stated = u16::from_le_bytes([b[6], b[7]]);
    if usize::from(stated) != len {
        return Err(SegmentError::HeaderLength { got: stated, expected: len, k, m });
    }
    if bytes.len() < len {
        return Err(SegmentError::Truncated { len: bytes.len(), need: len });
    }
    let roots = bytes[FIXED_LEN..len]
        .chunks_exact(ROOT_LEN)
        .map(|r| ShardRoot(r.try_into().expect("32 bytes")))
        .collect();
    let header = SegmentShardHeader {
        volume_id: b[8..24].try_into().expect("16 bytes"),
        segment: SegmentId::from_raw(u64::from_le_bytes(b[24..32].try_into().expect("8 bytes"))),
        geometry,
        index,
        roots,
    };
    Ok((header, len))
}

/// Parses a shard and verifies it alone: its header against
/// `expected` (the segment root) and its payload against its own root in
/// that header. No key needed.
///
/// The header's index is NOT covered by the segment root (it is the one
/// field that differs between siblings): a reader that asked for shard `i`
/// checks `header.index == i`. A shard whose index was altered verifies
/// only if its payload IS the payload of the shard it now claims to be.
pub fn verify_shard<'a>(
    bytes: &'a [u8],
    expected: &SegmentRoot,
) -> Result<(SegmentShardHeader, &'a [u8]), SegmentError> {
    let (header, payload) = parse_segment_shard(bytes)?;
    if blake3::Hash::from_bytes(header.segment_root().0) != blake3::Hash::from_bytes(expected.0) {
        return Err(SegmentError::SegmentRootMismatch);
    }
    if !header.own_root().matches(payload) {
        return Err(SegmentError::ShardRootMismatch { index: header.index });
    }
    Ok((header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::erasure::GeometryError;
    use proptest::prelude::*;

    fn sample(payload: &[u8]) -> SegmentShardHeader {
        let g = SegmentGeometry::new(2, 1, (payload.len() / BLOCK_SIZE) as u32).unwrap();
        SegmentShardHeader {
            volume_id: *b"0123456789abcdef",
            segment: SegmentId::from_raw(0x0102_0304_0506_0708),
            geometry: g,
            index: 1,
            roots: vec![ShardRoot([0xaa; 32]), ShardRoot::of(payload), ShardRoot([0xcc; 32])],
        }
    }

    fn shard(payload: &[u8]) -> Vec<u8> {
        let mut v = sample(payload).encode();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn layout_is_as_documented() {
        let payload = vec![7u8; 2 * BLOCK_SIZE];
        let b = shard(&payload);
        assert_eq!(&b[0..4], b"MDSG");
        assert_eq!(&b[4..6], &[1, 0]);
        assert_eq!(&b[6..8], &(48u16 + 3 * 32).to_le_bytes());
        assert_eq!(&b[8..24], b"0123456789abcdef");
        assert_eq!(&b[24..32], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[32..36], &2u32.to_le_bytes());
        assert_eq!(&b[36..40], &[1, 2, 1, 0]);
        assert_eq!(&b[40..48], &[0; 8]);
        assert_eq!(&b[48..80], &[0xaa; 32]);
        assert_eq!(&b[80..112], blake3::hash(&payload).as_bytes());
        assert_eq!(&b[112..144], &[0xcc; 32]);
        assert_eq!(&b[144..], &payload[..]);
        let (h, p) = parse_segment_shard(&b).unwrap();
        assert_eq!(h, sample(&payload));
        assert_eq!(p, &payload[..]);

        // The segment root, byte by byte as docs/formats.md draws it.
        let mut pre = b"meshdisk segment root v1".to_vec();
        pre.extend_from_slice(b"0123456789abcdef");
        pre.extend_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]);
        pre.extend_from_slice(&[2, 1]);
        pre.extend_from_slice(&2u32.to_le_bytes());
        pre.extend_from_slice(&b[48..144]);
        assert_eq!(h.segment_root().0, *blake3::hash(&pre).as_bytes());
        let (v, _) = verify_shard(&b, &h.segment_root()).unwrap();
        assert_eq!(v, h);
    }

    #[test]
    fn every_malformation_is_its_own_error() {
        let payload = vec![1u8; BLOCK_SIZE];
        let good = shard(&payload);
        let edit = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            parse_segment_shard(&b).map(|_| ()).unwrap_err()
        };
        use SegmentError as E;
        assert!(matches!(edit(&|b| b.truncate(3)), E::Truncated { len: 3, need: 48 }));
        assert!(matches!(edit(&|b| b.truncate(40)), E::Truncated { len: 40, need: 48 }));
        assert!(matches!(edit(&|b| b.truncate(100)), E::Truncated { len: 100, need: 144 }));
        assert!(matches!(edit(&|b| b[0] = b'X'), E::BadMagic(m) if &m == b"XDSG"));
        assert!(matches!(edit(&|b| b[4] = 2), E::UnsupportedVersion(2)));
        assert!(matches!(edit(&|b| b[39] = 4), E::Flags(4)));
        assert!(matches!(edit(&|b| b[47] = 1), E::ReservedBytes));
        assert!(matches!(edit(&|b| b[37] = 0), E::Geometry(GeometryError::DataShards(0))));
        assert!(matches!(edit(&|b| b[37] = 65), E::Geometry(GeometryError::DataShards(65))));
        assert!(matches!(edit(&|b| b[38] = 33), E::Geometry(GeometryError::ParityShards(33))));
        assert!(matches!(edit(&|b| b[32..36].fill(0)), E::BlocksPerShard(0)));
        assert!(matches!(edit(&|b| b[33] = 0x10), E::BlocksPerShard(4097)));
        assert!(matches!(edit(&|b| b[36] = 3), E::Index { index: 3, k: 2, m: 1 }));
        assert!(matches!(edit(&|b| b[6] = 0), E::HeaderLength { got: 0, expected: 144, k: 2, m: 1 }));
        // More roots announced than there are bytes for.
        assert!(matches!(
            edit(&|b| {
                b[38] = 32;
                b[6..8].copy_from_slice(&(48u16 + 34 * 32).to_le_bytes());
                b.truncate(500);
            }),
            E::Truncated { len: 500, need: 1136 }
        ));
        assert!(matches!(edit(&|b| b.truncate(144 + 4095)), E::PayloadSize { expected: 4096, actual: 4095 }));
        assert!(matches!(edit(&|b| b.push(0)), E::PayloadSize { expected: 4096, actual: 4097 }));
        // Several faults at once: the first in the documented order wins.
        assert!(matches!(
            edit(&|b| {
                b[37] = 0;
                b[36] = 9;
                b[6] = 0;
            }),
            E::Geometry(GeometryError::DataShards(0))
        ));
        assert!(matches!(
            edit(&|b| {
                b[36] = 9;
                b[6] = 0;
            }),
            E::Index { index: 9, .. }
        ));
    }

    #[test]
    fn verification_names_what_is_wrong() {
        let payload = vec![3u8; BLOCK_SIZE];
        let good = shard(&payload);
        let root = sample(&payload).segment_root();
        let mut other = sample(&payload);
        other.segment = SegmentId::from_raw(9);
        assert!(matches!(verify_shard(&good, &other.segment_root()), Err(SegmentError::SegmentRootMismatch)));
        let mut b = good.clone();
        b[200] ^= 1;
        assert!(matches!(verify_shard(&b, &root), Err(SegmentError::ShardRootMismatch { index: 1 })));
        let mut b = good.clone();
        b[60] ^= 1; // a sibling's root
        assert!(matches!(verify_shard(&b, &root), Err(SegmentError::SegmentRootMismatch)));
    }

    #[test]
    #[should_panic(expected = "invalid segment shard header")]
    fn encoding_an_invalid_header_is_a_bug() {
        let mut h = sample(&[0u8; BLOCK_SIZE]);
        h.roots.pop();
        h.encode();
    }

    proptest! {
        #[test]
        fn valid_headers_round_trip(
            volume_id in any::<[u8; 16]>(), segment in any::<u64>(),
            k in 1usize..=64, m in 0usize..=32, index_seed in any::<u8>(), blocks in 1u32..=3,
            root_seed in any::<u8>(),
        ) {
            let g = SegmentGeometry::new(k, m, blocks).unwrap();
            let h = SegmentShardHeader {
                volume_id, segment: SegmentId::from_raw(segment), geometry: g,
                index: (usize::from(index_seed) % (k + m)) as u8,
                roots: (0..k + m).map(|i| ShardRoot([root_seed ^ i as u8; 32])).collect(),
            };
            let mut b = h.encode();
            b.resize(b.len() + g.shard_len(), 0);
            let (parsed, payload) = parse_segment_shard(&b).unwrap();
            prop_assert_eq!(parsed, h);
            prop_assert_eq!(payload.len(), g.shard_len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_segment_shard(&bytes);
            let _ = verify_shard(&bytes, &SegmentRoot::default());
        }

        /// Random bytes behind a good fixed header reach every later check.
        #[test]
        fn arbitrary_tails_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut b = shard(&[5u8; BLOCK_SIZE])[..FIXED_LEN].to_vec();
            b.extend_from_slice(&tail);
            let _ = parse_segment_shard(&b);
        }
    }
}
