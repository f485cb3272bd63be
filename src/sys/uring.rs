//! The one io_uring driver of the process. The file backend, the volume's
//! local log and block cache, and the peer's shard store share it.
//!
//! One thread owns the ring. Callers on any thread (tokio tasks or plain
//! threads) send it operations over a channel and await a oneshot reply.
//! Buffers are owned: a read takes a `Vec<u8>` and gives it back filled, a
//! write takes `Bytes` and gives them back, so no buffer can be freed or
//! moved while the kernel holds a pointer into it.
//!
//! Hygiene, after Firecracker's io_uring module:
//! - files are registered in a sparse fixed-file table and every operation
//!   names its file by slot ([`RegisteredFile`]), never by raw fd;
//! - the ring is created disabled and restricted to the opcodes we use
//!   (read, write, fsync, fallocate) and to file-table updates, then enabled;
//! - per-operation state lives in a slab indexed by `user_data`.
//!
//! Drop order: when the last [`Uring`] handle goes, the driver thread stops
//! taking work, waits for every operation already in the kernel to
//! complete (their buffers stay alive in the slab until then), and only
//! then drops the ring.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use meshdisk::sys::uring::Uring;
//! let ring = Uring::new(256)?;
//! let file = ring.register(std::fs::File::open("/etc/hostname")?)?;
//! let data = ring.read_exact_at(&file, 0, 4).await?;
//! assert_eq!(data.len(), 4);
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use io_uring::{IoUring, cqueue, opcode, register::Restriction, squeue, types};
use tokio::sync::oneshot;

/// Fixed-file slots; slot 0 is the driver's own wake-up eventfd.
const FILE_SLOTS: u32 = 1024;
const WAKE_SLOT: u32 = 0;
const WAKE_TOKEN: u64 = u64::MAX;
/// `IORING_REGISTER_FILES_UPDATE` from `linux/io_uring.h`.
const REGISTER_FILES_UPDATE: u8 = 6;

/// Handle to the driver thread. Cheap to clone.
#[derive(Clone)]
pub struct Uring {
    shared: Arc<Shared>,
}

struct Shared {
    tx: Sender<Msg>,
    wake: Arc<OwnedFd>,
    /// Set by the driver just before it blocks; a submitter that flips it
    /// back writes the eventfd, so an idle driver costs no syscalls to wake
    /// only when it is actually asleep.
    sleeping: Arc<AtomicBool>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Shutdown);
        wake(&self.wake);
    }
}

fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

enum Msg {
    Op(Op, oneshot::Sender<(i32, Buf)>),
    Register(OwnedFd, std::sync::mpsc::SyncSender<io::Result<u32>>),
    Unregister(u32),
    Shutdown,
}

enum Op {
    Read { slot: u32, offset: u64, buf: Vec<u8> },
    Write { slot: u32, offset: u64, buf: Bytes, rw_flags: i32 },
    Fsync { slot: u32, datasync: bool },
    Fallocate { slot: u32, offset: u64, len: u64, mode: i32 },
}

/// Reads into `buf` (empty, with room for `len`) what the page cache
/// holds of `offset..offset + len`, without waiting for the disk: stops at
/// the first byte not cached, at the end of the file, or at any error (the
/// ring's read then reports it).
fn read_cached(fd: &OwnedFd, offset: u64, buf: &mut Vec<u8>, len: usize) {
    while buf.len() < len {
        let have = buf.len();
        let spare = buf.spare_capacity_mut();
        let iov = libc::iovec { iov_base: spare.as_mut_ptr().cast(), iov_len: (len - have).min(spare.len()) };
        let Ok(at) = libc::off_t::try_from(offset + have as u64) else { return };
        // SAFETY: one iovec over `buf`'s spare capacity, which the kernel
        // fills with at most `len - have` bytes.
        let n = unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        if n <= 0 {
            return;
        }
        // SAFETY: the kernel initialised `n` more bytes.
        unsafe { buf.set_len(have + n as usize) };
    }
}

/// A buffer owned by an operation while the kernel may touch it.
enum Buf {
    None,
    Vec(Vec<u8>),
    /// Never read: held only so the kernel's pointer stays valid.
    Bytes(#[allow(dead_code)] Bytes),
}

/// A file in the ring's fixed-file table. Unregistered on drop.
pub struct RegisteredFile {
    slot: u32,
    ring: Uring,
    /// A descriptor of the same file for reads the page cache answers at
    /// once ([`Uring::read_exact_at`]); `None` if it could not be made or
    /// the process holds [`CACHED_FDS_MAX`] of them already.
    cached: Option<OwnedFd>,
}

/// Second descriptors kept at most in the process: registered files use
/// none of their own (the ring holds them), so a peer with many data
/// files must not run out of descriptors because of this fast path.
const CACHED_FDS_MAX: usize = 256;
static CACHED_FDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Reads up to this size try the page cache first; larger ones (whole
/// shards, log records of MiBs) go to the ring, off the async threads.
const CACHED_READ_MAX: usize = 128 << 10;

impl Drop for RegisteredFile {
    fn drop(&mut self) {
        if self.cached.take().is_some() {
            CACHED_FDS.fetch_sub(1, Ordering::Relaxed);
        }
        self.ring.send(Msg::Unregister(self.slot));
    }
}

impl RegisteredFile {
    /// Writes all of `buf` at `offset`, blocking the calling thread, which
    /// must be one that may block (a blocking-pool thread, never an async
    /// task). With the file's second descriptor it is a plain `pwrite` on
    /// this thread, without the two hand-offs to and from the driver; the
    /// ring does it otherwise.
    pub fn write_all_at_blocking(&self, offset: u64, buf: &Bytes) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let n = match &self.cached {
                Some(fd) => {
                    let at = libc::off_t::try_from(at)
                        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
                    let rest = &buf[done..];
                    // SAFETY: writes from a live slice of `rest.len()` bytes.
                    let n = unsafe { libc::pwrite(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len(), at) };
                    if n < 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        return Err(e);
                    }
                    n as usize
                }
                None => {
                    let op = Op::Write { slot: self.slot, offset: at, buf: buf.slice(done..), rw_flags: 0 };
                    result(self.ring.submit_blocking(op).0)? as usize
                }
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n;
        }
        Ok(())
    }

    /// `fdatasync` (`datasync`) or `fsync` of the file, blocking the calling
    /// thread as [`Self::write_all_at_blocking`] does: on this thread with
    /// the second descriptor (a sync covers the file, whichever descriptor
    /// names it), through the ring otherwise.
    pub fn sync_blocking(&self, datasync: bool) -> io::Result<()> {
        match &self.cached {
            Some(fd) => loop {
                // SAFETY: plain syscalls on a descriptor we own.
                let r = unsafe {
                    if datasync { libc::fdatasync(fd.as_raw_fd()) } else { libc::fsync(fd.as_raw_fd()) }
                };
                if r == 0 {
                    return Ok(());
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            },
            None => result(self.ring.submit_blocking(Op::Fsync { slot: self.slot, datasync }).0).map(drop),
        }
    }
}

impl Uring {
    /// Starts the driver thread with a ring of `entries` submission slots.
    pub fn new(entries: u32) -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor that nothing else owns.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let ring = build_ring(entries, &wake)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let sleeping = Arc::new(AtomicBool::new(false));
        let driver = Driver {
            ring,
            rx,
            sleeping: sleeping.clone(),
            slab: Vec::new(),
            free: Vec::new(),
            backlog: VecDeque::new(),
            free_slots: (1..FILE_SLOTS).rev().collect(),
            in_flight: 0,
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            _wake: wake.clone(),
        };
        std::thread::Builder::new().name("meshdisk-uring".into()).spawn(move || driver.run())?;
        Ok(Self { shared: Arc::new(Shared { tx, wake, sleeping }) })
    }

    fn send(&self, msg: Msg) {
        if self.shared.tx.send(msg).is_ok() && self.shared.sleeping.swap(false, Ordering::SeqCst) {
            wake(&self.shared.wake);
        }
    }

    async fn submit(&self, op: Op) -> (i32, Buf) {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Op(op, tx));
        rx.await.unwrap_or((-libc::ECANCELED, Buf::None))
    }

    /// [`Self::submit`] for a thread that may block (never an async task).
    fn submit_blocking(&self, op: Op) -> (i32, Buf) {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Op(op, tx));
        rx.blocking_recv().unwrap_or((-libc::ECANCELED, Buf::None))
    }

    /// Puts `file` in the fixed-file table. Blocks briefly (one syscall on
    /// the driver thread), so it may be called from async code at startup.
    pub fn register(&self, file: File) -> io::Result<RegisteredFile> {
        let cached = (CACHED_FDS.fetch_add(1, Ordering::Relaxed) < CACHED_FDS_MAX)
            .then(|| file.try_clone().ok().map(OwnedFd::from))
            .flatten();
        if cached.is_none() {
            CACHED_FDS.fetch_sub(1, Ordering::Relaxed);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.send(Msg::Register(file.into(), tx));
        let slot = rx.recv().map_err(|_| io::Error::other("io_uring driver has stopped"))??;
        Ok(RegisteredFile { slot, ring: self.clone(), cached })
    }

    /// Reads into `buf`'s spare capacity at `offset`; returns bytes read
    /// (0 at end of file) and the buffer, its length grown by that much.
    pub async fn read_at(
        &self,
        file: &RegisteredFile,
        offset: u64,
        buf: Vec<u8>,
    ) -> (io::Result<usize>, Vec<u8>) {
        let (res, buf) = self.submit(Op::Read { slot: file.slot, offset, buf }).await;
        match buf {
            Buf::Vec(v) => (result(res).map(|n| n as usize), v),
            _ => (Err(io::Error::from_raw_os_error(-res)), Vec::new()),
        }
    }

    /// Reads exactly `len` bytes; bytes past the end of the file read as zeroes.
    ///
    /// For a small read (up to 128 KiB), what the page cache holds is
    /// copied at once on the caller's thread (`preadv2` with `RWF_NOWAIT`,
    /// which returns at the first page not cached rather than wait for its
    /// I/O); only the rest goes through the ring. A small read of cached
    /// bytes (a peer serving one block, a block cache hit) then costs a
    /// copy instead of two thread hand-offs.
    pub async fn read_exact_at(&self, file: &RegisteredFile, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(len);
        if let Some(fd) = file.cached.as_ref().filter(|_| len <= CACHED_READ_MAX) {
            read_cached(fd, offset, &mut buf, len);
        }
        while buf.len() < len {
            let before = buf.len();
            let (res, b) = self.read_at(file, offset + before as u64, buf).await;
            buf = b;
            if res? == 0 {
                buf.resize(len, 0);
            }
        }
        Ok(buf)
    }

    /// One write; returns the bytes written. `rw_flags` are `RWF_*` flags.
    pub async fn write_at(
        &self,
        file: &RegisteredFile,
        offset: u64,
        buf: Bytes,
        rw_flags: i32,
    ) -> io::Result<usize> {
        let (res, _) = self.submit(Op::Write { slot: file.slot, offset, buf, rw_flags }).await;
        result(res).map(|n| n as usize)
    }

    /// Writes all of `buf`, resubmitting after short writes.
    pub async fn write_all_at(
        &self,
        file: &RegisteredFile,
        offset: u64,
        mut buf: Bytes,
        rw_flags: i32,
    ) -> io::Result<()> {
        let mut pos = offset;
        while !buf.is_empty() {
            let n = self.write_at(file, pos, buf.clone(), rw_flags).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = buf.slice(n..);
            pos += n as u64;
        }
        Ok(())
    }

    pub async fn fsync(&self, file: &RegisteredFile, datasync: bool) -> io::Result<()> {
        let (res, _) = self.submit(Op::Fsync { slot: file.slot, datasync }).await;
        result(res).map(drop)
    }

    /// `fallocate(2)` with `mode` (`FALLOC_FL_*`).
    pub async fn fallocate(&self, file: &RegisteredFile, offset: u64, len: u64, mode: i32) -> io::Result<()> {
        let (res, _) = self.submit(Op::Fallocate { slot: file.slot, offset, len, mode }).await;
        result(res).map(drop)
    }
}

fn result(res: i32) -> io::Result<u32> {
    if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as u32) }
}

fn build_ring(entries: u32, wake: &OwnedFd) -> io::Result<IoUring> {
    let ring = IoUring::builder().setup_r_disabled().build(entries)?;
    let sub = ring.submitter();
    sub.register_files_sparse(FILE_SLOTS)?;
    sub.register_files_update(WAKE_SLOT, &[wake.as_raw_fd()])?;
    let mut allow = [
        Restriction::sqe_op(opcode::Read::CODE),
        Restriction::sqe_op(opcode::Write::CODE),
        Restriction::sqe_op(opcode::Fsync::CODE),
        Restriction::sqe_op(opcode::Fallocate::CODE),
        Restriction::register_op(REGISTER_FILES_UPDATE),
        // Every operation names its file by fixed slot.
        Restriction::sqe_flags_allowed(squeue::Flags::FIXED_FILE.bits()),
    ];
    sub.register_restrictions(&mut allow)?;
    sub.register_enable_rings()?;
    Ok(ring)
}

struct InFlight {
    buf: Buf,
    reply: oneshot::Sender<(i32, Buf)>,
}

struct Driver {
    ring: IoUring,
    rx: Receiver<Msg>,
    sleeping: Arc<AtomicBool>,
    slab: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Operations received while the submission queue was full.
    backlog: VecDeque<(Op, oneshot::Sender<(i32, Buf)>)>,
    free_slots: Vec<u32>,
    /// Operations in the kernel, not counting the wake read.
    in_flight: usize,
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    _wake: Arc<OwnedFd>,
}

impl Driver {
    fn run(mut self) {
        self.arm_wake();
        let mut stopping = false;
        loop {
            loop {
                match self.rx.try_recv() {
                    Ok(Msg::Op(op, reply)) => self.backlog.push_back((op, reply)),
                    Ok(Msg::Register(fd, reply)) => {
                        let _ = reply.send(self.register(fd));
                    }
                    Ok(Msg::Unregister(slot)) => {
                        if self.ring.submitter().register_files_update(slot, &[-1]).is_ok() {
                            self.free_slots.push(slot);
                        }
                    }
                    Ok(Msg::Shutdown) | Err(TryRecvError::Disconnected) => stopping = true,
                    Err(TryRecvError::Empty) => break,
                }
            }
            while let Some((op, reply)) = self.backlog.pop_front() {
                if let Err((op, reply)) = self.push(op, reply) {
                    self.backlog.push_front((op, reply));
                    break;
                }
            }
            if stopping && self.in_flight == 0 && self.backlog.is_empty() {
                // Complete our own wake read before the ring (and the
                // buffer it writes to) goes away.
                while self.wake_armed {
                    wake(&self._wake);
                    let _ = self.ring.submit_and_wait(1);
                    for cqe in self.ring.completion() {
                        if cqe.user_data() == WAKE_TOKEN {
                            self.wake_armed = false;
                        }
                    }
                }
                return;
            }
            self.sleeping.store(true, Ordering::SeqCst);
            let want = if self.rx.is_empty() { 1 } else { 0 };
            if want == 0 {
                self.sleeping.store(false, Ordering::SeqCst);
            }
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    tracing::error!("io_uring submit failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            self.sleeping.store(false, Ordering::SeqCst);
            self.reap();
        }
    }

    fn register(&mut self, fd: OwnedFd) -> io::Result<u32> {
        let slot =
            self.free_slots.pop().ok_or_else(|| io::Error::other("io_uring fixed-file table is full"))?;
        // The kernel takes its own reference to the file; ours can close.
        if let Err(e) = self.ring.submitter().register_files_update(slot, &[fd.as_raw_fd()]) {
            self.free_slots.push(slot);
            return Err(e);
        }
        Ok(slot)
    }

    fn arm_wake(&mut self) {
        let sqe = opcode::Read::new(types::Fixed(WAKE_SLOT), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE_TOKEN);
        self.wake_armed = true;
        // SAFETY: `wake_buf` is owned by the driver, which never returns
        // while the wake read is in flight (see `run`).
        unsafe { self.push_sqe(&sqe) };
    }

    /// Queues `sqe`, submitting first if the queue is full.
    ///
    /// # Safety
    /// Every buffer the entry points to must outlive its completion.
    unsafe fn push_sqe(&mut self, sqe: &squeue::Entry) {
        loop {
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return;
            }
            let _ = self.ring.submit();
        }
    }

    fn push(
        &mut self,
        op: Op,
        reply: oneshot::Sender<(i32, Buf)>,
    ) -> Result<(), (Op, oneshot::Sender<(i32, Buf)>)> {
        if self.ring.submission().is_full() {
            let _ = self.ring.submit();
            if self.ring.submission().is_full() {
                return Err((op, reply));
            }
        }
        let idx = self.free.pop().unwrap_or_else(|| {
            self.slab.push(None);
            self.slab.len() - 1
        });
        let (sqe, buf) = match op {
            Op::Read { slot, offset, mut buf } => {
                let spare = buf.spare_capacity_mut();
                let len = spare.len().min(u32::MAX as usize) as u32;
                let ptr = spare.as_mut_ptr().cast::<u8>();
                (opcode::Read::new(types::Fixed(slot), ptr, len).offset(offset).build(), Buf::Vec(buf))
            }
            Op::Write { slot, offset, buf, rw_flags } => {
                let len = buf.len().min(u32::MAX as usize) as u32;
                let sqe = opcode::Write::new(types::Fixed(slot), buf.as_ptr(), len)
                    .offset(offset)
                    .rw_flags(rw_flags)
                    .build();
                (sqe, Buf::Bytes(buf))
            }
            Op::Fsync { slot, datasync } => {
                let flags = if datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
                (opcode::Fsync::new(types::Fixed(slot)).flags(flags).build(), Buf::None)
            }
            Op::Fallocate { slot, offset, len, mode } => {
                (opcode::Fallocate::new(types::Fixed(slot), len).offset(offset).mode(mode).build(), Buf::None)
            }
        };
        self.slab[idx] = Some(InFlight { buf, reply });
        self.in_flight += 1;
        // SAFETY: the buffer (a heap allocation that moving `Buf` does not
        // move) is kept in the slab until this entry's completion is reaped.
        unsafe { self.push_sqe(&sqe.user_data(idx as u64)) };
        Ok(())
    }

    fn reap(&mut self) {
        let completions: Vec<cqueue::Entry> = self.ring.completion().collect();
        for cqe in completions {
            if cqe.user_data() == WAKE_TOKEN {
                self.wake_armed = false;
                self.arm_wake();
                continue;
            }
            let idx = cqe.user_data() as usize;
            let Some(done) = self.slab[idx].take() else {
                continue;
            };
            self.free.push(idx);
            self.in_flight -= 1;
            let buf = match done.buf {
                Buf::Vec(mut v) => {
                    if cqe.result() > 0 {
                        // SAFETY: the kernel initialised `result` bytes of
                        // the spare capacity handed to it.
                        unsafe { v.set_len(v.len() + cqe.result() as usize) };
                    }
                    Buf::Vec(v)
                }
                other => other,
            };
            let _ = done.reply.send((cqe.result(), buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;

    use super::{Uring, read_cached};

    /// Drops the file's clean pages from the page cache (after a sync).
    fn uncache(file: &std::fs::File, offset: i64, len: i64) {
        file.sync_all().unwrap();
        // SAFETY: plain syscall on a descriptor we own.
        let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
    }

    /// Reads give the file's bytes whether the page cache holds all of the
    /// range, none of it, or only its start, and zeroes past the end.
    #[tokio::test]
    async fn reads_are_exact_cached_uncached_and_half_cached() {
        // On the disk (not a tmpfs /tmp, where dropping cached pages does
        // nothing), so both paths are taken.
        let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&target).unwrap();
        let dir = tempfile::tempdir_in(&target).unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..5 * 4096 + 100).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::File::create(&path).unwrap().write_all(&bytes).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let ring = Uring::new(8).unwrap();
        let reg = ring.register(file.try_clone().unwrap()).unwrap();

        // Cached (just written).
        assert_eq!(ring.read_exact_at(&reg, 0, bytes.len()).await.unwrap(), bytes);
        assert_eq!(ring.read_exact_at(&reg, 4000, 300).await.unwrap(), bytes[4000..4300]);
        // The fast path itself: all of it while cached, nothing once dropped.
        let fd = std::os::fd::OwnedFd::from(file.try_clone().unwrap());
        let mut direct = Vec::with_capacity(3 * 4096);
        read_cached(&fd, 4096, &mut direct, 3 * 4096);
        assert_eq!(direct, bytes[4096..4 * 4096], "cached bytes are copied at once");
        // Not cached.
        uncache(&file, 0, 0);
        let mut none = Vec::with_capacity(4096);
        read_cached(&fd, 4096, &mut none, 4096);
        assert!(none.is_empty(), "a page not cached is left to the ring");
        assert_eq!(ring.read_exact_at(&reg, 4096, 2 * 4096).await.unwrap(), bytes[4096..3 * 4096]);
        // Only the start cached: page 0 read back in, the rest dropped.
        uncache(&file, 0, 0);
        assert_eq!(ring.read_exact_at(&reg, 0, 4096).await.unwrap(), bytes[..4096]);
        uncache(&file, 4096, 0);
        assert_eq!(ring.read_exact_at(&reg, 10, 3 * 4096).await.unwrap(), bytes[10..10 + 3 * 4096]);
        // Past the end: zeroes.
        let tail = ring.read_exact_at(&reg, bytes.len() as u64 - 50, 200).await.unwrap();
        assert_eq!(tail[..50], bytes[bytes.len() - 50..]);
        assert!(tail[50..].iter().all(|&b| b == 0));
        assert_eq!(tail.len(), 200);
    }

    /// Blocking writes and syncs land the same bytes with the file's second
    /// descriptor (a plain `pwrite` on the caller's thread) and without it
    /// (through the ring).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_writes_and_syncs_with_and_without_a_second_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let ring = Uring::new(8).unwrap();
        let with = ring.register(file.try_clone().unwrap()).unwrap();
        assert!(with.cached.is_some(), "a test process has descriptors to spare");
        let mut without = ring.register(file).unwrap();
        if without.cached.take().is_some() {
            super::CACHED_FDS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        let a = bytes::Bytes::from((0..70_000u32).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
        let b = bytes::Bytes::from(vec![0xB5u8; 5000]);
        let (a2, b2) = (a.clone(), b.clone());
        tokio::task::spawn_blocking(move || {
            with.write_all_at_blocking(100, &a2).unwrap();
            with.sync_blocking(true).unwrap();
            without.write_all_at_blocking(100 + a2.len() as u64, &b2).unwrap();
            without.sync_blocking(true).unwrap();
            without.sync_blocking(false).unwrap();
        })
        .await
        .unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), 100 + a.len() + b.len());
        assert!(got[..100].iter().all(|&x| x == 0));
        assert_eq!(got[100..100 + a.len()], a[..]);
        assert_eq!(got[100 + a.len()..], b[..]);
    }
}
