//! Filesystems on an export: `nbdfuse` exposes it as a file, the kernel
//! mounts that file through a loop device.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::{pattern, run};

/// `nbdfuse MOUNTPOINT/disk URI`, unmounted on drop.
pub struct Fuse {
    child: Child,
    dir: PathBuf,
}

impl Fuse {
    pub fn mount(dir: &Path, uri: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let pidfile = dir.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = Command::new("nbdfuse");
        cmd.arg("-P").arg(&pidfile).arg(dir.join("disk")).arg(uri);
        let child = super::spawn_tied(cmd).expect("spawn nbdfuse");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pidfile.exists() {
            assert!(Instant::now() < deadline, "nbdfuse did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, dir: dir.to_path_buf() }
    }

    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk")
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-u").arg(&self.dir).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Loop-mounted filesystem, unmounted on drop.
pub struct Mounted(pub PathBuf);

impl Mounted {
    pub fn new(image: &Path, at: &Path) -> Self {
        std::fs::create_dir_all(at).unwrap();
        run(Command::new("mount").args(["-o", "loop"]).arg(image).arg(at));
        Self(at.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A tree of files from 1 byte to 3 MiB, some in nested folders.
pub fn make_tree(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for i in 0..40u64 {
        let dir = root.join(format!("d{}/e{}", i % 4, i % 3));
        std::fs::create_dir_all(&dir).unwrap();
        let len = match i % 5 {
            0 => 1,
            1 => 4095,
            2 => 65537,
            3 => 1 << 20,
            _ => 3 << 20,
        } as usize;
        let rel = PathBuf::from(format!("d{}/e{}/f{i}.bin", i % 4, i % 3));
        let data = pattern(100 + i, len);
        std::fs::write(root.join(&rel), &data).unwrap();
        files.push((rel, data));
    }
    files
}

/// Makes a filesystem (`mkfs` and its options) on the export at `uri`
/// through nbdfuse under `dir`, copies `src` into it and syncs it.
pub fn fill_filesystem(dir: &Path, uri: &str, mkfs: &[&str], src: &Path) {
    let fuse = Fuse::mount(&dir.join("fuse"), uri);
    run(Command::new(mkfs[0]).env("PATH", super::system_path()).args(&mkfs[1..]).arg(fuse.disk()));
    let m = Mounted::new(&fuse.disk(), &dir.join("mnt"));
    run(Command::new("cp").arg("-a").arg(format!("{}/.", src.display())).arg(&m.0));
    run(Command::new("sync").arg("-f").arg(&m.0));
}

/// Checks the filesystem on the export at `uri` with `fsck` (it must be
/// clean), mounts it and compares every file of `files`.
pub fn check_filesystem(dir: &Path, uri: &str, fsck: &[&str], files: &[(PathBuf, Vec<u8>)]) {
    let fuse = Fuse::mount(&dir.join("fuse2"), uri);
    let out = Command::new(fsck[0])
        .env("PATH", super::system_path())
        .args(&fsck[1..])
        .arg(fuse.disk())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{fsck:?} found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let m = Mounted::new(&fuse.disk(), &dir.join("mnt2"));
    for (rel, data) in files {
        let got = std::fs::read(m.0.join(rel)).unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
        assert!(&got == data, "{} differs", rel.display());
    }
}
