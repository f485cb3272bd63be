//! A real filesystem on the export: `nbdfuse` exposes it as a file, the
//! kernel's ext4 and xfs drivers mount that file through a loop device, a
//! file tree goes in, and after unmounting, a server restart and a fresh
//! connection, fsck is clean and every file reads back identical.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{Served, have_tools, pattern, run, system_path};

/// `nbdfuse MOUNTPOINT/disk URI`, unmounted on drop.
struct Fuse {
    child: Child,
    dir: PathBuf,
}

impl Fuse {
    fn mount(dir: &Path, uri: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let pidfile = dir.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(dir.join("disk"))
            .arg(uri)
            .spawn()
            .expect("spawn nbdfuse");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pidfile.exists() {
            assert!(Instant::now() < deadline, "nbdfuse did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, dir: dir.to_path_buf() }
    }

    fn disk(&self) -> PathBuf {
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
struct Mounted(PathBuf);

impl Mounted {
    fn new(image: &Path, at: &Path) -> Self {
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
fn make_tree(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
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

fn filesystem_round_trip(mkfs: &[&str], fsck: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("backing.img").to_str().unwrap().to_string();
    let mut s = Served::start(&["--file", &image, "--size", "512M"]);
    let src = dir.path().join("src");
    let files = make_tree(&src);
    {
        let fuse = Fuse::mount(&dir.path().join("fuse"), &s.unix_uri);
        run(Command::new(mkfs[0]).env("PATH", system_path()).args(&mkfs[1..]).arg(fuse.disk()));
        let m = Mounted::new(&fuse.disk(), &dir.path().join("mnt"));
        run(Command::new("cp").arg("-a").arg(format!("{}/.", src.display())).arg(&m.0));
        run(Command::new("sync").arg("-f").arg(&m.0));
    }
    // Clean server restart: everything must have reached the file.
    assert!(s.stop().success());
    let s = Served::start(&["--file", &image]);
    let fuse = Fuse::mount(&dir.path().join("fuse2"), &s.tcp_uri);
    let out =
        Command::new(fsck[0]).env("PATH", system_path()).args(&fsck[1..]).arg(fuse.disk()).output().unwrap();
    assert!(
        out.status.success(),
        "{fsck:?} found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let m = Mounted::new(&fuse.disk(), &dir.path().join("mnt2"));
    for (rel, data) in &files {
        let got = std::fs::read(m.0.join(rel)).unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
        assert!(&got == data, "{} differs after remount", rel.display());
    }
}

#[test]
fn ext4_on_nbdfuse_survives_unmount_restart_and_fsck() {
    if !have_tools(&["nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "mount"]) {
        return;
    }
    filesystem_round_trip(&["mkfs.ext4", "-q", "-F"], &["e2fsck", "-fn"]);
}

#[test]
fn xfs_on_nbdfuse_survives_unmount_restart_and_repair_check() {
    if !have_tools(&["nbdfuse", "fusermount3", "mkfs.xfs", "xfs_repair", "mount"]) {
        return;
    }
    filesystem_round_trip(&["mkfs.xfs", "-q", "-f"], &["xfs_repair", "-n"]);
}
