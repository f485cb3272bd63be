//! `meshdisk volume create|list|info|delete` and `meshdisk key generate`.
//! A volume's key never leaves this machine: the directory keeps only a
//! check value (and, for a passphrase, the Argon2id parameters).

use std::io::BufRead;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::api::{Durability, VolumeSpec};
use crate::cli::{CliError, CredentialArg, passphrase, render};
use crate::codec::VolumeKey;
use crate::codec::key::KdfParams;
use crate::size::{human, parse_size};

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a volume; its key comes from a key file (made if missing) or
    /// a passphrase.
    Create(VolumeCreateArgs),
    /// Every volume.
    List(VolumeListArgs),
    /// A volume's geometry, lease, allocated size and stripe health.
    Info(VolumeNameArgs),
    /// Delete a volume; peers erase its shards.
    Delete(VolumeDeleteArgs),
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
    /// Repair a stripe when fewer shards than this are healthy (default k+1).
    #[arg(long)]
    repair_threshold: Option<u8>,
    /// What FLUSH waits for: remote (peers and the stripe map) or local
    /// (this machine's log only).
    #[arg(long, value_parser = parse_durability, default_value = "remote")]
    durability: Durability,
    /// The volume key file; a new key is written there if it does not exist.
    #[arg(long, conflicts_with = "passphrase", required_unless_present = "passphrase")]
    key_file: Option<PathBuf>,
    /// Derive the key from a passphrase (asked for, or MESHDISK_PASSPHRASE).
    #[arg(long)]
    passphrase: bool,
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
        VolumeCommand::Delete(a) => {
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
    let threshold = a.repair_threshold.unwrap_or((a.k + 1).min(a.k.saturating_add(a.m)));
    let mut id = [0u8; 16];
    getrandom::fill(&mut id)?;
    let (key, kdf, made) = if a.passphrase {
        let kdf = KdfParams::generate()?;
        let pass = passphrase::read("passphrase for the new volume: ", true)?;
        (VolumeKey::from_passphrase(pass.as_bytes(), &kdf)?, Some(kdf), false)
    } else {
        let path = a.key_file.as_ref().expect("clap requires --key-file without --passphrase");
        if path.exists() {
            (VolumeKey::read_file(path)?, None, false)
        } else {
            let key = VolumeKey::generate()?;
            key.write_new_file(path)?;
            (key, None, true)
        }
    };
    let spec = VolumeSpec {
        name: a.name.clone(),
        id,
        size: a.size,
        k: a.k,
        m: a.m,
        shard_size,
        repair_threshold: threshold,
        key_check: key.check_value(&id).0,
        kdf,
        durability,
    };
    a.credential.client()?.create_volume(spec).await?;
    if made {
        eprintln!(
            "wrote a new volume key to {} (mode 0600). Back it up: without it the volume cannot be read.",
            a.key_file.as_ref().expect("a key file").display()
        );
    }
    eprintln!(
        "created volume {}: {}, k={} m={}, {} shards, repair below {} healthy shards, durability {}",
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
