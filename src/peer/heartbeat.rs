//! Heartbeats: every `--heartbeat`, the peer reports to the directory (its
//! address, failure domain, capacity and use, load, a store problem if any,
//! and its round trips to the other peers), learns from the answer which
//! peers are up, and measures the round trip to each of them for the next
//! report. The directory counts a peer down when its last heartbeat is older
//! than `--peer-timeout`.
//!
//! A refusal on the first heartbeat (a certificate from another cluster, a
//! revoked peer) is final: retrying cannot fix it, so the peer stops with
//! the refusal. Any other failure is logged once, when it starts, and the
//! heartbeats go on at the same cadence until the directory answers again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::fatal;
use super::scrub::ScrubShared;
use super::store::ShardStore;
use crate::api::{DirRequest, DirResponse, PeerAddr, PeerReport, Rtt};
use crate::client::{Client, ClientError};
use crate::sys::worker::{State, Status, Worker};

/// What a peer says of itself in every report, fixed at start.
pub(super) struct Identity {
    pub addr: SocketAddr,
    pub failure_domain: String,
    pub capacity: u64,
}

/// The heartbeat worker (see the module documentation). Its failures to
/// reach the directory are not runner errors: the runner's backoff would
/// change the cadence the directory's peer timeout counts on.
pub(super) struct Heartbeat {
    client: Client,
    store: ShardStore,
    /// The scrub worker's report, and where its directive goes.
    scrub: Arc<ScrubShared>,
    load: Arc<AtomicU32>,
    /// Calls from clients since the start, and its value and time at the
    /// last report.
    client_calls: Arc<AtomicU64>,
    last_calls: (u64, Instant),
    me: Identity,
    /// The directory's address as the credential names it, for messages.
    directory: String,
    period: Duration,
    tick: Interval,
    /// The other peers that are up, as the last answer listed them.
    peers: Vec<PeerAddr>,
    rtts: Vec<Rtt>,
    /// The directory has answered at least once.
    reached: bool,
    /// Since when, and why, the directory has not answered.
    failing: Option<(Instant, String)>,
    /// Where a refusal goes (of the first heartbeat, or the directory's
    /// later on).
    refused: Option<oneshot::Sender<ClientError>>,
}

impl Heartbeat {
    /// Reports every `period`, the first at once. A refusal of the first
    /// report is sent on `refused`, and the worker is done.
    pub(super) fn new(
        client: Client,
        (store, scrub): (ShardStore, Arc<ScrubShared>),
        (load, client_calls): (Arc<AtomicU32>, Arc<AtomicU64>),
        me: Identity,
        directory: String,
        period: Duration,
        refused: oneshot::Sender<ClientError>,
    ) -> Self {
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            client,
            store,
            scrub,
            load,
            last_calls: (client_calls.load(Ordering::Relaxed), Instant::now()),
            client_calls,
            me,
            directory,
            period,
            tick,
            peers: Vec::new(),
            rtts: Vec::new(),
            reached: false,
            failing: None,
            refused: Some(refused),
        }
    }

    fn report(&mut self) -> PeerReport {
        let (used, problem) = match self.store.used() {
            Ok(u) => (u, None),
            Err(e) => (0, Some(e.to_string())),
        };
        let calls = self.client_calls.load(Ordering::Relaxed);
        let (before, at) = self.last_calls;
        let secs = at.elapsed().as_secs_f64().max(0.001);
        let client_ops = ((calls.saturating_sub(before)) as f64 / secs).min(f64::from(u32::MAX)) as u32;
        self.last_calls = (calls, Instant::now());
        PeerReport {
            addr: self.me.addr,
            failure_domain: self.me.failure_domain.clone(),
            capacity: self.me.capacity,
            used,
            load: self.load.load(Ordering::Relaxed),
            client_ops,
            problem,
            rtts: self.rtts.clone(),
            scrub: self.scrub.report(),
        }
    }
}

impl Worker for Heartbeat {
    type Error = std::convert::Infallible;

    fn name(&self) -> String {
        "heartbeat".into()
    }

    fn status(&self) -> Status {
        let progress = match &self.failing {
            Some((since, why)) => {
                format!("cannot report to the directory for {:.0?}: {why}", since.elapsed())
            }
            None if self.reached => {
                format!("{} other peers up, {} round trips measured", self.peers.len(), self.rtts.len())
            }
            None => "not reported yet".into(),
        };
        Status { queue: None, progress: Some(progress) }
    }

    async fn work(&mut self, _stop: &CancellationToken) -> Result<State, Self::Error> {
        let report = self.report();
        match self.client.directory(&DirRequest::Heartbeat(report)).await {
            Ok(DirResponse::Heartbeat { peers, scrub, .. }) => {
                self.scrub.direct(scrub);
                if self.failing.take().is_some() || !self.reached {
                    tracing::info!("reporting to the directory at {}", self.directory);
                }
                self.reached = true;
                self.peers = peers;
            }
            Ok(other) => tracing::warn!("the directory answered a heartbeat with {other:?}"),
            // A refusal ends the peer: of its first report (not a member),
            // or later, from the directory itself (removed from the
            // cluster: `meshdisk peer remove`).
            Err(e) if fatal(&e) && (!self.reached || matches!(e, ClientError::Directory(_))) => {
                if let Some(refused) = self.refused.take() {
                    let _ = refused.send(e);
                }
                return Ok(State::Done);
            }
            Err(e) => {
                if self.failing.is_none() {
                    tracing::warn!("cannot report to the directory at {}: {e}", self.directory);
                    self.failing = Some((Instant::now(), e.to_string()));
                }
            }
        }
        self.rtts = self.client.measure(&self.peers, self.period).await;
        Ok(State::Idle)
    }

    async fn wait_for_work(&mut self) -> State {
        self.tick.tick().await;
        State::Busy
    }
}
