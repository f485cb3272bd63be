//! Property tests of the v2 core against simple models, and the formats'
//! strictness.

use std::collections::HashMap;

use proptest::prelude::*;

use super::map::{BlockMap, Entry, MapError, MapPage, Mapping, PAGE_BLOCKS, Target};
use super::root::{
    CheckpointRef, Freshness, RootCopy, RootError, RootKey, RootRecord, SegmentRef, SegmentRoot,
    UnverifiedRoot,
};
use super::summary::{Summary, SummaryEntry, SummaryError};
use crate::codec::key::VolumeKey;
use crate::codec::sequence::{SegmentId, Sequence};

/// Entries land around a page boundary, so runs are split across pages.
const BASE: u64 = PAGE_BLOCKS - 150;
const SPAN: u64 = 300;

fn seq(epoch: u64, counter: u64) -> Sequence {
    Sequence::new(epoch, counter).unwrap()
}

fn seg(n: u64) -> SegmentId {
    SegmentId::new(1, n).unwrap()
}

/// Few segments and few sequences, so ties (a block copied to another
/// segment with its sequence) and exact repeats happen often.
fn entry() -> impl Strategy<Value = Entry> {
    let data =
        (0..SPAN, 1..40u64, 1..4u64, 0..64u32, 0..3u64, 1..60u64).prop_map(|(a, len, s, slot, e, c)| {
            Entry::Data { start: BASE + a, len, segment: seg(s), slot, sequence: seq(e, c) }
        });
    let zero = (0..SPAN, 1..80u64, 0..3u64, 1..60u64).prop_map(|(a, len, e, c)| Entry::Zero {
        start: BASE + a,
        len,
        sequence: seq(e, c),
    });
    prop_oneof![3 => data, 1 => zero]
}

/// The model: per address, the mapping with the highest key.
#[derive(Default)]
struct Model(HashMap<u64, Mapping>);

impl Model {
    fn apply(&mut self, entry: &Entry) {
        for i in 0..entry.len() {
            let first = entry.first();
            let m = match first.target {
                Target::Zero => first,
                Target::Data { segment, slot } => Mapping {
                    sequence: first.sequence.checked_add(i).unwrap(),
                    target: Target::Data { segment, slot: slot + i as u32 },
                },
            };
            let slot = self.0.entry(entry.start() + i);
            match slot {
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    if m.beats(o.get()) {
                        o.insert(m);
                    }
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(m);
                }
            }
        }
    }

    fn live(&self) -> HashMap<SegmentId, u64> {
        let mut live = HashMap::new();
        for m in self.0.values() {
            if let Target::Data { segment, .. } = m.target {
                *live.entry(segment).or_default() += 1;
            }
        }
        live
    }
}

fn live_of(map: &BlockMap) -> HashMap<SegmentId, u64> {
    map.segments().collect()
}

fn check_against_model(map: &BlockMap, model: &Model) -> Result<(), TestCaseError> {
    for a in BASE.saturating_sub(5)..BASE + SPAN + 130 {
        prop_assert_eq!(map.lookup(a), model.0.get(&a).copied(), "address {}", a);
    }
    prop_assert_eq!(live_of(map), model.live());
    // lookup_range covers the range exactly and agrees block by block.
    let (start, len) = (BASE - 3, SPAN + 140);
    let extents = map.lookup_range(start, len);
    let mut next = start;
    for e in &extents {
        prop_assert_eq!(e.start, next);
        prop_assert!(e.len > 0);
        for i in 0..e.len {
            prop_assert_eq!(e.at(i), model.0.get(&(e.start + i)).copied(), "range at {}", e.start + i);
        }
        next += e.len;
    }
    prop_assert_eq!(next, start + len);
    // Every page is canonical: the strict decoder (runs sorted, not
    // overlapping, maximal) takes its encoding back unchanged.
    for page in map.pages() {
        prop_assert_eq!(&MapPage::decode(&page.encode()).unwrap(), page);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_map_agrees_with_the_model_whatever_the_order(
        entries in proptest::collection::vec(entry(), 1..40),
        order in any::<proptest::sample::Index>(),
        repeats in proptest::collection::vec(any::<proptest::sample::Index>(), 0..10),
    ) {
        let mut model = Model::default();
        let mut map = BlockMap::new(1 << 24);
        // Applied's accounting adds up to the live counts.
        let mut counted: HashMap<SegmentId, i64> = HashMap::new();
        for e in &entries {
            model.apply(e);
            let applied = map.apply(e).unwrap();
            if let Entry::Data { segment, .. } = e {
                *counted.entry(*segment).or_default() += applied.won as i64;
            }
            for (s, n) in applied.released {
                *counted.entry(s).or_default() -= n as i64;
            }
        }
        check_against_model(&map, &model)?;
        counted.retain(|_, n| *n != 0);
        let live: HashMap<SegmentId, i64> = live_of(&map).into_iter().map(|(s, n)| (s, n as i64)).collect();
        prop_assert_eq!(counted, live);

        // Another order, with some entries applied twice: the same map.
        let mut shuffled = entries.clone();
        let k = order.index(shuffled.len());
        shuffled.rotate_left(k);
        shuffled.reverse();
        for r in &repeats {
            let e = entries[r.index(entries.len())];
            shuffled.insert(r.index(shuffled.len() + 1), e);
        }
        let mut other = BlockMap::new(1 << 24);
        for e in &shuffled {
            other.apply(e).unwrap();
        }
        prop_assert_eq!(&other, &map);

        // Pages round-trip into the same map, live counts included.
        let pages: Vec<MapPage> = map.pages().map(|p| MapPage::decode(&p.encode()).unwrap()).collect();
        prop_assert_eq!(&BlockMap::from_pages(1 << 24, pages).unwrap(), &map);
    }

    #[test]
    fn summaries_round_trip_and_apply_as_their_entries(
        lens in proptest::collection::vec(1..20u64, 0..12),
        zeros in proptest::collection::vec((0..SPAN, 1..50u64, 1..60u64), 0..4),
        starts in proptest::collection::vec(0..SPAN, 12),
        rotate in 0..16usize,
        pad in any::<bool>(),
    ) {
        let mut entries = Vec::new();
        let mut slot = 0u32;
        let mut counter = 1;
        for (i, len) in lens.iter().enumerate() {
            entries.push(SummaryEntry::Data { start: BASE + starts[i], len: *len, slot, sequence: seq(2, counter) });
            slot += *len as u32;
            counter += len;
        }
        for (a, len, c) in zeros {
            entries.push(SummaryEntry::Zero { start: BASE + a, len, sequence: seq(2, c) });
        }
        if !entries.is_empty() {
            let k = rotate % entries.len();
            entries.rotate_left(k);
        }
        let summary = Summary { segment: seg(9), slots: slot, entries };
        let mut bytes = summary.encode();
        if pad {
            bytes.resize(bytes.len().div_ceil(4096) * 4096, 0);
        }
        prop_assert_eq!(&Summary::decode(&bytes).unwrap(), &summary);

        let mut by_summary = BlockMap::new(1 << 24);
        summary.apply_to(&mut by_summary).unwrap();
        let mut by_entries = BlockMap::new(1 << 24);
        for e in summary.entries() {
            by_entries.apply(&e).unwrap();
        }
        prop_assert_eq!(by_summary, by_entries);

        // Every proper prefix is refused, without panicking.
        let exact = summary.encode();
        for n in 0..exact.len() {
            prop_assert!(Summary::decode(&exact[..n]).is_err(), "prefix {}", n);
        }
    }

    #[test]
    fn any_flipped_byte_of_a_sealed_root_is_refused(
        since in proptest::collection::vec(any::<[u8; 32]>(), 0..4),
        checkpoint in any::<Option<([u8; 32], u32, u16)>>(),
        commit in any::<u64>(),
        flip in 1..=255u8,
    ) {
        let key = RootKey::derive(&volume_key(1));
        let root = RootRecord {
            volume_id: [5; 16],
            epoch: 9,
            commit,
            highest_sequence: seq(9, 1000),
            highest_segment: SegmentId::new(9, 100).unwrap(),
            checkpoint: checkpoint.map(|(root, first_slot, blocks)| CheckpointRef {
                segment: SegmentRef { id: SegmentId::new(8, 3).unwrap(), root: SegmentRoot(root) },
                first_slot: first_slot / 2,
                blocks: u32::from(blocks) + 1,
            }),
            since: since
                .iter()
                .enumerate()
                .map(|(i, r)| SegmentRef { id: SegmentId::new(9, i as u64 + 1).unwrap(), root: SegmentRoot(*r) })
                .collect(),
        };
        let bytes = root.seal(&key);
        prop_assert_eq!(&RootRecord::open(&bytes, &key, &[5; 16]).unwrap(), &root);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= flip;
            let got = UnverifiedRoot::parse(&bad).and_then(|r| r.verify(&key));
            prop_assert!(got.is_err(), "byte {} flipped by {:#x} accepted", i, flip);
        }
        // Padded to a block (its copy in a segment), it still opens; a
        // flipped padding byte does not.
        let mut padded = bytes.clone();
        padded.resize(4096, 0);
        prop_assert_eq!(&RootRecord::open(&padded, &key, &[5; 16]).unwrap(), &root);
        padded[4095] = flip;
        prop_assert!(UnverifiedRoot::parse(&padded).is_err());
    }
}

fn volume_key(fill: u8) -> VolumeKey {
    let mut b = [fill; 64];
    b[32] ^= 0x80;
    VolumeKey::from_bytes(&b).unwrap()
}

fn small_root(epoch: u64, commit: u64) -> RootRecord {
    RootRecord {
        volume_id: [1; 16],
        epoch,
        commit,
        highest_sequence: seq(epoch, 5),
        highest_segment: SegmentId::new(epoch, 2).unwrap(),
        checkpoint: None,
        since: vec![SegmentRef { id: SegmentId::new(epoch, 1).unwrap(), root: SegmentRoot([3; 32]) }],
    }
}

#[test]
fn a_root_sealed_with_another_key_or_for_another_volume_is_refused() {
    let root = small_root(2, 7);
    let bytes = root.seal(&RootKey::derive(&volume_key(1)));
    let other = RootKey::derive(&volume_key(2));
    assert_eq!(RootRecord::open(&bytes, &other, &[1; 16]), Err(RootError::Mac));
    let key = RootKey::derive(&volume_key(1));
    let err = RootRecord::open(&bytes, &key, &[2; 16]).unwrap_err();
    assert!(matches!(err, RootError::WrongVolume { .. }), "{err}");
    // The directory reads the claimed epoch and commit without the key.
    let unverified = UnverifiedRoot::parse(&bytes).unwrap();
    assert_eq!((unverified.epoch(), unverified.commit()), (2, 7));
    // The MAC key is not the key-check key (another derivation context).
    assert!(!format!("{key:?}").contains('1'));
}

#[test]
fn a_root_copy_rebuilds_its_root_and_never_passes_for_one() {
    let key = RootKey::derive(&volume_key(1));
    let seg = |n: u64, r: u8| SegmentRef { id: SegmentId::new(2, n).unwrap(), root: SegmentRoot([r; 32]) };
    // Commit 7 continued a root naming segments 1 and 2, and wrote 3, 4, 5.
    let previous = vec![seg(1, 1), seg(2, 2)];
    let mut root = small_root(2, 7);
    root.highest_segment = SegmentId::new(2, 5).unwrap();
    root.since = vec![seg(1, 1), seg(2, 2), seg(3, 3), seg(4, 4), seg(5, 5)];
    let copy = RootCopy::of(&root, SegmentId::new(2, 5).unwrap(), 2).unwrap();
    assert_eq!(copy.partial.since, vec![seg(3, 3), seg(4, 4)], "the carrier (5) is not in its own copy");
    let bytes = copy.seal(&key);
    let back = RootCopy::open(&bytes, &key, &[1; 16]).unwrap();
    assert_eq!(back, copy);
    assert_eq!(back.root(&previous, seg(5, 5)).unwrap(), root);
    // Against another previous root, or another key or volume: refused.
    assert!(back.root(&previous[..1], seg(5, 5)).is_err());
    assert_eq!(RootCopy::open(&bytes, &RootKey::derive(&volume_key(2)), &[1; 16]), Err(RootError::Mac));
    assert!(matches!(RootCopy::open(&bytes, &key, &[2; 16]), Err(RootError::WrongVolume { .. })));
    // A copy is not a root, even with its header cut off (another MAC key),
    // and a root is not a copy.
    assert!(UnverifiedRoot::parse(&bytes).is_err());
    let inner = UnverifiedRoot::parse(&bytes[16..]).unwrap();
    assert_eq!(inner.verify(&key), Err(RootError::Mac));
    assert!(RootCopy::open(&root.seal(&key), &key, &[1; 16]).is_err());
    // Every flipped byte, a truncation and a trailing byte are refused.
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x10;
        assert!(RootCopy::open(&bad, &key, &[1; 16]).is_err(), "byte {i}");
    }
    assert!(RootCopy::open(&bytes[..bytes.len() - 1], &key, &[1; 16]).is_err());
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(RootCopy::open(&longer, &key, &[1; 16]).is_err());

    // A commit that wrote a checkpoint into its carrier: nothing inherited,
    // the checkpoint's root comes back with the carrier's.
    let mut checkpointed = root.clone();
    checkpointed.since = vec![seg(3, 3), seg(4, 4), seg(5, 5)];
    checkpointed.checkpoint = Some(CheckpointRef { segment: seg(5, 5), first_slot: 1, blocks: 2 });
    let copy = RootCopy::of(&checkpointed, SegmentId::new(2, 5).unwrap(), 0).unwrap();
    assert_eq!(copy.partial.checkpoint.unwrap().segment.root, SegmentRoot::default());
    let back = RootCopy::open(&copy.seal(&key), &key, &[1; 16]).unwrap();
    assert_eq!(back.root(&[], seg(5, 5)).unwrap(), checkpointed);
    // The carrier must be the root's last segment.
    assert!(RootCopy::of(&root, SegmentId::new(2, 4).unwrap(), 2).is_err());
}

#[test]
fn an_older_root_is_refused_saying_what_was_seen_and_offered() {
    let mut seen = Freshness::NONE;
    seen.accept(&small_root(3, 10)).unwrap();
    // The same root again, and newer ones, are fine.
    seen.accept(&small_root(3, 10)).unwrap();
    seen.accept(&small_root(3, 11)).unwrap();
    seen.accept(&small_root(4, 12)).unwrap();
    let err = seen.accept(&small_root(4, 11)).unwrap_err();
    assert_eq!(
        err,
        RootError::Stale { seen_epoch: 4, seen_commit: 12, offered_epoch: 4, offered_commit: 11 }
    );
    let text = err.to_string();
    assert!(text.contains("epoch 4, commit 11") && text.contains("epoch 4, commit 12"), "{text}");
    assert!(text.contains("rollback is a new commit"), "{text}");
    // A root of an older epoch is older whatever its commit number.
    assert!(seen.check(&small_root(3, 99)).is_err());
    assert_eq!(seen, Freshness::new(4, 12));
}

#[test]
fn malformed_roots_are_named() {
    let key = RootKey::derive(&volume_key(1));
    let bytes = small_root(2, 7).seal(&key);
    let parse = |b: &[u8]| UnverifiedRoot::parse(b).unwrap_err();
    assert!(matches!(parse(&bytes[..10]), RootError::Truncated { .. }));
    assert!(matches!(parse(&bytes[..bytes.len() - 1]), RootError::Truncated { .. }));
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(matches!(parse(&b), RootError::Magic(_)));
    let mut b = bytes.clone();
    b[4] = 2;
    assert_eq!(parse(&b), RootError::Version(2));
    let mut b = bytes.clone();
    b[6] = 2;
    assert_eq!(parse(&b), RootError::Flags(2));
    let mut b = bytes.clone();
    b[27] = 1; // epoch ≥ 2^24
    assert!(matches!(parse(&b), RootError::Invalid(_)));
    let mut b = bytes.clone();
    b[28..32].copy_from_slice(&5000u32.to_le_bytes());
    assert_eq!(parse(&b), RootError::TooManySegments(5000));
    let mut b = bytes.clone();
    b.push(0);
    assert!(matches!(parse(&b), RootError::Trailing(1)));
    // Refused at sealing: a root whose highest sequence is from a newer epoch.
    let mut bad = small_root(2, 7);
    bad.highest_sequence = seq(3, 1);
    assert!(bad.validate().is_err());
}

#[test]
fn malformed_summaries_are_named() {
    let s = |entries: Vec<SummaryEntry>, slots| Summary { segment: seg(1), slots, entries };
    let d = |start, len, slot| SummaryEntry::Data { start, len, slot, sequence: seq(1, 1) };
    assert_eq!(s(vec![d(0, 2, 0), d(5, 2, 1)], 3).validate(), Err(SummaryError::SlotTwice { slot: 1 }));
    assert_eq!(s(vec![d(0, 2, 0)], 3).validate(), Err(SummaryError::SlotsUncovered { covered: 2, slots: 3 }));
    assert!(matches!(s(vec![d(0, 2, 2)], 3).validate(), Err(SummaryError::BadEntry { .. })));
    assert!(matches!(
        s(vec![d(u64::MAX - 1, 2, 0)], 2).validate(),
        Err(SummaryError::Range { source: MapError::AddressRange { .. }, .. })
    ));
    let good = s(vec![d(0, 2, 0), SummaryEntry::Zero { start: 9, len: 1, sequence: seq(1, 2) }], 2).encode();
    let mut b = good.clone();
    b[24] = 7;
    assert_eq!(Summary::decode(&b), Err(SummaryError::BadEntry { entry: 0, reason: "unknown kind" }));
    let mut b = good.clone();
    b[24 + 32 + 4] = 1; // a zero entry naming a slot
    assert!(matches!(Summary::decode(&b), Err(SummaryError::BadEntry { entry: 1, .. })));
    let mut b = good.clone();
    b.extend_from_slice(&[0, 1]);
    assert!(matches!(Summary::decode(&b), Err(SummaryError::Trailing(2))));
    let mut b = good;
    b[0] = 0;
    assert!(matches!(Summary::decode(&b), Err(SummaryError::Magic(_))));
}

#[test]
fn malformed_pages_are_named() {
    let mut map = BlockMap::new(1 << 24);
    let s = seg(1);
    map.apply(&Entry::Data { start: 10, len: 4, segment: s, slot: 0, sequence: seq(1, 1) }).unwrap();
    map.apply(&Entry::Data { start: 20, len: 1, segment: s, slot: 9, sequence: seq(1, 9) }).unwrap();
    let good = map.page(0).unwrap().encode();
    assert_eq!(good.len(), 24 + 2 * 32);
    for n in 0..good.len() {
        assert!(MapPage::decode(&good[..n]).is_err(), "prefix {n}");
    }
    // Second run moved to continue the first: refused as unmerged.
    let mut b = good.clone();
    b[56..60].copy_from_slice(&14u32.to_le_bytes());
    b[68..72].copy_from_slice(&4u32.to_le_bytes());
    b[72..80].copy_from_slice(&seq(1, 5).raw().to_le_bytes());
    let err = MapPage::decode(&b).unwrap_err();
    assert!(matches!(err, MapError::BadRun { run: 1, .. }), "{err}");
    // Overlapping.
    let mut b = good.clone();
    b[56..60].copy_from_slice(&12u32.to_le_bytes());
    assert!(matches!(MapPage::decode(&b), Err(MapError::BadRun { run: 1, .. })));
    // Past the page.
    let mut b = good.clone();
    b[56..60].copy_from_slice(&(PAGE_BLOCKS as u32).to_le_bytes());
    assert!(matches!(MapPage::decode(&b), Err(MapError::BadRun { run: 1, .. })));
    let mut b = good.clone();
    b[6] = 1;
    assert_eq!(MapPage::decode(&b), Err(MapError::PageFlags(1)));
    let mut b = good;
    b.resize(4096, 0);
    assert!(MapPage::decode(&b).is_ok());
    b.push(0);
    assert!(matches!(MapPage::decode(&b), Err(MapError::PageTrailing(_))));
}

#[test]
fn sequential_writes_stay_one_run_and_live_counts_follow_overwrites() {
    let (a, b) = (seg(1), seg(2));
    let mut map = BlockMap::new(1 << 24);
    // Two writes that continue each other (as one destage packs them).
    map.apply(&Entry::Data { start: 0, len: 100, segment: a, slot: 0, sequence: seq(1, 1) }).unwrap();
    map.apply(&Entry::Data { start: 100, len: 100, segment: a, slot: 100, sequence: seq(1, 101) }).unwrap();
    assert_eq!(map.extents().count(), 1);
    assert_eq!(map.live_blocks(a), 200);
    // A newer write over the middle frees 50 blocks of a.
    let applied =
        map.apply(&Entry::Data { start: 50, len: 50, segment: b, slot: 0, sequence: seq(2, 1) }).unwrap();
    assert_eq!(applied.won, 50);
    assert_eq!(applied.released, vec![(a, 50)]);
    assert_eq!((map.live_blocks(a), map.live_blocks(b)), (150, 50));
    assert_eq!(map.extents().count(), 3);
    // A trim of everything newer than both leaves nothing live.
    let applied = map.apply(&Entry::Zero { start: 0, len: 1 << 20, sequence: seq(3, 1) }).unwrap();
    assert_eq!(applied.won, 1 << 20);
    assert_eq!(map.segments().count(), 0);
    // One zero run per page.
    assert_eq!(map.extents().count(), (1 << 20) / PAGE_BLOCKS as usize);
    // Compaction moves a block with its sequence: the newer segment wins.
    let mut map = BlockMap::new(1 << 24);
    map.apply(&Entry::Data { start: 7, len: 1, segment: a, slot: 3, sequence: seq(1, 5) }).unwrap();
    map.apply(&Entry::Data { start: 7, len: 1, segment: b, slot: 0, sequence: seq(1, 5) }).unwrap();
    assert_eq!(map.lookup(7).unwrap().target, Target::Data { segment: b, slot: 0 });
    assert_eq!((map.live_blocks(a), map.live_blocks(b)), (0, 1));
}

#[test]
fn invalid_entries_are_refused() {
    let mut map = BlockMap::new(1 << 24);
    let s = seg(1);
    assert!(matches!(
        map.apply(&Entry::Zero { start: 3, len: 0, sequence: seq(1, 1) }),
        Err(MapError::EmptyEntry { .. })
    ));
    assert!(matches!(
        map.apply(&Entry::Zero { start: 1 << 63, len: 1, sequence: seq(1, 1) }),
        Err(MapError::AddressRange { .. })
    ));
    assert!(matches!(
        map.apply(&Entry::Data { start: 0, len: 2, segment: s, slot: u32::MAX, sequence: seq(1, 1) }),
        Err(MapError::SlotOverflow { .. })
    ));
    assert!(matches!(
        map.apply(&Entry::Data {
            start: 0,
            len: 2,
            segment: s,
            slot: 0,
            sequence: seq(1, crate::codec::sequence::MAX_COUNTER)
        }),
        Err(MapError::SequenceOverflow { .. })
    ));
    let err = map.apply(&Entry::Zero { start: (1 << 24) - 1, len: 2, sequence: seq(1, 1) }).unwrap_err();
    assert_eq!(err, MapError::PastEnd { start: (1 << 24) - 1, len: 2, blocks: 1 << 24 });
    assert!(err.to_string().contains("past the volume's end"), "{err}");
    assert_eq!(map, BlockMap::new(1 << 24));
    // A checkpoint page past the end is refused too.
    let mut big = BlockMap::new(1 << 30);
    big.apply(&Entry::Zero { start: 1 << 25, len: 1, sequence: seq(1, 1) }).unwrap();
    let pages: Vec<MapPage> = big.pages().cloned().collect();
    assert!(matches!(BlockMap::from_pages(1 << 24, pages), Err(MapError::PastEnd { .. })));
}

#[test]
fn the_module_doc_example_holds_in_every_order() {
    let s31 = SegmentId::new(3, 1).unwrap();
    let s41 = SegmentId::new(4, 1).unwrap();
    let summaries = [
        Summary {
            segment: s31,
            slots: 2,
            entries: vec![SummaryEntry::Data { start: 10, len: 2, slot: 0, sequence: seq(3, 1) }],
        },
        Summary {
            segment: SegmentId::new(3, 2).unwrap(),
            slots: 0,
            entries: vec![SummaryEntry::Zero { start: 11, len: 1, sequence: seq(3, 3) }],
        },
        Summary {
            segment: s41,
            slots: 1,
            entries: vec![SummaryEntry::Data { start: 10, len: 1, slot: 0, sequence: seq(4, 1) }],
        },
    ];
    for order in [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]] {
        let mut map = BlockMap::new(64);
        for i in order {
            summaries[i].apply_to(&mut map).unwrap();
        }
        let data =
            |segment, slot, sequence| Some(Mapping { sequence, target: Target::Data { segment, slot } });
        assert_eq!(map.lookup(10), data(s41, 0, seq(4, 1)), "{order:?}");
        assert_eq!(map.lookup(11), Some(Mapping { sequence: seq(3, 3), target: Target::Zero }), "{order:?}");
        assert_eq!((map.live_blocks(s31), map.live_blocks(s41)), (0, 1), "{order:?}");
    }
}
