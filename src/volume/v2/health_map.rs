//! The volume's health map: for a range of the disk, how redundantly its
//! newest data is stored, for the NBD `meshdisk:health` metadata context
//! (`nbdinfo --map=meshdisk:health`; docs/formats.md).
//!
//! ```text
//! range ─► blocks' newest versions: local index vs committed map (as
//!          BLOCK_STATUS's base:allocation decides holes)
//!       ─► runs: unwritten/zero │ only in the local log │ in segment S
//!       ─► the segments' health: cache (HEALTH_TTL), else one
//!          `SegmentHealth` call per MAX_SEGMENTS_PER_CALL segments
//!       ─► extents in bytes, adjacent equal ones merged
//! ```
//!
//! A block whose newest version is in a committed segment has that
//! segment's health, mapped to a [`Redundancy`] by [`redundancy`]; one
//! written (or trimmed) since the last commit is only in this machine's
//! local log ([`HEALTH_LOCAL_ONLY`]); one never written, or trimmed in a
//! committed root, has nothing to lose and is whole. Health is the
//! directory's, assessed as `meshdisk volume info` counts it, and cached
//! here for [`HEALTH_TTL`] so a whole-disk `nbdinfo --map` makes a few
//! directory calls, not one per extent.
//!
//! [`HEALTH_LOCAL_ONLY`]: crate::backend::HEALTH_LOCAL_ONLY

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::map::{Extent, Newest, Target, newest_runs};
use super::volume::Inner;
use crate::api::{MAX_SEGMENTS_PER_CALL, SegmentHealth};
use crate::backend::{self, ErrorKind, HealthExtent, Redundancy, push_health};
use crate::codec::segment::BLOCK_SIZE;
use crate::codec::sequence::SegmentId;

const BLOCK: u64 = BLOCK_SIZE as u64;

/// How long a segment's health, once asked, is taken as still true. Short:
/// the map is for people and backup tools watching a peer fail and the
/// repair catch up; a peer counts as down only after the directory's
/// `--peer-timeout` (seconds) anyway.
pub const HEALTH_TTL: Duration = Duration::from_secs(2);

/// Where the newest version of a run of blocks lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Holder {
    /// Nowhere: never written, or zeroed in a committed root.
    Nothing,
    /// Only in this machine's local log (written or zeroed since the last
    /// commit).
    Local,
    /// In a committed segment.
    Segment(SegmentId),
}

/// The [`Redundancy`] of data in a segment of this health (`None`: the
/// directory has no record of it, so no shard of it can be found).
pub fn redundancy(health: Option<SegmentHealth>) -> Redundancy {
    match health {
        Some(SegmentHealth::Whole) => Redundancy::Whole,
        Some(SegmentHealth::Degraded) => Redundancy::Degraded,
        Some(SegmentHealth::BelowThreshold | SegmentHealth::Critical) => Redundancy::AtRisk,
        Some(SegmentHealth::Unavailable) => Redundancy::Unavailable,
        Some(SegmentHealth::Lost) | None => Redundancy::Lost,
    }
}

/// Blocks `first..end` as runs of (blocks, holder), from the local index's
/// and the committed map's extents over exactly that range (the local
/// version wins when it is newer; at the same sequence the commit carried
/// it). Adjacent runs with one holder are merged.
pub fn holders(local: &[Extent], committed: &[Extent], first: u64, end: u64) -> Vec<(u64, Holder)> {
    let mut out: Vec<(u64, Holder)> = Vec::new();
    for (blocks, newest) in newest_runs(local, committed, first, end) {
        let holder = match newest {
            Newest::Local(_) => Holder::Local,
            Newest::Committed(c) => match c.target {
                Target::Zero => Holder::Nothing,
                Target::Data { segment, .. } => Holder::Segment(segment),
            },
            Newest::Never => Holder::Nothing,
        };
        match out.last_mut() {
            Some((n, h)) if *h == holder => *n += blocks,
            _ => out.push((blocks, holder)),
        }
    }
    out
}

/// The health extents of bytes `offset..offset + length`, from the runs
/// of [`holders`] over its blocks (starting at `offset`'s block) and the
/// health of their segments.
pub fn extents(
    runs: &[(u64, Holder)],
    health: &HashMap<SegmentId, Option<SegmentHealth>>,
    offset: u64,
    length: u64,
) -> Vec<HealthExtent> {
    let mut out = Vec::new();
    // The first run starts at offset's block; the byte range starts later.
    let mut skip = offset % BLOCK;
    let mut left = length;
    for &(blocks, holder) in runs {
        if left == 0 {
            break;
        }
        let bytes = (blocks * BLOCK - skip).min(left);
        skip = 0;
        let (r, local_only) = match holder {
            Holder::Nothing => (Redundancy::Whole, false),
            Holder::Local => (Redundancy::Whole, true),
            Holder::Segment(s) => (redundancy(health.get(&s).copied().flatten()), false),
        };
        push_health(&mut out, bytes, r, local_only);
        left -= bytes;
    }
    out
}

/// Segments' health as last asked of the directory, each for
/// [`HEALTH_TTL`].
#[derive(Default)]
pub struct HealthCache {
    known: Mutex<HashMap<SegmentId, (Instant, Option<SegmentHealth>)>>,
}

impl HealthCache {
    /// The health of those of `ids` asked within the TTL; the rest are
    /// returned to be asked.
    fn lookup(
        &self,
        ids: &[SegmentId],
        now: Instant,
    ) -> (HashMap<SegmentId, Option<SegmentHealth>>, Vec<SegmentId>) {
        let known = self.known.lock().expect("health cache");
        let mut found = HashMap::new();
        let mut ask = Vec::new();
        for &id in ids {
            match known.get(&id) {
                Some(&(at, h)) if now.saturating_duration_since(at) < HEALTH_TTL => {
                    found.insert(id, h);
                }
                _ => ask.push(id),
            }
        }
        (found, ask)
    }

    fn note(&self, answers: impl IntoIterator<Item = (SegmentId, Option<SegmentHealth>)>, now: Instant) {
        let mut known = self.known.lock().expect("health cache");
        // Stale entries go, so the cache holds what was asked lately.
        known.retain(|_, (at, _)| now.saturating_duration_since(*at) < HEALTH_TTL);
        known.extend(answers.into_iter().map(|(id, h)| (id, (now, h))));
    }
}

impl Inner {
    /// The health map of bytes `offset..offset + length`.
    pub(super) async fn health_map(&self, offset: u64, length: u32) -> backend::Result<Vec<HealthExtent>> {
        // As block status: the map is only current while the lease is held.
        self.wait_for_lease("health status", offset, u64::from(length)).await?;
        if length == 0 {
            return Ok(Vec::new());
        }
        let first = offset / BLOCK;
        let end = (offset + u64::from(length)).div_ceil(BLOCK);
        let local: Vec<Extent> = self
            .local
            .lock()
            .expect("local")
            .lookup(first, end - first)
            .into_iter()
            .map(|(e, _)| e)
            .collect();
        let committed = self.committed_extents(first, end - first).await?;
        let runs = holders(&local, &committed, first, end);

        let mut segments: Vec<SegmentId> = runs
            .iter()
            .filter_map(|&(_, h)| match h {
                Holder::Segment(s) => Some(s),
                _ => None,
            })
            .collect();
        segments.sort_unstable();
        segments.dedup();
        let now = Instant::now();
        let (mut health, ask) = self.segment_health.lookup(&segments, now);
        for batch in ask.chunks(MAX_SEGMENTS_PER_CALL) {
            let answers = self.client.segment_health(&self.name, batch.to_vec()).await.map_err(|e| {
                let why = format!("the directory's health of {} segments: {e}", batch.len());
                backend::Error::failed(
                    ErrorKind::Unavailable,
                    "health status",
                    offset,
                    u64::from(length),
                    why,
                )
            })?;
            let answers: Vec<_> = batch.iter().copied().zip(answers).collect();
            health.extend(answers.iter().copied());
            self.segment_health.note(answers, now);
        }
        Ok(extents(&runs, &health, offset, u64::from(length)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::sequence::Sequence;
    use crate::volume::v2::map::{BlockMap, Entry};

    fn seg(n: u64) -> SegmentId {
        SegmentId::new(1, n).unwrap()
    }

    fn seq(n: u64) -> Sequence {
        Sequence::new(1, n).unwrap()
    }

    #[test]
    fn segment_health_maps_to_five_redundancy_values() {
        use SegmentHealth::*;
        let got: Vec<u32> = SegmentHealth::ALL.iter().map(|&h| redundancy(Some(h)) as u32).collect();
        // whole, degraded, below threshold, critical, unavailable, lost.
        assert_eq!(got, vec![0, 1, 2, 2, 3, 4]);
        assert_eq!(redundancy(None), Redundancy::Lost);
        assert!(redundancy(Some(Critical)) > redundancy(Some(Degraded)));
    }

    #[test]
    fn the_newest_version_decides_who_holds_a_block_and_equal_neighbours_merge() {
        // Committed: 0..8 in segment 1, 8..12 in segment 2, 12..14 zeroed,
        // 14..20 never written.
        let mut committed = BlockMap::new(32);
        let data =
            |start, len, segment, first| Entry::Data { start, len, segment, slot: 0, sequence: seq(first) };
        committed.apply(&data(0, 4, seg(1), 10)).unwrap();
        committed.apply(&data(4, 4, seg(1), 20)).unwrap();
        committed.apply(&data(8, 4, seg(2), 30)).unwrap();
        committed.apply(&Entry::Zero { start: 12, len: 2, sequence: seq(40) }).unwrap();
        // Local: 2..4 rewritten since (newer), 8..10 as committed (the
        // commit carried it: same sequences), 16..17 zeroed since.
        let mut local = BlockMap::new(32);
        local.apply(&data(2, 2, seg(9), 50)).unwrap();
        local.apply(&data(8, 2, seg(8), 30)).unwrap();
        local.apply(&Entry::Zero { start: 16, len: 1, sequence: seq(60) }).unwrap();
        let runs = holders(&local.lookup_range(0, 20), &committed.lookup_range(0, 20), 0, 20);
        use Holder::*;
        assert_eq!(
            runs,
            vec![
                (2, Segment(seg(1))),
                (2, Local),
                (4, Segment(seg(1))),
                (4, Segment(seg(2))),
                (4, Nothing),
                (1, Local),
                (3, Nothing),
            ]
        );

        // Segment 1 degraded, segment 2 critical: bytes from the middle
        // of block 1 to the middle of block 17.
        let health =
            HashMap::from([(seg(1), Some(SegmentHealth::Degraded)), (seg(2), Some(SegmentHealth::Critical))]);
        let runs = holders(&local.lookup_range(1, 17), &committed.lookup_range(1, 17), 1, 18);
        let got: Vec<(u64, u32)> =
            extents(&runs, &health, BLOCK + 100, 16 * BLOCK).iter().map(|e| (e.length, e.flags())).collect();
        assert_eq!(
            got,
            vec![
                (BLOCK - 100, 1),
                (2 * BLOCK, 8),
                (4 * BLOCK, 1),
                (4 * BLOCK, 2),
                (4 * BLOCK, 0),
                (BLOCK, 8),
                (100, 0),
            ]
        );
        assert_eq!(got.iter().map(|e| e.0).sum::<u64>(), 16 * BLOCK);

        // Equal values merge across holders: two whole segments and the
        // unwritten range after them are one extent; no record is lost.
        let all_whole = HashMap::from([(seg(1), Some(SegmentHealth::Whole)), (seg(2), None)]);
        let runs = vec![(4, Segment(seg(1))), (2, Nothing), (1, Segment(seg(2))), (1, Segment(seg(1)))];
        let got: Vec<(u64, u32)> =
            extents(&runs, &all_whole, 0, 8 * BLOCK).iter().map(|e| (e.length, e.flags())).collect();
        assert_eq!(got, vec![(6 * BLOCK, 0), (BLOCK, 4), (BLOCK, 0)]);
    }

    #[test]
    fn cached_health_is_used_for_the_ttl_then_asked_again() {
        let cache = HealthCache::default();
        let t0 = Instant::now();
        cache.note([(seg(1), Some(SegmentHealth::Degraded)), (seg(2), None)], t0);
        let (found, ask) = cache.lookup(&[seg(1), seg(2), seg(3)], t0 + Duration::from_millis(500));
        assert_eq!(found, HashMap::from([(seg(1), Some(SegmentHealth::Degraded)), (seg(2), None)]));
        assert_eq!(ask, vec![seg(3)]);
        let (found, ask) = cache.lookup(&[seg(1), seg(3)], t0 + HEALTH_TTL);
        assert!(found.is_empty());
        assert_eq!(ask, vec![seg(1), seg(3)]);
        // Noting later answers drops the stale ones.
        cache.note([(seg(3), Some(SegmentHealth::Whole))], t0 + HEALTH_TTL);
        assert_eq!(cache.known.lock().unwrap().len(), 1);
    }
}
