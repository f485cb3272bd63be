//! The key-slot parser: a volume's key slots come from the directory,
//! which is not trusted with them. No input may panic; whatever parses must
//! re-encode to exactly the bytes it came from; and no input may open to a
//! data key under a key file that is not one of its keys (the tags stop it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshdisk::codec::VolumeKey;
use meshdisk::codec::keyslot::{KeySlotError, KeySlots, NewSlot, SlotKind, Unlock};

/// A fixed key file the fuzzer's inputs know nothing of.
fn outsider() -> VolumeKey {
    let mut bytes = [0x5au8; 64];
    bytes[32] = 0xa5;
    VolumeKey::from_bytes(&bytes).expect("halves differ")
}

/// What must hold of every set the parser accepts.
fn check_parsed(slots: &KeySlots, bytes: &[u8]) {
    assert_eq!(slots.encode(), bytes);
    // Key-file slots only: a passphrase try runs Argon2id (8 MiB at least),
    // too slow for a fuzz loop.
    if slots.slots().iter().any(|s| s.kind() == SlotKind::KeyFile) {
        match slots.unlock(&Unlock::KeyFile(&outsider())) {
            Err(KeySlotError::WrongKeyFile) => {}
            other => panic!("an outsider's key file gave {other:?}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(slots) = KeySlots::parse(data) {
        check_parsed(&slots, data);
    }
    // The same bytes behind a valid header and set check: reaches each
    // slot's own checks (kind, reserved bytes, cost), which random sets
    // almost never get past the set check to.
    if !data.is_empty() {
        let count = usize::from(data[0] % 8) + 1;
        let mut set = b"MDKS\x01\x00".to_vec();
        set.extend_from_slice(&[count as u8, 0]);
        set.extend((0..count * 144).map(|i| data.get(1 + i).copied().unwrap_or(0)));
        let check = blake3::hash(&set);
        set.extend_from_slice(&check.as_bytes()[..8]);
        if let Ok(slots) = KeySlots::parse(&set) {
            assert_eq!(slots.slots().len(), count);
            check_parsed(&slots, &set);
        }
    }
    // Sealed slots whose bytes the input then alters (at a chosen place):
    // reaches the check-id and tag paths that random bytes never get to.
    if data.len() >= 66 {
        let Ok(file) = VolumeKey::from_bytes(&data[..64]) else { return };
        let (data_key, slots) = KeySlots::create(&NewSlot::KeyFile(&file)).expect("create");
        let mut bytes = slots.encode();
        let at = usize::from(data[64]) % bytes.len();
        bytes[at] ^= data[65];
        match KeySlots::parse(&bytes) {
            Ok(parsed) => {
                assert_eq!(data[65], 0, "an altered set parsed");
                assert!(parsed.unlock(&Unlock::KeyFile(&file)).expect("unlock").same_key(&data_key));
            }
            Err(_) => assert_ne!(data[65], 0),
        }
    }
});
