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
//!         ─► renewal worker: every ttl/3, renew; Fenced ─► fence the volume
//! detach  ─► everything destaged ─► release ─► remove the note
//! ```
//!
//! The *lease note* (`lease` in the state folder, one line
//! `<volume> <epoch>`) survives a crash of the attaching machine, so the
//! next attach from the same folder resumes the same epoch and replays its
//! log instead of waiting for the lease to lapse. It is written through
//! [`crate::sys::durable::replace`], so after a crash it holds the old
//! epoch or the new one, never a torn line.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::VolumeError;
use crate::api::{ErrorKind, VolumeLease};
use crate::client::{Client, ClientError};
use crate::sys::durable;
use crate::sys::worker::{Pacing, State, Status, Worker};

/// The note's file name in the state folder.
const NOTE: &str = "lease";

/// Renewals are never closer together than this, whatever the TTL.
const MIN_RENEWAL: Duration = Duration::from_millis(200);

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
pub(super) async fn acquire(
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
pub(super) async fn release(
    client: &Client,
    dir: &Path,
    volume: &str,
    epoch: u64,
) -> Result<(), VolumeError> {
    client.release_lease(volume, epoch).await?;
    remove_note(dir).map_err(|source| VolumeError::Io { path: note_path(dir), source })
}

/// How [`Renewal`] renews: the directory in production, a script in tests.
pub(super) trait Renew: Send + 'static {
    fn renew(&self, volume: &str, epoch: u64) -> impl Future<Output = Result<(), ClientError>> + Send;
}

impl Renew for Client {
    async fn renew(&self, volume: &str, epoch: u64) -> Result<(), ClientError> {
        self.renew_lease(volume, epoch).await.map(drop)
    }
}

/// Called once with the reason when the lease turns out to be lost.
pub(super) type OnFenced = Box<dyn FnOnce(String) + Send>;

/// The worker that keeps the lease: it renews every third of the TTL
/// (counted from the end of the previous attempt), so two renewals can
/// fail before the lease lapses. A failed renewal is counted by the runner
/// and retried at the same cadence (its [`Renewal::pacing`]); a `Fenced`
/// answer means another holder has the volume now, so the worker fences
/// the volume and is done.
pub(super) struct Renewal<R> {
    renew: R,
    volume: String,
    epoch: u64,
    every: Duration,
    renewed: u64,
    on_fenced: Option<OnFenced>,
}

impl<R: Renew> Renewal<R> {
    /// Renews the lease `epoch` on `volume`, granted with a time to live of
    /// `ttl`, first after `ttl / 3`.
    pub(super) fn new(renew: R, volume: &str, epoch: u64, ttl: Duration, on_fenced: OnFenced) -> Self {
        let every = (ttl / 3).max(MIN_RENEWAL);
        Self { renew, volume: volume.into(), epoch, every, renewed: 0, on_fenced: Some(on_fenced) }
    }

    /// The runner retries a failed renewal after the same period, not
    /// sooner (the directory is likely down or partitioned away) nor later
    /// (the lease would lapse).
    pub(super) fn pacing(&self) -> Pacing {
        Pacing { tranquility: 0, backoff: self.every, max_backoff: self.every }
    }
}

impl<R: Renew> Worker for Renewal<R> {
    type Error = String;

    fn name(&self) -> String {
        format!("lease {}", self.volume)
    }

    fn status(&self) -> Status {
        Status {
            queue: None,
            progress: Some(format!("epoch {}, renewed {} times", self.epoch, self.renewed)),
        }
    }

    fn initial_state(&self) -> State {
        // The lease was just granted.
        State::Idle
    }

    async fn work(&mut self, _stop: &CancellationToken) -> Result<State, String> {
        match self.renew.renew(&self.volume, self.epoch).await {
            Ok(()) => {
                self.renewed += 1;
                Ok(State::Idle)
            }
            Err(e) if e.kind() == Some(ErrorKind::Fenced) => {
                if let Some(fence) = self.on_fenced.take() {
                    fence(e.to_string());
                }
                Ok(State::Done)
            }
            Err(e) => Err(format!("renewing the lease on volume {}: {e}", self.volume)),
        }
    }

    async fn wait_for_work(&mut self) -> State {
        tokio::time::sleep(self.every).await;
        State::Busy
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Mutex};

    use tokio::time::Instant;

    use super::*;
    use crate::api::Remote;
    use crate::sys::worker::Runner;

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

    /// Answers renewals from a script (then `Ok`), recording when each came.
    #[derive(Clone, Default)]
    struct Scripted {
        answers: Arc<Mutex<VecDeque<Option<ErrorKind>>>>,
        calls: Arc<Mutex<Vec<Duration>>>,
        start: Option<Instant>,
    }

    impl Renew for Scripted {
        async fn renew(&self, volume: &str, epoch: u64) -> Result<(), ClientError> {
            assert_eq!((volume, epoch), ("disk", 5));
            self.calls.lock().unwrap().push(self.start.unwrap().elapsed());
            match self.answers.lock().unwrap().pop_front().flatten() {
                None => Ok(()),
                Some(kind) => {
                    Err(ClientError::Directory(Remote::new(kind, format!("{kind:?} by the script"))))
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renews_every_third_of_the_ttl_through_failures_until_fenced() {
        let script = Scripted { start: Some(Instant::now()), ..Scripted::default() };
        script.answers.lock().unwrap().extend([
            None,
            Some(ErrorKind::Unavailable),
            Some(ErrorKind::Unavailable),
            None,
            Some(ErrorKind::Fenced),
        ]);
        let fenced = Arc::new(Mutex::new(None));
        let on_fenced: OnFenced = {
            let fenced = fenced.clone();
            Box::new(move |why| *fenced.lock().unwrap() = Some(why))
        };
        let stop = CancellationToken::new();
        let runner = Runner::new(stop.clone());
        let renewal = Renewal::new(script.clone(), "disk", 5, Duration::from_secs(3), on_fenced);
        let pacing = renewal.pacing();
        runner.spawn_paced(renewal, pacing);

        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(*script.calls.lock().unwrap(), [Duration::from_secs(1), Duration::from_secs(2)]);
        let info = &runner.list()[0];
        assert_eq!((info.name.as_str(), info.errors, info.consecutive_errors), ("lease disk", 1, 1));
        assert!(info.last_error.as_deref().unwrap().starts_with("renewing the lease on volume disk: "));

        runner.join().await;
        // Failures do not hurry or delay the next renewal; the fenced
        // answer ends the worker, and the volume learns why.
        let secs: Vec<u64> = script.calls.lock().unwrap().iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, [1, 2, 3, 4, 5]);
        assert_eq!(fenced.lock().unwrap().as_deref(), Some("Fenced by the script"));
        let info = &runner.list()[0];
        assert_eq!((info.state.as_str(), info.errors, info.consecutive_errors), ("done", 2, 0));
        assert_eq!(info.progress.as_deref(), Some("epoch 5, renewed 2 times"));
    }
}
