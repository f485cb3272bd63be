//! The codec's command line, run as users run it: `meshdisk key generate`
//! and `meshdisk bench codec`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::meshdisk_bin;
use meshdisk::codec::VolumeKey;

#[test]
fn key_generate_writes_a_private_key_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.key");
    let out = Command::new(meshdisk_bin()).args(["key", "generate"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 64);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let first = std::fs::read(&path).unwrap();
    VolumeKey::read_file(&path).expect("the library reads what the CLI wrote");

    let again = Command::new(meshdisk_bin()).args(["key", "generate"]).arg(&path).output().unwrap();
    assert!(!again.status.success());
    let msg = String::from_utf8_lossy(&again.stderr);
    assert!(msg.contains("already exists") && msg.contains("refusing"), "{msg}");
    assert_eq!(std::fs::read(&path).unwrap(), first, "the existing key is untouched");
    // Nothing printed anywhere contains the key bytes.
    let hex: String = first.iter().map(|b| format!("{b:02x}")).collect();
    for text in [&out.stdout, &out.stderr, &again.stdout, &again.stderr] {
        let text = String::from_utf8_lossy(text);
        assert!(!text.contains(&hex[..16]), "key material printed: {text}");
    }
}

#[test]
fn bench_codec_json_reports_every_stage() {
    let out = Command::new(meshdisk_bin())
        .args(["--threads", "2", "bench", "codec", "--k", "3", "--m", "2", "--shard-size", "16K"])
        .args(["--seconds", "0.02", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json = String::from_utf8(out.stdout).unwrap();
    let json = json.trim();
    assert!(
        json.starts_with("{\"k\":3,\"m\":2,\"shard_size\":16384,\"segment_size\":49152,\"block_size\":4096,"),
        "{json}"
    );
    assert!(json.ends_with("]}"), "{json}");
    for stage in [
        "encrypt",
        "decrypt",
        "aes-256 without xts",
        "erasure encode",
        "erasure decode (degraded)",
        "hash (blake3)",
        "encode pipeline",
        "read pipeline",
        "degraded read",
    ] {
        assert!(json.contains(&format!("\"stage\":\"{stage}\",\"threads\":1,")), "{stage} missing: {json}");
    }
    assert!(json.contains("\"stage\":\"encode pipeline\",\"threads\":2,"), "{json}");
    // Every throughput is a positive number.
    for part in json.split("\"gib_per_s\":").skip(1) {
        let value: f64 = part.split(',').next().unwrap().parse().unwrap();
        assert!(value > 0.0, "{json}");
    }
}

#[test]
fn bench_codec_refuses_bad_geometry_with_a_clear_message() {
    for (args, want) in [
        (vec!["--k", "0"], "k (data shards per stripe) must be 1 to 64"),
        (vec!["--m", "40"], "m (parity shards per stripe) must be 0 to 32"),
        (vec!["--shard-size", "1000"], "multiple of 64"),
        (vec!["--shard-size", "64"], "multiple of 4096"),
    ] {
        let out = Command::new(meshdisk_bin()).args(["bench", "codec"]).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let msg = String::from_utf8_lossy(&out.stderr);
        assert!(msg.contains(want), "{args:?}: {msg}");
    }
}
