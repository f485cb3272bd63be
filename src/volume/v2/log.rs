//! The local log: the attaching machine's write-back buffer.
//!
//! Every block write lands here first, as the CIPHERTEXT the engine made
//! (XTS, tweak = (address, sequence)); a commit reads it back to build
//! segments, and reads of uncommitted or recently committed blocks are
//! served from it. The log never encrypts: it authenticates. Every record carries keyed
//! blake3 tags (a [`LogKey`] derived from the volume key) bound to the
//! volume id and the record's position, so a record cannot be forged, moved
//! or taken from another volume's log; tags are checked at replay and on
//! every read.
//!
//! ```text
//! <folder>/LOCK                  flock(LOCK_EX|LOCK_NB) for the log's life; holds our pid
//! <folder>/log/meta              magic, version, volume id, key check (written once; version 1 rewritten as 2)
//! <folder>/log/00000001.log      file header, then records back to back
//! <folder>/log/00000002.log      the next file, started when a record does not fit
//! ```
//!
//! Records (byte layout in docs/formats.md): `Write` (consecutive blocks,
//! block i has sequence + i, each block with its own tag so one block is
//! read and checked alone), `Zero` (zeroes and trims, one sequence for the
//! range), `Base` (the records after it were written against root (epoch,
//! commit)) and `Committed` (everything up to a sequence is in a committed
//! root).
//!
//! **Appends.** [`LocalLog::append`] takes several records, reserves one
//! contiguous region for them under a short lock (rolling over to a new file
//! when they do not fit) and writes them with one io_uring write outside
//! the lock, so concurrent appenders write at once into disjoint regions.
//! Nothing is synced: [`LocalLog::sync`] waits until every append reserved
//! before it has been written, then `fdatasync`s the files written since the
//! last sync (and the folder when a file was created). Concurrent syncs
//! are served one after the other, and one that finds its records already
//! synced by an earlier one returns at once.
//!
//! **Torn tails and corruption.** With concurrent appenders, a crash can
//! leave a hole (an append whose write never happened) followed by records
//! that were written but never synced, so "the first bad record is the end
//! of the log" is not enough to tell a torn tail from damage. Each record
//! therefore carries a *durable mark*: the position up to which the log was
//! synced when the record was reserved. Replay cuts the log at its first bad
//! spot unless a valid record after it has a mark beyond it, which proves
//! the bad spot was synced once: that is damage, and opening fails naming
//! the file and offset rather than silently dropping acknowledged writes.
//! A cut also drops the valid records after the bad spot (none of them was
//! ever synced: a sync waits for every earlier append to be written first),
//! though their sequences still count toward the replay's highest.
//! Replay's records are synced at open, so later records mark them durable.
//!
//! **Release.** [`LocalLog::release`] deletes whole files once every Write
//! and Zero record in them is at or below the committed sequence, except the
//! file appended to, files with appends in flight, and the files holding the
//! newest `Base` and the newest `Committed` record (the engine appends a
//! Base after every commit, so that file is recent anyway), and the file of
//! the record the engine asked to [keep](LocalLog::keep). Deleting is not
//! synced: a file that comes back after a crash holds only committed
//! records, which replay harmlessly.
//!
//! What the tags do not stop: someone who can write the folder can delete
//! files or cut the log short (rollback); the root's freshness, not the log,
//! guards against an old state.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::codec::key::{VOLUME_ID_LEN, VolumeKey};
use crate::codec::segment::BLOCK_SIZE;
use crate::codec::sequence::{SegmentId, Sequence};
use crate::sys::durable;
use crate::sys::uring::{RegisteredFile, Uring};

/// The first bytes of every log file.
pub const FILE_MAGIC: [u8; 4] = *b"MDLG";
/// The first bytes of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"MDLR";
/// The first bytes of the `meta` file.
pub const META_MAGIC: [u8; 8] = *b"MDLGMETA";
/// The log format version this code writes. It reads [`VERSION_1`] files
/// too (their block tags hash the block last), so an attach folder left by
/// the previous version replays; new files are always this version.
pub const VERSION: u16 = 2;
/// The first format: block tags hash the record's position and header
/// first, then the block (a misaligned blake3 input: about half as fast).
pub const VERSION_1: u16 = 1;
/// Bytes of a log file's header.
pub const FILE_HEADER_LEN: usize = 64;
/// Bytes of a record's header (fields and header tag).
pub const RECORD_HEADER_LEN: usize = 80;
/// Bytes of one block in a Write record: its tag, then its ciphertext.
pub const BLOCK_ENTRY_LEN: usize = 32 + BLOCK_SIZE;
/// blake3 `derive_key` context of the [`LogKey`].
pub const LOG_KEY_CONTEXT: &str = "meshdisk v2 local log";

const META_LEN: usize = 64;
/// Bytes of a record header covered by its tag.
const HEAD_LEN: usize = 48;
const KIND_WRITE: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_BASE: u8 = 3;
const KIND_COMMITTED: u8 = 4;
const MIN_FILE_BYTES: u64 = 64 << 10;
const MAX_FILE_BYTES: u64 = 1 << 30;

/// Errors from the local log. Each names the folder or file it is about.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(
        "{folder} is in use by another attach{}: detach it first, or use another --state-dir",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    InUse { folder: PathBuf, pid: Option<u32> },
    #[error("local log {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("local log {0} belongs to another volume: use this volume's state folder, or move that one away")]
    NotOurs(PathBuf),
    #[error("local log {0} was written with another key: check the key file or passphrase")]
    WrongKey(PathBuf),
    #[error(
        "local log file {path} is damaged at offset {offset}: {why} (move the state folder away to start over, losing its unflushed writes)"
    )]
    Corrupt { path: PathBuf, offset: u32, why: String },
    #[error("local log {path} is poisoned by an earlier error ({first}): re-attach")]
    Poisoned { path: PathBuf, first: String },
    #[error("local log is full ({used} of {max} bytes): wait for destage")]
    Full { used: u64, max: u64 },
    #[error("an append of {bytes} bytes does not fit in one log file (at most {max})")]
    TooBig { bytes: u64, max: u64 },
    #[error("bad log record: {0}")]
    BadRecord(&'static str),
    #[error("no record at {0}: its file was released")]
    Released(LogPos),
    #[error("bad log configuration: {0}")]
    Config(String),
}

fn io_err(path: &Path, e: impl fmt::Display) -> LogError {
    LogError::Io { path: path.to_owned(), message: e.to_string() }
}

/// The 256-bit key of the log's tags, derived from the volume key with
/// blake3 `derive_key` and [`LOG_KEY_CONTEXT`]. Zeroized on drop.
pub struct LogKey(Zeroizing<[u8; 32]>);

impl LogKey {
    pub fn derive(key: &VolumeKey) -> Self {
        Self(key.derive_mac_key(LOG_KEY_CONTEXT))
    }

    fn hasher(&self, label: &[u8; 4], volume: &[u8; VOLUME_ID_LEN]) -> blake3::Hasher {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(label);
        h.update(volume);
        h
    }
}

impl fmt::Debug for LogKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LogKey(<redacted>)")
    }
}

/// Where a record starts: log file number, byte offset in it. Ordered as
/// the log is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogPos {
    pub file: u32,
    pub offset: u32,
}

impl fmt::Display for LogPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08}.log+{}", self.file, self.offset)
    }
}

/// "The records after this were written against root (epoch, commit)".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Base {
    pub epoch: u64,
    pub commit: u64,
    pub segment_floor: SegmentId,
    pub sequence_floor: Sequence,
}

/// A record to append. Write ciphertext is whole 4 KiB blocks.
#[derive(Clone, Copy, Debug)]
pub enum NewRecord<'a> {
    /// `ciphertext.len() / 4096` blocks from `address`; block i has
    /// sequence `sequence + i`.
    Write {
        address: u64,
        sequence: Sequence,
        ciphertext: &'a [u8],
    },
    /// Blocks `address..address + blocks` read as zeroes from `sequence` on.
    Zero {
        address: u64,
        blocks: u64,
        sequence: Sequence,
    },
    Base(Base),
    /// Everything up to `sequence` is in a committed root.
    Committed {
        sequence: Sequence,
    },
}

/// What a record says, without its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordHead {
    Write { address: u64, blocks: u32, sequence: Sequence },
    Zero { address: u64, blocks: u64, sequence: Sequence },
    Base(Base),
    Committed { sequence: Sequence },
}

impl RecordHead {
    /// The highest sequence the record names (Base: its sequence floor).
    pub fn highest_sequence(&self) -> Sequence {
        match *self {
            // Checked when encoded and decoded: the last block's sequence fits.
            RecordHead::Write { sequence, blocks, .. } => {
                sequence.checked_add(u64::from(blocks) - 1).unwrap_or(sequence)
            }
            RecordHead::Zero { sequence, .. } | RecordHead::Committed { sequence } => sequence,
            RecordHead::Base(b) => b.sequence_floor,
        }
    }

    /// Bytes of the encoded record.
    pub fn encoded_len(&self) -> usize {
        match *self {
            RecordHead::Write { blocks, .. } => RECORD_HEADER_LEN + blocks as usize * BLOCK_ENTRY_LEN,
            _ => RECORD_HEADER_LEN,
        }
    }

    /// The sequence a Write or Zero record holds data up to (release waits
    /// for it to be committed); None for Base and Committed.
    fn data_sequence(&self) -> Option<Sequence> {
        match self {
            RecordHead::Write { .. } | RecordHead::Zero { .. } => Some(self.highest_sequence()),
            _ => None,
        }
    }
}

impl NewRecord<'_> {
    fn head(&self) -> Result<RecordHead, LogError> {
        let head = match *self {
            NewRecord::Write { address, sequence, ciphertext } => {
                if ciphertext.is_empty() || !ciphertext.len().is_multiple_of(BLOCK_SIZE) {
                    return Err(LogError::BadRecord("write ciphertext must be whole 4 KiB blocks"));
                }
                let blocks = u32::try_from(ciphertext.len() / BLOCK_SIZE)
                    .map_err(|_| LogError::BadRecord("write of too many blocks"))?;
                RecordHead::Write { address, blocks, sequence }
            }
            NewRecord::Zero { address, blocks, sequence } => RecordHead::Zero { address, blocks, sequence },
            NewRecord::Base(b) => RecordHead::Base(b),
            NewRecord::Committed { sequence } => RecordHead::Committed { sequence },
        };
        validate(&head).map_err(LogError::BadRecord)?;
        Ok(head)
    }
}

/// A Write record built in the layout it is written in: room for the
/// header, then each block behind room for its tag. The writer encrypts
/// each block straight into its place; the log fills in the header and
/// the tags once it knows the record's position, writes these bytes and
/// keeps them for the commit, so the ciphertext is never copied again.
#[derive(Debug)]
pub struct WriteRecord {
    buf: Vec<u8>,
    /// Blocks pushed.
    pushed: usize,
    /// A push was not one whole block: the tags would not sit where
    /// [`encode_record`] puts them (even if the lengths add up to whole
    /// entries), so `append_write` refuses the record.
    ragged: bool,
}

impl WriteRecord {
    /// An empty record with room for `blocks` blocks.
    pub fn with_capacity(blocks: usize) -> Self {
        let mut buf = Vec::with_capacity(RECORD_HEADER_LEN + blocks * BLOCK_ENTRY_LEN);
        buf.resize(RECORD_HEADER_LEN, 0);
        Self { buf, pushed: 0, ragged: false }
    }

    /// A record of `ciphertext` (whole blocks), copied.
    pub fn from_ciphertext(ciphertext: &[u8]) -> Self {
        let mut r = Self::with_capacity(ciphertext.len() / BLOCK_SIZE);
        for block in ciphertext.chunks(BLOCK_SIZE) {
            r.push_block(block, |_| {});
        }
        r
    }

    /// Appends `plain` (one block), then lets `seal` turn it into
    /// ciphertext in place (while it is still in the CPU's cache).
    pub fn push_block(&mut self, plain: &[u8], seal: impl FnOnce(&mut [u8])) {
        self.ragged |= plain.len() != BLOCK_SIZE;
        self.pushed += 1;
        self.buf.extend_from_slice(&[0u8; 32]);
        let at = self.buf.len();
        self.buf.extend_from_slice(plain);
        seal(&mut self.buf[at..]);
    }

    /// Blocks pushed (one that is not a whole block counts as one;
    /// `append_write` refuses the record).
    pub fn blocks(&self) -> usize {
        self.pushed
    }

    fn head(&self, address: u64, sequence: Sequence) -> Result<RecordHead, LogError> {
        if self.pushed == 0 || self.ragged {
            return Err(LogError::BadRecord("write ciphertext must be whole 4 KiB blocks"));
        }
        debug_assert_eq!(self.buf.len(), RECORD_HEADER_LEN + self.pushed * BLOCK_ENTRY_LEN);
        let blocks =
            u32::try_from(self.pushed).map_err(|_| LogError::BadRecord("write of too many blocks"))?;
        let head = RecordHead::Write { address, blocks, sequence };
        validate(&head).map_err(LogError::BadRecord)?;
        Ok(head)
    }
}

/// A Write record's ciphertext as the log holds it: the encoded record,
/// each block behind its tag (empty for other records).
#[derive(Clone, Debug, Default)]
pub struct RecordBlocks {
    record: Bytes,
}

impl RecordBlocks {
    /// Blocks in the record.
    pub fn len(&self) -> usize {
        self.record.len().saturating_sub(RECORD_HEADER_LEN) / BLOCK_ENTRY_LEN
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Block `i`'s ciphertext.
    pub fn block(&self, i: usize) -> &[u8] {
        assert!(i < self.len(), "block {i} of a record of {}", self.len());
        let at = RECORD_HEADER_LEN + i * BLOCK_ENTRY_LEN + 32;
        &self.record[at..at + BLOCK_SIZE]
    }

    /// The ciphertext, blocks back to back (a copy).
    pub fn ciphertext(&self) -> Vec<u8> {
        (0..self.len()).flat_map(|i| self.block(i).iter().copied()).collect()
    }
}

/// Checks what a record claims: ranges that fit and sequences that fit
/// their epoch.
fn validate(head: &RecordHead) -> Result<(), &'static str> {
    match *head {
        RecordHead::Write { address, blocks, sequence } => {
            if blocks == 0 {
                return Err("a write of no blocks");
            }
            if address.checked_add(u64::from(blocks)).is_none() {
                return Err("write past the last address");
            }
            if sequence.checked_add(u64::from(blocks) - 1).is_none() {
                return Err("write whose sequences leave their epoch");
            }
        }
        RecordHead::Zero { address, blocks, .. } => {
            if blocks == 0 {
                return Err("a zero record of no blocks");
            }
            if address.checked_add(blocks).is_none() {
                return Err("zero record past the last address");
            }
        }
        RecordHead::Base(_) | RecordHead::Committed { .. } => {}
    }
    Ok(())
}

// ---- encoding ----------------------------------------------------------------------

fn head_bytes(head: &RecordHead, mark: LogPos) -> [u8; HEAD_LEN] {
    let mut b = [0u8; HEAD_LEN];
    b[..4].copy_from_slice(&RECORD_MAGIC);
    b[8..12].copy_from_slice(&mark.file.to_le_bytes());
    b[12..16].copy_from_slice(&mark.offset.to_le_bytes());
    let put = |b: &mut [u8; HEAD_LEN], i: usize, v: u64| {
        b[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes())
    };
    match *head {
        RecordHead::Write { address, blocks, sequence } => {
            b[4] = KIND_WRITE;
            put(&mut b, 0, address);
            put(&mut b, 1, sequence.raw());
            put(&mut b, 2, u64::from(blocks));
        }
        RecordHead::Zero { address, blocks, sequence } => {
            b[4] = KIND_ZERO;
            put(&mut b, 0, address);
            put(&mut b, 1, sequence.raw());
            put(&mut b, 2, blocks);
        }
        RecordHead::Base(base) => {
            b[4] = KIND_BASE;
            put(&mut b, 0, base.epoch);
            put(&mut b, 1, base.commit);
            put(&mut b, 2, base.segment_floor.raw());
            put(&mut b, 3, base.sequence_floor.raw());
        }
        RecordHead::Committed { sequence } => {
            b[4] = KIND_COMMITTED;
            put(&mut b, 0, sequence.raw());
        }
    }
    b
}

fn pos_bytes(pos: LogPos) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&pos.file.to_le_bytes());
    b[4..].copy_from_slice(&pos.offset.to_le_bytes());
    b
}

fn header_tag(key: &LogKey, volume: &[u8; VOLUME_ID_LEN], pos: LogPos, head: &[u8]) -> [u8; 32] {
    let mut h = key.hasher(b"head", volume);
    h.update(&pos_bytes(pos));
    h.update(head);
    *h.finalize().as_bytes()
}

/// A block's tag. Version 2 hashes the block first, so blake3 sees it
/// chunk-aligned and hashes its chunks in parallel; version 1 hashed it
/// last, after 92 bytes of label, position and header.
fn block_tag(
    key: &LogKey,
    volume: &[u8; VOLUME_ID_LEN],
    pos: LogPos,
    head: &[u8],
    index: u32,
    block: &[u8],
    version: u16,
) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&key.0);
    if version != VERSION_1 {
        h.update(block);
    }
    h.update(b"blck");
    h.update(volume);
    h.update(&pos_bytes(pos));
    h.update(head);
    h.update(&index.to_le_bytes());
    if version == VERSION_1 {
        h.update(block);
    }
    *h.finalize().as_bytes()
}

fn tags_equal(a: &[u8], b: [u8; 32]) -> bool {
    // Constant time: blake3's Hash compares so.
    <[u8; 32]>::try_from(a).is_ok_and(|a| blake3::Hash::from_bytes(a) == blake3::Hash::from_bytes(b))
}

/// Appends the encoding of `record` at `pos` with durable mark `mark`, in
/// format `version` (this code appends [`VERSION`]; tests write older ones).
pub fn encode_record(
    key: &LogKey,
    volume: &[u8; VOLUME_ID_LEN],
    pos: LogPos,
    mark: LogPos,
    record: &NewRecord<'_>,
    out: &mut Vec<u8>,
    version: u16,
) -> Result<RecordHead, LogError> {
    let head = record.head()?;
    let at = out.len();
    out.resize(at + RECORD_HEADER_LEN, 0);
    if let NewRecord::Write { ciphertext, .. } = record {
        for block in ciphertext.chunks_exact(BLOCK_SIZE) {
            out.extend_from_slice(&[0u8; 32]);
            out.extend_from_slice(block);
        }
    }
    seal_record(key, volume, pos, mark, &head, &mut out[at..], version);
    Ok(head)
}

/// Fills in the header and block tags of a record laid out in `buf` (its
/// header's room, then each block behind room for its tag, as
/// [`WriteRecord`] builds it) at `pos` with durable mark `mark`, in format
/// `version`.
fn seal_record(
    key: &LogKey,
    volume: &[u8; VOLUME_ID_LEN],
    pos: LogPos,
    mark: LogPos,
    head: &RecordHead,
    buf: &mut [u8],
    version: u16,
) {
    let bytes = head_bytes(head, mark);
    buf[..HEAD_LEN].copy_from_slice(&bytes);
    buf[HEAD_LEN..RECORD_HEADER_LEN].copy_from_slice(&header_tag(key, volume, pos, &bytes));
    for (i, entry) in buf[RECORD_HEADER_LEN..].chunks_exact_mut(BLOCK_ENTRY_LEN).enumerate() {
        let tag = block_tag(key, volume, pos, &bytes, i as u32, &entry[32..], version);
        entry[..32].copy_from_slice(&tag);
    }
}

/// Why the bytes at a position are not a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordFault {
    /// Not a whole authentic record (torn, zero, foreign or altered).
    Unreadable(&'static str),
    /// Authentic, but what it says is impossible (a writer's bug).
    Invalid(&'static str),
}

/// The header fields and tag of a record, checked; the record's length.
fn decode_head(
    bytes: &[u8],
    key: &LogKey,
    volume: &[u8; VOLUME_ID_LEN],
    pos: LogPos,
) -> Result<(RecordHead, LogPos, usize), RecordFault> {
    use RecordFault::*;
    if bytes.len() < RECORD_HEADER_LEN {
        return Err(Unreadable("record header cut short"));
    }
    if bytes[..4] != RECORD_MAGIC {
        return Err(Unreadable("no record magic"));
    }
    if !tags_equal(&bytes[HEAD_LEN..RECORD_HEADER_LEN], header_tag(key, volume, pos, &bytes[..HEAD_LEN])) {
        return Err(Unreadable("record header fails its tag"));
    }
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(bytes[16 + 8 * i..24 + 8 * i].try_into().expect("8 bytes"));
    let mark = LogPos { file: u32_at(8), offset: u32_at(12) };
    if bytes[5..8] != [0; 3] {
        return Err(Invalid("reserved header bytes are not zero"));
    }
    let head = match bytes[4] {
        KIND_WRITE => RecordHead::Write {
            address: u64_at(0),
            sequence: Sequence::from_raw(u64_at(1)),
            blocks: u32::try_from(u64_at(2)).map_err(|_| Invalid("write of too many blocks"))?,
        },
        KIND_ZERO => RecordHead::Zero {
            address: u64_at(0),
            sequence: Sequence::from_raw(u64_at(1)),
            blocks: u64_at(2),
        },
        KIND_BASE => RecordHead::Base(Base {
            epoch: u64_at(0),
            commit: u64_at(1),
            segment_floor: SegmentId::from_raw(u64_at(2)),
            sequence_floor: Sequence::from_raw(u64_at(3)),
        }),
        KIND_COMMITTED => RecordHead::Committed { sequence: Sequence::from_raw(u64_at(0)) },
        _ => return Err(Invalid("unknown record kind")),
    };
    validate(&head).map_err(Invalid)?;
    // Unused body bytes must be zero, so every record has one encoding.
    let used = match head {
        RecordHead::Write { .. } | RecordHead::Zero { .. } => 3,
        RecordHead::Base(_) => 4,
        RecordHead::Committed { .. } => 1,
    };
    if bytes[16 + 8 * used..HEAD_LEN].iter().any(|&b| b != 0) {
        return Err(Invalid("reserved body bytes are not zero"));
    }
    Ok((head, mark, head.encoded_len()))
}

/// Parses and checks the whole record at the start of `bytes`, written at
/// `pos` in a file of format `version`: its head, its durable mark and its
/// length. Every block tag is checked. Never panics, whatever the input.
pub fn decode_record(
    bytes: &[u8],
    key: &LogKey,
    volume: &[u8; VOLUME_ID_LEN],
    pos: LogPos,
    version: u16,
) -> Result<(RecordHead, LogPos, usize), RecordFault> {
    let (head, mark, len) = decode_head(bytes, key, volume, pos)?;
    if bytes.len() < len {
        return Err(RecordFault::Unreadable("record cut short"));
    }
    let blocks = bytes[RECORD_HEADER_LEN..len].chunks_exact(BLOCK_ENTRY_LEN);
    for (i, entry) in blocks.enumerate() {
        let tag = block_tag(key, volume, pos, &bytes[..HEAD_LEN], i as u32, &entry[32..], version);
        if !tags_equal(&entry[..32], tag) {
            return Err(RecordFault::Unreadable("a block fails its tag"));
        }
    }
    Ok((head, mark, len))
}

/// A log file's header.
pub fn encode_file_header(
    key: &LogKey,
    volume: &[u8; VOLUME_ID_LEN],
    file: u32,
    version: u16,
) -> [u8; FILE_HEADER_LEN] {
    let mut b = [0u8; FILE_HEADER_LEN];
    b[..4].copy_from_slice(&FILE_MAGIC);
    b[4..6].copy_from_slice(&version.to_le_bytes());
    b[8..24].copy_from_slice(volume);
    b[24..28].copy_from_slice(&file.to_le_bytes());
    let mut h = key.hasher(b"file", volume);
    h.update(&b[..32]);
    b[32..].copy_from_slice(h.finalize().as_bytes());
    b
}

/// One log file's records as replay sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileScan {
    /// The valid records from the start, each with its durable mark.
    pub records: Vec<(LogPos, RecordHead, LogPos)>,
    /// Where those end.
    pub end: u32,
    /// The first bad spot, if the file does not end cleanly after them.
    pub bad: Option<(u32, &'static str)>,
    /// Valid records found after the bad spot (searched by magic).
    pub after_bad: Vec<(LogPos, RecordHead, LogPos)>,
    /// The file's format version (from its header; [`VERSION`] when the
    /// header is bad).
    pub version: u16,
}

/// Reads log file number `file` from its bytes. An authentic record with an
/// impossible content is an error (offset and why); anything else that is
/// not a record is the file's bad spot. Never panics, whatever the input.
pub fn scan_file(
    bytes: &[u8],
    key: &LogKey,
    volume: &[u8; VOLUME_ID_LEN],
    file: u32,
) -> Result<FileScan, (u32, &'static str)> {
    let mut scan = FileScan::default();
    if bytes.len() > u32::MAX as usize {
        return Err((0, "log file larger than 4 GiB"));
    }
    let header = bytes.get(..FILE_HEADER_LEN);
    scan.version = VERSION;
    if header == Some(&encode_file_header(key, volume, file, VERSION_1)[..]) {
        scan.version = VERSION_1;
    } else if header != Some(&encode_file_header(key, volume, file, VERSION)[..]) {
        scan.bad = Some((0, "bad log file header"));
        return Ok(scan);
    }
    let version = scan.version;
    let mut at = FILE_HEADER_LEN;
    let record_at = |at: usize| {
        let pos = LogPos { file, offset: at as u32 };
        decode_record(&bytes[at..], key, volume, pos, version).map(|(h, m, len)| (pos, h, m, len))
    };
    while at < bytes.len() {
        match record_at(at) {
            Ok((pos, head, mark, len)) => {
                scan.records.push((pos, head, mark));
                at += len;
            }
            Err(RecordFault::Invalid(why)) => return Err((at as u32, why)),
            Err(RecordFault::Unreadable(why)) => {
                scan.bad = Some((at as u32, why));
                break;
            }
        }
    }
    scan.end = at as u32;
    if scan.bad.is_some() {
        // Look for records written after the hole: a record is only valid
        // at the position it was written at, so a hit is a real record.
        let mut from = at + 1;
        while let Some(found) =
            bytes.get(from..).and_then(|rest| rest.windows(4).position(|w| w == RECORD_MAGIC))
        {
            let at = from + found;
            match record_at(at) {
                Ok((pos, head, mark, len)) => {
                    scan.after_bad.push((pos, head, mark));
                    from = at + len;
                }
                Err(RecordFault::Invalid(why)) => return Err((at as u32, why)),
                Err(RecordFault::Unreadable(_)) => from = at + 1,
            }
        }
    }
    Ok(scan)
}

// ---- the folder lock ----------------------------------------------------------------

/// `flock(LOCK_EX | LOCK_NB)` on `<folder>/LOCK`, held until dropped: one
/// attach per state folder. The file holds the holder's pid, for the
/// message a second opener gets.
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
}

impl FolderLock {
    pub fn take(folder: &Path) -> Result<Self, LogError> {
        std::fs::create_dir_all(folder).map_err(|e| io_err(folder, e))?;
        let path = folder.join("LOCK");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        // SAFETY: flock on a descriptor we own and keep open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let pid = file.read_to_string(&mut text).ok().and_then(|_| text.trim().parse().ok());
                return Err(LogError::InUse { folder: folder.to_owned(), pid });
            }
            return Err(io_err(&path, err));
        }
        let pid = format!("{}\n", std::process::id());
        file.set_len(0).and_then(|()| file.write_all_at(pid.as_bytes(), 0)).map_err(|e| io_err(&path, e))?;
        Ok(Self { _file: file })
    }
}

// ---- the log ------------------------------------------------------------------------

/// Sizes of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// A log file is not grown past this (64 KiB to 1 GiB).
    pub file_bytes: u64,
    /// Appends of Write and Zero records are refused ([`LogError::Full`])
    /// beyond this many bytes of live log files; Base and Committed
    /// records are always taken (commit and release must never wait on
    /// the log they free).
    pub max_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { file_bytes: 64 << 20, max_bytes: 4 << 30 }
    }
}

/// What replay found, in log order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// Every record, in log order, with its position.
    pub records: Vec<(LogPos, RecordHead)>,
    /// The last Base record.
    pub base: Option<(LogPos, Base)>,
    /// The highest Committed record's sequence (ZERO if none).
    pub committed: Sequence,
    /// The highest sequence any record names (Write: its last block's;
    /// Base: its sequence floor), including valid records cut off with a
    /// torn tail.
    pub highest_sequence: Sequence,
    /// The highest segment floor of any Base (cut off ones included).
    pub highest_segment: SegmentId,
    /// Set when an unsynced tail was cut off.
    pub torn: Option<TornTail>,
}

/// An unsynced tail cut off at open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// Where the log now ends.
    pub at: LogPos,
    /// Why that spot is not a record.
    pub why: &'static str,
    /// Bytes dropped (in that file and any later ones).
    pub bytes: u64,
    /// Valid but never synced records dropped after the spot.
    pub records: usize,
}

struct LogFile {
    file: Arc<RegisteredFile>,
    /// Its format version: appends go only to a [`VERSION`] file.
    version: u16,
    /// Bytes reserved in it.
    end: u32,
    /// The highest sequence of its Write and Zero records.
    data_sequence: Sequence,
    /// Appends reserved in it and not yet written.
    in_flight: u32,
    /// Writes done in it (its header counts as one), and how many of
    /// them a finished sync covered. Counted rather than flagged, so a
    /// sync that is dropped half-way leaves the file to the next one.
    writes: u64,
    synced_writes: u64,
}

struct Tail {
    files: BTreeMap<u32, LogFile>,
    /// The file appended to.
    current: u32,
    /// Starts of appends reserved and not yet written.
    in_flight: BTreeSet<LogPos>,
    /// Everything before this is written and synced.
    durable: LogPos,
    /// Files created, and how many of them a finished folder sync covered.
    created: u64,
    created_synced: u64,
    newest_base: Option<LogPos>,
    newest_committed: Option<LogPos>,
    /// A record [`LocalLog::keep`] asked to keep: its file is not released.
    kept: Option<LogPos>,
    used: u64,
}

impl Tail {
    fn end(&self) -> LogPos {
        LogPos { file: self.current, offset: self.files[&self.current].end }
    }
}

/// The local log. Cheap to clone; the folder lock goes with the last clone.
#[derive(Clone)]
pub struct LocalLog {
    inner: Arc<Inner>,
}

struct Inner {
    log_dir: PathBuf,
    ring: Uring,
    key: LogKey,
    volume: [u8; VOLUME_ID_LEN],
    config: LogConfig,
    tail: Mutex<Tail>,
    /// Bumped whenever an append finishes, for syncs waiting on earlier ones.
    progress: watch::Sender<u64>,
    sync_turn: tokio::sync::Mutex<()>,
    first_error: Mutex<Option<String>>,
    recent: Mutex<Recent>,
    /// `recent`'s budget, fixed at open.
    recent_max: usize,
    _lock: FolderLock,
}

/// At most this many bytes of recent Write records' ciphertext stay in
/// memory ([`Recent`]); less when the log itself is small (a quarter).
pub const RECENT_MAX_BYTES: usize = 256 << 20;

/// The newest Write records appended by this process, kept in memory as
/// written (header, then each block behind its tag): a commit packs them
/// (and a read of a block not yet committed copies it) from here, without
/// reading the file back or checking tags (these bytes never left the
/// process). Oldest first out
/// past the budget, and gone with their file at release; a record not here
/// is read from its file, checked, as before.
#[derive(Default)]
struct Recent {
    records: HashMap<LogPos, (RecordHead, Bytes)>,
    order: VecDeque<LogPos>,
    bytes: usize,
    max: usize,
}

impl Recent {
    fn keep(&mut self, pos: LogPos, head: RecordHead, data: Bytes) {
        if data.len() > self.max {
            return;
        }
        self.bytes += data.len();
        if let Some((_, old)) = self.records.insert(pos, (head, data)) {
            self.bytes -= old.len();
        } else {
            self.order.push_back(pos);
        }
        while self.bytes > self.max {
            let Some(p) = self.order.pop_front() else { break };
            if let Some((_, d)) = self.records.remove(&p) {
                self.bytes -= d.len();
            }
        }
    }

    fn get(&self, pos: LogPos) -> Option<(RecordHead, Bytes)> {
        self.records.get(&pos).cloned()
    }

    /// Drops what lived in the released files.
    fn release(&mut self, files: &[u32]) {
        let records = &mut self.records;
        let mut freed = 0;
        self.order.retain(|p| {
            if !files.contains(&p.file) {
                return true;
            }
            if let Some((_, d)) = records.remove(p) {
                freed += d.len();
            }
            false
        });
        self.bytes -= freed;
    }
}

impl fmt::Debug for LocalLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalLog({})", self.inner.log_dir.display())
    }
}

fn file_path(log_dir: &Path, n: u32) -> PathBuf {
    log_dir.join(format!("{n:08}.log"))
}

impl LocalLog {
    /// Locks `folder`, opens (or creates) the log in `folder/log` and
    /// replays it: cuts an unsynced tail, refuses damage, syncs what it
    /// keeps so later records can vouch for it.
    pub async fn open(
        folder: &Path,
        key: &VolumeKey,
        volume: &[u8; VOLUME_ID_LEN],
        ring: &Uring,
        config: LogConfig,
    ) -> Result<(LocalLog, Replay), LogError> {
        if !(MIN_FILE_BYTES..=MAX_FILE_BYTES).contains(&config.file_bytes) {
            return Err(LogError::Config(format!(
                "log files of {} bytes: they must be {MIN_FILE_BYTES} to {MAX_FILE_BYTES}",
                config.file_bytes
            )));
        }
        if config.max_bytes < config.file_bytes {
            return Err(LogError::Config(format!(
                "a log of at most {} bytes cannot hold a file of {}",
                config.max_bytes, config.file_bytes
            )));
        }
        let lock = FolderLock::take(folder)?;
        let key = LogKey::derive(key);
        let log_dir = folder.join("log");
        std::fs::create_dir_all(&log_dir).map_err(|e| io_err(&log_dir, e))?;
        let mut numbers: Vec<u32> = std::fs::read_dir(&log_dir)
            .map_err(|e| io_err(&log_dir, e))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
            .collect();
        numbers.sort_unstable();
        check_meta(&log_dir, &key, volume, !numbers.is_empty())?;

        // Read every file; the good prefix of the log, then the first bad
        // spot and every valid record after it.
        let mut opened = BTreeMap::new();
        let mut good: Vec<(LogPos, RecordHead)> = Vec::new();
        let mut ends = BTreeMap::new();
        let mut versions = BTreeMap::new();
        let mut first_bad: Option<(LogPos, &'static str)> = None;
        let mut later: Vec<(LogPos, RecordHead, LogPos)> = Vec::new();
        for &n in &numbers {
            let path = file_path(&log_dir, n);
            let file = open_file(ring, &path, false)?;
            let len = std::fs::metadata(&path).map_err(|e| io_err(&path, e))?.len();
            let len = usize::try_from(len).map_err(|_| io_err(&path, "too large"))?;
            let bytes = ring.read_exact_at(&file, 0, len).await.map_err(|e| io_err(&path, e))?;
            let scan = scan_file(&bytes, &key, volume, n).map_err(|(offset, why)| LogError::Corrupt {
                path: path.clone(),
                offset,
                why: format!("an authentic record that makes no sense ({why})"),
            })?;
            ends.insert(n, (scan.end, len as u64));
            versions.insert(n, scan.version);
            if first_bad.is_none() {
                good.extend(scan.records.iter().map(|&(p, h, _)| (p, h)));
                first_bad = scan.bad.map(|(offset, why)| (LogPos { file: n, offset }, why));
            } else {
                later.extend_from_slice(&scan.records);
            }
            later.extend_from_slice(&scan.after_bad);
            opened.insert(n, file);
        }
        let mut torn = None;
        if let Some((bad, why)) = first_bad {
            if let Some(&(witness, _, _)) = later.iter().find(|(_, _, mark)| *mark > bad) {
                return Err(LogError::Corrupt {
                    path: file_path(&log_dir, bad.file),
                    offset: bad.offset,
                    why: format!(
                        "{why}, yet the record at {witness} was appended after it was synced; refusing to drop synced writes"
                    ),
                });
            }
            // Cut: this file at the bad spot (or whole, if its header is
            // bad), and every later file.
            let mut bytes = 0;
            let cut: Vec<(u32, u64)> = ends.range(bad.file..).map(|(&n, &(_, len))| (n, len)).collect();
            for (n, len) in cut {
                let path = file_path(&log_dir, n);
                if n == bad.file && bad.offset as usize >= FILE_HEADER_LEN {
                    bytes += len - u64::from(bad.offset);
                    let f =
                        std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| io_err(&path, e))?;
                    f.set_len(u64::from(bad.offset)).map_err(|e| io_err(&path, e))?;
                    ends.insert(n, (bad.offset, u64::from(bad.offset)));
                } else {
                    bytes += len;
                    opened.remove(&n);
                    ends.remove(&n);
                    std::fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
                }
            }
            tracing::info!(
                "local log {}: cut an unsynced tail at {bad} ({why}): {bytes} bytes, {} unsynced records",
                log_dir.display(),
                later.len()
            );
            torn = Some(TornTail { at: bad, why, bytes, records: later.len() });
        }

        // What is kept is made durable now, so records appended from here
        // on may mark it synced.
        for (n, file) in &opened {
            ring.fsync(file, true).await.map_err(|e| io_err(&file_path(&log_dir, *n), e))?;
        }
        let mut replay = Replay { records: good, torn, ..Replay::default() };
        let mut files: BTreeMap<u32, LogFile> = opened
            .into_iter()
            .map(|(n, file)| {
                let end = ends[&n].0;
                (
                    n,
                    LogFile {
                        file: Arc::new(file),
                        version: versions[&n],
                        end,
                        data_sequence: Sequence::ZERO,
                        in_flight: 0,
                        writes: 0,
                        synced_writes: 0,
                    },
                )
            })
            .collect();
        // Sequences and segment floors of records cut off count too: they
        // were never synced, but may have been used (destaged, say), and a
        // resumed epoch must not hand them out again.
        for (_, head, _) in &later {
            replay.highest_sequence = replay.highest_sequence.max(head.highest_sequence());
            if let RecordHead::Base(b) = head {
                replay.highest_segment = replay.highest_segment.max(b.segment_floor);
            }
        }
        let mut newest_committed = None;
        for &(pos, head) in &replay.records {
            replay.highest_sequence = replay.highest_sequence.max(head.highest_sequence());
            match head {
                RecordHead::Base(b) => {
                    replay.base = Some((pos, b));
                    replay.highest_segment = replay.highest_segment.max(b.segment_floor);
                }
                RecordHead::Committed { sequence } => {
                    replay.committed = replay.committed.max(sequence);
                    newest_committed = Some(pos);
                }
                _ => {}
            }
            if let (Some(s), Some(f)) = (head.data_sequence(), files.get_mut(&pos.file)) {
                f.data_sequence = f.data_sequence.max(s);
            }
        }
        let mut created = false;
        // Appends go to the last file, unless it is of an older format:
        // then to a new one.
        let current = match files.iter().next_back() {
            Some((&n, f)) if f.version == VERSION => n,
            _ => {
                let n = numbers.last().map_or(1, |n| n.saturating_add(1));
                let path = file_path(&log_dir, n);
                let file = create_file(ring, &log_dir, &key, volume, n)?;
                ring.fsync(&file, true).await.map_err(|e| io_err(&path, e))?;
                files.insert(
                    n,
                    LogFile {
                        file: Arc::new(file),
                        version: VERSION,
                        end: FILE_HEADER_LEN as u32,
                        data_sequence: Sequence::ZERO,
                        in_flight: 0,
                        writes: 0,
                        synced_writes: 0,
                    },
                );
                created = true;
                n
            }
        };
        if replay.torn.is_some() || created {
            durable::sync_dir(&log_dir).map_err(|e| io_err(&log_dir, e))?;
        }
        let used = files.values().map(|f| u64::from(f.end)).sum();
        let mut tail = Tail {
            files,
            current,
            in_flight: BTreeSet::new(),
            durable: LogPos::default(),
            created: 0,
            created_synced: 0,
            newest_base: replay.base.map(|(p, _)| p),
            kept: None,
            newest_committed,
            used,
        };
        tail.durable = tail.end();
        let recent_max = usize::try_from(config.max_bytes / 4).unwrap_or(usize::MAX).min(RECENT_MAX_BYTES);
        let log = LocalLog {
            inner: Arc::new(Inner {
                log_dir,
                ring: ring.clone(),
                key,
                volume: *volume,
                config,
                tail: Mutex::new(tail),
                progress: watch::Sender::new(0),
                sync_turn: tokio::sync::Mutex::new(()),
                first_error: Mutex::new(None),
                recent: Mutex::new(Recent { max: recent_max, ..Recent::default() }),
                recent_max,
                _lock: lock,
            }),
        };
        Ok((log, replay))
    }

    /// Keeps the file holding the record at `pos` from [`Self::release`]
    /// until another record is kept instead (or the log starts over): the
    /// engine keeps its newest synced reservation of sequences and segment
    /// ids, which later, unsynced records rely on.
    pub fn keep(&self, pos: LogPos) {
        self.tail().kept = Some(pos);
    }

    /// Bytes of recent Write records kept in memory at most: writers are
    /// held back while what waits for a commit nears it (see the engine's
    /// dirty limit), so a commit packs from memory.
    pub fn recent_budget(&self) -> u64 {
        self.inner.recent_max as u64
    }

    /// The most blocks one Write record can carry (it must fit in a file).
    pub fn max_record_blocks(&self) -> u32 {
        let room = self.inner.config.file_bytes as usize - FILE_HEADER_LEN - RECORD_HEADER_LEN;
        (room / BLOCK_ENTRY_LEN) as u32
    }

    /// Bytes of live log files (for backpressure).
    pub fn used_bytes(&self) -> u64 {
        self.tail().used
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.inner.tail.lock().expect("log state lock poisoned")
    }

    fn check(&self) -> Result<(), LogError> {
        match self.inner.first_error.lock().expect("not poisoned").clone() {
            Some(first) => Err(LogError::Poisoned { path: self.inner.log_dir.clone(), first }),
            None => Ok(()),
        }
    }

    fn poison(&self, what: &str, e: impl fmt::Display) -> LogError {
        let message = format!("{what}: {e}");
        tracing::error!("local log {} poisoned: {message}", self.inner.log_dir.display());
        self.inner.first_error.lock().expect("not poisoned").get_or_insert(message.clone());
        LogError::Io { path: self.inner.log_dir.clone(), message }
    }

    /// Appends `records` contiguously with one write; their positions.
    /// Not durable until [`LocalLog::sync`].
    pub async fn append(&self, records: &[NewRecord<'_>]) -> Result<Vec<LogPos>, LogError> {
        self.check()?;
        let mut heads = Vec::with_capacity(records.len());
        for r in records {
            heads.push(r.head()?);
        }
        let encode = |start: LogPos, mark: LogPos, total: usize| {
            let mut buf = Vec::with_capacity(total);
            let mut positions = Vec::with_capacity(records.len());
            for r in records {
                let pos = LogPos { file: start.file, offset: start.offset + buf.len() as u32 };
                encode_record(&self.inner.key, &self.inner.volume, pos, mark, r, &mut buf, VERSION)?;
                positions.push(pos);
            }
            Ok((buf, positions))
        };
        Ok(self.append_encoded(&heads, encode).await?.0)
    }

    /// Reserves the room of `heads` at the tail, has `encode` make their
    /// bytes (given the first record's position, the durable mark and the
    /// total length), writes them; the positions and the bytes written.
    async fn append_encoded(
        &self,
        heads: &[RecordHead],
        encode: impl FnOnce(LogPos, LogPos, usize) -> Result<(Vec<u8>, Vec<LogPos>), LogError>,
    ) -> Result<(Vec<LogPos>, Bytes), LogError> {
        let total: usize = heads.iter().map(RecordHead::encoded_len).sum();
        let room = self.inner.config.file_bytes as usize - FILE_HEADER_LEN;
        if total > room {
            return Err(LogError::TooBig { bytes: total as u64, max: room as u64 });
        }
        if total == 0 {
            return Ok((Vec::new(), Bytes::new()));
        }
        let carries_data = heads.iter().any(|h| h.data_sequence().is_some());
        let (file, start, mark) = {
            let mut tail = self.tail();
            if carries_data && tail.used + total as u64 > self.inner.config.max_bytes {
                return Err(LogError::Full { used: tail.used, max: self.inner.config.max_bytes });
            }
            if u64::from(tail.files[&tail.current].end) + total as u64 > self.inner.config.file_bytes {
                self.roll_over(&mut tail)?;
            }
            let start = tail.end();
            let f = tail.files.get_mut(&start.file).expect("the current file");
            f.end += total as u32;
            f.in_flight += 1;
            let data = heads.iter().filter_map(RecordHead::data_sequence).max();
            f.data_sequence = f.data_sequence.max(data.unwrap_or(Sequence::ZERO));
            let file = f.file.clone();
            tail.used += total as u64;
            tail.in_flight.insert(start);
            let mut at = start.offset;
            for h in heads {
                let pos = LogPos { file: start.file, offset: at };
                match h {
                    RecordHead::Base(_) => tail.newest_base = Some(pos),
                    RecordHead::Committed { .. } => tail.newest_committed = Some(pos),
                    _ => {}
                }
                at += h.encoded_len() as u32;
            }
            (file, start, tail.durable)
        };
        // From here the region is ours: if this future is dropped or the
        // write fails, the guard poisons the log (a hole that a later sync
        // would vouch for must never exist).
        let mut pending = Pending { log: self, start, done: false };
        let (buf, positions) = encode(start, mark, total)?;
        debug_assert_eq!(buf.len(), total);
        let bytes = Bytes::from(buf);
        let written = self.inner.ring.write_all_at(&file, u64::from(start.offset), bytes.clone(), 0).await;
        if let Err(e) = written {
            return Err(self.poison("appending to the log", e));
        }
        pending.done = true;
        self.finish(start, true);
        Ok((positions, bytes))
    }

    /// Appends one Write record (`record`'s blocks from `address`, block i
    /// with sequence `sequence + i`) and keeps its bytes in memory for the
    /// commit that carries it ([`Recent`]). Not durable until
    /// [`LocalLog::sync`].
    pub async fn append_write(
        &self,
        address: u64,
        sequence: Sequence,
        record: WriteRecord,
    ) -> Result<LogPos, LogError> {
        self.check()?;
        let head = record.head(address, sequence)?;
        let mut buf = Some(record.buf);
        let encode = |start: LogPos, mark: LogPos, total: usize| {
            let mut buf = buf.take().expect("encoded once");
            if buf.len() != total {
                return Err(LogError::BadRecord("a write record's length changed"));
            }
            seal_record(&self.inner.key, &self.inner.volume, start, mark, &head, &mut buf, VERSION);
            Ok((buf, vec![start]))
        };
        let (positions, bytes) = self.append_encoded(&[head], encode).await?;
        let pos = positions[0];
        self.inner.recent.lock().expect("not poisoned").keep(pos, head, bytes);
        Ok(pos)
    }

    /// Starts the next file (header written, not synced: the next sync
    /// syncs it and the folder).
    fn roll_over(&self, tail: &mut Tail) -> Result<(), LogError> {
        let n = tail
            .current
            .checked_add(1)
            .ok_or_else(|| io_err(&self.inner.log_dir, "log file numbers ran out"))?;
        let file =
            create_file(&self.inner.ring, &self.inner.log_dir, &self.inner.key, &self.inner.volume, n)?;
        tail.files.insert(
            n,
            LogFile {
                file: Arc::new(file),
                version: VERSION,
                end: FILE_HEADER_LEN as u32,
                data_sequence: Sequence::ZERO,
                in_flight: 0,
                writes: 1,
                synced_writes: 0,
            },
        );
        tail.current = n;
        tail.used += FILE_HEADER_LEN as u64;
        tail.created += 1;
        Ok(())
    }

    fn finish(&self, start: LogPos, written: bool) {
        {
            let mut tail = self.tail();
            tail.in_flight.remove(&start);
            if let Some(f) = tail.files.get_mut(&start.file) {
                f.in_flight -= 1;
                // Counted on completion, not reservation: a sync covers
                // only writes already done.
                f.writes += u64::from(written);
            }
        }
        self.inner.progress.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Makes every record appended before this call durable: waits for
    /// the appends reserved before it to be written, then `fdatasync`s the
    /// files written since the last sync (and the folder after a new file).
    pub async fn sync(&self) -> Result<(), LogError> {
        self.check()?;
        let mut progress = self.inner.progress.subscribe();
        let target = self.tail().end();
        loop {
            {
                let tail = self.tail();
                if tail.durable >= target {
                    return Ok(());
                }
                if tail.in_flight.first().is_none_or(|s| *s >= target) {
                    break;
                }
            }
            // The sender lives as long as `self`.
            let _ = progress.changed().await;
        }
        self.check()?;
        let _turn = self.inner.sync_turn.lock().await;
        let (files, created) = {
            let tail = self.tail();
            if tail.durable >= target {
                return Ok(());
            }
            let files: Vec<(u32, Arc<RegisteredFile>, u64)> = tail
                .files
                .iter()
                .filter(|(_, f)| f.writes > f.synced_writes)
                .map(|(n, f)| (*n, f.file.clone(), f.writes))
                .collect();
            (files, (tail.created > tail.created_synced).then_some(tail.created))
        };
        for (n, file, writes) in files {
            if let Err(e) = self.inner.ring.fsync(&file, true).await {
                return Err(self.poison("syncing the log", e));
            }
            if let Some(f) = self.tail().files.get_mut(&n) {
                f.synced_writes = f.synced_writes.max(writes);
            }
        }
        if let Some(created) = created {
            if let Err(e) = durable::sync_dir(&self.inner.log_dir) {
                return Err(self.poison("syncing the log's folder", e));
            }
            let mut tail = self.tail();
            tail.created_synced = tail.created_synced.max(created);
        }
        let mut tail = self.tail();
        tail.durable = tail.durable.max(target);
        Ok(())
    }

    /// Deletes the files no longer needed once everything up to `committed`
    /// is in a committed root (see the module docs); their numbers.
    pub async fn release(&self, committed: Sequence) -> Result<Vec<u32>, LogError> {
        self.check()?;
        let gone: Vec<u32> = {
            let mut tail = self.tail();
            let keep = [
                Some(tail.current),
                tail.newest_base.map(|p| p.file),
                tail.newest_committed.map(|p| p.file),
                tail.kept.map(|p| p.file),
            ];
            let gone: Vec<u32> = tail
                .files
                .iter()
                .filter(|(n, f)| {
                    !keep.contains(&Some(**n)) && f.in_flight == 0 && f.data_sequence <= committed
                })
                .map(|(n, _)| *n)
                .collect();
            for n in &gone {
                let f = tail.files.remove(n).expect("listed");
                tail.used -= u64::from(f.end);
            }
            gone
        };
        if !gone.is_empty() {
            self.inner.recent.lock().expect("not poisoned").release(&gone);
        }
        for &n in &gone {
            let path = file_path(&self.inner.log_dir, n);
            std::fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
        }
        Ok(gone)
    }

    /// Drops every record: a new file is started with `base` in it (synced),
    /// then every older file is deleted (and the deletion synced). For an
    /// attach told to discard a folder's unflushed writes: they must not
    /// come back at the next replay, as copies or as writes to commit.
    pub async fn start_over(&self, base: Base) -> Result<(), LogError> {
        self.check()?;
        // The old files go (and their deletion is synced) before the new
        // Base is written: a crash in between leaves an empty log, never
        // the old records after a Base that would vouch for them.
        let gone: Vec<u32> = {
            let mut tail = self.tail();
            self.roll_over(&mut tail)?;
            let current = tail.current;
            let gone: Vec<u32> = tail.files.keys().copied().filter(|&n| n != current).collect();
            for n in &gone {
                let f = tail.files.remove(n).expect("listed");
                tail.used -= u64::from(f.end);
            }
            tail.newest_base = None;
            tail.newest_committed = None;
            tail.kept = None;
            gone
        };
        self.inner.recent.lock().expect("not poisoned").release(&gone);
        for &n in &gone {
            let path = file_path(&self.inner.log_dir, n);
            std::fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
        }
        durable::sync_dir(&self.inner.log_dir).map_err(|e| io_err(&self.inner.log_dir, e))?;
        self.append(&[NewRecord::Base(base)]).await?;
        self.sync().await
    }

    /// The file of `pos` and its format version.
    fn file(&self, pos: LogPos) -> Result<(Arc<RegisteredFile>, u16), LogError> {
        self.tail().files.get(&pos.file).map(|f| (f.file.clone(), f.version)).ok_or(LogError::Released(pos))
    }

    fn corrupt(&self, pos: LogPos, why: impl Into<String>) -> LogError {
        LogError::Corrupt {
            path: file_path(&self.inner.log_dir, pos.file),
            offset: pos.offset,
            why: why.into(),
        }
    }

    /// Reads block `block` of the Write record at `pos` into `out` (4096
    /// bytes), checked; the block's address and sequence.
    pub async fn read(&self, pos: LogPos, block: u32, out: &mut [u8]) -> Result<(u64, Sequence), LogError> {
        if out.len() != BLOCK_SIZE {
            return Err(LogError::BadRecord("a block read needs a 4096-byte buffer"));
        }
        let recent = self.inner.recent.lock().expect("not poisoned").get(pos);
        if let Some((RecordHead::Write { address, blocks, sequence }, data)) = recent {
            if block >= blocks {
                return Err(LogError::BadRecord("a block read past the end of its record"));
            }
            out.copy_from_slice(RecordBlocks { record: data }.block(block as usize));
            let sequence = sequence.checked_add(u64::from(block)).expect("validated");
            return Ok((address + u64::from(block), sequence));
        }
        let (file, version) = self.file(pos)?;
        let ring = &self.inner.ring;
        let at = u64::from(pos.offset);
        let entry_at = at + (RECORD_HEADER_LEN + block as usize * BLOCK_ENTRY_LEN) as u64;
        let read_err = |e| io_err(&file_path(&self.inner.log_dir, pos.file), e);
        // Block 0 follows its header: one read. Others: two at once.
        let (header, entry) = if block == 0 {
            let mut b =
                ring.read_exact_at(&file, at, RECORD_HEADER_LEN + BLOCK_ENTRY_LEN).await.map_err(read_err)?;
            let entry = b.split_off(RECORD_HEADER_LEN);
            (b, entry)
        } else {
            let (h, e) = tokio::join!(
                ring.read_exact_at(&file, at, RECORD_HEADER_LEN),
                ring.read_exact_at(&file, entry_at, BLOCK_ENTRY_LEN)
            );
            (h.map_err(read_err)?, e.map_err(read_err)?)
        };
        let (head, _, _) = match decode_head(&header, &self.inner.key, &self.inner.volume, pos) {
            Ok(h) => h,
            Err(RecordFault::Unreadable(why) | RecordFault::Invalid(why)) => {
                return Err(self.corrupt(pos, why));
            }
        };
        let RecordHead::Write { address, blocks, sequence } = head else {
            return Err(LogError::BadRecord("a block read of a record that is not a write"));
        };
        if block >= blocks {
            return Err(LogError::BadRecord("a block read past the end of its record"));
        }
        let tag = block_tag(
            &self.inner.key,
            &self.inner.volume,
            pos,
            &header[..HEAD_LEN],
            block,
            &entry[32..],
            version,
        );
        if !tags_equal(&entry[..32], tag) {
            return Err(self.corrupt(pos, format!("block {block} fails its tag")));
        }
        out.copy_from_slice(&entry[32..]);
        let sequence = sequence.checked_add(u64::from(block)).expect("validated");
        Ok((address + u64::from(block), sequence))
    }

    /// Reads the whole record at `pos`, checked: its head and, for a Write,
    /// its blocks. What a commit uses.
    pub async fn read_record(&self, pos: LogPos) -> Result<(RecordHead, RecordBlocks), LogError> {
        if let Some((head, record)) = self.inner.recent.lock().expect("not poisoned").get(pos) {
            return Ok((head, RecordBlocks { record }));
        }
        let (file, version) = self.file(pos)?;
        let ring = &self.inner.ring;
        let read_err = |e| io_err(&file_path(&self.inner.log_dir, pos.file), e);
        let at = u64::from(pos.offset);
        let header = ring.read_exact_at(&file, at, RECORD_HEADER_LEN).await.map_err(read_err)?;
        let key = (&self.inner.key, &self.inner.volume);
        let len = match decode_head(&header, key.0, key.1, pos) {
            Ok((_, _, len)) if len > self.inner.config.file_bytes as usize => {
                return Err(self.corrupt(pos, "record longer than a log file"));
            }
            Ok((_, _, len)) => len,
            Err(RecordFault::Unreadable(why) | RecordFault::Invalid(why)) => {
                return Err(self.corrupt(pos, why));
            }
        };
        let mut bytes = header;
        if len > RECORD_HEADER_LEN {
            let rest = ring
                .read_exact_at(&file, at + RECORD_HEADER_LEN as u64, len - RECORD_HEADER_LEN)
                .await
                .map_err(read_err)?;
            bytes.extend_from_slice(&rest);
        }
        let (head, _, _) = match decode_record(&bytes, key.0, key.1, pos, version) {
            Ok(r) => r,
            Err(RecordFault::Unreadable(why) | RecordFault::Invalid(why)) => {
                return Err(self.corrupt(pos, why));
            }
        };
        Ok((head, RecordBlocks { record: Bytes::from(bytes) }))
    }
}

/// Poisons the log if an append ends without its write done.
struct Pending<'a> {
    log: &'a LocalLog,
    start: LogPos,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.log.poison("appending to the log", "the append ended before its write completed");
            self.log.finish(self.start, false);
        }
    }
}

fn open_file(ring: &Uring, path: &Path, create: bool) -> Result<RegisteredFile, LogError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    ring.register(f).map_err(|e| io_err(path, e))
}

/// A new log file with its header written (not synced).
fn create_file(
    ring: &Uring,
    log_dir: &Path,
    key: &LogKey,
    volume: &[u8; VOLUME_ID_LEN],
    n: u32,
) -> Result<RegisteredFile, LogError> {
    let path = file_path(log_dir, n);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    if let Err(e) = f.write_all_at(&encode_file_header(key, volume, n, VERSION), 0) {
        let _ = std::fs::remove_file(&path);
        return Err(io_err(&path, e));
    }
    ring.register(f).map_err(|e| io_err(&path, e))
}

pub(crate) fn encode_meta(key: &LogKey, volume: &[u8; VOLUME_ID_LEN], version: u16) -> [u8; META_LEN] {
    let mut b = [0u8; META_LEN];
    b[..8].copy_from_slice(&META_MAGIC);
    b[8..10].copy_from_slice(&version.to_le_bytes());
    b[16..32].copy_from_slice(volume);
    let mut h = key.hasher(b"meta", volume);
    h.update(&b[..32]);
    b[32..].copy_from_slice(h.finalize().as_bytes());
    b
}

/// Creates the log's identity file, or checks that the log is this
/// volume's and this key's. Runs before replay, so a wrong key or folder
/// never cuts anything.
fn check_meta(
    log_dir: &Path,
    key: &LogKey,
    volume: &[u8; VOLUME_ID_LEN],
    has_files: bool,
) -> Result<(), LogError> {
    let path = log_dir.join("meta");
    let want = encode_meta(key, volume, VERSION);
    match std::fs::read(&path) {
        Ok(have) if have[..] == want[..] => Ok(()),
        // A version 1 log: its files still replay, but what is appended
        // from now on goes to version 2 files, which the previous binary
        // would take for a torn tail and delete (synced writes with them).
        // The meta says version 2 first (durably, before any such file),
        // so that binary refuses the folder instead.
        Ok(have) if have[..] == encode_meta(key, volume, VERSION_1)[..] => {
            durable::replace(&path, &want, 0o644).map_err(|e| io_err(&path, e))
        }
        Ok(have) if have.len() == META_LEN && have[..8] == META_MAGIC && have[16..32] != volume[..] => {
            Err(LogError::NotOurs(log_dir.to_owned()))
        }
        Ok(have)
            if have.len() == META_LEN
                && have[..8] == META_MAGIC
                && (have[8..10] == VERSION.to_le_bytes() || have[8..10] == VERSION_1.to_le_bytes()) =>
        {
            Err(LogError::WrongKey(log_dir.to_owned()))
        }
        Ok(_) => Err(io_err(&path, "not a meshdisk local log meta file (or another format version)")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !has_files => {
            durable::create_new(&path, &want, 0o644).map_err(|e| io_err(&path, e))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(io_err(&path, "missing while log files exist: refusing to guess whose they are"))
        }
        Err(e) => Err(io_err(&path, e)),
    }
}
