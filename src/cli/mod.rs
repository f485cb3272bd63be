//! The command line: one file per command family.

pub mod bench_cluster;
pub mod demo;
pub mod passphrase;
pub mod status;
