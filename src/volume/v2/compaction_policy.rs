//! Which segments compaction rewrites, and when (interim: greedy).

use crate::codec::sequence::SegmentId;

/// Compact while the blocks held exceed this many times the live ones.
const TRIGGER: f64 = 1.25;
/// Past this many times the live blocks, commits of new writes wait for
/// compaction.
const HARD: f64 = 1.40;
/// Never move a segment fuller than this.
const MAX_UTILIZATION: f64 = 0.8;

/// Victims for a round moving at most `budget` blocks: fewest live blocks
/// per capacity first. `candidates`: (segment, live, capacity).
pub(super) fn pick(
    held: u64,
    live: u64,
    candidates: &[(SegmentId, u64, u64)],
    budget: u64,
) -> Vec<SegmentId> {
    if (held as f64) <= TRIGGER * live as f64 {
        return Vec::new();
    }
    let mut c: Vec<_> = candidates
        .iter()
        .filter(|(_, n, cap)| *cap > 0 && (*n as f64) <= MAX_UTILIZATION * *cap as f64)
        .collect();
    c.sort_by(|a, b| (a.1 * b.2).cmp(&(b.1 * a.2)));
    let mut out = Vec::new();
    let mut moved = 0;
    for (s, n, _) in c {
        if moved + n > budget && !out.is_empty() {
            break;
        }
        moved += n;
        out.push(*s);
    }
    out
}

/// True when new writes should wait for compaction.
pub(super) fn writes_wait(held: u64, live: u64) -> bool {
    live > 0 && held as f64 > HARD * live as f64
}

/// True when compaction is due at all.
pub(super) fn due(held: u64, live: u64) -> bool {
    held as f64 > TRIGGER * live as f64
}
