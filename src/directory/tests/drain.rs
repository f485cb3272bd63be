//! Drains, the high-water mark, removal and audits, in process: the
//! directory on a manual clock, peers that heartbeat, a fake rebuilder
//! and a fake auditor whose answers the test scripts.

use std::collections::VecDeque;

use tokio::sync::Notify;

use super::repair::*;
use super::*;
use crate::codec::segment::SegmentRoot;
use crate::directory::heal::audit::{Auditor, Outcome};

async fn admin(f: &Fixture, req: DirRequest) -> Result<DirResponse, Remote> {
    f.ask("admin", Role::Admin, req).await
}

async fn record_of(f: &Fixture, id: SegmentId) -> SegmentRecord {
    f.segment_records("vol-1", vec![id]).await[0].clone().unwrap()
}

#[tokio::test]
async fn a_drained_peers_shards_are_copied_off_it_then_recorded_and_then_it_may_be_removed() {
    let f = peers_alone(8).await;
    volume_with(
        &f,
        2,
        2,
        4,
        vec![(seg(1, 1), record(&[1, 2, 3, 4], 1)), (seg(1, 2), record(&[2, 5, 6, 7], 2))],
    )
    .await;
    // Only admins drain; an unknown peer is named as such.
    let err = f.client("client-1", DirRequest::DrainPeer { peer: "peer-1".into(), cancel: false }).await;
    assert_eq!(err.unwrap_err().kind, ErrorKind::Refused);
    let err = admin(&f, DirRequest::DrainPeer { peer: "peer-99".into(), cancel: false }).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);

    admin(&f, DirRequest::DrainPeer { peer: "peer-1".into(), cancel: false }).await.unwrap();
    let s = f.status().await;
    let p = s.peers.iter().find(|p| p.name == "peer-1").unwrap();
    assert_eq!(p.drain.as_ref().map(|d| d.reason), Some(DrainReason::Operator));
    assert_eq!(p.needed.segments, 2);
    // Redundancy is whole meanwhile; two shards are to move.
    assert_eq!((s.health.whole, s.health.to_move.segments, s.health.to_repair.segments), (2, 2, 0));
    assert_eq!(s.verdict, Verdict::HealthOk, "a drain is not a repair");
    // Removing it now is refused, with how many shards it still holds.
    let err = admin(&f, DirRequest::RemovePeer { peer: "peer-1".into() }).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Conflict);
    assert!(
        err.message.contains("still holds 2 shards") && err.message.contains("peer drain peer-1"),
        "{err}"
    );
    // New placements avoid it.
    for p in f.place_segments("client-1", "vol-1", 1, 20, vec![]).await.unwrap() {
        assert!(p.peers.iter().all(|s| s.addr.name != "peer-1"), "{p:?}");
    }

    let rebuilder = FakeRebuilder::default();
    let r = f.dir.repair_round(&rebuilder).await.unwrap();
    assert_eq!((r.shards, r.failed), (2, 0));
    for c in rebuilder.calls() {
        // Copied from the draining peer itself (a source holding that very
        // index), to a peer holding nothing of the segment, never to it.
        assert!(c.sources.iter().any(|s| s.index == c.key.index && s.peer.name == "peer-1"), "{c:?}");
        assert_ne!(c.target, "peer-1");
    }
    let (a, b) = (record_of(&f, seg(1, 1)).await, record_of(&f, seg(1, 2)).await);
    assert!(!a.peers.contains(&2) && !b.peers.contains(&2), "{a:?} {b:?}");
    assert_eq!((a.peers[0], a.peers[2], a.peers[3]), (1, 3, 4), "only the drained index moved");
    let s = f.status().await;
    assert_eq!(s.peers.iter().find(|p| p.name == "peer-1").unwrap().needed.segments, 0);
    assert_eq!((s.health.whole, s.health.to_move.segments), (2, 0));
    assert!(f.dir.repair_round(&rebuilder).await.unwrap() == Default::default());

    // The copies left on it are erased by a reconciliation of the leaving
    // peer alone, once seen for the grace (the new holders are up).
    let v = f.volume_record("vol-1").await;
    let copies = vec![
        SegmentShardKey { volume: v.spec.id, segment: seg(1, 1), index: 1 },
        SegmentShardKey { volume: v.spec.id, segment: seg(1, 2), index: 0 },
    ];
    let peers = FakePeers::default();
    peers.held.lock().unwrap().insert("peer-1".into(), copies.clone());
    let only: HashSet<String> = ["peer-1".to_owned()].into();
    let mut orphans = collector::Orphans::default();
    let r = f.dir.reconcile(&peers, &mut orphans, Some(&only)).await.unwrap();
    assert_eq!((r.found, r.erased), (2, 0));
    pass(&f, GRACE, &(0..8).collect::<Vec<_>>()).await;
    let r = f.dir.reconcile(&peers, &mut orphans, Some(&only)).await.unwrap();
    assert_eq!(r.erased, 2);
    assert!(peers.held.lock().unwrap()["peer-1"].is_empty());

    // Now it may go, and its heartbeats are refused from then on.
    admin(&f, DirRequest::RemovePeer { peer: "peer-1".into() }).await.unwrap();
    assert!(!f.peer_status().await.contains_key("peer-1"));
    let report = report_of(1, "x1");
    let err = f.ask("peer-1", Role::Peer, DirRequest::Heartbeat(report)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Refused);
    assert!(err.message.contains("was removed"), "{err}");
    // Nothing gives it an id again (a heartbeat or placement that raced
    // the removal).
    assert_eq!(f.dir.peer_id("peer-1").await.unwrap_err().kind, ErrorKind::Refused);
    assert!(!f.dir.peer_ids().await.unwrap().contains_key("peer-1"));
}

#[tokio::test]
async fn a_cancelled_drain_moves_nothing_more() {
    let f = peers_alone(6).await;
    volume_with(&f, 2, 2, 4, vec![(seg(1, 1), record(&[1, 2, 3, 4], 1))]).await;
    admin(&f, DirRequest::DrainPeer { peer: "peer-0".into(), cancel: false }).await.unwrap();
    admin(&f, DirRequest::DrainPeer { peer: "peer-0".into(), cancel: true }).await.unwrap();
    let rebuilder = FakeRebuilder::default();
    assert!(f.dir.repair_round(&rebuilder).await.unwrap() == Default::default());
    assert!(f.peer_status().await["peer-0"].drain.is_none());
}

#[tokio::test]
async fn a_peer_above_the_high_water_mark_sheds_only_its_excess_and_gets_nothing_new() {
    let f = peers_alone(8).await;
    let segments: Vec<(SegmentId, SegmentRecord)> =
        (1..=4).map(|n| (seg(1, n), record(&[1, 1 + n as u16, 7, 8], n as u8))).collect();
    volume_with(&f, 2, 2, 4, segments).await;
    // peer-0 (id 1) holds 4 shards and reports its capacity of 4 shards
    // full: 100% used, above 90%; the low-water mark (85%) is 3.4 shards,
    // so one shard moves.
    let shard = f.status().await.peers.iter().find(|p| p.name == "peer-0").unwrap().needed.bytes / 4;
    let full = PeerReport { capacity: 4 * shard, used: 4 * shard, ..report_of(0, "x0") };
    f.ask("peer-0", Role::Peer, DirRequest::Heartbeat(full)).await.unwrap();
    let s = f.status().await;
    let p = s.peers.iter().find(|p| p.name == "peer-0").unwrap();
    assert!(p.above_high_water);
    assert_eq!(s.health.to_move.segments, 1, "{:?}", s.health);
    for p in f.place_segments("client-1", "vol-1", 1, 20, vec![]).await.unwrap() {
        assert!(p.peers.iter().all(|s| s.addr.name != "peer-0"), "{p:?}");
    }
    let rebuilder = FakeRebuilder::default();
    let r = f.dir.repair_round(&rebuilder).await.unwrap();
    assert_eq!(r.shards, 1);
    let calls = rebuilder.calls();
    assert_eq!(calls[0].key.index, 0);
    assert!(calls[0].sources.iter().any(|s| s.index == 0 && s.peer.name == "peer-0"), "copied off it");
    assert_eq!(f.status().await.peers.iter().find(|p| p.name == "peer-0").unwrap().needed.segments, 3);
    // Below the low-water mark by what records name: nothing more moves.
    assert!(f.dir.repair_round(&rebuilder).await.unwrap() == Default::default());
}

/// A challenge as the fake received it: peer, shard, block.
type Asked = (String, SegmentShardKey, Option<u32>);

/// Answers challenges from a script, recording them.
#[derive(Clone, Default)]
struct FakeAuditor {
    script: Arc<Mutex<VecDeque<Outcome>>>,
    asked: Arc<Mutex<Vec<Asked>>>,
}

impl Auditor for FakeAuditor {
    async fn challenge(
        &self,
        peer: &PeerAddr,
        key: SegmentShardKey,
        _root: SegmentRoot,
        block: Option<u32>,
    ) -> Outcome {
        self.asked.lock().unwrap().push((peer.name.clone(), key, block));
        self.script.lock().unwrap().pop_front().unwrap_or(Outcome::Passed)
    }
}

#[tokio::test]
async fn audits_forget_what_fails_and_drain_a_peer_that_lies_whose_shards_are_rebuilt_from_others() {
    let f = peers_alone(8).await;
    // Segment 1 on peers 1-4, segments 2..=16 on peers 5-8 (4 blocks a
    // shard).
    let mut segments = vec![(seg(1, 1), record(&[1, 2, 3, 4], 1))];
    segments.extend(
        (2..=16).map(|n| (seg(1, n), SegmentRecord { shard_blocks: 4, ..record(&[5, 6, 7, 8], n as u8) })),
    );
    volume_with(&f, 2, 2, 4, segments).await;
    let auditor = FakeAuditor::default();
    // Nothing sampled yet (no health scan): nothing to challenge.
    assert_eq!(f.dir.audit_once(&auditor).await.unwrap(), None);
    // Passing challenges land on random segments, holders and blocks.
    f.status().await;
    for _ in 0..64 {
        assert_eq!(f.dir.audit_once(&auditor).await.unwrap(), Some(Outcome::Passed));
    }
    let asked = auditor.asked.lock().unwrap().clone();
    let segs: HashSet<SegmentId> = asked.iter().map(|(_, k, _)| k.segment).collect();
    let peers: HashSet<&String> = asked.iter().map(|(p, _, _)| p).collect();
    let blocks: HashSet<Option<u32>> =
        asked.iter().filter(|(_, k, _)| k.segment != seg(1, 1)).map(|(_, _, b)| *b).collect();
    assert!(segs.len() >= 8 && peers.len() >= 6 && blocks.len() >= 3, "{segs:?} {peers:?} {blocks:?}");
    assert!(blocks.iter().all(|b| b.is_some_and(|b| b < 4)));
    let tallies: u64 = f.status().await.peers.iter().map(|p| p.audits.audits).sum();
    assert_eq!(tallies, 64);

    // A reader's suspicion is challenged first, on the whole shard; an
    // honest loss forgets the shard and counts against the peer.
    let v = f.volume_record("vol-1").await;
    let key = SegmentShardKey { volume: v.spec.id, segment: seg(1, 1), index: 2 };
    f.client("client-1", DirRequest::SuspectShard { shard: key, peer: "peer-2".into() }).await.unwrap();
    auditor.script.lock().unwrap().push_back(Outcome::Missing("no such shard".into()));
    assert!(matches!(f.dir.audit_once(&auditor).await.unwrap(), Some(Outcome::Missing(_))));
    // (Then a witness, another holder, passed: the fault is the peer's.)
    let asked = auditor.asked.lock().unwrap().clone();
    assert_eq!(asked[asked.len() - 2], ("peer-2".to_owned(), key, None));
    assert_ne!(asked[asked.len() - 1].0, "peer-2");
    assert_eq!(record_of(&f, seg(1, 1)).await.peers, vec![1, 2, 0, 4]);
    let p = &f.peer_status().await["peer-2"];
    assert_eq!((p.audits.failed, p.audits.lies), (1, 0));
    assert!(p.drain.is_none(), "one honest loss is not a reason to drain");

    // A lie: the peer is drained for failed audits and its shards count
    // as lost: rebuilt from the others, never copied from it.
    auditor.script.lock().unwrap().push_back(Outcome::Lie("proof does not verify".into()));
    let before = auditor.asked.lock().unwrap().len();
    f.dir.audit_once(&auditor).await.unwrap();
    let liar = auditor.asked.lock().unwrap()[before].0.clone();
    let s = f.peer_status().await;
    assert_eq!(s[&liar].drain.as_ref().map(|d| d.reason), Some(DrainReason::Audits));
    assert_eq!(s[&liar].audits.lies, 1);
    let rebuilder = FakeRebuilder::default();
    f.dir.repair_round(&rebuilder).await.unwrap();
    let liar_id = (liar.strip_prefix("peer-").unwrap().parse::<u16>().unwrap()) + 1;
    for n in 1..=16 {
        let now = record_of(&f, seg(1, n)).await;
        assert!(!now.peers.contains(&liar_id) && !now.peers.contains(&0), "segment {n}: {now:?}");
    }
    for c in rebuilder.calls() {
        assert!(c.sources.iter().all(|s| s.peer.name != liar), "{c:?}");
        assert_ne!(c.target, liar);
    }
    assert_eq!(f.status().await.verdict, Verdict::HealthOk);
}

/// Six peers and a segment whose index 1 was moved off peer-1 (id 2) to
/// peer-4 (id 5): peer-1 still holds that copy, which the collector has
/// found once (its grace started).
async fn a_leftover_copy_on_peer_1() -> (Fixture, SegmentShardKey, FakePeers, collector::Orphans) {
    let f = peers_alone(6).await;
    volume_with(&f, 2, 2, 4, vec![(seg(1, 1), record(&[1, 5, 3, 4], 1))]).await;
    let v = f.volume_record("vol-1").await;
    let copy = SegmentShardKey { volume: v.spec.id, segment: seg(1, 1), index: 1 };
    let peers = FakePeers::default();
    peers.held.lock().unwrap().insert("peer-1".into(), vec![copy]);
    let mut orphans = collector::Orphans::default();
    assert_eq!(f.dir.reconcile(&peers, &mut orphans, None).await.unwrap().found, 1);
    (f, copy, peers, orphans)
}

#[tokio::test]
async fn a_copy_the_collector_erases_while_a_move_stores_that_index_on_its_peer_is_never_recorded() {
    // Index 1 moved off peer-1 (id 2) to peer-4 (id 5) earlier: peer-1
    // still holds the copy, an orphan past its grace. Now peer-4 is
    // drained and the only peer to move it to is peer-1 (peer-5 is down).
    let (f, _, peers, mut orphans) = a_leftover_copy_on_peer_1().await;
    pass(&f, GRACE + PEER_TIMEOUT, &[0, 1, 2, 3, 4]).await;
    admin(&f, DirRequest::DrainPeer { peer: "peer-4".into(), cancel: false }).await.unwrap();

    // The move starts (peer-1 stores the shard again), and waits.
    let gate = Arc::new((Notify::new(), Notify::new()));
    let rebuilder = FakeRebuilder { gate: Some(gate.clone()), ..Default::default() };
    let (dir, rb) = (f.dir.clone(), rebuilder.clone());
    let moving = tokio::spawn(async move { dir.repair_round(&rb).await });
    gate.0.notified().await;
    // Meanwhile the collector finds the copy due, and erases it.
    let r = f.dir.reconcile(&peers, &mut orphans, None).await.unwrap();
    assert_eq!(r.erased, 1);
    gate.1.notify_one();
    let r = moving.await.unwrap().unwrap();
    assert_eq!(rebuilder.calls()[0].target, "peer-1");
    // The move lost the race: the record does not name peer-1 for a
    // shard it no longer holds, and what the move stored is erased.
    assert!(r.raced, "{r:?}");
    assert_eq!(record_of(&f, seg(1, 1)).await.peers, vec![1, 5, 3, 4]);
}

#[tokio::test]
async fn a_failure_another_holder_shares_blames_no_peer_and_a_slot_is_forgotten_only_while_k_stay() {
    let f = peers_alone(6).await;
    volume_with(&f, 2, 2, 4, vec![(seg(1, 1), record(&[1, 2, 3, 4], 1))]).await;
    f.status().await;
    // A segment forged on every holder (or a wrong root in its record):
    // the challenged holder and the witness both fail.
    let auditor = FakeAuditor::default();
    auditor.script.lock().unwrap().extend([Outcome::Lie("no".into()), Outcome::Lie("no".into())]);
    assert!(matches!(f.dir.audit_once(&auditor).await.unwrap(), Some(Outcome::SegmentFault(_))));
    assert_eq!(auditor.asked.lock().unwrap().len(), 2, "the witness was challenged");
    let asked = auditor.asked.lock().unwrap().clone();
    let (a, b) = (&asked[0], &asked[1]);
    assert!(a.0 != b.0 && a.1.index != b.1.index, "{a:?} {b:?}");
    assert_eq!(record_of(&f, seg(1, 1)).await.peers, vec![1, 2, 3, 4]);
    let s = f.status().await;
    assert!(s.peers.iter().all(|p| p.audits.failed == 0 && p.drain.is_none()), "{:?}", s.peers);

    // Holders report their shards bad one by one: forgotten while k = 2
    // others stay named, then kept (nothing could rebuild it).
    let v = f.volume_record("vol-1").await;
    for (peer, index) in [(0, 0u8), (1, 1), (2, 2)] {
        let fault = ShardFault {
            shard: SegmentShardKey { volume: v.spec.id, segment: seg(1, 1), index },
            problem: "hash mismatch".into(),
        };
        f.ask(&peer_name(peer), Role::Peer, DirRequest::ReportShardFaults { faults: vec![fault] })
            .await
            .unwrap();
    }
    assert_eq!(record_of(&f, seg(1, 1)).await.peers, vec![0, 0, 3, 4]);
    assert_eq!(f.status().await.repair.forgotten, 2);
}

#[tokio::test]
async fn the_collector_erases_only_the_copy_it_judged_and_a_copy_stored_since_starts_its_grace_anew() {
    // Index 1 was moved off peer-1 (id 2) to peer-4 (id 5): peer-1's copy
    // is a leftover, seen and then due.
    let (f, copy, peers, mut orphans) = a_leftover_copy_on_peer_1().await;
    pass(&f, GRACE, &(0..6).collect::<Vec<_>>()).await;
    // Between the listing and the erase, peer-1 stores index 1 anew (a
    // repair's rebuild there, not yet recorded): the erase of the copy
    // judged does not take the new one.
    *peers.store_before_erase.lock().unwrap() = Some(("peer-1".into(), copy));
    let r = f.dir.reconcile(&peers, &mut orphans, None).await.unwrap();
    assert_eq!(r.erased, 0, "the copy stored since is kept");
    assert!(peers.held.lock().unwrap()["peer-1"].contains(&copy));
    assert!(peers.store_before_erase.lock().unwrap().is_none(), "the race happened");
    // Still an orphan if nothing records it, but its grace starts again.
    let r = f.dir.reconcile(&peers, &mut orphans, None).await.unwrap();
    assert_eq!(r.erased, 0, "a new copy waits a grace of its own");
    pass(&f, GRACE, &(0..6).collect::<Vec<_>>()).await;
    let r = f.dir.reconcile(&peers, &mut orphans, None).await.unwrap();
    assert_eq!(r.erased, 1);
    assert!(!peers.held.lock().unwrap()["peer-1"].contains(&copy));
}
