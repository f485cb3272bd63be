//! `meshdisk bench directory`: how many commits per second the directory
//! alone sustains from many attached volumes at once (issue 16's goal:
//! ≥ 1,000/s from 16).
//!
//! It creates `volumes` volumes (k = 4, m = 2, 1 MiB shards, like the
//! demo's), takes each one's write lease as an attach does, and runs one
//! commit loop per volume, each with one commit in flight (an attach
//! commits one at a time, under its commit turn). Each commit sends the
//! directory what an attach's commit sends it (`Inner::commit_packed` in
//! `volume/v2/commit.rs`):
//!
//! 1. `PlaceSegments` for the commit's segments, with the shard size and
//!    the compaction reserve a commit of new writes asks for;
//! 2. `CommitRoot`: the new root, sealed with the volume's root key, with
//!    one segment record per segment naming the placed peers, replacing
//!    the root read (compare-and-set under the lease's epoch).
//!
//! The roots grow as an attach's do: each names the segments since the
//! last map checkpoint, and when the list would pass the attach's bound
//! (`checkpoint_due`: an eighth of the segments the volume holds, at least
//! 16, at most 256) the commit writes a checkpoint (a page segment and a
//! head carried by its last segment) and the list starts again. A lease
//! keeper per volume renews the lease every third of its time to live.
//!
//! Every commit also wakes the attach's compactor (`compactor.rs`), whose
//! round asks the directory for its inputs (`CompactionInputs`: the
//! highest segment a snapshot reaches, the space dropped segments still
//! hold) and for the records of the segments committed since the last
//! round; rounds do not overlap, so at most one runs per volume and those
//! woken meanwhile make one more. The benchmark runs those rounds too
//! (none moves anything: no volume here is fragmented), unless
//! `compactor` is off, which measures the commits alone.
//!
//! What is *not* done: nothing is put to the peers (the peers only need
//! to be up, for placement), no log is synced and no segment is encoded
//! between the placement and the compare-and-set. So this measures the
//! directory alone, driven as hard as `volumes` attaches committing
//! back to back can drive it; a real commit's latency adds the shard puts.
//! Commit latency is from the placement call to the compare-and-set's
//! answer. CPU time is this process's; `tools/bench directory` adds the
//! directory's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::api::{Durability, PeerState, RootCommit, SegmentRecord, VolumeSpec};
use crate::cli::CliError;
use crate::cli::bench_cluster::cpu_seconds;
use crate::client::Client;
use crate::codec::VolumeKey;
use crate::codec::root::{CheckpointRef, RootKey, RootRecord, SegmentRef};
use crate::codec::segment::{BLOCK_SIZE, SegmentRoot};
use crate::codec::sequence::{SegmentId, Sequence, Sequencer};

/// The volumes' geometry: the demo's.
const K: u8 = 4;
const M: u8 = 2;
const SHARD_SIZE: u32 = 1 << 20;
const BLOCKS_PER_SHARD: u32 = SHARD_SIZE / BLOCK_SIZE as u32;
/// The volumes' size (nothing is written; it only bounds sequences).
const VOLUME_SIZE: u64 = 4 << 30;
/// The attach's default `checkpoint_segments`.
const CHECKPOINT_SEGMENTS: usize = 256;

#[derive(Clone, Debug)]
pub struct DirectoryBench {
    /// Volumes committing at once.
    pub volumes: usize,
    pub duration: Duration,
    /// Data segments per commit (a small fsync'd write: 1).
    pub segments: u32,
    /// Delete the volumes at the end (their records go to the collector).
    pub clean: bool,
    /// Run the compactor's rounds that commits wake.
    pub compactor: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DirectoryResult {
    pub volumes: usize,
    pub commits: u64,
    pub seconds: f64,
    pub commits_per_s: f64,
    /// Whole commits (placement and compare-and-set), milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The placement call alone, and the compare-and-set alone.
    pub place_p50_ms: f64,
    pub cas_p50_ms: f64,
    pub cas_p99_ms: f64,
    /// Compactor rounds run (each: snapshots, volume info, new records).
    pub compactor_rounds: u64,
    pub compactor_round_p50_ms: f64,
    /// Segment records committed, and the mean size of a sealed root.
    pub segments: u64,
    pub mean_root_bytes: f64,
    /// This process's CPU time over the run.
    pub cpu_seconds: f64,
}

/// One volume's loop and what it measured.
#[derive(Default)]
struct Loop {
    commits: u64,
    segments: u64,
    root_bytes: u64,
    whole: Vec<Duration>,
    place: Vec<Duration>,
    cas: Vec<Duration>,
}

/// One attached volume as the benchmark drives it.
struct Writer {
    client: Client,
    name: String,
    epoch: u64,
    key: RootKey,
    root: RootRecord,
    ids: Sequencer<SegmentId>,
    /// Segments the volume holds (the attach's `recorded`).
    held: usize,
    keep_free: u64,
    /// Wakes the compactor, with the segments committed since its round.
    compactor: Arc<Wake>,
}

/// What a commit tells the compactor (the attach's `compact_wake` and its
/// `recorded` segments the compactor has no capacity of yet).
#[derive(Default)]
struct Wake {
    notify: tokio::sync::Notify,
    committed: std::sync::Mutex<Vec<SegmentId>>,
}

/// The compactor of one volume: a round per wake, as `Compactor::round`
/// asks the directory when no victim is due (`drop_unreached` lists the
/// volume's segments once, at the first round; nothing is unreached).
async fn compactor(
    client: Client,
    name: String,
    wake: Arc<Wake>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<Vec<Duration>, CliError> {
    let mut rounds = Vec::new();
    client.list_segments(&name).await?;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(rounds),
            _ = wake.notify.notified() => {}
            // The compactor's PERIOD.
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let started = Instant::now();
        client.compaction_inputs(&name).await?;
        let new = std::mem::take(&mut *wake.committed.lock().expect("not poisoned"));
        for chunk in new.chunks(crate::api::MAX_SEGMENTS_PER_CALL) {
            client.segment_records(&name, chunk.to_vec()).await?;
        }
        rounds.push(started.elapsed());
    }
}

impl Writer {
    /// The attach's `checkpoint_due` for a volume holding `held` segments.
    fn checkpoint_due(&self) -> usize {
        (self.held / 8).clamp(16, CHECKPOINT_SEGMENTS)
    }

    /// A made-up segment root: unique per segment, as a hash would be.
    fn segment_root(&self, id: SegmentId) -> SegmentRoot {
        let mut h = blake3::Hasher::new();
        h.update(self.name.as_bytes());
        h.update(&id.raw().to_le_bytes());
        SegmentRoot(*h.finalize().as_bytes())
    }

    /// One commit of `data` data segments, timed into `stats`.
    async fn commit(&mut self, data: u32, stats: &mut Loop) -> Result<(), CliError> {
        let prev = self.root.clone();
        let checkpoint = prev.since.len() + data as usize > self.checkpoint_due();
        // A checkpoint adds a segment of map pages before the head's carrier.
        let count = data + u32::from(checkpoint);
        let ids: Vec<SegmentId> = (0..count)
            .map(|_| self.ids.next())
            .collect::<Result<_, _>>()
            .map_err(|e| CliError::Argument(e.to_string()))?;
        let started = Instant::now();
        let placements = self
            .client
            .place_segments(&self.name, self.epoch, count, u64::from(SHARD_SIZE), Vec::new(), self.keep_free)
            .await?;
        let placed = Instant::now();
        let refs: Vec<SegmentRef> =
            ids.iter().map(|&id| SegmentRef { id, root: self.segment_root(id) }).collect();
        let last = *refs.last().expect("a commit has a segment");
        let (checkpoint, since) = if checkpoint {
            // The head lies in the carrier after its data (a few blocks);
            // the root names the commit's other segments.
            let at = CheckpointRef { segment: last, first_slot: K as u32 * BLOCKS_PER_SHARD - 64, blocks: 4 };
            (Some(at), refs[..refs.len() - 1].to_vec())
        } else {
            let mut since = prev.since.clone();
            since.extend_from_slice(&refs);
            (prev.checkpoint, since)
        };
        let next = RootRecord {
            volume_id: prev.volume_id,
            epoch: self.epoch,
            commit: prev.commit + 1,
            highest_sequence: Sequence::new(self.epoch, prev.highest_sequence.counter() + 256)
                .map_err(|e| CliError::Argument(e.to_string()))?,
            highest_segment: last.id,
            checkpoint,
            since,
        };
        let sealed = next.seal(&self.key);
        let root_bytes = sealed.len() as u64;
        let commit = RootCommit {
            volume: self.name.clone(),
            epoch: self.epoch,
            expected: (prev.commit > 0).then_some((prev.epoch, prev.commit)),
            sealed,
            segments: refs
                .iter()
                .zip(&placements)
                .map(|(r, p)| {
                    let record = SegmentRecord {
                        peers: p.peers.iter().map(|s| s.id).collect(),
                        shard_blocks: BLOCKS_PER_SHARD as u16,
                        root: r.root.0,
                    };
                    (r.id, record)
                })
                .collect(),
            dropped: Vec::new(),
        };
        if placements.len() != refs.len() {
            return Err(CliError::Argument("the directory placed fewer segments than asked".into()));
        }
        self.client.commit_root(commit).await?;
        let done = Instant::now();
        stats.whole.push(done - started);
        stats.place.push(placed - started);
        stats.cas.push(done - placed);
        stats.commits += 1;
        stats.segments += u64::from(count);
        stats.root_bytes += root_bytes;
        self.held += count as usize;
        self.root = next;
        self.compactor.committed.lock().expect("not poisoned").extend_from_slice(&ids);
        self.compactor.notify.notify_one();
        Ok(())
    }
}

/// Creates volume `name` with a fresh key; returns its root key.
async fn create(client: &Client, name: &str) -> Result<(VolumeSpec, RootKey), CliError> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id)?;
    let file = VolumeKey::generate()?;
    let first = crate::codec::keyslot::NewSlot::KeyFile(&file);
    let (key, key_check, key_slots) = crate::cli::unlock::new_volume_keys(&first, &id)?;
    let spec = VolumeSpec {
        name: name.into(),
        id,
        size: VOLUME_SIZE,
        k: K,
        m: M,
        shard_size: SHARD_SIZE,
        repair_threshold: K + M,
        key_check,
        key_slots,
        durability: Durability::Remote,
        lineage: Vec::new(),
    };
    client.create_volume(spec.clone()).await?;
    Ok((spec, RootKey::derive(&key)))
}

/// The p-th percentile of `xs` (sorted here), in milliseconds.
fn percentile_ms(xs: &mut [Duration], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_unstable();
    let i = ((xs.len() as f64 * p).ceil() as usize).clamp(1, xs.len()) - 1;
    xs[i].as_secs_f64() * 1e3
}

/// Runs the benchmark; `client` makes each volume's own client (an attach
/// is a process of its own, with its own connection to the directory).
pub async fn run(
    client: impl Fn() -> Result<Client, CliError>,
    config: &DirectoryBench,
) -> Result<DirectoryResult, CliError> {
    let admin = client()?;
    let s = admin.status().await?;
    let up = s.peers.iter().filter(|p| p.state == PeerState::Up).count();
    if up < usize::from(K + M) {
        return Err(CliError::Argument(format!(
            "placement needs {} peers up, {up} are: start them (`meshdisk peer`) and try again",
            K + M
        )));
    }
    // Names of this run's own: earlier runs' volumes may still be there.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() % 1_000_000_000);
    let mut writers = Vec::with_capacity(config.volumes);
    for i in 0..config.volumes {
        let name = format!("bench-dir-{run}-{i}");
        let (spec, key) = create(&admin, &name).await?;
        let c = client()?;
        // What `volume::lease::acquire` asks from a folder with no note.
        let lease = c.acquire_lease(&name, false, None).await?;
        let ids =
            Sequencer::new(lease.epoch, SegmentId::ZERO).map_err(|e| CliError::Argument(e.to_string()))?;
        let root = RootRecord::empty(spec.id);
        let keep_free = crate::volume::v2::reserve_bytes(usize::from(K), BLOCKS_PER_SHARD);
        let compactor = Arc::new(Wake::default());
        let w = Writer { client: c, name, epoch: lease.epoch, key, root, ids, held: 0, keep_free, compactor };
        writers.push((w, lease));
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let mut keepers = JoinSet::new();
    for (w, lease) in &writers {
        let (c, name, epoch, stop) = (w.client.clone(), w.name.clone(), lease.epoch, stop.clone());
        let every = Duration::from_millis(lease.ttl_ms / 3).max(Duration::from_millis(200));
        keepers.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok::<(), CliError>(()),
                    _ = tokio::time::sleep(every) => {}
                }
                c.renew_lease(&name, epoch, 0).await?;
            }
        });
    }
    let mut compactors = JoinSet::new();
    if config.compactor {
        for (w, _) in &writers {
            let (c, name, wake, stop) = (w.client.clone(), w.name.clone(), w.compactor.clone(), stop.clone());
            compactors.spawn(compactor(c, name, wake, stop));
        }
    }
    let deadline = Instant::now() + config.duration;
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut loops = JoinSet::new();
    for (mut w, _) in writers {
        let segments = config.segments;
        // Any refusal ends the run: one writer per volume is never refused.
        loops.spawn(async move {
            let mut stats = Loop::default();
            while Instant::now() < deadline {
                w.commit(segments, &mut stats).await?;
            }
            Ok::<_, CliError>((w, stats))
        });
    }
    let mut all = Loop::default();
    let mut done = Vec::new();
    for r in loops.join_all().await {
        let (w, s) = r?;
        all.commits += s.commits;
        all.segments += s.segments;
        all.root_bytes += s.root_bytes;
        all.whole.extend(s.whole);
        all.place.extend(s.place);
        all.cas.extend(s.cas);
        done.push(w);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    stop.cancel();
    for r in keepers.join_all().await {
        r?;
    }
    let mut rounds = Vec::new();
    for r in compactors.join_all().await {
        rounds.extend(r?);
    }
    for w in &done {
        w.client.release_lease(&w.name, w.epoch).await?;
        if config.clean {
            admin.delete_volume(&w.name).await?;
        }
    }
    Ok(DirectoryResult {
        volumes: config.volumes,
        commits: all.commits,
        seconds,
        commits_per_s: all.commits as f64 / seconds,
        p50_ms: percentile_ms(&mut all.whole, 0.5),
        p99_ms: percentile_ms(&mut all.whole, 0.99),
        place_p50_ms: percentile_ms(&mut all.place, 0.5),
        cas_p50_ms: percentile_ms(&mut all.cas, 0.5),
        cas_p99_ms: percentile_ms(&mut all.cas, 0.99),
        compactor_rounds: rounds.len() as u64,
        compactor_round_p50_ms: percentile_ms(&mut rounds, 0.5),
        segments: all.segments,
        mean_root_bytes: if all.commits == 0 { 0.0 } else { all.root_bytes as f64 / all.commits as f64 },
        cpu_seconds: cpu,
    })
}
