//! The NBD protocol server: the face meshdisk shows to `nbd-client`, QEMU,
//! libnbd's tools and fio.
//!
//! - [`proto`]: the wire format as pure functions (parse, validate, encode);
//! - [`handshake`]: fixed-newstyle option haggling;
//! - [`server`]: listeners, the per-connection reader and writer, and the
//!   bounds on bytes in flight.
//!
//! Supported: fixed newstyle with NO_ZEROES; options EXPORT_NAME, ABORT,
//! LIST, INFO, GO, STRUCTURED_REPLY, LIST/SET_META_CONTEXT
//! (`base:allocation`, and `meshdisk:health` when the backend has a health
//! map: docs/formats.md); STARTTLS is refused by policy. Commands READ
//! (with structured replies, holes and DF), WRITE, FLUSH, TRIM,
//! WRITE_ZEROES (NO_HOLE, FAST_ZERO), CACHE, BLOCK_STATUS (REQ_ONE, one
//! chunk per selected context), DISC, and FUA on any
//! of them. Requests on a connection run concurrently and complete out of
//! order; CAN_MULTI_CONN is advertised whenever the backend's flush covers
//! all connections. READ and WRITE move up to 32 MiB, the maximum block size
//! INFO/GO advertise, or 64 MiB for a client that entered with EXPORT_NAME
//! and was never told one.

pub mod errors;
pub mod handshake;
pub mod proto;
pub mod server;

pub use server::{Limits, Server, ServerConfig};
