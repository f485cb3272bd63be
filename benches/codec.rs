//! The stripe codec's stages and pipelines, one core, default geometry
//! (k=4, m=2, 256 KiB shards: 1 MiB stripes). `meshdisk bench codec` runs
//! the same measurements without criterion, and on every core.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshdisk::codec::{Erasure, Geometry, SectorCipher, ShardHash, StripeCodec, VolumeKey};
use std::hint::black_box;

fn setup() -> (Geometry, VolumeKey, Vec<u8>) {
    let g = Geometry::new(4, 2, 256 * 1024).unwrap();
    let key = VolumeKey::generate().unwrap();
    let plain: Vec<u8> = (0..g.stripe_size()).map(|i| (i * 31 % 251) as u8).collect();
    (g, key, plain)
}

fn stages(c: &mut Criterion) {
    let (g, key, plain) = setup();
    let cipher = SectorCipher::new(&key);
    let mut codec = StripeCodec::new(&key, g).unwrap();
    let mut shards = vec![vec![0u8; g.shard_size()]; g.shards()];
    let mut hashes = vec![ShardHash::default(); g.shards()];
    codec.encode(&plain, 0, 1, &mut shards, &mut hashes).unwrap();
    let mut buf = vec![0u8; g.stripe_size()];

    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Bytes(g.stripe_size() as u64));
    group.bench_function("encrypt 1 MiB", |b| b.iter(|| cipher.encrypt(0, 1, black_box(&plain), &mut buf)));
    let ct = {
        let mut ct = vec![0u8; g.stripe_size()];
        cipher.encrypt(0, 1, &plain, &mut ct);
        ct
    };
    group.bench_function("decrypt 1 MiB", |b| b.iter(|| cipher.decrypt(0, 1, black_box(&ct), &mut buf)));

    let mut erasure = Erasure::new(g);
    let mut parity = vec![vec![0u8; g.shard_size()]; g.m()];
    group.bench_function("erasure encode k4m2", |b| {
        b.iter(|| erasure.encode(black_box(&shards[..g.k()]), &mut parity).unwrap())
    });
    let degraded: Vec<Option<&[u8]>> =
        shards.iter().enumerate().map(|(i, s)| (i >= 2).then_some(s.as_slice())).collect();
    group.bench_function("erasure decode k4m2, 2 data shards lost", |b| {
        b.iter(|| {
            erasure
                .reconstruct(black_box(&degraded), |_, r| {
                    black_box(r);
                })
                .unwrap()
        })
    });

    let mut out_shards = shards.clone();
    let mut out_hashes = hashes.clone();
    group.bench_function("encode pipeline", |b| {
        b.iter(|| codec.encode(black_box(&plain), 0, 1, &mut out_shards, &mut out_hashes).unwrap())
    });
    let whole: Vec<Option<&[u8]>> = shards.iter().map(|s| Some(s.as_slice())).collect();
    group.bench_function("read pipeline", |b| {
        b.iter(|| codec.decode(black_box(&whole), &hashes, 0, 1, &mut buf).unwrap())
    });
    group.bench_function("degraded read, 2 data shards lost", |b| {
        b.iter(|| codec.decode(black_box(&degraded), &hashes, 0, 1, &mut buf).unwrap())
    });
    group.finish();

    let mut group = c.benchmark_group("hash");
    group.throughput(Throughput::Bytes(g.shard_size() as u64));
    group.bench_function("blake3 256 KiB shard", |b| b.iter(|| ShardHash::of(black_box(&shards[0]))));
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
