//! `meshdisk bench codec`: how fast this machine runs each codec stage and
//! the whole pipelines of a segment, per core and on every core, in the
//! spirit of `cryptsetup benchmark`.
//!
//! Every stage runs on a real segment of the chosen geometry (k data
//! shards of `shard_size`, m parity) for a fixed time after one warm-up
//! round; throughput is bytes of the segment's data area per second (for
//! `hash`, bytes hashed; for `erasure encode`, data bytes in). The
//! pipelines are the volume's: a write encrypts its blocks, a commit
//! erasure-codes and hashes them into a segment (`encode pipeline`); a read checks
//! data shards against their roots and decrypts (`read pipeline`); a
//! degraded read rebuilds min(k, m) missing data shards from parity first
//! (`degraded read`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use super::erasure::{Erasure, Geometry};
use super::key::{KeyError, VolumeKey};
use super::segment::{
    BLOCK_SIZE, SegmentCodec, SegmentError, SegmentGeometry, SegmentId, ShardRoot, verify_shard,
};
use super::xts::{SECTOR_SIZE, SectorCipher};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub geometry: Geometry,
    /// Measuring time per stage.
    pub duration: Duration,
    /// Threads for the all-cores pipeline stages.
    pub threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// One measured stage.
#[derive(Clone, Debug)]
pub struct StageResult {
    pub stage: &'static str,
    pub threads: usize,
    pub bytes: u64,
    pub seconds: f64,
}

impl StageResult {
    pub fn gib_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds / (1u64 << 30) as f64
    }
}

/// The segment geometry of a codec geometry: shards of whole 4 KiB blocks.
fn segment_geometry(g: Geometry) -> Result<SegmentGeometry, SegmentError> {
    SegmentGeometry::new(g.k(), g.m(), g.shard_size().div_ceil(BLOCK_SIZE).max(1) as u32)
}

/// Runs every stage, calling `progress` after each one.
pub fn run(
    config: &BenchConfig,
    mut progress: impl FnMut(&StageResult),
) -> Result<Vec<StageResult>, BenchError> {
    // Read the CPU set before pinning this thread to the first of them.
    let cpus = allowed_cpus();
    let _pin = Pinned::to(&cpus[..cpus.len().min(1)]);
    let sg = segment_geometry(config.geometry)?;
    let g = Geometry::new(sg.k(), sg.m(), sg.shard_len()).expect("a segment geometry is a codec geometry");
    let key = VolumeKey::generate()?;
    let cipher = SectorCipher::new(&key);
    let plain = pattern(sg.data_area_len(), 0x9e37_79b9_7f4a_7c15);
    let mut ciphertext = vec![0u8; plain.len()];
    cipher.encrypt(0, 1, &plain, &mut ciphertext);
    let (volume, id) = ([7u8; 16], SegmentId::new(1, 1).expect("a valid id"));
    let mut codec = SegmentCodec::new(sg);
    let segment = codec.encode(&volume, id, &ciphertext)?;
    let shards: Vec<&[u8]> = ciphertext.chunks_exact(sg.shard_len()).collect();
    let area = sg.data_area_len() as u64;
    let lost = g.k().min(g.m());
    let mut results = Vec::new();
    let mut record = |r: StageResult| {
        progress(&r);
        results.push(r);
    };

    let mut buf = vec![0u8; plain.len()];
    record(measure("encrypt", config.duration, area, || {
        cipher.encrypt(0, 1, &plain, &mut buf);
        black_box(&buf);
    }));
    record(measure("decrypt", config.duration, area, || {
        cipher.decrypt(0, 1, &ciphertext, &mut buf);
        black_box(&buf);
    }));
    // The CPU's AES speed without XTS, for reference: the same `aes` crate
    // over the same 4 KiB sectors, no tweaks (copy, then encrypt in place).
    let mut raw_key = [0u8; 32];
    getrandom::fill(&mut raw_key).map_err(|e| KeyError::Random(e.to_string()))?;
    let raw = <aes::Aes256 as aes::cipher::KeyInit>::new_from_slice(&raw_key).expect("32-byte key");
    record(measure("aes-256 without xts", config.duration, area, || {
        for (out, input) in buf.chunks_exact_mut(SECTOR_SIZE).zip(plain.chunks_exact(SECTOR_SIZE)) {
            out.copy_from_slice(input);
            let (blocks, _) = aes::cipher::Array::slice_as_chunks_mut(out);
            aes::cipher::BlockCipherEncrypt::encrypt_blocks(&raw, blocks);
        }
        black_box(&buf);
    }));

    if g.m() > 0 {
        let mut erasure = Erasure::new(g);
        let mut parity = vec![vec![0u8; g.shard_size()]; g.m()];
        record(measure("erasure encode", config.duration, area, || {
            erasure.encode(&shards, &mut parity).expect("geometry checked");
            black_box(&parity);
        }));
        let all: Vec<&[u8]> = shards.iter().copied().chain(parity.iter().map(Vec::as_slice)).collect();
        let degraded: Vec<Option<&[u8]>> =
            all.iter().enumerate().map(|(i, s)| (i >= lost).then_some(*s)).collect();
        record(measure("erasure decode (degraded)", config.duration, area, || {
            erasure
                .reconstruct(&degraded, |_, b| {
                    black_box(b);
                })
                .expect("enough shards");
        }));
    }

    let payloads = (sg.shards() * sg.shard_len()) as u64;
    let header = segment.shards[0].len() - sg.shard_len();
    record(measure("hash (blake3)", config.duration, payloads, || {
        for s in &segment.shards {
            black_box(ShardRoot::of(&s[header..]));
        }
    }));

    let write = |codec: &mut SegmentCodec, buf: &mut [u8]| {
        cipher.encrypt(0, 1, &plain, buf);
        black_box(codec.encode(&volume, id, buf).expect("sized"));
    };
    record(measure("encode pipeline", config.duration, area, || write(&mut codec, &mut buf)));
    if config.threads > 1 {
        record(measure_threads("encode pipeline", config.duration, area, config.threads, &cpus, || {
            let (mut codec, mut buf) = (SegmentCodec::new(sg), vec![0u8; plain.len()]);
            let write = &write;
            move || write(&mut codec, &mut buf)
        }));
    }

    // A read: each data shard checked against the segment root, then its
    // blocks decrypted.
    let read = |buf: &mut [u8]| {
        for (i, s) in segment.shards[..sg.k()].iter().enumerate() {
            let (_, payload) = verify_shard(s, &segment.root).expect("a good shard");
            let at = i * sg.shard_len();
            let first = (at / SECTOR_SIZE) as u64;
            cipher.decrypt(first, 1, payload, &mut buf[at..at + sg.shard_len()]);
        }
        black_box(&buf);
    };
    record(measure("read pipeline", config.duration, area, || read(&mut buf)));
    if config.threads > 1 {
        record(measure_threads("read pipeline", config.duration, area, config.threads, &cpus, || {
            let (read, mut buf) = (&read, vec![0u8; plain.len()]);
            move || read(&mut buf)
        }));
    }
    debug_assert_eq!(buf, plain);
    if lost > 0 {
        let degraded: Vec<Option<&[u8]>> =
            segment.shards.iter().enumerate().map(|(i, s)| (i >= lost).then_some(s.as_slice())).collect();
        // A degraded read: the missing data shards rebuilt (every shard
        // used checked against the segment root), then all decrypted.
        let degraded_read = |codec: &mut SegmentCodec, buf: &mut [u8]| {
            let rebuilt = codec.rebuild(&segment.root, &degraded).expect("enough shards");
            for (i, s) in rebuilt.shards.iter().take(lost).map(|(i, s)| (*i, s)) {
                let at = i * sg.shard_len();
                let first = (at / SECTOR_SIZE) as u64;
                cipher.decrypt(first, 1, &s[header..], &mut buf[at..at + sg.shard_len()]);
            }
            for (i, s) in segment.shards[lost..sg.k()].iter().enumerate() {
                let at = (lost + i) * sg.shard_len();
                let first = (at / SECTOR_SIZE) as u64;
                cipher.decrypt(first, 1, &s[header..], &mut buf[at..at + sg.shard_len()]);
            }
            black_box(&buf);
        };
        record(measure("degraded read", config.duration, area, || degraded_read(&mut codec, &mut buf)));
        if config.threads > 1 {
            record(measure_threads("degraded read", config.duration, area, config.threads, &cpus, || {
                let (mut codec, mut buf) = (SegmentCodec::new(sg), vec![0u8; plain.len()]);
                let degraded_read = &degraded_read;
                move || degraded_read(&mut codec, &mut buf)
            }));
        }
        debug_assert_eq!(buf, plain);
    }
    Ok(results)
}

/// `len` pseudo-random bytes (xorshift64 from `seed`): test and benchmark
/// data that compresses and repeats nowhere.
pub(crate) fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn measure(
    stage: &'static str,
    duration: Duration,
    bytes_per_round: u64,
    mut round: impl FnMut(),
) -> StageResult {
    round(); // warm-up: caches, lazily built tables
    let start = Instant::now();
    let mut rounds = 0u64;
    while rounds == 0 || start.elapsed() < duration {
        round();
        rounds += 1;
    }
    StageResult { stage, threads: 1, bytes: rounds * bytes_per_round, seconds: start.elapsed().as_secs_f64() }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// Pins the calling thread to one CPU until dropped, then restores the
/// thread's previous CPU set. Pinning is best effort: without it the
/// numbers are only noisier.
struct Pinned(Option<libc::cpu_set_t>);

impl Pinned {
    /// Restricts the calling thread to `cpus` (threads start with their
    /// creator's set, which here is the one pinned CPU); nothing if empty.
    fn to(cpus: &[usize]) -> Self {
        if cpus.is_empty() {
            return Self(None);
        }
        // SAFETY: as in `allowed_cpus`; sched_setaffinity reads the set.
        unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old) != 0 {
                return Self(None);
            }
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &cpu in cpus {
                libc::CPU_SET(cpu, &mut set);
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Self(None);
            }
            Self(Some(old))
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            // SAFETY: restores the set read in `Pinned::to`.
            unsafe {
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), old);
            }
        }
    }
}

fn measure_threads<F: FnMut() + Send>(
    stage: &'static str,
    duration: Duration,
    bytes_per_round: u64,
    threads: usize,
    cpus: &[usize],
    make: impl Fn() -> F,
) -> StageResult {
    let mut workers: Vec<F> = (0..threads).map(|_| make()).collect();
    // Warm up here, before any thread waits on the barrier: a round that
    // panics must not leave the others waiting for ever.
    for round in &mut workers {
        round();
    }
    let barrier = std::sync::Barrier::new(threads);
    let (rounds, seconds) = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .into_iter()
            .enumerate()
            .map(|(i, mut round)| {
                let barrier = &barrier;
                // Distinct CPUs while there are enough; otherwise any of them.
                let allowed = if threads <= cpus.len() { &cpus[i..=i] } else { cpus };
                scope.spawn(move || {
                    let _pin = Pinned::to(allowed);
                    barrier.wait();
                    let start = Instant::now();
                    let mut rounds = 0u64;
                    while rounds == 0 || start.elapsed() < duration {
                        round();
                        rounds += 1;
                    }
                    (rounds, start.elapsed().as_secs_f64())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .fold((0u64, 0f64), |(r, s), (rounds, secs)| (r + rounds, s.max(secs)))
    });
    StageResult { stage, threads, bytes: rounds * bytes_per_round, seconds }
}

/// CPU features that decide which code paths run.
pub fn cpu_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("aes") {
            f.push("aes-ni");
        }
        if std::arch::is_x86_feature_detected!("vaes") {
            f.push("vaes");
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            f.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            f.push("avx512f");
        }
        if std::arch::is_x86_feature_detected!("ssse3") {
            f.push("ssse3");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("aes") {
            f.push("aes");
        }
        if std::arch::is_aarch64_feature_detected!("neon") {
            f.push("neon");
        }
    }
    f
}

/// The report as a table for people.
pub fn render_table(config: &BenchConfig, results: &[StageResult]) -> String {
    let g = config.geometry;
    let mut s = format!(
        "# meshdisk codec benchmark: k={} m={} shard {} KiB (segment data {} KiB = {} blocks of {} B), {:.1} s per stage\n",
        g.k(),
        g.m(),
        g.shard_size() / 1024,
        g.stripe_size() / 1024,
        g.stripe_size() / SECTOR_SIZE,
        SECTOR_SIZE,
        config.duration.as_secs_f64()
    );
    s.push_str(&format!("# cpu features: {}\n", cpu_features().join(" ")));
    s.push_str(&format!("{:<28} {:>7} {:>12}\n", "stage", "threads", "GiB/s"));
    for r in results {
        s.push_str(&format!("{:<28} {:>7} {:>12.2}\n", r.stage, r.threads, r.gib_per_s()));
    }
    s
}

/// The report as one JSON object for programs.
pub fn render_json(config: &BenchConfig, results: &[StageResult]) -> String {
    // Field order is the output's: k, m, sizes, then the stages.
    #[derive(serde::Serialize)]
    struct Report<'a> {
        k: usize,
        m: usize,
        shard_size: usize,
        segment_size: usize,
        block_size: usize,
        seconds_per_stage: f64,
        cpu_features: Vec<&'static str>,
        stages: Vec<Stage<'a>>,
    }
    #[derive(serde::Serialize)]
    struct Stage<'a> {
        stage: &'a str,
        threads: usize,
        gib_per_s: f64,
        bytes: u64,
        seconds: f64,
    }
    /// As many decimals as a measurement means.
    fn round(x: f64, decimals: i32) -> f64 {
        let scale = 10f64.powi(decimals);
        (x * scale).round() / scale
    }
    let g = config.geometry;
    let report = Report {
        k: g.k(),
        m: g.m(),
        shard_size: g.shard_size(),
        segment_size: g.stripe_size(),
        block_size: SECTOR_SIZE,
        seconds_per_stage: config.duration.as_secs_f64(),
        cpu_features: cpu_features(),
        stages: results
            .iter()
            .map(|r| Stage {
                stage: r.stage,
                threads: r.threads,
                gib_per_s: round(r.gib_per_s(), 3),
                bytes: r.bytes,
                seconds: round(r.seconds, 4),
            })
            .collect(),
    };
    serde_json::to_string(&report).expect("plain numbers and strings serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_runs_and_reports_positive_throughput() {
        let config = BenchConfig {
            geometry: Geometry::new(3, 2, 2 * SECTOR_SIZE).unwrap(),
            duration: Duration::from_millis(5),
            threads: 2,
        };
        let mut seen = 0;
        let results = run(&config, |_| seen += 1).unwrap();
        let names: Vec<(&str, usize)> = results.iter().map(|r| (r.stage, r.threads)).collect();
        assert_eq!(
            names,
            [
                ("encrypt", 1),
                ("decrypt", 1),
                ("aes-256 without xts", 1),
                ("erasure encode", 1),
                ("erasure decode (degraded)", 1),
                ("hash (blake3)", 1),
                ("encode pipeline", 1),
                ("encode pipeline", 2),
                ("read pipeline", 1),
                ("read pipeline", 2),
                ("degraded read", 1),
                ("degraded read", 2),
            ]
        );
        assert_eq!(seen, results.len());
        assert!(results.iter().all(|r| r.bytes > 0 && r.seconds > 0.0 && r.gib_per_s() > 0.0));
        let json = render_json(&config, &results);
        assert!(json.starts_with("{\"k\":3,\"m\":2,\"shard_size\":8192,"), "{json}");
        assert_eq!(json.matches("\"stage\"").count(), results.len());
        assert!(render_table(&config, &results).contains("degraded read"));
    }

    #[test]
    fn no_parity_skips_parity_stages() {
        let config = BenchConfig {
            geometry: Geometry::new(2, 0, SECTOR_SIZE).unwrap(),
            duration: Duration::from_millis(1),
            threads: 1,
        };
        let results = run(&config, |_| ()).unwrap();
        assert!(results.iter().all(|r| !r.stage.contains("erasure") && r.stage != "degraded read"));
    }
}
