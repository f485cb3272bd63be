//! The volume, as `attach` and `demo` serve it.
//!
//! ```text
//! write ─► sequence (epoch.counter) ─► encrypt, tweak (address, sequence)
//!       ─► local log append (the ciphertext, once) ─► local index + queue
//! FLUSH ─► commit: queued blocks packed into segments (ciphertext moved,
//!          not re-encrypted) ─► k + m shards on peers at quorum
//!          ─► one compare-and-set of the root at the directory
//! read  ─► the higher sequence of the local index and the committed map:
//!          local log, or block cache (address, sequence), or the one data
//!          shard holding the block, proven against its segment root
//! ```
//!
//! Invariants (docs/ARCHITECTURE.md lists them for the whole volume):
//! a sequence is never reused (allocated above the committed root's and the
//! log's highest, under the writer's epoch); the highest sequence of a
//! block wins everywhere; a commit claims a watermark only when every
//! sequence below it is in it or in an earlier one; everything read is
//! proven against a root reached from the MAC'd root.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::blocks::BlockCache;
use super::cache::MapCache;
use super::local::LocalIndex;
use super::log::LocalLog;
use super::remote::{SegmentIo, Timing};
use super::root::{RootKey, RootRecord};
use crate::api::{Durability, PeerAddr, VolumeRecord};
use crate::backend::{self, ErrorKind};
use crate::client::{Client, Network};
use crate::codec::sequence::{SegmentId, Sequence, Sequencer};
use crate::codec::xts::SectorCipher;
use crate::sys::worker::{Runner, WorkerInfo};

/// Tuning of an attached volume.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the local log, the block cache, the lease note and the
    /// freshness note live.
    pub state_dir: PathBuf,
    /// Bytes of block cache (clean blocks read from peers).
    pub cache_size: u64,
    /// Bytes of local log: writes not yet committed, and recent ones kept
    /// as a cache of what this machine wrote.
    pub log_size: u64,
    /// Map pages kept in memory (each covers 256 MiB of the volume).
    pub map_cache: usize,
    /// A commit also writes a map checkpoint when the root would name
    /// more segments written since the last one than this (the root's
    /// size and an attach's summary reads grow with it; a checkpoint
    /// rewrites the map pages changed since).
    pub checkpoint_segments: usize,
    /// Take the lease over from another holder.
    pub force: bool,
    /// Serve this snapshot of the volume, read-only (no lease, no log).
    pub snapshot: Option<String>,
    /// Compact while the space held exceeds this many times the live data
    /// (the policy's trigger; see `compaction::policy`).
    pub compact_above: f64,
    /// Drop unflushed writes of the local log that were made against an
    /// older root (another machine wrote since).
    pub discard_local: bool,
    pub timing: Timing,
    /// A queued write older than this is committed without a FLUSH.
    pub commit_age: Duration,
    /// How long a FLUSH waits for the peers and the directory before failing.
    pub io_timeout: Duration,
}

impl Config {
    pub fn new(state_dir: PathBuf, cache_size: u64) -> Self {
        Self {
            state_dir,
            cache_size,
            log_size: 1 << 30,
            map_cache: 64,
            checkpoint_segments: 256,
            force: false,
            snapshot: None,
            compact_above: super::compaction::policy::TRIGGER,
            discard_local: false,
            timing: Timing::default(),
            commit_age: Duration::from_secs(2),
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// The attached volume. Cheap to clone.
#[derive(Clone)]
pub struct Volume {
    pub(super) inner: Arc<Inner>,
}

/// Lock stripes of the write path (a write locks the stripes of its blocks).
pub(super) const LOCK_STRIPES: usize = 1024;
/// Blocks per lock stripe.
pub(super) const STRIPE_BLOCKS: u64 = 16;

pub(super) struct Inner {
    pub(super) name: String,
    pub(super) record: VolumeRecord,
    pub(super) client: Client,
    pub(super) config: Config,
    /// Encrypts this volume's writes (its own key).
    pub(super) cipher: SectorCipher,
    /// Decrypts what a clone inherited: whose key, whose segments.
    pub(super) lineage: super::lineage::Lineage,
    pub(super) root_key: RootKey,
    /// The volume's size in 4 KiB blocks.
    pub(super) blocks: u64,
    pub(super) k: usize,
    pub(super) m: usize,
    /// Blocks per shard of a full segment.
    pub(super) blocks_per_shard: u32,
    /// The writer's lease epoch (changes when a lapsed lease is taken again).
    pub(super) epoch: AtomicU64,
    /// Reads and writes wait: the lease may have lapsed.
    pub(super) suspended: watch::Sender<bool>,
    /// Asks the lease keeper to check the lease now (a commit was refused).
    pub(super) lease_doubt: Notify,
    pub(super) sequences: Mutex<Sequencer<Sequence>>,
    pub(super) segment_ids: Mutex<Sequencer<SegmentId>>,
    /// The floors of the newest Base this attach synced before a commit:
    /// every sequence and segment id up to them may leave the machine
    /// without another sync (see `commit_packed`).
    pub(super) reserved: Mutex<(SegmentId, Sequence)>,
    pub(super) local: Mutex<LocalIndex>,
    pub(super) map: Mutex<MapCache>,
    /// The committed root as this writer last made or loaded it.
    pub(super) root: Mutex<RootRecord>,
    /// The segments holding the current checkpoint's head and index
    /// continuations (its pages are in the map's index).
    pub(super) checkpoint_parts: Mutex<std::collections::BTreeSet<SegmentId>>,
    /// The segments the directory has records of for this volume, once
    /// listed (the compactor lists them; commits add theirs): what is
    /// here and not reached by the root is dropped.
    pub(super) recorded: Mutex<Option<std::collections::BTreeSet<SegmentId>>>,
    /// Segment → holder peer id per shard (0: none), as committed.
    pub(super) holders: Mutex<std::collections::HashMap<SegmentId, Vec<u16>>>,
    /// Segments' health as the directory said lately (the health map).
    pub(super) segment_health: super::health_map::HealthCache,
    /// Peer id → address.
    pub(super) peers: Mutex<std::collections::HashMap<u16, PeerAddr>>,
    /// Placements asked for ahead, for small commits.
    pub(super) placed_ahead: Mutex<super::placed::PlacedAhead>,
    pub(super) log: LocalLog,
    pub(super) cache: BlockCache,
    pub(super) io: SegmentIo,
    pub(super) locks: Vec<tokio::sync::Mutex<()>>,
    /// Sequential readers, and what to fetch ahead of them.
    pub(super) readahead: Mutex<super::readahead::ReadAhead>,
    /// What was fetched ahead and not yet read.
    pub(super) ahead: super::ahead::FetchedAhead,
    /// Fetches ahead running at once (one permit each).
    pub(super) prefetches: Arc<tokio::sync::Semaphore>,
    /// Block ranges being fetched ahead: a read of them waits for the
    /// fetch rather than asking the peers a second time.
    pub(super) prefetching: Mutex<Vec<(std::ops::Range<u64>, watch::Receiver<bool>)>>,
    /// One commit at a time.
    pub(super) commit_turn: tokio::sync::Mutex<()>,
    /// The highest watermark committed: every sequence up to it is in a
    /// committed root.
    pub(super) committed: watch::Sender<Sequence>,
    /// The last commit's failure, until one succeeds.
    pub(super) commit_failure: Mutex<Option<(ErrorKind, String)>>,
    /// Wakes the committer.
    pub(super) wake: Notify,
    /// Wakes the compactor (a commit changed live counts).
    pub(super) compact_wake: Notify,
    /// Blocks held on peers and live, as the compactor last counted
    /// them (commits add theirs meanwhile), and blocks of dropped segments
    /// still on the peers (the directory erases them after its grace).
    pub(super) space: Mutex<Space>,
    /// A compaction round freed space.
    pub(super) compacted: Notify,
    /// What this attach sent: (bytes of blocks written by users and
    /// committed, bytes of blocks compaction moved, bytes of shards put on
    /// peers for both, metadata and parity included).
    pub(super) traffic: Traffic,
    /// A flush is waiting: commit now, whatever the queue holds.
    pub(super) urgent: AtomicBool,
    /// Why writes are refused, once they are.
    pub(super) fenced: Mutex<Option<String>>,
    pub(super) stop: CancellationToken,
    pub(super) workers: Runner,
}

/// The space a volume takes on the peers, in data blocks (parity
/// multiplies all of it by (k+m)/k).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Space {
    /// Blocks of every segment the directory has a record of.
    pub(super) held: u64,
    /// Blocks the volume reaches (a segment a snapshot keeps: all of it).
    pub(super) live: u64,
    /// Blocks of dropped segments not erased yet.
    pub(super) collecting: u64,
}

/// Bytes counted for `tools/bench compaction` and the log.
#[derive(Default)]
pub(super) struct Traffic {
    /// Clients' reads, writes, trims and zeroes served (the lease keeper
    /// reports their rate: repair yields to it).
    pub(super) requests: AtomicU64,
    pub(super) written: AtomicU64,
    pub(super) moved: AtomicU64,
    pub(super) sent: AtomicU64,
    /// Bytes of data blocks read from the peers for clients' reads (not
    /// in the block cache nor fetched ahead), and fetched ahead.
    pub(super) fetched: AtomicU64,
    pub(super) fetched_ahead: AtomicU64,
}

/// What an attach has moved so far: its counters, and the network bytes of
/// its client (every QUIC connection to the directory and the peers, the
/// closed ones included). Written to `traffic.json` in the state folder on
/// SIGUSR1 and logged at detach.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TrafficReport {
    /// Clients' reads, writes, trims and zeroes served.
    pub requests: u64,
    /// Bytes of blocks written by clients and committed.
    pub written: u64,
    /// Bytes of blocks compaction moved.
    pub moved: u64,
    /// Bytes of shards put on peers (metadata and parity included).
    pub sent: u64,
    /// Bytes of data blocks read from the peers because a client's read
    /// missed the block cache (the blocks alone: no proofs, metadata or
    /// framing).
    pub fetched: u64,
    /// Bytes of data blocks read from the peers ahead of a sequential
    /// reader.
    pub fetched_ahead: u64,
    /// UDP payload bytes sent over the network (QUIC headers, ACKs,
    /// keep-alives, retransmissions, the calls' framing and payloads).
    pub network_sent: u64,
    /// UDP payload bytes received.
    pub network_received: u64,
}

impl Traffic {
    pub(super) fn report(&self, network: Network) -> TrafficReport {
        TrafficReport {
            requests: self.requests.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            moved: self.moved.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            fetched: self.fetched.load(Ordering::Relaxed),
            fetched_ahead: self.fetched_ahead.load(Ordering::Relaxed),
            network_sent: network.sent,
            network_received: network.received,
        }
    }
}

impl TrafficReport {
    /// One line for the log.
    pub fn summary(&self) -> String {
        let (w, m, s) = (self.written, self.moved, self.sent);
        format!(
            "{w} bytes written, {m} moved by compaction, {s} sent to the peers ({:.3} sent per byte written); \
             {} client requests, {} bytes of blocks fetched for them and {} ahead; \
             network: {} bytes sent, {} received (UDP payloads of every QUIC connection)",
            if w == 0 { 0.0 } else { s as f64 / w as f64 },
            self.requests,
            self.fetched,
            self.fetched_ahead,
            self.network_sent,
            self.network_received,
        )
    }
}

impl Inner {
    pub(super) fn fence(&self, why: String) {
        let mut f = self.fenced.lock().expect("fenced");
        if f.is_none() {
            tracing::error!("volume {}: {why}", self.name);
            *f = Some(why);
        }
        drop(f);
        self.committed.send_modify(|_| {});
    }

    pub(super) fn check_fenced(&self, op: &'static str, offset: u64, length: u64) -> backend::Result<()> {
        match &*self.fenced.lock().expect("fenced") {
            Some(why) => Err(backend::Error::failed(ErrorKind::Fenced, op, offset, length, why.clone())),
            None => Ok(()),
        }
    }

    /// The lock stripes of blocks `first..first + n`, in order.
    pub(super) fn stripes(first: u64, n: u64) -> Vec<usize> {
        let (lo, hi) = (first / STRIPE_BLOCKS, (first + n.max(1) - 1) / STRIPE_BLOCKS);
        let mut s: Vec<usize> = if hi - lo + 1 >= LOCK_STRIPES as u64 {
            (0..LOCK_STRIPES).collect()
        } else {
            (lo..=hi).map(|x| (x % LOCK_STRIPES as u64) as usize).collect()
        };
        s.sort_unstable();
        s.dedup();
        s
    }

    pub(super) fn durability(&self) -> Durability {
        self.record.spec.durability
    }
}

impl Volume {
    pub fn record(&self) -> &VolumeRecord {
        &self.inner.record
    }

    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Relaxed)
    }

    /// What this attach has moved so far, over the network included.
    pub async fn traffic(&self) -> TrafficReport {
        self.inner.traffic.report(self.inner.client.network().await)
    }

    /// The volume's background workers and their state, for status.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.inner.workers.list()
    }
}
