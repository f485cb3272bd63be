//! What scrub needs of the store: a full check of one shard that reports
//! its outcome, a listing of every shard in key order, the scrub's own
//! state (tables `scrub` and `scrub_faults`, docs/formats.md), and the
//! shards found bad and not yet acknowledged by the directory.
//!
//! A bad shard is recorded where it is found, by whoever finds it: the
//! scrub ([`ShardStore::verify`]) or any read ([`ShardStore::get`],
//! `get_blocks`, `get_header`) that fails its check and, on a second look,
//! still finds the shard indexed at the bytes it read (so a shard deleted
//! or replaced while it was read is never called bad). A shard whose bytes
//! cannot be read at all (a bad sector, a lost data file) is bad the same
//! way: recorded, answered as bad, never a reason to stop. The record is
//! durable before anyone is told, so a crash between finding and reporting
//! loses nothing; it stays until the directory has acknowledged it
//! ([`ShardStore::acknowledge_faults`]), or until the shard is replaced or
//! deleted (a rebuild wrote a good copy here: nothing left to report).

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::index::{Location, SegmentIndexKey};
use super::{SEGMENTS, ShardStore, StoreError};
use crate::codec::segment::{SegmentError, SegmentRoot, SegmentShardKey, parse_segment_shard, verify_header};

/// The scrub's progress: field name → value (8-byte little-endian
/// numbers, the cursor a 25-byte shard key).
pub(super) const SCRUB: TableDefinition<&str, &[u8]> = TableDefinition::new("scrub");
/// Shards found bad, not yet acknowledged: shard key → the location that
/// was bad ‖ what was wrong (UTF-8).
pub(super) const SCRUB_FAULTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("scrub_faults");

/// Where the scrub is, as persisted (every field survives a restart).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubState {
    /// The last shard checked in the running pass (`None`: from the start).
    pub cursor: Option<SegmentShardKey>,
    /// When the running pass started (Unix ms); `None` between passes.
    pub pass_started_ms: Option<u64>,
    /// Whether the running pass was asked for (`meshdisk scrub start`):
    /// it runs at the rate cap instead of spread over the period.
    pub requested: bool,
    /// Bytes checked in the running pass.
    pub checked: u64,
    /// Passes finished since the store was made.
    pub passes: u64,
    /// When the last pass started and ended (Unix ms).
    pub last_started_ms: Option<u64>,
    pub last_ended_ms: Option<u64>,
    /// When the next pass starts (Unix ms); `None` until first scheduled.
    pub next_ms: Option<u64>,
    /// The newest `scrub start` request (its time on the directory) this
    /// store has acted on.
    pub start_seen: Option<u64>,
    /// Bad shards found since the store was made (scrub and reads).
    /// Counted when a fault is recorded; [`ShardStore::save_scrub`] leaves
    /// it alone.
    pub found: u64,
}

/// A shard found bad and not yet acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub key: SegmentShardKey,
    pub problem: String,
    loc: Location,
}

#[cfg(test)]
impl Fault {
    /// A fault of a shard at some location, for tests elsewhere.
    pub fn for_test(key: SegmentShardKey, problem: &str) -> Self {
        Self { key, problem: problem.to_owned(), loc: Location { data_file: 1, offset: 0, len: 1 } }
    }
}

/// What a full check of one shard found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checked {
    /// Sound: this many bytes read and hashed.
    Sound(u64),
    /// Bad (and recorded as a fault): this many bytes read, and why.
    Bad(u64, String),
    /// Not stored (any more): nothing to check.
    Gone,
}

fn num(v: Option<u64>) -> Option<Vec<u8>> {
    v.map(|v| v.to_le_bytes().to_vec())
}

impl ShardStore {
    /// The scrub's persisted state.
    pub fn scrub_state(&self) -> Result<ScrubState, StoreError> {
        self.check()?;
        let txn = self.inner.db.begin_read().map_err(|e| self.io(e))?;
        let t = txn.open_table(SCRUB).map_err(|e| self.io(e))?;
        let get = |name: &str| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(t.get(name).map_err(|e| self.io(e))?.map(|v| v.value().to_vec()))
        };
        let n = |name: &str| -> Result<Option<u64>, StoreError> {
            match get(name)? {
                None => Ok(None),
                Some(b) => Ok(Some(u64::from_le_bytes(
                    b[..].try_into().map_err(|_| self.io(format!("corrupt scrub field {name}")))?,
                ))),
            }
        };
        let cursor = match get("cursor")? {
            None => None,
            Some(b) => Some(SegmentIndexKey::decode(&b).map_err(|e| self.io(e))?),
        };
        Ok(ScrubState {
            cursor,
            pass_started_ms: n("pass_started_ms")?,
            requested: n("requested")?.unwrap_or(0) != 0,
            checked: n("checked")?.unwrap_or(0),
            passes: n("passes")?.unwrap_or(0),
            last_started_ms: n("last_started_ms")?,
            last_ended_ms: n("last_ended_ms")?,
            next_ms: n("next_ms")?,
            start_seen: n("start_seen")?,
            found: n("found")?.unwrap_or(0),
        })
    }

    /// Persists `state` (all but `found`, which only recording a fault
    /// counts).
    pub fn save_scrub(&self, state: &ScrubState) -> Result<(), StoreError> {
        self.check()?;
        let e = |e: &dyn std::fmt::Display| self.io(e);
        let txn = self.inner.db.begin_write().map_err(|x| e(&x))?;
        {
            let mut t = txn.open_table(SCRUB).map_err(|x| e(&x))?;
            let cursor = state.cursor.as_ref().map(|c| SegmentIndexKey::encode(c).to_vec());
            let fields: [(&str, Option<Vec<u8>>); 9] = [
                ("cursor", cursor),
                ("pass_started_ms", num(state.pass_started_ms)),
                ("requested", num(Some(u64::from(state.requested)))),
                ("checked", num(Some(state.checked))),
                ("passes", num(Some(state.passes))),
                ("last_started_ms", num(state.last_started_ms)),
                ("last_ended_ms", num(state.last_ended_ms)),
                ("next_ms", num(state.next_ms)),
                ("start_seen", num(state.start_seen)),
            ];
            for (name, value) in fields {
                match value {
                    Some(v) => t.insert(name, &v[..]).map(drop),
                    None => t.remove(name).map(drop),
                }
                .map_err(|x| e(&x))?;
            }
        }
        txn.commit().map_err(|x| e(&x))
    }

    /// Records one bad shard found by a read (see the module docs).
    pub(super) fn record_fault(&self, key: &SegmentShardKey, loc: Location, problem: String) {
        let fault = Fault { key: *key, problem, loc };
        // The scrub's other fields are its own: only the fault and the
        // count are written here.
        let saved = (|| -> Result<(), String> {
            let e = |e: &dyn std::fmt::Display| e.to_string();
            let txn = self.inner.db.begin_write().map_err(|x| e(&x))?;
            {
                let mut f = txn.open_table(SCRUB_FAULTS).map_err(|x| e(&x))?;
                if insert_fault(&mut f, &fault).map_err(|x| e(&x))? {
                    let mut t = txn.open_table(SCRUB).map_err(|x| e(&x))?;
                    let found = t
                        .get("found")
                        .map_err(|x| e(&x))?
                        .map_or(0, |v| u64::from_le_bytes(v.value().try_into().unwrap_or([0; 8])));
                    t.insert("found", &(found + 1).to_le_bytes()[..]).map_err(|x| e(&x))?;
                }
            }
            txn.commit().map_err(|x| e(&x))
        })();
        match saved {
            Ok(()) => {
                tracing::warn!("shard {key:?} is bad ({}): reporting it to the directory", fault.problem);
                self.inner.faults.notify_one();
            }
            Err(e) => {
                tracing::warn!("shard {key:?} is bad ({}), and recording that failed: {e}", fault.problem)
            }
        }
    }

    /// Records a bad shard as [`ShardStore::record_fault`] does, off the
    /// async threads (the record is a durable commit: an fsync).
    pub(super) async fn note_fault(&self, key: &SegmentShardKey, loc: Location, problem: String) {
        let (me, key) = (self.clone(), *key);
        if let Err(e) = tokio::task::spawn_blocking(move || me.record_fault(&key, loc, problem)).await {
            tracing::warn!("shard {key:?} is bad, and recording that failed: {e}");
        }
    }

    /// Waits until a fault is recorded.
    pub async fn fault_recorded(&self) {
        self.inner.faults.notified().await;
    }

    /// The faults not yet acknowledged whose shard is still stored where
    /// it was bad; the others (replaced or deleted since) are dropped.
    pub fn pending_faults(&self) -> Result<Vec<Fault>, StoreError> {
        self.check()?;
        let e = |e: &dyn std::fmt::Display| self.io(e);
        let mut all = Vec::new();
        {
            let txn = self.inner.db.begin_read().map_err(|x| e(&x))?;
            let f = txn.open_table(SCRUB_FAULTS).map_err(|x| e(&x))?;
            for row in f.iter().map_err(|x| e(&x))? {
                let (k, v) = row.map_err(|x| e(&x))?;
                let key = SegmentIndexKey::decode(k.value()).map_err(|x| e(&x))?;
                let v = v.value();
                let loc = Location::decode(v.get(..16).unwrap_or_default()).map_err(|x| e(&x))?;
                let problem = String::from_utf8_lossy(&v[16..]).into_owned();
                all.push(Fault { key, problem, loc });
            }
        }
        let mut live = Vec::new();
        let mut stale = Vec::new();
        for fault in all {
            if self.locate(&fault.key)? == Some(fault.loc) { live.push(fault) } else { stale.push(fault) }
        }
        if !stale.is_empty() {
            self.acknowledge_faults(&stale)?;
        }
        Ok(live)
    }

    /// Forgets `faults` (the directory has them), unless one was recorded
    /// again for another copy meanwhile.
    pub fn acknowledge_faults(&self, faults: &[Fault]) -> Result<(), StoreError> {
        let e = |e: &dyn std::fmt::Display| self.io(e);
        let txn = self.inner.db.begin_write().map_err(|x| e(&x))?;
        {
            let mut f = txn.open_table(SCRUB_FAULTS).map_err(|x| e(&x))?;
            for fault in faults {
                let k = SegmentIndexKey::encode(&fault.key);
                let same = f
                    .get(&k[..])
                    .map_err(|x| e(&x))?
                    .is_some_and(|v| v.value().get(..16) == Some(&fault.loc.encode()[..]));
                if same {
                    f.remove(&k[..]).map_err(|x| e(&x))?;
                }
            }
        }
        txn.commit().map_err(|x| e(&x))
    }

    /// Up to `limit` shards of every volume, in key order, after `after`,
    /// each with its stored length (header + payload).
    pub fn list_all(
        &self,
        after: Option<SegmentShardKey>,
        limit: usize,
    ) -> Result<Vec<(SegmentShardKey, u64)>, StoreError> {
        use std::ops::Bound::{Excluded, Unbounded};
        self.check()?;
        let txn = self.inner.db.begin_read().map_err(|e| self.io(e))?;
        let index = txn.open_table(SEGMENTS).map_err(|e| self.io(e))?;
        let from = after.map(|a| SegmentIndexKey::encode(&a));
        let range = match &from {
            Some(after) => index.range::<&[u8]>((Excluded(&after[..]), Unbounded)),
            None => index.range::<&[u8]>(..),
        };
        let mut out = Vec::new();
        for item in range.map_err(|e| self.io(e))?.take(limit) {
            let (k, v) = item.map_err(|e| self.io(e))?;
            let key = SegmentIndexKey::decode(k.value()).map_err(|e| self.io(e))?;
            let loc = Location::decode(v.value().get(..16).unwrap_or_default()).map_err(|e| self.io(e))?;
            out.push((key, u64::from(loc.len)));
        }
        Ok(out)
    }

    /// Reads shard `key` whole and checks it as [`ShardStore::get`] does
    /// (its header names the key, its own root is the index entry's, its
    /// payload hashes to it) and, given its segment's `root`, that the
    /// header's roots make that segment root. A bad shard is recorded as
    /// a fault; one deleted or replaced while it was read is checked again.
    pub async fn verify(
        &self,
        key: &SegmentShardKey,
        root: Option<SegmentRoot>,
    ) -> Result<Checked, StoreError> {
        self.check()?;
        let Some(entry) = self.entry(key)? else { return Ok(Checked::Gone) };
        let loc = entry.loc;
        let bytes = match self.read_location(loc, "a segment shard").await {
            Ok(bytes) => bytes,
            // Unreadable (a bad sector, a lost data file) is bad too,
            // unless the shard moved meanwhile; never a reason to stop.
            Err(e) => {
                let problem = match e {
                    StoreError::Io { message, .. } => format!("unreadable: {message}"),
                    other => format!("unreadable: {other}"),
                };
                return self.found_bad(key, root, loc, 0, problem).await;
            }
        };
        let read = bytes.len() as u64;
        let own = entry.outboard.root();
        let key2 = *key;
        // Hashing up to 16 MiB: off the async threads.
        let problem = tokio::task::spawn_blocking(move || -> Option<String> {
            let (header, payload) = match parse_segment_shard(&bytes) {
                Ok(parsed) => parsed,
                Err(e) => return Some(e.to_string()),
            };
            if SegmentShardKey::of(&header) != key2 {
                return Some(format!("its bytes are those of {:?}", SegmentShardKey::of(&header)));
            }
            if header.own_root() != own || !header.own_root().matches(payload) {
                return Some(SegmentError::ShardRootMismatch { index: header.index }.to_string());
            }
            let header_len = bytes.len() - payload.len();
            if let Some(root) = root
                && let Err(e) = verify_header(&bytes[..header_len], &root)
            {
                return Some(e.to_string());
            }
            None
        })
        .await
        .map_err(|e| self.io(format!("hashing a segment shard: {e}")))?;
        let Some(problem) = problem else { return Ok(Checked::Sound(read)) };
        self.found_bad(key, root, loc, read, problem).await
    }

    /// [`ShardStore::verify`] found the copy at `loc` bad after reading
    /// `read` bytes of it: recorded if the shard is still indexed there,
    /// else (it moved while it was read) checked again.
    async fn found_bad(
        &self,
        key: &SegmentShardKey,
        root: Option<SegmentRoot>,
        loc: Location,
        read: u64,
        problem: String,
    ) -> Result<Checked, StoreError> {
        match self.locate(key)? {
            None => Ok(Checked::Gone),
            Some(now) if now != loc => Box::pin(self.verify(key, root)).await,
            Some(_) => {
                self.note_fault(key, loc, problem.clone()).await;
                Ok(Checked::Bad(read, problem))
            }
        }
    }
}

/// Inserts a fault; whether it is new (not already recorded for the same
/// bytes).
fn insert_fault(f: &mut redb::Table<&[u8], &[u8]>, fault: &Fault) -> Result<bool, redb::Error> {
    let k = SegmentIndexKey::encode(&fault.key);
    let loc = fault.loc.encode();
    let known = f.get(&k[..])?.is_some_and(|v| v.value().get(..16) == Some(&loc[..]));
    if known {
        return Ok(false);
    }
    let value = [&loc[..], fault.problem.as_bytes()].concat();
    f.insert(&k[..], &value[..])?;
    Ok(true)
}
