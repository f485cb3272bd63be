//! Tampering, end to end (issue 12): a directory and six peers as real
//! processes, `meshdisk attach` serving the volume of the second design,
//! and what each of them stores altered on disk between runs, as a
//! dishonest or restored-from-backup machine would serve it.
//!
//! ```text
//! the directory's root record altered    ─► attach refused: MAC mismatch
//! an older valid root replayed           ─► refused by a folder that saw
//!                                           a newer one (freshness note);
//!                                           a new folder cannot tell
//! a summary or checkpoint segment forged ─► attach refused: the segment's
//!   on every holder                         shards do not match its root
//! a peer serving a segment's previous    ─► the read decodes around it and
//!   shard under the new segment's name      returns the new data; the
//!                                           peer is named in the log
//! ```
//!
//! The peers' forgeries are made the way a lying peer would make them, so
//! that the peer's own checks (the shard's header names the key asked for,
//! its payload hashes to its own root) pass and only the reader's checks
//! against the MAC'd root can catch them: another segment's shard is
//! relabelled with the target segment's id and indexed under its key.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Proc};
use common::{have_tools, meshdisk_bin, nbdsh, pattern};
use meshdisk::codec::root::{RootKey, RootRecord};
use meshdisk::codec::sequence::SegmentId;

const VOLUME: &str = "disk";
const PEERS: usize = 6;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A cluster of six peers (one failure domain each) with volume `disk`
/// (16 MiB, k=4, m=2, 64 KiB shards).
struct Setup {
    c: Cluster,
    rt: tokio::runtime::Runtime,
}

impl Setup {
    fn new() -> Self {
        // No audits: these tests are about what the reader itself checks
        // and says, before anything else heals what it tampered with (the
        // directory's audits of readers' reports are tests/drain.rs's).
        let mut c = Cluster::start("tamper", &["--lease-ttl", "4s", "--audit-every", "0"]);
        for i in 0..PEERS {
            c.add_peer("2G", &format!("disk{i}"));
        }
        c.wait_all_up(PEERS);
        c.create_volume(VOLUME, "16M", 4, 2);
        Self { c, rt: runtime() }
    }

    fn key_file(&self) -> PathBuf {
        self.c.root.path().join(format!("{VOLUME}.key"))
    }

    fn folder(&self, name: &str) -> PathBuf {
        self.c.root.path().join(name)
    }

    fn attach_command(&self, folder: &str, extra: &[&str]) -> Command {
        let state = self.folder(folder);
        let mut cmd = Command::new(meshdisk_bin());
        cmd.args(["attach", VOLUME, "--credential"])
            .arg(self.c.admin_cred())
            .arg("--key-file")
            .arg(self.key_file())
            .arg("--cache-dir")
            .arg(&state)
            .arg("--socket")
            .arg(state.join("nbd.sock"))
            .args(["--cache-size", "16M"])
            .args(extra);
        cmd
    }

    /// Attaches from `folder`; waits until it serves; its process and URI.
    fn attach(&self, folder: &str, extra: &[&str]) -> (Proc, String) {
        let mut proc = Proc::spawn(&format!("attach-{folder}"), &mut self.attach_command(folder, extra));
        let uri = proc.wait_for("nbd+unix://", Duration::from_secs(60)).trim().to_owned();
        (proc, uri)
    }

    /// `meshdisk detach`; the attach must exit 0.
    fn detach(&self, folder: &str, mut proc: Proc) {
        let state = self.folder(folder);
        let (ok, _, err) = self.c.cli(&["detach", VOLUME, "--cache-dir", state.to_str().unwrap()]);
        assert!(ok, "detach failed: {err}");
        let (status, out) = proc.wait_exit(Duration::from_secs(60));
        assert!(status.success(), "attach did not stop cleanly: {out}");
    }

    /// Attaches from `folder` expecting a refusal: fails the test if the
    /// volume is ever served; returns what the attach said. (`--force`:
    /// a refused attach took the lease before it was refused and never
    /// gives it back, so the next try must take it over.)
    fn refused(&self, folder: &str) -> String {
        let mut proc =
            Proc::spawn(&format!("refused-{folder}"), &mut self.attach_command(folder, &["--force"]));
        let start = Instant::now();
        loop {
            let out = proc.output();
            assert!(!out.contains("nbd+unix://"), "the attach from {folder} served the volume:\n{out}");
            if let Ok(Some(status)) = proc.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                let out = proc.output();
                assert!(!status.success(), "the attach from {folder} exited 0:\n{out}");
                assert!(!out.contains("nbd+unix://"), "the attach from {folder} served the volume:\n{out}");
                assert!(!self.folder(folder).join("nbd.sock").exists(), "a socket was made:\n{out}");
                eprintln!("the attach from {folder} was refused:\n{out}");
                return out;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "the attach from {folder} hangs:\n{out}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn volume_id(&self) -> [u8; 16] {
        // The client's endpoint needs the runtime: made inside it.
        self.rt.block_on(async { self.c.client().volume(VOLUME).await }).unwrap().spec.id
    }

    fn data_key(&self) -> meshdisk::codec::VolumeKey {
        self.rt
            .block_on(async { common::cluster::data_key(&self.c.client(), VOLUME, &self.key_file()).await })
    }

    /// The volume's committed root, opened with its key.
    fn root(&self) -> RootRecord {
        let state = self.rt.block_on(async { self.c.client().root(VOLUME).await }).unwrap();
        let state = state.expect("a committed root");
        RootRecord::open(&state.sealed, &RootKey::derive(&self.data_key()), &self.volume_id()).unwrap()
    }

    fn stop_peers(&mut self) {
        for p in &mut self.c.peers {
            p.stop();
        }
    }

    /// Starts every peer again from its folder; returns their names in
    /// order once the directory has them up.
    fn start_peers(&mut self) -> Vec<String> {
        (0..PEERS).map(|i| self.c.restart_peer(i, "2G", &format!("disk{i}"))).collect()
    }
}

/// Writes `data` at `offset` through NBD and flushes (one commit).
fn write_flush(uri: &str, offset: u64, data: &[u8]) {
    let out = nbdsh(uri, &format!("h.pwrite({}, {offset})\nh.flush()\nprint('FLUSHED')", py_bytes(data)));
    assert!(out.contains("FLUSHED"), "{out}");
}

/// `len` bytes at `offset`, as the NBD client gets them; `Err` with what
/// the client said if the read failed.
fn read(uri: &str, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let out = nbdsh(
        uri,
        &format!(
            "try:\n    print('DATA', bytes(h.pread({len}, {offset})).hex())\nexcept nbd.Error as e:\n    print('FAILED', e)"
        ),
    );
    match out.split_once("DATA ") {
        Some((_, hex)) => Ok(hex::decode(hex.trim()).unwrap()),
        None => Err(out),
    }
}

fn py_bytes(data: &[u8]) -> String {
    format!("bytes.fromhex('{}')", hex::encode(data))
}

/// The `segments` table of a peer's shard index (`store/index.redb`,
/// docs/formats.md): volume ‖ segment id (big-endian) ‖ shard index →
/// location (data file u32, offset u64, length u32, little-endian) ‖ the
/// shard's own root ‖ its outboard.
const SEGMENTS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("segments");

/// Shard `index` of segment `segment` of `volume`, as one peer stores it.
#[derive(Clone)]
struct Stored {
    peer: usize,
    entry: Vec<u8>,
    bytes: Vec<u8>,
}

fn index_key(volume: &[u8; 16], segment: SegmentId, index: u8) -> Vec<u8> {
    let mut k = volume.to_vec();
    k.extend_from_slice(&segment.raw().to_be_bytes());
    k.push(index);
    k
}

fn store_dir(c: &Cluster, peer: usize) -> PathBuf {
    c.peer_dir(peer).join("store")
}

fn data_file(store: &Path, id: u32) -> PathBuf {
    store.join("data").join(format!("{id:08}.dat"))
}

/// Every segment shard of `volume` on the (stopped) peers, by (segment,
/// index), with its bytes as stored.
fn stored_shards(c: &Cluster, volume: &[u8; 16]) -> BTreeMap<(SegmentId, u8), Stored> {
    use redb::{ReadableDatabase, ReadableTable};
    let mut out = BTreeMap::new();
    for peer in 0..PEERS {
        let store = store_dir(c, peer);
        let db = redb::Database::open(store.join("index.redb")).unwrap();
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(SEGMENTS).unwrap();
        for row in table.iter().unwrap() {
            let (k, v) = row.unwrap();
            let (k, entry) = (k.value().to_vec(), v.value().to_vec());
            if k.len() != 25 || k[..16] != volume[..] {
                continue;
            }
            let segment = SegmentId::from_raw(u64::from_be_bytes(k[16..24].try_into().unwrap()));
            let file = u32::from_le_bytes(entry[..4].try_into().unwrap());
            let offset = u64::from_le_bytes(entry[4..12].try_into().unwrap());
            let len = u32::from_le_bytes(entry[12..16].try_into().unwrap()) as usize;
            let all = std::fs::read(data_file(&store, file)).unwrap();
            let bytes = all[offset as usize..offset as usize + len].to_vec();
            out.insert((segment, k[24]), Stored { peer, entry, bytes });
        }
    }
    out
}

/// Makes peer `peer` (stopped) hold `donor`'s shard relabelled as shard
/// `index` of segment `target`: its bytes with the header's segment id
/// replaced, in a data file of their own, indexed under the target's key
/// with the donor's root and outboard. The peer's own checks pass (the
/// header names the key, the payload hashes to the indexed root); only
/// the segment root can tell. Returns the entry it replaced.
fn plant(
    c: &Cluster,
    peer: usize,
    volume: &[u8; 16],
    target: SegmentId,
    index: u8,
    donor: &Stored,
) -> Vec<u8> {
    let mut bytes = donor.bytes.clone();
    assert_eq!(bytes[36], index, "the donor is shard {index} too: its index is outside the segment root");
    bytes[24..32].copy_from_slice(&target.raw().to_le_bytes());
    let store = store_dir(c, peer);
    let file = (90_000_000..).find(|&id| !data_file(&store, id).exists()).unwrap();
    std::fs::write(data_file(&store, file), &bytes).unwrap();
    let mut entry = file.to_le_bytes().to_vec();
    entry.extend_from_slice(&0u64.to_le_bytes());
    entry.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    entry.extend_from_slice(&donor.entry[16..]);
    put_entry(c, peer, &index_key(volume, target, index), &entry)
}

/// Replaces one entry of a stopped peer's index; returns the old one.
fn put_entry(c: &Cluster, peer: usize, key: &[u8], entry: &[u8]) -> Vec<u8> {
    let db = redb::Database::open(store_dir(c, peer).join("index.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    let old = {
        let mut table = txn.open_table(SEGMENTS).unwrap();
        let old = table.insert(key, entry).unwrap().map(|v| v.value().to_vec());
        old.expect("the peer held that shard")
    };
    txn.commit().unwrap();
    old
}

/// 1. The directory's copy of the root altered (one byte of a segment
///    root it names): the MAC catches it, whoever attaches.
#[test]
fn a_tampered_root_record_is_refused() {
    use meshdisk::directory::meta::{MetaStore, Op, Txn};
    if !have_tools(&["nbdsh"]) {
        return;
    }
    let mut s = Setup::new();
    let (a, uri) = s.attach("a", &[]);
    write_flush(&uri, 0, &pattern(1, 4096));
    s.detach("a", a);
    let root = s.root();
    assert!(!root.since.is_empty(), "the commit named its segment: {root:?}");

    // The directory is stopped; its store is opened as it opens it.
    let key = format!("roots/{}", hex::encode(s.volume_id())).into_bytes();
    s.c.directory.stop();
    let path = s.c.root.path().join("directory/directory.redb");
    s.rt.block_on(async {
        let store = meshdisk::directory::meta::embedded::RedbStore::open(&path).unwrap();
        let entry = store.get(&key).await.unwrap().expect("the root is stored under roots/<volume id>");
        let mut state: meshdisk::api::RootState = postcard::from_bytes(&entry.value).unwrap();
        // The first segment reference's root: the record still parses,
        // its epoch and commit are unchanged, only the MAC can tell.
        let at = meshdisk::codec::root::FIXED_LEN + 8;
        state.sealed[at] ^= 0x01;
        let put = Op::Put { key: key.clone(), value: postcard::to_allocvec(&state).unwrap(), lease: None };
        assert!(store.txn(Txn::new().then(put)).await.unwrap().succeeded);
    });
    s.c.restart_directory();

    // The folder that wrote it and a new one are both refused.
    for folder in ["a", "b"] {
        let out = s.refused(folder);
        assert!(out.contains("volume disk: root record MAC mismatch: forged, altered"), "{folder}: {out}");
    }
}

/// 2. The directory restored from a copy taken one commit ago: a folder
///    that saw the newer root refuses the older one, naming the rollback.
///    A folder that never attached has nothing to compare with: it trusts
///    the directory, serves the older state, and can even write a fork
///    that the first folder then accepts (see the end: limits asserted as
///    they are).
#[test]
fn an_older_root_replayed_is_refused_by_a_folder_that_saw_a_newer_one() {
    if !have_tools(&["nbdsh"]) {
        return;
    }
    let mut s = Setup::new();
    let (v1, v2) = (pattern(21, 4096), pattern(22, 4096));
    let (a, uri) = s.attach("a", &[]);
    write_flush(&uri, 0, &v1);
    s.detach("a", a);
    let old = s.root();

    // A copy of the directory's folder, taken while it is stopped.
    let live = s.c.root.path().join("directory");
    let copy = s.c.root.path().join("directory.copy");
    s.c.directory.stop();
    copy_dir(&live, &copy);
    s.c.restart_directory();

    let (a, uri) = s.attach("a", &[]);
    write_flush(&uri, 4096, &v2);
    s.detach("a", a);
    let new = s.root();
    assert!((new.epoch, new.commit) > (old.epoch, old.commit), "{old:?} then {new:?}");

    // The copy comes back: the directory offers the older root, whose MAC
    // is fine (it was once the volume's root).
    s.c.directory.stop();
    std::fs::remove_dir_all(&live).unwrap();
    std::fs::rename(&copy, &live).unwrap();
    s.c.restart_directory();
    assert_eq!(s.root(), old, "the directory serves the older root again");

    // Folder A refuses it twice over. The directory grants an epoch A has
    // already seen (its counter went back too): named as a directory that
    // went back in time.
    let out = s.refused("a");
    let named = format!(
        "the directory granted epoch {}, but {} already saw epoch {}: the directory's state went back in time",
        new.epoch,
        s.c.root.path().join("a").display(),
        new.epoch
    );
    assert!(out.contains(&named), "{out}");
    // The refused attach gave its lease back, so the next grant is above
    // every epoch A saw; the root offered is still older than A's newest.
    let out = s.refused("a");
    let named = format!(
        "the offered root (epoch {}, commit {}) is older than the one this folder has already seen (epoch {}, commit {}): refusing a rolled-back volume",
        old.epoch, old.commit, new.epoch, new.commit
    );
    assert!(out.contains(&named), "{out}");

    // What a new folder cannot detect: it has no freshness note, so the
    // directory's root is the newest it knows. It attaches and serves the
    // state of the older commit (the newer write is not there). Only a
    // folder that has seen a root can refuse an older one; this asserts
    // the limit as it is (docs: `Freshness`), so a change to it is noticed.
    let (b, uri) = s.attach("new", &["--force"]);
    assert!(read(&uri, 0, 4096).unwrap() == v1, "the older commit's block");
    assert!(
        read(&uri, 4096, 4096).unwrap() == vec![0; 4096],
        "the newer commit's write is not in the older root"
    );
    // Worse, it can write: its lease epoch is above every epoch the peers
    // have seen (the directory's counter went back, then up twice), so the
    // peers take its shards, and its commit is (newer epoch, same commit
    // number) as the root folder A saw. Folder A then accepts that fork as
    // newer, and A's write that the rollback lost stays lost.
    let v3 = pattern(23, 4096);
    write_flush(&uri, 8192, &v3);
    let fork = s.root();
    assert!(fork.epoch > new.epoch && fork.commit == new.commit, "{new:?} then {fork:?}");
    s.detach("new", b);
    let (a, uri) = s.attach("a", &["--force"]);
    assert!(read(&uri, 4096, 4096).unwrap() == vec![0; 4096], "A's write lost in the fork");
    assert!(read(&uri, 8192, 4096).unwrap() == v3, "the fork's write");
    s.detach("a", a);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// 3. The segments a root reaches forged on every holder (so they cannot
///    be decoded around): first a segment whose summary the attach reads,
///    then the checkpoint's. Each attach is refused, naming the segment
///    and the root mismatch; with the peers' entries put back, the volume
///    attaches and reads as written.
#[test]
fn a_forged_summary_or_checkpoint_segment_is_refused() {
    use meshdisk::backend::Backend;
    use meshdisk::volume::v2::{Config, Volume};
    if !have_tools(&["nbdsh"]) {
        return;
    }
    let mut s = Setup::new();
    let key = s.data_key();
    // The CLI has no knob for how often a checkpoint is written: the
    // library writes the volume (a real client of the real cluster), with
    // a checkpoint whenever the root would name more than two segments,
    // one block and one commit at a time: the third commit writes one, the
    // fourth a segment after it.
    let mut config = Config::new(s.folder("writer"), 1 << 20);
    config.checkpoint_segments = 2;
    let mut written = Vec::new();
    s.rt.block_on(async {
        let v = Volume::open(s.c.client(), VOLUME, &key, config).await.unwrap();
        for i in 0..4u64 {
            let data = pattern(100 + i, 4096);
            v.write(i * 4096, bytes::Bytes::from(data.clone()), false).await.unwrap();
            v.flush().await.unwrap();
            written.push(data);
        }
        v.close(Duration::from_secs(30)).await.unwrap();
    });
    let root = s.root();
    let checkpoint = root.checkpoint.expect("a checkpoint was written").segment.id;
    let summary = root.since.iter().map(|r| r.id).find(|&id| id != checkpoint);
    let summary = summary.unwrap_or_else(|| panic!("a segment after the checkpoint: {root:?}"));

    let volume = s.volume_id();
    s.stop_peers();
    let shards = stored_shards(&s.c, &volume);
    // Segment `target`, every shard, replaced by `donor`'s relabelled.
    let forge = |s: &Setup, target: SegmentId, donor: SegmentId| -> Vec<(usize, Vec<u8>, Vec<u8>)> {
        let mut undo = Vec::new();
        for index in 0..6u8 {
            let holder = shards.get(&(target, index)).expect("every shard stored").peer;
            let from = &shards[&(donor, index)];
            let old = plant(&s.c, holder, &volume, target, index, from);
            undo.push((holder, index_key(&volume, target, index), old));
        }
        undo
    };

    let mut undo = forge(&s, summary, checkpoint);
    s.start_peers();
    let out = s.refused("a");
    for what in [
        format!("the segments since the checkpoint cannot be read: segment {summary}"),
        "does not match the segment root".to_string(),
    ] {
        assert!(out.contains(&what), "forged summary segment: {what:?} not said:\n{out}");
    }

    s.stop_peers();
    undo.extend(forge(&s, checkpoint, summary));
    s.start_peers();
    let out = s.refused("b");
    for what in [
        format!("the segments since the checkpoint cannot be read: the checkpoint: segment {checkpoint}"),
        "does not match the segment root".to_string(),
    ] {
        assert!(out.contains(&what), "forged checkpoint segment: {what:?} not said:\n{out}");
    }

    // The honest entries back: the same folders attach and read it all.
    s.stop_peers();
    for (peer, k, entry) in undo.iter().rev() {
        put_entry(&s.c, *peer, k, entry);
    }
    s.start_peers();
    let (c, uri) = s.attach("b", &["--force"]);
    for (i, data) in written.iter().enumerate() {
        assert!(read(&uri, i as u64 * 4096, 4096).unwrap() == *data, "block {i}");
    }
    s.detach("b", c);
}

/// Every commit's last segment carries a copy of the commit's root
/// (sealed under a key of its own), from which, with the previous root's
/// segments since and the carrier's own root, the root is rebuilt: what a
/// directory rebuilt from the peers would start from. Read from the peers
/// as they store it, commit after commit, through a checkpoint.
#[test]
fn every_commit_carries_a_copy_of_its_root_in_its_last_segment() {
    use meshdisk::api::PeerAddr;
    use meshdisk::backend::Backend;
    use meshdisk::codec::root::{RootCopy, SegmentRef};
    use meshdisk::codec::segment::{SegmentShardKey, parse_segment_shard};
    use meshdisk::codec::xts::SectorCipher;
    use meshdisk::volume::v2::layout::{Trailer, open_metadata};
    use meshdisk::volume::v2::{Config, Volume};

    let s = Setup::new();
    let key = s.data_key();
    let (volume, root_key, cipher) = (s.volume_id(), RootKey::derive(&key), SectorCipher::new(&key));
    let mut config = Config::new(s.folder("writer"), 1 << 20);
    config.checkpoint_segments = 2;
    let mut checkpoints = 0;
    s.rt.block_on(async {
        let client = s.c.client();
        let v = Volume::open(s.c.client(), VOLUME, &key, config).await.unwrap();
        let (mut previous, mut previous_commit): (Vec<SegmentRef>, u64) = (Vec::new(), 0);
        for i in 0..5u64 {
            // A commit of one block, or of several segments' worth.
            let len = if i == 3 { 1 << 20 } else { 4096 };
            v.write(i * 4096, bytes::Bytes::from(pattern(200 + i, len)), false).await.unwrap();
            v.flush().await.unwrap();
            let state = client.root(VOLUME).await.unwrap().unwrap();
            let root = RootRecord::open(&state.sealed, &root_key, &volume).unwrap();
            // The carrier: the root's last segment, read from its holders.
            let carrier = *root.since.last().unwrap();
            let record = client.segment_records(VOLUME, vec![carrier.id]).await.unwrap()[0].clone().unwrap();
            let slots = client.peer_slots(record.peers.clone()).await.unwrap();
            let mut area = Vec::new();
            let mut geometry = None;
            for (index, slot) in slots.iter().enumerate().take(4) {
                let addr: &PeerAddr = &slot.as_ref().unwrap().addr;
                let shard_key = SegmentShardKey { volume, segment: carrier.id, index: index as u8 };
                let shard = client.get_shard(addr, shard_key, &carrier.root).await.unwrap();
                let (header, payload) = parse_segment_shard(&shard).unwrap();
                geometry = Some(header.geometry);
                area.extend_from_slice(payload);
            }
            let g = geometry.unwrap();
            let last = (g.data_blocks() - 1) as u32;
            let mut t = area[last as usize * 4096..].to_vec();
            open_metadata(&cipher, carrier.id, last, &mut t);
            let trailer = Trailer::decode(&t, carrier.id, g).unwrap();
            let copy =
                RootCopy::open(trailer.root_copy(&t).expect("a root copy"), &root_key, &volume).unwrap();
            let wrote_checkpoint = root.checkpoint.is_some_and(|c| c.segment.id == carrier.id);
            checkpoints += usize::from(wrote_checkpoint);
            // The root before it, if this flush was one commit (the
            // committer may also have run on its own).
            let inherited = if wrote_checkpoint {
                &[][..]
            } else if root.commit == previous_commit + 1 {
                &previous[..]
            } else {
                &root.since[..copy.inherited as usize]
            };
            assert_eq!(copy.root(inherited, carrier).unwrap(), root, "commit {i}");
            (previous, previous_commit) = (root.since.clone(), root.commit);
        }
        v.close(Duration::from_secs(30)).await.unwrap();
    });
    assert!(checkpoints >= 1, "a commit that wrote a checkpoint was checked");
}

/// 4. Block 0 overwritten and committed; then the peer holding the new
///    segment's shard 0 serves the previous segment's shard 0 (which
///    holds the block's old version) under the new segment's name. The
///    read returns the new data, decoded from the other shards, never the
///    old; the attach's log names the peer and the segment.
#[test]
fn a_peer_serving_an_old_shard_is_read_around_and_named() {
    if !have_tools(&["nbdsh"]) {
        return;
    }
    let mut s = Setup::new();
    let (old, new) = (pattern(41, 4096), pattern(42, 4096));
    let (a, uri) = s.attach("a", &[]);
    write_flush(&uri, 0, &old);
    write_flush(&uri, 0, &new);
    s.detach("a", a);
    let root = s.root();
    let [.., before, after] = root.since[..] else { panic!("two commits, two segments: {root:?}") };
    let (before, after) = (before.id, after.id);

    let volume = s.volume_id();
    s.stop_peers();
    let shards = stored_shards(&s.c, &volume);
    let (stale, fresh) = (&shards[&(before, 0)], &shards[&(after, 0)]);
    // One block written per commit: each segment is one block per shard,
    // the block at data slot 0 (shard 0), so the stale shard holds the
    // block's old version where the new one holds the new.
    for shard in [stale, fresh] {
        assert_eq!(shard.bytes[32..36], 1u32.to_le_bytes(), "segments of one block per shard");
    }
    let liar = fresh.peer;
    plant(&s.c, liar, &volume, after, 0, stale);
    let names = s.start_peers();

    let (b, uri) = s.attach("b", &[]);
    match read(&uri, 0, 4096) {
        Ok(got) => {
            assert!(got != old, "the old block was served");
            assert!(got == new, "the read returned neither version");
        }
        Err(e) => panic!("the read should decode around one lying peer: {e}"),
    }
    // Named twice: for the header it offered (asked of each holder in
    // turn, until one verifies) and for the old block itself.
    let log = b.output();
    let named = format!("peer {}: segment {after} shard 0:", names[liar]);
    for what in
        ["segment shard header does not match the segment root", "block proof does not match the shard root"]
    {
        assert!(
            log.lines().any(|l| l.contains(&named) && l.contains(what) && l.contains("not trusted")),
            "the liar is not named ({named:?}, {what:?}):\n{log}"
        );
    }
    s.detach("b", b);
}
