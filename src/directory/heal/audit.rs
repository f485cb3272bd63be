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
//! - an unreachable peer is not an outcome: heartbeats judge liveness;
//! - a failure another holder of the segment shares (one more challenge
//!   is made on failure) is the segment's: its record's root is wrong, or
//!   it was forged on every holder. No peer is blamed, nothing forgotten.
//!
//! A peer with one lie, or [`STRIKES`] failed challenges close together
//! ([`STRIKE_WINDOW`]), is marked: it is
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

/// Failed challenges (of any kind), each within [`STRIKE_WINDOW`] of the
/// one before, after which a peer is drained.
pub const STRIKES: u64 = 3;

/// Failures further apart than this start the strikes anew.
pub const STRIKE_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// Default time between two challenges (cluster-wide).
pub const EVERY: Duration = Duration::from_secs(10);

/// Readers' reports waiting for their challenge, at most.
const SUSPECTS_KEPT: usize = 256;

/// Records a health scan keeps, uniformly sampled, for audits.
pub const SAMPLE: usize = 64;

/// Reservoir sampling: offers the `seen`-th item (from 1) of a stream to
/// `sample`, which keeps [`SAMPLE`] items, each of the stream equally
/// likely.
pub fn sample<T>(sample: &mut Vec<T>, seen: u64, item: T, mut random: impl FnMut() -> f64) {
    if sample.len() < SAMPLE {
        sample.push(item);
        return;
    }
    let j = (random() * seen as f64) as u64;
    if (j as usize) < SAMPLE {
        sample[j as usize] = item;
    }
}

/// How a challenge ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// The holder says it lost the shard, or that its copy is corrupt.
    Missing(String),
    /// The answer did not verify.
    Lie(String),
    /// This holder failed, and another holder of the segment too: the
    /// fault is the segment's (a wrong record, or forged everywhere), no
    /// peer is blamed.
    SegmentFault(String),
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
    /// Another holder of the segment that is up (its index and address),
    /// challenged when this one fails: if it fails too, the fault is the
    /// segment's record, not the peers.
    witness: Option<(u8, PeerAddr)>,
}

/// Another up holder of `record` than index `not`, at random.
fn witness(
    record: &SegmentRecord,
    not: usize,
    view: &super::repair::PeerView,
    mut random: impl FnMut() -> f64,
) -> Option<(u8, PeerAddr)> {
    let others: Vec<(u8, PeerAddr)> = record
        .peers
        .iter()
        .enumerate()
        .filter(|&(i, id)| i != not && *id != record.peers[not])
        .filter_map(|(i, id)| {
            view.by_id.get(id).filter(|p| p.state.is_up()).map(|p| (i as u8, p.addr.clone()))
        })
        .collect();
    if others.is_empty() {
        return None;
    }
    Some(others[((random() * others.len() as f64) as usize).min(others.len() - 1)].clone())
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
            let Some(record) = self.segment_record(&key).await? else { continue };
            if record.peers.get(usize::from(key.index)) != Some(&p.id) {
                continue;
            }
            let root = SegmentRoot(record.root);
            let witness = witness(&record, usize::from(key.index), &view, || self.random());
            return Ok(Some(Challenge {
                key,
                holder: p.id,
                peer: p.addr.clone(),
                root,
                block: None,
                witness,
            }));
        }
        // A random record: from the uniform sample the last health scan
        // kept (repair scans every few seconds), read again now.
        let picked = {
            let sample = self.audit_sample.lock().expect("not poisoned");
            let i = ((self.random() * sample.len() as f64) as usize).min(sample.len().saturating_sub(1));
            sample.get(i).copied()
        };
        let Some((volume, segment)) = picked else { return Ok(None) };
        let key = SegmentShardKey { volume, segment, index: 0 };
        let Some(record) = self.segment_record(&key).await? else { return Ok(None) };
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
            witness: witness(&record, index, &view, || self.random()),
        }))
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
            Outcome::Unreachable(_) | Outcome::SegmentFault(_) => return Ok(Some(outcome)),
        };
        // A failure that another holder of the segment shares is the
        // segment's (its record's root is wrong, or it was forged
        // everywhere): no peer is blamed, no shard forgotten.
        if failed && let Some((index, peer)) = &c.witness {
            let key = SegmentShardKey { index: *index, ..c.key };
            let other = auditor.challenge(peer, key, c.root, c.block.map(|_| 0)).await;
            if matches!(other, Outcome::Missing(_) | Outcome::Lie(_)) {
                tracing::warn!(
                    "segment {} fails audits on {} and {} alike ({why}): its record may be wrong; no peer blamed",
                    c.key.segment,
                    c.peer.name,
                    peer.name
                );
                return Ok(Some(Outcome::SegmentFault(why.to_owned())));
            }
        }
        let name = &c.peer.name;
        // A failure counts only if the record still named the peer for
        // that shard (a segment freed meanwhile is not the peer's fault).
        let forgotten =
            failed && self.forget_shard(&c.key, c.holder, &format!("failed an audit: {why}")).await?;
        let k = key("audit", name);
        let mut tally: AuditTally = match self.meta.get(&k).await? {
            Some(e) => dec("audit", &e.value)?,
            None => AuditTally::default(),
        };
        let now = self.now();
        tally.audits += 1;
        if forgotten {
            tally.failed += 1;
            tally.lies += u64::from(lie);
            // Strikes are failures close together: years of rare honest
            // losses do not add up to a drain.
            if now.saturating_sub(tally.last_failed_ms) > STRIKE_WINDOW.as_millis() as u64 {
                tally.strikes = 0;
            }
            tally.strikes += 1;
            tally.last_failed_ms = now;
        }
        let failed = forgotten;
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
            if tally.lies > 0 || tally.strikes >= STRIKES {
                // Replaces an operator's drain: its shards are no longer
                // copied from it.
                self.drain_peer(name, DrainReason::Audits, false).await?;
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

/// Segments (volume id, segment id) sampled by the last scan.
pub type Sample = std::sync::Mutex<Vec<([u8; VOLUME_ID_LEN], crate::codec::sequence::SegmentId)>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservoir_keeps_every_item_equally_likely() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        let n = 640u64;
        let mut hits = vec![0u32; n as usize];
        for _ in 0..2000 {
            let mut s = Vec::new();
            for i in 0..n {
                sample(&mut s, i + 1, i, &mut random);
            }
            assert_eq!(s.len(), SAMPLE);
            for i in s {
                hits[i as usize] += 1;
            }
        }
        // Each item is kept with probability 64 / 640 = 0.1: 200 of 2000.
        let (lo, hi) = (hits.iter().min().unwrap(), hits.iter().max().unwrap());
        assert!(*lo > 120 && *hi < 290, "{lo}..{hi}");
        // Early and late items alike.
        let early: u32 = hits[..64].iter().sum();
        let late: u32 = hits[n as usize - 64..].iter().sum();
        assert!(early.abs_diff(late) < early / 5, "{early} vs {late}");
    }
}
