//! The directory's keys and the records stored under them (the key schema
//! is in the module documentation of [`super`]), and their encoding: values
//! are postcard, numbers inside keys big-endian so keys sort in number
//! order, volume ids hex.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::Directory;
use super::meta::{MetaError, MetaStore};
use crate::api::*;
use crate::codec::sequence::SegmentId;
use crate::membership::ca::Role;

pub(super) fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("records always encode")
}

pub(super) fn dec<T: DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, Remote> {
    postcard::from_bytes(b).map_err(|e| internal(format!("corrupt {what} record: {e}")))
}

pub(super) fn internal(message: impl Into<String>) -> Remote {
    Remote::new(ErrorKind::Internal, message)
}

impl From<MetaError> for Remote {
    fn from(e: MetaError) -> Self {
        internal(format!("directory store: {e}"))
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct NodeRecord {
    pub(super) role: Role,
    pub(super) joined_ms: u64,
}

#[derive(Serialize, Deserialize, Clone)]
pub(super) struct PeerRecord {
    pub(super) report: PeerReport,
    pub(super) last_seen_ms: u64,
}

/// `drain/<name>`: the peer is leaving.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(super) struct DrainRecord {
    pub(super) reason: DrainReason,
    pub(super) since_ms: u64,
}

/// `removed/<name>`: the peer was removed (when): its heartbeats are
/// refused.
#[derive(Serialize, Deserialize)]
pub(super) struct RemovedRecord {
    pub(super) at_ms: u64,
}

#[derive(Serialize, Deserialize)]
pub(super) struct HintRecord {
    pub(super) rtts: Vec<Rtt>,
    pub(super) at_ms: u64,
}

pub(super) fn key(prefix: &str, name: &str) -> Vec<u8> {
    format!("{prefix}/{name}").into_bytes()
}

/// `ids/<volume id>`: the name of the volume with this id.
pub(super) fn id_key(volume: &[u8; VOLUME_ID_LEN]) -> Vec<u8> {
    key("ids", &hex::encode(volume))
}

/// `gc/<volume id>`: a deleted volume whose shards are still to erase.
pub(super) fn gc_key(volume: &[u8; VOLUME_ID_LEN]) -> Vec<u8> {
    key("gc", &hex::encode(volume))
}

/// `roots/<volume id>`: the volume's committed root ([`RootState`]).
pub(super) fn root_key(volume: &[u8; VOLUME_ID_LEN]) -> Vec<u8> {
    key("roots", &hex::encode(volume))
}

/// `segs/<volume id>/`: the volume's live segment records.
pub(super) fn segment_prefix(volume: &[u8; VOLUME_ID_LEN]) -> Vec<u8> {
    format!("segs/{}/", hex::encode(volume)).into_bytes()
}

/// `segs/<volume id>/<segment id be64>` → [`SegmentRecord::encode`].
pub(super) fn segment_key(volume: &[u8; VOLUME_ID_LEN], segment: SegmentId) -> Vec<u8> {
    let mut k = segment_prefix(volume);
    k.extend_from_slice(&segment.raw().to_be_bytes());
    k
}

/// The segment id of a key under `prefix` ([`segment_prefix`]).
pub(super) fn parse_segment_key(prefix: &[u8], k: &[u8]) -> Option<SegmentId> {
    Some(SegmentId::from_raw(u64::from_be_bytes(k.strip_prefix(prefix)?.try_into().ok()?)))
}

/// The volume id and segment id of any `segs/` key.
pub(super) fn parse_any_segment_key(k: &[u8]) -> Option<([u8; VOLUME_ID_LEN], SegmentId)> {
    let rest = k.strip_prefix(b"segs/")?;
    let hex_len = 2 * VOLUME_ID_LEN;
    let volume = hex::decode(rest.get(..hex_len)?).ok()?.try_into().ok()?;
    let segment = parse_segment_key(b"/", rest.get(hex_len..)?)?;
    Some((volume, segment))
}

/// `dead/<volume id>/`: the volume's dropped segments awaiting erasure.
pub(super) fn dead_prefix(volume: &[u8; VOLUME_ID_LEN]) -> Vec<u8> {
    format!("dead/{}/", hex::encode(volume)).into_bytes()
}

/// `dead/<volume id>/<segment id be64>` → [`DeadSegment`].
pub(super) fn dead_key(volume: &[u8; VOLUME_ID_LEN], segment: SegmentId) -> Vec<u8> {
    let mut k = dead_prefix(volume);
    k.extend_from_slice(&segment.raw().to_be_bytes());
    k
}

/// The volume id and segment id of a `dead/` key.
pub(super) fn parse_dead_key(k: &[u8]) -> Option<([u8; VOLUME_ID_LEN], SegmentId)> {
    let rest = k.strip_prefix(b"dead/")?;
    let hex_len = 2 * VOLUME_ID_LEN;
    let volume = hex::decode(rest.get(..hex_len)?).ok()?.try_into().ok()?;
    let segment = parse_segment_key(b"/", rest.get(hex_len..)?)?;
    Some((volume, segment))
}

/// `segfloor/<volume id>` → a segment id (u64 big-endian): no new segment
/// record at or below it (the collector erased orphans up to it).
pub(super) fn floor_key(volume: &[u8; VOLUME_ID_LEN]) -> Vec<u8> {
    key("segfloor", &hex::encode(volume))
}

/// A segment no root reaches any more, waiting out the collection grace
/// before its shards are erased: when it was dropped (the directory's
/// clock) and the record it had (who holds which shard).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub(super) struct DeadSegment {
    pub(super) dropped_ms: u64,
    pub(super) record: SegmentRecord,
}

/// `snaps/<volume id>/`: the volume's snapshots.
pub(super) fn snapshot_prefix(volume: &[u8; VOLUME_ID_LEN]) -> Vec<u8> {
    format!("snaps/{}/", hex::encode(volume)).into_bytes()
}

/// `snaps/<volume id>/<name>` → [`SnapshotRecord`].
pub(super) fn snapshot_key(volume: &[u8; VOLUME_ID_LEN], name: &str) -> Vec<u8> {
    let mut k = snapshot_prefix(volume);
    k.extend_from_slice(name.as_bytes());
    k
}

/// `snapset/<volume id>` → [`SnapshotSet`]: the volume's snapshots in
/// brief, what every drop of the volume's records reads and compares.
pub(super) fn snapset_key(volume: &[u8; VOLUME_ID_LEN]) -> Vec<u8> {
    key("snapset", &hex::encode(volume))
}

/// `kept/<volume id>/`: the volume's segments its head dropped that a
/// snapshot still pins.
pub(super) fn kept_prefix(volume: &[u8; VOLUME_ID_LEN]) -> Vec<u8> {
    format!("kept/{}/", hex::encode(volume)).into_bytes()
}

/// `kept/<volume id>/<segment id be64>` → [`KeptSegment`].
pub(super) fn kept_key(volume: &[u8; VOLUME_ID_LEN], segment: SegmentId) -> Vec<u8> {
    let mut k = kept_prefix(volume);
    k.extend_from_slice(&segment.raw().to_be_bytes());
    k
}

/// A snapshot: the root it keeps, copied from the volume's root when it
/// was taken, and that root's highest segment and sequence (parsed once,
/// without the key).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub(super) struct SnapshotRecord {
    pub(super) name: String,
    pub(super) created_ms: u64,
    pub(super) root: RootState,
    pub(super) highest_segment: u64,
    pub(super) highest_sequence: u64,
}

/// One snapshot as drops see it: a record `S` of its volume is pinned by
/// it when `S ≤ highest_segment` and the head dropped `S` at a commit
/// above `commit` (see `snapshots.rs`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub(super) struct SnapshotPin {
    pub(super) name: String,
    pub(super) commit: u64,
    pub(super) highest_segment: u64,
}

impl SnapshotPin {
    /// Whether this snapshot reaches `segment` if the head dropped it at
    /// commit `dropped_at`.
    pub(super) fn pins(&self, segment: SegmentId, dropped_at: u64) -> bool {
        segment.raw() <= self.highest_segment && self.commit < dropped_at
    }
}

/// `snapset/<volume id>`: every snapshot of the volume, oldest first.
/// Absent when it has none.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct SnapshotSet {
    pub(super) snapshots: Vec<SnapshotPin>,
}

/// A segment the volume's head dropped while a snapshot pinned it: its
/// record stays in `segs/` (snapshot reads need it); this says the head
/// no longer reaches it, since which commit of the head (`dropped_at`:
/// the commit number of the first root that did not reach it) and when.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct KeptSegment {
    pub(super) dropped_at: u64,
    pub(super) dropped_ms: u64,
}

/// `peerid/<name>` → the peer's small id (u16 big-endian).
pub(super) fn peer_id_key(name: &str) -> Vec<u8> {
    key("peerid", name)
}

pub(super) const PEER_SLOT_PREFIX: &[u8] = b"peerslot/";

/// `peerslot/<id be16>` → the name of the peer with that small id. Never
/// deleted, so an id is never given twice.
pub(super) fn peer_slot_key(id: u16) -> Vec<u8> {
    let mut k = PEER_SLOT_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The id of a `peerslot/` key.
pub(super) fn parse_peer_slot_key(k: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(k.strip_prefix(PEER_SLOT_PREFIX)?.try_into().ok()?))
}

impl<S: MetaStore> Directory<S> {
    pub(super) async fn get<T: DeserializeOwned>(
        &self,
        what: &str,
        k: &[u8],
    ) -> Result<Option<(T, u64)>, Remote> {
        match self.meta.get(k).await? {
            Some(e) => Ok(Some((dec(what, &e.value)?, e.mod_revision))),
            None => Ok(None),
        }
    }

    pub(super) async fn list<T: DeserializeOwned>(
        &self,
        what: &str,
        prefix: &[u8],
    ) -> Result<Vec<T>, Remote> {
        self.meta.list(prefix).await?.iter().map(|e| dec(what, &e.value)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back_and_strangers_do_not() {
        let id = [0xa5; VOLUME_ID_LEN];
        assert_eq!(id_key(&id), format!("ids/{}", "a5".repeat(VOLUME_ID_LEN)).into_bytes());
        assert_eq!(parse_peer_slot_key(&peer_slot_key(0x1234)), Some(0x1234));
        assert_eq!(parse_peer_slot_key(b"peerslot/\x01"), None);
        let seg = SegmentId::new(2, 9).unwrap();
        assert!(segment_key(&id, seg).starts_with(&segment_prefix(&id)));
        assert_eq!(parse_segment_key(&segment_prefix(&id), &segment_key(&id, seg)), Some(seg));
        assert_eq!(parse_segment_key(&segment_prefix(&id), b"segs/00/short"), None);
        assert!(segment_key(&id, seg) < segment_key(&id, SegmentId::new(3, 1).unwrap()), "keys sort by id");
        assert_eq!(parse_segment_key(&dead_prefix(&id), &dead_key(&id, seg)), Some(seg));
        assert_eq!(parse_dead_key(&dead_key(&id, seg)), Some((id, seg)));
        assert_eq!(parse_dead_key(b"dead/a5a5/12345678"), None);
        assert_eq!(floor_key(&id), format!("segfloor/{}", "a5".repeat(VOLUME_ID_LEN)).into_bytes());
        assert_eq!(parse_segment_key(&kept_prefix(&id), &kept_key(&id, seg)), Some(seg));
        assert!(kept_key(&id, seg).starts_with(format!("kept/{}/", "a5".repeat(VOLUME_ID_LEN)).as_bytes()));
        assert_eq!(
            snapshot_key(&id, "monday"),
            format!("snaps/{}/monday", "a5".repeat(VOLUME_ID_LEN)).into_bytes()
        );
        assert!(snapshot_key(&id, "monday").starts_with(&snapshot_prefix(&id)));
        assert_eq!(snapset_key(&id), format!("snapset/{}", "a5".repeat(VOLUME_ID_LEN)).into_bytes());
        // A snapshot pins what it reached: at or below its highest
        // segment, dropped after its commit.
        let pin = SnapshotPin { name: "s".into(), commit: 5, highest_segment: seg.raw() };
        assert!(pin.pins(seg, 6));
        assert!(!pin.pins(seg, 5), "dropped by commit 5 or before: not in the snapshot");
        assert!(!pin.pins(SegmentId::from_raw(seg.raw() + 1), 9), "newer than the snapshot");
    }
}
