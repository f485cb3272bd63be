//! The volume's traffic with the peers: reading a committed stripe back
//! (shards, hedged, verified, decoded) and destaging a dirty one as a new
//! copy-on-write generation.

use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;

use super::Inner;
use super::cache::CacheError;
use crate::api::{ErrorKind, PeerAddr, StripeRecord};
use crate::backend;
use crate::client::ClientError;
use crate::codec::key::VolumeKey;
use crate::codec::shard::HEADER_LEN;
use crate::codec::{Geometry, SectorCipher, ShardHash, ShardHeader, StripeCodec, StripeError};

/// Why a stripe could not be read from the peers or destaged to them.
#[derive(Debug, thiserror::Error)]
#[error("volume {volume} stripe {stripe}: {failure}")]
pub struct RemoteError {
    pub volume: String,
    pub stripe: u64,
    #[source]
    pub failure: RemoteFailure,
}

/// What went wrong with one stripe; [`RemoteFailure::kind`] is how it
/// looks to the export's client.
#[derive(Debug, thiserror::Error)]
pub enum RemoteFailure {
    /// A call to the cluster failed or was refused.
    #[error("{call}: {source}")]
    Cluster {
        call: &'static str,
        #[source]
        source: ClientError,
    },
    /// Fewer shards than a write quorum were stored.
    #[error("only {stored} of the {quorum} shards needed were stored ({})", list(failures))]
    Quorum { stored: usize, quorum: usize, failures: Vec<ClientError> },
    /// The shards were read but do not give the stripe back.
    #[error("generation {generation}: {source}")]
    Decode {
        generation: u64,
        #[source]
        source: StripeError,
    },
    #[error("encoding: {0}")]
    Encode(#[source] StripeError),
    #[error("the local cache: {0}")]
    Cache(#[source] CacheError),
    #[error("it left the cache while being destaged")]
    Evicted,
    #[error("a coding task: {0}")]
    Task(#[source] tokio::task::JoinError),
}

fn list(failures: &[ClientError]) -> String {
    failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

impl RemoteError {
    pub fn kind(&self) -> backend::ErrorKind {
        self.failure.kind()
    }
}

impl RemoteFailure {
    pub fn kind(&self) -> backend::ErrorKind {
        use backend::ErrorKind as K;
        match self {
            RemoteFailure::Cluster { source, .. } => cluster_kind(source),
            // Every peer out of space is a full cluster; anything else
            // (down, slow, a mix) is too few peers.
            RemoteFailure::Quorum { failures, .. }
                if !failures.is_empty() && failures.iter().all(|f| cluster_kind(f) == K::Full) =>
            {
                K::Full
            }
            RemoteFailure::Quorum { .. } => K::Unavailable,
            RemoteFailure::Decode { source: StripeError::Unrecoverable { corrupt: 0, .. }, .. } => {
                K::Unavailable
            }
            RemoteFailure::Decode { .. } => K::Corrupt,
            RemoteFailure::Encode(_)
            | RemoteFailure::Cache(_)
            | RemoteFailure::Evicted
            | RemoteFailure::Task(_) => K::Io,
        }
    }
}

/// How a failed call to the cluster looks to the export's client.
pub(super) fn cluster_kind(e: &ClientError) -> backend::ErrorKind {
    use backend::ErrorKind as K;
    match e.kind() {
        Some(ErrorKind::Fenced) => K::Fenced,
        Some(ErrorKind::Full) => K::Full,
        // A peer whose store is poisoned serves nothing: it is as good as down.
        Some(ErrorKind::Unavailable | ErrorKind::NotFound | ErrorKind::Poisoned) => K::Unavailable,
        Some(ErrorKind::Corrupt) => K::Corrupt,
        Some(ErrorKind::Invalid) => K::Invalid,
        Some(ErrorKind::Refused | ErrorKind::Conflict | ErrorKind::BadShard | ErrorKind::Internal) => K::Io,
        // No answer: the directory or the peer is out of reach.
        None if matches!(e, ClientError::Rpc(_) | ClientError::PeerUnreachable { .. }) => K::Unavailable,
        None => K::Io,
    }
}

/// Stripe codecs for the blocking pool, one per concurrent use.
pub(super) struct Codecs {
    cipher: SectorCipher,
    geometry: Geometry,
    idle: Mutex<Vec<StripeCodec>>,
}

impl Codecs {
    pub fn new(key: &VolumeKey, geometry: Geometry) -> Result<Self, StripeError> {
        let cipher = SectorCipher::new(key);
        let first = StripeCodec::with_cipher(cipher.clone(), geometry)?;
        Ok(Self { cipher, geometry, idle: Mutex::new(vec![first]) })
    }

    fn take(&self) -> StripeCodec {
        if let Some(c) = self.idle.lock().expect("not poisoned").pop() {
            return c;
        }
        StripeCodec::with_cipher(self.cipher.clone(), self.geometry).expect("geometry checked at open")
    }

    fn give(&self, c: StripeCodec) {
        self.idle.lock().expect("not poisoned").push(c);
    }
}

impl Inner {
    /// The plaintext of committed generation `rec` of `stripe`: k shards
    /// from the peers (data shards first, parity when one is slow, down
    /// or bad), each checked against the stripe map, decoded if needed.
    /// A second try, if the peers that are up or the record changed
    /// meanwhile (a peer came back, or moved).
    pub(super) async fn fetch(&self, stripe: u64, mut rec: StripeRecord) -> Result<Vec<u8>, RemoteError> {
        let k = self.geometry.k();
        let id = self.record.spec.id;
        let mut last = None;
        for attempt in 0..2 {
            if attempt > 0 {
                let before = self.peers.read().expect("not poisoned").clone();
                let now = self.client.up_peers().await.unwrap_or_else(|_| before.clone());
                *self.peers.write().expect("not poisoned") = now.clone();
                let newer = match self.record_of(stripe) {
                    Some(r) => r,
                    None => return Ok(vec![0; self.stripe_bytes]),
                };
                if now == before && newer == rec {
                    break;
                }
                rec = newer;
            }
            let peers = self.peers.read().expect("not poisoned").clone();
            let got = match self.client.fetch_shards(id, stripe, &rec, &peers, k, self.config.hedge).await {
                Ok(g) => g,
                Err(source) => {
                    last = Some(RemoteFailure::Cluster { call: "fetch shards", source });
                    continue;
                }
            };
            let mut shards: Vec<Option<Bytes>> = vec![None; self.geometry.shards()];
            for (i, bytes) in got {
                shards[usize::from(i)] = Some(bytes.slice(HEADER_LEN..));
            }
            let expected: Vec<ShardHash> =
                rec.hashes.iter().map(|h| ShardHash(h.unwrap_or([0; 32]))).collect();
            let mut codec = self.codecs.take();
            let (first_sector, generation, len) = (stripe * self.sectors, rec.generation, self.stripe_bytes);
            let (codec, decoded) = tokio::task::spawn_blocking(move || {
                let views: Vec<Option<&[u8]>> = shards.iter().map(|s| s.as_deref()).collect();
                let mut out = vec![0u8; len];
                let r = codec.decode(&views, &expected, first_sector, generation, &mut out);
                (codec, r.map(|report| (out, report)))
            })
            .await
            .map_err(|e| self.failed(stripe, RemoteFailure::Task(e)))?;
            self.codecs.give(codec);
            match decoded {
                Ok((out, report)) => {
                    if !report.corrupt.is_empty() {
                        tracing::warn!("stripe {stripe}: shards {:?} failed their hash", report.corrupt);
                    }
                    return Ok(out);
                }
                Err(source) => last = Some(RemoteFailure::Decode { generation, source }),
            }
        }
        Err(self.failed(stripe, last.expect("the first attempt fails or returns")))
    }

    /// `failure` of `stripe` of this volume; a fenced one fences the writer.
    fn failed(&self, stripe: u64, failure: RemoteFailure) -> RemoteError {
        let e = RemoteError { volume: self.name().to_owned(), stripe, failure };
        if e.kind() == backend::ErrorKind::Fenced {
            self.fence(format!("stripe {stripe}: {}", e.failure));
        }
        e
    }

    fn cluster(&self, stripe: u64, call: &'static str, source: ClientError) -> RemoteError {
        self.failed(stripe, RemoteFailure::Cluster { call, source })
    }

    /// Destages `stripe` if it is dirty: snapshot under the stripe's lock,
    /// then a new generation on the peers, committed, then clean.
    pub(super) async fn destage(&self, stripe: u64) -> Result<(), RemoteError> {
        let lock = self.lock_of(stripe);
        let held = lock.lock().await;
        let Some(snap) = self.dirty.lock().expect("not poisoned").start(stripe) else { return Ok(()) };
        let result = self.destage_from(stripe, snap, held, &lock).await;
        let mut d = self.dirty.lock().expect("not poisoned");
        match &result {
            Ok(()) => d.finished(stripe),
            Err(_) => d.failed(stripe),
        }
        drop(d);
        // What a flush or a write waiting for the destager reports if the
        // peers never take the data: a stripe's failure is forgotten only
        // when that stripe destages, not when another one does.
        let mut failure = self.destage_failure.lock().expect("not poisoned");
        match &result {
            Err(e) => *failure = Some((stripe, e.kind(), e.to_string())),
            Ok(()) if failure.as_ref().is_some_and(|f| f.0 == stripe) => *failure = None,
            Ok(()) => {}
        }
        drop(failure);
        result
    }

    async fn destage_from(
        &self,
        stripe: u64,
        snap: u64,
        held: tokio::sync::MutexGuard<'_, ()>,
        lock: &tokio::sync::Mutex<()>,
    ) -> Result<(), RemoteError> {
        let sectors = self.sectors as usize;
        let plain = match self.cache.lookup(stripe) {
            None => None,
            Some(slot) => {
                let cache = |e| self.failed(stripe, RemoteFailure::Cache(e));
                if !slot.complete(sectors) {
                    let old = self.stripe_plain(stripe).await?;
                    self.cache.fill(stripe, &old).await.map_err(cache)?;
                }
                let p = self.cache.read(stripe, 0, sectors).await.map_err(cache)?;
                Some(p.ok_or_else(|| self.failed(stripe, RemoteFailure::Evicted))?)
            }
        };
        drop(held);
        let epoch = self.epoch.load(Ordering::Relaxed);
        let name = self.name().to_owned();
        let committed = match plain {
            Some(p) if p.iter().any(|&b| b != 0) => Some(self.store_generation(stripe, p, epoch).await?),
            // Nothing but zeroes: no shards at all.
            _ => {
                self.client
                    .drop_stripe(&name, stripe, epoch)
                    .await
                    .map_err(|e| self.cluster(stripe, "drop stripe", e))?;
                None
            }
        };
        let _held = lock.lock().await;
        let zeroed_since = self.zeroed.lock().expect("not poisoned").get(&stripe).is_some_and(|&z| z > snap);
        let mut map = self.map.lock().expect("not poisoned");
        match committed {
            // A whole-stripe zero after the snapshot: the stripe reads as
            // zeroes until the destager drops the record just committed.
            Some(_) if zeroed_since => {}
            Some(rec) => {
                map.insert(stripe, rec);
            }
            None if zeroed_since => {}
            None => {
                map.remove(&stripe);
            }
        }
        drop(map);
        self.cache.mark_clean(stripe, snap);
        Ok(())
    }

    /// Asks the directory for another peer for shard `index` (its put to
    /// `from` failed or is slow); `None` if there is none.
    async fn replacement(
        &self,
        reservation: u64,
        stripe: u64,
        index: usize,
        from: &str,
        why: &str,
    ) -> Option<PeerAddr> {
        match self.client.replace(reservation, index as u8).await {
            Ok(p) => {
                tracing::info!(
                    "stripe {stripe} shard {index}: {from}: {why}; sending it to {} instead",
                    p.name
                );
                Some(p)
            }
            Err(e) => {
                tracing::info!("stripe {stripe} shard {index}: {from}: {why}; no other peer ({e})");
                None
            }
        }
    }

    /// Encodes `plain` as the next generation, stores its shards where the
    /// directory places them and commits it once a write quorum (k + 1)
    /// is stored. A slow or failed put is sent to another peer once; a
    /// shard still missing after that is left out (the stripe is
    /// degraded, and repair rebuilds it).
    async fn store_generation(
        &self,
        stripe: u64,
        plain: Vec<u8>,
        epoch: u64,
    ) -> Result<StripeRecord, RemoteError> {
        let g = self.geometry;
        let name = self.name().to_owned();
        let placement =
            self.client.place(&name, stripe).await.map_err(|e| self.cluster(stripe, "place", e))?;
        let mut codec = self.codecs.take();
        let (first_sector, generation, size, n) =
            (stripe * self.sectors, placement.generation, g.shard_size(), g.shards());
        let (codec, encoded) = tokio::task::spawn_blocking(move || {
            let mut shards = vec![vec![0u8; size]; n];
            let mut hashes = vec![ShardHash([0; 32]); n];
            let r = codec.encode(&plain, first_sector, generation, &mut shards, &mut hashes);
            (codec, r.map(|()| (shards, hashes)))
        })
        .await
        .map_err(|e| self.failed(stripe, RemoteFailure::Task(e)))?;
        self.codecs.give(codec);
        let (shards, hashes) = encoded.map_err(|e| self.failed(stripe, RemoteFailure::Encode(e)))?;

        let headers: Vec<ShardHeader> = (0..n)
            .map(|i| ShardHeader {
                volume_id: self.record.spec.id,
                stripe,
                generation,
                index: i as u8,
                k: g.k() as u8,
                m: (g.shards() - g.k()) as u8,
                payload_len: size as u32,
                payload_hash: hashes[i],
            })
            .collect();
        let payloads: Vec<Bytes> = shards.into_iter().map(Bytes::from).collect();
        let mut puts = tokio::task::JoinSet::new();
        let mut handles: Vec<Option<tokio::task::AbortHandle>> = vec![None; n];
        let spawn = |puts: &mut tokio::task::JoinSet<_>, i: usize, peer: PeerAddr| {
            let (client, header, payload) = (self.client.clone(), headers[i], payloads[i].clone());
            puts.spawn(async move {
                let r = client.put_shard(&peer, &header, payload, epoch).await;
                (i, peer.name, r)
            })
        };
        for (i, peer) in placement.peers.iter().enumerate() {
            handles[i] = Some(spawn(&mut puts, i, peer.clone()));
        }
        let mut names: Vec<String> = placement.peers.iter().map(|p| p.name.clone()).collect();
        let quorum = (g.k() + 1).min(n);
        let started = Instant::now();
        let mut stored: Vec<Option<[u8; 32]>> = vec![None; n];
        let mut replaced = vec![false; n];
        let mut count = 0;
        let mut failures = Vec::new();
        // Long-tail cancellation: a shard whose put failed, or is still
        // running when the quorum has had its grace (or, before a quorum,
        // at the put deadline), goes to another peer the directory picks;
        // a replacement gets one more deadline, then the shard is left out.
        let mut turn = tokio::time::Instant::now() + self.config.put_deadline;
        let mut last_turn = false;
        loop {
            if count == n {
                break;
            }
            let next = match tokio::time::timeout_at(turn, puts.join_next()).await {
                Ok(Some(j)) => j,
                Ok(None) => break,
                Err(_) if last_turn => break,
                Err(_) => {
                    let slow: Vec<usize> = (0..n).filter(|&i| stored[i].is_none() && !replaced[i]).collect();
                    for i in slow {
                        if let Some(h) = handles[i].take() {
                            h.abort();
                        }
                        if let Some(p) =
                            self.replacement(placement.reservation, stripe, i, &names[i], "too slow").await
                        {
                            names[i] = p.name.clone();
                            handles[i] = Some(spawn(&mut puts, i, p));
                        }
                        replaced[i] = true;
                    }
                    turn = tokio::time::Instant::now() + self.config.put_deadline;
                    last_turn = true;
                    continue;
                }
            };
            match next {
                Ok((i, _, Ok(()))) => {
                    stored[i] = Some(hashes[i].0);
                    handles[i] = None;
                    count += 1;
                    if count == quorum && !last_turn {
                        // The tail gets as long again as the quorum took.
                        let wait = started.elapsed().max(self.config.put_grace);
                        turn = turn.min(tokio::time::Instant::now() + wait);
                    }
                }
                Ok((i, peer, Err(e))) => {
                    if e.kind() == Some(ErrorKind::Fenced) {
                        puts.abort_all();
                        let _ = self.client.release(placement.reservation).await;
                        return Err(self.cluster(stripe, "put shard", e));
                    }
                    let why = match &e {
                        // The log line names the peer already.
                        ClientError::Peer { error, .. } => error.to_string(),
                        ClientError::PeerUnreachable { source, .. } => source.to_string(),
                        e => e.to_string(),
                    };
                    failures.push(e);
                    handles[i] = None;
                    if !replaced[i] {
                        replaced[i] = true;
                        if let Some(p) = self.replacement(placement.reservation, stripe, i, &peer, &why).await
                        {
                            names[i] = p.name.clone();
                            handles[i] = Some(spawn(&mut puts, i, p));
                        }
                    }
                }
                // Aborted (replaced) puts.
                Err(_) => {}
            }
        }
        puts.abort_all();
        if count < quorum {
            let _ = self.client.release(placement.reservation).await;
            return Err(self.failed(stripe, RemoteFailure::Quorum { stored: count, quorum, failures }));
        }
        if count < n {
            tracing::info!("stripe {stripe} generation {generation} committed with {count} of {n} shards");
        }
        self.client
            .commit(&name, &placement, epoch, stored.clone())
            .await
            .map_err(|e| self.cluster(stripe, "commit", e))?;
        Ok(StripeRecord {
            generation,
            peers: names,
            hashes: stored,
            committed_ms: crate::sys::clock::now_ms(),
        })
    }
}
