//! The block cache: clean blocks fetched from peers, kept on the attaching
//! machine so a block read again is not fetched again.
//!
//! It holds CIPHERTEXT, exactly as the segments do (never plaintext), in a
//! fixed number of 4 KiB slots of one file, and is keyed by (address,
//! sequence): a lookup names the version the map says is current and gets
//! that version or nothing, so an entry cached before another machine
//! wrote the block is never served for the newer version. Blocks written
//! by this machine are not put here: the local log serves them until they
//! are committed (each written byte goes to the local disk once).
//!
//! ```text
//! <folder>/blocks.dat   slot i at i × 4096: one block's ciphertext
//! <folder>/blocks.idx   header (magic, version, volume id, slot count, tag),
//!                       then per slot: address, sequence, tag (memory-mapped)
//! ```
//!
//! **Every entry is checked on read.** A slot's tag is a keyed blake3 (key
//! derived from the volume key, context [`CACHE_KEY_CONTEXT`]) over the
//! volume id, the slot number, the address, the sequence and the
//! ciphertext. A slot whose bytes do not match its tag (a torn write after
//! a crash, a disk error, tampering) is refused: dropped, counted, and
//! reported as a miss, so the caller fetches the block from the peers.
//!
//! **The index survives restarts, unsynced.** Sequences are never reused
//! for another content of the same block (they are its XTS tweak), so an
//! (address, sequence, ciphertext) triple that carries a valid tag is a
//! true fact forever: an entry from before a crash, or an old one put back
//! by someone who can write the folder, is either exactly the version asked
//! for or refused by its tag. Nothing in the index needs to be trusted
//! beyond what each tag proves, so it needs no clean-close mark and no
//! sync, and a restarted attach starts warm. An index made for another
//! volume, key or size is cleared at open (the cache starts cold).
//!
//! Eviction is CLOCK (a second chance for recently read slots). Slots
//! being read are pinned and never reused under the read; a slot being
//! written is not visible until its write is done. One entry per address:
//! putting a version replaces the one cached before.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use memmap2::MmapMut;
use zeroize::Zeroizing;

use crate::codec::key::{VOLUME_ID_LEN, VolumeKey};
use crate::codec::segment::BLOCK_SIZE;
use crate::codec::sequence::Sequence;
use crate::sys::uring::{RegisteredFile, Uring};

/// The first bytes of `blocks.idx`.
pub const MAGIC: [u8; 4] = *b"MDBC";
/// The cache format version this code writes and reads. Version 1 (the
/// ciphertext hashed last in a slot's tag) is cleared at open: the cache
/// starts cold, nothing is lost.
pub const VERSION: u16 = 2;
/// Bytes of the index header.
pub const INDEX_HEADER_LEN: usize = 64;
/// Bytes of one slot's index entry.
pub const ENTRY_LEN: usize = 48;
/// blake3 `derive_key` context of the cache's tag key.
pub const CACHE_KEY_CONTEXT: &str = "meshdisk v2 block cache";
/// Fewest slots a cache may have.
pub const MIN_SLOTS: u64 = 16;

const DATA_FILE: &str = "blocks.dat";
const INDEX_FILE: &str = "blocks.idx";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("block cache {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("a block cache of {bytes} bytes is too small: give it at least {} bytes", MIN_SLOTS * BLOCK_SIZE as u64)]
    TooSmall { bytes: u64 },
    #[error("a cached block is 4096 bytes, not {0}")]
    BlockLength(usize),
}

fn io_err(path: &Path, e: impl fmt::Display) -> CacheError {
    CacheError::Io { path: path.to_owned(), message: e.to_string() }
}

/// Counters since open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Entries refused by their tag (or unreadable).
    pub refused: u64,
    /// Entries held now.
    pub entries: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// A put is writing it; not visible.
    Writing,
    Ready {
        address: u64,
        sequence: Sequence,
        tag: [u8; 32],
    },
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    state: SlotState,
    /// Read since the clock hand last passed.
    referenced: bool,
    /// Reads in flight: the slot may not be reused.
    pins: u32,
}

struct State {
    index: MmapMut,
    by_address: HashMap<u64, u32>,
    slots: Vec<Slot>,
    hand: u32,
    stats: CacheStats,
}

impl State {
    fn write_entry(&mut self, slot: u32, entry: Option<(u64, Sequence, [u8; 32])>) {
        let at = INDEX_HEADER_LEN + slot as usize * ENTRY_LEN;
        let e = &mut self.index[at..at + ENTRY_LEN];
        e.fill(0);
        if let Some((address, sequence, tag)) = entry {
            e[..8].copy_from_slice(&address.to_le_bytes());
            e[8..16].copy_from_slice(&sequence.raw().to_le_bytes());
            e[16..].copy_from_slice(&tag);
        }
    }

    /// Forgets whatever `slot` holds.
    fn free(&mut self, slot: u32) {
        if let SlotState::Ready { address, .. } = self.slots[slot as usize].state {
            if self.by_address.get(&address) == Some(&slot) {
                self.by_address.remove(&address);
            }
            self.stats.entries -= 1;
        }
        self.slots[slot as usize].state = SlotState::Free;
        self.write_entry(slot, None);
    }

    /// A slot to reuse: free, or ready and not read since the hand last
    /// passed; never one pinned or being written. None if all are busy.
    fn victim(&mut self) -> Option<u32> {
        let n = self.slots.len() as u32;
        for _ in 0..2 * n + 1 {
            let i = self.hand;
            self.hand = (self.hand + 1) % n;
            let s = &mut self.slots[i as usize];
            if s.pins > 0 {
                continue;
            }
            match s.state {
                SlotState::Free => return Some(i),
                SlotState::Writing => {}
                SlotState::Ready { .. } if s.referenced => s.referenced = false,
                SlotState::Ready { .. } => return Some(i),
            }
        }
        None
    }
}

/// The block cache. Share it behind an `Arc`; every method takes `&self`.
pub struct BlockCache {
    data_path: PathBuf,
    ring: Uring,
    file: RegisteredFile,
    key: Zeroizing<[u8; 32]>,
    volume: [u8; VOLUME_ID_LEN],
    state: Mutex<State>,
}

impl fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockCache({}, {} slots)", self.data_path.display(), self.slot_count())
    }
}

fn slot_tag(
    key: &[u8; 32],
    volume: &[u8; VOLUME_ID_LEN],
    slot: u32,
    address: u64,
    sequence: Sequence,
    block: &[u8],
) -> [u8; 32] {
    // The block first: blake3 then sees it aligned on its 1 KiB chunks and
    // hashes them in parallel.
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(block);
    h.update(b"slot");
    h.update(volume);
    h.update(&slot.to_le_bytes());
    h.update(&address.to_le_bytes());
    h.update(&sequence.raw().to_le_bytes());
    *h.finalize().as_bytes()
}

fn index_header(key: &[u8; 32], volume: &[u8; VOLUME_ID_LEN], slots: u32) -> [u8; INDEX_HEADER_LEN] {
    let mut b = [0u8; INDEX_HEADER_LEN];
    b[..4].copy_from_slice(&MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[8..24].copy_from_slice(volume);
    b[24..28].copy_from_slice(&slots.to_le_bytes());
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(b"bchd");
    h.update(&b[..32]);
    b[32..].copy_from_slice(h.finalize().as_bytes());
    b
}

impl BlockCache {
    /// Opens (or creates) the cache in `folder` with room for
    /// `capacity_bytes / 4096` blocks. Entries of an index made for this
    /// volume, key and size are kept (checked when read); any other index
    /// is cleared. The caller holds the folder (the local log's lock).
    pub fn open(
        folder: &Path,
        key: &VolumeKey,
        volume: &[u8; VOLUME_ID_LEN],
        ring: &Uring,
        capacity_bytes: u64,
    ) -> Result<Self, CacheError> {
        let slots = capacity_bytes / BLOCK_SIZE as u64;
        if slots < MIN_SLOTS {
            return Err(CacheError::TooSmall { bytes: capacity_bytes });
        }
        let slots = u32::try_from(slots).map_err(|_| io_err(folder, "more than 2^32 slots"))?;
        std::fs::create_dir_all(folder).map_err(|e| io_err(folder, e))?;
        let key = key.derive_mac_key(CACHE_KEY_CONTEXT);
        let open = |name: &str| {
            let path = folder.join(name);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| io_err(&path, e))?;
            Ok::<_, CacheError>((path, f))
        };
        let (index_path, index_file) = open(INDEX_FILE)?;
        let index_len = (INDEX_HEADER_LEN + slots as usize * ENTRY_LEN) as u64;
        let have = index_file.metadata().map_err(|e| io_err(&index_path, e))?.len();
        if have != index_len {
            index_file.set_len(index_len).map_err(|e| io_err(&index_path, e))?;
        }
        // SAFETY: the index file is ours alone (the folder is locked by the
        // log, and no one else maps it); its length is fixed above.
        let mut index = unsafe { MmapMut::map_mut(&index_file) }.map_err(|e| io_err(&index_path, e))?;
        let header = index_header(&key, volume, slots);
        if index[..INDEX_HEADER_LEN] != header[..] {
            if index[..INDEX_HEADER_LEN].iter().any(|&b| b != 0) {
                tracing::info!(
                    "block cache {}: made for another volume, key or size; starting cold",
                    folder.display()
                );
            }
            index.fill(0);
            index[..INDEX_HEADER_LEN].copy_from_slice(&header);
        }
        let (data_path, data_file) = open(DATA_FILE)?;
        let data_len = u64::from(slots) * BLOCK_SIZE as u64;
        if data_file.metadata().map_err(|e| io_err(&data_path, e))?.len() != data_len {
            data_file.set_len(data_len).map_err(|e| io_err(&data_path, e))?;
        }
        let file = ring.register(data_file).map_err(|e| io_err(&data_path, e))?;
        let mut state = State {
            index,
            by_address: HashMap::new(),
            slots: vec![Slot { state: SlotState::Free, referenced: false, pins: 0 }; slots as usize],
            hand: 0,
            stats: CacheStats::default(),
        };
        for slot in 0..slots {
            let at = INDEX_HEADER_LEN + slot as usize * ENTRY_LEN;
            let e = &state.index[at..at + ENTRY_LEN];
            let address = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
            let sequence = Sequence::from_raw(u64::from_le_bytes(e[8..16].try_into().expect("8 bytes")));
            let tag: [u8; 32] = e[16..].try_into().expect("32 bytes");
            if sequence == Sequence::ZERO {
                continue;
            }
            // One entry per address: the higher sequence stays.
            if let Some(&other) = state.by_address.get(&address) {
                let SlotState::Ready { sequence: s, .. } = state.slots[other as usize].state else {
                    unreachable!()
                };
                if s >= sequence {
                    state.write_entry(slot, None);
                    continue;
                }
                state.free(other);
            }
            state.slots[slot as usize].state = SlotState::Ready { address, sequence, tag };
            state.by_address.insert(address, slot);
            state.stats.entries += 1;
        }
        Ok(Self { data_path, ring: ring.clone(), file, key, volume: *volume, state: Mutex::new(state) })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("block cache lock poisoned")
    }

    pub fn slot_count(&self) -> u32 {
        self.state().slots.len() as u32
    }

    pub fn stats(&self) -> CacheStats {
        self.state().stats
    }

    /// Whether block `address` at exactly `sequence` is cached (a read may
    /// still refuse it if its tag fails).
    pub fn contains(&self, address: u64, sequence: Sequence) -> bool {
        let st = self.state();
        st.by_address.get(&address).is_some_and(|&slot| {
            matches!(st.slots[slot as usize].state, SlotState::Ready { sequence: s, .. } if s == sequence)
        })
    }

    /// The ciphertext of block `address` at exactly `sequence`, checked
    /// against its tag; None if not cached (or refused).
    pub async fn get(&self, address: u64, sequence: Sequence) -> Option<Vec<u8>> {
        let (slot, tag) = {
            let mut st = self.state();
            let found =
                st.by_address.get(&address).copied().and_then(|slot| match st.slots[slot as usize].state {
                    SlotState::Ready { sequence: s, tag, .. } if s == sequence => Some((slot, tag)),
                    _ => None,
                });
            let Some((slot, tag)) = found else {
                st.stats.misses += 1;
                return None;
            };
            let s = &mut st.slots[slot as usize];
            s.pins += 1;
            s.referenced = true;
            (slot, tag)
        };
        let pin = Pin { cache: self, slot };
        let read = self.ring.read_exact_at(&self.file, u64::from(slot) * BLOCK_SIZE as u64, BLOCK_SIZE).await;
        drop(pin);
        let ok = match &read {
            Ok(block) => {
                let want = slot_tag(&self.key, &self.volume, slot, address, sequence, block);
                blake3::Hash::from_bytes(want) == blake3::Hash::from_bytes(tag)
            }
            Err(_) => false,
        };
        let mut st = self.state();
        if ok {
            st.stats.hits += 1;
            return read.ok();
        }
        match &read {
            Ok(_) => tracing::warn!(
                "block cache {}: slot {slot} (block {address} at {sequence}) fails its tag; dropped",
                self.data_path.display()
            ),
            Err(e) => {
                tracing::warn!("block cache {}: reading slot {slot}: {e}; dropped", self.data_path.display())
            }
        }
        st.stats.refused += 1;
        st.stats.misses += 1;
        // Drop it, unless a put has reused the slot meanwhile.
        if matches!(st.slots[slot as usize].state, SlotState::Ready { tag: t, .. } if t == tag) {
            st.free(slot);
        }
        None
    }

    /// Caches `ciphertext` (4096 bytes) as block `address` at `sequence`,
    /// replacing any other version of that block. Best effort: when every
    /// slot is busy, or the write fails, the block is simply not cached.
    pub async fn put(&self, address: u64, sequence: Sequence, ciphertext: Bytes) -> Result<(), CacheError> {
        if ciphertext.len() != BLOCK_SIZE {
            return Err(CacheError::BlockLength(ciphertext.len()));
        }
        if sequence == Sequence::ZERO {
            // Never a written block's sequence, and the index's "free".
            return Ok(());
        }
        let slot = {
            let mut st = self.state();
            if let Some(&old) = st.by_address.get(&address) {
                if matches!(st.slots[old as usize].state, SlotState::Ready { sequence: s, .. } if s == sequence)
                {
                    return Ok(());
                }
                st.free(old);
            }
            let Some(slot) = st.victim() else {
                return Ok(());
            };
            st.free(slot);
            st.slots[slot as usize] = Slot { state: SlotState::Writing, referenced: false, pins: 0 };
            slot
        };
        let mut writing = Writing { cache: self, slot, done: false };
        let tag = slot_tag(&self.key, &self.volume, slot, address, sequence, &ciphertext);
        let at = u64::from(slot) * BLOCK_SIZE as u64;
        if let Err(e) = self.ring.write_all_at(&self.file, at, ciphertext, 0).await {
            tracing::warn!("block cache {}: writing slot {slot}: {e}", self.data_path.display());
            return Ok(());
        }
        writing.done = true;
        let mut st = self.state();
        if let Some(&other) = st.by_address.get(&address) {
            // Another put of this block finished first: the later one wins.
            st.free(other);
        }
        st.slots[slot as usize].state = SlotState::Ready { address, sequence, tag };
        st.by_address.insert(address, slot);
        st.stats.entries += 1;
        st.write_entry(slot, Some((address, sequence, tag)));
        Ok(())
    }

    /// Forgets block `address` (every version).
    pub fn forget(&self, address: u64) {
        let mut st = self.state();
        if let Some(&slot) = st.by_address.get(&address) {
            st.free(slot);
        }
    }
}

/// Unpins a slot when its read ends, however it ends.
struct Pin<'a> {
    cache: &'a BlockCache,
    slot: u32,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        self.cache.state().slots[self.slot as usize].pins -= 1;
    }
}

/// Frees a slot whose put ended before its write did. (Should the
/// abandoned write land later, over a newer entry, that entry fails its
/// tag and is refused: a miss, never wrong data.)
struct Writing<'a> {
    cache: &'a BlockCache,
    slot: u32,
    done: bool,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.cache.state().slots[self.slot as usize].state = SlotState::Free;
        }
    }
}
