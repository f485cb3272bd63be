//! A real filesystem on the export: `nbdfuse` exposes it as a file, the
//! kernel's ext4 and xfs drivers mount that file through a loop device, a
//! file tree goes in, and after unmounting, a server restart and a fresh
//! connection, fsck is clean and every file reads back identical.

mod common;

use common::fs::{check_filesystem, fill_filesystem, make_tree};
use common::{Served, have_tools};

fn filesystem_round_trip(mkfs: &[&str], fsck: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("backing.img").to_str().unwrap().to_string();
    let mut s = Served::start(&["--file", &image, "--size", "512M"]);
    let src = dir.path().join("src");
    let files = make_tree(&src);
    fill_filesystem(dir.path(), &s.unix_uri, mkfs, &src);
    // Clean server restart: everything must have reached the file.
    assert!(s.stop().success());
    let s = Served::start(&["--file", &image]);
    check_filesystem(dir.path(), &s.tcp_uri, fsck, &files);
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
