//! The local log's parsers (second design): log files come back from the
//! attaching machine's disk at every open, torn, damaged or altered. No
//! input may panic; a file built from records the input describes scans
//! back to exactly those records, and with any one byte of it changed, the
//! scan keeps only the records before the changed one.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshdisk::codec::key::VolumeKey;
use meshdisk::codec::sequence::{SegmentId, Sequence};
use meshdisk::volume::v2::log::{
    Base, FILE_HEADER_LEN, LogKey, LogPos, NewRecord, VERSION, VERSION_1, decode_record, encode_file_header,
    encode_record, scan_file,
};

const VOL: [u8; 16] = [1; 16];

fn key() -> &'static LogKey {
    static KEY: OnceLock<LogKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let bytes: Vec<u8> = (0..64u8).collect();
        LogKey::derive(&VolumeKey::from_bytes(&bytes).expect("a valid key"))
    })
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut v = [0u8; 8];
    for (j, x) in v.iter_mut().enumerate() {
        *x = b.get(i + j).copied().unwrap_or(0);
    }
    u64::from_le_bytes(v)
}

fuzz_target!(|data: &[u8]| {
    let key = key();
    // Any bytes, as a log file and as a record.
    let _ = scan_file(data, key, &VOL, 1);
    for version in [VERSION, VERSION_1] {
        let _ = decode_record(data, key, &VOL, LogPos { file: 1, offset: FILE_HEADER_LEN as u32 }, version);
    }

    // Records described by the input, in a file: they scan back.
    let Some((&flip, rest)) = data.split_first() else { return };
    let mut file = encode_file_header(key, &VOL, 1, VERSION).to_vec();
    let mut want = Vec::new();
    let mut ends = Vec::new();
    let block = vec![rest.first().copied().unwrap_or(0); 4096 * 2];
    for d in rest.chunks(25).take(6) {
        let (a, b, c) = (u64_at(d, 1), u64_at(d, 9), u64_at(d, 17));
        let record = match d[0] % 4 {
            0 => NewRecord::Write {
                address: a >> 1,
                sequence: Sequence::new(b & 0xff, c & 0xffff).unwrap(),
                ciphertext: &block[..4096 * (1 + usize::from(d[0] & 4 != 0))],
            },
            1 => NewRecord::Zero { address: a >> 1, blocks: 1 + (b >> 40), sequence: Sequence::from_raw(c) },
            2 => NewRecord::Base(Base {
                epoch: a,
                commit: b,
                segment_floor: SegmentId::from_raw(c),
                sequence_floor: Sequence::from_raw(a ^ c),
            }),
            _ => NewRecord::Committed { sequence: Sequence::from_raw(a) },
        };
        let pos = LogPos { file: 1, offset: file.len() as u32 };
        let mark = LogPos { file: 1, offset: (b as u32) % (pos.offset + 1) };
        let head = encode_record(key, &VOL, pos, mark, &record, &mut file, VERSION).expect("a valid record");
        want.push((pos, head, mark));
        ends.push(file.len());
    }
    let scan = scan_file(&file, key, &VOL, 1).expect("records we wrote");
    assert_eq!(scan.records, want);
    assert_eq!((scan.end as usize, scan.bad), (file.len(), None));

    // One byte changed: the records before it stay, the scan stops there.
    let at = u64_at(rest, 0) as usize % file.len();
    file[at] ^= flip | 1;
    let scan = scan_file(&file, key, &VOL, 1).expect("damage is not an authentic record");
    let kept = if at < FILE_HEADER_LEN { 0 } else { ends.iter().filter(|&&e| e <= at).count() };
    assert_eq!(scan.records, want[..kept]);
    assert!(scan.bad.is_some());
    assert!(scan.after_bad.iter().all(|r| want[kept + 1..].contains(r)));
});
