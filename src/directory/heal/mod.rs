//! Healing: the directory's background work that brings what the peers
//! hold in line with its records.
//!
//! - [`health`]: what a segment's record and its holders' states say of
//!   its redundancy (pure; status, `volume info` and repair share it);
//! - [`repair`]: rebuilds the shards of segments below their threshold,
//!   critical or misplaced, on new holders, and records them by
//!   compare-and-set;
//! - [`faults`]: forgets from their records the shards their holders
//!   found bad or that failed an audit, so repair rebuilds them;
//! - [`audit`]: challenges random shards on their holders, forgets
//!   those that fail, and drains peers that fail too often;
//! - [`drain`]: peers leaving (drained, above the high-water mark,
//!   distrusted) and removed; repair moves their shards;
//! - [`scrub`]: the segment roots peers scrub against, the cluster's
//!   scrub directive (`meshdisk scrub`) and the peers' progress added up;
//! - [`collector`]: erases the shards of deleted volumes and dropped
//!   segments, and reconciles the peers' shards with the records to erase
//!   orphans.
//!
//! Each is a
//! [`crate::sys::worker::Worker`] run by the directory's runner, planned
//! from the store in one step that tests can run in-process and carried
//! out against the peers in another.

pub mod audit;
pub mod collector;
pub mod drain;
pub mod faults;
pub mod health;
pub mod repair;
pub mod scrub;
