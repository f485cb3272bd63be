//! meshdisk turns the spare disk space of a group of ordinary computers
//! into one encrypted, self-healing virtual disk, served over NBD.

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
