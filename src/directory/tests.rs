//! In-process tests of the directory's logic: a [`Directory`] on the
//! embedded store in a temporary folder, a [`ManualClock`] that the tests
//! move (the store's leases follow it too), a pinned placement seed, and
//! requests made through [`Directory::dispatch`] with a made-up [`Caller`].
//! No QUIC, no processes; the collector's peers are a recording fake.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::heal::collector::{self, Eraser};
use super::meta::embedded::RedbStore;
use super::meta::{MetaStore, Op, Txn};
use super::{Directory, Timing};
use crate::api::*;
use crate::codec::key::VolumeKey;
use crate::codec::root::{RootKey, RootRecord};
use crate::codec::segment::SegmentShardKey;
use crate::codec::sequence::{SegmentId, Sequence};
use crate::membership::ca::{CertName, ClusterCa, Role};
use crate::sys::clock::ManualClock;
use crate::transport::rpc::Caller;

/// Some time in 2023: far from 0, so nothing underflows.
const T0: u64 = 1_700_000_000_000;
const SEED: u64 = 42;
const PEER_TIMEOUT: Duration = Duration::from_secs(10);
const LEASE_TTL: Duration = Duration::from_secs(20);
/// The collection grace and reconciliation period of these tests.
const GRACE: Duration = Duration::from_secs(60);
/// A peer silent this long is lost (repair rebuilds its shards).
const LOST_AFTER: Duration = Duration::from_secs(600);
const TIMING: Timing = Timing {
    peer_timeout: PEER_TIMEOUT,
    peer_lost_after: LOST_AFTER,
    lease_ttl: LEASE_TTL,
    drop_grace: GRACE,
    collect_grace: GRACE,
    reconcile_every: Duration::from_secs(600),
};
/// A volume's shard size.
const SHARD: u32 = 4096;
/// Bytes of one shard (header and payload) as placement asks for room.
const SHARD_BYTES: u64 = 4096 + 256;
const GIB: u64 = 1 << 30;

mod drain;
mod repair;
mod scrub;
mod segment_health;

struct Fixture {
    dir: Arc<Directory<RedbStore>>,
    meta: RedbStore,
    clock: ManualClock,
    _tmp: tempfile::TempDir,
}

fn caller(node: &str, role: Role) -> Caller {
    Caller {
        name: Some(CertName { node: node.into(), role, cluster: "test".into() }),
        addr: "127.0.0.1:1".parse().unwrap(),
        rtt: Duration::ZERO,
    }
}

/// The peers of [`Fixture::with_peers`]: `peer-<i>` in domain `d<i / 2>`.
fn peer_name(i: usize) -> String {
    format!("peer-{i}")
}

fn addr_of(i: usize) -> std::net::SocketAddr {
    format!("127.0.0.1:{}", 7400 + i).parse().unwrap()
}

/// What peer `i` reports from failure domain `domain`: 1 GiB, empty, idle.
fn report_of(i: usize, domain: &str) -> PeerReport {
    PeerReport {
        addr: addr_of(i),
        failure_domain: domain.into(),
        capacity: GIB,
        used: 0,
        load: 0,
        client_ops: 0,
        problem: None,
        rtts: vec![],
        scrub: None,
    }
}

fn spec(name: &str, id: u8, k: u8, m: u8) -> VolumeSpec {
    VolumeSpec {
        name: name.into(),
        id: [id; VOLUME_ID_LEN],
        size: 4 * u64::from(k) * u64::from(SHARD),
        k,
        m,
        shard_size: SHARD,
        repair_threshold: k + 1,
        key_check: [0; 32],
        key_slots: throwaway_key_slots(),
        durability: Durability::Remote,
        lineage: Vec::new(),
    }
}

/// Key slots that parse, over a throwaway key file (these tests never
/// open a volume's data).
fn throwaway_key_slots() -> Vec<u8> {
    let file = crate::codec::VolumeKey::generate().unwrap();
    crate::codec::keyslot::KeySlots::create(&crate::codec::keyslot::NewSlot::KeyFile(&file))
        .unwrap()
        .1
        .encode()
}

impl Fixture {
    async fn new() -> Self {
        Self::seeded(SEED).await
    }

    async fn seeded(seed: u64) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let clock = ManualClock::starting_at(T0);
        let meta = RedbStore::open_with_clock(&tmp.path().join("directory.redb"), clock.clock()).unwrap();
        let ca = ClusterCa::create(tmp.path(), "test").unwrap();
        let timing = TIMING;
        let dir = Directory::new(meta.clone(), ca, timing, clock.clock()).unwrap().with_seed(seed);
        Self { dir: Arc::new(dir), meta, clock, _tmp: tmp }
    }

    /// A fixture whose `n` peers have all reported, two per failure domain.
    async fn with_peers(n: usize) -> Self {
        let f = Self::new().await;
        for i in 0..n {
            f.heartbeat(i).await;
        }
        f
    }

    async fn ask(&self, node: &str, role: Role, req: DirRequest) -> Result<DirResponse, Remote> {
        self.dir.dispatch(&caller(node, role), req).await
    }

    /// A request from the client `node`.
    async fn client(&self, node: &str, req: DirRequest) -> Result<DirResponse, Remote> {
        self.ask(node, Role::Client, req).await
    }

    async fn heartbeat(&self, i: usize) -> Vec<String> {
        let report = report_of(i, &format!("d{}", i / 2));
        match self.ask(&peer_name(i), Role::Peer, DirRequest::Heartbeat(report)).await.unwrap() {
            DirResponse::Heartbeat { peers, peer_timeout_ms, .. } => {
                assert_eq!(peer_timeout_ms, PEER_TIMEOUT.as_millis() as u64);
                peers.into_iter().map(|p| p.name).collect()
            }
            other => panic!("{other:?}"),
        }
    }

    async fn status(&self) -> ClusterStatus {
        match self.ask("admin", Role::Admin, DirRequest::Status).await.unwrap() {
            DirResponse::Status(s) => *s,
            other => panic!("{other:?}"),
        }
    }

    async fn peer_status(&self) -> HashMap<String, PeerStatus> {
        self.status().await.peers.into_iter().map(|p| (p.name.clone(), p)).collect()
    }

    async fn create_volume(&self, spec: VolumeSpec) -> VolumeRecord {
        match self.client("client-1", DirRequest::CreateVolume(spec)).await.unwrap() {
            DirResponse::Volume(v) => v,
            other => panic!("{other:?}"),
        }
    }

    async fn acquire(&self, node: &str, volume: &str, force: bool) -> Result<VolumeLease, Remote> {
        let req = DirRequest::AcquireLease {
            volume: volume.into(),
            force,
            resume: None,
            host: format!("{node}-host"),
        };
        match self.client(node, req).await? {
            DirResponse::Lease(l) => Ok(l),
            other => panic!("{other:?}"),
        }
    }

    async fn renew(&self, node: &str, volume: &str, epoch: u64) -> Result<VolumeLease, Remote> {
        match self.client(node, DirRequest::RenewLease { volume: volume.into(), epoch, ops: 0 }).await? {
            DirResponse::Lease(l) => Ok(l),
            other => panic!("{other:?}"),
        }
    }
}

// ---- placement ----

#[tokio::test]
async fn segments_go_to_k_plus_m_distinct_peers_one_per_failure_domain() {
    let f = Fixture::with_peers(8).await;
    f.leased_volume(1).await;
    for p in f.place_segments("client-1", "vol-1", 1, 10, vec![]).await.unwrap() {
        let names: HashSet<&str> = p.peers.iter().map(|s| s.addr.name.as_str()).collect();
        assert_eq!(names.len(), 4, "{p:?}");
        // Peers 2i and 2i+1 share domain d<i>: four domains, one shard each.
        let domains: HashSet<String> =
            p.peers.iter().map(|s| format!("d{}", (s.addr.addr.port() - 7400) / 2)).collect();
        assert_eq!(domains.len(), 4, "{p:?}");
    }
}

#[tokio::test]
async fn with_a_pinned_seed_placement_is_the_same_every_run() {
    let mut runs = Vec::new();
    for _ in 0..2 {
        let f = Fixture::new().await;
        for i in 0..12 {
            f.heartbeat(i).await;
        }
        f.create_volume(spec("vol-1", 1, 4, 2)).await;
        f.acquire("client-1", "vol-1", false).await.unwrap();
        let picks: Vec<Vec<String>> = f
            .place_segments("client-1", "vol-1", 1, 4, vec![])
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.peers.into_iter().map(|s| s.addr.name).collect())
            .collect();
        runs.push(picks);
    }
    assert_eq!(runs[0], runs[1]);
    // And the draws do differ between segments (the seed is used, not
    // fixed into one answer).
    assert!(runs[0].iter().collect::<HashSet<_>>().len() > 1, "{:?}", runs[0]);
}

#[tokio::test]
async fn placement_counts_free_space_and_a_full_cluster_is_full() {
    let f = Fixture::with_peers(4).await;
    f.leased_volume(1).await;
    // Three peers report themselves nearly full: with k + 1 = 3 peers
    // needed at least, one with room is not enough.
    for i in 1..4 {
        let report = PeerReport {
            addr: addr_of(i),
            failure_domain: format!("d{}", i / 2),
            capacity: GIB,
            used: GIB - SHARD_BYTES + 1,
            load: 0,
            client_ops: 0,
            problem: None,
            rtts: vec![],
            scrub: None,
        };
        f.ask(&peer_name(i), Role::Peer, DirRequest::Heartbeat(report)).await.unwrap();
    }
    let err = f.place_segments("client-1", "vol-1", 1, 1, vec![]).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Full, "{err}");
    assert_eq!(f.peer_status().await["peer-1"].used, GIB - SHARD_BYTES + 1);
}

#[tokio::test]
async fn new_writes_leave_compactions_reserve_free_and_compaction_may_use_it() {
    let f = Fixture::with_peers(4).await;
    f.leased_volume(1).await;
    // Every peer has room for three shards.
    for i in 0..4 {
        let report = PeerReport {
            addr: addr_of(i),
            failure_domain: format!("d{i}"),
            capacity: GIB,
            used: GIB - 3 * SHARD_BYTES,
            load: 0,
            client_ops: 0,
            problem: None,
            rtts: vec![],
            scrub: None,
        };
        f.ask(&peer_name(i), Role::Peer, DirRequest::Heartbeat(report)).await.unwrap();
    }
    let place = |keep_free: u64| {
        let req = DirRequest::PlaceSegments {
            volume: "vol-1".into(),
            epoch: 1,
            count: 1,
            shard_bytes: SHARD_BYTES,
            exclude: vec![],
            keep_free,
        };
        f.client("client-1", req)
    };
    // A commit of new writes that must leave three shards' room free is
    // refused as full; compaction (nothing kept) still places.
    assert_eq!(place(3 * SHARD_BYTES).await.unwrap_err().kind, ErrorKind::Full);
    assert!(
        matches!(place(2 * SHARD_BYTES).await.unwrap(), DirResponse::SegmentPlacements(p) if p.len() == 1)
    );
    assert!(matches!(place(0).await.unwrap(), DirResponse::SegmentPlacements(p) if p.len() == 1));
}

// ---- write leases ----

#[tokio::test]
async fn a_write_lease_is_held_renewed_lapses_on_the_clock_and_is_released() {
    let f = Fixture::with_peers(4).await;
    f.create_volume(spec("vol", 1, 2, 2)).await;
    let a = f.acquire("client-a", "vol", false).await.unwrap();
    assert_eq!((a.holder.as_str(), a.epoch, a.since_ms), ("client-a", 1, T0));
    assert_eq!(a.ttl_ms, LEASE_TTL.as_millis() as u64);

    // A second writer is refused, told who holds it.
    let err = f.acquire("client-b", "vol", false).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Conflict, "{err}");
    assert!(err.message.contains("attached by client-a on client-a-host"), "{err}");

    // Renewals keep it past its first time to live.
    for _ in 0..3 {
        f.clock.advance(LEASE_TTL / 2);
        assert_eq!(f.renew("client-a", "vol", 1).await.unwrap().epoch, 1);
    }
    assert!(f.acquire("client-b", "vol", false).await.is_err());
    let err = f.renew("client-b", "vol", 1).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Fenced, "{err}");

    // Unrenewed, it lapses after its time to live: b gets it, a is fenced.
    f.clock.advance(LEASE_TTL + Duration::from_millis(1));
    let b = f.acquire("client-b", "vol", false).await.unwrap();
    assert_eq!(b.epoch, 2);
    let err = f.renew("client-a", "vol", 1).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Fenced, "{err}");

    // A release with the wrong epoch or by another does nothing; the
    // holder's frees the volume at once.
    f.client("client-a", DirRequest::ReleaseLease { volume: "vol".into(), epoch: 2 }).await.unwrap();
    f.client("client-b", DirRequest::ReleaseLease { volume: "vol".into(), epoch: 1 }).await.unwrap();
    assert!(f.acquire("client-a", "vol", false).await.is_err());
    f.client("client-b", DirRequest::ReleaseLease { volume: "vol".into(), epoch: 2 }).await.unwrap();
    assert_eq!(f.acquire("client-a", "vol", false).await.unwrap().epoch, 3);
}

#[tokio::test]
async fn a_forced_takeover_raises_the_epoch_and_the_old_holder_may_resume_only_its_own() {
    let f = Fixture::with_peers(4).await;
    let v = f.create_volume(spec("vol", 1, 2, 2)).await;
    assert_eq!(v.epoch, 0);
    f.acquire("client-a", "vol", false).await.unwrap();
    let b = f.acquire("client-b", "vol", true).await.unwrap();
    assert_eq!((b.holder.as_str(), b.epoch), ("client-b", 2));
    let err = f.renew("client-a", "vol", 1).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Fenced, "{err}");
    assert!(err.message.contains("taken over by client-b"), "{err}");
    // client-b, restarting, resumes its own lease without --force.
    let req =
        DirRequest::AcquireLease { volume: "vol".into(), force: false, resume: Some(2), host: "h".into() };
    match f.client("client-b", req.clone()).await.unwrap() {
        DirResponse::Lease(l) => assert_eq!(l.epoch, 3),
        other => panic!("{other:?}"),
    }
    // client-a cannot resume b's lease.
    assert_eq!(f.client("client-a", req).await.unwrap_err().kind, ErrorKind::Conflict);
    // An attached volume is not deleted.
    let err = f.client("client-1", DirRequest::DeleteVolume { volume: "vol".into() }).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Conflict, "{err}");
}

#[tokio::test]
async fn key_slots_change_by_compare_and_set_only_for_clients_and_admins() {
    let f = Fixture::with_peers(2).await;
    let v = f.create_volume(spec("vol", 1, 1, 1)).await;
    let old = v.spec.key_slots.clone();
    let new = throwaway_key_slots();
    let set = |expected: &[u8], slots: &[u8]| DirRequest::SetKeySlots {
        volume: "vol".into(),
        expected: expected.to_vec(),
        slots: slots.to_vec(),
    };
    // A peer may not; slots that do not parse are refused, nothing changed.
    let err = f.ask("peer-0", Role::Peer, set(&old, &new)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Refused, "{err}");
    let err = f.client("client-1", set(&old, b"MDKS garbage")).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    assert!(err.message.contains("key slots"), "{err}");
    // A lease taken meanwhile changes the record (its epoch), not the
    // slots: the swap still goes through and keeps the epoch.
    f.acquire("client-a", "vol", false).await.unwrap();
    match f.client("client-1", set(&old, &new)).await.unwrap() {
        DirResponse::Volume(r) => assert_eq!((r.spec.key_slots.as_slice(), r.epoch), (new.as_slice(), 1)),
        other => panic!("{other:?}"),
    }
    match f.client("client-1", DirRequest::Volume { volume: "vol".into() }).await.unwrap() {
        DirResponse::Volume(r) => {
            assert_eq!(r.spec.key_slots, new);
            assert_eq!(r.spec.key_check, v.spec.key_check);
            assert_eq!(r.epoch, 1);
        }
        other => panic!("{other:?}"),
    }
    // A second change from the same starting point loses: Conflict.
    let err = f.ask("admin", Role::Admin, set(&old, &throwaway_key_slots())).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Conflict, "{err}");
    assert!(err.message.contains("changed since they were read"), "{err}");
    let err = f
        .client(
            "client-1",
            DirRequest::SetKeySlots { volume: "none".into(), expected: new.clone(), slots: new.clone() },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    // Creating a volume with slots that do not parse is refused too.
    let mut bad = spec("bad", 2, 1, 1);
    bad.key_slots = vec![];
    let err = f.client("client-1", DirRequest::CreateVolume(bad)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
}

// ---- members ----

#[tokio::test]
async fn a_peer_is_down_once_its_last_report_is_older_than_the_timeout() {
    let f = Fixture::with_peers(3).await;
    assert!(f.peer_status().await.values().all(|p| p.state == PeerState::Up));
    f.clock.advance(PEER_TIMEOUT);
    assert!(f.peer_status().await.values().all(|p| p.state == PeerState::Up), "at the timeout, still up");
    f.clock.advance(Duration::from_millis(1));
    // Peer 0 reports again; the others are down, and a heartbeat's answer
    // (the peers worth talking to) leaves them out.
    assert_eq!(f.heartbeat(0).await, Vec::<String>::new());
    let peers = f.peer_status().await;
    assert_eq!(peers["peer-0"].state, PeerState::Up);
    assert_eq!(peers["peer-1"].state, PeerState::Down);
    assert_eq!(peers["peer-2"].state, PeerState::Down);
    assert_eq!(f.heartbeat(1).await, vec!["peer-0".to_string()]);
    // Placement uses only the peers that are up.
    f.create_volume(spec("vol-1", 1, 1, 1)).await;
    f.acquire("client-1", "vol-1", false).await.unwrap();
    let p = f.place_segments("client-1", "vol-1", 1, 1, vec![]).await.unwrap();
    let mut names: Vec<String> = p[0].peers.iter().map(|s| s.addr.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["peer-0", "peer-1"]);
}

#[tokio::test]
async fn requests_are_checked_against_the_callers_role() {
    let f = Fixture::with_peers(1).await;
    let err = f.ask("peer-0", Role::Peer, DirRequest::Status).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Refused, "{err}");
    let report = PeerReport { capacity: 0, ..report_of(9, "") };
    let err = f.client("client-1", DirRequest::Heartbeat(report)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Refused, "{err}");
    let anonymous = Caller { name: None, ..caller("x", Role::Client) };
    let err = f.dir.dispatch(&anonymous, DirRequest::Status).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Refused, "{err}");
    // A token's expiry is on the directory's clock.
    match f
        .ask("admin", Role::Admin, DirRequest::CreateToken { role: Role::Peer, ttl_secs: 60 })
        .await
        .unwrap()
    {
        DirResponse::Token { expires_ms, .. } => assert_eq!(expires_ms, T0 + 60_000),
        other => panic!("{other:?}"),
    }
}

// ---- the collector ----

/// Peers as the collector sees them: a map of who holds which shards,
/// every erase recorded, and peers that fail every call.
#[derive(Clone, Default)]
struct FakePeers {
    held: Arc<Mutex<HashMap<String, Vec<SegmentShardKey>>>>,
    erased: Arc<Mutex<Vec<(String, SegmentShardKey, u64)>>>,
    failing: Arc<Mutex<HashSet<String>>>,
    /// Copies stored again (a shard put anew on that peer): its copy id
    /// is how many times; a shard never stored again has copy 0.
    stored_again: Arc<Mutex<HashMap<(String, SegmentShardKey), u8>>>,
    /// Stored anew just before the next erase of it reaches the peer (a
    /// repair's rebuild racing the collector).
    store_before_erase: Arc<Mutex<Option<(String, SegmentShardKey)>>>,
}

#[derive(Debug)]
struct Unreachable;

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("unreachable")
    }
}

impl FakePeers {
    fn check(&self, peer: &PeerAddr) -> Result<(), Unreachable> {
        if self.failing.lock().unwrap().contains(&peer.name) { Err(Unreachable) } else { Ok(()) }
    }

    fn erased(&self) -> Vec<(String, SegmentShardKey, u64)> {
        let mut e = self.erased.lock().unwrap().clone();
        e.sort_by_key(|(p, k, _)| (p.clone(), *k));
        e
    }
}

impl Eraser for FakePeers {
    type Error = Unreachable;

    async fn shards(
        &self,
        peer: &PeerAddr,
        volume: [u8; VOLUME_ID_LEN],
        after: Option<SegmentShardKey>,
        limit: u32,
    ) -> Result<Vec<SegmentShardKey>, Unreachable> {
        self.check(peer)?;
        let held = self.held.lock().unwrap();
        let mut keys: Vec<SegmentShardKey> =
            held.get(&peer.name).into_iter().flatten().filter(|k| k.volume == volume).copied().collect();
        keys.sort();
        Ok(keys.into_iter().filter(|k| after.is_none_or(|a| *k > a)).take(limit as usize).collect())
    }

    async fn erase(&self, peer: &PeerAddr, key: SegmentShardKey, epoch: u64) -> Result<bool, Unreachable> {
        self.check(peer)?;
        let mut existed = false;
        if let Some(keys) = self.held.lock().unwrap().get_mut(&peer.name) {
            existed = keys.contains(&key);
            keys.retain(|k| *k != key);
        }
        self.erased.lock().unwrap().push((peer.name.clone(), key, epoch));
        Ok(existed)
    }

    async fn copies(
        &self,
        peer: &PeerAddr,
        volume: [u8; VOLUME_ID_LEN],
        after: Option<SegmentShardKey>,
        limit: u32,
    ) -> Result<Vec<(SegmentShardKey, Option<CopyId>)>, Unreachable> {
        let keys = self.shards(peer, volume, after, limit).await?;
        Ok(keys.into_iter().map(|k| (k, Some(self.copy(&peer.name, k)))).collect())
    }

    async fn erase_copy(
        &self,
        peer: &PeerAddr,
        key: SegmentShardKey,
        epoch: u64,
        copy: Option<CopyId>,
    ) -> Result<bool, Unreachable> {
        let race = self.store_before_erase.lock().unwrap().take_if(|r| *r == (peer.name.clone(), key));
        if race.is_some() {
            self.store_again(&peer.name, key);
        }
        if copy.is_some_and(|c| c != self.copy(&peer.name, key)) {
            self.check(peer)?;
            return Ok(false);
        }
        self.erase(peer, key, epoch).await
    }
}

impl FakePeers {
    fn copy(&self, peer: &str, key: SegmentShardKey) -> CopyId {
        let n = self.stored_again.lock().unwrap().get(&(peer.to_owned(), key)).copied().unwrap_or(0);
        [n; 16]
    }

    /// `peer` stores `key` anew (a rebuild onto it): a new copy.
    fn store_again(&self, peer: &str, key: SegmentShardKey) {
        *self.stored_again.lock().unwrap().entry((peer.to_owned(), key)).or_default() += 1;
        let mut held = self.held.lock().unwrap();
        let keys = held.entry(peer.to_owned()).or_default();
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
}

#[tokio::test]
async fn a_deleted_volume_is_erased_from_every_peer_and_dequeued_after_a_clean_pass() {
    let f = Fixture::with_peers(4).await;
    f.leased_volume(1).await;
    let id = [1; VOLUME_ID_LEN];
    // Two segments of four shards, one on each peer, and more than a page
    // of shards (a put that landed after the commit, say) on peer-0.
    let segments = vec![(seg(1, 1), record(&[1, 2, 3, 4], 1)), (seg(1, 2), record(&[4, 3, 2, 1], 2))];
    f.commit_root("client-1", root_commit(1, 1, None, segments)).await.unwrap();
    let peers = FakePeers::default();
    for n in 1..=2 {
        for index in 0..4u8 {
            let key = SegmentShardKey { volume: id, segment: seg(1, n), index };
            let holder = if n == 1 { index } else { 3 - index };
            peers.held.lock().unwrap().entry(peer_name(usize::from(holder))).or_default().push(key);
        }
    }
    for n in 3..1500 {
        let key = SegmentShardKey { volume: id, segment: seg(1, n), index: 0 };
        peers.held.lock().unwrap().entry(peer_name(0)).or_default().push(key);
    }
    // Another volume's shards stay.
    let other = SegmentShardKey { volume: [2; VOLUME_ID_LEN], segment: seg(1, 1), index: 0 };
    peers.held.lock().unwrap().entry(peer_name(0)).or_default().push(other);
    f.client("client-1", DirRequest::ReleaseLease { volume: "vol-1".into(), epoch: 1 }).await.unwrap();
    f.client("client-1", DirRequest::DeleteVolume { volume: "vol-1".into() }).await.unwrap();
    assert_eq!(f.meta.list(b"segs/").await.unwrap().len(), 0);

    let plan = f.dir.plan_deleted().await.unwrap();
    assert_eq!(plan.len(), 1);
    assert_eq!(plan[0].volume, id);
    assert!(plan[0].all_up);
    assert_eq!(plan[0].peers.len(), 4);

    // The first pass erases (at the largest epoch) but must be confirmed
    // by a pass that finds nothing.
    assert_eq!(f.dir.collect_once(&peers).await.unwrap(), 1);
    assert_eq!(peers.erased().len(), 8 + 1497);
    assert!(peers.erased().iter().all(|(_, k, epoch)| *epoch == u64::MAX && k.volume == id));
    assert_eq!(peers.held.lock().unwrap()[&peer_name(0)], [other]);
    assert_eq!(f.dir.collect_once(&peers).await.unwrap(), 0);
    assert!(f.meta.list(b"gc/").await.unwrap().is_empty());
    // The name is free again.
    f.create_volume(spec("vol-1", 3, 2, 2)).await;
}

#[tokio::test]
async fn a_deleted_volume_stays_queued_while_a_peer_is_down() {
    let f = Fixture::with_peers(2).await;
    f.create_volume(spec("vol", 1, 1, 1)).await;
    f.client("client-1", DirRequest::DeleteVolume { volume: "vol".into() }).await.unwrap();
    f.clock.advance(PEER_TIMEOUT + Duration::from_secs(1));
    f.heartbeat(0).await;
    let plan = f.dir.plan_deleted().await.unwrap();
    assert!(!plan[0].all_up);
    assert_eq!(plan[0].peers.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["peer-0"]);
    let peers = FakePeers::default();
    assert_eq!(f.dir.collect_once(&peers).await.unwrap(), 1);
    f.heartbeat(1).await;
    assert_eq!(f.dir.collect_once(&peers).await.unwrap(), 0);
}

#[tokio::test]
async fn the_collector_runs_on_the_directorys_runner_woken_by_a_delete_and_shows_in_status() {
    let f = Fixture::with_peers(4).await;
    let v = f.create_volume(spec("vol", 1, 2, 2)).await;
    let peers = FakePeers::default();
    for i in 0..4 {
        let key = SegmentShardKey { volume: v.spec.id, segment: seg(1, 1), index: i as u8 };
        peers.held.lock().unwrap().entry(peer_name(i)).or_default().push(key);
    }
    collector::start(&f.dir, peers.clone());
    let workers = f.status().await.workers;
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].name, "collector");

    // A delete wakes it; it erases without waiting a period (and needs a
    // second pass, a period later, to confirm and dequeue).
    f.client("client-1", DirRequest::DeleteVolume { volume: "vol".into() }).await.unwrap();
    let started = std::time::Instant::now();
    while peers.erased().len() < 4 {
        assert!(started.elapsed() < collector::PERIOD, "the collector was not woken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while !f.meta.list(b"gc/").await.unwrap().is_empty() {
        assert!(started.elapsed() < collector::PERIOD * 3, "the entry was never dequeued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = f.status().await;
    assert_eq!(status.workers[0].errors, 0);
    assert_eq!(status.workers[0].queue, Some(0));
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["workers"][0]["name"], "collector");

    f.dir.halt.cancel();
    f.dir.workers.join().await;
    assert_eq!(f.dir.workers()[0].state, "done");
}

// ---- second design: roots, segment records, segment placement ----

fn seg(epoch: u64, n: u64) -> SegmentId {
    SegmentId::new(epoch, n).unwrap()
}

/// A root of volume `[id; 16]` sealed under a throwaway key (the directory
/// has none; it only parses).
fn sealed(id: u8, epoch: u64, commit: u64) -> Vec<u8> {
    let key = RootKey::derive(&VolumeKey::generate().unwrap());
    RootRecord {
        volume_id: [id; VOLUME_ID_LEN],
        epoch,
        commit,
        highest_sequence: Sequence::new(epoch, commit).unwrap(),
        highest_segment: seg(epoch, commit),
        checkpoint: None,
        since: vec![],
    }
    .seal(&key)
}

fn record(peers: &[u16], root: u8) -> SegmentRecord {
    SegmentRecord { peers: peers.to_vec(), shard_blocks: 1, root: [root; 32] }
}

/// A commit of volume `vol-<id>` (id `[id; 16]`) by a writer at `epoch`
/// from `expected` to the next commit, with `segments`.
fn root_commit(
    id: u8,
    epoch: u64,
    expected: Option<(u64, u64)>,
    segments: Vec<(SegmentId, SegmentRecord)>,
) -> RootCommit {
    let commit = expected.map_or(1, |(_, c)| c + 1);
    RootCommit {
        volume: format!("vol-{id}"),
        epoch,
        expected,
        sealed: sealed(id, epoch, commit),
        segments,
        dropped: vec![],
    }
}

impl Fixture {
    async fn commit_root(&self, node: &str, c: RootCommit) -> Result<u64, Remote> {
        match self.client(node, DirRequest::CommitRoot(c)).await? {
            DirResponse::Committed { commit } => Ok(commit),
            other => panic!("{other:?}"),
        }
    }

    async fn root(&self, volume: &str) -> Option<RootState> {
        match self.client("client-1", DirRequest::GetRoot { volume: volume.into() }).await.unwrap() {
            DirResponse::Root(r) => r,
            other => panic!("{other:?}"),
        }
    }

    async fn segment_records(&self, volume: &str, ids: Vec<SegmentId>) -> Vec<Option<SegmentRecord>> {
        let req = DirRequest::SegmentRecords { volume: volume.into(), ids };
        match self.client("client-1", req).await.unwrap() {
            DirResponse::SegmentRecords(r) => r,
            other => panic!("{other:?}"),
        }
    }

    async fn place_segments(
        &self,
        node: &str,
        volume: &str,
        epoch: u64,
        count: u32,
        exclude: Vec<u16>,
    ) -> Result<Vec<SegmentPlacement>, Remote> {
        let req = DirRequest::PlaceSegments {
            volume: volume.into(),
            epoch,
            count,
            shard_bytes: SHARD_BYTES,
            exclude,
            keep_free: 0,
        };
        match self.client(node, req).await? {
            DirResponse::SegmentPlacements(p) => Ok(p),
            other => panic!("{other:?}"),
        }
    }

    async fn peer_slots(&self, ids: Vec<u16>) -> Vec<Option<PeerSlot>> {
        match self.client("client-1", DirRequest::PeerSlots { ids }).await.unwrap() {
            DirResponse::PeerSlots(p) => p,
            other => panic!("{other:?}"),
        }
    }

    /// Volume `vol-<id>` created and leased to `client-1` (epoch 1).
    async fn leased_volume(&self, id: u8) {
        self.create_volume(spec(&format!("vol-{id}"), id, 2, 2)).await;
        assert_eq!(self.acquire("client-1", &format!("vol-{id}"), false).await.unwrap().epoch, 1);
    }

    /// The directory stopped and started again on the same folder.
    async fn restart(self) -> Self {
        let Fixture { dir, meta, clock, _tmp } = self;
        drop(dir);
        drop(meta);
        let meta = RedbStore::open_with_clock(&_tmp.path().join("directory.redb"), clock.clock()).unwrap();
        let ca = ClusterCa::load(_tmp.path(), "test").unwrap();
        let timing = TIMING;
        let dir = Directory::new(meta.clone(), ca, timing, clock.clock()).unwrap().with_seed(SEED);
        Self { dir: Arc::new(dir), meta, clock, _tmp }
    }
}

#[tokio::test]
async fn a_root_is_swapped_by_compare_and_set_and_read_back() {
    let f = Fixture::new().await;
    f.leased_volume(1).await;
    assert_eq!(f.root("vol-1").await, None);
    let first = root_commit(1, 1, None, vec![(seg(1, 1), record(&[1, 2, 3, 4], 9))]);
    assert_eq!(f.commit_root("client-1", first.clone()).await.unwrap(), 1);
    assert_eq!(f.root("vol-1").await, Some(RootState { sealed: first.sealed.clone(), epoch: 1, commit: 1 }));

    // Replaying "no root yet" now conflicts, naming both roots.
    let err = f.commit_root("client-1", root_commit(1, 1, None, vec![])).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Conflict, "{err}");
    assert!(err.message.contains("(none)") && err.message.contains("(epoch 1, commit 1)"), "{err}");
    let second = root_commit(1, 1, Some((1, 1)), vec![]);
    assert_eq!(f.commit_root("client-1", second.clone()).await.unwrap(), 2);
    // The same expected root again: it is not current any more.
    let err = f.commit_root("client-1", root_commit(1, 1, Some((1, 1)), vec![])).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Conflict, "{err}");
    assert!(err.message.contains("commit 2"), "{err}");
    assert_eq!(f.root("vol-1").await.unwrap().sealed, second.sealed);

    let err = f.commit_root("client-1", root_commit(9, 1, None, vec![])).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    let err = f.client("client-1", DirRequest::GetRoot { volume: "nope".into() }).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn a_root_commit_that_does_not_add_up_is_invalid_and_writes_nothing() {
    let f = Fixture::new().await;
    f.leased_volume(1).await;
    f.commit_root("client-1", root_commit(1, 1, None, vec![])).await.unwrap();
    let ok = || root_commit(1, 1, Some((1, 1)), vec![]);
    let many = (1..=MAX_COMMIT_SEGMENTS as u64 + 1).map(|n| (seg(1, n), record(&[1, 2], 0))).collect();
    let wide: Vec<u16> = (0..16).map(|i| 40_000 + i).collect();
    let twice = vec![(seg(1, 1), record(&[1], 0)), (seg(1, 1), record(&[2], 0))];
    let added_and_dropped =
        RootCommit { segments: vec![(seg(1, 1), record(&[1], 0))], dropped: vec![seg(1, 1)], ..ok() };
    let bad = vec![
        ("not a root", RootCommit { sealed: b"MDRT and then nonsense".to_vec(), ..ok() }),
        ("another volume's root", RootCommit { sealed: sealed(2, 1, 2), ..ok() }),
        ("a root of another epoch", RootCommit { sealed: sealed(1, 2, 2), ..ok() }),
        ("commit not one above", RootCommit { sealed: sealed(1, 1, 3), ..ok() }),
        ("too many segments", RootCommit { segments: many, ..ok() }),
        ("a record over 64 bytes", RootCommit { segments: vec![(seg(1, 1), record(&wide, 0))], ..ok() }),
        ("a segment twice", RootCommit { segments: twice, ..ok() }),
        ("a segment added and dropped", added_and_dropped),
        ("too many writes", RootCommit { dropped: (1..=128).map(|n| seg(1, n)).collect(), ..ok() }),
    ];
    for (why, c) in bad {
        let err = f.commit_root("client-1", c).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid, "{why}: {err}");
    }
    assert_eq!(f.root("vol-1").await.unwrap().commit, 1);
    assert!(f.meta.list(b"segs/").await.unwrap().is_empty());
    // The largest record that fits: 16 peers with ids below 2^14 (of a
    // segment above the root's highest, seg(1, 1), as every new one is).
    let widest: Vec<u16> = (0..16).map(|i| 16_383 - i).collect();
    let c = RootCommit { segments: vec![(seg(1, 2), record(&widest, 7))], ..ok() };
    f.commit_root("client-1", c).await.unwrap();
    assert_eq!(f.segment_records("vol-1", vec![seg(1, 2)]).await, vec![Some(record(&widest, 7))]);
}

#[tokio::test]
async fn a_root_commit_is_fenced_after_a_takeover_or_at_the_wrong_epoch() {
    let f = Fixture::new().await;
    f.leased_volume(1).await;
    f.commit_root("client-1", root_commit(1, 1, None, vec![])).await.unwrap();
    // Not the holder, or the holder at another epoch.
    let err = f.commit_root("client-2", root_commit(1, 1, Some((1, 1)), vec![])).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Fenced, "{err}");
    let err = f.commit_root("client-1", root_commit(1, 2, Some((1, 1)), vec![])).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Fenced, "{err}");
    // client-2 takes over: client-1 is fenced, client-2 commits at epoch 2.
    assert_eq!(f.acquire("client-2", "vol-1", true).await.unwrap().epoch, 2);
    let err = f.commit_root("client-1", root_commit(1, 1, Some((1, 1)), vec![])).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Fenced, "{err}");
    assert!(err.message.contains("client-2"), "{err}");
    assert_eq!(f.commit_root("client-2", root_commit(1, 2, Some((1, 1)), vec![])).await.unwrap(), 2);
    assert_eq!(f.root("vol-1").await.unwrap().epoch, 2);
    // Peers may not commit roots.
    let err =
        f.ask("peer-1", Role::Peer, DirRequest::CommitRoot(root_commit(1, 2, Some((2, 2)), vec![]))).await;
    assert_eq!(err.unwrap_err().kind, ErrorKind::Refused);
}

/// Starts `commits` at once, each on its own task, while the commit queue's
/// turn is held, so they all wait for the same batch; returns their results
/// and how many durable write transactions they took.
async fn commit_together(f: &Fixture, commits: Vec<RootCommit>) -> (Vec<Result<u64, Remote>>, u64) {
    let turn = f.dir.commits.hold().await;
    let n = commits.len();
    let mut tasks = Vec::new();
    for c in commits {
        let dir = f.dir.clone();
        tasks.push(tokio::spawn(async move {
            match dir.dispatch(&caller("client-1", Role::Client), DirRequest::CommitRoot(c)).await? {
                DirResponse::Committed { commit } => Ok(commit),
                other => panic!("{other:?}"),
            }
        }));
    }
    for _ in 0..2000 {
        if f.dir.commits.waiting() == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(f.dir.commits.waiting(), n, "every commit is waiting for the batch");
    let before = f.meta.durable_commits();
    drop(turn);
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    (results, f.meta.durable_commits() - before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_root_commits_of_many_volumes_are_one_durable_write() {
    let f = Fixture::new().await;
    for id in 1..=32 {
        f.leased_volume(id).await;
    }
    let commits = (1..=32).map(|id| root_commit(id, 1, None, vec![(seg(1, 1), record(&[1, 2, 3, 4], id))]));
    let (results, durable) = commit_together(&f, commits.collect()).await;
    assert!(results.iter().all(|r| r == &Ok(1)), "{results:?}");
    assert_eq!(durable, 1, "32 commits, one fsync");
    for id in 1..=32 {
        assert_eq!(f.root(&format!("vol-{id}")).await.unwrap().commit, 1);
        assert_eq!(
            f.segment_records(&format!("vol-{id}"), vec![seg(1, 1)]).await,
            vec![Some(record(&[1, 2, 3, 4], id))]
        );
    }

    // Left to themselves (nothing held), 32 commits still share a few
    // batches: those arriving while one is made durable go in the next.
    let before = f.meta.durable_commits();
    let mut tasks = Vec::new();
    for id in 1..=32 {
        let dir = f.dir.clone();
        tasks.push(tokio::spawn(async move {
            let c = root_commit(id, 1, Some((1, 1)), vec![]);
            dir.dispatch(&caller("client-1", Role::Client), DirRequest::CommitRoot(c)).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), DirResponse::Committed { commit: 2 });
    }
    let durable = f.meta.durable_commits() - before;
    assert!(durable <= 8, "32 commits took {durable} durable writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_commits_of_one_root_in_one_batch_never_both_succeed() {
    let f = Fixture::new().await;
    f.leased_volume(1).await;
    let a = root_commit(1, 1, None, vec![(seg(1, 1), record(&[1], 1))]);
    let b = root_commit(1, 1, None, vec![(seg(1, 2), record(&[2], 2))]);
    let (results, durable) = commit_together(&f, vec![a.clone(), b.clone()]).await;
    assert_eq!(durable, 1);
    let won: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
    assert_eq!(won.len(), 1, "{results:?}");
    let lost = results.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert_eq!(lost.kind, ErrorKind::Conflict, "{lost}");
    // The winner's root and only its record are there.
    let root = f.root("vol-1").await.unwrap();
    let (winner, loser) = if root.sealed == a.sealed { (1, 2) } else { (2, 1) };
    let records = f.segment_records("vol-1", vec![seg(1, winner), seg(1, loser)]).await;
    assert_eq!(records, vec![Some(record(&[winner as u16], winner as u8)), None]);
}

#[tokio::test]
async fn segment_records_come_and_go_with_commits_and_with_the_volume() {
    let f = Fixture::new().await;
    f.leased_volume(1).await;
    f.leased_volume(2).await;
    let segments: Vec<_> = (1..=3).map(|n| (seg(1, n), record(&[1, 2, 3, n as u16 + 3], n as u8))).collect();
    f.commit_root("client-1", root_commit(1, 1, None, segments.clone())).await.unwrap();
    f.commit_root("client-1", root_commit(2, 1, None, vec![(seg(1, 1), record(&[4], 4))])).await.unwrap();
    let ids = vec![seg(1, 1), seg(1, 2), seg(1, 3), seg(1, 4)];
    let got = f.segment_records("vol-1", ids.clone()).await;
    let mut want: Vec<_> = segments.iter().map(|(_, r)| Some(r.clone())).collect();
    want.push(None);
    assert_eq!(got, want);
    // A later commit drops one and adds one.
    let c = RootCommit {
        dropped: vec![seg(1, 2)],
        ..root_commit(1, 1, Some((1, 1)), vec![(seg(1, 4), record(&[9], 9))])
    };
    f.commit_root("client-1", c).await.unwrap();
    let got = f.segment_records("vol-1", ids).await;
    assert_eq!(got, vec![want[0].clone(), None, want[2].clone(), Some(record(&[9], 9))]);

    // Deleting the volume removes its root and records, not the other's.
    f.client("client-1", DirRequest::ReleaseLease { volume: "vol-1".into(), epoch: 1 }).await.unwrap();
    f.client("client-1", DirRequest::DeleteVolume { volume: "vol-1".into() }).await.unwrap();
    let keys = |e: Vec<super::meta::Entry>| e.into_iter().map(|e| e.key).collect::<Vec<_>>();
    let roots = keys(f.meta.list(b"roots/").await.unwrap());
    assert_eq!(roots, vec![format!("roots/{}", "02".repeat(VOLUME_ID_LEN)).into_bytes()]);
    let segs = keys(f.meta.list(b"segs/").await.unwrap());
    assert_eq!(segs.len(), 1);
    assert!(segs[0].starts_with(format!("segs/{}/", "02".repeat(VOLUME_ID_LEN)).as_bytes()));
}

#[tokio::test]
async fn segments_are_listed_in_pages_and_dropped_outside_a_commit_only_by_the_writer() {
    let f = Fixture::new().await;
    f.leased_volume(1).await;
    let segments: Vec<_> = (1..=5).map(|n| (seg(1, n), record(&[1, 2, 3, 4], n as u8))).collect();
    f.commit_root("client-1", root_commit(1, 1, None, segments)).await.unwrap();
    let f = &f;
    let list = |after: Option<u64>, limit: u32| {
        let req = DirRequest::ListSegments { volume: "vol-1".into(), after, limit };
        async move {
            match f.client("client-1", req).await.unwrap() {
                DirResponse::SegmentIds(ids) => ids,
                other => panic!("{other:?}"),
            }
        }
    };
    assert_eq!(list(None, 2).await, vec![seg(1, 1), seg(1, 2)]);
    assert_eq!(list(Some(seg(1, 2).raw()), 2).await, vec![seg(1, 3), seg(1, 4)]);
    assert_eq!(list(Some(seg(1, 4).raw()), 1000).await, vec![seg(1, 5)]);
    let too_many = DirRequest::ListSegments { volume: "vol-1".into(), after: None, limit: 100_000 };
    assert_eq!(f.client("client-1", too_many).await.unwrap_err().kind, ErrorKind::Invalid);

    // Only the lease holder at its epoch drops; a repeated id is refused.
    let drop = |node: &'static str, epoch: u64, ids: Vec<SegmentId>| {
        f.client(node, DirRequest::DropSegments { volume: "vol-1".into(), epoch, ids })
    };
    assert_eq!(drop("client-2", 1, vec![seg(1, 1)]).await.unwrap_err().kind, ErrorKind::Fenced);
    assert_eq!(drop("client-1", 2, vec![seg(1, 1)]).await.unwrap_err().kind, ErrorKind::Fenced);
    assert_eq!(drop("client-1", 1, vec![seg(1, 1), seg(1, 1)]).await.unwrap_err().kind, ErrorKind::Invalid);
    assert_eq!(list(None, 1000).await.len(), 5);
    assert_eq!(drop("client-1", 1, vec![seg(1, 2), seg(1, 4)]).await.unwrap(), DirResponse::Done);
    assert_eq!(list(None, 1000).await, vec![seg(1, 1), seg(1, 3), seg(1, 5)]);
}

#[tokio::test]
async fn segments_are_placed_in_batches_on_distinct_up_peers_never_the_excluded() {
    let f = Fixture::with_peers(8).await;
    f.leased_volume(1).await;
    // Peers got ids in the order they first reported.
    let slots = f.peer_slots((1..=9).collect()).await;
    for (i, s) in slots.iter().take(8).enumerate() {
        let s = s.as_ref().unwrap();
        assert_eq!((s.id, s.addr.name.clone(), s.addr.addr), (i as u16 + 1, peer_name(i), addr_of(i)));
    }
    assert_eq!(slots[8], None);

    let placed = f.place_segments("client-1", "vol-1", 1, 20, vec![1, 2]).await.unwrap();
    assert_eq!(placed.len(), 20);
    let mut used = HashSet::new();
    for p in &placed {
        let ids: HashSet<u16> = p.peers.iter().map(|s| s.id).collect();
        assert_eq!(ids.len(), 4, "k + m distinct peers: {p:?}");
        assert!(!ids.contains(&1) && !ids.contains(&2), "{p:?}");
        for s in &p.peers {
            assert_eq!(s.addr.name, peer_name(usize::from(s.id) - 1));
        }
        used.extend(ids);
    }
    assert!(used.len() > 4, "placements spread over the peers: {used:?}");

    // Only peers that are up: with 4 of 8 reporting, every segment is on those 4.
    f.clock.advance(PEER_TIMEOUT + Duration::from_millis(1));
    for i in 4..8 {
        f.heartbeat(i).await;
    }
    let placed = f.place_segments("client-1", "vol-1", 1, 3, vec![]).await.unwrap();
    for p in placed {
        let mut ids: Vec<u16> = p.peers.iter().map(|s| s.id).collect();
        ids.sort();
        assert_eq!(ids, vec![5, 6, 7, 8]);
    }
    // Fewer than k + m up: the segment goes to those there are, down to
    // its write quorum k + 1 = 3; below that it is refused.
    let placed = f.place_segments("client-1", "vol-1", 1, 2, vec![5]).await.unwrap();
    for p in placed {
        let mut ids: Vec<u16> = p.peers.iter().map(|s| s.id).collect();
        ids.sort();
        assert_eq!(ids, vec![6, 7, 8], "degraded: one shard each on the 3 left");
    }
    // (Too few up is an outage, not a full cluster: a flush waiting on
    // it must not answer ENOSPC.)
    let err = f.place_segments("client-1", "vol-1", 1, 1, vec![5, 6]).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
    assert!(err.message.contains("3 peers") && err.message.contains("only 2"), "{err}");
    let err = f.place_segments("client-2", "vol-1", 1, 1, vec![]).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Fenced, "{err}");
    let err = f.place_segments("client-1", "vol-1", 1, 0, vec![]).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
}

#[tokio::test]
async fn peer_ids_are_stable_across_a_restart_and_never_reused() {
    let f = Fixture::with_peers(3).await;
    let ids =
        |slots: Vec<Option<PeerSlot>>| slots.into_iter().map(|s| s.map(|s| s.addr.name)).collect::<Vec<_>>();
    let named = |names: &[&str]| names.iter().map(|n| Some(n.to_string())).collect::<Vec<_>>();
    assert_eq!(ids(f.peer_slots(vec![1, 2, 3]).await), named(&["peer-0", "peer-1", "peer-2"]));
    let f = f.restart().await;
    for i in [2, 0, 1] {
        f.heartbeat(i).await;
    }
    f.heartbeat(3).await;
    assert_eq!(ids(f.peer_slots(vec![1, 2, 3, 4]).await), named(&["peer-0", "peer-1", "peer-2", "peer-3"]));
    // A peer whose id is forgotten (as a removal would) gets a new one;
    // its old id is not given to anyone.
    f.meta.txn(Txn::new().then(Op::Delete { key: b"peerid/peer-3".to_vec() })).await.unwrap();
    f.heartbeat(3).await;
    f.heartbeat(4).await;
    assert_eq!(ids(f.peer_slots(vec![5, 6]).await), named(&["peer-3", "peer-4"]));
    assert_eq!(f.meta.get(b"peerid/peer-3").await.unwrap().unwrap().value, 5u16.to_be_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_slot_change_during_a_commit_does_not_refuse_it() {
    let f = Fixture::new().await;
    f.leased_volume(1).await;
    let old = match f.client("client-1", DirRequest::Volume { volume: "vol-1".into() }).await.unwrap() {
        DirResponse::Volume(r) => r.spec.key_slots,
        other => panic!("{other:?}"),
    };
    // The commit waits for its batch while `volume passwd` rewrites the
    // volume record: the commit must still land (only the lease says who
    // writes), or the writer would take it for another machine's and fence.
    let turn = f.dir.commits.hold().await;
    let dir = f.dir.clone();
    let c = root_commit(1, 1, None, vec![(seg(1, 1), record(&[1, 2, 3, 4], 1))]);
    let commit = tokio::spawn(async move {
        dir.dispatch(&caller("client-1", Role::Client), DirRequest::CommitRoot(c)).await
    });
    for _ in 0..2000 {
        if f.dir.commits.waiting() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(f.dir.commits.waiting(), 1);
    let set = DirRequest::SetKeySlots { volume: "vol-1".into(), expected: old, slots: throwaway_key_slots() };
    f.client("client-1", set).await.unwrap();
    drop(turn);
    match commit.await.unwrap() {
        Ok(DirResponse::Committed { commit }) => assert_eq!(commit, 1),
        other => panic!("the commit was refused: {other:?}"),
    }
    assert_eq!(f.root("vol-1").await.unwrap().commit, 1);
}

// ---- collection: dropped segments and reconciliation ----

/// A root of volume `[id; 16]` like [`sealed`], claiming `highest` as its
/// highest segment.
fn sealed_up_to(id: u8, epoch: u64, commit: u64, highest: SegmentId) -> Vec<u8> {
    let key = RootKey::derive(&VolumeKey::generate().unwrap());
    RootRecord {
        volume_id: [id; VOLUME_ID_LEN],
        epoch,
        commit,
        highest_sequence: Sequence::new(epoch, commit).unwrap(),
        highest_segment: highest,
        checkpoint: None,
        since: vec![],
    }
    .seal(&key)
}

fn shard(volume: u8, segment: SegmentId, index: u8) -> SegmentShardKey {
    SegmentShardKey { volume: [volume; VOLUME_ID_LEN], segment, index }
}

impl FakePeers {
    fn hold(&self, peer: usize, key: SegmentShardKey) {
        self.held.lock().unwrap().entry(peer_name(peer)).or_default().push(key);
    }

    fn holds(&self, peer: usize, key: SegmentShardKey) -> bool {
        self.held.lock().unwrap().get(&peer_name(peer)).is_some_and(|k| k.contains(&key))
    }
}

impl Fixture {
    /// Moves the clock by `d` in steps of a few seconds, with peers
    /// `alive` heartbeating and `client-1` renewing its lease on vol-1 at
    /// epoch 1 (if it still holds it) throughout.
    async fn pass_time(&self, d: Duration, alive: std::ops::Range<usize>) {
        let step = Duration::from_secs(5);
        let mut left = d;
        while !left.is_zero() {
            let s = step.min(left);
            self.clock.advance(s);
            left -= s;
            for i in alive.clone() {
                self.heartbeat(i).await;
            }
            let _ = self.renew("client-1", "vol-1", 1).await;
        }
    }

    async fn volume_info(&self, volume: &str) -> VolumeInfo {
        match self.client("client-1", DirRequest::VolumeInfo { volume: volume.into() }).await.unwrap() {
            DirResponse::VolumeInfo(i) => *i,
            other => panic!("{other:?}"),
        }
    }

    /// What the compactor asks each round: the highest segment a snapshot
    /// reaches, and the dropped segments still collecting.
    async fn compaction_inputs(&self, volume: &str) -> (Option<u64>, Collecting) {
        match self.client("client-1", DirRequest::CompactionInputs { volume: volume.into() }).await.unwrap() {
            DirResponse::CompactionInputs { pinned_up_to, collecting } => (pinned_up_to, collecting),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn shards_are_classified_by_record_dead_entry_and_the_roots_highest_segment() {
    use collector::{ShardClass::*, classify};
    let rec = record(&[1, 2, 0, 4], 0);
    let k = |n: u64, index: u8| shard(1, seg(1, n), index);
    let highest = seg(1, 10);
    // (a) the record names this peer for this index.
    assert_eq!(classify(&k(3, 1), Some(2), Some(&rec), false, highest), Live);
    // (b) another peer, nobody, an index past the record, or a peer without an id.
    assert_eq!(classify(&k(3, 1), Some(1), Some(&rec), false, highest), Replaced);
    assert_eq!(classify(&k(3, 2), Some(3), Some(&rec), false, highest), Replaced);
    assert_eq!(classify(&k(3, 7), Some(1), Some(&rec), false, highest), Replaced);
    assert_eq!(classify(&k(3, 0), None, Some(&rec), false, highest), Replaced);
    // A record wins over a dead entry (a drop and a pass crossing).
    assert_eq!(classify(&k(3, 0), Some(1), Some(&rec), true, highest), Live);
    // (c) dropped: the dead queue's, above or below the highest.
    assert_eq!(classify(&k(3, 0), Some(1), None, true, highest), Dropped);
    assert_eq!(classify(&k(30, 0), Some(1), None, true, highest), Dropped);
    // (d) no record, at or below the highest; (e) above it.
    assert_eq!(classify(&k(10, 0), Some(1), None, false, highest), Failed);
    assert_eq!(classify(&k(11, 0), Some(1), None, false, highest), Unrecorded);
    assert!(Replaced.is_orphan() && Failed.is_orphan() && Unrecorded.is_orphan());
    assert!(!Live.is_orphan() && !Dropped.is_orphan());
}

#[tokio::test]
async fn dropped_segments_are_erased_after_the_grace_at_the_volumes_epoch_and_wait_for_a_down_holder() {
    let f = Fixture::with_peers(4).await;
    f.leased_volume(1).await;
    // Three segments; peer ids 1..4 are peer-0..peer-3; id 9 never joined.
    let segments = vec![
        (seg(1, 1), record(&[1, 2, 3, 4], 1)),
        (seg(1, 2), record(&[4, 3, 2, 1], 2)),
        (seg(1, 3), record(&[1, 2, 3, 9], 3)),
    ];
    let c = RootCommit { sealed: sealed_up_to(1, 1, 1, seg(1, 3)), ..root_commit(1, 1, None, segments) };
    f.commit_root("client-1", c).await.unwrap();
    let peers = FakePeers::default();
    for n in 1..=3 {
        for index in 0..4u8 {
            let holder = match n {
                2 => 3 - usize::from(index),
                _ => usize::from(index),
            };
            peers.hold(holder, shard(1, seg(1, n), index));
        }
    }
    // One dropped outside a commit, one by a commit.
    let drop = DirRequest::DropSegments { volume: "vol-1".into(), epoch: 1, ids: vec![seg(1, 2)] };
    assert_eq!(f.client("client-1", drop).await.unwrap(), DirResponse::Done);
    let c = RootCommit { dropped: vec![seg(1, 3)], ..root_commit(1, 1, Some((1, 1)), vec![]) };
    f.commit_root("client-1", c).await.unwrap();
    assert_eq!(f.segment_records("vol-1", vec![seg(1, 2), seg(1, 3)]).await, vec![None, None]);
    assert_eq!(f.meta.list(b"dead/").await.unwrap().len(), 2);
    let info = f.volume_info("vol-1").await;
    assert_eq!(info.collecting.segments, 2);
    // 4 + 3 shards of one 4 KiB block each plus header: those on peers
    // that are up (id 9 never joined: nothing of it can be freed).
    let shard_bytes = super::volumes::shard_len(&spec("x", 0, 2, 2), &record(&[1, 2, 3, 4], 0));
    assert_eq!(info.collecting.bytes, 7 * shard_bytes, "{:?}", info.collecting);
    assert_eq!(info.health.segments, 1);
    // The compactor's own call counts them as `volume info` does.
    assert_eq!(f.compaction_inputs("vol-1").await, (None, info.collecting));

    // Within the grace: nothing is erased (an attach may still be reading).
    f.clock.advance(GRACE - Duration::from_secs(1));
    for i in 0..4 {
        f.heartbeat(i).await;
    }
    assert_eq!(f.dir.collect_once(&peers).await.unwrap(), 2);
    assert!(peers.erased().is_empty(), "{:?}", peers.erased());

    // A takeover: the erasures go at the new epoch, 2, not the largest
    // (which would fence the volume's writer for good on these peers).
    assert_eq!(f.acquire("client-2", "vol-1", true).await.unwrap().epoch, 2);
    // Past the grace, with peer-3 down: erased from the three up; the
    // entry naming peer-3 stays, the one naming the never-joined id 9 goes.
    f.clock.advance(Duration::from_secs(2) + PEER_TIMEOUT);
    for i in 0..3 {
        f.heartbeat(i).await;
    }
    assert_eq!(f.dir.collect_once(&peers).await.unwrap(), 1);
    let erased = peers.erased();
    assert_eq!(erased.len(), 6, "{erased:?}");
    assert!(erased.iter().all(|(p, k, epoch)| *epoch == 2 && p != &peer_name(3) && k.segment != seg(1, 1)));
    assert!(peers.holds(3, shard(1, seg(1, 2), 0)));
    assert_eq!(f.meta.list(b"dead/").await.unwrap().len(), 1);
    // The entry now names only the shard left to erase, on the down peer:
    // nothing of it counts as space about to be freed (the writer's
    // back-pressure must not wait for a peer that is down).
    let info = f.volume_info("vol-1").await;
    assert_eq!((info.collecting.segments, info.collecting.bytes), (1, 0));
    assert_eq!(f.compaction_inputs("vol-1").await, (None, info.collecting));

    // peer-3 is back: its shard goes, and so does the entry.
    f.heartbeat(3).await;
    assert_eq!(f.dir.collect_once(&peers).await.unwrap(), 0);
    assert!(!peers.holds(3, shard(1, seg(1, 2), 0)));
    assert!(f.meta.list(b"dead/").await.unwrap().is_empty());
    assert_eq!(f.volume_info("vol-1").await.collecting, Collecting::default());
    assert_eq!(f.compaction_inputs("vol-1").await, (None, Collecting::default()));
    // The live segment is untouched everywhere.
    for index in 0..4u8 {
        assert!(peers.holds(usize::from(index), shard(1, seg(1, 1), index)));
    }
}

#[tokio::test]
async fn reconciliation_erases_orphans_seen_for_the_grace_and_the_floor_refuses_a_late_commit() {
    let f = Fixture::with_peers(4).await;
    f.leased_volume(1).await;
    let whole = |n: u64| (seg(1, n), record(&[1, 2, 3, 4], n as u8));
    // Commit 1 records segments 1 and 2; commit 2's root claims segments
    // up to 10 (3..=10 belong to commits that failed).
    let c = RootCommit {
        sealed: sealed_up_to(1, 1, 1, seg(1, 2)),
        ..root_commit(1, 1, None, vec![whole(1), whole(2)])
    };
    f.commit_root("client-1", c).await.unwrap();
    let c =
        RootCommit { sealed: sealed_up_to(1, 1, 2, seg(1, 10)), ..root_commit(1, 1, Some((1, 1)), vec![]) };
    f.commit_root("client-1", c).await.unwrap();
    let drop = DirRequest::DropSegments { volume: "vol-1".into(), epoch: 1, ids: vec![seg(1, 2)] };
    f.client("client-1", drop).await.unwrap();

    let peers = FakePeers::default();
    let live = shard(1, seg(1, 1), 0); // (a) on peer-0, as recorded
    let replaced = shard(1, seg(1, 1), 0); // (b) the same index on peer-1
    let dropped = shard(1, seg(1, 2), 0); // (c) on peer-0, waiting in dead/
    let failed = shard(1, seg(1, 5), 2); // (d) on peer-2, below the root's highest
    let unrecorded = shard(1, seg(1, 20), 3); // (e) on peer-3, above it
    let in_flight = shard(1, seg(1, 15), 3); // (e) on peer-3, whose commit lands in the grace
    let other_volume = shard(2, seg(1, 5), 0); // a volume the directory does not know
    peers.hold(0, live);
    peers.hold(1, replaced);
    peers.hold(0, dropped);
    peers.hold(2, failed);
    peers.hold(3, unrecorded);
    peers.hold(3, in_flight);
    peers.hold(0, other_volume);

    let mut orphans = collector::Orphans::default();
    let pass = f.dir.reconcile(&peers, &mut orphans, None).await.unwrap();
    assert_eq!((pass.checked, pass.found, pass.erased), (6, 4, 0), "{pass:?}");
    assert!(peers.erased().is_empty());

    // The in-flight commit lands (its id is above the root's highest).
    let c = RootCommit {
        sealed: sealed_up_to(1, 1, 3, seg(1, 15)),
        ..root_commit(1, 1, Some((1, 2)), vec![(seg(1, 15), record(&[1, 2, 3, 4], 15))])
    };
    f.commit_root("client-1", c).await.unwrap();
    // A new orphan after the first pass: seen in the next, erased a grace later.
    let late = shard(1, seg(1, 6), 0);
    peers.hold(1, late);

    // Half a grace: nothing is due yet.
    f.pass_time(GRACE / 2, 0..4).await;
    let pass = f.dir.reconcile(&peers, &mut orphans, None).await.unwrap();
    assert_eq!((pass.found, pass.erased), (1, 0), "{pass:?}");

    // A whole grace since the first sighting: (b), (d) and (e) go, at the
    // volume's epoch; the floor is raised to the highest unrecorded id.
    f.pass_time(GRACE / 2 + Duration::from_secs(1), 0..4).await;
    let pass = f.dir.reconcile(&peers, &mut orphans, None).await.unwrap();
    assert_eq!((pass.found, pass.erased), (0, 3), "{pass:?}");
    let erased = peers.erased();
    let names: Vec<_> = erased.iter().map(|(p, k, e)| (p.as_str(), *k, *e)).collect();
    assert_eq!(
        names,
        [("peer-1", replaced, 1), ("peer-2", failed, 1), ("peer-3", unrecorded, 1)],
        "only the orphans, at epoch 1"
    );
    assert!(peers.holds(0, live) && peers.holds(0, dropped) && peers.holds(3, in_flight));
    assert!(peers.holds(1, late) && peers.holds(0, other_volume));
    let floor = f.meta.get(format!("segfloor/{}", "01".repeat(VOLUME_ID_LEN)).as_bytes()).await.unwrap();
    assert_eq!(floor.unwrap().value, seg(1, 20).raw().to_be_bytes());
    assert_eq!(orphans.len(), 1, "only the late one is watched");

    // A commit that was in flight for longer than the grace cannot land a
    // record for the erased shard; one above the floor can.
    let late_commit = root_commit(1, 1, Some((1, 3)), vec![(seg(1, 20), record(&[1, 2, 3, 4], 20))]);
    let err = f.commit_root("client-1", late_commit).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    assert!(err.message.contains("not above"), "{err}");
    assert_eq!(f.root("vol-1").await.unwrap().commit, 3);
    let c = RootCommit {
        sealed: sealed_up_to(1, 1, 4, seg(1, 21)),
        ..root_commit(1, 1, Some((1, 3)), vec![(seg(1, 21), record(&[1, 2, 3, 4], 21))])
    };
    f.commit_root("client-1", c).await.unwrap();
    // Below the root's highest is refused too (the attach never does that).
    let c = root_commit(1, 1, Some((1, 4)), vec![(seg(1, 7), record(&[1, 2, 3, 4], 7))]);
    assert_eq!(f.commit_root("client-1", c).await.unwrap_err().kind, ErrorKind::Invalid);

    // The late orphan goes a grace after it was first seen.
    f.pass_time(GRACE, 0..4).await;
    let pass = f.dir.reconcile(&peers, &mut orphans, None).await.unwrap();
    assert_eq!(pass.erased, 1, "{pass:?}");
    assert!(!peers.holds(1, late));
    assert!(orphans.is_empty());

    // Deleting the volume clears its dead entries and floor (its gc/
    // entry erases everything).
    f.client("client-1", DirRequest::ReleaseLease { volume: "vol-1".into(), epoch: 1 }).await.unwrap();
    f.client("client-1", DirRequest::DeleteVolume { volume: "vol-1".into() }).await.unwrap();
    assert!(f.meta.list(b"dead/").await.unwrap().is_empty());
    assert!(f.meta.list(b"segfloor/").await.unwrap().is_empty());
}

#[tokio::test]
async fn an_orphan_on_a_peer_that_is_down_or_unreachable_waits_and_is_erased_when_it_answers() {
    let f = Fixture::with_peers(2).await;
    f.leased_volume(1).await;
    f.commit_root("client-1", root_commit(1, 1, None, vec![])).await.unwrap();
    let peers = FakePeers::default();
    let orphan = shard(1, seg(1, 1), 0); // at the root's highest, no record: (d)
    peers.hold(1, orphan);
    let mut orphans = collector::Orphans::default();
    assert_eq!(f.dir.reconcile(&peers, &mut orphans, None).await.unwrap().found, 1);
    // peer-1 stops answering: its sighting is kept, not forgotten.
    peers.failing.lock().unwrap().insert(peer_name(1));
    f.clock.advance(GRACE + Duration::from_secs(1));
    f.heartbeat(0).await;
    f.heartbeat(1).await;
    let pass = f.dir.reconcile(&peers, &mut orphans, None).await.unwrap();
    assert_eq!((pass.found, pass.erased), (0, 0));
    assert_eq!(orphans.len(), 1);
    // It answers again: erased at once (seen a grace ago).
    peers.failing.lock().unwrap().clear();
    let pass = f.dir.reconcile(&peers, &mut orphans, None).await.unwrap();
    assert_eq!(pass.erased, 1);
    assert!(!peers.holds(1, orphan));
}

// ---- snapshots, clones and rollbacks ----

/// A root of volume `[id; 16]` claiming `highest` segment and `sequence`.
fn root_of(id: u8, epoch: u64, commit: u64, highest: SegmentId, sequence: Sequence) -> Vec<u8> {
    let key = RootKey::derive(&VolumeKey::generate().unwrap());
    RootRecord {
        volume_id: [id; VOLUME_ID_LEN],
        epoch,
        commit,
        highest_sequence: sequence,
        highest_segment: highest,
        checkpoint: None,
        since: vec![],
    }
    .seal(&key)
}

/// A commit of `vol-<id>` at epoch `epoch` from `expected`, adding
/// `added` (ids `seg(epoch, n)`, four shards each), dropping `dropped`,
/// its root claiming `highest`.
fn commit_of(
    id: u8,
    epoch: u64,
    expected: Option<(u64, u64)>,
    added: &[u64],
    dropped: &[SegmentId],
    highest: SegmentId,
) -> RootCommit {
    let commit = expected.map_or(1, |(_, c)| c + 1);
    RootCommit {
        volume: format!("vol-{id}"),
        epoch,
        expected,
        sealed: root_of(id, epoch, commit, highest, Sequence::new(epoch, 100 * commit).unwrap()),
        segments: added.iter().map(|&n| (seg(epoch, n), record(&[1, 2, 3, 4], n as u8))).collect(),
        dropped: dropped.to_vec(),
    }
}

impl Fixture {
    async fn snapshot(&self, volume: &str, snapshot: &str) -> Result<SnapshotInfo, Remote> {
        let req = DirRequest::CreateSnapshot { volume: volume.into(), snapshot: snapshot.into() };
        match self.client("client-1", req).await? {
            DirResponse::Snapshot(s) => Ok(s),
            other => panic!("{other:?}"),
        }
    }

    async fn snapshots(&self, volume: &str) -> Vec<SnapshotInfo> {
        match self.client("client-1", DirRequest::ListSnapshots { volume: volume.into() }).await.unwrap() {
            DirResponse::Snapshots(s) => s,
            other => panic!("{other:?}"),
        }
    }

    async fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<DirResponse, Remote> {
        let req = DirRequest::DeleteSnapshot { volume: volume.into(), snapshot: snapshot.into() };
        self.client("client-1", req).await
    }

    async fn list_segments(&self, volume: &str) -> Vec<SegmentId> {
        let req = DirRequest::ListSegments { volume: volume.into(), after: None, limit: 1000 };
        match self.client("client-1", req).await.unwrap() {
            DirResponse::SegmentIds(ids) => ids,
            other => panic!("{other:?}"),
        }
    }

    /// The segment ids under `prefix/<volume [id; 16]>/`.
    async fn ids_under(&self, prefix: &str, id: u8) -> Vec<SegmentId> {
        let p = format!("{prefix}/{}/", hex::encode([id; VOLUME_ID_LEN])).into_bytes();
        let entries = self.meta.list(&p).await.unwrap();
        entries.iter().map(|e| super::schema::parse_segment_key(&p, &e.key).unwrap()).collect()
    }

    /// Volume `name`'s record.
    async fn volume_record(&self, name: &str) -> VolumeRecord {
        match self.client("client-1", DirRequest::Volume { volume: name.into() }).await.unwrap() {
            DirResponse::Volume(v) => v,
            other => panic!("{other:?}"),
        }
    }

    async fn clone_volume(&self, spec: VolumeSpec, sealed: Vec<u8>) -> Result<VolumeRecord, Remote> {
        match self.client("client-1", DirRequest::CloneVolume { spec, sealed }).await? {
            DirResponse::Volume(v) => Ok(v),
            other => panic!("{other:?}"),
        }
    }

    async fn rollback(
        &self,
        node: &str,
        snapshot: &str,
        epoch: u64,
        expected: (u64, u64),
        sealed: Vec<u8>,
    ) -> Result<u64, Remote> {
        let req = DirRequest::Rollback {
            volume: "vol-1".into(),
            snapshot: snapshot.into(),
            epoch,
            expected,
            sealed,
        };
        match self.client(node, req).await? {
            DirResponse::Committed { commit } => Ok(commit),
            other => panic!("{other:?}"),
        }
    }
}

/// Bytes on peers of one of these tests' records (four shards of a
/// one-block segment of a k=2, m=2 volume).
fn record_bytes() -> u64 {
    super::volumes::stored_len(&spec("x", 0, 2, 2), &record(&[1, 2, 3, 4], 0))
}

#[tokio::test]
async fn a_dropped_segment_stays_while_a_snapshot_taken_before_the_drop_pins_it() {
    let f = Fixture::new().await;
    f.leased_volume(1).await;
    let err = f.snapshot("vol-1", "early").await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    assert!(err.message.contains("never committed"), "{err}");
    f.commit_root("client-1", commit_of(1, 1, None, &[1, 2, 3], &[], seg(1, 3))).await.unwrap();
    for bad in ["", "Upper", "a/b", "-x"] {
        assert_eq!(f.snapshot("vol-1", bad).await.unwrap_err().kind, ErrorKind::Invalid, "{bad:?}");
    }
    let a = f.snapshot("vol-1", "a").await.unwrap();
    assert_eq!((a.epoch, a.commit, a.highest_segment), (1, 1, seg(1, 3).raw()));
    assert_eq!((a.reaches, a.exclusive), (3 * record_bytes(), 0));
    assert_eq!(f.snapshot("vol-1", "a").await.unwrap_err().kind, ErrorKind::Conflict);

    // Commit 2 drops segment 1, which a reaches: it stays, kept.
    f.commit_root("client-1", commit_of(1, 1, Some((1, 1)), &[4], &[seg(1, 1)], seg(1, 4))).await.unwrap();
    assert_eq!(f.ids_under("kept", 1).await, vec![seg(1, 1)]);
    assert!(f.ids_under("dead", 1).await.is_empty());
    // Snapshot reads find its record; the head's listing does not.
    assert!(f.segment_records("vol-1", vec![seg(1, 1)]).await[0].is_some());
    assert_eq!(f.list_segments("vol-1").await, vec![seg(1, 2), seg(1, 3), seg(1, 4)]);
    assert_eq!(f.volume_info("vol-1").await.allocated, 3 * record_bytes(), "the head's records only");

    // Commit 3 drops segment 4, newer than a: it goes to dead/.
    f.commit_root("client-1", commit_of(1, 1, Some((1, 2)), &[], &[seg(1, 4)], seg(1, 4))).await.unwrap();
    assert_eq!(f.ids_under("dead", 1).await, vec![seg(1, 4)]);

    // b is taken at commit 3; segment 2 is then dropped outside a commit
    // (at commit 3): a pins it, b (taken after) does not.
    let b = f.snapshot("vol-1", "b").await.unwrap();
    assert_eq!(b.commit, 3);
    let drop = DirRequest::DropSegments { volume: "vol-1".into(), epoch: 1, ids: vec![seg(1, 2)] };
    f.client("client-1", drop).await.unwrap();
    assert_eq!(f.ids_under("kept", 1).await, vec![seg(1, 1), seg(1, 2)]);
    // Commit 4 drops segment 3: both pin it.
    f.commit_root("client-1", commit_of(1, 1, Some((1, 3)), &[], &[seg(1, 3)], seg(1, 4))).await.unwrap();
    assert_eq!(f.ids_under("kept", 1).await, vec![seg(1, 1), seg(1, 2), seg(1, 3)]);
    // Dropping a kept segment again changes nothing (its first drop stands).
    let again = DirRequest::DropSegments { volume: "vol-1".into(), epoch: 1, ids: vec![seg(1, 1)] };
    f.client("client-1", again).await.unwrap();
    assert_eq!(f.ids_under("kept", 1).await, vec![seg(1, 1), seg(1, 2), seg(1, 3)]);

    // Deleting a releases what only it pinned: 1 and 2, not 3.
    assert_eq!(f.delete_snapshot("vol-1", "a").await.unwrap(), DirResponse::Done);
    assert_eq!(f.ids_under("kept", 1).await, vec![seg(1, 3)]);
    assert_eq!(f.ids_under("dead", 1).await, vec![seg(1, 1), seg(1, 2), seg(1, 4)]);
    assert_eq!(f.ids_under("segs", 1).await, vec![seg(1, 3)]);
    // Asked again: NotFound, and nothing else moves.
    assert_eq!(f.delete_snapshot("vol-1", "a").await.unwrap_err().kind, ErrorKind::NotFound);
    assert_eq!(f.ids_under("kept", 1).await, vec![seg(1, 3)]);
    f.delete_snapshot("vol-1", "b").await.unwrap();
    assert!(f.ids_under("kept", 1).await.is_empty());
    assert!(f.ids_under("segs", 1).await.is_empty());
    assert_eq!(f.ids_under("dead", 1).await.len(), 4);
    assert!(f.meta.list(b"snapset/").await.unwrap().is_empty());
    assert!(f.meta.list(b"snaps/").await.unwrap().is_empty());
}

#[tokio::test]
async fn two_overlapping_snapshots_count_what_each_reaches_and_what_only_it_keeps() {
    let f = Fixture::new().await;
    f.leased_volume(1).await;
    let one = record_bytes();
    f.commit_root("client-1", commit_of(1, 1, None, &[1, 2, 3, 4], &[], seg(1, 4))).await.unwrap();
    assert_eq!(f.compaction_inputs("vol-1").await.0, None, "no snapshot pins anything");
    f.snapshot("vol-1", "a").await.unwrap();
    assert_eq!(f.compaction_inputs("vol-1").await.0, Some(seg(1, 4).raw()));
    f.clock.advance(Duration::from_secs(1));
    f.commit_root("client-1", commit_of(1, 1, Some((1, 1)), &[5, 6], &[seg(1, 1)], seg(1, 6))).await.unwrap();
    f.snapshot("vol-1", "b").await.unwrap();
    // The compactor counts every segment up to the newest snapshot's
    // highest as live.
    assert_eq!(f.compaction_inputs("vol-1").await.0, Some(seg(1, 6).raw()));
    // Commit 3 drops 2 (both reach it) and 5 (only b: newer than a).
    let c = commit_of(1, 1, Some((1, 2)), &[], &[seg(1, 2), seg(1, 5)], seg(1, 6));
    f.commit_root("client-1", c).await.unwrap();
    assert_eq!(f.ids_under("kept", 1).await, vec![seg(1, 1), seg(1, 2), seg(1, 5)]);

    let list = f.snapshots("vol-1").await;
    let names: Vec<&str> = list.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "oldest first");
    assert_eq!(list[0].created_ms + 1000, list[1].created_ms);
    // a: 1 (kept, only a), 2 (kept, shared), 3, 4 (the head's).
    assert_eq!((list[0].reaches, list[0].exclusive), (4 * one, one));
    // b: 2, 3, 4, 5 (kept, only b), 6; not 1 (dropped before b).
    assert_eq!((list[1].reaches, list[1].exclusive), (5 * one, one));
    assert!(list.iter().all(|s| s.clones.is_empty()));

    // Deleting a frees exactly 1.
    f.delete_snapshot("vol-1", "a").await.unwrap();
    assert_eq!(f.ids_under("dead", 1).await, vec![seg(1, 1)]);
    assert_eq!(f.ids_under("kept", 1).await, vec![seg(1, 2), seg(1, 5)]);
    let list = f.snapshots("vol-1").await;
    assert_eq!((list[0].reaches, list[0].exclusive), (5 * one, 2 * one), "2 is b's alone now");
}

#[tokio::test]
async fn a_snapshot_with_a_clone_is_not_deleted_nor_a_volume_with_snapshots() {
    let f = Fixture::new().await;
    f.leased_volume(1).await;
    f.commit_root("client-1", commit_of(1, 1, None, &[1], &[], seg(1, 1))).await.unwrap();
    f.snapshot("vol-1", "s").await.unwrap();
    f.client("client-1", DirRequest::ReleaseLease { volume: "vol-1".into(), epoch: 1 }).await.unwrap();
    let err = f.client("client-1", DirRequest::DeleteVolume { volume: "vol-1".into() }).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Conflict, "{err}");
    assert!(err.message.contains("snapshots (s)"), "{err}");

    let clone = clone_spec("copy", 2, &[("vol-1", "s", 1, seg(1, 1), s_seq(1, 1))]);
    f.clone_volume(clone, root_of(2, 1, 1, seg(1, 1), s_seq(1, 1))).await.unwrap();
    assert_eq!(f.snapshots("vol-1").await[0].clones, ["copy"]);
    let err = f.delete_snapshot("vol-1", "s").await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Conflict, "{err}");
    assert!(err.message.contains("clones (copy)"), "{err}");
    assert_eq!(f.snapshots("vol-1").await.len(), 1);
    // Once the clone is gone, the snapshot, then the volume, go.
    f.client("client-1", DirRequest::DeleteVolume { volume: "copy".into() }).await.unwrap();
    f.delete_snapshot("vol-1", "s").await.unwrap();
    f.client("client-1", DirRequest::DeleteVolume { volume: "vol-1".into() }).await.unwrap();
    // Peers may not touch snapshots.
    let req = DirRequest::ListSnapshots { volume: "vol-2".into() };
    assert_eq!(f.ask("peer-0", Role::Peer, req).await.unwrap_err().kind, ErrorKind::Refused);
}

/// The sequence the roots of [`commit_of`] claim at `commit`.
fn s_seq(epoch: u64, commit: u64) -> Sequence {
    Sequence::new(epoch, 100 * commit).unwrap()
}

/// `vol-<id>`'s spec as a clone with `lineage` (volume, snapshot, id,
/// highest segment, highest sequence), nearest first.
fn clone_spec(name: &str, id: u8, lineage: &[(&str, &str, u8, SegmentId, Sequence)]) -> VolumeSpec {
    let lineage = lineage
        .iter()
        .map(|&(volume, snapshot, id, segment, sequence)| Ancestor {
            volume: volume.into(),
            snapshot: snapshot.into(),
            id: [id; VOLUME_ID_LEN],
            highest_segment: segment.raw(),
            highest_sequence: sequence.raw(),
        })
        .collect();
    VolumeSpec { lineage, ..spec(name, id, 2, 2) }
}

#[tokio::test]
async fn a_clone_must_match_its_parents_snapshot_geometry_and_lineage() {
    let f = Fixture::new().await;
    f.leased_volume(1).await;
    f.commit_root("client-1", commit_of(1, 1, None, &[1, 2], &[], seg(1, 2))).await.unwrap();
    f.snapshot("vol-1", "s").await.unwrap();
    let (hs, hq) = (seg(1, 2), s_seq(1, 1));
    let good = || clone_spec("copy", 2, &[("vol-1", "s", 1, hs, hq)]);
    let root = || root_of(2, 1, 1, hs, hq);
    let refused = |spec: VolumeSpec, sealed: Vec<u8>, kind: ErrorKind, says: &'static str| {
        let f = &f;
        async move {
            let err = f.clone_volume(spec, sealed).await.unwrap_err();
            assert_eq!(err.kind, kind, "{err}");
            assert!(err.message.contains(says), "{err} (wanted {says:?})");
        }
    };
    refused(VolumeSpec { lineage: vec![], ..good() }, root(), ErrorKind::Invalid, "lineage is empty").await;
    refused(clone_spec("copy", 2, &[("nope", "s", 1, hs, hq)]), root(), ErrorKind::NotFound, "nope").await;
    refused(
        clone_spec("copy", 2, &[("vol-1", "t", 1, hs, hq)]),
        root(),
        ErrorKind::NotFound,
        "no snapshot named t",
    )
    .await;
    refused(clone_spec("copy", 2, &[("vol-1", "s", 9, hs, hq)]), root(), ErrorKind::Invalid, "volume id")
        .await;
    refused(
        clone_spec("copy", 2, &[("vol-1", "s", 1, seg(1, 1), hq)]),
        root(),
        ErrorKind::Invalid,
        "highest segment",
    )
    .await;
    refused(
        clone_spec("copy", 2, &[("vol-1", "s", 1, hs, s_seq(1, 2))]),
        root(),
        ErrorKind::Invalid,
        "sequence",
    )
    .await;
    let extra = clone_spec("copy", 2, &[("vol-1", "s", 1, hs, hq), ("vol-1", "s", 1, hs, hq)]);
    refused(extra, root(), ErrorKind::Invalid, "parent's own").await;
    refused(VolumeSpec { size: good().size * 2, ..good() }, root(), ErrorKind::Invalid, "geometry").await;
    refused(VolumeSpec { m: 1, repair_threshold: 2, ..good() }, root(), ErrorKind::Invalid, "geometry").await;
    refused(VolumeSpec { name: "vol-1".into(), ..good() }, root(), ErrorKind::Conflict, "exists already")
        .await;
    refused(VolumeSpec { name: "Bad".into(), ..good() }, root(), ErrorKind::Invalid, "Bad").await;
    refused(good(), b"not a root".to_vec(), ErrorKind::Invalid, "does not parse").await;
    refused(good(), root_of(3, 1, 1, hs, hq), ErrorKind::Invalid, "volume id").await;
    refused(good(), root_of(2, 1, 2, hs, hq), ErrorKind::Invalid, "commit 1").await;
    refused(good(), root_of(2, 2, 1, hs, hq), ErrorKind::Invalid, "epoch 1").await;
    refused(good(), root_of(2, 1, 1, seg(1, 3), hq), ErrorKind::Invalid, "highest segment").await;
    // A volume id in use (the parent's) is refused too.
    let reused = VolumeSpec { id: [1; VOLUME_ID_LEN], ..good() };
    refused(reused, root_of(1, 1, 1, hs, hq), ErrorKind::Conflict, "volume id").await;
    // A plain create may not claim a lineage.
    let err = f.client("client-1", DirRequest::CreateVolume(good())).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    // Nothing was written by any of them.
    assert_eq!(f.meta.list(b"volumes/").await.unwrap().len(), 1);
    assert_eq!(f.meta.list(b"roots/").await.unwrap().len(), 1);

    let sealed = root();
    let v = f.clone_volume(good(), sealed.clone()).await.unwrap();
    assert_eq!(v.epoch, 1, "the clone starts at the snapshot's epoch");
    assert_eq!(f.root("copy").await, Some(RootState { sealed, epoch: 1, commit: 1 }));
    assert_eq!(f.snapshots("vol-1").await[0].clones, ["copy"]);
}

#[tokio::test]
async fn a_clone_of_a_clone_reads_its_ancestors_records_and_drops_only_its_own() {
    let f = Fixture::new().await;
    // The parent, vol-1: segments 1..3 at epoch 1; snapshot s1.
    f.leased_volume(1).await;
    f.commit_root("client-1", commit_of(1, 1, None, &[1, 2, 3], &[], seg(1, 3))).await.unwrap();
    f.snapshot("vol-1", "s1").await.unwrap();
    let p = ("vol-1", "s1", 1, seg(1, 3), s_seq(1, 1));
    // vol-2 clones vol-1@s1 and writes segments of its own (epoch 2).
    f.clone_volume(clone_spec("vol-2", 2, &[p]), root_of(2, 1, 1, seg(1, 3), s_seq(1, 1))).await.unwrap();
    assert_eq!(f.acquire("client-1", "vol-2", false).await.unwrap().epoch, 2);
    f.commit_root("client-1", commit_of(2, 2, Some((1, 1)), &[1, 2], &[], seg(2, 2))).await.unwrap();
    f.snapshot("vol-2", "s2").await.unwrap();
    let c1 = ("vol-2", "s2", 2, seg(2, 2), s_seq(2, 2));
    // vol-3 clones vol-2@s2 (three levels) and writes one segment.
    f.clone_volume(clone_spec("vol-3", 3, &[c1, p]), root_of(3, 2, 1, seg(2, 2), s_seq(2, 2))).await.unwrap();
    assert_eq!(f.acquire("client-1", "vol-3", false).await.unwrap().epoch, 3);
    // A commit may not add a segment at or below what it inherits.
    let low = commit_of(3, 3, Some((2, 1)), &[], &[], seg(3, 1));
    let low = RootCommit { segments: vec![(seg(2, 2), record(&[9], 9))], ..low };
    assert_eq!(f.commit_root("client-1", low).await.unwrap_err().kind, ErrorKind::Invalid);
    f.commit_root("client-1", commit_of(3, 3, Some((2, 1)), &[1], &[], seg(3, 1))).await.unwrap();

    let got = f.segment_records("vol-3", vec![seg(1, 2), seg(2, 1), seg(3, 1), seg(3, 9), seg(1, 3)]).await;
    let want = vec![
        Some(record(&[1, 2, 3, 4], 2)),
        Some(record(&[1, 2, 3, 4], 1)),
        Some(record(&[1, 2, 3, 4], 1)),
        None,
        Some(record(&[1, 2, 3, 4], 3)),
    ];
    assert_eq!(got, want);
    // Which volume's: vol-2's segment (2, 1), vol-1's (1, 2).
    assert_eq!(
        f.segment_records("vol-2", vec![seg(2, 1), seg(1, 2)]).await,
        vec![want[1].clone(), want[0].clone()]
    );
    assert_eq!(f.list_segments("vol-3").await, vec![seg(3, 1)]);
    assert_eq!(f.list_segments("vol-2").await, vec![seg(2, 1), seg(2, 2)]);

    // vol-3 drops an inherited segment (its root no longer reaches it)
    // and its own: the ancestors' records stay as they are.
    let c = commit_of(3, 3, Some((3, 2)), &[2], &[seg(1, 2), seg(2, 1), seg(3, 1)], seg(3, 2));
    f.commit_root("client-1", c).await.unwrap();
    assert_eq!(f.ids_under("segs", 1).await, vec![seg(1, 1), seg(1, 2), seg(1, 3)]);
    assert_eq!(f.ids_under("segs", 2).await, vec![seg(2, 1), seg(2, 2)]);
    assert!(f.ids_under("dead", 1).await.is_empty() && f.ids_under("dead", 2).await.is_empty());
    assert_eq!(f.ids_under("dead", 3).await, vec![seg(3, 1)]);

    // The ancestors' snapshots are held; deleting vol-3 erases only its id.
    assert_eq!(f.delete_snapshot("vol-2", "s2").await.unwrap_err().kind, ErrorKind::Conflict);
    f.client("client-1", DirRequest::ReleaseLease { volume: "vol-3".into(), epoch: 3 }).await.unwrap();
    f.client("client-1", DirRequest::DeleteVolume { volume: "vol-3".into() }).await.unwrap();
    let gc: Vec<Vec<u8>> = f.meta.list(b"gc/").await.unwrap().into_iter().map(|e| e.value).collect();
    assert_eq!(gc, vec![[3; VOLUME_ID_LEN].to_vec()]);
    assert_eq!(f.ids_under("segs", 1).await.len(), 3);
    assert_eq!(f.ids_under("segs", 2).await.len(), 2);
    f.delete_snapshot("vol-2", "s2").await.unwrap();
    assert_eq!(
        f.delete_snapshot("vol-1", "s1").await.unwrap_err().kind,
        ErrorKind::Conflict,
        "vol-2 still reads it"
    );
}

#[tokio::test]
async fn a_rollback_revives_what_the_snapshot_pins_and_is_fenced_and_conflicted_like_a_commit() {
    let f = Fixture::new().await;
    f.leased_volume(1).await;
    f.commit_root("client-1", commit_of(1, 1, None, &[1, 2, 3], &[], seg(1, 3))).await.unwrap();
    f.snapshot("vol-1", "a").await.unwrap();
    // Commit 2 drops 1 and 2 (kept for a) and adds 4.
    let c = commit_of(1, 1, Some((1, 1)), &[4], &[seg(1, 1), seg(1, 2)], seg(1, 4));
    f.commit_root("client-1", c).await.unwrap();
    // b, taken now, pins 3 and 4 when they go.
    f.snapshot("vol-1", "b").await.unwrap();
    assert_eq!(f.ids_under("kept", 1).await, vec![seg(1, 1), seg(1, 2)]);
    let back = |commit: u64, highest: SegmentId, sequence: Sequence| root_of(1, 1, commit, highest, sequence);
    let ok = || back(3, seg(1, 4), s_seq(1, 3));

    // Refused as a commit would be: wrong commit number, another
    // volume's root, a root that is not the current one.
    let err = f.rollback("client-1", "a", 1, (1, 2), back(4, seg(1, 4), s_seq(1, 3))).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    let err =
        f.rollback("client-1", "a", 1, (1, 2), root_of(2, 1, 3, seg(1, 4), s_seq(1, 3))).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    let err = f.rollback("client-1", "a", 1, (1, 1), back(2, seg(1, 4), s_seq(1, 3))).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Conflict, "{err}");
    // A root that lowers the highest segment or sequence (which would let
    // ids or sequences be used twice).
    let err = f.rollback("client-1", "a", 1, (1, 2), back(3, seg(1, 3), s_seq(1, 3))).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    assert!(err.message.contains("below the current root"), "{err}");
    let err = f.rollback("client-1", "a", 1, (1, 2), back(3, seg(1, 4), s_seq(1, 1))).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    // An unknown snapshot; a writer without the lease.
    assert_eq!(f.rollback("client-1", "zz", 1, (1, 2), ok()).await.unwrap_err().kind, ErrorKind::NotFound);
    assert_eq!(f.rollback("client-2", "a", 1, (1, 2), ok()).await.unwrap_err().kind, ErrorKind::Fenced);
    assert_eq!(f.root("vol-1").await.unwrap().commit, 2, "nothing changed");
    assert_eq!(f.ids_under("kept", 1).await, vec![seg(1, 1), seg(1, 2)]);

    // The rollback to a: commit 3; 1 and 2 are the head's again.
    let sealed = ok();
    assert_eq!(f.rollback("client-1", "a", 1, (1, 2), sealed.clone()).await.unwrap(), 3);
    assert_eq!(f.root("vol-1").await, Some(RootState { sealed, epoch: 1, commit: 3 }));
    assert!(f.ids_under("kept", 1).await.is_empty());
    assert_eq!(f.list_segments("vol-1").await, vec![seg(1, 1), seg(1, 2), seg(1, 3), seg(1, 4)]);
    // The attach then drops 4, which the rolled-back root does not reach:
    // b (taken before) pins it, a (which never reached it) does not.
    let drop = DirRequest::DropSegments { volume: "vol-1".into(), epoch: 1, ids: vec![seg(1, 4)] };
    f.client("client-1", drop).await.unwrap();
    assert_eq!(f.ids_under("kept", 1).await, vec![seg(1, 4)]);
    // Deleting a releases nothing now (the head reaches 1..3); deleting b
    // releases 4.
    f.delete_snapshot("vol-1", "a").await.unwrap();
    assert_eq!(f.ids_under("kept", 1).await, vec![seg(1, 4)]);
    assert!(f.ids_under("dead", 1).await.is_empty());
    f.delete_snapshot("vol-1", "b").await.unwrap();
    assert_eq!(f.ids_under("dead", 1).await, vec![seg(1, 4)]);
    assert_eq!(f.ids_under("segs", 1).await, vec![seg(1, 1), seg(1, 2), seg(1, 3)]);

    // After a takeover, the old writer's rollback is fenced.
    f.snapshot("vol-1", "c").await.unwrap();
    assert_eq!(f.acquire("client-2", "vol-1", true).await.unwrap().epoch, 2);
    let err = f.rollback("client-1", "c", 1, (1, 3), back(4, seg(1, 4), s_seq(1, 4))).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Fenced, "{err}");
}

#[tokio::test]
async fn reconciliation_and_collection_leave_kept_and_inherited_shards_alone() {
    let f = Fixture::with_peers(4).await;
    f.leased_volume(1).await;
    f.commit_root("client-1", commit_of(1, 1, None, &[1, 2], &[], seg(1, 2))).await.unwrap();
    f.snapshot("vol-1", "s").await.unwrap();
    // The head drops segment 1 (kept for s) and 2 is inherited by a clone.
    f.commit_root("client-1", commit_of(1, 1, Some((1, 1)), &[3], &[seg(1, 1)], seg(1, 3))).await.unwrap();
    let p = ("vol-1", "s", 1, seg(1, 2), s_seq(1, 1));
    f.clone_volume(clone_spec("vol-2", 2, &[p]), root_of(2, 1, 1, seg(1, 2), s_seq(1, 1))).await.unwrap();
    assert_eq!(f.acquire("client-2", "vol-2", false).await.unwrap().epoch, 2);
    f.commit_root("client-2", commit_of(2, 2, Some((1, 1)), &[1], &[], seg(2, 1))).await.unwrap();
    // Each peer i holds shard i of every recorded segment, by its own id.
    let peers = FakePeers::default();
    let held =
        [shard(1, seg(1, 1), 0), shard(1, seg(1, 2), 0), shard(1, seg(1, 3), 0), shard(2, seg(2, 1), 0)];
    for k in held {
        for index in 0..4u8 {
            peers.hold(usize::from(index), SegmentShardKey { index, ..k });
        }
    }
    let mut orphans = collector::Orphans::default();
    for _ in 0..3 {
        let pass = f.dir.reconcile(&peers, &mut orphans, None).await.unwrap();
        assert_eq!((pass.checked, pass.found, pass.erased), (16, 0, 0), "{pass:?}");
        assert_eq!(f.dir.collect_once(&peers).await.unwrap(), 0);
        f.pass_time(GRACE, 0..4).await;
    }
    assert!(peers.erased().is_empty(), "{:?}", peers.erased());
}
