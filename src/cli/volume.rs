//! `meshdisk volume create|list|info|passwd|delete` and `meshdisk key
//! generate`. A volume's data is encrypted with a random data key that
//! never leaves this machine unwrapped: the directory keeps a check value
//! and the key slots (the data key wrapped by each key file and
//! passphrase that opens it; see `codec::keyslot` and `cli::unlock`).
//! `volume passwd` rewraps a slot, so a passphrase changes without
//! re-encrypting anything.

use std::io::BufRead;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::api::{Durability, VolumeSpec};
use crate::cli::unlock::{self, Held};
use crate::cli::{CliError, CredentialArg, passphrase, render};
use crate::codec::VolumeKey;
use crate::codec::keyslot::{KdfCost, NewSlot};
use crate::size::{human, parse_size};

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a volume; its key comes from a key file (made if missing) or
    /// a passphrase.
    Create(VolumeCreateArgs),
    /// Every volume.
    List(VolumeListArgs),
    /// A volume's geometry, keys, lease, allocated size and segment health.
    Info(VolumeNameArgs),
    /// Change a volume's passphrase (or add or remove a key file) without
    /// re-encrypting its data: only the wrapped copy of its key changes.
    Passwd(VolumePasswdArgs),
    /// Delete a volume (refused while it has snapshots), or one snapshot
    /// (NAME@SNAPSHOT); peers erase what nothing else keeps.
    Delete(VolumeDeleteArgs),
    /// Keep the volume's committed state as a snapshot (`attach
    /// NAME@SNAPSHOT` serves it read-only).
    Snapshot(super::snapshot::SnapshotArgs),
    /// A volume's snapshots, with the space each keeps.
    Snapshots(super::snapshot::SnapshotsArgs),
    /// A new writable volume from a snapshot (NAME@SNAPSHOT NEW), sharing
    /// its segments and key.
    Clone(super::snapshot::CloneArgs),
    /// Roll a detached volume back to a snapshot (a new commit).
    Rollback(super::snapshot::RollbackArgs),
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Write a new random 512-bit volume key to FILE (mode 0600; never overwrites).
    Generate {
        /// Where to write the key. Keep it safe: without it the volume's data is gone.
        file: PathBuf,
    },
}

#[derive(Args)]
pub struct VolumeCreateArgs {
    #[command(flatten)]
    credential: CredentialArg,
    name: String,
    /// The disk's size (a multiple of 4 KiB): 100G, 2T, ...
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Data shards per segment.
    #[arg(long, default_value_t = 4)]
    k: u8,
    /// Parity shards per segment: this many peers may be lost.
    #[arg(long, default_value_t = 2)]
    m: u8,
    /// Bytes per shard of a full segment (a segment holds k of them: 4 MiB
    /// of data with the defaults).
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    shard_size: u64,
    /// Repair a segment when fewer of its shards than this are on peers that
    /// are not lost (default k+m: every shard of a lost peer is rebuilt; a
    /// lower value tolerates some degradation). A segment down to k shards
    /// on up peers is repaired at once whatever this says.
    #[arg(long)]
    repair_threshold: Option<u8>,
    /// What FLUSH waits for: remote (peers and the directory's root) or local
    /// (this machine's log only).
    #[arg(long, value_parser = parse_durability, default_value = "remote")]
    durability: Durability,
    /// A key file that opens the volume; a new key is written there if it
    /// does not exist.
    #[arg(long, conflicts_with = "passphrase", required_unless_present = "passphrase")]
    key_file: Option<PathBuf>,
    /// A passphrase opens the volume (asked for, or MESHDISK_PASSPHRASE).
    #[arg(long)]
    passphrase: bool,
}

#[derive(Args)]
pub struct VolumePasswdArgs {
    #[command(flatten)]
    credential: CredentialArg,
    name: String,
    /// Unlock with this key file instead of the current passphrase (to set
    /// a forgotten passphrase, or a volume's first).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Instead of changing the passphrase, let this key file open the
    /// volume too (a new key is written there if it does not exist).
    #[arg(long, conflicts_with = "remove_key_file")]
    add_key_file: Option<PathBuf>,
    /// Instead of changing the passphrase, stop this key file opening the
    /// volume (refused if it is the volume's only key).
    #[arg(long, conflicts_with = "key_file")]
    remove_key_file: Option<PathBuf>,
}

/// `--durability`. A parser function rather than a clap `ValueEnum`: the
/// wire vocabulary in `api` does not depend on clap, and the message
/// names both choices ("must be remote or local").
fn parse_durability(text: &str) -> Result<Durability, String> {
    match text {
        "remote" => Ok(Durability::Remote),
        "local" => Ok(Durability::Local),
        _ => Err("must be remote or local".into()),
    }
}

#[derive(Args)]
pub struct VolumeListArgs {
    #[command(flatten)]
    credential: CredentialArg,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct VolumeNameArgs {
    #[command(flatten)]
    credential: CredentialArg,
    name: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct VolumeDeleteArgs {
    #[command(flatten)]
    credential: CredentialArg,
    name: String,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
}

/// `meshdisk volume ...`.
pub async fn run(cmd: VolumeCommand) -> Result<(), CliError> {
    match cmd {
        VolumeCommand::Create(a) => create(a).await,
        VolumeCommand::List(a) => {
            let s = a.credential.client()?.status().await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s.volumes)?);
            } else {
                print!("{}", render::volumes(&s.volumes));
            }
            Ok(())
        }
        VolumeCommand::Info(a) => {
            let info = a.credential.client()?.volume_info(&a.name).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", render::volume_info(&info));
            }
            Ok(())
        }
        VolumeCommand::Passwd(a) => passwd(a).await,
        VolumeCommand::Snapshot(a) => super::snapshot::snapshot(a).await,
        VolumeCommand::Snapshots(a) => super::snapshot::snapshots(a).await,
        VolumeCommand::Clone(a) => super::snapshot::clone(a).await,
        VolumeCommand::Rollback(a) => super::snapshot::rollback(a).await,
        VolumeCommand::Delete(a) => {
            if let Some((volume, snapshot)) = super::snapshot::split(&a.name) {
                return super::snapshot::delete(&a.credential.client()?, volume, snapshot).await;
            }
            if !a.yes {
                eprint!("delete volume {} and all its data? type its name to confirm: ", a.name);
                let mut line = String::new();
                std::io::stdin()
                    .lock()
                    .read_line(&mut line)
                    .map_err(CliError::io("reading the confirmation"))?;
                if line.trim() != a.name {
                    return Err(CliError::NotConfirmed);
                }
            }
            a.credential.client()?.delete_volume(&a.name).await?;
            eprintln!("deleted volume {}; the directory erases its shards from the peers", a.name);
            Ok(())
        }
    }
}

async fn create(a: VolumeCreateArgs) -> Result<(), CliError> {
    let durability = a.durability;
    let shard_size =
        u32::try_from(a.shard_size).map_err(|_| CliError::Argument("--shard-size is too large".into()))?;
    let threshold = a.repair_threshold.unwrap_or(a.k.saturating_add(a.m));
    let mut id = [0u8; 16];
    getrandom::fill(&mut id)?;
    let (made, (_, key_check, key_slots)) = if a.passphrase {
        let pass = passphrase::read("passphrase for the new volume: ", true)?;
        let first = NewSlot::Passphrase { passphrase: pass.as_bytes(), cost: KdfCost::DEFAULT };
        (false, unlock::new_volume_keys(&first, &id)?)
    } else {
        let path = a.key_file.as_ref().expect("clap requires --key-file without --passphrase");
        let (file, made) = unlock::key_file_or_new(path)?;
        (made, unlock::new_volume_keys(&NewSlot::KeyFile(&file), &id)?)
    };
    let spec = VolumeSpec {
        name: a.name.clone(),
        id,
        size: a.size,
        k: a.k,
        m: a.m,
        shard_size,
        repair_threshold: threshold,
        key_check,
        key_slots,
        durability,
        lineage: Vec::new(),
    };
    a.credential.client()?.create_volume(spec).await?;
    if made {
        eprintln!(
            "wrote a new volume key to {} (mode 0600). Back it up: without it the volume cannot be read.",
            a.key_file.as_ref().expect("a key file").display()
        );
    }
    eprintln!(
        "created volume {}: {}, k={} m={}, {} shards, repair below {} shards on peers not lost, durability {}",
        a.name,
        human(a.size),
        a.k,
        a.m,
        human(a.shard_size),
        threshold,
        durability.as_str()
    );
    Ok(())
}

/// `meshdisk volume passwd`: opens the slots, rewraps, and stores the new
/// slots by compare-and-set, so two changes at once cannot lose one.
async fn passwd(a: VolumePasswdArgs) -> Result<(), CliError> {
    let client = a.credential.client()?;
    let record = client.volume(&a.name).await?;
    let name = &a.name;
    let unlock_err = |source| CliError::Unlock { volume: name.clone(), source };
    let (slots, done) = if let Some(path) = &a.remove_key_file {
        // The key file to remove is its own authority: it opens the slot.
        let gone = unlock::unlock(&record, Some(path))?;
        let mut slots = gone.slots;
        let index = slots.remove_slot(&gone.held.as_unlock()).map_err(unlock_err)?;
        (slots, format!("removed key slot {index} ({} no longer opens volume {name})", path.display()))
    } else {
        let opened = unlock::unlock(&record, a.key_file.as_deref())?;
        let mut slots = opened.slots;
        match &a.add_key_file {
            Some(path) => {
                let (file, made) = unlock::key_file_or_new(path)?;
                if made {
                    eprintln!("wrote a new volume key to {} (mode 0600)", path.display());
                }
                let new = NewSlot::KeyFile(&file);
                let index = slots.add_slot(&opened.held.as_unlock(), &new).map_err(unlock_err)?;
                (slots, format!("added key slot {index}: {} opens volume {name} too", path.display()))
            }
            None => {
                let new = passphrase::read_new(&format!("new passphrase of volume {name}: "))?;
                let index = slots
                    .set_passphrase(&opened.held.as_unlock(), new.as_bytes(), KdfCost::DEFAULT)
                    .map_err(unlock_err)?;
                let how = match opened.held {
                    Held::Passphrase(_) => "the old one no longer opens it",
                    Held::KeyFile(_) => "any earlier passphrase no longer opens it",
                };
                (slots, format!("set the passphrase of volume {name} (key slot {index}); {how}"))
            }
        }
    };
    // Compare-and-set against the slots just opened: a change made
    // meanwhile (another passwd) is refused, not overwritten.
    client.set_key_slots(name, record.spec.key_slots.clone(), slots.encode()).await?;
    eprintln!("{done}; the data was not re-encrypted");
    Ok(())
}

/// `meshdisk key generate` (no async runtime needed).
pub fn key(cmd: &KeyCommand) -> Result<(), CliError> {
    let KeyCommand::Generate { file } = cmd;
    let key = VolumeKey::generate()?;
    key.write_new_file(file)?;
    eprintln!(
        "wrote a new 512-bit volume key to {} (mode 0600). Back it up: without it the volume cannot be read.",
        file.display()
    );
    Ok(())
}
