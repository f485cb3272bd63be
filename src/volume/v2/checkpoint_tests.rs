//! The checkpoint and the paged map against a plain [`BlockMap`]: random
//! summaries, checkpoints at random points, caches as small as one page,
//! random evictions; pages served from a fake store by the `NeedPage`
//! protocol, as an attach will fetch them from peers.

use std::collections::{BTreeSet, HashMap};

use proptest::prelude::*;

use super::cache::{MapCache, NeedPage};
use super::checkpoint::{
    BlockRange, CheckpointError, CheckpointIndex, Continuation, IndexHead, PageFetch, PageRef, page_blobs,
};
use super::map::{BlockMap, PAGE_BLOCKS};
use super::reader::BLOCK;
use super::root::{SegmentRef, SegmentRoot};
use super::summary::{Summary, SummaryEntry};
use crate::codec::sequence::{SegmentId, Sequence};

/// `n` cases, or as many as `PROPTEST_CASES` says (`with_cases` alone
/// ignores it).
fn cases(n: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(n)
}

/// Four pages; entries land around the page boundaries.
const PAGES: u64 = 4;
const BLOCKS: u64 = PAGES * PAGE_BLOCKS;

fn seq(epoch: u64, counter: u64) -> Sequence {
    Sequence::new(epoch, counter).unwrap()
}

/// Where checkpoint pages are written: blocks by (segment, first slot),
/// and each segment's root (a stand-in: blake3 of its blocks).
#[derive(Default)]
struct Store {
    blocks: HashMap<(SegmentId, u32), Vec<u8>>,
    roots: HashMap<SegmentId, SegmentRoot>,
    next: u64,
}

impl Store {
    /// Writes `pending`, drops the summaries it covers from `since` and
    /// installs it in `cache`; its index.
    fn land(
        &mut self,
        pending: &super::cache::PendingCheckpoint,
        since: &mut Vec<Summary>,
        cache: &mut MapCache,
    ) -> CheckpointIndex {
        let index = self.write(pending);
        since.retain(|s| !pending.covers().contains(&s.segment));
        cache.install(index.clone()).unwrap();
        index
    }

    /// Writes the blobs of a checkpoint into one new segment, returns the
    /// index, after a round trip through a head with continuations.
    fn write(&mut self, pending: &super::cache::PendingCheckpoint) -> CheckpointIndex {
        self.next += 1;
        let id = SegmentId::new(9, self.next).unwrap();
        let mut all = Vec::new();
        let mut placed = Vec::new();
        let mut slot = 0u32;
        for blob in &pending.blobs {
            self.blocks.insert((id, slot), blob.bytes.clone());
            all.extend_from_slice(&blob.bytes);
            placed.push((blob.page, slot));
            slot += blob.blocks();
        }
        let root = SegmentRoot(*blake3::hash(&all).as_bytes());
        self.roots.insert(id, root);
        let segment = SegmentRef { id, root };
        let index = pending.finish(placed.into_iter().map(|(p, s)| (p, segment, s))).unwrap();
        // The length a writer lays the checkpoint out by, before any root exists.
        assert_eq!(index.encode().len(), pending.index_len(usize::from(!pending.blobs.is_empty())));
        round_trip(&index)
    }

    /// What peers would return for `fetch`, checked the way a reader does:
    /// the segment root must be the one the store wrote.
    fn serve(&self, fetch: &PageFetch) -> Vec<u8> {
        assert_eq!(self.roots.get(&fetch.segment.id), Some(&fetch.segment.root), "root reachable");
        let bytes = self.blocks[&(fetch.segment.id, fetch.first_slot)].clone();
        assert_eq!(bytes.len(), fetch.blocks as usize * BLOCK);
        bytes
    }
}

/// Encodes an index, splits it into a head and continuations (forcing
/// continuations when it is long enough), decodes it back.
fn round_trip(index: &CheckpointIndex) -> CheckpointIndex {
    let bytes = index.encode();
    let inline = bytes.len().min(100);
    let rest = bytes.len() - inline;
    let mut continuations = Vec::new();
    let mut left = rest;
    let mut n = 0;
    // One block per extent, so a long index spans several.
    while left > 0 {
        n += 1;
        let segment = SegmentRef { id: SegmentId::new(8, n).unwrap(), root: SegmentRoot([n as u8; 32]) };
        continuations.push(Continuation { segment, first_slot: 3, blocks: 1 });
        left -= left.min(BLOCK);
    }
    let (head, parts) = IndexHead::split(&bytes, inline, continuations).unwrap();
    let encoded = head.encode();
    assert_eq!(encoded.len() % BLOCK, 0);
    let decoded = IndexHead::decode(&encoded).unwrap();
    assert_eq!(decoded, head);
    let padded: Vec<Vec<u8>> = parts
        .into_iter()
        .map(|mut p| {
            p.resize(p.len().div_ceil(BLOCK) * BLOCK, 0);
            p
        })
        .collect();
    let refs: Vec<&[u8]> = padded.iter().map(Vec::as_slice).collect();
    let back = decoded.assemble(&refs).unwrap();
    assert_eq!(&back, index);
    back
}

/// Runs `f` until it stops asking for pages, serving each from `store`.
fn resolve<T>(
    cache: &mut MapCache,
    store: &Store,
    mut f: impl FnMut(&mut MapCache) -> Result<T, NeedPage>,
) -> T {
    for _ in 0..10_000 {
        match f(cache) {
            Ok(t) => return t,
            Err(NeedPage(fetch)) => {
                cache.insert_page(fetch.page, &store.serve(&fetch)).unwrap();
                assert!(cache.loaded_pages() <= cache.capacity());
            }
        }
    }
    panic!("the cache keeps asking for pages");
}

/// The extents of a whole range, fetching as needed.
fn range(cache: &mut MapCache, store: &Store, start: u64, len: u64) -> Vec<super::map::Extent> {
    let (mut out, mut cursor, end) = (Vec::new(), start, start + len);
    for _ in 0..10_000 {
        let (extents, need) = cache.lookup_range(cursor, end - cursor);
        cursor = extents.last().map_or(cursor, |e| e.start + e.len);
        out.extend(extents);
        match need {
            None => {
                assert_eq!(cursor, end);
                return out;
            }
            Some(NeedPage(fetch)) => cache.insert_page(fetch.page, &store.serve(&fetch)).unwrap(),
        }
        assert!(cache.loaded_pages() <= cache.capacity());
    }
    panic!("lookup_range makes no progress");
}

/// An address near a page boundary.
fn address() -> impl Strategy<Value = u64> {
    (0..=PAGES, -40i64..40).prop_map(|(p, off)| (p * PAGE_BLOCKS).saturating_add_signed(off).min(BLOCKS - 1))
}

#[derive(Clone, Debug)]
enum Piece {
    Data { start: u64, len: u64, counter: u64, epoch: u64 },
    Zero { start: u64, len: u64, counter: u64, epoch: u64 },
}

fn piece() -> impl Strategy<Value = Piece> {
    let data = (address(), 1..70u64, 1..50u64, 0..3u64).prop_map(|(start, len, counter, epoch)| {
        Piece::Data { start, len: len.min(BLOCKS - start), counter, epoch }
    });
    let zero = (address(), 1..120u64, 1..50u64, 0..3u64).prop_map(|(start, len, counter, epoch)| {
        Piece::Zero { start, len: len.min(BLOCKS - start), counter, epoch }
    });
    prop_oneof![3 => data, 1 => zero]
}

fn summary(segment: SegmentId, pieces: &[Piece]) -> Summary {
    let mut slot = 0u32;
    let entries = pieces
        .iter()
        .map(|p| match *p {
            Piece::Data { start, len, counter, epoch } => {
                let e = SummaryEntry::Data { start, len, slot, sequence: seq(epoch, counter) };
                slot += len as u32;
                e
            }
            Piece::Zero { start, len, counter, epoch } => {
                SummaryEntry::Zero { start, len, sequence: seq(epoch, counter) }
            }
        })
        .collect();
    Summary { segment, slots: slot, entries }
}

#[derive(Clone, Debug)]
enum Op {
    Apply(Vec<Piece>),
    Lookup(u64),
    Range(u64, u64),
    Checkpoint,
    /// A checkpoint during which another summary is applied.
    CheckpointWhileApplying(Vec<Piece>),
    /// A checkpoint made, then another summary applied before it is
    /// installed (on top of the pages it keeps loaded).
    CheckpointThenApply(Vec<Piece>),
    /// A checkpoint made (abandoned or not), a summary applied, then the
    /// checkpoint of another attach of the same root installed instead,
    /// which includes that summary: the pages this cache merged without
    /// it must not stay loaded as that checkpoint's.
    InstallAnother(Vec<Piece>, bool),
    Evict(u64),
    Settle,
    /// An earlier summary again (an attach replaying what it applied).
    Reapply(proptest::sample::Index),
    /// Any summary ever applied again, one a checkpoint covers included
    /// (the root of an attach may name a segment the checkpoint it
    /// found already folded in).
    ReapplyAny(proptest::sample::Index),
    /// A summary whose last entry reaches past the volume's end: refused
    /// whole, nothing of it applied or counted.
    ApplyPastEnd(Vec<Piece>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => proptest::collection::vec(piece(), 1..5).prop_map(Op::Apply),
        3 => address().prop_map(Op::Lookup),
        2 => (address(), 1..300u64).prop_map(|(a, l)| Op::Range(a, l.min(BLOCKS - a))),
        1 => Just(Op::Checkpoint),
        1 => proptest::collection::vec(piece(), 1..3).prop_map(Op::CheckpointWhileApplying),
        1 => proptest::collection::vec(piece(), 1..3).prop_map(Op::CheckpointThenApply),
        1 => (proptest::collection::vec(piece(), 1..3), any::<bool>())
            .prop_map(|(p, abandon)| Op::InstallAnother(p, abandon)),
        1 => (0..PAGES).prop_map(Op::Evict),
        1 => Just(Op::Settle),
        1 => any::<proptest::sample::Index>().prop_map(Op::Reapply),
        1 => any::<proptest::sample::Index>().prop_map(Op::ReapplyAny),
        1 => proptest::collection::vec(piece(), 0..3).prop_map(Op::ApplyPastEnd),
    ]
}

/// Every probe address, and the whole neighbourhood of each boundary.
fn probes() -> impl Iterator<Item = u64> {
    (0..=PAGES).flat_map(|p| {
        let b = p * PAGE_BLOCKS;
        b.saturating_sub(45)..(b + 125).min(BLOCKS)
    })
}

fn check(cache: &mut MapCache, store: &Store, model: &BlockMap) -> Result<(), TestCaseError> {
    for a in probes().step_by(7) {
        let got = resolve(cache, store, |c| c.lookup(a));
        prop_assert_eq!(got, model.lookup(a), "address {}", a);
        prop_assert!(cache.loaded_pages() <= cache.capacity());
    }
    resolve(cache, store, MapCache::settle);
    let live: HashMap<SegmentId, u64> = model.segments().collect();
    prop_assert_eq!(cache.segments().unwrap(), live);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(48)))]

    #[test]
    fn the_paged_map_agrees_with_the_model(
        ops in proptest::collection::vec(op(), 1..40),
        capacity in 1..6usize,
        attach_capacity in 1..6usize,
        attach_loads in proptest::collection::vec(0..PAGES, 0..6),
    ) {
        let mut store = Store::default();
        let mut model = BlockMap::new(BLOCKS);
        let mut cache = MapCache::new(CheckpointIndex::empty(BLOCKS), capacity);
        let mut next_segment = 0u64;
        // Summaries since the last installed checkpoint, for an attach.
        let mut since: Vec<Summary> = Vec::new();
        // Every summary ever applied.
        let mut all: Vec<Summary> = Vec::new();
        let mut last_index = CheckpointIndex::empty(BLOCKS);
        let mut new_summary = |pieces: &[Piece]| {
            next_segment += 1;
            summary(SegmentId::new(2, next_segment).unwrap(), pieces)
        };
        for op in ops {
            match op {
                Op::Apply(pieces) => {
                    let s = new_summary(&pieces);
                    s.apply_to(&mut model).unwrap();
                    cache.apply_summary(&s, fake_root(s.segment)).unwrap();
                    all.push(s.clone());
                    since.push(s);
                }
                Op::Lookup(a) => {
                    let got = resolve(&mut cache, &store, |c| c.lookup(a));
                    prop_assert_eq!(got, model.lookup(a), "address {}", a);
                }
                Op::Range(a, len) => {
                    let extents = range(&mut cache, &store, a, len);
                    let mut next = a;
                    for e in &extents {
                        prop_assert_eq!(e.start, next);
                        prop_assert!(e.len > 0);
                        for i in 0..e.len {
                            prop_assert_eq!(e.at(i), model.lookup(e.start + i), "range at {}", e.start + i);
                        }
                        next += e.len;
                    }
                    prop_assert_eq!(next, a + len);
                }
                Op::Checkpoint => {
                    let pending = resolve(&mut cache, &store, MapCache::checkpoint);
                    last_index = store.land(&pending, &mut since, &mut cache);
                }
                Op::CheckpointWhileApplying(pieces) => {
                    let late = new_summary(&pieces);
                    let mut applied = false;
                    let pending = resolve(&mut cache, &store, |c| {
                        let r = c.checkpoint();
                        if r.is_err() && !applied {
                            applied = true;
                            c.apply_summary(&late, fake_root(late.segment)).unwrap();
                        }
                        r
                    });
                    late.apply_to(&mut model).unwrap();
                    if !applied {
                        cache.apply_summary(&late, fake_root(late.segment)).unwrap();
                    }
                    all.push(late.clone());
                    since.push(late);
                    last_index = store.land(&pending, &mut since, &mut cache);
                }
                Op::CheckpointThenApply(pieces) => {
                    let pending = resolve(&mut cache, &store, MapCache::checkpoint);
                    let late = new_summary(&pieces);
                    late.apply_to(&mut model).unwrap();
                    cache.apply_summary(&late, fake_root(late.segment)).unwrap();
                    all.push(late.clone());
                    since.push(late);
                    last_index = store.land(&pending, &mut since, &mut cache);
                }
                Op::InstallAnother(pieces, abandon) => {
                    let _ours = resolve(&mut cache, &store, MapCache::checkpoint);
                    let late = new_summary(&pieces);
                    late.apply_to(&mut model).unwrap();
                    cache.apply_summary(&late, fake_root(late.segment)).unwrap();
                    all.push(late.clone());
                    since.push(late);
                    if abandon {
                        cache.abandon_checkpoint();
                    }
                    // Another attach of the same root: the last checkpoint
                    // and the summaries since, `late` included.
                    let mut other = MapCache::new(last_index.clone(), 1);
                    for s in &since {
                        other.apply_summary(s, fake_root(s.segment)).unwrap();
                    }
                    let pending = resolve(&mut other, &store, MapCache::checkpoint);
                    let index = store.write(&pending);
                    cache.install(index.clone()).unwrap();
                    // Applying a summary twice is harmless: what the cache
                    // still holds apart, the root may name again.
                    for s in &since {
                        prop_assert!(
                            pending.covers().contains(&s.segment) || cache.is_recent(s.segment),
                            "summary {} neither in the checkpoint nor kept", s.segment
                        );
                    }
                    since.retain(|s| cache.is_recent(s.segment));
                    last_index = index;
                }
                Op::Evict(p) => cache.evict(p),
                Op::Settle => resolve(&mut cache, &store, MapCache::settle),
                Op::Reapply(i) => {
                    if let Some(s) = since.get(i.index(since.len().max(1))) {
                        cache.apply_summary(s, fake_root(s.segment)).unwrap();
                    }
                }
                Op::ReapplyAny(i) => {
                    if let Some(s) = all.get(i.index(all.len().max(1))) {
                        cache.apply_summary(s, fake_root(s.segment)).unwrap();
                        // The root names it again until a checkpoint covers it.
                        if !since.iter().any(|x| x.segment == s.segment) {
                            since.push(s.clone());
                        }
                    }
                }
                Op::ApplyPastEnd(mut pieces) => {
                    let before = cache.segments();
                    pieces.push(Piece::Data { start: BLOCKS - 3, len: 5, counter: 60, epoch: 3 });
                    let s = new_summary(&pieces);
                    prop_assert!(s.apply_to(&mut BlockMap::new(BLOCKS)).is_err());
                    prop_assert!(cache.apply_summary(&s, fake_root(s.segment)).is_err());
                    prop_assert!(!cache.is_recent(s.segment));
                    prop_assert_eq!(cache.segments(), before);
                }
            }
            prop_assert!(cache.loaded_pages() <= cache.capacity());
            // Counts kept as summaries land are exact whenever the cache
            // says they are, not only after a settle.
            if let Some(live) = cache.segments() {
                prop_assert_eq!(live, model.segments().collect::<HashMap<_, _>>());
            }
        }
        check(&mut cache, &store, &model)?;
        // What the map needs: live blocks, the pages, the summaries since
        // (the root names them), and nothing else (the rest is dropped).
        let mut needed: BTreeSet<SegmentId> = model.segments().map(|(s, _)| s).collect();
        needed.extend(since.iter().map(|s| s.segment));
        needed.extend(cache.index().pages.values().map(|r| r.range.segment));
        prop_assert_eq!(cache.reached().unwrap(), needed);
        for s in &since {
            prop_assert!(cache.is_recent(s.segment));
        }

        // An attach: the last checkpoint, some of its pages loaded, the
        // summaries since; its counts exact whenever it says they are.
        let mut partial = checkpoint_model(&store, &last_index);
        let mut attach = MapCache::new(last_index, attach_capacity);
        for &p in &attach_loads {
            resolve(&mut attach, &store, |c| c.lookup(p * PAGE_BLOCKS));
        }
        for (i, s) in since.iter().enumerate() {
            s.apply_to(&mut partial).unwrap();
            attach.apply_summary(s, fake_root(s.segment)).unwrap();
            if let Some(live) = attach.segments() {
                prop_assert_eq!(live, partial.segments().collect::<HashMap<_, _>>());
            }
            if let Some(&p) = attach_loads.get(i) {
                resolve(&mut attach, &store, |c| c.lookup(p * PAGE_BLOCKS + 50));
                if let Some(live) = attach.segments() {
                    prop_assert_eq!(live, partial.segments().collect::<HashMap<_, _>>());
                }
            }
        }
        prop_assert_eq!(&partial, &model);
        check(&mut attach, &store, &model)?;

        // A checkpoint now covers everything: a cache on it alone agrees.
        let pending = resolve(&mut attach, &store, MapCache::checkpoint);
        let index = store.write(&pending);
        prop_assert_eq!(index.live_counts(), model.segments().collect::<HashMap<_, _>>());
        // Every segment the map reaches has its root in the index.
        for (segment, _) in model.segments() {
            prop_assert_eq!(index.segments.get(&segment), Some(&fake_root(segment)));
        }
        let mut fresh = MapCache::new(index, 2);
        check(&mut fresh, &store, &model)?;
    }

    #[test]
    fn a_whole_map_checkpoint_pages_back_to_the_same_map(
        pieces in proptest::collection::vec(proptest::collection::vec(piece(), 1..5), 1..12),
        capacity in 1..3usize,
    ) {
        let mut model = BlockMap::new(BLOCKS);
        for (i, p) in pieces.iter().enumerate() {
            summary(SegmentId::new(2, i as u64 + 1).unwrap(), p).apply_to(&mut model).unwrap();
        }
        let mut store = Store::default();
        let id = SegmentId::new(9, 1).unwrap();
        let blobs = page_blobs(&model);
        let root = SegmentRoot(*blake3::hash(&blobs.concat_bytes()).as_bytes());
        store.roots.insert(id, root);
        let mut slot = 0;
        let (index, written) = CheckpointIndex::build(&model, seq(2, 99), SegmentId::new(2, 99).unwrap(), |b| {
            let at = slot;
            slot += b.blocks();
            (SegmentRef { id, root }, at)
        }, fake_root)
        .unwrap();
        let mut at = 0;
        for b in &written {
            store.blocks.insert((id, at), b.bytes.clone());
            at += b.blocks();
        }
        prop_assert_eq!(written, blobs);
        let index = round_trip(&index);
        let mut cache = MapCache::new(index, capacity);
        check(&mut cache, &store, &model)?;
        // The whole volume in one range, through a cache smaller than it.
        let all = range(&mut cache, &store, 0, BLOCKS);
        for e in &all {
            for i in (0..e.len).step_by(if e.first.is_some() { 1 } else { 997 }) {
                prop_assert_eq!(e.at(i), model.lookup(e.start + i));
            }
        }
    }

    #[test]
    fn the_index_parser_refuses_every_prefix_and_survives_flips(
        pieces in proptest::collection::vec(piece(), 1..8),
        flip in any::<proptest::sample::Index>(),
        bit in 0..8u8,
    ) {
        let mut model = BlockMap::new(BLOCKS);
        summary(SegmentId::new(2, 1).unwrap(), &pieces).apply_to(&mut model).unwrap();
        let id = SegmentId::new(9, 1).unwrap();
        let mut slot = 0;
        let (index, _) = CheckpointIndex::build(&model, seq(2, 9), SegmentId::new(2, 1).unwrap(), |b| {
            let at = slot;
            slot += b.blocks();
            (SegmentRef { id, root: SegmentRoot([5; 32]) }, at)
        }, fake_root)
        .unwrap();
        let bytes = index.encode();
        prop_assert_eq!(&CheckpointIndex::decode(&bytes).unwrap(), &index);
        for n in 0..bytes.len() {
            prop_assert!(CheckpointIndex::decode(&bytes[..n]).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        prop_assert!(CheckpointIndex::decode(&longer).is_err());
        let mut flipped = bytes.clone();
        flipped[flip.index(bytes.len())] ^= 1 << bit;
        if let Ok(other) = CheckpointIndex::decode(&flipped) {
            prop_assert_eq!(other.encode(), flipped);
        }
        let head = IndexHead::inline(&bytes);
        let encoded = head.encode();
        for n in 0..64 + bytes.len() {
            prop_assert!(IndexHead::decode(&encoded[..n]).is_err());
        }
        // A flip anywhere in the head is refused by the parser or the hash.
        let mut flipped = encoded.clone();
        flipped[flip.index(64 + bytes.len())] ^= 1 << bit;
        if let Ok(h) = IndexHead::decode(&flipped) {
            prop_assert!(h.assemble(&[]).is_err());
        }
    }
}

/// The map a checkpoint holds, every page read from `store`.
fn checkpoint_model(store: &Store, index: &CheckpointIndex) -> BlockMap {
    let pages = index.pages.keys().map(|&p| {
        let fetch = index.fetch(p).unwrap();
        index.open_page(p, &store.serve(&fetch)).unwrap()
    });
    let map = BlockMap::from_pages(BLOCKS, pages.collect::<Vec<_>>()).unwrap();
    assert_eq!(index.live_counts(), map.segments().collect::<HashMap<_, _>>());
    map
}

/// The root the tests' segments have (any fixed function of the id).
fn fake_root(segment: SegmentId) -> SegmentRoot {
    SegmentRoot(*blake3::hash(&segment.raw().to_le_bytes()).as_bytes())
}

trait ConcatBytes {
    fn concat_bytes(&self) -> Vec<u8>;
}

impl ConcatBytes for Vec<super::checkpoint::PageBlob> {
    fn concat_bytes(&self) -> Vec<u8> {
        self.iter().flat_map(|b| b.bytes.iter().copied()).collect()
    }
}

/// A map with data on three pages, checkpointed into a store.
fn three_pages() -> (BlockMap, Store, CheckpointIndex) {
    let mut model = BlockMap::new(BLOCKS);
    for p in 0..3 {
        let pieces = [Piece::Data { start: p * PAGE_BLOCKS + 10, len: 5, counter: p + 1, epoch: 1 }];
        summary(SegmentId::new(1, p + 1).unwrap(), &pieces).apply_to(&mut model).unwrap();
    }
    let mut store = Store::default();
    let mut cache = MapCache::new(CheckpointIndex::empty(BLOCKS), 1);
    for s in model.extents().enumerate().map(|(i, e)| {
        let super::map::Entry::Data { start, len, segment: _, slot: _, sequence } = e.entry().unwrap() else {
            unreachable!()
        };
        Summary {
            segment: SegmentId::new(1, i as u64 + 1).unwrap(),
            slots: len as u32,
            entries: vec![SummaryEntry::Data { start, len, slot: 0, sequence }],
        }
    }) {
        cache.apply_summary(&s, fake_root(s.segment)).unwrap();
    }
    let pending = resolve(&mut cache, &store, MapCache::checkpoint);
    let index = store.write(&pending);
    (model, store, index)
}

#[test]
fn a_forged_or_misplaced_page_is_refused() {
    let (_, store, index) = three_pages();
    let mut cache = MapCache::new(index.clone(), 2);
    let need = cache.lookup(10).unwrap_err().0;
    let good = store.serve(&need);
    // A flipped bit anywhere: refused by the hash, never decoded.
    for at in [0, 30, good.len() - 1] {
        let mut forged = good.clone();
        forged[at] ^= 1;
        assert!(matches!(
            cache.insert_page(need.page, &forged),
            Err(CheckpointError::PageHash { page: 0, .. })
        ));
    }
    // Another page's true bytes offered for page 0: refused too.
    let other = store.serve(&index.fetch(1).unwrap());
    assert!(matches!(cache.insert_page(0, &other), Err(CheckpointError::PageHash { .. })));
    // Padding cut off, or a page the index does not have.
    assert!(cache.insert_page(0, &good[..good.len() - 1]).is_err());
    assert_eq!(cache.insert_page(3, &good), Err(CheckpointError::UnknownPage(3)));
    assert_eq!(cache.loaded_pages(), 0);
    cache.insert_page(0, &good).unwrap();
    assert!(cache.lookup(10).unwrap().is_some());
    // The message names what happened.
    let mut forged = good.clone();
    forged[40] ^= 1;
    let e = cache.insert_page(0, &forged).unwrap_err().to_string();
    assert!(e.contains("forged"), "{e}");
}

#[test]
fn a_cache_of_n_pages_never_holds_more() {
    let (model, store, index) = three_pages();
    for capacity in 1..=3 {
        let mut cache = MapCache::new(index.clone(), capacity);
        for round in 0..3 {
            for p in (0..3).rev().chain(0..3) {
                let a = p * PAGE_BLOCKS + 10 + round;
                assert_eq!(resolve(&mut cache, &store, |c| c.lookup(a)), model.lookup(a));
                assert!(cache.loaded_pages() <= capacity);
            }
        }
        assert_eq!(cache.loaded_pages(), capacity);
    }
}

#[test]
fn an_index_too_big_for_its_head_goes_on_in_continuations() {
    let (_, _, index) = three_pages();
    let bytes = index.encode();
    let c = |n: u64, blocks| Continuation {
        segment: SegmentRef { id: SegmentId::new(1, n).unwrap(), root: SegmentRoot([n as u8; 32]) },
        first_slot: 0,
        blocks,
    };
    // 10 inline bytes, the rest in one extent.
    let (head, parts) = IndexHead::split(&bytes, 10, vec![c(7, 1)]).unwrap();
    assert_eq!(head.continuation_len(0), Some(bytes.len() - 10));
    let mut part = parts[0].clone();
    part.resize(BLOCK, 0);
    let decoded = IndexHead::decode(&head.encode()).unwrap();
    assert_eq!(decoded.assemble(&[&part]).unwrap(), index);
    // Altered continuation bytes: the hash refuses them.
    let mut altered = part.clone();
    altered[3] ^= 1;
    assert_eq!(decoded.assemble(&[&altered]), Err(CheckpointError::IndexHash));
    // Missing, or padding that is not zero.
    assert!(decoded.assemble(&[]).is_err());
    let mut dirty = part.clone();
    dirty[BLOCK - 1] = 1;
    assert!(decoded.assemble(&[&dirty]).is_err());
    // An extent too many (the last would be empty) is refused.
    assert!(IndexHead::split(&bytes, 10, vec![c(7, 1), c(8, 1)]).is_err());
}

#[test]
fn index_fields_are_checked() {
    let (_, _, index) = three_pages();
    let mut bad = index.clone();
    bad.segments.insert(SegmentId::new(1, 77).unwrap(), SegmentRoot([1; 32]));
    assert!(bad.validate().is_err(), "a segment holding no page");
    let mut bad = index.clone();
    bad.live.insert(SegmentId::new(1, 77).unwrap(), BLOCKS + 1);
    assert!(bad.validate().is_err(), "more live blocks than the volume");
    let mut bad = index.clone();
    let r = PageRef {
        range: BlockRange { segment: SegmentId::new(1, 1).unwrap(), first_slot: 0, blocks: 1 },
        hash: [0; 32],
    };
    bad.pages.insert(PAGES, r);
    assert!(bad.validate().is_err(), "a page past the end, in an unlisted segment");
}

/// What the compactor's race looks like to the map (`compactor.rs`): the
/// live blocks of a victim are found on the map at one moment, user writes
/// and TRIMs (higher sequences) land afterwards, then the move commits the
/// victim's blocks with their ORIGINAL sequences into a new segment, and
/// every segment [`MapCache::reached`] leaves out is dropped (its blocks
/// and pages are gone for good).
#[derive(Clone, Debug)]
enum RaceOp {
    /// A user commit: data and zero runs at fresh, higher sequences.
    Write(Vec<(u64, u64, bool)>),
    /// The compactor reads the live blocks of the `n`th candidate victim
    /// (a segment the root no longer names, with live blocks).
    Gather(proptest::sample::Index),
    /// It commits what it gathered (perhaps long after).
    Move,
    Checkpoint,
    /// The drop sweep.
    Drop,
    Evict(u64),
}

fn race_op() -> impl Strategy<Value = RaceOp> {
    let run = (address(), 1..40u64, any::<bool>()).prop_map(|(a, l, zero)| (a, l.min(BLOCKS - a), zero));
    prop_oneof![
        4 => proptest::collection::vec(run, 1..4).prop_map(RaceOp::Write),
        2 => any::<proptest::sample::Index>().prop_map(RaceOp::Gather),
        2 => Just(RaceOp::Move),
        2 => Just(RaceOp::Checkpoint),
        2 => Just(RaceOp::Drop),
        1 => (0..PAGES).prop_map(RaceOp::Evict),
    ]
}

/// Runs `f`, serving pages from `store`, refusing any page of a dropped
/// segment (it would have been erased from the peers).
fn resolve_live<T>(
    cache: &mut MapCache,
    store: &Store,
    dropped: &BTreeSet<SegmentId>,
    mut f: impl FnMut(&mut MapCache) -> Result<T, NeedPage>,
) -> Result<T, TestCaseError> {
    for _ in 0..10_000 {
        match f(cache) {
            Ok(t) => return Ok(t),
            Err(NeedPage(fetch)) => {
                prop_assert!(
                    !dropped.contains(&fetch.segment.id),
                    "page {} asked of dropped segment {}",
                    fetch.page,
                    fetch.segment.id
                );
                cache.insert_page(fetch.page, &store.serve(&fetch)).unwrap();
            }
        }
    }
    panic!("the cache keeps asking for pages");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(96)))]

    /// Invariant 10 and "a move never outranks a later write": whatever
    /// the interleaving of user writes, stale gathers, moves, checkpoints
    /// and drops, every block reads as the user last wrote it, from a
    /// segment that was never dropped and that holds exactly that
    /// (address, sequence) in that slot.
    #[test]
    fn moves_and_drops_never_lose_or_resurrect_a_block(
        ops in proptest::collection::vec(race_op(), 1..60),
        capacity in 1..3usize,
    ) {
        let mut store = Store::default();
        let mut cache = MapCache::new(CheckpointIndex::empty(BLOCKS), capacity);
        // What each data segment holds, slot by slot.
        let mut contents: HashMap<SegmentId, Vec<(u64, Sequence)>> = HashMap::new();
        // Every segment ever committed (data and pages), and those dropped.
        let mut known: BTreeSet<SegmentId> = BTreeSet::new();
        let mut dropped: BTreeSet<SegmentId> = BTreeSet::new();
        // The user's view: address → (sequence, data?).
        let mut user: HashMap<u64, (Sequence, bool)> = HashMap::new();
        let (mut counter, mut next_segment) = (0u64, 0u64);
        let mut gathered: Vec<(u64, Sequence)> = Vec::new();
        // The root's segments since its checkpoint: an attach reads their
        // summaries; and that checkpoint.
        let mut since: Vec<Summary> = Vec::new();
        let mut last_index = CheckpointIndex::empty(BLOCKS);
        // The whole map, for the live counts.
        let mut model = BlockMap::new(BLOCKS);
        let commit = |cache: &mut MapCache,
                          model: &mut BlockMap,
                          contents: &mut HashMap<SegmentId, Vec<(u64, Sequence)>>,
                          known: &mut BTreeSet<SegmentId>,
                          since: &mut Vec<Summary>,
                          s: Summary| {
            let mut slots = vec![(0, Sequence::ZERO); s.slots as usize];
            for e in &s.entries {
                if let SummaryEntry::Data { start, len, slot, sequence } = *e {
                    for i in 0..len {
                        slots[(slot as u64 + i) as usize] = (start + i, sequence.checked_add(i).unwrap());
                    }
                }
            }
            contents.insert(s.segment, slots);
            known.insert(s.segment);
            s.apply_to(model).unwrap();
            cache.apply_summary(&s, fake_root(s.segment)).unwrap();
            since.push(s);
        };
        for op in ops {
            match op {
                RaceOp::Write(runs) => {
                    next_segment += 1;
                    let segment = SegmentId::new(2, next_segment).unwrap();
                    let mut entries = Vec::new();
                    let mut slot = 0u32;
                    for (start, len, zero) in runs {
                        counter += 1;
                        let sequence = seq(2, counter);
                        if zero {
                            entries.push(SummaryEntry::Zero { start, len, sequence });
                            for a in start..start + len {
                                user.insert(a, (sequence, false));
                            }
                        } else {
                            entries.push(SummaryEntry::Data { start, len, slot, sequence });
                            slot += len as u32;
                            for (i, a) in (start..start + len).enumerate() {
                                user.insert(a, (sequence.checked_add(i as u64).unwrap(), true));
                            }
                            counter += len;
                        }
                    }
                    commit(&mut cache, &mut model, &mut contents, &mut known, &mut since, Summary { segment, slots: slot, entries });
                }
                RaceOp::Gather(pick) => {
                    // As `Compactor::victims` and `Inner::live_in`.
                    let live = resolve_live(&mut cache, &store, &dropped, |c| {
                        c.settle().map(|()| c.segments().expect("settled"))
                    })?;
                    let candidates: Vec<SegmentId> = live
                        .keys()
                        .copied()
                        .filter(|s| !cache.is_recent(*s) && contents.contains_key(s))
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    if candidates.is_empty() {
                        continue;
                    }
                    let victim = candidates[pick.index(candidates.len())];
                    prop_assert!(!dropped.contains(&victim), "a victim {} that was dropped", victim);
                    gathered.clear();
                    for (slot, &(address, sequence)) in contents[&victim].clone().iter().enumerate() {
                        let want = super::map::Mapping {
                            sequence,
                            target: super::map::Target::Data { segment: victim, slot: slot as u32 },
                        };
                        if resolve_live(&mut cache, &store, &dropped, |c| c.lookup(address))? == Some(want) {
                            gathered.push((address, sequence));
                        }
                    }
                }
                RaceOp::Move => {
                    if gathered.is_empty() {
                        continue;
                    }
                    gathered.sort();
                    next_segment += 1;
                    let segment = SegmentId::new(2, next_segment).unwrap();
                    let entries = gathered
                        .iter()
                        .enumerate()
                        .map(|(slot, &(start, sequence))| SummaryEntry::Data {
                            start,
                            len: 1,
                            slot: slot as u32,
                            sequence,
                        })
                        .collect();
                    let s = Summary { segment, slots: gathered.len() as u32, entries };
                    gathered.clear();
                    commit(&mut cache, &mut model, &mut contents, &mut known, &mut since, s);
                }
                RaceOp::Checkpoint => {
                    let pending = resolve_live(&mut cache, &store, &dropped, MapCache::checkpoint)?;
                    let index = store.land(&pending, &mut since, &mut cache);
                    known.extend(index.pages.values().map(|r| r.range.segment));
                    last_index = index;
                }
                RaceOp::Drop => {
                    // As `Inner::drop_unreached` (the head and index
                    // continuations are not modelled: the store keeps the
                    // index in memory).
                    let reached = resolve_live(&mut cache, &store, &dropped, |c| {
                        c.settle().map(|()| c.reached().expect("settled"))
                    })?;
                    for s in &known {
                        if !reached.contains(s) {
                            dropped.insert(*s);
                        }
                    }
                }
                RaceOp::Evict(p) => cache.evict(p),
            }
            // Counts kept as summaries land (the victims' choice reads
            // them unsettled) are exact whenever the cache gives them.
            if let Some(live) = cache.segments() {
                prop_assert_eq!(live, model.segments().collect::<HashMap<_, _>>());
            }
        }
        // An attach now: the root's segments since are all there.
        let mut attach = MapCache::new(last_index, 1);
        for s in &since {
            prop_assert!(!dropped.contains(&s.segment), "segment {} the root names was dropped", s.segment);
            attach.apply_summary(s, fake_root(s.segment)).unwrap();
        }
        // Every block as the user last wrote it, from a live segment, in
        // this attach's map and in the attach's.
        for cache in [&mut cache, &mut attach] {
            for a in probes() {
                let got = resolve_live(cache, &store, &dropped, |c| c.lookup(a))?;
                match (user.get(&a), got) {
                    (None, None) => {}
                    (Some(&(sequence, false)), Some(m)) => {
                        prop_assert_eq!(m.sequence, sequence, "block {}", a);
                        prop_assert_eq!(m.target, super::map::Target::Zero, "block {}", a);
                    }
                    (Some(&(sequence, true)), Some(m)) => {
                        prop_assert_eq!(m.sequence, sequence, "block {}", a);
                        let super::map::Target::Data { segment, slot } = m.target else {
                            return Err(TestCaseError::fail(format!("block {a} reads as zeroes")));
                        };
                        prop_assert!(!dropped.contains(&segment), "block {} is in dropped segment {}", a, segment);
                        prop_assert_eq!(contents[&segment][slot as usize], (a, sequence), "block {}", a);
                    }
                    (want, got) => {
                        return Err(TestCaseError::fail(format!("block {a}: wrote {want:?}, reads {got:?}")));
                    }
                }
            }
        }
    }
}

/// The pages a checkpoint rewrote stay loaded once it is installed (up
/// to the capacity): the next commits neither fetch them back nor wait for
/// a whole-page merge to know their live counts.
#[test]
fn an_installed_checkpoint_keeps_the_pages_it_wrote_loaded() {
    let mut store = Store::default();
    let mut cache = MapCache::new(CheckpointIndex::empty(BLOCKS), PAGES as usize);
    // Segment `id`: `len` blocks at `off` in every page.
    let on_every_page = |id: u64, off: u64, len: u64| {
        let pieces: Vec<Piece> = (0..PAGES)
            .map(|p| Piece::Data { start: p * PAGE_BLOCKS + off, len, counter: id * 100 + p, epoch: 1 })
            .collect();
        summary(SegmentId::new(2, id).unwrap(), &pieces)
    };
    let first = on_every_page(1, 5, 10);
    cache.apply_summary(&first, fake_root(first.segment)).unwrap();
    let pending = cache.checkpoint().expect("no base page to fetch");
    let index = store.write(&pending);
    cache.install(index).unwrap();
    assert_eq!(cache.loaded_pages(), PAGES as usize);
    // A later summary over every page: its counts are exact at once.
    let second = on_every_page(2, 8, 4);
    cache.apply_summary(&second, fake_root(second.segment)).unwrap();
    let live = cache.segments().expect("counted as the summary landed");
    assert_eq!(live[&first.segment], PAGES * 6);
    assert_eq!(live[&second.segment], PAGES * 4);
    for p in 0..PAGES {
        assert!(cache.lookup(p * PAGE_BLOCKS + 5).is_ok(), "page {p} was fetched again");
    }
    // A summary landing between a checkpoint and its install goes on top
    // of the kept pages, counted at once too.
    let third = on_every_page(3, 0, 6);
    let pending = cache.checkpoint().expect("every page loaded");
    cache.apply_summary(&third, fake_root(third.segment)).unwrap();
    cache.install(store.write(&pending)).unwrap();
    let live = cache.segments().expect("counted as the install re-applied it");
    assert_eq!(live[&first.segment], PAGES * 5);
    assert_eq!(live[&second.segment], PAGES * 4);
    assert_eq!(live[&third.segment], PAGES * 6);
    assert!(cache.is_recent(third.segment) && !cache.is_recent(second.segment));
    // A smaller cache keeps what fits and fetches the rest.
    let mut small = MapCache::new(CheckpointIndex::empty(BLOCKS), 1);
    small.apply_summary(&first, fake_root(first.segment)).unwrap();
    let pending = small.checkpoint().expect("no base page to fetch");
    small.install(store.write(&pending)).unwrap();
    assert_eq!(small.loaded_pages(), 1);
    check(
        &mut small,
        &store,
        &BlockMap::from_pages(BLOCKS, [])
            .map(|mut m| {
                first.apply_to(&mut m).unwrap();
                m
            })
            .unwrap(),
    )
    .unwrap();
}
