//! The shard parser: peers and clients read shards that came over the
//! network or off a disk. No input may panic, and whatever parses must
//! re-encode to exactly the bytes it came from and carry a payload that
//! matches its hash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshdisk::codec::shard::{HEADER_LEN, ShardHeader, parse_shard};

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = ShardHeader::parse(data) {
        assert_eq!(header.encode()[..], data[..HEADER_LEN]);
        assert!(header.validate().is_ok());
    }
    if let Ok((header, payload)) = parse_shard(data) {
        assert_eq!(payload.len(), header.payload_len as usize);
        assert!(header.payload_hash.matches(payload));
    }
    // The same bytes behind a freshly sealed header: reaches the payload
    // checks (length, hash) that random headers almost never get to.
    if data.len() >= 2 {
        let units = u32::from(data[0] % 4) + 1;
        let header = ShardHeader {
            volume_id: [data[1]; 16],
            stripe: 1,
            generation: 2,
            index: data[1] % 6,
            k: 4,
            m: 2,
            payload_len: units * 64,
            payload_hash: meshdisk::codec::ShardHash::of(&data[2..]),
        };
        let mut shard = header.encode().to_vec();
        shard.extend_from_slice(&data[2..]);
        let parsed = parse_shard(&shard);
        assert_eq!(parsed.is_ok(), data.len() - 2 == units as usize * 64, "{parsed:?}");
    }
});
