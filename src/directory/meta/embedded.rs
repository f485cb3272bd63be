//! [`MetaStore`] on redb: one file, every transaction durable on commit.
//!
//! Tables:
//!
//! ```text
//! kv          key bytes        → create_rev u64 | mod_rev u64 | version u64 | lease u64 (0: none) | value
//! counters    "revision"       → last revision;  "lease" → last lease id
//! leases      lease id         → (deadline, ttl) in ms since the Unix epoch / ms
//! lease_keys  (lease id, key)  → ()              (what to delete when the lease ends)
//! ```
//!
//! Expired leases are swept at the start of every write transaction; reads
//! treat keys of an expired lease as absent until then, so nobody sees a
//! key outlive its lease. Lease deadlines use the wall clock, so a lease
//! also expires while the directory is down.
//!
//! Reads of a key or of a page of keys run on the caller's (async)
//! thread: redb readers see a committed snapshot and never wait for the
//! writer, and a hop to the blocking pool per read cost more than the
//! read. Writes, which fsync, and unbounded lists go to the blocking pool.
//!
//! [`MetaStore::txn_batch`] runs many transactions in one redb write
//! transaction, so they cost one fsync together;
//! [`RedbStore::durable_commits`] counts the write transactions made
//! durable, which is how tests see the grouping.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{Compare, Entry, LeaseId, MAX_VALUE, MetaError, MetaStore, Op, Revision, Txn, TxnOutcome};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const LEASES: TableDefinition<u64, (u64, u64)> = TableDefinition::new("leases");
const LEASE_KEYS: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("lease_keys");

const ENTRY_HEADER: usize = 32;

/// Pages of at most this many keys are read on the caller's thread.
const INLINE_PAGE: usize = 1000;

/// Milliseconds since the Unix epoch; replaceable in tests.
pub use crate::sys::clock::Clock;

/// The embedded metadata store. Cheap to clone (shares the database).
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    clock: Clock,
    /// Write transactions made durable since opening (each one fsync).
    commits: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedbStore")
    }
}

fn storage(e: impl Into<redb::Error>) -> MetaError {
    MetaError::Storage(Box::new(e.into()))
}

impl RedbStore {
    /// Opens (or creates) the store in the file at `path`.
    pub fn open(path: &Path) -> Result<Self, MetaError> {
        Self::open_with_clock(path, crate::sys::clock::system())
    }

    /// Like [`Self::open`], with a clock of milliseconds since the epoch.
    pub fn open_with_clock(path: &Path, clock: Clock) -> Result<Self, MetaError> {
        let db = Database::create(path)
            .map_err(|e| MetaError::Open { path: path.to_owned(), source: Box::new(e) })?;
        let txn = db.begin_write().map_err(storage)?;
        {
            txn.open_table(KV).map_err(storage)?;
            txn.open_table(COUNTERS).map_err(storage)?;
            txn.open_table(LEASES).map_err(storage)?;
            txn.open_table(LEASE_KEYS).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(Self { inner: Arc::new(Inner { db, clock, commits: Default::default() }) })
    }

    /// The current revision.
    pub fn revision(&self) -> Result<Revision, MetaError> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let counters = txn.open_table(COUNTERS).map_err(storage)?;
        Ok(counters.get("revision").map_err(storage)?.map_or(0, |v| v.value()))
    }

    /// Write transactions made durable since the store was opened: each
    /// costs one fsync, so this is what grouping commits saves (tests
    /// measure it).
    pub fn durable_commits(&self) -> u64 {
        self.inner.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, MetaError> + Send + 'static,
    ) -> Result<T, MetaError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await.map_err(MetaError::Task)?
    }
}

fn decode_entry(key: &[u8], raw: &[u8]) -> Result<Entry, MetaError> {
    if raw.len() < ENTRY_HEADER {
        return Err(MetaError::Corrupt { key: key.to_vec(), len: raw.len() });
    }
    let u = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Ok(Entry {
        key: key.to_vec(),
        value: raw[ENTRY_HEADER..].to_vec(),
        create_revision: u(0),
        mod_revision: u(1),
        version: u(2),
        lease: match u(3) {
            0 => None,
            id => Some(LeaseId(id)),
        },
    })
}

fn encode_entry(e: &Entry) -> Vec<u8> {
    let mut raw = Vec::with_capacity(ENTRY_HEADER + e.value.len());
    for v in [e.create_revision, e.mod_revision, e.version, e.lease.map_or(0, |l| l.0)] {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    raw.extend_from_slice(&e.value);
    raw
}

/// The smallest key greater than every key with this prefix, if any.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The key range of `prefix`, given `end = prefix_end(prefix)`.
fn prefix_range<'a>(prefix: &'a [u8], end: Option<&'a [u8]>) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    (Bound::Included(prefix), end.map_or(Bound::Unbounded, Bound::Excluded))
}

/// Is this entry's lease (if any) alive at `now`, per the leases table?
fn lease_alive(leases: &impl ReadableTable<u64, (u64, u64)>, e: &Entry, now: u64) -> Result<bool, MetaError> {
    let Some(lease) = e.lease else { return Ok(true) };
    Ok(leases.get(lease.0).map_err(storage)?.is_some_and(|d| d.value().0 > now))
}

impl Inner {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>, MetaError> {
        let now = (self.clock)();
        let txn = self.db.begin_read().map_err(storage)?;
        let kv = txn.open_table(KV).map_err(storage)?;
        let leases = txn.open_table(LEASES).map_err(storage)?;
        let Some(raw) = kv.get(key).map_err(storage)? else { return Ok(None) };
        let e = decode_entry(key, raw.value())?;
        Ok(if lease_alive(&leases, &e, now)? { Some(e) } else { None })
    }

    fn list(&self, prefix: &[u8]) -> Result<Vec<Entry>, MetaError> {
        self.list_range(prefix, None, usize::MAX)
    }

    /// The first `limit` live keys under `prefix` after `after`: the scan
    /// starts at `after` (or the prefix), so a page costs its own length.
    fn list_range(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>, MetaError> {
        let now = (self.clock)();
        let txn = self.db.begin_read().map_err(storage)?;
        let kv = txn.open_table(KV).map_err(storage)?;
        let leases = txn.open_table(LEASES).map_err(storage)?;
        let end_key = prefix_end(prefix);
        let mut out = Vec::new();
        // Past the prefix's last key there is nothing (and a reversed
        // range would not be one).
        if limit == 0 || after.zip(end_key.as_deref()).is_some_and(|(a, e)| a >= e) {
            return Ok(out);
        }
        let (mut start, end) = prefix_range(prefix, end_key.as_deref());
        if let Some(a) = after.filter(|a| *a >= prefix) {
            start = Bound::Excluded(a);
        }
        for item in kv.range::<&[u8]>((start, end)).map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let e = decode_entry(k.value(), v.value())?;
            if lease_alive(&leases, &e, now)? {
                out.push(e);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Deletes expired leases and their keys. Returns whether anything
    /// changed.
    fn sweep(txn: &WriteTransaction, now: u64) -> Result<bool, MetaError> {
        let mut leases = txn.open_table(LEASES).map_err(storage)?;
        let mut expired = Vec::new();
        for item in leases.iter().map_err(storage)? {
            let (id, v) = item.map_err(storage)?;
            if v.value().0 <= now {
                expired.push(id.value());
            }
        }
        for id in &expired {
            leases.remove(*id).map_err(storage)?;
        }
        drop(leases);
        let mut deleted = 0;
        for id in &expired {
            deleted += Self::drop_lease_keys(txn, *id)?;
        }
        // Keys vanishing is a change like any other: it gets a revision.
        if deleted > 0 {
            Self::bump(txn, "revision")?;
        }
        Ok(!expired.is_empty())
    }

    /// Deletes every key attached to lease `id` (and the index rows);
    /// returns how many keys went.
    fn drop_lease_keys(txn: &WriteTransaction, id: u64) -> Result<usize, MetaError> {
        let mut index = txn.open_table(LEASE_KEYS).map_err(storage)?;
        let mut keys = Vec::new();
        for item in index.range((id, &[][..])..).map_err(storage)? {
            let (k, _) = item.map_err(storage)?;
            let (lease, key) = k.value();
            if lease != id {
                break;
            }
            keys.push(key.to_vec());
        }
        let mut kv = txn.open_table(KV).map_err(storage)?;
        let mut deleted = 0;
        for key in &keys {
            index.remove((id, key.as_slice())).map_err(storage)?;
            // Only if the key still belongs to this lease.
            let owned = match kv.get(key.as_slice()).map_err(storage)? {
                Some(raw) => decode_entry(key, raw.value())?.lease == Some(LeaseId(id)),
                None => false,
            };
            if owned {
                kv.remove(key.as_slice()).map_err(storage)?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    fn bump(txn: &WriteTransaction, name: &str) -> Result<u64, MetaError> {
        let mut counters = txn.open_table(COUNTERS).map_err(storage)?;
        let next = counters.get(name).map_err(storage)?.map_or(0, |v| v.value()) + 1;
        counters.insert(name, next).map_err(storage)?;
        Ok(next)
    }

    fn current(txn: &WriteTransaction) -> Result<u64, MetaError> {
        let counters = txn.open_table(COUNTERS).map_err(storage)?;
        Ok(counters.get("revision").map_err(storage)?.map_or(0, |v| v.value()))
    }

    /// What a transaction may not be, whatever the store holds: too large,
    /// or naming a key twice.
    fn check(t: &Txn) -> Result<(), MetaError> {
        let mut total = 0;
        let mut seen = std::collections::HashSet::new();
        for op in &t.ops {
            let (key, size) = match op {
                Op::Put { key, value, .. } => (key, key.len() + value.len()),
                Op::Delete { key } => (key, key.len()),
                Op::DeletePrefix { prefix } => (prefix, prefix.len()),
            };
            if !seen.insert(key.as_slice()) {
                return Err(MetaError::DuplicateKey(key.clone()));
            }
            total += size;
            if total > MAX_VALUE {
                return Err(MetaError::TooLarge(total));
            }
        }
        Ok(())
    }

    /// One transaction inside the write transaction `txn`: its compares
    /// against what `txn` holds so far, then, if they all hold, its ops.
    /// Writes nothing when it fails (compare, lease) or errs before its
    /// first op; an error after that (storage) spoils `txn`.
    fn apply(txn: &WriteTransaction, t: Txn) -> Result<TxnOutcome, MetaError> {
        Self::check(&t)?;
        // Compares.
        let holds = {
            let kv = txn.open_table(KV).map_err(storage)?;
            let mut holds = true;
            for c in &t.compare {
                let (key, want) = match c {
                    Compare::Absent(k) => (k, None),
                    Compare::ModRevision(k, r) => (k, Some(*r)),
                };
                let have = match kv.get(key.as_slice()).map_err(storage)? {
                    Some(raw) => Some(decode_entry(key, raw.value())?.mod_revision),
                    None => None,
                };
                if have != want {
                    holds = false;
                    break;
                }
            }
            holds
        };
        if !holds || t.ops.is_empty() {
            return Ok(TxnOutcome { succeeded: holds, revision: Self::current(txn)? });
        }
        // Leases named by puts must exist.
        {
            let leases = txn.open_table(LEASES).map_err(storage)?;
            for op in &t.ops {
                if let Op::Put { lease: Some(l), .. } = op
                    && leases.get(l.0).map_err(storage)?.is_none()
                {
                    return Err(MetaError::LeaseNotFound(*l));
                }
            }
        }
        let revision = Self::bump(txn, "revision")?;
        {
            let mut kv = txn.open_table(KV).map_err(storage)?;
            let mut index = txn.open_table(LEASE_KEYS).map_err(storage)?;
            for op in t.ops {
                match op {
                    Op::Put { key, value, lease } => {
                        let old = match kv.get(key.as_slice()).map_err(storage)? {
                            Some(raw) => Some(decode_entry(&key, raw.value())?),
                            None => None,
                        };
                        if let Some(old_lease) = old.as_ref().and_then(|o| o.lease)
                            && Some(old_lease) != lease
                        {
                            index.remove((old_lease.0, key.as_slice())).map_err(storage)?;
                        }
                        if let Some(l) = lease {
                            index.insert((l.0, key.as_slice()), ()).map_err(storage)?;
                        }
                        let e = Entry {
                            create_revision: old.as_ref().map_or(revision, |o| o.create_revision),
                            mod_revision: revision,
                            version: old.as_ref().map_or(1, |o| o.version + 1),
                            lease,
                            value,
                            key: Vec::new(),
                        };
                        kv.insert(key.as_slice(), encode_entry(&e).as_slice()).map_err(storage)?;
                    }
                    Op::Delete { key } => {
                        Self::delete(&mut kv, &mut index, &key)?;
                    }
                    Op::DeletePrefix { prefix } => {
                        let end = prefix_end(&prefix);
                        let mut keys = Vec::new();
                        for item in
                            kv.range::<&[u8]>(prefix_range(&prefix, end.as_deref())).map_err(storage)?
                        {
                            keys.push(item.map_err(storage)?.0.value().to_vec());
                        }
                        for key in keys {
                            Self::delete(&mut kv, &mut index, &key)?;
                        }
                    }
                }
            }
        }
        Ok(TxnOutcome { succeeded: true, revision })
    }

    fn txn(&self, t: Txn) -> Result<TxnOutcome, MetaError> {
        Self::check(&t)?;
        let writes = t.ops.len();
        let now = (self.clock)();
        let txn = self.db.begin_write().map_err(storage)?;
        let swept = Self::sweep(&txn, now)?;
        let out = Self::apply(&txn, t)?;
        if swept || (out.succeeded && writes > 0) {
            self.commit(txn)?;
        }
        Ok(out)
    }

    /// Every transaction of `batch` in order, in one write transaction
    /// made durable once. A transaction refused by itself (too large, a
    /// key twice, a dead lease) gets its error and writes nothing; the
    /// others go on. A storage error fails the whole batch.
    fn txn_batch(&self, batch: Vec<Txn>) -> Result<Vec<Result<TxnOutcome, MetaError>>, MetaError> {
        let now = (self.clock)();
        let txn = self.db.begin_write().map_err(storage)?;
        let mut changed = Self::sweep(&txn, now)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        for t in batch {
            let writes = t.ops.len();
            match Self::apply(&txn, t) {
                Ok(out) => {
                    changed |= out.succeeded && writes > 0;
                    outcomes.push(Ok(out));
                }
                Err(
                    e @ (MetaError::TooLarge(_) | MetaError::DuplicateKey(_) | MetaError::LeaseNotFound(_)),
                ) => outcomes.push(Err(e)),
                Err(e) => return Err(e),
            }
        }
        if changed {
            self.commit(txn)?;
        }
        Ok(outcomes)
    }

    /// Makes `txn` durable and counts it.
    fn commit(&self, txn: WriteTransaction) -> Result<(), MetaError> {
        txn.commit().map_err(storage)?;
        self.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn delete(
        kv: &mut redb::Table<&[u8], &[u8]>,
        index: &mut redb::Table<(u64, &[u8]), ()>,
        key: &[u8],
    ) -> Result<(), MetaError> {
        let lease = match kv.remove(key).map_err(storage)? {
            Some(raw) => decode_entry(key, raw.value())?.lease,
            None => None,
        };
        if let Some(l) = lease {
            index.remove((l.0, key)).map_err(storage)?;
        }
        Ok(())
    }

    fn grant(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        if ttl < Duration::from_millis(1) || ttl > Duration::from_secs(86_400) {
            return Err(MetaError::LeaseTtl(ttl));
        }
        let now = (self.clock)();
        let txn = self.db.begin_write().map_err(storage)?;
        Self::sweep(&txn, now)?;
        let id = Self::bump(&txn, "lease")?;
        let ttl_ms = ttl.as_millis() as u64;
        txn.open_table(LEASES).map_err(storage)?.insert(id, (now + ttl_ms, ttl_ms)).map_err(storage)?;
        self.commit(txn)?;
        Ok(LeaseId(id))
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), MetaError> {
        let now = (self.clock)();
        let txn = self.db.begin_write().map_err(storage)?;
        let swept = Self::sweep(&txn, now)?;
        let found = {
            let mut leases = txn.open_table(LEASES).map_err(storage)?;
            let ttl = leases.get(lease.0).map_err(storage)?.map(|v| v.value().1);
            if let Some(ttl) = ttl {
                leases.insert(lease.0, (now + ttl, ttl)).map_err(storage)?;
            }
            ttl.is_some()
        };
        if found || swept {
            self.commit(txn)?;
        }
        if found { Ok(()) } else { Err(MetaError::LeaseNotFound(lease)) }
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), MetaError> {
        let now = (self.clock)();
        let txn = self.db.begin_write().map_err(storage)?;
        Self::sweep(&txn, now)?;
        let existed = txn.open_table(LEASES).map_err(storage)?.remove(lease.0).map_err(storage)?.is_some();
        if existed && Self::drop_lease_keys(&txn, lease.0)? > 0 {
            Self::bump(&txn, "revision")?;
        }
        self.commit(txn)?;
        if existed { Ok(()) } else { Err(MetaError::LeaseNotFound(lease)) }
    }
}

impl MetaStore for RedbStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Entry>, MetaError> {
        // On the caller's thread: a key read is a few B-tree pages, mostly
        // in redb's cache, and readers never wait for the writer (redb
        // reads a committed snapshot). Handing each read to the blocking
        // pool cost the directory more than the read itself: a commit
        // makes a dozen reads, and each hop woke a thread and switched to
        // it and back (futex wakes and context switches were ~40% of the
        // directory's CPU time in `tools/bench directory`; reading inline
        // took its CPU per commit down by a quarter to a third).
        self.inner.get(key)
    }

    async fn list(&self, prefix: &[u8]) -> Result<Vec<Entry>, MetaError> {
        let prefix = prefix.to_vec();
        self.blocking(move |i| i.list(&prefix)).await
    }

    async fn list_range(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, MetaError> {
        // A page as short as the callers' pages reads inline, as `get`
        // does; a longer one (up to a whole prefix) on the blocking pool.
        if limit <= INLINE_PAGE {
            return self.inner.list_range(prefix, after, limit);
        }
        let prefix = prefix.to_vec();
        let after = after.map(<[u8]>::to_vec);
        self.blocking(move |i| i.list_range(&prefix, after.as_deref(), limit)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, MetaError> {
        self.blocking(move |i| i.txn(txn)).await
    }

    async fn txn_batch(&self, batch: Vec<Txn>) -> Result<Vec<Result<TxnOutcome, MetaError>>, MetaError> {
        self.blocking(move |i| i.txn_batch(batch)).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        self.blocking(move |i| i.grant(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.blocking(move |i| i.keep_alive(lease)).await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.blocking(move |i| i.revoke(lease)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use redb::ReadableTableMetadata;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn put(key: &[u8], value: &[u8]) -> Op {
        Op::Put { key: key.to_vec(), value: value.to_vec(), lease: None }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        now: Arc<AtomicU64>,
        store: RedbStore,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let now = Arc::new(AtomicU64::new(1_000_000));
        let clock = now.clone();
        let store =
            RedbStore::open_with_clock(&path, Arc::new(move || clock.load(Ordering::SeqCst))).unwrap();
        Fixture { _dir: dir, path, now, store }
    }

    #[tokio::test]
    async fn compare_and_set_on_versioned_keys() {
        let f = fixture();
        let s = &f.store;
        let created =
            s.txn(Txn::new().when(Compare::Absent(b"a".to_vec())).then(put(b"a", b"1"))).await.unwrap();
        assert_eq!(created, TxnOutcome { succeeded: true, revision: 1 });
        // A second create loses and writes nothing.
        let again =
            s.txn(Txn::new().when(Compare::Absent(b"a".to_vec())).then(put(b"a", b"2"))).await.unwrap();
        assert_eq!(again, TxnOutcome { succeeded: false, revision: 1 });
        let e = s.get(b"a").await.unwrap().unwrap();
        assert_eq!((e.value.as_slice(), e.create_revision, e.mod_revision, e.version), (&b"1"[..], 1, 1, 1));
        // Update at the revision we read: wins; a stale one: loses.
        let upd = s
            .txn(Txn::new().when(Compare::ModRevision(b"a".to_vec(), 1)).then(put(b"a", b"3")))
            .await
            .unwrap();
        assert!(upd.succeeded);
        let stale = s
            .txn(Txn::new().when(Compare::ModRevision(b"a".to_vec(), 1)).then(put(b"a", b"4")))
            .await
            .unwrap();
        assert!(!stale.succeeded);
        let e = s.get(b"a").await.unwrap().unwrap();
        assert_eq!((e.value.as_slice(), e.create_revision, e.mod_revision, e.version), (&b"3"[..], 1, 2, 2));
        // Several compares and ops are all-or-nothing.
        let multi = Txn::new()
            .when(Compare::ModRevision(b"a".to_vec(), 2))
            .when(Compare::Absent(b"b".to_vec()))
            .then(put(b"a", b"5"))
            .then(put(b"b", b"x"));
        assert!(s.txn(multi.clone()).await.unwrap().succeeded);
        assert!(!s.txn(multi).await.unwrap().succeeded);
        assert_eq!(s.get(b"b").await.unwrap().unwrap().mod_revision, 3);
        assert_eq!(f.store.revision().unwrap(), 3);
        // Deleting and re-creating starts a new life.
        s.txn(Txn::new().then(Op::Delete { key: b"a".to_vec() })).await.unwrap();
        assert!(s.get(b"a").await.unwrap().is_none());
        s.txn(Txn::new().then(put(b"a", b"6"))).await.unwrap();
        let e = s.get(b"a").await.unwrap().unwrap();
        assert_eq!((e.create_revision, e.version), (5, 1));
    }

    #[tokio::test]
    async fn prefixes_list_and_delete_exactly_their_keys() {
        let f = fixture();
        let s = &f.store;
        let keys: [&[u8]; 6] = [b"peer/1", b"peer/2", b"peer0", b"vol/a", b"\xff\xff", b"\xff\xff\x01"];
        let mut t = Txn::new();
        for k in keys {
            t = t.then(put(k, k));
        }
        assert_eq!(s.txn(t).await.unwrap().revision, 1, "one transaction, one revision");
        let names = |v: Vec<Entry>| v.into_iter().map(|e| e.key).collect::<Vec<_>>();
        assert_eq!(names(s.list(b"peer/").await.unwrap()), [b"peer/1".to_vec(), b"peer/2".to_vec()]);
        assert_eq!(
            names(s.list(b"\xff\xff").await.unwrap()),
            [b"\xff\xff".to_vec(), b"\xff\xff\x01".to_vec()]
        );
        assert_eq!(s.list(b"").await.unwrap().len(), 6);
        s.txn(Txn::new().then(Op::DeletePrefix { prefix: b"peer/".to_vec() })).await.unwrap();
        assert_eq!(names(s.list(b"peer").await.unwrap()), [b"peer0".to_vec()]);
    }

    #[tokio::test]
    async fn a_prefix_is_listed_in_pages_that_skip_dead_keys_and_stop_at_the_prefix() {
        let f = fixture();
        let s = &f.store;
        let lease = s.grant_lease(Duration::from_secs(1)).await.unwrap();
        let mut t = Txn::new().then(put(b"a/9", b"x")).then(put(b"b", b"x")).then(put(b"\xff", b"x"));
        for n in 0..5u8 {
            t = t.then(put(&[b'a', b'/', n], b"v"));
        }
        t = t.then(Op::Put { key: b"a/\x02x".to_vec(), value: b"v".to_vec(), lease: Some(lease) });
        s.txn(t).await.unwrap();
        f.now.fetch_add(2_000, Ordering::SeqCst);
        let names = |v: Vec<Entry>| v.into_iter().map(|e| e.key).collect::<Vec<_>>();
        // Pages of two, each after the last key of the one before; the
        // key whose lease lapsed is not counted against a page.
        let (mut pages, mut after) = (Vec::new(), None::<Vec<u8>>);
        loop {
            let page = names(s.list_range(b"a/", after.as_deref(), 2).await.unwrap());
            let Some(last) = page.last().cloned() else { break };
            pages.push(page);
            after = Some(last);
        }
        let k = |n: u8| vec![b'a', b'/', n];
        assert_eq!(pages, [vec![k(0), k(1)], vec![k(2), k(3)], vec![k(4), b"a/9".to_vec()]]);
        // An `after` before the prefix starts it; past it, nothing.
        assert_eq!(names(s.list_range(b"a/", Some(b"0"), 1).await.unwrap()), [k(0)]);
        assert!(s.list_range(b"a/", Some(b"b"), 10).await.unwrap().is_empty());
        assert!(s.list_range(b"a/", None, 0).await.unwrap().is_empty());
        assert_eq!(names(s.list_range(b"\xff", None, 10).await.unwrap()), [b"\xff".to_vec()]);
        assert!(s.list_range(b"\xff", Some(b"\xff"), 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn keys_die_with_their_lease_unless_it_is_kept_alive() {
        let f = fixture();
        let s = &f.store;
        let lease = s.grant_lease(Duration::from_secs(10)).await.unwrap();
        let with = |k: &[u8]| Op::Put { key: k.to_vec(), value: b"v".to_vec(), lease: Some(lease) };
        s.txn(Txn::new().then(with(b"live/1")).then(with(b"live/2")).then(put(b"plain", b"p")))
            .await
            .unwrap();
        assert_eq!(s.get(b"live/1").await.unwrap().unwrap().lease, Some(lease));
        // Detach one key by rewriting it without the lease.
        s.txn(Txn::new().then(put(b"live/2", b"kept"))).await.unwrap();

        f.now.fetch_add(9_000, Ordering::SeqCst);
        s.keep_alive(lease).await.unwrap();
        f.now.fetch_add(9_000, Ordering::SeqCst); // 18 s after grant, 9 s after keep-alive
        assert!(s.get(b"live/1").await.unwrap().is_some());

        f.now.fetch_add(2_000, Ordering::SeqCst); // past the deadline
        assert!(s.get(b"live/1").await.unwrap().is_none(), "reads hide keys of an expired lease at once");
        assert_eq!(s.list(b"live/").await.unwrap().len(), 1);
        assert!(matches!(s.keep_alive(lease).await, Err(MetaError::LeaseNotFound(_))));
        // The sweep really deleted it, and the detached and plain keys live on.
        assert!(s.txn(Txn::new().when(Compare::Absent(b"live/1".to_vec()))).await.unwrap().succeeded);
        assert_eq!(s.get(b"live/2").await.unwrap().unwrap().value, b"kept");
        assert!(s.get(b"plain").await.unwrap().is_some());
        // Writing with a dead lease fails and writes nothing.
        let err = s.txn(Txn::new().then(put(b"x", b"1")).then(with(b"y"))).await.unwrap_err();
        assert!(matches!(err, MetaError::LeaseNotFound(l) if l == lease), "{err}");
        assert!(s.get(b"x").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn revoking_a_lease_deletes_its_keys_now() {
        let f = fixture();
        let s = &f.store;
        let a = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        let b = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        assert_ne!(a, b);
        for (key, lease) in [(b"k/a", a), (b"k/b", b)] {
            s.txn(Txn::new().then(Op::Put { key: key.to_vec(), value: vec![1], lease: Some(lease) }))
                .await
                .unwrap();
        }
        s.revoke(a).await.unwrap();
        assert!(s.get(b"k/a").await.unwrap().is_none());
        assert!(s.get(b"k/b").await.unwrap().is_some());
        assert!(matches!(s.revoke(a).await, Err(MetaError::LeaseNotFound(_))));
        assert!(matches!(s.grant_lease(Duration::ZERO).await, Err(MetaError::LeaseTtl(_))));
        let big = s.txn(Txn::new().then(put(b"big", &vec![0u8; MAX_VALUE]))).await.unwrap_err();
        assert!(matches!(big, MetaError::TooLarge(_)), "{big}");
    }

    #[tokio::test]
    async fn keys_move_between_leases_and_expiry_is_a_revision() {
        let f = fixture();
        let s = &f.store;
        let a = s.grant_lease(Duration::from_secs(5)).await.unwrap();
        let b = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        let on = |l: LeaseId, k: &[u8]| Op::Put { key: k.to_vec(), value: vec![1], lease: Some(l) };
        s.txn(Txn::new().then(on(a, b"moves")).then(on(a, b"stays"))).await.unwrap();
        s.txn(Txn::new().then(on(b, b"moves"))).await.unwrap();
        let before = f.store.revision().unwrap();
        f.now.fetch_add(6_000, Ordering::SeqCst);
        // A write sweeps lease a: "stays" goes (a revision of its own), "moves" is b's now.
        let out = s.txn(Txn::new().then(put(b"x", b"1"))).await.unwrap();
        assert_eq!(out.revision, before + 2, "expiry that deleted a key took a revision");
        assert!(s.get(b"stays").await.unwrap().is_none());
        assert_eq!(s.get(b"moves").await.unwrap().unwrap().lease, Some(b));
        s.revoke(b).await.unwrap();
        assert!(s.get(b"moves").await.unwrap().is_none());
        // No index rows are left behind.
        let txn = f.store.inner.db.begin_read().unwrap();
        assert_eq!(txn.open_table(LEASE_KEYS).unwrap().len().unwrap(), 0);
        assert_eq!(txn.open_table(LEASES).unwrap().len().unwrap(), 0);
        // One transaction may not name a key twice.
        let dup = s.txn(Txn::new().then(put(b"d", b"1")).then(put(b"d", b"2"))).await.unwrap_err();
        assert!(matches!(dup, MetaError::DuplicateKey(ref k) if k == b"d"), "{dup}");
    }

    #[tokio::test]
    async fn a_batch_is_one_durable_write_and_each_txn_sees_the_ones_before() {
        let f = fixture();
        let s = &f.store;
        s.txn(Txn::new().then(put(b"a", b"0"))).await.unwrap();
        let before = s.durable_commits();
        let at_1 = || Txn::new().when(Compare::ModRevision(b"a".to_vec(), 1)).then(put(b"a", b"x"));
        let outs = s
            .txn_batch(vec![
                at_1(),
                // Read at the same revision: loses to the first.
                at_1(),
                Txn::new().then(put(b"d", b"1")).then(put(b"d", b"2")),
                Txn::new().when(Compare::Absent(b"b".to_vec())).then(put(b"b", b"1")),
                Txn::new().when(Compare::ModRevision(b"b".to_vec(), 3)).then(put(b"b", b"2")),
            ])
            .await
            .unwrap();
        assert_eq!(s.durable_commits(), before + 1, "one batch, one durable write");
        assert_eq!(outs[0].as_ref().unwrap(), &TxnOutcome { succeeded: true, revision: 2 });
        assert_eq!(outs[1].as_ref().unwrap(), &TxnOutcome { succeeded: false, revision: 2 });
        assert!(matches!(outs[2], Err(MetaError::DuplicateKey(_))), "{:?}", outs[2]);
        assert_eq!(outs[3].as_ref().unwrap(), &TxnOutcome { succeeded: true, revision: 3 });
        // The fourth saw the third's write.
        assert_eq!(outs[4].as_ref().unwrap(), &TxnOutcome { succeeded: true, revision: 4 });
        assert_eq!(s.get(b"a").await.unwrap().unwrap().value, b"x");
        assert_eq!(s.get(b"b").await.unwrap().unwrap().value, b"2");
        assert!(s.get(b"d").await.unwrap().is_none());
        // A batch in which nothing holds writes nothing.
        let outs = s.txn_batch(vec![at_1()]).await.unwrap();
        assert!(!outs[0].as_ref().unwrap().succeeded);
        assert_eq!(s.durable_commits(), before + 1);
        // And the batch is durable.
        drop(f.store);
        let clock = f.now.clone();
        let s = RedbStore::open_with_clock(&f.path, Arc::new(move || clock.load(Ordering::SeqCst))).unwrap();
        assert_eq!((s.revision().unwrap(), s.get(b"b").await.unwrap().unwrap().value), (4, b"2".to_vec()));
    }

    #[tokio::test]
    async fn everything_survives_reopening() {
        let f = fixture();
        f.store.txn(Txn::new().then(put(b"a", b"1"))).await.unwrap();
        f.store.txn(Txn::new().then(put(b"a", b"2"))).await.unwrap();
        let lease = f.store.grant_lease(Duration::from_secs(30)).await.unwrap();
        drop(f.store);
        let clock = f.now.clone();
        let s = RedbStore::open_with_clock(&f.path, Arc::new(move || clock.load(Ordering::SeqCst))).unwrap();
        let e = s.get(b"a").await.unwrap().unwrap();
        assert_eq!((e.value.as_slice(), e.version, e.mod_revision), (&b"2"[..], 2, 2));
        assert_eq!(s.revision().unwrap(), 2);
        s.keep_alive(lease).await.unwrap();
        assert!(s.grant_lease(Duration::from_secs(1)).await.unwrap() > lease);
        assert_eq!(s.txn(Txn::new().then(put(b"b", b""))).await.unwrap().revision, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_compare_and_set_loses_no_update() {
        let f = fixture();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let s = f.store.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..25 {
                    loop {
                        let cur = s.get(b"counter").await.unwrap();
                        let (n, cmp) = match &cur {
                            Some(e) => (
                                u64::from_le_bytes(e.value[..8].try_into().unwrap()),
                                Compare::ModRevision(b"counter".to_vec(), e.mod_revision),
                            ),
                            None => (0, Compare::Absent(b"counter".to_vec())),
                        };
                        let t = Txn::new().when(cmp).then(put(b"counter", &(n + 1).to_le_bytes()));
                        if s.txn(t).await.unwrap().succeeded {
                            break;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let e = f.store.get(b"counter").await.unwrap().unwrap();
        assert_eq!(u64::from_le_bytes(e.value[..8].try_into().unwrap()), 100);
        assert_eq!(e.version, 100);
    }

    #[derive(Clone, Debug)]
    enum ModelOp {
        Create(u8, u8),
        Update(u8, u8, bool),
        Delete(u8),
        DeletePrefix(u8),
    }

    fn key(k: u8) -> Vec<u8> {
        vec![b'k', k % 4, k]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Random transactions against a plain map model: same outcomes,
        /// same values, versions and revisions.
        #[test]
        fn behaves_like_a_versioned_map(ops in proptest::collection::vec(
            prop_oneof![
                (0u8..12, any::<u8>()).prop_map(|(k, v)| ModelOp::Create(k, v)),
                (0u8..12, any::<u8>(), any::<bool>()).prop_map(|(k, v, stale)| ModelOp::Update(k, v, stale)),
                (0u8..12).prop_map(ModelOp::Delete),
                (0u8..4).prop_map(ModelOp::DeletePrefix),
            ],
            1..40,
        )) {
            let f = fixture();
            let inner = &f.store.inner;
            // key → (value, create_rev, mod_rev, version)
            let mut model: BTreeMap<Vec<u8>, (u8, u64, u64, u64)> = BTreeMap::new();
            let mut rev = 0u64;
            for op in ops {
                let (txn, expect_ok) = match op {
                    ModelOp::Create(k, v) => (
                        Txn::new().when(Compare::Absent(key(k))).then(put(&key(k), &[v])),
                        !model.contains_key(&key(k)),
                    ),
                    ModelOp::Update(k, v, stale) => {
                        let at = model.get(&key(k)).map_or(0, |e| e.2) + u64::from(stale);
                        (
                            Txn::new().when(Compare::ModRevision(key(k), at)).then(put(&key(k), &[v])),
                            model.get(&key(k)).is_some_and(|e| e.2 == at),
                        )
                    }
                    ModelOp::Delete(k) => (Txn::new().then(Op::Delete { key: key(k) }), true),
                    ModelOp::DeletePrefix(p) => (Txn::new().then(Op::DeletePrefix { prefix: vec![b'k', p] }), true),
                };
                let out = inner.txn(txn.clone()).unwrap();
                prop_assert_eq!(out.succeeded, expect_ok, "{:?}", txn);
                if expect_ok {
                    rev += 1;
                    for o in &txn.ops {
                        match o {
                            Op::Put { key, value, .. } => {
                                let old = model.get(key).copied();
                                model.insert(key.clone(), (value[0], old.map_or(rev, |e| e.1), rev, old.map_or(1, |e| e.3 + 1)));
                            }
                            Op::Delete { key } => { model.remove(key); }
                            Op::DeletePrefix { prefix } => model.retain(|k, _| !k.starts_with(prefix)),
                        }
                    }
                }
                prop_assert_eq!(out.revision, rev);
            }
            let listed = inner.list(b"").unwrap();
            prop_assert_eq!(listed.len(), model.len());
            for e in listed {
                let m = model[&e.key];
                prop_assert_eq!((e.value[0], e.create_revision, e.mod_revision, e.version), m);
            }
        }
    }
}
