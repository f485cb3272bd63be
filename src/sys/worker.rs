//! Background work, one shape for all of it (after Garage's
//! `util/background/worker.rs`): the directory's collector, an attached
//! volume's committer and lease keeper, a peer's heartbeats, and next
//! repair, scrub and migration.
//!
//! A [`Worker`] says what it is ([`Worker::name`], [`Worker::status`]), does
//! one bounded piece of work per [`Worker::work`] call and reports whether
//! more is waiting ([`State::Busy`]), nothing is ([`State::Idle`]) or it is
//! finished ([`State::Done`]); when idle, [`Worker::wait_for_work`] sleeps
//! until something arrives or a timer is due. The [`Runner`] owns the rest,
//! once: the stop signal, counting errors and backing off after them, and a
//! *tranquility* (after a busy step that took `t`, sleep `t × tranquility`,
//! so background work yields to foreground I/O). Its [`Runner::list`] is
//! what `meshdisk status --json` shows of a process's workers.
//!
//! ```
//! use meshdisk::sys::worker::{Runner, State, Worker};
//! use tokio_util::sync::CancellationToken;
//!
//! struct Countdown(u32);
//! impl Worker for Countdown {
//!     type Error = std::convert::Infallible;
//!     fn name(&self) -> String {
//!         "countdown".into()
//!     }
//!     async fn work(&mut self, _stop: &CancellationToken) -> Result<State, Self::Error> {
//!         self.0 -= 1;
//!         Ok(if self.0 == 0 { State::Done } else { State::Busy })
//!     }
//!     async fn wait_for_work(&mut self) -> State {
//!         State::Busy
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let runner = Runner::new(CancellationToken::new());
//! runner.spawn(Countdown(3));
//! runner.join().await;
//! assert_eq!(runner.list()[0].state, "done");
//! # });
//! ```

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a stopping process waits for its workers to finish their
/// step before it abandons them: a step that waits on a peer or the
/// directory that is gone ends only at its call's timeout.
pub const STOP_WAIT: Duration = Duration::from_secs(5);

/// What a worker says after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// More work is waiting: call `work` again (after the tranquility pause).
    Busy,
    /// Nothing to do: call `wait_for_work`.
    Idle,
    /// Finished for good: the runner drops the worker.
    Done,
}

/// What a worker tells about itself beyond its state; every field optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Items waiting (segments to commit, shards to erase, ...).
    pub queue: Option<u64>,
    /// Free text: how far a long task is.
    pub progress: Option<String>,
}

/// One kind of background work. See the module documentation.
pub trait Worker: Send + 'static {
    /// What a failed step returns; the runner logs it, counts it and backs off.
    type Error: std::fmt::Display + Send;

    /// A short stable name, e.g. `collector` or `commit demo`.
    fn name(&self) -> String;

    /// Queue length and progress, for status.
    fn status(&self) -> Status {
        Status::default()
    }

    /// How the runner starts the worker: `Busy` (the default) steps it at
    /// once; `Idle` waits for work first, as a worker on a timer whose
    /// first tick is one period away does (lease renewal).
    fn initial_state(&self) -> State {
        State::Busy
    }

    /// Does one bounded piece of work. A long step should watch `stop`.
    fn work(&mut self, stop: &CancellationToken) -> impl Future<Output = Result<State, Self::Error>> + Send;

    /// Waits, when idle, until there may be work; the runner cancels it
    /// when the process stops.
    fn wait_for_work(&mut self) -> impl Future<Output = State> + Send;
}

/// How the runner paces a worker.
#[derive(Clone, Copy, Debug)]
pub struct Pacing {
    /// Sleep this many times the duration of each busy step (0: never).
    pub tranquility: u32,
    /// The first pause after an error; doubled for each error in a row.
    pub backoff: Duration,
    /// The longest pause after errors.
    pub max_backoff: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Self { tranquility: 0, backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(30) }
    }
}

/// A worker as status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    /// `busy`, `idle`, `backoff` (after an error) or `done`.
    pub state: String,
    pub tranquility: u32,
    /// Failed steps since start, and in a row now.
    pub errors: u64,
    pub consecutive_errors: u64,
    pub last_error: Option<String>,
    /// [`Status`]'s fields, spelled out (not `#[serde(flatten)]`, which
    /// postcard, the cluster's wire format, cannot encode).
    pub queue: Option<u64>,
    pub progress: Option<String>,
}

impl WorkerInfo {
    fn set_status(&mut self, status: Status) {
        self.queue = status.queue;
        self.progress = status.progress;
    }
}

struct Slot {
    info: Mutex<WorkerInfo>,
}

impl Slot {
    fn update(&self, f: impl FnOnce(&mut WorkerInfo)) {
        f(&mut self.info.lock().expect("worker status lock"));
    }
}

/// Runs a process's workers until its stop signal; see the module docs.
#[derive(Clone)]
pub struct Runner {
    slots: Arc<Mutex<Vec<Arc<Slot>>>>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Runner {
    /// A runner whose workers stop when `stop` is cancelled.
    pub fn new(stop: CancellationToken) -> Self {
        Self { slots: Arc::default(), stop, tasks: TaskTracker::new() }
    }

    /// Starts `worker` with the default pacing.
    pub fn spawn<W: Worker>(&self, worker: W) {
        self.spawn_paced(worker, Pacing::default());
    }

    /// Starts `worker` on its own task.
    pub fn spawn_paced<W: Worker>(&self, mut worker: W, pacing: Pacing) {
        let state = if worker.initial_state() == State::Idle { "idle" } else { "busy" };
        let initial = worker.status();
        let slot = Arc::new(Slot {
            info: Mutex::new(WorkerInfo {
                name: worker.name(),
                state: state.into(),
                tranquility: pacing.tranquility,
                errors: 0,
                consecutive_errors: 0,
                last_error: None,
                queue: initial.queue,
                progress: initial.progress,
            }),
        });
        self.slots.lock().expect("worker list lock").push(slot.clone());
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            run(&mut worker, &slot, &stop, pacing).await;
            slot.update(|i| {
                i.state = "done".into();
                i.set_status(worker.status());
            });
        });
    }

    /// Every worker started, finished ones included, in start order.
    pub fn list(&self) -> Vec<WorkerInfo> {
        let slots = self.slots.lock().expect("worker list lock");
        slots.iter().map(|s| s.info.lock().expect("worker status lock").clone()).collect()
    }

    /// Waits until every worker has finished (by `Done` or the stop signal).
    pub async fn join(&self) {
        self.tasks.close();
        self.tasks.wait().await;
        self.tasks.reopen();
    }

    /// Waits up to `limit` for every worker to finish (after the stop
    /// signal: a step in progress runs to its end unless it watches
    /// `stop`); returns the workers still running, which a stopping
    /// process abandons, and logs them.
    pub async fn join_within(&self, limit: Duration) -> Vec<WorkerInfo> {
        self.tasks.close();
        let _ = tokio::time::timeout(limit, self.tasks.wait()).await;
        self.tasks.reopen();
        let left: Vec<WorkerInfo> = self.list().into_iter().filter(|w| w.state != "done").collect();
        if !left.is_empty() {
            let names: Vec<String> = left.iter().map(|w| format!("{} ({})", w.name, w.state)).collect();
            tracing::warn!("stopping without waiting for {} after {limit:?}", names.join(", "));
        }
        left
    }
}

async fn run<W: Worker>(worker: &mut W, slot: &Slot, stop: &CancellationToken, pacing: Pacing) {
    let mut state = worker.initial_state();
    loop {
        if stop.is_cancelled() {
            return;
        }
        match state {
            State::Done => return,
            State::Idle => {
                slot.update(|i| {
                    i.state = "idle".into();
                    i.set_status(worker.status());
                });
                state = tokio::select! {
                    () = stop.cancelled() => return,
                    s = worker.wait_for_work() => s,
                };
            }
            State::Busy => {
                slot.update(|i| i.state = "busy".into());
                let started = Instant::now();
                let outcome = worker.work(stop).await;
                let took = started.elapsed();
                let status = worker.status();
                match outcome {
                    Ok(next) => {
                        slot.update(|i| {
                            i.consecutive_errors = 0;
                            i.set_status(status);
                        });
                        state = next;
                        if next == State::Busy && pacing.tranquility > 0 {
                            pause(stop, took * pacing.tranquility).await;
                        }
                    }
                    Err(e) => {
                        let mut in_a_row = 0;
                        slot.update(|i| {
                            i.errors += 1;
                            i.consecutive_errors += 1;
                            in_a_row = i.consecutive_errors;
                            i.last_error = Some(e.to_string());
                            i.state = "backoff".into();
                            i.set_status(status);
                        });
                        let wait = backoff(pacing, in_a_row);
                        tracing::warn!(
                            "{}: {e} (error {in_a_row} in a row; next try in {wait:?})",
                            worker.name()
                        );
                        pause(stop, wait).await;
                        state = State::Busy;
                    }
                }
            }
        }
    }
}

fn backoff(pacing: Pacing, in_a_row: u64) -> Duration {
    let doublings = u32::try_from(in_a_row.saturating_sub(1)).unwrap_or(u32::MAX).min(20);
    pacing.backoff.saturating_mul(1 << doublings).min(pacing.max_backoff)
}

async fn pause(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(d) => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// Fails `fail` times, then does `steps` busy steps of `step` each, then
    /// goes idle until notified.
    struct Scripted {
        fail: u32,
        steps: u32,
        step: Duration,
        done: Arc<AtomicU32>,
        wake: Arc<tokio::sync::Notify>,
    }

    impl Worker for Scripted {
        type Error = String;
        fn name(&self) -> String {
            "scripted".into()
        }
        fn status(&self) -> Status {
            Status { queue: Some(u64::from(self.steps)), progress: None }
        }
        async fn work(&mut self, _stop: &CancellationToken) -> Result<State, String> {
            if self.fail > 0 {
                self.fail -= 1;
                return Err(format!("disk on fire ({} left)", self.fail));
            }
            if self.steps == 0 {
                return Ok(State::Idle);
            }
            tokio::time::sleep(self.step).await;
            self.steps -= 1;
            self.done.fetch_add(1, Ordering::SeqCst);
            Ok(State::Busy)
        }
        async fn wait_for_work(&mut self) -> State {
            self.wake.notified().await;
            self.steps += 1;
            State::Busy
        }
    }

    fn scripted(
        fail: u32,
        steps: u32,
        step: Duration,
    ) -> (Scripted, Arc<AtomicU32>, Arc<tokio::sync::Notify>) {
        let done = Arc::new(AtomicU32::new(0));
        let wake = Arc::new(tokio::sync::Notify::new());
        (Scripted { fail, steps, step, done: done.clone(), wake: wake.clone() }, done, wake)
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_counted_and_backed_off_exponentially_then_cleared() {
        let stop = CancellationToken::new();
        let runner = Runner::new(stop.clone());
        let (w, done, _) = scripted(3, 1, Duration::from_millis(1));
        let start = tokio::time::Instant::now();
        runner.spawn(w);
        while done.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // 100 + 200 + 400 ms of backoff before the first success.
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(700) && waited < Duration::from_millis(800), "{waited:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let info = &runner.list()[0];
        assert_eq!((info.errors, info.consecutive_errors), (3, 0));
        assert_eq!(info.last_error.as_deref(), Some("disk on fire (0 left)"));
        assert_eq!(info.state, "idle");
        assert_eq!(info.queue, Some(0));
        stop.cancel();
        runner.join().await;
        assert_eq!(runner.list()[0].state, "done");
    }

    #[tokio::test(start_paused = true)]
    async fn tranquility_sleeps_in_proportion_to_the_work_done() {
        let stop = CancellationToken::new();
        let runner = Runner::new(stop.clone());
        let (w, done, _) = scripted(0, 10, Duration::from_millis(10));
        let start = tokio::time::Instant::now();
        runner.spawn_paced(w, Pacing { tranquility: 2, ..Pacing::default() });
        while done.load(Ordering::SeqCst) < 10 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // 10 steps of 10 ms, each followed by 20 ms of rest (the last one's
        // rest not yet over).
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(280) && took < Duration::from_millis(310), "{took:?}");
        stop.cancel();
        runner.join().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_worker_waits_for_work_and_stops_at_once_when_told() {
        let stop = CancellationToken::new();
        let runner = Runner::new(stop.clone());
        let (w, done, wake) = scripted(0, 0, Duration::from_millis(1));
        runner.spawn(w);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(done.load(Ordering::SeqCst), 0);
        assert_eq!(runner.list()[0].state, "idle");
        wake.notify_one();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
        stop.cancel();
        tokio::time::timeout(Duration::from_millis(1), runner.join()).await.expect("stops at once");
        assert_eq!(runner.list()[0].state, "done");
    }

    /// A step that never ends and does not watch `stop`.
    struct Stuck;

    impl Worker for Stuck {
        type Error = std::convert::Infallible;
        fn name(&self) -> String {
            "stuck".into()
        }
        async fn work(&mut self, _stop: &CancellationToken) -> Result<State, Self::Error> {
            std::future::pending().await
        }
        async fn wait_for_work(&mut self) -> State {
            State::Busy
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_runner_abandons_a_step_that_outlasts_its_limit_and_names_it() {
        let stop = CancellationToken::new();
        let runner = Runner::new(stop.clone());
        let (w, _, _) = scripted(0, 0, Duration::from_millis(1));
        runner.spawn(w);
        runner.spawn(Stuck);
        tokio::time::sleep(Duration::from_millis(10)).await;
        stop.cancel();
        let start = tokio::time::Instant::now();
        let left = runner.join_within(STOP_WAIT).await;
        assert_eq!(start.elapsed(), STOP_WAIT);
        let names: Vec<(&str, &str)> = left.iter().map(|w| (w.name.as_str(), w.state.as_str())).collect();
        assert_eq!(names, [("stuck", "busy")]);
        // Nothing left: at once.
        let stop = CancellationToken::new();
        let runner = Runner::new(stop.clone());
        runner.spawn(scripted(0, 0, Duration::from_millis(1)).0);
        stop.cancel();
        let start = tokio::time::Instant::now();
        assert!(runner.join_within(STOP_WAIT).await.is_empty());
        assert!(start.elapsed() < Duration::from_millis(1));
    }

    /// Ticks every second, first one second after start.
    struct Ticker {
        ticks: Arc<AtomicU32>,
    }

    impl Worker for Ticker {
        type Error = std::convert::Infallible;
        fn name(&self) -> String {
            "ticker".into()
        }
        fn initial_state(&self) -> State {
            State::Idle
        }
        async fn work(&mut self, _stop: &CancellationToken) -> Result<State, Self::Error> {
            self.ticks.fetch_add(1, Ordering::SeqCst);
            Ok(State::Idle)
        }
        async fn wait_for_work(&mut self) -> State {
            tokio::time::sleep(Duration::from_secs(1)).await;
            State::Busy
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_may_start_by_waiting() {
        let stop = CancellationToken::new();
        let runner = Runner::new(stop.clone());
        let ticks = Arc::new(AtomicU32::new(0));
        runner.spawn(Ticker { ticks: ticks.clone() });
        assert_eq!(runner.list()[0].state, "idle");
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert_eq!(ticks.load(Ordering::SeqCst), 0);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(ticks.load(Ordering::SeqCst), 2);
        stop.cancel();
        runner.join().await;
    }
}
