//! Placements asked for ahead, for small commits.
//!
//! A FLUSH after a few writes commits one short segment, and asking the
//! directory where to put it was a round trip (and a directory call's
//! CPU) on every such commit: at queue depth 1, a tenth of the FLUSH's
//! latency. A small commit now asks for [`AHEAD`] placements at once, sized
//! for the largest small segment, uses one and keeps the rest for the next
//! small commits, each used once, for at most [`FRESH_FOR`]: a peer that
//! went down or started draining is out of new placements within that.
//! Large commits ask every time (one call per many MiB costs nothing
//! worth saving, and their placement follows the cluster exactly), and so
//! do the compactor's (they leave no reserve free). Only placements on
//! all k + m peers are kept: a narrower one (a nearly full or degraded
//! cluster) is asked for again, at the segment's real size.
//!
//! Nothing here is trusted for safety: fencing is the root's
//! compare-and-set and the peers' epoch check, and a put that fails goes
//! to a spare as any other. Pure, so tested with a fake clock.

use std::time::{Duration, Instant};

use crate::api::SegmentPlacement;

/// Placements one call asks for when a small commit finds none kept.
pub const AHEAD: u32 = 8;
/// How long kept placements are used.
pub const FRESH_FOR: Duration = Duration::from_millis(250);
/// The largest shard a kept placement is good for: every placement is
/// asked for with this size, so the directory checks the room of the
/// largest small segment.
pub const SMALL_SHARD_BYTES: u64 = 256 << 10;

/// Kept placements: when they were given, the writer's epoch and the
/// room they were asked with.
#[derive(Debug, Default)]
pub struct PlacedAhead {
    kept: Vec<SegmentPlacement>,
    given: Option<(Instant, u64, u64)>,
}

impl PlacedAhead {
    /// A kept placement for one small segment of the writer at `epoch`
    /// asking `keep_free` bytes left free, if one is fresh.
    pub fn take(&mut self, now: Instant, epoch: u64, keep_free: u64) -> Option<SegmentPlacement> {
        let (at, e, free) = self.given?;
        if now.saturating_duration_since(at) >= FRESH_FOR || e != epoch || free != keep_free {
            self.forget();
            return None;
        }
        self.kept.pop()
    }

    /// Keeps `rest` (given at `now`, for `epoch`, asked with `keep_free`).
    pub fn keep(&mut self, now: Instant, epoch: u64, keep_free: u64, rest: Vec<SegmentPlacement>) {
        self.kept = rest;
        self.given = Some((now, epoch, keep_free));
    }

    /// Drops what is kept (a put failed: the cluster changed).
    pub fn forget(&mut self) {
        self.kept.clear();
        self.given = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::PeerSlot;

    fn placement(id: u16) -> SegmentPlacement {
        SegmentPlacement {
            peers: vec![PeerSlot {
                id,
                addr: crate::api::PeerAddr {
                    name: format!("p{id}"),
                    addr: std::net::SocketAddr::from(([127, 0, 0, 1], id)),
                },
            }],
        }
    }

    #[test]
    fn each_kept_placement_is_used_once_while_fresh_for_the_same_writer_and_room() {
        let t0 = Instant::now();
        let mut p = PlacedAhead::default();
        assert!(p.take(t0, 1, 0).is_none(), "nothing kept yet");
        p.keep(t0, 1, 0, vec![placement(1), placement(2)]);
        let a = p.take(t0 + Duration::from_millis(10), 1, 0).expect("fresh");
        let b = p.take(t0 + Duration::from_millis(20), 1, 0).expect("fresh");
        assert_ne!(a, b, "never the same placement twice");
        assert!(p.take(t0 + Duration::from_millis(30), 1, 0).is_none(), "all used");

        p.keep(t0, 1, 0, vec![placement(1), placement(2)]);
        assert!(p.take(t0 + FRESH_FOR, 1, 0).is_none(), "stale");
        assert!(p.take(t0, 1, 0).is_none(), "a stale set is dropped whole");

        p.keep(t0, 1, 0, vec![placement(1)]);
        assert!(p.take(t0, 2, 0).is_none(), "another epoch (the lease was taken again)");
        p.keep(t0, 1, 0, vec![placement(1)]);
        assert!(p.take(t0, 1, 4096).is_none(), "asked with another room");
        p.keep(t0, 1, 0, vec![placement(1)]);
        p.forget();
        assert!(p.take(t0, 1, 0).is_none(), "forgotten");
    }
}
