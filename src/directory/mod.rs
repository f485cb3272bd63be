//! The directory: the cluster's memory and its certificate authority.
//!
//! Everything it knows lives in a [`MetaStore`] (redb here; etcd later),
//! under these keys (values postcard-encoded):
//!
//! ```text
//! config/cluster              the cluster's name
//! nodes/<name>                every member that joined: role, when
//! peers/<name>                a peer's last report and when it came
//! hints/<name>                a client's measured round trips to peers
//! volumes/<name>              geometry, key check, KDF, fencing epoch
//! leases/<name>               a volume's write lease (holder, epoch), on a
//!                             store lease renewed by its holder
//! gc/<volume id>              a deleted volume whose shards peers still hold
//! stripes/<volume id>/<n>     a stripe's committed generation: peers, hashes
//! reservations/<id>           space held for a stripe being written; the key
//!                             lives on a store lease, so it vanishes when
//!                             the reservation expires
//! tokens/<hash>               unspent join tokens (see tokens.rs)
//! ```
//!
//! A peer is up while its last heartbeat is younger than `peer_timeout`, so
//! liveness needs no timer and survives a directory restart (a peer is down
//! until it reports again).

pub mod meta;
pub mod placement;
pub mod tokens;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::api::*;
use crate::codec::shard::ShardKey;
use crate::membership::ca::{CaError, ClusterCa, Role, check_label, new_key_and_csr};
use crate::membership::credential::Credential;
use crate::sys::clock::now_ms;
use crate::transport::rpc::{self, Caller, Handler};
use crate::transport::tls::{ClientAuth, client_config, server_config};
use meta::embedded::RedbStore;
use meta::{Compare, MetaError, MetaStore, Op, Txn};
use placement::{Candidate, choose_spread};
use tokens::{Issuer, SpendError};

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
    pub reservation_ttl: Duration,
    /// A volume's write lease lapses this long after its last renewal.
    pub lease_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{0}")]
    Other(String),
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("records always encode")
}

fn dec<T: DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, Remote> {
    postcard::from_bytes(b).map_err(|e| internal(format!("corrupt {what} record: {e}")))
}

fn internal(message: impl Into<String>) -> Remote {
    Remote::new(ErrorKind::Internal, message)
}

impl From<MetaError> for Remote {
    fn from(e: MetaError) -> Self {
        internal(format!("directory store: {e}"))
    }
}

#[derive(Serialize, Deserialize)]
struct NodeRecord {
    role: Role,
    joined_ms: u64,
}

#[derive(Serialize, Deserialize, Clone)]
struct PeerRecord {
    report: PeerReport,
    last_seen_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct HintRecord {
    rtts: Vec<Rtt>,
    at_ms: u64,
}

#[derive(Serialize, Deserialize, Clone)]
struct ReservationRecord {
    volume: String,
    stripe: u64,
    generation: u64,
    peers: Vec<String>,
    shard_bytes: u64,
    expires_ms: u64,
}

fn key(prefix: &str, name: &str) -> Vec<u8> {
    format!("{prefix}/{name}").into_bytes()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(h: &[u8]) -> Option<[u8; VOLUME_ID_LEN]> {
    let s = std::str::from_utf8(h).ok()?;
    let mut out = [0u8; VOLUME_ID_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn stripe_prefix(volume: &[u8; VOLUME_ID_LEN]) -> Vec<u8> {
    format!("stripes/{}/", hex(volume)).into_bytes()
}

fn stripe_key(volume: &[u8; VOLUME_ID_LEN], stripe: u64) -> Vec<u8> {
    let mut k = stripe_prefix(volume);
    k.extend_from_slice(&stripe.to_be_bytes());
    k
}

/// A superseded generation waiting for its shards to be erased:
/// `old/<volume hex>/<stripe be64><generation be64>` → its record.
fn old_prefix(volume: &[u8; VOLUME_ID_LEN]) -> Vec<u8> {
    format!("old/{}/", hex(volume)).into_bytes()
}

fn old_key(volume: &[u8; VOLUME_ID_LEN], stripe: u64, generation: u64) -> Vec<u8> {
    let mut k = old_prefix(volume);
    k.extend_from_slice(&stripe.to_be_bytes());
    k.extend_from_slice(&generation.to_be_bytes());
    k
}

fn reservation_key(id: u64) -> Vec<u8> {
    let mut k = b"reservations/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Bytes a shard of `shard_size` payload takes on a peer.
pub fn shard_bytes(shard_size: u32) -> u64 {
    u64::from(shard_size) + crate::codec::shard::HEADER_LEN as u64
}

/// The directory's state and logic, over a metadata store.
pub struct Directory<S: MetaStore> {
    meta: S,
    ca: ClusterCa,
    issuer: Issuer,
    peer_timeout: Duration,
    reservation_ttl: Duration,
    lease_ttl: Duration,
    seed: std::sync::Mutex<u64>,
    /// Wakes the garbage collector (a volume was deleted).
    gc: tokio::sync::Notify,
    /// One placement at a time, so two cannot reserve the same free space.
    placing: tokio::sync::Mutex<()>,
}

/// Opens (on first start: creates) the directory in `config.data`: the
/// metadata store, the CA, the directory's own credential and the admin's.
pub async fn open(config: &DirectoryConfig) -> Result<(Directory<RedbStore>, Credential), DirectoryError> {
    let data = &config.data;
    std::fs::create_dir_all(data).map_err(|e| DirectoryError::Other(format!("{}: {e}", data.display())))?;
    let meta = RedbStore::open(&data.join("directory.redb"))?;
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
    let pin = ca.pin()?;
    let advertise = config.advertise.clone().unwrap_or_else(|| {
        let mut a = config.listen;
        if a.ip().is_unspecified() {
            a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        a.to_string()
    });
    let own = node_credential(&ca, data, "directory.cred", "directory", Role::Directory, &advertise)?;
    node_credential(&ca, data, "admin.cred", "admin", Role::Admin, &advertise)?;
    let dir = Directory {
        meta,
        issuer: Issuer { cluster: cluster.clone(), ca_pin: pin },
        ca,
        peer_timeout: config.peer_timeout,
        reservation_ttl: config.reservation_ttl,
        lease_ttl: config.lease_ttl,
        seed: std::sync::Mutex::new(now_ms() | 1),
        gc: tokio::sync::Notify::new(),
        placing: tokio::sync::Mutex::new(()),
    };
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
    let other = |e: crate::membership::credential::CredentialError| DirectoryError::Other(e.to_string());
    let mut cred = if path.exists() {
        Credential::load(&path).map_err(other)?
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
        cred.save(&path).map_err(other)?;
    }
    Ok(cred)
}

/// Runs a directory until `stop`.
pub async fn run(config: DirectoryConfig, stop: CancellationToken) -> Result<(), DirectoryError> {
    let (dir, own) = open(&config).await?;
    let id = own.identity();
    let tls = |e: crate::transport::tls::TlsError| DirectoryError::Other(e.to_string());
    let ep = rpc::server_endpoint(
        config.listen,
        server_config(&id, ClientAuth::Optional).map_err(tls)?,
        client_config(&id).map_err(tls)?,
        own.key_pem.as_bytes(),
    )
    .map_err(|e| DirectoryError::Other(format!("listening on {}: {e}", config.listen)))?;
    let addr = ep.local_addr().map_err(|e| DirectoryError::Other(e.to_string()))?;
    tracing::info!(
        "directory of cluster {} listening on {addr} (QUIC); admin credential: {}",
        dir.issuer.cluster,
        config.data.join("admin.cred").display()
    );
    // Tests and scripts read this line.
    println!("directory listening on {addr}");
    let dir = Arc::new(dir);
    let peers = crate::client::Client::on(own, ep.clone(), addr);
    let gc = tokio::spawn(collect_garbage(dir.clone(), peers, stop.clone()));
    rpc::serve(ep, dir, stop).await;
    let _ = gc.await;
    Ok(())
}

/// Erases the shards of deleted volumes from the peers, every few seconds
/// and whenever a volume is deleted, until no peer holds any.
async fn collect_garbage<S: MetaStore>(
    dir: Arc<Directory<S>>,
    peers: crate::client::Client,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = dir.gc.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            () = stop.cancelled() => return,
        }
        if let Err(e) = dir.collect_once(&peers).await {
            tracing::warn!("garbage collection: {e}");
        }
    }
}

impl<S: MetaStore> Directory<S> {
    fn random(&self) -> f64 {
        let mut x = self.seed.lock().expect("not poisoned");
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x >> 11) as f64 / (1u64 << 53) as f64
    }

    async fn get<T: DeserializeOwned>(&self, what: &str, k: &[u8]) -> Result<Option<(T, u64)>, Remote> {
        match self.meta.get(k).await? {
            Some(e) => Ok(Some((dec(what, &e.value)?, e.mod_revision))),
            None => Ok(None),
        }
    }

    async fn list<T: DeserializeOwned>(&self, what: &str, prefix: &[u8]) -> Result<Vec<T>, Remote> {
        self.meta.list(prefix).await?.iter().map(|e| dec(what, &e.value)).collect()
    }

    async fn join(
        &self,
        token_text: &str,
        role: Role,
        csr: &str,
        name: Option<String>,
    ) -> Result<DirResponse, Remote> {
        if !matches!(role, Role::Peer | Role::Client | Role::Admin) {
            return Err(Remote::new(ErrorKind::Invalid, "only peers, clients and admins can join"));
        }
        if let Some(n) = &name {
            check_label(n).map_err(|e| Remote::new(ErrorKind::Invalid, e.to_string()))?;
            if n == "directory" || n == "admin" {
                return Err(Remote::new(ErrorKind::Invalid, format!("the name {n:?} is reserved")));
            }
            if self.meta.get(&key("nodes", n)).await?.is_some() {
                return Err(Remote::new(
                    ErrorKind::Conflict,
                    format!("a node named {n} already joined this cluster: pick another --name"),
                ));
            }
        }
        tokens::redeem(&self.meta, &self.issuer, token_text, role).await.map_err(|e| match e {
            SpendError::Meta(m) => Remote::from(m),
            other => Remote::new(ErrorKind::Refused, other.to_string()),
        })?;
        let record = enc(&NodeRecord { role, joined_ms: now_ms() });
        let node = match name {
            Some(n) => {
                let k = key("nodes", &n);
                let out = self
                    .meta
                    .txn(Txn::new().when(Compare::Absent(k.clone())).then(Op::Put {
                        key: k,
                        value: record,
                        lease: None,
                    }))
                    .await?;
                if !out.succeeded {
                    return Err(Remote::new(
                        ErrorKind::Conflict,
                        format!("a node named {n} joined just now"),
                    ));
                }
                n
            }
            None => {
                let mut n = self.meta.list(b"nodes/").await?.len() + 1;
                loop {
                    let candidate = format!("{}-{n}", role.as_str());
                    let k = key("nodes", &candidate);
                    let out = self
                        .meta
                        .txn(Txn::new().when(Compare::Absent(k.clone())).then(Op::Put {
                            key: k,
                            value: record.clone(),
                            lease: None,
                        }))
                        .await?;
                    if out.succeeded {
                        break candidate;
                    }
                    n += 1;
                }
            }
        };
        let cert =
            self.ca.issue(csr, &node, role).map_err(|e| Remote::new(ErrorKind::Invalid, e.to_string()))?;
        tracing::info!("{} {node} joined", role.as_str());
        Ok(DirResponse::Joined {
            node,
            cluster: self.issuer.cluster.clone(),
            cert_pem: format!("{cert}{}", self.ca.cert_pem()),
            ca_pem: self.ca.cert_pem().to_owned(),
        })
    }

    fn state(&self, rec: &PeerRecord, now: u64) -> PeerState {
        if now.saturating_sub(rec.last_seen_ms) > self.peer_timeout.as_millis() as u64 {
            PeerState::Down
        } else if rec.report.problem.is_some() {
            PeerState::Failed
        } else {
            PeerState::Up
        }
    }

    async fn peers(&self) -> Result<Vec<(String, PeerRecord)>, Remote> {
        let mut out = Vec::new();
        for e in self.meta.list(b"peers/").await? {
            let name = String::from_utf8_lossy(&e.key[b"peers/".len()..]).into_owned();
            out.push((name, dec("peer", &e.value)?));
        }
        Ok(out)
    }

    async fn heartbeat(&self, node: &str, report: PeerReport) -> Result<DirResponse, Remote> {
        let was = self.get::<PeerRecord>("peer", &key("peers", node)).await?;
        let now = now_ms();
        match &was {
            None => tracing::info!("peer {node} registered at {}", report.addr),
            Some((old, _)) if self.state(old, now) == PeerState::Down => {
                tracing::info!("peer {node} is back at {}", report.addr)
            }
            _ => {}
        }
        let rec = PeerRecord { report, last_seen_ms: now };
        self.meta
            .txn(Txn::new().then(Op::Put { key: key("peers", node), value: enc(&rec), lease: None }))
            .await?;
        let peers = self
            .peers()
            .await?
            .into_iter()
            .filter(|(n, r)| n != node && self.state(r, now) != PeerState::Down)
            .map(|(name, r)| PeerAddr { name, addr: r.report.addr })
            .collect();
        Ok(DirResponse::Heartbeat { peers, peer_timeout_ms: self.peer_timeout.as_millis() as u64 })
    }

    async fn hints(&self, node: &str, rtts: Vec<Rtt>) -> Result<DirResponse, Remote> {
        let rec = HintRecord { rtts, at_ms: now_ms() };
        self.meta
            .txn(Txn::new().then(Op::Put { key: key("hints", node), value: enc(&rec), lease: None }))
            .await?;
        Ok(DirResponse::Done)
    }

    /// Bytes held by live reservations, per peer.
    async fn reserved_by_peer(&self) -> Result<HashMap<String, u64>, Remote> {
        let mut reserved: HashMap<String, u64> = HashMap::new();
        for r in self.list::<ReservationRecord>("reservation", b"reservations/").await? {
            for p in &r.peers {
                *reserved.entry(p.clone()).or_default() += r.shard_bytes;
            }
        }
        Ok(reserved)
    }

    /// The peers that are up now.
    async fn up_peers(&self) -> Result<Vec<(String, PeerRecord)>, Remote> {
        let now = now_ms();
        Ok(self.peers().await?.into_iter().filter(|(_, r)| self.state(r, now) == PeerState::Up).collect())
    }

    async fn status(&self) -> Result<DirResponse, Remote> {
        let now = now_ms();
        let reserved = self.reserved_by_peer().await?;
        let peers = self
            .peers()
            .await?
            .into_iter()
            .map(|(name, r)| PeerStatus {
                state: self.state(&r, now),
                reserved: reserved.get(&name).copied().unwrap_or(0),
                addr: r.report.addr,
                failure_domain: r.report.failure_domain,
                capacity: r.report.capacity,
                used: r.report.used,
                load: r.report.load,
                last_seen_ms: r.last_seen_ms,
                problem: r.report.problem,
                rtts: r.report.rtts,
                name,
            })
            .collect();
        let mut volumes = Vec::new();
        for record in self.list::<VolumeRecord>("volume", b"volumes/").await? {
            let stripes = self.meta.list(&stripe_prefix(&record.spec.id)).await?.len() as u64;
            let holder = self.lease_of(&record.spec.name).await?.map(|(l, _)| l.holder);
            volumes.push(VolumeStatus { record, stripes, holder });
        }
        Ok(DirResponse::Status(Box::new(ClusterStatus {
            cluster: self.issuer.cluster.clone(),
            now_ms: now,
            peer_timeout_ms: self.peer_timeout.as_millis() as u64,
            peers,
            volumes,
        })))
    }

    async fn create_token(&self, role: Role, ttl_secs: u64) -> Result<DirResponse, Remote> {
        if !matches!(role, Role::Peer | Role::Client | Role::Admin) {
            return Err(Remote::new(ErrorKind::Invalid, "tokens are for peers, clients and admins"));
        }
        let ttl = Duration::from_secs(ttl_secs);
        let t = tokens::create(&self.meta, &self.issuer, role, ttl)
            .await
            .map_err(|e| Remote::new(ErrorKind::Invalid, e.to_string()))?;
        tracing::info!("made a join token for a {} valid {ttl_secs} s", role.as_str());
        Ok(DirResponse::Token { token: t.reveal().to_owned(), expires_ms: now_ms() + ttl_secs * 1000 })
    }

    async fn create_volume(&self, spec: VolumeSpec) -> Result<DirResponse, Remote> {
        let invalid = |m: String| Remote::new(ErrorKind::Invalid, m);
        check_label(&spec.name).map_err(|e| invalid(e.to_string()))?;
        crate::codec::Geometry::new(usize::from(spec.k), usize::from(spec.m), spec.shard_size as usize)
            .map_err(|e| invalid(e.to_string()))?;
        if !(spec.shard_size as usize).is_multiple_of(crate::codec::SECTOR_SIZE) {
            return Err(invalid(format!(
                "the shard size must be a multiple of {} bytes",
                crate::codec::SECTOR_SIZE
            )));
        }
        if spec.size == 0 || !spec.size.is_multiple_of(crate::codec::SECTOR_SIZE as u64) {
            return Err(invalid("the size must be a positive multiple of 4 KiB".into()));
        }
        if spec.repair_threshold < spec.k || spec.repair_threshold > spec.k + spec.m {
            return Err(invalid(format!(
                "the repair threshold must be between k={} and k+m={}",
                spec.k,
                spec.k + spec.m
            )));
        }
        let k = key("volumes", &spec.name);
        let id_key = key("ids", &hex(&spec.id));
        let name = spec.name.clone();
        if let Some(kdf) = &spec.kdf
            && !(crate::codec::key::KdfParams::MIN_MEMORY_KIB..=crate::codec::key::KdfParams::MAX_MEMORY_KIB)
                .contains(&kdf.memory_kib)
        {
            return Err(invalid("the passphrase's Argon2 memory cost is out of range".into()));
        }
        let record = VolumeRecord { spec, epoch: 0, created_ms: now_ms() };
        let out = self
            .meta
            .txn(
                Txn::new()
                    .when(Compare::Absent(k.clone()))
                    .when(Compare::Absent(id_key.clone()))
                    .when(Compare::Absent(key("gc", &hex(&record.spec.id))))
                    .then(Op::Put { key: k.clone(), value: enc(&record), lease: None })
                    .then(Op::Put { key: id_key, value: name.as_bytes().to_vec(), lease: None }),
            )
            .await?;
        if !out.succeeded {
            let why = if self.meta.get(&k).await?.is_some() {
                format!("a volume named {name} exists already")
            } else {
                "that volume id is taken: volume ids must be new random numbers".to_string()
            };
            return Err(Remote::new(ErrorKind::Conflict, why));
        }
        tracing::info!("volume {name} created");
        Ok(DirResponse::Volume(record))
    }

    async fn volume(&self, name: &str) -> Result<VolumeRecord, Remote> {
        match self.get::<VolumeRecord>("volume", &key("volumes", name)).await? {
            Some((v, _)) => Ok(v),
            None => Err(Remote::new(ErrorKind::NotFound, format!("no volume named {name}"))),
        }
    }

    async fn place(&self, client: &str, volume: &str, stripe: u64) -> Result<DirResponse, Remote> {
        let _one_at_a_time = self.placing.lock().await;
        let v = self.volume(volume).await?;
        let stripe_data = u64::from(v.spec.k) * u64::from(v.spec.shard_size);
        let stripes = v.spec.size.div_ceil(stripe_data);
        if stripe >= stripes {
            return Err(Remote::new(
                ErrorKind::Invalid,
                format!("volume {volume} has {stripes} stripes, not {}", stripe + 1),
            ));
        }
        let current = self.get::<StripeRecord>("stripe", &stripe_key(&v.spec.id, stripe)).await?;
        let generation = current.map_or(0, |(r, _)| r.generation) + 1;
        let now = now_ms();
        let (up, candidates) = self.candidates(client).await?;
        let bytes = shard_bytes(v.spec.shard_size);
        let n = usize::from(v.spec.k + v.spec.m);
        // Doubling up is for peers that are down for now; a cluster with
        // fewer peers than a stripe has shards is told to grow instead.
        let known = self.meta.list(b"peers/").await?.len();
        let max_per_peer = if known >= n { usize::from(v.spec.m) } else { 1 };
        let picked = choose_spread(&candidates, n, max_per_peer, bytes, || self.random())
            .map_err(|e| Remote::new(ErrorKind::Full, e.to_string()))?;
        let lease = self.meta.grant_lease(self.reservation_ttl).await?;
        let expires_ms = now + self.reservation_ttl.as_millis() as u64;
        let rec = ReservationRecord {
            volume: volume.to_owned(),
            stripe,
            generation,
            peers: picked.iter().map(|&i| up[i].0.clone()).collect(),
            shard_bytes: bytes,
            expires_ms,
        };
        self.meta
            .txn(Txn::new().then(Op::Put {
                key: reservation_key(lease.0),
                value: enc(&rec),
                lease: Some(lease),
            }))
            .await?;
        Ok(DirResponse::Placement(Placement {
            reservation: lease.0,
            stripe,
            generation,
            peers: picked
                .iter()
                .map(|&i| PeerAddr { name: up[i].0.clone(), addr: up[i].1.report.addr })
                .collect(),
            shard_bytes: bytes,
            expires_ms,
        }))
    }

    async fn commit(&self, who: &str, c: Commit) -> Result<DirResponse, Remote> {
        let Commit { reservation, volume, stripe, generation, epoch, hashes } = c;
        let volume = volume.as_str();
        let vkey = key("volumes", volume);
        let Some((v, vrev)) = self.get::<VolumeRecord>("volume", &vkey).await? else {
            return Err(Remote::new(ErrorKind::NotFound, format!("no volume named {volume}")));
        };
        // The writer's right to commit, checked again by the transaction:
        // a takeover (or a first attach, or a delete) in between fails it.
        let lease_unchanged = self.check_writer(who, &v, epoch).await?;
        let rkey = reservation_key(reservation);
        let Some((res, res_rev)) = self.get::<ReservationRecord>("reservation", &rkey).await? else {
            return Err(Remote::new(
                ErrorKind::NotFound,
                format!("reservation {reservation} expired or was never made: ask for a new placement"),
            ));
        };
        if res.volume != volume || res.stripe != stripe || res.generation != generation {
            return Err(Remote::new(ErrorKind::Invalid, "the commit does not match its reservation"));
        }
        if hashes.len() != res.peers.len() {
            return Err(Remote::new(
                ErrorKind::Invalid,
                format!("{} shard hashes for {} shards", hashes.len(), res.peers.len()),
            ));
        }
        let stored = hashes.iter().filter(|h| h.is_some()).count();
        if stored < usize::from(v.spec.k) {
            return Err(Remote::new(
                ErrorKind::Invalid,
                format!("only {stored} shards stored; a stripe needs at least k={}", v.spec.k),
            ));
        }
        let skey = stripe_key(&v.spec.id, stripe);
        let current = self.get::<StripeRecord>("stripe", &skey).await?;
        let compare = match &current {
            Some((r, _)) if r.generation >= generation => {
                return Err(Remote::new(
                    ErrorKind::Conflict,
                    format!(
                        "stripe {stripe} is already at generation {} (this commit is {generation})",
                        r.generation
                    ),
                ));
            }
            Some((_, rev)) => Compare::ModRevision(skey.clone(), *rev),
            None => Compare::Absent(skey.clone()),
        };
        let record = StripeRecord { generation, peers: res.peers.clone(), hashes, committed_ms: now_ms() };
        let mut txn = Txn::new()
            .when(compare)
            .when(Compare::ModRevision(vkey, vrev))
            .when(lease_unchanged)
            .when(Compare::ModRevision(rkey.clone(), res_rev))
            .then(Op::Put { key: skey, value: enc(&record), lease: None })
            .then(Op::Delete { key: rkey });
        if let Some((old, _)) = &current {
            // The old generation's shards are erased once this commit is
            // durable, by the collector.
            txn = txn.then(Op::Put {
                key: old_key(&v.spec.id, stripe, old.generation),
                value: enc(old),
                lease: None,
            });
        }
        let out = self.meta.txn(txn).await?;
        if !out.succeeded {
            return Err(Remote::new(
                ErrorKind::Conflict,
                format!("stripe {stripe} changed during the commit: retry"),
            ));
        }
        // The reserved space is now used: count it until the peers' next
        // reports say the same. One transaction for all the stripe's peers,
        // redone if a heartbeat changed one of them meanwhile.
        let mut stored: HashMap<&String, u64> = HashMap::new();
        for (p, _) in res.peers.iter().zip(&record.hashes).filter(|(_, h)| h.is_some()) {
            *stored.entry(p).or_default() += 1;
        }
        for _ in 0..8 {
            let mut txn = Txn::new();
            for (p, shards) in &stored {
                let k = key("peers", p);
                let Some((mut rec, rev)) = self.get::<PeerRecord>("peer", &k).await? else { continue };
                rec.report.used += shards * res.shard_bytes;
                txn = txn.when(Compare::ModRevision(k.clone(), rev)).then(Op::Put {
                    key: k,
                    value: enc(&rec),
                    lease: None,
                });
            }
            if self.meta.txn(txn).await?.succeeded {
                break;
            }
        }
        if current.is_some() {
            self.gc.notify_one();
        }
        Ok(DirResponse::Stripe(current.map(|(r, _)| r)))
    }

    /// Forgets a stripe (it reads as zeroes); its shards go to the collector.
    async fn drop_stripe(
        &self,
        who: &str,
        volume: &str,
        stripe: u64,
        epoch: u64,
    ) -> Result<DirResponse, Remote> {
        let vkey = key("volumes", volume);
        let Some((v, vrev)) = self.get::<VolumeRecord>("volume", &vkey).await? else {
            return Err(Remote::new(ErrorKind::NotFound, format!("no volume named {volume}")));
        };
        let lease_unchanged = self.check_writer(who, &v, epoch).await?;
        let skey = stripe_key(&v.spec.id, stripe);
        let Some((old, rev)) = self.get::<StripeRecord>("stripe", &skey).await? else {
            return Ok(DirResponse::Done);
        };
        let out = self
            .meta
            .txn(
                Txn::new()
                    .when(Compare::ModRevision(skey.clone(), rev))
                    .when(Compare::ModRevision(vkey, vrev))
                    .when(lease_unchanged)
                    .then(Op::Delete { key: skey })
                    .then(Op::Put {
                        key: old_key(&v.spec.id, stripe, old.generation),
                        value: enc(&old),
                        lease: None,
                    }),
            )
            .await?;
        if !out.succeeded {
            return Err(Remote::new(
                ErrorKind::Conflict,
                format!("stripe {stripe} changed meanwhile: retry"),
            ));
        }
        self.gc.notify_one();
        Ok(DirResponse::Done)
    }

    /// A page of a volume's stripe map.
    async fn stripes(&self, volume: &str, after: Option<u64>, limit: u32) -> Result<DirResponse, Remote> {
        let v = self.volume(volume).await?;
        let prefix = stripe_prefix(&v.spec.id);
        let limit = limit.clamp(1, 4096) as usize;
        let mut out = Vec::new();
        // The store lists whole prefixes; a volume's map is at most a few
        // hundred thousand small records.
        for e in self.meta.list(&prefix).await? {
            let Ok(s) = <[u8; 8]>::try_from(&e.key[prefix.len()..]) else { continue };
            let s = u64::from_be_bytes(s);
            if after.is_some_and(|a| s <= a) {
                continue;
            }
            out.push((s, dec("stripe", &e.value)?));
            if out.len() == limit {
                break;
            }
        }
        Ok(DirResponse::Stripes(out))
    }

    /// The peers that are up, as placement candidates for `client`.
    async fn candidates(&self, client: &str) -> Result<(Vec<(String, PeerRecord)>, Vec<Candidate>), Remote> {
        let hints: HashMap<String, u32> = self
            .get::<HintRecord>("hints", &key("hints", client))
            .await?
            .map(|(h, _)| h.rtts.into_iter().map(|r| (r.node, r.micros)).collect())
            .unwrap_or_default();
        let reserved = self.reserved_by_peer().await?;
        let up = self.up_peers().await?;
        let candidates = up
            .iter()
            .map(|(name, r)| Candidate {
                name: name.clone(),
                domain: r.report.failure_domain.clone(),
                capacity: r.report.capacity,
                free: r
                    .report
                    .capacity
                    .saturating_sub(r.report.used)
                    .saturating_sub(reserved.get(name).copied().unwrap_or(0)),
                load: r.report.load,
                rtt_micros: hints.get(name).copied(),
            })
            .collect();
        Ok((up, candidates))
    }

    /// Another peer for shard `index` of a reservation whose peer is slow
    /// or failing (long-tail cancellation): one that holds no other shard
    /// of the stripe, weighted as placement weighs.
    async fn replace(&self, client: &str, reservation: u64, index: u8) -> Result<DirResponse, Remote> {
        let _one_at_a_time = self.placing.lock().await;
        let rkey = reservation_key(reservation);
        let Some((mut res, rev)) = self.get::<ReservationRecord>("reservation", &rkey).await? else {
            return Err(Remote::new(
                ErrorKind::NotFound,
                format!("reservation {reservation} expired or was never made: ask for a new placement"),
            ));
        };
        let i = usize::from(index);
        if i >= res.peers.len() {
            return Err(Remote::new(ErrorKind::Invalid, format!("the stripe has no shard {index}")));
        }
        let (up, candidates) = self.candidates(client).await?;
        let open: Vec<Candidate> = candidates.into_iter().filter(|c| !res.peers.contains(&c.name)).collect();
        let picked = choose_spread(&open, 1, 1, res.shard_bytes, || self.random())
            .map_err(|e| Remote::new(ErrorKind::Full, format!("no other peer for shard {index}: {e}")))?;
        let name = open[picked[0]].name.clone();
        let addr = up
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| r.report.addr)
            .ok_or_else(|| internal("a candidate vanished"))?;
        res.peers[i] = name.clone();
        let lease = self.meta.get(&rkey).await?.and_then(|e| e.lease);
        let out = self
            .meta
            .txn(Txn::new().when(Compare::ModRevision(rkey.clone(), rev)).then(Op::Put {
                key: rkey,
                value: enc(&res),
                lease,
            }))
            .await?;
        if !out.succeeded {
            return Err(Remote::new(ErrorKind::Conflict, "the reservation changed meanwhile: retry"));
        }
        Ok(DirResponse::Peer(PeerAddr { name, addr }))
    }

    async fn release(&self, reservation: u64) -> Result<DirResponse, Remote> {
        // Only a reservation's own lease: lease ids are shared with volume
        // write leases, which this must never end.
        if self.meta.get(&reservation_key(reservation)).await?.is_none() {
            return Ok(DirResponse::Done);
        }
        match self.meta.revoke(meta::LeaseId(reservation)).await {
            Ok(()) | Err(MetaError::LeaseNotFound(_)) => Ok(DirResponse::Done),
            Err(e) => Err(e.into()),
        }
    }

    async fn stripe(&self, volume: &str, stripe: u64) -> Result<DirResponse, Remote> {
        let v = self.volume(volume).await?;
        Ok(DirResponse::Stripe(
            self.get::<StripeRecord>("stripe", &stripe_key(&v.spec.id, stripe)).await?.map(|(r, _)| r),
        ))
    }

    /// A volume's live write lease and its store entry.
    async fn lease_of(&self, volume: &str) -> Result<Option<(VolumeLease, meta::Entry)>, Remote> {
        match self.meta.get(&key("leases", volume)).await? {
            Some(e) => Ok(Some((dec("lease", &e.value)?, e))),
            None => Ok(None),
        }
    }

    /// Only the lease holder commits stripes of a volume that has ever been
    /// attached (epoch > 0); a writer that was taken over is fenced here as
    /// it is on the peers.
    /// Returns the compare that keeps the lease as it was seen.
    async fn check_writer(&self, who: &str, v: &VolumeRecord, epoch: u64) -> Result<Compare, Remote> {
        let lkey = key("leases", &v.spec.name);
        if v.epoch == 0 && epoch == 0 {
            return Ok(Compare::Absent(lkey));
        }
        match self.lease_of(&v.spec.name).await? {
            Some((l, e)) if l.holder == who && l.epoch == v.epoch && l.epoch == epoch => {
                Ok(Compare::ModRevision(lkey, e.mod_revision))
            }
            Some((l, _)) => Err(Remote::new(
                ErrorKind::Fenced,
                format!(
                    "volume {} is now written by {} (epoch {}): this writer was taken over and must stop",
                    v.spec.name, l.holder, l.epoch
                ),
            )),
            None => Err(Remote::new(
                ErrorKind::Fenced,
                format!("the write lease on volume {} lapsed: attach again", v.spec.name),
            )),
        }
    }

    async fn acquire(
        &self,
        who: &str,
        volume: &str,
        force: bool,
        resume: Option<u64>,
        host: &str,
    ) -> Result<DirResponse, Remote> {
        let vkey = key("volumes", volume);
        let lkey = key("leases", volume);
        for _ in 0..16 {
            let Some((mut v, vrev)) = self.get::<VolumeRecord>("volume", &vkey).await? else {
                return Err(Remote::new(ErrorKind::NotFound, format!("no volume named {volume}")));
            };
            let current = self.lease_of(volume).await?;
            if let Some((l, _)) = &current
                && !(l.holder == who && resume == Some(l.epoch))
                && !force
            {
                return Err(Remote::new(
                    ErrorKind::Conflict,
                    format!(
                        "volume {volume} is attached by {} on {} (for {:.0} s, epoch {}): detach it there, or attach with --force to take it over (its writes are then refused)",
                        l.holder,
                        l.host,
                        now_ms().saturating_sub(l.since_ms) as f64 / 1000.0,
                        l.epoch
                    ),
                ));
            }
            v.epoch += 1;
            let lease = self.meta.grant_lease(self.lease_ttl).await?;
            let rec = VolumeLease {
                holder: who.to_owned(),
                host: host.to_owned(),
                epoch: v.epoch,
                since_ms: now_ms(),
                ttl_ms: self.lease_ttl.as_millis() as u64,
            };
            let held = match &current {
                Some((_, e)) => Compare::ModRevision(lkey.clone(), e.mod_revision),
                None => Compare::Absent(lkey.clone()),
            };
            let out = self
                .meta
                .txn(
                    Txn::new()
                        .when(Compare::ModRevision(vkey.clone(), vrev))
                        .when(held)
                        .then(Op::Put { key: vkey.clone(), value: enc(&v), lease: None })
                        .then(Op::Put { key: lkey.clone(), value: enc(&rec), lease: Some(lease) }),
                )
                .await?;
            if !out.succeeded {
                let _ = self.meta.revoke(lease).await;
                continue;
            }
            if let Some((old, e)) = current {
                if let Some(l) = e.lease {
                    let _ = self.meta.revoke(l).await;
                }
                tracing::warn!(
                    "volume {volume}: {who} took the write lease over from {} (epoch {})",
                    old.holder,
                    v.epoch
                );
            } else {
                tracing::info!("volume {volume}: write lease to {who}, epoch {}", v.epoch);
            }
            return Ok(DirResponse::Lease(rec));
        }
        Err(Remote::new(ErrorKind::Conflict, format!("volume {volume}: the lease kept changing; try again")))
    }

    async fn renew(&self, who: &str, volume: &str, epoch: u64) -> Result<DirResponse, Remote> {
        match self.lease_of(volume).await? {
            Some((l, e)) if l.holder == who && l.epoch == epoch => {
                let id = e.lease.ok_or_else(|| internal("a volume lease without a store lease"))?;
                match self.meta.keep_alive(id).await {
                    Ok(()) => Ok(DirResponse::Lease(l)),
                    Err(MetaError::LeaseNotFound(_)) => Err(Remote::new(
                        ErrorKind::Fenced,
                        format!("the write lease on volume {volume} lapsed: attach again"),
                    )),
                    Err(e) => Err(e.into()),
                }
            }
            Some((l, _)) => Err(Remote::new(
                ErrorKind::Fenced,
                format!(
                    "volume {volume} was taken over by {} (epoch {}; yours was {epoch}): stop writing",
                    l.holder, l.epoch
                ),
            )),
            None => Err(Remote::new(
                ErrorKind::Fenced,
                format!("the write lease on volume {volume} lapsed: attach again"),
            )),
        }
    }

    async fn release_lease(&self, who: &str, volume: &str, epoch: u64) -> Result<DirResponse, Remote> {
        if let Some((l, e)) = self.lease_of(volume).await?
            && l.holder == who
            && l.epoch == epoch
            && let Some(id) = e.lease
        {
            match self.meta.revoke(id).await {
                Ok(()) | Err(MetaError::LeaseNotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            tracing::info!("volume {volume}: {who} released the write lease");
        }
        Ok(DirResponse::Done)
    }

    async fn volume_info(&self, volume: &str) -> Result<DirResponse, Remote> {
        let record = self.volume(volume).await?;
        let lease = self.lease_of(volume).await?.map(|(l, _)| l);
        let up: std::collections::HashSet<String> =
            self.up_peers().await?.into_iter().map(|(n, _)| n).collect();
        let (k, threshold, all) = (
            usize::from(record.spec.k),
            usize::from(record.spec.repair_threshold),
            usize::from(record.spec.k + record.spec.m),
        );
        let per_shard = shard_bytes(record.spec.shard_size);
        let mut health = StripeHealth::default();
        let mut allocated = 0;
        for s in self.list::<StripeRecord>("stripe", &stripe_prefix(&record.spec.id)).await? {
            let stored = s.hashes.iter().filter(|h| h.is_some()).count();
            let healthy =
                s.peers.iter().zip(&s.hashes).filter(|(p, h)| h.is_some() && up.contains(*p)).count();
            allocated += stored as u64 * per_shard;
            health.stripes += 1;
            if healthy >= all {
                health.whole += 1;
            } else if healthy >= threshold {
                health.degraded += 1;
            } else if healthy >= k {
                health.needs_repair += 1;
            } else {
                health.unavailable += 1;
            }
        }
        Ok(DirResponse::VolumeInfo(Box::new(VolumeInfo { record, lease, allocated, health })))
    }

    async fn delete_volume(&self, volume: &str) -> Result<DirResponse, Remote> {
        let vkey = key("volumes", volume);
        let Some((v, vrev)) = self.get::<VolumeRecord>("volume", &vkey).await? else {
            return Err(Remote::new(ErrorKind::NotFound, format!("no volume named {volume}")));
        };
        if let Some((l, _)) = self.lease_of(volume).await? {
            return Err(Remote::new(
                ErrorKind::Conflict,
                format!("volume {volume} is attached by {}: detach it first", l.holder),
            ));
        }
        let out = self
            .meta
            .txn(
                Txn::new()
                    .when(Compare::ModRevision(vkey.clone(), vrev))
                    .when(Compare::Absent(key("leases", volume)))
                    .then(Op::Delete { key: vkey })
                    .then(Op::Delete { key: key("ids", &hex(&v.spec.id)) })
                    .then(Op::DeletePrefix { prefix: stripe_prefix(&v.spec.id) })
                    .then(Op::DeletePrefix { prefix: old_prefix(&v.spec.id) })
                    .then(Op::Put {
                        key: key("gc", &hex(&v.spec.id)),
                        value: v.spec.id.to_vec(),
                        lease: None,
                    }),
            )
            .await?;
        if !out.succeeded {
            return Err(Remote::new(
                ErrorKind::Conflict,
                format!("volume {volume} changed meanwhile: try again"),
            ));
        }
        tracing::info!("volume {volume} deleted; its shards are being erased from the peers");
        self.gc.notify_one();
        Ok(DirResponse::Done)
    }

    /// Erases the shards of superseded and dropped generations. A shard
    /// on a peer that is down or fails stays queued for the next pass.
    async fn collect_old(&self, client: &crate::client::Client) -> Result<(), Remote> {
        let old = self.meta.list(b"old/").await?;
        if old.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let peers: HashMap<String, PeerRecord> = self.peers().await?.into_iter().collect();
        let mut epochs: HashMap<Vec<u8>, Option<u64>> = HashMap::new();
        let mut erasing = tokio::task::JoinSet::new();
        for entry in old {
            // old/<32 hex>/<stripe be64><generation be64>
            let rest = &entry.key[b"old/".len()..];
            if rest.len() != 2 * VOLUME_ID_LEN + 1 + 16 {
                continue;
            }
            let id_hex = rest[..2 * VOLUME_ID_LEN].to_vec();
            let Some(id) = unhex(&id_hex) else { continue };
            let stripe = u64::from_be_bytes(rest[2 * VOLUME_ID_LEN + 1..][..8].try_into().expect("8 bytes"));
            let epoch = match epochs.get(&id_hex) {
                Some(e) => *e,
                None => {
                    let name = self.meta.get(&[b"ids/".as_slice(), &id_hex].concat()).await?;
                    let e = match name {
                        Some(n) => self
                            .get::<VolumeRecord>("volume", &[b"volumes/".as_slice(), &n.value].concat())
                            .await?
                            .map(|(v, _)| v.epoch),
                        None => None,
                    };
                    epochs.insert(id_hex.clone(), e);
                    e
                }
            };
            let Some(epoch) = epoch else {
                // The volume is gone; its whole-volume collection erases these.
                self.meta.txn(Txn::new().then(Op::Delete { key: entry.key })).await?;
                continue;
            };
            let rec: StripeRecord = dec("stripe", &entry.value)?;
            let mut targets = Vec::new();
            let mut reachable = true;
            for (index, (name, hash)) in rec.peers.iter().zip(&rec.hashes).enumerate() {
                if hash.is_none() {
                    continue;
                }
                match peers.get(name) {
                    Some(p) if self.state(p, now) == PeerState::Up => targets.push((
                        PeerAddr { name: name.clone(), addr: p.report.addr },
                        ShardKey { volume: id, stripe, generation: rec.generation, index: index as u8 },
                    )),
                    // A peer that left the cluster holds nothing we can reach.
                    None => {}
                    Some(_) => reachable = false,
                }
            }
            let (client, meta_entry) = (client.clone(), entry);
            erasing.spawn(async move {
                let mut all = reachable;
                for (peer, key) in targets {
                    if let Err(e) = client.delete_shard(&peer, key, epoch).await {
                        tracing::debug!("erasing an old shard from {}: {e}", peer.name);
                        all = false;
                    }
                }
                all.then_some(meta_entry)
            });
            if erasing.len() >= 32 {
                self.finish_old(erasing.join_next().await).await?;
            }
        }
        while let Some(done) = erasing.join_next().await {
            self.finish_old(Some(done)).await?;
        }
        Ok(())
    }

    async fn finish_old(
        &self,
        done: Option<Result<Option<meta::Entry>, tokio::task::JoinError>>,
    ) -> Result<(), Remote> {
        match done {
            Some(Ok(Some(entry))) => self.dequeue(entry).await,
            _ => Ok(()),
        }
    }

    /// Removes a collector's queue entry, unless it changed since it was read.
    async fn dequeue(&self, entry: meta::Entry) -> Result<(), Remote> {
        self.meta
            .txn(
                Txn::new()
                    .when(Compare::ModRevision(entry.key.clone(), entry.mod_revision))
                    .then(Op::Delete { key: entry.key }),
            )
            .await?;
        Ok(())
    }

    /// One garbage-collection pass over deleted volumes.
    async fn collect_once(&self, client: &crate::client::Client) -> Result<(), Remote> {
        self.collect_old(client).await?;
        let deleted = self.meta.list(b"gc/").await?;
        if deleted.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let peers = self.peers().await?;
        for entry in deleted {
            let Ok(id) = <[u8; VOLUME_ID_LEN]>::try_from(entry.value.as_slice()) else { continue };
            let mut clean = true;
            for (name, rec) in &peers {
                if self.state(rec, now) != PeerState::Up {
                    clean = false;
                    continue;
                }
                let peer = PeerAddr { name: name.clone(), addr: rec.report.addr };
                let erased = async {
                    let keys = client.list_shards(&peer, id).await?;
                    for k in &keys {
                        // The largest epoch: nobody writes this volume again.
                        client.delete_shard(&peer, *k, u64::MAX).await?;
                    }
                    Ok::<usize, crate::client::ClientError>(keys.len())
                };
                match erased.await {
                    Ok(0) => {}
                    Ok(n) => {
                        // Another pass must find nothing (a put admitted
                        // before the erase may still have been committed).
                        clean = false;
                        tracing::info!("erased {n} shards of a deleted volume from {name}");
                    }
                    Err(e) => {
                        clean = false;
                        tracing::info!("erasing a deleted volume's shards from {name}: {e}");
                    }
                }
            }
            if clean {
                self.dequeue(entry).await?;
            }
        }
        Ok(())
    }

    async fn dispatch(&self, caller: &Caller, req: DirRequest) -> Result<DirResponse, Remote> {
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
            DirRequest::Place { volume, stripe } => {
                needs(&[Role::Client, Role::Admin])?;
                self.place(&who.node, &volume, stripe).await
            }
            DirRequest::Commit(c) => {
                needs(&[Role::Client, Role::Admin])?;
                self.commit(&who.node, c).await
            }
            DirRequest::DropStripe { volume, stripe, epoch } => {
                needs(&[Role::Client, Role::Admin])?;
                self.drop_stripe(&who.node, &volume, stripe, epoch).await
            }
            DirRequest::Stripes { volume, after, limit } => {
                needs(&[Role::Client, Role::Admin])?;
                self.stripes(&volume, after, limit).await
            }
            DirRequest::Replace { reservation, index } => {
                needs(&[Role::Client, Role::Admin])?;
                self.replace(&who.node, reservation, index).await
            }
            DirRequest::Release { reservation } => {
                needs(&[Role::Client, Role::Admin])?;
                self.release(reservation).await
            }
            DirRequest::Stripe { volume, stripe } => {
                needs(&[Role::Client, Role::Admin])?;
                self.stripe(&volume, stripe).await
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
            DirRequest::RenewLease { volume, epoch } => {
                needs(&[Role::Client, Role::Admin])?;
                self.renew(&who.node, &volume, epoch).await
            }
            DirRequest::ReleaseLease { volume, epoch } => {
                needs(&[Role::Client, Role::Admin])?;
                self.release_lease(&who.node, &volume, epoch).await
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
