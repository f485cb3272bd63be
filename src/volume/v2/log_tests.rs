//! Tests of the local log: replay, torn tails, damage, the folder lock,
//! release, concurrent appends.

use std::path::Path;

use proptest::prelude::*;

use super::log::*;
use crate::codec::key::VolumeKey;
use crate::codec::segment::BLOCK_SIZE;
use crate::codec::sequence::{SegmentId, Sequence};
use crate::sys::uring::Uring;

const VOL: [u8; 16] = [7; 16];

fn key() -> VolumeKey {
    VolumeKey::from_bytes(&(0..64).map(|i| i as u8).collect::<Vec<_>>()).unwrap()
}

fn seq(counter: u64) -> Sequence {
    Sequence::new(3, counter).unwrap()
}

fn blocks(fill: u8, n: usize) -> Vec<u8> {
    (0..n * BLOCK_SIZE).map(|i| fill ^ (i % 251) as u8).collect()
}

fn small() -> LogConfig {
    LogConfig { file_bytes: 64 << 10, max_bytes: 1 << 30 }
}

async fn open(ring: &Uring, dir: &Path, cfg: LogConfig) -> Result<(LocalLog, Replay), LogError> {
    LocalLog::open(dir, &key(), &VOL, ring, cfg).await
}

fn log_file(dir: &Path, n: u32) -> std::path::PathBuf {
    dir.join("log").join(format!("{n:08}.log"))
}

fn base(commit: u64) -> Base {
    Base {
        epoch: 3,
        commit,
        segment_floor: SegmentId::new(3, commit * 10).unwrap(),
        sequence_floor: seq(commit * 100),
    }
}

#[tokio::test]
async fn records_replay_after_a_clean_close_and_read_back_checked() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, replay) = open(&ring, dir.path(), LogConfig::default()).await.unwrap();
    assert_eq!(replay, Replay::default());
    let data = blocks(0xa5, 3);
    let pos = log
        .append(&[
            NewRecord::Base(base(1)),
            NewRecord::Write { address: 40, sequence: seq(101), ciphertext: &data },
            NewRecord::Zero { address: 1000, blocks: 1 << 20, sequence: seq(104) },
        ])
        .await
        .unwrap();
    let more = log.append(&[NewRecord::Committed { sequence: seq(104) }]).await.unwrap();
    log.sync().await.unwrap();
    assert_eq!(pos.len(), 3);
    assert!(pos[0] < pos[1] && pos[1] < pos[2] && pos[2] < more[0]);
    drop(log);

    let (log, replay) = open(&ring, dir.path(), LogConfig::default()).await.unwrap();
    let heads: Vec<RecordHead> = replay.records.iter().map(|(_, h)| *h).collect();
    assert_eq!(
        heads,
        vec![
            RecordHead::Base(base(1)),
            RecordHead::Write { address: 40, blocks: 3, sequence: seq(101) },
            RecordHead::Zero { address: 1000, blocks: 1 << 20, sequence: seq(104) },
            RecordHead::Committed { sequence: seq(104) },
        ]
    );
    assert_eq!(replay.records.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [&pos[..], &more[..]].concat());
    assert_eq!(replay.base, Some((pos[0], base(1))));
    assert_eq!(replay.committed, seq(104));
    assert_eq!(replay.highest_sequence, seq(104));
    assert_eq!(replay.highest_segment, SegmentId::new(3, 10).unwrap());
    assert_eq!(replay.torn, None);

    let mut out = vec![0u8; BLOCK_SIZE];
    for b in 0..3u32 {
        let (address, sequence) = log.read(pos[1], b, &mut out).await.unwrap();
        assert_eq!((address, sequence), (40 + u64::from(b), seq(101 + u64::from(b))));
        assert_eq!(out[..], data[b as usize * BLOCK_SIZE..(b as usize + 1) * BLOCK_SIZE]);
    }
    assert!(matches!(log.read(pos[1], 3, &mut out).await, Err(LogError::BadRecord(_))));
    assert!(matches!(log.read(pos[2], 0, &mut out).await, Err(LogError::BadRecord(_))));
    let (head, whole) = log.read_record(pos[1]).await.unwrap();
    assert_eq!(head, RecordHead::Write { address: 40, blocks: 3, sequence: seq(101) });
    assert_eq!(whole.ciphertext(), data);
    assert!(log.read_record(pos[2]).await.unwrap().1.is_empty());

    // Appending goes on after the replayed records.
    let next = log.append(&[NewRecord::Committed { sequence: seq(105) }]).await.unwrap();
    assert!(next[0] > more[0]);
    assert!(log.used_bytes() > 3 * BLOCK_SIZE as u64);
}

#[tokio::test]
async fn bad_records_are_refused_before_anything_is_written() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&ring, dir.path(), small()).await.unwrap();
    let used = log.used_bytes();
    let odd = vec![0u8; 100];
    let top = Sequence::new(3, crate::codec::sequence::MAX_COUNTER).unwrap();
    let two = blocks(1, 2);
    for bad in [
        NewRecord::Write { address: 0, sequence: seq(1), ciphertext: &odd },
        NewRecord::Write { address: 0, sequence: seq(1), ciphertext: &[] },
        NewRecord::Write { address: u64::MAX, sequence: seq(1), ciphertext: &two },
        NewRecord::Write { address: 0, sequence: top, ciphertext: &two },
        NewRecord::Zero { address: 5, blocks: 0, sequence: seq(1) },
        NewRecord::Zero { address: u64::MAX, blocks: 2, sequence: seq(1) },
    ] {
        assert!(matches!(log.append(&[bad]).await, Err(LogError::BadRecord(_))), "{bad:?}");
    }
    let huge = blocks(1, log.max_record_blocks() as usize + 1);
    let err = log.append(&[NewRecord::Write { address: 0, sequence: seq(1), ciphertext: &huge }]).await;
    assert!(matches!(err, Err(LogError::TooBig { .. })), "{err:?}");
    let most = blocks(1, log.max_record_blocks() as usize);
    log.append(&[NewRecord::Write { address: 0, sequence: seq(1), ciphertext: &most }]).await.unwrap();
    assert!(log.used_bytes() > used);
}

#[tokio::test]
async fn a_second_open_of_the_folder_is_refused_until_the_first_is_dropped() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&ring, dir.path(), small()).await.unwrap();
    let err = open(&ring, dir.path(), small()).await.unwrap_err();
    match &err {
        LogError::InUse { folder, pid } => {
            assert_eq!(folder, dir.path());
            assert_eq!(*pid, Some(std::process::id()));
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
    assert!(text.contains("detach it first") && text.contains("--state-dir"), "{text}");
    // A clone keeps the lock; the last one frees it.
    let clone = log.clone();
    drop(log);
    assert!(matches!(open(&ring, dir.path(), small()).await, Err(LogError::InUse { .. })));
    drop(clone);
    open(&ring, dir.path(), small()).await.unwrap();
}

#[tokio::test]
async fn another_volume_or_key_is_refused_and_nothing_is_cut() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&ring, dir.path(), small()).await.unwrap();
    log.append(&[NewRecord::Committed { sequence: seq(1) }]).await.unwrap();
    log.sync().await.unwrap();
    drop(log);
    let len = std::fs::metadata(log_file(dir.path(), 1)).unwrap().len();
    let other = VolumeKey::generate().unwrap();
    let err = LocalLog::open(dir.path(), &other, &VOL, &ring, small()).await.unwrap_err();
    assert!(matches!(err, LogError::WrongKey(_)), "{err}");
    let err = LocalLog::open(dir.path(), &key(), &[8; 16], &ring, small()).await.unwrap_err();
    assert!(matches!(err, LogError::NotOurs(_)), "{err}");
    assert_eq!(std::fs::metadata(log_file(dir.path(), 1)).unwrap().len(), len);
    let (_, replay) = open(&ring, dir.path(), small()).await.unwrap();
    assert_eq!(replay.records.len(), 1);
}

#[tokio::test]
async fn a_cut_at_every_byte_of_the_tail_record_replays_the_records_before_it() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&ring, dir.path(), small()).await.unwrap();
    let data = blocks(3, 1);
    log.append(&[NewRecord::Base(base(1))]).await.unwrap();
    log.append(&[NewRecord::Write { address: 1, sequence: seq(101), ciphertext: &data }]).await.unwrap();
    log.sync().await.unwrap();
    let tail =
        log.append(&[NewRecord::Write { address: 2, sequence: seq(102), ciphertext: &data }]).await.unwrap();
    log.sync().await.unwrap();
    drop(log);
    let path = log_file(dir.path(), 1);
    let whole = std::fs::read(&path).unwrap();
    let start = tail[0].offset as usize;
    assert_eq!(whole.len(), start + RECORD_HEADER_LEN + BLOCK_ENTRY_LEN);
    // Every byte of the header, every 97th of the block (each open syncs).
    std::fs::write(&path, &whole[..start]).unwrap();
    let (_, replay) = open(&ring, dir.path(), small()).await.unwrap();
    assert_eq!((replay.records.len(), replay.torn), (2, None), "a cut between records is a clean end");
    let cuts = (start + 1..start + RECORD_HEADER_LEN + 40)
        .chain((start + RECORD_HEADER_LEN + 40..whole.len()).step_by(97));
    for cut in cuts {
        std::fs::write(&path, &whole[..cut]).unwrap();
        let (_, replay) = open(&ring, dir.path(), small()).await.unwrap();
        assert_eq!(replay.records.len(), 2, "cut at {cut}");
        let torn = replay.torn.expect("a torn tail");
        assert_eq!(torn.at, tail[0], "cut at {cut}");
        assert_eq!(torn.bytes, (cut - start) as u64);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), start as u64);
    }
    // Also: zeroes to the end of the file (a hole the size of the record).
    let mut zeroed = whole.clone();
    zeroed[start..].fill(0);
    std::fs::write(&path, &zeroed).unwrap();
    let (log, replay) = open(&ring, dir.path(), small()).await.unwrap();
    assert_eq!(replay.records.len(), 2);
    // The log goes on where it was cut.
    let again = log.append(&[NewRecord::Committed { sequence: seq(1) }]).await.unwrap();
    assert_eq!(again[0], tail[0]);
}

#[tokio::test]
async fn a_damaged_synced_record_is_named_and_a_damaged_unsynced_one_is_a_torn_tail() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&ring, dir.path(), small()).await.unwrap();
    let data = blocks(9, 2);
    let a =
        log.append(&[NewRecord::Write { address: 1, sequence: seq(1), ciphertext: &data }]).await.unwrap()[0];
    let b =
        log.append(&[NewRecord::Write { address: 9, sequence: seq(3), ciphertext: &data }]).await.unwrap()[0];
    log.sync().await.unwrap();
    let c = log.append(&[NewRecord::Zero { address: 0, blocks: 4, sequence: seq(5) }]).await.unwrap()[0];
    drop(log);
    let path = log_file(dir.path(), 1);
    let whole = std::fs::read(&path).unwrap();

    // A flipped byte in a synced record's block, header or tag: refused,
    // naming file and offset, since C was appended after the sync.
    for at in [a.offset as usize + RECORD_HEADER_LEN + 100, a.offset as usize + 20, b.offset as usize + 50] {
        let mut bytes = whole.clone();
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = open(&ring, dir.path(), small()).await.unwrap_err();
        let LogError::Corrupt { path: p, offset, .. } = &err else { panic!("{err:?}") };
        assert_eq!(p, &path);
        let want = if at >= b.offset as usize { b.offset } else { a.offset };
        assert_eq!(*offset, want);
        let text = err.to_string();
        assert!(text.contains("00000001.log") && text.contains(&format!("offset {want}")), "{text}");
        assert!(text.contains(&c.to_string()), "names the witness: {text}");
    }

    // A hole where B was (a concurrent append whose write never landed)
    // with C written after it, no sync in between: both go. (Built again
    // from A alone, so that C's mark does not cover B.)
    std::fs::write(&path, &whole[..b.offset as usize]).unwrap();
    let (log, replay) = open(&ring, dir.path(), small()).await.unwrap();
    assert_eq!(replay.records.len(), 1);
    let b2 =
        log.append(&[NewRecord::Write { address: 9, sequence: seq(3), ciphertext: &data }]).await.unwrap()[0];
    let c2 = log.append(&[NewRecord::Zero { address: 0, blocks: 4, sequence: seq(5) }]).await.unwrap()[0];
    assert_eq!((b2, c2), (b, c));
    drop(log);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[b.offset as usize..c.offset as usize].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let (_, replay) = open(&ring, dir.path(), small()).await.unwrap();
    assert_eq!(replay.records.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![a]);
    let torn = replay.torn.unwrap();
    assert_eq!((torn.at, torn.records), (b, 1));
    assert_eq!(replay.highest_sequence, seq(5), "the sequence of the valid record cut off still counts");

    // Damage under a running log is caught on read.
    let (log, _) = open(&ring, dir.path(), small()).await.unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[a.offset as usize + RECORD_HEADER_LEN + BLOCK_ENTRY_LEN + 40] ^= 0x80;
    std::fs::write(&path, &bytes).unwrap();
    let mut out = vec![0u8; BLOCK_SIZE];
    log.read(a, 0, &mut out).await.unwrap();
    let err = log.read(a, 1, &mut out).await.unwrap_err();
    assert!(matches!(err, LogError::Corrupt { offset, .. } if offset == a.offset), "{err:?}");
    assert!(matches!(log.read_record(a).await, Err(LogError::Corrupt { .. })));
}

#[tokio::test]
async fn a_record_moved_to_another_position_does_not_verify() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&ring, dir.path(), small()).await.unwrap();
    let z = NewRecord::Zero { address: 0, blocks: 4, sequence: seq(5) };
    let p = log.append(&[z, z]).await.unwrap();
    log.sync().await.unwrap();
    log.append(&[NewRecord::Committed { sequence: seq(1) }]).await.unwrap();
    drop(log);
    let path = log_file(dir.path(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    // Swap two identical-looking records: their tags bind their positions.
    let (x, y) = (p[0].offset as usize, p[1].offset as usize);
    let first = bytes[x..y].to_vec();
    let second = bytes[y..y + (y - x)].to_vec();
    bytes[x..y].copy_from_slice(&second);
    bytes[y..y + (y - x)].copy_from_slice(&first);
    std::fs::write(&path, &bytes).unwrap();
    let err = open(&ring, dir.path(), small()).await.unwrap_err();
    assert!(matches!(err, LogError::Corrupt { offset, .. } if offset == p[0].offset), "{err:?}");
}

#[tokio::test]
async fn files_roll_over_and_release_frees_committed_ones_but_keeps_the_newest_base() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&ring, dir.path(), small()).await.unwrap();
    // 4 blocks per record: 3 records per 64 KiB file.
    let data = blocks(5, 4);
    let first_base = log.append(&[NewRecord::Base(base(1))]).await.unwrap()[0];
    let mut written = Vec::new();
    for i in 0..20u64 {
        let p = log
            .append(&[NewRecord::Write { address: i * 3, sequence: seq(1 + i * 4), ciphertext: &data }])
            .await;
        written.push(p.unwrap()[0]);
    }
    log.sync().await.unwrap();
    let last_file = written.last().unwrap().file;
    assert!(last_file >= 5, "{last_file}");
    assert!(written.windows(2).all(|w| w[0] < w[1]));
    let used = log.used_bytes();

    // Everything up to the 10th write committed: the base's file stays.
    let committed = seq(4 * 10);
    let freed = log.release(committed).await.unwrap();
    let gone: Vec<u32> = (1..=last_file).filter(|n| !log_file(dir.path(), *n).exists()).collect();
    assert_eq!(freed, gone, "release names exactly the files it deleted");
    assert!(!gone.contains(&first_base.file), "the newest base's file is kept");
    for p in &written[..10] {
        if gone.contains(&p.file) {
            let mut out = vec![0u8; BLOCK_SIZE];
            assert!(matches!(log.read(*p, 0, &mut out).await, Err(LogError::Released(_))));
        }
    }
    for p in &written[10..] {
        assert!(!gone.contains(&p.file), "{p} holds an uncommitted write");
    }
    assert!(!gone.is_empty());
    assert!(log.used_bytes() < used);

    // A newer base and a commit of everything: all but the current file go.
    let newest =
        log.append(&[NewRecord::Base(base(2)), NewRecord::Committed { sequence: seq(100) }]).await.unwrap();
    log.release(seq(100)).await.unwrap();
    let left: Vec<u32> = (1..=newest[0].file).filter(|n| log_file(dir.path(), *n).exists()).collect();
    assert_eq!(left, vec![newest[0].file]);
    log.sync().await.unwrap();
    drop(log);
    let (_, replay) = open(&ring, dir.path(), small()).await.unwrap();
    assert_eq!(replay.base, Some((newest[0], base(2))));
    assert_eq!(replay.committed, seq(100));
    assert_eq!(replay.highest_sequence, seq(200));
}

#[tokio::test]
async fn a_full_log_refuses_data_but_takes_bases() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig { file_bytes: 64 << 10, max_bytes: 128 << 10 };
    let (log, _) = open(&ring, dir.path(), cfg).await.unwrap();
    let data = blocks(5, 3);
    let mut n = 0;
    let err = loop {
        match log
            .append(&[NewRecord::Write { address: n, sequence: seq(1 + n * 3), ciphertext: &data }])
            .await
        {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, LogError::Full { max, .. } if max == 128 << 10), "{err:?}");
    assert!(n >= 6, "{n}");
    log.append(&[NewRecord::Base(base(1)), NewRecord::Committed { sequence: seq(1000) }]).await.unwrap();
    log.release(seq(1000)).await.unwrap();
    log.append(&[NewRecord::Write { address: 0, sequence: seq(2000), ciphertext: &data }]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_get_disjoint_regions_and_all_replay() {
    let ring = Uring::new(64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) =
        open(&ring, dir.path(), LogConfig { file_bytes: 256 << 10, max_bytes: 1 << 30 }).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..25u64 {
                let n = (1 + (t + i) % 3) as usize;
                let data = blocks((t * 31 + i) as u8, n);
                let sequence = seq(1 + (t * 25 + i) * 4);
                let p = log
                    .append(&[NewRecord::Write { address: t * 1000 + i, sequence, ciphertext: &data }])
                    .await;
                mine.push((p.unwrap()[0], t * 1000 + i, data));
                if i % 5 == 0 {
                    log.sync().await.unwrap();
                }
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    log.sync().await.unwrap();
    for (pos, address, data) in &all {
        let (head, bytes) = log.read_record(*pos).await.unwrap();
        assert!(matches!(head, RecordHead::Write { address: a, .. } if a == *address));
        assert_eq!(&bytes.ciphertext(), data);
    }
    drop(log);
    let (_, replay) =
        open(&ring, dir.path(), LogConfig { file_bytes: 256 << 10, max_bytes: 1 << 30 }).await.unwrap();
    assert_eq!(replay.torn, None);
    let mut want: Vec<_> = all.iter().map(|(p, _, _)| *p).collect();
    want.sort();
    assert_eq!(replay.records.iter().map(|(p, _)| *p).collect::<Vec<_>>(), want);
}

#[tokio::test]
async fn a_new_file_whose_header_never_landed_is_a_torn_tail() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&ring, dir.path(), small()).await.unwrap();
    let data = blocks(5, 3);
    let mut pos = Vec::new();
    for i in 0..6u64 {
        pos.push(
            log.append(&[NewRecord::Write { address: i, sequence: seq(1 + 3 * i), ciphertext: &data }])
                .await
                .unwrap()[0],
        );
    }
    assert_eq!((pos[4].file, pos[5].file), (1, 2));
    drop(log);
    std::fs::write(log_file(dir.path(), 2), vec![0u8; 100]).unwrap();
    let (log, replay) = open(&ring, dir.path(), small()).await.unwrap();
    assert_eq!(replay.records.len(), 5);
    assert!(!log_file(dir.path(), 2).exists());
    let again =
        log.append(&[NewRecord::Write { address: 5, sequence: seq(16), ciphertext: &data }]).await.unwrap();
    assert_eq!(again[0], pos[5], "rolls over into a fresh file 2");
}

/// One append in the property test: kind and size.
#[derive(Clone, Debug)]
enum Op {
    Write(u8),
    Zero,
    Base,
    Sync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..5).prop_map(Op::Write),
        1 => Just(Op::Zero),
        1 => Just(Op::Base),
        1 => Just(Op::Sync),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    /// Random appends across several files, then the last file cut at a
    /// random offset: replay yields exactly a prefix of what was appended,
    /// and at least everything that was synced.
    #[test]
    fn replay_after_any_cut_is_a_prefix_holding_everything_synced(
        ops in proptest::collection::vec(op(), 1..40),
        cut in any::<proptest::sample::Index>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let ring = Uring::new(16).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let (log, _) = open(&ring, dir.path(), small()).await.unwrap();
            let mut appended: Vec<(LogPos, RecordHead)> = Vec::new();
            let mut synced = 0;
            let mut next = 1u64;
            for (i, op) in ops.iter().enumerate() {
                let data;
                let rec = match op {
                    Op::Sync => {
                        log.sync().await.unwrap();
                        synced = appended.len();
                        continue;
                    }
                    Op::Write(n) => {
                        data = blocks(i as u8, *n as usize);
                        NewRecord::Write { address: i as u64, sequence: seq(next), ciphertext: &data }
                    }
                    Op::Zero => NewRecord::Zero { address: i as u64, blocks: 9, sequence: seq(next) },
                    Op::Base => NewRecord::Base(base(i as u64)),
                };
                next += 5;
                let pos = log.append(&[rec]).await.unwrap()[0];
                let head = match rec {
                    NewRecord::Write { address, sequence, ciphertext } => {
                        RecordHead::Write { address, sequence, blocks: (ciphertext.len() / BLOCK_SIZE) as u32 }
                    }
                    NewRecord::Zero { address, blocks, sequence } => RecordHead::Zero { address, blocks, sequence },
                    NewRecord::Base(b) => RecordHead::Base(b),
                    NewRecord::Committed { sequence } => RecordHead::Committed { sequence },
                };
                appended.push((pos, head));
            }
            drop(log);
            let last = appended.last().map_or(1, |(p, _)| p.file);
            let path = log_file(dir.path(), last);
            let len = std::fs::metadata(&path).unwrap().len();
            // Never cut below what was synced in that file.
            let floor = appended[..synced].iter().rev().find(|(p, _)| p.file == last).map_or(0, |(p, h)| {
                u64::from(p.offset) + h.encoded_len() as u64
            });
            let at = floor + cut.index((len - floor + 1) as usize) as u64;
            std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(at).unwrap();
            let (_, replay) = open(&ring, dir.path(), small()).await.unwrap();
            prop_assert!(replay.records.len() <= appended.len());
            prop_assert_eq!(&replay.records[..], &appended[..replay.records.len()]);
            prop_assert!(replay.records.len() >= synced, "{} replayed, {} synced", replay.records.len(), synced);
            let whole = appended.iter().filter(|(p, h)| p.file < last || u64::from(p.offset) + h.encoded_len() as u64 <= at).count();
            prop_assert_eq!(replay.records.len(), whole);
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn a_version_1_log_replays_and_reads_back_and_new_records_go_to_a_new_file() {
    // A folder the previous format left: meta, one file of version 1.
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let logkey = LogKey::derive(&key());
    std::fs::create_dir_all(dir.path().join("log")).unwrap();
    std::fs::write(dir.path().join("log").join("meta"), encode_meta(&logkey, &VOL, VERSION_1)).unwrap();
    let old = blocks(0x3c, 3);
    let mut file = encode_file_header(&logkey, &VOL, 1, VERSION_1).to_vec();
    let records = [
        NewRecord::Base(base(1)),
        NewRecord::Write { address: 40, sequence: seq(101), ciphertext: &old },
        NewRecord::Zero { address: 9, blocks: 2, sequence: seq(104) },
    ];
    let mut positions = Vec::new();
    for r in &records {
        let pos = LogPos { file: 1, offset: file.len() as u32 };
        encode_record(&logkey, &VOL, pos, LogPos::default(), r, &mut file, VERSION_1).unwrap();
        positions.push(pos);
    }
    // Version 2 tags do not check a version 1 file, nor the other way round.
    let v1 = scan_file(&file, &logkey, &VOL, 1).unwrap();
    assert_eq!((v1.version, v1.records.len(), v1.bad), (VERSION_1, 3, None));
    let at = positions[1].offset as usize;
    assert!(decode_record(&file[at..], &logkey, &VOL, positions[1], VERSION).is_err());
    assert!(decode_record(&file[at..], &logkey, &VOL, positions[1], VERSION_1).is_ok());
    std::fs::write(log_file(dir.path(), 1), &file).unwrap();

    let (log, replay) = open(&ring, dir.path(), small()).await.unwrap();
    assert_eq!(replay.records.iter().map(|r| r.0).collect::<Vec<_>>(), positions);
    let mut out = vec![0u8; BLOCK_SIZE];
    assert_eq!(log.read(positions[1], 2, &mut out).await.unwrap(), (42, seq(103)));
    assert_eq!(out, old[2 * BLOCK_SIZE..]);
    assert_eq!(&log.read_record(positions[1]).await.unwrap().1.ciphertext()[..], &old[..]);
    // New records go to a new file of this version, never into the old one.
    let new = blocks(0x5a, 2);
    let p = log.append_write(80, seq(110), WriteRecord::from_ciphertext(&new)).await.unwrap();
    assert_eq!(p.file, 2);
    log.sync().await.unwrap();
    drop(log);
    let header = std::fs::read(log_file(dir.path(), 2)).unwrap();
    assert_eq!(header[..FILE_HEADER_LEN], encode_file_header(&logkey, &VOL, 2, VERSION)[..]);

    // Both replay, and both read back checked from their files.
    let (log, replay) = open(&ring, dir.path(), small()).await.unwrap();
    assert_eq!(replay.records.len(), 4);
    assert_eq!(replay.highest_sequence, seq(111));
    assert_eq!(&log.read_record(positions[1]).await.unwrap().1.ciphertext()[..], &old[..]);
    assert_eq!(&log.read_record(p).await.unwrap().1.ciphertext()[..], &new[..]);
    assert_eq!(log.read(p, 1, &mut out).await.unwrap(), (81, seq(111)));
    assert_eq!(out, new[BLOCK_SIZE..]);
}

#[tokio::test]
async fn recent_writes_are_read_from_memory_and_the_same_bytes_come_back_from_the_file() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&ring, dir.path(), small()).await.unwrap();
    let mut kept = Vec::new();
    for i in 0..8u64 {
        let data = blocks(i as u8, 1 + i as usize % 3);
        kept.push((
            log.append_write(i * 10, seq(100 + i * 3), WriteRecord::from_ciphertext(&data)).await.unwrap(),
            data,
        ));
    }
    log.sync().await.unwrap();
    for (pos, data) in &kept {
        assert_eq!(&log.read_record(*pos).await.unwrap().1.ciphertext()[..], &data[..]);
    }
    // The file holds the same: a fresh open (nothing in memory) reads it.
    drop(log);
    let (log, replay) = open(&ring, dir.path(), small()).await.unwrap();
    assert_eq!(replay.records.len(), kept.len());
    let mut out = vec![0u8; BLOCK_SIZE];
    for (i, (pos, data)) in kept.iter().enumerate() {
        assert_eq!(&log.read_record(*pos).await.unwrap().1.ciphertext()[..], &data[..]);
        let last = (data.len() / BLOCK_SIZE - 1) as u32;
        let (address, sequence) = log.read(*pos, last, &mut out).await.unwrap();
        assert_eq!(
            (address, sequence),
            (i as u64 * 10 + u64::from(last), seq(100 + i as u64 * 3 + u64::from(last)))
        );
        assert_eq!(out, data[last as usize * BLOCK_SIZE..]);
    }
}

#[tokio::test]
async fn a_kept_record_outlives_newer_bases_and_commits_and_its_floors_replay() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&ring, dir.path(), small()).await.unwrap();
    // A reservation: a Base whose floors are far above what is used yet.
    let reservation = Base { sequence_floor: seq(1 << 20), ..base(1) };
    let kept = log.append(&[NewRecord::Base(reservation)]).await.unwrap()[0];
    log.sync().await.unwrap();
    log.keep(kept);
    // Later writes, newer (unsynced) Bases with lower floors, all committed.
    let data = blocks(9, 4);
    for i in 0..12u64 {
        log.append_write(i * 4, seq(1 + i * 4), WriteRecord::from_ciphertext(&data)).await.unwrap();
        log.append(&[NewRecord::Base(base(2 + i)), NewRecord::Committed { sequence: seq(4 + i * 4) }])
            .await
            .unwrap();
    }
    let last = log.append(&[NewRecord::Committed { sequence: seq(100) }]).await.unwrap()[0];
    assert!(last.file > kept.file + 2, "{last}");
    log.release(seq(100)).await.unwrap();
    assert!(log_file(dir.path(), kept.file).exists(), "the kept record's file stays");
    log.sync().await.unwrap();
    drop(log);
    // Its floor still counts at replay, above every record after it.
    let (log, replay) = open(&ring, dir.path(), small()).await.unwrap();
    assert_eq!(replay.highest_sequence, seq(1 << 20));
    // Keeping another record lets the first one's file go.
    let next = log.append(&[NewRecord::Base(base(50))]).await.unwrap()[0];
    log.keep(next);
    log.append(&[NewRecord::Committed { sequence: seq(100) }]).await.unwrap();
    log.release(seq(100)).await.unwrap();
    assert!(!log_file(dir.path(), kept.file).exists());
}

/// Review 16: a folder upgraded from format 1 keeps its version-1 meta
/// while it gains version-2 files. The previous binary accepts that meta,
/// then finds a file header it does not know (it compares against its own
/// version-1 header), calls it a torn tail with no witness after it, and
/// deletes that file and every later one: synced (flushed, for a volume of
/// local durability) writes silently gone on a downgrade. Once a folder
/// holds a version-2 file its meta must not claim version 1, so that an
/// older binary refuses the folder ("another format version") instead.
#[tokio::test]
async fn a_folder_with_version_2_files_does_not_claim_version_1() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let logkey = LogKey::derive(&key());
    std::fs::create_dir_all(dir.path().join("log")).unwrap();
    std::fs::write(dir.path().join("log").join("meta"), encode_meta(&logkey, &VOL, VERSION_1)).unwrap();
    let mut file = encode_file_header(&logkey, &VOL, 1, VERSION_1).to_vec();
    let pos = LogPos { file: 1, offset: file.len() as u32 };
    encode_record(&logkey, &VOL, pos, LogPos::default(), &NewRecord::Base(base(1)), &mut file, VERSION_1)
        .unwrap();
    std::fs::write(log_file(dir.path(), 1), &file).unwrap();

    let (log, _) = open(&ring, dir.path(), small()).await.unwrap();
    let p = log.append_write(80, seq(110), WriteRecord::from_ciphertext(&blocks(0x5a, 2))).await.unwrap();
    log.sync().await.unwrap(); // a flush: this write is acknowledged durable
    drop(log);
    assert_eq!(p.file, 2);
    // What the previous binary checks: its meta and its own file header.
    let header = std::fs::read(log_file(dir.path(), 2)).unwrap();
    let v1_reader_takes_file_2 =
        header[..FILE_HEADER_LEN] == encode_file_header(&logkey, &VOL, 2, VERSION_1)[..];
    assert!(!v1_reader_takes_file_2, "file 2 is version 2: a version-1 reader calls it a torn tail");
    let meta = std::fs::read(dir.path().join("log").join("meta")).unwrap();
    assert_ne!(
        meta[..],
        encode_meta(&logkey, &VOL, VERSION_1)[..],
        "the meta still says version 1 while version-2 files hold synced writes: the previous binary would \
         open this folder and cut them"
    );
}

#[tokio::test]
async fn a_write_record_built_in_place_is_byte_for_byte_the_record_encode_record_makes() {
    let ring = Uring::new(16).unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (la, _) = open(&ring, a.path(), small()).await.unwrap();
    let (lb, _) = open(&ring, b.path(), small()).await.unwrap();
    // Enough records to roll over to further files (64 KiB each).
    for i in 0..12u64 {
        let data = blocks(i as u8 + 1, 1 + i as usize % 5);
        let (address, sequence) = (i * 7, seq(10 + i * 5));
        let pa = la.append(&[NewRecord::Write { address, sequence, ciphertext: &data }]).await.unwrap()[0];
        let pb = lb.append_write(address, sequence, WriteRecord::from_ciphertext(&data)).await.unwrap();
        assert_eq!(pa, pb);
        // What each keeps for the commit is the same ciphertext.
        assert_eq!(lb.read_record(pb).await.unwrap().1.ciphertext(), data);
    }
    la.sync().await.unwrap();
    lb.sync().await.unwrap();
    let mut files = 0;
    for n in 0..16 {
        let (fa, fb) = (log_file(a.path(), n), log_file(b.path(), n));
        assert_eq!(fa.exists(), fb.exists(), "file {n}");
        if fa.exists() {
            assert_eq!(std::fs::read(&fa).unwrap(), std::fs::read(&fb).unwrap(), "file {n}");
            files += 1;
        }
    }
    assert!(files >= 3, "the records rolled over into {files} files");
    // A record of a partial block is refused whole.
    let mut short = WriteRecord::with_capacity(1);
    short.push_block(&[1u8; 100], |_| {});
    assert!(matches!(lb.append_write(0, seq(900), short).await, Err(LogError::BadRecord(_))));
}

/// One step of the two-logs property test.
#[derive(Clone, Debug)]
enum Step {
    /// A Write record of this many blocks.
    Write(u8),
    Zero,
    Base,
    Committed,
    Sync,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (1u8..5).prop_map(Step::Write),
        1 => Just(Step::Zero),
        1 => Just(Step::Base),
        1 => Just(Step::Committed),
        2 => Just(Step::Sync),
    ]
}

/// Every block of the Write record at `pos` reads back as `data`, by
/// block and whole, with its address and sequence.
async fn reads_back(log: &LocalLog, pos: LogPos, address: u64, sequence: Sequence, data: &[u8]) {
    let n = data.len() / BLOCK_SIZE;
    let (head, whole) = log.read_record(pos).await.unwrap();
    assert_eq!(head, RecordHead::Write { address, blocks: n as u32, sequence }, "{pos}");
    assert_eq!(whole.len(), n, "{pos}");
    assert!(whole.ciphertext() == data, "{pos}: the record's ciphertext");
    let mut out = vec![0u8; BLOCK_SIZE];
    for i in 0..n {
        assert!(whole.block(i) == &data[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE], "{pos} block {i}");
        let got = log.read(pos, i as u32, &mut out).await.unwrap();
        assert_eq!(got, (address + i as u64, sequence.checked_add(i as u64).unwrap()), "{pos} block {i}");
        assert!(out == data[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE], "{pos}: block {i} read alone");
    }
    assert!(log.read(pos, n as u32, &mut out).await.is_err(), "{pos}: a block past the end");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
    /// The same appends, Write records through `append_write` in one log
    /// and through `append` in the other, syncs in between (so the durable
    /// marks move), across files: the files are byte for byte the same,
    /// and every block reads back the same, by block and whole, from
    /// memory (what a commit packs), past the memory budget, and from the
    /// file after a reopen.
    #[test]
    fn write_records_built_in_place_log_and_read_back_as_encoded_ones(
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let ring = Uring::new(16).unwrap();
            let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            // A quarter of the log in memory: 256 KiB, less than the
            // longest runs write.
            let cfg = LogConfig { file_bytes: 64 << 10, max_bytes: 1 << 20 };
            let (la, _) = open(&ring, a.path(), cfg).await.unwrap();
            let (lb, _) = open(&ring, b.path(), cfg).await.unwrap();
            let mut writes = Vec::new();
            let mut next = 1u64;
            for (i, s) in steps.iter().enumerate() {
                let i = i as u64;
                let sequence = seq(next);
                next += 8;
                let other = match s {
                    Step::Sync => {
                        la.sync().await.unwrap();
                        lb.sync().await.unwrap();
                        continue;
                    }
                    Step::Write(n) => {
                        let data = blocks(i as u8 ^ 0x3c, usize::from(*n));
                        let address = i * 11;
                        let pa = la
                            .append(&[NewRecord::Write { address, sequence, ciphertext: &data }])
                            .await
                            .unwrap()[0];
                        // Encrypted in place, as the writer does.
                        let mut record = WriteRecord::with_capacity(data.len() / BLOCK_SIZE);
                        for block in data.chunks_exact(BLOCK_SIZE) {
                            record.push_block(&vec![0u8; BLOCK_SIZE], |ct| ct.copy_from_slice(block));
                        }
                        prop_assert_eq!(record.blocks(), usize::from(*n));
                        let pb = lb.append_write(address, sequence, record).await.unwrap();
                        prop_assert_eq!(pa, pb);
                        reads_back(&lb, pb, address, sequence, &data).await;
                        writes.push((pb, address, sequence, data));
                        continue;
                    }
                    Step::Zero => NewRecord::Zero { address: i, blocks: 3, sequence },
                    Step::Base => NewRecord::Base(base(i + 1)),
                    Step::Committed => NewRecord::Committed { sequence },
                };
                let pa = la.append(&[other]).await.unwrap()[0];
                let pb = lb.append(&[other]).await.unwrap()[0];
                prop_assert_eq!(pa, pb);
            }
            // Some from memory, the older ones from their files.
            for (pos, address, sequence, data) in &writes {
                reads_back(&lb, *pos, *address, *sequence, data).await;
                reads_back(&la, *pos, *address, *sequence, data).await;
            }
            la.sync().await.unwrap();
            lb.sync().await.unwrap();
            drop((la, lb));
            for n in 0..64 {
                let (fa, fb) = (log_file(a.path(), n), log_file(b.path(), n));
                prop_assert_eq!(fa.exists(), fb.exists(), "file {}", n);
                if fa.exists() {
                    prop_assert!(std::fs::read(&fa).unwrap() == std::fs::read(&fb).unwrap(), "file {}", n);
                }
            }
            let (ra, replay_a) = open(&ring, a.path(), cfg).await.unwrap();
            let (rb, replay_b) = open(&ring, b.path(), cfg).await.unwrap();
            prop_assert_eq!(&replay_a, &replay_b);
            prop_assert_eq!(replay_b.torn, None);
            for (pos, address, sequence, data) in &writes {
                reads_back(&rb, *pos, *address, *sequence, data).await;
            }
            drop(ra);
            Ok(())
        })?;
    }

    /// A Write record is accepted only when every push was one whole
    /// block, even when ragged pushes add up to whole entries (the tags
    /// would land inside the blocks); an accepted one reads back as pushed.
    #[test]
    fn only_a_write_record_of_whole_blocks_is_appended(
        lens in proptest::collection::vec(
            prop_oneof![
                4 => Just(BLOCK_SIZE),
                1 => Just(BLOCK_SIZE - 16),
                1 => Just(BLOCK_SIZE + 16),
                1 => Just(BLOCK_SIZE - 32),
                1 => Just(BLOCK_SIZE + 32),
                1 => 0usize..2 * BLOCK_SIZE,
            ],
            0..5,
        ),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let ring = Uring::new(16).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let (log, _) = open(&ring, dir.path(), small()).await.unwrap();
            let mut record = WriteRecord::with_capacity(lens.len());
            let mut pushed = Vec::new();
            for (i, &len) in lens.iter().enumerate() {
                let plain: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
                record.push_block(&plain, |_| {});
                pushed.extend_from_slice(&plain);
            }
            prop_assert_eq!(record.blocks(), lens.len());
            let whole = !lens.is_empty() && lens.iter().all(|&l| l == BLOCK_SIZE);
            match log.append_write(8, seq(50), record).await {
                Ok(pos) => {
                    prop_assert!(whole, "pushes of {:?} bytes were appended", lens);
                    reads_back(&log, pos, 8, seq(50), &pushed).await;
                }
                Err(e) => {
                    prop_assert!(!whole, "{}", e);
                    prop_assert!(matches!(e, LogError::BadRecord(_)), "{}", e);
                }
            }
            // Refused before anything was written: the log goes on.
            log.append(&[NewRecord::Committed { sequence: seq(60) }]).await.unwrap();
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn ragged_pushes_adding_up_to_whole_entries_are_refused() {
    let ring = Uring::new(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&ring, dir.path(), small()).await.unwrap();
    // 32 + 4080 + 32 + 4112 bytes: two entries' worth, the second tag
    // inside the first block's bytes.
    let mut record = WriteRecord::with_capacity(2);
    record.push_block(&[1u8; BLOCK_SIZE - 16], |_| {});
    record.push_block(&[2u8; BLOCK_SIZE + 16], |_| {});
    assert!(matches!(log.append_write(0, seq(1), record).await, Err(LogError::BadRecord(_))));
}
