//! A volume's data key from what the user holds.
//!
//! Everything a volume stores is encrypted with its random data key; the
//! directory keeps that key only wrapped, in the volume's key slots
//! (`codec::keyslot`), one per key file or passphrase that opens it. Every
//! command that needs the key (`attach`, `demo`, `volume passwd`) goes
//! through [`data_key`] or [`unlock`]: a `--key-file` opens a key-file
//! slot; without one, the passphrase (asked for, or `MESHDISK_PASSPHRASE`)
//! opens a passphrase slot. A key that opens no slot is refused with the
//! volume's name and which kind of key was wrong.

use std::path::Path;

use zeroize::Zeroizing;

use crate::api::VolumeRecord;
use crate::cli::{CliError, passphrase};
use crate::codec::keyslot::{DataKey, KeySlots, NewSlot, SlotKind, Unlock};
use crate::codec::{KeyCheck, VolumeKey};

/// What the user gave to unlock a volume, kept (zeroized on drop) so a
/// command can both open the slots and act on them (`volume passwd`).
pub enum Held {
    KeyFile(VolumeKey),
    Passphrase(Zeroizing<String>),
}

impl Held {
    /// As `codec::keyslot` takes it.
    pub fn as_unlock(&self) -> Unlock<'_> {
        match self {
            Held::KeyFile(key) => Unlock::KeyFile(key),
            Held::Passphrase(p) => Unlock::Passphrase(p.as_bytes()),
        }
    }
}

/// A volume whose slots `held` opened: the slots as stored and the data key.
pub struct Unlocked {
    pub slots: KeySlots,
    pub held: Held,
    pub data_key: DataKey,
}

/// The volume's data key, from `--key-file` if given, else from its
/// passphrase. What `attach` and `demo` call.
pub fn data_key(record: &VolumeRecord, key_file: Option<&Path>) -> Result<VolumeKey, CliError> {
    Ok(unlock(record, key_file)?.data_key.into_volume_key())
}

/// Opens the volume's key slots with `--key-file` if given, else with its
/// passphrase, and checks the key against the volume's key check (the
/// slots cannot give a wrong key; this catches slots that were swapped
/// for another volume's).
pub fn unlock(record: &VolumeRecord, key_file: Option<&Path>) -> Result<Unlocked, CliError> {
    let spec = &record.spec;
    let slots = stored_slots(record)?;
    let held = match key_file {
        Some(path) => Held::KeyFile(VolumeKey::read_file(path)?),
        None => {
            if !slots.slots().iter().any(|s| s.kind() == SlotKind::Passphrase) {
                return Err(CliError::NoPassphrase(spec.name.clone()));
            }
            Held::Passphrase(passphrase::read(&format!("passphrase of volume {}: ", spec.name), false)?)
        }
    };
    let data_key = slots
        .unlock(&held.as_unlock())
        .map_err(|source| CliError::Unlock { volume: spec.name.clone(), source })?;
    data_key.volume_key().verify(&spec.id, &KeyCheck(spec.key_check))?;
    Ok(Unlocked { slots, held, data_key })
}

/// The volume's key slots as the directory keeps them.
pub fn stored_slots(record: &VolumeRecord) -> Result<KeySlots, CliError> {
    KeySlots::parse(&record.spec.key_slots)
        .map_err(|source| CliError::Unlock { volume: record.spec.name.clone(), source })
}

/// A new volume's keys: a random data key wrapped in one slot for `first`;
/// the data key, its check value for volume `id`, and the encoded slots.
pub fn new_volume_keys(first: &NewSlot, id: &[u8; 16]) -> Result<(VolumeKey, [u8; 32], Vec<u8>), CliError> {
    let (data_key, slots) = KeySlots::create(first)?;
    let check = data_key.volume_key().check_value(id).0;
    Ok((data_key.into_volume_key(), check, slots.encode()))
}

/// The key in the file at `path`, or a new random key written there
/// (mode 0600) if there is no file; true if it was written.
pub fn key_file_or_new(path: &Path) -> Result<(VolumeKey, bool), CliError> {
    if path.exists() {
        return Ok((VolumeKey::read_file(path)?, false));
    }
    let key = VolumeKey::generate()?;
    key.write_new_file(path)?;
    Ok((key, true))
}
