//! Peers leaving, end to end (issue 15): `meshdisk peer drain` under
//! fio's verify, `peer remove` refused while a peer holds needed shards
//! and done once it holds none, and a lying peer (the test-only fault
//! `--fault drop-payloads`: it keeps its index and headers, and answers
//! reads of payloads with zeros) caught by the directory's audits, its
//! shards rebuilt from the others, and drained.
//!
//! Real processes throughout: a directory, peers, `meshdisk attach`, fio
//! and nbdcopy over NBD. Every test ends with every byte read back from
//! a fresh folder (another machine), so from the peers.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Proc;
use common::heal::*;
use common::{have_tools, pattern};
use meshdisk::api::DrainReason;

/// The peer id `name` has, as the records name it.
fn id_of(s: &Setup, volume: &str, name: &str) -> Option<u16> {
    let (_, names) = s.records(volume);
    names.iter().find(|(_, n)| n.as_deref() == Some(name)).map(|(id, _)| *id)
}

/// Issue 15: seven peers, a k=4 m=2 volume, fio writing and verifying at
/// a paced rate. The peer holding the most shards is drained with
/// `peer drain --wait` while fio writes; meanwhile `peer remove` of a
/// peer that holds needed shards is refused, saying how many. Once
/// drained, no record names the peer, it ends with zero shards (the
/// collector erases the copies left behind), `peer remove` succeeds and
/// the removed peer's heartbeats are refused (it exits). No request
/// fails, fio's verify passes, and verifies again from a fresh folder.
#[test]
fn a_peer_drained_under_fio_verify_ends_empty_and_is_removed() {
    if !have_tools(&["fio"]) {
        return;
    }
    let started = Instant::now();
    let mut s = Setup::new(
        "drain-fio",
        7,
        &["--peer-timeout", "2s", "--lease-ttl", "4s", "--collect-grace", "3s", "--drop-grace", "1s"],
    );
    s.c.create_volume("vm", "64M", K as u8, M as u8);
    let port = free_tcp_port();
    let a = s.attach("vm", "a", Some(port), &[]);
    let uri = format!("nbd://127.0.0.1:{port}");
    let mut fio = Proc::spawn("fio-vm", &mut fio_command(&uri, "32M", "4m", false));
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.records("vm").0.len() < 12 {
        assert!(Instant::now() < deadline, "fio wrote no segments in 60 s:\n{}", fio.output());
        std::thread::sleep(Duration::from_millis(200));
    }
    let ranked = s.holders_by_count("vm");
    let (victim, holds) = ranked[0];
    let (other, _) = ranked[1];
    let name = s.names[victim].clone();
    let cred = s.c.admin_cred();
    let cred = cred.to_str().unwrap();

    // Removing a peer that holds needed shards is refused, with a count
    // and what to do.
    let (ok, _, err) = s.c.cli(&["peer", "remove", &s.names[other], "--credential", cred]);
    assert!(!ok, "removing {} while it holds shards must fail", s.names[other]);
    assert!(err.contains("still holds") && err.contains("peer drain"), "{err}");

    eprintln!("draining {name}, which holds shards of {holds} segments");
    assert!(fio.child.try_wait().unwrap().is_none(), "fio ended before the drain: pace it slower");
    let t = Instant::now();
    let (ok, out, err) = s.c.cli(&["peer", "drain", &name, "--credential", cred]);
    assert!(ok, "peer drain failed:\n{out}\n{err}");
    // Redundancy never drops while it drains: nothing is ever missing.
    let mut polls = 0;
    loop {
        let st = s.c.status();
        let h = &st.health;
        assert_eq!(
            (h.below_threshold, h.critical, h.unavailable, h.lost, h.to_repair.segments),
            (0, 0, 0, 0, 0),
            "redundancy dropped during the drain: {h:#?}"
        );
        polls += 1;
        if st.peers.iter().any(|p| p.name == name && p.needed.segments == 0) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(150), "the drain did not end in 150 s: {h:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, out, err) =
        s.c.cli(&["peer", "drain", &name, "--wait", "--timeout", "150s", "--credential", cred]);
    assert!(ok, "peer drain --wait failed:\n{out}\n{err}");
    assert!(out.contains("is drained"), "{out}");
    eprintln!("drained in {:.1} s ({polls} status polls):\n{out}", t.elapsed().as_secs_f64());
    let st = s.c.status();
    let p = st.peers.iter().find(|p| p.name == name).unwrap();
    assert_eq!(p.drain.as_ref().map(|d| d.reason), Some(DrainReason::Operator));
    assert_eq!(p.needed.segments, 0);

    let (status, out) = fio.wait_exit(Duration::from_secs(180));
    assert!(status.success(), "fio failed ({status}):\n{out}");
    fio_passed(&out);
    // Segments fio wrote after the drain started avoid the peer too.
    let id = id_of(&s, "vm", &name);
    assert!(id.is_none(), "a record still names {name} (id {id:?}) after its drain");
    assert_eq!(s.c.status().repair.failed, 0, "a move failed");

    // It ends with zero shards: the copies left behind go after the grace.
    s.c.wait_status(&format!("{name} holds nothing"), Duration::from_secs(60), |st| {
        st.peers.iter().any(|p| p.name == name && p.used == 0)
    });
    s.wait_whole("vm", Duration::from_secs(60));
    let (ok, out, err) = s.c.cli(&["peer", "remove", &name, "--credential", cred]);
    assert!(ok, "removing the drained {name}: {out}{err}");
    assert!(s.c.status().peers.iter().all(|p| p.name != name), "{name} is still listed");
    // Its next heartbeat is refused, and it stops.
    let (_, log) = s.c.peers[victim].wait_exit(Duration::from_secs(20));
    assert!(log.contains("was removed from this cluster"), "{log}");
    s.killed.insert(name);
    s.check_records("vm");
    s.wait_health_ok(Duration::from_secs(30));

    no_failed_requests(&a.proc.output(), "vm");
    s.detach(a);
    let port = free_tcp_port();
    let b = s.attach("vm", "b", Some(port), &[]);
    let out = common::stdout_of(&mut fio_command(&format!("nbd://127.0.0.1:{port}"), "32M", "4m", true));
    fio_passed(&out);
    s.detach(b);
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}

/// Issue 15: one of seven peers lies (`--fault drop-payloads`). Data is
/// written and flushed; the directory's audits (every 200 ms here) catch
/// it: `status` shows its failed audits and lies, it is drained for
/// failed audits, its shards are rebuilt from the others (never copied
/// from it), and no record names it. A fresh folder then reads every byte
/// back exactly.
#[test]
fn a_peer_that_drops_payloads_is_caught_by_audits_drained_and_its_shards_rebuilt() {
    if !have_tools(&["nbdcopy"]) {
        return;
    }
    let started = Instant::now();
    let mut s =
        Setup::new("audit-liar", 6, &["--peer-timeout", "2s", "--lease-ttl", "4s", "--audit-every", "200ms"]);
    // The seventh peer lies.
    s.c.peer_args = vec!["--fault".into(), "drop-payloads".into()];
    let liar = s.add_peer();
    s.c.peer_args.clear();
    let liar_name = s.names[liar].clone();
    s.c.wait_all_up(7);

    s.c.create_volume("vm", "16M", K as u8, M as u8);
    let a = s.attach("vm", "a", None, &[]);
    let data = pattern(15, 16 << 20);
    let file = s.c.root.path().join("data.img");
    std::fs::write(&file, &data).unwrap();
    nbdcopy_to(&file, &a.uri());
    s.detach(a);
    let liar_id = id_of(&s, "vm", &liar_name);
    assert!(liar_id.is_some(), "no segment on the lying peer: nothing to catch");
    eprintln!("{liar_name} (id {liar_id:?}) lies; {} segments written", s.records("vm").0.len());

    let st =
        s.c.wait_status(&format!("{liar_name} drained for failed audits"), Duration::from_secs(60), |st| {
            st.peers.iter().any(|p| {
                p.name == liar_name && p.drain.as_ref().is_some_and(|d| d.reason == DrainReason::Audits)
            })
        });
    let p = st.peers.iter().find(|p| p.name == liar_name).unwrap();
    assert!(p.audits.lies >= 1, "{:?}", p.audits);
    let honest_failures: u64 = st.peers.iter().filter(|p| p.name != liar_name).map(|p| p.audits.failed).sum();
    assert_eq!(honest_failures, 0, "an honest peer failed an audit: {:#?}", st.peers);
    eprintln!("caught after {:.1} s: {:?}", started.elapsed().as_secs_f64(), p.audits);

    // Its shards are rebuilt from the others; nothing names it any more.
    s.c.wait_status(&format!("no record names {liar_name}"), Duration::from_secs(90), |st| {
        st.peers.iter().any(|p| p.name == liar_name && p.needed.segments == 0)
    });
    s.wait_whole("vm", Duration::from_secs(60));
    assert!(id_of(&s, "vm", &liar_name).is_none());
    let cred = s.c.admin_cred();
    let (ok, out, _) = s.c.cli(&["status", "--credential", cred.to_str().unwrap()]);
    assert!(ok);
    assert!(out.contains("failed audits"), "status shows why it is draining:\n{out}");
    eprintln!("{out}");

    let b = s.attach("vm", "b", None, &[]);
    nbdcopy_check(&b.uri(), &b.folder, &data, "after the liar's shards were rebuilt");
    s.detach(b);
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}
