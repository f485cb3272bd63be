//! Tables for people: `meshdisk status` (a summary line, then peers and
//! volumes), `volume list` and `volume info`. (`--json` prints the records,
//! [`ClusterStatus`] and [`VolumeInfo`], as they are.)

use crate::api::{ClusterStatus, PeerState, VolumeInfo, VolumeStatus};
use crate::size::human;

fn ago(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) as f64 / 1000.0;
    if s < 60.0 {
        format!("{s:.1}s ago")
    } else if s < 3600.0 {
        format!("{:.0}m ago", s / 60.0)
    } else if s < 86_400.0 {
        format!("{:.1}h ago", s / 3600.0)
    } else {
        format!("{:.1}d ago", s / 86_400.0)
    }
}

/// Aligns rows into columns separated by two spaces.
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> =
            r.iter().enumerate().map(|(c, s)| format!("{s:<w$}", w = widths[c])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `meshdisk status`.
pub fn status(s: &ClusterStatus) -> String {
    let up = s.peers.iter().filter(|p| p.state == PeerState::Up).count();
    let capacity: u64 = s.peers.iter().filter(|p| p.state == PeerState::Up).map(|p| p.capacity).sum();
    let used: u64 = s.peers.iter().map(|p| p.used).sum();
    let mut out = format!(
        "cluster {}: {} peers ({up} up), {} lent by peers that are up, {} used, {} volume{}\n",
        s.cluster,
        s.peers.len(),
        human(capacity),
        human(used),
        s.volumes.len(),
        if s.volumes.len() == 1 { "" } else { "s" }
    );
    // The directory's background workers, one line each: the collector's
    // queue of deleted volumes and dropped segments, and what it erased.
    for w in &s.workers {
        let mut line = format!("{}: {}", w.name, w.state);
        if let Some(q) = w.queue {
            line.push_str(&format!(", {q} queued"));
        }
        if let Some(p) = &w.progress {
            line.push_str(&format!("; {p}"));
        }
        if let Some(e) = &w.last_error {
            line.push_str(&format!(" (last error: {e})"));
        }
        out.push_str(&line);
        out.push('\n');
    }
    if !s.peers.is_empty() {
        out.push('\n');
        let mut rows = vec![
            ["PEER", "STATE", "ADDRESS", "DOMAIN", "CAPACITY", "USED", "LOAD", "LAST SEEN"]
                .map(String::from)
                .to_vec(),
        ];
        for p in &s.peers {
            let mut state = p.state.as_str().to_owned();
            if let Some(problem) = &p.problem {
                state = format!("{state} ({problem})");
            }
            rows.push(vec![
                p.name.clone(),
                state,
                p.addr.to_string(),
                p.failure_domain.clone(),
                human(p.capacity),
                human(p.used),
                p.load.to_string(),
                ago(s.now_ms, p.last_seen_ms),
            ]);
        }
        out.push_str(&table(&rows));
    }
    if !s.volumes.is_empty() {
        out.push('\n');
        out.push_str(&volumes(&s.volumes));
    }
    out
}

/// The volumes table (`meshdisk volume list`, and in `status`).
pub fn volumes(volumes: &[VolumeStatus]) -> String {
    if volumes.is_empty() {
        return "no volumes (create one with `meshdisk volume create`)\n".into();
    }
    let mut rows =
        vec![["VOLUME", "SIZE", "k+m", "SHARD", "SEGMENTS", "EPOCH", "WRITER"].map(String::from).to_vec()];
    for v in volumes {
        let spec = &v.record.spec;
        rows.push(vec![
            spec.name.clone(),
            human(spec.size),
            format!("{}+{}", spec.k, spec.m),
            human(u64::from(spec.shard_size)),
            v.segments.to_string(),
            v.record.epoch.to_string(),
            v.holder.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    table(&rows)
}

/// What opens a volume, slot by slot: "passphrase (Argon2id), key file".
fn key_slots(encoded: &[u8]) -> String {
    use crate::codec::keyslot::{KeySlots, SlotKind};
    match KeySlots::parse(encoded) {
        Ok(slots) => slots
            .slots()
            .iter()
            .map(|s| match s.kind() {
                SlotKind::Passphrase => "passphrase (Argon2id)",
                SlotKind::KeyFile => "key file",
            })
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("unreadable key slots: {e}"),
    }
}

/// `meshdisk volume info`.
pub fn volume_info(v: &VolumeInfo) -> String {
    let spec = &v.record.spec;
    let segment_data = u64::from(spec.k) * u64::from(spec.shard_size);
    let h = &v.health;
    let writer = match &v.lease {
        Some(l) => format!("{} (epoch {})", l.holder, l.epoch),
        None => format!("nobody (last epoch {})", v.record.epoch),
    };
    let rows = vec![
        vec!["volume".to_string(), spec.name.clone()],
        vec!["size".into(), human(spec.size)],
        vec![
            "geometry".into(),
            format!(
                "segments of {}: k={} data + m={} parity shards of up to {}",
                human(segment_data),
                spec.k,
                spec.m,
                human(u64::from(spec.shard_size))
            ),
        ],
        vec!["repair below".into(), format!("{} healthy shards", spec.repair_threshold)],
        vec!["key".into(), key_slots(&spec.key_slots)],
        vec!["durability".into(), spec.durability.as_str().into()],
        vec!["writer".into(), writer],
        vec!["allocated".into(), format!("{} on peers", human(v.allocated))],
        vec![
            "segments".into(),
            format!(
                "{} live: {} whole, {} degraded, {} need repair, {} unavailable",
                h.segments, h.whole, h.degraded, h.needs_repair, h.unavailable
            ),
        ],
        vec![
            "collecting".into(),
            format!(
                "{} dropped segments ({} on peers) awaiting erasure",
                v.collecting.segments,
                human(v.collecting.bytes)
            ),
        ],
    ];
    table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::*;

    #[test]
    fn renders_peers_and_volumes() {
        let s = ClusterStatus {
            cluster: "home".into(),
            now_ms: 100_000,
            peer_timeout_ms: 5000,
            peers: vec![
                PeerStatus {
                    name: "peer-1".into(),
                    state: PeerState::Up,
                    addr: "127.0.0.1:7401".parse().unwrap(),
                    failure_domain: "attic".into(),
                    capacity: 1 << 30,
                    used: 1 << 20,
                    load: 2,
                    last_seen_ms: 99_600,
                    problem: None,
                    rtts: vec![],
                },
                PeerStatus {
                    name: "peer-2".into(),
                    state: PeerState::Down,
                    addr: "127.0.0.1:7402".parse().unwrap(),
                    failure_domain: "cellar".into(),
                    capacity: 1 << 30,
                    used: 0,
                    load: 0,
                    last_seen_ms: 10_000,
                    problem: None,
                    rtts: vec![],
                },
            ],
            volumes: vec![VolumeStatus {
                record: VolumeRecord {
                    spec: VolumeSpec {
                        name: "demo".into(),
                        id: [0; 16],
                        size: 8 << 30,
                        k: 4,
                        m: 2,
                        shard_size: 256 << 10,
                        repair_threshold: 5,
                        key_check: [0; 32],
                        key_slots: vec![],
                        durability: Durability::Remote,
                        lineage: Vec::new(),
                    },
                    epoch: 3,
                    created_ms: 0,
                },
                segments: 12,
                holder: None,
            }],
            workers: vec![crate::sys::worker::WorkerInfo {
                name: "collector".into(),
                state: "idle".into(),
                tranquility: 0,
                errors: 0,
                consecutive_errors: 0,
                last_error: None,
                queue: Some(3),
                progress: Some("12 shards of dropped segments erased".into()),
            }],
        };
        let text = status(&s);
        assert!(
            text.contains("\ncollector: idle, 3 queued; 12 shards of dropped segments erased\n"),
            "{text}"
        );
        assert!(text.starts_with("cluster home: 2 peers (1 up), 1.0 GiB lent"), "{text}");
        assert!(text.contains("peer-1  up     127.0.0.1:7401  attic"), "{text}");
        assert!(text.contains("0.4s ago"), "{text}");
        assert!(text.contains("peer-2  down"), "{text}");
        assert!(text.contains("1.5m ago") || text.contains("2m ago"), "{text}");
        assert!(text.contains("demo    8.0 GiB  4+2  256.0 KiB  12        3      -"), "{text}");
    }
}
