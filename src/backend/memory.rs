//! A sparse export in RAM: the reference backend, and the one `serve
//! --memory` uses for benchmarks against `nbdkit memory`.
//!
//! The export is cut into 32 KiB chunks, each allocated on first write and
//! freed again when a TRIM or WRITE_ZEROES covers all of it. Unallocated
//! chunks are holes: reads return them as [`ReadPiece::Zero`] without copying,
//! and BLOCK_STATUS reports them. Each chunk has its own lock, so requests
//! on different chunks never wait for each other. Metadata costs 32 bytes
//! per chunk (1 MiB per GiB of export), whether or not it is allocated.
//!
//! Reads copy nothing: a read's [`Bytes`] share the chunk (`Arc`), and a
//! write to a chunk that a reply is still sending copies the chunk first
//! (copy-on-write), so data on its way out never changes under it.

use std::sync::{Arc, RwLock};

use bytes::Bytes;

use super::{Backend, Extent, Features, ReadData, ReadPiece, Result, ZeroFlags, push_extent};

const CHUNK: usize = 32 * 1024;
/// A BLOCK_STATUS reply describes at most this many extents; the client
/// asks again for the rest.
const MAX_EXTENTS: usize = 4096;

type Chunk = RwLock<Option<Arc<Vec<u8>>>>;

/// A window into a chunk, owned by the [`Bytes`] of a read.
struct ChunkSlice {
    chunk: Arc<Vec<u8>>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for ChunkSlice {
    fn as_ref(&self) -> &[u8] {
        &self.chunk[self.start..self.end]
    }
}

pub struct MemoryBackend {
    size: u64,
    chunks: Box<[Chunk]>,
}

impl MemoryBackend {
    pub fn new(size: u64) -> Self {
        let n = size.div_ceil(CHUNK as u64) as usize;
        Self { size, chunks: (0..n).map(|_| RwLock::new(None)).collect() }
    }

    fn chunk_len(&self, idx: usize) -> usize {
        (self.size - (idx * CHUNK) as u64).min(CHUNK as u64) as usize
    }

    /// Splits `offset..offset+length` at chunk boundaries:
    /// `(chunk index, offset in chunk, length)`.
    fn pieces(offset: u64, length: u64) -> impl Iterator<Item = (usize, usize, usize)> {
        let end = offset + length;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let idx = (pos / CHUNK as u64) as usize;
            let within = (pos % CHUNK as u64) as usize;
            let n = ((CHUNK - within) as u64).min(end - pos) as usize;
            pos += n as u64;
            Some((idx, within, n))
        })
    }

    /// Zeroes a range; whole chunks become holes unless `keep_allocated`.
    fn zero(&self, offset: u64, length: u64, keep_allocated: bool) {
        for (idx, within, n) in Self::pieces(offset, length) {
            let mut chunk = self.chunks[idx].write().unwrap();
            if n == self.chunk_len(idx) && !keep_allocated {
                *chunk = None;
            } else if let Some(buf) = chunk.as_mut() {
                Arc::make_mut(buf)[within..within + n].fill(0);
            } else if keep_allocated {
                *chunk = Some(Arc::new(vec![0; self.chunk_len(idx)]));
            }
        }
    }
}

impl Backend for MemoryBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn features(&self) -> Features {
        Features::all(false)
    }

    async fn read(&self, offset: u64, length: u32) -> Result<ReadData> {
        let mut out = ReadData { pieces: Vec::with_capacity((length as usize).div_ceil(CHUNK) + 1) };
        for (idx, within, n) in Self::pieces(offset, length.into()) {
            match self.chunks[idx].read().unwrap().as_ref() {
                Some(chunk) => {
                    let slice = ChunkSlice { chunk: chunk.clone(), start: within, end: within + n };
                    out.push(ReadPiece::Data(Bytes::from_owner(slice)));
                }
                None => out.push(ReadPiece::Zero(n as u32)),
            }
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<()> {
        let mut src = &data[..];
        for (idx, within, n) in Self::pieces(offset, data.len() as u64) {
            let mut chunk = self.chunks[idx].write().unwrap();
            let buf = chunk.get_or_insert_with(|| Arc::new(vec![0; self.chunk_len(idx)]));
            Arc::make_mut(buf)[within..within + n].copy_from_slice(&src[..n]);
            src = &src[n..];
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u32, _fua: bool) -> Result<()> {
        self.zero(offset, length.into(), false);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, length: u32, flags: ZeroFlags) -> Result<()> {
        self.zero(offset, length.into(), !flags.may_trim);
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u32) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        for (idx, _, n) in Self::pieces(offset, length.into()) {
            let hole = self.chunks[idx].read().unwrap().is_none();
            if out.len() == MAX_EXTENTS && out.last().is_some_and(|e| e.hole != hole) {
                break;
            }
            push_extent(&mut out, n as u64, hole);
        }
        Ok(out)
    }

    async fn cache(&self, _offset: u64, _length: u32) -> Result<()> {
        Ok(())
    }
}
