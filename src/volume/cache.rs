//! The attaching machine's stripe cache: a fixed number of slots, each the
//! plaintext size of one stripe, in one file written and read through the
//! io_uring driver and encrypted at rest (AES-256-XTS, a key derived from
//! the volume key, tweak = the volume's sector number). A table of slots
//! (stripe, clean or dirty, the newest log LSN applied, which sectors are
//! present) is memory-mapped.
//!
//! The write-ahead log, not the cache, makes writes durable, so the cache
//! never syncs on the write path. The table is trusted after a clean close
//! only (data synced, then the table, then the "closed" mark): after a
//! crash every slot is dropped, dirty stripes come back from the log's
//! replay and clean ones from the peers.
//!
//! Clean slots are evicted least recently used; dirty slots are never
//! evicted (they leave the dirty state when destaged, [`Cache::mark_clean`]);
//! a write that finds every slot dirty gets [`CacheError::Full`] and waits
//! for destaging.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use memmap2::MmapMut;

use crate::codec::key::{VOLUME_ID_LEN, VolumeKey};
use crate::codec::{SECTOR_SIZE, SectorCipher};
use crate::sys::durable;
use crate::sys::uring::{RegisteredFile, Uring};

const MAGIC: &[u8; 8] = b"MDCACHE1";
const HEADER_LEN: usize = 128;
const KEY_CONTEXT: &str = "meshdisk 2026 cache encryption";
const MAC_CONTEXT: &str = "meshdisk 2026 cache identity";
const STATE_FREE: u8 = 0;
const STATE_CLEAN: u8 = 1;
const STATE_DIRTY: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("every cache slot holds unwritten data: wait for destaging")]
    Full,
    #[error("the cache needs room for at least 2 stripes of {stripe} bytes, got {size}")]
    TooSmall { size: u64, stripe: usize },
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> CacheError {
    CacheError::Io { path: path.to_owned(), message: e.to_string() }
}

/// What the cache holds of one stripe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub stripe: u64,
    pub dirty: bool,
    /// The newest log LSN applied while dirty.
    pub lsn: u64,
    /// One bit per sector of the stripe: present in the cache.
    pub present: Vec<u8>,
}

impl Slot {
    pub fn has(&self, sector: usize) -> bool {
        self.present[sector / 8] & (1 << (sector % 8)) != 0
    }

    pub fn complete(&self, sectors: usize) -> bool {
        let whole = sectors / 8;
        self.present[..whole].iter().all(|&b| b == 0xff) && (whole * 8..sectors).all(|s| self.has(s))
    }
}

struct Table {
    map: MmapMut,
    by_stripe: HashMap<u64, u32>,
    /// Last use per slot, for LRU.
    used: Vec<u64>,
    /// Reads and fills in flight per slot: a pinned slot is not evicted
    /// (a fill landing in a slot reused by another stripe would corrupt it).
    pins: Vec<u32>,
    tick: u64,
}

/// The cache. Share it behind an `Arc`.
pub struct Cache {
    dir: PathBuf,
    ring: Uring,
    file: RegisteredFile,
    cipher: SectorCipher,
    stripe_bytes: usize,
    sectors: usize,
    slots: u32,
    entry_len: usize,
    table: Mutex<Table>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cache({}, {} slots of {} bytes)", self.dir.display(), self.slots, self.stripe_bytes)
    }
}

impl Cache {
    /// Opens (or creates) the cache of `volume` in `dir`: `size` bytes of
    /// stripes of `stripe_bytes` each. A cache made for another volume,
    /// key or geometry, or not closed cleanly, starts empty.
    pub fn open(
        ring: &Uring,
        dir: &Path,
        key: &VolumeKey,
        volume: &[u8; VOLUME_ID_LEN],
        stripe_bytes: usize,
        size: u64,
    ) -> Result<Self, CacheError> {
        let slots = size / stripe_bytes as u64;
        if slots < 2 || !stripe_bytes.is_multiple_of(SECTOR_SIZE) {
            return Err(CacheError::TooSmall { size, stripe: stripe_bytes });
        }
        let slots = u32::try_from(slots).map_err(|_| io_err(dir, "too many cache slots"))?;
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let sectors = stripe_bytes / SECTOR_SIZE;
        let entry_len = (24 + sectors.div_ceil(8)).next_multiple_of(8);
        let mac_key = key.derive_mac_key(MAC_CONTEXT);
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8..24].copy_from_slice(volume);
        header[24..32].copy_from_slice(&(stripe_bytes as u64).to_le_bytes());
        header[32..36].copy_from_slice(&slots.to_le_bytes());
        let mut h = blake3::Hasher::new_keyed(&mac_key);
        h.update(&header[..36]);
        header[36..68].copy_from_slice(h.finalize().as_bytes());
        // header[68] is the "closed cleanly" mark.

        let map_path = dir.join("cache.map");
        let table_len = HEADER_LEN + entry_len * slots as usize;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&map_path)
            .map_err(|e| io_err(&map_path, e))?;
        let old_len = f.metadata().map_err(|e| io_err(&map_path, e))?.len();
        f.set_len(table_len as u64).map_err(|e| io_err(&map_path, e))?;
        // SAFETY: the file is ours (the cache folder belongs to one attach,
        // which holds the volume's lease); nobody else resizes it while mapped.
        let mut map = unsafe { MmapMut::map_mut(&f) }.map_err(|e| io_err(&map_path, e))?;
        let trusted = old_len == table_len as u64 && map[..68] == header[..68] && map[68] == 1;
        if !trusted {
            map.fill(0);
            map[..HEADER_LEN].copy_from_slice(&header);
        }
        // Open: not closed cleanly until `close` says so.
        map[68] = 0;
        map.flush().map_err(|e| io_err(&map_path, e))?;

        let data_path = dir.join("cache.dat");
        let data = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(|e| io_err(&data_path, e))?;
        data.set_len(u64::from(slots) * stripe_bytes as u64).map_err(|e| io_err(&data_path, e))?;
        let file = ring.register(data).map_err(|e| io_err(&data_path, e))?;

        let mut by_stripe = HashMap::new();
        for i in 0..slots {
            let e = &map[HEADER_LEN + i as usize * entry_len..][..entry_len];
            if e[8] != STATE_FREE {
                let stripe = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
                by_stripe.insert(stripe, i);
            }
        }
        let cache_key = key.derive(KEY_CONTEXT).map_err(|e| io_err(dir, e))?;
        Ok(Self {
            dir: dir.to_owned(),
            ring: ring.clone(),
            file,
            cipher: SectorCipher::new(&cache_key),
            stripe_bytes,
            sectors,
            slots,
            entry_len,
            table: Mutex::new(Table {
                map,
                by_stripe,
                used: vec![0; slots as usize],
                pins: vec![0; slots as usize],
                tick: 0,
            }),
        })
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    fn entry<'a>(&self, t: &'a Table, slot: u32) -> &'a [u8] {
        &t.map[HEADER_LEN + slot as usize * self.entry_len..][..self.entry_len]
    }

    fn entry_mut<'a>(&self, t: &'a mut Table, slot: u32) -> &'a mut [u8] {
        &mut t.map[HEADER_LEN + slot as usize * self.entry_len..][..self.entry_len]
    }

    fn slot_of(&self, t: &Table, slot: u32) -> Slot {
        let e = self.entry(t, slot);
        Slot {
            stripe: u64::from_le_bytes(e[..8].try_into().expect("8 bytes")),
            dirty: e[8] == STATE_DIRTY,
            lsn: u64::from_le_bytes(e[16..24].try_into().expect("8 bytes")),
            present: e[24..24 + self.sectors.div_ceil(8)].to_vec(),
        }
    }

    /// What the cache holds of `stripe`.
    pub fn lookup(&self, stripe: u64) -> Option<Slot> {
        let t = self.table.lock().expect("not poisoned");
        t.by_stripe.get(&stripe).map(|&s| self.slot_of(&t, s))
    }

    /// The dirty stripes and their newest LSNs, oldest LSN first.
    pub fn dirty(&self) -> Vec<(u64, u64)> {
        let t = self.table.lock().expect("not poisoned");
        let mut out: Vec<(u64, u64)> = t
            .by_stripe
            .values()
            .map(|&s| self.slot_of(&t, s))
            .filter(|s| s.dirty)
            .map(|s| (s.stripe, s.lsn))
            .collect();
        out.sort_by_key(|&(s, lsn)| (lsn, s));
        out
    }

    /// The slot for `stripe`, taking the least recently used clean (or a
    /// free) one if it has none.
    fn claim(&self, t: &mut Table, stripe: u64) -> Result<u32, CacheError> {
        t.tick += 1;
        let tick = t.tick;
        if let Some(&s) = t.by_stripe.get(&stripe) {
            t.used[s as usize] = tick;
            return Ok(s);
        }
        let victim = (0..self.slots)
            .filter(|&s| self.entry(t, s)[8] != STATE_DIRTY && t.pins[s as usize] == 0)
            .min_by_key(|&s| (self.entry(t, s)[8] != STATE_FREE, t.used[s as usize]))
            .ok_or(CacheError::Full)?;
        let old = self.slot_of(t, victim);
        if self.entry(t, victim)[8] != STATE_FREE {
            t.by_stripe.remove(&old.stripe);
        }
        let e = self.entry_mut(t, victim);
        e.fill(0);
        e[..8].copy_from_slice(&stripe.to_le_bytes());
        e[8] = STATE_CLEAN;
        t.by_stripe.insert(stripe, victim);
        t.used[victim as usize] = tick;
        Ok(victim)
    }

    fn set_present(&self, t: &mut Table, slot: u32, first: usize, count: usize) {
        let e = self.entry_mut(t, slot);
        for s in first..first + count {
            e[24 + s / 8] |= 1 << (s % 8);
        }
    }

    /// Writes sectors `first..` of `stripe` (whole sectors of plaintext),
    /// applied from log record `lsn`: the stripe becomes dirty.
    pub async fn write(&self, stripe: u64, first: usize, data: &[u8], lsn: u64) -> Result<(), CacheError> {
        let count = data.len() / SECTOR_SIZE;
        assert!(
            data.len().is_multiple_of(SECTOR_SIZE) && first + count <= self.sectors,
            "whole sectors of one stripe"
        );
        let slot = {
            let mut t = self.table.lock().expect("not poisoned");
            let slot = self.claim(&mut t, stripe)?;
            // Dirty before the data lands: a concurrent eviction must not
            // pick this slot.
            let e = self.entry_mut(&mut t, slot);
            e[8] = STATE_DIRTY;
            let newest = u64::from_le_bytes(e[16..24].try_into().expect("8 bytes")).max(lsn);
            e[16..24].copy_from_slice(&newest.to_le_bytes());
            slot
        };
        self.store(slot, stripe, first, data).await?;
        let mut t = self.table.lock().expect("not poisoned");
        self.set_present(&mut t, slot, first, count);
        Ok(())
    }

    /// Fills the sectors of `stripe` that the cache does not hold from
    /// `plain` (the whole stripe, as read from the peers); sectors written
    /// since are kept. A full cache of dirty stripes just skips the fill.
    pub async fn fill(&self, stripe: u64, plain: &[u8]) -> Result<(), CacheError> {
        assert_eq!(plain.len(), self.stripe_bytes, "a whole stripe");
        let (slot, missing) = {
            let mut t = self.table.lock().expect("not poisoned");
            let slot = match self.claim(&mut t, stripe) {
                Ok(s) => s,
                Err(CacheError::Full) => return Ok(()),
                Err(e) => return Err(e),
            };
            let s = self.slot_of(&t, slot);
            t.pins[slot as usize] += 1;
            (slot, (0..self.sectors).filter(|&i| !s.has(i)).collect::<Vec<_>>())
        };
        let _pin = Pin { cache: self, slot };
        // Runs of missing sectors, one write each.
        let mut i = 0;
        while i < missing.len() {
            let start = missing[i];
            let mut end = start + 1;
            while i + 1 < missing.len() && missing[i + 1] == end {
                i += 1;
                end += 1;
            }
            i += 1;
            let bytes = &plain[start * SECTOR_SIZE..end * SECTOR_SIZE];
            self.store(slot, stripe, start, bytes).await?;
            let mut t = self.table.lock().expect("not poisoned");
            // Only if the slot still holds this stripe and nothing wrote
            // these sectors meanwhile (a write sets them present itself).
            if t.by_stripe.get(&stripe) == Some(&slot) {
                let s = self.slot_of(&t, slot);
                let untouched: Vec<usize> = (start..end).filter(|&x| !s.has(x)).collect();
                if untouched.len() == end - start {
                    self.set_present(&mut t, slot, start, end - start);
                }
            }
        }
        Ok(())
    }

    fn unpin(&self, slot: u32) {
        let mut t = self.table.lock().expect("not poisoned");
        t.pins[slot as usize] -= 1;
    }

    async fn store(&self, slot: u32, stripe: u64, first: usize, data: &[u8]) -> Result<(), CacheError> {
        let mut buf = vec![0u8; data.len()];
        let sector = stripe * self.sectors as u64 + first as u64;
        self.cipher.encrypt(sector, 0, data, &mut buf);
        let offset = u64::from(slot) * self.stripe_bytes as u64 + (first * SECTOR_SIZE) as u64;
        self.ring
            .write_all_at(&self.file, offset, Bytes::from(buf), 0)
            .await
            .map_err(|e| io_err(&self.dir.join("cache.dat"), e))
    }

    /// Reads sectors `first..first + count` of `stripe` if the cache holds
    /// them all.
    pub async fn read(&self, stripe: u64, first: usize, count: usize) -> Result<Option<Vec<u8>>, CacheError> {
        let slot = {
            let mut t = self.table.lock().expect("not poisoned");
            let Some(&slot) = t.by_stripe.get(&stripe) else { return Ok(None) };
            let s = self.slot_of(&t, slot);
            if !(first..first + count).all(|i| s.has(i)) {
                return Ok(None);
            }
            t.tick += 1;
            let tick = t.tick;
            t.used[slot as usize] = tick;
            t.pins[slot as usize] += 1;
            slot
        };
        let _pin = Pin { cache: self, slot };
        let offset = u64::from(slot) * self.stripe_bytes as u64 + (first * SECTOR_SIZE) as u64;
        let mut data = self
            .ring
            .read_exact_at(&self.file, offset, count * SECTOR_SIZE)
            .await
            .map_err(|e| io_err(&self.dir.join("cache.dat"), e))?;
        self.cipher.decrypt_in_place(stripe * self.sectors as u64 + first as u64, 0, &mut data);
        // The slot may have been evicted and reused while we read.
        let t = self.table.lock().expect("not poisoned");
        if t.by_stripe.get(&stripe) != Some(&slot) {
            return Ok(None);
        }
        Ok(Some(data))
    }

    /// The stripe was destaged with everything up to `lsn`: clean, unless a
    /// newer write arrived meanwhile.
    pub fn mark_clean(&self, stripe: u64, lsn: u64) {
        let mut t = self.table.lock().expect("not poisoned");
        if let Some(&slot) = t.by_stripe.get(&stripe) {
            let e = self.entry_mut(&mut t, slot);
            let newest = u64::from_le_bytes(e[16..24].try_into().expect("8 bytes"));
            if e[8] == STATE_DIRTY && newest <= lsn {
                e[8] = STATE_CLEAN;
            }
        }
    }

    /// Drops `stripe` (after a TRIM of the whole stripe, say), dirty or not.
    pub fn forget(&self, stripe: u64) {
        let mut t = self.table.lock().expect("not poisoned");
        if let Some(slot) = t.by_stripe.remove(&stripe) {
            self.entry_mut(&mut t, slot).fill(0);
        }
    }

    /// Syncs the data, then the table, then marks the cache closed cleanly
    /// so the next open trusts it, and syncs the folder so the files' names
    /// survive a crash too. (The table is mapped memory, flushed in place,
    /// not a small file replaced whole, so it does not go through
    /// `sys::durable`'s write; losing it is safe, only slower.)
    pub async fn close(self) -> Result<(), CacheError> {
        self.ring.fsync(&self.file, true).await.map_err(|e| io_err(&self.dir.join("cache.dat"), e))?;
        let mut t = self.table.lock().expect("not poisoned");
        let path = self.dir.join("cache.map");
        t.map.flush().map_err(|e| io_err(&path, e))?;
        t.map[68] = 1;
        t.map.flush().map_err(|e| io_err(&path, e))?;
        durable::sync_dir(&self.dir).map_err(|e| io_err(&self.dir, e))
    }
}

/// A slot pinned for the life of a read or fill (also when cancelled).
struct Pin<'a> {
    cache: &'a Cache,
    slot: u32,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        self.cache.unpin(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRIPE: usize = 4 * SECTOR_SIZE;

    fn key() -> VolumeKey {
        VolumeKey::from_bytes(&(0..64).map(|i| (i * 7) as u8).collect::<Vec<_>>()).unwrap()
    }

    fn open(ring: &Uring, dir: &Path, slots: u64) -> Cache {
        Cache::open(ring, dir, &key(), &[1; 16], STRIPE, slots * STRIPE as u64).unwrap()
    }

    fn sectors(fill: u8, n: usize) -> Vec<u8> {
        (0..n * SECTOR_SIZE).map(|i| fill ^ (i % 253) as u8).collect()
    }

    #[tokio::test]
    async fn writes_fills_and_reads_encrypted_at_rest() {
        let ring = Uring::new(32).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = open(&ring, dir.path(), 4);
        assert_eq!(cache.read(7, 0, 1).await.unwrap(), None);
        cache.write(7, 1, &sectors(0xaa, 2), 5).await.unwrap();
        assert_eq!(cache.read(7, 1, 2).await.unwrap(), Some(sectors(0xaa, 2)));
        assert_eq!(cache.read(7, 0, 2).await.unwrap(), None, "sector 0 is not present");
        let slot = cache.lookup(7).unwrap();
        assert!(slot.dirty && slot.lsn == 5 && slot.has(1) && slot.has(2) && !slot.has(0));
        // A fill from the peers keeps the written sectors.
        let whole = sectors(0x11, 4);
        cache.fill(7, &whole).await.unwrap();
        let got = cache.read(7, 0, 4).await.unwrap().unwrap();
        assert_eq!(&got[..SECTOR_SIZE], &whole[..SECTOR_SIZE]);
        assert_eq!(&got[SECTOR_SIZE..3 * SECTOR_SIZE], &sectors(0xaa, 2)[..]);
        assert_eq!(&got[3 * SECTOR_SIZE..], &whole[3 * SECTOR_SIZE..]);
        let raw = std::fs::read(dir.path().join("cache.dat")).unwrap();
        assert!(!raw.windows(64).any(|w| w == &whole[..64]), "plaintext on disk");
        assert_eq!(cache.dirty(), vec![(7, 5)]);
        cache.write(7, 0, &sectors(1, 1), 9).await.unwrap();
        cache.mark_clean(7, 5);
        assert!(cache.lookup(7).unwrap().dirty, "a newer write keeps it dirty");
        cache.mark_clean(7, 9);
        assert!(!cache.lookup(7).unwrap().dirty);
        assert!(cache.dirty().is_empty());
    }

    #[tokio::test]
    async fn clean_stripes_are_evicted_least_recently_used_and_dirty_never() {
        let ring = Uring::new(32).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = open(&ring, dir.path(), 3);
        for s in 0..3 {
            cache.fill(s, &sectors(s as u8, 4)).await.unwrap();
        }
        // Touch 0 so 1 is the least recently used.
        cache.read(0, 0, 1).await.unwrap().unwrap();
        cache.fill(3, &sectors(3, 4)).await.unwrap();
        assert!(cache.lookup(1).is_none() && cache.lookup(0).is_some() && cache.lookup(3).is_some());
        // All dirty: a new stripe cannot come in, and a fill is skipped.
        for s in [0, 2, 3] {
            cache.write(s, 0, &sectors(9, 1), 1).await.unwrap();
        }
        assert!(matches!(cache.write(5, 0, &sectors(9, 1), 2).await, Err(CacheError::Full)));
        cache.fill(6, &sectors(6, 4)).await.unwrap();
        assert!(cache.lookup(6).is_none());
        cache.mark_clean(2, 1);
        cache.write(5, 0, &sectors(5, 1), 3).await.unwrap();
        assert!(cache.lookup(2).is_none(), "the clean stripe made room");
        cache.forget(5);
        assert!(cache.lookup(5).is_none());
    }

    #[tokio::test]
    async fn the_table_survives_a_clean_close_and_nothing_else() {
        let ring = Uring::new(32).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = open(&ring, dir.path(), 4);
        cache.fill(1, &sectors(1, 4)).await.unwrap();
        cache.write(2, 0, &sectors(2, 1), 4).await.unwrap();
        cache.close().await.unwrap();
        let cache = open(&ring, dir.path(), 4);
        assert_eq!(cache.read(1, 0, 4).await.unwrap(), Some(sectors(1, 4)));
        assert_eq!(cache.dirty(), vec![(2, 4)]);
        // Not closed (a crash): everything is dropped.
        drop(cache);
        let cache = open(&ring, dir.path(), 4);
        assert!(cache.lookup(1).is_none() && cache.dirty().is_empty());
        cache.fill(1, &sectors(1, 4)).await.unwrap();
        cache.close().await.unwrap();
        // Another key, volume or size: starts empty.
        let other = Cache::open(
            &ring,
            dir.path(),
            &VolumeKey::generate().unwrap(),
            &[1; 16],
            STRIPE,
            4 * STRIPE as u64,
        )
        .unwrap();
        assert!(other.lookup(1).is_none());
        drop(other);
        let small = open(&ring, dir.path(), 3);
        assert!(small.lookup(1).is_none());
        assert!(matches!(
            Cache::open(&ring, dir.path(), &key(), &[1; 16], STRIPE, STRIPE as u64),
            Err(CacheError::TooSmall { .. })
        ));
    }
}
