//! Choosing the peers of a segment: k + m distinct peers, spread over as
//! many failure domains as there are, weighted towards free space, light
//! load and low latency to the client that will write and read the segment.
//!
//! Peers are drawn one at a time, without replacement. Each draw is from
//! the peers whose failure domain holds the fewest shards of this segment
//! so far (so domains are all distinct while there are enough of them, and
//! evenly shared when there are not), with probability proportional to the
//! peer's weight. A peer never gets two shards of one segment.
//!
//! The peers drawn are then put in shard order nearest first: a block is
//! read from the one data shard holding it (shards 0..k), parity only when
//! that fails, so the nearest peers get the data shards.

/// A peer that may receive a shard.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub domain: String,
    pub capacity: u64,
    /// Bytes free (capacity less what the peer last reported used).
    pub free: u64,
    /// Calls in progress at its last heartbeat.
    pub load: u32,
    /// Round trip from the asking client, if it has measured one.
    pub rtt_micros: Option<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlaceError {
    #[error(
        "it needs {need} peers with {shard_bytes} bytes free each, and only {have} are up with that much space: start more peers or give them more capacity"
    )]
    NotEnough { need: usize, have: usize, shard_bytes: u64 },
}

/// How much to prefer a peer: free share × latency factor × load factor.
pub fn weight(c: &Candidate) -> f64 {
    let free = if c.capacity == 0 { 0.0 } else { (c.free as f64 / c.capacity as f64).clamp(0.01, 1.0) };
    // A peer 2 ms away counts half as much as one next door, 10 ms away
    // 1/26; with no measurement, assume a few milliseconds.
    let ms = c.rtt_micros.map_or(2.0, |us| f64::from(us) / 1000.0);
    let latency = 1.0 / (1.0 + (ms / 2.0).powi(2));
    let load = 1.0 / (1.0 + f64::from(c.load) / 64.0);
    free * latency * load
}

/// Picks `n` peers for shards of `shard_bytes` each; returns indices into
/// `candidates`, in shard order: nearest first (those measured, by round
/// trip), then those never measured, in draw order. `random` yields
/// numbers in [0, 1).
pub fn choose(
    candidates: &[Candidate],
    n: usize,
    shard_bytes: u64,
    random: impl FnMut() -> f64,
) -> Result<Vec<usize>, PlaceError> {
    choose_beside(candidates, n, shard_bytes, &Default::default(), random)
}

/// Like [`choose`], for shards joining a segment whose other shards are in
/// the failure domains `taken` (domain → shards there): domains holding
/// fewer of the segment are drawn from first, so repair spreads the
/// segment as placement would have.
pub fn choose_beside(
    candidates: &[Candidate],
    n: usize,
    shard_bytes: u64,
    taken: &std::collections::HashMap<String, usize>,
    mut random: impl FnMut() -> f64,
) -> Result<Vec<usize>, PlaceError> {
    let eligible: Vec<usize> = (0..candidates.len()).filter(|&i| candidates[i].free >= shard_bytes).collect();
    if eligible.len() < n {
        return Err(PlaceError::NotEnough { need: n, have: eligible.len(), shard_bytes });
    }
    let mut chosen = Vec::with_capacity(n);
    let mut per_domain: std::collections::HashMap<&str, usize> =
        taken.iter().map(|(d, &c)| (d.as_str(), c)).collect();
    while chosen.len() < n {
        let open: Vec<usize> = eligible.iter().copied().filter(|i| !chosen.contains(i)).collect();
        let fewest = open
            .iter()
            .map(|&i| per_domain.get(candidates[i].domain.as_str()).copied().unwrap_or(0))
            .min()
            .expect("enough eligible peers");
        let pool: Vec<usize> = open
            .into_iter()
            .filter(|&i| per_domain.get(candidates[i].domain.as_str()).copied().unwrap_or(0) == fewest)
            .collect();
        let weights: Vec<f64> = pool.iter().map(|&i| weight(&candidates[i]).max(1e-12)).collect();
        let total: f64 = weights.iter().sum();
        let mut target = random().clamp(0.0, 1.0 - f64::EPSILON) * total;
        let mut pick = pool[pool.len() - 1];
        for (&i, w) in pool.iter().zip(&weights) {
            if target < *w {
                pick = i;
                break;
            }
            target -= w;
        }
        *per_domain.entry(candidates[pick].domain.as_str()).or_default() += 1;
        chosen.push(pick);
    }
    // Stable: equal round trips (or none) keep the draw's order.
    chosen.sort_by_key(|&i| candidates[i].rtt_micros.unwrap_or(u32::MAX));
    Ok(chosen)
}

/// Like [`choose`], but when fewer than `n` peers can take a shard (peers
/// are down), as many as can, down to `min` (a segment's write quorum):
/// the shards left over are not stored until repair rebuilds them, as an
/// erasure-coded pool with `min_size = k + 1` keeps writing degraded.
/// Never two shards on one peer: losing it must cost one shard only.
pub fn choose_at_least(
    candidates: &[Candidate],
    n: usize,
    min: usize,
    shard_bytes: u64,
    random: impl FnMut() -> f64,
) -> Result<Vec<usize>, PlaceError> {
    let eligible = candidates.iter().filter(|c| c.free >= shard_bytes).count();
    if eligible < min.min(n) {
        return Err(PlaceError::NotEnough { need: min.min(n), have: eligible, shard_bytes });
    }
    choose(candidates, eligible.min(n), shard_bytes, random)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peer(name: &str, domain: &str, free: u64, rtt: Option<u32>) -> Candidate {
        Candidate { name: name.into(), domain: domain.into(), capacity: 1000, free, load: 0, rtt_micros: rtt }
    }

    fn rng(seed: u64) -> impl FnMut() -> f64 {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn at_least_takes_every_peer_up_down_to_the_minimum_never_two_shards_on_one() {
        let peers: Vec<Candidate> =
            (0..4).map(|i| peer(&format!("p{i}"), &format!("d{i}"), 100, None)).collect();
        // Enough: exactly n.
        assert_eq!(choose_at_least(&peers, 3, 2, 10, rng(1)).unwrap().len(), 3);
        // Too few for n, enough for min: all of them, once each.
        let mut got = choose_at_least(&peers, 6, 4, 10, rng(2)).unwrap();
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3]);
        // Below min (counting only peers with room): refused.
        let mut tight = peers.clone();
        tight[0].free = 5;
        assert_eq!(
            choose_at_least(&tight, 6, 4, 10, rng(3)),
            Err(PlaceError::NotEnough { need: 4, have: 3, shard_bytes: 10 })
        );
    }

    #[test]
    fn not_enough_space_or_peers_is_a_clear_error() {
        let peers = vec![peer("a", "x", 1000, None), peer("b", "y", 10, None), peer("c", "z", 1000, None)];
        let err = choose(&peers, 3, 100, rng(1)).unwrap_err();
        assert_eq!(err, PlaceError::NotEnough { need: 3, have: 2, shard_bytes: 100 });
        assert!(err.to_string().contains("start more peers"));
    }

    #[test]
    fn low_latency_peers_are_preferred() {
        let mut peers: Vec<_> =
            (0..3).map(|i| peer(&format!("near{i}"), &format!("n{i}"), 900, Some(100))).collect();
        peers.extend((0..3).map(|i| peer(&format!("far{i}"), &format!("f{i}"), 900, Some(20_000))));
        let mut near = 0;
        let mut r = rng(7);
        for _ in 0..1000 {
            near += choose(&peers, 3, 1, &mut r).unwrap().iter().filter(|&&i| i < 3).count();
        }
        assert!(near > 2900, "near peers got {near} of 3000 shards");
    }

    #[test]
    fn the_nearest_peers_get_the_data_shards() {
        // Six peers, all needed: whatever the draw, shard order is by
        // round trip, the unmeasured last.
        let rtts = [Some(9_000), None, Some(100), Some(20_000), Some(300), None];
        let peers: Vec<_> = rtts
            .iter()
            .enumerate()
            .map(|(i, &rtt)| peer(&format!("p{i}"), &format!("d{i}"), 900, rtt))
            .collect();
        for seed in 1..50 {
            let picked = choose(&peers, 6, 1, rng(seed)).unwrap();
            assert_eq!(&picked[..4], &[2, 4, 0, 3], "seed {seed}");
            let mut rest = picked[4..].to_vec();
            rest.sort();
            assert_eq!(rest, vec![1, 5]);
        }
    }

    #[test]
    fn free_space_is_preferred() {
        let peers = vec![peer("full", "a", 50, None), peer("empty", "b", 1000, None)];
        let mut r = rng(3);
        let firsts = (0..1000).filter(|_| choose(&peers, 1, 1, &mut r).unwrap()[0] == 1).count();
        assert!(firsts > 900, "{firsts}");
    }

    proptest! {
        #[test]
        fn never_two_shards_on_one_peer_and_domains_spread(
            domains in proptest::collection::vec(0u8..6, 1..16),
            frees in proptest::collection::vec(0u64..1000, 16),
            n in 1usize..12,
            seed: u64,
        ) {
            let peers: Vec<_> = domains
                .iter()
                .enumerate()
                .map(|(i, d)| peer(&format!("p{i}"), &format!("d{d}"), frees[i], Some((i as u32) * 700)))
                .collect();
            let eligible: Vec<_> = peers.iter().filter(|p| p.free >= 100).collect();
            match choose(&peers, n, 100, rng(seed)) {
                Err(PlaceError::NotEnough { have, .. }) => prop_assert!(have < n && have == eligible.len()),
                Ok(picked) => {
                    prop_assert_eq!(picked.len(), n);
                    let mut uniq = picked.clone();
                    uniq.sort_unstable();
                    uniq.dedup();
                    prop_assert_eq!(uniq.len(), n, "a peer got two shards");
                    prop_assert!(picked.iter().all(|&i| peers[i].free >= 100));
                    // Shards per domain differ by at most one while the
                    // domain still had an unpicked eligible peer.
                    let mut count = std::collections::HashMap::new();
                    for &i in &picked {
                        *count.entry(peers[i].domain.clone()).or_insert(0usize) += 1;
                    }
                    let max = *count.values().max().unwrap();
                    for d in eligible.iter().map(|p| p.domain.clone()) {
                        let c = count.get(&d).copied().unwrap_or(0);
                        let left = eligible.iter().filter(|p| p.domain == d).count() > c;
                        prop_assert!(!left || c + 1 >= max, "domain {} has {} shards, another {}", d, c, max);
                    }
                }
            }
        }
    }
}
