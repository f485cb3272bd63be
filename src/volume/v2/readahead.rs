//! Sequential read detection: which blocks to fetch before they are asked.
//!
//! A few streams are tracked, each by the block its next read would start
//! at. A read that starts where a stream left off (or inside what it last
//! read) continues it: the stream's window doubles, up to a bound, and
//! once the reader has come within half a window of what was already
//! fetched ahead, the next stretch is handed out to fetch. A read that
//! continues no stream takes the place of the least recently used one and
//! fetches nothing: two reads in a row make a stream.
//!
//! ```text
//! reads   [0,32) [32,64) [64,96) ...
//! fetch          [64,192)        [192,448) ...   (window 128, then 256)
//! ```
//!
//! Pure: the caller does the fetching (into the block cache) and bounds
//! how many fetches run at once.

/// Streams tracked at once (several connections, several files).
const STREAMS: usize = 8;

#[derive(Clone, Copy, Debug, Default)]
struct Stream {
    /// Where the next sequential read would start.
    next: u64,
    /// Where the last read of this stream started.
    last: u64,
    /// Blocks fetched ahead per stretch (0: not sequential yet).
    window: u64,
    /// Everything below this was fetched or handed out to fetch.
    ahead_to: u64,
    /// For replacing the least recently used stream.
    used: u64,
    live: bool,
}

/// The tracked streams of one volume.
#[derive(Debug)]
pub struct ReadAhead {
    streams: [Stream; STREAMS],
    clock: u64,
    /// The first window, in blocks.
    min_window: u64,
    /// The largest window, in blocks.
    max_window: u64,
    /// Blocks in the volume (nothing past it is fetched).
    blocks: u64,
}

impl ReadAhead {
    /// Windows grow from `min_window` to `max_window` blocks.
    pub fn new(blocks: u64, min_window: u64, max_window: u64) -> Self {
        let min_window = min_window.max(1);
        Self {
            streams: [Stream::default(); STREAMS],
            clock: 0,
            min_window,
            max_window: max_window.max(min_window),
            blocks,
        }
    }

    /// Notes a read of blocks `first..first + n`; the blocks to fetch
    /// ahead, if it continues a stream and the reader came near the end
    /// of what was fetched.
    pub fn on_read(&mut self, first: u64, n: u64) -> Option<std::ops::Range<u64>> {
        self.clock += 1;
        let end = first.saturating_add(n).min(self.blocks);
        let found = self.streams.iter().position(|s| s.live && first >= s.last && first <= s.next);
        let Some(i) = found else {
            let i = self
                .streams
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| (s.live, s.used))
                .map(|(i, _)| i)
                .expect("streams");
            self.streams[i] =
                Stream { next: end, last: first, window: 0, ahead_to: end, used: self.clock, live: true };
            return None;
        };
        let s = &mut self.streams[i];
        s.used = self.clock;
        if first == s.last && end <= s.next {
            // The same read again: no progress, nothing more to fetch.
            return None;
        }
        s.last = first;
        s.next = s.next.max(end);
        s.window = if s.window == 0 { self.min_window.max(n * 2) } else { s.window * 2 };
        s.window = s.window.min(self.max_window);
        s.ahead_to = s.ahead_to.max(s.next);
        if s.ahead_to - s.next > s.window / 2 || s.ahead_to >= self.blocks {
            return None;
        }
        let from = s.ahead_to;
        let to = (s.next + s.window).min(self.blocks);
        if to <= from {
            return None;
        }
        s.ahead_to = to;
        Some(from..to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequential_reader_gets_growing_stretches_ahead_and_never_a_block_twice() {
        let mut ra = ReadAhead::new(1 << 20, 64, 1024);
        assert_eq!(ra.on_read(0, 32), None, "one read is not a stream");
        let mut fetched = Vec::new();
        let mut at = 32;
        while at < 8192 {
            if let Some(r) = ra.on_read(at, 32) {
                assert!(r.start >= at + 32, "fetches only ahead of the read: {r:?} at {at}");
                fetched.push(r);
            }
            at += 32;
        }
        // Contiguous, never overlapping, growing up to the bound.
        for w in fetched.windows(2) {
            assert_eq!(w[0].end, w[1].start, "{fetched:?}");
        }
        let sizes: Vec<u64> = fetched.iter().map(|r| r.end - r.start).collect();
        assert!(sizes.iter().any(|&s| s >= 512), "the window grew: {sizes:?}");
        assert!(sizes.iter().all(|&s| s <= 1024 + 32), "bounded: {sizes:?}");
        // The reader never waits on blocks nobody fetched: ahead of it.
        assert!(fetched.last().unwrap().end > at);
    }

    #[test]
    fn random_reads_fetch_nothing() {
        let mut ra = ReadAhead::new(1 << 20, 64, 1024);
        let mut x: u64 = 12345;
        for _ in 0..10_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let at = (x >> 20) % ((1 << 20) - 8);
            assert_eq!(ra.on_read(at, 1), None, "random read at {at} fetched ahead");
        }
    }

    #[test]
    fn interleaved_streams_are_each_followed_and_the_end_of_the_volume_bounds_them() {
        let blocks = 4096;
        let mut ra = ReadAhead::new(blocks, 64, 256);
        let (mut a, mut b) = (0u64, 2048u64);
        let mut got_a = false;
        let mut got_b = false;
        while b < blocks {
            if let Some(r) = ra.on_read(a, 16) {
                assert!(r.start >= a && r.end <= 2048 + 256, "{r:?}");
                got_a = true;
            }
            if let Some(r) = ra.on_read(b, 16) {
                assert!(r.start >= b && r.end <= blocks, "past the end: {r:?}");
                got_b = true;
            }
            a += 16;
            b += 16;
        }
        assert!(got_a && got_b);
        // Re-reading the same block over and over is not a stream ahead.
        let mut ra = ReadAhead::new(blocks, 64, 256);
        let fetched: Vec<_> = (0..100).filter_map(|_| ra.on_read(10, 1)).collect();
        assert_eq!(fetched, Vec::<std::ops::Range<u64>>::new());
    }
}
