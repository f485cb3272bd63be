//! The pure parsers of client input: request headers and their validation,
//! and the INFO/GO and meta-context option payloads. None may panic, and
//! whatever validation accepts must lie inside the export.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshdisk::nbd::handshake::{parse_info_request, parse_meta_context_request};
use meshdisk::nbd::proto::{
    Command, EXPORT_NAME_MAX_PAYLOAD, MAX_PAYLOAD, RequestHeader, Session, TFLAG_HAS_FLAGS, validate,
};

fuzz_target!(|data: &[u8]| {
    let _ = parse_info_request(data);
    let _ = parse_meta_context_request(data);
    if data.len() < 28 + 5 {
        return;
    }
    let raw: &[u8; 28] = data[..28].try_into().unwrap();
    let Ok(header) = RequestHeader::parse(raw) else { return };
    let size = u64::from_le_bytes(data[28..36.min(data.len())].try_into().unwrap_or([0; 8]));
    let session = Session {
        size,
        tflags: TFLAG_HAS_FLAGS | u16::from_le_bytes([data[30], data[31]]),
        structured: data[32] & 1 != 0,
        base_allocation: data[32] & 2 != 0,
        meshdisk_health: data[32] & 8 != 0,
        // Clients told block sizes (GO) or not (EXPORT_NAME).
        max_payload: if data[32] & 4 != 0 { EXPORT_NAME_MAX_PAYLOAD } else { MAX_PAYLOAD },
    };
    match validate(&header, &session) {
        Ok(Command::Read { offset, length, .. } | Command::Write { offset, length, .. }) => {
            assert!(length <= session.max_payload);
            assert!(offset.checked_add(u64::from(length)).is_some_and(|end| end <= size));
        }
        Ok(
            Command::Trim { offset, length, .. }
            | Command::Cache { offset, length }
            | Command::WriteZeroes { offset, length, .. }
            | Command::BlockStatus { offset, length, .. },
        ) => {
            assert!(offset.checked_add(u64::from(length)).is_some_and(|end| end <= size));
        }
        _ => {}
    }
});
