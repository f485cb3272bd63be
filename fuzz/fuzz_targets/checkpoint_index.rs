//! The map checkpoint's parsers (second design): a checkpoint head and its
//! index come off peers (reached from the root, but decrypted bytes are
//! still input). No input may panic; whatever parses must re-encode to
//! exactly its bytes, and a parsed index must refuse page bytes that do
//! not hash to what it records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshdisk::volume::v2::checkpoint::{CheckpointIndex, IndexHead};

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = CheckpointIndex::decode(data) {
        assert_eq!(index.encode(), data);
        index.validate().unwrap();
        // Any page it lists: the input itself is (almost surely) not its
        // bytes, and must be refused without panicking.
        if let Some((&page, _)) = index.pages.iter().next() {
            assert!(index.fetch(page).is_some());
            let _ = index.open_page(page, data);
        }
    }
    if let Ok(head) = IndexHead::decode(data) {
        // The encoding is padded to a block; the input may stop before.
        let bytes = head.encode();
        assert!(data.len() <= bytes.len());
        assert_eq!(bytes[..data.len()], data[..]);
        // The input's own blocks as the continuations: parsed or refused.
        let parts: Vec<&[u8]> = data.chunks(4096).take(head.continuations.len()).collect();
        let _ = head.assemble(&parts);
    }
});
