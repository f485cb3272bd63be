//! `meshdisk bench directory` runs against a real directory and six real
//! peers (placement needs k + m up), so the benchmark behind issue 16's
//! directory goal (`tools/bench directory`) does not rot: a short run
//! commits on every volume, with the compactor rounds its commits wake,
//! and deletes its volumes after; `--keep` leaves them with their roots.

mod common;

use common::cluster::Cluster;

/// Runs the benchmark; its JSON line.
fn bench(c: &Cluster, extra: &[&str]) -> serde_json::Value {
    let cred = c.admin_cred();
    let mut args = vec!["bench", "directory", "--credential", cred.to_str().unwrap()];
    args.extend(["--seconds", "1", "--volumes", "2", "--json"]);
    args.extend(extra);
    let (ok, out, err) = c.cli(&args);
    assert!(ok, "bench directory failed: {err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn bench_directory_commits_on_every_volume_and_cleans_up() {
    let mut c = Cluster::start("bench", &[]);
    for i in 0..6 {
        c.add_peer("4G", &format!("disk-{i}"));
    }
    c.wait_all_up(6);

    let r = bench(&c, &[]);
    let commits = r["commits"].as_u64().unwrap();
    assert_eq!(r["volumes"].as_u64(), Some(2));
    // Two loops for a second, each commit a few milliseconds: many.
    assert!(commits >= 10, "{r}");
    assert!(r["commits_per_s"].as_f64().unwrap() > 0.0, "{r}");
    let (p50, p99) = (r["p50_ms"].as_f64().unwrap(), r["p99_ms"].as_f64().unwrap());
    assert!(p50 > 0.0 && p99 >= p50, "{r}");
    // One record per commit at least (a checkpoint commit adds one).
    assert!(r["segments"].as_u64().unwrap() >= commits, "{r}");
    // Each commit wakes its volume's compactor round.
    assert!(r["compactor_rounds"].as_u64().unwrap() > 0, "{r}");
    assert!(r["mean_root_bytes"].as_f64().unwrap() > 0.0, "{r}");
    assert!(c.status().volumes.is_empty(), "the benchmark's volumes are deleted at its end");

    // Commits alone, volumes kept: each has the root of its last commit.
    let r = bench(&c, &["--no-compactor", "--keep"]);
    assert_eq!(r["compactor_rounds"].as_u64(), Some(0), "{r}");
    let volumes = c.status().volumes;
    assert_eq!(volumes.len(), 2);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The client's endpoint needs the runtime.
    let _in_rt = rt.enter();
    let client = c.client();
    let committed: u64 = volumes
        .iter()
        .map(|v| rt.block_on(client.root(&v.record.spec.name)).unwrap().expect("a committed root").commit)
        .sum();
    assert_eq!(committed, r["commits"].as_u64().unwrap(), "{r}");
}
