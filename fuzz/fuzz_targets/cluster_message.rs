//! The cluster's message decoders: every directory and peer reads frames
//! from the network. No input may panic; whatever decodes must re-encode
//! and decode to the same message; the frame reader must refuse a frame over
//! its limit before allocating it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshdisk::api::{DirRequest, DirResponse, PeerRequest, PeerResponse};
use meshdisk::transport::wire;

fn check<T>(body: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(msg) = wire::decode::<T>(body) {
        let frame = wire::encode(&msg).expect("a decoded message encodes");
        assert_eq!(wire::decode::<T>(&frame[4..]).expect("and decodes again"), msg);
    }
}

fuzz_target!(|data: &[u8]| {
    // As a frame body, with and without this build's version in front.
    for body in [data.to_vec(), [&wire::VERSION.to_le_bytes()[..], data].concat()] {
        check::<DirRequest>(&body);
        check::<DirResponse>(&body);
        check::<PeerRequest>(&body);
        check::<PeerResponse>(&body);
    }
    // As a stream: the reader's length check comes before allocation.
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut input = data;
    let _ = rt.block_on(wire::read::<PeerRequest>(&mut input, 4096));
});
