//! `meshdisk bench cluster`: shard put and get throughput from this client
//! to every peer that is up, with `depth` calls in flight per peer.
//!
//! Shards are segment shards (k = 1, m = 0, one `--shard-size` payload)
//! of a benchmark volume id that no real volume has (the first 16 bytes of
//! blake3("meshdisk bench cluster")); each put is a new segment id, so
//! nothing is replaced. The payload is the same fixed pattern for every
//! put, hashed once, so the client's CPU goes to the transfer; the peer
//! hashes every shard it stores, as for a volume. `get` reads back what the
//! peers list for that volume, each shard verified against its segment
//! root; `clean` deletes it. CPU time is this process's own (user +
//! system); `tools/bench cluster` adds the peers'.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::api::{PeerAddr, VOLUME_ID_LEN};
use crate::cli::CliError;
use crate::client::Client;
use crate::codec::segment::{
    BLOCK_SIZE, SegmentGeometry, SegmentId, SegmentShardHeader, SegmentShardKey, ShardRoot, segment_root,
};

/// Which phases to run (`--phases put,get,clean`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Put,
    Get,
    Clean,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Put => "put",
            Phase::Get => "get",
            Phase::Clean => "clean",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClusterBench {
    pub shard_size: usize,
    pub duration: Duration,
    pub depth: usize,
    pub phases: Vec<Phase>,
}

#[derive(Clone, Debug)]
pub struct PhaseResult {
    pub phase: Phase,
    pub peers: usize,
    pub shards: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub cpu_seconds: f64,
}

impl PhaseResult {
    pub fn gib_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds / f64::from(1u32 << 30)
    }

    pub fn cpu_s_per_gib(&self) -> f64 {
        if self.bytes == 0 { 0.0 } else { self.cpu_seconds / (self.bytes as f64 / f64::from(1u32 << 30)) }
    }
}

/// The benchmark's volume id.
pub fn bench_volume() -> [u8; VOLUME_ID_LEN] {
    blake3::hash(b"meshdisk bench cluster").as_bytes()[..VOLUME_ID_LEN].try_into().expect("16 bytes")
}

/// This process's CPU time so far.
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one rusage into the zeroed struct we own.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

async fn up_peers(client: &Client) -> Result<Vec<PeerAddr>, CliError> {
    let peers = client.up_peers().await?;
    if peers.is_empty() {
        return Err(CliError::NoPeerUp);
    }
    Ok(peers)
}

/// Runs the phases in order; reports each as it ends.
pub async fn run(
    client: &Client,
    config: &ClusterBench,
    mut report: impl FnMut(&PhaseResult),
) -> Result<Vec<PhaseResult>, CliError> {
    let peers = up_peers(client).await?;
    // Warm the connections so the first phase measures transfer, not handshakes.
    client.measure(&peers, Duration::from_secs(5)).await;
    let mut out = Vec::new();
    for &phase in &config.phases {
        let r = match phase {
            Phase::Put => put(client, &peers, config).await?,
            Phase::Get => get(client, &peers, config).await?,
            Phase::Clean => clean(client, &peers).await?,
        };
        for (name, mtu, lost, sent) in client.path_stats().await {
            tracing::info!("after {}: {name}: MTU {mtu}, {lost} of {sent} packets lost", phase.as_str());
        }
        report(&r);
        out.push(r);
    }
    Ok(out)
}

/// The benchmark's shards on `peer`.
async fn list(client: &Client, peer: &PeerAddr) -> Result<Vec<SegmentShardKey>, CliError> {
    let (mut out, mut after) = (Vec::new(), None);
    loop {
        let page = client.list_shards(peer, bench_volume(), after, 1000).await.map_err(|source| {
            CliError::PeerCall { what: "listing", peer: peer.name.clone(), source: Box::new(source) }
        })?;
        let Some(&last) = page.last() else { return Ok(out) };
        out.extend(page);
        after = Some(last);
    }
}

/// The payload every benchmark shard carries, its geometry and its root.
fn payload(config: &ClusterBench) -> Result<(Bytes, SegmentGeometry, ShardRoot), CliError> {
    let blocks = config.shard_size.div_ceil(BLOCK_SIZE).max(1) as u32;
    let geometry = SegmentGeometry::new(1, 0, blocks).map_err(|e| CliError::Argument(e.to_string()))?;
    let payload = crate::codec::bench::pattern(geometry.shard_len(), 0xbe4c);
    let root = ShardRoot::of(&payload);
    Ok((Bytes::from(payload), geometry, root))
}

/// Shard `segment` of the benchmark volume, carrying `payload`.
fn header(segment: SegmentId, geometry: SegmentGeometry, root: ShardRoot) -> SegmentShardHeader {
    SegmentShardHeader { volume_id: bench_volume(), segment, geometry, index: 0, roots: vec![root] }
}

async fn put(client: &Client, peers: &[PeerAddr], config: &ClusterBench) -> Result<PhaseResult, CliError> {
    let (payload, geometry, root) = payload(config)?;
    // Segment ids differ from an earlier run's: the epoch (high bits) is
    // this run's start in seconds, modulo the largest epoch (194 days).
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs() % crate::codec::sequence::MAX_EPOCH)
        .max(1);
    let next = Arc::new(AtomicU64::new(1));
    let deadline = Instant::now() + config.duration;
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut tasks = tokio::task::JoinSet::new();
    for peer in peers {
        for _ in 0..config.depth {
            let (client, peer, payload, next) = (client.clone(), peer.clone(), payload.clone(), next.clone());
            tasks.spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let id = SegmentId::new(epoch, next.fetch_add(1, Ordering::Relaxed))
                        .map_err(|e| CliError::Argument(e.to_string()))?;
                    let mut shard = header(id, geometry, root).encode();
                    shard.extend_from_slice(&payload);
                    client.put_shard(&peer, Bytes::from(shard), 1).await.map_err(|source| {
                        CliError::PeerCall {
                            what: "put to",
                            peer: peer.name.clone(),
                            source: Box::new(source),
                        }
                    })?;
                    n += 1;
                }
                Ok::<u64, CliError>(n)
            });
        }
    }
    let mut shards = 0;
    for r in tasks.join_all().await {
        shards += r?;
    }
    let shard_len = (crate::codec::segment::header::header_len(geometry) + geometry.shard_len()) as u64;
    Ok(PhaseResult {
        phase: Phase::Put,
        peers: peers.len(),
        shards,
        bytes: shards * shard_len,
        seconds: t0.elapsed().as_secs_f64(),
        cpu_seconds: cpu_seconds() - cpu0,
    })
}

async fn get(client: &Client, peers: &[PeerAddr], config: &ClusterBench) -> Result<PhaseResult, CliError> {
    let (_, geometry, root) = payload(config)?;
    let mut lists = Vec::new();
    for p in peers {
        let keys = list(client, p).await?;
        if !keys.is_empty() {
            lists.push((p.clone(), Arc::new(keys)));
        }
    }
    if lists.is_empty() {
        return Err(CliError::NoBenchShards);
    }
    let deadline = Instant::now() + config.duration;
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut tasks = tokio::task::JoinSet::new();
    for (peer, keys) in &lists {
        for worker in 0..config.depth {
            let (client, peer, keys) = (client.clone(), peer.clone(), keys.clone());
            tasks.spawn(async move {
                let (mut n, mut bytes) = (0u64, 0u64);
                let mut i = worker;
                while Instant::now() < deadline {
                    let key: SegmentShardKey = keys[i % keys.len()];
                    // A shard of an earlier run with another --shard-size
                    // fails this check: `--phases clean` removes them.
                    let expected = segment_root(&key.volume, key.segment, geometry, &[root]);
                    let shard = client.get_shard(&peer, key, &expected).await.map_err(|source| {
                        CliError::PeerCall {
                            what: "get from",
                            peer: peer.name.clone(),
                            source: Box::new(source),
                        }
                    })?;
                    n += 1;
                    bytes += shard.len() as u64;
                    i += 7919;
                }
                Ok::<(u64, u64), CliError>((n, bytes))
            });
        }
    }
    let (mut shards, mut bytes) = (0, 0);
    for r in tasks.join_all().await {
        let (n, b) = r?;
        shards += n;
        bytes += b;
    }
    Ok(PhaseResult {
        phase: Phase::Get,
        peers: lists.len(),
        shards,
        bytes,
        seconds: t0.elapsed().as_secs_f64(),
        cpu_seconds: cpu_seconds() - cpu0,
    })
}

async fn clean(client: &Client, peers: &[PeerAddr]) -> Result<PhaseResult, CliError> {
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut shards = 0;
    for p in peers {
        for k in list(client, p).await? {
            client.delete_shard(p, k, 1).await.map_err(|source| CliError::PeerCall {
                what: "delete on",
                peer: p.name.clone(),
                source: Box::new(source),
            })?;
            shards += 1;
        }
    }
    Ok(PhaseResult {
        phase: Phase::Clean,
        peers: peers.len(),
        shards,
        bytes: 0,
        seconds: t0.elapsed().as_secs_f64(),
        cpu_seconds: cpu_seconds() - cpu0,
    })
}
