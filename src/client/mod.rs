//! Talking to the cluster as a member: the directory's calls and the peers'
//! shard calls over one QUIC endpoint and its connection pool. Used by the
//! CLI (`status`, `token create`), by peers (heartbeats, probes), by the
//! cluster benchmark and, next, by `attach`.

pub mod join;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::api::*;
use crate::codec::segment::{
    SegmentId, SegmentRoot, SegmentShardHeader, SegmentShardKey, ShardRoot, verify_blocks, verify_header,
    verify_shard,
};
use crate::membership::ca::{Role, node_name};
use crate::membership::credential::{Credential, CredentialError};
pub use crate::transport::rpc::Network;
use crate::transport::rpc::{Pool, RpcError, endpoint};
use crate::transport::tls::{TlsError, client_config};

/// How long a directory call may take.
const DIRECTORY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shard call may take (a 16 MiB shard over a slow link).
const SHARD_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed call to the cluster: what failed and where. When the other
/// side answered with an error, its [`ErrorKind`] is kept ([`ClientError::kind`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The call did not get through, or got no answer.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The directory answered with an error (its message says what and
    /// why, for the user to read as it is).
    #[error("{0}")]
    Directory(Remote),
    /// A peer answered with an error.
    #[error("peer {peer}: {error}")]
    Peer { peer: String, error: Remote },
    /// A call to a peer did not get through, or got no answer.
    #[error("peer {peer}: {source}")]
    PeerUnreachable {
        peer: String,
        #[source]
        source: RpcError,
    },
    /// A peer returned a segment shard, or blocks of one, that do not
    /// verify against the root the caller holds.
    #[error("peer {peer}: segment {segment} shard {index}: {why}", segment = key.segment, index = key.index)]
    BadShard { peer: String, key: SegmentShardKey, why: String },
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The other side answered with a message that does not fit the call.
    #[error("unexpected answer to {call}: {answer}")]
    Unexpected { call: &'static str, answer: String },
}

impl ClientError {
    /// What kind of refusal this is, if the other side refused (or the
    /// shards it returned were bad or too few); `None` when the call
    /// itself failed.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Directory(r) | ClientError::Peer { error: r, .. } => Some(r.kind),
            ClientError::BadShard { .. } => Some(ErrorKind::Corrupt),
            _ => None,
        }
    }
}

fn unexpected(call: &'static str, answer: impl std::fmt::Debug) -> ClientError {
    ClientError::Unexpected { call, answer: format!("{answer:?}") }
}

/// A member's view of the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    cred: Credential,
    pool: Pool,
    dir_addr: SocketAddr,
}

impl Client {
    /// A client on its own endpoint (an ephemeral UDP port).
    pub fn new(cred: Credential) -> Result<Self, ClientError> {
        let dir_addr = cred.directory_addr()?;
        let bind: SocketAddr =
            if dir_addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("valid");
        let ep = endpoint(bind, None, client_config(&cred.identity())?)?;
        Ok(Self::on(cred, ep, dir_addr))
    }

    /// A client that dials from `ep` (a peer's own server endpoint).
    pub fn on(cred: Credential, ep: quinn::Endpoint, dir_addr: SocketAddr) -> Self {
        Self { inner: Arc::new(Inner { cred, pool: Pool::new(ep), dir_addr }) }
    }

    pub fn credential(&self) -> &Credential {
        &self.inner.cred
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        self.inner.pool.endpoint()
    }

    fn peer_name(&self, peer: &str) -> String {
        node_name(peer, Role::Peer, &self.inner.cred.cluster)
    }

    /// One call to the directory; its error answers become `Remote`.
    pub async fn directory(&self, req: &DirRequest) -> Result<DirResponse, ClientError> {
        let name = self.inner.cred.directory_name();
        let (resp, _) =
            self.inner.pool.call(self.inner.dir_addr, &name, req, Vec::new(), DIRECTORY_TIMEOUT).await?;
        match resp {
            DirResponse::Error(e) => Err(ClientError::Directory(e)),
            r => Ok(r),
        }
    }

    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        match self.directory(&DirRequest::Status).await? {
            DirResponse::Status(s) => Ok(*s),
            other => Err(unexpected("status", other)),
        }
    }

    /// A join token for `role`, valid `ttl`; admin only.
    pub async fn create_token(&self, role: Role, ttl: Duration) -> Result<(String, u64), ClientError> {
        match self.directory(&DirRequest::CreateToken { role, ttl_secs: ttl.as_secs() }).await? {
            DirResponse::Token { token, expires_ms } => Ok((token, expires_ms)),
            other => Err(unexpected("create token", other)),
        }
    }

    pub async fn create_volume(&self, spec: VolumeSpec) -> Result<VolumeRecord, ClientError> {
        match self.directory(&DirRequest::CreateVolume(spec)).await? {
            DirResponse::Volume(v) => Ok(v),
            other => Err(unexpected("create volume", other)),
        }
    }

    pub async fn volume(&self, volume: &str) -> Result<VolumeRecord, ClientError> {
        match self.directory(&DirRequest::Volume { volume: volume.into() }).await? {
            DirResponse::Volume(v) => Ok(v),
            other => Err(unexpected("volume", other)),
        }
    }

    /// Replaces the volume's key slots if they are still `expected`
    /// (compare-and-set: `Conflict` if another change came first).
    pub async fn set_key_slots(
        &self,
        volume: &str,
        expected: Vec<u8>,
        slots: Vec<u8>,
    ) -> Result<VolumeRecord, ClientError> {
        let req = DirRequest::SetKeySlots { volume: volume.into(), expected, slots };
        match self.directory(&req).await? {
            DirResponse::Volume(v) => Ok(v),
            other => Err(unexpected("set key slots", other)),
        }
    }

    pub async fn volume_info(&self, volume: &str) -> Result<VolumeInfo, ClientError> {
        match self.directory(&DirRequest::VolumeInfo { volume: volume.into() }).await? {
            DirResponse::VolumeInfo(v) => Ok(*v),
            other => Err(unexpected("volume info", other)),
        }
    }

    /// Deletes a volume that nobody has attached; the directory erases its
    /// shards from the peers.
    pub async fn delete_volume(&self, volume: &str) -> Result<(), ClientError> {
        match self.directory(&DirRequest::DeleteVolume { volume: volume.into() }).await? {
            DirResponse::Done => Ok(()),
            other => Err(unexpected("delete volume", other)),
        }
    }

    /// The volume's write lease with a new fencing epoch. `resume`: the
    /// epoch this node held when it stopped without releasing it.
    pub async fn acquire_lease(
        &self,
        volume: &str,
        force: bool,
        resume: Option<u64>,
    ) -> Result<VolumeLease, ClientError> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "an unknown host".into());
        let req = DirRequest::AcquireLease { volume: volume.into(), force, resume, host };
        match self.directory(&req).await? {
            DirResponse::Lease(l) => Ok(l),
            other => Err(unexpected("acquire lease", other)),
        }
    }

    /// Keeps the lease; `Fenced` once another node took it or it lapsed.
    /// `ops`: the clients' requests per second served since the last
    /// renewal.
    pub async fn renew_lease(&self, volume: &str, epoch: u64, ops: u32) -> Result<VolumeLease, ClientError> {
        match self.directory(&DirRequest::RenewLease { volume: volume.into(), epoch, ops }).await? {
            DirResponse::Lease(l) => Ok(l),
            other => Err(unexpected("renew lease", other)),
        }
    }

    pub async fn release_lease(&self, volume: &str, epoch: u64) -> Result<(), ClientError> {
        match self.directory(&DirRequest::ReleaseLease { volume: volume.into(), epoch }).await? {
            DirResponse::Done => Ok(()),
            other => Err(unexpected("release lease", other)),
        }
    }

    /// Where `count` new segments of `shard_bytes` per shard go
    /// (`PlaceSegments`): peers in shard order, none of `exclude`. Nothing
    /// is reserved.
    pub async fn place_segments(
        &self,
        volume: &str,
        epoch: u64,
        count: u32,
        shard_bytes: u64,
        exclude: Vec<u16>,
        keep_free: u64,
    ) -> Result<Vec<SegmentPlacement>, ClientError> {
        let req = DirRequest::PlaceSegments {
            volume: volume.into(),
            epoch,
            count,
            shard_bytes,
            exclude,
            keep_free,
        };
        match self.directory(&req).await? {
            DirResponse::SegmentPlacements(p) => Ok(p),
            other => Err(unexpected("place segments", other)),
        }
    }

    /// The volume's committed root, if it has one (not verified: the
    /// caller opens it with the volume key).
    pub async fn root(&self, volume: &str) -> Result<Option<RootState>, ClientError> {
        match self.directory(&DirRequest::GetRoot { volume: volume.into() }).await? {
            DirResponse::Root(r) => Ok(r),
            other => Err(unexpected("root", other)),
        }
    }

    /// Swaps the volume's root by compare-and-set; returns the new commit
    /// number. A refusal keeps its kind ([`ClientError::kind`]): `Conflict`
    /// (another root is current), `Fenced` (taken over), `Invalid`. When
    /// the call itself fails the outcome is unknown: read the root again
    /// before sealing another with the same (epoch, commit).
    pub async fn commit_root(&self, commit: RootCommit) -> Result<u64, ClientError> {
        match self.directory(&DirRequest::CommitRoot(commit)).await? {
            DirResponse::Committed { commit } => Ok(commit),
            other => Err(unexpected("commit root", other)),
        }
    }

    /// The directory's records of these segments (`None`: no record).
    pub async fn segment_records(
        &self,
        volume: &str,
        ids: Vec<SegmentId>,
    ) -> Result<Vec<Option<SegmentRecord>>, ClientError> {
        let n = ids.len();
        match self.directory(&DirRequest::SegmentRecords { volume: volume.into(), ids }).await? {
            DirResponse::SegmentRecords(r) if r.len() == n => Ok(r),
            other => Err(unexpected("segment records", other)),
        }
    }

    /// The health of these segments of `volume` now (`None`: no record).
    pub async fn segment_health(
        &self,
        volume: &str,
        ids: Vec<SegmentId>,
    ) -> Result<Vec<Option<SegmentHealth>>, ClientError> {
        let n = ids.len();
        match self.directory(&DirRequest::SegmentHealth { volume: volume.into(), ids }).await? {
            DirResponse::SegmentHealth(h) if h.len() == n => Ok(h),
            other => Err(unexpected("segment health", other)),
        }
    }

    /// Drops segments the volume's root no longer reaches (outside a
    /// commit), as the writer holding the lease at `epoch`.
    pub async fn drop_segments(
        &self,
        volume: &str,
        epoch: u64,
        ids: Vec<SegmentId>,
    ) -> Result<(), ClientError> {
        match self.directory(&DirRequest::DropSegments { volume: volume.into(), epoch, ids }).await? {
            DirResponse::Done => Ok(()),
            other => Err(unexpected("drop segments", other)),
        }
    }

    /// Reports shards this peer holds that failed their hashes: the
    /// directory forgets them, and repair rebuilds them.
    pub async fn report_shard_faults(&self, faults: Vec<ShardFault>) -> Result<(), ClientError> {
        match self.directory(&DirRequest::ReportShardFaults { faults }).await? {
            DirResponse::Done => Ok(()),
            other => Err(unexpected("report shard faults", other)),
        }
    }

    /// Starts (or cancels) draining `peer` (admins).
    pub async fn drain_peer(&self, peer: &str, cancel: bool) -> Result<(), ClientError> {
        match self.directory(&DirRequest::DrainPeer { peer: peer.into(), cancel }).await? {
            DirResponse::Done => Ok(()),
            other => Err(unexpected("drain peer", other)),
        }
    }

    /// Removes `peer` from the cluster (admins); refused while records
    /// name it.
    pub async fn remove_peer(&self, peer: &str) -> Result<(), ClientError> {
        match self.directory(&DirRequest::RemovePeer { peer: peer.into() }).await? {
            DirResponse::Done => Ok(()),
            other => Err(unexpected("remove peer", other)),
        }
    }

    /// Tells the directory that `peer`'s answer for `shard` did not
    /// verify, so it audits it.
    pub async fn suspect_shard(&self, shard: SegmentShardKey, peer: &str) -> Result<(), ClientError> {
        match self.directory(&DirRequest::SuspectShard { shard, peer: peer.into() }).await? {
            DirResponse::Done => Ok(()),
            other => Err(unexpected("suspect shard", other)),
        }
    }

    /// Every segment the directory has a record of for `volume`, in order
    /// (paged, [`MAX_SEGMENTS_PER_CALL`] a call).
    pub async fn list_segments(&self, volume: &str) -> Result<Vec<SegmentId>, ClientError> {
        let mut out: Vec<SegmentId> = Vec::new();
        loop {
            let req = DirRequest::ListSegments {
                volume: volume.into(),
                after: out.last().map(|s| s.raw()),
                limit: MAX_SEGMENTS_PER_CALL as u32,
            };
            match self.directory(&req).await? {
                DirResponse::SegmentIds(page) => {
                    if page.iter().zip(page.iter().skip(1)).any(|(a, b)| a >= b)
                        || out.last().zip(page.first()).is_some_and(|(a, b)| a >= b)
                    {
                        return Err(unexpected(
                            "list segments (out of order)",
                            DirResponse::SegmentIds(page),
                        ));
                    }
                    let full = page.len() >= MAX_SEGMENTS_PER_CALL;
                    out.extend(page);
                    if !full {
                        return Ok(out);
                    }
                }
                other => return Err(unexpected("list segments", other)),
            }
        }
    }

    /// Keeps the volume's committed root as snapshot `snapshot`.
    pub async fn create_snapshot(&self, volume: &str, snapshot: &str) -> Result<SnapshotInfo, ClientError> {
        let req = DirRequest::CreateSnapshot { volume: volume.into(), snapshot: snapshot.into() };
        match self.directory(&req).await? {
            DirResponse::Snapshot(s) => Ok(s),
            other => Err(unexpected("create snapshot", other)),
        }
    }

    /// The volume's snapshots, oldest first, with the space each pins.
    /// The highest segment a snapshot of the volume reaches (none without
    /// snapshots) and its dropped segments still collecting: what the
    /// compactor weighs each round.
    pub async fn compaction_inputs(&self, volume: &str) -> Result<(Option<u64>, Collecting), ClientError> {
        match self.directory(&DirRequest::CompactionInputs { volume: volume.into() }).await? {
            DirResponse::CompactionInputs { pinned_up_to, collecting } => Ok((pinned_up_to, collecting)),
            other => Err(unexpected("compaction inputs", other)),
        }
    }

    pub async fn list_snapshots(&self, volume: &str) -> Result<Vec<SnapshotInfo>, ClientError> {
        match self.directory(&DirRequest::ListSnapshots { volume: volume.into() }).await? {
            DirResponse::Snapshots(s) => Ok(s),
            other => Err(unexpected("list snapshots", other)),
        }
    }

    /// Deletes a snapshot (refused `Conflict` while a clone is made from it).
    pub async fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), ClientError> {
        let req = DirRequest::DeleteSnapshot { volume: volume.into(), snapshot: snapshot.into() };
        match self.directory(&req).await? {
            DirResponse::Done => Ok(()),
            other => Err(unexpected("delete snapshot", other)),
        }
    }

    /// The root a snapshot keeps (not verified: the caller opens it with
    /// the volume key).
    pub async fn snapshot_root(&self, volume: &str, snapshot: &str) -> Result<RootState, ClientError> {
        let req = DirRequest::SnapshotRoot { volume: volume.into(), snapshot: snapshot.into() };
        match self.directory(&req).await? {
            DirResponse::Root(Some(r)) => Ok(r),
            other => Err(unexpected("snapshot root", other)),
        }
    }

    /// Makes the clone `spec` (its lineage's first entry names the parent
    /// and snapshot) starting from `sealed`: the snapshot's root sealed
    /// for the clone's id and key, at the snapshot root's epoch, commit 1.
    pub async fn clone_volume(&self, spec: VolumeSpec, sealed: Vec<u8>) -> Result<VolumeRecord, ClientError> {
        match self.directory(&DirRequest::CloneVolume { spec, sealed }).await? {
            DirResponse::Volume(v) => Ok(v),
            other => Err(unexpected("clone volume", other)),
        }
    }

    /// Rolls the volume back to `snapshot` as the writer holding the lease
    /// at `epoch`: `sealed` (the snapshot's root resealed one commit above
    /// `expected`, keeping the current root's highest segment and
    /// sequence) replaces the root by compare-and-set; the new commit
    /// number. Refusals keep their kind, as [`Self::commit_root`]'s.
    pub async fn rollback(
        &self,
        volume: &str,
        snapshot: &str,
        epoch: u64,
        expected: (u64, u64),
        sealed: Vec<u8>,
    ) -> Result<u64, ClientError> {
        let req = DirRequest::Rollback {
            volume: volume.into(),
            snapshot: snapshot.into(),
            epoch,
            expected,
            sealed,
        };
        match self.directory(&req).await? {
            DirResponse::Committed { commit } => Ok(commit),
            other => Err(unexpected("rollback", other)),
        }
    }

    /// Where the peers with these small ids are now (`None`: unknown id,
    /// or a peer that never reported).
    pub async fn peer_slots(&self, ids: Vec<u16>) -> Result<Vec<Option<PeerSlot>>, ClientError> {
        let n = ids.len();
        match self.directory(&DirRequest::PeerSlots { ids }).await? {
            DirResponse::PeerSlots(p) if p.len() == n => Ok(p),
            other => Err(unexpected("peer slots", other)),
        }
    }

    /// Tells the directory how far each peer is from this client.
    pub async fn report_hints(&self, rtts: Vec<Rtt>) -> Result<(), ClientError> {
        match self.directory(&DirRequest::Hints { rtts }).await? {
            DirResponse::Done => Ok(()),
            other => Err(unexpected("report hints", other)),
        }
    }

    async fn peer_call(
        &self,
        peer: &PeerAddr,
        req: &PeerRequest,
        payload: Vec<Bytes>,
    ) -> Result<(PeerResponse, Bytes), ClientError> {
        let name = self.peer_name(&peer.name);
        let (resp, data) = self
            .inner
            .pool
            .call(peer.addr, &name, req, payload, SHARD_TIMEOUT)
            .await
            .map_err(|source| ClientError::PeerUnreachable { peer: peer.name.clone(), source })?;
        match resp {
            PeerResponse::Error(error) => Err(ClientError::Peer { peer: peer.name.clone(), error }),
            r => Ok((r, data)),
        }
    }

    /// Stores a segment shard (header + payload, as `encode_segment` makes
    /// it) on `peer`; durable when this returns. The bytes are sent as
    /// they are, without a copy.
    pub async fn put_shard(&self, peer: &PeerAddr, shard: Bytes, epoch: u64) -> Result<(), ClientError> {
        match self.peer_call(peer, &PeerRequest::Put { epoch }, vec![shard]).await? {
            (PeerResponse::Stored, _) => Ok(()),
            (other, _) => Err(unexpected("put shard", other)),
        }
    }

    /// A whole segment shard, verified alone against the segment root
    /// `expected` and checked to be the one asked for.
    pub async fn get_shard(
        &self,
        peer: &PeerAddr,
        key: SegmentShardKey,
        expected: &SegmentRoot,
    ) -> Result<Bytes, ClientError> {
        let data = match self.peer_call(peer, &PeerRequest::Get(key), Vec::new()).await? {
            (PeerResponse::Shard, data) => data,
            (other, _) => return Err(unexpected("get shard", other)),
        };
        let bad = |why: String| ClientError::BadShard { peer: peer.name.clone(), key, why };
        let header = verify_shard(&data, expected).map_err(|e| bad(e.to_string()))?.0;
        // The index is the one field outside the segment root.
        if SegmentShardKey::of(&header) != key {
            return Err(bad(format!("got shard {} of segment {}", header.index, header.segment)));
        }
        Ok(data)
    }

    /// A segment shard's header, verified against the segment root
    /// `expected` and checked to be the one asked for: the geometry and
    /// every shard root, what block proofs are checked against.
    pub async fn get_shard_header(
        &self,
        peer: &PeerAddr,
        key: SegmentShardKey,
        expected: &SegmentRoot,
    ) -> Result<SegmentShardHeader, ClientError> {
        let data = match self.peer_call(peer, &PeerRequest::GetHeader(key), Vec::new()).await? {
            (PeerResponse::Shard, data) => data,
            (other, _) => return Err(unexpected("get segment header", other)),
        };
        let bad = |why: String| ClientError::BadShard { peer: peer.name.clone(), key, why };
        let header = verify_header(&data, expected).map_err(|e| bad(e.to_string()))?;
        if SegmentShardKey::of(&header) != key {
            return Err(bad(format!(
                "got the header of shard {} of segment {}",
                header.index, header.segment
            )));
        }
        Ok(header)
    }

    /// Blocks `first .. first + count` of a segment shard of
    /// `blocks_per_shard` blocks, verified against the shard's `root`
    /// before they are returned (the peer's proof, `verify_blocks`): an
    /// altered, short or misdirected answer is `BadShard`.
    pub async fn get_blocks(
        &self,
        peer: &PeerAddr,
        key: SegmentShardKey,
        root: &ShardRoot,
        blocks_per_shard: u32,
        first: u32,
        count: u32,
    ) -> Result<Vec<u8>, ClientError> {
        let req = PeerRequest::GetBlocks { shard: key, first, count };
        let proof = match self.peer_call(peer, &req, Vec::new()).await? {
            (PeerResponse::Blocks, proof) => proof,
            (other, _) => return Err(unexpected("get blocks", other)),
        };
        let end = first.saturating_add(count);
        verify_blocks(root, blocks_per_shard, first..end, &proof).map_err(|e| ClientError::BadShard {
            peer: peer.name.clone(),
            key,
            why: e.to_string(),
        })
    }

    /// Erases a shard from `peer`, as a writer (or the directory's
    /// collector) holding `epoch`; whether it was there.
    pub async fn delete_shard(
        &self,
        peer: &PeerAddr,
        key: SegmentShardKey,
        epoch: u64,
    ) -> Result<bool, ClientError> {
        match self.peer_call(peer, &PeerRequest::Delete { shard: key, epoch }, Vec::new()).await? {
            (PeerResponse::Deleted { existed }, _) => Ok(existed),
            (other, _) => Err(unexpected("delete shard", other)),
        }
    }

    /// Has `target` rebuild (or copy) a shard from `sources` and store it
    /// (the directory's repair; see `PeerRequest::Rebuild`); the bytes it
    /// read.
    pub async fn rebuild_shard(
        &self,
        target: &PeerAddr,
        shard: SegmentShardKey,
        root: &SegmentRoot,
        epoch: u64,
        need: u8,
        sources: Vec<ShardSource>,
    ) -> Result<u64, ClientError> {
        let req = PeerRequest::Rebuild { shard, root: root.0, epoch, need, sources };
        match self.peer_call(target, &req, Vec::new()).await? {
            (PeerResponse::Rebuilt { read }, _) => Ok(read),
            (other, _) => Err(unexpected("rebuild shard", other)),
        }
    }

    /// [`Self::list_shards`], with each shard's copy.
    pub async fn list_copies(
        &self,
        peer: &PeerAddr,
        volume: [u8; VOLUME_ID_LEN],
        after: Option<SegmentShardKey>,
        limit: u32,
    ) -> Result<Vec<(SegmentShardKey, CopyId)>, ClientError> {
        match self.peer_call(peer, &PeerRequest::ListCopies { volume, after, limit }, Vec::new()).await? {
            (PeerResponse::Copies(c), _) => Ok(c),
            (other, _) => Err(unexpected("list copies", other)),
        }
    }

    /// Erases copy `copy` of a shard from `peer` (a copy stored since is
    /// kept); whether it did.
    pub async fn delete_copy(
        &self,
        peer: &PeerAddr,
        shard: SegmentShardKey,
        epoch: u64,
        copy: CopyId,
    ) -> Result<bool, ClientError> {
        match self.peer_call(peer, &PeerRequest::DeleteCopy { shard, epoch, copy }, Vec::new()).await? {
            (PeerResponse::Deleted { existed }, _) => Ok(existed),
            (other, _) => Err(unexpected("delete copy", other)),
        }
    }

    /// Up to `limit` shards of `volume` on `peer`, in key order, after
    /// `after`.
    pub async fn list_shards(
        &self,
        peer: &PeerAddr,
        volume: [u8; VOLUME_ID_LEN],
        after: Option<SegmentShardKey>,
        limit: u32,
    ) -> Result<Vec<SegmentShardKey>, ClientError> {
        match self.peer_call(peer, &PeerRequest::List { volume, after, limit }, Vec::new()).await? {
            (PeerResponse::Shards(keys), _) => Ok(keys),
            (other, _) => Err(unexpected("list shards", other)),
        }
    }

    /// Pings `peer`; returns the connection's smoothed round-trip time.
    pub async fn ping(&self, peer: &PeerAddr) -> Result<Duration, ClientError> {
        self.peer_call(peer, &PeerRequest::Ping, Vec::new()).await?;
        let name = self.peer_name(&peer.name);
        self.inner.pool.rtt(peer.addr, &name).await.ok_or_else(|| ClientError::Unexpected {
            call: "ping",
            answer: format!("no connection to {} after it", peer.name),
        })
    }

    /// The peers that are up, as the directory sees them.
    pub async fn up_peers(&self) -> Result<Vec<PeerAddr>, ClientError> {
        let status = self.status().await?;
        Ok(status
            .peers
            .into_iter()
            .filter(|p| p.state == PeerState::Up)
            .map(|p| PeerAddr { name: p.name, addr: p.addr })
            .collect())
    }

    /// Measures the round trip to every peer that is up and tells the
    /// directory, which weighs placements for this client by them.
    pub async fn refresh_hints(&self) -> Result<Vec<Rtt>, ClientError> {
        let peers = self.up_peers().await?;
        let rtts = self.measure(&peers, Duration::from_secs(2)).await;
        self.report_hints(rtts.clone()).await?;
        Ok(rtts)
    }

    /// Path statistics of this client's connections: (name, MTU, lost
    /// packets, sent packets).
    pub async fn path_stats(&self) -> Vec<(String, u16, u64, u64)> {
        self.inner.pool.path_stats().await
    }

    /// The UDP bytes this client's connections (to the directory and to
    /// every peer) sent and received, those closed since included: what it
    /// really moved over the network.
    pub async fn network(&self) -> Network {
        self.inner.pool.network().await
    }

    /// Pings every peer at once (each within `timeout`); the round trips of
    /// those that answered.
    pub async fn measure(&self, peers: &[PeerAddr], timeout: Duration) -> Vec<Rtt> {
        let mut probes = tokio::task::JoinSet::new();
        for p in peers {
            let (me, p) = (self.clone(), p.clone());
            probes.spawn(async move {
                let rtt = tokio::time::timeout(timeout, me.ping(&p)).await.ok()?.ok()?;
                Some(Rtt { node: p.name, micros: rtt.as_micros().min(u128::from(u32::MAX)) as u32 })
            });
        }
        let mut out: Vec<Rtt> = probes.join_all().await.into_iter().flatten().collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }
}
