//! The directory's side of the peers' scrub: the directive survives a
//! damaged value and concurrent commands, and fault reports are bounded.

use super::*;

/// The directive peer-0's heartbeat answer carries.
async fn directive(f: &Fixture) -> ScrubDirective {
    let report = report_of(0, "d0");
    match f.ask(&peer_name(0), Role::Peer, DirRequest::Heartbeat(report)).await.unwrap() {
        DirResponse::Heartbeat { scrub, .. } => scrub,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_damaged_scrub_directive_fails_no_heartbeat_and_a_command_rewrites_it() {
    let f = Fixture::with_peers(1).await;
    let put = Op::Put { key: b"config/scrub".to_vec(), value: vec![0xff; 40], lease: None };
    f.meta.txn(Txn::new().then(put)).await.unwrap();
    assert_eq!(directive(&f).await, ScrubDirective::default());
    assert_eq!(f.status().await.scrub.paused_until_ms, None);
    f.ask("admin", Role::Admin, DirRequest::Scrub(ScrubCommand::Start)).await.unwrap();
    assert_eq!(directive(&f).await.start_requested_ms, Some(f.dir.now()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_scrub_commands_lose_nothing() {
    let f = Fixture::with_peers(1).await;
    let scrub = |cmd| f.ask("admin", Role::Admin, DirRequest::Scrub(cmd));
    for round in 0..12 {
        f.clock.advance(Duration::from_secs(1));
        let now = f.dir.now();
        // Whichever lands first, the start asked for now is kept: a pause
        // written over it from a stale read would drop it.
        let (a, b) =
            tokio::join!(scrub(ScrubCommand::Start), scrub(ScrubCommand::Pause { for_ms: Some(1000) }));
        a.unwrap();
        b.unwrap();
        let d = directive(&f).await;
        assert_eq!(d.start_requested_ms, Some(now), "round {round}: {d:?}");
    }
}

#[tokio::test]
async fn a_fault_report_is_bounded() {
    let f = Fixture::with_peers(1).await;
    let fault = |i: u64| {
        let shard = SegmentShardKey { volume: [9; 16], segment: SegmentId::from_raw(i), index: 0 };
        ShardFault::new(shard, "unreadable")
    };
    let peer = peer_name(0);
    let report = |n: u64| {
        let faults = (0..n).map(fault).collect();
        f.ask(&peer, Role::Peer, DirRequest::ReportShardFaults { faults })
    };
    // Shards of no live segment: nothing to forget, but accepted.
    report(MAX_FAULTS_PER_CALL as u64).await.unwrap();
    let err = report(MAX_FAULTS_PER_CALL as u64 + 1).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err:?}");
}
