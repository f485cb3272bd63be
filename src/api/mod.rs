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
use crate::codec::shard::ShardKey;
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
    /// Set when its store is poisoned or otherwise unusable.
    pub problem: Option<String>,
    /// Round trips to the other peers it talks to.
    pub rtts: Vec<Rtt>,
}

/// What FLUSH waits for (see the README's volume section).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Committed on peers and in the stripe map.
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
    /// Repair when a stripe has fewer healthy shards than this.
    pub repair_threshold: u8,
    /// Proves a key is the volume's without revealing it.
    pub key_check: [u8; 32],
    /// Set when the key comes from a passphrase: how to derive it.
    pub kdf: Option<crate::codec::key::KdfParams>,
    pub durability: Durability,
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
}

/// How many stripes have how many healthy shards (on a peer that is up,
/// with a recorded hash).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeHealth {
    /// Stripes ever written.
    pub stripes: u64,
    /// All k + m shards healthy.
    pub whole: u64,
    /// At least the repair threshold, fewer than k + m.
    pub degraded: u64,
    /// Below the repair threshold but still readable (≥ k).
    pub needs_repair: u64,
    /// Fewer than k: unreadable until peers return.
    pub unavailable: u64,
}

/// `meshdisk volume info`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub record: VolumeRecord,
    pub lease: Option<VolumeLease>,
    /// Bytes of shards stored for the volume's committed stripes.
    pub allocated: u64,
    pub health: StripeHealth,
}

/// Where a stripe's next generation goes; its space is reserved until
/// `expires_ms` or until committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub reservation: u64,
    pub stripe: u64,
    pub generation: u64,
    /// Shard `i` goes to `peers[i]`; k + m distinct peers.
    pub peers: Vec<PeerAddr>,
    /// Bytes reserved on each (header included).
    pub shard_bytes: u64,
    pub expires_ms: u64,
}

/// A stripe's committed generation: where each shard is and its hash
/// (`None`: that shard was not stored, the stripe is degraded).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeRecord {
    pub generation: u64,
    pub peers: Vec<String>,
    pub hashes: Vec<Option<[u8; 32]>>,
    pub committed_ms: u64,
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
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Up => "up",
            PeerState::Down => "down",
            PeerState::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub state: PeerState,
    pub addr: SocketAddr,
    pub failure_domain: String,
    pub capacity: u64,
    pub used: u64,
    pub reserved: u64,
    pub load: u32,
    pub last_seen_ms: u64,
    pub problem: Option<String>,
    pub rtts: Vec<Rtt>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub record: VolumeRecord,
    pub stripes: u64,
    /// Who holds the write lease now, if anyone.
    pub holder: Option<String>,
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
}

/// The new generation of a stripe is stored: record it, turn the
/// reservation into used space. `epoch` is the writer's lease epoch (0 for
/// a volume never attached); a writer that was taken over is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub reservation: u64,
    pub volume: String,
    pub stripe: u64,
    pub generation: u64,
    pub epoch: u64,
    pub hashes: Vec<Option<[u8; 32]>>,
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
    /// k + m peers for the next generation of a stripe, space reserved.
    Place {
        volume: String,
        stripe: u64,
    },
    /// The new generation is stored: record it, turn the reservation into
    /// used space.
    Commit(Commit),
    /// The stripe reads as zeroes from now on: its record goes, its shards
    /// are erased (TRIM, WRITE_ZEROES of a whole stripe, a stripe destaged
    /// as all zeroes).
    DropStripe {
        volume: String,
        stripe: u64,
        epoch: u64,
    },
    /// The committed stripes of a volume, in order, up to `limit` after
    /// `after` (the attaching machine loads the stripe map with this).
    Stripes {
        volume: String,
        after: Option<u64>,
        limit: u32,
    },
    /// Another peer for one shard of a reservation (its peer is slow or
    /// failing); the reservation is updated and the commit records it.
    Replace {
        reservation: u64,
        index: u8,
    },
    /// Give a reservation's space back (the write failed).
    Release {
        reservation: u64,
    },
    /// A stripe's committed generation.
    Stripe {
        volume: String,
        stripe: u64,
    },
    Volume {
        volume: String,
    },
    VolumeInfo {
        volume: String,
    },
    /// Deletes the volume's record and stripe map; peers erase its shards.
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
    },
    ReleaseLease {
        volume: String,
        epoch: u64,
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
    },
    Status(Box<ClusterStatus>),
    Token {
        token: String,
        expires_ms: u64,
    },
    Volume(VolumeRecord),
    VolumeInfo(Box<VolumeInfo>),
    Lease(VolumeLease),
    Placement(Placement),
    Stripe(Option<StripeRecord>),
    Stripes(Vec<(u64, StripeRecord)>),
    Peer(PeerAddr),
    Done,
    Error(Remote),
}

/// Calls to a peer. Shard bytes (header + payload) follow `Put`,
/// `PutSegmentShard` and `Shard` raw; a block proof follows `Blocks`.
/// New variants go at the end (postcard numbers them in order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Store the shard that follows, for a writer holding `epoch`.
    Put {
        epoch: u64,
    },
    Get(ShardKey),
    Delete {
        shard: ShardKey,
        epoch: u64,
    },
    /// Up to `limit` shards of a volume, after `after`.
    List {
        volume: [u8; VOLUME_ID_LEN],
        after: Option<ShardKey>,
        limit: u32,
    },
    Ping,
    /// Store the segment shard that follows (second design), for a writer
    /// holding `epoch`.
    PutSegmentShard {
        epoch: u64,
    },
    /// A whole segment shard back (`Shard`, the shard follows).
    GetSegmentShard(SegmentShardKey),
    /// Blocks `first .. first + count` of a segment shard with their hash
    /// proof (`Blocks`, the proof follows: `codec::segment::prove`'s format).
    GetBlocks {
        shard: SegmentShardKey,
        first: u32,
        count: u32,
    },
    DeleteSegmentShard {
        shard: SegmentShardKey,
        epoch: u64,
    },
    /// A segment shard's header alone (`Shard`, the header follows): the
    /// segment's geometry and every shard root, for checking block proofs.
    GetSegmentHeader(SegmentShardKey),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerResponse {
    Stored,
    /// The shard follows.
    Shard,
    Deleted {
        existed: bool,
    },
    Shards(Vec<ShardKey>),
    Pong {
        load: u32,
    },
    Error(Remote),
    /// The block proof follows.
    Blocks,
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
        let shard = ShardKey { volume: [7; 16], stripe: 9, generation: 3, index: 5 };
        roundtrip(PeerRequest::Put { epoch: 4 });
        roundtrip(PeerRequest::Get(shard));
        roundtrip(PeerRequest::List { volume: [1; 16], after: Some(shard), limit: 100 });
        roundtrip(PeerResponse::Error(Remote::new(ErrorKind::Full, "full")));
        let segment = SegmentShardKey {
            volume: [3; 16],
            segment: crate::codec::sequence::SegmentId::new(5, 77).unwrap(),
            index: 4,
        };
        roundtrip(PeerRequest::PutSegmentShard { epoch: 6 });
        roundtrip(PeerRequest::GetSegmentShard(segment));
        roundtrip(PeerRequest::GetSegmentHeader(segment));
        roundtrip(PeerRequest::GetBlocks { shard: segment, first: 17, count: 3 });
        roundtrip(PeerRequest::DeleteSegmentShard { shard: segment, epoch: u64::MAX });
        roundtrip(PeerResponse::Blocks);
        // The segment id travels as its raw number.
        let max =
            SegmentShardKey { segment: crate::codec::sequence::SegmentId::from_raw(u64::MAX), ..segment };
        roundtrip(PeerRequest::GetSegmentShard(max));
        roundtrip(DirRequest::Heartbeat(PeerReport {
            addr: "127.0.0.1:7000".parse().unwrap(),
            failure_domain: "rack-1".into(),
            capacity: 1 << 40,
            used: 12345,
            load: 3,
            problem: None,
            rtts: vec![Rtt { node: "peer-2".into(), micros: 120 }],
        }));
        roundtrip(DirRequest::Commit(Commit {
            reservation: 1,
            volume: "v".into(),
            stripe: 2,
            generation: 3,
            epoch: 4,
            hashes: vec![Some([9; 32]), None],
        }));
        roundtrip(DirRequest::DropStripe { volume: "v".into(), stripe: 7, epoch: 2 });
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
        };
        roundtrip(DirResponse::Status(Box::new(status.clone())));
        // In JSON a worker reads as `WorkerInfo` itself does (queue and
        // progress beside the other fields), and a status without workers
        // still parses.
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["workers"][0], serde_json::to_value(&collector).unwrap());
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("workers");
        let parsed: ClusterStatus = serde_json::from_value(old).unwrap();
        assert!(parsed.workers.is_empty());
        roundtrip(DirRequest::Replace { reservation: 9, index: 3 });
        roundtrip(DirResponse::Peer(PeerAddr {
            name: "peer-2".into(),
            addr: "127.0.0.1:9".parse().unwrap(),
        }));
        roundtrip(DirRequest::Stripes { volume: "v".into(), after: Some(3), limit: 100 });
        roundtrip(DirResponse::Stripes(vec![(
            5,
            StripeRecord { generation: 2, peers: vec!["p".into()], hashes: vec![None], committed_ms: 9 },
        )]));
        roundtrip(DirResponse::Placement(Placement {
            reservation: 1,
            stripe: 2,
            generation: 3,
            peers: vec![PeerAddr { name: "peer-1".into(), addr: "[::1]:9".parse().unwrap() }],
            shard_bytes: 262_240,
            expires_ms: 5,
        }));
    }

    proptest! {
        /// Arbitrary bytes never panic the decoders.
        #[test]
        fn garbage_is_an_error_not_a_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = wire::decode::<DirRequest>(&body);
            let _ = wire::decode::<DirResponse>(&body);
            let _ = wire::decode::<PeerRequest>(&body);
            let _ = wire::decode::<PeerResponse>(&body);
        }
    }
}
