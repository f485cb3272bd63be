//! A volume as the attaching machine serves it: its write-ahead log
//! ([`wal`]) first; the cache, destaging of copy-on-write stripes and the
//! NBD backend follow.

pub mod wal;
