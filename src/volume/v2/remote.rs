//! Segments on the peers: storing one at a write quorum, and reading
//! blocks of it back, each proven against the segment's root.
//!
//! ```text
//! put   k + m shards in parallel ─► quorum (k + 1) stored ─► the rest get
//!       a grace as long as the quorum took; a failed or slow shard goes to
//!       a spare peer once; the holders are whoever really stored each shard
//! read  header (once per segment, any shard: all k + m shard roots, checked
//!       against the segment root) ─► the blocks from the one data shard
//!       holding them, with their hash-tree proof ─► on failure or delay:
//!       the same blocks of k other shards, each proven, decoded
//! ```
//!
//! Nothing here knows the key: blocks go out and come back as ciphertext.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::api::{ErrorKind, PeerAddr};
use crate::client::{Client, ClientError};
use crate::codec::erasure::{Erasure, Geometry};
use crate::codec::segment::{
    BLOCK_SIZE, EncodedSegment, SegmentError, SegmentRoot, SegmentShardHeader, SegmentShardKey, VolumeId,
};
use crate::codec::sequence::SegmentId;

/// A peer by its directory id and address.
pub type Holder = (u16, PeerAddr);

/// Where a committed segment lies: its root (from the MAC'd root or what
/// it reaches) and the holder of each shard, by index (`None`: not stored).
#[derive(Clone, Debug)]
pub struct Located {
    /// The volume it is stored under (a clone's ancestor's, for a segment
    /// it inherited).
    pub volume: VolumeId,
    pub id: SegmentId,
    pub root: SegmentRoot,
    pub holders: Vec<Option<PeerAddr>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SegmentIoError {
    #[error("segment {segment}: only {stored} of the {quorum} shards needed were stored ({})", list(.failures))]
    Quorum { segment: SegmentId, stored: usize, quorum: usize, failures: Vec<ClientError> },
    #[error("segment {segment}: this writer was fenced: {source}")]
    Fenced {
        segment: SegmentId,
        #[source]
        source: ClientError,
    },
    #[error("segment {segment}: no shard header could be read ({})", list(.failures))]
    NoHeader { segment: SegmentId, failures: Vec<ClientError> },
    #[error("segment {segment}: slots {first}..{end} cannot be read: {why}")]
    Unreadable { segment: SegmentId, first: u32, end: u32, why: String },
    #[error("segment {segment}: {source}")]
    Codec {
        segment: SegmentId,
        #[source]
        source: SegmentError,
    },
}

fn list(failures: &[ClientError]) -> String {
    if failures.is_empty() {
        return "no peer to ask".into();
    }
    failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

impl SegmentIoError {
    /// How the failure looks to the export's client.
    pub fn kind(&self) -> crate::backend::ErrorKind {
        use crate::backend::ErrorKind as K;
        match self {
            SegmentIoError::Fenced { .. } => K::Fenced,
            SegmentIoError::Codec { .. } => K::Corrupt,
            SegmentIoError::Unreadable { .. }
            | SegmentIoError::NoHeader { .. }
            | SegmentIoError::Quorum { .. } => K::Unavailable,
        }
    }
}

/// Timing of the traffic with peers.
#[derive(Clone, Debug)]
pub struct Timing {
    /// After a write quorum is stored, wait at least this long for the rest.
    pub put_grace: Duration,
    /// A shard put slower than this goes to a spare peer.
    pub put_deadline: Duration,
    /// A block read slower than this also starts the decode from other shards.
    pub hedge: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            put_grace: Duration::from_millis(300),
            put_deadline: Duration::from_secs(2),
            hedge: Duration::from_millis(50),
        }
    }
}

/// Most segment headers kept (each a few hundred bytes).
const HEADERS_KEPT: usize = 16 << 10;

/// The volume's segment traffic. Cheap to clone.
#[derive(Clone)]
pub struct SegmentIo {
    client: Client,
    timing: Timing,
    headers: Arc<Mutex<HashMap<SegmentId, Arc<SegmentShardHeader>>>>,
    /// Segments a holder failed to answer for, and when their record was
    /// last read again: repair may have moved the shard (see
    /// [`SegmentIo::take_suspect`]).
    suspects: Arc<Mutex<HashMap<SegmentId, Suspect>>>,
    /// Peers a call could not reach, by name, and when: reads go around
    /// them for [`AVOID_FOR`] instead of waiting a hedge on each.
    unreachable: Arc<Mutex<HashMap<String, Instant>>>,
    /// Shards (and holders) whose answers did not verify, already reported
    /// to the directory.
    reported: Arc<Mutex<std::collections::HashSet<(SegmentShardKey, String)>>>,
}

/// How long a peer that could not be reached is read around.
const AVOID_FOR: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Default)]
struct Suspect {
    failed: bool,
    refreshed: Option<Instant>,
}

/// A segment's record is read again at most this often because of
/// failures (a holder that is only slow must not cost a directory call
/// per read).
const REFRESH_EVERY: Duration = Duration::from_secs(2);

impl SegmentIo {
    pub fn new(client: Client, timing: Timing) -> Self {
        Self {
            client,
            timing,
            headers: Default::default(),
            suspects: Default::default(),
            unreachable: Default::default(),
            reported: Default::default(),
        }
    }

    /// Names in the log a holder whose answer did not verify (or who said
    /// its own copy is corrupt), even when the read then succeeds from the
    /// other shards: a peer serving stale or altered shards must not go
    /// unnoticed just because the erasure code hides it. An answer that
    /// failed the reader's own check is reported to the directory (once),
    /// which audits that shard on that peer; a peer that found its copy
    /// corrupt reports it itself.
    fn note_untrusted(&self, e: &ClientError) {
        if e.kind() != Some(ErrorKind::Corrupt) {
            return;
        }
        tracing::warn!("{e}; not trusted, trying the other shards");
        let ClientError::BadShard { peer, key, .. } = e else { return };
        {
            let mut r = self.reported.lock().expect("reported");
            if r.len() >= HEADERS_KEPT {
                r.clear();
            }
            if !r.insert((*key, peer.clone())) {
                return;
            }
        }
        let (client, key, peer) = (self.client.clone(), *key, peer.clone());
        tokio::spawn(async move {
            if let Err(e) = client.suspect_shard(key, &peer).await {
                tracing::info!("reporting shard {} of segment {} on {peer}: {e}", key.index, key.segment);
            }
        });
    }

    /// Notes a failed call to `peer` (only a failure to reach it counts).
    fn note_failure(&self, peer: &PeerAddr, e: &ClientError) {
        if matches!(e, ClientError::PeerUnreachable { .. }) {
            self.unreachable.lock().expect("unreachable").insert(peer.name.clone(), Instant::now());
        }
    }

    /// Whether `peer` could not be reached a moment ago.
    fn avoided(&self, peer: &PeerAddr) -> bool {
        let mut u = self.unreachable.lock().expect("unreachable");
        match u.get(&peer.name) {
            Some(t) if t.elapsed() < AVOID_FOR => true,
            Some(_) => {
                u.remove(&peer.name);
                false
            }
            None => false,
        }
    }

    /// Notes that a holder of `segment` failed or was slow.
    fn suspect(&self, segment: SegmentId) {
        let mut s = self.suspects.lock().expect("suspects");
        if s.len() >= HEADERS_KEPT {
            s.clear();
        }
        s.entry(segment).or_default().failed = true;
    }

    /// Whether `segment`'s record should be read again: a holder failed
    /// since it was last read, at most once per [`REFRESH_EVERY`]. (Repair
    /// records rebuilt shards on new holders; the reader learns of them
    /// here.)
    pub fn take_suspect(&self, segment: SegmentId) -> bool {
        let mut s = self.suspects.lock().expect("suspects");
        let Some(e) = s.get_mut(&segment) else { return false };
        if !e.failed || e.refreshed.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
            return false;
        }
        *e = Suspect { failed: false, refreshed: Some(Instant::now()) };
        true
    }

    /// Shard `index` of `seg`, under the volume it is stored under.
    fn key(seg: &Located, index: usize) -> SegmentShardKey {
        SegmentShardKey { volume: seg.volume, segment: seg.id, index: index as u8 }
    }

    /// Stores `encoded`'s shards, shard `i` on `peers[i]`, for a writer
    /// holding `epoch` (shards past the end of `peers`, placed while peers
    /// were down, go to a spare if there is one, else nowhere). Returns who holds each shard once a write quorum
    /// (k + 1) is stored and the rest had their grace; a shard that failed
    /// or was slow goes to one of `spares` once. A fenced writer's put fails
    /// at once.
    pub async fn put(
        &self,
        segment: SegmentId,
        k: usize,
        encoded: EncodedSegment,
        peers: &[Holder],
        mut spares: Vec<Holder>,
        epoch: u64,
    ) -> Result<Vec<Option<Holder>>, SegmentIoError> {
        let n = encoded.shards.len();
        assert!(peers.len() <= n, "at most one peer per shard");
        let quorum = (k + 1).min(n);
        // Moved, not copied: each put holds a reference to its shard.
        let shards: Vec<Bytes> = encoded.shards.into_iter().map(Bytes::from).collect();
        let mut puts = tokio::task::JoinSet::new();
        let spawn = |puts: &mut tokio::task::JoinSet<_>, i: usize, peer: Holder| {
            let (client, shard) = (self.client.clone(), shards[i].clone());
            puts.spawn(async move {
                let r = client.put_shard(&peer.1, shard, epoch).await;
                (i, peer, r)
            });
        };
        for (i, p) in peers.iter().enumerate() {
            spawn(&mut puts, i, p.clone());
        }
        spares.retain(|s| !peers.iter().any(|p| p.0 == s.0));
        let mut replaced = vec![false; n];
        for (i, replaced) in replaced.iter_mut().enumerate().skip(peers.len()) {
            *replaced = true;
            if let Some(s) = spares.pop() {
                spawn(&mut puts, i, s);
            }
        }
        let started = Instant::now();
        let mut holders: Vec<Option<Holder>> = vec![None; n];
        let mut failures = Vec::new();
        let mut count = 0;
        let mut turn = tokio::time::Instant::now() + self.timing.put_deadline;
        let mut last_turn = false;
        while count < n {
            let next = match tokio::time::timeout_at(turn, puts.join_next()).await {
                Ok(Some(Ok(j))) => j,
                Ok(Some(Err(_))) => continue,
                Ok(None) => break,
                Err(_) if last_turn => break,
                Err(_) => {
                    // Slow shards also go to a spare; whichever stores first
                    // holds it (the holder recorded is the peer that said
                    // stored, never assumed).
                    for i in 0..n {
                        if holders[i].is_none() && !replaced[i] {
                            replaced[i] = true;
                            if let Some(s) = spares.pop() {
                                tracing::info!(
                                    "segment {segment} shard {i}: {} is slow; also sending it to {}",
                                    peers[i].1.name,
                                    s.1.name
                                );
                                spawn(&mut puts, i, s);
                            }
                        }
                    }
                    turn = tokio::time::Instant::now() + self.timing.put_deadline;
                    last_turn = true;
                    continue;
                }
            };
            match next {
                (i, peer, Ok(())) => {
                    if holders[i].is_some() {
                        // Stored twice (a slow put and its spare): the
                        // extra copy is an orphan for the collector.
                        continue;
                    }
                    holders[i] = Some(peer);
                    count += 1;
                    if count == quorum && !last_turn {
                        let wait = started.elapsed().max(self.timing.put_grace);
                        turn = turn.min(tokio::time::Instant::now() + wait);
                    }
                }
                (_, _, Err(e)) if e.kind() == Some(ErrorKind::Fenced) => {
                    puts.abort_all();
                    return Err(SegmentIoError::Fenced { segment, source: e });
                }
                (i, peer, Err(e)) => {
                    tracing::info!("segment {segment} shard {i}: {}: {e}", peer.1.name);
                    failures.push(e);
                    if holders[i].is_none() && !replaced[i] {
                        replaced[i] = true;
                        if let Some(s) = spares.pop() {
                            spawn(&mut puts, i, s);
                        }
                    }
                }
            }
        }
        puts.abort_all();
        if count < quorum {
            return Err(SegmentIoError::Quorum { segment, stored: count, quorum, failures });
        }
        if count < n {
            tracing::info!("segment {segment} stored with {count} of {n} shards");
        }
        Ok(holders)
    }

    /// The segment's header (geometry and every shard root), verified
    /// against its root; fetched once and kept. Any shard's header does:
    /// the holders are asked one after another, a hedge apart, and the
    /// first verified answer is used, so a dead or slow holder costs a
    /// hedge, not its timeout.
    pub async fn header(&self, seg: &Located) -> Result<Arc<SegmentShardHeader>, SegmentIoError> {
        if let Some(h) = self.headers.lock().expect("headers").get(&seg.id) {
            return Ok(h.clone());
        }
        let mut asks = tokio::task::JoinSet::new();
        // Peers that could not be reached a moment ago are asked last.
        let mut order: Vec<(usize, PeerAddr)> =
            seg.holders.iter().enumerate().filter_map(|(i, p)| Some((i, p.clone()?))).collect();
        order.sort_by_key(|(_, p)| self.avoided(p));
        for (n, (i, peer)) in order.into_iter().enumerate() {
            let (client, key, root) = (self.client.clone(), Self::key(seg, i), seg.root);
            let after = self.timing.hedge * n as u32;
            asks.spawn(async move {
                tokio::time::sleep(after).await;
                let r = client.get_shard_header(&peer, key, &root).await;
                (peer, r)
            });
        }
        let mut failures = Vec::new();
        while let Some(j) = asks.join_next().await {
            match j {
                Ok((_, Ok(h))) => {
                    asks.abort_all();
                    let h = Arc::new(h);
                    let mut headers = self.headers.lock().expect("headers");
                    if headers.len() >= HEADERS_KEPT {
                        headers.clear();
                    }
                    headers.insert(seg.id, h.clone());
                    return Ok(h);
                }
                Ok((peer, Err(e))) => {
                    self.note_untrusted(&e);
                    self.note_failure(&peer, &e);
                    self.suspect(seg.id);
                    failures.push(e);
                }
                Err(_) => {}
            }
        }
        Err(SegmentIoError::NoHeader { segment: seg.id, failures })
    }

    /// Data-area slots `first..end` of a segment (ciphertext as stored),
    /// proven against the segment root: from the data shards holding them,
    /// or decoded from k others when one fails or is slow.
    pub async fn read(&self, seg: &Located, first: u32, end: u32) -> Result<Vec<u8>, SegmentIoError> {
        let header = self.header(seg).await?;
        let g = header.geometry;
        if end <= first || u64::from(end) > g.data_blocks() {
            return Err(SegmentIoError::Unreadable {
                segment: seg.id,
                first,
                end,
                why: format!("the segment has {} data blocks", g.data_blocks()),
            });
        }
        let bps = g.blocks_per_shard();
        let mut out = Vec::with_capacity((end - first) as usize * BLOCK_SIZE);
        let mut at = first;
        while at < end {
            let shard = (at / bps) as usize;
            let shard_end = ((shard as u32 + 1) * bps).min(end);
            let (from, count) = (at % bps, shard_end - at);
            let blocks = self.shard_blocks(seg, &header, shard, from, count).await?;
            if at == first && shard_end == end {
                // All from one shard: its blocks as they came.
                return Ok(blocks);
            }
            out.extend_from_slice(&blocks);
            at = shard_end;
        }
        Ok(out)
    }

    /// Blocks `from..from + count` of data shard `shard`: asked of its
    /// holder; when that fails, or takes longer than the hedge, the shard is
    /// also rebuilt from the others, and whichever proves first is used.
    async fn shard_blocks(
        &self,
        seg: &Located,
        header: &SegmentShardHeader,
        shard: usize,
        from: u32,
        count: u32,
    ) -> Result<Vec<u8>, SegmentIoError> {
        let bps = header.geometry.blocks_per_shard();
        let root = header.roots[shard];
        let direct = async {
            let Some(peer) = &seg.holders[shard] else {
                return Err(format!("shard {shard} has no holder"));
            };
            if self.avoided(peer) {
                return Err(format!("{} could not be reached a moment ago", peer.name));
            }
            self.client.get_blocks(peer, Self::key(seg, shard), &root, bps, from, count).await.map_err(|e| {
                self.note_untrusted(&e);
                self.note_failure(peer, &e);
                e.to_string()
            })
        };
        tokio::pin!(direct);
        let first_try = tokio::time::timeout(self.timing.hedge, &mut direct).await;
        let why = match first_try {
            Ok(Ok(blocks)) => return Ok(blocks),
            Ok(Err(why)) => Some(why),
            Err(_) => None,
        };
        self.suspect(seg.id);
        let decode = self.decoded(seg, header, shard, from, count);
        let unreadable =
            |why: String| SegmentIoError::Unreadable { segment: seg.id, first: from, end: from + count, why };
        match why {
            Some(why) => decode.await.map_err(|e| unreadable(format!("{why}; decoding: {e}"))),
            None => {
                tokio::pin!(decode);
                tokio::select! {
                    r = &mut direct => match r {
                        Ok(blocks) => Ok(blocks),
                        Err(why) => decode.await.map_err(|e| unreadable(format!("{why}; decoding: {e}"))),
                    },
                    r = &mut decode => match r {
                        Ok(blocks) => Ok(blocks),
                        Err(e) => direct.await.map_err(|why| unreadable(format!("{why}; decoding: {e}"))),
                    },
                }
            }
        }
    }

    /// Rebuilds blocks `from..from + count` of data shard `shard` from the
    /// same blocks of k other shards, each proven against its shard root
    /// (Reed-Solomon works column by column: a degraded 4 KiB read moves
    /// k × 4 KiB, not k whole shards).
    async fn decoded(
        &self,
        seg: &Located,
        header: &SegmentShardHeader,
        shard: usize,
        from: u32,
        count: u32,
    ) -> Result<Vec<u8>, String> {
        // A block read's proof must fit one call: long ranges go in pieces.
        const PIECE: u32 = 1024;
        let mut out = Vec::with_capacity(count as usize * BLOCK_SIZE);
        let mut at = from;
        while at < from + count {
            let n = PIECE.min(from + count - at);
            out.extend(self.decoded_piece(seg, header, shard, at, n).await?);
            at += n;
        }
        Ok(out)
    }

    async fn decoded_piece(
        &self,
        seg: &Located,
        header: &SegmentShardHeader,
        shard: usize,
        from: u32,
        count: u32,
    ) -> Result<Vec<u8>, String> {
        let g = header.geometry;
        let bps = g.blocks_per_shard();
        let mut fetches = tokio::task::JoinSet::new();
        // Peers that could not be reached a moment ago only if the others
        // are too few.
        let others: Vec<(usize, PeerAddr)> = seg
            .holders
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != shard)
            .filter_map(|(i, p)| Some((i, p.clone()?)))
            .collect();
        let reachable = others.iter().filter(|(_, p)| !self.avoided(p)).count();
        let mut skipped = Vec::new();
        let spawn = |fetches: &mut tokio::task::JoinSet<_>, i: usize, peer: PeerAddr| {
            let (client, key, root) = (self.client.clone(), Self::key(seg, i), header.roots[i]);
            fetches.spawn(async move {
                let r = client.get_blocks(&peer, key, &root, bps, from, count).await;
                (i, peer, r)
            });
        };
        for (i, peer) in others {
            if reachable >= g.k() && self.avoided(&peer) {
                skipped.push((i, peer));
            } else {
                spawn(&mut fetches, i, peer);
            }
        }
        let mut got: Vec<Option<Vec<u8>>> = vec![None; g.shards()];
        let mut have = 0;
        let mut failures = Vec::new();
        loop {
            let Some(j) = fetches.join_next().await else {
                // The others failed: try those read around after all.
                if have < g.k() && !skipped.is_empty() {
                    for (i, peer) in skipped.drain(..) {
                        spawn(&mut fetches, i, peer);
                    }
                    continue;
                }
                break;
            };
            let Ok((i, peer, r)) = j else { continue };
            match r {
                Ok(b) => {
                    got[i] = Some(b);
                    have += 1;
                    if have == g.k() {
                        break;
                    }
                }
                Err(e) => {
                    self.note_untrusted(&e);
                    self.note_failure(&peer, &e);
                    self.suspect(seg.id);
                    failures.push(e);
                }
            }
        }
        fetches.abort_all();
        if have < g.k() {
            return Err(format!(
                "only {have} of the {} shards needed could be read ({})",
                g.k(),
                list(&failures)
            ));
        }
        let len = count as usize * BLOCK_SIZE;
        tokio::task::spawn_blocking(move || {
            let geometry = Geometry::new(g.k(), g.m(), len).map_err(|e| e.to_string())?;
            let mut out = None;
            Erasure::new(geometry)
                .reconstruct_columns(&got, len, |i, bytes| {
                    if i == shard {
                        out = Some(bytes.to_vec());
                    }
                })
                .map_err(|e| e.to_string())?;
            out.ok_or_else(|| "the decode did not give the blocks back".to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}
