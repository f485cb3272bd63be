//! The cluster's messages: what a node asks the directory or a peer, and the
//! answers. Framed by [`crate::transport::wire`] (versioned, size-limited) and
//! carried by [`crate::transport::rpc`]; shard bytes travel beside them, never
//! inside.
//!
//! Every answer can be an [`Remote`] error: a kind for programs and a
//! message for people that says what to do.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::codec::segment::SegmentShardKey;
use crate::codec::sequence::SegmentId;
use crate::membership::ca::Role;

/// Length of a volume id.
pub const VOLUME_ID_LEN: usize = crate::codec::key::VOLUME_ID_LEN;

/// What went wrong on the other side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Not allowed: no certificate, wrong role, bad token.
    Refused,
    NotFound,
    /// No space (a peer's store, or not enough peers with space).
    Full,
    /// An older fencing epoch than the peer has seen.
    Fenced,
    /// A stored shard failed its check.
    Corrupt,
    /// A shard sent for storing failed its check.
    BadShard,
    /// The peer's store hit an I/O error and serves nothing.
    Poisoned,
    /// Someone else changed it first (compare-and-set lost), or it exists.
    Conflict,
    /// Not enough peers are up.
    Unavailable,
    /// The request makes no sense (bad geometry, bad name, ...).
    Invalid,
    Internal,
}

/// An error reported by the other side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Remote {
    pub kind: ErrorKind,
    pub message: String,
}

impl Remote {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

/// A measured round-trip time to another node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rtt {
    pub node: String,
    pub micros: u32,
}

/// A peer and where to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddr {
    pub name: String,
    pub addr: SocketAddr,
}

/// What a peer tells the directory every heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReport {
    /// Where clients reach it.
    pub addr: SocketAddr,
    pub failure_domain: String,
    pub capacity: u64,
    pub used: u64,
    /// Calls in progress when the report was made.
    pub load: u32,
    /// Calls from clients per second since the previous report: how busy
    /// the peer is with foreground I/O (repair yields to it).
    #[serde(default)]
    pub client_ops: u32,
    /// Set when its store is poisoned or otherwise unusable.
    pub problem: Option<String>,
    /// Round trips to the other peers it talks to.
    pub rtts: Vec<Rtt>,
    /// How far its scrub is (`None`: not known yet).
    #[serde(default)]
    pub scrub: Option<ScrubReport>,
}

/// A peer's scrub (re-hashing every shard it holds, `peer/scrub.rs`), as
/// it reports it every heartbeat. Times are Unix ms on the peer's clock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubReport {
    /// When the running pass started; `None` between passes.
    pub pass_started_ms: Option<u64>,
    /// Bytes checked in the running pass, of `total` stored.
    pub checked: u64,
    pub total: u64,
    /// Bytes checked per second over the last report interval.
    pub rate: u64,
    /// Passes finished.
    pub passes: u64,
    pub last_ended_ms: Option<u64>,
    /// When the next pass starts.
    pub next_ms: Option<u64>,
    /// Bad shards found since the store was made (scrub and reads), and
    /// those not yet acknowledged by the directory.
    pub found: u64,
    pub unreported: u64,
    pub paused: bool,
}

/// What the directory tells every peer's scrub (`meshdisk scrub`), in
/// each heartbeat answer; kept under `config/scrub`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubDirective {
    /// Paused for this much longer (ms; `u64::MAX`: until resumed).
    pub paused_for_ms: Option<u64>,
    /// When a pass was last asked for (the directory's clock): a peer
    /// starts one when this changes.
    pub start_requested_ms: Option<u64>,
}

/// `meshdisk scrub pause|resume|start`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScrubCommand {
    /// Pause every peer's scrub, for this long (ms) or until resumed.
    Pause {
        for_ms: Option<u64>,
    },
    Resume,
    /// Start a pass now on every peer (and lift a pause).
    Start,
}

/// The peers' scrubs together, for `meshdisk status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubSummary {
    /// Peers that report a scrub, and those in a pass now.
    pub peers: u64,
    pub scrubbing: u64,
    /// Bytes checked in the running passes, of those peers' bytes stored.
    pub checked: u64,
    pub total: u64,
    /// Bytes checked per second, all peers.
    pub rate: u64,
    /// The soonest next pass of a peer between passes.
    pub next_ms: Option<u64>,
    /// The oldest end of a last finished pass (every peer has finished a
    /// pass since), if every peer has finished one.
    pub all_checked_ms: Option<u64>,
    pub found: u64,
    pub unreported: u64,
    /// Paused until (the directory's clock; `u64::MAX`: until resumed).
    pub paused_until_ms: Option<u64>,
}

/// What FLUSH waits for (see the README's volume section).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Committed on peers and in the directory's root.
    Remote,
    /// Synced in the attaching machine's local log only.
    Local,
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Remote => "remote",
            Durability::Local => "local",
        }
    }
}

/// A volume's fixed properties, chosen at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub name: String,
    pub id: [u8; VOLUME_ID_LEN],
    pub size: u64,
    pub k: u8,
    pub m: u8,
    pub shard_size: u32,
    /// Repair when a segment has fewer healthy shards than this.
    pub repair_threshold: u8,
    /// Proves a key is the volume's data key without revealing it.
    pub key_check: [u8; 32],
    /// The data key wrapped once per way of unlocking it (key files,
    /// passphrases): an encoded `codec::keyslot::KeySlots`, nothing secret.
    /// The one field that changes after creation, and only through
    /// [`DirRequest::SetKeySlots`].
    pub key_slots: Vec<u8>,
    pub durability: Durability,
    /// A clone's ancestors, nearest first (empty for a volume made by
    /// `volume create`): whose segments it reads below which id, and whose
    /// key decrypts which sequences (`codec::key::VolumeKey::for_lineage`).
    pub lineage: Vec<Ancestor>,
}

/// A volume a clone descends from, and the snapshot it was cloned at: the
/// clone reads this volume's segments with ids up to `highest_segment`
/// (its own are above), and blocks with sequences up to
/// `highest_sequence` were written under this volume's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ancestor {
    /// Names at the clone's making (for messages and `volume info`).
    pub volume: String,
    pub snapshot: String,
    pub id: [u8; VOLUME_ID_LEN],
    pub highest_segment: u64,
    pub highest_sequence: u64,
}

/// A snapshot as `volume snapshots` lists it: a kept root of its volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub created_ms: u64,
    /// The (epoch, commit) of the root it keeps.
    pub epoch: u64,
    pub commit: u64,
    /// The highest segment id that root reaches.
    pub highest_segment: u64,
    /// Bytes of shards of the segments it reaches (shared with the volume
    /// and other snapshots or not).
    pub reaches: u64,
    /// Bytes of shards only it keeps on the peers: what deleting it frees.
    pub exclusive: u64,
    /// Clones made from it (each keeps it until deleted).
    pub clones: Vec<String>,
}

/// A volume as the directory records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub spec: VolumeSpec,
    /// The fencing epoch of the newest writer's lease.
    pub epoch: u64,
    pub created_ms: u64,
}

/// A volume's write lease as granted: writes carry `epoch`; it lapses
/// unless renewed within `ttl_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeLease {
    pub holder: String,
    /// The holder's machine, as it told (for messages naming the holder).
    pub host: String,
    pub epoch: u64,
    pub since_ms: u64,
    pub ttl_ms: u64,
    /// This grant took the lease over, by force, from another holder whose
    /// lease had not lapsed: that holder may serve its view until it next
    /// fails to renew, so the new one waits a TTL before serving.
    pub took_over: bool,
}

/// A live segment's redundancy, from its record and its holders' states
/// (`directory::heal::health` decides). Worst last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SegmentHealth {
    /// k + m shards, each on its own peer that is up.
    Whole,
    /// Fewer (a holder down, two shards on one peer), but at least the
    /// repair threshold on peers that are not lost.
    Degraded,
    /// Fewer shards than the repair threshold on peers that are not lost:
    /// repair rebuilds the missing ones.
    BelowThreshold,
    /// One more lost peer from unreadable: k shards on peers that are up
    /// (k + 1 with m ≥ 3). Repaired at once.
    Critical,
    /// Fewer than k on peers that are up, at least k on peers not lost:
    /// unreadable until peers return.
    Unavailable,
    /// Fewer than k shards on peers that are not lost.
    Lost,
}

impl SegmentHealth {
    pub const ALL: [SegmentHealth; 6] = [
        SegmentHealth::Whole,
        SegmentHealth::Degraded,
        SegmentHealth::BelowThreshold,
        SegmentHealth::Critical,
        SegmentHealth::Unavailable,
        SegmentHealth::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SegmentHealth::Whole => "whole",
            SegmentHealth::Degraded => "degraded",
            SegmentHealth::BelowThreshold => "below threshold",
            SegmentHealth::Critical => "critical",
            SegmentHealth::Unavailable => "unavailable",
            SegmentHealth::Lost => "lost",
        }
    }
}

/// Segments and the bytes of their shards (k + m shards each, headers
/// included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub segments: u64,
    pub bytes: u64,
}

impl Tally {
    pub fn add(&mut self, bytes: u64) {
        self.segments += 1;
        self.bytes += bytes;
    }
}

/// Live segments (a volume's, or the cluster's: every record, those
/// snapshots keep and clones inherit too) by [`SegmentHealth`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Live segments.
    pub segments: u64,
    pub whole: u64,
    pub degraded: u64,
    pub below_threshold: u64,
    pub critical: u64,
    pub unavailable: u64,
    pub lost: u64,
    /// Of all the above, segments with two shards on one peer, or on one
    /// failure domain while the cluster has a domain free for one.
    pub misplaced: u64,
    /// Segments that repair would rebuild shards of now, and those shards'
    /// bytes.
    pub to_repair: Tally,
    /// Segments with shards on leaving peers (drained, or above the
    /// high-water mark) to move, and those shards' bytes.
    #[serde(default)]
    pub to_move: Tally,
    /// Bytes of every live segment's shards, and of the non-whole ones.
    pub bytes: u64,
    pub bytes_not_whole: u64,
}

impl Health {
    /// Counts one segment of `bytes` (all its shards) in `state`.
    pub fn count(&mut self, state: SegmentHealth, bytes: u64) {
        self.segments += 1;
        self.bytes += bytes;
        if state != SegmentHealth::Whole {
            self.bytes_not_whole += bytes;
        }
        *match state {
            SegmentHealth::Whole => &mut self.whole,
            SegmentHealth::Degraded => &mut self.degraded,
            SegmentHealth::BelowThreshold => &mut self.below_threshold,
            SegmentHealth::Critical => &mut self.critical,
            SegmentHealth::Unavailable => &mut self.unavailable,
            SegmentHealth::Lost => &mut self.lost,
        } += 1;
    }

    /// Segments in `state`.
    pub fn of(&self, state: SegmentHealth) -> u64 {
        match state {
            SegmentHealth::Whole => self.whole,
            SegmentHealth::Degraded => self.degraded,
            SegmentHealth::BelowThreshold => self.below_threshold,
            SegmentHealth::Critical => self.critical,
            SegmentHealth::Unavailable => self.unavailable,
            SegmentHealth::Lost => self.lost,
        }
    }

    pub fn merge(&mut self, other: &Health) {
        self.segments += other.segments;
        self.whole += other.whole;
        self.degraded += other.degraded;
        self.below_threshold += other.below_threshold;
        self.critical += other.critical;
        self.unavailable += other.unavailable;
        self.lost += other.lost;
        self.misplaced += other.misplaced;
        self.to_repair.segments += other.to_repair.segments;
        self.to_repair.bytes += other.to_repair.bytes;
        self.to_move.segments += other.to_move.segments;
        self.to_move.bytes += other.to_move.bytes;
        self.bytes += other.bytes;
        self.bytes_not_whole += other.bytes_not_whole;
    }
}

/// The one-word answer to "is my data safe", worst first: what `meshdisk
/// status` starts with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every segment whole, every peer up, nothing to repair.
    #[default]
    HealthOk,
    /// Some segments lack shards (a peer is down, not yet lost) or a peer
    /// is down; nothing needs rebuilding yet.
    Degraded,
    /// Segments are below their threshold, or misplaced: repair is
    /// rebuilding them.
    Repairing,
    /// Some segments are one lost peer from unreadable (critical), or
    /// unreadable until peers return (unavailable).
    AtRisk,
    /// Some segments have fewer than k shards on peers that are not lost.
    DataLost,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::HealthOk => "HEALTH_OK",
            Verdict::Degraded => "degraded",
            Verdict::Repairing => "repairing",
            Verdict::AtRisk => "at risk",
            Verdict::DataLost => "data lost",
        }
    }
}

impl Health {
    /// The verdict on these segments, `peers_down` saying whether a peer
    /// is not up and `repairing` whether repair has work queued or in
    /// flight.
    pub fn verdict(&self, peers_down: bool, repairing: bool) -> Verdict {
        if self.lost > 0 {
            Verdict::DataLost
        } else if self.critical + self.unavailable > 0 {
            Verdict::AtRisk
        } else if self.to_repair.segments > 0 || self.below_threshold > 0 || repairing {
            Verdict::Repairing
        } else if self.whole < self.segments || peers_down {
            Verdict::Degraded
        } else {
            Verdict::HealthOk
        }
    }
}

/// The repair worker's progress, as `meshdisk status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairProgress {
    /// Segments waiting in this round's queue, and the bytes of the
    /// shards they will rebuild.
    pub queued: Tally,
    /// Of those, segments queued only to move shards off leaving peers.
    #[serde(default)]
    pub moving: Tally,
    /// Segments being repaired now.
    pub in_flight: u64,
    /// Since the directory started: shards rebuilt (or moved) and their
    /// bytes, bytes read from holders for them, and repairs that failed
    /// (retried in a later round).
    pub shards: u64,
    pub bytes: u64,
    pub read_bytes: u64,
    pub failed: u64,
    /// Rebuilt bytes per second over the last minute.
    pub rate: u64,
    /// Seconds until the queue is empty at that rate (none while idle).
    pub eta_secs: Option<u64>,
    /// When the last round's scan ended (the directory's clock, ms).
    pub scanned_ms: u64,
    /// Segments that were rebuilt but freed meanwhile (compaction,
    /// deletion): their new shards were erased, the record left alone.
    pub raced: u64,
    /// Shards found bad (scrub, reads, audits) and forgotten from their
    /// records since the directory started: repair rebuilds them.
    #[serde(default)]
    pub forgotten: u64,
}

/// `meshdisk volume info`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub record: VolumeRecord,
    pub lease: Option<VolumeLease>,
    /// Bytes of shards stored on peers for the volume's live segments
    /// (headers included).
    pub allocated: u64,
    /// Its segments' redundancy (a clone's inherited ones too).
    pub health: Health,
    /// Dropped segments whose shards wait to be erased from the peers.
    #[serde(default)]
    pub collecting: Collecting,
}

/// Dropped segments waiting for the collector (their grace, or a holder
/// that is down): how many, and the bytes of their shards on peers that
/// are up (those on a down peer wait for it, and free nothing meanwhile).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collecting {
    pub segments: u64,
    pub bytes: u64,
}

/// A peer in `meshdisk status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Heartbeating and healthy.
    Up,
    /// Silent for longer than the peer timeout.
    Down,
    /// Heartbeating, but reports a problem (its store is poisoned).
    Failed,
    /// Silent for longer than `peer_lost_after`: its shards are rebuilt
    /// elsewhere.
    Lost,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Up => "up",
            PeerState::Down => "down",
            PeerState::Failed => "failed",
            PeerState::Lost => "lost",
        }
    }
}

/// Why a peer is leaving (its shards move elsewhere, new placements
/// avoid it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainReason {
    /// `meshdisk peer drain`.
    Operator,
    /// It failed audits: its shards are not trusted, so they are rebuilt
    /// from the others, not copied from it.
    Audits,
}

impl DrainReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DrainReason::Operator => "drained by the operator",
            DrainReason::Audits => "failed audits",
        }
    }
}

/// A peer being drained, as status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainInfo {
    pub reason: DrainReason,
    pub since_ms: u64,
}

/// What audits found of a peer since it was first audited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditTally {
    /// Challenges answered (passed or failed; unreachable ones not).
    pub audits: u64,
    /// Challenges failed: the shard was missing, corrupt, or its proof
    /// did not verify.
    pub failed: u64,
    /// Of those, answers that did not verify: the peer served bytes its
    /// own checks should have refused.
    pub lies: u64,
    /// Failures in a row, each within a week of the one before.
    #[serde(default)]
    pub strikes: u64,
    /// When the last failure was (the directory's clock, ms).
    #[serde(default)]
    pub last_failed_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub state: PeerState,
    pub addr: SocketAddr,
    pub failure_domain: String,
    pub capacity: u64,
    pub used: u64,
    pub load: u32,
    pub last_seen_ms: u64,
    pub problem: Option<String>,
    pub rtts: Vec<Rtt>,
    /// Shards of live segments whose records name this peer, and their
    /// bytes: what it holds that redundancy needs.
    #[serde(default)]
    pub needed: Tally,
    /// Set while it is leaving.
    #[serde(default)]
    pub drain: Option<DrainInfo>,
    /// Used space at or above the high-water mark: shards move off it
    /// until it is below the low-water mark, and new ones avoid it.
    #[serde(default)]
    pub above_high_water: bool,
    #[serde(default)]
    pub audits: AuditTally,
    #[serde(default)]
    pub scrub: Option<ScrubReport>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub record: VolumeRecord,
    /// Live segments.
    pub segments: u64,
    /// Who holds the write lease now, if anyone.
    pub holder: Option<String>,
    /// Its segments' redundancy.
    #[serde(default)]
    pub health: Health,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster: String,
    pub now_ms: u64,
    pub peer_timeout_ms: u64,
    pub peers: Vec<PeerStatus>,
    pub volumes: Vec<VolumeStatus>,
    /// The directory's background workers (the collector) and their state;
    /// shown by `meshdisk status --json`.
    #[serde(default)]
    pub workers: Vec<crate::sys::worker::WorkerInfo>,
    /// A peer silent this long is lost: its shards are rebuilt elsewhere.
    #[serde(default)]
    pub peer_lost_after_ms: u64,
    /// Every live segment's redundancy.
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub repair: RepairProgress,
    /// From `health`, the peers' states and `repair`.
    #[serde(default)]
    pub verdict: Verdict,
    /// The peers' scrubs.
    #[serde(default)]
    pub scrub: ScrubSummary,
}

/// A live segment as the directory records it: the peers holding its
/// shards, as small peer ids in shard order (0: not stored), how many 4 KiB
/// blocks each shard's payload has, and the segment root the shards verify
/// against. The reader trusts the root only as the MAC'd root record names
/// it; this copy is for repair and for the directory's own bookkeeping
/// (space, health, collection).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRecord {
    pub peers: Vec<u16>,
    pub shard_blocks: u16,
    pub root: [u8; 32],
}

/// Why a [`SegmentRecord`] cannot be stored or read back.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SegmentRecordError {
    #[error("a segment record names no peers")]
    NoPeers,
    #[error("a segment record names {0} peers, more than 255")]
    TooManyPeers(usize),
    #[error(
        "a segment record of {peers} peers with ids up to {max_id} takes {len} bytes, more than {}",
        SegmentRecord::MAX_LEN
    )]
    TooLong { peers: usize, max_id: u16, len: usize },
    #[error("corrupt segment record: {0}")]
    Corrupt(&'static str),
}

impl SegmentRecord {
    /// The most bytes a stored record takes (docs/formats.md, "Segment
    /// record"): k + m = 16 shards fit while peer ids stay below 2^14.
    pub const MAX_LEN: usize = 64;
    const FIXED: usize = 2 + 2 + 32;

    /// Bits per peer id: enough for the largest, at least 1.
    fn width(peers: &[u16]) -> u32 {
        let max = peers.iter().copied().max().unwrap_or(0);
        (u16::BITS - max.leading_zeros()).max(1)
    }

    /// The stored form: peer count, id width `w`, the root, then the ids
    /// packed `w` bits each, least significant bit first. Refuses a record
    /// that would exceed [`Self::MAX_LEN`].
    pub fn encode(&self) -> Result<Vec<u8>, SegmentRecordError> {
        let n = self.peers.len();
        if n == 0 {
            return Err(SegmentRecordError::NoPeers);
        }
        let count = u8::try_from(n).map_err(|_| SegmentRecordError::TooManyPeers(n))?;
        let w = Self::width(&self.peers);
        let len = Self::FIXED + (n * w as usize).div_ceil(8);
        if len > Self::MAX_LEN {
            let max_id = self.peers.iter().copied().max().unwrap_or(0);
            return Err(SegmentRecordError::TooLong { peers: n, max_id, len });
        }
        let mut b = vec![0u8; len];
        b[0] = count;
        b[1] = w as u8;
        b[2..4].copy_from_slice(&self.shard_blocks.to_le_bytes());
        b[4..Self::FIXED].copy_from_slice(&self.root);
        for (i, &id) in self.peers.iter().enumerate() {
            for bit in 0..w as usize {
                if id >> bit & 1 == 1 {
                    let at = i * w as usize + bit;
                    b[Self::FIXED + at / 8] |= 1 << (at % 8);
                }
            }
        }
        Ok(b)
    }

    /// Parses the stored form strictly: exact length, the narrowest width,
    /// zero padding bits. Never panics.
    pub fn decode(b: &[u8]) -> Result<Self, SegmentRecordError> {
        let corrupt = SegmentRecordError::Corrupt;
        if b.len() < Self::FIXED || b.len() > Self::MAX_LEN {
            return Err(corrupt("wrong length"));
        }
        let (n, w) = (usize::from(b[0]), u32::from(b[1]));
        if n == 0 {
            return Err(SegmentRecordError::NoPeers);
        }
        if !(1..=16).contains(&w) {
            return Err(corrupt("peer id width not 1 to 16 bits"));
        }
        let bits = n * w as usize;
        if b.len() != Self::FIXED + bits.div_ceil(8) {
            return Err(corrupt("length does not match the peer count and id width"));
        }
        let packed = &b[Self::FIXED..];
        let bit = |at: usize| packed[at / 8] >> (at % 8) & 1;
        let peers: Vec<u16> =
            (0..n).map(|i| (0..w as usize).map(|j| u16::from(bit(i * w as usize + j)) << j).sum()).collect();
        if (bits..packed.len() * 8).any(|at| bit(at) != 0) {
            return Err(corrupt("padding bits are not zero"));
        }
        if Self::width(&peers) != w {
            return Err(corrupt("peer ids are wider than they need"));
        }
        let shard_blocks = u16::from_le_bytes([b[2], b[3]]);
        let root = b[4..Self::FIXED].try_into().map_err(|_| corrupt("wrong length"))?;
        Ok(Self { peers, shard_blocks, root })
    }
}

/// A peer by its small id (segment records name peers by
/// it) and where to reach it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSlot {
    pub id: u16,
    pub addr: PeerAddr,
}

/// Where one new segment's shards go: k + m distinct peers, in shard
/// order; fewer (down to k + 1) while peers are down, the shards past the
/// list then stored by no one until repair. No space is reserved; the
/// writer asks again if a put is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentPlacement {
    pub peers: Vec<PeerSlot>,
}

/// A volume's committed root as the directory keeps it: the sealed record
/// (opaque to the directory but for its header) and the (epoch, commit) it
/// read from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootState {
    pub sealed: Vec<u8>,
    pub epoch: u64,
    pub commit: u64,
}

/// Most new segment records one [`RootCommit`] may carry. A commit's last
/// segment carries a copy of its root naming the others (40 bytes each),
/// which must fit the segment's trailer block with room to spare.
pub const MAX_COMMIT_SEGMENTS: usize = 96;
/// Most writes one [`RootCommit`] makes (the root, new records, dropped
/// records): etcd's default limit of operations per transaction.
pub const MAX_COMMIT_OPS: usize = 128;
/// Most segments one `PlaceSegments` call places, and most records one
/// `SegmentRecords` call returns.
pub const MAX_SEGMENTS_PER_CALL: usize = 1024;
/// Most shard faults one `ReportShardFaults` call carries (a peer with
/// more reports them in several calls), each problem at most
/// [`MAX_FAULT_PROBLEM`] bytes: so a report fits one message.
pub const MAX_FAULTS_PER_CALL: usize = 128;
/// Longest problem a [`ShardFault`] carries, in bytes.
pub const MAX_FAULT_PROBLEM: usize = 200;

/// One compare-and-set of a volume's root: the new root
/// replaces `expected`, with the writer's lease at `epoch`, and the
/// segment records go in and out with it, all in one transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootCommit {
    pub volume: String,
    /// The writer's lease epoch (fencing: a writer taken over is refused).
    pub epoch: u64,
    /// (epoch, commit) of the root this replaces; `None`: no root yet.
    pub expected: Option<(u64, u64)>,
    /// The sealed root record (`codec::root::RootRecord::seal`).
    pub sealed: Vec<u8>,
    /// New segment records (at most [`MAX_COMMIT_SEGMENTS`]).
    #[serde(with = "segment_records")]
    pub segments: Vec<(SegmentId, SegmentRecord)>,
    /// Segments the new root no longer reaches: their records go (kept
    /// while a snapshot pins them) and their shards are erased after the
    /// collection grace.
    #[serde(with = "segment_ids")]
    pub dropped: Vec<SegmentId>,
}

/// serde for segment ids as their raw numbers (the id type knows no serde).
mod segment_ids {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::SegmentId;

    pub fn serialize<S: Serializer>(ids: &[SegmentId], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(ids.iter().map(|id| id.raw()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SegmentId>, D::Error> {
        Ok(Vec::<u64>::deserialize(d)?.into_iter().map(SegmentId::from_raw).collect())
    }
}

mod segment_records {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{SegmentId, SegmentRecord};

    pub fn serialize<S: Serializer>(records: &[(SegmentId, SegmentRecord)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(records.iter().map(|(id, r)| (id.raw(), r)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(SegmentId, SegmentRecord)>, D::Error> {
        let raw = Vec::<(u64, SegmentRecord)>::deserialize(d)?;
        Ok(raw.into_iter().map(|(id, r)| (SegmentId::from_raw(id), r)).collect())
    }
}

/// Calls to the directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirRequest {
    /// Spend a join token for a certificate over the CSR's key. The only
    /// call a node without a certificate may make.
    Join {
        token: String,
        role: Role,
        csr_pem: String,
        name: Option<String>,
    },
    /// A peer's periodic report.
    Heartbeat(PeerReport),
    /// A client's round trips to peers (latency hints for placement).
    Hints {
        rtts: Vec<Rtt>,
    },
    Status,
    /// Admin only.
    CreateToken {
        role: Role,
        ttl_secs: u64,
    },
    CreateVolume(VolumeSpec),
    Volume {
        volume: String,
    },
    VolumeInfo {
        volume: String,
    },
    /// Deletes the volume's record, root and segment records; the
    /// directory's collector erases its shards from the peers.
    DeleteVolume {
        volume: String,
    },
    /// The write lease, with a new fencing epoch. Refused while another
    /// node holds it, unless `force` (its later writes are then fenced).
    /// `resume`: the epoch this node held before a crash, from its own
    /// state; it gets the lease back without waiting for it to lapse.
    AcquireLease {
        volume: String,
        force: bool,
        resume: Option<u64>,
        host: String,
    },
    RenewLease {
        volume: String,
        epoch: u64,
        /// The clients' requests per second the holder served since its
        /// last renewal (the directory's repair yields to busy volumes).
        ops: u32,
    },
    ReleaseLease {
        volume: String,
        epoch: u64,
    },
    /// Where `count` new segments go, k + m distinct peers
    /// each that are up, have `shard_bytes` free (and `keep_free` more: a
    /// commit of new writes leaves compaction's reserve, so compaction can
    /// always free space) and are not in `exclude` (peer ids). Nothing is
    /// reserved or written; the writer must hold the lease at `epoch`.
    PlaceSegments {
        volume: String,
        epoch: u64,
        count: u32,
        shard_bytes: u64,
        exclude: Vec<u16>,
        keep_free: u64,
    },
    /// The volume's committed root, if it has one.
    GetRoot {
        volume: String,
    },
    /// Swap the root by compare-and-set (`Committed`). Refused `Fenced`
    /// (not the lease holder at that epoch), `Conflict` (the root is not
    /// `expected`), `Invalid` (the root does not parse, is for another
    /// volume, epoch or commit number, the commit is too big, or a new
    /// segment is not above the replaced root's highest and the volume's
    /// collection floor).
    CommitRoot(RootCommit),
    /// Segment records by id, `None` for those the directory does not have.
    SegmentRecords {
        volume: String,
        #[serde(with = "segment_ids")]
        ids: Vec<SegmentId>,
    },
    /// Peers by small id and their current addresses.
    PeerSlots {
        ids: Vec<u16>,
    },
    /// Replace the volume's key slots by compare-and-set (`meshdisk volume
    /// passwd`): refused `Conflict` unless they are still `expected` (the
    /// encoding the caller unlocked and rewrapped), `Invalid` unless
    /// `slots` parse. Answered with the updated `Volume`.
    SetKeySlots {
        volume: String,
        expected: Vec<u8>,
        slots: Vec<u8>,
    },
    /// Segments the volume's root no longer reaches, dropped outside a
    /// commit (as `RootCommit::dropped`) by the writer holding the lease
    /// at `epoch` (`Done`). At most [`MAX_COMMIT_OPS`] ids.
    DropSegments {
        volume: String,
        epoch: u64,
        #[serde(with = "segment_ids")]
        ids: Vec<SegmentId>,
    },
    /// The ids of the volume's segment records after `after`, in order, at
    /// most `limit` (at most [`MAX_SEGMENTS_PER_CALL`]): `SegmentIds`.
    ListSegments {
        volume: String,
        after: Option<u64>,
        limit: u32,
    },
    /// Keeps the volume's committed root as snapshot `snapshot` (its
    /// segments stay while it does): `Snapshot`.
    CreateSnapshot {
        volume: String,
        snapshot: String,
    },
    /// The volume's snapshots, oldest first: `Snapshots`.
    ListSnapshots {
        volume: String,
    },
    /// Deletes a snapshot (refused while a clone is made from it): `Done`.
    DeleteSnapshot {
        volume: String,
        snapshot: String,
    },
    /// The root a snapshot keeps: `Root`.
    SnapshotRoot {
        volume: String,
        snapshot: String,
    },
    /// A new volume (`spec`, whose lineage's first entry names the parent
    /// and its snapshot) starting from `sealed`, a root the caller made of
    /// the snapshot's with the new volume's id and key: at the snapshot
    /// root's epoch (a root's highest segment and sequence cannot be of a
    /// newer epoch than its own, and the clone's writers must start above
    /// them; its record starts at that epoch), commit 1, and the
    /// snapshot's highest segment and sequence: `Volume`.
    CloneVolume {
        spec: VolumeSpec,
        sealed: Vec<u8>,
    },
    /// Rolls the volume back to a snapshot: `sealed` (a root the writer
    /// holding the lease at `epoch` made of the snapshot's, one commit above
    /// `expected`, keeping the current root's highest segment and sequence
    /// or higher, as they are floors) replaces the root by compare-and-set,
    /// and the segments the snapshot reaches count as the volume's again:
    /// `Committed`.
    Rollback {
        volume: String,
        snapshot: String,
        epoch: u64,
        expected: (u64, u64),
        sealed: Vec<u8>,
    },
    /// A peer reports shards it holds that failed their hashes (scrub, or
    /// a read): the directory forgets them from their records, so repair
    /// rebuilds them (peers only, about their own shards).
    ReportShardFaults {
        faults: Vec<ShardFault>,
    },
    /// Start (or with `cancel`, stop) draining a peer: its shards move
    /// elsewhere, new placements avoid it (admins).
    DrainPeer {
        peer: String,
        cancel: bool,
    },
    /// Remove a peer from the cluster: refused while records still name
    /// it (admins).
    RemovePeer {
        peer: String,
    },
    /// A reader found that `peer`'s answer for `shard` did not verify:
    /// the directory audits that shard now (clients).
    SuspectShard {
        shard: SegmentShardKey,
        peer: String,
    },
    /// The health of these segments of the volume (its own, or those it
    /// inherits from an ancestor, found as `SegmentRecords` finds them),
    /// assessed now as `volume info` counts them: `SegmentHealth`, `None`
    /// for a segment the directory has no record of. At most
    /// [`MAX_SEGMENTS_PER_CALL`] ids.
    SegmentHealth {
        volume: String,
        #[serde(with = "segment_ids")]
        ids: Vec<SegmentId>,
    },
    /// A peer's scrub asks for the segment roots of the shards it is about
    /// to check (`Roots`, in order; `None`: no live record, so the shard is
    /// checked without). Peers only.
    SegmentRoots {
        shards: Vec<SegmentShardKey>,
    },
    /// `meshdisk scrub pause|resume|start` (admins).
    Scrub(ScrubCommand),
    /// What the attach's compactor weighs each round, without the walk of
    /// every segment record that `VolumeInfo` makes: the highest segment
    /// any snapshot of the volume reaches, and its dropped segments still
    /// waiting for the collector (`CompactionInputs`).
    CompactionInputs {
        volume: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirResponse {
    Joined {
        node: String,
        cluster: String,
        cert_pem: String,
        ca_pem: String,
    },
    /// The peers the reporting peer should measure; how long until a
    /// silent peer counts as down.
    Heartbeat {
        peers: Vec<PeerAddr>,
        peer_timeout_ms: u64,
        scrub: ScrubDirective,
    },
    Status(Box<ClusterStatus>),
    Token {
        token: String,
        expires_ms: u64,
    },
    Volume(VolumeRecord),
    VolumeInfo(Box<VolumeInfo>),
    Lease(VolumeLease),
    Done,
    Error(Remote),
    SegmentPlacements(Vec<SegmentPlacement>),
    Root(Option<RootState>),
    /// The root is swapped; its commit number.
    Committed {
        commit: u64,
    },
    SegmentRecords(Vec<Option<SegmentRecord>>),
    PeerSlots(Vec<Option<PeerSlot>>),
    SegmentIds(#[serde(with = "segment_ids")] Vec<SegmentId>),
    Snapshot(SnapshotInfo),
    Snapshots(Vec<SnapshotInfo>),
    SegmentHealth(Vec<Option<SegmentHealth>>),
    Roots(Vec<Option<[u8; 32]>>),
    CompactionInputs {
        /// The highest segment id any snapshot reaches (none: no snapshot).
        pinned_up_to: Option<u64>,
        /// As `VolumeInfo::collecting` counts it.
        collecting: Collecting,
    },
}

/// Calls to a peer about the segment shards it holds. Shard bytes (header
/// and payload) follow `Put` and `Shard` raw; a block proof follows `Blocks`.
/// New variants go at the end (postcard numbers them in order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Store the shard that follows, for a writer holding `epoch`.
    Put {
        epoch: u64,
    },
    /// A whole shard back (`Shard`, the shard follows).
    Get(SegmentShardKey),
    /// Blocks `first .. first + count` of a shard with their hash proof
    /// (`Blocks`, the proof follows: `codec::segment::prove`'s format).
    GetBlocks {
        shard: SegmentShardKey,
        first: u32,
        count: u32,
    },
    /// A shard's header alone (`Shard`, the header follows): the segment's
    /// geometry and every shard root, for checking block proofs.
    GetHeader(SegmentShardKey),
    /// Erase a shard, for a writer (or the directory's collector) holding
    /// `epoch`.
    Delete {
        shard: SegmentShardKey,
        epoch: u64,
    },
    /// The directory's repair: make shard `shard` of a segment whose root
    /// is `root` and store it here at `epoch` (the volume's current
    /// fencing epoch). A source holding that very index is copied; else
    /// `need` (k) shards are read from `sources`, in order, verified
    /// against `root`, and the shard is rebuilt from them (`Rebuilt`).
    /// Only the directory may ask.
    Rebuild {
        shard: SegmentShardKey,
        root: [u8; 32],
        epoch: u64,
        need: u8,
        sources: Vec<ShardSource>,
    },
    /// Up to `limit` (at most 1000) shards of a volume, in key order, after
    /// `after`.
    List {
        volume: [u8; VOLUME_ID_LEN],
        after: Option<SegmentShardKey>,
        limit: u32,
    },
    Ping,
    /// Like `List`, with each shard's copy: an opaque token that changes
    /// whenever the shard is stored again (`Copies`).
    ListCopies {
        volume: [u8; VOLUME_ID_LEN],
        after: Option<SegmentShardKey>,
        limit: u32,
    },
    /// Erase a shard, as `Delete` does, but only the copy `copy` (as
    /// `ListCopies` named it): a copy stored since is kept (`Deleted`,
    /// `existed: false`).
    DeleteCopy {
        shard: SegmentShardKey,
        epoch: u64,
        copy: CopyId,
    },
}

/// Which stored copy of a shard (the peer's own token for it).
pub type CopyId = [u8; 16];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerResponse {
    Stored,
    /// The shard follows.
    Shard,
    Deleted {
        existed: bool,
    },
    Shards(Vec<SegmentShardKey>),
    Pong {
        load: u32,
    },
    Error(Remote),
    /// The block proof follows.
    Blocks,
    /// A `Rebuild` stored its shard; it read `read` bytes of other shards.
    Rebuilt {
        read: u64,
    },
    Copies(Vec<(SegmentShardKey, CopyId)>),
}

/// A shard its holder found bad, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardFault {
    pub shard: SegmentShardKey,
    pub problem: String,
}

impl ShardFault {
    /// Shard `shard` is bad because of `problem` (cut to
    /// [`MAX_FAULT_PROBLEM`] bytes, on a character boundary).
    pub fn new(shard: SegmentShardKey, problem: &str) -> Self {
        let mut end = problem.len().min(MAX_FAULT_PROBLEM);
        while !problem.is_char_boundary(end) {
            end -= 1;
        }
        Self { shard, problem: problem[..end].to_owned() }
    }
}

/// Where a rebuilding peer finds shard `index` of the segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSource {
    pub index: u8,
    pub peer: PeerAddr,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::wire;
    use proptest::prelude::*;

    fn roundtrip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(msg: T) {
        let frame = wire::encode(&msg).unwrap();
        assert!(frame.len() < wire::MAX_MESSAGE);
        assert_eq!(wire::decode::<T>(&frame[4..]).unwrap(), msg);
    }

    #[test]
    fn messages_round_trip() {
        let segment = SegmentShardKey {
            volume: [3; 16],
            segment: crate::codec::sequence::SegmentId::new(5, 77).unwrap(),
            index: 4,
        };
        roundtrip(PeerRequest::Put { epoch: 6 });
        roundtrip(PeerRequest::Get(segment));
        roundtrip(PeerRequest::GetHeader(segment));
        roundtrip(PeerRequest::GetBlocks { shard: segment, first: 17, count: 3 });
        roundtrip(PeerRequest::Delete { shard: segment, epoch: u64::MAX });
        roundtrip(PeerRequest::List { volume: [1; 16], after: Some(segment), limit: 100 });
        roundtrip(PeerRequest::ListCopies { volume: [1; 16], after: None, limit: 7 });
        roundtrip(PeerRequest::DeleteCopy { shard: segment, epoch: 3, copy: [9; 16] });
        roundtrip(PeerResponse::Copies(vec![(segment, [1; 16])]));
        roundtrip(DirRequest::DrainPeer { peer: "peer-3".into(), cancel: true });
        roundtrip(DirRequest::RemovePeer { peer: "peer-3".into() });
        roundtrip(DirRequest::SuspectShard { shard: segment, peer: "peer-1".into() });
        roundtrip(PeerResponse::Shards(vec![segment, segment]));
        roundtrip(PeerResponse::Blocks);
        roundtrip(PeerRequest::Rebuild {
            shard: segment,
            root: [9; 32],
            epoch: 3,
            need: 4,
            sources: vec![ShardSource {
                index: 2,
                peer: PeerAddr { name: "peer-2".into(), addr: "127.0.0.1:7402".parse().unwrap() },
            }],
        });
        roundtrip(PeerResponse::Rebuilt { read: 1 << 22 });
        roundtrip(PeerResponse::Error(Remote::new(ErrorKind::Full, "full")));
        // The segment id travels as its raw number.
        let max =
            SegmentShardKey { segment: crate::codec::sequence::SegmentId::from_raw(u64::MAX), ..segment };
        roundtrip(PeerRequest::Get(max));
        roundtrip(DirRequest::Heartbeat(PeerReport {
            addr: "127.0.0.1:7000".parse().unwrap(),
            failure_domain: "rack-1".into(),
            capacity: 1 << 40,
            used: 12345,
            load: 3,
            client_ops: 12,
            problem: None,
            rtts: vec![Rtt { node: "peer-2".into(), micros: 120 }],
            scrub: Some(ScrubReport { pass_started_ms: Some(5), checked: 7, total: 9, ..Default::default() }),
        }));
        roundtrip(DirRequest::SegmentRoots { shards: vec![segment, max] });
        roundtrip(DirRequest::Scrub(ScrubCommand::Pause { for_ms: Some(3_600_000) }));
        roundtrip(DirResponse::Roots(vec![Some([3; 32]), None]));
        let collector = crate::sys::worker::WorkerInfo {
            name: "collector".into(),
            state: "idle".into(),
            tranquility: 0,
            errors: 2,
            consecutive_errors: 0,
            last_error: Some("peer-3 unreachable".into()),
            queue: Some(4),
            progress: None,
        };
        let status = ClusterStatus {
            cluster: "home".into(),
            now_ms: 1,
            peer_timeout_ms: 2,
            peers: vec![],
            volumes: vec![],
            workers: vec![collector.clone()],
            peer_lost_after_ms: 600_000,
            health: Health { segments: 3, whole: 1, critical: 2, ..Health::default() },
            repair: RepairProgress { queued: Tally { segments: 2, bytes: 1 << 20 }, ..Default::default() },
            verdict: Verdict::AtRisk,
            scrub: ScrubSummary { peers: 3, checked: 5, total: 10, ..Default::default() },
        };
        roundtrip(DirResponse::Status(Box::new(status.clone())));
        // In JSON a worker reads as `WorkerInfo` itself does (queue and
        // progress beside the other fields), and a status without workers
        // still parses.
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["workers"][0], serde_json::to_value(&collector).unwrap());
        assert_eq!(json["verdict"], "at_risk");
        assert_eq!(json["health"]["critical"], 2);
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("workers");
        let parsed: ClusterStatus = serde_json::from_value(old).unwrap();
        assert!(parsed.workers.is_empty());
    }

    #[test]
    fn second_design_messages_round_trip() {
        let seg = |n| SegmentId::new(3, n).unwrap();
        let record = SegmentRecord { peers: vec![1, 200, 16_000], shard_blocks: 1024, root: [5; 32] };
        let slot =
            PeerSlot { id: 7, addr: PeerAddr { name: "peer-7".into(), addr: "[::1]:9".parse().unwrap() } };
        roundtrip(DirRequest::PlaceSegments {
            volume: "v".into(),
            epoch: 3,
            count: 8,
            shard_bytes: 1 << 20,
            exclude: vec![4, 9],
            keep_free: 9 << 20,
        });
        roundtrip(DirResponse::SegmentPlacements(vec![SegmentPlacement { peers: vec![slot.clone()] }]));
        roundtrip(DirRequest::GetRoot { volume: "v".into() });
        roundtrip(DirResponse::Root(Some(RootState { sealed: vec![1, 2, 3], epoch: 3, commit: 9 })));
        roundtrip(DirResponse::Root(None));
        roundtrip(DirRequest::CommitRoot(RootCommit {
            volume: "v".into(),
            epoch: 3,
            expected: Some((3, 8)),
            sealed: vec![9; 200],
            segments: vec![(seg(1), record.clone()), (SegmentId::from_raw(u64::MAX), record.clone())],
            dropped: vec![seg(0)],
        }));
        roundtrip(DirResponse::Committed { commit: 9 });
        roundtrip(DirRequest::SegmentRecords { volume: "v".into(), ids: vec![seg(1), seg(2)] });
        roundtrip(DirRequest::DropSegments { volume: "v".into(), epoch: 3, ids: vec![seg(4)] });
        roundtrip(DirRequest::ListSegments { volume: "v".into(), after: Some(9), limit: 10 });
        roundtrip(DirResponse::SegmentIds(vec![seg(10), seg(11)]));
        roundtrip(DirResponse::SegmentRecords(vec![Some(record), None]));
        roundtrip(DirRequest::SegmentHealth { volume: "v".into(), ids: vec![seg(1), seg(2)] });
        roundtrip(DirResponse::SegmentHealth(vec![Some(SegmentHealth::Critical), None]));
        roundtrip(DirRequest::PeerSlots { ids: vec![1, u16::MAX] });
        roundtrip(DirResponse::PeerSlots(vec![Some(slot), None]));
        roundtrip(DirRequest::SetKeySlots {
            volume: "v".into(),
            expected: vec![1; 160],
            slots: vec![2; 304],
        });
    }

    #[test]
    fn a_segment_record_of_sixteen_peers_fits_in_64_bytes_while_ids_stay_below_2_14() {
        let (root, shard_blocks) = ([0xab; 32], 4096);
        let wide = SegmentRecord { peers: (0..16).map(|i| 8_191 - i).collect(), shard_blocks, root };
        assert_eq!(wide.encode().unwrap().len(), 62);
        let widest = SegmentRecord { peers: (0..16).map(|i| 16_383 - i).collect(), shard_blocks, root };
        let b = widest.encode().unwrap();
        assert_eq!(b.len(), SegmentRecord::MAX_LEN);
        assert_eq!(SegmentRecord::decode(&b).unwrap(), widest);
        let too_wide =
            SegmentRecord { peers: vec![1; 15].into_iter().chain([16_384]).collect(), shard_blocks, root };
        let err = too_wide.encode().unwrap_err();
        assert_eq!(err, SegmentRecordError::TooLong { peers: 16, max_id: 16_384, len: 66 });
        // Small clusters make small records: 4 + 2 peers, ids below 8.
        let small = SegmentRecord { peers: vec![1, 2, 3, 4, 5, 6], shard_blocks, root };
        assert_eq!(small.encode().unwrap().len(), 39);
        assert_eq!(
            SegmentRecord { peers: vec![], shard_blocks, root }.encode(),
            Err(SegmentRecordError::NoPeers)
        );
        // Strict: a wider id width than needed, set padding bits and a
        // wrong length are refused.
        let mut b = SegmentRecord { peers: vec![1, 2, 3], shard_blocks, root }.encode().unwrap();
        assert_eq!(b[1], 2);
        let mut padded = b.clone();
        padded[SegmentRecord::FIXED] |= 0x80;
        assert!(matches!(SegmentRecord::decode(&padded), Err(SegmentRecordError::Corrupt(_))));
        assert!(SegmentRecord::decode(&b[..b.len() - 1]).is_err());
        b[1] = 3;
        assert!(SegmentRecord::decode(&b).is_err());
    }

    proptest! {
        /// Arbitrary bytes never panic the decoders.
        #[test]
        fn garbage_is_an_error_not_a_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = wire::decode::<DirRequest>(&body);
            let _ = wire::decode::<DirResponse>(&body);
            let _ = wire::decode::<PeerRequest>(&body);
            let _ = wire::decode::<PeerResponse>(&body);
            let _ = SegmentRecord::decode(&body);
        }

        #[test]
        fn segment_records_decode_to_what_was_encoded(
            peers in proptest::collection::vec(any::<u16>(), 1..24),
            shard_blocks: u16,
            root: [u8; 32],
        ) {
            let r = SegmentRecord { peers, shard_blocks, root };
            match r.encode() {
                Ok(b) => {
                    prop_assert!(b.len() <= SegmentRecord::MAX_LEN);
                    prop_assert_eq!(SegmentRecord::decode(&b).unwrap(), r);
                }
                Err(e) => prop_assert!(matches!(e, SegmentRecordError::TooLong { .. }), "{}", e),
            }
        }
    }
}
