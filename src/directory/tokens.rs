//! The directory's side of join tokens (the format is
//! [`crate::membership::token`]): it stores only the blake3 hash of the
//! secret (key `tokens/<hash>`), with its expiry and the role it grants, so a
//! copy of the directory's database cannot be used to join. Spending is a
//! compare-and-set delete: of two machines racing with the same token,
//! exactly one wins.

use std::time::Duration;

use super::meta::{Compare, MetaError, MetaStore, Op, Txn};
use crate::membership::ca::Role;
use crate::membership::token::{JoinToken, PREFIX, TokenError, parse, role_byte, role_of};

const KEY_PREFIX: &[u8] = b"tokens/";

/// Why a token could not be made or spent: the token itself, or the store.
#[derive(Debug, thiserror::Error)]
pub enum SpendError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

fn store_key(secret: &str) -> Vec<u8> {
    let mut key = KEY_PREFIX.to_vec();
    key.extend_from_slice(blake3::hash(secret.as_bytes()).to_hex().as_bytes());
    key
}

/// This directory's cluster and CA pin, which every token it makes names.
#[derive(Clone, Debug)]
pub struct Issuer {
    pub cluster: String,
    pub ca_pin: String,
}

/// Creates a token granting `role`, valid for `ttl` from `now` (ms since
/// the Unix epoch, by the directory's clock).
pub async fn create(
    store: &impl MetaStore,
    issuer: &Issuer,
    role: Role,
    ttl: Duration,
    now: u64,
) -> Result<JoinToken, SpendError> {
    if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(30 * 86_400) {
        return Err(TokenError::Ttl(ttl).into());
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| TokenError::Random(e.to_string()))?;
    let hex = hex::encode(secret);
    let token = format!("{PREFIX}{}-{}-{hex}", issuer.cluster, issuer.ca_pin);
    let key = store_key(&hex);
    let mut value = (now + ttl.as_millis() as u64).to_le_bytes().to_vec();
    value.push(role_byte(role));
    let out = store
        .txn(Txn::new().when(Compare::Absent(key.clone())).then(Op::Put { key, value, lease: None }))
        .await?;
    if !out.succeeded {
        return Err(TokenError::Random("a fresh token collided with an existing one".into()).into());
    }
    Ok(JoinToken(token))
}

/// Spends a token for a node that wants to be `want`: once, and only if
/// the token grants that role (a token for another role is left unspent)
/// and it has not expired by `now`.
pub async fn redeem(
    store: &impl MetaStore,
    issuer: &Issuer,
    token: &str,
    want: Role,
    now: u64,
) -> Result<(), SpendError> {
    let parsed = parse(token)?;
    if parsed.cluster != issuer.cluster || parsed.ca_pin != issuer.ca_pin {
        return Err(TokenError::OtherCluster {
            token_cluster: parsed.cluster.to_owned(),
            ours: issuer.cluster.clone(),
        }
        .into());
    }
    let key = store_key(parsed.secret);
    let entry = store.get(&key).await?.ok_or(TokenError::Unknown)?;
    let (expiry, role) = match entry.value.as_slice() {
        [e @ .., r] if e.len() == 8 => {
            (u64::from_le_bytes(e.try_into().expect("8 bytes")), role_of(*r).ok_or(TokenError::Unknown)?)
        }
        _ => return Err(TokenError::Unknown.into()),
    };
    if role != want && expiry > now {
        return Err(TokenError::WrongRole { token: role, want }.into());
    }
    // Spent either way: an expired token is deleted too.
    let spent = store
        .txn(Txn::new().when(Compare::ModRevision(key.clone(), entry.mod_revision)).then(Op::Delete { key }))
        .await?;
    if !spent.succeeded {
        return Err(TokenError::Unknown.into());
    }
    if expiry <= now {
        return Err(TokenError::Expired((now - expiry) / 1000).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::meta::embedded::RedbStore;
    use crate::membership::token::parse;

    fn issuer() -> Issuer {
        Issuer { cluster: "home".into(), ca_pin: "00112233445566778899aabbccddeeff".into() }
    }

    #[tokio::test]
    async fn a_token_works_once_and_only_before_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("m.redb")).unwrap();
        let home = issuer();
        let t = create(&store, &home, Role::Peer, Duration::from_secs(60), 1_000_000).await.unwrap();
        assert!(t.reveal().starts_with("mdjoin-home-00112233445566778899aabbccddeeff-"), "{}", t.reveal());
        assert_eq!(t.reveal().len(), 7 + 5 + 33 + 64);
        let parsed = parse(t.reveal()).unwrap();
        assert_eq!((parsed.cluster, parsed.ca_pin), ("home", home.ca_pin.as_str()));
        assert_eq!(format!("{t:?}"), "JoinToken(<redacted>)");
        // Only the hash is stored.
        let stored = store.list(KEY_PREFIX).await.unwrap();
        assert_eq!(stored.len(), 1);
        assert!(!String::from_utf8_lossy(&stored[0].key).contains(parsed.secret));

        let wrong = redeem(&store, &home, t.reveal(), Role::Client, 1_030_000).await.unwrap_err();
        assert!(
            matches!(
                wrong,
                SpendError::Token(TokenError::WrongRole { token: Role::Peer, want: Role::Client })
            ),
            "{wrong}"
        );
        assert!(wrong.to_string().contains("--role client"), "{wrong}");
        // A wrong-role attempt leaves the token unspent.
        redeem(&store, &home, t.reveal(), Role::Peer, 1_030_000).await.unwrap();
        let again = redeem(&store, &home, t.reveal(), Role::Peer, 1_030_000).await.unwrap_err();
        assert!(matches!(again, SpendError::Token(TokenError::Unknown)), "{again}");
        assert!(again.to_string().contains("meshdisk token create"));

        let late = create(&store, &home, Role::Client, Duration::from_secs(60), 1_000_000).await.unwrap();
        let err = redeem(&store, &home, late.reveal(), Role::Client, 1_090_000).await.unwrap_err();
        assert!(matches!(err, SpendError::Token(TokenError::Expired(30))), "{err}");
        assert!(matches!(
            redeem(&store, &home, late.reveal(), Role::Client, 1_000_000).await,
            Err(SpendError::Token(TokenError::Unknown))
        ));

        let pin = &home.ca_pin;
        let secret = "0".repeat(64);
        for bad in [
            "",
            "mdjoin-",
            "mdjoin-xyz",
            &format!("mdjoin-{}", "a".repeat(64)),
            &format!("mdjoin-home-{pin}-{}", "A".repeat(64)),
            &format!("mdjoin-Home-{pin}-{secret}"),
            &format!("mdjoin-home-{}-{secret}", &pin[1..]),
            &format!("mdjoin--{pin}-{secret}"),
            &t.reveal()[1..],
        ] {
            assert!(
                matches!(
                    redeem(&store, &home, bad, Role::Peer, 0).await,
                    Err(SpendError::Token(TokenError::Malformed))
                ),
                "{bad:?}"
            );
        }
        let unknown = format!("mdjoin-home-{pin}-{secret}");
        assert!(matches!(
            redeem(&store, &home, &unknown, Role::Peer, 0).await,
            Err(SpendError::Token(TokenError::Unknown))
        ));
        // A cluster name with dashes parses from the right.
        let dashed = Issuer { cluster: "my-home-lab".into(), ca_pin: home.ca_pin.clone() };
        let d = create(&store, &dashed, Role::Client, Duration::from_secs(60), 0).await.unwrap();
        assert_eq!(parse(d.reveal()).unwrap().cluster, "my-home-lab");
        // A token of another cluster, or of another CA with the same name.
        let err = redeem(&store, &home, d.reveal(), Role::Client, 0).await.unwrap_err();
        assert!(
            err.to_string().contains("for cluster my-home-lab, but this directory serves cluster home"),
            "{err}"
        );
        let forged = Issuer { cluster: "home".into(), ca_pin: "f".repeat(32) };
        assert!(matches!(
            redeem(&store, &forged, t.reveal(), Role::Peer, 0).await,
            Err(SpendError::Token(TokenError::OtherCluster { .. }))
        ));
        assert!(matches!(
            create(&store, &home, Role::Peer, Duration::ZERO, 0).await,
            Err(SpendError::Token(TokenError::Ttl(_)))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_machines_racing_with_one_token_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("m.redb")).unwrap();
        for _ in 0..10 {
            let t = create(&store, &issuer(), Role::Peer, Duration::from_secs(60), 0).await.unwrap();
            let (a, b) = (store.clone(), store.clone());
            let (ta, tb) = (t.reveal().to_owned(), t.reveal().to_owned());
            let (ra, rb) = tokio::join!(
                tokio::spawn(async move { redeem(&a, &issuer(), &ta, Role::Peer, 1).await.is_ok() }),
                tokio::spawn(async move { redeem(&b, &issuer(), &tb, Role::Peer, 1).await.is_ok() })
            );
            assert_eq!(u8::from(ra.unwrap()) + u8::from(rb.unwrap()), 1);
        }
    }
}
