//! Multi-process clusters on loopback: a directory and peers started by the
//! test, joined with tokens, restarted, killed, corrupted and filled.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{Cluster, Proc};
use meshdisk::api::{ErrorKind, PeerAddr, PeerState, VolumeSpec};
use meshdisk::codec::segment::{BLOCK_SIZE, EncodedSegment, SegmentId, SegmentShardKey, header::header_len};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Segment `n` (epoch 1) of volume `volume`: 4 + 2 shards of `blocks` blocks.
fn segment(volume: [u8; 16], n: u64, blocks: u32) -> (SegmentId, EncodedSegment) {
    let id = SegmentId::new(1, n).unwrap();
    (id, common::cluster::segment_of(volume, id, (4, 2), blocks, n))
}

fn key(volume: [u8; 16], id: SegmentId, index: usize) -> SegmentShardKey {
    SegmentShardKey { volume, segment: id, index: index as u8 }
}

/// Bytes a shard of `blocks` blocks of a 4 + 2 segment takes on a peer.
fn stored_len(blocks: u32) -> u64 {
    let g = meshdisk::codec::segment::SegmentGeometry::new(4, 2, blocks).unwrap();
    (header_len(g) + g.shard_len()) as u64
}

fn volume(name: &str, k: u8, m: u8) -> VolumeSpec {
    let mut id = [0u8; 16];
    id[..name.len().min(16)].copy_from_slice(&name.as_bytes()[..name.len().min(16)]);
    VolumeSpec {
        name: name.into(),
        id,
        size: 64 << 20,
        k,
        m,
        shard_size: 64 << 10,
        repair_threshold: k + 1.min(m),
        key_check: [0; 32],
        key_slots: common::cluster::throwaway_key_slots(),
        durability: meshdisk::api::Durability::Remote,
        lineage: Vec::new(),
    }
}

fn addr_of(c: &Cluster, name: &str) -> PeerAddr {
    let s = c.status();
    let p = s.peers.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no peer {name}: {s:#?}"));
    PeerAddr { name: p.name.clone(), addr: p.addr }
}

#[test]
fn joined_peers_and_the_directory_keep_identities_and_data_across_restarts() {
    let mut c = Cluster::start("home", &[]);
    let mut names: Vec<String> = (0..6).map(|i| c.add_peer("64M", &format!("room{i}"))).collect();
    names.sort();
    let s = c.wait_all_up(6);
    let mut seen: Vec<String> = s.peers.iter().map(|p| p.name.clone()).collect();
    seen.sort();
    assert_eq!(seen, names);
    assert!(s.peers.iter().all(|p| p.capacity == 64 << 20 && p.used == 0));

    // Store one segment's six shards where the directory says, and commit.
    let rt = runtime();
    let spec = volume("photos", 4, 2);
    let (id, seg) = segment(spec.id, 1, 16);
    let placement = rt.block_on(async {
        let client = c.client();
        let record = client.create_volume(spec.clone()).await.unwrap();
        let lease = client.acquire_lease("photos", false, None).await.unwrap();
        let placement =
            client.place_segments("photos", lease.epoch, 1, stored_len(16), vec![], 0).await.unwrap();
        let placement = placement.into_iter().next().unwrap();
        let commit =
            common::cluster::store_and_commit(&client, &record, lease.epoch, None, &placement, id, &seg)
                .await;
        assert_eq!(commit, 1);
        client.release_lease("photos", lease.epoch).await.unwrap();
        placement
    });

    // Peers restart from their saved identities, without tokens.
    for i in 0..6 {
        let name = c.restart_peer(i, "64M", &format!("room{i}"));
        assert!(names.contains(&name), "peer {i} came back as {name}");
    }
    let s = c.wait_all_up(6);
    assert!(s.peers.iter().all(|p| p.used == stored_len(16)), "{s:#?}");
    rt.block_on(async {
        let client = c.client();
        for (i, slot) in placement.peers.iter().enumerate() {
            let got = client.get_shard(&addr_of(&c, &slot.addr.name), key(spec.id, id, i), &seg.root).await;
            assert_eq!(&got.unwrap()[..], &seg.shards[i][..]);
        }
    });

    // The directory restarts with its state: peers, volume, root, segment
    // records (and peer ids).
    c.restart_directory();
    let s = c.wait_all_up(6);
    assert_eq!(s.volumes.len(), 1);
    assert_eq!(s.volumes[0].record.spec, spec);
    assert_eq!(s.volumes[0].segments, 1);
    rt.block_on(async {
        let client = c.client();
        let root = client.root("photos").await.unwrap().expect("committed");
        assert_eq!((root.epoch, root.commit), (1, 1));
        let records = client.segment_records("photos", vec![id]).await.unwrap();
        let record = records[0].clone().expect("the segment's record");
        let ids: Vec<u16> = placement.peers.iter().map(|s| s.id).collect();
        assert_eq!((record.peers, record.shard_blocks, record.root), (ids.clone(), 16, seg.root.0));
        let slots = client.peer_slots(ids).await.unwrap();
        let names: Vec<String> = slots.into_iter().map(|s| s.unwrap().addr.name).collect();
        let placed: Vec<String> = placement.peers.iter().map(|s| s.addr.name.clone()).collect();
        assert_eq!(names, placed);
        let info = client.volume_info("photos").await.unwrap();
        assert_eq!((info.health.segments, info.health.whole), (1, 1));
        assert_eq!(info.allocated, 6 * stored_len(16));
    });

    // The table for people names every peer.
    let cred = c.admin_cred();
    let (ok, table, err) = c.cli(&["status", "--credential", cred.to_str().unwrap()]);
    assert!(ok, "{err}");
    // First the verdict: one segment, whole on six peers in six domains.
    assert!(table.starts_with("HEALTH_OK\ncluster home: 6 peers (6 up)"), "{table}");
    assert!(table.contains("\nsegments: 1 segments (") && table.contains("): 1 whole\n"), "{table}");
    for n in &names {
        assert!(table.contains(n), "{table}");
    }
    assert!(table.contains("photos") && table.contains("4+2"), "{table}");
}

#[test]
fn nodes_without_a_valid_certificate_or_token_are_refused_with_clear_messages() {
    let mut c = Cluster::start("home", &[]);
    let first = c.add_peer("16M", "a");

    let refused = |c: &Cluster, i: usize, token: &str| -> String {
        let mut p = Proc::spawn("refused peer", &mut c.peer_command(i, Some(token), "16M", "b"));
        let (status, out) = p.wait_exit(Duration::from_secs(30));
        assert!(!status.success(), "peer {i} was let in:\n{out}");
        out
    };

    // A used token.
    let token = c.token("peer", "10m");
    let mut p = Proc::spawn("peer", &mut c.peer_command(10, Some(&token), "16M", "b"));
    p.wait_for(" listening on ", Duration::from_secs(20));
    let out = refused(&c, 11, &token);
    assert!(out.contains("unknown or already used join token"), "{out}");
    // An expired one.
    let expired = c.token("peer", "1s");
    std::thread::sleep(Duration::from_millis(2500));
    let out = refused(&c, 12, &expired);
    assert!(out.contains("expired"), "{out}");
    // One made for a client.
    let out = refused(&c, 13, &c.token("client", "10m"));
    assert!(out.contains("this join token is for a client"), "{out}");
    // A malformed one.
    let out = refused(&c, 14, "mdjoin-home-123");
    assert!(out.contains("not a meshdisk join token"), "{out}");
    // No identity and no token at all.
    let mut p2 =
        Proc::spawn("no token", c.peer_command(15, None, "16M", "b").env_remove("MESHDISK_JOIN_TOKEN"));
    let (status, out) = p2.wait_exit(Duration::from_secs(20));
    assert!(!status.success() && out.contains("has no peer identity yet"), "{out}");

    // Another cluster: its token does not fit this directory (the CA pin),
    // and its members are strangers here.
    let mut other = Cluster::start("work", &[]);
    let foreign = other.token("peer", "10m");
    let out = refused(&c, 16, &foreign);
    assert!(out.contains("the directory's CA is not the one the join token names"), "{out}");
    other.add_peer("16M", "x");
    let stranger_dir = other.peer_dir(0);
    other.peers[0].stop();
    let mut stranger = Proc::spawn(
        "stranger",
        std::process::Command::new(common::meshdisk_bin())
            .args([
                "peer",
                "--directory",
                &c.dir_addr,
                "--capacity",
                "16M",
                "--listen",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(&stranger_dir),
    );
    let (status, out) = stranger.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{out}");
    assert!(out.contains("refused this peer") && out.contains("another cluster"), "{out}");

    // The other cluster's admin credential against this directory.
    let mut foreign_admin = other.credential();
    foreign_admin.directory = c.dir_addr.clone();
    let path = c.root.path().join("foreign.cred");
    foreign_admin.save(&path).unwrap();
    let (ok, _, err) = c.cli(&["status", "--credential", path.to_str().unwrap()]);
    assert!(!ok && err.contains("belongs to another cluster"), "{err}");

    // A self-made certificate with an admin's name, and our CA as trust.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["admin.admin.home.meshdisk.invalid".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let mut forged = c.credential();
    forged.cert_pem = cert.pem();
    forged.key_pem = key.serialize_pem();
    let path = c.root.path().join("forged.cred");
    forged.save(&path).unwrap();
    let (ok, _, err) = c.cli(&["status", "--credential", path.to_str().unwrap()]);
    assert!(!ok && err.contains("does not accept this node's certificate"), "{err}");
    let dir_log = c.directory.output();
    assert!(dir_log.contains("refused a connection"), "{dir_log}");

    // No certificate at all: the directory answers only joins, peers
    // nothing.
    let rt = runtime();
    rt.block_on(async {
        use meshdisk::api::{DirRequest, DirResponse};
        use meshdisk::transport::rpc::{Pool, endpoint};
        use meshdisk::transport::tls::join_client_config;
        let cred = c.credential();
        let pin =
            meshdisk::membership::ca::ca_pin(&meshdisk::membership::ca::pem_certs(&cred.ca_pem).unwrap()[0]);
        let ep = endpoint("127.0.0.1:0".parse().unwrap(), None, join_client_config(&pin).unwrap()).unwrap();
        let pool = Pool::new(ep);
        let (resp, _): (DirResponse, _) = pool
            .call(
                cred.directory_addr().unwrap(),
                &cred.directory_name(),
                &DirRequest::Status,
                vec![],
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        match resp {
            DirResponse::Error(e) => {
                assert_eq!(e.kind, ErrorKind::Refused);
                assert!(e.message.contains("no certificate from this cluster"), "{}", e.message);
            }
            other => panic!("a node without a certificate got {other:?}"),
        }
        let peer = addr_of(&c, &first);
        let err = pool
            .call::<_, DirResponse>(
                peer.addr,
                &meshdisk::membership::ca::node_name(
                    &peer.name,
                    meshdisk::membership::ca::Role::Peer,
                    "home",
                ),
                &DirRequest::Status,
                vec![],
                Duration::from_secs(10),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
    });
    // A client joins with a client token and can then ask for the status;
    // its credential is private and never overwritten.
    let (path, said) = c.join_client("laptop");
    assert!(said.contains("joined cluster home as client laptop"), "{said}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let (ok, out, err) = c.cli(&["status", "--json", "--credential", path.to_str().unwrap()]);
    assert!(ok && out.contains("\"cluster\": \"home\""), "{err}");
    let again = c.token("client", "10m");
    let (ok, _, err) = c.cli(&[
        "join",
        "--directory",
        &c.dir_addr,
        "--token",
        &again,
        "--credential",
        path.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("exists already"), "{err}");
    // A client may not make tokens.
    let (ok, _, err) = c.cli(&["token", "create", "--credential", path.to_str().unwrap()]);
    assert!(!ok && err.contains("a client may not do that"), "{err}");

    // A peer's credential may read shards but not write or erase them,
    // and may not see volumes.
    let peer_cred =
        meshdisk::membership::credential::Credential::load(&c.peer_dir(0).join("identity.cred")).unwrap();
    rt.block_on(async {
        let as_peer = meshdisk::client::Client::new(peer_cred).unwrap();
        let target = addr_of(&c, &first);
        let (id, seg) = segment([6; 16], 1, 1);
        let err = as_peer.put_shard(&target, Bytes::from(seg.shards[0].clone()), 1).await.unwrap_err();
        assert!(
            err.kind() == Some(ErrorKind::Refused) && err.to_string().contains("a peer may not do that"),
            "{err}"
        );
        let err = as_peer.delete_shard(&target, self::key([6; 16], id, 0), u64::MAX).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Refused), "{err}");
        let err = as_peer.status().await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Refused), "{err}");
    });

    // Through all of it, the members kept working.
    c.wait_status("2 peers up", Duration::from_secs(10), |s| {
        s.peers.len() == 2 && s.peers.iter().all(|p| p.state == PeerState::Up)
    });
}

#[test]
fn corrupt_shards_on_disk_are_detected_and_a_full_peer_refuses_clearly() {
    let mut c = Cluster::start("home", &[]);
    let name = c.add_peer("300K", "a");
    c.wait_all_up(1);
    let rt = runtime();
    let peer = addr_of(&c, &name);
    let volume = [5u8; 16];
    let one = stored_len(16);
    rt.block_on(async {
        let client = c.client();
        let mut stored = Vec::new();
        for n in 1..=4 {
            let (id, seg) = segment(volume, n, 16);
            client.put_shard(&peer, Bytes::from(seg.shards[0].clone()), 1).await.unwrap();
            stored.push((id, seg));
        }
        // 4 × (64 KiB + header) are stored; a fifth does not fit in 300 KiB.
        let (_, seg) = segment(volume, 9, 16);
        let err = client.put_shard(&peer, Bytes::from(seg.shards[0].clone()), 1).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Full), "{err}");
        assert!(err.to_string().contains("store is full"), "{err}");

        // Flip one payload byte of the first shard on the peer's disk.
        let file = c.peer_dir(0).join("store/data/00000001.dat");
        let mut bytes = std::fs::read(&file).unwrap();
        let (id0, seg0) = &stored[0];
        let header = seg0.shards[0].len() - 16 * BLOCK_SIZE;
        assert_eq!(&bytes[..header], &seg0.shards[0][..header], "the first shard starts the data file");
        bytes[header + 1000] ^= 0x01;
        std::fs::write(&file, &bytes).unwrap();
        let err = client.get_shard(&peer, key(volume, *id0, 0), &seg0.root).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Corrupt), "{err}");
        assert!(err.to_string().contains("corrupt"), "{err}");
        // The others still read.
        let (id1, seg1) = &stored[1];
        client.get_shard(&peer, key(volume, *id1, 0), &seg1.root).await.unwrap();
    });
    let s = c.wait_status("used space reported", Duration::from_secs(10), |s| s.peers[0].used == 4 * one);
    assert_eq!(s.peers[0].capacity, 300 << 10);
}

#[test]
fn placement_spreads_over_peers_and_failure_domains_and_refuses_what_cannot_fit() {
    let mut c = Cluster::start("home", &[]);
    for i in 0..6 {
        c.add_peer("64M", &format!("house{}", i / 2));
    }
    c.wait_all_up(6);
    let domain_of: std::collections::HashMap<String, String> =
        c.status().peers.into_iter().map(|p| (p.name, p.failure_domain)).collect();
    let rt = runtime();
    rt.block_on(async {
        let client = c.client();
        client.create_volume(volume("wide", 4, 2)).await.unwrap();
        client.create_volume(volume("narrow", 2, 1)).await.unwrap();
        let wide = client.acquire_lease("wide", false, None).await.unwrap().epoch;
        let narrow = client.acquire_lease("narrow", false, None).await.unwrap().epoch;
        for p in client.place_segments("wide", wide, 40, 1 << 20, vec![], 0).await.unwrap() {
            let mut peers: Vec<&str> = p.peers.iter().map(|s| s.addr.name.as_str()).collect();
            peers.sort_unstable();
            peers.dedup();
            assert_eq!(peers.len(), 6, "two shards of a segment on one peer: {p:?}");
            let mut per_domain = std::collections::HashMap::new();
            for s in &p.peers {
                *per_domain.entry(domain_of[&s.addr.name].clone()).or_insert(0) += 1;
            }
            assert!(per_domain.values().all(|&n| n == 2), "uneven domains: {per_domain:?}");
        }
        for p in client.place_segments("narrow", narrow, 40, 1 << 20, vec![], 0).await.unwrap() {
            let mut domains: Vec<&str> = p.peers.iter().map(|s| domain_of[&s.addr.name].as_str()).collect();
            domains.sort_unstable();
            domains.dedup();
            assert_eq!(domains.len(), 3, "three shards, three domains: {p:?}");
        }

        // Seven shards go to the six peers there are (one is left for
        // repair), never two on one peer.
        let mut too_wide = volume("toowide", 5, 2);
        too_wide.id[15] = 1;
        client.create_volume(too_wide).await.unwrap();
        let epoch = client.acquire_lease("toowide", false, None).await.unwrap().epoch;
        let p = client.place_segments("toowide", epoch, 1, 1 << 20, vec![], 0).await.unwrap();
        let mut peers: Vec<u16> = p[0].peers.iter().map(|s| s.id).collect();
        peers.sort_unstable();
        peers.dedup();
        assert_eq!(peers.len(), 6, "{p:?}");
        // Shards larger than any peer's free space: the cluster is full.
        let err = client.place_segments("toowide", epoch, 1, 65 << 20, vec![], 0).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Full), "{err}");
    });
}

#[test]
fn a_killed_peer_is_down_within_the_timeout_and_up_when_restarted() {
    let mut c = Cluster::start("home", &["--peer-timeout", "2s"]);
    for i in 0..3 {
        c.add_peer("16M", &format!("d{i}"));
    }
    let s = c.wait_all_up(3);
    let victim = s.peers[0].name.clone();
    let i = (0..3).find(|&i| c.peers[i].output().contains(&format!("peer {victim} listening"))).unwrap();
    c.peers[i].signal(libc::SIGKILL);
    let killed = Instant::now();
    c.wait_status("the killed peer is down", Duration::from_secs(6), |s| {
        s.peers.iter().any(|p| p.name == victim && p.state == PeerState::Down)
    });
    let took = killed.elapsed();
    assert!(took <= Duration::from_millis(3500), "reported down after {took:?} (timeout 2 s)");
    let s = c.status();
    assert_eq!(s.peers.iter().filter(|p| p.state == PeerState::Up).count(), 2);

    let name = c.restart_peer(i, "16M", &format!("d{i}"));
    assert_eq!(name, victim);
    c.wait_all_up(3);
}

/// Segment shards (second design) on real peers: a 4+2 segment's shards
/// put through the client, random block ranges read back with their proofs
/// and checked against the data area, then one peer's copy rots on disk:
/// that peer refuses block reads as corrupt, the others still serve.
#[test]
fn segment_shards_are_stored_proved_and_rot_is_refused_by_the_peer_holding_it() {
    use meshdisk::codec::segment::{
        SegmentGeometry, SegmentId, SegmentShardKey, encode_segment, parse_segment_shard,
    };

    let mut c = Cluster::start("home", &[]);
    let names: Vec<String> = (0..6).map(|i| c.add_peer("64M", &format!("room{i}"))).collect();
    c.wait_all_up(6);
    let rt = runtime();
    let (k, n) = (4usize, 16u32);
    let g = SegmentGeometry::new(k, 2, n).unwrap();
    let volume = [9u8; 16];
    let data = common::pattern(11, g.data_area_len());
    let seg = encode_segment(g, &volume, SegmentId::new(3, 1).unwrap(), &data).unwrap();
    let peers: Vec<PeerAddr> = names.iter().map(|name| addr_of(&c, name)).collect();
    let key =
        |index: usize| SegmentShardKey { volume, segment: SegmentId::new(3, 1).unwrap(), index: index as u8 };
    let root = |index: usize| parse_segment_shard(&seg.shards[index]).unwrap().0.own_root();
    // Data-area block b lives in data shard b / n: check a range of it.
    let expect = |index: usize, first: u32, count: u32| {
        let start = (index * n as usize + first as usize) * 4096;
        data[start..start + count as usize * 4096].to_vec()
    };
    rt.block_on(async {
        let client = c.client();
        for (i, shard) in seg.shards.iter().enumerate() {
            client.put_shard(&peers[i], Bytes::from(shard.clone()), 1).await.unwrap();
        }
        // Whole shards come back verified against the segment root.
        for (i, shard) in seg.shards.iter().enumerate() {
            let got = client.get_shard(&peers[i], key(i), &seg.root).await.unwrap();
            assert_eq!(&got[..], &shard[..]);
        }
        // Headers alone: every shard root, checked against the segment root.
        for (i, peer) in peers.iter().enumerate().take(seg.shards.len()) {
            let h = client.get_shard_header(peer, key(i), &seg.root).await.unwrap();
            assert_eq!(usize::from(h.index), i);
            assert_eq!(h.own_root(), root(i));
            assert_eq!(h.segment_root(), seg.root);
        }
        let mut other = seg.root;
        other.0[0] ^= 1;
        let err = client.get_shard_header(&peers[0], key(0), &other).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Corrupt), "{err}");
        // Random block ranges of the data shards, checked against the data area.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |bound: u32| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % u64::from(bound)) as u32
        };
        for _ in 0..40 {
            let i = next(k as u32) as usize;
            let first = next(n);
            let count = 1 + next(n - first);
            let got = client.get_blocks(&peers[i], key(i), &root(i), n, first, count).await.unwrap();
            assert_eq!(got, expect(i, first, count), "shard {i} blocks {first}+{count}");
        }
        // The client returns nothing it cannot verify: the wrong root is refused.
        let err = client.get_blocks(&peers[0], key(0), &root(1), n, 0, 1).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Corrupt), "{err}");
        let err = client.get_shard(&peers[0], key(1), &seg.root).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::NotFound), "{err}");

        // Rot: flip a byte in every block of peer 1's copy, on its disk.
        let file = c.peer_dir(1).join("store/data/00000001.dat");
        let mut bytes = std::fs::read(&file).unwrap();
        assert_eq!(&bytes[..], &seg.shards[1][..], "the shard is the data file");
        let header = seg.shards[1].len() - g.shard_len();
        for b in 0..n as usize {
            bytes[header + b * 4096 + 7] ^= 0x20;
        }
        std::fs::write(&file, &bytes).unwrap();
        for (first, count) in [(0, 1), (5, 3), (0, n)] {
            let err = client.get_blocks(&peers[1], key(1), &root(1), n, first, count).await.unwrap_err();
            assert_eq!(err.kind(), Some(ErrorKind::Corrupt), "{err}");
            assert!(err.to_string().contains("corrupt"), "{err}");
        }
        let err = client.get_shard(&peers[1], key(1), &seg.root).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Corrupt), "{err}");
        // The others still serve.
        for i in [0, 2, 3] {
            let got = client.get_blocks(&peers[i], key(i), &root(i), n, 2, 4).await.unwrap();
            assert_eq!(got, expect(i, 2, 4));
        }
        // Deleting is fenced: an older epoch is refused.
        assert!(client.delete_shard(&peers[0], key(0), 2).await.unwrap());
        let err = client.delete_shard(&peers[0], key(0), 1).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Fenced), "{err}");
    });
}

/// Collection on a real cluster: a dropped segment's shards and orphan
/// shards (put with no record, below and above the root's highest segment)
/// are erased after the grace; the live segment stays; a peer stopped
/// during the erasure gets its share erased once it is back; the erasures
/// never fence the volume's writer.
#[test]
fn dropped_segments_and_orphans_are_erased_after_the_grace_even_from_a_peer_that_was_away() {
    let grace = Duration::from_secs(3);
    let mut c = Cluster::start(
        "home",
        &[
            "--drop-grace",
            "3s",
            "--collect-grace",
            "3s",
            "--reconcile-every",
            "1s",
            "--peer-timeout",
            "2s",
            "--lease-ttl",
            "60s",
        ],
    );
    let names: Vec<String> = (0..6).map(|i| c.add_peer("64M", &format!("room{i}"))).collect();
    c.wait_all_up(6);
    let rt = runtime();
    let spec = volume("trash", 4, 2);
    let id = |n: u64| SegmentId::new(1, n).unwrap();
    // Segment 1 stays; 5 is committed then dropped; 3 (below the root's
    // highest, 5) and 9 (above) are put without a record.
    let segs: Vec<(SegmentId, EncodedSegment)> = [1, 5, 3, 9].map(|n| segment(spec.id, n, 4)).into();
    // Nothing may be erased before this plus the grace: the orphans are
    // put and the segment dropped after it.
    let t0 = Instant::now();
    let (client, record, epoch, placement) = rt.block_on(async {
        let client = c.client();
        let record = client.create_volume(spec.clone()).await.unwrap();
        let lease = client.acquire_lease("trash", false, None).await.unwrap();
        assert_eq!(lease.epoch, 1);
        // Every segment on all six peers, shard i on the same peer.
        let placement = client.place_segments("trash", 1, 1, stored_len(4), vec![], 0).await.unwrap();
        let placement = placement.into_iter().next().unwrap();
        let store = common::cluster::store_and_commit;
        assert_eq!(store(&client, &record, 1, None, &placement, segs[0].0, &segs[0].1).await, 1);
        assert_eq!(store(&client, &record, 1, Some((1, 1)), &placement, segs[1].0, &segs[1].1).await, 2);
        for (_, seg) in &segs[2..] {
            for (shard, slot) in seg.shards.iter().zip(&placement.peers) {
                client.put_shard(&slot.addr, Bytes::from(shard.clone()), 1).await.unwrap();
            }
        }
        client.drop_segments("trash", 1, vec![id(5)]).await.unwrap();
        let info = client.volume_info("trash").await.unwrap();
        assert_eq!(info.collecting.segments, 1);
        assert_eq!(info.collecting.bytes, 6 * stored_len(4));
        (client, record, lease.epoch, placement)
    });
    let holder_of = |name: &str| placement.peers.iter().position(|s| s.addr.name == name).unwrap();
    // The peer that will be away: stopped before the grace is over.
    let away = 5;
    let away_index = holder_of(&names[away]);
    c.peers[away].stop();

    let shards_on = |c: &Cluster, name: &str| {
        rt.block_on(async {
            let mut keys = client.list_shards(&addr_of(c, name), spec.id, None, 1000).await.unwrap();
            keys.sort();
            keys
        })
    };
    let only_live = |name: &str| vec![key(spec.id, id(1), holder_of(name))];
    // On the five that stayed, everything but segment 1 goes, after the
    // grace and not before.
    let deadline = Instant::now() + Duration::from_secs(40);
    for (i, name) in names.iter().enumerate() {
        if i == away {
            continue;
        }
        loop {
            let keys = shards_on(&c, name);
            if keys == only_live(name) {
                break;
            }
            assert!(
                keys.len() == 4 || t0.elapsed() >= grace,
                "{name} lost shards within the grace ({:?}): {keys:?}",
                t0.elapsed()
            );
            assert!(Instant::now() < deadline, "{name} still holds {keys:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The dropped segment waits for the peer that is away.
    rt.block_on(async {
        let info = client.volume_info("trash").await.unwrap();
        assert_eq!(info.collecting.segments, 1, "the entry waits for {}", names[away]);
        assert_eq!(info.health.segments, 1);
    });

    // Back: its shards of 5, 3 and 9 go too; its shard of 1 stays.
    let name = c.restart_peer(away, "64M", &format!("room{away}"));
    assert_eq!(name, names[away]);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let keys = shards_on(&c, &name);
        let left = rt.block_on(client.volume_info("trash")).unwrap().collecting.segments;
        if keys == vec![key(spec.id, id(1), away_index)] && left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{name} still holds {keys:?}; {left} dropped segments left");
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = c.status();
    let collector = s.workers.iter().find(|w| w.name == "collector").unwrap();
    let progress = collector.progress.clone().unwrap();
    assert!(progress.starts_with("6 shards of dropped segments erased"), "{progress}");
    assert!(progress.contains(" orphans found, ") && !progress.contains(" 0 erased"), "{progress}");

    rt.block_on(async {
        // Segment 1 reads back whole from every peer.
        for (i, slot) in placement.peers.iter().enumerate() {
            let peer = addr_of(&c, &slot.addr.name);
            let got = client.get_shard(&peer, key(spec.id, id(1), i), &segs[0].1.root).await.unwrap();
            assert_eq!(&got[..], &segs[0].1.shards[i][..]);
        }
        // A commit that was in flight all along cannot record segment 9
        // (above the root's highest, 5, but not above the floor).
        let late = meshdisk::api::SegmentRecord {
            peers: placement.peers.iter().map(|s| s.id).collect(),
            shard_blocks: 4,
            root: segs[3].1.root.0,
        };
        let refs = vec![meshdisk::codec::root::SegmentRef { id: id(9), root: segs[3].1.root }];
        let commit = common::cluster::root_commit(&record, 1, Some((1, 2)), refs, vec![(id(9), late)]);
        let err = client.commit_root(commit).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Invalid), "{err}");
        assert!(err.to_string().contains("not above"), "{err}");
        // The writer at epoch 1 is not fenced: it still puts and commits,
        // above the floor the collector raised for segment 9.
        let (next, seg) = segment(spec.id, 10, 4);
        // (Placed again: the restarted peer has a new address.)
        let fresh = client.place_segments("trash", epoch, 1, stored_len(4), vec![], 0).await.unwrap();
        let fresh = fresh.into_iter().next().unwrap();
        let done =
            common::cluster::store_and_commit(&client, &record, epoch, Some((1, 2)), &fresh, next, &seg)
                .await;
        assert_eq!(done, 3);
    });
}
