//! Keeping the write lease, and what the volume does when it may have
//! lost it.
//!
//! ```text
//! every ttl/3: renew ─► ok: the lease is good for another ttl
//!   no answer for ~ttl: the lease may have lapsed ─► SUSPEND (reads and
//!     writes wait: another machine may be writing the volume now)
//!   "lapsed" / refused ─► take it again (not by force), resuming:
//!     nobody else holds it AND the root is still the one this attach
//!       committed last ─► new epoch, sequences above the old ones, RESUME
//!     somebody holds it, or the root moved ─► FENCED for good (re-attach)
//! ```
//!
//! So a directory that pauses longer than the lease's time to live makes
//! the attach wait, not fail for good, when nobody else took the volume;
//! and a commit refused as fenced (the lease lapsed under it) is retried
//! under the new epoch rather than ending the attach.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::volume::Inner;
use crate::api::ErrorKind;
use crate::codec::sequence::{SegmentId, Sequence, Sequencer};
use crate::sys::worker::{Pacing, State, Status, Worker};

/// Renewals are never closer together than this, whatever the TTL.
const MIN_RENEWAL: Duration = Duration::from_millis(200);

pub(super) struct Keeper {
    pub(super) inner: Arc<Inner>,
    pub(super) ttl: Duration,
    /// When the lease was last granted or renewed, taken just before the
    /// call was made: the directory's ttl runs from some time after it,
    /// so the keeper never thinks the lease younger than it is.
    pub(super) renewed_at: Instant,
    pub(super) renewals: u64,
    /// The clients' requests served, and when, at the last renewal.
    pub(super) served: (u64, Instant),
}

impl Keeper {
    /// The keeper of a lease of `ttl` that was asked for at `asked` (before
    /// the attach's replay and map loading, which may take a while).
    pub(super) fn new(inner: Arc<Inner>, ttl: Duration, asked: Instant) -> Self {
        let served = (inner.traffic.requests.load(std::sync::atomic::Ordering::Relaxed), Instant::now());
        let keeper = Self { inner, ttl, renewed_at: asked, renewals: 0, served };
        if Instant::now() >= keeper.suspend_at() {
            // Opening took most of the lease's life: serve nothing until
            // the first renewal (at once, see `initial_state`) is granted.
            keeper.inner.set_suspended(true);
        }
        keeper
    }

    /// The clients' requests per second since the last renewal (reported
    /// with the renewal: the directory's repair yields to busy volumes).
    fn client_ops(&mut self) -> u32 {
        Self::rate(&self.inner.traffic.requests, &mut self.served)
    }

    fn rate(counter: &std::sync::atomic::AtomicU64, served: &mut (u64, Instant)) -> u32 {
        let now = counter.load(std::sync::atomic::Ordering::Relaxed);
        let (before, at) = *served;
        *served = (now, Instant::now());
        let secs = at.elapsed().as_secs_f64().max(0.001);
        (now.saturating_sub(before) as f64 / secs).min(f64::from(u32::MAX)) as u32
    }

    /// When the lease must be renewed by: past it (0.8 of its life) the
    /// volume suspends, before another machine could take it.
    fn suspend_at(&self) -> Instant {
        self.renewed_at + self.ttl.mul_f32(0.8)
    }

    fn every(&self) -> Duration {
        (self.ttl / 3).max(MIN_RENEWAL)
    }

    pub(super) fn pacing(&self) -> Pacing {
        Pacing { tranquility: 0, backoff: self.every(), max_backoff: self.every() }
    }

    /// Takes the lease again after it lapsed; `Ok(false)` if the directory
    /// could not be reached (still suspended).
    async fn retake(&mut self) -> Result<bool, String> {
        let inner = &self.inner;
        let old = inner.epoch.load(Ordering::Relaxed);
        let asked = Instant::now();
        let lease = match crate::volume::lease::acquire(
            &inner.client,
            &inner.config.state_dir,
            &inner.name,
            false,
        )
        .await
        {
            // Every grant raises the epoch by one, and the lease note
            // keeps the run of grants to this folder: a grant whose run
            // started after this attach's epoch means another machine
            // held the volume meanwhile (even if it committed nothing,
            // it served a state without this attach's unflushed writes,
            // which a re-attach's replay refuses just the same); a
            // grant not above it, a directory that went back in time.
            Ok(granted) if granted.run_from <= old && granted.lease.epoch > old => granted.lease,
            Ok(granted) => {
                // Fenced for good: the lease goes back at once, so the next
                // attach need not wait for it to lapse.
                let epoch = granted.lease.epoch;
                if let Err(e) = crate::volume::lease::give_back(&inner.client, &inner.name, epoch).await {
                    tracing::warn!("volume {}: giving the lease back: {e}", inner.name);
                }
                return Err(format!(
                    "the volume was held elsewhere while this attach's lease had lapsed (epoch {old}, now granted {epoch}): re-attach"
                ));
            }
            Err(crate::volume::VolumeError::Cluster(e)) if e.kind() == Some(ErrorKind::Conflict) => {
                return Err(format!("the volume was taken over while this attach's lease had lapsed: {e}"));
            }
            Err(e) => {
                tracing::warn!("volume {}: taking the lapsed lease again: {e}", inner.name);
                return Ok(false);
            }
        };
        // Nobody holds it now; did anybody write while we did not? (With
        // the commit turn held: a commit that landed just before the lease
        // lapsed has updated our root by then.)
        let _turn = inner.commit_turn.lock().await;
        let ours = inner.root.lock().expect("root").clone();
        match inner.client.root(&inner.name).await {
            Ok(Some(r)) if (r.epoch, r.commit) == (ours.epoch, ours.commit) => {}
            Ok(None) if ours.commit == 0 => {}
            Ok(r) => {
                let now = r.map_or("none".to_string(), |r| format!("{}.{}", r.epoch, r.commit));
                return Err(format!(
                    "the volume was written elsewhere while this attach's lease had lapsed (root now {now}, this attach's {}.{}): re-attach",
                    ours.epoch, ours.commit
                ));
            }
            Err(e) => {
                tracing::warn!("volume {}: reading the root after taking the lease again: {e}", inner.name);
                return Ok(false);
            }
        }
        inner.switch_epoch(lease.epoch).map_err(|e| e.to_string())?;
        self.ttl = Duration::from_millis(lease.ttl_ms);
        // The new lease runs from when it was asked for, not from now: the
        // commit turn and the root read may have taken much of its life.
        self.renewed_at = asked;
        tracing::info!(
            "volume {}: the lease lapsed and was taken again: epoch {old} → {}",
            inner.name,
            lease.epoch
        );
        if Instant::now() >= self.suspend_at() {
            // Too old to serve on: renewed at once, or still suspended.
            let again = Instant::now();
            let ops = Self::rate(&inner.traffic.requests, &mut self.served);
            match inner.client.renew_lease(&inner.name, lease.epoch, ops).await {
                Ok(_) if Instant::now() < again + self.ttl.mul_f32(0.8) => self.renewed_at = again,
                _ => return Ok(false),
            }
        }
        inner.set_suspended(false);
        inner.wake.notify_one();
        Ok(true)
    }
}

impl Inner {
    /// Moves the writer to `epoch` (above the old one): sequences and
    /// segment ids continue above everything allocated so far.
    pub(super) fn switch_epoch(&self, epoch: u64) -> Result<(), crate::codec::sequence::SequenceError> {
        let mut s = self.sequences.lock().expect("sequences");
        let mut g = self.segment_ids.lock().expect("segment ids");
        let seq: Sequencer<Sequence> = Sequencer::new(epoch, s.last())?;
        let seg: Sequencer<SegmentId> = Sequencer::new(epoch, g.last())?;
        *s = seq;
        *g = seg;
        self.epoch.store(epoch, Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn set_suspended(&self, on: bool) {
        self.suspended.send_if_modified(|s| {
            let changed = *s != on;
            *s = on;
            changed
        });
    }

    /// Refuses once fenced (another machine may have written the volume:
    /// nothing this attach holds may be served, not even reads); waits
    /// while the lease may have lapsed; refuses after the I/O timeout.
    pub(super) async fn wait_for_lease(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
    ) -> crate::backend::Result<()> {
        self.check_fenced(op, offset, length)?;
        let mut s = self.suspended.subscribe();
        if !*s.borrow_and_update() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.config.io_timeout;
        while *s.borrow_and_update() {
            self.check_fenced(op, offset, length)?;
            if tokio::time::timeout_at(deadline, s.changed()).await.is_err() {
                return Err(crate::backend::Error::failed(
                    crate::backend::ErrorKind::Unavailable,
                    op,
                    offset,
                    length,
                    "the write lease may have lapsed (the directory does not answer): waiting for it",
                ));
            }
        }
        self.check_fenced(op, offset, length)
    }
}

impl Worker for Keeper {
    type Error = String;

    fn name(&self) -> String {
        format!("lease {}", self.inner.name)
    }

    fn status(&self) -> Status {
        let suspended = *self.inner.suspended.borrow();
        Status {
            queue: None,
            progress: Some(format!(
                "epoch {}, renewed {} times{}",
                self.inner.epoch.load(Ordering::Relaxed),
                self.renewals,
                if suspended { ", suspended: the lease may have lapsed" } else { "" }
            )),
        }
    }

    fn initial_state(&self) -> State {
        // A renewal is due a third of the lease's life after it was asked
        // for; when opening took longer, renew at once.
        if Instant::now() >= self.renewed_at + self.every() { State::Busy } else { State::Idle }
    }

    async fn work(&mut self, _stop: &CancellationToken) -> Result<State, String> {
        let inner = self.inner.clone();
        if inner.fenced.lock().expect("fenced").is_some() {
            return Ok(State::Done);
        }
        let epoch = inner.epoch.load(Ordering::Relaxed);
        let asked = Instant::now();
        // Not answered by 0.8 of the lease's life: suspend while waiting,
        // before another machine could take the volume.
        let suspend_at = self.suspend_at();
        let ops = self.client_ops();
        let renew = inner.client.renew_lease(&inner.name, epoch, ops);
        tokio::pin!(renew);
        let answer = tokio::select! {
            r = &mut renew => r,
            _ = tokio::time::sleep_until(suspend_at) => {
                inner.set_suspended(true);
                renew.await
            }
        };
        match answer {
            Ok(_) => {
                self.renewals += 1;
                self.renewed_at = asked;
                if Instant::now() >= self.suspend_at() {
                    // Answered so late that the lease may have lapsed in
                    // the meantime: stay suspended and renew again at once.
                    inner.set_suspended(true);
                    return Ok(State::Busy);
                }
                inner.set_suspended(false);
                Ok(State::Idle)
            }
            Err(e) if e.kind() == Some(ErrorKind::Fenced) => {
                // Lapsed or taken: suspend, and try to take it again.
                inner.set_suspended(true);
                match self.retake().await {
                    Ok(true) => Ok(State::Idle),
                    Ok(false) => Err("the lease lapsed; the directory is not answering yet".into()),
                    Err(why) => {
                        inner.fence(why);
                        inner.set_suspended(false);
                        Ok(State::Done)
                    }
                }
            }
            Err(e) => {
                // The next try comes a round later; if that is past most of
                // the TTL, another machine may take the volume before it:
                // stop serving until we know.
                if Instant::now() + self.every() >= self.suspend_at() {
                    inner.set_suspended(true);
                }
                Err(format!("renewing the lease on volume {}: {e}", inner.name))
            }
        }
    }

    async fn wait_for_work(&mut self) -> State {
        tokio::select! {
            _ = tokio::time::sleep_until(self.renewed_at + self.every()) => {}
            _ = self.inner.lease_doubt.notified() => {}
        }
        State::Busy
    }
}
