//! The cluster's membership: who may talk to whom.
//!
//! The directory is the cluster's certificate authority ([`ca`]): every
//! peer, attaching client and admin holds a certificate it issued, and every
//! connection is mutual TLS against that CA alone. A machine joins with a
//! one-time token ([`token`]) that the directory exchanges for a
//! certificate over the machine's own key (a CSR, so private keys never
//! leave the machine that uses them).

pub mod bench;
pub mod ca;
pub mod client;
pub mod credential;
pub mod directory;
pub mod msg;
pub mod peer;
pub mod placement;
pub mod status;
pub mod token;

/// Wall-clock milliseconds since the Unix epoch: expiries and last-seen
/// times that must mean the same after a restart.
pub(crate) fn now_ms() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
