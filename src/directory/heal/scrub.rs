//! The directory's side of the peers' scrub (`peer/scrub.rs`): the
//! segment roots a scrubbing peer checks its shards' headers against, the
//! cluster-wide directive of `meshdisk scrub pause|resume|start` (key
//! `config/scrub`, handed to every peer in its heartbeat answer), and the
//! peers' progress added up for `meshdisk status`. What a scrub finds
//! comes back as shard faults ([`super::faults`]).

use serde::{Deserialize, Serialize};

use crate::api::*;
use crate::codec::segment::SegmentShardKey;
use crate::directory::Directory;
use crate::directory::meta::{Compare, MetaStore, Op, Txn};
use crate::directory::schema::*;

/// The most shards one `SegmentRoots` call may name.
pub const MAX_ROOTS_PER_CALL: usize = 1024;

/// Tries at changing the directive while others change it.
const TRIES: usize = 8;

/// Where the directive is kept.
const SCRUB_KEY: &[u8] = b"config/scrub";

/// The directive as stored (times on the directory's clock).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ScrubConfig {
    /// Paused until then (`u64::MAX`: until resumed).
    paused_until_ms: Option<u64>,
    /// When a pass was last asked for.
    start_requested_ms: Option<u64>,
}

impl<S: MetaStore> Directory<S> {
    /// The segment roots of `shards`' segments, in order (`None`: no live
    /// record).
    pub(in crate::directory) async fn segment_roots(
        &self,
        shards: &[SegmentShardKey],
    ) -> Result<DirResponse, Remote> {
        if shards.len() > MAX_ROOTS_PER_CALL {
            return Err(Remote::new(
                ErrorKind::Invalid,
                format!("at most {MAX_ROOTS_PER_CALL} shards per call, {} asked for", shards.len()),
            ));
        }
        let mut out = Vec::with_capacity(shards.len());
        let mut last: Option<(SegmentOf, Option<[u8; 32]>)> = None;
        for s in shards {
            // A page of shards is in key order: shards of one segment are
            // neighbours, so one lookup serves them all.
            let id = (s.volume, s.segment.raw());
            if let Some((prev, root)) = &last
                && *prev == id
            {
                out.push(*root);
                continue;
            }
            let root = match self.meta.get(&segment_key(&s.volume, s.segment)).await? {
                Some(e) => Some(
                    SegmentRecord::decode(&e.value)
                        .map_err(|x| internal(format!("segment {}: {x}", s.segment)))?
                        .root,
                ),
                None => None,
            };
            last = Some((id, root));
            out.push(root);
        }
        Ok(DirResponse::Roots(out))
    }

    async fn scrub_config(&self) -> Result<ScrubConfig, Remote> {
        Ok(self.scrub_config_entry().await?.0)
    }

    /// The directive as stored, and its revision (`None`: never set). A
    /// value that does not decode is the default (warned about): a
    /// damaged directive must not fail every heartbeat and status, and
    /// the next `meshdisk scrub` command overwrites it.
    async fn scrub_config_entry(&self) -> Result<(ScrubConfig, Option<u64>), Remote> {
        let Some(entry) = self.meta.get(SCRUB_KEY).await? else { return Ok((ScrubConfig::default(), None)) };
        let config = dec::<ScrubConfig>("scrub", &entry.value).unwrap_or_else(|e| {
            tracing::warn!("{e}: taken as no directive (a `meshdisk scrub` command rewrites it)");
            ScrubConfig::default()
        });
        Ok((config, Some(entry.mod_revision)))
    }

    /// `meshdisk scrub pause|resume|start`: a compare-and-set, so two
    /// admins' commands at once both take effect (or one is told to retry).
    pub(in crate::directory) async fn scrub_command(&self, cmd: ScrubCommand) -> Result<DirResponse, Remote> {
        for _ in 0..TRIES {
            let now = self.now();
            let (mut c, revision) = self.scrub_config_entry().await?;
            match cmd {
                ScrubCommand::Pause { for_ms } => {
                    c.paused_until_ms = Some(for_ms.map_or(u64::MAX, |d| now.saturating_add(d)));
                }
                ScrubCommand::Resume => c.paused_until_ms = None,
                ScrubCommand::Start => {
                    c.paused_until_ms = None;
                    c.start_requested_ms = Some(now);
                }
            }
            let unchanged = match revision {
                Some(r) => Compare::ModRevision(SCRUB_KEY.to_vec(), r),
                None => Compare::Absent(SCRUB_KEY.to_vec()),
            };
            let put = Op::Put { key: SCRUB_KEY.to_vec(), value: enc(&c), lease: None };
            if self.meta.txn(Txn::new().when(unchanged).then(put)).await?.succeeded {
                tracing::info!("scrub directive now {c:?}");
                return Ok(DirResponse::Done);
            }
        }
        Err(Remote::new(ErrorKind::Conflict, "the scrub directive kept changing; try again"))
    }

    /// What a heartbeat answer tells the peer's scrub.
    pub(in crate::directory) async fn scrub_directive(&self) -> Result<ScrubDirective, Remote> {
        let c = self.scrub_config().await?;
        let now = self.now();
        let paused_for_ms =
            c.paused_until_ms.filter(|&u| u > now).map(|u| if u == u64::MAX { u } else { u - now });
        Ok(ScrubDirective { paused_for_ms, start_requested_ms: c.start_requested_ms })
    }

    /// The peers' scrubs added up; `peers` are the peers that are up.
    pub(in crate::directory) async fn scrub_summary(
        &self,
        peers: &[&ScrubReport],
    ) -> Result<ScrubSummary, Remote> {
        let c = self.scrub_config().await?;
        let now = self.now();
        Ok(summarize(peers, c.paused_until_ms.filter(|&u| u > now)))
    }
}

/// A segment: its volume id and raw segment id.
type SegmentOf = ([u8; crate::codec::key::VOLUME_ID_LEN], u64);

/// Adds up the peers' scrub reports.
fn summarize(peers: &[&ScrubReport], paused_until_ms: Option<u64>) -> ScrubSummary {
    let mut s = ScrubSummary { peers: peers.len() as u64, paused_until_ms, ..Default::default() };
    let mut all_checked = Some(u64::MAX);
    for r in peers {
        if r.pass_started_ms.is_some() {
            s.scrubbing += 1;
            s.checked += r.checked;
            s.total += r.total.max(r.checked);
        } else if let Some(next) = r.next_ms {
            s.next_ms = Some(s.next_ms.map_or(next, |n| n.min(next)));
        }
        s.rate += r.rate;
        s.found += r.found;
        s.unreported += r.unreported;
        all_checked = match (all_checked, r.last_ended_ms) {
            (Some(a), Some(e)) => Some(a.min(e)),
            _ => None,
        };
    }
    s.all_checked_ms = all_checked.filter(|&a| a != u64::MAX);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peers_scrubs_add_up() {
        let a = ScrubReport {
            pass_started_ms: Some(5),
            checked: 10,
            total: 40,
            rate: 3,
            last_ended_ms: Some(4),
            found: 2,
            ..Default::default()
        };
        let b = ScrubReport {
            next_ms: Some(900),
            total: 7,
            rate: 0,
            last_ended_ms: Some(2),
            unreported: 1,
            ..Default::default()
        };
        let c = ScrubReport { next_ms: Some(700), ..Default::default() };
        let s = summarize(&[&a, &b], None);
        assert_eq!((s.peers, s.scrubbing, s.checked, s.total, s.rate), (2, 1, 10, 40, 3));
        assert_eq!((s.next_ms, s.all_checked_ms, s.found, s.unreported), (Some(900), Some(2), 2, 1));
        // A peer that never finished a pass: not every shard has been checked.
        let s = summarize(&[&a, &b, &c], Some(77));
        assert_eq!((s.next_ms, s.all_checked_ms, s.paused_until_ms), (Some(700), None, Some(77)));
    }
}
