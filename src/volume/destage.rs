//! The destager: the background worker that takes dirty stripes from the
//! cache to the peers, a new generation each (see [`Inner::destage`]).
//!
//! Each step reaps one finished destage (waking flushes and full caches
//! that wait on progress, and trimming the log at most once a second), then
//! launches the most urgent dirty stripes, up to
//! [`VolumeConfig::destage_parallel`](super::VolumeConfig) at once, in the
//! order [`Dirty::pick`](super::dirty::Dirty::pick) gives: those a FLUSH or
//! FUA waits for, the oldest while over half the cache is dirty, those idle
//! for `destage_age`, and those written whole. Between steps it waits for a
//! destage to finish, a wake-up (a write, a flush, a full cache) or 50 ms.
//!
//! Destaging is what flushes wait for, so the worker runs with no
//! tranquility; after a failed destage the runner pauses 100 ms before the
//! next launch (a flat pause: the failed stripe stays dirty and is picked
//! again).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Inner;
use crate::sys::worker::{Pacing, State, Status, Worker};

/// How the runner paces the destager.
pub(super) const PACING: Pacing =
    Pacing { tranquility: 0, backoff: Duration::from_millis(100), max_backoff: Duration::from_millis(100) };

/// The longest wait between looks at the dirty set.
const POLL: Duration = Duration::from_millis(50);

/// A stripe written whole is destaged once left alone this long.
const SETTLE: Duration = Duration::from_millis(20);

/// Trimming syncs a file and the folder: once a second is plenty (records
/// kept a little longer only replay again, harmlessly).
const TRIM_EVERY: Duration = Duration::from_secs(1);

type Outcome = Result<Result<(), String>, JoinError>;

pub(super) struct Destager {
    inner: Arc<Inner>,
    running: JoinSet<Result<(), String>>,
    /// A destage that finished while waiting, reaped by the next step.
    finished: Option<Outcome>,
    trimmed: Instant,
}

impl Destager {
    pub(super) fn new(inner: Arc<Inner>) -> Self {
        Self { inner, running: JoinSet::new(), finished: None, trimmed: Instant::now() }
    }

    /// Launches the most urgent dirty stripes, as many as there is room for.
    fn launch(&mut self) {
        let inner = &self.inner;
        let pressure = inner.cache.slots() as usize / 2;
        let picks = {
            let flush = inner.flush_target.load(Ordering::Acquire);
            let room = inner.config.destage_parallel.saturating_sub(self.running.len());
            let mut d = inner.dirty.lock().expect("not poisoned");
            d.pick(flush, pressure, inner.config.destage_age, SETTLE, room, inner.sectors)
        };
        for (stripe, _why) in picks {
            let inner = inner.clone();
            self.running.spawn(async move { inner.destage(stripe).await.map_err(|e| e.to_string()) });
        }
    }
}

impl Drop for Destager {
    /// Destages in flight when the volume stops run to their end rather
    /// than being cut between a put and its commit; [`super::Volume::close`]
    /// waits for them (they hold the volume).
    fn drop(&mut self) {
        self.running.detach_all();
    }
}

impl Worker for Destager {
    type Error = String;

    fn name(&self) -> String {
        format!("destage {}", self.inner.name())
    }

    fn status(&self) -> Status {
        let dirty = self.inner.dirty.lock().expect("not poisoned").len();
        Status { queue: Some(dirty as u64), progress: Some(format!("{} in flight", self.running.len())) }
    }

    async fn work(&mut self, _stop: &CancellationToken) -> Result<State, String> {
        let mut failed = None;
        if let Some(done) = self.finished.take() {
            if let Ok(Err(e)) = done {
                failed = Some(e);
            }
            self.inner.progress.notify_waiters();
            if self.trimmed.elapsed() >= TRIM_EVERY {
                self.trimmed = Instant::now();
                if let Err(e) = self.inner.trim_log().await {
                    tracing::warn!("trimming the log: {e}");
                }
            }
        }
        // The runner logs and counts the failure, pauses, and steps again.
        if let Some(e) = failed {
            return Err(e);
        }
        self.launch();
        Ok(State::Idle)
    }

    async fn wait_for_work(&mut self) -> State {
        tokio::select! {
            Some(done) = self.running.join_next(), if !self.running.is_empty() => {
                self.finished = Some(done);
            }
            () = self.inner.wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
        }
        State::Busy
    }
}
