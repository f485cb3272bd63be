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
//!
//! Beside serving, its workers: [`heartbeat`] (reports, round trips) and
//! [`scrub`] (re-hashes every shard on a schedule, reports the bad ones).

mod heartbeat;
mod rebuild;
pub mod scrub;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::api::*;
use crate::client::join::{JoinError, join};
use crate::client::{Client, ClientError};
use crate::membership::ca::Role;
use crate::membership::credential::{Credential, CredentialError, resolve};
use crate::sys::uring::Uring;
use crate::sys::worker::Runner;
use crate::transport::rpc::{self, Caller, Handler, RpcError};
use crate::transport::tls::{ClientAuth, TlsError, client_config, server_config};
use store::{ShardStore, StoreError};

/// Why a peer could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error("{} holds a {} credential, not a peer's", path.display(), role.as_str())]
    NotAPeer { path: PathBuf, role: Role },
    #[error(
        "{} has no peer identity yet: join with --directory ADDR --join TOKEN (the admin makes a token with `meshdisk token create --role peer`)",
        data.display()
    )]
    NotJoined { data: PathBuf },
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error("setting up io_uring: {0}")]
    Ring(#[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: RpcError,
    },
    #[error("the directory at {directory} refused this peer: {source}")]
    Refused {
        directory: String,
        #[source]
        source: ClientError,
    },
}

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
    /// A fault to play, for tests only (`--fault`): never in production.
    pub fault: Option<Fault>,
    /// How often and how fast shards are re-hashed.
    pub scrub: scrub::ScrubConfig,
}

/// Test-only misbehaviour of a peer, for the tests of audits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// A peer that lies: it keeps every shard's header and index (so it
    /// lists them and heartbeats as usual) but answers reads of their
    /// payload with zeros, as if it had dropped the bytes to save space.
    DropPayloads,
}

/// The most shard keys one `List` answers.
const LIST_LIMIT: u32 = 1000;

/// The shard service peers answer.
struct PeerService {
    store: ShardStore,
    load: Arc<AtomicU32>,
    /// Calls from clients (foreground I/O) since the start.
    client_calls: Arc<AtomicU64>,
    /// For fetching other peers' shards when rebuilding one here.
    client: Client,
    fault: Option<Fault>,
}

/// What a peer that dropped a shard's payload answers: the header it kept,
/// zeros for the rest.
fn zero_after(mut bytes: Vec<u8>, keep: usize) -> Bytes {
    let keep = keep.min(bytes.len());
    bytes[keep..].fill(0);
    Bytes::from(bytes)
}

fn remote(e: StoreError) -> Remote {
    let kind = match &e {
        StoreError::BadShard(_) => ErrorKind::BadShard,
        StoreError::Full { .. } => ErrorKind::Full,
        StoreError::Fenced { .. } => ErrorKind::Fenced,
        StoreError::NotFound(_) => ErrorKind::NotFound,
        StoreError::Corrupt { .. } | StoreError::Misplaced { .. } | StoreError::Unreadable { .. } => {
            ErrorKind::Corrupt
        }
        StoreError::BlockRange { .. } => ErrorKind::Invalid,
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
            PeerRequest::Get(key) => {
                let shard = self.store.get(&key).await.map_err(remote)?;
                if self.fault == Some(Fault::DropPayloads) {
                    let header = self.store.get_header(&key).await.map_err(remote)?.len();
                    return Ok((PeerResponse::Shard, zero_after(shard.to_vec(), header)));
                }
                (PeerResponse::Shard, shard)
            }
            PeerRequest::GetBlocks { shard, first, count } => {
                // A proof must fit one call's payload: a reader wanting
                // (nearly) a whole shard asks for the shard.
                let most = (rpc::MAX_PAYLOAD / 2 / crate::codec::segment::BLOCK_SIZE) as u32;
                if count > most {
                    let e = format!("at most {most} blocks per block read, {count} asked for");
                    return Err(Remote::new(ErrorKind::Invalid, e));
                }
                let proof = self.store.get_blocks(&shard, first, count).await.map_err(remote)?;
                if self.fault == Some(Fault::DropPayloads) {
                    // Block bytes end the proof (hash pairs may sit among
                    // them): zeroed, nothing of it verifies.
                    let keep = proof.len().saturating_sub(count as usize * crate::codec::segment::BLOCK_SIZE);
                    return Ok((PeerResponse::Blocks, zero_after(proof.to_vec(), keep)));
                }
                (PeerResponse::Blocks, proof)
            }
            PeerRequest::GetHeader(key) => {
                (PeerResponse::Shard, self.store.get_header(&key).await.map_err(remote)?)
            }
            PeerRequest::Delete { shard, epoch } => {
                let existed = self.store.delete(&shard, epoch).await.map_err(remote)?;
                (PeerResponse::Deleted { existed }, Bytes::new())
            }
            PeerRequest::Rebuild { shard, root, epoch, need, sources } => {
                let root = crate::codec::segment::SegmentRoot(root);
                let read = rebuild::rebuild_here(
                    &self.client,
                    &self.store,
                    shard,
                    root,
                    epoch,
                    usize::from(need),
                    sources,
                )
                .await?;
                (PeerResponse::Rebuilt { read }, Bytes::new())
            }
            PeerRequest::List { volume, after, limit } => {
                let limit = limit.clamp(1, LIST_LIMIT) as usize;
                let store = self.store.clone();
                let page = tokio::task::spawn_blocking(move || store.list(&volume, after, limit))
                    .await
                    .map_err(|e| Remote::new(ErrorKind::Internal, e.to_string()))?
                    .map_err(remote)?;
                (PeerResponse::Shards(page), Bytes::new())
            }
            PeerRequest::Ping => {
                (PeerResponse::Pong { load: self.load.load(Ordering::Relaxed) }, Bytes::new())
            }
            PeerRequest::ListCopies { volume, after, limit } => {
                let limit = limit.clamp(1, LIST_LIMIT) as usize;
                let store = self.store.clone();
                let page = tokio::task::spawn_blocking(move || store.list_copies(&volume, after, limit))
                    .await
                    .map_err(|e| Remote::new(ErrorKind::Internal, e.to_string()))?
                    .map_err(remote)?;
                (PeerResponse::Copies(page), Bytes::new())
            }
            PeerRequest::DeleteCopy { shard, epoch, copy } => {
                let existed = self.store.delete_copy(&shard, epoch, copy).await.map_err(remote)?;
                (PeerResponse::Deleted { existed }, Bytes::new())
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
        // admins) write, erasing also the directory's collector, and only
        // the directory's repair has a shard rebuilt here.
        let allowed = match &req {
            PeerRequest::Put { .. } => matches!(who.role, Role::Client | Role::Admin),
            PeerRequest::Rebuild { .. } => who.role == Role::Directory,
            PeerRequest::Delete { .. } | PeerRequest::DeleteCopy { .. } => {
                matches!(who.role, Role::Client | Role::Admin | Role::Directory)
            }
            PeerRequest::Get(_)
            | PeerRequest::GetBlocks { .. }
            | PeerRequest::GetHeader(_)
            | PeerRequest::List { .. }
            | PeerRequest::ListCopies { .. }
            | PeerRequest::Ping => true,
        };
        if !allowed {
            let e = Remote::new(ErrorKind::Refused, format!("a {} may not do that", who.role.as_str()));
            return (PeerResponse::Error(e), Bytes::new());
        }
        self.load.fetch_add(1, Ordering::Relaxed);
        if matches!(who.role, Role::Client | Role::Admin) {
            self.client_calls.fetch_add(1, Ordering::Relaxed);
        }
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
async fn identity(config: &PeerConfig) -> Result<Credential, PeerError> {
    let path = config.data.join("identity.cred");
    if path.exists() {
        let mut cred = Credential::load(&path)?;
        if cred.role != Role::Peer {
            return Err(PeerError::NotAPeer { path, role: cred.role });
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
            cred.save(&path)?;
        }
        return Ok(cred);
    }
    let (Some(directory), Some(token)) = (&config.directory, &config.join) else {
        return Err(PeerError::NotJoined { data: config.data.clone() });
    };
    let cred = join(directory, token, Role::Peer, config.name.clone()).await?;
    cred.save(&path)?;
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
        ClientError::Directory(r) => r.kind == ErrorKind::Refused,
        ClientError::Rpc(RpcError::Connect { message, .. }) => {
            message.contains("certificate")
                || message.contains("UnknownIssuer")
                || message.contains("UnknownCA")
        }
        _ => false,
    }
}

/// Runs a peer until `stop`.
pub async fn run(config: PeerConfig, stop: CancellationToken) -> Result<(), PeerError> {
    std::fs::create_dir_all(&config.data)
        .map_err(|source| PeerError::Io { path: config.data.clone(), source })?;
    let cred = identity(&config).await?;
    let ring = Uring::new(256).map_err(PeerError::Ring)?;
    let store = ShardStore::open(&ring, &config.data.join("store"), config.capacity)?;
    let id = cred.identity();
    let ep = rpc::server_endpoint(
        config.listen,
        server_config(&id, ClientAuth::Required)?,
        client_config(&id)?,
        cred.key_pem.as_bytes(),
    )
    .map_err(|source| PeerError::Listen { addr: config.listen, source })?;
    let bound = ep
        .local_addr()
        .map_err(|source| PeerError::Listen { addr: config.listen, source: RpcError::Socket(source) })?;
    let dir_addr = resolve(&cred.directory)?;
    let addr = advertised(&config, bound, dir_addr);
    let failure_domain = config.failure_domain.clone().unwrap_or_else(|| cred.node.clone());
    let load = Arc::new(AtomicU32::new(0));
    let client = Client::on(cred.clone(), ep.clone(), dir_addr);
    let client_calls = Arc::new(AtomicU64::new(0));
    let service = Arc::new(PeerService {
        store: store.clone(),
        load: load.clone(),
        client_calls: client_calls.clone(),
        client: client.clone(),
        fault: config.fault,
    });
    if let Some(f) = config.fault {
        tracing::warn!("playing the test fault {f:?}: this peer misbehaves on purpose");
    }
    let server = tokio::spawn(rpc::serve(ep.clone(), service, stop.clone()));
    tracing::info!(
        "peer {} of cluster {} serving {} on {addr} (failure domain {failure_domain})",
        cred.node,
        cred.cluster,
        crate::size::human(config.capacity)
    );
    println!("peer {} listening on {addr}", cred.node);
    let workers = Runner::new(stop.clone());
    let (refused, refusal) = tokio::sync::oneshot::channel();
    let me = heartbeat::Identity { addr, failure_domain, capacity: config.capacity };
    let scrubbing = Arc::new(scrub::ScrubShared::default());
    workers.spawn(scrub::Scrub::new(
        client.clone(),
        store.clone(),
        scrubbing.clone(),
        client_calls.clone(),
        config.scrub,
    ));
    workers.spawn(heartbeat::Heartbeat::new(
        client,
        (store, scrubbing),
        (load, client_calls),
        me,
        cred.directory.clone(),
        config.heartbeat,
        refused,
    ));
    let result = tokio::select! {
        () = stop.cancelled() => Ok(()),
        Ok(e) = refusal => Err(PeerError::Refused { directory: cred.directory.clone(), source: e }),
    };
    stop.cancel();
    // Bounded: a heartbeat may be waiting on a directory that is gone.
    workers.join_within(crate::sys::worker::STOP_WAIT).await;
    let _ = server.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(data: PathBuf) -> PeerConfig {
        PeerConfig {
            data,
            directory: None,
            join: None,
            name: None,
            capacity: 1 << 30,
            failure_domain: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
            heartbeat: Duration::from_secs(1),
            fault: None,
            scrub: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_peer_without_identity_says_how_to_join() {
        let dir = tempfile::tempdir().unwrap();
        let err = run(config(dir.path().to_owned()), CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err, PeerError::NotJoined { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("has no peer identity yet") && text.contains("--join TOKEN"), "{text}");
    }

    #[tokio::test]
    async fn a_data_folder_that_cannot_be_made_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a file");
        std::fs::write(&file, b"").unwrap();
        let err = run(config(file.join("data")), CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err, PeerError::Io { .. }), "{err}");
        assert!(err.to_string().contains("a file/data"), "{err}");
    }
}
