//! Key slots: the volume's data key, wrapped once per way of unlocking it,
//! so a passphrase can change (or a key file be added or dropped) without
//! re-encrypting a single block. `meshdisk volume create` makes them,
//! `attach` opens one, `meshdisk volume passwd` rewraps one; the directory
//! keeps the encoded set with the volume (`VolumeSpec::key_slots`).
//!
//! Everything the volume stores is encrypted with one random 512-bit
//! [`DataKey`], made when the volume is created and never changed. What the
//! user holds (a key file, a passphrase) only opens a **slot**: a copy of
//! the data key encrypted and authenticated under a key-encryption key
//! (KEK) derived from that key file or passphrase. A volume has 1 to
//! [`MAX_SLOTS`] slots; any one of them gives the data key.
//!
//! ```text
//!  key file (64 bytes) ──────────────┐
//!  passphrase ── Argon2id(salt, cost)┴─► KEK (64 bytes)
//!                                          │ blake3 derive_key, three contexts
//!                      ┌───────────────────┼─────────────────────┐
//!                  check key            tag key              stream key
//!                      │                   │                     │
//!  check id = keyed_hash(salt)[..16]       │                     │
//!  tag      = keyed_hash(slot header ‖ data key)                 │
//!  wrapped  = data key ⊕ keyed XOF(tag)[..64]  ◄─────────────────┘
//! ```
//!
//! # The construction: SIV with blake3
//!
//! The wrap is the SIV shape of deterministic authenticated encryption
//! (Rogaway and Shrimpton 2006; RFC 5297 is its AES instance), built only
//! from blake3, which meshdisk already uses for hashing and key derivation:
//!
//! - the **tag** (the "synthetic IV") is a keyed blake3 (a PRF) of the
//!   slot's header — kind, salt, KDF cost, check id, all authenticated as
//!   associated data — and the data key itself;
//! - the **stream** is keyed blake3's extendable output over the tag (a
//!   PRF used as a stream cipher, as SIV uses AES-CTR), XORed onto the data
//!   key;
//! - opening recomputes the stream from the stored tag, recovers the
//!   candidate data key, recomputes the tag and compares in constant time.
//!   Nothing is returned unless the 256-bit tag matches.
//!
//! Why this and not AES key wrap (RFC 3394) plus a MAC: key wrap's own
//! 64-bit integrity check would sit beside a MAC that already does its job,
//! and would need the header MAC'd separately anyway; SIV with one
//! primitive is less code with one security argument. Why not AES-GCM-SIV
//! or ChaCha20-Poly1305: they would add a dependency to do what blake3
//! does here, and they take nonces, which this needs none of (SIV is
//! misuse-resistant: wrapping twice under the same KEK only reveals that
//! the two (header, key) pairs are equal, and every slot's header has its
//! own random salt). Three independent keys come from the KEK through
//! blake3's key-derivation mode with distinct, versioned contexts.
//!
//! # Telling "wrong key" from "damaged slot"
//!
//! Each slot stores a 16-byte **check id**, a keyed hash of the slot's salt
//! under a key derived from the KEK. Unlocking first compares check ids: no
//! match means "this key file is not one of the volume's keys" (or "wrong
//! passphrase"); a match whose tag then fails means the slot was altered.
//! Salting the id keeps one key file used on two volumes from giving the
//! same id on both. For a passphrase the id lets whoever holds the slots
//! test guesses offline, each guess costing one Argon2id run — no more
//! than the tag already allows, and exactly what a LUKS header allows.
//!
//! # Example
//!
//! ```
//! use meshdisk::codec::VolumeKey;
//! use meshdisk::codec::keyslot::{KdfCost, KeySlots, NewSlot, Unlock};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let key_file = VolumeKey::generate()?;
//! let (data_key, mut slots) = KeySlots::create(&NewSlot::KeyFile(&key_file))?;
//! # let cost = KdfCost { memory_kib: KdfCost::MIN_MEMORY_KIB, iterations: 1, parallelism: 1 };
//! slots.add_slot(&Unlock::KeyFile(&key_file), &NewSlot::Passphrase { passphrase: b"old", cost })?;
//! slots.change_passphrase(b"old", b"new")?;   // `meshdisk volume passwd`
//! let stored = slots.encode();                // what the volume keeps
//! let again = KeySlots::parse(&stored)?.unlock(&Unlock::Passphrase(b"new"))?;
//! assert!(again.same_key(&data_key));
//! # Ok(()) }
//! ```
//!
//! The byte layout is drawn in docs/formats.md ("Key slots"); the parser is
//! strict and fuzzed (`fuzz/fuzz_targets/key_slots.rs`).

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

use super::key::{KEY_LEN, KdfParams, KeyError, SALT_LEN, VolumeKey};

/// The first four bytes of an encoded slot set.
pub const MAGIC: [u8; 4] = *b"MDKS";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Most slots a volume may have (LUKS2 has 32; eight ways in is plenty
/// for a personal disk and keeps a full set at 1,168 bytes).
pub const MAX_SLOTS: usize = 8;
/// Bytes of one encoded slot.
pub const SLOT_LEN: usize = 144;
/// Bytes before the first slot.
pub const HEADER_LEN: usize = 8;
/// Bytes after the last slot (the set check).
pub const TRAILER_LEN: usize = 8;
/// Length of a slot's check id.
pub const CHECK_ID_LEN: usize = 16;
/// Length of a slot's tag.
pub const TAG_LEN: usize = 32;

/// Bytes of a slot covered by its tag as associated data: everything
/// before the wrapped key.
const SLOT_HEADER_LEN: usize = 48;

// Versioned blake3 key-derivation contexts: one key per use of the KEK.
const CHECK_CONTEXT: &str = "meshdisk 2026-11 key slot check id v1";
const TAG_CONTEXT: &str = "meshdisk 2026-11 key slot tag v1";
const STREAM_CONTEXT: &str = "meshdisk 2026-11 key slot stream v1";

/// Errors from making, opening, changing and parsing key slots. None
/// carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeySlotError {
    #[error("this key file is not one of the volume's keys")]
    WrongKeyFile,
    #[error("wrong passphrase: it opens none of the volume's key slots")]
    WrongPassphrase,
    #[error("this volume has no key-file slot; unlock it with its passphrase")]
    NoKeyFileSlot,
    #[error("this volume has no passphrase slot; unlock it with its key file")]
    NoPassphraseSlot,
    #[error(
        "key slot {index} matches this key but fails its authentication: the slot was altered or damaged"
    )]
    Tampered { index: usize },
    #[error("all {MAX_SLOTS} key slots are in use; remove one first")]
    Full,
    #[error("this key already opens key slot {index}")]
    AlreadyPresent { index: usize },
    #[error(
        "refusing to remove key slot {index}: it is the volume's last key, and without it the data could never be read again"
    )]
    LastSlot { index: usize },
    #[error("there is no key slot {index} (the volume has {count})")]
    NoSuchSlot { index: usize, count: usize },
    #[error(transparent)]
    Key(#[from] KeyError),
    // The encoded form, in the order the parser checks it.
    #[error("key slots truncated: {len} bytes, {need} needed")]
    Truncated { len: usize, need: usize },
    #[error("not meshdisk key slots (magic {0:02x?}, expected \"MDKS\")")]
    BadMagic([u8; 4]),
    #[error(
        "key slot format version {0} is not supported (this meshdisk reads version {VERSION}); upgrade meshdisk"
    )]
    UnsupportedVersion(u16),
    #[error("key slot count {0} is outside 1..={MAX_SLOTS}")]
    SlotCount(u8),
    #[error("key slots have non-zero reserved bytes (offset {offset})")]
    Reserved { offset: usize },
    #[error("key slots are {len} bytes; {count} slots take exactly {expected}")]
    Length { len: usize, count: u8, expected: usize },
    #[error("key slots are damaged (set check mismatch)")]
    SetCheck,
    #[error("key slot {index} has unknown kind {kind}")]
    Kind { index: usize, kind: u8 },
    #[error("key slot {index}: {reason}")]
    KdfCost { index: usize, reason: String },
}

/// The key everything in a volume is encrypted with: random, 512 bits,
/// never derived from what the user holds, never changed. Zeroized on drop
/// (it is a [`VolumeKey`] inside); its `Debug` prints nothing of it.
#[derive(Clone)]
pub struct DataKey(VolumeKey);

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

impl DataKey {
    /// The key as the codec takes it (`SectorCipher`, `derive`, ...).
    pub fn volume_key(&self) -> &VolumeKey {
        &self.0
    }

    /// The key itself, for callers that take a [`VolumeKey`] (`Volume::open`).
    pub fn into_volume_key(self) -> VolumeKey {
        self.0
    }

    /// True if both are the same key (constant-time compare).
    pub fn same_key(&self, other: &DataKey) -> bool {
        blake3::Hash::from_bytes(*self.0.data_key()) == blake3::Hash::from_bytes(*other.0.data_key())
            && blake3::Hash::from_bytes(*self.0.tweak_key()) == blake3::Hash::from_bytes(*other.0.tweak_key())
    }

    fn bytes(&self) -> Zeroizing<[u8; KEY_LEN]> {
        let mut b = Zeroizing::new([0u8; KEY_LEN]);
        b[..32].copy_from_slice(self.0.data_key());
        b[32..].copy_from_slice(self.0.tweak_key());
        b
    }
}

/// What opens a slot: a key file's key, or a passphrase.
#[derive(Clone, Copy)]
pub enum Unlock<'a> {
    KeyFile(&'a VolumeKey),
    Passphrase(&'a [u8]),
}

impl fmt::Debug for Unlock<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unlock::KeyFile(_) => f.write_str("Unlock::KeyFile(<redacted>)"),
            Unlock::Passphrase(_) => f.write_str("Unlock::Passphrase(<redacted>)"),
        }
    }
}

impl Unlock<'_> {
    fn kind(&self) -> SlotKind {
        match self {
            Unlock::KeyFile(_) => SlotKind::KeyFile,
            Unlock::Passphrase(_) => SlotKind::Passphrase,
        }
    }
}

/// A way in to add: a key file's key, or a passphrase with the Argon2id
/// cost to store with it (each slot draws its own salt).
#[derive(Clone, Copy)]
pub enum NewSlot<'a> {
    KeyFile(&'a VolumeKey),
    Passphrase { passphrase: &'a [u8], cost: KdfCost },
}

impl fmt::Debug for NewSlot<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NewSlot::KeyFile(_) => f.write_str("NewSlot::KeyFile(<redacted>)"),
            NewSlot::Passphrase { cost, .. } => write!(f, "NewSlot::Passphrase(<redacted>, {cost:?})"),
        }
    }
}

impl<'a> NewSlot<'a> {
    fn as_unlock(&self) -> Unlock<'a> {
        match *self {
            NewSlot::KeyFile(key) => Unlock::KeyFile(key),
            NewSlot::Passphrase { passphrase, .. } => Unlock::Passphrase(passphrase),
        }
    }
}

/// Argon2id's cost without the salt (a slot's salt is always its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfCost {
    /// Memory cost in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl KdfCost {
    /// Lowest memory cost accepted, as [`KdfParams::MIN_MEMORY_KIB`].
    pub const MIN_MEMORY_KIB: u32 = KdfParams::MIN_MEMORY_KIB;
    /// Highest memory cost accepted, as [`KdfParams::MAX_MEMORY_KIB`].
    pub const MAX_MEMORY_KIB: u32 = KdfParams::MAX_MEMORY_KIB;

    /// The project's default cost (64 MiB, 3 passes, 1 lane).
    pub const DEFAULT: Self = Self {
        memory_kib: KdfParams::DEFAULT_MEMORY_KIB,
        iterations: KdfParams::DEFAULT_ITERATIONS,
        parallelism: KdfParams::DEFAULT_PARALLELISM,
    };

    fn with_salt(self, salt: [u8; SALT_LEN]) -> KdfParams {
        KdfParams {
            salt,
            memory_kib: self.memory_kib,
            iterations: self.iterations,
            parallelism: self.parallelism,
        }
    }

    /// The bounds `KdfParams` enforces before running Argon2id, checked
    /// here too so the parser refuses a slot no unlock could use (and a
    /// stored cost can never ask Argon2 for more memory than a machine has).
    fn check(&self) -> Result<(), String> {
        if !(Self::MIN_MEMORY_KIB..=Self::MAX_MEMORY_KIB).contains(&self.memory_kib) {
            return Err(format!(
                "Argon2id memory cost {} KiB is outside {}..={} KiB",
                self.memory_kib,
                Self::MIN_MEMORY_KIB,
                Self::MAX_MEMORY_KIB
            ));
        }
        if !(1..=16).contains(&self.iterations) {
            return Err(format!("Argon2id iterations {} is outside 1..=16", self.iterations));
        }
        if !(1..=16).contains(&self.parallelism) {
            return Err(format!("Argon2id parallelism {} is outside 1..=16", self.parallelism));
        }
        Ok(())
    }
}

impl Default for KdfCost {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What opens a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// A 64-byte key file (`meshdisk key generate`).
    KeyFile,
    /// A passphrase through Argon2id.
    Passphrase,
}

impl SlotKind {
    fn code(self) -> u8 {
        match self {
            SlotKind::KeyFile => 1,
            SlotKind::Passphrase => 2,
        }
    }
}

/// One wrapped copy of the data key. Holds nothing secret: the wrapped key
/// is ciphertext, the rest is public parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlot {
    kind: SlotKind,
    /// Random per slot; the Argon2id salt of a passphrase slot.
    salt: [u8; SALT_LEN],
    /// `Some` exactly for passphrase slots.
    cost: Option<KdfCost>,
    check_id: [u8; CHECK_ID_LEN],
    wrapped: [u8; KEY_LEN],
    tag: [u8; TAG_LEN],
}

impl KeySlot {
    /// What opens this slot.
    pub fn kind(&self) -> SlotKind {
        self.kind
    }

    /// The Argon2id parameters of a passphrase slot.
    pub fn kdf_params(&self) -> Option<KdfParams> {
        self.cost.map(|c| c.with_salt(self.salt))
    }

    /// Wraps `data_key` under a fresh salt for `new`.
    fn seal(data_key: &DataKey, new: &NewSlot) -> Result<Self, KeySlotError> {
        let mut salt = [0u8; SALT_LEN];
        getrandom::fill(&mut salt).map_err(|e| KeyError::Random(e.to_string()))?;
        let (kind, cost) = match new {
            NewSlot::KeyFile(_) => (SlotKind::KeyFile, None),
            NewSlot::Passphrase { cost, .. } => {
                cost.check().map_err(KeyError::KdfParams)?;
                (SlotKind::Passphrase, Some(*cost))
            }
        };
        let mut slot =
            Self { kind, salt, cost, check_id: [0; CHECK_ID_LEN], wrapped: [0; KEY_LEN], tag: [0; TAG_LEN] };
        let kek = slot.kek(&new.as_unlock())?;
        slot.check_id = kek.check_id(&salt);
        let plain = data_key.bytes();
        slot.tag = kek.tag(&slot.header(), &plain);
        let stream = kek.stream(&slot.tag);
        for (w, (p, s)) in slot.wrapped.iter_mut().zip(plain.iter().zip(stream.iter())) {
            *w = p ^ s;
        }
        Ok(slot)
    }

    /// The KEK `key` gives for this slot (Argon2id for a passphrase).
    /// The caller has matched the kinds.
    fn kek(&self, key: &Unlock) -> Result<Kek, KeySlotError> {
        let material = match (key, self.cost) {
            (Unlock::KeyFile(key), _) => (*key).clone(),
            (Unlock::Passphrase(passphrase), Some(cost)) => {
                VolumeKey::from_passphrase(passphrase, &cost.with_salt(self.salt))?
            }
            (Unlock::Passphrase(_), None) => unreachable!("a key-file slot has no Argon2id cost"),
        };
        Ok(Kek::from_material(&material))
    }

    /// `Ok(Some(key))` if `kek` opens this slot, `Ok(None)` if it is not
    /// this slot's KEK, `Err(Tampered)` if it is but the tag fails.
    fn open(&self, index: usize, kek: &Kek) -> Result<Option<DataKey>, KeySlotError> {
        let ours = blake3::Hash::from_bytes(pad_check_id(&kek.check_id(&self.salt)));
        if ours != blake3::Hash::from_bytes(pad_check_id(&self.check_id)) {
            return Ok(None);
        }
        let stream = kek.stream(&self.tag);
        let mut plain = Zeroizing::new([0u8; KEY_LEN]);
        for (p, (w, s)) in plain.iter_mut().zip(self.wrapped.iter().zip(stream.iter())) {
            *p = w ^ s;
        }
        if blake3::Hash::from_bytes(kek.tag(&self.header(), &plain)) != blake3::Hash::from_bytes(self.tag) {
            return Err(KeySlotError::Tampered { index });
        }
        // Equal halves cannot pass the tag unless they were wrapped so,
        // which `create` never does; refused all the same.
        Ok(Some(DataKey(VolumeKey::from_bytes(&plain[..])?)))
    }

    /// Bytes 0..48 of the encoded slot: what the tag authenticates beside
    /// the data key.
    fn header(&self) -> [u8; SLOT_HEADER_LEN] {
        let mut b = [0u8; SLOT_HEADER_LEN];
        b[0] = self.kind.code();
        // 1..4 reserved, zero.
        b[4..20].copy_from_slice(&self.salt);
        let cost = self.cost.unwrap_or(KdfCost { memory_kib: 0, iterations: 0, parallelism: 0 });
        b[20..24].copy_from_slice(&cost.memory_kib.to_le_bytes());
        b[24..28].copy_from_slice(&cost.iterations.to_le_bytes());
        b[28..32].copy_from_slice(&cost.parallelism.to_le_bytes());
        b[32..48].copy_from_slice(&self.check_id);
        b
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header());
        out.extend_from_slice(&self.wrapped);
        out.extend_from_slice(&self.tag);
    }

    /// One slot from exactly [`SLOT_LEN`] bytes (the set check has passed).
    fn parse(index: usize, at: usize, b: &[u8]) -> Result<Self, KeySlotError> {
        let kind = match b[0] {
            1 => SlotKind::KeyFile,
            2 => SlotKind::Passphrase,
            kind => return Err(KeySlotError::Kind { index, kind }),
        };
        if let Some(i) = b[1..4].iter().position(|&x| x != 0) {
            return Err(KeySlotError::Reserved { offset: at + 1 + i });
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let raw = KdfCost { memory_kib: u32_at(20), iterations: u32_at(24), parallelism: u32_at(28) };
        let cost = match kind {
            SlotKind::KeyFile => {
                if raw != (KdfCost { memory_kib: 0, iterations: 0, parallelism: 0 }) {
                    return Err(KeySlotError::KdfCost {
                        index,
                        reason: "a key-file slot has a non-zero Argon2id cost".into(),
                    });
                }
                None
            }
            SlotKind::Passphrase => {
                raw.check().map_err(|reason| KeySlotError::KdfCost { index, reason })?;
                Some(raw)
            }
        };
        Ok(Self {
            kind,
            salt: b[4..20].try_into().expect("16 bytes"),
            cost,
            check_id: b[32..48].try_into().expect("16 bytes"),
            wrapped: b[48..112].try_into().expect("64 bytes"),
            tag: b[112..144].try_into().expect("32 bytes"),
        })
    }
}

/// The three keys a KEK gives (zeroized on drop: `Zeroizing`).
struct Kek {
    check: Zeroizing<[u8; 32]>,
    tag: Zeroizing<[u8; 32]>,
    stream: Zeroizing<[u8; 32]>,
}

impl Kek {
    fn from_material(material: &VolumeKey) -> Self {
        Self {
            check: material.derive_mac_key(CHECK_CONTEXT),
            tag: material.derive_mac_key(TAG_CONTEXT),
            stream: material.derive_mac_key(STREAM_CONTEXT),
        }
    }

    fn check_id(&self, salt: &[u8; SALT_LEN]) -> [u8; CHECK_ID_LEN] {
        let full = blake3::keyed_hash(&self.check, salt);
        full.as_bytes()[..CHECK_ID_LEN].try_into().expect("16 of 32 bytes")
    }

    fn tag(&self, header: &[u8; SLOT_HEADER_LEN], data_key: &[u8; KEY_LEN]) -> [u8; TAG_LEN] {
        let mut hasher = blake3::Hasher::new_keyed(&self.tag);
        hasher.update(header);
        hasher.update(data_key);
        let tag = *hasher.finalize().as_bytes();
        // The hasher's buffer held the data key.
        hasher.zeroize();
        tag
    }

    fn stream(&self, tag: &[u8; TAG_LEN]) -> Zeroizing<[u8; KEY_LEN]> {
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        let mut hasher = blake3::Hasher::new_keyed(&self.stream);
        hasher.update(tag);
        hasher.finalize_xof().fill(&mut out[..]);
        hasher.zeroize();
        out
    }
}

/// A check id widened to a `blake3::Hash` for its constant-time compare.
fn pad_check_id(id: &[u8; CHECK_ID_LEN]) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..CHECK_ID_LEN].copy_from_slice(id);
    b
}

/// A volume's key slots: 1 to [`MAX_SLOTS`] wrapped copies of one data key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlots {
    slots: Vec<KeySlot>,
}

impl KeySlots {
    /// A new volume's keys: a fresh random data key and one slot for
    /// `first`.
    pub fn create(first: &NewSlot) -> Result<(DataKey, KeySlots), KeySlotError> {
        let data_key = DataKey(VolumeKey::generate()?);
        let slot = KeySlot::seal(&data_key, first)?;
        Ok((data_key, KeySlots { slots: vec![slot] }))
    }

    /// The slots, in order (a slot's index is its place here).
    pub fn slots(&self) -> &[KeySlot] {
        &self.slots
    }

    /// The data key, if `key` opens one of the slots.
    ///
    /// Tries every slot of `key`'s kind (one Argon2id run per passphrase
    /// slot). A key that opens none is [`KeySlotError::WrongKeyFile`] or
    /// [`KeySlotError::WrongPassphrase`]; one whose check id matches a slot
    /// that then fails its tag is [`KeySlotError::Tampered`]. Never a
    /// wrong data key.
    pub fn unlock(&self, key: &Unlock) -> Result<DataKey, KeySlotError> {
        self.open(key).map(|(_, data_key)| data_key)
    }

    /// As [`Self::unlock`], with the index of the slot that opened.
    pub fn open(&self, key: &Unlock) -> Result<(usize, DataKey), KeySlotError> {
        let kind = key.kind();
        let mut candidates = self.slots.iter().enumerate().filter(|(_, s)| s.kind == kind).peekable();
        if candidates.peek().is_none() {
            return Err(match kind {
                SlotKind::KeyFile => KeySlotError::NoKeyFileSlot,
                SlotKind::Passphrase => KeySlotError::NoPassphraseSlot,
            });
        }
        // A key file's KEK is the same for every slot: derive it once.
        let file_kek = match key {
            Unlock::KeyFile(k) => Some(Kek::from_material(k)),
            Unlock::Passphrase(_) => None,
        };
        let mut tampered = None;
        for (index, slot) in candidates {
            let passphrase_kek;
            let kek = match &file_kek {
                Some(kek) => kek,
                None => {
                    passphrase_kek = slot.kek(key)?;
                    &passphrase_kek
                }
            };
            match slot.open(index, kek) {
                Ok(Some(data_key)) => return Ok((index, data_key)),
                Ok(None) => {}
                // Another slot may still open with this key; report the
                // damage only if none does.
                Err(e) => tampered = tampered.or(Some(e)),
            }
        }
        Err(tampered.unwrap_or(match kind {
            SlotKind::KeyFile => KeySlotError::WrongKeyFile,
            SlotKind::Passphrase => KeySlotError::WrongPassphrase,
        }))
    }

    /// Adds a slot for `new`, opened by `existing` (the data key is never
    /// taken from the caller, so a slot can only wrap this volume's key).
    /// Refuses a key that already opens a slot. Returns the new index.
    pub fn add_slot(&mut self, existing: &Unlock, new: &NewSlot) -> Result<usize, KeySlotError> {
        if self.slots.len() >= MAX_SLOTS {
            return Err(KeySlotError::Full);
        }
        let data_key = self.unlock(existing)?;
        match self.open(&new.as_unlock()) {
            Ok((index, _)) => return Err(KeySlotError::AlreadyPresent { index }),
            // The key's own slot is damaged: say so rather than add a twin.
            Err(e @ KeySlotError::Tampered { .. }) => return Err(e),
            Err(_) => {}
        }
        self.slots.push(KeySlot::seal(&data_key, new)?);
        Ok(self.slots.len() - 1)
    }

    /// Removes the slot `key` opens and returns its index; refuses to
    /// remove the last slot.
    pub fn remove_slot(&mut self, key: &Unlock) -> Result<usize, KeySlotError> {
        let (index, _) = self.open(key)?;
        if self.slots.len() == 1 {
            return Err(KeySlotError::LastSlot { index });
        }
        self.slots.remove(index);
        Ok(index)
    }

    /// Removes slot `index` (a forgotten passphrase, a lost key file),
    /// on the authority of a key that opens one of the slots; refuses to
    /// remove the last slot.
    pub fn remove_index(&mut self, index: usize, authority: &Unlock) -> Result<(), KeySlotError> {
        let count = self.slots.len();
        if index >= count {
            return Err(KeySlotError::NoSuchSlot { index, count });
        }
        if count == 1 {
            return Err(KeySlotError::LastSlot { index });
        }
        self.open(authority)?;
        self.slots.remove(index);
        Ok(())
    }

    /// Rewraps the data key of the passphrase slot `old` opens under `new`
    /// (fresh salt, same Argon2id cost) in the same place; the data key
    /// stays, `old` stops working. What `meshdisk volume passwd` calls.
    /// Returns the slot's index.
    pub fn change_passphrase(&mut self, old: &[u8], new: &[u8]) -> Result<usize, KeySlotError> {
        let (index, data_key) = self.open(&Unlock::Passphrase(old))?;
        let cost = self.slots[index].cost.expect("a passphrase slot has a cost");
        self.slots[index] = KeySlot::seal(&data_key, &NewSlot::Passphrase { passphrase: new, cost })?;
        Ok(index)
    }

    /// Sets the volume's passphrase to `new` on the authority of `key`:
    /// what `meshdisk volume passwd` does. With the current passphrase,
    /// that slot is rewrapped in place ([`Self::change_passphrase`]). With
    /// a key file (the passphrase forgotten, or never set), every
    /// passphrase slot goes and one new slot takes the place of the first,
    /// with the first one's Argon2id cost, or `cost` if there was none.
    /// Either way the data key stays and the old passphrase stops working.
    /// Returns the new slot's index.
    pub fn set_passphrase(&mut self, key: &Unlock, new: &[u8], cost: KdfCost) -> Result<usize, KeySlotError> {
        let file = match key {
            Unlock::Passphrase(old) => return self.change_passphrase(old, new),
            Unlock::KeyFile(file) => *file,
        };
        let data_key = self.unlock(&Unlock::KeyFile(file))?;
        let first = self.slots.iter().position(|s| s.kind == SlotKind::Passphrase);
        if first.is_none() && self.slots.len() >= MAX_SLOTS {
            return Err(KeySlotError::Full);
        }
        let cost = first.and_then(|i| self.slots[i].cost).unwrap_or(cost);
        // Sealed before anything is removed: a failure leaves the set as it was.
        let slot = KeySlot::seal(&data_key, &NewSlot::Passphrase { passphrase: new, cost })?;
        self.slots.retain(|s| s.kind != SlotKind::Passphrase);
        // The key-file slot that opened stays, so the set is never empty;
        // the first passphrase slot's place is at most the new length.
        let index = first.unwrap_or(self.slots.len()).min(self.slots.len());
        self.slots.insert(index, slot);
        Ok(index)
    }

    /// The encoded set (layout in docs/formats.md).
    pub fn encode(&self) -> Vec<u8> {
        debug_assert!((1..=MAX_SLOTS).contains(&self.slots.len()));
        let mut out = Vec::with_capacity(encoded_len(self.slots.len()));
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(self.slots.len() as u8);
        out.push(0); // reserved
        for slot in &self.slots {
            slot.encode_into(&mut out);
        }
        let check = set_check(&out);
        out.extend_from_slice(&check);
        out
    }

    /// Parses an encoded set: exactly the bytes [`Self::encode`] writes.
    /// Checks, in order: length of the header, magic, version, slot count,
    /// reserved byte, total length, set check, then each slot's kind,
    /// reserved bytes and Argon2id cost. Never panics.
    pub fn parse(bytes: &[u8]) -> Result<Self, KeySlotError> {
        if bytes.len() < HEADER_LEN {
            return Err(KeySlotError::Truncated { len: bytes.len(), need: HEADER_LEN });
        }
        let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(KeySlotError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(KeySlotError::UnsupportedVersion(version));
        }
        let count = bytes[6];
        if !(1..=MAX_SLOTS).contains(&usize::from(count)) {
            return Err(KeySlotError::SlotCount(count));
        }
        if bytes[7] != 0 {
            return Err(KeySlotError::Reserved { offset: 7 });
        }
        let expected = encoded_len(usize::from(count));
        if bytes.len() != expected {
            return Err(KeySlotError::Length { len: bytes.len(), count, expected });
        }
        let (body, check) = bytes.split_at(expected - TRAILER_LEN);
        if set_check(body) != check {
            return Err(KeySlotError::SetCheck);
        }
        let slots = body[HEADER_LEN..]
            .chunks_exact(SLOT_LEN)
            .enumerate()
            .map(|(index, b)| KeySlot::parse(index, HEADER_LEN + index * SLOT_LEN, b))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { slots })
    }
}

/// Bytes of a set of `count` slots.
pub const fn encoded_len(count: usize) -> usize {
    HEADER_LEN + count * SLOT_LEN + TRAILER_LEN
}

/// Catches accidental damage before any slot is read (unkeyed: the tags,
/// not this, stop forgery).
fn set_check(body: &[u8]) -> [u8; TRAILER_LEN] {
    blake3::hash(body).as_bytes()[..TRAILER_LEN].try_into().expect("8 of 32 bytes")
}

#[cfg(test)]
mod tests;
