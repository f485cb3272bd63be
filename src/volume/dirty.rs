//! Which stripes hold writes not yet committed on the peers, and from
//! which log record on: the destager picks from here, FLUSH waits on it,
//! and the log may be trimmed only below the oldest record still needed.
//!
//! A write registers a *floor* (a lower bound of the LSN it is about to
//! get) before appending to the log and marks its stripe after; a trim
//! never passes a floor, so a record between append and mark is safe.

use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Debug)]
struct Entry {
    /// Oldest record not yet in a committed generation.
    first: u64,
    /// Newest record applied.
    last: u64,
    last_write: Instant,
    /// Being destaged from a snapshot that includes records up to this.
    destaging: Option<u64>,
    /// First record after that snapshot.
    after: Option<u64>,
    /// Sectors written since the stripe was last clean (repeats count):
    /// a stripe written whole is worth destaging at once.
    written: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Dirty {
    stripes: BTreeMap<u64, Entry>,
    floors: BTreeMap<u64, usize>,
}

/// A stripe the destager should take now, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    Flush,
    Pressure,
    Age,
    Candidate,
}

impl Dirty {
    pub fn begin_append(&mut self, floor: u64) {
        *self.floors.entry(floor).or_default() += 1;
    }

    pub fn end_append(&mut self, floor: u64) {
        if let Some(n) = self.floors.get_mut(&floor) {
            *n -= 1;
            if *n == 0 {
                self.floors.remove(&floor);
            }
        }
    }

    /// Record `lsn` (`sectors` of `stripe`) was applied.
    pub fn mark(&mut self, stripe: u64, lsn: u64, sectors: u64) {
        let now = Instant::now();
        let e = self.stripes.entry(stripe).or_insert(Entry {
            first: lsn,
            last: lsn,
            last_write: now,
            destaging: None,
            after: None,
            written: 0,
        });
        e.written += sectors;
        e.first = e.first.min(lsn);
        e.last = e.last.max(lsn);
        e.last_write = now;
        if e.destaging.is_some_and(|snap| lsn > snap) && e.after.is_none() {
            e.after = Some(lsn);
        }
    }

    pub fn len(&self) -> usize {
        self.stripes.len()
    }

    #[cfg(test)]
    pub fn is_dirty(&self, stripe: u64) -> bool {
        self.stripes.contains_key(&stripe)
    }

    /// The destage of `stripe` starts from a snapshot holding every record
    /// up to its current newest; returns that LSN.
    pub fn start(&mut self, stripe: u64) -> Option<u64> {
        let e = self.stripes.get_mut(&stripe)?;
        if e.destaging.is_some() {
            return None;
        }
        e.destaging = Some(e.last);
        e.after = None;
        Some(e.last)
    }

    /// The snapshot is committed: the stripe is clean unless written since.
    pub fn finished(&mut self, stripe: u64) {
        let Some(e) = self.stripes.get_mut(&stripe) else { return };
        let Some(snap) = e.destaging.take() else { return };
        match e.after.take() {
            Some(after) if e.last > snap => {
                e.first = after;
                e.written = 0;
            }
            _ => {
                self.stripes.remove(&stripe);
            }
        }
    }

    pub fn failed(&mut self, stripe: u64) {
        if let Some(e) = self.stripes.get_mut(&stripe) {
            e.destaging = None;
            e.after = None;
        }
    }

    /// Records up to this LSN are no longer needed, given `last` (the log's
    /// newest LSN read before taking the lock).
    pub fn trim_point(&self, last: u64) -> u64 {
        let oldest_dirty = self.stripes.values().map(|e| e.first).min();
        let oldest_floor = self.floors.keys().next().copied();
        match oldest_dirty.into_iter().chain(oldest_floor).min() {
            Some(x) => x.saturating_sub(1).min(last),
            None => last,
        }
    }

    /// True once no stripe holds a record at or below `lsn` uncommitted.
    pub fn covered(&self, lsn: u64) -> bool {
        self.stripes.values().all(|e| e.first > lsn)
    }

    /// Stripes to destage now, most urgent first: those a flush waits for
    /// (records ≤ `flush`), the oldest ones while over the `pressure`
    /// limit, those idle for `age`, and those written whole (at least
    /// `whole` sectors) and then left alone for `settle`.
    pub fn pick(
        &mut self,
        flush: u64,
        pressure: usize,
        age: std::time::Duration,
        settle: std::time::Duration,
        max: usize,
        whole: u64,
    ) -> Vec<(u64, Reason)> {
        let now = Instant::now();
        let mut out: Vec<(u64, u64, Reason)> = Vec::new();
        let over = self.stripes.len().saturating_sub(pressure);
        let mut by_age: Vec<(u64, u64)> = Vec::new();
        for (&s, e) in self.stripes.iter() {
            if e.destaging.is_some() {
                continue;
            }
            let idle = now.duration_since(e.last_write);
            let reason = if e.first <= flush {
                Some(Reason::Flush)
            } else if idle >= age {
                Some(Reason::Age)
            } else if idle >= settle && e.written >= whole {
                Some(Reason::Candidate)
            } else {
                None
            };
            match reason {
                Some(r) => out.push((s, e.first, r)),
                None if over > 0 => by_age.push((e.first, s)),
                None => {}
            }
        }
        if over > 0 {
            by_age.sort_unstable();
            out.extend(by_age.into_iter().take(over).map(|(first, s)| (s, first, Reason::Pressure)));
        }
        out.sort_by_key(|&(s, first, r)| (r != Reason::Flush, r != Reason::Pressure, first, s));
        out.truncate(max);
        out.into_iter().map(|(s, _, r)| (s, r)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_log_is_trimmed_below_dirty_records_and_appends_in_flight() {
        let mut d = Dirty::default();
        assert_eq!(d.trim_point(10), 10);
        d.begin_append(11);
        assert_eq!(d.trim_point(10), 10);
        d.mark(3, 11, 1);
        d.end_append(11);
        d.mark(4, 12, 1);
        assert_eq!(d.trim_point(12), 10);
        assert!(!d.covered(11));
        assert_eq!(d.start(3), Some(11));
        d.mark(3, 13, 1); // written during the destage
        d.finished(3);
        assert!(d.is_dirty(3));
        assert_eq!(d.trim_point(13), 11);
        assert_eq!(d.start(4), Some(12));
        d.finished(4);
        assert!(d.covered(12));
        assert!(!d.covered(13));
        assert_eq!(d.start(3), Some(13));
        assert_eq!(d.start(3), None, "one destage per stripe at a time");
        d.failed(3);
        assert!(d.is_dirty(3));
        d.start(3);
        d.finished(3);
        assert_eq!(d.len(), 0);
        assert_eq!(d.trim_point(13), 13);
    }

    #[test]
    fn flush_targets_come_first_then_pressure_oldest_first() {
        let mut d = Dirty::default();
        for s in 0..6 {
            d.mark(s, 10 + s, 1);
        }
        let long = Duration::from_secs(60);
        let none = d.pick(0, 100, long, long, 10, 4);
        assert!(none.is_empty());
        let flush = d.pick(12, 100, long, long, 10, 4);
        assert_eq!(flush, vec![(0, Reason::Flush), (1, Reason::Flush), (2, Reason::Flush)]);
        let pressure = d.pick(0, 4, long, long, 10, 4);
        assert_eq!(pressure, vec![(0, Reason::Pressure), (1, Reason::Pressure)]);
        // Stripe 5 written whole (4 sectors): destaged once writes settle.
        d.mark(5, 20, 3);
        let whole = d.pick(0, 100, long, Duration::ZERO, 10, 4);
        assert_eq!(whole, vec![(5, Reason::Candidate)]);
        assert!(d.pick(0, 100, long, long, 10, 4).is_empty(), "not before it settled");
        let aged = d.pick(0, 100, Duration::ZERO, long, 2, 4);
        assert_eq!(aged.len(), 2);
    }
}
