//! The stripe codec: every byte meshdisk stores passes through here, on the
//! attaching machine, before it leaves for the peers.
//!
//! ```text
//! plaintext stripe (k × shard_size bytes, whole 4 KiB sectors)
//!   │ xts: AES-256-XTS per sector, tweak = (sector number, stripe generation)
//!   ▼
//! k ciphertext data shards
//!   │ erasure: Reed-Solomon, m parity shards from the k data shards
//!   ▼
//! k + m shards ── blake3 of each ──► shard: header (volume, stripe, generation,
//!                                    index, k, m, length, hash) + payload
//! ```
//!
//! Reading runs the same way back: verify each shard's hash (a shard that
//! fails is missing), rebuild missing data shards from any k good ones
//! (never when all k data shards are there: the code is systematic), decrypt.
//!
//! Encryption comes before erasure coding, so repair, scrub and migration
//! work on ciphertext and never need the key. Everything here is pure
//! computation (no I/O): [`key`] derives and checks keys, [`xts`] encrypts
//! sectors, [`erasure`] makes and uses parity, [`shard`] is the on-the-wire
//! and on-disk shard format, [`stripe`] ties them into the two calls the
//! volume makes, and [`bench`](mod@bench) measures all of it (`meshdisk bench codec`).
//! The byte layouts are drawn in docs/formats.md.

pub mod bench;
pub mod erasure;
pub mod key;
pub mod keyslot;
pub mod reader;
pub mod root;
pub mod segment;
pub mod sequence;
pub mod shard;
pub mod stripe;
pub mod xts;

pub use erasure::{Erasure, Geometry, GeometryError};
pub use key::{KdfParams, KeyCheck, KeyError, VolumeKey};
pub use shard::{ShardError, ShardHash, ShardHeader};
pub use stripe::{DecodeReport, StripeCodec, StripeError};
pub use xts::{SECTOR_SIZE, SectorCipher};
