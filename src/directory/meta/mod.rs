//! The directory's metadata store: versioned keys, compare-and-set
//! transactions and leases, behind one trait.
//!
//! The directory keeps everything it knows here: peers, volumes and their
//! leases, roots and segment records. The trait is shaped after etcd's API
//! (the highly available backend to come), so the directory's logic is
//! written once against what both can do:
//!
//! - every successful write transaction advances one global **revision**;
//!   each key remembers the revision that created it, the one that last
//!   changed it (`mod_revision`) and how many times it was written
//!   (`version`);
//! - a [`Txn`] checks all its [`Compare`]s and, only if every one holds,
//!   applies all its [`Op`]s atomically: compare-and-set on versioned keys;
//! - a **lease** has a time to live; keys written with it disappear when it
//!   expires or is revoked, unless it is kept alive. Volume write leases are
//!   built on this (a peer's liveness is not:
//!   it is the age of its last report).
//!
//! [`embedded::RedbStore`] is the embedded implementation (redb) (one file, durable on
//! every commit).

pub mod embedded;

use std::future::Future;
use std::time::Duration;

/// A global revision: 0 before the first write.
pub type Revision = u64;

/// A lease handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub u64);

/// A stored key with its value and history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Revision of the write that created the key (since it last did not exist).
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Writes since the key was created: 1 after the first.
    pub version: u64,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A condition a transaction checks before it applies its operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(Vec<u8>),
    /// The key exists and was last written at this revision.
    ModRevision(Vec<u8>, Revision),
}

/// A write a transaction applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Set a key, attaching it to a lease (or detaching it, with `None`).
    Put { key: Vec<u8>, value: Vec<u8>, lease: Option<LeaseId> },
    /// Remove a key (nothing happens if it does not exist).
    Delete { key: Vec<u8> },
    /// Remove every key starting with `prefix`.
    DeletePrefix { prefix: Vec<u8> },
}

/// All-or-nothing: if every compare holds, every op is applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn when(mut self, c: Compare) -> Self {
        self.compare.push(c);
        self
    }

    pub fn then(mut self, op: Op) -> Self {
        self.ops.push(op);
        self
    }
}

/// What a transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnOutcome {
    /// False if a compare failed (nothing was written).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: Revision,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store: {0}")]
    Storage(Box<redb::Error>),
    #[error("metadata store {}: {source}", path.display())]
    Open { path: std::path::PathBuf, source: Box<redb::DatabaseError> },
    #[error("metadata task failed: {0}")]
    Task(tokio::task::JoinError),
    #[error("metadata store: corrupt entry for key {key:?}: {len} bytes")]
    Corrupt { key: Vec<u8>, len: usize },
    #[error("lease {0:?} does not exist (expired or revoked)")]
    LeaseNotFound(LeaseId),
    #[error("lease time to live must be 1 ms to 1 day, got {0:?}")]
    LeaseTtl(Duration),
    #[error("metadata transaction too large: {0} bytes (at most {MAX_VALUE})")]
    TooLarge(usize),
    #[error("a transaction names key {0:?} twice")]
    DuplicateKey(Vec<u8>),
}

/// Largest transaction (keys plus values) the store accepts (etcd's default
/// limit is 1.5 MiB per request).
pub const MAX_VALUE: usize = 1 << 20;

/// The metadata store. Every method is one atomic, durable step.
pub trait MetaStore: Send + Sync + 'static {
    /// One key, if it exists (and its lease, if any, is alive).
    fn get(&self, key: &[u8]) -> impl Future<Output = Result<Option<Entry>, MetaError>> + Send;
    /// Every live key starting with `prefix`, in key order.
    fn list(&self, prefix: &[u8]) -> impl Future<Output = Result<Vec<Entry>, MetaError>> + Send;
    /// One page of [`MetaStore::list`]: the first `limit` live keys
    /// starting with `prefix` and greater than `after` (a whole key), in
    /// key order. A caller pages through a long prefix (a volume's 10^5
    /// segment records) by passing the last key it got. This default
    /// reads the whole prefix; a store that can seeks to `after`.
    fn list_range(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Entry>, MetaError>> + Send {
        async move {
            let all = self.list(prefix).await?;
            Ok(all.into_iter().filter(|e| after.is_none_or(|a| e.key.as_slice() > a)).take(limit).collect())
        }
    }
    /// Checks the compares and, if all hold, applies the ops atomically.
    fn txn(&self, txn: Txn) -> impl Future<Output = Result<TxnOutcome, MetaError>> + Send;
    /// Several transactions, in order, each all-or-nothing by itself: each
    /// one's compares see what the ones before it wrote. A transaction the
    /// store refuses by itself (too large, a key twice, a dead lease) gets
    /// its own error and the others go on; after the outer error (storage)
    /// no transaction's outcome is known. A store that can should make the whole
    /// batch durable at once (the embedded one: one write transaction, one
    /// fsync, however many commits it carries); this default runs them one
    /// by one (etcd's transactions cannot be merged safely, as a merged
    /// one would fail whole on one failing compare).
    fn txn_batch(
        &self,
        batch: Vec<Txn>,
    ) -> impl Future<Output = Result<Vec<Result<TxnOutcome, MetaError>>, MetaError>> + Send {
        async move {
            let mut out = Vec::with_capacity(batch.len());
            for t in batch {
                out.push(match self.txn(t).await {
                    Err(
                        e @ (MetaError::TooLarge(_)
                        | MetaError::DuplicateKey(_)
                        | MetaError::LeaseNotFound(_)),
                    ) => Err(e),
                    Err(e) => return Err(e),
                    ok => ok,
                });
            }
            Ok(out)
        }
    }
    /// A new lease that expires `ttl` from now unless kept alive.
    fn grant_lease(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId, MetaError>> + Send;
    /// Restarts a lease's time to live; `LeaseNotFound` once it has expired.
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<(), MetaError>> + Send;
    /// Ends a lease now and deletes its keys.
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<(), MetaError>> + Send;
}
