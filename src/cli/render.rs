//! Tables for people: `meshdisk status` (a summary line, then peers and
//! volumes), `volume list` and `volume info`. (`--json` prints the records,
//! [`ClusterStatus`] and [`VolumeInfo`], as they are.)

use crate::api::{ClusterStatus, Health, PeerState, RepairProgress, SegmentHealth, VolumeInfo, VolumeStatus};
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

/// A duration in seconds for people: "45s", "12m", "3.2h".
pub(crate) fn eta(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs}s"),
        120..7200 => format!("{}m", secs / 60),
        _ => format!("{:.1}h", secs as f64 / 3600.0),
    }
}

/// The first line of `meshdisk status`: the verdict and why.
pub fn verdict_line(s: &ClusterStatus) -> String {
    let h = &s.health;
    let mut why = Vec::new();
    if h.lost > 0 {
        why.push(format!("{} segments have fewer than k shards on peers that are not lost", h.lost));
    }
    if h.unavailable > 0 {
        why.push(format!("{} segments unreadable until peers return", h.unavailable));
    }
    if h.critical > 0 {
        why.push(format!("{} segments one lost peer from unreadable", h.critical));
    }
    let r = &s.repair;
    if h.to_repair.segments > 0 || r.queued.segments > 0 {
        let mut line = format!(
            "{} segments to repair ({} of shards to rebuild)",
            h.to_repair.segments.max(r.queued.segments),
            human(h.to_repair.bytes.max(r.queued.bytes))
        );
        if r.rate > 0 {
            line.push_str(&format!(" at {}/s", human(r.rate)));
            if let Some(e) = r.eta_secs {
                line.push_str(&format!(", ETA {}", eta(e)));
            }
        }
        why.push(line);
    }
    let not_whole = h.segments - h.whole;
    if not_whole > 0 && why.is_empty() {
        why.push(format!(
            "{not_whole} of {} segments ({}) lack shards on peers that are down, not yet lost (repair starts {} after a peer goes silent)",
            h.segments,
            human(h.bytes_not_whole),
            eta(s.peer_lost_after_ms / 1000)
        ));
    }
    for p in s.peers.iter().filter(|p| p.drain.is_some() || p.above_high_water) {
        let what = match &p.drain {
            Some(d) => format!("{} draining ({})", p.name, d.reason.as_str()),
            None => format!("{} above the high-water mark", p.name),
        };
        if p.needed.segments > 0 {
            why.push(format!(
                "{what}: holds {} shards ({}) to move",
                p.needed.segments,
                human(p.needed.bytes)
            ));
        } else if p.drain.is_some() {
            why.push(format!("{what}: drained, holds nothing redundancy needs"));
        }
    }
    let down = s.peers.iter().filter(|p| matches!(p.state, PeerState::Down | PeerState::Failed)).count();
    let lost = s.peers.iter().filter(|p| p.state == PeerState::Lost).count();
    if down > 0 {
        why.push(format!("{down} peer{} down", if down == 1 { "" } else { "s" }));
    }
    if lost > 0 && s.verdict != crate::api::Verdict::HealthOk {
        why.push(format!("{lost} peer{} lost", if lost == 1 { "" } else { "s" }));
    }
    if why.is_empty() {
        s.verdict.as_str().to_owned()
    } else {
        format!("{}: {}", s.verdict.as_str(), why.join("; "))
    }
}

/// "120 segments (480 MiB): 100 whole, 12 degraded, ...".
pub fn health_line(h: &Health) -> String {
    let mut parts: Vec<String> = SegmentHealth::ALL
        .iter()
        .filter(|&&st| st == SegmentHealth::Whole || h.of(st) > 0)
        .map(|&st| format!("{} {}", h.of(st), st.as_str()))
        .collect();
    if h.misplaced > 0 {
        parts.push(format!("{} misplaced", h.misplaced));
    }
    format!("{} segments ({}): {}", h.segments, human(h.bytes), parts.join(", "))
}

/// "repair: 40 queued (160 MiB), 4 in flight, 35 MiB/s, ETA 5s; ...".
pub fn repair_line(r: &RepairProgress) -> String {
    let mut line = format!("repair: {} queued ({})", r.queued.segments, human(r.queued.bytes));
    if r.in_flight > 0 {
        line.push_str(&format!(", {} in flight", r.in_flight));
    }
    if r.rate > 0 {
        line.push_str(&format!(", {}/s", human(r.rate)));
    }
    if let Some(e) = r.eta_secs {
        line.push_str(&format!(", ETA {}", eta(e)));
    }
    if r.moving.segments > 0 {
        line.push_str(&format!(", {} moves queued ({})", r.moving.segments, human(r.moving.bytes)));
    }
    line.push_str(&format!(
        "; since start {} shards rebuilt or moved ({}, {} read), {} failed, {} raced",
        r.shards,
        human(r.bytes),
        human(r.read_bytes),
        r.failed,
        r.raced
    ));
    if r.forgotten > 0 {
        line.push_str(&format!(", {} bad shards forgotten", r.forgotten));
    }
    line
}

/// A span for people: `45s`, `12m`, `5.0h`, `26.3d`.
fn span(ms: u64) -> String {
    let secs = ms / 1000;
    if secs < 48 * 3600 { eta(secs) } else { format!("{:.1}d", secs as f64 / 86_400.0) }
}

/// "scrub: 43% of this pass on 3 of 6 peers at 12.0 MiB/s, next pass in
/// 26.0d; 2 bad shards found, 0 not yet reported".
pub fn scrub_line(s: &ClusterStatus) -> String {
    let c = &s.scrub;
    if c.peers == 0 {
        return "scrub: no peer has reported its scrub yet".into();
    }
    let mut parts = Vec::new();
    match c.paused_until_ms {
        Some(u64::MAX) => parts.push("paused until resumed".to_string()),
        Some(until) => parts.push(format!("paused for {} more", span(until.saturating_sub(s.now_ms)))),
        None => {}
    }
    if c.scrubbing > 0 {
        let pct = (c.checked * 100).checked_div(c.total).unwrap_or(100);
        parts.push(format!(
            "{pct}% of this pass on {} of {} peers at {}/s",
            c.scrubbing,
            c.peers,
            human(c.rate)
        ));
    } else {
        parts.push("idle".into());
    }
    if let Some(next) = c.next_ms {
        parts.push(if next > s.now_ms {
            format!("next pass in {}", span(next - s.now_ms))
        } else {
            "next pass due".into()
        });
    }
    if let Some(all) = c.all_checked_ms {
        parts.push(format!("every peer finished a pass in the last {}", span(s.now_ms.saturating_sub(all))));
    }
    format!("scrub: {}; {} bad shards found, {} not yet reported", parts.join(", "), c.found, c.unreported)
}

/// `meshdisk status`.
pub fn status(s: &ClusterStatus) -> String {
    let up = s.peers.iter().filter(|p| p.state == PeerState::Up).count();
    let capacity: u64 = s.peers.iter().filter(|p| p.state == PeerState::Up).map(|p| p.capacity).sum();
    let used: u64 = s.peers.iter().map(|p| p.used).sum();
    let mut out = verdict_line(s);
    out.push('\n');
    out += &format!(
        "cluster {}: {} peers ({up} up), {} lent by peers that are up, {} used, {} volume{}\n",
        s.cluster,
        s.peers.len(),
        human(capacity),
        human(used),
        s.volumes.len(),
        if s.volumes.len() == 1 { "" } else { "s" }
    );
    out.push_str(&format!("segments: {}\n", health_line(&s.health)));
    out.push_str(&repair_line(&s.repair));
    out.push('\n');
    out.push_str(&scrub_line(s));
    out.push('\n');
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
            ["PEER", "STATE", "ADDRESS", "DOMAIN", "CAPACITY", "USED", "SHARDS", "LOAD", "LAST SEEN"]
                .map(String::from)
                .to_vec(),
        ];
        for p in &s.peers {
            let mut state = p.state.as_str().to_owned();
            if let Some(d) = &p.drain {
                state.push_str(match d.reason {
                    crate::api::DrainReason::Operator => ", draining",
                    crate::api::DrainReason::Audits => ", failed audits, draining",
                });
            } else if p.above_high_water {
                state.push_str(", above high water");
            }
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
                p.needed.segments.to_string(),
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
    let mut rows = vec![
        ["VOLUME", "SIZE", "k+m", "SHARD", "SEGMENTS", "HEALTH", "EPOCH", "WRITER"]
            .map(String::from)
            .to_vec(),
    ];
    for v in volumes {
        let spec = &v.record.spec;
        rows.push(vec![
            spec.name.clone(),
            human(spec.size),
            format!("{}+{}", spec.k, spec.m),
            human(u64::from(spec.shard_size)),
            v.segments.to_string(),
            v.health.verdict(false, false).as_str().to_owned(),
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
        vec!["repair below".into(), format!("{} shards on peers not lost", spec.repair_threshold)],
        vec!["key".into(), key_slots(&spec.key_slots)],
        vec!["durability".into(), spec.durability.as_str().into()],
        vec!["writer".into(), writer],
        vec!["allocated".into(), format!("{} on peers", human(v.allocated))],
        vec!["health".into(), h.verdict(false, false).as_str().to_owned()],
        vec!["segments".into(), health_line(h)],
        vec![
            "to repair".into(),
            format!("{} segments ({} of shards to rebuild)", h.to_repair.segments, human(h.to_repair.bytes)),
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
    fn the_scrub_line_says_how_far_and_what_was_found() {
        let day = 86_400_000;
        let mut s = ClusterStatus {
            cluster: "home".into(),
            now_ms: 100 * day,
            peer_timeout_ms: 5000,
            peers: vec![],
            volumes: vec![],
            workers: vec![],
            peer_lost_after_ms: 600_000,
            health: Health::default(),
            repair: RepairProgress::default(),
            verdict: Verdict::HealthOk,
            scrub: ScrubSummary::default(),
        };
        assert_eq!(scrub_line(&s), "scrub: no peer has reported its scrub yet");
        s.scrub = ScrubSummary {
            peers: 6,
            scrubbing: 3,
            checked: 43,
            total: 100,
            rate: 12 << 20,
            next_ms: Some(126 * day),
            all_checked_ms: Some(98 * day),
            found: 2,
            unreported: 0,
            paused_until_ms: None,
        };
        assert_eq!(
            scrub_line(&s),
            "scrub: 43% of this pass on 3 of 6 peers at 12.0 MiB/s, next pass in 26.0d, every peer finished a pass in the last 2.0d; 2 bad shards found, 0 not yet reported"
        );
        s.scrub =
            ScrubSummary { peers: 6, paused_until_ms: Some(100 * day + 3_600_000), ..Default::default() };
        assert_eq!(
            scrub_line(&s),
            "scrub: paused for 60m more, idle; 0 bad shards found, 0 not yet reported"
        );
    }

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
                    needed: Default::default(),
                    drain: None,
                    above_high_water: false,
                    audits: Default::default(),
                    scrub: None,
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
                    needed: Default::default(),
                    drain: None,
                    above_high_water: false,
                    audits: Default::default(),
                    scrub: None,
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
                health: Health { segments: 12, whole: 12, ..Health::default() },
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
            peer_lost_after_ms: 600_000,
            health: Health {
                segments: 12,
                whole: 10,
                degraded: 2,
                bytes: 12 << 20,
                bytes_not_whole: 2 << 20,
                ..Health::default()
            },
            repair: RepairProgress::default(),
            verdict: Verdict::Degraded,
            scrub: Default::default(),
        };
        let text = status(&s);
        assert!(
            text.contains("\ncollector: idle, 3 queued; 12 shards of dropped segments erased\n"),
            "{text}"
        );
        assert!(
            text.starts_with("degraded: 2 of 12 segments (2.0 MiB) lack shards on peers that are down, not yet lost (repair starts 10m after a peer goes silent); 1 peer down\ncluster home: 2 peers (1 up), 1.0 GiB lent"),
            "{text}"
        );
        assert!(text.contains("\nsegments: 12 segments (12.0 MiB): 10 whole, 2 degraded\n"), "{text}");
        assert!(text.contains("peer-1  up     127.0.0.1:7401  attic"), "{text}");
        assert!(text.contains("0.4s ago"), "{text}");
        assert!(text.contains("peer-2  down"), "{text}");
        assert!(text.contains("1.5m ago") || text.contains("2m ago"), "{text}");
        assert!(text.contains("demo    8.0 GiB  4+2  256.0 KiB  12        HEALTH_OK  3      -"), "{text}");
    }
}
