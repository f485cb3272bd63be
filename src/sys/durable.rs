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
//! new, never a mix; a stale temporary file is removed by the next write.
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

fn temporary_name(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a file name", path.display()))
    })?;
    let mut tmp = name.to_os_string();
    tmp.push(".tmp");
    Ok(path.with_file_name(tmp))
}

fn write_temporary(path: &Path, bytes: &[u8], mode: u32) -> io::Result<PathBuf> {
    let tmp = temporary_name(path)?;
    // Left by a crash between steps 1 and 3: never part of the target.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
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
    fn a_stale_temporary_from_a_crash_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trim");
        std::fs::write(dir.path().join("trim.tmp"), b"half-written").unwrap();
        replace(&path, b"whole", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole");
        assert!(!dir.path().join("trim.tmp").exists());
    }
}
