//! meshdisk turns the spare disk space of a group of ordinary computers
//! into one encrypted, self-healing virtual disk, served over NBD.
//!
//! ```text
//! nbd-client / qemu / fio / nbdcopy / nbdfuse
//!   │ NBD (fixed newstyle, structured replies, base:allocation, multi-conn, FUA)
//!   ▼
//! nbd::server ──► backend::Backend ──► memory | file (io_uring)
//!                                 └──► (next) volume: log, cache, stripes on peers
//!                                                     │
//!                                         codec: AES-256-XTS → Reed-Solomon → blake3 → shards
//! ```
//!
//! Modules follow the data: [`nbd`] speaks the protocol, [`backend`] is the
//! seam the storage plugs into, [`codec`] turns plaintext stripes into
//! encrypted, erasure-coded, hashed shards and back, [`meta`] is the
//! directory's versioned key-value store (compare-and-set, leases), [`uring`] is the one io_uring driver that
//! every on-disk component shares, [`store`] is a peer's shard store, [`pool`] recycles large buffers, [`size`] parses the sizes people type.

pub mod backend;
pub mod cluster;
pub mod codec;
pub mod demo;
pub mod meta;
pub mod nbd;
pub mod net;
pub mod passphrase;
pub mod pool;
pub mod size;
pub mod store;
pub mod uring;
pub mod volume;
