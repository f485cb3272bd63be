//! Request parsing and reply encoding: the per-request CPU cost of the
//! protocol layer, apart from any I/O.

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshdisk::nbd::proto::*;
use std::hint::black_box;

fn session() -> Session {
    Session {
        size: 4 << 30,
        tflags: TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_DF,
        structured: true,
        base_allocation: true,
        meshdisk_health: false,
        max_payload: MAX_PAYLOAD,
    }
}

fn requests(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    let mut raw = Vec::new();
    for i in 0..1024u64 {
        let mut b = BytesMut::new();
        RequestHeader {
            flags: 0,
            kind: (i % 2) as u16,
            cookie: i,
            offset: (i * 4096) % (4 << 30),
            length: 4096,
        }
        .encode(&mut b);
        raw.push(<[u8; 28]>::try_from(&b[..]).unwrap());
    }
    let s = session();
    g.throughput(Throughput::Elements(raw.len() as u64));
    g.bench_function("parse+validate", |b| {
        b.iter(|| {
            for r in &raw {
                let h = RequestHeader::parse(black_box(r)).unwrap();
                black_box(validate(&h, &s).unwrap());
            }
        })
    });
    g.finish();
}

fn replies(c: &mut Criterion) {
    let mut g = c.benchmark_group("reply");
    g.throughput(Throughput::Elements(1024));
    let mut out = BytesMut::with_capacity(64 * 1024);
    g.bench_function("simple", |b| {
        b.iter(|| {
            out.clear();
            for i in 0..1024u64 {
                put_simple_reply(&mut out, black_box(i), 0);
            }
        })
    });
    g.bench_function("structured data header", |b| {
        b.iter(|| {
            out.clear();
            for i in 0..1024u64 {
                put_data_chunk_header(&mut out, black_box(i), true, i * 4096, 4096);
            }
        })
    });
    let extents: Vec<(u32, u32)> = (0..16).map(|i| (4096 * (i + 1), i % 4)).collect();
    g.bench_function("block status (16 extents)", |b| {
        b.iter(|| {
            out.clear();
            for i in 0..1024u64 {
                put_block_status_chunk(&mut out, black_box(i), true, BASE_ALLOCATION_ID, &extents);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, requests, replies);
criterion_main!(benches);
