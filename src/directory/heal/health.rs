//! A segment's health, computed where it is true: from its record (which
//! peer holds which shard) and what the directory knows of each holder
//! now (up, down, lost, gone), never from counting shard slots.
//!
//! Pure: [`assess`] takes the record, the volume's geometry and threshold
//! and a view of the holders, and says the segment's [`SegmentHealth`],
//! whether repair should act now, and which shard indices it would
//! rebuild. The repair worker, `volume info` and `status` all use it, so
//! they always agree.
//!
//! The rules (docs/ARCHITECTURE.md, "Repair"):
//!
//! - A shard counts once per **distinct** peer: two shards on one peer are
//!   lost together, so the second is counted missing (and moved).
//! - **Whole**: k + m shards, each on its own peer that is up.
//! - **Below threshold**: fewer than `repair_threshold` distinct peers
//!   that are not lost hold shards. Repaired: every shard whose holder is
//!   lost (or gone, or never stored) is rebuilt. A down peer is not lost
//!   until `peer_lost_after`, so a reboot starts no repair.
//! - **Critical**: k shards on distinct peers that are up (k + 1 when
//!   m ≥ 3): one more failure from unreadable. Repaired at once, down
//!   holders included, without waiting for `peer_lost_after`. (With m ≤ 2,
//!   k + 1 is a single peer down; repairing that at once would make every
//!   reboot a repair storm.)
//! - **Misplaced**: two shards on one peer, or two on one failure domain
//!   while an up peer in a domain holding none of the segment exists.
//!   Repaired: one of the pair moves.
//! - **Leaving** holders (a peer drained, or shedding space above the
//!   high-water mark) count as up; once nothing is to be rebuilt, their
//!   shards are listed to move (copied from them, then recorded), so a
//!   drain never lowers redundancy.
//! - **Distrusted** holders (drained for failed audits) count as lost,
//!   and their shards are rebuilt even when the threshold would tolerate
//!   the loss, so no record keeps naming them.
//! - **Unavailable** / **lost**: fewer than k shards up / not lost. Repair
//!   needs k; it waits (unavailable) or cannot (lost).

use std::collections::{HashMap, HashSet};

use crate::api::{SegmentHealth, SegmentRecord};

/// What the directory knows of a holder now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HolderState {
    Up,
    /// Up, but leaving: drained by the operator or shedding space above
    /// the high-water mark. Its shards count as up and are read, and
    /// repair moves them elsewhere (copy first, then the record).
    Leaving,
    /// Silent for less than `peer_lost_after` (or failed): expected back.
    Down,
    /// Silent for longer, or left the cluster: its shards are gone.
    Lost,
    /// Drained for failed audits: its shards count as lost, and are
    /// rebuilt from the others whatever the threshold says.
    Distrusted,
}

/// One holder: its state and failure domain.
#[derive(Clone, Debug)]
pub struct HolderView {
    pub state: HolderState,
    pub domain: String,
}

/// The volume's geometry and threshold.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    pub k: usize,
    pub m: usize,
    pub threshold: usize,
}

impl HolderState {
    /// Serves reads now (up, leaving or not).
    pub fn is_up(self) -> bool {
        matches!(self, Self::Up | Self::Leaving)
    }
}

impl Rules {
    /// Shards on distinct up peers at or below which a segment is
    /// critical.
    pub fn critical_at(&self) -> usize {
        self.k + usize::from(self.m >= 3)
    }
}

/// What [`assess`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assessment {
    pub health: SegmentHealth,
    /// Distinct up peers holding shards.
    pub up: usize,
    /// Distinct peers not lost holding shards.
    pub alive: usize,
    pub misplaced: bool,
    /// Shard indices to rebuild now (empty: nothing to do, or it cannot
    /// be done: fewer than k readable).
    pub rebuild: Vec<usize>,
    /// Shard indices on leaving peers, to move (copied from them) once
    /// nothing is to be rebuilt; counted neither missing nor in `rebuild`.
    pub moves: Vec<usize>,
}

/// Assesses one segment. `holder` looks up a peer id (never 0) and says
/// `None` for an id no peer has any more (treated as lost). `free_domains`:
/// whether some up peer is in a failure domain that holds no shard of this
/// segment (so a domain holding two could give one away).
pub fn assess(
    record: &SegmentRecord,
    rules: Rules,
    mut holder: impl FnMut(u16) -> Option<HolderView>,
    mut free_domain: impl FnMut(&HashSet<String>) -> bool,
) -> Assessment {
    let n = record.peers.len();
    let mut seen: HashSet<u16> = HashSet::new();
    // Per index: its holder's state, or None (not stored, lost, gone,
    // or a second shard on one peer).
    let mut states: Vec<Option<HolderState>> = vec![None; n];
    let mut domains: HashMap<String, Vec<usize>> = HashMap::new();
    let mut readable = 0;
    let mut readable_alive = 0;
    let mut doubled = false;
    let mut distrusted = Vec::new();
    for (i, &id) in record.peers.iter().enumerate() {
        if id == 0 {
            continue;
        }
        let view = holder(id);
        let state = match view.as_ref().map_or(HolderState::Lost, |v| v.state) {
            HolderState::Distrusted => {
                distrusted.push(i);
                HolderState::Lost
            }
            s => s,
        };
        if state.is_up() {
            readable += 1;
        }
        if state != HolderState::Lost {
            readable_alive += 1;
        }
        if !seen.insert(id) {
            doubled = true;
            continue;
        }
        if state == HolderState::Lost {
            continue;
        }
        states[i] = Some(state);
        if let Some(v) = view {
            domains.entry(v.domain).or_default().push(i);
        }
    }
    let up = states.iter().filter(|s| s.is_some_and(HolderState::is_up)).count();
    let alive = states.iter().filter(|s| s.is_some()).count();
    // Domains with two or more shards, and whether one could move.
    let used: HashSet<String> = domains.keys().cloned().collect();
    let mut crowded: Vec<usize> =
        domains.values().filter(|ix| ix.len() > 1).flat_map(|ix| ix.iter().skip(1).copied()).collect();
    crowded.sort_unstable();
    let domain_misplaced = !crowded.is_empty() && free_domain(&used);
    let misplaced = doubled || domain_misplaced;

    let whole = rules.k + rules.m;
    let health = if readable_alive < rules.k {
        SegmentHealth::Lost
    } else if readable < rules.k {
        SegmentHealth::Unavailable
    } else if up <= rules.critical_at() && up < whole {
        SegmentHealth::Critical
    } else if alive < rules.threshold {
        SegmentHealth::BelowThreshold
    } else if up < whole || misplaced {
        SegmentHealth::Degraded
    } else {
        SegmentHealth::Whole
    };
    let missing = |pred: &dyn Fn(Option<HolderState>) -> bool| -> Vec<usize> {
        (0..n).filter(|&i| pred(states[i])).collect()
    };
    let mut rebuild = match health {
        SegmentHealth::Lost | SegmentHealth::Unavailable => Vec::new(),
        // Everything not on an up peer.
        SegmentHealth::Critical => missing(&|s| !s.is_some_and(HolderState::is_up)),
        // Everything lost (down holders are expected back).
        _ if alive < rules.threshold || doubled => missing(&|s| s.is_none()),
        _ => Vec::new(),
    };
    if rebuild.is_empty() && !matches!(health, SegmentHealth::Lost | SegmentHealth::Unavailable) {
        // Shards on a distrusted peer go even while the threshold
        // tolerates their loss: else records name it for ever.
        rebuild = distrusted;
    }
    if rebuild.is_empty()
        && domain_misplaced
        && !matches!(health, SegmentHealth::Lost | SegmentHealth::Unavailable)
    {
        // One shard of a crowded domain moves per repair: the next scan
        // sees whether another should.
        rebuild.push(crowded[0]);
    }
    // Leaving peers' shards move only while the segment is readable and
    // not waiting for a rebuild (which goes first, and may move them too).
    let moves = if rebuild.is_empty() && !matches!(health, SegmentHealth::Lost | SegmentHealth::Unavailable) {
        missing(&|s| s == Some(HolderState::Leaving))
    } else {
        Vec::new()
    };
    Assessment { health, up, alive, misplaced, rebuild, moves }
}

/// How urgent a repair is: fewer shards up first, then fewer alive, then
/// the older segment (a lower key). Smaller sorts first.
pub fn urgency(a: &Assessment) -> (usize, usize) {
    (a.up, a.alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(peers: &[u16]) -> SegmentRecord {
        SegmentRecord { peers: peers.to_vec(), shard_blocks: 1, root: [0; 32] }
    }

    #[test]
    fn a_distrusted_peers_shard_is_rebuilt_whatever_the_threshold() {
        let distrusted = |id: u16| {
            let state = if id == 2 { HolderState::Distrusted } else { HolderState::Up };
            Some(HolderView { state, domain: format!("d{id}") })
        };
        let low = Rules { k: 4, m: 2, threshold: 4 };
        let a = assess(&record(&[1, 2, 3, 4, 5, 6]), low, distrusted, no_free);
        assert_eq!((a.health, a.up, a.alive), (SegmentHealth::Degraded, 5, 5));
        assert_eq!(a.rebuild, vec![1]);
    }

    #[test]
    fn a_leaving_peers_shard_counts_up_and_moves_once_nothing_is_to_rebuild() {
        let leaving = |id: u16| {
            let state = match id {
                3 => HolderState::Leaving,
                5 => HolderState::Lost,
                _ => HolderState::Up,
            };
            Some(HolderView { state, domain: format!("d{id}") })
        };
        let a = assess(&record(&[1, 2, 3, 4, 6, 7]), R42, leaving, no_free);
        assert_eq!((a.health, a.up, a.alive), (SegmentHealth::Whole, 6, 6));
        assert!(a.rebuild.is_empty());
        assert_eq!(a.moves, vec![2]);
        // A lost shard is rebuilt first; the move waits for the next round.
        let a = assess(&record(&[1, 2, 3, 4, 5, 6]), R42, leaving, no_free);
        assert_eq!((a.health, a.rebuild.clone()), (SegmentHealth::BelowThreshold, vec![4]));
        assert!(a.moves.is_empty());
        // Down to k with the leaving one among them: critical, and it
        // counts as up (a source), so only the others are rebuilt.
        let a = assess(&record(&[1, 2, 3, 4, 5, 5]), Rules { k: 4, m: 2, threshold: 6 }, leaving, no_free);
        assert_eq!(a.health, SegmentHealth::Critical);
        assert_eq!(a.rebuild, vec![4, 5]);
    }

    /// Peers 1..=20, each in its own domain; `down` and `lost` say which
    /// are not up.
    fn view(down: &'static [u16], lost: &'static [u16]) -> impl FnMut(u16) -> Option<HolderView> {
        move |id| {
            if lost.contains(&id) {
                return Some(HolderView { state: HolderState::Lost, domain: format!("d{id}") });
            }
            let state = if down.contains(&id) { HolderState::Down } else { HolderState::Up };
            Some(HolderView { state, domain: format!("d{id}") })
        }
    }

    const R42: Rules = Rules { k: 4, m: 2, threshold: 6 };

    fn no_free(_: &HashSet<String>) -> bool {
        false
    }

    #[test]
    fn whole_when_every_shard_is_on_its_own_up_peer() {
        let a = assess(&record(&[1, 2, 3, 4, 5, 6]), R42, view(&[], &[]), no_free);
        assert_eq!(a.health, SegmentHealth::Whole);
        assert!(a.rebuild.is_empty());
    }

    #[test]
    fn a_down_peer_degrades_without_repair_until_it_is_lost() {
        let a = assess(&record(&[1, 2, 3, 4, 5, 6]), R42, view(&[3], &[]), no_free);
        assert_eq!((a.health, a.up, a.alive), (SegmentHealth::Degraded, 5, 6));
        assert!(a.rebuild.is_empty(), "a reboot starts no repair");
        let a = assess(&record(&[1, 2, 3, 4, 5, 6]), R42, view(&[], &[3]), no_free);
        assert_eq!(a.health, SegmentHealth::BelowThreshold);
        assert_eq!(a.rebuild, vec![2]);
    }

    #[test]
    fn a_lower_threshold_tolerates_degradation() {
        let r = Rules { threshold: 5, ..R42 };
        let a = assess(&record(&[1, 2, 3, 4, 5, 6]), r, view(&[], &[3]), no_free);
        assert_eq!(a.health, SegmentHealth::Degraded);
        assert!(a.rebuild.is_empty());
        // At the threshold's edge, every lost shard is rebuilt (back to whole).
        let r = Rules { k: 2, m: 4, threshold: 5 };
        let a = assess(&record(&[1, 2, 3, 4, 5, 6]), r, view(&[], &[3, 5]), no_free);
        assert_eq!(a.health, SegmentHealth::BelowThreshold);
        assert_eq!(a.rebuild, vec![2, 4]);
    }

    #[test]
    fn k_shards_up_is_critical_and_repaired_at_once_down_holders_too() {
        let a = assess(&record(&[1, 2, 3, 4, 5, 6]), R42, view(&[2, 5], &[]), no_free);
        assert_eq!((a.health, a.up), (SegmentHealth::Critical, 4));
        assert_eq!(a.rebuild, vec![1, 4]);
        // With m = 2, k + 1 up is not critical (one peer rebooting).
        let a = assess(&record(&[1, 2, 3, 4, 5, 6]), R42, view(&[5], &[]), no_free);
        assert_eq!(a.health, SegmentHealth::Degraded);
        // With m = 3, it is.
        let r = Rules { k: 4, m: 3, threshold: 7 };
        let a = assess(&record(&[1, 2, 3, 4, 5, 6, 7]), r, view(&[5, 6], &[]), no_free);
        assert_eq!((a.health, a.rebuild.clone()), (SegmentHealth::Critical, vec![4, 5]));
    }

    #[test]
    fn below_k_cannot_be_repaired() {
        let a = assess(&record(&[1, 2, 3, 4, 5, 6]), R42, view(&[1, 2, 3], &[]), no_free);
        assert_eq!(a.health, SegmentHealth::Unavailable);
        assert!(a.rebuild.is_empty());
        let a = assess(&record(&[1, 2, 3, 4, 5, 6]), R42, view(&[1], &[2, 3]), no_free);
        assert_eq!(a.health, SegmentHealth::Unavailable, "four on peers not lost: it waits");
        let a = assess(&record(&[1, 2, 3, 4, 5, 6]), R42, view(&[1], &[2, 3, 4]), no_free);
        assert_eq!(a.health, SegmentHealth::Lost);
    }

    #[test]
    fn two_shards_on_one_peer_count_once_and_one_moves() {
        let a = assess(&record(&[1, 2, 3, 4, 5, 1]), R42, view(&[], &[]), no_free);
        assert_eq!((a.up, a.misplaced), (5, true));
        assert_eq!(a.health, SegmentHealth::BelowThreshold);
        assert_eq!(a.rebuild, vec![5]);
    }

    #[test]
    fn never_stored_shards_are_missing() {
        let a = assess(&record(&[1, 2, 3, 4, 5, 0]), R42, view(&[], &[]), no_free);
        assert_eq!(a.health, SegmentHealth::BelowThreshold);
        assert_eq!(a.rebuild, vec![5]);
    }

    #[test]
    fn a_crowded_domain_moves_a_shard_only_when_a_domain_is_free() {
        let shared = |id: u16| Some(HolderView { state: HolderState::Up, domain: format!("d{}", id.min(5)) });
        let a = assess(&record(&[1, 2, 3, 4, 5, 6]), R42, shared, |_: &HashSet<String>| false);
        assert_eq!(a.health, SegmentHealth::Whole);
        assert!(!a.misplaced);
        let a =
            assess(&record(&[1, 2, 3, 4, 5, 6]), R42, shared, |used: &HashSet<String>| !used.contains("d7"));
        assert_eq!((a.health, a.misplaced, a.rebuild.clone()), (SegmentHealth::Degraded, true, vec![5]));
    }
}
