//! Message framing on a QUIC stream: every message is a frame
//!
//! ```text
//! offset size field
//!      0    4 length of what follows (u32, little-endian)
//!      4    2 protocol version (u16, little-endian)
//!      6    … the message, postcard-encoded
//! ```
//!
//! The length is checked against the reader's limit **before** anything is
//! allocated, so a peer cannot make us reserve memory by announcing a huge
//! frame; a frame from another protocol version is refused with both
//! versions in the message. Shard payloads do not go through postcard: a
//! message announces them and their bytes follow raw on the stream, read
//! straight into their final buffer.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version this build speaks.
pub const VERSION: u16 = 1;

/// Default limit for control messages (shard bytes travel outside frames).
pub const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes is over the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("frame too short to hold a version ({0} bytes)")]
    Short(usize),
    #[error("peer speaks protocol version {theirs}, this meshdisk speaks {VERSION}: upgrade the older side")]
    Version { theirs: u16 },
    #[error("malformed message: {0}")]
    Decode(#[from] postcard::Error),
    #[error("stream ended {0}")]
    Closed(&'static str),
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let mut header = vec![0u8; 6];
    header[4..6].copy_from_slice(&VERSION.to_le_bytes());
    let mut frame = postcard::to_extend(msg, header)?;
    let len = u32::try_from(frame.len() - 4)
        .map_err(|_| WireError::TooLarge { len: frame.len(), limit: u32::MAX as usize })?;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    Ok(frame)
}

/// Writes `msg` as one frame.
pub async fn write<T: Serialize>(out: &mut (impl AsyncWrite + Unpin), msg: &T) -> Result<(), WireError> {
    out.write_all(&encode(msg)?).await?;
    Ok(())
}

/// Reads one frame of at most `limit` bytes and decodes it. `Ok(None)` if
/// the stream ended cleanly before a frame began.
pub async fn read<T: DeserializeOwned>(
    input: &mut (impl AsyncRead + Unpin),
    limit: usize,
) -> Result<Option<T>, WireError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match input.read(&mut len[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(WireError::Closed("inside a frame's length")),
            n => got += n,
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > limit {
        return Err(WireError::TooLarge { len, limit });
    }
    if len < 2 {
        return Err(WireError::Short(len));
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => WireError::Closed("inside a frame"),
        _ => WireError::Io(e),
    })?;
    decode(&body).map(Some)
}

/// Decodes a frame's body (version + message).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    let [a, b, rest @ ..] = body else { return Err(WireError::Short(body.len())) };
    let theirs = u16::from_le_bytes([*a, *b]);
    if theirs != VERSION {
        return Err(WireError::Version { theirs });
    }
    let (msg, trailing) = postcard::take_from_bytes(rest)?;
    if !trailing.is_empty() {
        return Err(WireError::Decode(postcard::Error::DeserializeBadEncoding));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Hello { node: String, capacity: u64 },
        Get { volume: [u8; 16], stripe: u64, index: u8 },
        Bye,
    }

    #[tokio::test]
    async fn frames_round_trip_over_a_stream() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let msgs = vec![
            Msg::Hello { node: "peer-1".into(), capacity: 1 << 40 },
            Msg::Get { volume: [7; 16], stripe: 9, index: 3 },
            Msg::Bye,
        ];
        let sent = msgs.clone();
        let writer = tokio::spawn(async move {
            for m in &sent {
                write(&mut a, m).await.unwrap();
            }
        });
        for m in &msgs {
            assert_eq!(read::<Msg>(&mut b, MAX_MESSAGE).await.unwrap().as_ref(), Some(m));
        }
        writer.await.unwrap();
        assert!(read::<Msg>(&mut b, MAX_MESSAGE).await.unwrap().is_none(), "clean end");
    }

    #[tokio::test]
    async fn huge_announcements_are_refused_before_allocating() {
        let (mut a, mut b) = tokio::io::duplex(64);
        // Claims 4 GiB and sends nothing more: refused from the length alone.
        a.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        let err = read::<Msg>(&mut b, MAX_MESSAGE).await.unwrap_err();
        assert!(
            matches!(err, WireError::TooLarge { len, limit: MAX_MESSAGE } if len == u32::MAX as usize),
            "{err}"
        );
    }

    #[tokio::test]
    async fn other_versions_truncation_and_garbage_are_clear_errors() {
        let mut frame = encode(&Msg::Bye).unwrap();
        frame[4] = 2;
        let err = read::<Msg>(&mut frame.as_slice(), MAX_MESSAGE).await.unwrap_err();
        assert!(matches!(err, WireError::Version { theirs: 2 }), "{err}");
        assert!(err.to_string().contains("upgrade"), "{err}");

        let frame = encode(&Msg::Hello { node: "x".into(), capacity: 1 }).unwrap();
        let err = read::<Msg>(&mut &frame[..frame.len() - 1], MAX_MESSAGE).await.unwrap_err();
        assert!(matches!(err, WireError::Closed("inside a frame")), "{err}");
        let err = read::<Msg>(&mut &frame[..2], MAX_MESSAGE).await.unwrap_err();
        assert!(matches!(err, WireError::Closed(_)), "{err}");

        let mut trailing = encode(&Msg::Bye).unwrap();
        trailing.push(0);
        let len = (trailing.len() - 4) as u32;
        trailing[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            read::<Msg>(&mut trailing.as_slice(), MAX_MESSAGE).await,
            Err(WireError::Decode(_))
        ));
        assert!(matches!(decode::<Msg>(&[1]), Err(WireError::Short(1))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode::<Msg>(&bytes);
            let mut with_version = VERSION.to_le_bytes().to_vec();
            with_version.extend_from_slice(&bytes);
            let _ = decode::<Msg>(&with_version);
        }

        #[test]
        fn any_message_round_trips(node in ".{0,40}", capacity in any::<u64>(), stripe in any::<u64>()) {
            for m in [Msg::Hello { node: node.clone(), capacity }, Msg::Get { volume: [1; 16], stripe, index: 0 }] {
                let frame = encode(&m).unwrap();
                prop_assert_eq!(decode::<Msg>(&frame[4..]).unwrap(), m);
            }
        }
    }
}
