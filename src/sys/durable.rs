//! The one durable write: every small file that must survive a crash whole
//! (credentials, the CA, key files, the attach's lease note, the log's trim
//! point, the cache table's header) goes through here.
//!
//! The sequence, written once (as Garage's and redb's are):
//!
//! 1. write the bytes to a temporary file beside the target (same folder, so
//!    the rename cannot cross filesystems), with the target's mode;
//! 2. `fsync` the temporary file, so its data is on disk before its name is;
//! 3. rename it over the target ([`replace`]) or link it to a name that must
//!    not exist yet ([`create_new`], which never overwrites);
//! 4. `fsync` the folder, so the new name itself survives a crash.
//!
//! After a crash at any step the target holds its old content or all of the
//! new, never a mix; a crashed writer's temporary file is removed by the
//! next write of the same target. Concurrent writers of one target each use
//! their own temporary file: with `replace` the last rename wins whole, with
//! `create_new` exactly one succeeds.
//!
//! ```
//! # let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("note");
//! meshdisk::sys::durable::replace(&path, b"epoch 7", 0o600).unwrap();
//! meshdisk::sys::durable::replace(&path, b"epoch 8", 0o600).unwrap();
//! assert_eq!(std::fs::read(&path).unwrap(), b"epoch 8");
//! assert!(meshdisk::sys::durable::create_new(&path, b"x", 0o600).is_err());
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `bytes` to `path`, replacing what was there atomically.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = write_temporary(path, bytes, mode)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path)
}

/// Writes `bytes` to `path`, which must not exist: `AlreadyExists` if it
/// does, and then the existing file is left untouched.
pub fn create_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = write_temporary(path, bytes, mode)?;
    // A hard link fails if the name exists, so a concurrent creator or an
    // existing file is never overwritten (rename would replace it).
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked?;
    sync_parent(path)
}

/// `fsync`s a folder, so the names created, renamed or removed in it
/// survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

/// Temporary files are `.<name>.<pid>.<n>.tmp`: one writer's own (opened
/// with `O_EXCL`), so two writers of one target never share or remove each
/// other's, and a crashed writer's is known by its process being gone.
fn temporary_name(path: &Path) -> io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = target_name(path)?;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Ok(path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id())))
}

fn target_name(path: &Path) -> io::Result<String> {
    path.file_name().and_then(|n| n.to_str()).map(str::to_owned).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a file name", path.display()))
    })
}

/// Removes temporary files of `path` left by writers that died between
/// writing and renaming (their process is gone): never part of the target.
fn remove_stale_temporaries(path: &Path) -> io::Result<()> {
    let name = target_name(path)?;
    let prefix = format!(".{name}.");
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(rest) =
            file.to_str().and_then(|f| f.strip_prefix(&prefix)).and_then(|f| f.strip_suffix(".tmp"))
        else {
            continue;
        };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if !process_alive(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only asks whether the
    // process exists (EPERM: it does, owned by someone else).
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn write_temporary(path: &Path, bytes: &[u8], mode: u32) -> io::Result<PathBuf> {
    remove_stale_temporaries(path)?;
    let tmp = temporary_name(path)?;
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replace_and_create_new_leave_a_whole_file_with_its_mode_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.cred");
        create_new(&path, b"first", 0o600).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let err = create_new(&path, b"second", 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        replace(&path, b"third", 0o644).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"third");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("identity.cred")]);
    }

    #[test]
    fn a_crashed_writers_temporary_is_removed_and_a_live_ones_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trim");
        // pid 0x7fffffff is never a process; our own pid is alive.
        let dead = dir.path().join(".trim.2147483647.0.tmp");
        let live = dir.path().join(format!(".trim.{}.999999.tmp", std::process::id()));
        std::fs::write(&dead, b"half-written").unwrap();
        std::fs::write(&live, b"being written").unwrap();
        replace(&path, b"whole", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole");
        assert!(!dead.exists());
        assert!(live.exists());
    }

    #[test]
    fn concurrent_creators_of_one_name_one_wins_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volume.key");
        let wins: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8u8)
                .map(|i| {
                    let path = path.clone();
                    s.spawn(move || create_new(&path, &[i; 4096], 0o600).is_ok())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(wins.iter().filter(|w| **w).count(), 1);
        let winner = wins.iter().position(|w| *w).unwrap() as u8;
        assert_eq!(std::fs::read(&path).unwrap(), vec![winner; 4096]);
        let names = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(names, 1, "temporary files left behind");
    }
}
