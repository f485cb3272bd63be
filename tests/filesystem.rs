//! A real filesystem on the export: `nbdfuse` exposes it as a file, the
//! kernel's ext4 and xfs drivers mount that file through a loop device, a
//! file tree goes in, and after unmounting, a server restart and a fresh
//! connection, fsck is clean and every file reads back identical.

mod common;

use std::process::Command;

use common::fs::{Fuse, Mounted, make_tree};
use common::{Served, have_tools, run, system_path};

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
