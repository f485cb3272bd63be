//! The backend seam: what the NBD server asks of the storage behind an
//! export. Today that is RAM ([`memory::MemoryBackend`]) or a file or block
//! device through io_uring ([`file::FileBackend`]); the encrypted,
//! erasure-coded volume plugs in here next.
//!
//! Buffers are owned and move through the call: `write` takes the payload
//! as [`Bytes`] (often a zero-copy slice of the connection's read buffer),
//! `read` hands back [`ReadData`] whose pieces the server writes straight
//! to the socket. Holes come back as [`ReadPiece::Zero`] so a structured reply
//! can say "zeroes here" instead of sending them.
//!
//! Every backend must pass the conformance suite in `tests/conformance.rs`.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use meshdisk::backend::{Backend, memory::MemoryBackend};
//! let disk = MemoryBackend::new(1 << 20);
//! disk.write(4096, bytes::Bytes::from_static(b"hello"), false).await.unwrap();
//! let data = disk.read(4096, 5).await.unwrap();
//! assert_eq!(data.to_vec(), b"hello");
//! # });
//! ```

pub mod file;
pub mod memory;

use std::future::Future;
use std::io;

use bytes::Bytes;

/// What kind of failure a backend operation met. It decides the NBD
/// error the export's client sees (one table, in the NBD server) while the
/// message says what happened; a backend with its own errors (the volume:
/// fencing, peers out of reach, ...) says which kind each one is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Reading or writing the storage failed.
    Io,
    /// This writer may no longer write: another machine took the export
    /// over, or the right to write lapsed.
    Fenced,
    /// Too little of the storage behind the export can be reached.
    Unavailable,
    /// The data came back damaged beyond repair.
    Corrupt,
    /// No space left.
    Full,
    /// Not permitted: a read-only export, or no access to the storage.
    Denied,
    /// The request makes no sense for this backend.
    Invalid,
    /// The backend cannot do that (e.g. zero quickly).
    NotSupported,
}

/// A failed backend operation: what was attempted, where, and why.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} at offset {offset} length {length}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        length: u64,
        #[source]
        source: io::Error,
    },
    #[error("{op}: the export is read-only")]
    ReadOnly { op: &'static str },
    #[error("write zeroes at offset {offset}: no fast way to zero here")]
    FastZeroUnsupported { offset: u64 },
    #[error("{op}: backend is poisoned after an earlier I/O error: {cause}")]
    Poisoned { op: &'static str, cause: String },
    /// A failure the backend classified itself.
    #[error("{op} at offset {offset} length {length}: {source}")]
    Failed {
        op: &'static str,
        offset: u64,
        length: u64,
        kind: ErrorKind,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    pub fn io(op: &'static str, offset: u64, length: u64, source: io::Error) -> Self {
        Error::Io { op, offset, length, source }
    }

    /// A failure of `kind`; `source` says what happened.
    pub fn failed(
        kind: ErrorKind,
        op: &'static str,
        offset: u64,
        length: u64,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Failed { op, offset, length, kind, source: source.into() }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ErrorKind::Full,
                Some(libc::EROFS | libc::EPERM | libc::EACCES) => ErrorKind::Denied,
                _ => ErrorKind::Io,
            },
            Error::ReadOnly { .. } => ErrorKind::Denied,
            Error::FastZeroUnsupported { .. } => ErrorKind::NotSupported,
            Error::Poisoned { .. } => ErrorKind::Io,
            Error::Failed { kind, .. } => *kind,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// What a backend can do; the server advertises exactly these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    pub read_only: bool,
    /// FLUSH and FUA make data durable (memory: trivially).
    pub flush: bool,
    pub trim: bool,
    pub write_zeroes: bool,
    /// WRITE_ZEROES with FAST_ZERO fails quickly instead of writing zeroes.
    pub fast_zero: bool,
    pub cache: bool,
    /// A flush on one connection covers writes done through every other.
    pub multi_conn: bool,
    /// [`Backend::health_status`] answers: the server offers the
    /// `meshdisk:health` metadata context.
    pub health: bool,
}

impl Features {
    /// Every NBD operation supported, durable flush shared by all
    /// connections; no health map (a single disk or RAM has no redundancy
    /// to report).
    pub const fn all(read_only: bool) -> Self {
        Self {
            read_only,
            flush: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            health: false,
        }
    }
}

/// One piece of a read: bytes, or a run of zeroes not worth sending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadPiece {
    Data(Bytes),
    Zero(u32),
}

impl ReadPiece {
    pub fn len(&self) -> usize {
        match self {
            ReadPiece::Data(b) => b.len(),
            ReadPiece::Zero(n) => *n as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The result of a read: consecutive pieces covering the requested range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadData {
    pub pieces: Vec<ReadPiece>,
}

impl ReadData {
    pub fn data(b: Bytes) -> Self {
        Self { pieces: vec![ReadPiece::Data(b)] }
    }

    /// Appends a piece, merging adjacent zero runs and dropping empties.
    pub fn push(&mut self, piece: ReadPiece) {
        if piece.is_empty() {
            return;
        }
        if let (Some(ReadPiece::Zero(prev)), ReadPiece::Zero(n)) = (self.pieces.last_mut(), &piece) {
            *prev += n;
            return;
        }
        self.pieces.push(piece);
    }

    pub fn len(&self) -> usize {
        self.pieces.iter().map(ReadPiece::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flattens into one buffer (tests and tools; the server never copies).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        for s in &self.pieces {
            match s {
                ReadPiece::Data(b) => out.extend_from_slice(b),
                ReadPiece::Zero(n) => out.resize(out.len() + *n as usize, 0),
            }
        }
        out
    }
}

/// Allocation state of a run of the export, as `base:allocation` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated: reads as zeroes, costs no space.
    pub hole: bool,
    /// Known to read as zeroes.
    pub zero: bool,
}

/// Appends a run to an extent list, merging it with the previous run when
/// their state matches.
pub(crate) fn push_extent(out: &mut Vec<Extent>, length: u64, hole: bool) {
    match out.last_mut() {
        Some(last) if last.hole == hole => last.length += length,
        _ => out.push(Extent { length, hole, zero: hole }),
    }
}

/// How redundantly a run of the export's newest data is stored, as the
/// `meshdisk:health` metadata context reports it: the low three bits of
/// its status flags (docs/formats.md, "meshdisk:health metadata
/// context"). Ordered from best to worst, so the worst of several is the
/// greatest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum Redundancy {
    /// Every shard on its own peer that is up; also what unwritten and
    /// trimmed ranges report (there is nothing to lose).
    Whole = 0,
    /// Fewer shards up than the volume stores, but no repair is needed yet.
    Degraded = 1,
    /// Below the volume's repair threshold, or one failure from unreadable:
    /// repair rebuilds it.
    AtRisk = 2,
    /// Fewer than k shards up now: unreadable until peers return.
    Unavailable = 3,
    /// Fewer than k shards on peers that are not lost: gone.
    Lost = 4,
}

/// `meshdisk:health` flag: the run's newest version is only in this
/// machine's local log, not yet on peers (its [`Redundancy`] bits are
/// then [`Redundancy::Whole`]: no segment holds it yet).
pub const HEALTH_LOCAL_ONLY: u32 = 8;

/// The redundancy of a run of the export, as [`Backend::health_status`]
/// reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthExtent {
    pub length: u64,
    pub redundancy: Redundancy,
    /// Newest version only in the local log ([`HEALTH_LOCAL_ONLY`]).
    pub local_only: bool,
}

impl HealthExtent {
    /// The extent's `meshdisk:health` status flags.
    pub fn flags(&self) -> u32 {
        self.redundancy as u32 | if self.local_only { HEALTH_LOCAL_ONLY } else { 0 }
    }
}

/// Appends a run to a health map, merging it with the previous run when
/// their flags match (a clone of [`push_extent`] for the other context).
pub fn push_health(out: &mut Vec<HealthExtent>, length: u64, redundancy: Redundancy, local_only: bool) {
    if length == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.redundancy == redundancy && last.local_only == local_only => last.length += length,
        _ => out.push(HealthExtent { length, redundancy, local_only }),
    }
}

/// Flags of a WRITE_ZEROES.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Persist before replying.
    pub fua: bool,
    /// The range may become a hole (the client did not send NO_HOLE).
    pub may_trim: bool,
    /// Fail with [`Error::FastZeroUnsupported`] rather than write zeroes slowly.
    pub fast: bool,
}

/// The storage behind an export.
///
/// Callers guarantee every range lies inside `0..size()` (the protocol
/// layer validated it); zero-length calls are allowed and do nothing.
/// Methods may run concurrently from many connections.
pub trait Backend: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn features(&self) -> Features;

    fn read(&self, offset: u64, length: u32) -> impl Future<Output = Result<ReadData>> + Send;
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<()>> + Send;
    /// Makes every write that completed before this call durable.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;
    /// Forgets a range; later reads may return anything until it is written.
    fn trim(&self, offset: u64, length: u32, fua: bool) -> impl Future<Output = Result<()>> + Send;
    fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        flags: ZeroFlags,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Allocation state from `offset`: at least one extent, at most `length` bytes.
    fn block_status(&self, offset: u64, length: u32) -> impl Future<Output = Result<Vec<Extent>>> + Send;
    /// Hint: the range will be read soon.
    fn cache(&self, offset: u64, length: u32) -> impl Future<Output = Result<()>> + Send;
    /// Redundancy from `offset`, as [`block_status`](Self::block_status):
    /// at least one extent, at most `length` bytes. Only called when
    /// [`Features::health`] says the backend has a health map.
    fn health_status(
        &self,
        offset: u64,
        length: u32,
    ) -> impl Future<Output = Result<Vec<HealthExtent>>> + Send {
        async move {
            Err(Error::failed(
                ErrorKind::NotSupported,
                "health status",
                offset,
                u64::from(length),
                "this backend has no health map",
            ))
        }
    }
}
