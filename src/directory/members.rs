//! Members: joining with a token, peers' heartbeats (and so whether a peer
//! is up), clients' latency hints (and so placement's candidates), the
//! cluster status and join tokens.

use std::collections::HashMap;
use std::time::Duration;

use super::Directory;
use super::meta::{Compare, MetaStore, Op, Txn};
use super::placement::Candidate;
use super::schema::*;
use super::tokens::{self, SpendError};
use crate::api::*;
use crate::membership::ca::{Role, check_label};

impl<S: MetaStore> Directory<S> {
    pub(super) async fn join(
        &self,
        token_text: &str,
        role: Role,
        csr: &str,
        name: Option<String>,
    ) -> Result<DirResponse, Remote> {
        if !matches!(role, Role::Peer | Role::Client | Role::Admin) {
            return Err(Remote::new(ErrorKind::Invalid, "only peers, clients and admins can join"));
        }
        if let Some(n) = &name {
            check_label(n).map_err(|e| Remote::new(ErrorKind::Invalid, e.to_string()))?;
            if n == "directory" || n == "admin" {
                return Err(Remote::new(ErrorKind::Invalid, format!("the name {n:?} is reserved")));
            }
            if self.meta.get(&key("nodes", n)).await?.is_some() {
                return Err(Remote::new(
                    ErrorKind::Conflict,
                    format!("a node named {n} already joined this cluster: pick another --name"),
                ));
            }
        }
        tokens::redeem(&self.meta, &self.issuer, token_text, role, self.now()).await.map_err(
            |e| match e {
                SpendError::Meta(m) => Remote::from(m),
                other => Remote::new(ErrorKind::Refused, other.to_string()),
            },
        )?;
        let record = enc(&NodeRecord { role, joined_ms: self.now() });
        let node = match name {
            Some(n) => {
                let k = key("nodes", &n);
                let out = self
                    .meta
                    .txn(Txn::new().when(Compare::Absent(k.clone())).then(Op::Put {
                        key: k,
                        value: record,
                        lease: None,
                    }))
                    .await?;
                if !out.succeeded {
                    return Err(Remote::new(
                        ErrorKind::Conflict,
                        format!("a node named {n} joined just now"),
                    ));
                }
                n
            }
            None => {
                let mut n = self.meta.list(b"nodes/").await?.len() + 1;
                loop {
                    let candidate = format!("{}-{n}", role.as_str());
                    let k = key("nodes", &candidate);
                    let out = self
                        .meta
                        .txn(Txn::new().when(Compare::Absent(k.clone())).then(Op::Put {
                            key: k,
                            value: record.clone(),
                            lease: None,
                        }))
                        .await?;
                    if out.succeeded {
                        break candidate;
                    }
                    n += 1;
                }
            }
        };
        let cert =
            self.ca.issue(csr, &node, role).map_err(|e| Remote::new(ErrorKind::Invalid, e.to_string()))?;
        if role == Role::Peer {
            self.peer_id(&node).await?;
        }
        tracing::info!("{} {node} joined", role.as_str());
        Ok(DirResponse::Joined {
            node,
            cluster: self.issuer.cluster.clone(),
            cert_pem: format!("{cert}{}", self.ca.cert_pem()),
            ca_pem: self.ca.cert_pem().to_owned(),
        })
    }

    /// The peer's small id (segment records name peers by it), given the
    /// first time it is asked for: one above the highest ever given, so an
    /// id is never reused (the `peerslot/` keys are never deleted).
    pub(super) async fn peer_id(&self, name: &str) -> Result<u16, Remote> {
        let id_key = peer_id_key(name);
        for _ in 0..16 {
            if let Some(e) = self.meta.get(&id_key).await? {
                return decode_peer_id(name, &e.value);
            }
            let highest =
                self.meta.list(PEER_SLOT_PREFIX).await?.last().and_then(|e| parse_peer_slot_key(&e.key));
            let Some(id) = highest.map_or(Some(1), |h| h.checked_add(1)) else {
                return Err(Remote::new(
                    ErrorKind::Full,
                    format!("every peer id is taken (65535 peers have joined): {name} cannot get one"),
                ));
            };
            let slot = peer_slot_key(id);
            let out = self
                .meta
                .txn(
                    Txn::new()
                        .when(Compare::Absent(id_key.clone()))
                        .when(Compare::Absent(slot.clone()))
                        .when(Compare::Absent(key("removed", name)))
                        .then(Op::Put { key: id_key.clone(), value: id.to_be_bytes().to_vec(), lease: None })
                        .then(Op::Put { key: slot, value: name.as_bytes().to_vec(), lease: None }),
                )
                .await?;
            if out.succeeded {
                tracing::info!("peer {name} has peer id {id}");
                return Ok(id);
            }
            if self.removed(name).await? {
                return Err(removed_error(name));
            }
        }
        Err(Remote::new(ErrorKind::Conflict, format!("peer {name}: peer ids kept changing; try again")))
    }

    /// Every peer's small id, by name.
    pub(super) async fn peer_ids(&self) -> Result<HashMap<String, u16>, Remote> {
        let mut out = HashMap::new();
        for e in self.meta.list(b"peerid/").await? {
            let name = String::from_utf8_lossy(&e.key[b"peerid/".len()..]).into_owned();
            let id = decode_peer_id(&name, &e.value)?;
            out.insert(name, id);
        }
        Ok(out)
    }

    pub(super) fn state(&self, rec: &PeerRecord, now: u64) -> PeerState {
        let silent = now.saturating_sub(rec.last_seen_ms);
        // Lost counts only the silence this directory watched: after a
        // long outage of its own, every peer's last heartbeat is old, and a
        // peer slow to report again is not gone (repair would rebuild all
        // it holds, the collector stop waiting for it).
        let watched = now.saturating_sub(rec.last_seen_ms.max(self.started_ms));
        if watched > self.timing.peer_lost_after.max(self.timing.peer_timeout).as_millis() as u64 {
            PeerState::Lost
        } else if silent > self.timing.peer_timeout.as_millis() as u64 {
            PeerState::Down
        } else if rec.report.problem.is_some() {
            PeerState::Failed
        } else {
            PeerState::Up
        }
    }

    pub(super) async fn peers(&self) -> Result<Vec<(String, PeerRecord)>, Remote> {
        let mut out = Vec::new();
        for e in self.meta.list(b"peers/").await? {
            let name = String::from_utf8_lossy(&e.key[b"peers/".len()..]).into_owned();
            out.push((name, dec("peer", &e.value)?));
        }
        Ok(out)
    }

    pub(super) async fn heartbeat(&self, node: &str, report: PeerReport) -> Result<DirResponse, Remote> {
        let was = self.get::<PeerRecord>("peer", &key("peers", node)).await?;
        let now = self.now();
        match &was {
            None => tracing::info!("peer {node} registered at {}", report.addr),
            Some((old, _)) if matches!(self.state(old, now), PeerState::Down | PeerState::Lost) => {
                tracing::info!("peer {node} is back at {}", report.addr)
            }
            _ => {}
        }
        let rec = PeerRecord { report, last_seen_ms: now };
        // Not if it was removed (`peer remove`).
        let put = self
            .meta
            .txn(Txn::new().when(Compare::Absent(key("removed", node))).then(Op::Put {
                key: key("peers", node),
                value: enc(&rec),
                lease: None,
            }))
            .await?;
        if !put.succeeded {
            return Err(removed_error(node));
        }
        // Peers that joined before peer ids existed get theirs here.
        self.peer_id(node).await?;
        let peers = self
            .peers()
            .await?
            .into_iter()
            .filter(|(n, r)| n != node && !matches!(self.state(r, now), PeerState::Down | PeerState::Lost))
            .map(|(name, r)| PeerAddr { name, addr: r.report.addr })
            .collect();
        Ok(DirResponse::Heartbeat {
            peers,
            peer_timeout_ms: self.timing.peer_timeout.as_millis() as u64,
            scrub: self.scrub_directive().await?,
        })
    }

    pub(super) async fn hints(&self, node: &str, rtts: Vec<Rtt>) -> Result<DirResponse, Remote> {
        let rec = HintRecord { rtts, at_ms: self.now() };
        self.meta
            .txn(Txn::new().then(Op::Put { key: key("hints", node), value: enc(&rec), lease: None }))
            .await?;
        Ok(DirResponse::Done)
    }

    /// The peers that are up now.
    pub(super) async fn up_peers(&self) -> Result<Vec<(String, PeerRecord)>, Remote> {
        let now = self.now();
        Ok(self.peers().await?.into_iter().filter(|(_, r)| self.state(r, now) == PeerState::Up).collect())
    }

    /// The peers that are up, as placement candidates for `client` (its
    /// measured round trips to them as hints).
    pub(super) async fn candidates(
        &self,
        client: &str,
    ) -> Result<(Vec<(String, PeerRecord)>, Vec<Candidate>), Remote> {
        let hints: HashMap<String, u32> = self
            .get::<HintRecord>("hints", &key("hints", client))
            .await?
            .map(|(h, _)| h.rtts.into_iter().map(|r| (r.node, r.micros)).collect())
            .unwrap_or_default();
        // Leaving peers get no new shards (those above the high-water
        // mark only when no other will do: `place_segments`).
        let drains = self.drains().await?;
        let up: Vec<(String, PeerRecord)> =
            self.up_peers().await?.into_iter().filter(|(name, _)| !drains.contains_key(name)).collect();
        let candidates = up
            .iter()
            .map(|(name, r)| Candidate {
                name: name.clone(),
                domain: r.report.failure_domain.clone(),
                capacity: r.report.capacity,
                free: r.report.capacity.saturating_sub(r.report.used),
                load: r.report.load,
                rtt_micros: hints.get(name).copied(),
            })
            .collect();
        Ok((up, candidates))
    }

    pub(super) async fn status(&self) -> Result<DirResponse, Remote> {
        let now = self.now();
        let view = self.peer_view().await?;
        let scan = self.scan_health(&view).await?;
        let ids = self.peer_ids().await?;
        let drains = self.drains().await?;
        let audits = self.audit_tallies().await?;
        let peers: Vec<PeerStatus> = self
            .peers()
            .await?
            .into_iter()
            .map(|(name, r)| PeerStatus {
                needed: ids.get(&name).and_then(|id| scan.needed.get(id)).copied().unwrap_or_default(),
                drain: drains.get(&name).map(|d| DrainInfo { reason: d.reason, since_ms: d.since_ms }),
                above_high_water: self.above_high_water(&r.report),
                audits: audits.get(&name).copied().unwrap_or_default(),
                state: self.state(&r, now),
                addr: r.report.addr,
                failure_domain: r.report.failure_domain,
                capacity: r.report.capacity,
                used: r.report.used,
                load: r.report.load,
                last_seen_ms: r.last_seen_ms,
                problem: r.report.problem,
                rtts: r.report.rtts,
                scrub: r.report.scrub,
                name,
            })
            .collect();
        let mut volumes = Vec::new();
        for record in self.list::<VolumeRecord>("volume", b"volumes/").await? {
            let health = scan.volumes.get(&record.spec.id).cloned().unwrap_or_default();
            let segments = health.segments;
            let holder = self.lease_of(&record.spec.name).await?.map(|(l, _)| l.holder);
            volumes.push(VolumeStatus { record, segments, holder, health });
        }
        let repair = self.repair.lock().expect("not poisoned").clone();
        // A lost peer's shards are rebuilt elsewhere: once they are, it no
        // longer degrades anything (it stays listed, as lost).
        let peers_down =
            peers.iter().any(|p: &PeerStatus| matches!(p.state, PeerState::Down | PeerState::Failed));
        // Repairs in flight are still counted by the scan (their segments
        // stay below threshold until recorded); moves are not repairs.
        let verdict = scan.health.verdict(peers_down, repair.queued.segments > 0);
        let scrubs: Vec<&ScrubReport> =
            peers.iter().filter(|p| p.state == PeerState::Up).filter_map(|p| p.scrub.as_ref()).collect();
        let scrub = self.scrub_summary(&scrubs).await?;
        Ok(DirResponse::Status(Box::new(ClusterStatus {
            cluster: self.issuer.cluster.clone(),
            now_ms: now,
            peer_timeout_ms: self.timing.peer_timeout.as_millis() as u64,
            peers,
            volumes,
            workers: self.workers(),
            peer_lost_after_ms: self.timing.peer_lost_after.as_millis() as u64,
            health: scan.health,
            repair,
            verdict,
            scrub,
        })))
    }

    pub(super) async fn create_token(&self, role: Role, ttl_secs: u64) -> Result<DirResponse, Remote> {
        if !matches!(role, Role::Peer | Role::Client | Role::Admin) {
            return Err(Remote::new(ErrorKind::Invalid, "tokens are for peers, clients and admins"));
        }
        let ttl = Duration::from_secs(ttl_secs);
        let now = self.now();
        let t = tokens::create(&self.meta, &self.issuer, role, ttl, now)
            .await
            .map_err(|e| Remote::new(ErrorKind::Invalid, e.to_string()))?;
        tracing::info!("made a join token for a {} valid {ttl_secs} s", role.as_str());
        Ok(DirResponse::Token { token: t.reveal().to_owned(), expires_ms: now + ttl_secs * 1000 })
    }
}

/// A removed peer's calls are refused with this.
fn removed_error(name: &str) -> Remote {
    Remote::new(
        ErrorKind::Refused,
        format!(
            "peer {name} was removed from this cluster (`meshdisk peer remove`): to lend this machine's space again, join anew with a fresh data folder and a new token"
        ),
    )
}

fn decode_peer_id(name: &str, value: &[u8]) -> Result<u16, Remote> {
    let b: [u8; 2] = value.try_into().map_err(|_| internal(format!("corrupt peer id record of {name}")))?;
    Ok(u16::from_be_bytes(b))
}
