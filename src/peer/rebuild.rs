//! Rebuilding a shard here, for the directory's repair.
//!
//! The directory decides what to repair and where; the peer that will
//! store the rebuilt shard does the work, so the shards needed travel
//! once, straight from their holders to here, and the directory never
//! handles data (docs/ARCHITECTURE.md, "Repair"):
//!
//! ```text
//! directory ──Rebuild{shard i, root, epoch, sources}──► new holder
//!     new holder ◄── k shards (each verified against the root) ── holders
//!     rebuild shard i (checked against its root in the header)
//!     store it at the volume's epoch ──► Rebuilt{bytes read}
//! ```
//!
//! When a source already holds shard i (a shard being moved off a crowded
//! peer or domain), that one shard is copied instead. Only the directory
//! may ask: a peer stores what another member sends only through it.

use bytes::Bytes;

use super::store::ShardStore;
use crate::api::{ErrorKind, Remote, ShardSource};
use crate::client::Client;
use crate::codec::segment::{SegmentRoot, SegmentShardKey, rebuild};

type Asks = tokio::task::JoinSet<(u8, Result<Bytes, crate::client::ClientError>)>;

/// Starts fetching the shard `source` holds.
fn ask(asks: &mut Asks, client: &Client, key: SegmentShardKey, root: SegmentRoot, source: &ShardSource) {
    let (client, peer, index) = (client.clone(), source.peer.clone(), source.index);
    let key = SegmentShardKey { index, ..key };
    asks.spawn(async move { (index, client.get_shard(&peer, key, &root).await) });
}

/// Makes shard `key` from `sources` and stores it at `epoch`; returns the
/// bytes read from the sources.
pub async fn rebuild_here(
    client: &Client,
    store: &ShardStore,
    key: SegmentShardKey,
    root: SegmentRoot,
    epoch: u64,
    need: usize,
    sources: Vec<ShardSource>,
) -> Result<u64, Remote> {
    let failed = |why: String| {
        Remote::new(
            ErrorKind::Unavailable,
            format!("rebuilding shard {} of segment {}: {why}", key.index, key.segment),
        )
    };
    // A copy of the very shard, if a source has it.
    let mut failures = Vec::new();
    for s in sources.iter().filter(|s| s.index == key.index) {
        match client.get_shard(&s.peer, key, &root).await {
            Ok(shard) => {
                let read = shard.len() as u64;
                store.put(shard, epoch).await.map_err(super::remote)?;
                return Ok(read);
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    // Else k others, fetched in parallel; each failure asks the next source.
    let others: Vec<ShardSource> = sources.into_iter().filter(|s| s.index != key.index).collect();
    let mut next = 0;
    let mut asks: Asks = tokio::task::JoinSet::new();
    while next < others.len().min(need) {
        ask(&mut asks, client, key, root, &others[next]);
        next += 1;
    }
    let mut got: Vec<(u8, Bytes)> = Vec::with_capacity(need);
    while let Some(done) = asks.join_next().await {
        let Ok((index, answer)) = done else { continue };
        match answer {
            Ok(shard) => {
                got.push((index, shard));
                if got.len() == need {
                    break;
                }
            }
            Err(e) => {
                failures.push(e.to_string());
                if next < others.len() {
                    ask(&mut asks, client, key, root, &others[next]);
                    next += 1;
                }
            }
        }
    }
    asks.abort_all();
    if got.len() < need {
        return Err(failed(format!(
            "only {} of the {need} shards needed could be read ({})",
            got.len(),
            failures.join("; ")
        )));
    }
    let read: u64 = got.iter().map(|(_, b)| b.len() as u64).sum();
    let wanted = usize::from(key.index);
    let shard = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let n = got
            .iter()
            .find_map(|(_, b)| crate::codec::segment::parse_segment_shard(b).ok())
            .map(|(h, _)| h.geometry.shards())
            .ok_or("no shard header parses")?;
        if wanted >= n {
            return Err(format!("the segment has {n} shards, not {}", wanted + 1));
        }
        let mut given: Vec<Option<&[u8]>> = vec![None; n];
        for (i, b) in &got {
            if let Some(slot) = given.get_mut(usize::from(*i)) {
                *slot = Some(b);
            }
        }
        let rebuilt = rebuild(&root, &given).map_err(|e| e.to_string())?;
        rebuilt
            .shards
            .into_iter()
            .find(|(i, _)| *i == wanted)
            .map(|(_, s)| s)
            .ok_or_else(|| "the rebuild did not give the shard".to_string())
    })
    .await
    .map_err(|e| failed(e.to_string()))?
    .map_err(failed)?;
    store.put(Bytes::from(shard), epoch).await.map_err(super::remote)?;
    Ok(read)
}
