//! A real cluster for tests: a `meshdisk directory` process and `meshdisk
//! peer` processes on loopback, each in its own folder under one temporary
//! directory, talked to through the CLI and the library's client.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshdisk::api::{ClusterStatus, PeerState};
use meshdisk::client::Client;
use meshdisk::membership::credential::Credential;

use super::{meshdisk_bin, spawn_tied};

/// A process whose stdout and stderr are collected as they come.
pub struct Proc {
    pub child: Child,
    pub out: Arc<Mutex<String>>,
    pub name: String,
}

impl Proc {
    /// Starts `cmd` (taken: it is left empty), tied to this test process
    /// by [`spawn_tied`]: a killed test leaves no process behind.
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("MESHDISK_LOG", std::env::var("MESHDISK_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1");
        let what = format!("{cmd:?}");
        let taken = std::mem::replace(cmd, Command::new("/nonexistent/spawned-already"));
        let mut child = spawn_tied(taken).unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        let out = Arc::new(Mutex::new(String::new()));
        // MESHDISK_TEST_LOGS=DIR also appends each process's lines to
        // DIR/NAME.log as they come: what a hung test's processes said.
        let tee = std::env::var_os("MESHDISK_TEST_LOGS").map(|dir| {
            let path = Path::new(&dir).join(format!("{name}.log"));
            let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
            Arc::new(Mutex::new(file.unwrap_or_else(|e| panic!("{}: {e}", path.display()))))
        });
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let out = out.clone();
            let tee = tee.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(tee) = &tee {
                        use std::io::Write;
                        let _ = writeln!(tee.lock().unwrap(), "{line}");
                    }
                    let mut o = out.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        Self { child, out, name: name.to_owned() }
    }

    pub fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Waits for a line containing `needle`; returns that line.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self.output().lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader threads catch up.
                std::thread::sleep(Duration::from_millis(100));
                panic!("{} exited ({status}) before printing {needle:?}:\n{}", self.name, self.output());
            }
            assert!(
                start.elapsed() < timeout,
                "{} did not print {needle:?} in {timeout:?}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit by itself; its status and output.
    pub fn wait_exit(&mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return (status, self.output());
            }
            assert!(
                start.elapsed() < timeout,
                "{} still running after {timeout:?}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM, then wait; SIGKILL if it does not stop within 10 s.
    pub fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A UDP port that was free a moment ago.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Cluster {
    pub root: tempfile::TempDir,
    pub directory: Proc,
    pub dir_addr: String,
    pub peers: Vec<Proc>,
    /// Extra arguments every directory start gets.
    pub dir_args: Vec<String>,
    pub heartbeat: &'static str,
    /// Extra arguments every peer start gets.
    pub peer_args: Vec<String>,
}

impl Cluster {
    /// A directory of cluster `name` on a fixed loopback port.
    pub fn start(name: &str, dir_args: &[&str]) -> Self {
        Self::start_on(name, "127.0.0.1", dir_args)
    }

    /// As [`start`], listening on `ip` (0.0.0.0 to be reachable from
    /// network namespaces); members on this host use 127.0.0.1.
    pub fn start_on(name: &str, ip: &str, dir_args: &[&str]) -> Self {
        let root = tempfile::tempdir().unwrap();
        let port = free_udp_port();
        let dir_addr = format!("127.0.0.1:{port}");
        let mut dir_args: Vec<String> = dir_args.iter().map(|s| s.to_string()).collect();
        dir_args.extend(["--listen".to_string(), format!("{ip}:{port}")]);
        let directory = Self::spawn_directory(root.path(), name, &dir_args);
        let mut c = Self {
            root,
            directory,
            dir_addr,
            peers: Vec::new(),
            dir_args,
            heartbeat: "200ms",
            peer_args: Vec::new(),
        };
        c.directory.wait_for("directory listening on", Duration::from_secs(20));
        c
    }

    fn spawn_directory(root: &Path, name: &str, extra: &[String]) -> Proc {
        let mut cmd = Command::new(meshdisk_bin());
        cmd.args(["directory", "--cluster", name, "--data"]).arg(root.join("directory")).args(extra);
        Proc::spawn("directory", &mut cmd)
    }

    pub fn restart_directory(&mut self) {
        self.directory.stop();
        let name = self.credential().cluster;
        self.directory = Self::spawn_directory(self.root.path(), &name, &self.dir_args);
        self.directory.wait_for("directory listening on", Duration::from_secs(20));
    }

    pub fn admin_cred(&self) -> PathBuf {
        self.root.path().join("directory/admin.cred")
    }

    pub fn credential(&self) -> Credential {
        Credential::load(&self.admin_cred()).unwrap()
    }

    pub fn client(&self) -> Client {
        Client::new(self.credential()).unwrap()
    }

    /// Runs the CLI; (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(meshdisk_bin()).args(args).env("NO_COLOR", "1").output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn token(&self, role: &str, ttl: &str) -> String {
        let cred = self.admin_cred();
        let (ok, out, err) = self.cli(&[
            "token",
            "create",
            "--credential",
            cred.to_str().unwrap(),
            "--role",
            role,
            "--ttl",
            ttl,
        ]);
        assert!(ok, "token create failed: {err}");
        out.trim().to_owned()
    }

    pub fn peer_dir(&self, i: usize) -> PathBuf {
        self.root.path().join(format!("peer{i}"))
    }

    /// The command that starts peer `i` (joining with `token` if given).
    pub fn peer_command(&self, i: usize, token: Option<&str>, capacity: &str, domain: &str) -> Command {
        let mut cmd = Command::new(meshdisk_bin());
        cmd.args(["peer", "--directory", &self.dir_addr, "--capacity", capacity, "--listen", "127.0.0.1:0"])
            .args(["--failure-domain", domain, "--heartbeat", self.heartbeat, "--data"])
            .arg(self.peer_dir(i))
            .args(&self.peer_args);
        if let Some(t) = token {
            cmd.args(["--join", t]);
        }
        cmd
    }

    /// Joins and starts peer `i`; returns its name.
    pub fn add_peer(&mut self, capacity: &str, domain: &str) -> String {
        let i = self.peers.len();
        let token = self.token("peer", "10m");
        let mut p =
            Proc::spawn(&format!("peer{i}"), &mut self.peer_command(i, Some(&token), capacity, domain));
        let line = p.wait_for(" listening on ", Duration::from_secs(20));
        self.peers.push(p);
        line.split_whitespace().nth(1).unwrap().to_owned()
    }

    /// Restarts peer `i` from its saved identity (no token); returns its
    /// name once the directory knows its new address.
    pub fn restart_peer(&mut self, i: usize, capacity: &str, domain: &str) -> String {
        self.peers[i].stop();
        let mut p = Proc::spawn(&format!("peer{i}"), &mut self.peer_command(i, None, capacity, domain));
        let line = p.wait_for(" listening on ", Duration::from_secs(20));
        self.peers[i] = p;
        let words: Vec<&str> = line.split_whitespace().collect();
        let (name, addr) = (words[1].to_owned(), words[4].to_owned());
        // Until its first heartbeat lands, the directory still lists the
        // old process's address (and, within the timeout, as up).
        self.wait_status(&format!("{name} reported from {addr}"), Duration::from_secs(20), |s| {
            s.peers.iter().any(|p| p.name == name && p.addr.to_string() == addr && p.state == PeerState::Up)
        });
        name
    }

    /// `meshdisk status --json`, parsed.
    pub fn status(&self) -> ClusterStatus {
        let cred = self.admin_cred();
        let (ok, out, err) = self.cli(&["status", "--json", "--credential", cred.to_str().unwrap()]);
        assert!(ok, "status failed: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not valid: {e}\n{out}"))
    }

    /// Waits until `pred` holds for the status; returns that status.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&ClusterStatus) -> bool,
    ) -> ClusterStatus {
        let start = Instant::now();
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(start.elapsed() < timeout, "{what} did not happen within {timeout:?}: {s:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_all_up(&self, n: usize) -> ClusterStatus {
        self.wait_status(&format!("{n} peers up"), Duration::from_secs(20), |s| {
            s.peers.len() == n && s.peers.iter().all(|p| p.state == PeerState::Up)
        })
    }
}

impl Cluster {
    /// Joins a client named `name` with `meshdisk join`; its credential
    /// file and what the command said.
    pub fn join_client(&self, name: &str) -> (PathBuf, String) {
        let path = self.root.path().join(format!("{name}.cred"));
        let token = self.token("client", "10m");
        let (ok, _, err) = self.cli(&[
            "join",
            "--directory",
            &self.dir_addr,
            "--token",
            &token,
            "--credential",
            path.to_str().unwrap(),
            "--name",
            name,
        ]);
        assert!(ok, "join failed: {err}");
        (path, err)
    }

    /// `meshdisk volume create NAME` with a new key file, 64 KiB shards.
    pub fn create_volume(&self, name: &str, size: &str, k: u8, m: u8) {
        let key = self.root.path().join(format!("{name}.key"));
        let cred = self.admin_cred();
        let (k, m) = (k.to_string(), m.to_string());
        let (ok, _, err) = self.cli(&[
            "volume",
            "create",
            name,
            "--size",
            size,
            "--k",
            &k,
            "--m",
            &m,
            "--shard-size",
            "64K",
            "--key-file",
            key.to_str().unwrap(),
            "--credential",
            cred.to_str().unwrap(),
        ]);
        assert!(ok, "volume create failed: {err}");
    }
}

/// Key slots that parse (the directory refuses others) for specs built by
/// hand in tests that never open the volume: one key-file slot over a
/// throwaway key file.
pub fn throwaway_key_slots() -> Vec<u8> {
    let file = meshdisk::codec::VolumeKey::generate().unwrap();
    let first = meshdisk::codec::keyslot::NewSlot::KeyFile(&file);
    meshdisk::codec::keyslot::KeySlots::create(&first).unwrap().1.encode()
}

/// The data key of volume `name` that the key file at `path` unlocks
/// (what `meshdisk attach --key-file` does), for tests that open a volume
/// through the library.
pub async fn data_key(client: &Client, name: &str, path: &std::path::Path) -> meshdisk::codec::VolumeKey {
    let record = client.volume(name).await.unwrap();
    let file = meshdisk::codec::VolumeKey::read_file(path).unwrap();
    let slots = meshdisk::codec::keyslot::KeySlots::parse(&record.spec.key_slots).unwrap();
    slots.unlock(&meshdisk::codec::keyslot::Unlock::KeyFile(&file)).unwrap().into_volume_key()
}

/// A segment of volume `volume` (k + m shards of `blocks` blocks each,
/// its data area a pattern from `seed`), as a writer makes it.
pub fn segment_of(
    volume: [u8; 16],
    id: meshdisk::codec::sequence::SegmentId,
    (k, m): (usize, usize),
    blocks: u32,
    seed: u64,
) -> meshdisk::codec::segment::EncodedSegment {
    use meshdisk::codec::segment::{SegmentGeometry, encode_segment};
    let g = SegmentGeometry::new(k, m, blocks).unwrap();
    let data = super::pattern(seed, g.data_area_len());
    encode_segment(g, &volume, id, &data).unwrap()
}

/// Stores `segment`'s shards on the peers of `placement` (shard i on peer
/// i) at fencing `epoch` and commits it as the volume's next root (after
/// `expected`, sealed under a throwaway key: the directory only parses
/// roots). Returns the commit number.
pub async fn store_and_commit(
    client: &Client,
    volume: &meshdisk::api::VolumeRecord,
    epoch: u64,
    expected: Option<(u64, u64)>,
    placement: &meshdisk::api::SegmentPlacement,
    id: meshdisk::codec::sequence::SegmentId,
    segment: &meshdisk::codec::segment::EncodedSegment,
) -> u64 {
    use meshdisk::codec::root::SegmentRef;
    for (shard, slot) in segment.shards.iter().zip(&placement.peers) {
        client.put_shard(&slot.addr, bytes::Bytes::from(shard.clone()), epoch).await.unwrap();
    }
    let header = meshdisk::codec::segment::parse_segment_shard(&segment.shards[0]).unwrap().0;
    let record = meshdisk::api::SegmentRecord {
        peers: placement.peers.iter().map(|s| s.id).collect(),
        shard_blocks: header.geometry.blocks_per_shard() as u16,
        root: segment.root.0,
    };
    let refs = vec![SegmentRef { id, root: segment.root }];
    client.commit_root(root_commit(volume, epoch, expected, refs, vec![(id, record)])).await.unwrap()
}

/// The volume's next root after `expected` by a writer at `epoch`, naming
/// `since` and adding `records`, sealed under a throwaway key (the
/// directory only parses roots).
pub fn root_commit(
    volume: &meshdisk::api::VolumeRecord,
    epoch: u64,
    expected: Option<(u64, u64)>,
    since: Vec<meshdisk::codec::root::SegmentRef>,
    records: Vec<(meshdisk::codec::sequence::SegmentId, meshdisk::api::SegmentRecord)>,
) -> meshdisk::api::RootCommit {
    use meshdisk::codec::root::{RootKey, RootRecord};
    use meshdisk::codec::sequence::{SegmentId, Sequence};
    let commit = expected.map_or(1, |(_, c)| c + 1);
    let key = RootKey::derive(&meshdisk::codec::VolumeKey::generate().unwrap());
    let highest_segment = since.iter().map(|s| s.id).max().unwrap_or(SegmentId::new(epoch, 1).unwrap());
    let sealed = RootRecord {
        volume_id: volume.spec.id,
        epoch,
        commit,
        highest_sequence: Sequence::new(epoch, commit).unwrap(),
        highest_segment,
        checkpoint: None,
        since,
    }
    .seal(&key);
    meshdisk::api::RootCommit {
        volume: volume.spec.name.clone(),
        epoch,
        expected,
        sealed,
        segments: records,
        dropped: vec![],
    }
}
