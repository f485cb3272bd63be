//! Whose segment, whose key: a clone reads its ancestors' segments and
//! blocks as they were written.
//!
//! A clone made from snapshot X of volume P starts from X's root: its map
//! points into P's segments (ids up to X's highest segment, stored under
//! P's volume id) at blocks P encrypted (sequences up to X's highest
//! sequence). The clone's own segments and sequences are above those, so
//! the boundaries tell, for any segment or sequence, which volume of the
//! lineage it belongs to. Each volume encrypts under its own key
//! ([`VolumeKey::for_lineage`]: the data key for a volume made by `volume
//! create`, a key derived from it and the lineage for a clone), since a
//! clone and its parent both write sequences above the snapshot's and an
//! XTS tweak must never repeat under one key.
//!
//! ```text
//! lineage of C (nearest first): P up to segment 7.40 / sequence 7.900
//!                               G up to segment 3.10 / sequence 3.200
//! segment 9.2  ─► C's (own key, C's volume id)
//! segment 5.1  ─► P's      sequence 7.500 ─► P's key
//! segment 2.8  ─► G's      sequence 2.10  ─► G's key
//! ```

use crate::api::VolumeSpec;
use crate::codec::key::{KeyError, VolumeKey};
use crate::codec::segment::VolumeId;
use crate::codec::sequence::{SegmentId, Sequence};
use crate::codec::xts::SectorCipher;

/// One ancestor: its id, its boundaries, its key.
struct Ancestor {
    id: VolumeId,
    highest_segment: SegmentId,
    highest_sequence: Sequence,
    cipher: SectorCipher,
}

/// A volume's own key and id, and its ancestors' (see the module doc).
pub struct Lineage {
    id: VolumeId,
    own: SectorCipher,
    /// Nearest first: boundaries strictly decreasing.
    ancestors: Vec<Ancestor>,
}

impl Lineage {
    /// The lineage of `spec`, with `data` its data key. Also returns the
    /// volume's own key (its roots' MAC keys come from it).
    pub fn new(data: &VolumeKey, spec: &VolumeSpec) -> Result<(Self, VolumeKey), KeyError> {
        let steps: Vec<_> =
            spec.lineage.iter().map(|a| (a.id, a.highest_segment, a.highest_sequence)).collect();
        let own = data.for_lineage(&spec.id, &steps)?;
        let mut ancestors = Vec::with_capacity(steps.len());
        for (i, a) in spec.lineage.iter().enumerate() {
            let key = data.for_lineage(&a.id, &steps[i + 1..])?;
            ancestors.push(Ancestor {
                id: a.id,
                highest_segment: SegmentId::from_raw(a.highest_segment),
                highest_sequence: Sequence::from_raw(a.highest_sequence),
                cipher: SectorCipher::new(&key),
            });
        }
        Ok((Self { id: spec.id, own: SectorCipher::new(&own), ancestors }, own))
    }

    /// The ancestor whose boundary is the lowest still at or above `x`.
    fn owner<T: Ord>(&self, x: T, bound: impl Fn(&Ancestor) -> T) -> Option<&Ancestor> {
        self.ancestors.iter().take_while(|a| x <= bound(a)).last()
    }

    /// The key that decrypts a data block written with `sequence`.
    pub fn by_sequence(&self, sequence: Sequence) -> &SectorCipher {
        self.owner(sequence, |a| a.highest_sequence).map_or(&self.own, |a| &a.cipher)
    }

    /// The key of `segment`'s metadata (summary, map pages, trailer).
    pub fn by_segment(&self, segment: SegmentId) -> &SectorCipher {
        self.owner(segment, |a| a.highest_segment).map_or(&self.own, |a| &a.cipher)
    }

    /// The volume id `segment` is stored (and its root made) under.
    pub fn volume_of(&self, segment: SegmentId) -> VolumeId {
        self.owner(segment, |a| a.highest_segment).map_or(self.id, |a| a.id)
    }

    /// True if `segment` is an ancestor's (read, never dropped or
    /// compacted by this volume).
    pub fn inherited(&self, segment: SegmentId) -> bool {
        self.ancestors.first().is_some_and(|a| segment <= a.highest_segment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Ancestor as Step, Durability};

    fn spec(id: u8, lineage: Vec<Step>) -> VolumeSpec {
        VolumeSpec {
            name: format!("v{id}"),
            id: [id; 16],
            size: 1 << 20,
            k: 2,
            m: 1,
            shard_size: 4096,
            repair_threshold: 3,
            key_check: [0; 32],
            key_slots: Vec::new(),
            durability: Durability::Remote,
            lineage,
        }
    }

    fn step(id: u8, segment: (u64, u64), sequence: (u64, u64)) -> Step {
        Step {
            volume: format!("v{id}"),
            snapshot: "s".into(),
            id: [id; 16],
            highest_segment: SegmentId::new(segment.0, segment.1).unwrap().raw(),
            highest_sequence: Sequence::new(sequence.0, sequence.1).unwrap().raw(),
        }
    }

    /// Which of `candidates` encrypts like `cipher` (by a sector's output).
    fn which(cipher: &SectorCipher, candidates: &[&SectorCipher]) -> usize {
        let out = |c: &SectorCipher| {
            let mut b = vec![7u8; 4096];
            c.encrypt_in_place(1, 2, &mut b);
            b
        };
        candidates.iter().position(|c| out(c) == out(cipher)).expect("one of them")
    }

    #[test]
    fn segments_and_sequences_go_to_the_volume_below_whose_boundary_they_are() {
        let data = VolumeKey::generate().unwrap();
        let g = spec(1, vec![]);
        let p = spec(2, vec![step(1, (3, 10), (3, 200))]);
        let c = spec(3, vec![step(2, (7, 40), (7, 900)), step(1, (3, 10), (3, 200))]);
        let (lg, gk) = Lineage::new(&data, &g).unwrap();
        let (lp, _) = Lineage::new(&data, &p).unwrap();
        let (lc, _) = Lineage::new(&data, &c).unwrap();
        // A volume of no lineage keeps the data key.
        assert_eq!(which(&SectorCipher::new(&gk), &[&SectorCipher::new(&data)]), 0);
        let keys = [&lg.own, &lp.own, &lc.own];
        let seg = |e, n| SegmentId::new(e, n).unwrap();
        let seq = |e, n| Sequence::new(e, n).unwrap();
        for (s, want, id) in
            [(seg(9, 2), 2, 3), (seg(7, 40), 1, 2), (seg(5, 1), 1, 2), (seg(3, 10), 0, 1), (seg(2, 8), 0, 1)]
        {
            assert_eq!(which(lc.by_segment(s), &keys), want, "segment {s}");
            assert_eq!(lc.volume_of(s), [id; 16], "segment {s}");
            assert_eq!(lc.inherited(s), want < 2, "segment {s}");
        }
        for (s, want) in [(seq(8, 1), 2), (seq(7, 900), 1), (seq(4, 1), 1), (seq(3, 200), 0), (seq(1, 5), 0)]
        {
            assert_eq!(which(lc.by_sequence(s), &keys), want, "sequence {s:?}");
        }
        // The parent, seen from itself, agrees on what it owns.
        assert_eq!(which(lp.by_sequence(seq(4, 1)), &keys), 1);
        assert_eq!(lp.volume_of(seg(5, 1)), [2; 16]);
    }
}
