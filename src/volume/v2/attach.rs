//! Attaching and detaching a volume.
//!
//! ```text
//! attach  key checked ─► the folder locked (the local log's flock)
//!         ─► lease (resumes the folder's epoch after a crash)
//!         ─► root from the directory: MAC checked, not older than the
//!            folder has seen (freshness note), noted
//!         ─► map: checkpoint index + summaries of the segments since
//!         ─► the local log: replayed if written against this root (or
//!            by this folder's own epoch), refused otherwise unless
//!            --discard-local
//!         ─► sequences above everything seen; workers: commit, lease
//! detach  flush within a deadline ─► lease released; or, if the peers or
//!         the directory are out of reach, exit naming the writes only in
//!         the local log (the next attach from this folder sends them)
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::blocks::BlockCache;
use super::cache::MapCache;
use super::checkpoint::{CheckpointIndex, IndexHead};
use super::commit::{Committer, PACING};
use super::compactor::{self, Compactor};
use super::io::{READ_AHEAD_FETCHES, READ_AHEAD_MAX, READ_AHEAD_MIN};
use super::keeper::Keeper;
use super::layout::{self, Trailer};
use super::lineage::Lineage;
use super::local::LocalIndex;
use super::log::{Base, LocalLog, LogConfig, NewRecord, RecordHead};
use super::readahead::ReadAhead;
use super::remote::SegmentIo;
use super::root::{Freshness, RootKey, RootRecord, SegmentRef};
use super::summary::Summary;
use super::volume::{Config, Inner, LOCK_STRIPES, Volume};
use crate::api::Durability;
use crate::backend::{self, Backend, Extent, Features, HealthExtent, ReadData, ZeroFlags};
use crate::client::Client;
use crate::codec::key::VolumeKey;
use crate::codec::segment::BLOCK_SIZE;
use crate::codec::sequence::{SegmentId, Sequence, Sequencer};
use crate::codec::xts::SectorCipher;
use crate::sys::durable;
use crate::sys::uring::Uring;
use crate::sys::worker::Runner;
use crate::volume::VolumeError;
use crate::volume::lease;

/// The freshness note's file name in the state folder.
const FRESHNESS: &str = "freshness";

/// Why a volume could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Log(#[from] super::log::LogError),
    #[error(transparent)]
    Cache(#[from] super::blocks::CacheError),
    #[error("volume {volume}: {why}")]
    Root { volume: String, why: String },
    #[error(
        "{folder} holds {writes} writes not yet flushed to volume {volume}, made against its commit {base}, but the volume has been attached elsewhere since (it is now at commit {now}): attach with --discard-local to drop them, or attach from another folder"
    )]
    Diverged { folder: PathBuf, volume: String, writes: usize, base: String, now: String },
    #[error("volume {volume}: the segments since the checkpoint cannot be read: {why}")]
    Map { volume: String, why: String },
}

fn freshness_path(dir: &Path) -> PathBuf {
    dir.join(FRESHNESS)
}

/// The highest (epoch, commit) this folder has seen of `volume`.
fn read_freshness(dir: &Path, volume: &[u8; 16]) -> Option<Freshness> {
    let text = std::fs::read_to_string(freshness_path(dir)).ok()?;
    let mut f = text.split_whitespace();
    let (id, epoch, commit) = (f.next()?, f.next()?.parse().ok()?, f.next()?.parse().ok()?);
    (id == hex::encode(volume)).then(|| Freshness::new(epoch, commit))
}

impl Inner {
    /// Notes `root` as the newest this folder has seen, durably, before
    /// anything from it is served.
    pub(super) fn remember(&self, root: &RootRecord) -> std::io::Result<()> {
        let text = format!("{} {} {}\n", hex::encode(root.volume_id), root.epoch, root.commit);
        durable::replace(&freshness_path(&self.config.state_dir), text.as_bytes(), 0o600)
    }

    /// The summary of a committed segment, read from its trailing blocks.
    pub(super) async fn read_summary(&self, seg: SegmentRef) -> Result<Summary, String> {
        let located = self.locate(seg.id, seg.root, false).await?;
        let header = match self.io.header(&located).await {
            Ok(h) => h,
            // Its holders may have moved or have new addresses: ask again.
            Err(_) => {
                let again = self.locate(seg.id, seg.root, true).await?;
                self.io.header(&again).await.map_err(|e| e.to_string())?
            }
        };
        let g = header.geometry;
        let last = (g.data_blocks() - 1) as u32;
        let mut t = self.read_slots(seg.id, seg.root, last, last + 1).await.map_err(|e| e.to_string())?;
        let cipher = self.lineage.by_segment(seg.id);
        layout::open_metadata(cipher, seg.id, last, &mut t);
        let trailer = Trailer::decode(&t, seg.id, g).map_err(|e| e.to_string())?;
        let mut s =
            self.read_slots(seg.id, seg.root, trailer.summary_slot, last).await.map_err(|e| e.to_string())?;
        layout::open_metadata(cipher, seg.id, trailer.summary_slot, &mut s);
        layout::decode_summary(&trailer, &s).map_err(|e| e.to_string())
    }
}

impl Volume {
    /// Attaches volume `name` (see the module doc).
    pub async fn open(
        client: Client,
        name: &str,
        key: &VolumeKey,
        config: Config,
    ) -> Result<Self, AttachError> {
        let record = client.volume(name).await.map_err(VolumeError::from)?;
        let spec = record.spec.clone();
        key.verify(&spec.id, &crate::codec::KeyCheck(spec.key_check))
            .map_err(|_| VolumeError::WrongKey(name.into()))?;
        let dir = config.state_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| VolumeError::Io { path: dir.clone(), source })?;
        let ring = Uring::new(256).map_err(VolumeError::Ring)?;
        let log_config = LogConfig {
            file_bytes: (config.log_size / 16).clamp(1 << 20, 256 << 20),
            max_bytes: config.log_size,
        };
        // The folder's lock comes first: two attaches of one folder never
        // reach the lease.
        let (log, replay) = Box::pin(LocalLog::open(&dir, key, &spec.id, &ring, log_config)).await?;
        let cache =
            BlockCache::open(&dir.join("blocks"), key, &spec.id, &ring, config.cache_size.max(1 << 20))?;
        // This folder's last writes were made under epoch `writer` (a
        // sequence carries its writer's epoch); if that is inside the
        // unbroken run of grants to this folder (the lease note keeps it),
        // nobody else held the volume since, so those writes are still the
        // newest anybody saw.
        let asked = tokio::time::Instant::now();
        let snapshot = config.snapshot.clone();
        if let Some(snap) = &snapshot {
            // A snapshot is read: no lease, and no log of writes to replay.
            if !replay.records.is_empty() {
                return Err(AttachError::Root {
                    volume: name.into(),
                    why: format!(
                        "{} holds the local log of a writable attach; serve snapshot {snap} from another folder (--cache-dir)",
                        dir.display()
                    ),
                });
            }
        }
        let granted = match &snapshot {
            None => lease::acquire(&client, &dir, name, config.force).await?,
            Some(_) => lease::Granted::none(),
        };
        let granted_at = tokio::time::Instant::now();
        let (lease, run_from) = (granted.lease, granted.run_from);
        let writer = replay.highest_sequence.epoch();
        let undisturbed = writer > 0 && writer >= run_from;
        // Refused from here on: the lease goes back (the note stays, so
        // the run goes on if nobody else takes the volume first).
        let give_back = |e: AttachError| {
            let (client, name, epoch) = (client.clone(), name.to_string(), lease.epoch);
            let read_only = snapshot.is_some();
            async move {
                if read_only {
                    return e;
                }
                if let Err(why) = lease::give_back(&client, &name, epoch).await {
                    tracing::warn!("volume {name}: giving the lease back after a refused attach: {why}");
                }
                e
            }
        };
        let started = async {
            // Epochs only grow: a grant at or below one this folder already
            // saw (its lease note, its freshness note, its log's writes) is
            // from a directory restored from an older copy, which would
            // hand out this folder's epochs, sequences and segment ids
            // again (XTS tweaks reused, forks mixed).
            let freshness = read_freshness(&dir, &spec.id);
            let seen = [granted.noted, freshness.map(|f| f.epoch()), Some(writer)]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(0);
            if snapshot.is_none() && lease.epoch <= seen {
                return Err(AttachError::Root {
                    volume: name.into(),
                    why: format!(
                        "the directory granted epoch {}, but {} already saw epoch {seen}: the directory's state went back in time (restored from an older copy?). Restore its newest state, or attach from an empty folder to accept the directory's state as it is (this folder's unflushed writes are then not sent)",
                        lease.epoch,
                        dir.display()
                    ),
                });
            }
            // A clone encrypts and seals under its own key (lineage.rs).
            let (lineage, own) = Lineage::new(key, &spec)
                .map_err(|e| AttachError::Root { volume: name.into(), why: e.to_string() })?;
            let root_key = RootKey::derive(&own);
            let root_state = match &snapshot {
                None => client.root(name).await.map_err(VolumeError::from)?,
                Some(snap) => Some(client.snapshot_root(name, snap).await.map_err(VolumeError::from)?),
            };
            let root = match root_state {
                None => RootRecord::empty(spec.id),
                Some(state) => RootRecord::open(&state.sealed, &root_key, &spec.id)
                    .map_err(|e| AttachError::Root { volume: name.into(), why: e.to_string() })?,
            };
            // A snapshot is an older root by nature: only the MAC vouches.
            if let Some(seen) = freshness.filter(|_| snapshot.is_none()) {
                seen.check(&root)
                    .map_err(|e| AttachError::Root { volume: name.into(), why: e.to_string() })?;
            }
            let blocks = spec.size / BLOCK_SIZE as u64;
            let blocks_per_shard = (spec.shard_size as usize / BLOCK_SIZE).max(1) as u32;
            // A snapshot's reader allocates nothing: its sequencers start at
            // the root's own epoch.
            let epoch = if snapshot.is_some() { root.highest_sequence.epoch().max(1) } else { lease.epoch };
            let seq_floor = root.highest_sequence.max(replay.highest_sequence);
            let seg_floor = root.highest_segment.max(replay.highest_segment);
            let sequences = Sequencer::new(epoch, seq_floor)
                .map_err(|e| AttachError::Root { volume: name.into(), why: e.to_string() })?;
            let segment_ids = Sequencer::new(epoch, seg_floor)
                .map_err(|e| AttachError::Root { volume: name.into(), why: e.to_string() })?;
            let stop = CancellationToken::new();
            let inner = Arc::new(Inner {
                name: name.into(),
                client: client.clone(),
                cipher: SectorCipher::new(&own),
                lineage,
                root_key,
                blocks,
                k: usize::from(spec.k),
                m: usize::from(spec.m),
                blocks_per_shard,
                epoch: AtomicU64::new(epoch),
                suspended: watch::channel(false).0,
                lease_doubt: Notify::new(),
                sequences: Mutex::new(sequences),
                segment_ids: Mutex::new(segment_ids),
                local: Mutex::new(LocalIndex::new(blocks)),
                map: Mutex::new(MapCache::new(CheckpointIndex::empty(blocks), config.map_cache)),
                root: Mutex::new(root.clone()),
                checkpoint_parts: Default::default(),
                recorded: Mutex::new(None),
                holders: Default::default(),
                segment_health: Default::default(),
                peers: Default::default(),
                placed_ahead: Default::default(),
                log: log.clone(),
                cache,
                io: SegmentIo::new(client.clone(), config.timing.clone()),
                locks: (0..LOCK_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
                readahead: Mutex::new(ReadAhead::new(blocks, READ_AHEAD_MIN, READ_AHEAD_MAX)),
                ahead: super::ahead::FetchedAhead::new(super::ahead::AHEAD_MAX_BYTES),
                prefetches: Arc::new(tokio::sync::Semaphore::new(READ_AHEAD_FETCHES)),
                prefetching: Mutex::new(Vec::new()),
                commit_turn: tokio::sync::Mutex::new(()),
                committed: watch::channel(Sequence::ZERO).0,
                commit_failure: Mutex::new(None),
                reserved: Mutex::new((SegmentId::from_raw(0), Sequence::ZERO)),
                wake: Notify::new(),
                compact_wake: Notify::new(),
                space: Mutex::new(Default::default()),
                compacted: Notify::new(),
                traffic: Default::default(),
                urgent: AtomicBool::new(false),
                fenced: Mutex::new(None),
                workers: Runner::new(stop.clone()),
                stop,
                record,
                config,
            });
            let fail = |e: AttachError| {
                inner.stop.cancel();
                e
            };
            if snapshot.is_some() {
                Box::pin(inner.load_map(&root)).await.map_err(fail)?;
                return Ok(Volume { inner });
            }
            inner
                .remember(&root)
                .map_err(|source| fail(VolumeError::Io { path: freshness_path(&dir), source }.into()))?;
            Box::pin(inner.load_map(&root)).await.map_err(fail)?;
            Box::pin(inner.replay(&root, &replay, undisturbed, run_from)).await.map_err(fail)?;
            inner.committed.send_replace(replay.committed.max(Sequence::ZERO));
            // Noted before anything is written: the log's records after this are
            // against this root.
            let base = Base {
                epoch: root.epoch,
                commit: root.commit,
                segment_floor: seg_floor,
                sequence_floor: seq_floor,
            };
            log.append(&[NewRecord::Base(base)]).await.map_err(|e| fail(e.into()))?;
            let workers = &inner.workers;
            workers.spawn_paced(Committer { inner: inner.clone(), since: None, commits: 0 }, PACING);
            workers.spawn_paced(Compactor::new(inner.clone()), compactor::PACING);
            let keeper = Keeper::new(inner.clone(), Duration::from_millis(lease.ttl_ms), asked);
            let pacing = keeper.pacing();
            workers.spawn_paced(keeper, pacing);
            let queued = inner.local.lock().expect("local").queued();
            if queued > 0 {
                tracing::info!("volume {name}: {queued} unflushed writes replayed from {}", dir.display());
                inner.wake.notify_one();
            }
            if lease.took_over {
                // The holder taken over renewed last before this grant, so
                // it stops serving (suspends, then is refused) within 0.8
                // of a TTL of it: nothing is served here until then.
                let until = granted_at + Duration::from_millis(lease.ttl_ms);
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                tracing::info!(
                    "volume {name}: taken over from a live holder; serving in {:.1} s, once it must have stopped",
                    left.as_secs_f64()
                );
                tokio::time::sleep_until(until).await;
            }
            Ok::<Volume, AttachError>(Volume { inner })
        };
        match Box::pin(started).await {
            Ok(v) => Ok(v),
            Err(e) => Err(give_back(e).await),
        }
    }

    /// Flushes within `deadline`, then stops the workers (waiting at most
    /// [`STOP_WAIT`](crate::sys::worker::STOP_WAIT) for them) and releases
    /// the lease (one directory call, within its timeout). If the flush does not finish, the lease and the log are kept
    /// (the next attach from this folder sends the writes) and the error
    /// says how many writes are only local.
    pub async fn close(self, deadline: Duration) -> Result<(), VolumeError> {
        let inner = self.inner.clone();
        if inner.config.snapshot.is_some() {
            // Read-only: nothing to flush, no lease to give back.
            inner.stop.cancel();
            inner.workers.join_within(crate::sys::worker::STOP_WAIT).await;
            return Ok(());
        }
        let flushed = tokio::time::timeout(deadline, inner.flush_remote()).await;
        inner.stop.cancel();
        inner.wake.notify_one();
        // Bounded: a commit in flight may wait on peers that are gone; the
        // log keeps what it was sending.
        inner.workers.join_within(crate::sys::worker::STOP_WAIT).await;
        let traffic = inner.traffic.report(inner.client.network().await);
        tracing::info!("volume {}: this attach: {}", inner.name, traffic.summary());
        let left = inner.local.lock().expect("local").queued();
        let why = match flushed {
            Ok(Ok(())) if left == 0 => None,
            Ok(Ok(())) => Some(format!("{left} writes arrived during the detach")),
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("the flush did not finish within {} s", deadline.as_secs())),
        };
        if let Some(why) = why {
            return Err(VolumeError::Backend(backend::Error::failed(
                backend::ErrorKind::Unavailable,
                "detach",
                0,
                0,
                if inner.fenced.lock().expect("fenced").is_some() {
                    format!(
                        "{why}; {left} writes are only in the local log in {}, and another machine took the volume: the next attach from this folder refuses them (--discard-local drops them)",
                        inner.config.state_dir.display()
                    )
                } else {
                    format!(
                        "{why}; {left} writes are only in the local log in {}: the next attach from this folder sends them",
                        inner.config.state_dir.display()
                    )
                },
            )));
        }
        // The records saying all of it is committed reach the disk before
        // the lease goes: after a power cut the next attach from here
        // finds its log matching the root, not writes it must refuse.
        inner.log.sync().await.map_err(|e| {
            VolumeError::Backend(backend::Error::failed(
                backend::ErrorKind::Io,
                "detach",
                0,
                0,
                e.to_string(),
            ))
        })?;
        let epoch = inner.epoch.load(std::sync::atomic::Ordering::Relaxed);
        lease::release(&inner.client, &inner.config.state_dir, &inner.name, epoch).await?;
        Ok(())
    }
}

impl Inner {
    /// The committed map: the checkpoint's index (pages fetched when
    /// needed) and the summaries of the segments since.
    async fn load_map(&self, root: &RootRecord) -> Result<(), AttachError> {
        let bad = |why: String| AttachError::Map { volume: self.name.clone(), why };
        let index = match root.checkpoint {
            None => CheckpointIndex::empty(self.blocks),
            Some(c) => {
                let head = self
                    .read_metadata(c.segment.id, c.segment.root, c.first_slot, c.blocks)
                    .await
                    .map_err(|e| bad(format!("the checkpoint: {e}")))?;
                let head = IndexHead::decode(&head).map_err(|e| bad(e.to_string()))?;
                // Each continuation whole, padding included: `assemble`
                // checks the padding is zeroes.
                let mut parts = Vec::new();
                for x in &head.continuations {
                    let bytes = self
                        .read_metadata(x.segment.id, x.segment.root, x.first_slot, x.blocks)
                        .await
                        .map_err(|e| bad(format!("the checkpoint's index: {e}")))?;
                    parts.push(bytes);
                }
                let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                *self.checkpoint_parts.lock().expect("parts") = std::iter::once(c.segment.id)
                    .chain(head.continuations.iter().map(|x| x.segment.id))
                    .collect();
                head.assemble(&refs).map_err(|e| bad(e.to_string()))?
            }
        };
        *self.map.lock().expect("map") = MapCache::new(index, self.config.map_cache);
        // Where the segments since are, in batches.
        for chunk in root.since.chunks(crate::api::MAX_SEGMENTS_PER_CALL) {
            let ids: Vec<SegmentId> = chunk.iter().map(|s| s.id).collect();
            let records =
                self.client.segment_records(&self.name, ids).await.map_err(|e| bad(e.to_string()))?;
            let mut holders = self.holders.lock().expect("holders");
            for (s, r) in chunk.iter().zip(records) {
                let r = r.ok_or_else(|| bad(format!("the directory has no record of segment {}", s.id)))?;
                holders.insert(s.id, r.peers);
            }
        }
        // Their summaries, a few at a time.
        let mut summaries = Vec::with_capacity(root.since.len());
        for chunk in root.since.chunks(8) {
            let mut reads = Vec::new();
            for s in chunk {
                reads.push(self.read_summary(*s));
            }
            for (s, r) in chunk.iter().zip(join_all(reads).await) {
                summaries.push((r.map_err(|e| bad(format!("segment {}: {e}", s.id)))?, s.root));
            }
        }
        let mut map = self.map.lock().expect("map");
        for (s, root) in summaries {
            map.apply_summary(&s, root).map_err(|e| bad(e.to_string()))?;
        }
        Ok(())
    }

    /// Replays the local log (see the module doc).
    async fn replay(
        &self,
        root: &RootRecord,
        replay: &super::log::Replay,
        undisturbed: bool,
        run_from: u64,
    ) -> Result<(), AttachError> {
        let pending = replay
            .records
            .iter()
            .filter(|(_, r)| {
                matches!(r, RecordHead::Write { .. } | RecordHead::Zero { .. })
                    && r.highest_sequence() > replay.committed
            })
            .count();
        let base = replay.base.map(|(_, b)| b);
        // The log goes on only if it is the volume's latest line: nobody
        // else held the lease since (even one who wrote nothing served a
        // state without these writes: bringing them back later would be
        // time travel), and the root is the one it was written on, or one
        // this folder's own epoch made since, or one made within this
        // folder's unbroken run of grants (its own commit, whose Base the
        // log lost in a crash before it was synced).
        let ours = (undisturbed || pending == 0)
            && base.is_some_and(|b| {
                (b.epoch, b.commit) == (root.epoch, root.commit)
                    || (b.epoch == root.epoch && root.commit >= b.commit)
                    || (undisturbed
                        && root.epoch >= run_from
                        && (b.epoch, b.commit) <= (root.epoch, root.commit))
            });
        if pending > 0 && !ours && !self.config.discard_local {
            return Err(AttachError::Diverged {
                folder: self.config.state_dir.clone(),
                volume: self.name.clone(),
                writes: pending,
                base: base.map_or("none".into(), |b| format!("{}.{}", b.epoch, b.commit)),
                now: format!("{}.{}", root.epoch, root.commit),
            });
        }
        if !ours && !replay.records.is_empty() {
            // Another machine wrote the volume since this log was made:
            // none of it is served or committed (a copy of an unflushed
            // write from there would beat the newer root on reads), and it
            // goes for good, so no later replay brings it back.
            if pending > 0 {
                tracing::warn!(
                    "volume {}: dropping {pending} unflushed writes of {} made against an older root (--discard-local)",
                    self.name,
                    self.config.state_dir.display()
                );
            }
            let base = Base {
                epoch: root.epoch,
                commit: root.commit,
                segment_floor: root.highest_segment.max(replay.highest_segment),
                sequence_floor: root.highest_sequence.max(replay.highest_sequence),
            };
            self.log.start_over(base).await.map_err(AttachError::Log)?;
            return Ok(());
        }
        let mut local = self.local.lock().expect("local");
        for (pos, r) in &replay.records {
            // The log is this folder's own line of commits: its committed
            // records are copies of what a root holds (a newer version in
            // the map wins on reads), its unflushed ones are queued again.
            let queue = r.highest_sequence() > replay.committed;
            let done = match *r {
                RecordHead::Write { address, blocks, sequence } => {
                    local.begin(sequence);
                    local.insert_write(*pos, address, u64::from(blocks), sequence, !queue)
                }
                RecordHead::Zero { address, blocks, sequence } => {
                    local.begin(sequence);
                    local.insert_zero(address, blocks, sequence, !queue)
                }
                _ => Ok(()),
            };
            done.map_err(|e| AttachError::Root {
                volume: self.name.clone(),
                why: format!("local log: {e}"),
            })?;
        }
        Ok(())
    }

    /// Waits until every write that completed before the call is in a
    /// committed root.
    pub(super) async fn flush_remote(&self) -> backend::Result<()> {
        let target = self.sequences.lock().expect("sequences").last();
        let mut committed = self.committed.subscribe();
        let deadline = tokio::time::Instant::now() + self.config.io_timeout;
        loop {
            // Already committed: done, even if the volume was fenced since.
            if *committed.borrow_and_update() >= target {
                return Ok(());
            }
            self.check_fenced("flush", 0, 0)?;
            self.urgent.store(true, std::sync::atomic::Ordering::Relaxed);
            self.wake.notify_one();
            let failure = self.commit_failure.lock().expect("failure").clone();
            // The peers are full: say so now (ENOSPC), not after the
            // timeout; nothing but freeing space or adding peers helps.
            if let Some((backend::ErrorKind::Full, why)) = &failure {
                let why = format!("the last commit failed: {why}");
                return Err(backend::Error::failed(backend::ErrorKind::Full, "flush", 0, 0, why));
            }
            match tokio::time::timeout_at(deadline, committed.changed()).await {
                Ok(_) => {}
                Err(_) => {
                    // The last commit's failure says why (ENOSPC when the
                    // peers are full); none: it is just slow.
                    let (kind, why) = failure.map_or(
                        (backend::ErrorKind::Unavailable, "the commit did not finish in time".to_string()),
                        |(k, w)| (k, format!("the last commit failed: {w}")),
                    );
                    return Err(backend::Error::failed(kind, "flush", 0, 0, why));
                }
            }
        }
    }
}

pub(super) use crate::sys::join_all;

impl Backend for Volume {
    fn size(&self) -> u64 {
        self.inner.blocks * BLOCK_SIZE as u64
    }

    fn features(&self) -> Features {
        // Every range's redundancy: the `meshdisk:health` context.
        Features { health: true, ..Features::all(self.inner.config.snapshot.is_some()) }
    }

    async fn read(&self, offset: u64, length: u32) -> backend::Result<ReadData> {
        self.inner.traffic.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if length > 0 {
            let first = offset / BLOCK_SIZE as u64;
            let n = (offset + u64::from(length)).div_ceil(BLOCK_SIZE as u64) - first;
            let ahead = self.inner.readahead.lock().expect("readahead").on_read(first, n);
            if let Some(range) = ahead {
                Inner::fetch_ahead(&self.inner, range);
            }
        }
        // Boxed: the read path's state is large, the caller's stack small.
        Box::pin(self.inner.read(offset, length)).await
    }

    async fn write(&self, offset: u64, data: bytes::Bytes, fua: bool) -> backend::Result<()> {
        self.inner.traffic.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::pin(self.inner.write("write", offset, &data)).await?;
        if fua { self.flush().await } else { Ok(()) }
    }

    async fn flush(&self) -> backend::Result<()> {
        if self.inner.config.snapshot.is_some() {
            // A snapshot is never written: nothing to make durable.
            return Ok(());
        }
        match self.inner.durability() {
            Durability::Remote => Box::pin(self.inner.flush_remote()).await,
            Durability::Local => {
                // A fenced attach's writes never reach the volume (the next
                // attach from this folder refuses them): no flush says so.
                self.inner.check_fenced("flush", 0, 0)?;
                self.inner
                    .log
                    .sync()
                    .await
                    .map_err(|e| backend::Error::failed(backend::ErrorKind::Io, "flush", 0, 0, e.to_string()))
            }
        }
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> backend::Result<()> {
        self.inner.traffic.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::pin(self.inner.zero("trim", offset, u64::from(length))).await?;
        if fua { self.flush().await } else { Ok(()) }
    }

    async fn write_zeroes(&self, offset: u64, length: u32, flags: ZeroFlags) -> backend::Result<()> {
        self.inner.traffic.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Whole blocks are one zero entry; part of a block is a
        // read-modify-write, slower than a write: FAST_ZERO refuses it.
        let block = BLOCK_SIZE as u64;
        if flags.fast && !(offset.is_multiple_of(block) && u64::from(length).is_multiple_of(block)) {
            return Err(backend::Error::FastZeroUnsupported { offset });
        }
        Box::pin(self.inner.zero("write zeroes", offset, u64::from(length))).await?;
        if flags.fua { self.flush().await } else { Ok(()) }
    }

    async fn block_status(&self, offset: u64, length: u32) -> backend::Result<Vec<Extent>> {
        Box::pin(self.inner.holes(offset, length)).await
    }

    async fn cache(&self, _offset: u64, _length: u32) -> backend::Result<()> {
        Ok(())
    }

    async fn health_status(&self, offset: u64, length: u32) -> backend::Result<Vec<HealthExtent>> {
        Box::pin(self.inner.health_map(offset, length)).await
    }
}
