//! The directory: the cluster's memory and its certificate authority.
//!
//! Everything it knows lives in a [`MetaStore`] (redb here; etcd later),
//! under these keys (values postcard-encoded; the builders and records are
//! in `schema.rs`):
//!
//! ```text
//! config/cluster              the cluster's name
//! config/scrub                the peers' scrub directive: paused until
//!                             when, a pass asked for when (heal/scrub.rs)
//! nodes/<name>                every member that joined: role, when
//! peers/<name>                a peer's last report and when it came
//! hints/<name>                a client's measured round trips to peers
//! volumes/<name>              geometry, key check, KDF, fencing epoch
//! ids/<volume id>             a volume id's name (ids are never reused)
//! leases/<name>               a volume's write lease (holder, epoch), on a
//!                             store lease renewed by its holder
//! gc/<volume id>              a deleted volume whose shards peers still hold
//! tokens/<hash>               unspent join tokens (see tokens.rs)
//! drain/<name>                a peer that is leaving: why, since when
//! removed/<name>              a peer removed from the cluster (its
//!                             heartbeats are refused)
//! audit/<name>                what audits found of a peer (AuditTally)
//! peerid/<name>               a peer's small id (u16), given once
//! peerslot/<id>               the name of the peer with that id; never
//!                             deleted, so ids are never reused
//! roots/<volume id>           the volume's committed root
//! segs/<volume id>/<seg>      a live segment's record (peer ids, shard
//!                             length and segment root, ≤ 64 bytes)
//! dead/<volume id>/<seg>      a dropped segment's record and when it was
//!                             dropped: its shards are erased after the
//!                             collection grace (heal/collector.rs)
//! segfloor/<volume id>        no new segment record at or below this id
//!                             (the collector erased orphans up to it)
//! snaps/<volume id>/<name>    a snapshot: the root it keeps, its highest
//!                             segment and sequence
//! snapset/<volume id>         the volume's snapshots in brief (name,
//!                             commit, highest segment), oldest first;
//!                             every drop compares it
//! kept/<volume id>/<seg>      a segment the head dropped (at which commit,
//!                             when) that a snapshot pins: its record stays
//!                             in segs/ (snapshots.rs)
//! ```
//!
//! (`<volume id>` in hex, `<seg>` a big-endian u64, `<id>` a big-endian
//! u16.)
//!
//! A peer is up while its last heartbeat is younger than `peer_timeout`,
//! and lost once it is older than `peer_lost_after` (then repair rebuilds
//! its shards elsewhere), so liveness needs no timer and survives a
//! directory restart (a peer is down until it reports again). Lost counts
//! only silence since this directory started: after an outage of the
//! directory longer than `peer_lost_after`, a peer slow to report again is
//! down, not lost (else repair would rebuild all it holds, and the
//! collector stop waiting for it).
//!
//! The service is split by concern, each file an `impl` block of
//! [`Directory`]:
//!
//! - this file: the [`Directory`] itself, [`open`] and [`run`], and the
//!   request dispatch (who may ask what);
//! - `schema.rs`: the keys above, the records stored under them, encoding;
//! - `members.rs`: joining, peers' heartbeats, clients' latency hints,
//!   cluster status, join tokens (with [`tokens`]);
//! - `volumes.rs`: creating, describing and deleting volumes, and the write
//!   leases that fence a volume's writers;
//! - `roots.rs`: volumes' roots and segment records, placing segments in
//!   batches (with [`placement`]), and grouped commits (many roots, one
//!   fsync);
//! - `snapshots.rs`: snapshots, what they pin, clones and rollbacks;
//! - `segment_health.rs`: a few segments' health for an attach's
//!   `meshdisk:health` map;
//! - [`heal`]: background work that keeps the peers' contents in line with
//!   the directory's records: segments' [`heal::health`], their
//!   [`heal::repair`], and the garbage [`heal::collector`] (deleted
//!   volumes, dropped segments, orphans found by reconciliation);
//! - [`meta`]: the store trait and its embedded implementation.
//!
//! Every time the directory records or compares comes from one
//! [`Clock`] it is given (the store gets the same one, so store leases
//! expire on it too): tests drive a [`Directory`] in one process with a
//! [`crate::sys::clock::ManualClock`] and a pinned placement seed.

pub mod heal;
mod members;
pub mod meta;
pub mod placement;
mod roots;
mod schema;
mod segment_health;
mod snapshots;
#[cfg(test)]
mod tests;
pub mod tokens;
mod volumes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::api::*;
use crate::membership::ca::{CaError, ClusterCa, Role, check_label, new_key_and_csr};
use crate::membership::credential::{Credential, CredentialError};
use crate::sys::clock::{self, Clock};
use crate::sys::worker::{Runner, WorkerInfo};
use crate::transport::rpc::{self, Caller, Handler, RpcError};
use crate::transport::tls::{ClientAuth, TlsError, client_config, server_config};
use meta::embedded::RedbStore;
use meta::{Compare, MetaError, MetaStore, Op, Txn};
use tokens::Issuer;

/// Settings of a directory process.
#[derive(Clone, Debug)]
pub struct DirectoryConfig {
    pub data: PathBuf,
    pub listen: SocketAddr,
    /// The address members are told to use (defaults to `listen`).
    pub advertise: Option<String>,
    /// The cluster's name, used on first start only.
    pub cluster: String,
    pub peer_timeout: Duration,
    /// A peer silent this long is lost: repair rebuilds its shards.
    pub peer_lost_after: Duration,
    /// A volume's write lease lapses this long after its last renewal.
    pub lease_ttl: Duration,
    /// A dropped segment's shards are erased no sooner than this after
    /// the drop.
    pub drop_grace: Duration,
    /// An orphan shard is erased no sooner than this after it was first
    /// seen.
    pub collect_grace: Duration,
    /// How often the peers' shards are reconciled with the records.
    pub reconcile_every: Duration,
    /// How hard repair works.
    pub repair: heal::repair::RepairConfig,
    /// Time between two audits (zero: none).
    pub audit_every: Duration,
    /// Percent of capacity used at or above which a peer sheds shards.
    pub high_water: u8,
}

/// How long the directory's records stay good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// A peer is down when its last heartbeat is older than this.
    pub peer_timeout: Duration,
    /// A peer is lost when its last heartbeat is older than this (longer
    /// than `peer_timeout`): its shards are rebuilt on others, so a reboot
    /// or a flaky link does not start a repair storm.
    pub peer_lost_after: Duration,
    /// A volume's write lease lapses this long after its last renewal.
    pub lease_ttl: Duration,
    /// A dropped segment's shards are erased no sooner than this after
    /// the drop: the writer's reads of it in flight finish (and one that
    /// does not reads the block from where the map says it moved).
    pub drop_grace: Duration,
    /// The collection grace: an orphan shard (no record names it) is
    /// erased no sooner than this after it was first seen (what protects
    /// commits in flight).
    pub collect_grace: Duration,
    /// How often the collector reconciles the peers' shards with the
    /// segment records.
    pub reconcile_every: Duration,
}

impl From<&DirectoryConfig> for Timing {
    fn from(c: &DirectoryConfig) -> Self {
        Self {
            peer_timeout: c.peer_timeout,
            peer_lost_after: c.peer_lost_after,
            lease_ttl: c.lease_ttl,
            drop_grace: c.drop_grace,
            collect_grace: c.collect_grace,
            reconcile_every: c.reconcile_every,
        }
    }
}

/// Why a directory could not start.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: RpcError },
    #[error("the endpoint's local address: {0}")]
    LocalAddr(std::io::Error),
}

/// The directory's state and logic, over a metadata store.
pub struct Directory<S: MetaStore> {
    meta: S,
    ca: ClusterCa,
    issuer: Issuer,
    timing: Timing,
    /// Milliseconds since the Unix epoch, for everything recorded or compared.
    clock: Clock,
    /// When this process started (the clock's milliseconds): a peer is
    /// lost only once silent for `peer_lost_after` of the directory's own
    /// watch, not of a time it was down.
    started_ms: u64,
    /// Placement's random numbers (xorshift; never 0).
    seed: std::sync::Mutex<u64>,
    /// Wakes the garbage collector (a volume was deleted).
    gc: tokio::sync::Notify,
    /// The repair worker's progress, for status.
    repair: std::sync::Mutex<RepairProgress>,
    /// Wakes the repair worker (a shard was forgotten, a drain started).
    repair_wake: tokio::sync::Notify,
    /// Shards forgotten from a holder, and when (heal/faults.rs: repeats).
    forgotten_at:
        std::sync::Mutex<std::collections::HashMap<(crate::codec::segment::SegmentShardKey, u16), u64>>,
    /// Readers' reports of shards whose answers did not verify.
    suspects: heal::audit::Suspects,
    /// Wakes the audit worker (a suspect).
    audit_wake: tokio::sync::Notify,
    /// Segments the last health scan sampled for audits.
    audit_sample: heal::audit::Sample,
    /// Used space (percent of capacity) at or above which a peer sheds
    /// shards and gets no new ones.
    high_water: std::sync::atomic::AtomicU8,
    /// Per volume, the clients' requests per second its holder last
    /// reported (with its lease renewal), and when: repair yields to them.
    client_load: std::sync::Mutex<std::collections::HashMap<String, (u64, u32)>>,
    /// Root commits waiting to go to the store together.
    commits: roots::CommitQueue,
    /// The background workers [`run`] starts (the collector), for status.
    workers: Runner,
    /// Stops them.
    halt: CancellationToken,
}

/// Opens (on first start: creates) the directory in `config.data`: the
/// metadata store, the CA, the directory's own credential and the admin's.
pub async fn open(config: &DirectoryConfig) -> Result<(Directory<RedbStore>, Credential), DirectoryError> {
    let data = &config.data;
    std::fs::create_dir_all(data).map_err(|source| DirectoryError::Io { path: data.clone(), source })?;
    let clock = clock::system();
    let meta = RedbStore::open_with_clock(&data.join("directory.redb"), clock.clone())?;
    let cluster = match meta.get(b"config/cluster").await? {
        Some(e) => String::from_utf8_lossy(&e.value).into_owned(),
        None => {
            check_label(&config.cluster)?;
            meta.txn(Txn::new().when(Compare::Absent(b"config/cluster".to_vec())).then(Op::Put {
                key: b"config/cluster".to_vec(),
                value: config.cluster.as_bytes().to_vec(),
                lease: None,
            }))
            .await?;
            tracing::info!("created cluster {}", config.cluster);
            config.cluster.clone()
        }
    };
    let ca = if data.join("ca.key").exists() {
        ClusterCa::load(data, &cluster)?
    } else {
        ClusterCa::create(data, &cluster)?
    };
    let advertise = config.advertise.clone().unwrap_or_else(|| {
        let mut a = config.listen;
        if a.ip().is_unspecified() {
            a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        a.to_string()
    });
    let own = node_credential(&ca, data, "directory.cred", "directory", Role::Directory, &advertise)?;
    node_credential(&ca, data, "admin.cred", "admin", Role::Admin, &advertise)?;
    let dir = Directory::new(meta, ca, Timing::from(config), clock)?;
    Ok((dir, own))
}

/// Loads `file` in `data`, or issues it; keeps its directory address current.
fn node_credential(
    ca: &ClusterCa,
    data: &Path,
    file: &str,
    node: &str,
    role: Role,
    advertise: &str,
) -> Result<Credential, DirectoryError> {
    let path = data.join(file);
    let mut cred = if path.exists() {
        Credential::load(&path)?
    } else {
        let (key, csr) = new_key_and_csr()?;
        let cert = ca.issue(&csr, node, role)?;
        Credential {
            cluster: ca.cluster().to_owned(),
            node: node.to_owned(),
            role,
            directory: advertise.to_owned(),
            ca_pem: ca.cert_pem().to_owned(),
            cert_pem: format!("{cert}{}", ca.cert_pem()),
            key_pem: key.serialize_pem(),
        }
    };
    if cred.directory != advertise || !path.exists() {
        cred.directory = advertise.to_owned();
        cred.save(&path)?;
    }
    Ok(cred)
}

/// Runs a directory until `stop`: serves requests and runs the collector.
pub async fn run(config: DirectoryConfig, stop: CancellationToken) -> Result<(), DirectoryError> {
    let (dir, own) = open(&config).await?;
    let id = own.identity();
    let ep = rpc::server_endpoint(
        config.listen,
        server_config(&id, ClientAuth::Optional)?,
        client_config(&id)?,
        own.key_pem.as_bytes(),
    )
    .map_err(|source| DirectoryError::Listen { addr: config.listen, source })?;
    let addr = ep.local_addr().map_err(DirectoryError::LocalAddr)?;
    tracing::info!(
        "directory of cluster {} listening on {addr} (QUIC); admin credential: {}",
        dir.issuer.cluster,
        config.data.join("admin.cred").display()
    );
    // Tests and scripts read this line.
    println!("directory listening on {addr}");
    dir.set_high_water(config.high_water);
    let dir = Arc::new(dir);
    let peers = crate::client::Client::on(own, ep.clone(), addr);
    heal::collector::start(&dir, peers.clone());
    heal::audit::start(&dir, peers.clone(), config.audit_every);
    heal::repair::start(&dir, peers, config.repair);
    rpc::serve(ep, dir.clone(), stop).await;
    dir.halt.cancel();
    // Bounded: a collector pass may be waiting on peers that are gone
    // (its queue is in the store; the next start takes it up).
    dir.workers.join_within(crate::sys::worker::STOP_WAIT).await;
    Ok(())
}

impl<S: MetaStore> Directory<S> {
    /// A directory over `meta` and its CA. Every time it records or
    /// compares comes from `clock`, which should be the store's clock too
    /// (so store leases expire on the same time). No worker runs until
    /// [`run`] (or a test) starts one.
    pub fn new(meta: S, ca: ClusterCa, timing: Timing, clock: Clock) -> Result<Self, DirectoryError> {
        let issuer = Issuer { cluster: ca.cluster().to_owned(), ca_pin: ca.pin()? };
        let halt = CancellationToken::new();
        Ok(Self {
            meta,
            issuer,
            ca,
            timing,
            seed: std::sync::Mutex::new(clock() | 1),
            started_ms: clock(),
            clock,
            gc: tokio::sync::Notify::new(),
            repair: Default::default(),
            repair_wake: tokio::sync::Notify::new(),
            forgotten_at: Default::default(),
            suspects: Default::default(),
            audit_wake: tokio::sync::Notify::new(),
            audit_sample: Default::default(),
            high_water: std::sync::atomic::AtomicU8::new(heal::drain::HIGH_WATER),
            client_load: Default::default(),
            commits: roots::CommitQueue::default(),
            workers: Runner::new(halt.clone()),
            halt,
        })
    }

    /// Pins placement's random numbers, so a test places the same way
    /// every run.
    pub fn with_seed(self, seed: u64) -> Self {
        *self.seed.lock().expect("not poisoned") = seed | 1;
        self
    }

    /// Sets the high-water mark of peers' used space (percent, 50..=100).
    pub fn set_high_water(&self, percent: u8) {
        self.high_water.store(percent.clamp(50, 100), std::sync::atomic::Ordering::Relaxed);
    }

    /// The directory's background workers and their state, as status shows them.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.workers.list()
    }

    fn note_client_load(&self, volume: &str, ops: u32) {
        let now = self.now();
        self.client_load.lock().expect("not poisoned").insert(volume.to_owned(), (now, ops));
    }

    /// The clients' requests per second over the volumes whose holders
    /// reported within two lease renewals.
    pub(crate) fn client_load(&self) -> u64 {
        let fresh = (self.timing.lease_ttl.as_millis() as u64 * 2 / 3).max(1000);
        let now = self.now();
        let mut load = self.client_load.lock().expect("not poisoned");
        load.retain(|_, (at, _)| now.saturating_sub(*at) <= fresh);
        load.values().map(|(_, ops)| u64::from(*ops)).sum()
    }

    /// Milliseconds since the Unix epoch, by the directory's clock.
    fn now(&self) -> u64 {
        (self.clock)()
    }

    fn random(&self) -> f64 {
        let mut x = self.seed.lock().expect("not poisoned");
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Answers one request from `caller` (whose certificate says who it is
    /// and in which role).
    pub async fn dispatch(&self, caller: &Caller, req: DirRequest) -> Result<DirResponse, Remote> {
        if let DirRequest::Join { token, role, csr_pem, name } = req {
            return self.join(&token, role, &csr_pem, name).await;
        }
        let Some(who) = &caller.name else {
            return Err(Remote::new(
                ErrorKind::Refused,
                "this connection has no certificate from this cluster: join first with a token (`meshdisk token create` on the admin side)",
            ));
        };
        let needs = |ok: &[Role]| {
            if ok.contains(&who.role) {
                Ok(())
            } else {
                Err(Remote::new(ErrorKind::Refused, format!("a {} may not do that", who.role.as_str())))
            }
        };
        match req {
            DirRequest::Join { .. } => unreachable!("handled above"),
            DirRequest::Heartbeat(report) => {
                needs(&[Role::Peer])?;
                self.heartbeat(&who.node, report).await
            }
            DirRequest::Hints { rtts } => {
                needs(&[Role::Client, Role::Admin])?;
                self.hints(&who.node, rtts).await
            }
            DirRequest::Status => {
                // Not for peers: volumes' key checks and passphrase
                // parameters are for those who may hold the keys.
                needs(&[Role::Client, Role::Admin])?;
                self.status().await
            }
            DirRequest::CreateToken { role, ttl_secs } => {
                needs(&[Role::Admin])?;
                self.create_token(role, ttl_secs).await
            }
            DirRequest::CreateVolume(spec) => {
                needs(&[Role::Client, Role::Admin])?;
                self.create_volume(spec).await
            }
            DirRequest::Volume { volume } => {
                needs(&[Role::Client, Role::Admin])?;
                Ok(DirResponse::Volume(self.volume(&volume).await?))
            }
            DirRequest::VolumeInfo { volume } => {
                needs(&[Role::Client, Role::Admin])?;
                self.volume_info(&volume).await
            }
            DirRequest::DeleteVolume { volume } => {
                needs(&[Role::Client, Role::Admin])?;
                self.delete_volume(&volume).await
            }
            DirRequest::AcquireLease { volume, force, resume, host } => {
                needs(&[Role::Client, Role::Admin])?;
                self.acquire(&who.node, &volume, force, resume, &host).await
            }
            DirRequest::RenewLease { volume, epoch, ops } => {
                needs(&[Role::Client, Role::Admin])?;
                self.note_client_load(&volume, ops);
                self.renew(&who.node, &volume, epoch).await
            }
            DirRequest::ReleaseLease { volume, epoch } => {
                needs(&[Role::Client, Role::Admin])?;
                self.release_lease(&who.node, &volume, epoch).await
            }
            DirRequest::PlaceSegments { volume, epoch, count, shard_bytes, exclude, keep_free } => {
                needs(&[Role::Client, Role::Admin])?;
                let room = roots::Room { shard_bytes, keep_free };
                self.place_segments(&who.node, &volume, epoch, count, room, &exclude).await
            }
            DirRequest::GetRoot { volume } => {
                needs(&[Role::Client, Role::Admin])?;
                self.get_root(&volume).await
            }
            DirRequest::CommitRoot(c) => {
                needs(&[Role::Client, Role::Admin])?;
                self.commit_root(&who.node, c).await
            }
            DirRequest::SegmentRecords { volume, ids } => {
                needs(&[Role::Client, Role::Admin])?;
                self.segment_records(&volume, &ids).await
            }
            DirRequest::PeerSlots { ids } => {
                needs(&[Role::Client, Role::Admin])?;
                self.peer_slots(&ids).await
            }
            DirRequest::SetKeySlots { volume, expected, slots } => {
                needs(&[Role::Client, Role::Admin])?;
                self.set_key_slots(&volume, &expected, slots).await
            }
            DirRequest::DropSegments { volume, epoch, ids } => {
                needs(&[Role::Client, Role::Admin])?;
                self.drop_segments(&who.node, &volume, epoch, ids).await
            }
            DirRequest::ListSegments { volume, after, limit } => {
                needs(&[Role::Client, Role::Admin])?;
                self.list_segments(&volume, after, limit).await
            }
            DirRequest::CreateSnapshot { volume, snapshot } => {
                needs(&[Role::Client, Role::Admin])?;
                self.create_snapshot(&volume, &snapshot).await
            }
            DirRequest::ListSnapshots { volume } => {
                needs(&[Role::Client, Role::Admin])?;
                self.list_snapshots(&volume).await
            }
            DirRequest::DeleteSnapshot { volume, snapshot } => {
                needs(&[Role::Client, Role::Admin])?;
                self.delete_snapshot(&volume, &snapshot).await
            }
            DirRequest::SnapshotRoot { volume, snapshot } => {
                needs(&[Role::Client, Role::Admin])?;
                self.snapshot_root(&volume, &snapshot).await
            }
            DirRequest::CloneVolume { spec, sealed } => {
                needs(&[Role::Client, Role::Admin])?;
                self.clone_volume(spec, sealed).await
            }
            DirRequest::Rollback { volume, snapshot, epoch, expected, sealed } => {
                needs(&[Role::Client, Role::Admin])?;
                self.rollback(&who.node, &volume, &snapshot, epoch, expected, sealed).await
            }
            DirRequest::ReportShardFaults { faults } => {
                needs(&[Role::Peer])?;
                self.shard_faults(&who.node, faults).await
            }
            DirRequest::DrainPeer { peer, cancel } => {
                needs(&[Role::Admin])?;
                self.drain_peer(&peer, DrainReason::Operator, cancel).await
            }
            DirRequest::RemovePeer { peer } => {
                needs(&[Role::Admin])?;
                self.remove_peer(&peer).await
            }
            DirRequest::SuspectShard { shard, peer } => {
                needs(&[Role::Client, Role::Admin])?;
                self.suspect_shard(&who.node, shard, &peer).await
            }
            DirRequest::SegmentHealth { volume, ids } => {
                needs(&[Role::Client, Role::Admin])?;
                self.segment_health(&volume, &ids).await
            }
            DirRequest::SegmentRoots { shards } => {
                needs(&[Role::Peer])?;
                self.segment_roots(&shards).await
            }
            DirRequest::CompactionInputs { volume } => {
                needs(&[Role::Client, Role::Admin])?;
                self.compaction_inputs(&volume).await
            }
            DirRequest::Scrub(cmd) => {
                needs(&[Role::Admin])?;
                self.scrub_command(cmd).await
            }
        }
    }
}

impl<S: MetaStore> Handler for Directory<S> {
    type Request = DirRequest;
    type Response = DirResponse;

    async fn handle(&self, caller: Caller, req: DirRequest, _payload: Bytes) -> (DirResponse, Bytes) {
        let answer = self.dispatch(&caller, req).await.unwrap_or_else(|e| {
            if e.kind == ErrorKind::Internal {
                tracing::error!("{e}");
            }
            DirResponse::Error(e)
        });
        (answer, Bytes::new())
    }
}
