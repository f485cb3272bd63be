//! The volume's metadata parsers: segment summaries, map pages, root
//! records and root copies come off peers and the directory. No input may
//! panic; whatever parses must re-encode to exactly its bytes (without the
//! zero padding to a block), and must behave in the map as it says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshdisk::codec::key::VolumeKey;
use meshdisk::volume::v2::map::{ADDRESS_LIMIT, BlockMap, Entry, MapError, MapPage, Target};
use meshdisk::volume::v2::root::{RootCopy, RootKey, RootRecord, SegmentRef, SegmentRoot, UnverifiedRoot};
use meshdisk::codec::sequence::{SegmentId, Sequence};
use meshdisk::volume::v2::summary::Summary;

/// 1 TiB: big enough for any page a summary names to be made, small
/// enough that a huge TRIM stays quick.
const VOLUME_BLOCKS: u64 = 1 << 28;

fuzz_target!(|data: &[u8]| {
    if let Ok(summary) = Summary::decode(data) {
        let bytes = summary.encode();
        assert_eq!(bytes[..], data[..bytes.len()]);
        // A valid summary applies, unless it reaches past the volume.
        let mut map = BlockMap::new(VOLUME_BLOCKS);
        match summary.apply_to(&mut map) {
            Ok(_) => {
                let live: u64 = map.segments().map(|(_, n)| n).sum();
                assert!(live <= u64::from(summary.slots));
            }
            Err(e) => assert!(matches!(e, MapError::PastEnd { .. }), "{e}"),
        }
    }
    if let Ok(page) = MapPage::decode(data) {
        let bytes = page.encode();
        assert_eq!(bytes[..], data[..bytes.len()]);
        // Its runs applied as entries rebuild the same page (runs are
        // stored maximal, so the representation is unique).
        let mut map = BlockMap::new(ADDRESS_LIMIT);
        for (off, run) in page.runs() {
            let start = page.base() + u64::from(off);
            let len = u64::from(run.len);
            let sequence = run.first.sequence;
            let entry = match run.first.target {
                Target::Data { segment, slot } => Entry::Data { start, len, segment, slot, sequence },
                Target::Zero => Entry::Zero { start, len, sequence },
            };
            map.apply(&entry).unwrap();
        }
        match map.page(page.index()) {
            Some(rebuilt) => assert_eq!(rebuilt, &page),
            None => assert!(page.is_empty()),
        }
        assert_eq!(BlockMap::from_pages(ADDRESS_LIMIT, [page]).unwrap(), map);
    }
    if let Ok(root) = UnverifiedRoot::parse(data) {
        // Whatever parses still needs the MAC, which random bytes never carry.
        assert!(root.epoch() < 1 << 24);
        let key = RootKey::derive(&VolumeKey::from_bytes(&[[1u8; 32], [2u8; 32]].concat()).unwrap());
        assert!(root.verify(&key).is_err());
    }
    // A root copy (from a segment's trailer) never opens without its MAC,
    // and its parser never panics.
    let key = RootKey::derive(&VolumeKey::from_bytes(&[[1u8; 32], [2u8; 32]].concat()).unwrap());
    assert!(RootCopy::open(data, &key, &[0; 16]).is_err());
    // A freshly sealed root with one byte flipped where the input says:
    // reaches the MAC check, which must refuse it.
    if data.len() >= 8 {
        let key = RootKey::derive(&VolumeKey::from_bytes(&[[3u8; 32], [4u8; 32]].concat()).unwrap());
        let epoch = u64::from(data[0]);
        let record = RootRecord {
            volume_id: [data[1]; 16],
            epoch,
            commit: u64::from(data[2]),
            highest_sequence: Sequence::new(epoch, u64::from(data[3])).unwrap(),
            highest_segment: SegmentId::new(epoch, 1000).unwrap(),
            checkpoint: None,
            since: Vec::new(),
        };
        let mut sealed = record.seal(&key);
        let at = usize::from(data[4]) % sealed.len();
        sealed[at] ^= data[5] | 1;
        assert!(RootRecord::open(&sealed, &key, &record.volume_id).is_err());
        // Its copy, carried by its last segment, likewise; unflipped, it
        // opens and rebuilds the root.
        let mut with_carrier = record.clone();
        let carrier = SegmentRef { id: SegmentId::new(epoch, 1000).unwrap(), root: SegmentRoot([data[6]; 32]) };
        with_carrier.since = vec![carrier];
        let copy = RootCopy::of(&with_carrier, carrier.id, 0).unwrap();
        let mut bytes = copy.seal(&key);
        assert_eq!(RootCopy::open(&bytes, &key, &record.volume_id).unwrap().root(&[], carrier).unwrap(), with_carrier);
        let at = usize::from(data[7]) % bytes.len();
        bytes[at] ^= data[5] | 1;
        assert!(RootCopy::open(&bytes, &key, &record.volume_id).is_err());
    }
});
