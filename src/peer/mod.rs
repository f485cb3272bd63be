//! A peer: lends disk space to the cluster. It stores and serves shards
//! (its [`ShardStore`]), reports to the directory every heartbeat, and
//! measures round trips to the other peers for placement.
//!
//! Under its data folder:
//!
//! ```text
//! identity.cred   this peer's credential (joined once, reused afterwards)
//! store/          the shard store (data files and index; docs/formats.md)
//! ```

pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::api::*;
use crate::client::join::join;
use crate::client::{Client, ClientError};
use crate::membership::ca::Role;
use crate::membership::credential::{Credential, resolve};
use crate::sys::uring::Uring;
use crate::transport::rpc::{self, Caller, Handler, RpcError};
use crate::transport::tls::{ClientAuth, client_config, server_config};
use store::{ShardStore, StoreError};

/// Settings of a peer process.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub data: PathBuf,
    /// The directory's address; needed to join, and overrides the saved one.
    pub directory: Option<String>,
    pub join: Option<String>,
    pub name: Option<String>,
    pub capacity: u64,
    pub failure_domain: Option<String>,
    pub listen: SocketAddr,
    pub advertise: Option<SocketAddr>,
    pub heartbeat: Duration,
}

/// The shard service peers answer.
struct PeerService {
    store: ShardStore,
    load: Arc<AtomicU32>,
}

fn remote(e: StoreError) -> Remote {
    let kind = match &e {
        StoreError::BadShard(_) => ErrorKind::BadShard,
        StoreError::Full { .. } => ErrorKind::Full,
        StoreError::Fenced { .. } => ErrorKind::Fenced,
        StoreError::NotFound(_) => ErrorKind::NotFound,
        StoreError::Corrupt { .. } | StoreError::Misplaced { .. } => ErrorKind::Corrupt,
        StoreError::Poisoned { .. } => ErrorKind::Poisoned,
        StoreError::Io { .. } => ErrorKind::Internal,
    };
    Remote::new(kind, e.to_string())
}

impl PeerService {
    async fn answer(&self, req: PeerRequest, payload: Bytes) -> Result<(PeerResponse, Bytes), Remote> {
        Ok(match req {
            PeerRequest::Put { epoch } => {
                self.store.put(payload, epoch).await.map_err(remote)?;
                (PeerResponse::Stored, Bytes::new())
            }
            PeerRequest::Get(key) => (PeerResponse::Shard, self.store.get(&key).await.map_err(remote)?),
            PeerRequest::Delete { shard, epoch } => {
                let existed = self.store.delete(&shard, epoch).await.map_err(remote)?;
                (PeerResponse::Deleted { existed }, Bytes::new())
            }
            PeerRequest::List { volume, after, limit } => {
                let limit = limit.clamp(1, 1000) as usize;
                let store = self.store.clone();
                let all = tokio::task::spawn_blocking(move || store.list(&volume))
                    .await
                    .map_err(|e| Remote::new(ErrorKind::Internal, e.to_string()))?
                    .map_err(remote)?;
                let page = all.into_iter().filter(|k| after.is_none_or(|a| *k > a)).take(limit).collect();
                (PeerResponse::Shards(page), Bytes::new())
            }
            PeerRequest::Ping => {
                (PeerResponse::Pong { load: self.load.load(Ordering::Relaxed) }, Bytes::new())
            }
        })
    }
}

impl Handler for PeerService {
    type Request = PeerRequest;
    type Response = PeerResponse;

    async fn handle(&self, caller: Caller, req: PeerRequest, payload: Bytes) -> (PeerResponse, Bytes) {
        let Some(who) = &caller.name else {
            let e = Remote::new(ErrorKind::Refused, "no certificate from this cluster");
            return (PeerResponse::Error(e), Bytes::new());
        };
        // Peers are not trusted with others' data: only clients (and
        // admins) write, and erasing also the directory's collector.
        let allowed = match &req {
            PeerRequest::Put { .. } => matches!(who.role, Role::Client | Role::Admin),
            PeerRequest::Delete { .. } => matches!(who.role, Role::Client | Role::Admin | Role::Directory),
            PeerRequest::Get(_) | PeerRequest::List { .. } | PeerRequest::Ping => true,
        };
        if !allowed {
            let e = Remote::new(ErrorKind::Refused, format!("a {} may not do that", who.role.as_str()));
            return (PeerResponse::Error(e), Bytes::new());
        }
        self.load.fetch_add(1, Ordering::Relaxed);
        let answer = self.answer(req, payload).await;
        self.load.fetch_sub(1, Ordering::Relaxed);
        answer.unwrap_or_else(|e| {
            if matches!(e.kind, ErrorKind::Internal | ErrorKind::Poisoned | ErrorKind::Corrupt) {
                tracing::warn!("{e}");
            }
            (PeerResponse::Error(e), Bytes::new())
        })
    }
}

/// Loads the peer's credential, or joins with the token.
async fn identity(config: &PeerConfig) -> Result<Credential, String> {
    let path = config.data.join("identity.cred");
    if path.exists() {
        let mut cred = Credential::load(&path).map_err(|e| e.to_string())?;
        if cred.role != Role::Peer {
            return Err(format!(
                "{} holds a {} credential, not a peer's",
                path.display(),
                cred.role.as_str()
            ));
        }
        if config.join.is_some() {
            tracing::info!(
                "already joined as peer {} of cluster {}; --join is not needed",
                cred.node,
                cred.cluster
            );
        }
        if let Some(d) = &config.directory
            && *d != cred.directory
        {
            cred.directory = d.clone();
            cred.save(&path).map_err(|e| e.to_string())?;
        }
        return Ok(cred);
    }
    let (Some(directory), Some(token)) = (&config.directory, &config.join) else {
        return Err(format!(
            "{} has no peer identity yet: join with --directory ADDR --join TOKEN (the admin makes a token with `meshdisk token create --role peer`)",
            config.data.display()
        ));
    };
    let cred = join(directory, token, Role::Peer, config.name.clone()).await.map_err(|e| e.to_string())?;
    cred.save(&path).map_err(|e| e.to_string())?;
    tracing::info!("joined cluster {} as peer {}", cred.cluster, cred.node);
    Ok(cred)
}

/// The address clients should dial: `--advertise`, else the listening
/// address, with an unspecified IP replaced by the one that routes to the
/// directory.
fn advertised(config: &PeerConfig, bound: SocketAddr, directory: SocketAddr) -> SocketAddr {
    if let Some(a) = config.advertise {
        return a;
    }
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let probe = std::net::UdpSocket::bind(if directory.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
        .and_then(|s| s.connect(directory).map(|()| s))
        .and_then(|s| s.local_addr());
    match probe {
        Ok(local) => SocketAddr::new(local.ip(), bound.port()),
        Err(_) => bound,
    }
}

/// True for refusals that retrying will not fix.
fn fatal(e: &ClientError) -> bool {
    match e {
        ClientError::Remote(r) => r.kind == ErrorKind::Refused,
        ClientError::Rpc(RpcError::Connect { message, .. }) => {
            message.contains("certificate")
                || message.contains("UnknownIssuer")
                || message.contains("UnknownCA")
        }
        _ => false,
    }
}

/// Runs a peer until `stop`.
pub async fn run(config: PeerConfig, stop: CancellationToken) -> Result<(), String> {
    std::fs::create_dir_all(&config.data).map_err(|e| format!("{}: {e}", config.data.display()))?;
    let cred = identity(&config).await?;
    let ring = Uring::new(256).map_err(|e| format!("setting up io_uring: {e}"))?;
    let store =
        ShardStore::open(&ring, &config.data.join("store"), config.capacity).map_err(|e| e.to_string())?;
    let id = cred.identity();
    let ep = rpc::server_endpoint(
        config.listen,
        server_config(&id, ClientAuth::Required).map_err(|e| e.to_string())?,
        client_config(&id).map_err(|e| e.to_string())?,
        cred.key_pem.as_bytes(),
    )
    .map_err(|e| format!("listening on {}: {e}", config.listen))?;
    let bound = ep.local_addr().map_err(|e| e.to_string())?;
    let dir_addr = resolve(&cred.directory).map_err(|e| e.to_string())?;
    let addr = advertised(&config, bound, dir_addr);
    let failure_domain = config.failure_domain.clone().unwrap_or_else(|| cred.node.clone());
    let load = Arc::new(AtomicU32::new(0));
    let service = Arc::new(PeerService { store: store.clone(), load: load.clone() });
    let server = tokio::spawn(rpc::serve(ep.clone(), service, stop.clone()));
    tracing::info!(
        "peer {} of cluster {} serving {} on {addr} (failure domain {failure_domain})",
        cred.node,
        cred.cluster,
        crate::size::human(config.capacity)
    );
    println!("peer {} listening on {addr}", cred.node);
    let client = Client::on(cred.clone(), ep, dir_addr);
    let mut peers: Vec<PeerAddr> = Vec::new();
    let mut rtts: Vec<Rtt> = Vec::new();
    let mut reached = false;
    let mut failing_since: Option<std::time::Instant> = None;
    let mut tick = tokio::time::interval(config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break Ok(()),
        }
        let (used, problem) = match store.used() {
            Ok(u) => (u, None),
            Err(e) => (0, Some(e.to_string())),
        };
        let report = PeerReport {
            addr,
            failure_domain: failure_domain.clone(),
            capacity: config.capacity,
            used,
            load: load.load(Ordering::Relaxed),
            problem,
            rtts: rtts.clone(),
        };
        match client.directory(&DirRequest::Heartbeat(report)).await {
            Ok(DirResponse::Heartbeat { peers: p, .. }) => {
                if failing_since.take().is_some() || !reached {
                    tracing::info!("reporting to the directory at {}", cred.directory);
                }
                reached = true;
                peers = p;
            }
            Ok(other) => tracing::warn!("the directory answered a heartbeat with {other:?}"),
            Err(e) if fatal(&e) && !reached => {
                break Err(format!("the directory at {} refused this peer: {e}", cred.directory));
            }
            Err(e) => {
                if failing_since.is_none() {
                    tracing::warn!("cannot report to the directory at {}: {e}", cred.directory);
                    failing_since = Some(std::time::Instant::now());
                }
            }
        }
        rtts = client.measure(&peers, config.heartbeat).await;
    };
    stop.cancel();
    let _ = server.await;
    result
}
