//! Scrub: the peer re-reads and re-hashes every shard it holds, on a
//! schedule, so rot on its disk is found and repaired before a read needs
//! the shard (after Garage's `block/repair.rs` ScrubWorker).
//!
//! A **pass** walks the store's shards in key order
//! ([`ShardStore::list_all`]), a page at a time. Before checking a page it
//! asks the directory for the pages' segment roots (`SegmentRoots`); each
//! shard is read whole and checked ([`ShardStore::verify`]): its header
//! names it, its own root is the index entry's, its payload hashes to it,
//! and its header's roots make the segment's root (a shard whose segment
//! has no live record is checked without). A bad shard is recorded in the
//! store (durably) and reported to the directory (`ReportShardFaults`, at
//! most `MAX_FAULTS_PER_CALL` a call),
//! which forgets it from its record so repair rebuilds it; it is reported
//! again until acknowledged. Reads that hit a bad shard record it the same
//! way, and this worker reports those too.
//!
//! **Schedule.** A pass starts a random 0.9–1.25 × `--scrub-every`
//! (default 28 days) after the previous one started (the first one period
//! after the store was made), and is spread over the period: its pace
//! is the bytes left over the time left until 0.9 × the period after its
//! start ([`pass_rate`]), never below [`FLOOR_RATE`] (a small store
//! finishes in minutes, not weeks) nor above `--scrub-rate` (default
//! 32 MiB/s; 0: no cap). A pass asked for (`meshdisk scrub start`) runs at
//! the cap. Whenever clients called the peer since the last step, the
//! worker also pauses [`TRANQUILITY`] times as long as the step took.
//!
//! **State** (cursor, pass start, bytes checked, passes, next start) lives
//! in the store's index (table `scrub`), saved when a pass starts or ends
//! and every [`SAVE_EVERY`] within one: a restart resumes about where the
//! pass was.
//!
//! **Control.** The directory's heartbeat answer carries a directive:
//! paused for how long (a pause with a duration ends by itself), and when
//! a pass was last asked for. The worker reports its progress back in
//! every heartbeat ([`ScrubReport`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::store::{Checked, Fault, ScrubState, ShardStore, StoreError};
use crate::api::{DirRequest, DirResponse, MAX_FAULTS_PER_CALL, ScrubDirective, ScrubReport, ShardFault};
use crate::client::Client;
use crate::codec::segment::SegmentRoot;
use crate::sys::clock::now_ms;
use crate::sys::worker::{State, Status, Worker};

/// The slowest pace of a pass, bytes per second: a small store finishes
/// its pass in minutes and then rests until the next.
pub const FLOOR_RATE: u64 = 256 << 10;
/// Clients count as busy this long after their last call.
const BUSY_FOR: Duration = Duration::from_secs(1);

/// After a step while clients were busy, pause this many times as long as
/// the step took.
pub const TRANQUILITY: u32 = 4;
/// Shards listed per step, and the most bytes checked in one.
const PAGE: usize = 64;
const STEP_BYTES: u64 = 8 << 20;
/// How long after a failed report the faults are reported again.
const REPORT_RETRY: Duration = Duration::from_secs(5);
/// A pass's progress is saved at most this often (each save is a durable
/// index commit, an fsync the peer's puts would queue behind); a restart
/// checks again at most what was checked since.
const SAVE_EVERY: Duration = Duration::from_secs(10);

/// `meshdisk peer --scrub-every --scrub-rate`.
#[derive(Clone, Copy, Debug)]
pub struct ScrubConfig {
    /// A pass every this long (randomised 0.9–1.25 ×).
    pub every: Duration,
    /// The most bytes per second (0: no cap).
    pub rate: u64,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        Self { every: Duration::from_secs(28 * 86_400), rate: 32 << 20 }
    }
}

/// When the pass after one that started at `started_ms` starts: a
/// `jitter` in [0, 1) picks 0.9–1.25 × `every` after it.
pub fn next_start(started_ms: u64, every: Duration, jitter: f64) -> u64 {
    let factor = 0.9 + 0.35 * jitter.clamp(0.0, 1.0);
    started_ms.saturating_add((every.as_millis() as f64 * factor) as u64)
}

/// The pace of a pass, bytes per second: what is left (`total − checked`)
/// over the time left until 0.9 × `every` after `started_ms` (the soonest
/// the next pass may start), at least [`FLOOR_RATE`]; a pass asked for
/// runs at the cap; never above `cap` (0: no cap, `u64::MAX`).
pub fn pass_rate(
    total: u64,
    checked: u64,
    started_ms: u64,
    now_ms: u64,
    every: Duration,
    cap: u64,
    requested: bool,
) -> u64 {
    let cap = if cap == 0 { u64::MAX } else { cap };
    if requested {
        return cap;
    }
    let deadline = started_ms.saturating_add(every.as_millis() as u64 * 9 / 10);
    let left_ms = deadline.saturating_sub(now_ms).max(1000);
    let left = total.saturating_sub(checked);
    let rate = (u128::from(left) * 1000 / u128::from(left_ms)).min(u128::from(u64::MAX)) as u64;
    rate.max(FLOOR_RATE).min(cap)
}

/// How long to rest after checking `bytes` in `took` at `rate` bytes per
/// second, with clients `busy` meanwhile.
pub fn rest(bytes: u64, took: Duration, rate: u64, busy: bool) -> Duration {
    let paced = if rate == u64::MAX {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64).saturating_sub(took)
    };
    if busy { paced.max(took * TRANQUILITY) } else { paced }
}

/// What the heartbeat and the scrub worker share: the directory's last
/// directive (and when it came), and the worker's last report.
#[derive(Default)]
pub(super) struct ScrubShared {
    directive: Mutex<Option<(ScrubDirective, Instant)>>,
    report: Mutex<Option<ScrubReport>>,
    changed: Notify,
}

impl ScrubShared {
    /// The heartbeat's answer said `d`.
    pub(super) fn direct(&self, d: ScrubDirective) {
        let mut now = self.directive.lock().expect("not poisoned");
        let same = now.as_ref().is_some_and(|(old, _)| *old == d);
        *now = Some((d, Instant::now()));
        if !same {
            self.changed.notify_one();
        }
    }

    pub(super) fn report(&self) -> Option<ScrubReport> {
        self.report.lock().expect("not poisoned").clone()
    }
}

/// The scrub worker (see the module documentation).
pub(super) struct Scrub {
    client: Client,
    store: ShardStore,
    shared: Arc<ScrubShared>,
    client_calls: Arc<AtomicU64>,
    config: ScrubConfig,
    state: Option<ScrubState>,
    /// Not before then: the pace's rest, or the next pass.
    resume_at: Option<Instant>,
    /// Faults are reported again not before then.
    report_at: Option<Instant>,
    /// Client calls counted at the last step.
    calls: u64,
    /// When clients' calls were last seen changing.
    clients_seen: Option<Instant>,
    /// Bytes checked since `meter.0`, and the rate last measured.
    meter: (Instant, u64),
    rate: u64,
    /// The directory could not give roots (logged once).
    roots_failing: bool,
    paused: bool,
    /// When the pass's progress was last saved.
    saved: Instant,
}

impl Scrub {
    pub(super) fn new(
        client: Client,
        store: ShardStore,
        shared: Arc<ScrubShared>,
        client_calls: Arc<AtomicU64>,
        config: ScrubConfig,
    ) -> Self {
        Self {
            client,
            store,
            shared,
            calls: client_calls.load(Ordering::Relaxed),
            clients_seen: None,
            client_calls,
            config,
            state: None,
            resume_at: None,
            report_at: None,
            meter: (Instant::now(), 0),
            rate: 0,
            roots_failing: false,
            paused: false,
            saved: Instant::now(),
        }
    }

    /// Runs `f` on the store off the async threads (index commits fsync).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(ShardStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store))
            .await
            .map_err(|e| StoreError::Io { path: Default::default(), message: e.to_string() })?
    }

    /// Reports the faults not yet acknowledged, [`MAX_FAULTS_PER_CALL`]
    /// at a time (a report must fit one message), each call acknowledged
    /// as it succeeds; on a failure the rest are retried later.
    async fn report_faults(&mut self) -> Result<(), StoreError> {
        if self.report_at.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        let faults = self.blocking(|s| s.pending_faults()).await?;
        let mut reported = 0;
        for (chunk, report) in fault_reports(&faults) {
            if let Err(e) = self.client.report_shard_faults(report).await {
                if self.report_at.is_none() {
                    tracing::warn!(
                        "cannot report {} bad shards to the directory (retrying): {e}",
                        faults.len() - reported
                    );
                }
                self.report_at = Some(Instant::now() + REPORT_RETRY);
                return Ok(());
            }
            reported += chunk.len();
            let chunk = chunk.to_vec();
            self.blocking(move |s| s.acknowledge_faults(&chunk)).await?;
        }
        if reported > 0 {
            tracing::info!("reported {reported} bad shards to the directory");
        }
        self.report_at = None;
        Ok(())
    }

    /// The directive in force: paused until when (if paused), and the
    /// newest pass asked for.
    fn directive(&self) -> (Option<Instant>, Option<u64>) {
        let d = self.shared.directive.lock().expect("not poisoned").clone();
        let Some((d, at)) = d else { return (None, None) };
        let paused = d.paused_for_ms.and_then(|ms| {
            let until =
                at.checked_add(Duration::from_millis(ms)).unwrap_or(at + Duration::from_secs(1 << 40));
            (until > Instant::now()).then_some(until)
        });
        (paused, d.start_requested_ms)
    }

    /// The segment roots of a page, `None` each if the directory cannot
    /// say now (the shards are then checked without).
    async fn roots(&mut self, keys: &[crate::codec::segment::SegmentShardKey]) -> Vec<Option<SegmentRoot>> {
        let asked = self.client.directory(&DirRequest::SegmentRoots { shards: keys.to_vec() }).await;
        match asked {
            Ok(DirResponse::Roots(r)) if r.len() == keys.len() => {
                if std::mem::take(&mut self.roots_failing) {
                    tracing::info!("scrub: the directory gives segment roots again");
                }
                r.into_iter().map(|r| r.map(SegmentRoot)).collect()
            }
            other => {
                if !self.roots_failing {
                    tracing::warn!(
                        "scrub: no segment roots from the directory ({other:?}); checking shards without"
                    );
                    self.roots_failing = true;
                }
                vec![None; keys.len()]
            }
        }
    }

    async fn publish(&mut self, state: &ScrubState) {
        // Off the async threads: dropping stale faults is an index commit.
        let counts = self
            .blocking(|s| Ok((s.pending_faults().map_or(0, |f| f.len() as u64), s.used().unwrap_or(0))))
            .await;
        let (unreported, total) = counts.unwrap_or((0, 0));
        let report = ScrubReport {
            pass_started_ms: state.pass_started_ms,
            checked: state.checked,
            total,
            rate: if state.pass_started_ms.is_some() { self.rate } else { 0 },
            passes: state.passes,
            last_ended_ms: state.last_ended_ms,
            next_ms: state.next_ms,
            found: state.found,
            unreported,
            paused: self.paused,
        };
        *self.shared.report.lock().expect("not poisoned") = Some(report);
    }

    /// Persists `state` (a durable index commit: off the async threads).
    async fn persist(&self, state: &ScrubState) -> Result<(), StoreError> {
        let state = state.clone();
        self.blocking(move |s| s.save_scrub(&state)).await
    }

    async fn save(&mut self, state: ScrubState) -> Result<(), StoreError> {
        self.persist(&state).await?;
        self.saved = Instant::now();
        self.state = Some(state);
        Ok(())
    }

    /// Counts `bytes` checked for the rate.
    fn meter(&mut self, bytes: u64) {
        self.meter.1 += bytes;
        let secs = self.meter.0.elapsed().as_secs_f64();
        if secs >= 2.0 {
            self.rate = (self.meter.1 as f64 / secs) as u64;
            self.meter = (Instant::now(), 0);
        }
    }

    /// One step: report faults; then, unless paused or resting, start or
    /// finish a pass or check one page.
    async fn step(&mut self) -> Result<State, StoreError> {
        self.report_faults().await?;
        let mut state = match self.state.take() {
            Some(s) => s,
            None => self.store.scrub_state()?,
        };
        // Faults found since (by reads) count in the report.
        state.found = self.store.scrub_state()?.found;
        let now = now_ms();
        let (paused_until, requested) = self.directive();
        // A pass asked for before this store knew of any (or before it was
        // made) is not this store's to run.
        if state.start_seen.is_none() || requested.is_none() {
            if state.start_seen.is_none() && self.shared.directive.lock().expect("not poisoned").is_some() {
                state.start_seen = Some(requested.unwrap_or(0));
                self.persist(&state).await?;
            }
        } else if requested != state.start_seen {
            tracing::info!("scrub: a pass was asked for; starting one now");
            state.start_seen = requested;
            state.pass_started_ms = Some(now);
            state.requested = true;
            state.cursor = None;
            state.checked = 0;
            self.resume_at = None;
            self.persist(&state).await?;
        }
        self.paused = paused_until.is_some();
        if self.paused || self.resume_at.is_some_and(|t| Instant::now() < t) {
            self.publish(&state).await;
            self.state = Some(state);
            return Ok(State::Idle);
        }
        let Some(started) = state.pass_started_ms else {
            let next = match state.next_ms {
                Some(n) => n,
                None => {
                    // First scheduled one period after the store is made.
                    let n = next_start(now, self.config.every, jitter());
                    state.next_ms = Some(n);
                    self.persist(&state).await?;
                    n
                }
            };
            if now < next {
                self.resume_at = Some(Instant::now() + Duration::from_millis(next - now));
                self.publish(&state).await;
                self.state = Some(state);
                return Ok(State::Idle);
            }
            tracing::info!("scrub: starting pass {}", state.passes + 1);
            state.pass_started_ms = Some(now);
            state.requested = false;
            state.cursor = None;
            state.checked = 0;
            self.save(state).await?;
            return Ok(State::Busy);
        };
        let begun = Instant::now();
        let store = self.store.clone();
        let cursor = state.cursor;
        let listed = tokio::task::spawn_blocking(move || store.list_all(cursor, PAGE))
            .await
            .map_err(|e| StoreError::Io { path: Default::default(), message: e.to_string() })??;
        if listed.is_empty() {
            state.passes += 1;
            state.last_started_ms = Some(started);
            state.last_ended_ms = Some(now);
            state.next_ms = Some(next_start(started, self.config.every, jitter()).max(now));
            tracing::info!(
                "scrub: pass {} done, {} checked in {:.0?}",
                state.passes,
                crate::size::human(state.checked),
                Duration::from_millis(now.saturating_sub(started))
            );
            state.pass_started_ms = None;
            state.requested = false;
            state.cursor = None;
            state.checked = 0;
            self.publish(&state).await;
            self.save(state).await?;
            return Ok(State::Busy);
        }
        // A step checks at most STEP_BYTES (and at least one shard).
        let mut page = Vec::new();
        let mut bytes = 0;
        for (key, len) in listed {
            if !page.is_empty() && bytes + len > STEP_BYTES {
                break;
            }
            bytes += len;
            page.push(key);
        }
        let roots = self.roots(&page).await;
        let mut checked = 0;
        for (key, root) in page.iter().zip(roots) {
            // One shard that cannot be checked must not stop the pass
            // (it would retry this page for ever): it is skipped until
            // the next pass. A poisoned store checks nothing: stop.
            match self.store.verify(key, root).await {
                Ok(Checked::Sound(n)) => checked += n,
                Ok(Checked::Bad(n, why)) => {
                    tracing::warn!("scrub: shard {key:?} is bad: {why}");
                    checked += n;
                }
                Ok(Checked::Gone) => {}
                Err(e @ StoreError::Poisoned { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!("scrub: cannot check shard {key:?} (skipped until the next pass): {e}")
                }
            }
        }
        state.cursor = page.last().copied();
        state.checked += checked;
        self.meter(checked);
        let total = self.store.used()?;
        let rate = pass_rate(
            total,
            state.checked,
            started,
            now,
            self.config.every,
            self.config.rate,
            state.requested,
        );
        // Busy: a client called within the last second, not only during
        // this step (a step is a few milliseconds; clients' calls come in
        // bursts, a destage every so often).
        let calls = self.client_calls.load(Ordering::Relaxed);
        if calls != std::mem::replace(&mut self.calls, calls) {
            self.clients_seen = Some(Instant::now());
        }
        let busy = self.clients_seen.is_some_and(|t| t.elapsed() < BUSY_FOR);
        let rest = rest(checked, begun.elapsed(), rate, busy);
        self.publish(&state).await;
        if self.saved.elapsed() >= SAVE_EVERY {
            self.save(state).await?;
        } else {
            self.state = Some(state);
        }
        if rest.is_zero() {
            return Ok(State::Busy);
        }
        self.resume_at = Some(Instant::now() + rest);
        Ok(State::Idle)
    }
}

/// The reports of `faults`: at most [`MAX_FAULTS_PER_CALL`] a call, each
/// with the faults it reports.
fn fault_reports(faults: &[Fault]) -> impl Iterator<Item = (&[Fault], Vec<ShardFault>)> {
    faults
        .chunks(MAX_FAULTS_PER_CALL)
        .map(|chunk| (chunk, chunk.iter().map(|f| ShardFault::new(f.key, &f.problem)).collect()))
}

/// A random number in [0, 1).
fn jitter() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

impl Worker for Scrub {
    type Error = StoreError;

    fn name(&self) -> String {
        "scrub".into()
    }

    fn status(&self) -> Status {
        let progress = self.state.as_ref().map(|s| match s.pass_started_ms {
            Some(_) => format!("pass {}: {} checked", s.passes + 1, crate::size::human(s.checked)),
            None => format!("{} passes done", s.passes),
        });
        Status { queue: None, progress }
    }

    async fn work(&mut self, _stop: &CancellationToken) -> Result<State, Self::Error> {
        self.step().await
    }

    async fn wait_for_work(&mut self) -> State {
        let (paused_until, _) = self.directive();
        let until = match (paused_until, self.resume_at) {
            (Some(p), _) => Some(p),
            (None, r) => r,
        };
        let sleep = async {
            match until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => self.resume_at = None,
            () = self.shared.changed.notified() => {}
            () = self.store.fault_recorded() => {}
            // Faults that could not be reported are retried.
            () = tokio::time::sleep(REPORT_RETRY), if self.report_at.is_some() => {}
        }
        State::Busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    #[test]
    fn passes_start_0_9_to_1_25_periods_after_the_last() {
        let every = Duration::from_secs(28 * 86_400);
        assert_eq!(next_start(1000, every, 0.0), 1000 + 28 * DAY * 9 / 10);
        assert_eq!(next_start(1000, every, 1.0), 1000 + 28 * DAY * 125 / 100);
        let mid = next_start(0, every, 0.5);
        assert_eq!(mid, 28 * DAY * 1075 / 1000);
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }

    #[test]
    fn a_pass_is_spread_over_the_period_within_floor_and_cap() {
        let every = Duration::from_secs(28 * 86_400);
        let tib = 1u64 << 40;
        // 1 TiB over 0.9 × 28 days: about 485 KiB/s.
        let r = pass_rate(tib, 0, 0, 0, every, 32 << 20, false);
        assert_eq!(r, tib * 1000 / (28 * DAY * 9 / 10));
        // Halfway through the time with nothing done: twice as fast.
        let half = pass_rate(tib, 0, 0, 28 * DAY * 9 / 20, every, 32 << 20, false);
        assert!(half >= 2 * r - 1 && half <= 2 * r + 1, "{half} vs {r}");
        // A small store runs at the floor; a late one at the cap at most.
        assert_eq!(pass_rate(1 << 20, 0, 0, 0, every, 32 << 20, false), FLOOR_RATE);
        assert_eq!(pass_rate(tib, 0, 0, 28 * DAY, every, 32 << 20, false), 32 << 20);
        assert_eq!(pass_rate(tib, 0, 0, 28 * DAY, every, 0, false), tib);
        // What was checked does not count again; a cap below the floor wins.
        assert_eq!(pass_rate(tib, tib, 0, 0, every, 32 << 20, false), FLOOR_RATE);
        assert_eq!(pass_rate(tib, 0, 0, 0, every, 1000, false), 1000);
        // A pass asked for runs at the cap, or unpaced without one.
        assert_eq!(pass_rate(tib, 0, 0, 0, every, 32 << 20, true), 32 << 20);
        assert_eq!(pass_rate(tib, 0, 0, 0, every, 0, true), u64::MAX);
    }

    #[test]
    fn a_large_fault_backlog_is_reported_in_calls_that_fit_a_message() {
        use crate::codec::segment::{SegmentId, SegmentShardKey};
        use crate::transport::wire::{MAX_MESSAGE, encode};
        // Long problems, cut on a character boundary ('é' is two bytes).
        let problem = format!("x{}", "é".repeat(1000));
        let faults: Vec<Fault> = (0..1000u64)
            .map(|i| {
                let key = SegmentShardKey { volume: [7; 16], segment: SegmentId::from_raw(i), index: 3 };
                Fault::for_test(key, &problem)
            })
            .collect();
        let mut reported = Vec::new();
        for (chunk, report) in fault_reports(&faults) {
            assert!(report.len() <= MAX_FAULTS_PER_CALL);
            assert_eq!(
                chunk.iter().map(|f| f.key).collect::<Vec<_>>(),
                report.iter().map(|f| f.shard).collect::<Vec<_>>()
            );
            for f in &report {
                assert!(
                    f.problem.len() <= crate::api::MAX_FAULT_PROBLEM && f.problem.len() >= 199,
                    "{}",
                    f.problem.len()
                );
                assert!(problem.starts_with(&f.problem));
            }
            let frame = encode(&DirRequest::ReportShardFaults { faults: report.clone() }).unwrap();
            assert!(frame.len() <= MAX_MESSAGE, "{} bytes", frame.len());
            reported.extend(report.into_iter().map(|f| f.shard));
        }
        assert_eq!(reported, faults.iter().map(|f| f.key).collect::<Vec<_>>());
    }

    #[test]
    fn rests_hold_the_pace_and_yield_to_clients() {
        let mb = 1 << 20;
        // 8 MiB at 4 MiB/s is 2 s; the step took 0.5 s of them.
        assert_eq!(rest(8 * mb, Duration::from_millis(500), 4 * mb, false), Duration::from_millis(1500));
        // Slower than the pace: no rest, unless clients were busy.
        assert_eq!(rest(mb, Duration::from_secs(1), 4 * mb, false), Duration::ZERO);
        assert_eq!(rest(mb, Duration::from_secs(1), 4 * mb, true), Duration::from_secs(4));
        assert_eq!(rest(8 * mb, Duration::from_millis(100), u64::MAX, false), Duration::ZERO);
        assert_eq!(rest(8 * mb, Duration::from_millis(100), u64::MAX, true), Duration::from_millis(400));
    }
}
