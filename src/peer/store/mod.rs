//! The peer's shard store: segment shards ([`crate::codec::segment`])
//! kept on this machine's disk for others.
//!
//! Layout under the store's folder (drawn in docs/formats.md):
//!
//! ```text
//! data/00000001.dat       shards appended back to back, each exactly as
//! data/00000002.dat       sent (header + payload); a new data file starts
//! ...                     when one passes DATA_FILE_LIMIT
//! index.redb              shard key → (data file, offset, length, the
//!                         shard's root and outboard); per volume the
//!                         newest fencing epoch; bytes used; the scrub's
//!                         progress and the bad shards not yet reported
//! ```
//!
//! **Durability, written once** ([`ShardStore::put`] and the group commit
//! behind it): verify the shard (its payload hashes to its header's own
//! root), compute its outboard, append it to the current data file,
//! `fdatasync` the file, then commit the index entry (redb commits are
//! durable); only then is the put acknowledged. Puts that arrive together
//! share one `fdatasync` and one index commit (group commit): a put claims
//! its range of the data file, a big shard is written there through the
//! io_uring driver, and the put is queued; one committer thread at a time
//! writes the queued small shards (a FLUSH's, on the thread that goes on to
//! sync them: no hand-off to the ring and back on the QD1 path), syncs
//! every data file the queued entries touch, commits them all in one redb
//! transaction, and answers each. A crash before the index commit leaves
//! unindexed bytes in a data file and nothing else: no shard in it was
//! acknowledged.
//!
//! **Deleting** removes the index entry and punches a hole over the shard's
//! bytes, so the space returns to the filesystem at once.
//!
//! **Trust**: every read checks what it returns against the root kept in
//! the index entry ([`ShardStore::get_blocks`] reads only the blocks asked
//! for and proves them with the outboard); a shard that fails is reported
//! as corrupt, never returned, and recorded as a fault for the directory
//! ([`scrub`](self::scrub)'s module docs). A store that hits an I/O error on a write or
//! sync is poisoned: every later call fails, because what reached the disk
//! is no longer known.
//!
//! **Fencing**: a put carries the volume's fencing epoch; the store keeps
//! the newest epoch it has seen per volume and refuses older ones, so a
//! writer whose volume lease was taken over cannot write any more.

mod copies;
mod index;
mod scrub;
mod shards;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::Mutex;

use crate::codec::key::VOLUME_ID_LEN;
use crate::codec::segment::{SegmentError, SegmentShardKey};
use crate::sys::durable;
use crate::sys::uring::{RegisteredFile, Uring};
use index::{Location, SegmentEntry, SegmentIndexKey};
pub use scrub::{Checked, Fault, ScrubState};

/// A data file is closed and a new one started once it reaches this size.
pub const DATA_FILE_LIMIT: u64 = 1 << 30;

/// Shards up to this size (a FLUSH's short segments) are written by the
/// committer itself, on the thread that then syncs and indexes them;
/// bigger ones are written through the ring by their put while the
/// committer syncs and indexes others.
const COMMITTER_WRITES_BYTES: usize = 64 << 10;

/// Segment shards: key → location ‖ shard root ‖ outboard.
const SEGMENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("segments");
const EPOCHS: TableDefinition<&[u8], u64> = TableDefinition::new("epochs");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("shard refused: {0}")]
    BadShard(#[from] SegmentError),
    #[error("store is full: {used} of {capacity} bytes used, this shard needs {need} more")]
    Full { used: u64, capacity: u64, need: u64 },
    #[error(
        "fenced: epoch {got} is older than epoch {newest} already seen for this volume (another writer took the volume over)"
    )]
    Fenced { got: u64, newest: u64 },
    #[error("no such shard {0:?}")]
    NotFound(SegmentShardKey),
    #[error("stored shard {key:?} is corrupt: {source}")]
    Corrupt { key: SegmentShardKey, source: SegmentError },
    #[error("the index points shard {key:?} at the bytes of {found:?}")]
    Misplaced { key: SegmentShardKey, found: SegmentShardKey },
    /// Reading a stored shard's bytes failed (a bad sector, a lost data
    /// file): as bad as a corrupt copy, and as good a reason to read
    /// around it. A failed read does not poison the store (it wrote
    /// nothing); the shard is recorded as a fault instead.
    #[error("stored shard {key:?} is unreadable: {message}")]
    Unreadable { key: SegmentShardKey, message: String },
    #[error(
        "store at {path} is poisoned by an earlier I/O error ({first}); it serves nothing until restarted and checked"
    )]
    Poisoned { path: PathBuf, first: String },
    #[error("store I/O at {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("blocks {first}..{first}+{count} are not a non-empty range of the shard's {blocks} blocks")]
    BlockRange { first: u32, count: u32, blocks: u32 },
}

/// The shard store. Cheap to clone.
#[derive(Clone)]
pub struct ShardStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    ring: Uring,
    db: Database,
    capacity: u64,
    data_file_limit: u64,
    /// Appends are serialised (one data file tail).
    tail: Mutex<Tail>,
    /// Open data files for reads and hole punching.
    data_files: std::sync::Mutex<HashMap<u32, Arc<RegisteredFile>>>,
    /// Set by the first failed write, sync or commit: the store is poisoned.
    first_error: std::sync::Mutex<Option<String>>,
    /// Bytes counted against the capacity: shards stored plus puts admitted
    /// and not yet committed. Admission (under the tail lock) adds a put's
    /// bytes; a commit takes off only the bytes of the shard it replaced, a
    /// put that fails or is fenced its own, a delete (under the tail lock)
    /// the deleted shard's. So no shard is ever counted twice, not even
    /// between an index commit and the bookkeeping after it (where reading
    /// the index's `used` and adding what is in flight would).
    charged: std::sync::atomic::AtomicU64,
    /// Written puts waiting for the group commit.
    commits: std::sync::Mutex<CommitQueue>,
    /// Signalled when a bad shard is recorded (the scrub worker reports it).
    faults: tokio::sync::Notify,
}

#[derive(Default)]
struct CommitQueue {
    pending: Vec<Pending>,
    /// A committer task is running and will take what is queued.
    committing: bool,
}

/// A written shard waiting for its sync and index commit.
struct Pending {
    key: SegmentShardKey,
    epoch: u64,
    loc: Location,
    /// What the index entry holds after the location: the shard's root and
    /// outboard.
    tail: Vec<u8>,
    file: Arc<RegisteredFile>,
    /// The shard's bytes when the committer is to write them (a small
    /// shard); `None` once its put has written them.
    unwritten: Option<Bytes>,
    /// The replaced location, `Err(newest epoch)` if fenced meanwhile; the
    /// outer error is a failed sync or commit.
    done: tokio::sync::oneshot::Sender<Result<Result<Option<Location>, u64>, String>>,
}

/// Gives back a put's in-flight bytes unless disarmed (`len = 0`).
struct InflightGuard<'a> {
    store: &'a ShardStore,
    len: u64,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if self.len > 0 {
            self.store.inner.charged.fetch_sub(self.len, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

struct Tail {
    data_file: u32,
    file: Arc<RegisteredFile>,
    end: u64,
}

impl std::fmt::Debug for ShardStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardStore({})", self.inner.dir.display())
    }
}

fn data_file_path(dir: &Path, id: u32) -> PathBuf {
    dir.join("data").join(format!("{id:08}.dat"))
}

impl ShardStore {
    /// Opens (or creates) the store in `dir`, holding at most `capacity`
    /// bytes of shards (headers included).
    pub fn open(ring: &Uring, dir: &Path, capacity: u64) -> Result<Self, StoreError> {
        Self::open_with_data_file_limit(ring, dir, capacity, DATA_FILE_LIMIT)
    }

    fn open_with_data_file_limit(
        ring: &Uring,
        dir: &Path,
        capacity: u64,
        data_file_limit: u64,
    ) -> Result<Self, StoreError> {
        let io = |e: &dyn std::fmt::Display| StoreError::Io { path: dir.to_owned(), message: e.to_string() };
        std::fs::create_dir_all(dir.join("data")).map_err(|e| io(&e))?;
        // The data folder's own name must survive a crash as its files do.
        durable::sync_dir(dir).map_err(|e| io(&e))?;
        let db = Database::create(dir.join("index.redb")).map_err(|e| io(&e))?;
        let txn = db.begin_write().map_err(|e| io(&e))?;
        let (data_file, used) = {
            txn.open_table(SEGMENTS).map_err(|e| io(&e))?;
            txn.open_table(EPOCHS).map_err(|e| io(&e))?;
            txn.open_table(scrub::SCRUB).map_err(|e| io(&e))?;
            txn.open_table(scrub::SCRUB_FAULTS).map_err(|e| io(&e))?;
            let mut c = txn.open_table(COUNTERS).map_err(|e| io(&e))?;
            let used = c.get("used").map_err(|e| io(&e))?.map_or(0, |v| v.value());
            let current = c.get("data_file").map_err(|e| io(&e))?.map(|v| v.value());
            let data_file = match current {
                Some(s) => s as u32,
                None => {
                    c.insert("data_file", 1).map_err(|e| io(&e))?;
                    1
                }
            };
            (data_file, used)
        };
        txn.commit().map_err(|e| io(&e))?;
        let (file, end) = open_data_file(ring, dir, data_file)?;
        let file = Arc::new(file);
        let mut data_files = HashMap::new();
        data_files.insert(data_file, file.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                ring: ring.clone(),
                db,
                capacity,
                data_file_limit,
                tail: Mutex::new(Tail { data_file, file, end }),
                data_files: std::sync::Mutex::new(data_files),
                first_error: std::sync::Mutex::new(None),
                charged: std::sync::atomic::AtomicU64::new(used),
                commits: std::sync::Mutex::new(CommitQueue::default()),
                faults: tokio::sync::Notify::new(),
            }),
        })
    }

    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// Bytes of shards stored (headers included).
    pub fn used(&self) -> Result<u64, StoreError> {
        self.check()?;
        let txn = self.inner.db.begin_read().map_err(|e| self.io(e))?;
        let c = txn.open_table(COUNTERS).map_err(|e| self.io(e))?;
        Ok(c.get("used").map_err(|e| self.io(e))?.map_or(0, |v| v.value()))
    }

    fn io(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io { path: self.inner.dir.clone(), message: e.to_string() }
    }

    fn check(&self) -> Result<(), StoreError> {
        if let Some(first) = self.inner.first_error.lock().expect("not poisoned").clone() {
            return Err(StoreError::Poisoned { path: self.inner.dir.clone(), first });
        }
        Ok(())
    }

    /// Marks the store untrustworthy after a failed write or sync.
    fn poison(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        let message = format!("{what}: {e}");
        tracing::error!("shard store {} poisoned: {message}", self.inner.dir.display());
        self.inner.first_error.lock().expect("not poisoned").get_or_insert(message.clone());
        StoreError::Io { path: self.inner.dir.clone(), message }
    }

    /// The durability sequence: admit, claim a range of the data file
    /// tail, write, queue for the group commit (sync then index entry
    /// `location ‖ tail`), answer. A small shard is queued unwritten and
    /// the committer writes it before the sync.
    async fn append(
        &self,
        key: SegmentShardKey,
        shard: Bytes,
        epoch: u64,
        entry_tail: Vec<u8>,
    ) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let len = shard.len() as u64;
        // Admission and the claim of a range happen under the tail lock;
        // the bytes count as in flight until their commit.
        let (file, loc) = {
            let mut tail = self.inner.tail.lock().await;
            self.check()?;
            self.admit(&key, epoch, len)?;
            if tail.end + len > self.inner.data_file_limit && tail.end > 0 {
                self.roll(&mut tail)?;
            }
            // Claim the range before writing: if this future is dropped
            // while the kernel still writes, no later put reuses the range.
            let loc = Location { data_file: tail.data_file, offset: tail.end, len: len as u32 };
            tail.end += len;
            self.inner.charged.fetch_add(len, Ordering::SeqCst);
            (tail.file.clone(), loc)
        };
        // Until the committer takes it over, the in-flight count is ours to
        // give back, also when this future is dropped.
        let mut inflight = InflightGuard { store: self, len };
        let unwritten = if shard.len() <= COMMITTER_WRITES_BYTES {
            Some(shard)
        } else {
            let written = self.inner.ring.write_all_at(&file, loc.offset, shard, 0).await;
            if let Err(e) = written {
                return Err(self.poison("writing a shard", e));
            }
            None
        };
        inflight.len = 0;
        let (done, answer) = tokio::sync::oneshot::channel();
        let start = {
            let mut q = self.inner.commits.lock().expect("not poisoned");
            q.pending.push(Pending { key, epoch, loc, tail: entry_tail, file, unwritten, done });
            !std::mem::replace(&mut q.committing, true)
        };
        if start {
            // A thread of its own: a caller giving up must not stop the
            // commits of the others, and the writes, syncs and the index
            // commit of a batch run one after the other on it without a
            // hand-off between them.
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.commit_loop());
        }
        let committed = answer.await.unwrap_or_else(|_| Err("the committer stopped".into()));
        match committed {
            Ok(Ok(Some(old))) => self.punch(old).await,
            Ok(Ok(None)) => {}
            Ok(Err(newest)) => {
                // Fenced while it was written: its bytes are not indexed.
                self.punch(loc).await;
                return Err(StoreError::Fenced { got: epoch, newest });
            }
            Err(e) => return Err(self.poison("committing a shard", e)),
        }
        Ok(())
    }

    /// Takes what is queued for the group commit, or ends the committer's
    /// turn when nothing is.
    fn next_batch(&self) -> Option<Vec<Pending>> {
        let mut q = self.inner.commits.lock().expect("not poisoned");
        if q.pending.is_empty() {
            q.committing = false;
            return None;
        }
        Some(std::mem::take(&mut q.pending))
    }

    /// Writes (the small shards), syncs and commits what is queued, batch
    /// after batch, until the queue is empty. Runs on a blocking thread.
    ///
    /// The next batch is taken before a batch is answered, and the last
    /// one is answered only once this handle on the store is gone: a put
    /// answered last must not find the store still open here (whoever drops
    /// the last handle after its put closes the index, and may open it again).
    fn commit_loop(self) {
        use std::sync::atomic::Ordering;
        let Some(mut batch) = self.next_batch() else { return };
        loop {
            let started = std::time::Instant::now();
            let poisoned = self.check().err();
            let mut failed = poisoned.as_ref().map(|e| e.to_string());
            // Every shard is written before any data file is synced: a sync
            // covers only what was written before it.
            for p in &batch {
                let Some(bytes) = p.unwritten.as_ref().filter(|_| failed.is_none()) else { continue };
                if let Err(e) = p.file.write_all_at_blocking(p.loc.offset, bytes) {
                    failed = Some(format!("writing a shard: {e}"));
                }
            }
            let mut synced: Vec<u32> = Vec::new();
            for p in &batch {
                if failed.is_some() || synced.contains(&p.loc.data_file) {
                    continue;
                }
                match p.file.sync_blocking(true) {
                    Ok(()) => synced.push(p.loc.data_file),
                    Err(e) => failed = Some(format!("syncing a data file: {e}")),
                }
            }
            let data_synced = started.elapsed();
            let entries: Vec<(SegmentShardKey, u64, Location, Vec<u8>)> =
                batch.iter_mut().map(|p| (p.key, p.epoch, p.loc, std::mem::take(&mut p.tail))).collect();
            let results = match failed {
                Some(e) => Err(e),
                None => self.commit_puts(&entries).map_err(|e| format!("committing the index: {e}")),
            };
            // The first failed write, sync or commit poisons the store here,
            // before the next batch is taken: the puts of this one may all
            // have been given up, and a later batch must not be written,
            // synced and acknowledged past the failure.
            if let (Err(e), None) = (&results, &poisoned) {
                self.poison("group commit", e);
            }
            tracing::debug!(
                "group commit of {} puts: data written and synced {data_synced:.0?}, indexed {:.0?}",
                batch.len(),
                started.elapsed()
            );
            // The bytes each put gives back, then the answers.
            let charged = &self.inner.charged;
            let answers: Vec<_> = match results {
                Ok(olds) => batch
                    .into_iter()
                    .zip(olds)
                    .map(|(p, old)| {
                        let freed = match &old {
                            Ok(Some(replaced)) => replaced.len,
                            Ok(None) => 0,
                            Err(_fenced) => p.loc.len,
                        };
                        charged.fetch_sub(u64::from(freed), Ordering::SeqCst);
                        (p.done, Ok(old))
                    })
                    .collect(),
                Err(e) => batch
                    .into_iter()
                    .map(|p| {
                        charged.fetch_sub(u64::from(p.loc.len), Ordering::SeqCst);
                        (p.done, Err(e.clone()))
                    })
                    .collect(),
            };
            let Some(next) = self.next_batch() else {
                drop(self);
                for (done, answer) in answers {
                    let _ = done.send(answer);
                }
                return;
            };
            for (done, answer) in answers {
                let _ = done.send(answer);
            }
            batch = next;
        }
    }

    /// Returns a location's bytes to the filesystem (best effort: the index
    /// no longer points there either way).
    async fn punch(&self, loc: Location) {
        let Ok(file) = self.data_file(loc.data_file) else { return };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if let Err(err) = self.inner.ring.fallocate(&file, loc.offset, u64::from(loc.len), mode).await {
            tracing::warn!("shard store {}: punching a hole failed: {err}", self.inner.dir.display());
        }
    }

    /// Refuses an older epoch or a shard that does not fit.
    fn admit(&self, key: &SegmentShardKey, epoch: u64, len: u64) -> Result<(), StoreError> {
        let newest = self.newest_epoch(&key.volume)?;
        if epoch < newest {
            return Err(StoreError::Fenced { got: epoch, newest });
        }
        let replaced = self.locate(key)?.map_or(0, |loc| u64::from(loc.len));
        let used = self.inner.charged.load(std::sync::atomic::Ordering::SeqCst);
        let after = used
            .checked_sub(replaced)
            .ok_or_else(|| self.io("index accounting is corrupt (used < a stored shard)"))?
            + len;
        if after > self.inner.capacity {
            return Err(StoreError::Full { used, capacity: self.inner.capacity, need: len });
        }
        Ok(())
    }

    /// Commits written puts in one transaction; for each, the location of
    /// the shard it replaced, or `Err(newest epoch)` for a put whose epoch
    /// was overtaken while it was written (not indexed).
    fn commit_puts(
        &self,
        puts: &[(SegmentShardKey, u64, Location, Vec<u8>)],
    ) -> Result<Vec<Result<Option<Location>, u64>>, String> {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let txn = self.inner.db.begin_write().map_err(|x| e(&x))?;
        let mut olds = Vec::with_capacity(puts.len());
        {
            let mut segments = txn.open_table(SEGMENTS).map_err(|x| e(&x))?;
            let mut epochs = txn.open_table(EPOCHS).map_err(|x| e(&x))?;
            let mut c = txn.open_table(COUNTERS).map_err(|x| e(&x))?;
            let mut used = c.get("used").map_err(|x| e(&x))?.map_or(0, |v| v.value());
            for (key, epoch, loc, tail) in puts {
                let volume = &key.volume[..];
                let newest = epochs.get(volume).map_err(|x| e(&x))?.map_or(0, |v| v.value());
                if *epoch < newest {
                    olds.push(Err(newest));
                    continue;
                }
                if *epoch > newest {
                    epochs.insert(volume, *epoch).map_err(|x| e(&x))?;
                }
                let value = [&loc.encode()[..], tail].concat();
                let old = match segments
                    .insert(&SegmentIndexKey::encode(key)[..], &value[..])
                    .map_err(|x| e(&x))?
                {
                    Some(v) => Some(SegmentEntry::decode(v.value())?.loc),
                    None => None,
                };
                used = used
                    .checked_sub(old.map_or(0, |o| u64::from(o.len)))
                    .ok_or("index accounting is corrupt (used < a stored shard)")?
                    + u64::from(loc.len);
                olds.push(Ok(old));
            }
            c.insert("used", used).map_err(|x| e(&x))?;
        }
        txn.commit().map_err(|x| e(&x))?;
        Ok(olds)
    }

    /// Starts a new data file.
    fn roll(&self, tail: &mut Tail) -> Result<(), StoreError> {
        let next = tail.data_file + 1;
        let (file, end) = open_data_file(&self.inner.ring, &self.inner.dir, next)?;
        let txn = self.inner.db.begin_write().map_err(|e| self.io(e))?;
        txn.open_table(COUNTERS)
            .map_err(|e| self.io(e))?
            .insert("data_file", u64::from(next))
            .map_err(|e| self.io(e))?;
        txn.commit().map_err(|e| self.io(e))?;
        let file = Arc::new(file);
        self.inner.data_files.lock().expect("not poisoned").insert(next, file.clone());
        *tail = Tail { data_file: next, file, end };
        Ok(())
    }

    fn data_file(&self, id: u32) -> Result<Arc<RegisteredFile>, StoreError> {
        if let Some(f) = self.inner.data_files.lock().expect("not poisoned").get(&id) {
            return Ok(f.clone());
        }
        let (file, _) = open_data_file_with(&self.inner.ring, &self.inner.dir, id, false)?;
        let file = Arc::new(file);
        self.inner.data_files.lock().expect("not poisoned").insert(id, file.clone());
        Ok(file)
    }

    /// A shard's index entry.
    fn entry(&self, key: &SegmentShardKey) -> Result<Option<SegmentEntry>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(|e| self.io(e))?;
        let index = txn.open_table(SEGMENTS).map_err(|e| self.io(e))?;
        match index.get(&SegmentIndexKey::encode(key)[..]).map_err(|e| self.io(e))? {
            Some(v) => Ok(Some(SegmentEntry::decode(v.value()).map_err(|e| self.io(e))?)),
            None => Ok(None),
        }
    }

    fn locate(&self, key: &SegmentShardKey) -> Result<Option<Location>, StoreError> {
        Ok(self.entry(key)?.map(|e| e.loc))
    }

    /// After a read of `loc` failed its check (or failed outright): a
    /// delete or replacement may have moved the shard while it was being
    /// read, so only a shard still indexed there is bad (`Ok(())`: ask
    /// again). A bad shard is recorded as a fault, for the directory to
    /// have it rebuilt.
    async fn recheck(
        &self,
        key: &SegmentShardKey,
        loc: Location,
        failure: StoreError,
    ) -> Result<(), StoreError> {
        match self.locate(key)? {
            None => Err(StoreError::NotFound(*key)),
            Some(now) if now != loc => Ok(()),
            Some(_) => {
                if matches!(
                    failure,
                    StoreError::Corrupt { .. } | StoreError::Misplaced { .. } | StoreError::Unreadable { .. }
                ) {
                    self.note_fault(key, loc, failure.to_string()).await;
                }
                Err(failure)
            }
        }
    }

    /// The bytes at a location, as stored (the caller verifies them).
    async fn read_location(&self, loc: Location, what: &str) -> Result<Vec<u8>, StoreError> {
        self.read_at(loc.data_file, loc.offset, loc.len as usize, what).await
    }

    /// `len` bytes at `offset` of data file `data_file`. A failure here
    /// (the file missing, an I/O error) is the caller's to judge: it is
    /// a fault of the shard read, not of the store.
    async fn read_at(
        &self,
        data_file: u32,
        offset: u64,
        len: usize,
        what: &str,
    ) -> Result<Vec<u8>, StoreError> {
        let file = self.data_file(data_file)?;
        self.inner
            .ring
            .read_exact_at(&file, offset, len)
            .await
            .map_err(|e| self.io(format!("reading {what}: {e}")))
    }

    /// Removes a shard, for a writer (or the directory's garbage
    /// collection) holding fencing `epoch` on its volume; its space is
    /// returned at once. False if it was not there.
    pub async fn delete(&self, key: &SegmentShardKey, epoch: u64) -> Result<bool, StoreError> {
        self.delete_if(key, epoch, None).await
    }

    /// [`Self::delete`], only if the shard is still at `expect` (when
    /// given): a copy stored since is kept (`Ok(false)`).
    async fn delete_if(
        &self,
        key: &SegmentShardKey,
        epoch: u64,
        expect: Option<Location>,
    ) -> Result<bool, StoreError> {
        self.check()?;
        let _tail = self.inner.tail.lock().await;
        self.check()?;
        let newest = self.newest_epoch(&key.volume)?;
        if epoch < newest {
            return Err(StoreError::Fenced { got: epoch, newest });
        }
        let loc = self.locate(key)?;
        if expect.is_some() && loc != expect {
            return Ok(false);
        }
        if loc.is_none() && epoch == newest {
            return Ok(false);
        }
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let committed = (|| -> Result<(), String> {
            let txn = self.inner.db.begin_write().map_err(|x| e(&x))?;
            // A delete raises the volume's epoch like a put: a writer
            // older than the deleter cannot bring the shard back.
            if epoch > newest {
                txn.open_table(EPOCHS)
                    .map_err(|x| e(&x))?
                    .insert(&key.volume[..], epoch)
                    .map_err(|x| e(&x))?;
            }
            if let Some(loc) = loc {
                txn.open_table(SEGMENTS)
                    .map_err(|x| e(&x))?
                    .remove(&SegmentIndexKey::encode(key)[..])
                    .map_err(|x| e(&x))?;
                let mut c = txn.open_table(COUNTERS).map_err(|x| e(&x))?;
                let used = c.get("used").map_err(|x| e(&x))?.map_or(0, |v| v.value());
                c.insert("used", used.saturating_sub(u64::from(loc.len))).map_err(|x| e(&x))?;
            }
            txn.commit().map_err(|x| e(&x))
        })();
        committed.map_err(|m| self.poison("committing a delete", m))?;
        if let Some(loc) = loc {
            self.inner.charged.fetch_sub(u64::from(loc.len), std::sync::atomic::Ordering::SeqCst);
        }
        match loc {
            Some(loc) => {
                self.punch(loc).await;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn newest_epoch(&self, volume: &[u8; VOLUME_ID_LEN]) -> Result<u64, StoreError> {
        let txn = self.inner.db.begin_read().map_err(|e| self.io(e))?;
        let epochs = txn.open_table(EPOCHS).map_err(|e| self.io(e))?;
        Ok(epochs.get(&volume[..]).map_err(|e| self.io(e))?.map_or(0, |v| v.value()))
    }

    /// Up to `limit` shards stored for `volume`, in key order, after
    /// `after` (the directory's collector pages through a deleted volume's
    /// shards with this).
    pub fn list(
        &self,
        volume: &[u8; VOLUME_ID_LEN],
        after: Option<SegmentShardKey>,
        limit: usize,
    ) -> Result<Vec<SegmentShardKey>, StoreError> {
        use std::ops::Bound::{Excluded, Included};
        self.check()?;
        let txn = self.inner.db.begin_read().map_err(|e| self.io(e))?;
        let index = txn.open_table(SEGMENTS).map_err(|e| self.io(e))?;
        let mut lo = [0u8; 25];
        lo[..16].copy_from_slice(volume);
        let mut hi = [0xffu8; 25];
        hi[..16].copy_from_slice(volume);
        let from = after.filter(|a| a.volume == *volume).map(|a| SegmentIndexKey::encode(&a));
        let range = match &from {
            Some(after) => index.range::<&[u8]>((Excluded(&after[..]), Included(&hi[..]))),
            None => index.range::<&[u8]>(&lo[..]..=&hi[..]),
        };
        let mut out = Vec::new();
        for item in range.map_err(|e| self.io(e))?.take(limit) {
            let key = item.map_err(|e| self.io(e))?.0;
            out.push(SegmentIndexKey::decode(key.value()).map_err(|e| self.io(e))?);
        }
        Ok(out)
    }
}

fn open_data_file(ring: &Uring, dir: &Path, id: u32) -> Result<(RegisteredFile, u64), StoreError> {
    open_data_file_with(ring, dir, id, true)
}

/// Opens data file `id`, creating it only for the tail: an index entry
/// that names a missing data file is an error, not an empty file.
fn open_data_file_with(
    ring: &Uring,
    dir: &Path,
    id: u32,
    create: bool,
) -> Result<(RegisteredFile, u64), StoreError> {
    let path = data_file_path(dir, id);
    let io = |e: std::io::Error| StoreError::Io { path: path.clone(), message: e.to_string() };
    let file =
        OpenOptions::new().read(true).write(true).create(create).truncate(false).open(&path).map_err(io)?;
    let end = file.metadata().map_err(io)?.len();
    if create {
        // The tail's name must survive a crash before any shard in it is
        // indexed: an index entry naming a lost file is a lost shard.
        durable::sync_dir(&dir.join("data")).map_err(io)?;
    }
    let file = ring.register(file).map_err(io)?;
    Ok((file, end))
}

#[cfg(test)]
mod tests;
