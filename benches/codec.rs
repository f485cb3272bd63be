//! The codec's stages and a segment's pipelines, one core, default
//! geometry (k=4, m=2, 256 KiB shards: 1 MiB of data per segment).
//! `meshdisk bench codec` runs the same measurements without criterion,
//! and on every core.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshdisk::codec::segment::{SegmentCodec, SegmentGeometry, SegmentId, ShardRoot, verify_shard};
use meshdisk::codec::{Erasure, Geometry, SectorCipher, VolumeKey};
use std::hint::black_box;

fn stages(c: &mut Criterion) {
    let sg = SegmentGeometry::new(4, 2, 64).unwrap();
    let g = Geometry::new(4, 2, sg.shard_len()).unwrap();
    let key = VolumeKey::generate().unwrap();
    let cipher = SectorCipher::new(&key);
    let plain: Vec<u8> = (0..sg.data_area_len()).map(|i| (i * 31 % 251) as u8).collect();
    let mut ct = vec![0u8; plain.len()];
    cipher.encrypt(0, 1, &plain, &mut ct);
    let (volume, id) = ([7u8; 16], SegmentId::new(1, 1).unwrap());
    let mut codec = SegmentCodec::new(sg);
    let segment = codec.encode(&volume, id, &ct).unwrap();
    let header = segment.shards[0].len() - sg.shard_len();
    let mut buf = vec![0u8; plain.len()];

    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Bytes(plain.len() as u64));
    group.bench_function("encrypt 1 MiB", |b| b.iter(|| cipher.encrypt(0, 1, black_box(&plain), &mut buf)));
    group.bench_function("decrypt 1 MiB", |b| b.iter(|| cipher.decrypt(0, 1, black_box(&ct), &mut buf)));

    let data: Vec<&[u8]> = ct.chunks_exact(sg.shard_len()).collect();
    let mut erasure = Erasure::new(g);
    let mut parity = vec![vec![0u8; g.shard_size()]; g.m()];
    group.bench_function("erasure encode k4m2", |b| {
        b.iter(|| erasure.encode(black_box(&data), &mut parity).unwrap())
    });
    let payloads: Vec<&[u8]> = segment.shards.iter().map(|s| &s[header..]).collect();
    let degraded: Vec<Option<&[u8]>> =
        payloads.iter().enumerate().map(|(i, s)| (i >= 2).then_some(*s)).collect();
    group.bench_function("erasure decode k4m2, 2 data shards lost", |b| {
        b.iter(|| {
            erasure
                .reconstruct(black_box(&degraded), |_, r| {
                    black_box(r);
                })
                .unwrap()
        })
    });

    group.bench_function("encode pipeline", |b| {
        b.iter(|| {
            cipher.encrypt(0, 1, black_box(&plain), &mut buf);
            black_box(codec.encode(&volume, id, &buf).unwrap())
        })
    });
    group.bench_function("read pipeline", |b| {
        b.iter(|| {
            for (i, s) in segment.shards[..4].iter().enumerate() {
                let (_, payload) = verify_shard(black_box(s), &segment.root).unwrap();
                let at = i * sg.shard_len();
                cipher.decrypt((at / 4096) as u64, 1, payload, &mut buf[at..at + sg.shard_len()]);
            }
        })
    });
    let lost: Vec<Option<&[u8]>> =
        segment.shards.iter().enumerate().map(|(i, s)| (i >= 2).then_some(s.as_slice())).collect();
    group.bench_function("degraded read, 2 data shards lost", |b| {
        b.iter(|| black_box(codec.rebuild(&segment.root, black_box(&lost)).unwrap()))
    });
    group.finish();

    let mut group = c.benchmark_group("hash");
    group.throughput(Throughput::Bytes(g.shard_size() as u64));
    group.bench_function("blake3 tree 256 KiB shard", |b| b.iter(|| ShardRoot::of(black_box(payloads[0]))));
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
