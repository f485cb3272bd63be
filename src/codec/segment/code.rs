//! Erasure coding of a segment: its data area into k + m whole shards, and
//! back from any k verified ones. Ciphertext in, ciphertext out: no key.
//!
//! The data shards are the data area itself, cut shard-major (the code is
//! systematic), so a block is read from its one data shard without
//! decoding; the m parity shards come from [`Erasure`] (reed-solomon-simd).
//! A rebuild verifies every shard it is given against the segment root
//! first (a shard that fails is treated as missing and reported), rebuilds
//! every missing shard, data or parity, and checks each rebuilt payload
//! against its root in the header before handing it out.

use super::header::{SegmentShardHeader, header_len, verify_shard};
use super::{SegmentError, SegmentGeometry, SegmentId, SegmentRoot, ShardRoot, VolumeId};
use crate::codec::erasure::Erasure;

/// A segment's k + m shards, each header then payload, and the root they
/// all verify against.
#[derive(Debug)]
pub struct EncodedSegment {
    pub root: SegmentRoot,
    /// Index order: data shards 0..k, parity shards k..k+m.
    pub shards: Vec<Vec<u8>>,
}

/// What a rebuild made and what it refused.
#[derive(Debug, Default)]
pub struct Rebuilt {
    /// (index, whole shard) for every position that was missing or
    /// refused, in index order. Each verifies against the segment root.
    pub shards: Vec<(usize, Vec<u8>)>,
    /// (index, why) for every shard given that failed verification.
    pub refused: Vec<(usize, SegmentError)>,
}

/// The erasure code's state for one geometry, reused segment after
/// segment (its work buffers and tables are costly to make). One per
/// thread.
#[derive(Debug)]
pub struct SegmentCodec {
    geometry: SegmentGeometry,
    erasure: Erasure,
}

impl SegmentCodec {
    pub fn new(geometry: SegmentGeometry) -> Self {
        Self { geometry, erasure: Erasure::new(geometry.erasure()) }
    }

    pub fn geometry(&self) -> SegmentGeometry {
        self.geometry
    }

    /// Cuts `data_area` (exactly k × blocks per shard × 4 KiB) into k data
    /// shards, computes m parity shards, hashes all k + m payloads, and
    /// writes each shard's header with all roots.
    pub fn encode(
        &mut self,
        volume_id: &VolumeId,
        segment: SegmentId,
        data_area: &[u8],
    ) -> Result<EncodedSegment, SegmentError> {
        let g = self.geometry;
        if data_area.len() != g.data_area_len() {
            return Err(SegmentError::DataAreaSize { expected: g.data_area_len(), actual: data_area.len() });
        }
        self.encode_shards(volume_id, segment, data_shards(g, data_area))
    }

    /// [`Self::encode`] of a data area already cut into its k data shards,
    /// each with [`header_len`] bytes of room in front of its payload (what
    /// a packer that places each block in its shard makes): the headers
    /// are written into that room, so the payloads are not copied.
    pub fn encode_shards(
        &mut self,
        volume_id: &VolumeId,
        segment: SegmentId,
        mut data: Vec<Vec<u8>>,
    ) -> Result<EncodedSegment, SegmentError> {
        let g = self.geometry;
        let hlen = header_len(g);
        let len = data.iter().map(|d| d.len().saturating_sub(hlen)).sum();
        if data.len() != g.k() || data.iter().any(|d| d.len() != hlen + g.shard_len()) {
            return Err(SegmentError::DataAreaSize { expected: g.data_area_len(), actual: len });
        }
        let mut parity = vec![vec![0u8; hlen + g.shard_len()]; g.m()];
        {
            let payloads: Vec<&[u8]> = data.iter().map(|d| &d[hlen..]).collect();
            let mut out: Vec<&mut [u8]> = parity.iter_mut().map(|s| &mut s[hlen..]).collect();
            self.erasure.encode(&payloads, &mut out)?;
        }
        let roots: Vec<ShardRoot> = data.iter().chain(&parity).map(|s| ShardRoot::of(&s[hlen..])).collect();
        let mut header = SegmentShardHeader { volume_id: *volume_id, segment, geometry: g, index: 0, roots };
        for (i, s) in data.iter_mut().chain(parity.iter_mut()).enumerate() {
            header.index = i as u8;
            header.encode_into(&mut s[..hlen]);
        }
        data.append(&mut parity);
        Ok(EncodedSegment { root: header.segment_root(), shards: data })
    }

    /// Rebuilds the missing shards of a segment from the ones at hand.
    /// `shards` has all k + m positions (whole shards, `None` where
    /// missing); each one given is verified against `expected` and must sit
    /// at its own index. Needs k that verify.
    pub fn rebuild(
        &mut self,
        expected: &SegmentRoot,
        shards: &[Option<&[u8]>],
    ) -> Result<Rebuilt, SegmentError> {
        let g = self.geometry;
        if shards.len() != g.shards() {
            return Err(SegmentError::ShardCount { expected: g.shards(), got: shards.len() });
        }
        let mut refused = Vec::new();
        let mut payloads: Vec<Option<&[u8]>> = vec![None; g.shards()];
        let mut template: Option<SegmentShardHeader> = None;
        for (i, bytes) in shards.iter().enumerate() {
            let Some(bytes) = bytes else { continue };
            let checked = verify_shard(bytes, expected).and_then(|(h, p)| {
                if usize::from(h.index) != i {
                    Err(SegmentError::WrongIndex { expected: i, got: h.index })
                } else if h.geometry != g {
                    Err(SegmentError::GeometryMismatch { codec: g, found: h.geometry })
                } else {
                    Ok((h, p))
                }
            });
            match checked {
                Ok((h, p)) => {
                    payloads[i] = Some(p);
                    template.get_or_insert(h);
                }
                Err(e @ SegmentError::GeometryMismatch { .. }) => return Err(e),
                Err(e) => refused.push((i, e)),
            }
        }
        let verified = payloads.iter().filter(|p| p.is_some()).count();
        let Some(mut header) = template.filter(|_| verified >= g.k()) else {
            return Err(SegmentError::TooFewShards { verified, needed: g.k() });
        };

        // Data shards first (the decoder only restores those), then parity
        // re-encoded from the whole data if any parity shard is missing.
        let mut restored: Vec<Option<Vec<u8>>> = vec![None; g.k()];
        self.erasure.reconstruct(&payloads, |i, bytes| restored[i] = Some(bytes.to_vec()))?;
        let data: Vec<&[u8]> = (0..g.k())
            .map(|i| payloads[i].or(restored[i].as_deref()).expect("every data shard is present or restored"))
            .collect();
        let mut parity: Vec<Option<Vec<u8>>> = vec![None; g.m()];
        if payloads[g.k()..].iter().any(Option::is_none) {
            let mut all = vec![vec![0u8; g.shard_len()]; g.m()];
            self.erasure.encode(&data, &mut all)?;
            for (i, p) in all.into_iter().enumerate() {
                if payloads[g.k() + i].is_none() {
                    parity[i] = Some(p);
                }
            }
        }

        let hlen = header_len(g);
        let mut out = Vec::new();
        for i in (0..g.shards()).filter(|&i| payloads[i].is_none()) {
            let payload = if i < g.k() { data[i] } else { parity[i - g.k()].as_deref().expect("re-encoded") };
            if !header.roots[i].matches(payload) {
                return Err(SegmentError::RebuildMismatch { index: i });
            }
            header.index = i as u8;
            let mut s = vec![0u8; hlen];
            header.encode_into(&mut s);
            s.extend_from_slice(payload);
            out.push((i, s));
        }
        Ok(Rebuilt { shards: out, refused })
    }
}

/// `data_area` (k × blocks per shard × 4 KiB) cut into its k data shards,
/// each copied behind [`header_len`] bytes of room for its header: what
/// [`SegmentCodec::encode_shards`] takes.
pub fn data_shards(g: SegmentGeometry, data_area: &[u8]) -> Vec<Vec<u8>> {
    let hlen = header_len(g);
    data_area
        .chunks_exact(g.shard_len())
        .map(|d| {
            let mut s = Vec::with_capacity(hlen + d.len());
            s.resize(hlen, 0);
            s.extend_from_slice(d);
            s
        })
        .collect()
}

/// [`SegmentCodec::encode`] with a codec made for this one segment.
pub fn encode_segment(
    geometry: SegmentGeometry,
    volume_id: &VolumeId,
    segment: SegmentId,
    data_area: &[u8],
) -> Result<EncodedSegment, SegmentError> {
    SegmentCodec::new(geometry).encode(volume_id, segment, data_area)
}

/// [`SegmentCodec::rebuild`] with a codec made for the geometry the shards
/// themselves name (the first that verifies against `expected`).
pub fn rebuild(expected: &SegmentRoot, shards: &[Option<&[u8]>]) -> Result<Rebuilt, SegmentError> {
    let geometry = shards
        .iter()
        .flatten()
        .find_map(|s| verify_shard(s, expected).ok().map(|(h, _)| h.geometry))
        .ok_or(SegmentError::TooFewShards { verified: 0, needed: 1 })?;
    SegmentCodec::new(geometry).rebuild(expected, shards)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::bench::pattern;
    use crate::codec::segment::header::parse_segment_shard;
    use crate::codec::segment::{BLOCK_SIZE, tree};
    use proptest::prelude::*;

    const VOLUME: VolumeId = *b"volume-id-16byte";

    fn encoded(k: usize, m: usize, blocks: u32, seed: u64) -> (SegmentGeometry, Vec<u8>, EncodedSegment) {
        let g = SegmentGeometry::new(k, m, blocks).unwrap();
        let area = pattern(g.data_area_len(), seed);
        let e = encode_segment(g, &VOLUME, SegmentId::from_raw(seed), &area).unwrap();
        (g, area, e)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// A packer's data shards (header room, then payload) encode to the
        /// same shards as the data area they cut, and a wrong size is an
        /// error, never a panic.
        #[test]
        fn encoding_data_shards_in_place_makes_the_same_shards(
            k in 1usize..6, m in 1usize..4, blocks in 1u32..5, seed in any::<u64>(), bad in 0usize..5,
        ) {
            let (g, area, e) = encoded(k, m, blocks, seed);
            let hlen = header_len(g);
            let data: Vec<Vec<u8>> = area
                .chunks_exact(g.shard_len())
                .map(|d| [vec![0xee; hlen], d.to_vec()].concat())
                .collect();
            let mut codec = SegmentCodec::new(g);
            let laid = codec.encode_shards(&VOLUME, SegmentId::from_raw(seed), data.clone()).unwrap();
            prop_assert_eq!(laid.root, e.root);
            prop_assert_eq!(laid.shards, e.shards);
            let mut wrong = data;
            match bad {
                0 => { wrong[0].pop(); }
                1 => { wrong.pop(); }
                2 => { wrong[k - 1].push(0); }
                // Shorter than the header's room: no payload to slice.
                3 => { wrong[k - 1].truncate(hlen / 2); }
                _ => { wrong[0].clear(); }
            }
            prop_assert!(codec.encode_shards(&VOLUME, SegmentId::from_raw(seed), wrong).is_err());
        }
    }

    #[test]
    fn data_shards_are_the_data_area_shard_major() {
        let (g, area, e) = encoded(3, 2, 2, 1);
        assert_eq!(e.shards.len(), 5);
        for (i, s) in e.shards.iter().enumerate() {
            let (h, payload) = verify_shard(s, &e.root).unwrap();
            assert_eq!(usize::from(h.index), i);
            assert_eq!(h.segment_root(), e.root);
            if i < 3 {
                assert_eq!(payload, &area[i * g.shard_len()..(i + 1) * g.shard_len()]);
            }
        }
        // Block 3 of the data area is block 1 of data shard 1.
        let (shard, block) = g.locate(3).unwrap();
        let (_, payload) = parse_segment_shard(&e.shards[shard]).unwrap();
        let at = block as usize * BLOCK_SIZE;
        assert_eq!(&payload[at..at + BLOCK_SIZE], &area[3 * BLOCK_SIZE..4 * BLOCK_SIZE]);
    }

    #[test]
    fn wrong_sizes_and_too_few_shards_are_errors() {
        let (g, _, e) = encoded(2, 1, 1, 2);
        assert!(matches!(
            encode_segment(g, &VOLUME, SegmentId::from_raw(0), &[0; 100]),
            Err(SegmentError::DataAreaSize { expected: 8192, actual: 100 })
        ));
        let mut codec = SegmentCodec::new(g);
        let one: Vec<Option<&[u8]>> = vec![Some(&e.shards[0]), None, None];
        assert!(matches!(
            codec.rebuild(&e.root, &one),
            Err(SegmentError::TooFewShards { verified: 1, needed: 2 })
        ));
        assert!(matches!(codec.rebuild(&e.root, &one[..2]), Err(SegmentError::ShardCount { .. })));
        assert!(matches!(rebuild(&e.root, &[None, None, None]), Err(SegmentError::TooFewShards { .. })));
        let other = SegmentCodec::new(SegmentGeometry::new(2, 1, 2).unwrap())
            .rebuild(&e.root, &[Some(&e.shards[0][..]), Some(&e.shards[1][..]), None]);
        assert!(matches!(other, Err(SegmentError::GeometryMismatch { .. })));
    }

    #[test]
    fn a_bad_or_misplaced_shard_is_refused_and_rebuilt() {
        let (_, _, e) = encoded(2, 2, 1, 3);
        let mut bad = e.shards[1].clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        // Shard 3 offered at position 2: refused, then rebuilt from the rest.
        let given: Vec<Option<&[u8]>> =
            vec![Some(&e.shards[0]), Some(&bad), Some(&e.shards[3]), Some(&e.shards[3])];
        let r = rebuild(&e.root, &given).unwrap();
        let refused: Vec<usize> = r.refused.iter().map(|(i, _)| *i).collect();
        assert_eq!(refused, [1, 2]);
        assert!(matches!(r.refused[0].1, SegmentError::ShardRootMismatch { index: 1 }));
        assert!(matches!(r.refused[1].1, SegmentError::WrongIndex { expected: 2, got: 3 }));
        assert_eq!(r.shards, vec![(1, e.shards[1].clone()), (2, e.shards[2].clone())]);
    }

    #[test]
    fn no_parity_and_nothing_missing() {
        let (_, _, e) = encoded(3, 0, 1, 4);
        let all: Vec<Option<&[u8]>> = e.shards.iter().map(|s| Some(&s[..])).collect();
        let r = rebuild(&e.root, &all).unwrap();
        assert!(r.shards.is_empty() && r.refused.is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Random geometry and data: encode, drop up to m shards, rebuild;
        /// every shard, kept or rebuilt, is byte for byte the original and
        /// verifies alone, and range proofs of random ranges verify.
        #[test]
        fn drop_up_to_m_rebuild_and_verify(
            k in 1usize..=8, m in 0usize..=4, blocks in 1u32..=5, seed in any::<u64>(),
            drop in proptest::collection::vec(any::<bool>(), 12),
            range_seed in any::<(u32, u32)>(),
        ) {
            let (g, _, e) = encoded(k, m, blocks, seed);
            let mut dropped = 0;
            let given: Vec<Option<&[u8]>> = e.shards.iter().enumerate().map(|(i, s)| {
                if drop[i] && dropped < m { dropped += 1; None } else { Some(&s[..]) }
            }).collect();
            let r = rebuild(&e.root, &given).unwrap();
            prop_assert!(r.refused.is_empty());
            prop_assert_eq!(r.shards.len(), dropped);
            for (i, s) in &r.shards {
                prop_assert!(given[*i].is_none());
                prop_assert_eq!(s, &e.shards[*i]);
            }
            for (i, s) in e.shards.iter().enumerate() {
                let (h, payload) = verify_shard(s, &e.root).unwrap();
                prop_assert_eq!(usize::from(h.index), i);
                let outboard = tree::ShardOutboard::compute(payload).unwrap();
                prop_assert_eq!(outboard.root(), h.own_root());
                let n = g.blocks_per_shard();
                let start = range_seed.0 % n;
                let end = start + 1 + range_seed.1 % (n - start);
                let proof = tree::prove(payload, &outboard, start..end).unwrap();
                let blocks = tree::verify_blocks(&h.own_root(), n, start..end, &proof).unwrap();
                prop_assert_eq!(&blocks[..], &payload[start as usize * BLOCK_SIZE..end as usize * BLOCK_SIZE]);
            }
        }

        /// Any single flipped byte anywhere in a shard is caught. The one
        /// field outside the segment root, the index, may turn a shard into
        /// a sibling only when the sibling's payload is the very same bytes;
        /// a reader that checks the index it asked for catches that too.
        #[test]
        fn any_flipped_byte_is_caught(
            k in 1usize..=4, m in 0usize..=2, blocks in 1u32..=2, seed in any::<u64>(),
            which in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), bit in 0u8..8,
        ) {
            let (_, _, e) = encoded(k, m, blocks, seed);
            let i = which.index(e.shards.len());
            let mut s = e.shards[i].clone();
            let at = at.index(s.len());
            s[at] ^= 1 << bit;
            match verify_shard(&s, &e.root) {
                Err(_) => {}
                Ok((h, payload)) => {
                    prop_assert_eq!(at, 36, "only the index byte may verify after a flip");
                    prop_assert_ne!(usize::from(h.index), i);
                    let (_, sibling) = parse_segment_shard(&e.shards[usize::from(h.index)]).unwrap();
                    prop_assert_eq!(payload, sibling);
                }
            }
        }
    }
}
