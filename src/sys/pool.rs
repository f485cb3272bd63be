//! Reusable large buffers.
//!
//! A fresh multi-megabyte allocation comes from `mmap`, and every page of it
//! faults on first touch: at NBD speeds that is one page fault per 4 KiB
//! moved. The pool keeps freed buffers of the power-of-two size classes from
//! 64 KiB to 32 MiB and hands them out again. A buffer leaves the pool as a
//! `Vec<u8>` to fill and comes back when the [`Bytes`] made from it by
//! [`BufferPool::freeze`] is dropped, wherever that happens.
//!
//! Bound: each class keeps at most [`POOLED_BYTES_PER_CLASS`] bytes (and at
//! least two buffers); anything beyond is freed normally.
//!
//! ```
//! use meshdisk::sys::pool::BufferPool;
//! let pool = BufferPool::new();
//! let mut v = pool.take(100_000);
//! v.extend_from_slice(&[1, 2, 3]);
//! let b = pool.freeze(v);
//! assert_eq!(&b[..], &[1, 2, 3]);
//! drop(b); // the buffer is back in the pool
//! assert_eq!(pool.pooled(), 128 * 1024);
//! ```

use std::sync::{Arc, Mutex};

use bytes::Bytes;

const MIN_SHIFT: u32 = 16;
const MAX_SHIFT: u32 = 25;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// Most bytes kept per size class.
pub const POOLED_BYTES_PER_CLASS: usize = 64 << 20;

#[derive(Default)]
pub struct BufferPool {
    classes: [Mutex<Vec<Vec<u8>>>; CLASSES],
}

fn class_of(capacity: usize) -> Option<usize> {
    if !capacity.is_power_of_two() {
        return None;
    }
    let shift = capacity.trailing_zeros();
    (MIN_SHIFT..=MAX_SHIFT).contains(&shift).then(|| (shift - MIN_SHIFT) as usize)
}

struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

impl BufferPool {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// An empty buffer with capacity for at least `len` bytes.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let size = len.next_power_of_two().max(1 << MIN_SHIFT);
        match class_of(size) {
            Some(c) => self.classes[c].lock().unwrap().pop().unwrap_or_else(|| Vec::with_capacity(size)),
            None => Vec::with_capacity(len),
        }
    }

    /// Wraps a filled buffer; it returns to the pool when the last clone of
    /// the `Bytes` is dropped.
    pub fn freeze(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled { buf, pool: self.clone() })
    }

    fn give(&self, mut buf: Vec<u8>) {
        let Some(c) = class_of(buf.capacity()) else { return };
        let keep = (POOLED_BYTES_PER_CLASS / buf.capacity()).max(2);
        let mut free = self.classes[c].lock().unwrap();
        if free.len() < keep {
            buf.clear();
            free.push(buf);
        }
    }

    /// Bytes held for reuse.
    pub fn pooled(&self) -> usize {
        self.classes.iter().map(|c| c.lock().unwrap().iter().map(Vec::capacity).sum::<usize>()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_bounds() {
        let pool = BufferPool::new();
        let v = pool.take(1 << 20);
        let ptr = v.as_ptr();
        drop(pool.freeze(v));
        let again = pool.take(1 << 20);
        assert_eq!(again.as_ptr(), ptr, "the same buffer comes back");
        // Small requests bypass the pool.
        assert_eq!(pool.take(10).capacity(), 1 << 16);
        let many: Vec<Bytes> = (0..200).map(|_| pool.freeze(pool.take(1 << 20))).collect();
        drop(many);
        assert!(pool.pooled() <= POOLED_BYTES_PER_CLASS);
        let huge = pool.take(100 << 20);
        drop(pool.freeze(huge));
        assert!(pool.pooled() <= POOLED_BYTES_PER_CLASS);
    }
}
