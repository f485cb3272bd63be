//! A volume as the attaching machine serves it: its write-ahead log
//! ([`wal`]) and its stripe cache ([`cache`]); destaging of copy-on-write
//! stripes and the NBD backend follow.

pub mod cache;
pub mod wal;
