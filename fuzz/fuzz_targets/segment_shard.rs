//! The segment shard parser and the block-proof checker: both read bytes
//! that came over the network or off a peer's disk. No input may panic;
//! whatever parses re-encodes to exactly the bytes it came from, and
//! verifies against its own segment root exactly when its payload matches
//! its own root; a block proof verifies exactly when it is the honest one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshdisk::codec::segment::{
    BLOCK_SIZE, ShardOutboard, ShardRoot, parse_segment_shard, prove, verify_blocks, verify_shard,
};

fuzz_target!(|data: &[u8]| {
    if let Ok((header, payload)) = parse_segment_shard(data) {
        assert!(header.validate().is_ok());
        assert_eq!(header.encode()[..], data[..header.encoded_len()]);
        assert_eq!(payload.len(), header.geometry.shard_len());
        let verified = verify_shard(data, &header.segment_root());
        assert_eq!(verified.is_ok(), header.own_root().matches(payload), "{verified:?}");
    }

    if data.len() < 3 {
        return;
    }
    // Raw bytes as a proof for a range of a shard: refused, never a panic.
    let _ = verify_blocks(
        &ShardRoot([data[0]; 32]),
        u32::from(data[0]),
        u32::from(data[1])..u32::from(data[2]),
        &data[3..],
    );

    // The honest proof of a small shard, with the rest of the input XORed
    // over it (and appended past its end), and maybe cut short: it
    // verifies if and only if nothing changed.
    let blocks = u32::from(data[0] % 8) + 1;
    let start = u32::from(data[1]) % blocks;
    let end = start + 1 + u32::from(data[2]) % (blocks - start);
    let payload: Vec<u8> = (0..blocks as usize * BLOCK_SIZE).map(|i| (i * 31 + i / 4096) as u8).collect();
    let outboard = ShardOutboard::compute(&payload).expect("whole blocks");
    let honest = prove(&payload, &outboard, start..end).expect("a valid range");
    let mut proof = honest.clone();
    for (i, x) in data[3..].iter().enumerate() {
        match proof.get_mut(i) {
            Some(b) => *b ^= x,
            None => proof.push(*x),
        }
    }
    if data[0] & 0x80 != 0 {
        let cut = 1 + usize::from(data[1]) % proof.len();
        proof.truncate(proof.len() - cut);
    }
    let result = verify_blocks(&outboard.root(), blocks, start..end, &proof);
    assert_eq!(result.is_ok(), proof == honest, "{result:?}");
    if let Ok(got) = result {
        assert_eq!(got, payload[start as usize * BLOCK_SIZE..end as usize * BLOCK_SIZE]);
    }
});
