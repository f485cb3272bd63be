//! The attaching machine's write-ahead log: every write lands here, durable
//! before a FLUSH or FUA is acknowledged, so a crash of this machine loses
//! nothing that was acknowledged. Records are encrypted (AES-256-XTS with a
//! key derived from the volume key) and authenticated (keyed blake3), so
//! nothing in plaintext reaches the disk and a torn or altered record is
//! recognised.
//!
//! Layout under the log's folder (drawn in docs/formats.md):
//!
//! ```text
//! meta            magic, version, volume id, key check of the log key
//! trim            the highest LSN no longer needed (u64 LE), replaced atomically
//! 00000001.log    records back to back; a new log file starts past LOG_FILE_LIMIT
//! ```
//!
//! A record: a 72-byte header (magic `MDWL`, version, kind, LSN, first
//! sector, sector count, payload length, MAC) and its encrypted sectors.
//! LSNs are consecutive. Replay reads each log file in order and stops at
//! the first record that is short, fails its MAC or breaks the LSN
//! sequence: that can only be the unsynced tail of the last log file (which
//! is then cut off); anywhere else it is damage, and opening fails rather
//! than silently drop acknowledged writes.
//!
//! Appends are ordered (one at a time, into the page cache through the
//! io_uring driver); [`Wal::sync`] makes everything appended so far durable
//! with one `fdatasync` per touched log file, and callers that ask while a
//! sync runs are covered by the next one (group commit).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Mutex;
use zeroize::Zeroizing;

use crate::codec::key::{VOLUME_ID_LEN, VolumeKey};
use crate::codec::{SECTOR_SIZE, SectorCipher};
use crate::sys::durable;
use crate::sys::uring::{RegisteredFile, Uring};

/// A log file is closed once it passes this size.
pub const LOG_FILE_LIMIT: u64 = 64 << 20;
/// Header bytes of a record.
pub const HEADER_LEN: usize = 72;
/// Most sectors one record carries (a 32 MiB NBD write is split).
pub const MAX_SECTORS: u64 = 2048;

const MAGIC: &[u8; 4] = b"MDWL";
const META_MAGIC: &[u8; 8] = b"MDWLMETA";
const VERSION: u16 = 1;
const KIND_WRITE: u8 = 1;
const KIND_ZERO: u8 = 2;
const KEY_CONTEXT: &str = "meshdisk 2026 write-ahead log encryption";
const MAC_CONTEXT: &str = "meshdisk 2026 write-ahead log authentication";

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(
        "write-ahead log {0} belongs to another volume or key: use the cache folder of this volume, or move that one away"
    )]
    NotOurs(PathBuf),
    #[error(
        "write-ahead log {path} is damaged in log file {log_file}, offset {offset}: {why} (records after it were acknowledged; refusing to drop them)"
    )]
    Damaged { path: PathBuf, log_file: u32, offset: u64, why: String },
    #[error("write-ahead log {path} is poisoned by an earlier I/O error ({first})")]
    Poisoned { path: PathBuf, first: String },
    #[error("a log record holds 1 to {MAX_SECTORS} whole sectors")]
    BadRecord,
}

/// What a record says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// `data` (whole sectors, plaintext in memory) written at `sector`.
    Write { sector: u64, data: Vec<u8> },
    /// `count` sectors from `sector` read as zeros (TRIM, WRITE_ZEROES).
    Zero { sector: u64, count: u64 },
}

/// A replayed record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub lsn: u64,
    pub entry: Entry,
}

/// One numbered file of the log.
struct LogFile {
    file: Arc<RegisteredFile>,
    last_lsn: u64,
    /// Appended since the last sync.
    dirty: bool,
}

struct Tail {
    /// Log files by number; the last is the one appended to.
    files: BTreeMap<u32, LogFile>,
    end: u64,
    next_lsn: u64,
}

/// The log. Cheap to clone.
#[derive(Clone)]
pub struct Wal {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    ring: Uring,
    cipher: SectorCipher,
    mac_key: Zeroizing<[u8; 32]>,
    tail: Mutex<Tail>,
    /// Every LSN up to this is durable.
    durable: AtomicU64,
    sync_lock: Mutex<()>,
    trimmed: AtomicU64,
    file_limit: u64,
    first_error: std::sync::Mutex<Option<String>>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> WalError {
    WalError::Io { path: path.to_owned(), message: e.to_string() }
}

fn log_file_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{n:08}.log"))
}

struct Header {
    kind: u8,
    lsn: u64,
    sector: u64,
    count: u64,
    payload_len: u32,
    mac: [u8; 32],
}

impl Header {
    fn encode_unsealed(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6] = self.kind;
        b[8..16].copy_from_slice(&self.lsn.to_le_bytes());
        b[16..24].copy_from_slice(&self.sector.to_le_bytes());
        b[24..32].copy_from_slice(&self.count.to_le_bytes());
        b[32..36].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < HEADER_LEN || &b[..4] != MAGIC || u16::from_le_bytes([b[4], b[5]]) != VERSION {
            return None;
        }
        Some(Self {
            kind: b[6],
            lsn: u64::from_le_bytes(b[8..16].try_into().ok()?),
            sector: u64::from_le_bytes(b[16..24].try_into().ok()?),
            count: u64::from_le_bytes(b[24..32].try_into().ok()?),
            payload_len: u32::from_le_bytes(b[32..36].try_into().ok()?),
            mac: b[40..72].try_into().ok()?,
        })
    }
}

impl Wal {
    /// Opens (or creates) the log of volume `volume` in `dir` with `key`;
    /// returns it and every record after the trim point, in LSN order.
    pub async fn open(
        ring: &Uring,
        dir: &Path,
        key: &VolumeKey,
        volume: &[u8; VOLUME_ID_LEN],
    ) -> Result<(Wal, Vec<Record>), WalError> {
        Self::open_with_file_limit(ring, dir, key, volume, LOG_FILE_LIMIT).await
    }

    async fn open_with_file_limit(
        ring: &Uring,
        dir: &Path,
        key: &VolumeKey,
        volume: &[u8; VOLUME_ID_LEN],
        file_limit: u64,
    ) -> Result<(Wal, Vec<Record>), WalError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let wal_key = key.derive(KEY_CONTEXT).map_err(|e| io_err(dir, e))?;
        let mac_key = key.derive_mac_key(MAC_CONTEXT);
        check_meta(dir, volume, &mac_key)?;
        let trimmed = match std::fs::read(dir.join("trim")) {
            Ok(b) if b.len() == 8 => u64::from_le_bytes(b.try_into().expect("8 bytes")),
            Ok(_) => return Err(io_err(&dir.join("trim"), "not 8 bytes")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(&dir.join("trim"), e)),
        };
        let mut numbers: Vec<u32> = std::fs::read_dir(dir)
            .map_err(|e| io_err(dir, e))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
            .collect();
        numbers.sort_unstable();
        let cipher = SectorCipher::new(&wal_key);
        let mut records = Vec::new();
        let mut files = BTreeMap::new();
        let mut next_lsn = trimmed + 1;
        let mut end = 0;
        let mut expected: Option<u64> = None;
        for (i, &n) in numbers.iter().enumerate() {
            let path = log_file_path(dir, n);
            let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
            let last = i + 1 == numbers.len();
            let mut at = 0usize;
            let mut last_lsn = 0;
            loop {
                if at == bytes.len() {
                    break;
                }
                match read_record(&bytes[at..], &cipher, &mac_key) {
                    Ok((header, entry, len)) if expected.is_none_or(|e| header.lsn == e) => {
                        expected = Some(header.lsn + 1);
                        last_lsn = header.lsn;
                        next_lsn = header.lsn + 1;
                        if header.lsn > trimmed {
                            records.push(Record { lsn: header.lsn, entry });
                        }
                        at += len;
                    }
                    other => {
                        let why = match other {
                            Ok((h, _, _)) => {
                                format!("LSN {} where {} was expected", h.lsn, expected.unwrap_or(0))
                            }
                            Err(w) => w,
                        };
                        if !last {
                            return Err(WalError::Damaged {
                                path: path.clone(),
                                log_file: n,
                                offset: at as u64,
                                why,
                            });
                        }
                        // The unsynced tail of the last log file: cut it off.
                        tracing::info!(
                            "write-ahead log {}: dropping {} bytes of an unfinished tail ({why})",
                            path.display(),
                            bytes.len() - at
                        );
                        let f = std::fs::OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(|e| io_err(&path, e))?;
                        f.set_len(at as u64).and_then(|()| f.sync_all()).map_err(|e| io_err(&path, e))?;
                        break;
                    }
                }
            }
            if last {
                end = at as u64;
            }
            if last_lsn != 0 && last_lsn <= trimmed && !last {
                // Fully trimmed: a crash came between the trim and the delete.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let file = open_log_file(ring, dir, n)?;
            files.insert(n, LogFile { file: Arc::new(file), last_lsn, dirty: false });
        }
        if files.is_empty() {
            let file = open_log_file(ring, dir, 1)?;
            durable::sync_dir(dir).map_err(|e| io_err(dir, e))?;
            files.insert(1, LogFile { file: Arc::new(file), last_lsn: 0, dirty: false });
            end = 0;
        }
        let wal = Wal {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                ring: ring.clone(),
                cipher,
                mac_key,
                tail: Mutex::new(Tail { files, end, next_lsn }),
                durable: AtomicU64::new(next_lsn - 1),
                sync_lock: Mutex::new(()),
                trimmed: AtomicU64::new(trimmed),
                file_limit,
                first_error: std::sync::Mutex::new(None),
            }),
        };
        Ok((wal, records))
    }

    fn check(&self) -> Result<(), WalError> {
        match self.inner.first_error.lock().expect("not poisoned").clone() {
            Some(first) => Err(WalError::Poisoned { path: self.inner.dir.clone(), first }),
            None => Ok(()),
        }
    }

    fn poison(&self, what: &str, e: impl std::fmt::Display) -> WalError {
        let message = format!("{what}: {e}");
        tracing::error!("write-ahead log {} poisoned: {message}", self.inner.dir.display());
        self.inner.first_error.lock().expect("not poisoned").get_or_insert(message.clone());
        WalError::Io { path: self.inner.dir.clone(), message }
    }

    /// Appends a record (not yet durable: see [`Wal::sync`]); its LSN.
    pub async fn append(&self, entry: &Entry) -> Result<u64, WalError> {
        self.check()?;
        let (kind, sector, count, plain) = match entry {
            Entry::Write { sector, data } => {
                if data.is_empty()
                    || data.len() % SECTOR_SIZE != 0
                    || data.len() as u64 > MAX_SECTORS * SECTOR_SIZE as u64
                {
                    return Err(WalError::BadRecord);
                }
                (KIND_WRITE, *sector, (data.len() / SECTOR_SIZE) as u64, Some(data))
            }
            Entry::Zero { sector, count } => (KIND_ZERO, *sector, *count, None),
        };
        if sector.checked_add(count).is_none() {
            return Err(WalError::BadRecord);
        }
        let mut tail = self.inner.tail.lock().await;
        let lsn = tail.next_lsn;
        let payload_len = plain.map_or(0, |p| p.len());
        let mut buf = vec![0u8; HEADER_LEN + payload_len];
        if let Some(p) = plain {
            // The LSN is the tweak's second half: one sector written twice
            // is encrypted two ways.
            self.inner.cipher.encrypt(sector, lsn, p, &mut buf[HEADER_LEN..]);
        }
        let mut header = Header { kind, lsn, sector, count, payload_len: payload_len as u32, mac: [0; 32] };
        let unsealed = header.encode_unsealed();
        header.mac = mac(&self.inner.mac_key, &unsealed[..40], &buf[HEADER_LEN..]);
        buf[..40].copy_from_slice(&unsealed[..40]);
        buf[40..72].copy_from_slice(&header.mac);
        if tail.end >= self.inner.file_limit {
            // The old log file is synced before the next one exists: only
            // the last log file may ever end in a torn record.
            let old = tail.files.values_mut().next_back().expect("a tail log file");
            if std::mem::replace(&mut old.dirty, false) {
                let file = old.file.clone();
                if let Err(e) = self.inner.ring.fsync(&file, true).await {
                    return Err(self.poison("syncing a full log file", e));
                }
            }
            let n = tail.files.keys().next_back().copied().unwrap_or(0) + 1;
            let file = open_log_file(&self.inner.ring, &self.inner.dir, n)?;
            // The new name must survive a crash before records in it are
            // acknowledged.
            if let Err(e) = durable::sync_dir(&self.inner.dir) {
                return Err(self.poison("syncing the log's folder", e));
            }
            tail.files.insert(n, LogFile { file: Arc::new(file), last_lsn: 0, dirty: false });
            tail.end = 0;
        }
        // Claim the range and the LSN first: if this future is dropped while
        // the kernel still writes, nothing may reuse them; the guard poisons
        // the log, since a hole before later records would cut them off.
        let offset = tail.end;
        tail.end = offset + (HEADER_LEN + payload_len) as u64;
        tail.next_lsn = lsn + 1;
        let current = tail.files.values_mut().next_back().expect("a tail log file");
        let file = current.file.clone();
        current.dirty = true;
        current.last_lsn = lsn;
        let mut unfinished = Unfinished(Some(self));
        let written = self.inner.ring.write_all_at(&file, offset, bytes::Bytes::from(buf), 0).await;
        unfinished.0 = None;
        if let Err(e) = written {
            return Err(self.poison("appending a record", e));
        }
        Ok(lsn)
    }

    /// Makes every record up to `lsn` durable (and whatever else was
    /// appended by then).
    pub async fn sync(&self, lsn: u64) -> Result<(), WalError> {
        if self.inner.durable.load(Ordering::Acquire) >= lsn {
            return self.check();
        }
        let _turn = self.inner.sync_lock.lock().await;
        if self.inner.durable.load(Ordering::Acquire) >= lsn {
            return self.check();
        }
        self.check()?;
        let (files, upto) = {
            let mut tail = self.inner.tail.lock().await;
            let upto = tail.next_lsn - 1;
            let files: Vec<Arc<RegisteredFile>> = tail
                .files
                .values_mut()
                .filter_map(|s| std::mem::replace(&mut s.dirty, false).then(|| s.file.clone()))
                .collect();
            (files, upto)
        };
        for f in files {
            if let Err(e) = self.inner.ring.fsync(&f, true).await {
                return Err(self.poison("syncing the log", e));
            }
        }
        self.inner.durable.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// The newest LSN appended so far.
    pub async fn last_lsn(&self) -> u64 {
        self.inner.tail.lock().await.next_lsn - 1
    }

    /// Records up to `lsn` are no longer needed (their stripes are
    /// committed): remembers that durably and deletes whole log files that
    /// hold nothing newer.
    pub async fn trim(&self, lsn: u64) -> Result<(), WalError> {
        self.check()?;
        if lsn <= self.inner.trimmed.load(Ordering::Acquire) {
            return Ok(());
        }
        let dir = &self.inner.dir;
        durable::replace(&dir.join("trim"), &lsn.to_le_bytes(), 0o644).map_err(|e| io_err(dir, e))?;
        self.inner.trimmed.fetch_max(lsn, Ordering::AcqRel);
        let mut tail = self.inner.tail.lock().await;
        let tail_n = *tail.files.keys().next_back().expect("a tail log file");
        let done: Vec<u32> =
            tail.files.iter().filter(|(n, s)| **n != tail_n && s.last_lsn <= lsn).map(|(n, _)| *n).collect();
        for n in done {
            tail.files.remove(&n);
            let _ = std::fs::remove_file(log_file_path(dir, n));
        }
        Ok(())
    }

    /// Bytes of log on disk (for reporting and for bounding the log).
    pub async fn size(&self) -> u64 {
        let tail = self.inner.tail.lock().await;
        (tail.files.len().saturating_sub(1)) as u64 * self.inner.file_limit + tail.end
    }
}

/// Poisons the log if an append is dropped before its write completed.
struct Unfinished<'a>(Option<&'a Wal>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(wal) = self.0 {
            wal.poison("appending a record", "the append was cancelled before its write completed");
        }
    }
}

fn mac(key: &[u8; 32], header: &[u8], payload: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(header);
    h.update(payload);
    *h.finalize().as_bytes()
}

/// Parses, authenticates and decrypts one record at the start of `b`;
/// returns it and its length, or why it is not a whole valid record.
fn read_record(
    b: &[u8],
    cipher: &SectorCipher,
    mac_key: &[u8; 32],
) -> Result<(Header, Entry, usize), String> {
    let h = Header::parse(b).ok_or("no record header")?;
    let len = HEADER_LEN + h.payload_len as usize;
    if b.len() < len {
        return Err(format!("record of {len} bytes cut short at {}", b.len()));
    }
    let payload = &b[HEADER_LEN..len];
    let expect = mac(mac_key, &b[..40], payload);
    if blake3::Hash::from_bytes(expect) != blake3::Hash::from_bytes(h.mac) {
        return Err("record fails its MAC".into());
    }
    let entry = match h.kind {
        KIND_WRITE if h.payload_len as u64 == h.count * SECTOR_SIZE as u64 && h.count >= 1 => {
            let mut data = vec![0u8; payload.len()];
            cipher.decrypt(h.sector, h.lsn, payload, &mut data);
            Entry::Write { sector: h.sector, data }
        }
        KIND_ZERO if h.payload_len == 0 => Entry::Zero { sector: h.sector, count: h.count },
        k => return Err(format!("record of unknown kind {k}")),
    };
    Ok((h, entry, len))
}

fn open_log_file(ring: &Uring, dir: &Path, n: u32) -> Result<RegisteredFile, WalError> {
    let path = log_file_path(dir, n);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    ring.register(f).map_err(|e| io_err(&path, e))
}

/// Creates the log's identity file, or checks that the log belongs to this
/// volume and key.
fn check_meta(dir: &Path, volume: &[u8; VOLUME_ID_LEN], mac_key: &[u8; 32]) -> Result<(), WalError> {
    let path = dir.join("meta");
    let mut want = META_MAGIC.to_vec();
    want.extend_from_slice(volume);
    want.extend_from_slice(&mac(mac_key, b"meta", volume));
    match std::fs::read(&path) {
        Ok(have) if have == want => Ok(()),
        Ok(_) => Err(WalError::NotOurs(dir.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            durable::replace(&path, &want, 0o644).map_err(|e| io_err(&path, e))
        }
        Err(e) => Err(io_err(&path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> VolumeKey {
        VolumeKey::from_bytes(&(0..64).map(|i| i as u8).collect::<Vec<_>>()).unwrap()
    }

    fn sectors(fill: u8, n: usize) -> Vec<u8> {
        (0..n * SECTOR_SIZE).map(|i| fill ^ (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn records_replay_in_order_encrypted_at_rest() {
        let ring = Uring::new(64).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let vol = [3u8; 16];
        let (wal, replay) = Wal::open(&ring, dir.path(), &key(), &vol).await.unwrap();
        assert!(replay.is_empty());
        let a = Entry::Write { sector: 10, data: sectors(0xaa, 2) };
        let b = Entry::Zero { sector: 100, count: 64 };
        let c = Entry::Write { sector: 10, data: sectors(0xaa, 2) };
        assert_eq!(wal.append(&a).await.unwrap(), 1);
        assert_eq!(wal.append(&b).await.unwrap(), 2);
        assert_eq!(wal.append(&c).await.unwrap(), 3);
        wal.sync(3).await.unwrap();
        drop(wal);
        let raw = std::fs::read(dir.path().join("00000001.log")).unwrap();
        let plain = sectors(0xaa, 2);
        assert!(!raw.windows(64).any(|w| w == &plain[..64]), "plaintext on disk");
        // The same data at the same sector is stored differently each time.
        let first = &raw[HEADER_LEN..HEADER_LEN + 64];
        assert_eq!(raw.windows(64).filter(|w| *w == first).count(), 1);

        let (wal, replay) = Wal::open(&ring, dir.path(), &key(), &vol).await.unwrap();
        let entries: Vec<_> = replay.iter().map(|r| (r.lsn, r.entry.clone())).collect();
        assert_eq!(entries, vec![(1, a), (2, b), (3, c.clone())]);
        assert_eq!(wal.append(&c).await.unwrap(), 4);

        // Another key or volume: refused, not read as garbage.
        drop(wal);
        let other = VolumeKey::generate().unwrap();
        assert!(matches!(Wal::open(&ring, dir.path(), &other, &vol).await, Err(WalError::NotOurs(_))));
        assert!(matches!(Wal::open(&ring, dir.path(), &key(), &[4; 16]).await, Err(WalError::NotOurs(_))));
        assert!(matches!(wal_append_bad(&ring, dir.path(), &vol).await, Err(WalError::BadRecord)));
    }

    async fn wal_append_bad(ring: &Uring, dir: &Path, vol: &[u8; 16]) -> Result<u64, WalError> {
        let (wal, _) = Wal::open(ring, dir, &key(), vol).await.unwrap();
        wal.append(&Entry::Write { sector: 0, data: vec![1; 100] }).await
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_damage_elsewhere_is_refused() {
        let ring = Uring::new(64).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let vol = [1u8; 16];
        let (wal, _) = Wal::open(&ring, dir.path(), &key(), &vol).await.unwrap();
        for i in 0..4u8 {
            wal.append(&Entry::Write { sector: u64::from(i), data: sectors(i, 1) }).await.unwrap();
        }
        wal.sync(4).await.unwrap();
        drop(wal);
        let file = dir.path().join("00000001.log");
        let len = std::fs::metadata(&file).unwrap().len();
        let one = (HEADER_LEN + SECTOR_SIZE) as u64;
        // Cut the last record in half: three remain, and the log goes on.
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len - one / 2).unwrap();
        let (wal, replay) = Wal::open(&ring, dir.path(), &key(), &vol).await.unwrap();
        assert_eq!(replay.iter().map(|r| r.lsn).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 3 * one, "the torn tail is cut off");
        assert_eq!(wal.append(&Entry::Zero { sector: 0, count: 1 }).await.unwrap(), 4);
        wal.sync(4).await.unwrap();
        drop(wal);
        // A flipped byte in the tail record: it is dropped.
        let mut bytes = std::fs::read(&file).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        let (_, replay) = Wal::open(&ring, dir.path(), &key(), &vol).await.unwrap();
        assert_eq!(replay.len(), 3);
        // A flipped byte in an earlier log file than the tail: refused.
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[HEADER_LEN + 5] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        std::fs::write(dir.path().join("00000002.log"), b"").unwrap();
        let err = Wal::open(&ring, dir.path(), &key(), &vol).await.err().expect("damage is an error");
        assert!(matches!(err, WalError::Damaged { log_file: 1, offset: 0, .. }), "{err}");
        assert!(err.to_string().contains("refusing to drop them"), "{err}");
    }

    #[tokio::test]
    async fn trimming_forgets_records_and_deletes_whole_log_files() {
        let ring = Uring::new(64).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let vol = [2u8; 16];
        // 16 KiB records: 16 of them pass one 256 KiB log file.
        let (wal, _) = Wal::open_with_file_limit(&ring, dir.path(), &key(), &vol, 256 << 10).await.unwrap();
        let big = sectors(7, 4);
        for i in 0..40u64 {
            wal.append(&Entry::Write { sector: i * 4, data: big.clone() }).await.unwrap();
        }
        wal.sync(40).await.unwrap();
        assert!(dir.path().join("00000002.log").exists());
        assert!(dir.path().join("00000003.log").exists());
        wal.trim(35).await.unwrap();
        assert!(!dir.path().join("00000001.log").exists(), "a fully trimmed log file is deleted");
        assert!(!dir.path().join("00000002.log").exists(), "a fully trimmed log file is deleted");
        assert!(dir.path().join("00000003.log").exists());
        drop(wal);
        let (_, replay) = Wal::open(&ring, dir.path(), &key(), &vol).await.unwrap();
        assert_eq!(replay.iter().map(|r| r.lsn).collect::<Vec<_>>(), (36..=40).collect::<Vec<_>>());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        /// Whatever is synced survives any cut of what follows; what
        /// replays is a prefix of what was appended, byte for byte.
        #[test]
        fn synced_records_survive_any_torn_tail(
            ops in proptest::collection::vec((0u64..64, 1usize..4, any::<u8>(), any::<bool>()), 1..30),
            cut in any::<proptest::sample::Index>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let ring = Uring::new(64).unwrap();
                let dir = tempfile::tempdir().unwrap();
                let vol = [9u8; 16];
                let (wal, _) = Wal::open(&ring, dir.path(), &key(), &vol).await.unwrap();
                let mut appended = Vec::new();
                let mut synced_len = 0u64;
                let mut offset = 0u64;
                for (sector, n, fill, sync) in ops {
                    let e = Entry::Write { sector, data: sectors(fill, n) };
                    let lsn = wal.append(&e).await.unwrap();
                    offset += (HEADER_LEN + n * SECTOR_SIZE) as u64;
                    appended.push((lsn, e));
                    if sync {
                        wal.sync(lsn).await.unwrap();
                        synced_len = offset;
                    }
                }
                drop(wal);
                let file = dir.path().join("00000001.log");
                let len = std::fs::metadata(&file).unwrap().len();
                let cut_at = synced_len + cut.index((len - synced_len + 1) as usize) as u64;
                std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(cut_at).unwrap();
                let (_, replay) = Wal::open(&ring, dir.path(), &key(), &vol).await.unwrap();
                let got: Vec<(u64, Entry)> = replay.into_iter().map(|r| (r.lsn, r.entry)).collect();
                prop_assert!(got.len() <= appended.len());
                prop_assert_eq!(&got[..], &appended[..got.len()]);
                let synced = appended.iter().scan(0u64, |off, (lsn, e)| {
                    let Entry::Write { data, .. } = e else { unreachable!() };
                    *off += (HEADER_LEN + data.len()) as u64;
                    Some((*lsn, *off))
                }).filter(|(_, off)| *off <= synced_len).count();
                prop_assert!(got.len() >= synced, "{} replayed, {} were synced", got.len(), synced);
                Ok(())
            })?;
        }
    }
}
