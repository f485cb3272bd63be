//! `SegmentHealth`: the health of a few segments of one volume, for its
//! attach's `meshdisk:health` map (`nbdinfo --map=meshdisk:health`).
//!
//! The records are found exactly as readers find them (`SegmentRecords`:
//! a clone's inherited segments under the ancestor that wrote them) and
//! assessed as `volume info` counts them: [`heal::health::assess`] against
//! the peers as they are now and the volume's own repair rules, so the map
//! and `meshdisk volume info` always agree.
//!
//! [`heal::health::assess`]: super::heal::health::assess

use super::Directory;
use super::heal::repair::rules;
use super::meta::MetaStore;
use crate::api::*;
use crate::codec::sequence::SegmentId;

impl<S: MetaStore> Directory<S> {
    pub(super) async fn segment_health(
        &self,
        volume: &str,
        ids: &[SegmentId],
    ) -> Result<DirResponse, Remote> {
        // Checks the count and finds the records (the same refusal and
        // the same lookup as `SegmentRecords`).
        let records = match self.segment_records(volume, ids).await? {
            DirResponse::SegmentRecords(r) => r,
            other => unreachable!("segment records answered {other:?}"),
        };
        let spec = self.volume(volume).await?.spec;
        let view = self.peer_view().await?;
        let rules = rules(&spec);
        let health = records.iter().map(|r| r.as_ref().map(|r| view.assess(r, rules).health)).collect();
        Ok(DirResponse::SegmentHealth(health))
    }
}
