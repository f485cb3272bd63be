//! Placement prefers the peers closest to the client and gives them the
//! data shards (which block reads go to): two peers on this host's
//! loopback, four in a network namespace the test makes (ip netns, a veth
//! pair), 20 ms away each way.
//!
//! The delay comes from `tc netem` on both ends of the veth pair when the
//! kernel has it. Kernels built without `sch_netem` (this project's CI
//! machine is one) get the same delay from a relay in the test: each far
//! peer is reached through a UDP relay that holds every datagram 20 ms in
//! each direction before passing it over the veth pair.

mod common;

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Proc};
use meshdisk::api::VolumeSpec;

const DELAY: Duration = Duration::from_millis(20);

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).status().is_ok_and(|s| s.success())
}

/// A network namespace joined to this one by a veth pair; removed on drop.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
    netem: bool,
}

impl Netns {
    fn create() -> Option<Self> {
        let id = std::process::id() % 200 + 20;
        let mut n = Self {
            name: format!("mdlat{}", std::process::id()),
            host_if: format!("mdl{id}a"),
            host_ip: format!("10.213.{id}.1"),
            ns_ip: format!("10.213.{id}.2"),
            netem: false,
        };
        let peer_if = format!("mdl{id}b");
        let ok = ip(&["netns", "add", &n.name])
            && ip(&["link", "add", &n.host_if, "type", "veth", "peer", "name", &peer_if])
            && ip(&["link", "set", &peer_if, "netns", &n.name])
            && ip(&["addr", "add", &format!("{}/24", n.host_ip), "dev", &n.host_if])
            && ip(&["link", "set", &n.host_if, "up"])
            && ip(&["-n", &n.name, "addr", "add", &format!("{}/24", n.ns_ip), "dev", &peer_if])
            && ip(&["-n", &n.name, "link", "set", &peer_if, "up"])
            && ip(&["-n", &n.name, "link", "set", "lo", "up"]);
        if !ok {
            return None;
        }
        let ms = format!("{}ms", DELAY.as_millis());
        n.netem = Command::new("tc")
            .args(["qdisc", "add", "dev", &n.host_if, "root", "netem", "delay", &ms])
            .status()
            .is_ok_and(|s| s.success())
            && Command::new("ip")
                .args([
                    "netns", "exec", &n.name, "tc", "qdisc", "add", "dev", &peer_if, "root", "netem",
                    "delay", &ms,
                ])
                .status()
                .is_ok_and(|s| s.success());
        Some(n)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Datagrams held for `DELAY`, then sent: one thread per direction.
struct DelayLine {
    queue: Mutex<VecDeque<(Instant, Vec<u8>, SocketAddr)>>,
    ready: Condvar,
}

impl DelayLine {
    fn start(out: UdpSocket, stop: Arc<AtomicBool>) -> Arc<Self> {
        let line = Arc::new(Self { queue: Mutex::new(VecDeque::new()), ready: Condvar::new() });
        let l = line.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut q = l.queue.lock().unwrap();
                let Some(&(due, _, _)) = q.front() else {
                    let _ = l.ready.wait_timeout(q, Duration::from_millis(50)).unwrap();
                    continue;
                };
                let now = Instant::now();
                if due > now {
                    drop(q);
                    std::thread::sleep(due - now);
                    continue;
                }
                let (_, data, to) = q.pop_front().unwrap();
                drop(q);
                let _ = out.send_to(&data, to);
            }
        });
        line
    }

    fn push(&self, data: Vec<u8>, to: SocketAddr) {
        self.queue.lock().unwrap().push_back((Instant::now() + DELAY, data, to));
        self.ready.notify_one();
    }
}

/// A UDP relay on 127.0.0.1 to `target`, adding `DELAY` each way.
fn relay(target: SocketAddr, stop: Arc<AtomicBool>) -> SocketAddr {
    let front = UdpSocket::bind("127.0.0.1:0").unwrap();
    front.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let addr = front.local_addr().unwrap();
    let back_line = DelayLine::start(front.try_clone().unwrap(), stop.clone());
    std::thread::spawn(move || {
        // One upstream socket per client, so replies find their way back.
        let mut upstream: std::collections::HashMap<SocketAddr, Arc<DelayLine>> = Default::default();
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = front.recv_from(&mut buf) else { continue };
            let line = upstream.entry(from).or_insert_with(|| {
                let up = UdpSocket::bind("0.0.0.0:0").unwrap();
                up.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                let forward = DelayLine::start(up.try_clone().unwrap(), stop.clone());
                let (back, stop) = (back_line.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, _)) = up.recv_from(&mut buf) {
                            back.push(buf[..n].to_vec(), from);
                        }
                    }
                });
                forward
            });
            line.push(buf[..n].to_vec(), target);
        }
    });
    addr
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn placement_and_reads_prefer_the_nearest_peers() {
    if !is_root() || common::which("ip").is_none() {
        let msg = "needs root and iproute2 to make a network namespace";
        assert!(!common::require_e2e(), "{msg} (MESHDISK_REQUIRE_E2E=1)");
        eprintln!("SKIP: {msg}");
        return;
    }
    let ns = Netns::create().expect("creating a network namespace and a veth pair");
    eprintln!("delay by {}", if ns.netem { "tc netem" } else { "a relay (this kernel has no sch_netem)" });
    let stop = Arc::new(AtomicBool::new(false));

    let mut c = Cluster::start_on("lat", "0.0.0.0", &[]);
    let near: Vec<String> = (0..2).map(|i| c.add_peer("64M", &format!("near{i}"))).collect();
    let dir_port = c.dir_addr.rsplit(':').next().unwrap().to_owned();
    let mut far = Vec::new();
    for i in 0..4 {
        let listen: SocketAddr = format!("{}:{}", ns.ns_ip, 7600 + i).parse().unwrap();
        let advertise = if ns.netem { listen } else { relay(listen, stop.clone()) };
        let token = c.token("peer", "10m");
        let data = c.root.path().join(format!("far{i}"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(common::meshdisk_bin())
            .args(["peer", "--directory", &format!("{}:{dir_port}", ns.host_ip), "--join", &token])
            .args(["--capacity", "64M", "--heartbeat", "200ms", "--failure-domain", &format!("far{i}")])
            .args(["--listen", &listen.to_string(), "--advertise", &advertise.to_string(), "--data"])
            .arg(&data);
        let mut p = Proc::spawn(&format!("far{i}"), &mut cmd);
        let line = p.wait_for(" listening on ", Duration::from_secs(20));
        far.push(line.split_whitespace().nth(1).unwrap().to_owned());
        c.peers.push(p);
    }
    c.wait_all_up(6);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let client = c.client();
        // The client measures its round trips and tells the directory.
        let rtts = client.refresh_hints().await.unwrap();
        assert_eq!(rtts.len(), 6, "{rtts:?}");
        // Far peers are at least the added 40 ms away, and every near peer
        // is nearer than every far one (absolute loopback times vary with
        // load).
        let (far_rtts, near_rtts): (Vec<_>, Vec<_>) = rtts.iter().partition(|r| far.contains(&r.node));
        assert!(far_rtts.iter().all(|r| r.micros >= 30_000), "{rtts:?}");
        let nearest_far = far_rtts.iter().map(|r| r.micros).min().unwrap();
        assert!(near_rtts.iter().all(|r| r.micros < nearest_far), "{rtts:?}");

        // Three shards per stripe: both near peers every time.
        let spec = |name: &str, k: u8, m: u8, tag: u8| VolumeSpec {
            name: name.into(),
            id: [tag; 16],
            size: 64 << 20,
            k,
            m,
            shard_size: 64 << 10,
            repair_threshold: k,
            key_check: [0; 32],
            key_slots: common::cluster::throwaway_key_slots(),
            durability: meshdisk::api::Durability::Remote,
            lineage: Vec::new(),
        };
        // Three shards per segment: both near peers every time, and they
        // hold the data shards (0 and 1), which block reads go to.
        client.create_volume(spec("three", 2, 1, 1)).await.unwrap();
        let epoch = client.acquire_lease("three", false, None).await.unwrap().epoch;
        for (n, p) in
            client.place_segments("three", epoch, 40, 1 << 20, vec![], 0).await.unwrap().iter().enumerate()
        {
            let names: Vec<&str> = p.peers.iter().map(|s| s.addr.name.as_str()).collect();
            assert!(near.iter().all(|x| names[..2].contains(&x.as_str())), "segment {n} placed on {names:?}");
        }
        // Four shards: two must go far, and those are the parity shards.
        client.create_volume(spec("four", 2, 2, 2)).await.unwrap();
        let epoch = client.acquire_lease("four", false, None).await.unwrap().epoch;
        for p in client.place_segments("four", epoch, 20, 1 << 20, vec![], 0).await.unwrap() {
            let names: Vec<&str> = p.peers.iter().map(|s| s.addr.name.as_str()).collect();
            assert!(near.iter().all(|x| names[..2].contains(&x.as_str())), "data shards on {names:?}");
            assert!(names[2..].iter().all(|n| far.iter().any(|f| f == n)), "parity on {names:?}");
        }
    });
    stop.store(true, Ordering::Relaxed);
}
