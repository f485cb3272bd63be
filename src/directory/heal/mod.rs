//! Healing: the directory's background work that brings what the peers
//! hold in line with its records.
//!
//! Today this is the garbage [`collector`], which erases the shards of
//! deleted volumes and dropped segments, and reconciles the peers' shards
//! with the segment records to erase orphans. Repair (rebuilding a segment's missing shards on other
//! peers), scrub (reading shards back and
//! checking their hashes) and migration (moving shards off a peer that is
//! leaving or full) live here next, each a [`crate::sys::worker::Worker`]
//! run by the directory's runner, planned from the store in one step that
//! tests can run in-process and carried out against the peers in another.

pub mod collector;
pub mod health;
pub mod repair;
