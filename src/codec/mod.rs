//! The codec: every byte meshdisk stores passes through here, on the
//! attaching machine, before it leaves for the peers.
//!
//! ```text
//! a written 4 KiB block
//!   │ xts: AES-256-XTS, tweak = (block address, the write's sequence)
//!   ▼
//! ciphertext blocks, packed into a segment's data area (k shards)
//!   │ erasure: Reed-Solomon, m parity shards from the k data shards
//!   ▼
//! k + m shards ── blake3 tree of each ──► segment shard: header (volume,
//!                                         segment, geometry, index, every
//!                                         shard's root) + payload
//! ```
//!
//! Reading runs the same way back: blocks proved against their shard's
//! root (which the segment root, from the volume's MAC'd root record,
//! vouches for), a missing or failing data shard rebuilt from k others
//! (never when the data shard answers: the code is systematic), decrypted.
//!
//! Encryption comes before erasure coding, so repair, scrub and migration
//! work on ciphertext and never need the key. Everything here is pure
//! computation (no I/O): [`key`] and [`keyslot`] derive, wrap and check
//! keys, [`xts`] encrypts blocks, [`erasure`] makes and uses parity,
//! [`segment`] is the segment and shard format with its hash trees,
//! [`sequence`] names writes and segments, [`root`] is the volume's
//! authenticated root record, and [`bench`](mod@bench) measures it all
//! (`meshdisk bench codec`). The byte layouts are drawn in docs/formats.md.

pub mod bench;
pub mod erasure;
pub mod key;
pub mod keyslot;
pub mod reader;
pub mod root;
pub mod segment;
pub mod sequence;
pub mod xts;

pub use erasure::{Erasure, Geometry, GeometryError};
pub use key::{KdfParams, KeyCheck, KeyError, VolumeKey};
pub use xts::{SECTOR_SIZE, SectorCipher};
