//! The root record: the one thing a volume's contents hang from.
//!
//! Its format, sealing, parsing and freshness check live in
//! [`crate::codec::root`], below both the volume and the directory (which
//! parses roots without the key for its compare-and-set), so there is one
//! parser; this module re-exports all of it under its v2 name.

pub use crate::codec::root::*;
