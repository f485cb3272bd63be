//! The volume's reads and writes (see [`super::volume`] for the picture).
//!
//! A write of whole blocks takes the lock stripes of its blocks, allocates
//! one sequence per block (so a write issued after another's reply is
//! above it), encrypts each block with tweak (address, sequence), appends
//! the ciphertext to the local log once and records it in the local
//! index. A write that covers part of a block reads the block and writes
//! it whole, under the same locks (read-modify-write of that block only).
//!
//! A read asks the local index and the committed map for the range and
//! takes, block by block, the version with the higher sequence: the local
//! log's copy, zeroes, or the committed segment's block (block cache first,
//! then the one data shard holding it, proven).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::cache::NeedPage;
use super::layout;
use super::local::LocalBlock;
use super::log::{LogError, NewRecord, WriteRecord};
use super::map::{Extent, Mapping, Newest, Target, newest_runs};
use super::remote::{Located, SegmentIoError};
use super::volume::Inner;
use crate::backend::{self, ErrorKind, ReadData, ReadPiece};
use crate::codec::segment::{BLOCK_SIZE, SegmentRoot};
use crate::codec::sequence::{SegmentId, Sequence};

const BLOCK: u64 = BLOCK_SIZE as u64;

/// A sequential reader's first window ahead, in blocks (256 KiB).
pub(super) const READ_AHEAD_MIN: u64 = 64;
/// Its largest window ahead, in blocks (4 MiB).
pub(super) const READ_AHEAD_MAX: u64 = 1024;
/// Fetches ahead running at once, each at most [`FETCH_BLOCKS`].
pub(super) const READ_AHEAD_FETCHES: usize = 4;
/// One fetch ahead, in blocks (1 MiB: a data shard's worth by default).
const FETCH_BLOCKS: u64 = 256;
/// Reads of at least this many blocks (128 KiB) are streamed: what they
/// fetch is not put in the block cache (bcache's "sequential cutoff"), so
/// a scan does not push out the blocks read again.
const STREAM_BLOCKS: u64 = 32;

/// Where [`Inner::read_remote`] keeps what it fetched, besides the reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keep {
    /// The block cache: a small read, likely read again.
    Cache,
    /// Memory, until the read it was fetched ahead of takes it.
    Ahead,
    /// Nowhere: a streamed read.
    Nothing,
}

fn failed(kind: ErrorKind, op: &'static str, offset: u64, length: u64, why: impl ToString) -> backend::Error {
    backend::Error::failed(kind, op, offset, length, why.to_string())
}

fn log_failed(op: &'static str, offset: u64, length: u64, e: LogError) -> backend::Error {
    let kind = match e {
        LogError::Full { .. } => ErrorKind::Full,
        _ => ErrorKind::Io,
    };
    failed(kind, op, offset, length, e)
}

/// One block's source in a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Zero,
    Log { pos: super::log::LogPos, block: u32 },
    Segment { segment: SegmentId, slot: u32 },
}

impl Inner {
    /// Writes `plain` (whole blocks) at block `address`; the caller holds
    /// the lock stripes of the range.
    async fn write_locked(&self, op: &'static str, address: u64, plain: &[u8]) -> backend::Result<()> {
        let n = (plain.len() / BLOCK_SIZE) as u64;
        let (offset, length) = (address * BLOCK, plain.len() as u64);
        // Held back first: the fence and the lease are checked after the
        // wait, which may be long.
        self.hold_back_while_dirty(op, offset, length).await;
        self.check_fenced(op, offset, length)?;
        self.wait_for_lease(op, offset, length).await?;
        self.wait_for_room(op, offset, length).await?;
        let max = u64::from(self.log.max_record_blocks()).min(self.record_blocks());
        let deadline = tokio::time::Instant::now() + self.config.io_timeout;
        let mut done = 0u64;
        while done < n {
            let count = (n - done).min(max);
            let first =
                self.begin(count).map_err(|why| failed(ErrorKind::Fenced, op, offset, length, why))?;
            let a = address + done;
            let src = &plain[done as usize * BLOCK_SIZE..(done + count) as usize * BLOCK_SIZE];
            // Each block is encrypted where the log writes it from.
            let mut record = WriteRecord::with_capacity(count as usize);
            for (i, b) in src.chunks_exact(BLOCK_SIZE).enumerate() {
                let seq = first.checked_add(i as u64).expect("the run was allocated");
                record.push_block(b, |ct| self.cipher.encrypt_in_place(a + i as u64, seq.raw(), ct));
            }
            let bytes = src.len() as u64;
            let pos = match self.log.append_write(a, first, record).await {
                Ok(p) => p,
                Err(LogError::Full { .. }) if tokio::time::Instant::now() < deadline => {
                    // Others filled it since the check: give the sequences
                    // up (the commit watermark may pass them), make room,
                    // try again.
                    self.local.lock().expect("local").abandon(first);
                    self.make_room(op, offset, length, bytes, deadline).await?;
                    continue;
                }
                Err(e) => {
                    self.local.lock().expect("local").abandon(first);
                    return Err(log_failed(op, offset, length, e));
                }
            };
            let inserted = self.local.lock().expect("local").insert_write(pos, a, count, first, false);
            if let Err(e) = inserted {
                self.local.lock().expect("local").abandon(first);
                return Err(failed(ErrorKind::Invalid, op, offset, length, e));
            }
            done += count;
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Allocates `n` sequences and marks them in flight (one step, so a
    /// commit's watermark never passes a write not yet in the index).
    fn begin(&self, n: u64) -> Result<Sequence, String> {
        let mut s = self.sequences.lock().expect("sequences");
        let first = s.next_run(n).map_err(|e| e.to_string())?;
        self.local.lock().expect("local").begin(first);
        Ok(first)
    }

    /// Holds a write while the local log is nearly full, committing to
    /// make room; refuses after the I/O timeout.
    async fn wait_for_room(&self, op: &'static str, offset: u64, length: u64) -> backend::Result<()> {
        if self.log.used_bytes() < self.config.log_size / 10 * 9 {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.config.io_timeout;
        self.make_room(op, offset, length, 0, deadline).await
    }

    /// The dirty limit: while commits succeed, a writer waits (up to the I/O
    /// timeout) while more than half the log's in-memory budget waits for
    /// a commit. The queue then never outgrows what the log keeps in
    /// memory, so commits pack from memory rather than reading the log
    /// back, and a FLUSH never has more than that to carry. When commits
    /// fail (peers away), writes go on filling the log to its end.
    /// A fenced volume (whose commits stop without failing) holds nobody
    /// back: the write is refused right after.
    async fn hold_back_while_dirty(&self, op: &'static str, offset: u64, length: u64) {
        let limit = self.log.recent_budget() / 2 / BLOCK;
        let dirty = || {
            self.local.lock().expect("local").queued_blocks() > limit
                && self.commit_failure.lock().expect("failure").is_none()
                && self.check_fenced(op, offset, length).is_ok()
        };
        if !dirty() {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.config.io_timeout;
        let mut committed = self.committed.subscribe();
        while dirty() && tokio::time::Instant::now() < deadline {
            self.urgent.store(true, std::sync::atomic::Ordering::Relaxed);
            self.wake.notify_one();
            tokio::select! {
                _ = committed.changed() => {}
                _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
            }
        }
    }

    /// Asks for commits (which release committed log files) until the log
    /// has `need` bytes free below 90 % full, or `deadline`. Always waits a
    /// little: a writer refused as full must not spin.
    async fn make_room(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
        need: u64,
        deadline: tokio::time::Instant,
    ) -> backend::Result<()> {
        let limit = (self.config.log_size / 10 * 9).saturating_sub(need);
        let mut committed = self.committed.subscribe();
        let mut first = true;
        while first || self.log.used_bytes() >= limit {
            first = false;
            self.check_fenced(op, offset, length)?;
            self.urgent.store(true, std::sync::atomic::Ordering::Relaxed);
            self.wake.notify_one();
            let tick = tokio::time::sleep(std::time::Duration::from_millis(50));
            if tokio::time::Instant::now() >= deadline {
                let why = match &*self.commit_failure.lock().expect("failure") {
                    Some((_, why)) => format!("the local log is full and commits fail: {why}"),
                    None => "the local log is full and no commit made room in time".to_string(),
                };
                return Err(failed(ErrorKind::Unavailable, op, offset, length, why));
            }
            tokio::select! {
                _ = committed.changed() => {}
                _ = tick => {}
            }
        }
        Ok(())
    }

    /// Takes the lock stripes of blocks `first..first + n`.
    async fn lock(&self, first: u64, n: u64) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut guards = Vec::new();
        for s in Inner::stripes(first, n) {
            guards.push(self.locks[s].lock().await);
        }
        guards
    }

    /// Writes `data` at byte `offset`: whole blocks directly, partial ones
    /// read-modify-written.
    pub(super) async fn write(&self, op: &'static str, offset: u64, data: &[u8]) -> backend::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.check_writable(op, offset, data.len() as u64)?;
        self.wait_for_compaction().await;
        let first = offset / BLOCK;
        let end = (offset + data.len() as u64).div_ceil(BLOCK);
        let _guards = self.lock(first, end - first).await;
        if offset.is_multiple_of(BLOCK) && (data.len() as u64).is_multiple_of(BLOCK) {
            return Box::pin(self.write_locked(op, first, data)).await;
        }
        // Read the edge blocks, splice, write the whole range.
        let mut buf = vec![0u8; ((end - first) * BLOCK) as usize];
        let head = (offset - first * BLOCK) as usize;
        if head != 0 {
            let b = Box::pin(self.read_blocks(first, 1)).await?.to_vec();
            buf[..BLOCK_SIZE].copy_from_slice(&b);
        }
        let tail_end = head + data.len();
        if !tail_end.is_multiple_of(BLOCK_SIZE) && (end - 1 != first || head == 0) {
            let b = Box::pin(self.read_blocks(end - 1, 1)).await?.to_vec();
            let at = buf.len() - BLOCK_SIZE;
            buf[at..].copy_from_slice(&b);
        }
        buf[head..tail_end].copy_from_slice(data);
        Box::pin(self.write_locked(op, first, &buf)).await
    }

    /// Refuses writes to a snapshot (the NBD export says read-only too).
    fn check_writable(&self, op: &'static str, offset: u64, length: u64) -> backend::Result<()> {
        match &self.config.snapshot {
            Some(snap) => Err(failed(
                ErrorKind::Denied,
                op,
                offset,
                length,
                format!("snapshot {snap} is read-only (clone it for a writable copy: meshdisk volume clone)"),
            )),
            None => Ok(()),
        }
    }

    /// Zeroes bytes `offset..offset + length`: whole blocks as one zero
    /// record, the partial edges written as data.
    pub(super) async fn zero(&self, op: &'static str, offset: u64, length: u64) -> backend::Result<()> {
        if length == 0 {
            return Ok(());
        }
        self.check_writable(op, offset, length)?;
        let first_full = offset.div_ceil(BLOCK);
        let end_full = (offset + length) / BLOCK;
        if first_full >= end_full {
            // Inside one block or two partial ones.
            return self.write(op, offset, &vec![0u8; length as usize]).await;
        }
        if offset < first_full * BLOCK {
            self.write(op, offset, &vec![0u8; (first_full * BLOCK - offset) as usize]).await?;
        }
        if (offset + length) > end_full * BLOCK {
            let from = end_full * BLOCK;
            self.write(op, from, &vec![0u8; (offset + length - from) as usize]).await?;
        }
        let n = end_full - first_full;
        let _guards = self.lock(first_full, n).await;
        // Held back first: the fence and the lease are checked after the
        // wait, which may be long.
        self.hold_back_while_dirty(op, offset, length).await;
        self.check_fenced(op, offset, length)?;
        self.wait_for_lease(op, offset, length).await?;
        self.wait_for_room(op, offset, length).await?;
        let sequence = self.begin(1).map_err(|why| failed(ErrorKind::Fenced, op, offset, length, why))?;
        let appended = self.log.append(&[NewRecord::Zero { address: first_full, blocks: n, sequence }]).await;
        if let Err(e) = appended {
            self.local.lock().expect("local").abandon(sequence);
            return Err(log_failed(op, offset, length, e));
        }
        let inserted = self.local.lock().expect("local").insert_zero(first_full, n, sequence, false);
        if let Err(e) = inserted {
            self.local.lock().expect("local").abandon(sequence);
            return Err(failed(ErrorKind::Invalid, op, offset, length, e));
        }
        self.wake.notify_one();
        Ok(())
    }

    /// The committed map's extents over `first..first + n`, fetching the
    /// map pages it needs. Each page fetched is inserted and looked up
    /// under one hold of the lock, and the lookup goes on from where the
    /// extents so far end: a range over more pages than the cache holds
    /// completes, even while other reads evict pages.
    pub(super) async fn committed_extents(&self, first: u64, n: u64) -> backend::Result<Vec<Extent>> {
        let end = first + n;
        let mut out = Vec::new();
        let mut looked = self.map.lock().expect("map").lookup_range(first, n);
        loop {
            let (extents, need) = looked;
            out.extend(extents);
            let Some(NeedPage(fetch)) = need else { return Ok(out) };
            let at = out.last().map_or(first, |e: &Extent| e.start + e.len);
            let bytes = match self.fetch_page(&fetch).await {
                Ok(bytes) => Some(bytes),
                // A checkpoint installed meanwhile moved the page, and its
                // old segment may be dropped already: ask the map again.
                Err(_) if self.map.lock().expect("map").index().fetch(fetch.page) != Some(fetch) => None,
                Err(why) => {
                    return Err(failed(ErrorKind::Unavailable, "read", first * BLOCK, n * BLOCK, why));
                }
            };
            let mut map = self.map.lock().expect("map");
            // A checkpoint installed during the fetch may have moved the
            // page: then the bytes are the old place's, and the lookup
            // asks for the new one.
            if let Some(bytes) = bytes.filter(|_| map.index().fetch(fetch.page) == Some(fetch)) {
                map.insert_page(fetch.page, &bytes)
                    .map_err(|e| failed(ErrorKind::Corrupt, "read", first * BLOCK, n * BLOCK, e))?;
            }
            looked = map.lookup_range(at, end - at);
        }
    }

    /// Reads metadata blocks of a committed segment, decrypted.
    pub(super) async fn read_metadata(
        &self,
        segment: SegmentId,
        root: crate::codec::segment::SegmentRoot,
        first_slot: u32,
        blocks: u32,
    ) -> Result<Vec<u8>, String> {
        let mut bytes = self
            .read_slots(segment, root, first_slot, first_slot + blocks)
            .await
            .map_err(|e| e.to_string())?;
        layout::open_metadata(self.lineage.by_segment(segment), segment, first_slot, &mut bytes);
        Ok(bytes)
    }

    async fn fetch_page(&self, f: &super::checkpoint::PageFetch) -> Result<Vec<u8>, String> {
        self.read_metadata(f.segment.id, f.segment.root, f.first_slot, f.blocks).await
    }

    /// Data-area slots `first..end` of a committed segment, as stored
    /// (ciphertext). When the read fails for want of shards, the segment's
    /// record and its holders' addresses are read again (repair may have
    /// put the missing shards on new holders; a restarted peer may listen
    /// elsewhere) and the read tried once more.
    pub(super) async fn read_slots(
        &self,
        segment: SegmentId,
        root: crate::codec::segment::SegmentRoot,
        first: u32,
        end: u32,
    ) -> Result<Vec<u8>, SegmentIoError> {
        let unreadable = |why: String| SegmentIoError::Unreadable { segment, first, end, why };
        let located = self.locate(segment, root, false).await.map_err(unreadable)?;
        match self.io.read(&located, first, end).await {
            Err(e) if e.kind() == crate::backend::ErrorKind::Unavailable => {
                let again = self.locate(segment, root, true).await.map_err(unreadable)?;
                if again.holders == located.holders {
                    return Err(e);
                }
                tracing::debug!("volume {}: segment {segment} has new holders; reading again", self.name);
                self.io.read(&again, first, end).await
            }
            done => done,
        }
    }

    /// Where segment `segment`'s shards are (its record at the directory,
    /// kept; peer ids resolved to addresses, kept). Both are read again
    /// when `refresh` says so, or a holder failed since they were (repair
    /// moves shards; a restarted peer may have a new address).
    pub(super) async fn locate(
        &self,
        segment: SegmentId,
        root: crate::codec::segment::SegmentRoot,
        refresh: bool,
    ) -> Result<Located, String> {
        let refresh = self.io.take_suspect(segment) || refresh;
        if refresh {
            self.holders.lock().expect("holders").remove(&segment);
        }
        let known = self.holders.lock().expect("holders").get(&segment).cloned();
        let ids = match known {
            Some(ids) => ids,
            None => {
                let records = self
                    .client
                    .segment_records(&self.name, vec![segment])
                    .await
                    .map_err(|e| format!("the directory's record of segment {segment}: {e}"))?;
                let Some(Some(r)) = records.into_iter().next() else {
                    return Err(format!("the directory has no record of segment {segment}"));
                };
                self.holders.lock().expect("holders").insert(segment, r.peers.clone());
                r.peers
            }
        };
        let missing: Vec<u16> = {
            let peers = self.peers.lock().expect("peers");
            let mut m: Vec<u16> =
                ids.iter().copied().filter(|&i| i != 0 && (refresh || !peers.contains_key(&i))).collect();
            m.sort_unstable();
            m.dedup();
            m
        };
        if !missing.is_empty()
            && let Ok(slots) = self.client.peer_slots(missing).await
        {
            let mut peers = self.peers.lock().expect("peers");
            for s in slots.into_iter().flatten() {
                peers.insert(s.id, s.addr);
            }
        }
        let peers = self.peers.lock().expect("peers");
        Ok(Located {
            volume: self.lineage.volume_of(segment),
            id: segment,
            root,
            holders: ids.iter().map(|i| peers.get(i).cloned()).collect(),
        })
    }

    /// Where each block of `first..first + n` is read from, and the
    /// sequence it is read at: the higher sequence of the local index and
    /// the committed map wins, the local copy on a tie.
    async fn plan(&self, first: u64, n: u64) -> backend::Result<Vec<(Source, Sequence)>> {
        let local = self.local.lock().expect("local").lookup(first, n);
        let committed = self.committed_extents(first, n).await?;
        let mut plan: Vec<(Source, Sequence)> = Vec::with_capacity(n as usize);
        let (mut li, mut ci) = (0usize, 0usize);
        for a in first..first + n {
            while local[li].0.start + local[li].0.len <= a {
                li += 1;
            }
            while committed[ci].start + committed[ci].len <= a {
                ci += 1;
            }
            let (le, lat) = &local[li];
            let l = le.at(a - le.start).map(|m| (m, lat));
            let c = committed[ci].at(a - committed[ci].start);
            let pick = match (l, c) {
                (Some((lm, at)), c) if c.is_none_or(|c| lm.sequence >= c.sequence) => {
                    let src = match at.expect("a written local extent has a place") {
                        LocalBlock::Zero => Source::Zero,
                        LocalBlock::Log { pos, block } => {
                            Source::Log { pos, block: block + (a - le.start) as u32 }
                        }
                    };
                    (src, lm.sequence)
                }
                (_, Some(Mapping { sequence, target: Target::Data { segment, slot } })) => {
                    (Source::Segment { segment, slot }, sequence)
                }
                (_, Some(Mapping { sequence, target: Target::Zero })) => (Source::Zero, sequence),
                (_, None) => (Source::Zero, Sequence::ZERO),
            };
            plan.push(pick);
        }
        Ok(plan)
    }

    /// Starts fetching blocks `range` into the block cache, in stretches
    /// of [`FETCH_BLOCKS`], as long as permits last (a fetch that finds
    /// none is dropped: read-ahead is a hint).
    pub(super) fn fetch_ahead(this: &Arc<Inner>, range: std::ops::Range<u64>) {
        let mut at = range.start;
        while at < range.end {
            let end = (at + FETCH_BLOCKS).min(range.end);
            let Ok(permit) = this.prefetches.clone().try_acquire_owned() else {
                return;
            };
            let (done, waiting) = watch::channel(false);
            this.prefetching.lock().expect("prefetching").push((at..end, waiting));
            let inner = this.clone();
            tokio::spawn(async move {
                if let Err(e) = Box::pin(inner.prefetch(at, end - at)).await {
                    tracing::debug!("volume {}: reading ahead {at}..{end}: {e}", inner.name);
                }
                inner.prefetching.lock().expect("prefetching").retain(|(r, _)| r.start != at || r.end != end);
                let _ = done.send(true);
                drop(permit);
            });
            at = end;
        }
    }

    /// Waits for the fetches ahead overlapping `first..first + n`, so the
    /// read finds their blocks in the cache.
    async fn wait_for_fetches(&self, first: u64, n: u64) {
        let waiting: Vec<watch::Receiver<bool>> = {
            let p = self.prefetching.lock().expect("prefetching");
            p.iter().filter(|(r, _)| r.start < first + n && first < r.end).map(|(_, w)| w.clone()).collect()
        };
        for mut w in waiting {
            let _ = w.wait_for(|done| *done).await;
        }
    }

    /// Blocks `first..first + n` whose newest version is in a segment and
    /// not in the block cache: read from the peers into the cache.
    async fn prefetch(&self, first: u64, n: u64) -> backend::Result<()> {
        self.check_fenced("read ahead", first * BLOCK, n * BLOCK)?;
        let plan = self.plan(first, n).await?;
        let mut remote: HashMap<SegmentId, Vec<(usize, u32)>> = HashMap::new();
        for (i, (src, seq)) in plan.iter().enumerate() {
            if let Source::Segment { segment, slot } = *src
                && !self.ahead.contains(first + i as u64, *seq)
                && !self.cache.contains(first + i as u64, *seq)
            {
                remote.entry(segment).or_default().push((i, slot));
            }
        }
        for (segment, wanted) in remote {
            let Some(root) = self.map.lock().expect("map").root_of(segment) else {
                continue;
            };
            self.read_remote(segment, root, &wanted, first, &plan, None, Keep::Ahead).await?;
        }
        Ok(())
    }

    /// Plaintext of blocks `first..first + n` (`n` ≥ 1).
    pub(super) async fn read_blocks(&self, first: u64, n: u64) -> backend::Result<Bytes> {
        self.read_blocks_again(first, n, 0).await
    }

    /// [`Self::read_blocks`], the `again`th time: a checkpoint installed
    /// between the lookup and the reads may leave a segment the lookup
    /// named unreachable (all its blocks were overwritten since), or
    /// compaction may have moved the blocks and the segment be erased, and
    /// the read starts over with the new map. A segment still unreachable
    /// after a few tries is a map naming one that is not there.
    async fn read_blocks_again(&self, first: u64, n: u64, again: u32) -> backend::Result<Bytes> {
        let (offset, length) = (first * BLOCK, n * BLOCK);
        self.wait_for_lease("read", offset, length).await?;
        if again == 0 {
            self.wait_for_fetches(first, n).await;
        }
        let plan = self.plan(first, n).await?;
        // Filled block by block in order: only the blocks read as zeroes or
        // into place are zeroed first.
        let mut out: Vec<u8> = Vec::with_capacity(length as usize);
        let mut remote: HashMap<SegmentId, Vec<(usize, u32)>> = HashMap::new();
        for (i, (src, seq)) in plan.iter().enumerate() {
            let a = first + i as u64;
            debug_assert_eq!(out.len(), i * BLOCK_SIZE);
            if let Source::Segment { .. } = src
                && let Some(ct) = self.fetched(a, *seq).await
            {
                out.extend_from_slice(&ct);
                self.lineage.by_sequence(*seq).decrypt_in_place(a, seq.raw(), &mut out[i * BLOCK_SIZE..]);
                continue;
            }
            out.resize((i + 1) * BLOCK_SIZE, 0);
            let buf = &mut out[i * BLOCK_SIZE..];
            match *src {
                Source::Zero => {}
                Source::Log { pos, block } => match self.log.read(pos, block, buf).await {
                    Ok(_) => self.cipher.decrypt_in_place(a, seq.raw(), buf),
                    // Released since the lookup (the file held only committed
                    // records): forget it here too, and read again from the
                    // committed map.
                    Err(LogError::Released(p)) => {
                        self.local.lock().expect("local").forget_files(|f| f != p.file);
                        return Box::pin(self.read_blocks_again(first, n, again)).await;
                    }
                    Err(e) => return Err(log_failed("read", offset, length, e)),
                },
                // Not fetched ahead (checked above): from its segment below.
                Source::Segment { segment, slot } => remote.entry(segment).or_default().push((i, slot)),
            }
        }
        let remote: Vec<(SegmentId, Vec<(usize, u32)>)> = remote.into_iter().collect();
        let roots: Vec<Option<SegmentRoot>> = {
            let map = self.map.lock().expect("map");
            remote.iter().map(|(s, _)| map.root_of(*s)).collect()
        };
        if let Some(((segment, _), _)) = remote.iter().zip(&roots).find(|(_, r)| r.is_none()) {
            if again < 4 {
                return Box::pin(self.read_blocks_again(first, n, again + 1)).await;
            }
            let why = format!("segment {segment} is not reachable from the root");
            return Err(failed(ErrorKind::Corrupt, "read", offset, length, why));
        }
        for ((segment, wanted), root) in remote.into_iter().zip(roots) {
            let root = root.expect("checked above");
            let keep = if n >= STREAM_BLOCKS { Keep::Nothing } else { Keep::Cache };
            if let Err(e) = self.read_remote(segment, root, &wanted, first, &plan, Some(&mut out), keep).await
            {
                // Compaction may have moved the blocks and the segment
                // gone since the lookup: read again from where they are.
                if again < 4 && self.plan(first, n).await? != plan {
                    return Box::pin(self.read_blocks_again(first, n, again + 1)).await;
                }
                return Err(e);
            }
        }
        Ok(Bytes::from(out))
    }

    /// The ciphertext of block `address` at `sequence` if this machine
    /// has it: fetched ahead, or in the block cache.
    async fn fetched(&self, address: u64, sequence: Sequence) -> Option<Bytes> {
        match self.ahead.take(address, sequence) {
            Some(ct) => Some(ct),
            None => self.cache.get(address, sequence).await.map(Bytes::from),
        }
    }

    /// Reads `wanted` (index in the read, slot) of one segment from the
    /// peers in runs of consecutive slots, decrypts them into `out` (if
    /// given: a fetch ahead only keeps them) and keeps their ciphertext
    /// where `keep` says.
    #[allow(clippy::too_many_arguments)]
    async fn read_remote(
        &self,
        segment: SegmentId,
        root: SegmentRoot,
        wanted: &[(usize, u32)],
        first: u64,
        plan: &[(Source, Sequence)],
        mut out: Option<&mut [u8]>,
        keep: Keep,
    ) -> backend::Result<()> {
        let (offset, length) = (first * BLOCK, plan.len() as u64 * BLOCK);
        let mut i = 0;
        while i < wanted.len() {
            let mut j = i + 1;
            while j < wanted.len() && wanted[j].1 == wanted[j - 1].1 + 1 && wanted[j].0 == wanted[j - 1].0 + 1
            {
                j += 1;
            }
            let (start, end) = (wanted[i].1, wanted[j - 1].1 + 1);
            let ct = Bytes::from(
                self.read_slots(segment, root, start, end)
                    .await
                    .map_err(|e| failed(e.kind(), "read", offset, length, e))?,
            );
            let counter =
                if keep == Keep::Ahead { &self.traffic.fetched_ahead } else { &self.traffic.fetched };
            counter.fetch_add(ct.len() as u64, std::sync::atomic::Ordering::Relaxed);
            for (n, &(idx, _)) in wanted[i..j].iter().enumerate() {
                let block = &ct[n * BLOCK_SIZE..(n + 1) * BLOCK_SIZE];
                let a = first + idx as u64;
                let seq = plan[idx].1;
                if let Some(out) = out.as_deref_mut() {
                    let buf = &mut out[idx * BLOCK_SIZE..(idx + 1) * BLOCK_SIZE];
                    buf.copy_from_slice(block);
                    self.lineage.by_sequence(seq).decrypt_in_place(a, seq.raw(), buf);
                }
                match keep {
                    Keep::Cache => {
                        if let Err(e) =
                            self.cache.put(a, seq, ct.slice(n * BLOCK_SIZE..(n + 1) * BLOCK_SIZE)).await
                        {
                            tracing::debug!("block cache: {e}");
                        }
                    }
                    // A copy: a slice would keep the whole fetched run alive
                    // while counting 4 KiB of it against the budget.
                    Keep::Ahead => self.ahead.hold(a, seq, Bytes::copy_from_slice(block)),
                    Keep::Nothing => {}
                }
            }
            i = j;
        }
        Ok(())
    }

    /// The bytes `offset..offset + length`.
    pub(super) async fn read(&self, offset: u64, length: u32) -> backend::Result<ReadData> {
        if length == 0 {
            return Ok(ReadData::default());
        }
        let first = offset / BLOCK;
        let end = (offset + u64::from(length)).div_ceil(BLOCK);
        let bytes = self.read_blocks(first, end - first).await?;
        let skip = (offset - first * BLOCK) as usize;
        let mut r = ReadData::default();
        r.push(ReadPiece::Data(bytes.slice(skip..skip + length as usize)));
        Ok(r)
    }

    /// Zeroes for never-written space, for block status.
    pub(super) async fn holes(&self, offset: u64, length: u32) -> backend::Result<Vec<backend::Extent>> {
        // As a read: "never written" is an answer about the volume's
        // contents, which another machine may be changing while the lease
        // may have lapsed.
        self.wait_for_lease("block status", offset, u64::from(length)).await?;
        let first = offset / BLOCK;
        let end = (offset + u64::from(length)).div_ceil(BLOCK);
        let local = self.local.lock().expect("local").lookup(first, end - first);
        let committed = self.committed_extents(first, end - first).await?;
        let local: Vec<Extent> = local.into_iter().map(|(e, _)| e).collect();
        let mut out = Vec::new();
        for (blocks, newest) in newest_runs(&local, &committed, first, end) {
            let zero = match newest {
                Newest::Local(m) | Newest::Committed(m) => m.target == Target::Zero,
                Newest::Never => true,
            };
            backend::push_extent(&mut out, blocks * BLOCK, zero);
        }
        // Trim the first and last extents to the byte range asked for.
        let head = offset - first * BLOCK;
        if let Some(e) = out.first_mut() {
            e.length -= head;
        }
        let over = end * BLOCK - (offset + u64::from(length));
        if let Some(e) = out.last_mut() {
            e.length -= over;
        }
        out.retain(|e| e.length > 0);
        Ok(out)
    }
}
