//! Volume keys: where they come from, how a wrong one is caught, and how
//! they are kept out of logs and freed memory.
//!
//! A volume key is 512 bits: the two 256-bit AES keys of AES-256-XTS (the
//! first half encrypts data, the second encrypts tweaks, as in IEEE 1619).
//! It comes either from a key file of exactly 64 random bytes
//! (`meshdisk key generate FILE`) or from a passphrase stretched with
//! Argon2id; the salt and cost ([`KdfParams`]) are stored with the volume,
//! the key never is. What the directory keeps is a [`KeyCheck`]: a keyed
//! blake3 of a fixed label and the volume id, from which the key cannot be
//! recovered but which tells a wrong key apart before any data is read.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::sys::durable;

/// Length of a volume key in bytes (two AES-256 keys).
pub const KEY_LEN: usize = 64;

/// Length of the Argon2id salt in bytes.
pub const SALT_LEN: usize = 16;

/// Length of a volume id in bytes.
pub const VOLUME_ID_LEN: usize = 16;

/// Context string for the key-check key (blake3 `derive_key`); changing it
/// changes every key-check value, so it is versioned.
const KEY_CHECK_CONTEXT: &str = "meshdisk 2026-11 volume key check v1";

/// What goes through the keyed hash, after the volume id.
const KEY_CHECK_LABEL: &[u8] = b"meshdisk key check";

/// Derivation context of a clone's own key ([`VolumeKey::for_lineage`]).
const CLONE_CONTEXT: &str = "meshdisk 2026-11 clone data key v1";

/// Errors from loading, deriving or checking a key. None of them carries
/// key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading key file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("writing key file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "key file {path} already exists; refusing to overwrite a key (pick another name, or delete it first if it is really unused)"
    )]
    Exists { path: PathBuf },
    #[error(
        "key file {path} holds {len} bytes; a meshdisk key file holds exactly {KEY_LEN} (make one with `meshdisk key generate FILE`)"
    )]
    Length { path: PathBuf, len: u64 },
    #[error("a volume key must be {KEY_LEN} bytes, got {0}")]
    KeyLength(usize),
    #[error("this key's two halves are equal, which XTS forbids; generate a new key")]
    EqualHalves,
    #[error("the key does not match this volume (key-check mismatch): check the key file or passphrase")]
    WrongKey,
    #[error("bad Argon2id parameters: {0}")]
    KdfParams(String),
    #[error("the passphrase is empty")]
    EmptyPassphrase,
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
}

/// A 512-bit AES-256-XTS volume key. Zeroized on drop; its `Debug` prints
/// nothing of the key; it has no `Display`.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct VolumeKey {
    // Boxed so the bytes live at one heap address (moves do not leave
    // copies on the stack).
    bytes: Box<[u8; KEY_LEN]>,
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeKey(<redacted>)")
    }
}

impl VolumeKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = Box::new([0u8; KEY_LEN]);
        getrandom::fill(&mut bytes[..]).map_err(|e| KeyError::Random(e.to_string()))?;
        Self::checked(bytes)
    }

    /// A key from its 64 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() != KEY_LEN {
            return Err(KeyError::KeyLength(bytes.len()));
        }
        let mut boxed = Box::new([0u8; KEY_LEN]);
        boxed.copy_from_slice(bytes);
        Self::checked(boxed)
    }

    fn checked(bytes: Box<[u8; KEY_LEN]>) -> Result<Self, KeyError> {
        let key = Self { bytes };
        // IEEE 1619-2018 and SP 800-38E require the data key and the tweak
        // key to differ.
        if key.bytes[..32] == key.bytes[32..] {
            return Err(KeyError::EqualHalves);
        }
        Ok(key)
    }

    /// Reads a key file: exactly [`KEY_LEN`] bytes. Warns (does not fail)
    /// when the file is readable by group or others.
    pub fn read_file(path: &Path) -> Result<Self, KeyError> {
        let read_err = |source| KeyError::Read { path: path.to_owned(), source };
        let mut file = std::fs::File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if meta.len() != KEY_LEN as u64 {
            return Err(KeyError::Length { path: path.to_owned(), len: meta.len() });
        }
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "key file {} is readable by other users (mode {:o}); `chmod 600` it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
        let mut bytes = Zeroizing::new([0u8; KEY_LEN + 1]);
        let mut filled = 0;
        loop {
            let n = file.read(&mut bytes[filled..]).map_err(read_err)?;
            if n == 0 {
                break;
            }
            filled += n;
            if filled == bytes.len() {
                break;
            }
        }
        if filled != KEY_LEN {
            return Err(KeyError::Length { path: path.to_owned(), len: filled as u64 });
        }
        Self::from_bytes(&bytes[..KEY_LEN])
    }

    /// Writes this key to a new file with mode 0600 and syncs it. Never
    /// overwrites an existing file.
    pub fn write_new_file(&self, path: &Path) -> Result<(), KeyError> {
        // The one durable write: a crash leaves no partial key file (which
        // would be useless and block the next try) and the name is synced.
        durable::create_new(path, &self.bytes[..], 0o600).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists { path: path.to_owned() }
            } else {
                KeyError::Write { path: path.to_owned(), source }
            }
        })
    }

    /// Derives a key from a passphrase with Argon2id and the volume's
    /// stored parameters.
    pub fn from_passphrase(passphrase: &[u8], params: &KdfParams) -> Result<Self, KeyError> {
        if passphrase.is_empty() {
            return Err(KeyError::EmptyPassphrase);
        }
        let argon = params.argon2()?;
        let mut bytes = Box::new([0u8; KEY_LEN]);
        if let Err(e) = argon.hash_password_into(passphrase, &params.salt, &mut bytes[..]) {
            bytes.zeroize();
            return Err(KeyError::KdfParams(e.to_string()));
        }
        Self::checked(bytes)
    }

    /// The value stored with a volume so that a wrong key is refused.
    pub fn check_value(&self, volume_id: &[u8; VOLUME_ID_LEN]) -> KeyCheck {
        let mut check_key = Zeroizing::new(blake3::derive_key(KEY_CHECK_CONTEXT, &self.bytes[..]));
        let mut hasher = blake3::Hasher::new_keyed(&check_key);
        hasher.update(volume_id);
        hasher.update(KEY_CHECK_LABEL);
        let value = KeyCheck(*hasher.finalize().as_bytes());
        check_key.zeroize();
        value
    }

    /// Refuses this key for the volume unless it matches the stored check
    /// value (compared in constant time).
    pub fn verify(&self, volume_id: &[u8; VOLUME_ID_LEN], expected: &KeyCheck) -> Result<(), KeyError> {
        let ours = blake3::Hash::from_bytes(self.check_value(volume_id).0);
        if ours == blake3::Hash::from_bytes(expected.0) { Ok(()) } else { Err(KeyError::WrongKey) }
    }

    /// The data-encryption half (IEEE 1619 "Key1").
    /// An independent key for another use of the same secret (the local
    /// log's encryption, say): blake3 in key-derivation mode with
    /// `context`, 64 bytes of output. Different contexts give unrelated keys.
    pub fn derive(&self, context: &str) -> Result<VolumeKey, KeyError> {
        let mut bytes = Box::new([0u8; KEY_LEN]);
        let mut hasher = blake3::Hasher::new_derive_key(context);
        hasher.update(&self.bytes[..]);
        hasher.finalize_xof().fill(&mut bytes[..]);
        Self::checked(bytes)
    }

    /// The key a volume encrypts its own writes with (and its roots' MAC
    /// keys come from): this data key itself for a volume made by `volume
    /// create` (empty `lineage`); for a clone, a key derived from it, the
    /// clone's id and its lineage (each ancestor's id, highest segment and
    /// highest sequence, nearest first). A clone and its parent share the
    /// data key and both write sequences above the snapshot's, so they
    /// must not share an encryption key (an XTS tweak would repeat); and a
    /// lineage altered by the directory gives another key, whose roots'
    /// MACs then fail, so the ancestors' boundaries are authenticated too.
    pub fn for_lineage(
        &self,
        volume_id: &[u8; VOLUME_ID_LEN],
        lineage: &[([u8; VOLUME_ID_LEN], u64, u64)],
    ) -> Result<VolumeKey, KeyError> {
        if lineage.is_empty() {
            return Ok(Self { bytes: self.bytes.clone() });
        }
        let mut bytes = Box::new([0u8; KEY_LEN]);
        let mut hasher = blake3::Hasher::new_derive_key(CLONE_CONTEXT);
        hasher.update(&self.bytes[..]);
        hasher.update(volume_id);
        hasher.update(&(lineage.len() as u64).to_le_bytes());
        for (id, segment, sequence) in lineage {
            hasher.update(id);
            hasher.update(&segment.to_le_bytes());
            hasher.update(&sequence.to_le_bytes());
        }
        hasher.finalize_xof().fill(&mut bytes[..]);
        Self::checked(bytes)
    }

    /// A 256-bit MAC key for another use of the same secret, as [`derive`].
    pub fn derive_mac_key(&self, context: &str) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(blake3::derive_key(context, &self.bytes[..]))
    }

    pub(crate) fn data_key(&self) -> &[u8; 32] {
        self.bytes[..32].try_into().expect("32 of 64 bytes")
    }

    /// The tweak-encryption half (IEEE 1619 "Key2").
    pub(crate) fn tweak_key(&self) -> &[u8; 32] {
        self.bytes[32..].try_into().expect("32 of 64 bytes")
    }
}

/// A key-check value: a keyed blake3 of the volume id and a fixed label.
/// Safe to store and show; it reveals nothing usable about the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyCheck(pub [u8; 32]);

/// Argon2id salt and cost, stored with a passphrase-protected volume.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KdfParams {
    /// Random, per volume.
    pub salt: [u8; SALT_LEN],
    /// Memory cost in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl KdfParams {
    /// Default memory cost: 64 MiB.
    pub const DEFAULT_MEMORY_KIB: u32 = 64 * 1024;
    /// Default passes: 3 (about half a second on a small machine).
    pub const DEFAULT_ITERATIONS: u32 = 3;
    /// Default lanes: 1.
    pub const DEFAULT_PARALLELISM: u32 = 1;
    /// Lowest memory cost accepted from a stored volume: 8 MiB. Anything
    /// cheaper is a sign of tampering or a mistake, not a choice.
    pub const MIN_MEMORY_KIB: u32 = 8 * 1024;
    /// Highest memory cost accepted: 1 GiB (Argon2 aborts the process if
    /// its memory cannot be allocated, so stored parameters must not be able
    /// to ask for more than an ordinary machine has).
    pub const MAX_MEMORY_KIB: u32 = 1024 * 1024;

    /// Fresh parameters with a random salt and the default cost.
    pub fn generate() -> Result<Self, KeyError> {
        let mut salt = [0u8; SALT_LEN];
        getrandom::fill(&mut salt).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self {
            salt,
            memory_kib: Self::DEFAULT_MEMORY_KIB,
            iterations: Self::DEFAULT_ITERATIONS,
            parallelism: Self::DEFAULT_PARALLELISM,
        })
    }

    fn argon2(&self) -> Result<argon2::Argon2<'static>, KeyError> {
        if !(Self::MIN_MEMORY_KIB..=Self::MAX_MEMORY_KIB).contains(&self.memory_kib) {
            return Err(KeyError::KdfParams(format!(
                "memory cost {} KiB is outside {}..={} KiB",
                self.memory_kib,
                Self::MIN_MEMORY_KIB,
                Self::MAX_MEMORY_KIB
            )));
        }
        if !(1..=16).contains(&self.iterations) {
            return Err(KeyError::KdfParams(format!("{} iterations is outside 1..=16", self.iterations)));
        }
        if !(1..=16).contains(&self.parallelism) {
            return Err(KeyError::KdfParams(format!("parallelism {} is outside 1..=16", self.parallelism)));
        }
        let params = argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(KEY_LEN))
            .map_err(|e| KeyError::KdfParams(e.to_string()))?;
        Ok(argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(fill: u8) -> VolumeKey {
        let mut b = [fill; KEY_LEN];
        b[32] ^= 1;
        VolumeKey::from_bytes(&b).unwrap()
    }

    #[test]
    fn a_clone_key_depends_on_the_clone_and_every_step_of_its_lineage() {
        let data = key(0x42);
        let (a, b) = ([1; VOLUME_ID_LEN], [2; VOLUME_ID_LEN]);
        // No lineage: the data key itself.
        assert_eq!(data.for_lineage(&a, &[]).unwrap().bytes, data.bytes);
        let base = data.for_lineage(&b, &[(a, 7, 9)]).unwrap();
        assert_ne!(base.bytes, data.bytes);
        assert_eq!(data.for_lineage(&b, &[(a, 7, 9)]).unwrap().bytes, base.bytes);
        for other in [
            data.for_lineage(&a, &[(a, 7, 9)]),
            data.for_lineage(&b, &[(b, 7, 9)]),
            data.for_lineage(&b, &[(a, 8, 9)]),
            data.for_lineage(&b, &[(a, 7, 10)]),
            data.for_lineage(&b, &[(a, 7, 9), (a, 1, 1)]),
            key(0x43).for_lineage(&b, &[(a, 7, 9)]),
        ] {
            assert_ne!(other.unwrap().bytes, base.bytes);
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = key(0xab);
        let shown = format!("{k:?} {:?}", vec![k.clone()]);
        assert!(shown.contains("redacted"));
        assert!(!shown.to_lowercase().contains("ab"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
    }

    #[test]
    fn wrong_lengths_and_equal_halves_are_refused() {
        assert!(matches!(VolumeKey::from_bytes(&[1; 63]), Err(KeyError::KeyLength(63))));
        assert!(matches!(VolumeKey::from_bytes(&[1; 65]), Err(KeyError::KeyLength(65))));
        assert!(matches!(VolumeKey::from_bytes(&[7; 64]), Err(KeyError::EqualHalves)));
    }

    #[test]
    fn generated_keys_differ() {
        let a = VolumeKey::generate().unwrap();
        let b = VolumeKey::generate().unwrap();
        assert_ne!(a.bytes[..], b.bytes[..]);
    }

    #[test]
    fn key_check_accepts_the_key_and_refuses_others() {
        let id = [9u8; VOLUME_ID_LEN];
        let k = key(1);
        let check = k.check_value(&id);
        k.verify(&id, &check).unwrap();
        assert!(matches!(key(2).verify(&id, &check), Err(KeyError::WrongKey)));
        // The same key on another volume has another check value.
        assert_ne!(k.check_value(&[8u8; VOLUME_ID_LEN]), check);
        // The check value is not a piece of the key.
        assert!(!k.bytes.windows(8).any(|w| check.0.windows(8).any(|c| c == w)));
    }

    #[test]
    fn key_file_round_trip_is_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.key");
        let k = VolumeKey::generate().unwrap();
        k.write_new_file(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), KEY_LEN as u64);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let back = VolumeKey::read_file(&path).unwrap();
        assert_eq!(back.bytes[..], k.bytes[..]);
        assert!(matches!(VolumeKey::generate().unwrap().write_new_file(&path), Err(KeyError::Exists { .. })));
        assert_eq!(VolumeKey::read_file(&path).unwrap().bytes[..], k.bytes[..]);
    }

    #[test]
    fn short_or_long_key_files_are_refused_with_their_length() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 32, 63, 65, 128] {
            let path = dir.path().join(format!("k{len}"));
            std::fs::write(&path, vec![3u8; len]).unwrap();
            match VolumeKey::read_file(&path) {
                Err(KeyError::Length { len: got, .. }) => assert_eq!(got, len as u64),
                other => panic!("{len} bytes: {other:?}"),
            }
        }
        let err = VolumeKey::read_file(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    fn cheap_params(salt: u8) -> KdfParams {
        KdfParams {
            salt: [salt; SALT_LEN],
            memory_kib: KdfParams::MIN_MEMORY_KIB,
            iterations: 1,
            parallelism: 1,
        }
    }

    #[test]
    fn passphrase_derivation_is_deterministic_and_salted() {
        let p = cheap_params(1);
        let a = VolumeKey::from_passphrase(b"correct horse", &p).unwrap();
        let b = VolumeKey::from_passphrase(b"correct horse", &p).unwrap();
        assert_eq!(a.bytes[..], b.bytes[..]);
        let c = VolumeKey::from_passphrase(b"correct horse", &cheap_params(2)).unwrap();
        assert_ne!(a.bytes[..], c.bytes[..]);
        let d = VolumeKey::from_passphrase(b"correct horsf", &p).unwrap();
        assert_ne!(a.bytes[..], d.bytes[..]);
        assert!(matches!(VolumeKey::from_passphrase(b"", &p), Err(KeyError::EmptyPassphrase)));
    }

    #[test]
    fn passphrase_key_is_argon2id_version_13_with_the_stored_parameters() {
        // Our plumbing (algorithm, version, costs, output length) against a
        // direct call of the argon2 crate with the intended choices.
        let p = cheap_params(0x5a);
        let ours = VolumeKey::from_passphrase(b"password", &p).unwrap();
        let mut want = [0u8; KEY_LEN];
        argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(p.memory_kib, 1, 1, Some(KEY_LEN)).unwrap(),
        )
        .hash_password_into(b"password", &p.salt, &mut want)
        .unwrap();
        assert_eq!(ours.bytes[..], want[..]);
    }

    #[test]
    fn stored_parameters_out_of_range_are_refused() {
        for bad in [
            KdfParams { memory_kib: 1024, ..cheap_params(1) },
            KdfParams { iterations: 0, ..cheap_params(1) },
            KdfParams { parallelism: 0, ..cheap_params(1) },
            KdfParams { memory_kib: u32::MAX, ..cheap_params(1) },
        ] {
            assert!(matches!(VolumeKey::from_passphrase(b"x", &bad), Err(KeyError::KdfParams(_))), "{bad:?}");
        }
        let fresh = KdfParams::generate().unwrap();
        assert_eq!(fresh.memory_kib, KdfParams::DEFAULT_MEMORY_KIB);
        assert_ne!(fresh.salt, KdfParams::generate().unwrap().salt);
    }
}
