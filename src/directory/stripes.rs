//! Stripes: placing a stripe's shards on peers (a reservation of their
//! space, on a store lease so it lapses by itself), swapping a slow peer
//! out of a reservation, committing a written generation (compare-and-set
//! against the volume, its write lease and the reservation) and dropping a
//! stripe; the superseded generations go to the collector.

use std::collections::HashMap;

use super::Directory;
use super::meta::{self, Compare, MetaError, MetaStore, Op, Txn};
use super::placement::{Candidate, choose_spread};
use super::schema::*;
use crate::api::*;

impl<S: MetaStore> Directory<S> {
    pub(super) async fn place(&self, client: &str, volume: &str, stripe: u64) -> Result<DirResponse, Remote> {
        let _one_at_a_time = self.placing.lock().await;
        let v = self.volume(volume).await?;
        let stripe_data = u64::from(v.spec.k) * u64::from(v.spec.shard_size);
        let stripes = v.spec.size.div_ceil(stripe_data);
        if stripe >= stripes {
            return Err(Remote::new(
                ErrorKind::Invalid,
                format!("volume {volume} has {stripes} stripes, not {}", stripe + 1),
            ));
        }
        let current = self.get::<StripeRecord>("stripe", &stripe_key(&v.spec.id, stripe)).await?;
        let generation = current.map_or(0, |(r, _)| r.generation) + 1;
        let now = self.now();
        let (up, candidates) = self.candidates(client).await?;
        let bytes = shard_bytes(v.spec.shard_size);
        let n = usize::from(v.spec.k + v.spec.m);
        // Doubling up is for peers that are down for now; a cluster with
        // fewer peers than a stripe has shards is told to grow instead.
        let known = self.meta.list(b"peers/").await?.len();
        let max_per_peer = if known >= n { usize::from(v.spec.m) } else { 1 };
        let picked = choose_spread(&candidates, n, max_per_peer, bytes, || self.random())
            .map_err(|e| Remote::new(ErrorKind::Full, e.to_string()))?;
        let lease = self.meta.grant_lease(self.timing.reservation_ttl).await?;
        let expires_ms = now + self.timing.reservation_ttl.as_millis() as u64;
        let rec = ReservationRecord {
            volume: volume.to_owned(),
            stripe,
            generation,
            peers: picked.iter().map(|&i| up[i].0.clone()).collect(),
            shard_bytes: bytes,
            expires_ms,
        };
        self.meta
            .txn(Txn::new().then(Op::Put {
                key: reservation_key(lease.0),
                value: enc(&rec),
                lease: Some(lease),
            }))
            .await?;
        Ok(DirResponse::Placement(Placement {
            reservation: lease.0,
            stripe,
            generation,
            peers: picked
                .iter()
                .map(|&i| PeerAddr { name: up[i].0.clone(), addr: up[i].1.report.addr })
                .collect(),
            shard_bytes: bytes,
            expires_ms,
        }))
    }

    pub(super) async fn commit(&self, who: &str, c: Commit) -> Result<DirResponse, Remote> {
        let Commit { reservation, volume, stripe, generation, epoch, hashes } = c;
        let volume = volume.as_str();
        let vkey = key("volumes", volume);
        let Some((v, vrev)) = self.get::<VolumeRecord>("volume", &vkey).await? else {
            return Err(Remote::new(ErrorKind::NotFound, format!("no volume named {volume}")));
        };
        // The writer's right to commit, checked again by the transaction:
        // a takeover (or a first attach, or a delete) in between fails it.
        let lease_unchanged = self.check_writer(who, &v, epoch).await?;
        let rkey = reservation_key(reservation);
        let Some((res, res_rev)) = self.get::<ReservationRecord>("reservation", &rkey).await? else {
            return Err(Remote::new(
                ErrorKind::NotFound,
                format!("reservation {reservation} expired or was never made: ask for a new placement"),
            ));
        };
        if res.volume != volume || res.stripe != stripe || res.generation != generation {
            return Err(Remote::new(ErrorKind::Invalid, "the commit does not match its reservation"));
        }
        if hashes.len() != res.peers.len() {
            return Err(Remote::new(
                ErrorKind::Invalid,
                format!("{} shard hashes for {} shards", hashes.len(), res.peers.len()),
            ));
        }
        let stored = hashes.iter().filter(|h| h.is_some()).count();
        if stored < usize::from(v.spec.k) {
            return Err(Remote::new(
                ErrorKind::Invalid,
                format!("only {stored} shards stored; a stripe needs at least k={}", v.spec.k),
            ));
        }
        let skey = stripe_key(&v.spec.id, stripe);
        let current = self.get::<StripeRecord>("stripe", &skey).await?;
        let compare = match &current {
            Some((r, _)) if r.generation >= generation => {
                return Err(Remote::new(
                    ErrorKind::Conflict,
                    format!(
                        "stripe {stripe} is already at generation {} (this commit is {generation})",
                        r.generation
                    ),
                ));
            }
            Some((_, rev)) => Compare::ModRevision(skey.clone(), *rev),
            None => Compare::Absent(skey.clone()),
        };
        let record = StripeRecord { generation, peers: res.peers.clone(), hashes, committed_ms: self.now() };
        let mut txn = Txn::new()
            .when(compare)
            .when(Compare::ModRevision(vkey, vrev))
            .when(lease_unchanged)
            .when(Compare::ModRevision(rkey.clone(), res_rev))
            .then(Op::Put { key: skey, value: enc(&record), lease: None })
            .then(Op::Delete { key: rkey });
        if let Some((old, _)) = &current {
            // The old generation's shards are erased once this commit is
            // durable, by the collector.
            txn = txn.then(Op::Put {
                key: old_key(&v.spec.id, stripe, old.generation),
                value: enc(old),
                lease: None,
            });
        }
        let out = self.meta.txn(txn).await?;
        if !out.succeeded {
            return Err(Remote::new(
                ErrorKind::Conflict,
                format!("stripe {stripe} changed during the commit: retry"),
            ));
        }
        // The reserved space is now used: count it until the peers' next
        // reports say the same. One transaction for all the stripe's peers,
        // redone if a heartbeat changed one of them meanwhile.
        let mut stored: HashMap<&String, u64> = HashMap::new();
        for (p, _) in res.peers.iter().zip(&record.hashes).filter(|(_, h)| h.is_some()) {
            *stored.entry(p).or_default() += 1;
        }
        for _ in 0..8 {
            let mut txn = Txn::new();
            for (p, shards) in &stored {
                let k = key("peers", p);
                let Some((mut rec, rev)) = self.get::<PeerRecord>("peer", &k).await? else { continue };
                rec.report.used += shards * res.shard_bytes;
                txn = txn.when(Compare::ModRevision(k.clone(), rev)).then(Op::Put {
                    key: k,
                    value: enc(&rec),
                    lease: None,
                });
            }
            if self.meta.txn(txn).await?.succeeded {
                break;
            }
        }
        if current.is_some() {
            self.gc.notify_one();
        }
        Ok(DirResponse::Stripe(current.map(|(r, _)| r)))
    }

    /// Forgets a stripe (it reads as zeroes); its shards go to the collector.
    pub(super) async fn drop_stripe(
        &self,
        who: &str,
        volume: &str,
        stripe: u64,
        epoch: u64,
    ) -> Result<DirResponse, Remote> {
        let vkey = key("volumes", volume);
        let Some((v, vrev)) = self.get::<VolumeRecord>("volume", &vkey).await? else {
            return Err(Remote::new(ErrorKind::NotFound, format!("no volume named {volume}")));
        };
        let lease_unchanged = self.check_writer(who, &v, epoch).await?;
        let skey = stripe_key(&v.spec.id, stripe);
        let Some((old, rev)) = self.get::<StripeRecord>("stripe", &skey).await? else {
            return Ok(DirResponse::Done);
        };
        let out = self
            .meta
            .txn(
                Txn::new()
                    .when(Compare::ModRevision(skey.clone(), rev))
                    .when(Compare::ModRevision(vkey, vrev))
                    .when(lease_unchanged)
                    .then(Op::Delete { key: skey })
                    .then(Op::Put {
                        key: old_key(&v.spec.id, stripe, old.generation),
                        value: enc(&old),
                        lease: None,
                    }),
            )
            .await?;
        if !out.succeeded {
            return Err(Remote::new(
                ErrorKind::Conflict,
                format!("stripe {stripe} changed meanwhile: retry"),
            ));
        }
        self.gc.notify_one();
        Ok(DirResponse::Done)
    }

    /// A page of a volume's stripe map.
    pub(super) async fn stripes(
        &self,
        volume: &str,
        after: Option<u64>,
        limit: u32,
    ) -> Result<DirResponse, Remote> {
        let v = self.volume(volume).await?;
        let prefix = stripe_prefix(&v.spec.id);
        let limit = limit.clamp(1, 4096) as usize;
        let mut out = Vec::new();
        // The store lists whole prefixes; a volume's map is at most a few
        // hundred thousand small records.
        for e in self.meta.list(&prefix).await? {
            let Ok(s) = <[u8; 8]>::try_from(&e.key[prefix.len()..]) else { continue };
            let s = u64::from_be_bytes(s);
            if after.is_some_and(|a| s <= a) {
                continue;
            }
            out.push((s, dec("stripe", &e.value)?));
            if out.len() == limit {
                break;
            }
        }
        Ok(DirResponse::Stripes(out))
    }

    /// The peers that are up, as placement candidates for `client`.
    pub(super) async fn candidates(
        &self,
        client: &str,
    ) -> Result<(Vec<(String, PeerRecord)>, Vec<Candidate>), Remote> {
        let hints: HashMap<String, u32> = self
            .get::<HintRecord>("hints", &key("hints", client))
            .await?
            .map(|(h, _)| h.rtts.into_iter().map(|r| (r.node, r.micros)).collect())
            .unwrap_or_default();
        let reserved = self.reserved_by_peer().await?;
        let up = self.up_peers().await?;
        let candidates = up
            .iter()
            .map(|(name, r)| Candidate {
                name: name.clone(),
                domain: r.report.failure_domain.clone(),
                capacity: r.report.capacity,
                free: r
                    .report
                    .capacity
                    .saturating_sub(r.report.used)
                    .saturating_sub(reserved.get(name).copied().unwrap_or(0)),
                load: r.report.load,
                rtt_micros: hints.get(name).copied(),
            })
            .collect();
        Ok((up, candidates))
    }

    /// Another peer for shard `index` of a reservation whose peer is slow
    /// or failing (long-tail cancellation): one that holds no other shard
    /// of the stripe, weighted as placement weighs.
    pub(super) async fn replace(
        &self,
        client: &str,
        reservation: u64,
        index: u8,
    ) -> Result<DirResponse, Remote> {
        let _one_at_a_time = self.placing.lock().await;
        let rkey = reservation_key(reservation);
        let Some((mut res, rev)) = self.get::<ReservationRecord>("reservation", &rkey).await? else {
            return Err(Remote::new(
                ErrorKind::NotFound,
                format!("reservation {reservation} expired or was never made: ask for a new placement"),
            ));
        };
        let i = usize::from(index);
        if i >= res.peers.len() {
            return Err(Remote::new(ErrorKind::Invalid, format!("the stripe has no shard {index}")));
        }
        let (up, candidates) = self.candidates(client).await?;
        let open: Vec<Candidate> = candidates.into_iter().filter(|c| !res.peers.contains(&c.name)).collect();
        let picked = choose_spread(&open, 1, 1, res.shard_bytes, || self.random())
            .map_err(|e| Remote::new(ErrorKind::Full, format!("no other peer for shard {index}: {e}")))?;
        let name = open[picked[0]].name.clone();
        let addr = up
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| r.report.addr)
            .ok_or_else(|| internal("a candidate vanished"))?;
        res.peers[i] = name.clone();
        let lease = self.meta.get(&rkey).await?.and_then(|e| e.lease);
        let out = self
            .meta
            .txn(Txn::new().when(Compare::ModRevision(rkey.clone(), rev)).then(Op::Put {
                key: rkey,
                value: enc(&res),
                lease,
            }))
            .await?;
        if !out.succeeded {
            return Err(Remote::new(ErrorKind::Conflict, "the reservation changed meanwhile: retry"));
        }
        Ok(DirResponse::Peer(PeerAddr { name, addr }))
    }

    pub(super) async fn release(&self, reservation: u64) -> Result<DirResponse, Remote> {
        // Only a reservation's own lease: lease ids are shared with volume
        // write leases, which this must never end.
        if self.meta.get(&reservation_key(reservation)).await?.is_none() {
            return Ok(DirResponse::Done);
        }
        match self.meta.revoke(meta::LeaseId(reservation)).await {
            Ok(()) | Err(MetaError::LeaseNotFound(_)) => Ok(DirResponse::Done),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn stripe(&self, volume: &str, stripe: u64) -> Result<DirResponse, Remote> {
        let v = self.volume(volume).await?;
        Ok(DirResponse::Stripe(
            self.get::<StripeRecord>("stripe", &stripe_key(&v.spec.id, stripe)).await?.map(|(r, _)| r),
        ))
    }
}
