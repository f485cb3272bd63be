//! Volumes at the directory: the `meshdisk volume` commands, write leases
//! with fencing epochs, and deletion that erases shards from the peers.

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use meshdisk::api::ErrorKind;
use meshdisk::backend::{self, Backend};
use meshdisk::client::Client;
use meshdisk::membership::credential::Credential;
use meshdisk::nbd::errors::nbd_error;
use meshdisk::nbd::proto::NbdError;
use meshdisk::volume::v2::{Config, Volume};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn cred(c: &Cluster) -> String {
    c.admin_cred().to_str().unwrap().to_owned()
}

#[test]
fn volumes_are_created_listed_inspected_and_checked() {
    let c = Cluster::start("home", &[]);
    let key = c.root.path().join("photos.key");
    let (ok, _, err) = c.cli(&[
        "volume",
        "create",
        "photos",
        "--size",
        "1G",
        "--key-file",
        key.to_str().unwrap(),
        "--credential",
        &cred(&c),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("wrote a new volume key") && err.contains("created volume photos"), "{err}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&key).unwrap().len(), 64);

    // A passphrase volume stores its Argon2 parameters, never the passphrase.
    let out = std::process::Command::new(common::meshdisk_bin())
        .args(["volume", "create", "notes", "--size", "64M", "--k", "2", "--m", "1", "--shard-size", "64K"])
        .args(["--durability", "local", "--passphrase", "--credential", &cred(&c)])
        .env("MESHDISK_PASSPHRASE", "correct horse battery staple")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let (ok, table, err) = c.cli(&["volume", "list", "--credential", &cred(&c)]);
    assert!(ok, "{err}");
    assert!(table.contains("photos") && table.contains("4+2") && table.contains("notes"), "{table}");
    let (ok, info, err) = c.cli(&["volume", "info", "notes", "--credential", &cred(&c)]);
    assert!(ok, "{err}");
    for want in [
        "k=2 data + m=1 parity",
        "passphrase (Argon2id)",
        "durability    local",
        "writer        nobody",
        "0 segments (0 B): 0 whole",
    ] {
        assert!(info.contains(want), "{want:?} missing:\n{info}");
    }
    let (ok, json, _) = c.cli(&["volume", "info", "photos", "--json", "--credential", &cred(&c)]);
    assert!(ok);
    let v: meshdisk::api::VolumeInfo = serde_json::from_str(&json).unwrap();
    assert_eq!((v.record.spec.k, v.record.spec.m, v.record.spec.repair_threshold), (4, 2, 6));
    assert_eq!(v.record.spec.size, 1 << 30);
    // The stored key check matches the data key the key file unlocks,
    // and not the key file itself (it only opens a key slot).
    let k = meshdisk::codec::VolumeKey::read_file(&key).unwrap();
    let check = meshdisk::codec::key::KeyCheck(v.record.spec.key_check);
    let slots = meshdisk::codec::keyslot::KeySlots::parse(&v.record.spec.key_slots).unwrap();
    let data_key = slots.unlock(&meshdisk::codec::keyslot::Unlock::KeyFile(&k)).unwrap().into_volume_key();
    data_key.verify(&v.record.spec.id, &check).unwrap();
    assert!(k.verify(&v.record.spec.id, &check).is_err());
    let dir_db = std::fs::read(c.root.path().join("directory/directory.redb")).unwrap();
    assert!(!dir_db.windows(13).any(|w| w == b"correct horse"), "the passphrase reached the directory");

    // Clear refusals.
    for (args, want) in [
        (vec!["photos", "--size", "1G", "--key-file", key.to_str().unwrap()], "exists already"),
        (vec!["odd", "--size", "1000", "--key-file", key.to_str().unwrap()], "multiple of 4 KiB"),
        (vec!["wide", "--size", "1G", "--k", "0", "--key-file", key.to_str().unwrap()], "k"),
        (vec!["Bad_Name", "--size", "1G", "--key-file", key.to_str().unwrap()], "must be 1 to 63 characters"),
        (
            vec!["t", "--size", "1G", "--repair-threshold", "9", "--key-file", key.to_str().unwrap()],
            "repair threshold",
        ),
        (
            vec!["d", "--size", "1G", "--durability", "maybe", "--key-file", key.to_str().unwrap()],
            "remote or local",
        ),
    ] {
        let mut full = vec!["volume", "create"];
        full.extend(args);
        let credential = cred(&c);
        full.extend(["--credential", credential.as_str()]);
        let (ok, _, err) = c.cli(&full);
        assert!(!ok && err.contains(want), "{full:?}: {err}");
    }
    // A volume id is never reused, even under another name.
    let rt = runtime();
    rt.block_on(async {
        let client = c.client();
        let mut copy = client.volume("photos").await.unwrap().spec;
        copy.name = "impostor".into();
        let err = client.create_volume(copy).await.unwrap_err();
        assert!(err.to_string().contains("volume id is taken"), "{err}");
    });
    let (ok, _, err) = c.cli(&["volume", "info", "nothing", "--credential", &cred(&c)]);
    assert!(!ok && err.contains("no volume named nothing"), "{err}");
}

#[test]
fn one_writer_holds_a_volume_and_a_takeover_fences_the_old_one() {
    let c = Cluster::start("home", &["--lease-ttl", "2s"]);
    c.create_volume("disk", "64M", 2, 1);
    let (laptop, _) = c.join_client("laptop");
    let (desktop, _) = c.join_client("desktop");
    let rt = runtime();
    rt.block_on(async {
        let a = Client::new(Credential::load(&laptop).unwrap()).unwrap();
        let b = Client::new(Credential::load(&desktop).unwrap()).unwrap();
        let la = a.acquire_lease("disk", false, None).await.unwrap();
        assert_eq!((la.holder.as_str(), la.epoch), ("laptop", 1));
        // The same holder renews; another is refused with the holder named.
        a.renew_lease("disk", 1, 0).await.unwrap();
        let err = b.acquire_lease("disk", false, None).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Conflict));
        assert!(
            err.to_string().contains("attached by laptop") && err.to_string().contains("--force"),
            "{err}"
        );
        assert_eq!(c.status().volumes[0].holder.as_deref(), Some("laptop"));
        // Deleting an attached volume is refused.
        let err = b.delete_volume("disk").await.unwrap_err();
        assert!(err.to_string().contains("attached by laptop"), "{err}");

        // --force: a new epoch; the old writer's renewals and commits fail.
        let lb = b.acquire_lease("disk", true, None).await.unwrap();
        assert_eq!((lb.holder.as_str(), lb.epoch), ("desktop", 2));
        let err = a.renew_lease("disk", 1, 0).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Fenced));
        assert!(err.to_string().contains("taken over by desktop"), "{err}");
        let record = a.volume("disk").await.unwrap();
        let commit = common::cluster::root_commit(&record, la.epoch, None, vec![], vec![]);
        let err = a.commit_root(commit).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Fenced), "{err}");
        let err = a.place_segments("disk", la.epoch, 1, 4096, vec![], 0).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Fenced), "{err}");

        // Released: free for anyone, with a new epoch.
        b.release_lease("disk", 2).await.unwrap();
        assert_eq!(c.status().volumes[0].holder, None);
        let l = a.acquire_lease("disk", false, None).await.unwrap();
        assert_eq!(l.epoch, 3);
        // Not renewed: it lapses after the lease TTL.
        tokio::time::sleep(Duration::from_millis(3000)).await;
        assert_eq!(c.status().volumes[0].holder, None);
        let err = a.renew_lease("disk", 3, 0).await.unwrap_err();
        assert!(err.to_string().contains("lapsed"), "{err}");
        assert_eq!(b.acquire_lease("disk", false, None).await.unwrap().epoch, 4);
    });
}

/// An attached volume (in this process) with its state under `state`.
async fn attach(c: &Cluster, name: &str, state: &str, force: bool) -> Volume {
    let key = common::cluster::data_key(&c.client(), name, &c.root.path().join(format!("{name}.key"))).await;
    let mut config = Config::new(c.root.path().join(state), 8 << 20);
    config.log_size = 64 << 20;
    config.force = force;
    config.io_timeout = Duration::from_secs(3);
    Volume::open(c.client(), name, &key, config).await.unwrap()
}

#[test]
fn a_fenced_writer_fails_with_the_fenced_kind() {
    let mut c = Cluster::start("home", &["--lease-ttl", "3s"]);
    for i in 0..3 {
        c.add_peer("1G", &format!("d{i}"));
    }
    c.wait_all_up(3);
    c.create_volume("disk", "16M", 2, 1);
    let rt = runtime();
    rt.block_on(async {
        let first = attach(&c, "disk", "first", false).await;
        first.write(0, bytes::Bytes::from(vec![b'a'; 4096]), false).await.unwrap();
        first.flush().await.unwrap();
        // A write acknowledged, then another machine takes the volume over
        // by force. The taker serves only a lease TTL later, when the first
        // must have stopped: by then the first knows it is fenced, and its
        // flush (the acknowledged write never committed) is refused so.
        first.write(0, bytes::Bytes::from(vec![b'b'; 4096]), false).await.unwrap();
        let started = std::time::Instant::now();
        let _second = attach(&c, "disk", "second", true).await;
        assert!(started.elapsed() >= Duration::from_secs(3), "the taker served before a lease TTL");
        // Whether the write was committed before the takeover (flush Ok)
        // or not (refused as fenced), nothing after it is accepted.
        if let Err(err) = first.flush().await {
            assert_eq!(err.kind(), backend::ErrorKind::Fenced, "{err}");
        }
        let err = first.write(4096, bytes::Bytes::from(vec![b'c'; 4096]), false).await.unwrap_err();
        assert_eq!(err.kind(), backend::ErrorKind::Fenced, "{err}");
        assert!(err.to_string().contains("fenced") || err.to_string().contains("taken over"), "{err}");
        assert_eq!(nbd_error(&err), NbdError::Io);
        // Reads too: the other machine may have written since, so nothing
        // this attach holds (its log, its cache, its map) may be served.
        let err = first.read(0, 4096).await.unwrap_err();
        assert_eq!(err.kind(), backend::ErrorKind::Fenced, "{err}");
    });
}

#[test]
fn a_full_cluster_fails_a_flush_with_no_space() {
    let mut c = Cluster::start("home", &[]);
    for i in 0..3 {
        c.add_peer("1M", &format!("d{i}"));
    }
    c.wait_all_up(3);
    c.create_volume("disk", "16M", 2, 1);
    let rt = runtime();
    rt.block_on(async {
        let v = attach(&c, "disk", "state", false).await;
        // 4 MiB of data, 64 KiB shards: more than three peers of 1 MiB hold.
        v.write(0, bytes::Bytes::from(vec![b'x'; 4 << 20]), false).await.unwrap();
        let err = v.flush().await.unwrap_err();
        assert_eq!(err.kind(), backend::ErrorKind::Full, "{err}");
        assert_eq!(nbd_error(&err), NbdError::NoSpc);
        assert!(err.to_string().contains("the last commit failed"), "{err}");
    });
}

#[test]
fn deleting_a_volume_erases_its_shards_from_the_peers() {
    let mut c = Cluster::start("home", &[]);
    for i in 0..3 {
        c.add_peer("64M", &format!("d{i}"));
    }
    c.wait_all_up(3);
    c.create_volume("gone", "64M", 2, 1);
    c.create_volume("kept", "16M", 2, 1);
    let rt = runtime();
    let kept = rt.block_on(async {
        // Both volumes written through an attach: 12 MiB and 1 MiB.
        for (name, len) in [("gone", 12 << 20), ("kept", 1 << 20)] {
            let v = attach(&c, name, &format!("state-{name}"), false).await;
            v.write(0, bytes::Bytes::from(common::pattern(7, len)), false).await.unwrap();
            v.flush().await.unwrap();
            v.close(Duration::from_secs(10)).await.unwrap();
        }
        let client = c.client();
        let info = client.volume_info("gone").await.unwrap();
        assert!(info.health.segments >= 3, "{info:?}");
        assert_eq!(info.health.whole, info.health.segments, "{info:?}");
        assert!(info.allocated > 12 << 20, "{info:?}");
        client.volume_info("kept").await.unwrap().allocated
    });
    let s = c.wait_status("shards counted", Duration::from_secs(10), |s| {
        s.peers.iter().map(|p| p.used).sum::<u64>() > (12 << 20) + kept
    });
    let before: u64 = s.peers.iter().map(|p| p.used).sum();
    let (ok, _, err) = c.cli(&["volume", "delete", "gone", "--yes", "--credential", &cred(&c)]);
    assert!(ok, "{err}");
    // Every shard of "gone" goes; "kept" keeps all of its own.
    let s = c.wait_status("shards erased", Duration::from_secs(20), |s| {
        s.volumes.len() == 1 && s.peers.iter().map(|p| p.used).sum::<u64>() < before - (12 << 20)
    });
    let left: u64 = s.peers.iter().map(|p| p.used).sum();
    assert!(left >= kept, "{left} bytes left on the peers, {kept} allocated to kept");
    rt.block_on(async {
        let v = attach(&c, "kept", "state-kept", false).await;
        let got = v.read(0, 1 << 20).await.unwrap().to_vec();
        assert!(got == common::pattern(7, 1 << 20), "kept's data changed");
        v.close(Duration::from_secs(10)).await.unwrap();
    });
    // Once the collector is done, only "kept"'s shards are left.
    c.wait_status("the collector is done", Duration::from_secs(20), |s| {
        s.workers.iter().all(|w| w.queue == Some(0))
    });
    let (ok, _, err) = c.cli(&["volume", "info", "gone", "--credential", &cred(&c)]);
    assert!(!ok && err.contains("no volume named gone"), "{err}");
}

/// `meshdisk` with `envs` set (passphrases for the key slots).
fn cli_with(envs: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(common::meshdisk_bin());
    cmd.args(args)
        .env("NO_COLOR", "1")
        .env_remove("MESHDISK_PASSPHRASE")
        .env_remove("MESHDISK_NEW_PASSPHRASE");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A real `meshdisk attach --passphrase` of `name` from state folder
/// `state`, serving on `state/nbd.sock` once this returns.
fn attach_with_passphrase(
    c: &Cluster,
    name: &str,
    state: &str,
    pass: &str,
) -> (common::cluster::Proc, std::path::PathBuf) {
    let state = c.root.path().join(state);
    let mut cmd = std::process::Command::new(common::meshdisk_bin());
    cmd.args(["attach", name, "--passphrase", "--cache-size", "16M", "--credential"])
        .arg(c.admin_cred())
        .arg("--cache-dir")
        .arg(&state)
        .arg("--socket")
        .arg(state.join("nbd.sock"))
        .env("MESHDISK_PASSPHRASE", pass);
    let mut proc = common::cluster::Proc::spawn(&format!("attach-{state:?}"), &mut cmd);
    proc.wait_for("nbd+unix://", Duration::from_secs(60));
    (proc, state)
}

fn detach(c: &Cluster, name: &str, state: &std::path::Path, mut proc: common::cluster::Proc) {
    let (ok, _, err) = c.cli(&["detach", name, "--cache-dir", state.to_str().unwrap()]);
    assert!(ok, "detach failed: {err}");
    let (status, out) = proc.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "attach did not stop cleanly: {out}");
}

#[test]
fn a_passphrase_changes_without_re_encrypting_and_the_old_one_is_refused() {
    use common::rawclient::RawClient;
    let mut c = Cluster::start("home", &[]);
    for i in 0..3 {
        c.add_peer("256M", &format!("d{i}"));
    }
    c.wait_all_up(3);
    let cred = cred(&c);
    let old = [("MESHDISK_PASSPHRASE", "old horse battery")];
    let (ok, _, err) = cli_with(
        &old,
        &[
            "volume",
            "create",
            "notes",
            "--size",
            "16M",
            "--k",
            "2",
            "--m",
            "1",
            "--shard-size",
            "64K",
            "--passphrase",
            "--credential",
            &cred,
        ],
    );
    assert!(ok, "{err}");
    let rt = runtime();
    let record = |name: &str| rt.block_on(async { c.client().volume(name).await.unwrap() });
    let before = record("notes");

    // Data written (and flushed to the peers) under the old passphrase.
    let data = common::pattern(7, 256 << 10);
    let (proc, state) = attach_with_passphrase(&c, "notes", "first", "old horse battery");
    {
        let mut nbd = RawClient::handshake(&state.join("nbd.sock"), false);
        nbd.request(0, 1, 1, 1 << 20, data.len() as u32, &data);
        assert_eq!(nbd.simple_reply(), (0, 1));
        nbd.request(0, 3, 2, 0, 0, &[]);
        assert_eq!(nbd.simple_reply(), (0, 2));
    }
    detach(&c, "notes", &state, proc);

    // The new passphrase comes from MESHDISK_NEW_PASSPHRASE; a wrong
    // current one changes nothing.
    let wrong = [("MESHDISK_PASSPHRASE", "not it"), ("MESHDISK_NEW_PASSPHRASE", "new")];
    let (ok, _, err) = cli_with(&wrong, &["volume", "passwd", "notes", "--credential", &cred]);
    assert!(!ok && err.contains("volume notes: wrong passphrase"), "{err}");
    let change =
        [("MESHDISK_PASSPHRASE", "old horse battery"), ("MESHDISK_NEW_PASSPHRASE", "new horse staple")];
    let (ok, _, err) = cli_with(&change, &["volume", "passwd", "notes", "--credential", &cred]);
    assert!(ok, "{err}");
    assert!(err.contains("set the passphrase of volume notes") && err.contains("not re-encrypted"), "{err}");
    let after = record("notes");
    assert_ne!(after.spec.key_slots, before.spec.key_slots);
    assert_eq!((after.spec.id, after.spec.key_check), (before.spec.id, before.spec.key_check));

    // The old passphrase is refused, clearly, by passwd and by attach.
    let (ok, _, err) = cli_with(&change, &["volume", "passwd", "notes", "--credential", &cred]);
    assert!(!ok && err.contains("volume notes: wrong passphrase"), "{err}");
    let (ok, _, err) = cli_with(
        &old,
        &[
            "attach",
            "notes",
            "--passphrase",
            "--credential",
            &cred,
            "--cache-dir",
            c.root.path().join("no").to_str().unwrap(),
        ],
    );
    assert!(!ok && err.contains("volume notes: wrong passphrase"), "{err}");

    // The new one attaches (from a fresh folder: the data comes from the
    // peers) and reads back what was written before the change.
    let (proc, state) = attach_with_passphrase(&c, "notes", "second", "new horse staple");
    {
        let mut nbd = RawClient::handshake(&state.join("nbd.sock"), false);
        assert!(nbd.read_simple(3, 1 << 20, data.len() as u32) == data, "data changed across passwd");
    }
    detach(&c, "notes", &state, proc);

    // Key files: one added opens the volume too; removed, it no longer
    // does; the last key is never removed.
    let key = c.root.path().join("notes.key");
    let new = [("MESHDISK_PASSPHRASE", "new horse staple")];
    let add = ["volume", "passwd", "notes", "--add-key-file", key.to_str().unwrap(), "--credential", &cred];
    let (ok, _, err) = cli_with(&new, &add);
    assert!(ok && err.contains("added key slot 1"), "{err}");
    let (ok, info, err) = cli_with(&[], &["volume", "info", "notes", "--credential", &cred]);
    assert!(ok && info.contains("passphrase (Argon2id), key file"), "{err}{info}");
    // The key file alone sets a (forgotten) passphrase.
    let reset = [("MESHDISK_NEW_PASSPHRASE", "third")];
    let (ok, _, err) = cli_with(
        &reset,
        &["volume", "passwd", "notes", "--key-file", key.to_str().unwrap(), "--credential", &cred],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = cli_with(&new, &["volume", "passwd", "notes", "--credential", &cred]);
    assert!(!ok && err.contains("wrong passphrase"), "{err}");
    let remove =
        ["volume", "passwd", "notes", "--remove-key-file", key.to_str().unwrap(), "--credential", &cred];
    let (ok, _, err) = cli_with(&[], &remove);
    assert!(ok && err.contains("removed key slot 1"), "{err}");
    let (ok, _, err) = cli_with(&[], &remove);
    assert!(!ok && err.contains("volume notes: this volume has no key-file slot"), "{err}");
    let (ok, _, err) = cli_with(
        &[("MESHDISK_PASSPHRASE", "third")],
        &["attach", "notes", "--key-file", key.to_str().unwrap(), "--credential", &cred],
    );
    assert!(!ok && err.contains("no key-file slot"), "{err}");
    // A key-file volume's only key stays.
    c.create_volume("disk", "16M", 2, 1);
    let only = c.root.path().join("disk.key");
    let (ok, _, err) = cli_with(
        &[],
        &["volume", "passwd", "disk", "--remove-key-file", only.to_str().unwrap(), "--credential", &cred],
    );
    assert!(!ok && err.contains("last key"), "{err}");
}
