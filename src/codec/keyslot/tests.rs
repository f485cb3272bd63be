//! Key slots: round trips, wrong keys, passphrase changes, tampering, the
//! encoding.

use super::*;
use proptest::prelude::*;

/// The cheapest cost the slots accept (8 MiB, one pass): Argon2id
/// stays a few milliseconds per try.
const CHEAP: KdfCost = KdfCost { memory_kib: KdfCost::MIN_MEMORY_KIB, iterations: 1, parallelism: 1 };

fn pass(p: &[u8]) -> NewSlot<'_> {
    NewSlot::Passphrase { passphrase: p, cost: CHEAP }
}

fn key(fill: u8) -> VolumeKey {
    let mut b = [fill; KEY_LEN];
    b[32] ^= 1;
    VolumeKey::from_bytes(&b).unwrap()
}

#[test]
fn a_key_file_slot_round_trips_through_the_encoding() {
    let file = key(1);
    let (data_key, slots) = KeySlots::create(&NewSlot::KeyFile(&file)).unwrap();
    let bytes = slots.encode();
    assert_eq!(bytes.len(), encoded_len(1));
    let parsed = KeySlots::parse(&bytes).unwrap();
    assert_eq!(parsed, slots);
    assert!(parsed.unlock(&Unlock::KeyFile(&file)).unwrap().same_key(&data_key));
    assert_eq!(parsed.slots()[0].kind(), SlotKind::KeyFile);
    assert_eq!(parsed.slots()[0].kdf_params(), None);
}

#[test]
fn a_passphrase_slot_round_trips_and_stores_its_cost() {
    let (data_key, slots) = KeySlots::create(&pass(b"correct horse")).unwrap();
    let parsed = KeySlots::parse(&slots.encode()).unwrap();
    let opened = parsed.unlock(&Unlock::Passphrase(b"correct horse")).unwrap();
    assert!(opened.same_key(&data_key));
    let params = parsed.slots()[0].kdf_params().unwrap();
    assert_eq!((params.memory_kib, params.iterations, params.parallelism), (8 * 1024, 1, 1));
}

#[test]
fn the_wrap_is_the_documented_blake3_siv() {
    // docs/formats.md's formulas, computed with blake3 directly.
    let mut file_bytes = [0u8; KEY_LEN];
    for (i, b) in file_bytes.iter_mut().enumerate() {
        *b = i as u8;
    }
    let file = VolumeKey::from_bytes(&file_bytes).unwrap();
    let (data_key, slots) = KeySlots::create(&NewSlot::KeyFile(&file)).unwrap();
    let bytes = slots.encode();
    let slot = &bytes[HEADER_LEN..HEADER_LEN + SLOT_LEN];
    let salt = &slot[4..20];
    let check_key = blake3::derive_key("meshdisk 2026-11 key slot check id v1", &file_bytes);
    assert_eq!(blake3::keyed_hash(&check_key, salt).as_bytes()[..16], slot[32..48]);
    let tag_key = blake3::derive_key("meshdisk 2026-11 key slot tag v1", &file_bytes);
    let mut tag_input = slot[..48].to_vec();
    tag_input.extend_from_slice(&data_key.bytes()[..]);
    assert_eq!(blake3::keyed_hash(&tag_key, &tag_input).as_bytes()[..], slot[112..144]);
    let stream_key = blake3::derive_key("meshdisk 2026-11 key slot stream v1", &file_bytes);
    let mut stream = [0u8; KEY_LEN];
    blake3::Hasher::new_keyed(&stream_key).update(&slot[112..144]).finalize_xof().fill(&mut stream);
    let unwrapped: Vec<u8> = slot[48..112].iter().zip(stream).map(|(w, s)| w ^ s).collect();
    assert_eq!(unwrapped[..], data_key.bytes()[..]);
    // The header: kind 1, zero reserved bytes and cost; the set's trailer.
    assert_eq!(slot[0..4], [1, 0, 0, 0]);
    assert_eq!(slot[20..32], [0; 12]);
    assert_eq!(bytes[..8], *b"MDKS\x01\x00\x01\x00");
    assert_eq!(bytes[bytes.len() - 8..], blake3::hash(&bytes[..bytes.len() - 8]).as_bytes()[..8]);
}

#[test]
fn data_keys_are_random_and_differ_from_the_key_file() {
    let file = key(1);
    let (a, _) = KeySlots::create(&NewSlot::KeyFile(&file)).unwrap();
    let (b, _) = KeySlots::create(&NewSlot::KeyFile(&file)).unwrap();
    assert!(!a.same_key(&b));
    assert_ne!(a.volume_key().data_key(), file.data_key());
}

#[test]
fn the_wrapped_key_is_not_the_data_key() {
    let (data_key, slots) = KeySlots::create(&NewSlot::KeyFile(&key(1))).unwrap();
    let plain = data_key.bytes();
    let bytes = slots.encode();
    assert!(!bytes.windows(8).any(|w| plain.windows(8).any(|p| p == w)));
}

#[test]
fn wrong_keys_are_refused_by_name() {
    let (_, slots) = KeySlots::create(&NewSlot::KeyFile(&key(1))).unwrap();
    let err = slots.unlock(&Unlock::KeyFile(&key(2))).unwrap_err();
    assert!(matches!(err, KeySlotError::WrongKeyFile), "{err:?}");
    assert_eq!(err.to_string(), "this key file is not one of the volume's keys");
    assert!(matches!(slots.unlock(&Unlock::Passphrase(b"x")), Err(KeySlotError::NoPassphraseSlot)));

    let (_, slots) = KeySlots::create(&pass(b"right")).unwrap();
    let err = slots.unlock(&Unlock::Passphrase(b"wrong")).unwrap_err();
    assert!(matches!(err, KeySlotError::WrongPassphrase), "{err:?}");
    assert!(err.to_string().contains("wrong passphrase"), "{err}");
    assert!(matches!(slots.unlock(&Unlock::KeyFile(&key(1))), Err(KeySlotError::NoKeyFileSlot)));
    assert!(matches!(
        slots.unlock(&Unlock::Passphrase(b"")),
        Err(KeySlotError::Key(KeyError::EmptyPassphrase))
    ));
}

#[test]
fn changing_the_passphrase_keeps_the_data_key_and_retires_the_old_one() {
    let file = key(3);
    let (data_key, mut slots) = KeySlots::create(&NewSlot::KeyFile(&file)).unwrap();
    assert_eq!(slots.add_slot(&Unlock::KeyFile(&file), &pass(b"old")).unwrap(), 1);
    let before = slots.slots()[1].clone();
    assert_eq!(slots.change_passphrase(b"old", b"new").unwrap(), 1);
    assert_eq!(slots.slots().len(), 2);
    // Fresh salt, same cost.
    assert_ne!(slots.slots()[1].salt, before.salt);
    assert_eq!(slots.slots()[1].cost, before.cost);
    let slots = KeySlots::parse(&slots.encode()).unwrap();
    assert!(slots.unlock(&Unlock::Passphrase(b"new")).unwrap().same_key(&data_key));
    assert!(slots.unlock(&Unlock::KeyFile(&file)).unwrap().same_key(&data_key));
    assert!(matches!(slots.unlock(&Unlock::Passphrase(b"old")), Err(KeySlotError::WrongPassphrase)));
    let mut slots = slots;
    assert!(matches!(slots.change_passphrase(b"old", b"newer"), Err(KeySlotError::WrongPassphrase)));
    assert!(matches!(
        slots.change_passphrase(b"new", b""),
        Err(KeySlotError::Key(KeyError::EmptyPassphrase))
    ));
}

#[test]
fn setting_the_passphrase_with_the_old_one_rewraps_in_place() {
    let (data_key, mut slots) = KeySlots::create(&pass(b"old")).unwrap();
    let default = KdfCost::DEFAULT;
    assert_eq!(slots.set_passphrase(&Unlock::Passphrase(b"old"), b"new", default).unwrap(), 0);
    // The slot keeps its own (cheap) cost, not the one offered.
    assert_eq!(slots.slots()[0].cost, Some(CHEAP));
    assert!(slots.unlock(&Unlock::Passphrase(b"new")).unwrap().same_key(&data_key));
    assert!(matches!(slots.unlock(&Unlock::Passphrase(b"old")), Err(KeySlotError::WrongPassphrase)));
    assert!(matches!(
        slots.set_passphrase(&Unlock::Passphrase(b"old"), b"x", default),
        Err(KeySlotError::WrongPassphrase)
    ));
}

#[test]
fn setting_the_passphrase_with_a_key_file_replaces_a_forgotten_one_or_adds_the_first() {
    let file = key(4);
    let (data_key, mut slots) = KeySlots::create(&NewSlot::KeyFile(&file)).unwrap();
    // No passphrase yet: one is added after the key file, at `cost`.
    assert_eq!(slots.set_passphrase(&Unlock::KeyFile(&file), b"first", CHEAP).unwrap(), 1);
    assert_eq!(slots.slots()[1].cost, Some(CHEAP));
    // A second passphrase slot (added by hand), then both forgotten:
    // the key file replaces them with one, in the first one's place.
    slots.add_slot(&Unlock::KeyFile(&file), &pass(b"second")).unwrap();
    let other = key(5);
    slots.add_slot(&Unlock::KeyFile(&file), &NewSlot::KeyFile(&other)).unwrap();
    assert_eq!(slots.slots().len(), 4);
    assert_eq!(slots.set_passphrase(&Unlock::KeyFile(&file), b"third", KdfCost::DEFAULT).unwrap(), 1);
    let kinds: Vec<SlotKind> = slots.slots().iter().map(|s| s.kind()).collect();
    assert_eq!(kinds, [SlotKind::KeyFile, SlotKind::Passphrase, SlotKind::KeyFile]);
    assert_eq!(slots.slots()[1].cost, Some(CHEAP), "the replaced slot's cost is kept");
    let slots = KeySlots::parse(&slots.encode()).unwrap();
    for gone in [&b"first"[..], b"second"] {
        assert!(matches!(slots.unlock(&Unlock::Passphrase(gone)), Err(KeySlotError::WrongPassphrase)));
    }
    assert!(slots.unlock(&Unlock::Passphrase(b"third")).unwrap().same_key(&data_key));
    assert!(slots.unlock(&Unlock::KeyFile(&other)).unwrap().same_key(&data_key));
    // A key file that is not the volume's changes nothing.
    let mut copy = slots.clone();
    assert!(matches!(
        copy.set_passphrase(&Unlock::KeyFile(&key(9)), b"evil", CHEAP),
        Err(KeySlotError::WrongKeyFile)
    ));
    assert_eq!(copy, slots);
    // Neither does an empty passphrase.
    assert!(matches!(
        copy.set_passphrase(&Unlock::KeyFile(&file), b"", CHEAP),
        Err(KeySlotError::Key(KeyError::EmptyPassphrase))
    ));
    assert_eq!(copy, slots);
}

#[test]
fn a_full_set_of_key_files_refuses_a_first_passphrase_unchanged() {
    let file = key(1);
    let (_, mut slots) = KeySlots::create(&NewSlot::KeyFile(&file)).unwrap();
    for i in 2..=MAX_SLOTS as u8 {
        slots.add_slot(&Unlock::KeyFile(&file), &NewSlot::KeyFile(&key(i))).unwrap();
    }
    let before = slots.clone();
    assert!(matches!(slots.set_passphrase(&Unlock::KeyFile(&file), b"p", CHEAP), Err(KeySlotError::Full)));
    assert_eq!(slots, before);
}

#[test]
fn adding_and_removing_slots() {
    let (a, b) = (key(1), key(2));
    let (data_key, mut slots) = KeySlots::create(&NewSlot::KeyFile(&a)).unwrap();
    // Only a key that opens a slot may add one.
    assert!(matches!(
        slots.add_slot(&Unlock::KeyFile(&b), &NewSlot::KeyFile(&b)),
        Err(KeySlotError::WrongKeyFile)
    ));
    assert_eq!(slots.add_slot(&Unlock::KeyFile(&a), &NewSlot::KeyFile(&b)).unwrap(), 1);
    assert!(matches!(
        slots.add_slot(&Unlock::KeyFile(&a), &NewSlot::KeyFile(&b)),
        Err(KeySlotError::AlreadyPresent { index: 1 })
    ));
    assert_eq!(slots.add_slot(&Unlock::KeyFile(&b), &pass(b"p")).unwrap(), 2);
    assert!(matches!(
        slots.add_slot(&Unlock::KeyFile(&b), &pass(b"p")),
        Err(KeySlotError::AlreadyPresent { index: 2 })
    ));
    assert!(slots.unlock(&Unlock::KeyFile(&b)).unwrap().same_key(&data_key));
    assert!(slots.unlock(&Unlock::Passphrase(b"p")).unwrap().same_key(&data_key));

    assert_eq!(slots.remove_slot(&Unlock::KeyFile(&a)).unwrap(), 0);
    assert!(matches!(slots.unlock(&Unlock::KeyFile(&a)), Err(KeySlotError::WrongKeyFile)));
    // A lost key's slot goes on another key's authority, never a stranger's.
    assert!(matches!(slots.remove_index(0, &Unlock::KeyFile(&a)), Err(KeySlotError::WrongKeyFile)));
    assert!(matches!(slots.remove_index(5, &Unlock::KeyFile(&b)), Err(KeySlotError::NoSuchSlot { .. })));
    slots.remove_index(0, &Unlock::Passphrase(b"p")).unwrap();
    assert_eq!(slots.slots().len(), 1);
    assert!(slots.unlock(&Unlock::Passphrase(b"p")).unwrap().same_key(&data_key));
    // The last way in stays.
    let err = slots.remove_slot(&Unlock::Passphrase(b"p")).unwrap_err();
    assert!(matches!(err, KeySlotError::LastSlot { index: 0 }), "{err:?}");
    assert!(err.to_string().contains("last key"), "{err}");
    assert!(matches!(slots.remove_index(0, &Unlock::Passphrase(b"p")), Err(KeySlotError::LastSlot { .. })));
}

#[test]
fn a_full_set_refuses_another_slot() {
    let first = key(1);
    let (_, mut slots) = KeySlots::create(&NewSlot::KeyFile(&first)).unwrap();
    for fill in 2..=MAX_SLOTS as u8 {
        slots.add_slot(&Unlock::KeyFile(&first), &NewSlot::KeyFile(&key(fill))).unwrap();
    }
    assert_eq!(slots.encode().len(), encoded_len(MAX_SLOTS));
    assert_eq!(KeySlots::parse(&slots.encode()).unwrap(), slots);
    let extra = key(100);
    assert!(matches!(
        slots.add_slot(&Unlock::KeyFile(&first), &NewSlot::KeyFile(&extra)),
        Err(KeySlotError::Full)
    ));
    // Every slot opens the same key.
    let want = slots.unlock(&Unlock::KeyFile(&first)).unwrap();
    for fill in 2..=MAX_SLOTS as u8 {
        assert!(slots.unlock(&Unlock::KeyFile(&key(fill))).unwrap().same_key(&want));
    }
}

/// Flips one bit of slot `index`'s field at `offset` and fixes the set
/// check, as someone altering the stored slots would.
fn altered(slots: &KeySlots, index: usize, offset: usize) -> KeySlots {
    let mut bytes = slots.encode();
    bytes[HEADER_LEN + index * SLOT_LEN + offset] ^= 0x10;
    let end = bytes.len() - TRAILER_LEN;
    let check = set_check(&bytes[..end]);
    bytes[end..].copy_from_slice(&check);
    KeySlots::parse(&bytes).unwrap()
}

#[test]
fn an_altered_slot_is_refused_never_opened_to_a_wrong_key() {
    let file = key(1);
    let (_, slots) = KeySlots::create(&NewSlot::KeyFile(&file)).unwrap();
    // Salt (bytes 4..20) and check id (32..48) feed the check id:
    // the key no longer matches. Wrapped key (48..112), tag (112..144):
    // the check id matches but the tag fails.
    for offset in [4, 19] {
        let bad = altered(&slots, 0, offset);
        assert!(matches!(bad.unlock(&Unlock::KeyFile(&file)), Err(KeySlotError::WrongKeyFile)));
    }
    for offset in [32, 47] {
        let bad = altered(&slots, 0, offset);
        assert!(matches!(bad.unlock(&Unlock::KeyFile(&file)), Err(KeySlotError::WrongKeyFile)));
    }
    for offset in [48, 80, 111, 112, 143] {
        let bad = altered(&slots, 0, offset);
        let err = bad.unlock(&Unlock::KeyFile(&file)).unwrap_err();
        assert!(matches!(err, KeySlotError::Tampered { index: 0 }), "offset {offset}: {err:?}");
        assert!(err.to_string().contains("altered"), "{err}");
    }

    // A passphrase slot's cost is authenticated too: a changed but
    // valid cost gives another KEK (so: wrong passphrase).
    let (_, slots) = KeySlots::create(&pass(b"pw")).unwrap();
    let mut bytes = slots.encode();
    bytes[HEADER_LEN + 24] = 2; // iterations 1 → 2
    let end = bytes.len() - TRAILER_LEN;
    let check = set_check(&bytes[..end]);
    bytes[end..].copy_from_slice(&check);
    let bad = KeySlots::parse(&bytes).unwrap();
    assert!(matches!(bad.unlock(&Unlock::Passphrase(b"pw")), Err(KeySlotError::WrongPassphrase)));
    let bad = altered(&slots, 0, 60);
    assert!(matches!(bad.unlock(&Unlock::Passphrase(b"pw")), Err(KeySlotError::Tampered { index: 0 })));
}

#[test]
fn a_damaged_slot_does_not_hide_a_good_one() {
    let file = key(1);
    let (data_key, mut slots) = KeySlots::create(&NewSlot::KeyFile(&file)).unwrap();
    slots.add_slot(&Unlock::KeyFile(&file), &pass(b"p")).unwrap();
    // A second slot for the same key file, as an older meshdisk or a
    // hand edit might leave; damage the first.
    slots.slots.push(KeySlot::seal(&data_key, &NewSlot::KeyFile(&file)).unwrap());
    let bad = altered(&slots, 0, 100);
    assert!(bad.unlock(&Unlock::KeyFile(&file)).unwrap().same_key(&data_key));
    assert_eq!(bad.open(&Unlock::KeyFile(&file)).unwrap().0, 2);
}

#[test]
fn debug_never_shows_keys() {
    let file = key(0xab);
    let (data_key, slots) = KeySlots::create(&NewSlot::KeyFile(&file)).unwrap();
    let shown = format!(
        "{data_key:?} {:?} {:?} {:?}",
        Unlock::KeyFile(&file),
        Unlock::Passphrase(b"hunter2"),
        pass(b"hunter2")
    );
    assert!(shown.contains("redacted"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains("171"), "{shown}");
    // The slots themselves hold nothing secret, and print as such.
    assert!(format!("{slots:?}").contains("KeyFile"));
}

#[test]
fn each_malformation_has_its_error() {
    let (_, slots) = KeySlots::create(&NewSlot::KeyFile(&key(1))).unwrap();
    let good = slots.encode();
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        KeySlots::parse(&b).unwrap_err()
    };
    let resealed = |f: &dyn Fn(&mut Vec<u8>)| {
        with(&|b: &mut Vec<u8>| {
            f(b);
            let end = b.len() - TRAILER_LEN;
            let check = set_check(&b[..end]);
            b[end..].copy_from_slice(&check);
        })
    };
    assert!(matches!(KeySlots::parse(&good[..7]), Err(KeySlotError::Truncated { len: 7, need: 8 })));
    assert!(matches!(with(&|b| b[0] = b'X'), KeySlotError::BadMagic(_)));
    assert!(matches!(with(&|b| b[4] = 2), KeySlotError::UnsupportedVersion(2)));
    assert!(matches!(with(&|b| b[6] = 0), KeySlotError::SlotCount(0)));
    assert!(matches!(with(&|b| b[6] = 9), KeySlotError::SlotCount(9)));
    assert!(matches!(with(&|b| b[7] = 1), KeySlotError::Reserved { offset: 7 }));
    assert!(matches!(with(&|b| b[6] = 2), KeySlotError::Length { count: 2, .. }));
    assert!(matches!(with(&|b| b.push(0)), KeySlotError::Length { .. }));
    assert!(matches!(with(&|b| b.truncate(100)), KeySlotError::Length { len: 100, .. }));
    assert!(matches!(with(&|b| b[50] ^= 1), KeySlotError::SetCheck));
    assert!(matches!(with(&|b| *b.last_mut().unwrap() ^= 1), KeySlotError::SetCheck));
    assert!(matches!(resealed(&|b| b[8] = 3), KeySlotError::Kind { index: 0, kind: 3 }));
    assert!(matches!(resealed(&|b| b[10] = 1), KeySlotError::Reserved { offset: 10 }));
    // A key-file slot with a cost; a passphrase slot without one.
    assert!(matches!(resealed(&|b| b[8 + 20] = 1), KeySlotError::KdfCost { index: 0, .. }));
    assert!(matches!(resealed(&|b| b[8] = 2), KeySlotError::KdfCost { index: 0, .. }));

    let (_, slots) = KeySlots::create(&pass(b"p")).unwrap();
    let good = slots.encode();
    let cost_err = |offset: usize, value: u32| {
        let mut b = good.clone();
        b[HEADER_LEN + offset..HEADER_LEN + offset + 4].copy_from_slice(&value.to_le_bytes());
        let end = b.len() - TRAILER_LEN;
        let check = set_check(&b[..end]);
        b[end..].copy_from_slice(&check);
        KeySlots::parse(&b).unwrap_err().to_string()
    };
    assert!(cost_err(20, 1024).contains("memory cost 1024 KiB"));
    assert!(cost_err(20, u32::MAX).contains("memory cost"));
    assert!(cost_err(24, 0).contains("iterations 0"));
    assert!(cost_err(28, 17).contains("parallelism 17"));
}

#[test]
fn a_cost_out_of_range_is_refused_before_any_work() {
    let bad = KdfCost { memory_kib: 1024, ..CHEAP };
    let err = KeySlots::create(&NewSlot::Passphrase { passphrase: b"p", cost: bad }).unwrap_err();
    assert!(matches!(err, KeySlotError::Key(KeyError::KdfParams(_))), "{err:?}");
    assert_eq!(KdfCost::default(), KdfCost::DEFAULT);
}

fn arb_slot() -> impl Strategy<Value = KeySlot> {
    (
        any::<bool>(),
        any::<[u8; SALT_LEN]>(),
        (KdfCost::MIN_MEMORY_KIB..=KdfCost::MAX_MEMORY_KIB, 1u32..=16, 1u32..=16),
        any::<[u8; CHECK_ID_LEN]>(),
        proptest::collection::vec(any::<u8>(), KEY_LEN),
        any::<[u8; TAG_LEN]>(),
    )
        .prop_map(|(passphrase, salt, (memory_kib, iterations, parallelism), check_id, wrapped, tag)| {
            KeySlot {
                kind: if passphrase { SlotKind::Passphrase } else { SlotKind::KeyFile },
                salt,
                cost: passphrase.then_some(KdfCost { memory_kib, iterations, parallelism }),
                check_id,
                wrapped: wrapped.try_into().unwrap(),
                tag,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn encoding_round_trips(slots in proptest::collection::vec(arb_slot(), 1..=MAX_SLOTS)) {
        let set = KeySlots { slots };
        let bytes = set.encode();
        prop_assert_eq!(bytes.len(), encoded_len(set.slots.len()));
        prop_assert_eq!(KeySlots::parse(&bytes).unwrap(), set);
    }

    #[test]
    fn any_flipped_bit_is_refused(
        slots in proptest::collection::vec(arb_slot(), 1..=MAX_SLOTS),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let mut bytes = KeySlots { slots }.encode();
        let i = at.index(bytes.len());
        bytes[i] ^= 1 << bit;
        prop_assert!(KeySlots::parse(&bytes).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1300)) {
        if let Ok(set) = KeySlots::parse(&bytes) {
            prop_assert_eq!(set.encode(), bytes);
        }
    }
}
