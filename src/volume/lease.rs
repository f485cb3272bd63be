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
//! `<volume> <epoch> <run>`) survives a crash of the attaching machine, so
//! the next attach from the same folder takes the lease from itself
//! instead of waiting for it to lapse. `<run>` is the first epoch of the
//! unbroken run of grants to this folder: the volume's writes at or after
//! it can only be this folder's, which is what lets it replay its log. It is written through
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
/// What the note says: the epoch last granted to this folder, and the
/// first epoch of the unbroken run of grants to it that ends there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Note {
    epoch: u64,
    run_from: u64,
}

fn read_note(dir: &Path, volume: &str) -> Option<Note> {
    let text = std::fs::read_to_string(note_path(dir)).ok()?;
    let mut words = text.split_whitespace();
    if words.next()? != volume {
        return None;
    }
    let epoch = words.next()?.parse().ok()?;
    // A note without the run's start (written before it was kept) starts
    // a run at its own epoch.
    let run_from = words.next().and_then(|w| w.parse().ok()).unwrap_or(epoch);
    Some(Note { epoch, run_from: run_from.min(epoch) })
}

fn write_note(dir: &Path, volume: &str, note: Note) -> io::Result<()> {
    durable::replace(
        &note_path(dir),
        format!("{volume} {} {}\n", note.epoch, note.run_from).as_bytes(),
        0o600,
    )
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

/// A lease as granted to a state folder.
#[derive(Clone, Debug)]
pub(crate) struct Granted {
    pub lease: VolumeLease,
    /// The first epoch of the unbroken run of grants to this folder that
    /// ends with this one: nobody else held the volume at or after it.
    pub run_from: u64,
    /// The epoch the folder's note named before this grant, if any. A
    /// grant at or below it means the directory went back in time.
    pub noted: Option<u64>,
}

impl Granted {
    /// No lease: a snapshot's read-only attach takes none.
    pub(crate) fn none() -> Self {
        let lease = VolumeLease {
            holder: String::new(),
            host: String::new(),
            epoch: 0,
            since_ms: 0,
            ttl_ms: 0,
            took_over: false,
        };
        Self { lease, run_from: 0, noted: None }
    }
}

/// Takes the write lease on `volume` for the state folder `dir`, resuming
/// the epoch its note names if the directory still has it, and notes the
/// epoch granted with the run it continues.
///
/// Every grant raises the volume's epoch by one, so a grant one above the
/// noted epoch means nobody else was granted the volume since: the run
/// goes on (an attach that took the lease and was refused, or a lease
/// taken again after it lapsed, does not break it). Any other grant
/// starts a new run. (A grant at or below the noted epoch is a directory
/// restored from an older copy: the caller refuses it, see `noted`.)
pub(crate) async fn acquire(
    client: &Client,
    dir: &Path,
    volume: &str,
    force: bool,
) -> Result<Granted, VolumeError> {
    let note = read_note(dir, volume);
    let lease = client.acquire_lease(volume, force, note.map(|n| n.epoch)).await?;
    let noted = note.map(|n| n.epoch);
    if noted.is_some_and(|n| lease.epoch <= n) {
        // Keep the note as it is: it is the evidence.
        return Ok(Granted { run_from: lease.epoch, lease, noted });
    }
    let run_from = match note {
        Some(n) if lease.epoch == n.epoch + 1 => n.run_from,
        _ => lease.epoch,
    };
    write_note(dir, volume, Note { epoch: lease.epoch, run_from })
        .map_err(|source| VolumeError::Io { path: note_path(dir), source })?;
    Ok(Granted { lease, run_from, noted })
}

/// Gives the lease back and keeps the note: for an attach refused after
/// taking the lease, so another machine need not wait for it to lapse,
/// and this folder's run goes on if nobody else takes the volume first.
pub(crate) async fn give_back(client: &Client, volume: &str, epoch: u64) -> Result<(), VolumeError> {
    client.release_lease(volume, epoch).await?;
    Ok(())
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
        write_note(dir.path(), "disk", Note { epoch: 7, run_from: 5 }).unwrap();
        assert_eq!(read_note(dir.path(), "disk"), Some(Note { epoch: 7, run_from: 5 }));
        // A note for another volume is not resumed.
        assert_eq!(read_note(dir.path(), "other"), None);
        let mode = std::fs::metadata(note_path(dir.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        write_note(dir.path(), "disk", Note { epoch: 8, run_from: 8 }).unwrap();
        assert_eq!(read_note(dir.path(), "disk"), Some(Note { epoch: 8, run_from: 8 }));
        // A note of the older form (no run) starts a run at its epoch.
        std::fs::write(note_path(dir.path()), "disk 9\n").unwrap();
        assert_eq!(read_note(dir.path(), "disk"), Some(Note { epoch: 9, run_from: 9 }));
        remove_note(dir.path()).unwrap();
        remove_note(dir.path()).unwrap();
        assert_eq!(read_note(dir.path(), "disk"), None);
    }
}
