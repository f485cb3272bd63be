//! The root record: the one thing a volume's contents hang from.
//!
//! The directory keeps, per volume, the latest root record and swaps it by
//! compare-and-set with the writer's epoch (a commit). Everything a reader
//! trusts is reachable from it: the checkpoint's segment (by its segment
//! root, and where the checkpoint lies in it), then every segment written
//! since (each by its segment root), whose summaries bring the map up to
//! date. A MAC keyed from the volume key covers all of it, so neither the
//! directory nor a forced lease holder without the key can forge or alter
//! a root; the directory can still read the epoch and commit it needs for
//! the compare-and-set ([`UnverifiedRoot`]).
//!
//! It lives in the codec, below both the volume (which seals and opens
//! roots) and the directory (which parses them without the key), so the
//! two read the one format through one parser; `volume::v2::root`
//! re-exports it.
//!
//! A MAC does not stop *replay*: an older root was once valid. So the
//! attach folder remembers the newest (epoch, commit) it has seen
//! ([`Freshness`]) and refuses anything older; rolling back is a new commit
//! whose content is old, never an old root served again.
//!
//! ```
//! use meshdisk::codec::key::VolumeKey;
//! use meshdisk::codec::root::{Freshness, RootKey, RootRecord, UnverifiedRoot};
//! use meshdisk::codec::sequence::{SegmentId, Sequence};
//! let key = RootKey::derive(&VolumeKey::generate().unwrap());
//! let root = RootRecord {
//!     volume_id: [7; 16],
//!     epoch: 2,
//!     commit: 9,
//!     highest_sequence: Sequence::new(2, 300).unwrap(),
//!     highest_segment: SegmentId::new(2, 4).unwrap(),
//!     checkpoint: None,
//!     since: vec![],
//! };
//! let bytes = root.seal(&key);
//! let back = UnverifiedRoot::parse(&bytes).unwrap().verify(&key).unwrap();
//! assert_eq!(back, root);
//! let mut seen = Freshness::new(2, 10);
//! assert!(seen.accept(&back).is_err()); // commit 9 is older than 10
//! ```

use std::fmt;

use zeroize::Zeroizing;

use super::reader::{Reader, is_block_padding};
use crate::codec::key::{VOLUME_ID_LEN, VolumeKey};
pub use crate::codec::segment::SegmentRoot;
use crate::codec::sequence::{MAX_EPOCH, SegmentId, Sequence};

/// The first four bytes of an encoded root record.
pub const MAGIC: [u8; 4] = *b"MDRT";
/// The root record format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes before the list of segments written since the checkpoint.
pub const FIXED_LEN: usize = 104;
/// Bytes of one segment reference.
pub const SEGMENT_REF_LEN: usize = 40;
/// Bytes of the MAC at the end.
pub const MAC_LEN: usize = 32;
/// Most segments a root may name since its checkpoint. The writer
/// checkpoints before reaching it; it keeps a root under 41 KiB, well
/// inside etcd's 1.5 MiB request limit.
pub const MAX_SEGMENTS_SINCE: usize = 1024;

/// Context of the root MAC key (blake3 `derive_key`); versioned, since
/// changing it changes every MAC.
const MAC_CONTEXT: &str = "meshdisk 2026-11 volume root record mac v1";
/// Context of the root copies' MAC key: another key, so a copy (which
/// lacks part of its root) can never pass for a root.
const COPY_MAC_CONTEXT: &str = "meshdisk 2026-11 volume root copy mac v1";

/// The first four bytes of an encoded root copy.
pub const COPY_MAGIC: [u8; 4] = *b"MDRC";
/// The root copy format version this code writes and reads.
pub const COPY_VERSION: u16 = 1;
/// Bytes of a root copy before its record.
pub const COPY_HEADER_LEN: usize = 16;

const FLAG_CHECKPOINT: u16 = 1;

/// A segment the root reaches, and the root it must verify against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SegmentRef {
    pub id: SegmentId,
    pub root: SegmentRoot,
}

/// Where the latest checkpoint lies: `blocks` blocks from data slot
/// `first_slot` of `segment` hold the checkpoint's index of map pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CheckpointRef {
    pub segment: SegmentRef,
    pub first_slot: u32,
    pub blocks: u32,
}

/// A volume's root, as committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootRecord {
    pub volume_id: [u8; VOLUME_ID_LEN],
    /// The writer's fencing epoch (< 2^24).
    pub epoch: u64,
    /// Commit number: one more than the root it replaced.
    pub commit: u64,
    /// The highest sequence any committed entry carries (a floor for
    /// the next writer's [`Sequencer`](crate::codec::sequence::Sequencer)).
    pub highest_sequence: Sequence,
    /// The highest segment id ever committed (a floor likewise).
    pub highest_segment: SegmentId,
    /// The latest checkpoint; `None` before the first.
    pub checkpoint: Option<CheckpointRef>,
    /// Segments written since the checkpoint, by increasing id.
    pub since: Vec<SegmentRef>,
}

/// The key of root MACs, derived from the volume key. Zeroized on drop;
/// `Debug` prints nothing of it.
#[derive(Clone)]
pub struct RootKey {
    roots: Zeroizing<[u8; 32]>,
    copies: Zeroizing<[u8; 32]>,
}

impl RootKey {
    pub fn derive(key: &VolumeKey) -> Self {
        Self { roots: key.derive_mac_key(MAC_CONTEXT), copies: key.derive_mac_key(COPY_MAC_CONTEXT) }
    }

    fn mac(&self, body: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.roots, body)
    }

    fn copy_mac(&self, body: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.copies, body)
    }
}

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RootKey(<redacted>)")
    }
}

/// Errors from parsing, verifying and accepting a root record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RootError {
    #[error("root record truncated: {len} bytes, {need} needed")]
    Truncated { len: usize, need: usize },
    #[error("not a volume root record (magic {0:02x?}, expected \"MDRT\")")]
    Magic([u8; 4]),
    #[error("root record format version {0} is not supported (this meshdisk reads version {VERSION})")]
    Version(u16),
    #[error("root record has unknown flags {0:#06x}")]
    Flags(u16),
    #[error("root record: {0}")]
    Invalid(&'static str),
    #[error("root record names {0} segments since its checkpoint, more than {MAX_SEGMENTS_SINCE}")]
    TooManySegments(usize),
    #[error("root record has {0} bytes after its MAC that are not zero padding to a 4 KiB block")]
    Trailing(usize),
    #[error(
        "root record MAC mismatch: forged, altered, or sealed with another key (check the volume key; if it is right, the directory's root was tampered with)"
    )]
    Mac,
    #[error("root record is for volume {found}, not {expected}")]
    WrongVolume { expected: String, found: String },
    #[error(
        "the offered root (epoch {offered_epoch}, commit {offered_commit}) is older than the one this folder has already seen (epoch {seen_epoch}, commit {seen_commit}): refusing a rolled-back volume; a rollback is a new commit, never an older root served again"
    )]
    Stale { seen_epoch: u64, seen_commit: u64, offered_epoch: u64, offered_commit: u64 },
}

impl RootRecord {
    /// The root of a volume nothing was committed to yet.
    pub fn empty(volume_id: [u8; VOLUME_ID_LEN]) -> Self {
        Self {
            volume_id,
            epoch: 0,
            commit: 0,
            highest_sequence: Sequence::ZERO,
            highest_segment: SegmentId::ZERO,
            checkpoint: None,
            since: Vec::new(),
        }
    }

    /// Checks what the parser checks about the fields.
    pub fn validate(&self) -> Result<(), RootError> {
        if self.epoch > MAX_EPOCH {
            return Err(RootError::Invalid("epoch does not fit in 24 bits"));
        }
        if self.highest_sequence.epoch() > self.epoch {
            return Err(RootError::Invalid("highest sequence is from a newer epoch than the root's"));
        }
        if self.highest_segment.epoch() > self.epoch {
            return Err(RootError::Invalid("highest segment id is from a newer epoch than the root's"));
        }
        if self.since.len() > MAX_SEGMENTS_SINCE {
            return Err(RootError::TooManySegments(self.since.len()));
        }
        if let Some(c) = &self.checkpoint {
            if c.blocks == 0 {
                return Err(RootError::Invalid("checkpoint of zero blocks"));
            }
            if u64::from(c.first_slot) + u64::from(c.blocks) > u64::from(u32::MAX) {
                return Err(RootError::Invalid("checkpoint runs past the last slot"));
            }
            if c.segment.id > self.highest_segment {
                return Err(RootError::Invalid("checkpoint segment above the highest segment id"));
            }
        }
        if self.since.windows(2).any(|w| w[0].id >= w[1].id) {
            return Err(RootError::Invalid("segments since the checkpoint are not in increasing id order"));
        }
        if self.since.last().is_some_and(|s| s.id > self.highest_segment) {
            return Err(RootError::Invalid("a segment since the checkpoint is above the highest segment id"));
        }
        Ok(())
    }

    fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(FIXED_LEN + SEGMENT_REF_LEN * self.since.len() + MAC_LEN);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        let flags = if self.checkpoint.is_some() { FLAG_CHECKPOINT } else { 0 };
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&self.volume_id);
        b.extend_from_slice(&(self.epoch as u32).to_le_bytes());
        b.extend_from_slice(&(self.since.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.commit.to_le_bytes());
        b.extend_from_slice(&self.highest_sequence.raw().to_le_bytes());
        b.extend_from_slice(&self.highest_segment.raw().to_le_bytes());
        let c = self.checkpoint.unwrap_or(CheckpointRef {
            segment: SegmentRef { id: SegmentId::ZERO, root: SegmentRoot::default() },
            first_slot: 0,
            blocks: 0,
        });
        b.extend_from_slice(&c.segment.id.raw().to_le_bytes());
        b.extend_from_slice(&c.segment.root.0);
        b.extend_from_slice(&c.first_slot.to_le_bytes());
        b.extend_from_slice(&c.blocks.to_le_bytes());
        for s in &self.since {
            b.extend_from_slice(&s.id.raw().to_le_bytes());
            b.extend_from_slice(&s.root.0);
        }
        b
    }

    /// The record's bytes with their MAC (see docs/formats.md).
    ///
    /// # Panics
    /// If the record is invalid ([`Self::validate`]): sealing a root no
    /// reader accepts is a bug.
    pub fn seal(&self, key: &RootKey) -> Vec<u8> {
        if let Err(e) = self.validate() {
            panic!("sealing an invalid root record: {e}");
        }
        let mut b = self.body();
        let mac = key.mac(&b);
        b.extend_from_slice(mac.as_bytes());
        b
    }

    /// Parses, verifies the MAC and checks the volume id: the one call an
    /// attach makes on the root the directory hands it.
    pub fn open(bytes: &[u8], key: &RootKey, volume_id: &[u8; VOLUME_ID_LEN]) -> Result<Self, RootError> {
        let root = UnverifiedRoot::parse(bytes)?.verify(key)?;
        if &root.volume_id != volume_id {
            return Err(RootError::WrongVolume {
                expected: hex::encode(volume_id),
                found: hex::encode(root.volume_id),
            });
        }
        Ok(root)
    }
}

/// A root record whose structure parsed but whose MAC is not checked yet:
/// what the directory (which has no key) can read for its compare-and-set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnverifiedRoot {
    record: RootRecord,
    body_len: usize,
    bytes: Vec<u8>,
}

impl UnverifiedRoot {
    /// Parses a root record, strictly; the bytes may be followed by zero
    /// padding to a whole 4 KiB block (its copy in a segment). Never panics.
    pub fn parse(bytes: &[u8]) -> Result<Self, RootError> {
        let (record, body_len) = parse_body(bytes, MAC_LEN)?;
        let rest = &bytes[body_len + MAC_LEN..];
        if !is_block_padding(body_len + MAC_LEN, rest) {
            return Err(RootError::Trailing(rest.len()));
        }
        Ok(Self { record, body_len, bytes: bytes[..body_len + MAC_LEN].to_vec() })
    }

    /// The epoch it claims (not yet authenticated).
    pub fn epoch(&self) -> u64 {
        self.record.epoch
    }

    /// The commit number it claims (not yet authenticated).
    pub fn commit(&self) -> u64 {
        self.record.commit
    }

    /// The volume id it claims (not yet authenticated).
    pub fn volume_id(&self) -> &[u8; VOLUME_ID_LEN] {
        &self.record.volume_id
    }

    /// The highest segment id it claims (not yet authenticated): the
    /// directory refuses new segment records at or below it, and takes
    /// shards at or below it without a record for orphans.
    pub fn highest_segment(&self) -> SegmentId {
        self.record.highest_segment
    }

    /// The highest sequence it claims (not yet authenticated): a clone's
    /// lineage names its parent's, and a rollback may not lower it.
    pub fn highest_sequence(&self) -> Sequence {
        self.record.highest_sequence
    }

    /// The record, if its MAC is right under `key` (compared in constant
    /// time).
    pub fn verify(self, key: &RootKey) -> Result<RootRecord, RootError> {
        let (body, mac) = self.bytes.split_at(self.body_len);
        let expected: [u8; MAC_LEN] = mac.try_into().map_err(|_| RootError::Mac)?;
        if key.mac(body) == blake3::Hash::from_bytes(expected) {
            Ok(self.record)
        } else {
            Err(RootError::Mac)
        }
    }
}

/// A copy of a commit's root, carried in the commit's last segment (in its
/// trailer block), so that the roots can be rebuilt from the peers when
/// the directory's are lost. A segment cannot hold its own root, so the
/// copy lacks the carrier: its `since` holds the segments the commit wrote
/// before the carrier, after `inherited` ones from the previous root, and
/// a checkpoint in the carrier has a zero root ([`Self::root`] puts the
/// carrier back). Sealed under a key of its own, so a copy never passes
/// for a root. docs/formats.md draws it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootCopy {
    /// The root, less the carrier.
    pub partial: RootRecord,
    /// How many segments of the root's `since` come first, from the
    /// previous root (0 when the commit wrote a checkpoint).
    pub inherited: u32,
}

impl RootCopy {
    /// The copy of `root`, carried by `carrier` (the last segment of
    /// `root`'s commit), which continued a root naming `inherited`
    /// segments since its checkpoint.
    pub fn of(root: &RootRecord, carrier: SegmentId, inherited: u32) -> Result<Self, RootError> {
        let since =
            root.since.get(inherited as usize..).ok_or(RootError::Invalid("inherits more than it names"))?;
        let (last, own) = since.split_last().ok_or(RootError::Invalid("the carrier is not in the root"))?;
        if last.id != carrier {
            return Err(RootError::Invalid("the carrier is not the root's last segment"));
        }
        let mut partial = root.clone();
        partial.since = own.to_vec();
        if let Some(c) = &mut partial.checkpoint
            && c.segment.id == carrier
        {
            c.segment.root = SegmentRoot::default();
        }
        Ok(Self { partial, inherited })
    }

    /// The copy's bytes with their MAC.
    ///
    /// # Panics
    /// If the partial record is invalid: sealing a copy nobody can read
    /// back is a bug.
    pub fn seal(&self, key: &RootKey) -> Vec<u8> {
        if let Err(e) = self.partial.validate() {
            panic!("sealing an invalid root copy: {e}");
        }
        let mut b = Vec::with_capacity(
            COPY_HEADER_LEN + FIXED_LEN + SEGMENT_REF_LEN * self.partial.since.len() + MAC_LEN,
        );
        b.extend_from_slice(&COPY_MAGIC);
        b.extend_from_slice(&COPY_VERSION.to_le_bytes());
        b.extend_from_slice(&[0; 2]);
        b.extend_from_slice(&self.inherited.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&self.partial.body());
        let mac = key.copy_mac(&b);
        b.extend_from_slice(mac.as_bytes());
        b
    }

    /// Parses exactly `bytes` as a copy, checks its MAC under `key` and
    /// that it is of volume `volume_id`. Never panics.
    pub fn open(bytes: &[u8], key: &RootKey, volume_id: &[u8; VOLUME_ID_LEN]) -> Result<Self, RootError> {
        let mut r = Reader::new(bytes);
        let header = RootError::Truncated { len: bytes.len(), need: COPY_HEADER_LEN + FIXED_LEN + MAC_LEN };
        let (Some(magic), Some(version), Some(reserved), Some(inherited), Some(reserved2)) =
            (r.array::<4>(), r.u16(), r.u16(), r.u32(), r.u32())
        else {
            return Err(header);
        };
        if magic != COPY_MAGIC {
            return Err(RootError::Invalid("not a root copy (magic)"));
        }
        if version != COPY_VERSION {
            return Err(RootError::Version(version));
        }
        if reserved != 0 || reserved2 != 0 {
            return Err(RootError::Invalid("root copy reserved bytes are not zero"));
        }
        let (partial, body_len) = parse_body(&bytes[COPY_HEADER_LEN..], MAC_LEN)?;
        let end = COPY_HEADER_LEN + body_len;
        if bytes.len() != end + MAC_LEN {
            return Err(RootError::Trailing(bytes.len().saturating_sub(end + MAC_LEN)));
        }
        let expected: [u8; MAC_LEN] = bytes[end..].try_into().map_err(|_| RootError::Mac)?;
        if key.copy_mac(&bytes[..end]) != blake3::Hash::from_bytes(expected) {
            return Err(RootError::Mac);
        }
        if &partial.volume_id != volume_id {
            return Err(RootError::WrongVolume {
                expected: hex::encode(volume_id),
                found: hex::encode(partial.volume_id),
            });
        }
        Ok(Self { partial, inherited })
    }

    /// The root this copies: `previous_since` (the previous root's
    /// segments since its checkpoint, when the commit did not write one),
    /// then the copy's, then the carrier with the root its shards verify
    /// against.
    pub fn root(&self, previous_since: &[SegmentRef], carrier: SegmentRef) -> Result<RootRecord, RootError> {
        if previous_since.len() != self.inherited as usize {
            return Err(RootError::Invalid("the previous root does not name the segments the copy inherits"));
        }
        let mut root = self.partial.clone();
        root.since = previous_since.iter().chain(&self.partial.since).copied().chain([carrier]).collect();
        if let Some(c) = &mut root.checkpoint
            && c.segment.id == carrier.id
        {
            c.segment.root = carrier.root;
        }
        root.validate()?;
        Ok(root)
    }
}

/// Parses a root record's body (without its MAC), strictly, from the start
/// of `bytes`, which must have room for `after` more bytes behind it;
/// returns the record and the body's length. Never panics.
fn parse_body(bytes: &[u8], after: usize) -> Result<(RootRecord, usize), RootError> {
    let truncated = |need| RootError::Truncated { len: bytes.len(), need };
    let mut r = Reader::new(bytes);
    let fixed = truncated(FIXED_LEN + after);
    let magic = r.array::<4>().ok_or(fixed.clone())?;
    if magic != MAGIC {
        return Err(RootError::Magic(magic));
    }
    let version = r.u16().ok_or(fixed.clone())?;
    if version != VERSION {
        return Err(RootError::Version(version));
    }
    let (
        Some(flags),
        Some(volume_id),
        Some(epoch),
        Some(count),
        Some(commit),
        Some(seq),
        Some(highest_segment),
        Some(cp_id),
        Some(cp_root),
        Some(cp_slot),
        Some(cp_blocks),
    ) = (
        r.u16(),
        r.array::<VOLUME_ID_LEN>(),
        r.u32(),
        r.u32(),
        r.u64(),
        r.u64(),
        r.u64(),
        r.u64(),
        r.array::<32>(),
        r.u32(),
        r.u32(),
    )
    else {
        return Err(fixed);
    };
    if flags & !FLAG_CHECKPOINT != 0 {
        return Err(RootError::Flags(flags));
    }
    if count as usize > MAX_SEGMENTS_SINCE {
        return Err(RootError::TooManySegments(count as usize));
    }
    let body_len = FIXED_LEN + SEGMENT_REF_LEN * count as usize;
    if bytes.len() < body_len + after {
        return Err(truncated(body_len + after));
    }
    let checkpoint_ref = CheckpointRef {
        segment: SegmentRef { id: SegmentId::from_raw(cp_id), root: SegmentRoot(cp_root) },
        first_slot: cp_slot,
        blocks: cp_blocks,
    };
    let checkpoint = if flags & FLAG_CHECKPOINT != 0 {
        Some(checkpoint_ref)
    } else if cp_id != 0 || cp_root != [0; 32] || cp_slot != 0 || cp_blocks != 0 {
        return Err(RootError::Invalid("checkpoint fields set without the checkpoint flag"));
    } else {
        None
    };
    let mut since = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (Some(id), Some(root)) = (r.u64(), r.array::<32>()) else {
            return Err(truncated(body_len + after));
        };
        since.push(SegmentRef { id: SegmentId::from_raw(id), root: SegmentRoot(root) });
    }
    let record = RootRecord {
        volume_id,
        epoch: u64::from(epoch),
        commit,
        highest_sequence: Sequence::from_raw(seq),
        highest_segment: SegmentId::from_raw(highest_segment),
        checkpoint,
        since,
    };
    record.validate()?;
    Ok((record, body_len))
}

/// The newest (epoch, commit) an attach folder has seen of a volume's
/// root. A fresh folder starts at [`Freshness::NONE`] and so trusts the
/// directory for freshness on its first attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Freshness {
    epoch: u64,
    commit: u64,
}

impl Freshness {
    /// Nothing seen yet.
    pub const NONE: Self = Self { epoch: 0, commit: 0 };

    pub fn new(epoch: u64, commit: u64) -> Self {
        Self { epoch, commit }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn commit(&self) -> u64 {
        self.commit
    }

    /// Refuses a root older than what was seen; the same root again is fine.
    pub fn check(&self, root: &RootRecord) -> Result<(), RootError> {
        if (root.epoch, root.commit) < (self.epoch, self.commit) {
            return Err(RootError::Stale {
                seen_epoch: self.epoch,
                seen_commit: self.commit,
                offered_epoch: root.epoch,
                offered_commit: root.commit,
            });
        }
        Ok(())
    }

    /// [`Self::check`], then remembers `root` as the newest seen. The
    /// caller persists the new value before serving anything from `root`.
    pub fn accept(&mut self, root: &RootRecord) -> Result<(), RootError> {
        self.check(root)?;
        *self = Self { epoch: root.epoch, commit: root.commit };
        Ok(())
    }
}
