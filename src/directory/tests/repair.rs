//! Repair's planner and its compare-and-set, in process: the directory on
//! a manual clock, peers that heartbeat (or stop), and a fake rebuilder
//! that records what it was asked and can hold a rebuild open while the
//! test drops the segment.

use std::sync::Arc;

use tokio::sync::Notify;

use super::*;
use crate::codec::segment::SegmentRoot;
use crate::directory::heal::repair::Rebuilder;

/// One `Rebuild` as the fake received it.
#[derive(Clone, Debug)]
pub(super) struct Call {
    pub(super) target: String,
    pub(super) key: SegmentShardKey,
    pub(super) epoch: u64,
    pub(super) need: u8,
    pub(super) sources: Vec<ShardSource>,
}

#[derive(Clone, Default)]
pub(super) struct FakeRebuilder {
    pub(super) calls: Arc<Mutex<Vec<Call>>>,
    pub(super) erased: Arc<Mutex<Vec<(String, SegmentShardKey)>>>,
    /// When set: each rebuild says it started, then waits to proceed.
    pub(super) gate: Option<Arc<(Notify, Notify)>>,
}

impl Eraser for FakeRebuilder {
    type Error = Unreachable;

    async fn shards(
        &self,
        _peer: &PeerAddr,
        _volume: [u8; VOLUME_ID_LEN],
        _after: Option<SegmentShardKey>,
        _limit: u32,
    ) -> Result<Vec<SegmentShardKey>, Unreachable> {
        Ok(Vec::new())
    }

    async fn erase(&self, peer: &PeerAddr, key: SegmentShardKey, _epoch: u64) -> Result<bool, Unreachable> {
        self.erased.lock().unwrap().push((peer.name.clone(), key));
        Ok(true)
    }
}

impl Rebuilder for FakeRebuilder {
    async fn rebuild(
        &self,
        target: &PeerAddr,
        key: SegmentShardKey,
        _root: SegmentRoot,
        epoch: u64,
        need: u8,
        sources: Vec<ShardSource>,
    ) -> Result<u64, Unreachable> {
        if let Some(g) = &self.gate {
            g.0.notify_one();
            g.1.notified().await;
        }
        self.calls.lock().unwrap().push(Call { target: target.name.clone(), key, epoch, need, sources });
        Ok(u64::from(need) * 100)
    }
}

impl FakeRebuilder {
    pub(super) fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

/// Volume `vol-1`: k, m and threshold as given, leased to client-1, with
/// `segments` (records by peer id: peer-i has id i + 1, domain d<i / 2>).
pub(super) async fn volume_with(
    f: &Fixture,
    k: u8,
    m: u8,
    threshold: u8,
    segments: Vec<(SegmentId, SegmentRecord)>,
) {
    f.create_volume(VolumeSpec { repair_threshold: threshold, ..spec("vol-1", 1, k, m) }).await;
    assert_eq!(f.acquire("client-1", "vol-1", false).await.unwrap().epoch, 1);
    let top = segments.iter().map(|(id, _)| *id).max().unwrap();
    let c = RootCommit { sealed: sealed_up_to(1, 1, 1, top), ..root_commit(1, 1, None, segments) };
    f.commit_root("client-1", c).await.unwrap();
}

pub(super) fn ids_of(r: &SegmentRecord) -> Vec<u16> {
    r.peers.clone()
}

/// A heartbeat of peer-i from a failure domain of its own (`x<i>`).
pub(super) async fn heartbeat_alone(f: &Fixture, i: usize) {
    let report = report_of(i, &format!("x{i}"));
    f.ask(&peer_name(i), Role::Peer, DirRequest::Heartbeat(report)).await.unwrap();
}

/// `n` peers, each its own failure domain.
pub(super) async fn peers_alone(n: usize) -> Fixture {
    let f = Fixture::new().await;
    for i in 0..n {
        heartbeat_alone(&f, i).await;
    }
    f
}

/// Moves the clock by `d` in 5 s steps, peers `alive` heartbeating (from
/// their own domains) and client-1 renewing its lease.
pub(super) async fn pass(f: &Fixture, d: Duration, alive: &[usize]) {
    let step = Duration::from_secs(5);
    let mut left = d;
    while !left.is_zero() {
        let s = step.min(left);
        f.clock.advance(s);
        left -= s;
        for &i in alive {
            heartbeat_alone(f, i).await;
        }
        let _ = f.renew("client-1", "vol-1", 1).await;
    }
}

#[tokio::test]
async fn a_silent_peer_is_repaired_only_once_lost_on_a_peer_holding_nothing_of_the_segment() {
    // Peers in pairs per domain (d0..d3); the segment on one peer of each.
    let f = Fixture::with_peers(8).await;
    volume_with(&f, 2, 2, 4, vec![(seg(1, 1), record(&[1, 3, 5, 7], 1))]).await;
    let rebuilder = FakeRebuilder::default();
    assert_eq!(f.status().await.verdict, Verdict::HealthOk);

    // peer-2 (id 3, domain d1) goes silent: down after the timeout, not
    // yet lost.
    let others: Vec<usize> = (0..8).filter(|&i| i != 2).collect();
    let pass_paired = |d: Duration| {
        let others = others.clone();
        let f = &f;
        async move {
            let step = Duration::from_secs(5);
            let mut left = d;
            while !left.is_zero() {
                let s = step.min(left);
                f.clock.advance(s);
                left -= s;
                for &i in &others {
                    f.heartbeat(i).await;
                }
                let _ = f.renew("client-1", "vol-1", 1).await;
            }
        }
    };
    pass_paired(PEER_TIMEOUT + Duration::from_secs(5)).await;
    let s = f.status().await;
    assert_eq!(s.verdict, Verdict::Degraded, "{:?}", s.health);
    assert_eq!((s.health.segments, s.health.degraded), (1, 1));
    let r = f.dir.repair_round(&rebuilder).await.unwrap();
    assert_eq!(r.shards, 0, "a reboot starts no repair");
    assert!(rebuilder.calls().is_empty());

    // Lost: the shard is rebuilt on a peer with no shard of the segment,
    // in the domain left without one (d1: peer-3, id 4).
    pass_paired(LOST_AFTER).await;
    let s = f.status().await;
    assert_eq!(s.verdict, Verdict::Repairing, "{:?}", s.health);
    assert_eq!((s.health.below_threshold, s.health.to_repair.segments), (1, 1));
    assert_eq!(f.peer_status().await["peer-2"].state, PeerState::Lost);
    let r = f.dir.repair_round(&rebuilder).await.unwrap();
    assert_eq!((r.shards, r.failed, r.raced), (1, 0, false));
    let calls = rebuilder.calls();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!((c.key.index, c.key.segment, c.epoch, c.need), (1, seg(1, 1), 1, 2));
    assert_eq!(c.target, "peer-3", "{c:?}");
    // Sources: the three shards on up peers, never the lost one.
    let mut from: Vec<u8> = c.sources.iter().map(|s| s.index).collect();
    from.sort();
    assert_eq!(from, vec![0, 2, 3]);
    assert!(c.sources.iter().all(|s| s.peer.name != "peer-2"));
    let now = f.segment_records("vol-1", vec![seg(1, 1)]).await[0].clone().unwrap();
    assert_eq!(ids_of(&now), vec![1, 4, 5, 7]);
    // Whole again; the lost peer no longer degrades the verdict.
    let s = f.status().await;
    assert_eq!((s.health.whole, s.verdict), (1, Verdict::HealthOk), "{:?}", s.health);
    assert!(f.dir.repair_round(&rebuilder).await.unwrap() == Default::default());
}

#[tokio::test]
async fn a_segment_down_to_k_shards_is_repaired_at_once_and_goes_first() {
    let f = peers_alone(8).await;
    // Segment 1 loses one shard (peer-7, lost); segment 2 has two holders
    // down (peer-1, peer-2): k = 2 left, critical.
    volume_with(
        &f,
        2,
        2,
        4,
        vec![(seg(1, 1), record(&[1, 4, 6, 8], 1)), (seg(1, 2), record(&[1, 2, 3, 5], 2))],
    )
    .await;
    pass(&f, LOST_AFTER - PEER_TIMEOUT, &[0, 1, 2, 3, 4, 5, 6]).await;
    pass(&f, PEER_TIMEOUT + Duration::from_secs(5), &[0, 3, 4, 5, 6]).await;
    let st = f.peer_status().await;
    assert_eq!(
        (st["peer-1"].state, st["peer-2"].state, st["peer-7"].state),
        (PeerState::Down, PeerState::Down, PeerState::Lost)
    );
    let view = f.dir.peer_view().await.unwrap();
    let scan = f.dir.scan_health(&view).await.unwrap();
    assert_eq!((scan.health.critical, scan.health.below_threshold), (1, 1), "{:?}", scan.health);
    let order: Vec<SegmentId> = scan.jobs.iter().map(|j| j.segment).collect();
    assert_eq!(order, vec![seg(1, 2), seg(1, 1)], "most at risk first");
    assert_eq!(f.status().await.verdict, Verdict::AtRisk);

    let rebuilder = FakeRebuilder::default();
    let r = f.dir.repair_round(&rebuilder).await.unwrap();
    assert_eq!(r.shards, 3, "both down shards of the critical segment, the lost one of the other");
    let recs = f.segment_records("vol-1", vec![seg(1, 1), seg(1, 2)]).await;
    let critical = recs[1].clone().unwrap();
    assert_eq!((critical.peers[0], critical.peers[3]), (1, 5));
    // New holders: up, and none of the segment's old holders (down ones
    // included: they may come back).
    for i in [1, 2] {
        assert!([4, 6, 7].contains(&critical.peers[i]), "{critical:?}");
    }
    assert_ne!(critical.peers[1], critical.peers[2]);
    let other = recs[0].clone().unwrap();
    assert!([1, 4, 6].iter().all(|&p| other.peers.contains(&p)), "{other:?}");
    assert!([5, 7].contains(&other.peers[3]), "{other:?}");
}

#[tokio::test]
async fn a_lower_threshold_tolerates_losses_until_it_is_crossed() {
    let f = peers_alone(8).await;
    // k = 2, m = 4, repair below 5 shards on peers not lost.
    volume_with(&f, 2, 4, 5, vec![(seg(1, 1), record(&[1, 2, 3, 4, 5, 6], 1))]).await;
    let rebuilder = FakeRebuilder::default();
    // peer-5 (id 6) lost: 5 left, at the threshold: tolerated.
    pass(&f, LOST_AFTER + PEER_TIMEOUT, &[0, 1, 2, 3, 4, 6, 7]).await;
    let s = f.status().await;
    assert_eq!((s.health.degraded, s.verdict), (1, Verdict::Degraded), "{:?}", s.health);
    assert_eq!(f.dir.repair_round(&rebuilder).await.unwrap().shards, 0);
    // peer-4 (id 5) lost too: 4 left, below: both lost shards rebuilt.
    pass(&f, LOST_AFTER + PEER_TIMEOUT, &[0, 1, 2, 3, 6, 7]).await;
    let r = f.dir.repair_round(&rebuilder).await.unwrap();
    assert_eq!(r.shards, 2);
    let mut rebuilt: Vec<u8> = rebuilder.calls().iter().map(|c| c.key.index).collect();
    rebuilt.sort();
    assert_eq!(rebuilt, vec![4, 5]);
    let now = f.segment_records("vol-1", vec![seg(1, 1)]).await[0].clone().unwrap();
    let mut new: Vec<u16> = now.peers[4..].to_vec();
    new.sort();
    assert_eq!(new, vec![7, 8]);
}

#[tokio::test]
async fn two_shards_on_one_peer_or_one_domain_are_moved_by_copy() {
    let f = Fixture::with_peers(8).await;
    // Segment 1: peer-0 (id 1) holds shards 0 and 1. Segment 2: peer-0
    // and peer-1 (ids 1, 2) share domain d0 while d1 (peer-2, peer-3)
    // holds nothing of it.
    volume_with(
        &f,
        2,
        2,
        4,
        vec![(seg(1, 1), record(&[1, 1, 5, 7], 1)), (seg(1, 2), record(&[1, 2, 5, 7], 2))],
    )
    .await;
    let s = f.status().await;
    assert_eq!(s.health.misplaced, 2, "{:?}", s.health);
    let rebuilder = FakeRebuilder::default();
    let r = f.dir.repair_round(&rebuilder).await.unwrap();
    assert_eq!(r.shards, 2);
    for c in rebuilder.calls() {
        assert_eq!(c.key.index, 1, "{c:?}");
        // The very shard is among the sources: the target copies it.
        assert!(c.sources.iter().any(|s| s.index == 1), "{c:?}");
        // To d1, the one domain holding none of either segment.
        assert!(["peer-2", "peer-3"].contains(&c.target.as_str()), "{c:?}");
    }
    let s = f.status().await;
    assert_eq!((s.health.misplaced, s.health.whole, s.verdict), (0, 2, Verdict::HealthOk), "{:?}", s.health);
}

#[tokio::test]
async fn a_segment_dropped_while_it_is_rebuilt_is_not_resurrected_and_its_new_shard_is_erased() {
    let f = Fixture::with_peers(8).await;
    volume_with(&f, 2, 2, 4, vec![(seg(1, 1), record(&[1, 3, 5, 7], 1))]).await;
    f.pass_time(LOST_AFTER + PEER_TIMEOUT, 1..8).await; // peer-0 lost
    let gate = Arc::new((Notify::new(), Notify::new()));
    let rebuilder = FakeRebuilder { gate: Some(gate.clone()), ..Default::default() };
    let round = {
        let (dir, rebuilder) = (f.dir.clone(), rebuilder.clone());
        tokio::spawn(async move { dir.repair_round(&rebuilder).await })
    };
    gate.0.notified().await;
    // Compaction drops the segment while its shard is being rebuilt.
    let drop = DirRequest::DropSegments { volume: "vol-1".into(), epoch: 1, ids: vec![seg(1, 1)] };
    assert_eq!(f.client("client-1", drop).await.unwrap(), DirResponse::Done);
    gate.1.notify_one();
    let r = round.await.unwrap().unwrap();
    assert_eq!((r.shards, r.raced), (0, true));
    assert_eq!(f.segment_records("vol-1", vec![seg(1, 1)]).await, vec![None]);
    let call = rebuilder.calls()[0].clone();
    assert_eq!(*rebuilder.erased.lock().unwrap(), vec![(call.target, call.key)]);
    // And the dropped record in dead/ is the one as dropped.
    let dead = f.meta.get(&crate::directory::schema::dead_key(&[1; 16], seg(1, 1))).await.unwrap();
    assert!(dead.is_some());
}

/// A rebuilder whose targets really keep what they rebuild: the shard
/// lands in the collector's fake peers.
#[derive(Clone)]
struct StoringRebuilder {
    peers: FakePeers,
}

impl Eraser for StoringRebuilder {
    type Error = Unreachable;

    async fn shards(
        &self,
        peer: &PeerAddr,
        volume: [u8; VOLUME_ID_LEN],
        after: Option<SegmentShardKey>,
        limit: u32,
    ) -> Result<Vec<SegmentShardKey>, Unreachable> {
        self.peers.shards(peer, volume, after, limit).await
    }

    async fn erase(&self, peer: &PeerAddr, key: SegmentShardKey, epoch: u64) -> Result<bool, Unreachable> {
        Eraser::erase(&self.peers, peer, key, epoch).await
    }
}

impl Rebuilder for StoringRebuilder {
    async fn rebuild(
        &self,
        target: &PeerAddr,
        key: SegmentShardKey,
        _root: SegmentRoot,
        _epoch: u64,
        _need: u8,
        _sources: Vec<ShardSource>,
    ) -> Result<u64, Unreachable> {
        self.peers.check(target)?;
        let mut held = self.peers.held.lock().unwrap();
        let keys = held.entry(target.name.clone()).or_default();
        if !keys.contains(&key) {
            keys.push(key);
        }
        Ok(100)
    }
}

/// The collector's peers, with a repair round slipped in just before the
/// erasure of `trigger` reaches its peer (as a repair running beside the
/// collector may, between the collector's reading of the record and its
/// erase).
#[derive(Clone)]
struct RepairBeforeErase {
    peers: FakePeers,
    dir: Arc<Directory<crate::directory::meta::embedded::RedbStore>>,
    trigger: SegmentShardKey,
    repaired: Arc<Mutex<Option<crate::directory::heal::repair::Repaired>>>,
}

impl Eraser for RepairBeforeErase {
    type Error = Unreachable;

    async fn shards(
        &self,
        peer: &PeerAddr,
        volume: [u8; VOLUME_ID_LEN],
        after: Option<SegmentShardKey>,
        limit: u32,
    ) -> Result<Vec<SegmentShardKey>, Unreachable> {
        self.peers.shards(peer, volume, after, limit).await
    }

    async fn erase(&self, peer: &PeerAddr, key: SegmentShardKey, epoch: u64) -> Result<bool, Unreachable> {
        if key == self.trigger && self.repaired.lock().unwrap().is_none() {
            let r = self.dir.repair_round(&StoringRebuilder { peers: self.peers.clone() }).await.unwrap();
            *self.repaired.lock().unwrap() = Some(r);
        }
        Eraser::erase(&self.peers, peer, key, epoch).await
    }
}

/// Whether every shard the record of `segment` names is held by its holder.
fn held_as_recorded(peers: &FakePeers, segment: SegmentId, r: &SegmentRecord) -> Vec<(u8, u16)> {
    r.peers
        .iter()
        .enumerate()
        .filter(|&(i, &id)| id != 0 && !peers.holds(usize::from(id) - 1, shard(1, segment, i as u8)))
        .map(|(i, &id)| (i as u8, id))
        .collect()
}

#[tokio::test]
async fn a_rebuilt_copy_waiting_for_its_record_is_not_erased_by_reconciliation() {
    // Five peers, k = 2, m = 2: peer-0 (id 1) is lost and peer-4 (id 5)
    // is the only peer that could take its shard.
    let f = peers_alone(5).await;
    volume_with(&f, 2, 2, 4, vec![(seg(1, 1), record(&[1, 2, 3, 4], 1))]).await;
    let peers = FakePeers::default();
    for i in 0..4u8 {
        peers.hold(usize::from(i), shard(1, seg(1, 1), i));
    }
    pass(&f, LOST_AFTER + PEER_TIMEOUT, &[1, 2, 3, 4]).await;
    assert_eq!(f.peer_status().await["peer-0"].state, PeerState::Lost);
    // A repair had peer-4 rebuild shard 0; it stored it, but its answer was
    // lost (a timeout), so the record still names peer-0.
    let copy = shard(1, seg(1, 1), 0);
    peers.hold(4, copy);
    let mut orphans = collector::Orphans::default();
    f.dir.reconcile(&peers, &mut orphans, None).await.unwrap();

    // Later than the grace, a reconciliation reads the record (shard 0 on
    // peer-0) and erases peer-4's copy; a repair round gets in between and
    // records peer-4 for shard 0 (it is the only candidate).
    pass(&f, GRACE + Duration::from_secs(5), &[1, 2, 3, 4]).await;
    let racing = RepairBeforeErase {
        peers: peers.clone(),
        dir: f.dir.clone(),
        trigger: copy,
        repaired: Default::default(),
    };
    f.dir.reconcile(&racing, &mut orphans, None).await.unwrap();
    // Whatever happened meanwhile, repair has its round now.
    f.dir.repair_round(&StoringRebuilder { peers: peers.clone() }).await.unwrap();
    let now = f.segment_records("vol-1", vec![seg(1, 1)]).await[0].clone().unwrap();
    assert_eq!(now.peers, vec![5, 2, 3, 4]);
    assert_eq!(
        held_as_recorded(&peers, seg(1, 1), &now),
        vec![],
        "a record names a holder without its shard (shard 0 on peer-4 erased: {:?})",
        peers.erased()
    );
    // And the copy is live from now on: later passes leave it.
    pass(&f, 2 * GRACE, &[1, 2, 3, 4]).await;
    f.dir.reconcile(&peers, &mut orphans, None).await.unwrap();
    f.dir.reconcile(&peers, &mut orphans, None).await.unwrap();
    assert!(peers.holds(4, copy));
    assert!(orphans.is_empty());
}

#[tokio::test]
async fn a_copy_kept_for_repair_is_erased_once_its_index_has_an_up_holder_again() {
    let f = peers_alone(5).await;
    volume_with(&f, 2, 2, 4, vec![(seg(1, 1), record(&[1, 2, 3, 4], 1))]).await;
    let peers = FakePeers::default();
    for i in 0..4u8 {
        peers.hold(usize::from(i), shard(1, seg(1, 1), i));
    }
    pass(&f, LOST_AFTER + PEER_TIMEOUT, &[1, 2, 3, 4]).await;
    let copy = shard(1, seg(1, 1), 0);
    peers.hold(4, copy);
    let mut orphans = collector::Orphans::default();
    // While shard 0's holder is lost, the copy on peer-4 is repair's to
    // record: not an orphan, however long it waits.
    assert_eq!(f.dir.reconcile(&peers, &mut orphans, None).await.unwrap().found, 0);
    pass(&f, 2 * GRACE, &[1, 2, 3, 4]).await;
    assert_eq!(f.dir.reconcile(&peers, &mut orphans, None).await.unwrap().erased, 0);
    assert!(peers.holds(4, copy));
    // peer-0 is back, holding shard 0 as recorded: the copy is surplus,
    // erased a grace after it is first seen as such.
    pass(&f, Duration::from_secs(5), &[0, 1, 2, 3, 4]).await;
    assert_eq!(f.dir.reconcile(&peers, &mut orphans, None).await.unwrap().found, 1);
    pass(&f, GRACE, &[0, 1, 2, 3, 4]).await;
    assert_eq!(f.dir.reconcile(&peers, &mut orphans, None).await.unwrap().erased, 1);
    assert!(!peers.holds(4, copy) && peers.holds(0, copy));
}

#[tokio::test]
async fn after_a_long_directory_outage_a_peer_not_heard_from_since_the_restart_is_not_lost() {
    let f = peers_alone(5).await;
    volume_with(&f, 2, 2, 4, vec![(seg(1, 1), record(&[1, 2, 3, 4], 1))]).await;
    // vol-2 was deleted; its shard on peer-2 is still to be erased.
    f.create_volume(spec("vol-2", 2, 2, 2)).await;
    f.client("client-1", DirRequest::DeleteVolume { volume: "vol-2".into() }).await.unwrap();
    let peers = FakePeers::default();
    let deleted = shard(2, seg(1, 1), 0);
    peers.hold(2, deleted);

    // The directory is down for longer than peer_lost_after, then starts
    // again. Every peer but peer-2 reports at once; peer-2's heartbeat is
    // still stuck on the old connection.
    f.clock.advance(LOST_AFTER + Duration::from_secs(60));
    let f = f.restart().await;
    let reporting = [0, 1, 3, 4];
    for &i in &reporting {
        heartbeat_alone(&f, i).await;
    }
    // The first repair scan and collector pass, a few seconds later.
    pass(&f, Duration::from_secs(5), &reporting).await;
    let rebuilder = FakeRebuilder::default();
    let r = f.dir.repair_round(&rebuilder).await.unwrap();
    assert_eq!(
        (r.shards, rebuilder.calls().len()),
        (0, 0),
        "peer-2 was silent mostly while the directory was not watching: not lost, nothing to rebuild"
    );
    assert_ne!(f.peer_status().await["peer-2"].state, PeerState::Lost);
    assert_eq!(f.dir.collect_once(&peers).await.unwrap(), 1, "the deleted volume waits for peer-2");
    assert!(peers.holds(2, deleted));

    // Silent for peer_lost_after since the restart: lost, and repaired.
    pass(&f, LOST_AFTER + PEER_TIMEOUT, &reporting).await;
    assert_eq!(f.peer_status().await["peer-2"].state, PeerState::Lost);
    assert_eq!(f.dir.repair_round(&rebuilder).await.unwrap().shards, 1);
}

#[tokio::test]
async fn attaches_report_their_clients_load_with_renewals_and_it_fades() {
    let f = Fixture::with_peers(4).await;
    f.leased_volume(1).await;
    assert_eq!(f.dir.client_load(), 0);
    let renew = DirRequest::RenewLease { volume: "vol-1".into(), epoch: 1, ops: 500 };
    f.client("client-1", renew).await.unwrap();
    assert_eq!(f.dir.client_load(), 500, "repair sees the volume busy");
    // Not renewed again for two renewal periods: no longer counted.
    f.clock.advance(LEASE_TTL);
    assert_eq!(f.dir.client_load(), 0);
}

#[tokio::test]
async fn a_shard_its_holder_reports_bad_is_forgotten_and_rebuilt_only_while_named() {
    let f = peers_alone(6).await;
    volume_with(&f, 2, 2, 4, vec![(seg(1, 1), record(&[1, 2, 3, 4], 1))]).await;
    let v = f.volume_record("vol-1").await;
    let key = |index: u8| SegmentShardKey { volume: v.spec.id, segment: seg(1, 1), index };
    let fault = |index: u8| ShardFault { shard: key(index), problem: "hash mismatch".into() };
    let report = |peer: usize, faults: Vec<ShardFault>| {
        let f = &f;
        async move { f.ask(&peer_name(peer), Role::Peer, DirRequest::ReportShardFaults { faults }).await }
    };

    // Only a peer reports, and only about what it holds: peer-2 (id 3)
    // reporting index 1 (held by id 2) changes nothing; a client may not.
    report(2, vec![fault(1)]).await.unwrap();
    let err = f
        .ask("client-1", Role::Client, DirRequest::ReportShardFaults { faults: vec![fault(1)] })
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Refused);
    assert_eq!(
        ids_of(&f.segment_records("vol-1", vec![seg(1, 1)]).await[0].clone().unwrap()),
        vec![1, 2, 3, 4]
    );

    // Its holder (peer-1, id 2) reports it: the slot is cleared, the
    // segment is below its threshold, and repair rebuilds index 1 from the
    // other three, never reading the bad copy.
    report(1, vec![fault(1), ShardFault { shard: SegmentShardKey { index: 0, ..key(0) }, ..fault(0) }])
        .await
        .unwrap();
    let now = f.segment_records("vol-1", vec![seg(1, 1)]).await[0].clone().unwrap();
    assert_eq!(ids_of(&now), vec![1, 0, 3, 4], "index 0 is held by id 1, not the reporter");
    let s = f.status().await;
    assert_eq!((s.health.below_threshold, s.repair.forgotten), (1, 1), "{:?}", s.health);
    let rebuilder = FakeRebuilder::default();
    let r = f.dir.repair_round(&rebuilder).await.unwrap();
    assert_eq!((r.shards, r.failed), (1, 0));
    let calls = rebuilder.calls();
    assert_eq!(calls[0].key.index, 1);
    let mut from: Vec<u8> = calls[0].sources.iter().map(|s| s.index).collect();
    from.sort();
    assert_eq!(from, vec![0, 2, 3]);
    let now = f.segment_records("vol-1", vec![seg(1, 1)]).await[0].clone().unwrap();
    assert!(now.peers[1] != 0 && now.peers[1] != 1 && now.peers[1] != 3 && now.peers[1] != 4, "{now:?}");
    assert_eq!(f.status().await.verdict, Verdict::HealthOk);

    // A report for a segment freed meanwhile is no error.
    report(1, vec![ShardFault { shard: SegmentShardKey { segment: seg(1, 9), ..key(1) }, ..fault(1) }])
        .await
        .unwrap();
}

#[tokio::test]
async fn scrubbing_peers_get_segment_roots_and_a_pause_that_ends_by_itself() {
    let f = peers_alone(6).await;
    volume_with(
        &f,
        2,
        2,
        4,
        vec![(seg(1, 1), record(&[1, 2, 3, 4], 7)), (seg(1, 2), record(&[1, 2, 3, 4], 8))],
    )
    .await;
    let v = f.volume_record("vol-1").await;
    let key = |segment, index| SegmentShardKey { volume: v.spec.id, segment, index };
    // Roots in order; a segment without a record has none.
    let shards = vec![key(seg(1, 1), 0), key(seg(1, 1), 1), key(seg(1, 2), 0), key(seg(1, 9), 0)];
    let asked = DirRequest::SegmentRoots { shards: shards.clone() };
    let answer = f.ask(&peer_name(1), Role::Peer, asked).await.unwrap();
    assert_eq!(answer, DirResponse::Roots(vec![Some([7; 32]), Some([7; 32]), Some([8; 32]), None]));
    let err = f.ask("client-1", Role::Client, DirRequest::SegmentRoots { shards }).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Refused, "only peers ask for roots");

    // The directive every heartbeat answer carries.
    let directive = || async {
        let report = report_of(1, "x1");
        match f.ask(&peer_name(1), Role::Peer, DirRequest::Heartbeat(report)).await.unwrap() {
            DirResponse::Heartbeat { scrub, .. } => scrub,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(directive().await, ScrubDirective::default());
    let scrub = |cmd| f.ask("admin", Role::Admin, DirRequest::Scrub(cmd));
    assert_eq!(
        f.ask(&peer_name(1), Role::Peer, DirRequest::Scrub(ScrubCommand::Resume)).await.unwrap_err().kind,
        ErrorKind::Refused
    );
    scrub(ScrubCommand::Pause { for_ms: Some(60_000) }).await.unwrap();
    assert_eq!(directive().await.paused_for_ms, Some(60_000));
    assert!(f.status().await.scrub.paused_until_ms.is_some());
    f.clock.advance(Duration::from_secs(45));
    assert_eq!(directive().await.paused_for_ms, Some(15_000));
    f.clock.advance(Duration::from_secs(15));
    assert_eq!(directive().await.paused_for_ms, None, "the pause is over by itself");
    assert_eq!(f.status().await.scrub.paused_until_ms, None);
    // Paused until resumed; a start lifts the pause and is dated.
    scrub(ScrubCommand::Pause { for_ms: None }).await.unwrap();
    f.clock.advance(Duration::from_secs(86_400 * 365));
    assert_eq!(directive().await.paused_for_ms, Some(u64::MAX));
    scrub(ScrubCommand::Start).await.unwrap();
    let d = directive().await;
    assert_eq!(d.paused_for_ms, None);
    assert_eq!(d.start_requested_ms, Some(f.dir.now()));
}

#[tokio::test]
async fn a_repeated_report_does_not_forget_the_good_copy_rebuilt_on_the_same_peer() {
    // Four peers, four shards: once peer-0 (id 1) loses index 0, it is the
    // only peer holding no other shard of the segment, so repair rebuilds
    // index 0 there.
    let f = peers_alone(4).await;
    volume_with(&f, 2, 2, 4, vec![(seg(1, 1), record(&[1, 2, 3, 4], 1))]).await;
    let v = f.volume_record("vol-1").await;
    let fault = ShardFault {
        shard: SegmentShardKey { volume: v.spec.id, segment: seg(1, 1), index: 0 },
        problem: "hash mismatch".into(),
    };
    let report = || {
        let (f, fault) = (&f, fault.clone());
        async move {
            f.ask(&peer_name(0), Role::Peer, DirRequest::ReportShardFaults { faults: vec![fault] }).await
        }
    };
    report().await.unwrap();
    assert_eq!(
        ids_of(&f.segment_records("vol-1", vec![seg(1, 1)]).await[0].clone().unwrap()),
        vec![0, 2, 3, 4]
    );
    let rebuilder = FakeRebuilder::default();
    assert_eq!(f.dir.repair_round(&rebuilder).await.unwrap().shards, 1);
    assert_eq!(rebuilder.calls()[0].target, peer_name(0));
    assert_eq!(
        ids_of(&f.segment_records("vol-1", vec![seg(1, 1)]).await[0].clone().unwrap()),
        vec![1, 2, 3, 4]
    );
    // The same report again (its first answer was lost): a repeat.
    report().await.unwrap();
    assert_eq!(
        ids_of(&f.segment_records("vol-1", vec![seg(1, 1)]).await[0].clone().unwrap()),
        vec![1, 2, 3, 4]
    );
    assert_eq!(f.status().await.repair.forgotten, 1);
    // Past the window, a report is news again.
    f.clock.advance(crate::directory::heal::faults::REPEAT_WINDOW);
    for i in 0..4 {
        heartbeat_alone(&f, i).await;
    }
    report().await.unwrap();
    assert_eq!(f.status().await.repair.forgotten, 2);
}
