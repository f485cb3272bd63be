//! An export backed by a regular file or a block device, through the
//! process's io_uring driver.
//!
//! - READ and WRITE are io_uring reads and writes; FUA is `RWF_DSYNC` on the
//!   write itself, FLUSH is `fdatasync`.
//! - TRIM punches a hole (`FALLOC_FL_PUNCH_HOLE`); where the filesystem
//!   cannot, TRIM does nothing, which the protocol allows.
//! - WRITE_ZEROES punches a hole, or zeroes the range in place when the
//!   client sent NO_HOLE (`FALLOC_FL_ZERO_RANGE`), and falls back to
//!   writing zeroes; with FAST_ZERO the fallback is refused instead.
//! - BLOCK_STATUS walks `SEEK_DATA` / `SEEK_HOLE`.
//!
//! After a failed write or flush the backend is poisoned: the page cache
//! may have dropped the data, so every later request fails rather than
//! pretend the file is intact.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::OnceLock;

use bytes::Bytes;

use super::{Backend, Error, Extent, Features, ReadData, Result, ZeroFlags, push_extent};
use crate::sys::uring::{RegisteredFile, Uring};

const MAX_EXTENTS: usize = 4096;
/// Zeroes written per request when no faster way to zero exists.
const ZERO_WRITE: usize = 1 << 20;
static ZEROES: [u8; ZERO_WRITE] = [0; ZERO_WRITE];

pub struct FileBackend {
    ring: Uring,
    file: RegisteredFile,
    /// Kept for the synchronous calls io_uring has no opcode for here
    /// (`lseek`, `posix_fadvise`).
    raw: File,
    size: u64,
    read_only: bool,
    poisoned: OnceLock<String>,
}

impl FileBackend {
    /// Opens `path`. With `size`, a missing file is created and a shorter
    /// one extended (sparsely); without, the file's own size is used.
    pub fn open(ring: &Uring, path: &Path, size: Option<u64>, read_only: bool) -> io::Result<Self> {
        let raw = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .create(size.is_some() && !read_only)
            .truncate(false)
            .open(path)
            .map_err(|e| annotate(e, &format!("open {}", path.display())))?;
        let meta = raw.metadata()?;
        let current = if meta.file_type().is_block_device() {
            // SAFETY: lseek on a descriptor we own; the result is checked.
            let end = unsafe { libc::lseek(raw.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(io::Error::last_os_error());
            }
            end as u64
        } else {
            meta.len()
        };
        let size = match size {
            Some(want) if want > current => {
                if read_only || meta.file_type().is_block_device() {
                    return Err(io::Error::other(format!(
                        "{} holds {current} bytes, less than the {want} asked for",
                        path.display()
                    )));
                }
                raw.set_len(want)?;
                want
            }
            Some(want) => want,
            None => current,
        };
        if size == 0 {
            return Err(io::Error::other(format!(
                "{} is empty: give a size to create or extend it",
                path.display()
            )));
        }
        let file = ring.register(raw.try_clone()?)?;
        Ok(Self { ring: ring.clone(), file, raw, size, read_only, poisoned: OnceLock::new() })
    }

    fn check(&self, op: &'static str) -> Result<()> {
        match self.poisoned.get() {
            Some(cause) => Err(Error::Poisoned { op, cause: cause.clone() }),
            None => Ok(()),
        }
    }

    /// Records an error that leaves the file's contents in doubt.
    fn poison(&self, err: Error) -> Error {
        let _ = self.poisoned.set(err.to_string());
        tracing::error!("file backend poisoned: {err}");
        err
    }

    async fn datasync(&self, op: &'static str, offset: u64, length: u64) -> Result<()> {
        self.ring.fsync(&self.file, true).await.map_err(|e| self.poison(Error::io(op, offset, length, e)))
    }

    async fn write_zero_bytes(&self, offset: u64, length: u64, fua: bool) -> Result<()> {
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            let n = (end - pos).min(ZERO_WRITE as u64) as usize;
            self.ring
                .write_all_at(&self.file, pos, Bytes::from_static(&ZEROES[..n]), 0)
                .await
                .map_err(|e| self.poison(Error::io("write zeroes", pos, n as u64, e)))?;
            pos += n as u64;
        }
        if fua { self.datasync("write zeroes", offset, length).await } else { Ok(()) }
    }

    fn seek(&self, pos: u64, whence: i32) -> io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own; the result is checked.
        let r = unsafe { libc::lseek(self.raw.as_raw_fd(), pos as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) }
    }
}

fn annotate(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
    )
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn features(&self) -> Features {
        Features::all(self.read_only)
    }

    async fn read(&self, offset: u64, length: u32) -> Result<ReadData> {
        self.check("read")?;
        let buf = self
            .ring
            .read_exact_at(&self.file, offset, length as usize)
            .await
            .map_err(|e| Error::io("read", offset, length.into(), e))?;
        Ok(ReadData::data(Bytes::from(buf)))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.check("write")?;
        if self.read_only {
            return Err(Error::ReadOnly { op: "write" });
        }
        let length = data.len() as u64;
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        self.ring
            .write_all_at(&self.file, offset, data, flags)
            .await
            .map_err(|e| self.poison(Error::io("write", offset, length, e)))
    }

    async fn flush(&self) -> Result<()> {
        self.check("flush")?;
        self.datasync("flush", 0, 0).await
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<()> {
        self.check("trim")?;
        if length == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.ring.fallocate(&self.file, offset, length.into(), mode).await {
            Ok(()) if fua => self.datasync("trim", offset, length.into()).await,
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => Ok(()),
            Err(e) => Err(Error::io("trim", offset, length.into(), e)),
        }
    }

    async fn write_zeroes(&self, offset: u64, length: u32, flags: ZeroFlags) -> Result<()> {
        self.check("write zeroes")?;
        if self.read_only {
            return Err(Error::ReadOnly { op: "write zeroes" });
        }
        if length == 0 {
            return Ok(());
        }
        let len = u64::from(length);
        let mut modes = Vec::with_capacity(2);
        if flags.may_trim {
            modes.push(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE);
        }
        modes.push(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE);
        for mode in modes {
            match self.ring.fallocate(&self.file, offset, len, mode).await {
                Ok(()) if flags.fua => return self.datasync("write zeroes", offset, len).await,
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => continue,
                Err(e) => return Err(Error::io("write zeroes", offset, len, e)),
            }
        }
        if flags.fast {
            return Err(Error::FastZeroUnsupported { offset });
        }
        self.write_zero_bytes(offset, len, flags.fua).await
    }

    async fn block_status(&self, offset: u64, length: u32) -> Result<Vec<Extent>> {
        self.check("block status")?;
        let end = offset + u64::from(length);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(d) => d,
                // Filesystems without SEEK_DATA: everything is data.
                Err(_) => Some(pos),
            };
            match data {
                None => {
                    push_extent(&mut out, end - pos, true);
                    break;
                }
                Some(d) if d > pos => {
                    push_extent(&mut out, d.min(end) - pos, true);
                    pos = d;
                }
                Some(_) => {
                    let hole = self.seek(pos, libc::SEEK_HOLE).ok().flatten().unwrap_or(end);
                    let next = hole.max(pos + 1).min(end);
                    push_extent(&mut out, next - pos, false);
                    pos = next;
                }
            }
            if out.len() >= MAX_EXTENTS {
                break;
            }
        }
        Ok(out)
    }

    async fn cache(&self, offset: u64, length: u32) -> Result<()> {
        self.check("cache")?;
        // SAFETY: advisory syscall on a descriptor we own.
        unsafe {
            libc::posix_fadvise(
                self.raw.as_raw_fd(),
                offset as libc::off_t,
                length as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        Ok(())
    }
}
