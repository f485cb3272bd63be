//! The server against bad and unusual input, over a real unix socket with a
//! raw client: every refusal is an error reply on a connection that keeps
//! working; only a broken frame closes a connection, and only that one.

mod common;

use std::io::Write;
use std::time::Duration;

use common::rawclient::RawClient;
use common::{Served, pattern};

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;
const MIB: u32 = 1 << 20;

fn write_ok(c: &mut RawClient, cookie: u64, offset: u64, data: &[u8]) {
    c.request(0, 1, cookie, offset, data.len() as u32, data);
    assert_eq!(c.any_reply(), (cookie, 0));
}

#[test]
fn bad_magic_closes_only_that_connection() {
    let s = Served::memory("64M");
    let mut good = RawClient::handshake(&s.socket, true);
    let mut bad = RawClient::handshake(&s.socket, true);
    bad.s.write_all(&[0xde; 28]).unwrap();
    assert!(bad.closed(), "bad magic must close the connection");
    write_ok(&mut good, 1, 0, b"still here");
    good.request(0, 0, 2, 0, 10, &[]);
    let chunk = good.chunk();
    assert_eq!(&chunk.payload[8..], b"still here");
}

#[test]
fn truncated_streams_do_not_disturb_others() {
    let s = Served::memory("64M");
    let mut good = RawClient::handshake(&s.socket, false);
    for cut in [3usize, 27, 28 + 100] {
        let mut c = RawClient::handshake(&s.socket, false);
        let mut req = Vec::new();
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&1u16.to_be_bytes());
        req.extend_from_slice(&5u64.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&4096u32.to_be_bytes());
        req.extend_from_slice(&[7; 4096]);
        c.s.write_all(&req[..cut]).unwrap();
        drop(c);
    }
    // Mid-handshake hang-ups too.
    drop(RawClient::connect(&s.socket));
    write_ok(&mut good, 1, 4096, &[1; 4096]);
    assert_eq!(good.read_simple(2, 4096, 4096), vec![1; 4096]);
}

#[test]
fn out_of_range_requests_get_errors_and_the_connection_goes_on() {
    let s = Served::memory("1M");
    for structured in [false, true] {
        let mut c = RawClient::handshake(&s.socket, structured);
        assert_eq!(c.size, 1 << 20);
        c.request(0, 0, 1, (1 << 20) - 1, 2, &[]);
        assert_eq!(c.any_reply(), (1, EINVAL), "read past the end");
        c.request(0, 1, 2, (1 << 20) - 1, 2, &[9, 9]);
        assert_eq!(c.any_reply(), (2, ENOSPC), "write past the end");
        c.request(0, 6, 3, u64::MAX - 5, 10, &[]);
        assert_eq!(c.any_reply(), (3, ENOSPC), "write zeroes past the end");
        c.request(0, 4, 4, 1 << 21, 1, &[]);
        assert_eq!(c.any_reply(), (4, EINVAL), "trim past the end");
        c.request(0, 99, 5, 0, 0, &[]);
        assert_eq!(c.any_reply(), (5, EINVAL), "unknown command");
        c.request(1 << 12, 0, 6, 0, 1, &[]);
        assert_eq!(c.any_reply(), (6, EINVAL), "unknown flag");
        c.request(0, 3, 7, 8, 0, &[]);
        assert_eq!(c.any_reply(), (7, EINVAL), "flush with an offset");
        // Zero-length requests are harmless no-ops.
        c.request(0, 1, 8, 1 << 20, 0, &[]);
        assert_eq!(c.any_reply(), (8, 0));
        write_ok(&mut c, 9, (1 << 20) - 2, &[5, 6]);
        c.request(0, 0, 10, (1 << 20) - 2, 2, &[]);
        if structured {
            let chunk = c.chunk();
            assert_eq!(chunk.kind, 1);
            assert_eq!(&chunk.payload[8..], &[5, 6]);
        } else {
            assert_eq!(c.simple_reply(), (0, 10));
            let mut b = [0; 2];
            std::io::Read::read_exact(&mut c.s, &mut b).unwrap();
            assert_eq!(b, [5, 6]);
        }
    }
}

#[test]
fn oversized_write_is_refused_after_its_payload_is_consumed() {
    let s = Served::memory("64M");
    let mut c = RawClient::handshake(&s.socket, true);
    let big = 32 * MIB + 4096;
    let payload = vec![0xaa; big as usize];
    c.request(0, 1, 1, 0, big, &payload);
    assert_eq!(c.any_reply(), (1, EOVERFLOW));
    c.request(0, 0, 2, 0, big, &[]);
    assert_eq!(c.any_reply(), (2, EOVERFLOW), "oversized read");
    // The stream is still in sync: the payload was not taken for headers.
    write_ok(&mut c, 3, 0, b"in sync");
    c.request(0, 0, 4, 0, 7, &[]);
    assert_eq!(&c.chunk().payload[8..], b"in sync");
}

#[test]
fn export_name_clients_may_move_64_mib_and_no_more() {
    // Never told a block size, an old-style client may send what the
    // reference server takes: 64 MiB, the connection's whole byte budget.
    let s = Served::memory("160M");
    let mut c = RawClient::handshake_export_name(&s.socket);
    assert_eq!(c.size, 160 << 20);
    let big = 64 * MIB;
    let data = pattern(3, big as usize);
    // Two at once: the second waits for the first's budget, never forever.
    let mut both = Vec::with_capacity(2 * (28 + big as usize));
    for (cookie, offset) in [(1u64, 0u64), (2, u64::from(big))] {
        both.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        both.extend_from_slice(&0u16.to_be_bytes());
        both.extend_from_slice(&1u16.to_be_bytes());
        both.extend_from_slice(&cookie.to_be_bytes());
        both.extend_from_slice(&offset.to_be_bytes());
        both.extend_from_slice(&big.to_be_bytes());
        both.extend_from_slice(&data);
    }
    let mut sender = RawClient { s: c.s.try_clone().unwrap(), size: 0, tflags: 0, structured: false };
    let sending = std::thread::spawn(move || sender.s.write_all(&both).unwrap());
    let mut cookies = [c.simple_reply(), c.simple_reply()];
    cookies.sort();
    assert_eq!(cookies, [(0, 1), (0, 2)]);
    sending.join().unwrap();
    assert!(c.read_simple(3, 0, big) == data, "first 64 MiB read back");
    assert!(c.read_simple(4, u64::from(big), big) == data, "second 64 MiB read back");
    // One byte more is refused, and the stream stays in sync.
    let over = big + 1;
    c.request(0, 1, 5, 0, over, &vec![0xaa; over as usize]);
    assert_eq!(c.simple_reply(), (EOVERFLOW, 5));
    c.request(0, 0, 6, 0, over, &[]);
    assert_eq!(c.simple_reply(), (EOVERFLOW, 6), "oversized read");
    write_ok(&mut c, 7, 0, b"in sync");
    assert_eq!(c.read_simple(8, 0, 7), b"in sync");
}

#[test]
fn read_only_export_refuses_writes_and_consumes_them() {
    let s = Served::start(&["--memory", "8M", "--read-only"]);
    let mut c = RawClient::handshake(&s.socket, false);
    assert!(c.tflags & 2 != 0, "READ_ONLY advertised");
    assert!(c.tflags & (1 << 5) == 0, "no TRIM on a read-only export");
    c.request(0, 1, 1, 0, 8192, &[3; 8192]);
    assert_eq!(c.any_reply(), (1, EPERM));
    assert_eq!(c.read_simple(2, 0, 8192), vec![0; 8192]);
}

#[test]
fn pipelined_requests_all_complete() {
    let s = Served::memory("64M");
    let mut c = RawClient::handshake(&s.socket, true);
    let data = pattern(1, 4 * MIB as usize);
    // 64 writes and 64 reads in flight without waiting for any reply.
    for i in 0..64u64 {
        let off = i as usize * 65536;
        c.request(0, 1, 1000 + i, off as u64, 65536, &data[off..off + 65536]);
    }
    let mut seen: Vec<u64> = (0..64)
        .map(|_| c.any_reply())
        .map(|(k, e)| {
            assert_eq!(e, 0);
            k
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (1000..1064).collect::<Vec<_>>());
    for i in 0..64u64 {
        c.request(0, 0, 2000 + i, i * 65536, 65536, &[]);
    }
    let mut got = vec![0u8; 4 * MIB as usize];
    let mut done = 0;
    while done < 64 {
        let ch = c.chunk();
        assert!(ch.kind == 1, "data chunk");
        let off = u64::from_be_bytes(ch.payload[..8].try_into().unwrap()) as usize;
        got[off..off + ch.payload.len() - 8].copy_from_slice(&ch.payload[8..]);
        if ch.flags & 1 != 0 {
            done += 1;
        }
    }
    assert!(got == data, "pipelined reads return what was written");
}

#[test]
fn handshake_refusals_keep_haggling() {
    let s = Served::start(&["--memory", "8M", "--export", "disk0"]);
    let mut c = RawClient { s: RawClient::connect(&s.socket), size: 0, tflags: 0, structured: false };
    let mut head = [0u8; 18];
    std::io::Read::read_exact(&mut c.s, &mut head).unwrap();
    c.s.write_all(&1u32.to_be_bytes()).unwrap();
    c.option(99, b"whatever");
    assert_eq!(c.option_reply().1, (1 << 31) + 1, "unknown option: ERR_UNSUP");
    c.option(5, &[]);
    assert_eq!(c.option_reply().1, (1 << 31) + 2, "STARTTLS: ERR_POLICY");
    c.option(3, &[]);
    let (_, kind, data) = c.option_reply();
    assert_eq!(kind, 2);
    assert_eq!(&data[4..9], b"disk0");
    assert_eq!(c.option_reply().1, 1);
    let mut info = 4u32.to_be_bytes().to_vec();
    info.extend_from_slice(b"nope");
    info.extend_from_slice(&0u16.to_be_bytes());
    c.option(6, &info);
    assert_eq!(c.option_reply().1, (1 << 31) + 6, "unknown export: ERR_UNKNOWN");
    c.option(6, &[0, 0]);
    assert_eq!(c.option_reply().1, (1 << 31) + 3, "truncated INFO: ERR_INVALID");
    c.option(10, &[0; 8]);
    assert_eq!(c.option_reply().1, (1 << 31) + 3, "meta context before structured replies");
    c.option(8, &[]);
    assert_eq!(c.option_reply().1, 1);
    c.option(8, &[]);
    assert_eq!(c.option_reply().1, (1 << 31) + 3, "structured replies twice");
    // Finally enter transmission by name.
    let mut go = 5u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk0");
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    c.option(7, &go);
    let mut kinds = Vec::new();
    loop {
        let (_, kind, data) = c.option_reply();
        kinds.push((
            kind,
            u16::from_be_bytes([data.first().copied().unwrap_or(0), data.get(1).copied().unwrap_or(0)]),
        ));
        if kind == 1 {
            break;
        }
    }
    assert!(kinds.contains(&(3, 0)), "INFO_EXPORT");
    assert!(kinds.contains(&(3, 1)), "INFO_NAME");
    assert!(kinds.contains(&(3, 3)), "INFO_BLOCK_SIZE");
    c.request(0, 1, 1, 0, 3, b"abc");
    assert_eq!(c.any_reply(), (1, 0));
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn bytes_in_flight_per_connection_are_bounded() {
    // A client that floods 64 KiB READs and does not read the replies: the
    // server holds at most 64 MiB of them in flight (the reply buffers),
    // then stops reading requests. Unbounded, this would cost 1 GiB.
    // The flood's 16,384 request headers (448 KiB) are more than the
    // connection's read buffer (`READ_BUFFER`, 256 KiB: 9,362 headers) and
    // the socket's buffers hold besides the ~1,000 the budget lets run, so
    // a server that stopped reading leaves the sender blocked. (With 1,024
    // requests, all of them fit the read buffer and the sender could
    // finish whether or not the server went on.)
    let s = Served::memory("256M");
    let mut c = RawClient::handshake(&s.socket, false);
    let data = pattern(7, MIB as usize);
    for i in 0..64u64 {
        write_ok(&mut c, i, i << 20, &data);
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_bytes(s.pid());
    let n = 16 * 1024u64;
    let len = 64 * 1024u32;
    // Sent from another thread: once the server stops reading, this blocks.
    let mut sender = RawClient { s: c.s.try_clone().unwrap(), size: 0, tflags: 0, structured: false };
    let flood = std::thread::spawn(move || {
        for i in 0..n {
            sender.request(0, 0, 10_000 + i, (i % 64) << 20, len, &[]);
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(!flood.is_finished(), "the server kept reading requests with 1 GiB of replies unread");
    let grown = rss_bytes(s.pid()).saturating_sub(before);
    assert!(grown < 112 << 20, "server memory grew by {} MiB with replies unread", grown >> 20);
    // Every reply still arrives, intact, once the client reads.
    let mut b = vec![0; len as usize];
    for _ in 0..n {
        let (err, cookie) = c.simple_reply();
        assert_eq!(err, 0);
        std::io::Read::read_exact(&mut c.s, &mut b).unwrap();
        assert!(cookie >= 10_000 && b[..] == data[..len as usize]);
    }
    flood.join().unwrap();
}

#[test]
fn refused_requests_are_bounded_too() {
    // 200k out-of-range reads, no replies read: error replies are charged
    // against the budget like any other, so the server stops reading.
    let s = Served::memory("1M");
    let mut c = RawClient::handshake(&s.socket, true);
    let n = 200_000u64;
    let mut sender = RawClient { s: c.s.try_clone().unwrap(), size: 0, tflags: 0, structured: true };
    let flood = std::thread::spawn(move || {
        let mut batch = Vec::new();
        for i in 0..n {
            batch.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            batch.extend_from_slice(&0u16.to_be_bytes());
            batch.extend_from_slice(&0u16.to_be_bytes());
            batch.extend_from_slice(&i.to_be_bytes());
            batch.extend_from_slice(&(2u64 << 20).to_be_bytes());
            batch.extend_from_slice(&1u32.to_be_bytes());
            if batch.len() > 64 * 1024 {
                sender.s.write_all(&batch).unwrap();
                batch.clear();
            }
        }
        sender.s.write_all(&batch).unwrap();
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(!flood.is_finished(), "the server read 200k bad requests with no replies read");
    for _ in 0..n {
        let (_, err) = c.any_reply();
        assert_eq!(err, EINVAL);
    }
    flood.join().unwrap();
}
