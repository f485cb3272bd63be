//! A volume as the attaching machine serves it: the NBD backend behind
//! `meshdisk attach`.
//!
//! ```text
//! write ─► log append (wal) ─► cache slot, stripe dirty (cache, dirty)
//!                                   │ destager: coalesced, background; forced by FLUSH/FUA
//!                                   ▼
//!          fill missing sectors (old generation from peers, or zeroes)
//!          ─► encrypt + erasure-code as generation g+1 (StripeCodec)
//!          ─► put k+m shards with the lease epoch ─► commit in the stripe map
//!          ─► the directory erases generation g; the log is trimmed
//! read  ─► cache ─► else shards from peers (data first, hedged), verify,
//!          decode, decrypt ─► fill cache; a stripe never written is zeroes
//! ```
//!
//! One writer: [`Volume::open`] takes the volume's lease, replays the log
//! into the cache, and keeps the lease renewed; a writer taken over is
//! fenced (peers refuse its epoch) and fails writes with EIO.

pub mod cache;
mod destage;
mod dirty;
mod lease;
mod remote;
pub mod v2;
pub mod wal;

pub use remote::{RemoteError, RemoteFailure};

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::{Durability, PeerAddr, StripeRecord, VolumeRecord};
use crate::backend::{self, Backend, Extent, Features, ReadData, ReadPiece, ZeroFlags};
use crate::client::Client;
use crate::codec::key::VolumeKey;
use crate::codec::{SECTOR_SIZE, erasure::Geometry};
use crate::sys::uring::Uring;
use crate::sys::worker::{Runner, State, Worker, WorkerInfo};
use cache::{Cache, CacheError};
use dirty::Dirty;
use wal::{Entry, Wal, WalError};

/// Tuning of an attached volume.
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    /// Where the log, the cache and the lease note live.
    pub state_dir: PathBuf,
    /// Bytes of cache (whole stripes).
    pub cache_size: u64,
    /// Take the lease over from another holder.
    pub force: bool,
    /// Ask one more peer when a shard read takes longer than this.
    pub hedge: Duration,
    /// After a write quorum is stored, wait this long for the rest.
    pub put_grace: Duration,
    /// A shard put slower than this is sent to another peer.
    pub put_deadline: Duration,
    /// A dirty stripe not written for this long is destaged.
    pub destage_age: Duration,
    /// Stripes destaged at once.
    pub destage_parallel: usize,
    /// How long a write or flush waits for the peers before failing.
    pub io_timeout: Duration,
}

impl VolumeConfig {
    pub fn new(state_dir: PathBuf, cache_size: u64) -> Self {
        Self {
            state_dir,
            cache_size,
            force: false,
            hedge: Duration::from_millis(30),
            put_grace: Duration::from_millis(300),
            put_deadline: Duration::from_secs(2),
            destage_age: Duration::from_secs(2),
            destage_parallel: 32,
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a volume could not be attached or detached cleanly.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{0}")]
    Cluster(#[from] crate::client::ClientError),
    #[error("the key does not open volume {0}: use the key file or passphrase it was created with")]
    WrongKey(String),
    #[error("volume {volume}: {source}")]
    Geometry {
        volume: String,
        #[source]
        source: crate::codec::erasure::GeometryError,
    },
    #[error("volume {volume}: {source}")]
    Codec {
        volume: String,
        #[source]
        source: crate::codec::StripeError,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("io_uring: {0}")]
    Ring(#[source] io::Error),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Replaying the log, or the last flush before detaching.
    #[error(transparent)]
    Backend(#[from] backend::Error),
    #[error("the volume's background tasks did not stop")]
    Stuck,
}

/// The attached volume. Cheap to clone.
#[derive(Clone)]
pub struct Volume {
    inner: Arc<Inner>,
}

struct Inner {
    record: VolumeRecord,
    client: Client,
    config: VolumeConfig,
    geometry: Geometry,
    /// Bytes of plaintext in a stripe.
    stripe_bytes: usize,
    sectors: u64,
    epoch: AtomicU64,
    /// Why writes are refused (taken over, lease lost), once they are.
    fenced: std::sync::Mutex<Option<String>>,
    /// The last destage's failure (its kind and message), until one succeeds.
    destage_failure: std::sync::Mutex<Option<(u64, backend::ErrorKind, String)>>,
    wal: Wal,
    cache: Cache,
    codecs: remote::Codecs,
    /// The committed stripe map as this writer knows it.
    map: std::sync::Mutex<HashMap<u64, StripeRecord>>,
    locks: std::sync::Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    /// The newest LSN that zeroed each stripe whole.
    zeroed: std::sync::Mutex<HashMap<u64, u64>>,
    /// Unaligned writes are read-modify-write of whole sectors, one at a time.
    rmw: tokio::sync::Mutex<()>,
    dirty: std::sync::Mutex<Dirty>,
    /// Wakes the destager.
    wake: Notify,
    /// A destage finished (or failed): flushes and full caches look again.
    progress: Notify,
    /// Highest LSN a flush waits for.
    flush_target: AtomicU64,
    peers: std::sync::RwLock<Vec<PeerAddr>>,
    stop: CancellationToken,
    /// The destager, lease renewal and the peer watch; they stop with `stop`.
    workers: Runner,
}

fn eio(op: &'static str, offset: u64, length: u64, why: impl std::fmt::Display) -> backend::Error {
    backend::Error::io(op, offset, length, io::Error::other(why.to_string()))
}

impl Volume {
    /// Attaches volume `name`: checks the key, takes the write lease,
    /// loads the stripe map, opens the log and the cache under the state
    /// folder and replays the log. Background workers (destager, lease
    /// renewal, peer watch) run until [`Volume::close`].
    pub async fn open(
        client: Client,
        name: &str,
        key: &VolumeKey,
        config: VolumeConfig,
    ) -> Result<Self, VolumeError> {
        let record = client.volume(name).await?;
        let spec = &record.spec;
        key.verify(&spec.id, &crate::codec::KeyCheck(spec.key_check))
            .map_err(|_| VolumeError::WrongKey(name.into()))?;
        let geometry = Geometry::new(usize::from(spec.k), usize::from(spec.m), spec.shard_size as usize)
            .map_err(|source| VolumeError::Geometry { volume: name.into(), source })?;
        let codecs = remote::Codecs::new(key, geometry)
            .map_err(|source| VolumeError::Codec { volume: name.into(), source })?;
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|source| VolumeError::Io { path: config.state_dir.clone(), source })?;
        let lease = lease::acquire(&client, &config.state_dir, name, config.force).await?;
        let map: HashMap<u64, StripeRecord> = client.stripes(name).await?.into_iter().collect();
        let peers = client.up_peers().await?;
        if let Err(e) = client.refresh_hints().await {
            tracing::debug!("latency hints: {e}");
        }
        let ring = Uring::new(256).map_err(VolumeError::Ring)?;
        let (wal, records) = Wal::open(&ring, &config.state_dir.join("log"), key, &spec.id).await?;
        let stripe_bytes = geometry.stripe_size();
        let cache = Cache::open(
            &ring,
            &config.state_dir.join("cache"),
            key,
            &spec.id,
            stripe_bytes,
            config.cache_size,
        )?;
        let stop = CancellationToken::new();
        let inner = Arc::new(Inner {
            stripe_bytes,
            sectors: (stripe_bytes / SECTOR_SIZE) as u64,
            geometry,
            epoch: AtomicU64::new(lease.epoch),
            fenced: std::sync::Mutex::new(None),
            destage_failure: std::sync::Mutex::new(None),
            wal,
            cache,
            codecs,
            map: std::sync::Mutex::new(map),
            locks: Default::default(),
            zeroed: Default::default(),
            rmw: Default::default(),
            dirty: Default::default(),
            wake: Notify::new(),
            progress: Notify::new(),
            flush_target: AtomicU64::new(0),
            peers: std::sync::RwLock::new(peers),
            workers: Runner::new(stop.clone()),
            stop,
            record,
            client,
            config,
        });
        let workers = &inner.workers;
        workers.spawn_paced(destage::Destager::new(inner.clone()), destage::PACING);
        let fence = Arc::downgrade(&inner);
        let renewal = lease::Renewal::new(
            inner.client.clone(),
            name,
            lease.epoch,
            Duration::from_millis(lease.ttl_ms),
            Box::new(move |why| {
                if let Some(inner) = fence.upgrade() {
                    inner.fence(why);
                }
            }),
        );
        let pacing = renewal.pacing();
        workers.spawn_paced(renewal, pacing);
        workers.spawn(PeerWatch { inner: inner.clone() });
        let volume = Volume { inner };
        let replayed = records.len();
        for r in records {
            if let Err(e) = volume.inner.apply(r.lsn, &r.entry).await {
                // Not served: stop the workers (the lease is kept, so the
                // next attach from this folder resumes and replays again).
                volume.inner.stop.cancel();
                return Err(e.into());
            }
        }
        if replayed > 0 {
            tracing::info!("volume {name}: replayed {replayed} log records");
        }
        Ok(volume)
    }

    pub fn record(&self) -> &VolumeRecord {
        &self.inner.record
    }

    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Relaxed)
    }

    /// The volume's background workers and their state, for status.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.inner.workers.list()
    }

    /// Destages everything, closes the cache cleanly and releases the
    /// lease. On error the lease is kept (and its note), so the next
    /// attach from this folder resumes and replays the log.
    pub async fn close(self) -> Result<(), VolumeError> {
        let inner = &self.inner;
        let flushed = inner.flush_all(Durability::Remote).await;
        let workers = inner.workers.clone();
        inner.stop.cancel();
        inner.wake.notify_one();
        // A lease renewal in flight ends before the lease is released.
        let _ = tokio::time::timeout(Duration::from_secs(10), workers.join()).await;
        // The background tasks hold clones; wait until they let go.
        let mut inner = self.inner;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let owned = loop {
            match Arc::try_unwrap(inner) {
                Ok(i) => break i,
                Err(again) if tokio::time::Instant::now() < deadline => {
                    inner = again;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(_) => return Err(VolumeError::Stuck),
            }
        };
        flushed?;
        let name = owned.record.spec.name.clone();
        let epoch = owned.epoch.load(Ordering::Relaxed);
        owned.cache.close().await?;
        let last = owned.wal.last_lsn().await;
        owned.wal.trim(last).await?;
        lease::release(&owned.client, &owned.config.state_dir, &name, epoch).await
    }
}

/// Keeps the volume's list of peers that are up fresh, for reads and
/// destages: every 2 s, quietly keeping the old list when the directory
/// does not answer.
struct PeerWatch {
    inner: Arc<Inner>,
}

impl PeerWatch {
    const EVERY: Duration = Duration::from_secs(2);
}

impl Worker for PeerWatch {
    type Error = std::convert::Infallible;

    fn name(&self) -> String {
        format!("peer watch {}", self.inner.name())
    }

    fn initial_state(&self) -> State {
        // The list was just fetched.
        State::Idle
    }

    async fn work(&mut self, _stop: &CancellationToken) -> Result<State, Self::Error> {
        if let Ok(p) = self.inner.client.up_peers().await {
            *self.inner.peers.write().expect("not poisoned") = p;
        }
        Ok(State::Idle)
    }

    async fn wait_for_work(&mut self) -> State {
        tokio::time::sleep(Self::EVERY).await;
        State::Busy
    }
}

impl Inner {
    fn name(&self) -> &str {
        &self.record.spec.name
    }

    fn size(&self) -> u64 {
        self.record.spec.size
    }

    fn fence(&self, why: String) {
        let mut f = self.fenced.lock().expect("not poisoned");
        if f.is_none() {
            tracing::error!("volume {}: {why}; writes are refused from now on", self.name());
            *f = Some(why);
        }
        drop(f);
        self.progress.notify_waiters();
    }

    fn check_fenced(&self, op: &'static str, offset: u64, length: u64) -> backend::Result<()> {
        match &*self.fenced.lock().expect("not poisoned") {
            Some(why) => {
                Err(backend::Error::failed(backend::ErrorKind::Fenced, op, offset, length, why.clone()))
            }
            None => Ok(()),
        }
    }

    /// The peers have not taken the dirty data for too long (`what`):
    /// failed as the last destage failed (out of space, peers down, ...),
    /// or as an I/O error if none did.
    fn stalled(&self, op: &'static str, offset: u64, length: u64, what: String) -> backend::Error {
        match &*self.destage_failure.lock().expect("not poisoned") {
            Some((_, kind, why)) => backend::Error::failed(
                *kind,
                op,
                offset,
                length,
                format!("{what}; the last destage failed: {why}"),
            ),
            None => eio(op, offset, length, what),
        }
    }

    fn lock_of(&self, stripe: u64) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().expect("not poisoned").entry(stripe).or_default().clone()
    }

    fn record_of(&self, stripe: u64) -> Option<StripeRecord> {
        self.map.lock().expect("not poisoned").get(&stripe).cloned()
    }

    /// Appends `entry` to the log, registering a floor first so the log
    /// is never trimmed past it before its stripes are marked.
    async fn log(&self, entry: &Entry) -> Result<(u64, u64), WalError> {
        let floor = self.wal.last_lsn().await + 1;
        self.dirty.lock().expect("not poisoned").begin_append(floor);
        match self.wal.append(entry).await {
            Ok(lsn) => Ok((lsn, floor)),
            Err(e) => {
                self.dirty.lock().expect("not poisoned").end_append(floor);
                Err(e)
            }
        }
    }

    fn logged(&self, floor: u64) {
        self.dirty.lock().expect("not poisoned").end_append(floor);
    }

    /// Applies a logged record to the cache and the dirty set (writes and
    /// replay alike; applying twice changes nothing).
    async fn apply(&self, lsn: u64, entry: &Entry) -> backend::Result<()> {
        match entry {
            Entry::Write { sector, data } => {
                let mut done = 0;
                for (stripe, first, count) in self.pieces(*sector, (data.len() / SECTOR_SIZE) as u64) {
                    let bytes = &data[done * SECTOR_SIZE..(done + count) * SECTOR_SIZE];
                    done += count;
                    let lock = self.lock_of(stripe);
                    let _held = lock.lock().await;
                    self.cache_write(stripe, first, bytes, lsn).await?;
                }
            }
            Entry::Zero { sector, count } => {
                for (stripe, first, n) in self.pieces(*sector, *count) {
                    let lock = self.lock_of(stripe);
                    let _held = lock.lock().await;
                    if n as u64 == self.sectors {
                        // The whole stripe: no data, no shards. The
                        // destager drops its record at the directory.
                        self.cache.forget(stripe);
                        self.map.lock().expect("not poisoned").remove(&stripe);
                        self.zeroed.lock().expect("not poisoned").insert(stripe, lsn);
                        self.dirty.lock().expect("not poisoned").mark(stripe, lsn, self.sectors);
                        self.wake.notify_one();
                    } else {
                        let zeros = vec![0u8; n * SECTOR_SIZE];
                        self.cache_write(stripe, first, &zeros, lsn).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes into the cache, waiting for the destager while every slot
    /// is dirty. Called with the stripe's lock held.
    async fn cache_write(&self, stripe: u64, first: usize, data: &[u8], lsn: u64) -> backend::Result<()> {
        let offset = (stripe * self.sectors + first as u64) * SECTOR_SIZE as u64;
        let deadline = tokio::time::Instant::now() + self.config.io_timeout;
        loop {
            let progress = self.progress.notified();
            match self.cache.write(stripe, first, data, lsn).await {
                Ok(()) => break,
                Err(CacheError::Full) => {
                    self.check_fenced("write", offset, data.len() as u64)?;
                    self.wake.notify_one();
                    if tokio::time::timeout_at(deadline, progress).await.is_err() {
                        return Err(self.stalled(
                            "write",
                            offset,
                            data.len() as u64,
                            "the cache is full of data the peers have not taken for too long".into(),
                        ));
                    }
                }
                Err(e) => return Err(eio("write", offset, data.len() as u64, e)),
            }
        }
        let many = {
            let mut d = self.dirty.lock().expect("not poisoned");
            d.mark(stripe, lsn, (data.len() / SECTOR_SIZE) as u64);
            d.len() > self.cache.slots() as usize / 2
        };
        if many {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// (stripe, first sector in it, sectors) pieces of a sector range.
    fn pieces(&self, sector: u64, count: u64) -> Vec<(u64, usize, usize)> {
        let mut out = Vec::new();
        let (mut s, end) = (sector, sector + count);
        while s < end {
            let stripe = s / self.sectors;
            let first = s % self.sectors;
            let n = (self.sectors - first).min(end - s);
            out.push((stripe, first as usize, n as usize));
            s += n;
        }
        out
    }

    async fn trim_log(&self) -> Result<(), WalError> {
        let last = self.wal.last_lsn().await;
        let point = self.dirty.lock().expect("not poisoned").trim_point(last);
        self.wal.trim(point).await
    }

    /// Whole sectors `sector..sector + count` (within one request).
    async fn read_sectors(&self, sector: u64, count: u64) -> backend::Result<ReadData> {
        let mut out = ReadData::default();
        for (stripe, first, n) in self.pieces(sector, count) {
            out.push(self.read_piece(stripe, first, n).await?);
        }
        Ok(out)
    }

    async fn read_piece(&self, stripe: u64, first: usize, count: usize) -> backend::Result<ReadPiece> {
        let offset = (stripe * self.sectors + first as u64) * SECTOR_SIZE as u64;
        let len = (count * SECTOR_SIZE) as u64;
        let cached = |r: Result<Option<Vec<u8>>, CacheError>| r.map_err(|e| eio("read", offset, len, e));
        if let Some(d) = cached(self.cache.read(stripe, first, count).await)? {
            return Ok(ReadPiece::Data(Bytes::from(d)));
        }
        if self.cache.lookup(stripe).is_none() && self.record_of(stripe).is_none() {
            return Ok(ReadPiece::Zero(len as u32));
        }
        let lock = self.lock_of(stripe);
        let _held = lock.lock().await;
        if let Some(d) = cached(self.cache.read(stripe, first, count).await)? {
            return Ok(ReadPiece::Data(Bytes::from(d)));
        }
        let plain = self
            .stripe_plain(stripe)
            .await
            .map_err(|e| backend::Error::failed(e.kind(), "read", offset, len, e))?;
        if let Err(e) = self.cache.fill(stripe, &plain).await {
            tracing::warn!("caching stripe {stripe}: {e}");
        }
        if let Some(d) = cached(self.cache.read(stripe, first, count).await)? {
            return Ok(ReadPiece::Data(Bytes::from(d)));
        }
        // The cache could not take the stripe (every slot dirty): sectors
        // it holds are newer than the peers' copy.
        let slot = self.cache.lookup(stripe);
        let mut out = plain[first * SECTOR_SIZE..(first + count) * SECTOR_SIZE].to_vec();
        if let Some(slot) = slot {
            for i in 0..count {
                if slot.has(first + i)
                    && let Some(d) = cached(self.cache.read(stripe, first + i, 1).await)?
                {
                    out[i * SECTOR_SIZE..(i + 1) * SECTOR_SIZE].copy_from_slice(&d);
                }
            }
        }
        Ok(ReadPiece::Data(Bytes::from(out)))
    }

    /// The plaintext of a stripe as the peers hold it (zeroes if never
    /// written).
    async fn stripe_plain(&self, stripe: u64) -> Result<Vec<u8>, RemoteError> {
        match self.record_of(stripe) {
            None => Ok(vec![0; self.stripe_bytes]),
            Some(rec) => self.fetch(stripe, rec).await,
        }
    }

    /// Waits until every write that completed before the call is durable:
    /// the log synced and, with remote durability, every dirty stripe
    /// committed on the peers.
    async fn flush_all(&self, durability: Durability) -> backend::Result<()> {
        let last = self.wal.last_lsn().await;
        self.wal.sync(last).await.map_err(|e| eio("flush", 0, 0, e))?;
        if durability == Durability::Local {
            return Ok(());
        }
        self.flush_target.fetch_max(last, Ordering::AcqRel);
        let deadline = tokio::time::Instant::now() + self.config.io_timeout;
        loop {
            let progress = self.progress.notified();
            if self.dirty.lock().expect("not poisoned").covered(last) {
                return Ok(());
            }
            self.check_fenced("flush", 0, 0)?;
            self.wake.notify_one();
            if tokio::time::timeout_at(deadline, progress).await.is_err() {
                return Err(self.stalled(
                    "flush",
                    0,
                    0,
                    format!(
                        "the peers did not take the volume's dirty stripes within {:?}",
                        self.config.io_timeout
                    ),
                ));
            }
        }
    }
}

impl Backend for Volume {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    /// Everything, FAST_ZERO included: zeroing whole stripes only drops
    /// them, so it is fast; anything else is refused under FAST_ZERO.
    fn features(&self) -> Features {
        Features::all(false)
    }

    async fn read(&self, offset: u64, length: u32) -> backend::Result<ReadData> {
        let inner = &self.inner;
        let ss = SECTOR_SIZE as u64;
        let first = offset / ss;
        let end = (offset + u64::from(length)).div_ceil(ss);
        let data = inner.read_sectors(first, end - first).await?;
        if offset.is_multiple_of(ss) && u64::from(length).is_multiple_of(ss) {
            return Ok(data);
        }
        let skip = (offset - first * ss) as usize;
        let all = data.to_vec();
        Ok(ReadData::data(Bytes::copy_from_slice(&all[skip..skip + length as usize])))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> backend::Result<()> {
        let inner = &self.inner;
        let len = data.len() as u64;
        inner.check_fenced("write", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let ss = SECTOR_SIZE as u64;
        if !offset.is_multiple_of(ss) || !len.is_multiple_of(ss) {
            // Read-modify-write of the sectors the write touches.
            let _one = inner.rmw.lock().await;
            let first = offset / ss;
            let end = (offset + len).div_ceil(ss);
            let mut whole = inner.read_sectors(first, end - first).await?.to_vec();
            let skip = (offset - first * ss) as usize;
            whole[skip..skip + data.len()].copy_from_slice(&data);
            return self.write_sectors(first, Bytes::from(whole), fua, offset, len).await;
        }
        self.write_sectors(offset / ss, data, fua, offset, len).await
    }

    async fn flush(&self) -> backend::Result<()> {
        self.inner.flush_all(self.inner.record.spec.durability).await
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> backend::Result<()> {
        // Only whole stripes are dropped; a partial trim keeps the data
        // (a trimmed range may read back as anything).
        let stripe_len = self.inner.stripe_bytes as u64;
        let start = offset.div_ceil(stripe_len);
        let stop = offset + u64::from(length);
        // The volume's last stripe may be short: reaching the end covers it.
        let end = if stop == self.inner.size() { stop.div_ceil(stripe_len) } else { stop / stripe_len };
        if start < end {
            self.zero_sectors(
                start * self.inner.sectors,
                (end - start) * self.inner.sectors,
                fua,
                offset,
                length,
            )
            .await?;
        } else if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, length: u32, flags: ZeroFlags) -> backend::Result<()> {
        let ss = SECTOR_SIZE as u64;
        let len = u64::from(length);
        if length == 0 {
            return Ok(());
        }
        let stripe = self.inner.stripe_bytes as u64;
        if flags.fast && !(offset.is_multiple_of(stripe) && len.is_multiple_of(stripe)) {
            // Whole stripes are dropped (fast); part of one is zeroed in
            // the cache and destaged like a write (read-modify-write), and
            // the client asked to be told instead. Nothing is written.
            return Err(backend::Error::FastZeroUnsupported { offset });
        }
        if !offset.is_multiple_of(ss) || !len.is_multiple_of(ss) {
            return self.write(offset, Bytes::from(vec![0u8; length as usize]), flags.fua).await;
        }
        self.zero_sectors(offset / ss, len / ss, flags.fua, offset, length).await
    }

    async fn block_status(&self, offset: u64, length: u32) -> backend::Result<Vec<Extent>> {
        let inner = &self.inner;
        let stripe_len = inner.stripe_bytes as u64;
        let end = (offset + u64::from(length)).min(inner.size());
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let stripe = at / stripe_len;
            let next = ((stripe + 1) * stripe_len).min(end);
            let hole = inner.cache.lookup(stripe).is_none() && inner.record_of(stripe).is_none();
            backend::push_extent(&mut out, next - at, hole);
            at = next;
        }
        if out.is_empty() {
            out.push(Extent { length: u64::from(length), hole: false, zero: false });
        }
        Ok(out)
    }

    async fn cache(&self, offset: u64, length: u32) -> backend::Result<()> {
        self.read(offset, length).await.map(drop)
    }
}

impl Volume {
    async fn write_sectors(
        &self,
        sector: u64,
        data: Bytes,
        fua: bool,
        offset: u64,
        len: u64,
    ) -> backend::Result<()> {
        let inner = &self.inner;
        let max = wal::MAX_SECTORS as usize * SECTOR_SIZE;
        let mut at = 0;
        while at < data.len() {
            let n = (data.len() - at).min(max);
            let entry =
                Entry::Write { sector: sector + (at / SECTOR_SIZE) as u64, data: data[at..at + n].to_vec() };
            let (lsn, floor) = inner.log(&entry).await.map_err(|e| eio("write", offset, len, e))?;
            let applied = inner.apply(lsn, &entry).await;
            inner.logged(floor);
            applied?;
            at += n;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn zero_sectors(
        &self,
        sector: u64,
        count: u64,
        fua: bool,
        offset: u64,
        length: u32,
    ) -> backend::Result<()> {
        let inner = &self.inner;
        inner.check_fenced("write zeroes", offset, u64::from(length))?;
        let entry = Entry::Zero { sector, count };
        let (lsn, floor) =
            inner.log(&entry).await.map_err(|e| eio("write zeroes", offset, u64::from(length), e))?;
        let applied = inner.apply(lsn, &entry).await;
        inner.logged(floor);
        applied?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }
}
