//! `meshdisk demo` as the README runs it: a whole cluster on this machine,
//! the volume served, Ctrl-C stopping everything cleanly, and a second run
//! finding the data again.

mod common;

use std::process::Command;
use std::time::Duration;

use common::cluster::Proc;
use common::{have_tools, meshdisk_bin, pattern, run, sha256_file};

#[test]
fn demo_serves_a_volume_stops_cleanly_and_keeps_the_data() {
    if !have_tools(&["nbdcopy", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("meshdisk-demo");
    let start = || {
        let mut cmd = Command::new(meshdisk_bin());
        cmd.args(["demo", "--size", "64M", "--capacity", "1G", "--cache-size", "16M", "--state"]).arg(&state);
        let mut p = Proc::spawn("demo", &mut cmd);
        // stdout has the URI alone; the usage on stderr mentions it too.
        let line = p.wait_for("nbd+unix://", Duration::from_secs(60));
        let at = line.find("nbd+unix://").unwrap();
        let uri = line[at..].split_whitespace().next().unwrap().trim_matches('\'').to_owned();
        (p, uri)
    };
    let (mut demo, uri) = start();
    let out = demo.output();
    for hint in ["nbdinfo", "nbdfuse", "mkfs.ext4", "nbd-client", "qemu-system-x86_64", "fio", "Ctrl-C"] {
        assert!(out.contains(hint), "the demo should say how to use it with {hint}:\n{out}");
    }
    let info = Command::new("nbdinfo").arg(&uri).output().unwrap();
    assert!(info.status.success());
    assert!(String::from_utf8_lossy(&info.stdout).contains("export-size: 67108864"));

    let src = dir.path().join("src.img");
    std::fs::write(&src, pattern(3, 64 << 20)).unwrap();
    run(Command::new("nbdcopy").arg(&src).arg(&uri));
    // Ctrl-C: everything flushed to the peers, the children stopped, exit 0.
    demo.signal(libc::SIGINT);
    let (status, out) = demo.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "the demo did not stop cleanly:\n{out}");
    assert!(out.contains("stopped cleanly"), "{out}");
    assert!(!state.join("nbd.sock").exists());
    let stray = Command::new("pgrep").arg("-f").arg(state.to_str().unwrap()).output().unwrap();
    assert!(stray.stdout.is_empty(), "children left running: {}", String::from_utf8_lossy(&stray.stdout));

    // Again: same state, same volume, same bytes (read from the peers).
    let (mut demo, uri) = start();
    let back = dir.path().join("back.img");
    run(Command::new("nbdcopy").arg(&uri).arg(&back));
    assert_eq!(sha256_file(&back), sha256_file(&src));
    demo.signal(libc::SIGINT);
    let (status, out) = demo.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "{out}");
}
