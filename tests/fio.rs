//! fio's `nbd` engine (libnbd) writes with checksummed blocks and reads them
//! back: sequential and random, deep queues, several jobs on their own
//! connections at once (multi-conn), against both backends, and across a
//! server restart for the file backend.

mod common;

use std::process::Command;

use common::{Served, have_tools, run};

fn fio(uri: &str, args: &[&str]) -> String {
    let out = run(Command::new("fio")
        .args(["--ioengine=nbd", "--output-format=normal", "--verify=crc32c", "--verify_fatal=1"])
        .arg("--verify_state_save=0")
        .arg(format!("--uri={uri}"))
        .args(args));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains("verify:") || !text.contains("bad"), "{text}");
    assert!(!text.contains("err=") || text.contains("err= 0"), "fio reported errors:\n{text}");
    text
}

/// Random 4 KiB writes at queue depth 32 from 4 jobs, each on its own
/// connection and its own 64 MiB stretch; seeded, so a later
/// `--verify_only` run regenerates the same blocks.
const RANDOM_JOBS: &[&str] = &[
    "--name=rand",
    "--rw=randwrite",
    "--bs=4k",
    "--iodepth=32",
    "--numjobs=4",
    "--size=32M",
    "--offset_increment=64M",
    "--randseed=42",
];

fn verify_jobs(uri: &str) {
    // Sequential 1 MiB writes, queue depth 32, then read back and verified.
    fio(uri, &["--name=seq", "--rw=write", "--bs=1M", "--iodepth=32", "--size=256M"]);
    // Random 4 KiB writes from 4 jobs at once, each its own connection and
    // its own quarter of the disk.
    fio(uri, RANDOM_JOBS);
    // Mixed random reads and writes with varied block sizes.
    fio(
        uri,
        &["--name=mixed", "--rw=randrw", "--bsrange=512-128k", "--iodepth=16", "--size=64M", "--offset=300M"],
    );
}

#[test]
fn fio_verify_on_memory_backend() {
    if !have_tools(&["fio"]) {
        return;
    }
    let s = Served::memory("512M");
    verify_jobs(&s.tcp_uri);
}

#[test]
fn fio_verify_on_file_backend_survives_restart() {
    if !have_tools(&["fio"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img").to_str().unwrap().to_string();
    let mut s = Served::start(&["--file", &file, "--size", "512M"]);
    verify_jobs(&s.unix_uri);
    // Written through 4 connections; after a clean restart, the same
    // blocks verify from the file.
    fio(&s.tcp_uri, RANDOM_JOBS);
    assert!(s.stop().success());
    let s = Served::start(&["--file", &file]);
    let mut verify_only: Vec<&str> = RANDOM_JOBS.to_vec();
    verify_only.push("--verify_only");
    let out = fio(&s.tcp_uri, &verify_only);
    assert!(out.contains("READ:"), "verification read the data back:\n{out}");
}
