//! What a segment's data area holds, slot by slot, and how a commit packs
//! it.
//!
//! ```text
//! slot 0 ............ n-1 | n ......... | ...... D-2 | D-1
//!      data blocks        | metadata    | summary    | trailer
//!      (ciphertext as     | (map pages, | ("MDSM")   | ("MDTR": where the
//!       written: tweak    |  checkpoint |            |  summary and the
//!       address, seq.)    |  index)     |            |  metadata are)
//! ```
//!
//! The data slots hold blocks exactly as the writer encrypted them (the
//! tweak is the block's address and sequence, not its place), so a commit
//! moves ciphertext and compaction can too. Every block after them is a
//! metadata block, encrypted with the tweak ((1 << 63) | slot, segment id),
//! which no data block can have (addresses stay below 2^63). The last slot
//! is the **trailer**: it says where the summary and the other metadata
//! lie, so a reader that knows only the segment's geometry (every shard
//! header carries it) finds everything from the last block. A commit's
//! last segment also carries, after the trailer's fields, a copy of the
//! commit's root ([`crate::codec::root::RootCopy`]), so a lost directory
//! can be rebuilt from the peers.
//!
//! A segment is as long as what it holds needs, rounded up to whole shard
//! rows: a FLUSH that finds three dirty blocks writes a segment of
//! k × 1 blocks, not a full one.

use super::map::ADDRESS_LIMIT;
use super::reader::{BLOCK, Reader, is_block_padding};
use super::summary::{self, Summary, SummaryEntry};
use crate::codec::segment::{SegmentError, SegmentGeometry, data_shards, header_len};
use crate::codec::sequence::{SegmentId, Sequence};
use crate::codec::xts::SectorCipher;

/// The trailer's first four bytes.
pub const TRAILER_MAGIC: [u8; 4] = *b"MDTR";
/// The trailer format version this code writes and reads.
pub const TRAILER_VERSION: u16 = 1;
const TRAILER_LEN: usize = 40;
/// The longest root copy a trailer block carries.
pub const MAX_ROOT_COPY: usize = BLOCK - TRAILER_LEN;

/// The XTS "sector" of metadata block `slot`: above every block address.
pub fn metadata_sector(slot: u32) -> u64 {
    ADDRESS_LIMIT | u64::from(slot)
}

/// Encrypts metadata blocks in place; the first is at slot `first`.
pub fn seal_metadata(cipher: &SectorCipher, segment: SegmentId, first: u32, blocks: &mut [u8]) {
    for (i, b) in blocks.chunks_exact_mut(BLOCK).enumerate() {
        cipher.encrypt_in_place(metadata_sector(first + i as u32), segment.raw(), b);
    }
}

/// Decrypts metadata blocks in place; the first is at slot `first`.
pub fn open_metadata(cipher: &SectorCipher, segment: SegmentId, first: u32, blocks: &mut [u8]) {
    for (i, b) in blocks.chunks_exact_mut(BLOCK).enumerate() {
        cipher.decrypt_in_place(metadata_sector(first + i as u32), segment.raw(), b);
    }
}

/// Where a segment's summary and other metadata lie (its last block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    pub segment: SegmentId,
    /// Data slots `0..data_slots` hold data blocks.
    pub data_slots: u32,
    /// Metadata blocks other than the summary (map pages, checkpoint
    /// index and head): `data_slots..data_slots + metadata_blocks`.
    pub metadata_blocks: u32,
    /// The summary's first slot and its length in bytes (it fills whole
    /// blocks, zero-padded, up to the trailer).
    pub summary_slot: u32,
    pub summary_len: u32,
    /// Bytes of root copy after the fields (0: the segment is not the
    /// last of its commit).
    pub root_copy_len: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("segment {segment} trailer: {reason}")]
    Trailer { segment: SegmentId, reason: String },
    #[error(transparent)]
    Summary(#[from] summary::SummaryError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
}

impl Trailer {
    /// The trailer block: the fields, then `root_copy` (exactly
    /// `root_copy_len` bytes), then zeroes.
    pub fn encode(&self, root_copy: &[u8]) -> Vec<u8> {
        assert_eq!(root_copy.len(), usize::from(self.root_copy_len), "the root copy's length");
        let mut b = vec![0u8; BLOCK];
        b[0..4].copy_from_slice(&TRAILER_MAGIC);
        b[4..6].copy_from_slice(&TRAILER_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.segment.raw().to_le_bytes());
        b[16..20].copy_from_slice(&self.data_slots.to_le_bytes());
        b[20..24].copy_from_slice(&self.metadata_blocks.to_le_bytes());
        b[24..28].copy_from_slice(&self.summary_slot.to_le_bytes());
        b[28..32].copy_from_slice(&self.summary_len.to_le_bytes());
        b[32..34].copy_from_slice(&self.root_copy_len.to_le_bytes());
        b[TRAILER_LEN..TRAILER_LEN + root_copy.len()].copy_from_slice(root_copy);
        b
    }

    /// The root copy in a decoded trailer's (decrypted) block; `None` for
    /// a segment that carries none.
    pub fn root_copy<'a>(&self, block: &'a [u8]) -> Option<&'a [u8]> {
        match self.root_copy_len {
            0 => None,
            n => block.get(TRAILER_LEN..TRAILER_LEN + usize::from(n)),
        }
    }

    /// Parses the (decrypted) last block of segment `segment` of geometry
    /// `g`, checking that every region lies inside the data area in order.
    pub fn decode(bytes: &[u8], segment: SegmentId, g: SegmentGeometry) -> Result<Self, LayoutError> {
        let bad = |reason: &str| LayoutError::Trailer { segment, reason: reason.to_string() };
        let mut r = Reader::new(bytes);
        if r.array::<4>() != Some(TRAILER_MAGIC) {
            return Err(bad("not a segment trailer (magic)"));
        }
        match r.u16() {
            Some(TRAILER_VERSION) => {}
            Some(v) => return Err(bad(&format!("format version {v} is not supported"))),
            None => return Err(bad("truncated")),
        }
        let (flags, id, data_slots, metadata_blocks, summary_slot, summary_len, root_copy_len, reserved) =
            match (r.u16(), r.u64(), r.u32(), r.u32(), r.u32(), r.u32(), r.u16(), r.array::<6>()) {
                (Some(f), Some(id), Some(d), Some(m), Some(s), Some(l), Some(c), Some(res)) => {
                    (f, id, d, m, s, l, c, res)
                }
                _ => return Err(bad("truncated")),
            };
        if flags != 0 || reserved != [0; 6] {
            return Err(bad("unknown flags or reserved bytes set"));
        }
        if id != segment.raw() {
            return Err(bad(&format!("names segment {}", SegmentId::from_raw(id))));
        }
        if usize::from(root_copy_len) > MAX_ROOT_COPY || bytes.len() != BLOCK {
            return Err(bad("not one block"));
        }
        let after = TRAILER_LEN + usize::from(root_copy_len);
        if !is_block_padding(after, &bytes[after..]) {
            return Err(bad("not zero padding after the fields and the root copy"));
        }
        let last = g.data_blocks() - 1;
        let summary_blocks = u64::from(summary_len).div_ceil(BLOCK as u64);
        let metadata_end = u64::from(data_slots) + u64::from(metadata_blocks);
        if metadata_end != u64::from(summary_slot)
            || u64::from(summary_slot) + summary_blocks != last
            || (summary_len as usize) < summary::HEADER_LEN
        {
            return Err(bad("regions do not tile the data area"));
        }
        Ok(Self { segment, data_slots, metadata_blocks, summary_slot, summary_len, root_copy_len })
    }
}

/// One block to pack: its address, sequence and ciphertext.
pub struct PackedBlock<'a> {
    pub address: u64,
    pub sequence: Sequence,
    pub data: &'a [u8],
}

/// Gathers a commit's blocks and zero ranges into one segment, counting
/// as it goes whether the next one still fits in `max_blocks_per_shard`.
///
/// Blocks go straight to their place in a full segment's data shards, each
/// behind room for its shard header, so a full segment is erasure-coded
/// and sent from where it was packed; a shorter one (fewer rows) is laid
/// out again at [`Packer::finish`].
#[derive(Debug)]
pub struct Packer {
    k: usize,
    m: usize,
    max_blocks_per_shard: u32,
    max_data_blocks: u64,
    /// Bytes in front of each data shard's payload: the shard header's.
    room: usize,
    /// The data shards filled so far, slot s in shard s / max blocks per
    /// shard.
    shards: Vec<Vec<u8>>,
    entries: Vec<SummaryEntry>,
    slots: u32,
}

impl Packer {
    /// A packer for segments of `k` data and `m` parity shards of at most
    /// `max_blocks_per_shard` blocks (a geometry the volume was made with).
    pub fn new(k: usize, m: usize, max_blocks_per_shard: u32) -> Self {
        let g =
            SegmentGeometry::new(k, m, max_blocks_per_shard).expect("a volume's segment geometry is valid");
        Self {
            k,
            m,
            max_blocks_per_shard,
            max_data_blocks: k as u64 * u64::from(max_blocks_per_shard),
            room: header_len(g),
            shards: Vec::new(),
            entries: Vec::new(),
            slots: 0,
        }
    }

    /// Appends block `data` at `slot` of a full-size segment.
    fn place(&mut self, slot: u32, data: &[u8]) {
        let shard = (slot / self.max_blocks_per_shard) as usize;
        while self.shards.len() <= shard {
            // Each shard whole at once: growing it block by block would
            // copy what is packed again and again.
            let mut s = Vec::with_capacity(self.room + self.max_blocks_per_shard as usize * BLOCK);
            s.resize(self.room, 0);
            self.shards.push(s);
        }
        debug_assert_eq!(
            self.shards[shard].len(),
            self.room + (slot % self.max_blocks_per_shard) as usize * BLOCK
        );
        self.shards[shard].extend_from_slice(data);
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The highest sequence of what is packed (a run of blocks carries
    /// consecutive sequences from its first).
    pub fn highest_sequence(&self) -> Option<Sequence> {
        self.entries
            .iter()
            .map(|e| match *e {
                SummaryEntry::Data { sequence, len, .. } => sequence.checked_add(len - 1).unwrap_or(sequence),
                SummaryEntry::Zero { sequence, .. } => sequence,
            })
            .max()
    }

    /// Data slots used so far.
    pub fn data_slots(&self) -> u32 {
        self.slots
    }

    fn summary_len(entries: usize) -> u64 {
        (summary::HEADER_LEN + entries * summary::ENTRY_LEN) as u64
    }

    /// Blocks the segment needs for `slots` data blocks and `entries`
    /// summary entries, `metadata` other metadata blocks and the trailer.
    fn needs(slots: u64, entries: usize, metadata: u64) -> u64 {
        slots + metadata + Self::summary_len(entries).div_ceil(BLOCK as u64) + 1
    }

    /// Metadata blocks the segment still has room for, at its full size,
    /// with what it holds now (a segment of no data: all but the summary's
    /// block and the trailer).
    pub fn metadata_room(&self) -> u64 {
        self.max_data_blocks.saturating_sub(Self::needs(u64::from(self.slots), self.entries.len(), 0))
    }

    /// Would a data block (possibly a new summary entry) still fit?
    pub fn fits_block(&self, metadata: u64) -> bool {
        Self::needs(u64::from(self.slots) + 1, self.entries.len() + 1, metadata) <= self.max_data_blocks
    }

    /// Would one more zero entry still fit?
    pub fn fits_zero(&self, metadata: u64) -> bool {
        Self::needs(u64::from(self.slots), self.entries.len() + 1, metadata) <= self.max_data_blocks
    }

    /// Adds a data block in the next slot (the caller checked
    /// [`Self::fits_block`]). Extends the previous entry when the block
    /// follows it in address, sequence and slot.
    pub fn push_block(&mut self, b: PackedBlock<'_>) {
        debug_assert_eq!(b.data.len(), BLOCK);
        let slot = self.slots;
        self.place(slot, b.data);
        self.slots += 1;
        if let Some(SummaryEntry::Data { start, len, slot: first, sequence }) = self.entries.last_mut()
            && *start + *len == b.address
            && u64::from(*first) + *len == u64::from(slot)
            && sequence.checked_add(*len) == Some(b.sequence)
        {
            *len += 1;
            return;
        }
        self.entries.push(SummaryEntry::Data { start: b.address, len: 1, slot, sequence: b.sequence });
    }

    /// Adds blocks `start..start + len` reading as zeroes from `sequence` on.
    pub fn push_zero(&mut self, start: u64, len: u64, sequence: Sequence) {
        if let Some(SummaryEntry::Zero { start: s, len: l, sequence: q }) = self.entries.last_mut()
            && *s + *l == start
            && *q == sequence
        {
            *l += len;
            return;
        }
        self.entries.push(SummaryEntry::Zero { start, len, sequence });
    }

    /// Lays the segment out: data slots, `metadata` blocks (plaintext,
    /// whole blocks: encrypted here), the summary, the trailer; as few
    /// shard rows as that takes. Returns the geometry, the k data shards
    /// (each with [`header_len`] bytes of room in front of its payload, for
    /// [`crate::codec::segment::SegmentCodec::encode_shards`]) and the
    /// summary.
    pub fn finish(
        mut self,
        segment: SegmentId,
        metadata: &[u8],
        root_copy: &[u8],
        cipher: &SectorCipher,
    ) -> Result<(SegmentGeometry, Vec<Vec<u8>>, Summary), LayoutError> {
        assert!(metadata.len().is_multiple_of(BLOCK), "metadata comes in whole blocks");
        if root_copy.len() > MAX_ROOT_COPY {
            return Err(LayoutError::Trailer {
                segment,
                reason: format!(
                    "a root copy of {} bytes does not fit (at most {MAX_ROOT_COPY})",
                    root_copy.len()
                ),
            });
        }
        let metadata_blocks = (metadata.len() / BLOCK) as u64;
        let entries = std::mem::take(&mut self.entries);
        let summary = Summary { segment, slots: self.slots, entries };
        summary.validate()?;
        let encoded = summary.encode();
        let summary_blocks = encoded.len().div_ceil(BLOCK) as u64;
        let used = u64::from(self.slots) + metadata_blocks + summary_blocks + 1;
        let bps = used.div_ceil(self.k as u64).max(1);
        let g = SegmentGeometry::new(self.k, self.m, u32::try_from(bps).unwrap_or(u32::MAX))?;
        let total = g.data_blocks();
        // Zero blocks between the metadata and the summary pad out the last
        // row; the summary ends right before the trailer.
        let summary_slot = (total - 1 - summary_blocks) as u32;
        let metadata_blocks = summary_slot - self.slots;
        let meta_first = self.slots;
        // Everything after the data slots, sealed together.
        let mut tail = Vec::with_capacity((total as usize - meta_first as usize) * BLOCK);
        tail.extend_from_slice(metadata);
        tail.resize((summary_slot - meta_first) as usize * BLOCK, 0);
        tail.extend_from_slice(&encoded);
        tail.resize((total as usize - 1 - meta_first as usize) * BLOCK, 0);
        let trailer = Trailer {
            segment,
            data_slots: self.slots,
            metadata_blocks,
            summary_slot,
            summary_len: encoded.len() as u32,
            root_copy_len: root_copy.len() as u16,
        };
        tail.extend_from_slice(&trailer.encode(root_copy));
        seal_metadata(cipher, segment, meta_first, &mut tail);
        let shards = if g.blocks_per_shard() == self.max_blocks_per_shard {
            for (i, block) in tail.chunks_exact(BLOCK).enumerate() {
                self.place(meta_first + i as u32, block);
            }
            self.shards
        } else {
            // Fewer rows than a full segment: the slots move to their
            // places in the shorter shards.
            let mut area: Vec<u8> = Vec::with_capacity(g.data_area_len());
            for s in &self.shards {
                area.extend_from_slice(&s[self.room..]);
            }
            area.extend_from_slice(&tail);
            data_shards(g, &area)
        };
        debug_assert_eq!(shards.len(), self.k);
        debug_assert!(shards.iter().all(|s| s.len() == self.room + g.shard_len()));
        Ok((g, shards, summary))
    }
}

/// Parses a segment's summary from its decrypted summary blocks.
pub fn decode_summary(trailer: &Trailer, blocks: &[u8]) -> Result<Summary, LayoutError> {
    let bytes = blocks.get(..trailer.summary_len as usize).ok_or_else(|| LayoutError::Trailer {
        segment: trailer.segment,
        reason: "summary blocks missing".into(),
    })?;
    let s = Summary::decode(bytes)?;
    if s.segment != trailer.segment || s.slots != trailer.data_slots {
        return Err(LayoutError::Trailer {
            segment: trailer.segment,
            reason: format!("its summary is of segment {} with {} slots", s.segment, s.slots),
        });
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::key::VolumeKey;

    fn test_key() -> VolumeKey {
        VolumeKey::from_bytes(&(0..64).collect::<Vec<u8>>()).unwrap()
    }

    fn seq(e: u64, c: u64) -> Sequence {
        Sequence::new(e, c).unwrap()
    }

    /// The data area the shards hold (each shard's payload, after the
    /// header's room), shard-major.
    fn flat(g: SegmentGeometry, shards: &[Vec<u8>]) -> Vec<u8> {
        let room = header_len(g);
        assert_eq!(shards.len(), g.k());
        assert!(shards.iter().all(|s| s.len() == room + g.shard_len()));
        shards.iter().flat_map(|s| s[room..].iter().copied()).collect()
    }

    #[test]
    fn a_packed_segment_reads_back_from_its_trailer() {
        let key = test_key();
        let cipher = SectorCipher::new(&key);
        let mut p = Packer::new(4, 2, 256);
        let blocks: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; BLOCK]).collect();
        for (i, b) in blocks.iter().enumerate() {
            assert!(p.fits_block(0));
            // 0..5 consecutive (one entry), then scattered.
            let address = if i < 5 { 100 + i as u64 } else { 1000 * i as u64 };
            p.push_block(PackedBlock { address, sequence: seq(2, 10 + i as u64), data: b });
        }
        p.push_zero(50, 10, seq(2, 40));
        p.push_zero(60, 5, seq(2, 40));
        let segment = SegmentId::new(2, 3).unwrap();
        // The last segment of a commit: its trailer carries a root copy
        // (opaque here; the codec seals and opens it).
        let copy: Vec<u8> = (0..300).map(|i| i as u8 | 1).collect();
        let (g, shards, summary) = p.finish(segment, &[], &copy, &cipher).unwrap();
        let area = flat(g, &shards);
        // 10 data + 1 summary + 1 trailer = 12 blocks: 3 rows of 4.
        assert_eq!(g.blocks_per_shard(), 3);
        assert_eq!(summary.entries.len(), 7, "{:?}", summary.entries);
        assert_eq!(&area[..BLOCK * 10], &blocks.concat()[..]);
        let last = g.data_blocks() as u32 - 1;
        let mut t = area[last as usize * BLOCK..].to_vec();
        open_metadata(&cipher, segment, last, &mut t);
        let trailer = Trailer::decode(&t, segment, g).unwrap();
        assert_eq!(trailer.data_slots, 10);
        assert_eq!(trailer.root_copy(&t), Some(&copy[..]));
        let mut s = area[trailer.summary_slot as usize * BLOCK..last as usize * BLOCK].to_vec();
        open_metadata(&cipher, segment, trailer.summary_slot, &mut s);
        assert_eq!(decode_summary(&trailer, &s).unwrap(), summary);
        // Another segment's trailer, or a bent field, is refused.
        let other = SegmentId::new(2, 4).unwrap();
        assert!(Trailer::decode(&t, other, g).is_err());
        let mut bent = t.clone();
        bent[24] ^= 1;
        assert!(Trailer::decode(&bent, segment, g).is_err());
        // A byte after the copy, or a copy length past the block, too.
        let mut bent = t.clone();
        bent[TRAILER_LEN + copy.len()] = 1;
        assert!(Trailer::decode(&bent, segment, g).is_err());
        let mut bent = t.clone();
        bent[32..34].copy_from_slice(&(MAX_ROOT_COPY as u16 + 1).to_le_bytes());
        assert!(Trailer::decode(&bent, segment, g).is_err());
        // A copy longer than the trailer block can hold is refused.
        let mut p = Packer::new(4, 2, 256);
        p.push_zero(0, 1, seq(2, 1));
        let err = p.finish(segment, &[], &vec![1; MAX_ROOT_COPY + 1], &cipher).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    #[test]
    fn a_full_packer_says_so_before_it_overflows() {
        let mut p = Packer::new(2, 1, 4);
        let b = vec![1u8; BLOCK];
        let mut n = 0;
        while p.fits_block(0) {
            p.push_block(PackedBlock { address: n * 2, sequence: seq(1, 1 + n), data: &b });
            n += 1;
        }
        // 8 blocks: data + one summary block + the trailer.
        assert_eq!(n, 6);
        let key = test_key();
        let (g, shards, _) =
            p.finish(SegmentId::new(1, 1).unwrap(), &[], &[], &SectorCipher::new(&key)).unwrap();
        assert_eq!(g.blocks_per_shard(), 4);
        assert_eq!(flat(g, &shards).len(), g.data_area_len());
    }

    #[test]
    fn metadata_fills_the_room_a_packer_reports() {
        let key = test_key();
        let cipher = SectorCipher::new(&key);
        let mut p = Packer::new(4, 2, 4);
        assert_eq!(p.metadata_room(), 14, "16 blocks less a summary block and the trailer");
        let b = vec![9u8; BLOCK];
        for i in 0..3 {
            p.push_block(PackedBlock { address: 10 * i, sequence: seq(1, 1 + i), data: &b });
        }
        assert_eq!(p.metadata_room(), 11);
        // Exactly the room: still one full-size segment, the metadata after
        // the data slots, sealed with the metadata tweak.
        let meta: Vec<u8> = (0..11 * BLOCK).map(|i| (i / BLOCK) as u8).collect();
        let segment = SegmentId::new(1, 9).unwrap();
        let (g, shards, _) = p.finish(segment, &meta, &[], &cipher).unwrap();
        let area = flat(g, &shards);
        assert_eq!(g.blocks_per_shard(), 4);
        let mut back = area[3 * BLOCK..14 * BLOCK].to_vec();
        assert_ne!(back, meta);
        open_metadata(&cipher, segment, 3, &mut back);
        assert_eq!(back, meta);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Full segments (blocks placed where they stay) and shorter ones
        /// (laid out again) read back the same way: the data blocks in
        /// push order from slot 0, the metadata after them, the summary
        /// and the trailer at the end.
        #[test]
        fn packed_shards_hold_the_blocks_in_slot_order(
            k in 1usize..5, m in 1usize..3, max_bps in 1u32..6, fill in 0.0f64..1.0, meta_share in 0.0f64..1.0,
        ) {
            let key = test_key();
            let cipher = SectorCipher::new(&key);
            let mut p = Packer::new(k, m, max_bps);
            let room = p.metadata_room();
            let want = ((room as f64) * fill) as u64;
            let mut pushed = Vec::new();
            while (pushed.len() as u64) < want && p.fits_block(0) {
                let i = pushed.len() as u64;
                let b: Vec<u8> = (0..BLOCK).map(|j| (j as u64 * 7 + i * 13) as u8).collect();
                // Every other block scattered: more summary entries.
                let address = if i.is_multiple_of(2) { 100 + i } else { 10_000 * (i + 1) };
                p.push_block(PackedBlock { address, sequence: seq(1, 1 + i), data: &b });
                pushed.push(b);
            }
            let meta_blocks = ((p.metadata_room() as f64) * meta_share) as usize;
            let meta: Vec<u8> = (0..meta_blocks * BLOCK).map(|i| (i / BLOCK + 1) as u8).collect();
            let segment = SegmentId::new(1, 7).unwrap();
            let (g, shards, summary) = p.finish(segment, &meta, &[3; 40], &cipher).unwrap();
            let area = flat(g, &shards);
            proptest::prop_assert_eq!(&area[..pushed.len() * BLOCK], &pushed.concat()[..]);
            let last = g.data_blocks() as u32 - 1;
            let mut t = area[last as usize * BLOCK..].to_vec();
            open_metadata(&cipher, segment, last, &mut t);
            let trailer = Trailer::decode(&t, segment, g).unwrap();
            proptest::prop_assert_eq!(trailer.data_slots as usize, pushed.len());
            proptest::prop_assert_eq!(trailer.root_copy(&t), Some(&[3u8; 40][..]));
            let mut s = area[trailer.summary_slot as usize * BLOCK..last as usize * BLOCK].to_vec();
            open_metadata(&cipher, segment, trailer.summary_slot, &mut s);
            proptest::prop_assert_eq!(decode_summary(&trailer, &s).unwrap(), summary);
            let first = pushed.len();
            let mut back = area[first * BLOCK..(first + meta_blocks) * BLOCK].to_vec();
            open_metadata(&cipher, segment, first as u32, &mut back);
            proptest::prop_assert_eq!(back, meta);
        }
    }

    #[test]
    fn a_trims_only_segment_is_one_row() {
        let mut p = Packer::new(4, 2, 256);
        p.push_zero(0, 1 << 20, seq(1, 5));
        let key = test_key();
        let (g, _, summary) =
            p.finish(SegmentId::new(1, 1).unwrap(), &[], &[], &SectorCipher::new(&key)).unwrap();
        assert_eq!(g.blocks_per_shard(), 1);
        assert_eq!(summary.slots, 0);
    }
}
