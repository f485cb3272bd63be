//! meshdisk turns the spare disk space of a group of ordinary computers
//! into one encrypted, self-healing virtual disk, served over NBD.
//!
//! The modules, in the order the data flows through them:
//!
//! ```text
//! nbd-client / qemu / fio / nbdcopy / nbdfuse
//!   │ NBD (fixed newstyle, structured replies, base:allocation, multi-conn, FUA)
//!   ▼
//! nbd ──► backend::Backend ──► memory | file (meshdisk serve)
//!                          └──► volume (meshdisk attach): log, block cache, commits, lease
//!                                 │ codec: AES-256-XTS ─► Reed-Solomon ─► blake3 trees ─► segment shards
//!                                 ▼
//!                               client ──► api (messages) ──► transport (QUIC, mutual TLS)
//!                                 │                                   │
//!                                 ▼                                   ▼
//!                               directory (meta, placement,         peer (shard store)
//!                                 tokens, heal: the collector)
//!
//! membership: the cluster CA, roles, join tokens, credentials (under transport)
//! sys: io_uring, buffers, the clock, the one durable write, background workers
//! cli: one file per command family; main.rs parses and dispatches
//! ```
//!
//! A module imports only from the layers below it (`tools/check-layers`
//! checks it): `sys` and `size` → `codec` → `backend` → `nbd`;
//! `membership` → `transport` → `api` → `client` → `volume` | `directory` |
//! `peer` → `cli`. `directory` and `peer` never import each other, `nbd`
//! sees only `backend`, and `volume` reaches the cluster only through
//! `client`.

pub mod api;
pub mod backend;
pub mod cli;
pub mod client;
pub mod codec;
pub mod directory;
pub mod membership;
pub mod nbd;
pub mod peer;
pub mod size;
pub mod sys;
pub mod transport;
pub mod volume;
