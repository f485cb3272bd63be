//! Verified reads of a few blocks of a shard, with `bao-tree`.
//!
//! blake3 hashes 1 KiB chunks into a binary tree; its root is the plain
//! `blake3::hash` of the whole input. bao-tree keeps the tree's inner
//! hashes only down to 4 KiB chunk groups (`BlockSize::from_chunk_log(2)`:
//! 2^2 chunks of 1 KiB), one group per volume block, so the hashes a peer
//! keeps beside an n-block shard (its outboard) are `(n − 1) × 64` bytes
//! (1.6 % of the shard), and the root is still the shard root of
//! [`super::header`]: nothing else has to be trusted.
//!
//! A read of blocks `a..b` is answered with a proof: the sibling hash pairs
//! on the way from the root down to those blocks, then the blocks
//! themselves, in bao's pre-order (see docs/formats.md, "Block proof").
//! The reader needs only the shard root and the shard's length in blocks
//! to check it ([`verify_blocks`]), and gets exactly the blocks it asked for
//! or an error. The peer proves from its own copy with validation
//! ([`prove`]): a corrupt local copy is found there, not sent.

use std::ops::Range;

use bao_tree::io::outboard::PostOrderMemOutboard;
use bao_tree::io::sync::{DecodeResponseIter, ReadAt, encode_ranges_validated};
use bao_tree::io::{BaoContentItem, DecodeError, Leaf};
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};

use super::{BLOCK_SIZE, MAX_BLOCKS_PER_SHARD, SegmentError, ShardRoot};

/// 4 KiB chunk groups: 2^2 blake3 chunks of 1 KiB.
pub const CHUNK_GROUP: BlockSize = BlockSize::from_chunk_log(2);
/// blake3 chunks in one block.
const CHUNKS_PER_BLOCK: u64 = (BLOCK_SIZE / 1024) as u64;

/// A shard's hash tree above its 4 KiB blocks: what a peer keeps beside
/// the shard to answer block reads. Hash pairs in post order (bao-tree's
/// `PostOrderMemOutboard`, without its size suffix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardOutboard {
    root: ShardRoot,
    blocks: u32,
    hashes: Vec<u8>,
}

impl ShardOutboard {
    /// Hashes a shard's payload (whole 4 KiB blocks) into its outboard:
    /// what bao-tree's `PostOrderMemOutboard::create` makes, about half
    /// again as fast ([`post_order`]).
    pub fn compute(payload: &[u8]) -> Result<Self, SegmentError> {
        let blocks = blocks_of(payload.len())?;
        let mut hashes = Vec::with_capacity((blocks as usize - 1) * 64);
        let root = post_order(payload, 0, true, &mut hashes);
        Ok(Self { root: ShardRoot(root), blocks, hashes })
    }

    /// An outboard read back from storage; only its length is checked here
    /// ([`prove`] checks its hashes against the data).
    pub fn from_parts(root: ShardRoot, blocks: u32, hashes: Vec<u8>) -> Result<Self, SegmentError> {
        let expected = outboard_len(blocks)?;
        if hashes.len() != expected {
            return Err(SegmentError::OutboardSize { expected, actual: hashes.len(), blocks });
        }
        Ok(Self { root, blocks, hashes })
    }

    /// The shard root: `blake3::hash(payload)`.
    pub fn root(&self) -> ShardRoot {
        self.root
    }

    pub fn blocks(&self) -> u32 {
        self.blocks
    }

    /// The hash pairs, `(blocks − 1) × 64` bytes.
    pub fn hashes(&self) -> &[u8] {
        &self.hashes
    }
}

/// The blake3 tree of `data` (whole 4 KiB blocks, the first at block
/// `first` of the shard), its parent pairs appended to `out` in post order
/// (left subtree, right subtree, then this node's pair), as bao-tree lays
/// an outboard out; returns the subtree's chaining value (the root hash if
/// `root`). Each block is hashed alone at its offset (blake3's hazmat API),
/// and the tree above is blake3's: a left subtree is the largest power of
/// two of blocks below the whole.
fn post_order(data: &[u8], first: u64, root: bool, out: &mut Vec<u8>) -> [u8; 32] {
    use blake3::hazmat::{HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root};
    let blocks = data.len() / BLOCK_SIZE;
    if blocks == 1 {
        if root {
            return *blake3::hash(data).as_bytes();
        }
        let mut h = blake3::Hasher::new();
        h.set_input_offset(first * BLOCK_SIZE as u64);
        h.update(data);
        return h.finalize_non_root();
    }
    // The largest power of two at most blocks − 1.
    let left = 1usize << (usize::BITS - 1 - (blocks - 1).leading_zeros());
    let (l, r) = data.split_at(left * BLOCK_SIZE);
    let lcv = post_order(l, first, false, out);
    let rcv = post_order(r, first + left as u64, false, out);
    out.extend_from_slice(&lcv);
    out.extend_from_slice(&rcv);
    if root {
        *merge_subtrees_root(&lcv, &rcv, Mode::Hash).as_bytes()
    } else {
        merge_subtrees_non_root(&lcv, &rcv, Mode::Hash)
    }
}

/// Bytes of the outboard of a shard of `blocks` blocks.
pub fn outboard_len(blocks: u32) -> Result<usize, SegmentError> {
    check_blocks(blocks)?;
    Ok(tree(blocks).outboard_size() as usize)
}

/// The proof for blocks `range` of a shard: hash pairs and the blocks, to
/// send to a reader. Fails if the range is outside the shard, or if the
/// payload or outboard do not match the outboard's root (the local copy is
/// corrupt: nothing of it is sent).
pub fn prove(payload: &[u8], outboard: &ShardOutboard, range: Range<u32>) -> Result<Vec<u8>, SegmentError> {
    let blocks = outboard.blocks;
    if payload.len() != blocks as usize * BLOCK_SIZE {
        return Err(SegmentError::PayloadSize {
            expected: blocks as usize * BLOCK_SIZE,
            actual: payload.len(),
        });
    }
    let ranges = chunk_ranges(blocks, &range)?;
    let ob = PostOrderMemOutboard {
        root: blake3::Hash::from_bytes(outboard.root.0),
        tree: tree(blocks),
        data: &outboard.hashes[..],
    };
    let levels = 32 - blocks.leading_zeros() as usize;
    let mut proof = Vec::with_capacity((range.end - range.start) as usize * BLOCK_SIZE + 2 * levels * 64);
    encode_ranges_validated(payload, ob, &ranges, &mut proof).map_err(|_| SegmentError::OutboardMismatch)?;
    Ok(proof)
}

/// [`prove`] from only the bytes of blocks `range` (`range.len() × 4096`
/// bytes, read from the stored payload at `range.start × 4096`): what a
/// peer reads from disk for a block read. The same checks: the blocks and
/// the outboard's hashes on their path must match the outboard's root, or
/// nothing is proved ([`SegmentError::OutboardMismatch`]).
pub fn prove_range(
    blocks: &[u8],
    outboard: &ShardOutboard,
    range: Range<u32>,
) -> Result<Vec<u8>, SegmentError> {
    let ranges = chunk_ranges(outboard.blocks, &range)?;
    let want = (range.end - range.start) as usize * BLOCK_SIZE;
    if blocks.len() != want {
        return Err(SegmentError::PayloadSize { expected: want, actual: blocks.len() });
    }
    let ob = PostOrderMemOutboard {
        root: blake3::Hash::from_bytes(outboard.root.0),
        tree: tree(outboard.blocks),
        data: &outboard.hashes[..],
    };
    let data = RangeBytes { start: u64::from(range.start) * BLOCK_SIZE as u64, bytes: blocks };
    let levels = 32 - outboard.blocks.leading_zeros() as usize;
    let mut proof = Vec::with_capacity(want + 2 * levels * 64);
    encode_ranges_validated(data, ob, &ranges, &mut proof).map_err(|_| SegmentError::OutboardMismatch)?;
    Ok(proof)
}

/// Bytes of a payload from `start` on, as the encoder reads them; a read
/// outside them is an error (the encoder reads only the blocks proved).
struct RangeBytes<'a> {
    start: u64,
    bytes: &'a [u8],
}

impl ReadAt for RangeBytes<'_> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let at = pos
            .checked_sub(self.start)
            .and_then(|at| usize::try_from(at).ok())
            .filter(|&at| at <= self.bytes.len())
            .ok_or_else(|| std::io::Error::other("read outside the blocks being proved"))?;
        let n = buf.len().min(self.bytes.len() - at);
        buf[..n].copy_from_slice(&self.bytes[at..at + n]);
        Ok(n)
    }
}

/// Checks a proof for blocks `range` of a `blocks_per_shard`-block shard
/// against the shard's root, and returns the blocks (`range.len() × 4096`
/// bytes). A proof altered anywhere, made for another range or shard,
/// truncated or followed by extra bytes is refused.
pub fn verify_blocks(
    root: &ShardRoot,
    blocks_per_shard: u32,
    range: Range<u32>,
    proof: &[u8],
) -> Result<Vec<u8>, SegmentError> {
    check_blocks(blocks_per_shard)?;
    let ranges = chunk_ranges(blocks_per_shard, &range)?;
    let want = (range.end - range.start) as usize * BLOCK_SIZE;
    let mut out = Vec::with_capacity(want);
    let mut rest = proof;
    let decoder =
        DecodeResponseIter::new(blake3::Hash::from_bytes(root.0), tree(blocks_per_shard), &mut rest, &ranges);
    for item in decoder {
        match item {
            Ok(BaoContentItem::Parent(_)) => {}
            Ok(BaoContentItem::Leaf(Leaf { offset, data })) => {
                // Leaves come in order and whole: the range is block-aligned.
                if offset != range.start as u64 * BLOCK_SIZE as u64 + out.len() as u64 {
                    return Err(SegmentError::ProofMismatch);
                }
                out.extend_from_slice(&data);
            }
            Err(DecodeError::ParentHashMismatch(_) | DecodeError::LeafHashMismatch(_)) => {
                return Err(SegmentError::ProofMismatch);
            }
            Err(DecodeError::ParentNotFound(_) | DecodeError::LeafNotFound(_) | DecodeError::Io(_)) => {
                return Err(SegmentError::ProofTruncated);
            }
        }
    }
    if !rest.is_empty() {
        return Err(SegmentError::ProofTrailing(rest.len()));
    }
    if out.len() != want {
        return Err(SegmentError::ProofMismatch);
    }
    Ok(out)
}

fn tree(blocks: u32) -> BaoTree {
    BaoTree::new(u64::from(blocks) * BLOCK_SIZE as u64, CHUNK_GROUP)
}

fn check_blocks(blocks: u32) -> Result<(), SegmentError> {
    if (1..=MAX_BLOCKS_PER_SHARD).contains(&blocks) {
        Ok(())
    } else {
        Err(SegmentError::BlocksPerShard(blocks))
    }
}

fn blocks_of(len: usize) -> Result<u32, SegmentError> {
    let blocks = u32::try_from(len / BLOCK_SIZE).unwrap_or(u32::MAX);
    check_blocks(blocks)?;
    if len != blocks as usize * BLOCK_SIZE {
        return Err(SegmentError::PayloadSize { expected: blocks as usize * BLOCK_SIZE, actual: len });
    }
    Ok(blocks)
}

fn chunk_ranges(blocks: u32, range: &Range<u32>) -> Result<ChunkRanges, SegmentError> {
    if range.start >= range.end || range.end > blocks {
        return Err(SegmentError::BlockRange { start: range.start, end: range.end, blocks });
    }
    let chunk = |b: u32| ChunkNum(u64::from(b) * CHUNKS_PER_BLOCK);
    Ok(ChunkRanges::from(chunk(range.start)..chunk(range.end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::bench::pattern;
    use proptest::prelude::*;

    fn shard(blocks: u32, seed: u64) -> (Vec<u8>, ShardOutboard) {
        let payload = pattern(blocks as usize * BLOCK_SIZE, seed);
        let ob = ShardOutboard::compute(&payload).unwrap();
        (payload, ob)
    }

    #[test]
    fn the_tree_root_is_the_plain_blake3_hash() {
        for blocks in [1, 2, 3, 7, 8, 64, 255] {
            let (payload, ob) = shard(blocks, u64::from(blocks));
            assert_eq!(ob.root(), ShardRoot::of(&payload), "{blocks} blocks");
            assert_eq!(ob.hashes().len(), (blocks as usize - 1) * 64);
            assert_eq!(outboard_len(blocks).unwrap(), ob.hashes().len());
        }
    }

    #[test]
    fn a_proof_is_the_blocks_and_a_few_hashes() {
        let (payload, ob) = shard(256, 1);
        let proof = prove(&payload, &ob, 17..18).unwrap();
        // One block, and one hash pair per level of a 256-leaf tree.
        assert_eq!(proof.len(), BLOCK_SIZE + 8 * 64);
        let got = verify_blocks(&ob.root(), 256, 17..18, &proof).unwrap();
        assert_eq!(got, &payload[17 * BLOCK_SIZE..18 * BLOCK_SIZE]);
        let whole = prove(&payload, &ob, 0..256).unwrap();
        assert_eq!(verify_blocks(&ob.root(), 256, 0..256, &whole).unwrap(), payload);
    }

    #[test]
    fn proving_from_the_range_alone_gives_the_same_proof() {
        let (payload, ob) = shard(37, 4);
        for r in [0..1, 5..6, 0..37, 8..16, 36..37, 3..30] {
            let bytes = &payload[r.start as usize * BLOCK_SIZE..r.end as usize * BLOCK_SIZE];
            assert_eq!(prove_range(bytes, &ob, r.clone()).unwrap(), prove(&payload, &ob, r.clone()).unwrap());
        }
        // Rot in the blocks read, or the wrong number of bytes, proves nothing.
        let mut bytes = payload[5 * BLOCK_SIZE..7 * BLOCK_SIZE].to_vec();
        bytes[BLOCK_SIZE + 9] ^= 4;
        assert!(matches!(prove_range(&bytes, &ob, 5..7), Err(SegmentError::OutboardMismatch)));
        assert!(matches!(prove_range(&bytes, &ob, 5..6), Err(SegmentError::PayloadSize { .. })));
        assert!(matches!(prove_range(&bytes, &ob, 36..38), Err(SegmentError::BlockRange { .. })));
    }

    #[test]
    fn altered_truncated_misdirected_proofs_are_refused() {
        let (payload, ob) = shard(8, 2);
        let root = ob.root();
        let proof = prove(&payload, &ob, 2..4).unwrap();
        assert_eq!(verify_blocks(&root, 8, 2..4, &proof).unwrap(), &payload[2 * BLOCK_SIZE..4 * BLOCK_SIZE]);
        for at in [0, 63, 64 * 2, proof.len() - BLOCK_SIZE, proof.len() - 1] {
            let mut bad = proof.clone();
            bad[at] ^= 0x10;
            assert!(
                matches!(verify_blocks(&root, 8, 2..4, &bad), Err(SegmentError::ProofMismatch)),
                "byte {at}"
            );
        }
        for len in [0, 10, 64, proof.len() - 1] {
            assert!(
                matches!(verify_blocks(&root, 8, 2..4, &proof[..len]), Err(SegmentError::ProofTruncated)),
                "{len} bytes"
            );
        }
        let mut long = proof.clone();
        long.push(0);
        assert!(matches!(verify_blocks(&root, 8, 2..4, &long), Err(SegmentError::ProofTrailing(1))));
        for wrong in [3..5, 2..3, 0..2, 4..6] {
            assert!(verify_blocks(&root, 8, wrong.clone(), &proof).is_err(), "{wrong:?}");
        }
        assert!(verify_blocks(&root, 16, 2..4, &proof).is_err(), "another shard length");
        assert!(verify_blocks(&ShardRoot([1; 32]), 8, 2..4, &proof).is_err(), "another root");
        #[allow(clippy::reversed_empty_ranges)] // a reversed range is one of the bad inputs
        let bad_ranges = [4..4, 5..4, 7..9];
        for bad in bad_ranges {
            assert!(matches!(
                verify_blocks(&root, 8, bad.clone(), &proof),
                Err(SegmentError::BlockRange { .. })
            ));
            assert!(matches!(prove(&payload, &ob, bad), Err(SegmentError::BlockRange { .. })));
        }
        assert!(matches!(verify_blocks(&root, 0, 0..1, &proof), Err(SegmentError::BlocksPerShard(0))));
    }

    #[test]
    fn a_corrupt_local_copy_is_not_proved() {
        let (mut payload, ob) = shard(4, 3);
        payload[BLOCK_SIZE + 5] ^= 1;
        assert!(matches!(prove(&payload, &ob, 1..2), Err(SegmentError::OutboardMismatch)));
        let (payload, ob) = shard(4, 3);
        let mut hashes = ob.hashes().to_vec();
        hashes[0] ^= 1;
        let bad = ShardOutboard::from_parts(ob.root(), 4, hashes).unwrap();
        assert!(matches!(prove(&payload, &bad, 0..1), Err(SegmentError::OutboardMismatch)));
        assert!(matches!(prove(&payload[..BLOCK_SIZE], &ob, 0..1), Err(SegmentError::PayloadSize { .. })));
        assert!(matches!(
            ShardOutboard::from_parts(ob.root(), 4, vec![0; 10]),
            Err(SegmentError::OutboardSize { expected: 192, actual: 10, blocks: 4 })
        ));
        assert!(matches!(ShardOutboard::compute(&[0; 100]), Err(SegmentError::BlocksPerShard(0))));
        assert!(matches!(ShardOutboard::compute(&[0; 4097]), Err(SegmentError::PayloadSize { .. })));
    }

    #[test]
    fn the_outboard_is_bao_trees_for_every_size() {
        let data: Vec<u8> = (0..300 * BLOCK_SIZE).map(|i| (i * 31 + i / 4093) as u8).collect();
        for blocks in 1..=300usize {
            let payload = &data[..blocks * BLOCK_SIZE];
            let ours = ShardOutboard::compute(payload).unwrap();
            let theirs = PostOrderMemOutboard::create(payload, CHUNK_GROUP);
            assert_eq!(ours.root().0, *theirs.root.as_bytes(), "{blocks} blocks");
            assert_eq!(ours.root().0, *blake3::hash(payload).as_bytes(), "{blocks} blocks");
            assert_eq!(ours.hashes(), &theirs.data[..], "{blocks} blocks");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Random shard lengths and ranges: the proof verifies and gives
        /// the blocks; any flipped byte of it is refused.
        #[test]
        fn random_ranges_verify_and_flips_are_caught(
            blocks in 1u32..=40, seed in any::<u64>(), a in any::<u32>(), b in any::<u32>(),
            flip in any::<prop::sample::Index>(), bit in 0u8..8,
        ) {
            let (payload, ob) = shard(blocks, seed);
            let start = a % blocks;
            let end = start + 1 + b % (blocks - start);
            let proof = prove(&payload, &ob, start..end).unwrap();
            let got = verify_blocks(&ob.root(), blocks, start..end, &proof).unwrap();
            prop_assert_eq!(&got[..], &payload[start as usize * BLOCK_SIZE..end as usize * BLOCK_SIZE]);
            let mut bad = proof.clone();
            let at = flip.index(bad.len());
            bad[at] ^= 1 << bit;
            prop_assert!(verify_blocks(&ob.root(), blocks, start..end, &bad).is_err());
        }

        #[test]
        fn arbitrary_proofs_never_panic(
            blocks in 1u32..=20, start in 0u32..25, len in 0u32..5,
            proof in proptest::collection::vec(any::<u8>(), 0..9000),
        ) {
            let _ = verify_blocks(&ShardRoot([7; 32]), blocks, start..start + len, &proof);
        }
    }
}
