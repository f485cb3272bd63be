//! Audits: the directory challenges peers at random, so a peer that
//! claims shards it no longer holds (or serves bytes it never checks) is
//! found without moving much data, and before a read needs the data.
//!
//! A **challenge** picks a random segment record (a random key of
//! `segs/`), a random holder of it that is up, and one random 4 KiB block
//! of that holder's shard. The holder must answer with the shard's header
//! (checked against the segment root the record holds) and the block with
//! its hash proof (checked against the shard's root in that header). The
//! block is unpredictable and the proof ties it to a root the directory
//! already trusts, so only a peer holding the shard's bytes answers right;
//! about 4.5 KiB move per challenge. (DESIGN.md's keyed hash over a range
//! with a fresh nonce could not be checked by a directory that holds no
//! data; docs/ARCHITECTURE.md, "Audits".)
//!
//! **Outcomes:**
//! - *passed*;
//! - *missing*: the holder says it has no such shard, or that its copy is
//!   corrupt: an honest loss. The shard is forgotten ([`super::faults`])
//!   and rebuilt;
//! - *lie*: the answer does not verify: the peer served bytes its own
//!   checks should have refused. The shard is forgotten;
//! - an unreachable peer is not an outcome: heartbeats judge liveness.
//!
//! A peer with one lie, or [`STRIKES`] failed challenges, is marked: it is
//! drained for failed audits ([`super::drain`]), so its shards count as
//! lost and are rebuilt from the others, and it gets no new ones. Tallies
//! are kept per peer under `audit/<name>` and shown by `meshdisk status`.
//!
//! A reader whose answer from a peer did not verify reports the shard
//! (`SuspectShard`); those are challenged first, on the whole shard.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::api::*;
use crate::client::{Client, ClientError};
use crate::codec::segment::{SegmentRoot, SegmentShardKey};
use crate::directory::Directory;
use crate::directory::meta::{MetaStore, Op, Txn};
use crate::directory::schema::*;
use crate::sys::worker::{Pacing, State, Status, Worker};

/// Failed challenges (of any kind) after which a peer is drained.
pub const STRIKES: u64 = 3;

/// Default time between two challenges (cluster-wide).
pub const EVERY: Duration = Duration::from_secs(10);

/// Readers' reports waiting for their challenge, at most.
const SUSPECTS_KEPT: usize = 256;

/// How a challenge ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// The holder says it lost the shard, or that its copy is corrupt.
    Missing(String),
    /// The answer did not verify.
    Lie(String),
    /// No answer: not counted.
    Unreachable(String),
}

/// What an audit asks of a peer.
pub trait Auditor: Clone + Send + Sync + 'static {
    /// Challenges `peer` on block `block` of shard `key` of a segment whose
    /// root is `root` (every block when `block` is `None`).
    fn challenge(
        &self,
        peer: &PeerAddr,
        key: SegmentShardKey,
        root: SegmentRoot,
        block: Option<u32>,
    ) -> impl Future<Output = Outcome> + Send;
}

fn outcome(r: Result<(), ClientError>) -> Outcome {
    match r {
        Ok(()) => Outcome::Passed,
        Err(e @ ClientError::BadShard { .. }) => Outcome::Lie(e.to_string()),
        Err(e) => match e.kind() {
            Some(ErrorKind::NotFound | ErrorKind::Corrupt) => Outcome::Missing(e.to_string()),
            _ => Outcome::Unreachable(e.to_string()),
        },
    }
}

impl Auditor for Client {
    async fn challenge(
        &self,
        peer: &PeerAddr,
        key: SegmentShardKey,
        root: SegmentRoot,
        block: Option<u32>,
    ) -> Outcome {
        let Some(block) = block else {
            return outcome(self.get_shard(peer, key, &root).await.map(drop));
        };
        let header = match self.get_shard_header(peer, key, &root).await {
            Ok(h) => h,
            Err(e) => return outcome(Err(e)),
        };
        let bps = header.geometry.blocks_per_shard();
        let shard_root = header.roots[usize::from(key.index)];
        outcome(self.get_blocks(peer, key, &shard_root, bps, block.min(bps - 1), 1).await.map(drop))
    }
}

/// One challenge to make.
#[derive(Clone, Debug)]
struct Challenge {
    key: SegmentShardKey,
    holder: u16,
    peer: PeerAddr,
    root: SegmentRoot,
    block: Option<u32>,
}

impl<S: MetaStore> Directory<S> {
    /// Every peer's audit tally, by name.
    pub(in crate::directory) async fn audit_tallies(
        &self,
    ) -> Result<std::collections::HashMap<String, AuditTally>, Remote> {
        let mut out = std::collections::HashMap::new();
        for e in self.meta.list(b"audit/").await? {
            let name = String::from_utf8_lossy(&e.key[b"audit/".len()..]).into_owned();
            out.insert(name, dec("audit", &e.value)?);
        }
        Ok(out)
    }

    /// A reader's report that `peer`'s answer for `shard` did not verify:
    /// queued for a whole-shard challenge.
    pub(in crate::directory) async fn suspect_shard(
        &self,
        reporter: &str,
        shard: SegmentShardKey,
        peer: &str,
    ) -> Result<DirResponse, Remote> {
        let mut q = self.suspects.lock().expect("not poisoned");
        if q.len() < SUSPECTS_KEPT && !q.iter().any(|(k, p)| *k == shard && p == peer) {
            tracing::info!(
                "{reporter} suspects shard {} of segment {} on {peer}: challenging it",
                shard.index,
                shard.segment
            );
            q.push_back((shard, peer.to_owned()));
            self.audit_wake.notify_one();
        }
        Ok(DirResponse::Done)
    }

    /// The next challenge: a suspect first, else a random shard.
    async fn next_challenge(&self) -> Result<Option<Challenge>, Remote> {
        let view = self.peer_view().await?;
        let by_name = |name: &str| view.by_id.values().find(|p| p.addr.name == name);
        loop {
            let Some((key, name)) = self.suspects.lock().expect("not poisoned").pop_front() else { break };
            let Some(p) = by_name(&name).filter(|p| p.state.is_up()) else { continue };
            let Some(record) = self.record_of(&key).await? else { continue };
            if record.peers.get(usize::from(key.index)) != Some(&p.id) {
                continue;
            }
            let root = SegmentRoot(record.root);
            return Ok(Some(Challenge { key, holder: p.id, peer: p.addr.clone(), root, block: None }));
        }
        // A random record: the first after a random key (volume ids are
        // random, so this is near uniform), or the first of all.
        let start = format!("segs/{:032x}", (self.random() * u128::MAX as f64) as u128).into_bytes();
        let mut page = self.meta.list_range(b"segs/", Some(&start), 1).await?;
        if page.is_empty() {
            page = self.meta.list_range(b"segs/", None, 1).await?;
        }
        let Some(e) = page.pop() else { return Ok(None) };
        let Some((volume, segment)) = parse_any_segment_key(&e.key) else {
            return Err(internal(format!("a malformed segment key {:?}", e.key)));
        };
        let record =
            SegmentRecord::decode(&e.value).map_err(|x| internal(format!("segment {segment}: {x}")))?;
        let holders: Vec<(usize, u16)> = record
            .peers
            .iter()
            .enumerate()
            .filter(|(_, id)| view.by_id.get(id).is_some_and(|p| p.state.is_up()))
            .map(|(i, &id)| (i, id))
            .collect();
        if holders.is_empty() {
            return Ok(None);
        }
        let (index, holder) =
            holders[((self.random() * holders.len() as f64) as usize).min(holders.len() - 1)];
        let blocks = u32::from(record.shard_blocks).max(1);
        let block = ((self.random() * f64::from(blocks)) as u32).min(blocks - 1);
        Ok(Some(Challenge {
            key: SegmentShardKey { volume, segment, index: index as u8 },
            holder,
            peer: view.by_id[&holder].addr.clone(),
            root: SegmentRoot(record.root),
            block: Some(block),
        }))
    }

    async fn record_of(&self, key: &SegmentShardKey) -> Result<Option<SegmentRecord>, Remote> {
        let Some(e) = self.meta.get(&segment_key(&key.volume, key.segment)).await? else { return Ok(None) };
        Ok(Some(
            SegmentRecord::decode(&e.value).map_err(|x| internal(format!("segment {}: {x}", key.segment)))?,
        ))
    }

    /// Makes one challenge and acts on its outcome; what it was.
    pub(in crate::directory) async fn audit_once<A: Auditor>(
        &self,
        auditor: &A,
    ) -> Result<Option<Outcome>, Remote> {
        let Some(c) = self.next_challenge().await? else { return Ok(None) };
        let outcome = auditor.challenge(&c.peer, c.key, c.root, c.block).await;
        let (failed, lie, why) = match &outcome {
            Outcome::Passed => (false, false, ""),
            Outcome::Missing(why) => (true, false, why.as_str()),
            Outcome::Lie(why) => (true, true, why.as_str()),
            Outcome::Unreachable(_) => return Ok(Some(outcome)),
        };
        let name = &c.peer.name;
        let k = key("audit", name);
        let mut tally: AuditTally = match self.meta.get(&k).await? {
            Some(e) => dec("audit", &e.value)?,
            None => AuditTally::default(),
        };
        tally.audits += 1;
        tally.failed += u64::from(failed);
        tally.lies += u64::from(lie);
        // A removed peer's tally is not brought back.
        if self.meta.get(&peer_id_key(name)).await?.is_some() {
            self.meta.txn(Txn::new().then(Op::Put { key: k, value: enc(&tally), lease: None })).await?;
        }
        if failed {
            tracing::warn!(
                "audit of shard {} of segment {} on {name} failed: {why}",
                c.key.index,
                c.key.segment
            );
            self.forget_shard(&c.key, c.holder, &format!("failed an audit: {why}")).await?;
            if tally.lies > 0 || tally.failed >= STRIKES {
                let drains = self.drains().await?;
                if drains.get(name).is_none_or(|d| d.reason != DrainReason::Audits) {
                    // Replaces an operator's drain: its shards are no
                    // longer copied from it.
                    self.meta.txn(Txn::new().then(Op::Delete { key: key("drain", name) })).await?;
                    self.drain_peer(name, DrainReason::Audits, false).await?;
                }
            }
        }
        Ok(Some(outcome))
    }
}

/// Starts the audit worker on the directory's runner.
pub(in crate::directory) fn start<S: MetaStore, A: Auditor>(
    dir: &Arc<Directory<S>>,
    auditor: A,
    every: Duration,
) {
    if every.is_zero() {
        return;
    }
    let pacing = Pacing { tranquility: 0, backoff: every, max_backoff: every * 4 };
    dir.workers.spawn_paced(AuditWorker { dir: dir.clone(), auditor, every, made: 0, failed: 0 }, pacing);
}

/// Makes a challenge every `every` (suspects at once).
pub struct AuditWorker<S: MetaStore, A: Auditor> {
    dir: Arc<Directory<S>>,
    auditor: A,
    every: Duration,
    made: u64,
    failed: u64,
}

impl<S: MetaStore, A: Auditor> Worker for AuditWorker<S, A> {
    type Error = Remote;

    fn name(&self) -> String {
        "audit".into()
    }

    fn status(&self) -> Status {
        Status {
            queue: Some(self.dir.suspects.lock().expect("not poisoned").len() as u64),
            progress: Some(format!("{} challenges, {} failed", self.made, self.failed)),
        }
    }

    fn initial_state(&self) -> State {
        State::Idle
    }

    async fn work(&mut self, stop: &CancellationToken) -> Result<State, Remote> {
        let outcome = tokio::select! {
            r = self.dir.audit_once(&self.auditor) => r?,
            () = stop.cancelled() => return Ok(State::Done),
        };
        if let Some(o) = outcome {
            self.made += u64::from(!matches!(o, Outcome::Unreachable(_)));
            self.failed += u64::from(matches!(o, Outcome::Missing(_) | Outcome::Lie(_)));
        }
        let more = !self.dir.suspects.lock().expect("not poisoned").is_empty();
        Ok(if more { State::Busy } else { State::Idle })
    }

    async fn wait_for_work(&mut self) -> State {
        tokio::select! {
            () = tokio::time::sleep(self.every) => {}
            () = self.dir.audit_wake.notified() => {}
        }
        State::Busy
    }
}

/// Suspects waiting, by shard and peer name.
pub type Suspects = std::sync::Mutex<VecDeque<(SegmentShardKey, String)>>;
