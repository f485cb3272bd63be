//! The NBD wire format: constants, request parsing and validation, reply
//! encoding. Everything here is a pure function over bytes, with no I/O, so
//! it can be unit-tested, property-tested and fuzzed in isolation.
//!
//! The request gate follows nbdkit's split: [`RequestHeader::parse`] checks
//! only the framing (magic, sizes), [`validate`] decides whether a framed
//! request may run and, if not, which NBD error it earns. A refused `WRITE`
//! still has its payload on the wire; the caller must consume it so the
//! stream stays in sync.
//!
//! ```
//! use meshdisk::nbd::proto::{RequestHeader, validate, Session, Command, REQUEST_MAGIC};
//! let mut raw = [0u8; 28];
//! raw[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
//! raw[6..8].copy_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
//! raw[24..28].copy_from_slice(&4096u32.to_be_bytes());
//! let header = RequestHeader::parse(&raw).unwrap();
//! let session = Session { size: 1 << 20, ..Session::default() };
//! assert!(matches!(validate(&header, &session), Ok(Command::Read { .. })));
//! ```

use bytes::{BufMut, BytesMut};

// ---- magics ----------------------------------------------------------------

/// `NBDMAGIC`, the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---- handshake flags ---------------------------------------------------------

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- options and option replies ----------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- transmission flags --------------------------------------------------------

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- commands and command flags ----------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---- structured reply types ----------------------------------------------------

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The metadata contexts we serve, and the ids we give them (fixed: the
/// spec lets ids be any value unique among the selected contexts).
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Per-range redundancy, offered when the backend has a health map; its
/// flags are `backend::Redundancy` and `backend::HEALTH_LOCAL_ONLY`
/// (docs/formats.md, "meshdisk:health metadata context").
pub const MESHDISK_HEALTH: &str = "meshdisk:health";
pub const MESHDISK_HEALTH_ID: u32 = 2;

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`: any byte
/// alignment works, 4 KiB is what the storage behind us prefers, and no
/// single READ or WRITE may move more than [`MAX_PAYLOAD`].
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest READ or WRITE payload we advertise, and accept from clients that
/// were told so (32 MiB, the size the spec tells clients to stay within).
/// Larger requests are refused with `EOVERFLOW`, after a WRITE's payload has
/// been consumed.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest READ or WRITE payload accepted from a client that entered with
/// `NBD_OPT_EXPORT_NAME` and so was never told a maximum block size (old
/// `nbd-client`s and kernels): 64 MiB, as the reference `nbd-server`
/// accepts. Such a request takes a connection's whole default byte budget.
pub const EXPORT_NAME_MAX_PAYLOAD: u32 = 64 << 20;

/// Size of a transmission request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;

/// NBD error values (the protocol's own, not the host's errno).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdError {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl NbdError {
    pub fn code(self) -> u32 {
        self as u32
    }
}

// ---- requests ------------------------------------------------------------------

/// A framed request header, before any semantic check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// The stream is not NBD any more: the connection must close.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FramingError {
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
}

impl RequestHeader {
    /// Parses the 28-byte header. Only the magic can make it unparseable.
    pub fn parse(raw: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, FramingError> {
        let magic = u32::from_be_bytes(raw[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(FramingError::BadMagic(magic));
        }
        Ok(Self {
            flags: u16::from_be_bytes(raw[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(raw[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(raw[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(raw[16..24].try_into().unwrap()),
            length: u32::from_be_bytes(raw[24..28].try_into().unwrap()),
        })
    }

    /// Bytes of payload that follow this header on the wire, whether or not
    /// the request turns out to be valid.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE { self.length } else { 0 }
    }

    /// Encodes the header (used by tests, fuzzers and benchmarks as a client).
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }
}

/// What the transmission phase was negotiated to: the export and the
/// options this connection agreed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub size: u64,
    /// Transmission flags sent to the client.
    pub tflags: u16,
    pub structured: bool,
    /// `base:allocation` was selected with SET_META_CONTEXT.
    pub base_allocation: bool,
    /// `meshdisk:health` was selected with SET_META_CONTEXT.
    pub meshdisk_health: bool,
    /// Largest READ or WRITE accepted: [`MAX_PAYLOAD`] when the client was
    /// sent block sizes (INFO/GO), [`EXPORT_NAME_MAX_PAYLOAD`] when not.
    pub max_payload: u32,
}

impl Default for Session {
    fn default() -> Self {
        Self {
            size: 0,
            tflags: 0,
            structured: false,
            base_allocation: false,
            meshdisk_health: false,
            max_payload: MAX_PAYLOAD,
        }
    }
}

impl Session {
    fn has(&self, flag: u16) -> bool {
        self.tflags & flag != 0
    }
}

/// A request that passed validation: every range is inside the export and
/// every flag is one this command and this session allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
        df: bool,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        length: u32,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    /// One reply chunk per selected context: `allocation` for
    /// `base:allocation`, `health` for `meshdisk:health` (at least one).
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
        allocation: bool,
        health: bool,
    },
}

/// Why a framed request may not run: the error to send and the cause to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub error: NbdError,
    pub reason: &'static str,
}

fn refuse(error: NbdError, reason: &'static str) -> Result<Command, Refusal> {
    Err(Refusal { error, reason })
}

/// Decides whether `h` may run in `s`. Pure; the order of checks mirrors the
/// spec's error guidance (unknown command, bad flags, permissions, ranges).
pub fn validate(h: &RequestHeader, s: &Session) -> Result<Command, Refusal> {
    const KNOWN_FLAGS: u16 =
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
    use NbdError::*;

    let allowed_flags = match h.kind {
        CMD_READ => CMD_FLAG_DF | CMD_FLAG_FUA,
        CMD_WRITE | CMD_TRIM | CMD_FLUSH | CMD_CACHE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE | CMD_FLAG_FUA,
        CMD_DISC => KNOWN_FLAGS,
        _ => return refuse(Inval, "unknown command"),
    };
    if h.flags & !KNOWN_FLAGS != 0 {
        return refuse(Inval, "unknown command flag");
    }
    if h.flags & !allowed_flags != 0 {
        return refuse(Inval, "flag not valid for this command");
    }
    // Clients are known to set FUA on any command; the spec says to accept
    // it wherever FUA was advertised.
    if h.flags & CMD_FLAG_FUA != 0 && !s.has(TFLAG_SEND_FUA) {
        return refuse(Inval, "FUA was not negotiated");
    }
    if h.flags & CMD_FLAG_DF != 0 && !s.has(TFLAG_SEND_DF) {
        return refuse(Inval, "DF needs structured replies");
    }
    if h.flags & CMD_FLAG_FAST_ZERO != 0 && !s.has(TFLAG_SEND_FAST_ZERO) {
        return refuse(Inval, "FAST_ZERO was not negotiated");
    }

    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, length) = (h.offset, h.length);
    let in_range = offset <= s.size && u64::from(length) <= s.size - offset;
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);

    match h.kind {
        CMD_DISC => return Ok(Command::Disconnect),
        CMD_FLUSH => {
            if !s.has(TFLAG_SEND_FLUSH) {
                return refuse(Inval, "FLUSH was not negotiated");
            }
            if offset != 0 || length != 0 {
                return refuse(Inval, "FLUSH with nonzero offset or length");
            }
            return Ok(Command::Flush);
        }
        CMD_TRIM if !s.has(TFLAG_SEND_TRIM) => return refuse(Inval, "TRIM was not negotiated"),
        CMD_WRITE_ZEROES if !s.has(TFLAG_SEND_WRITE_ZEROES) => {
            return refuse(Inval, "WRITE_ZEROES was not negotiated");
        }
        CMD_CACHE if !s.has(TFLAG_SEND_CACHE) => return refuse(Inval, "CACHE was not negotiated"),
        CMD_BLOCK_STATUS if !(s.structured && (s.base_allocation || s.meshdisk_health)) => {
            return refuse(Inval, "BLOCK_STATUS without a negotiated metadata context");
        }
        _ => {}
    }
    if writes && s.has(TFLAG_READ_ONLY) {
        return refuse(Perm, "write to a read-only export");
    }
    if matches!(h.kind, CMD_READ | CMD_WRITE) && length > s.max_payload {
        return refuse(Overflow, "request larger than the maximum block size");
    }
    if !in_range {
        let error = if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) { NoSpc } else { Inval };
        return refuse(error, "request beyond the end of the export");
    }
    Ok(match h.kind {
        CMD_READ => Command::Read { offset, length, df: h.flags & CMD_FLAG_DF != 0 },
        CMD_WRITE => Command::Write { offset, length, fua },
        CMD_TRIM => Command::Trim { offset, length, fua },
        CMD_CACHE => Command::Cache { offset, length },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
            fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => {
            if length == 0 {
                return refuse(Inval, "BLOCK_STATUS of zero length");
            }
            Command::BlockStatus {
                offset,
                length,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
                allocation: s.base_allocation,
                health: s.meshdisk_health,
            }
        }
        _ => unreachable!("every other command returned above"),
    })
}

// ---- replies ---------------------------------------------------------------------

/// Simple reply header (16 bytes); READ data follows it.
pub fn put_simple_reply(out: &mut BytesMut, cookie: u64, error: u32) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// Structured chunk header (20 bytes); `length` bytes of payload follow.
pub fn put_chunk_header(out: &mut BytesMut, cookie: u64, flags: u16, kind: u16, length: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(length);
}

/// `NBD_REPLY_TYPE_OFFSET_DATA` header and offset; `data_len` bytes follow.
pub fn put_data_chunk_header(out: &mut BytesMut, cookie: u64, done: bool, offset: u64, data_len: u32) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    put_chunk_header(out, cookie, flags, REPLY_TYPE_OFFSET_DATA, data_len + 8);
    out.put_u64(offset);
}

/// `NBD_REPLY_TYPE_OFFSET_HOLE`: `len` bytes at `offset` read as zeroes.
pub fn put_hole_chunk(out: &mut BytesMut, cookie: u64, done: bool, offset: u64, len: u32) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    put_chunk_header(out, cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12);
    out.put_u64(offset);
    out.put_u32(len);
}

/// `NBD_REPLY_TYPE_NONE` with DONE: success with no payload.
pub fn put_done_chunk(out: &mut BytesMut, cookie: u64) {
    put_chunk_header(out, cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
}

/// `NBD_REPLY_TYPE_ERROR` with DONE and a message for people.
pub fn put_error_chunk(out: &mut BytesMut, cookie: u64, error: u32, message: &str) {
    let msg = truncate_utf8(message, 4096);
    put_chunk_header(out, cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + msg.len() as u32);
    out.put_u32(error);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg.as_bytes());
}

/// `NBD_REPLY_TYPE_BLOCK_STATUS`: `(length, flags)` descriptors of one
/// context; `done` on the last chunk of the reply (one chunk per selected
/// context).
pub fn put_block_status_chunk(
    out: &mut BytesMut,
    cookie: u64,
    done: bool,
    context: u32,
    extents: &[(u32, u32)],
) {
    let len = 4 + 8 * extents.len() as u32;
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    put_chunk_header(out, cookie, flags, REPLY_TYPE_BLOCK_STATUS, len);
    out.put_u32(context);
    for &(length, flags) in extents {
        out.put_u32(length);
        out.put_u32(flags);
    }
}

/// Option reply header; `length` bytes of data follow.
pub fn put_option_reply(out: &mut BytesMut, option: u32, reply: u32, length: u32) {
    out.put_u64(OPT_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(length);
}

/// The longest prefix of `s` that fits in `max` bytes and is still UTF-8.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn full_session(size: u64) -> Session {
        Session {
            size,
            tflags: TFLAG_HAS_FLAGS
                | TFLAG_SEND_FLUSH
                | TFLAG_SEND_FUA
                | TFLAG_SEND_TRIM
                | TFLAG_SEND_WRITE_ZEROES
                | TFLAG_SEND_DF
                | TFLAG_CAN_MULTI_CONN
                | TFLAG_SEND_CACHE
                | TFLAG_SEND_FAST_ZERO,
            structured: true,
            base_allocation: true,
            meshdisk_health: false,
            max_payload: MAX_PAYLOAD,
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, kind, cookie: 7, offset, length }
    }

    fn encode(h: &RequestHeader) -> [u8; 28] {
        let mut b = BytesMut::new();
        h.encode(&mut b);
        b[..].try_into().unwrap()
    }

    #[test]
    fn header_round_trip() {
        let h = req(CMD_WRITE, CMD_FLAG_FUA, 1 << 40, 65536);
        assert_eq!(RequestHeader::parse(&encode(&h)), Ok(h));
        assert_eq!(h.payload_len(), 65536);
        assert_eq!(req(CMD_READ, 0, 0, 10).payload_len(), 0);
    }

    #[test]
    fn bad_magic_is_a_framing_error() {
        let mut raw = encode(&req(CMD_READ, 0, 0, 1));
        raw[0] ^= 0xff;
        assert!(matches!(RequestHeader::parse(&raw), Err(FramingError::BadMagic(_))));
    }

    #[test]
    fn out_of_range_errors() {
        let s = full_session(1 << 20);
        let e = |h| validate(&h, &s).unwrap_err().error;
        assert_eq!(e(req(CMD_READ, 0, 1 << 20, 1)), NbdError::Inval);
        assert_eq!(e(req(CMD_WRITE, 0, (1 << 20) - 1, 2)), NbdError::NoSpc);
        assert_eq!(e(req(CMD_WRITE_ZEROES, 0, u64::MAX, 1)), NbdError::NoSpc);
        assert_eq!(e(req(CMD_TRIM, 0, u64::MAX - 1, 10)), NbdError::Inval);
        assert_eq!(e(req(CMD_BLOCK_STATUS, 0, 2 << 20, 1)), NbdError::Inval);
        // The last byte and zero-length requests at the end are in range.
        assert!(validate(&req(CMD_READ, 0, (1 << 20) - 1, 1), &s).is_ok());
        assert!(validate(&req(CMD_WRITE, 0, 1 << 20, 0), &s).is_ok());
    }

    #[test]
    fn oversized_and_flag_errors() {
        let s = full_session(1 << 40);
        let e = |h| validate(&h, &s).unwrap_err().error;
        assert_eq!(e(req(CMD_READ, 0, 0, MAX_PAYLOAD + 1)), NbdError::Overflow);
        assert_eq!(e(req(CMD_WRITE, 0, 0, u32::MAX)), NbdError::Overflow);
        assert_eq!(e(req(CMD_READ, 1 << 9, 0, 1)), NbdError::Inval);
        assert_eq!(e(req(CMD_WRITE, CMD_FLAG_DF, 0, 1)), NbdError::Inval);
        assert_eq!(e(req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 1)), NbdError::Inval);
        assert_eq!(e(req(99, 0, 0, 1)), NbdError::Inval);
        assert_eq!(e(req(CMD_FLUSH, 0, 1, 0)), NbdError::Inval);
        assert_eq!(e(req(CMD_BLOCK_STATUS, 0, 0, 0)), NbdError::Inval);
        // Big trims and zeroes are fine: no payload moves.
        assert!(validate(&req(CMD_TRIM, 0, 0, u32::MAX), &s).is_ok());
    }

    #[test]
    fn clients_never_told_a_block_size_may_move_64_mib() {
        let s = Session { max_payload: EXPORT_NAME_MAX_PAYLOAD, ..full_session(1 << 40) };
        let big = EXPORT_NAME_MAX_PAYLOAD;
        assert!(
            matches!(validate(&req(CMD_WRITE, 0, 0, big), &s), Ok(Command::Write { length, .. }) if length == big)
        );
        assert!(
            matches!(validate(&req(CMD_READ, 0, 0, big), &s), Ok(Command::Read { length, .. }) if length == big)
        );
        let e = |h| validate(&h, &s).unwrap_err().error;
        assert_eq!(e(req(CMD_WRITE, 0, 0, big + 1)), NbdError::Overflow);
        assert_eq!(e(req(CMD_READ, 0, 0, big + 1)), NbdError::Overflow);
        // Clients that were told 32 MiB are held to it.
        let told = full_session(1 << 40);
        assert_eq!(
            validate(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), &told).unwrap_err().error,
            NbdError::Overflow
        );
    }

    #[test]
    fn negotiation_gates_commands() {
        let mut s = full_session(1 << 20);
        s.tflags = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY;
        s.structured = false;
        s.base_allocation = false;
        let e = |h| validate(&h, &s).unwrap_err().error;
        assert_eq!(e(req(CMD_WRITE, 0, 0, 1)), NbdError::Perm);
        assert_eq!(e(req(CMD_FLUSH, 0, 0, 0)), NbdError::Inval);
        assert_eq!(e(req(CMD_TRIM, 0, 0, 1)), NbdError::Inval);
        assert_eq!(e(req(CMD_READ, CMD_FLAG_DF, 0, 1)), NbdError::Inval);
        assert_eq!(e(req(CMD_READ, CMD_FLAG_FUA, 0, 1)), NbdError::Inval);
        assert_eq!(e(req(CMD_BLOCK_STATUS, 0, 0, 1)), NbdError::Inval);
        assert!(validate(&req(CMD_READ, 0, 0, 1), &s).is_ok());
        assert_eq!(validate(&req(CMD_DISC, 0, 0, 0), &s), Ok(Command::Disconnect));
    }

    #[test]
    fn block_status_answers_the_selected_contexts() {
        let both = |allocation, health| Session {
            base_allocation: allocation,
            meshdisk_health: health,
            ..full_session(1 << 20)
        };
        let h = req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4096, 8192);
        for (allocation, health) in [(true, false), (false, true), (true, true)] {
            assert_eq!(
                validate(&h, &both(allocation, health)),
                Ok(Command::BlockStatus { offset: 4096, length: 8192, req_one: true, allocation, health })
            );
        }
        // No context selected: no block status, whatever else was agreed.
        assert_eq!(validate(&h, &both(false, false)).unwrap_err().error, NbdError::Inval);
        // Contexts need structured replies.
        let s = Session { structured: false, ..both(true, true) };
        assert_eq!(validate(&h, &s).unwrap_err().error, NbdError::Inval);
    }

    #[test]
    fn reply_encodings() {
        let mut b = BytesMut::new();
        put_simple_reply(&mut b, 0x1122, 22);
        assert_eq!(&b[..], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0x11, 0x22]);
        b.clear();
        put_hole_chunk(&mut b, 1, true, 4096, 512);
        assert_eq!(b.len(), 20 + 12);
        assert_eq!(&b[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&b[6..8], &REPLY_TYPE_OFFSET_HOLE.to_be_bytes());
        assert_eq!(&b[16..20], &12u32.to_be_bytes());
        b.clear();
        put_block_status_chunk(&mut b, 1, true, BASE_ALLOCATION_ID, &[(4096, 3), (8192, 0)]);
        assert_eq!(b.len(), 20 + 4 + 16);
        assert_eq!(&b[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&b[20..24], &BASE_ALLOCATION_ID.to_be_bytes());
        b.clear();
        // The first of two contexts' chunks is not the last of the reply.
        put_block_status_chunk(&mut b, 1, false, MESHDISK_HEALTH_ID, &[(4096, 1 | 8)]);
        assert_eq!(&b[4..6], &0u16.to_be_bytes());
        assert_eq!(&b[6..8], &REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
        assert_eq!(&b[16..20], &12u32.to_be_bytes());
        assert_eq!(&b[20..24], &MESHDISK_HEALTH_ID.to_be_bytes());
        assert_eq!(&b[28..32], &9u32.to_be_bytes());
        b.clear();
        put_error_chunk(&mut b, 1, 5, "é".repeat(3000).as_str());
        let msg_len = u16::from_be_bytes([b[24], b[25]]) as usize;
        assert!(msg_len <= 4096);
        assert_eq!(b.len(), 26 + msg_len);
        assert!(std::str::from_utf8(&b[26..]).is_ok());
    }

    proptest! {
        #[test]
        fn validated_ranges_are_inside_the_export(
            kind in 0u16..10, flags in any::<u16>(), offset in any::<u64>(),
            length in any::<u32>(), size in 0u64..(1 << 44), ro in any::<bool>(),
            old_style in any::<bool>(),
        ) {
            let mut s = full_session(size);
            if ro { s.tflags |= TFLAG_READ_ONLY; }
            if old_style { s.max_payload = EXPORT_NAME_MAX_PAYLOAD; }
            let h = req(kind, flags, offset, length);
            prop_assert_eq!(RequestHeader::parse(&encode(&h)), Ok(h));
            match validate(&h, &s) {
                Ok(Command::Read { offset, length, .. })
                | Ok(Command::Write { offset, length, .. })
                | Ok(Command::Trim { offset, length, .. })
                | Ok(Command::Cache { offset, length })
                | Ok(Command::WriteZeroes { offset, length, .. })
                | Ok(Command::BlockStatus { offset, length, .. }) => {
                    prop_assert!(offset.checked_add(u64::from(length)).unwrap() <= size);
                    if matches!(kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) { prop_assert!(!ro); }
                    if matches!(kind, CMD_READ | CMD_WRITE) { prop_assert!(length <= s.max_payload); }
                }
                Ok(Command::Flush) => prop_assert_eq!((offset, length), (0, 0)),
                Ok(Command::Disconnect) => prop_assert_eq!(kind, CMD_DISC),
                Err(r) => prop_assert!(!r.reason.is_empty()),
            }
        }
    }
}
