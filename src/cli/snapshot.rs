//! `meshdisk volume snapshot | snapshots | clone | rollback` and `volume
//! delete NAME@SNAP`: kept roots of a volume, writable copies of them, and
//! going back to one.
//!
//! The directory keeps a snapshot (a copy of the volume's committed root)
//! and the segments it reaches, without the key. Whatever makes a root
//! needs the key (a root is MAC'd): a clone's first root is the
//! snapshot's, re-sealed under the clone's id and key; a rollback's is the
//! snapshot's re-sealed as the volume's next commit, above everything the
//! volume ever wrote (sequences and segment ids are never reused).

use std::path::PathBuf;

use clap::Args;

use super::unlock;
use crate::api::{Ancestor, SnapshotInfo, VolumeRecord, VolumeSpec};
use crate::cli::{CliError, CredentialArg};
use crate::client::Client;
use crate::codec::key::VolumeKey;
use crate::size::human;
use crate::volume::v2::lineage::Lineage;
use crate::volume::v2::root::{RootKey, RootRecord};

#[derive(Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    credential: CredentialArg,
    /// The volume.
    name: String,
    /// The snapshot's name.
    snapshot: String,
}

#[derive(Args)]
pub struct SnapshotsArgs {
    #[command(flatten)]
    credential: CredentialArg,
    name: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct CloneArgs {
    #[command(flatten)]
    credential: CredentialArg,
    /// The snapshot to clone, as VOLUME@SNAPSHOT.
    source: String,
    /// The new volume's name.
    name: String,
    /// The parent volume's key file (else its passphrase is asked): the
    /// clone opens with the same key.
    #[arg(long)]
    key_file: Option<PathBuf>,
}

#[derive(Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    credential: CredentialArg,
    name: String,
    snapshot: String,
    /// The volume's key file (else its passphrase is asked).
    #[arg(long)]
    key_file: Option<PathBuf>,
}

/// `VOLUME@SNAPSHOT` split in two (`None` without an `@`).
pub fn split(text: &str) -> Option<(&str, &str)> {
    text.split_once('@')
}

fn bad_root(volume: &str, why: impl std::fmt::Display) -> CliError {
    CliError::Argument(format!("volume {volume}: its root does not open with this key: {why}"))
}

/// The volume's own key (a clone's is derived from the data key and its
/// lineage) and its roots' MAC key.
fn own_keys(data: &VolumeKey, record: &VolumeRecord) -> Result<RootKey, CliError> {
    let (_, own) =
        Lineage::new(data, &record.spec).map_err(|e| CliError::Argument(format!("the volume key: {e}")))?;
    Ok(RootKey::derive(&own))
}

/// `meshdisk volume snapshot NAME SNAP`.
pub async fn snapshot(a: SnapshotArgs) -> Result<(), CliError> {
    let s = a.credential.client()?.create_snapshot(&a.name, &a.snapshot).await?;
    eprintln!(
        "snapshot {}@{} keeps commit {} of the volume (what its last commit holds: flush or freeze the filesystem first for a consistent one)",
        a.name, s.name, s.commit
    );
    Ok(())
}

/// `meshdisk volume snapshots NAME`.
pub async fn snapshots(a: SnapshotsArgs) -> Result<(), CliError> {
    let list = a.credential.client()?.list_snapshots(&a.name).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", table(&a.name, &list));
    }
    Ok(())
}

/// The table `volume snapshots` prints.
pub fn table(volume: &str, list: &[SnapshotInfo]) -> String {
    if list.is_empty() {
        return format!(
            "volume {volume} has no snapshots (make one with `meshdisk volume snapshot {volume} NAME`)\n"
        );
    }
    let mut rows: Vec<Vec<String>> =
        vec![["SNAPSHOT", "COMMIT", "REACHES", "PINS ALONE", "CLONES"].map(String::from).to_vec()];
    for s in list {
        rows.push(vec![
            format!("{volume}@{}", s.name),
            format!("{}.{}", s.epoch, s.commit),
            human(s.reaches),
            human(s.exclusive),
            if s.clones.is_empty() { "-".into() } else { s.clones.join(", ") },
        ]);
    }
    super::render::table(&rows)
}

/// `meshdisk volume delete NAME@SNAP`.
pub async fn delete(client: &Client, volume: &str, snapshot: &str) -> Result<(), CliError> {
    client.delete_snapshot(volume, snapshot).await?;
    eprintln!(
        "deleted snapshot {volume}@{snapshot}; the directory erases the segments only it kept from the peers"
    );
    Ok(())
}

/// The root `volume`'s snapshot `snapshot` keeps, opened (MAC checked).
async fn snapshot_root(
    client: &Client,
    record: &VolumeRecord,
    root_key: &RootKey,
    snapshot: &str,
) -> Result<RootRecord, CliError> {
    let state = client.snapshot_root(&record.spec.name, snapshot).await?;
    RootRecord::open(&state.sealed, root_key, &record.spec.id).map_err(|e| bad_root(&record.spec.name, e))
}

/// `meshdisk volume clone NAME@SNAP NEW`.
pub async fn clone(a: CloneArgs) -> Result<(), CliError> {
    let Some((parent, snap)) = split(&a.source) else {
        return Err(CliError::Argument(format!("clone a snapshot: VOLUME@SNAPSHOT, not {}", a.source)));
    };
    let client = a.credential.client()?;
    let record = client.volume(parent).await?;
    let data = unlock::data_key(&record, a.key_file.as_deref())?;
    let root = snapshot_root(&client, &record, &own_keys(&data, &record)?, snap).await?;
    let mut id = [0u8; 16];
    getrandom::fill(&mut id)?;
    let mut lineage = vec![Ancestor {
        volume: parent.into(),
        snapshot: snap.into(),
        id: record.spec.id,
        highest_segment: root.highest_segment.raw(),
        highest_sequence: root.highest_sequence.raw(),
    }];
    lineage.extend(record.spec.lineage.iter().cloned());
    let spec = VolumeSpec {
        name: a.name.clone(),
        id,
        key_check: data.check_value(&id).0,
        // The same slots: the clone opens with the parent's key file or
        // passphrase (changed for each volume on its own afterwards).
        key_slots: record.spec.key_slots.clone(),
        lineage,
        ..record.spec.clone()
    };
    let clone_key = own_keys(&data, &VolumeRecord { spec: spec.clone(), epoch: 0, created_ms: 0 })?;
    // Its first root: the snapshot's map, under the clone's id and key, at
    // the snapshot root's epoch (a root's highest sequence and segment are
    // never of a later epoch than its own); the clone's first lease is
    // above it, so its own sequences and ids are above all it inherits.
    let first = RootRecord { volume_id: id, commit: 1, ..root };
    client.clone_volume(spec, first.seal(&clone_key)).await?;
    eprintln!(
        "volume {} is a clone of {parent}@{snap}: it shares that snapshot's segments (kept while the clone exists) and opens with the same key",
        a.name
    );
    Ok(())
}

/// `meshdisk volume rollback NAME SNAP`: only while nobody has the volume
/// attached; a new commit whose contents are the snapshot's.
pub async fn rollback(a: RollbackArgs) -> Result<(), CliError> {
    let client = a.credential.client()?;
    let record = client.volume(&a.name).await?;
    let data = unlock::data_key(&record, a.key_file.as_deref())?;
    let root_key = own_keys(&data, &record)?;
    let snap = snapshot_root(&client, &record, &root_key, &a.snapshot).await?;
    let lease = client.acquire_lease(&a.name, false, None).await.map_err(|e| {
        CliError::Argument(format!(
            "volume {} must be detached to roll it back (`meshdisk detach {}` where it is attached): {e}",
            a.name, a.name
        ))
    })?;
    let done = async {
        let state = client.root(&a.name).await?;
        let head = match &state {
            Some(s) => {
                RootRecord::open(&s.sealed, &root_key, &record.spec.id).map_err(|e| bad_root(&a.name, e))?
            }
            None => return Err(CliError::Argument(format!("volume {} has no root to roll back", a.name))),
        };
        let next = RootRecord {
            epoch: lease.epoch,
            commit: head.commit + 1,
            // Never below what the volume wrote: its sequences and segment
            // ids are not used again.
            highest_sequence: head.highest_sequence.max(snap.highest_sequence),
            highest_segment: head.highest_segment.max(snap.highest_segment),
            ..snap.clone()
        };
        let commit = client
            .rollback(&a.name, &a.snapshot, lease.epoch, (head.epoch, head.commit), next.seal(&root_key))
            .await?;
        Ok(commit)
    }
    .await;
    if let Err(e) = client.release_lease(&a.name, lease.epoch).await {
        tracing::warn!("volume {}: releasing the lease after the rollback: {e}", a.name);
    }
    let commit = done?;
    eprintln!(
        "volume {} rolled back to {}@{} (as commit {commit}); folders with writes made before it drop them when they attach (--discard-local)",
        a.name, a.name, a.snapshot
    );
    Ok(())
}
