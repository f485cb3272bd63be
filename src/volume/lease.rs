//! The volume's write lease, as the attaching machine holds it.
//!
//! One writer at a time: the directory grants the lease with an *epoch*
//! that only grows, and peers refuse shard puts and erasures carrying an
//! epoch older than the newest they have seen. A holder that is taken over
//! (`--force` elsewhere) or lets its lease lapse is *fenced*: its next
//! renewal, put or commit answers `Fenced`, and the volume then fails every
//! write with EIO.
//!
//! ```text
//! attach  ─► acquire (resume the noted epoch, or take a new one) ─► note it
//!         ─► the volume's lease keeper (v2/keeper.rs) renews it
//! detach  ─► everything committed ─► release ─► remove the note
//! ```
//!
//! The *lease note* (`lease` in the state folder, one line
//! `<volume> <epoch>`) survives a crash of the attaching machine, so the
//! next attach from the same folder resumes the same epoch and replays its
//! log instead of waiting for the lease to lapse. It is written through
//! [`crate::sys::durable::replace`], so after a crash it holds the old
//! epoch or the new one, never a torn line.

use std::io;
use std::path::{Path, PathBuf};

use super::VolumeError;
use crate::api::VolumeLease;
use crate::client::Client;
use crate::sys::durable;

/// The note's file name in the state folder.
const NOTE: &str = "lease";

fn note_path(dir: &Path) -> PathBuf {
    dir.join(NOTE)
}

/// The lease epoch the state folder `dir` last held on `volume`, if any.
fn read_note(dir: &Path, volume: &str) -> Option<u64> {
    let text = std::fs::read_to_string(note_path(dir)).ok()?;
    let (name, epoch) = text.trim().split_once(' ')?;
    (name == volume).then(|| epoch.parse().ok()).flatten()
}

fn write_note(dir: &Path, volume: &str, epoch: u64) -> io::Result<()> {
    durable::replace(&note_path(dir), format!("{volume} {epoch}\n").as_bytes(), 0o600)
}

fn remove_note(dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(note_path(dir)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        // A note that came back after a crash would only make the next
        // attach resume a released epoch, which the directory refuses
        // cleanly; syncing the removal avoids even that.
        Ok(()) => durable::sync_dir(dir),
    }
}

/// Takes the write lease on `volume` for the state folder `dir`, resuming
/// the epoch its note names if the directory still has it, and notes the
/// epoch granted.
pub(crate) async fn acquire(
    client: &Client,
    dir: &Path,
    volume: &str,
    force: bool,
) -> Result<VolumeLease, VolumeError> {
    let resume = read_note(dir, volume);
    let lease = client.acquire_lease(volume, force, resume).await?;
    write_note(dir, volume, lease.epoch)
        .map_err(|source| VolumeError::Io { path: note_path(dir), source })?;
    Ok(lease)
}

/// Gives the lease back and removes the note: the next attach, here or
/// elsewhere, starts from a clean volume.
pub(crate) async fn release(
    client: &Client,
    dir: &Path,
    volume: &str,
    epoch: u64,
) -> Result<(), VolumeError> {
    client.release_lease(volume, epoch).await?;
    remove_note(dir).map_err(|source| VolumeError::Io { path: note_path(dir), source })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_note_names_its_volume_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_note(dir.path(), "disk"), None);
        write_note(dir.path(), "disk", 7).unwrap();
        assert_eq!(read_note(dir.path(), "disk"), Some(7));
        // A note for another volume is not resumed.
        assert_eq!(read_note(dir.path(), "other"), None);
        let mode = std::fs::metadata(note_path(dir.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        write_note(dir.path(), "disk", 8).unwrap();
        assert_eq!(read_note(dir.path(), "disk"), Some(8));
        remove_note(dir.path()).unwrap();
        remove_note(dir.path()).unwrap();
        assert_eq!(read_note(dir.path(), "disk"), None);
    }
}
