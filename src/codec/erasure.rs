//! Reed-Solomon erasure coding: k data shards, m parity shards, any k of
//! the k + m rebuild the data.
//!
//! Built on `reed-solomon-simd` (Leopard-style O(n log n) codes over
//! GF(2^16), SIMD at run time). What its costs dictate here:
//!
//! - Encoding is cheap (about 13 GiB/s for k=4 m=2); decoding has a fixed
//!   cost of about 170 µs per call whatever the shard size. So the code is
//!   used systematically: data shards are the ciphertext itself, and
//!   [`Erasure::reconstruct`] returns at once, without decoding, when all k
//!   data shards are present. It rebuilds only the data shards that are
//!   missing, and hands each rebuilt shard to the caller in place (no copy).
//! - Encoder and decoder allocate work buffers and tables; an [`Erasure`]
//!   keeps both and resets them for every segment. Make one per thread.

use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

/// Most data shards in a segment.
pub const MAX_DATA_SHARDS: usize = 64;
/// Most parity shards in a segment.
pub const MAX_PARITY_SHARDS: usize = 32;
/// Shard sizes are multiples of this many bytes (the SIMD kernels' unit).
pub const SHARD_ALIGN: usize = 64;
/// Largest shard: 16 MiB.
pub const MAX_SHARD_SIZE: usize = 16 << 20;

/// A segment's shape: k data shards and m parity shards of `shard_size`
/// bytes each. Valid by construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    k: u8,
    m: u8,
    shard_size: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("k (data shards per stripe) must be 1 to {MAX_DATA_SHARDS}, got {0}")]
    DataShards(usize),
    #[error("m (parity shards per stripe) must be 0 to {MAX_PARITY_SHARDS}, got {0}")]
    ParityShards(usize),
    #[error(
        "shard size must be a positive multiple of {SHARD_ALIGN} bytes, at most {MAX_SHARD_SIZE}, got {0}"
    )]
    ShardSize(usize),
}

impl Geometry {
    pub fn new(k: usize, m: usize, shard_size: usize) -> Result<Self, GeometryError> {
        if !(1..=MAX_DATA_SHARDS).contains(&k) {
            return Err(GeometryError::DataShards(k));
        }
        if m > MAX_PARITY_SHARDS {
            return Err(GeometryError::ParityShards(m));
        }
        if shard_size == 0 || !shard_size.is_multiple_of(SHARD_ALIGN) || shard_size > MAX_SHARD_SIZE {
            return Err(GeometryError::ShardSize(shard_size));
        }
        Ok(Self { k: k as u8, m: m as u8, shard_size: shard_size as u32 })
    }

    /// Data shards per segment.
    pub fn k(&self) -> usize {
        usize::from(self.k)
    }

    /// Parity shards per segment.
    pub fn m(&self) -> usize {
        usize::from(self.m)
    }

    /// All shards per segment, k + m.
    pub fn shards(&self) -> usize {
        self.k() + self.m()
    }

    pub fn shard_size(&self) -> usize {
        self.shard_size as usize
    }

    /// Data bytes per segment, k × shard size.
    pub fn stripe_size(&self) -> usize {
        self.k() * self.shard_size()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ErasureError {
    #[error("{present} usable shards, but {needed} are needed to rebuild the stripe")]
    TooFewShards { present: usize, needed: usize },
    #[error("expected {expected} shards, got {got}")]
    ShardCount { expected: usize, got: usize },
    #[error("shard {index} is {len} bytes, the stripe's shards are {expected}")]
    ShardLength { index: usize, len: usize, expected: usize },
    #[error("Reed-Solomon: {0}")]
    Codec(#[from] reed_solomon_simd::Error),
}

/// Encoder and decoder state for one geometry, reused segment after segment.
pub struct Erasure {
    geometry: Geometry,
    encoder: Option<ReedSolomonEncoder>,
    decoder: Option<ReedSolomonDecoder>,
}

impl std::fmt::Debug for Erasure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Erasure").field("geometry", &self.geometry).finish_non_exhaustive()
    }
}

impl Erasure {
    pub fn new(geometry: Geometry) -> Self {
        Self { geometry, encoder: None, decoder: None }
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Computes the m parity shards of the k data shards.
    pub fn encode<D: AsRef<[u8]>, P: AsMut<[u8]>>(
        &mut self,
        data: &[D],
        parity: &mut [P],
    ) -> Result<(), ErasureError> {
        self.encode_range(data, parity, 0..self.geometry.shard_size())
    }

    /// Computes bytes `range` of every parity shard from the same bytes of
    /// the data shards (Reed-Solomon works column by column, so a segment
    /// can be encoded in slices that stay in the CPU's caches). `range`
    /// must start and end on multiples of [`SHARD_ALIGN`].
    pub fn encode_range<D: AsRef<[u8]>, P: AsMut<[u8]>>(
        &mut self,
        data: &[D],
        parity: &mut [P],
        range: std::ops::Range<usize>,
    ) -> Result<(), ErasureError> {
        let g = self.geometry;
        check_count(data.len(), g.k())?;
        check_count(parity.len(), g.m())?;
        for (index, d) in data.iter().enumerate() {
            check_len(index, d.as_ref().len(), g.shard_size())?;
        }
        for (i, p) in parity.iter_mut().enumerate() {
            check_len(g.k() + i, p.as_mut().len(), g.shard_size())?;
        }
        assert!(
            range.start < range.end
                && range.end <= g.shard_size()
                && range.start.is_multiple_of(SHARD_ALIGN)
                && range.end.is_multiple_of(SHARD_ALIGN),
            "bad shard range {range:?}"
        );
        if g.m() == 0 {
            return Ok(());
        }
        let len = range.end - range.start;
        let encoder = match &mut self.encoder {
            Some(e) => {
                e.reset(g.k(), g.m(), len)?;
                e
            }
            none => none.insert(ReedSolomonEncoder::new(g.k(), g.m(), len)?),
        };
        for d in data {
            encoder.add_original_shard(&d.as_ref()[range.clone()])?;
        }
        let result = encoder.encode()?;
        for (p, recovery) in parity.iter_mut().zip(result.recovery_iter()) {
            p.as_mut()[range.clone()].copy_from_slice(recovery);
        }
        Ok(())
    }

    /// Rebuilds the missing data shards from the present ones. `shards`
    /// holds all k + m positions, `None` where a shard is missing (or was
    /// found corrupt). `restored(index, bytes)` is called once per missing
    /// data shard, with the rebuilt bytes borrowed from the decoder. Nothing
    /// is decoded, and `restored` never called, when all data shards are
    /// present. Returns how many data shards were rebuilt.
    pub fn reconstruct<S: AsRef<[u8]>>(
        &mut self,
        shards: &[Option<S>],
        restored: impl FnMut(usize, &[u8]),
    ) -> Result<usize, ErasureError> {
        self.reconstruct_columns(shards, self.geometry.shard_size(), restored)
    }

    /// [`Erasure::reconstruct`] of one range of columns: each shard given
    /// is the same `len` bytes (a multiple of [`SHARD_ALIGN`]) of its
    /// shard, and the rebuilt data shards are those bytes of theirs.
    /// Reed-Solomon works column by column, so a degraded read of a few
    /// blocks needs those blocks of k other shards, not k whole shards.
    pub fn reconstruct_columns<S: AsRef<[u8]>>(
        &mut self,
        shards: &[Option<S>],
        len: usize,
        mut restored: impl FnMut(usize, &[u8]),
    ) -> Result<usize, ErasureError> {
        let g = self.geometry;
        check_count(shards.len(), g.shards())?;
        if len == 0 || !len.is_multiple_of(SHARD_ALIGN) || len > g.shard_size() {
            return Err(ErasureError::ShardLength { index: 0, len, expected: g.shard_size() });
        }
        let mut present = 0;
        for (index, s) in shards.iter().enumerate() {
            if let Some(s) = s {
                check_len(index, s.as_ref().len(), len)?;
                present += 1;
            }
        }
        let missing_data = shards[..g.k()].iter().filter(|s| s.is_none()).count();
        if missing_data == 0 {
            return Ok(0);
        }
        if present < g.k() {
            return Err(ErasureError::TooFewShards { present, needed: g.k() });
        }
        let decoder = match &mut self.decoder {
            Some(d) => {
                d.reset(g.k(), g.m(), len)?;
                d
            }
            none => none.insert(ReedSolomonDecoder::new(g.k(), g.m(), len)?),
        };
        // Exactly k shards: the decoder needs no more, and each extra one
        // costs work.
        let mut added = 0;
        for (index, s) in shards.iter().enumerate() {
            let Some(s) = s else { continue };
            if added == g.k() {
                break;
            }
            if index < g.k() {
                decoder.add_original_shard(index, s.as_ref())?;
            } else {
                decoder.add_recovery_shard(index - g.k(), s.as_ref())?;
            }
            added += 1;
        }
        let result = decoder.decode()?;
        let mut rebuilt = 0;
        for (index, bytes) in result.restored_original_iter() {
            restored(index, bytes);
            rebuilt += 1;
        }
        debug_assert_eq!(rebuilt, missing_data);
        Ok(rebuilt)
    }
}

fn check_count(got: usize, expected: usize) -> Result<(), ErasureError> {
    if got == expected { Ok(()) } else { Err(ErasureError::ShardCount { expected, got }) }
}

fn check_len(index: usize, len: usize, expected: usize) -> Result<(), ErasureError> {
    if len == expected { Ok(()) } else { Err(ErasureError::ShardLength { index, len, expected }) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::bench::pattern;
    use proptest::prelude::*;

    #[test]
    fn geometry_limits_are_enforced_with_clear_errors() {
        assert!(Geometry::new(4, 2, 256 * 1024).is_ok());
        assert!(Geometry::new(1, 0, 64).is_ok());
        assert!(Geometry::new(64, 32, MAX_SHARD_SIZE).is_ok());
        assert_eq!(Geometry::new(0, 2, 64), Err(GeometryError::DataShards(0)));
        assert_eq!(Geometry::new(65, 2, 64), Err(GeometryError::DataShards(65)));
        assert_eq!(Geometry::new(4, 33, 64), Err(GeometryError::ParityShards(33)));
        for bad in [0, 63, 100, MAX_SHARD_SIZE + 64] {
            assert_eq!(Geometry::new(4, 2, bad), Err(GeometryError::ShardSize(bad)));
        }
        let msg = Geometry::new(4, 2, 100).unwrap_err().to_string();
        assert!(msg.contains("multiple of 64") && msg.contains("100"), "{msg}");
        let g = Geometry::new(4, 2, 1024).unwrap();
        assert_eq!((g.k(), g.m(), g.shards(), g.shard_size(), g.stripe_size()), (4, 2, 6, 1024, 4096));
    }

    /// Random data shards, zeroed parity shards.
    fn shards_for(g: Geometry, seed: u64) -> Vec<Vec<u8>> {
        (0..g.shards())
            .map(
                |i| {
                    if i < g.k() { pattern(g.shard_size(), seed ^ i as u64) } else { vec![0; g.shard_size()] }
                },
            )
            .collect()
    }

    fn encode_all(e: &mut Erasure, shards: &mut [Vec<u8>]) {
        let k = e.geometry().k();
        let (data, parity) = shards.split_at_mut(k);
        e.encode(data, parity).unwrap();
    }

    #[test]
    fn all_data_present_never_decodes() {
        let g = Geometry::new(4, 2, 128).unwrap();
        let mut e = Erasure::new(g);
        let mut shards = shards_for(g, 1);
        encode_all(&mut e, &mut shards);
        let view: Vec<Option<&[u8]>> =
            shards.iter().enumerate().map(|(i, s)| (i < 4).then_some(s.as_slice())).collect();
        let n = e.reconstruct(&view, |_, _| panic!("nothing to rebuild")).unwrap();
        assert_eq!(n, 0);
        assert!(e.decoder.is_none(), "no decoder was even built");
    }

    #[test]
    fn too_few_shards_and_wrong_shapes_are_errors() {
        let g = Geometry::new(3, 2, 64).unwrap();
        let mut e = Erasure::new(g);
        let mut shards = shards_for(g, 2);
        encode_all(&mut e, &mut shards);
        let view: Vec<Option<&[u8]>> =
            shards.iter().enumerate().map(|(i, s)| (i == 0 || i == 4).then_some(s.as_slice())).collect();
        assert!(matches!(
            e.reconstruct(&view, |_, _| ()),
            Err(ErasureError::TooFewShards { present: 2, needed: 3 })
        ));
        let short: Vec<Option<&[u8]>> = vec![Some(&shards[0][..32]), None, None, None, None];
        assert!(matches!(e.reconstruct(&short, |_, _| ()), Err(ErasureError::ShardLength { index: 0, .. })));
        assert!(matches!(e.reconstruct(&view[..4], |_, _| ()), Err(ErasureError::ShardCount { .. })));
        let mut parity = vec![vec![0u8; 64]; 1];
        assert!(matches!(e.encode(&shards[..3], &mut parity), Err(ErasureError::ShardCount { .. })));
    }

    #[test]
    fn encoding_in_column_slices_equals_encoding_whole_shards() {
        let g = Geometry::new(5, 3, 64 * 10).unwrap();
        let mut e = Erasure::new(g);
        let mut whole = shards_for(g, 7);
        encode_all(&mut e, &mut whole);
        let mut sliced = shards_for(g, 7);
        let (data, parity) = sliced.split_at_mut(5);
        for (start, end) in [(0, 192), (192, 256), (256, 640)] {
            e.encode_range(data, parity, start..end).unwrap();
        }
        assert_eq!(sliced, whole);
    }

    #[test]
    fn a_range_of_columns_decodes_to_the_same_range_of_the_lost_shards() {
        let g = Geometry::new(4, 2, 4096 * 8).unwrap();
        let mut e = Erasure::new(g);
        let mut whole = shards_for(g, 11);
        encode_all(&mut e, &mut whole);
        for (lost, range) in [([0usize, 3], 4096..8192), ([1, 2], 0..4096 * 3), ([2, 5], 4096 * 5..4096 * 8)]
        {
            let cols: Vec<Option<&[u8]>> = whole
                .iter()
                .enumerate()
                .map(|(i, s)| (!lost.contains(&i)).then(|| &s[range.clone()]))
                .collect();
            let mut got = Vec::new();
            e.reconstruct_columns(&cols, range.len(), |i, b| got.push((i, b.to_vec()))).unwrap();
            let want: Vec<(usize, Vec<u8>)> =
                lost.iter().filter(|&&i| i < 4).map(|&i| (i, whole[i][range.clone()].to_vec())).collect();
            assert_eq!(got, want, "lost {lost:?} range {range:?}");
        }
        let cols: Vec<Option<&[u8]>> = whole.iter().map(|s| Some(&s[..100])).collect();
        assert!(e.reconstruct_columns(&cols, 100, |_, _| ()).is_err(), "not a multiple of 64");
    }

    #[test]
    fn no_parity_means_nothing_to_compute() {
        let g = Geometry::new(2, 0, 64).unwrap();
        let mut e = Erasure::new(g);
        let data = [vec![1u8; 64], vec![2u8; 64]];
        e.encode(&data, &mut Vec::<Vec<u8>>::new()).unwrap();
        let view = [Some(&data[0][..]), None];
        assert!(matches!(e.reconstruct(&view, |_, _| ()), Err(ErasureError::TooFewShards { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Any k of the k + m shards rebuild exactly the missing data
        /// shards, for random geometries and erasure patterns; one Erasure
        /// is reused across geometries' stripes.
        #[test]
        fn any_k_shards_rebuild_the_data(
            k in 1usize..=20,
            m in 1usize..=8,
            units in 1usize..=4,
            seed in any::<u64>(),
            pattern in proptest::collection::vec(any::<bool>(), 28),
            stripes in 1usize..=3,
        ) {
            let g = Geometry::new(k, m, units * SHARD_ALIGN).unwrap();
            let mut e = Erasure::new(g);
            for stripe in 0..stripes as u64 {
                let mut shards = shards_for(g, seed ^ stripe);
                encode_all(&mut e, &mut shards);
                // Drop shards by the pattern, but at most m of them.
                let mut dropped = 0;
                let view: Vec<Option<&[u8]>> = shards
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        if pattern[i % pattern.len()] && dropped < m {
                            dropped += 1;
                            None
                        } else {
                            Some(s.as_slice())
                        }
                    })
                    .collect();
                let mut got = vec![None; k];
                let n = e.reconstruct(&view, |i, bytes| got[i] = Some(bytes.to_vec())).unwrap();
                let missing: Vec<usize> = (0..k).filter(|&i| view[i].is_none()).collect();
                prop_assert_eq!(n, missing.len());
                for i in 0..k {
                    if missing.contains(&i) {
                        prop_assert_eq!(got[i].as_deref(), Some(shards[i].as_slice()));
                    } else {
                        prop_assert!(got[i].is_none());
                    }
                }
            }
        }
    }
}
