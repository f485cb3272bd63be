//! Time as the cluster records it, and a clock that tests can move.
//!
//! Everything that compares times across a restart (peers' last reports,
//! lease expiries, token expiries) counts wall-clock
//! milliseconds since the Unix epoch. A service that takes a [`Clock`]
//! instead of calling [`now_ms`] can be tested in one process with a
//! [`ManualClock`]: a test moves time forward and watches leases lapse and
//! peers go down, without sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch: expiries and last-seen
/// times that must mean the same after a restart.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A source of milliseconds since the Unix epoch, shared by a service and
/// its store so they agree on what time it is.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The wall clock ([`now_ms`]).
pub fn system() -> Clock {
    Arc::new(now_ms)
}

/// A clock that moves only when told: for tests.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock reading `ms`.
    pub fn starting_at(ms: u64) -> Self {
        Self(Arc::new(AtomicU64::new(ms)))
    }

    pub fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Moves the clock `d` forward.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// This clock as a [`Clock`] (every copy reads the same time).
    pub fn clock(&self) -> Clock {
        let t = self.0.clone();
        Arc::new(move || t.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_all_its_copies_agree() {
        let m = ManualClock::starting_at(1_000);
        let c = m.clock();
        assert_eq!((m.now(), c()), (1_000, 1_000));
        m.advance(Duration::from_secs(2));
        assert_eq!((m.now(), c()), (3_000, 3_000));
        assert!(system()() > 1_600_000_000_000);
    }
}
