//! One-time join tokens: `meshdisk token create` makes one, a joining
//! machine spends it once to get its certificate.
//!
//! A token is `mdjoin-` and 64 hex digits (256 random bits). The directory
//! stores only its blake3 hash (key `tokens/<hash>`), with its expiry and
//! the role it grants, so a copy of the directory's database cannot be used
//! to join. Spending is a compare-and-set delete: of two machines racing
//! with the same token, exactly one wins.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::meta::{Compare, MetaError, MetaStore, Op, Txn};

use super::ca::Role;

const PREFIX: &str = "mdjoin-";
const KEY_PREFIX: &[u8] = b"tokens/";

/// A join token. Its `Debug` hides the secret part.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(String);

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

impl JoinToken {
    /// The token as the admin passes it on.
    pub fn reveal(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("that is not a meshdisk join token (they look like mdjoin-<64 hex digits>)")]
    Malformed,
    #[error(
        "unknown or already used join token: ask the cluster admin for a new one (`meshdisk token create`)"
    )]
    Unknown,
    #[error(
        "this join token expired {0} s ago: ask the cluster admin for a new one (`meshdisk token create`)"
    )]
    Expired(u64),
    #[error("a join token must live 1 s to 30 days, got {0:?}")]
    Ttl(Duration),
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn role_byte(role: Role) -> u8 {
    match role {
        Role::Directory => 0,
        Role::Peer => 1,
        Role::Client => 2,
        Role::Admin => 3,
    }
}

fn role_of(b: u8) -> Option<Role> {
    Some(match b {
        0 => Role::Directory,
        1 => Role::Peer,
        2 => Role::Client,
        3 => Role::Admin,
        _ => return None,
    })
}

fn store_key(token: &str) -> Result<Vec<u8>, TokenError> {
    let secret = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
    if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return Err(TokenError::Malformed);
    }
    let mut key = KEY_PREFIX.to_vec();
    key.extend_from_slice(blake3::hash(token.as_bytes()).to_hex().as_bytes());
    Ok(key)
}

/// Creates a token granting `role`, valid for `ttl`.
pub async fn create(store: &impl MetaStore, role: Role, ttl: Duration) -> Result<JoinToken, TokenError> {
    create_at(store, role, ttl, now_ms()).await
}

/// Spends a token: returns the role it grants, once.
pub async fn redeem(store: &impl MetaStore, token: &str) -> Result<Role, TokenError> {
    redeem_at(store, token, now_ms()).await
}

async fn create_at(
    store: &impl MetaStore,
    role: Role,
    ttl: Duration,
    now: u64,
) -> Result<JoinToken, TokenError> {
    if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(30 * 86_400) {
        return Err(TokenError::Ttl(ttl));
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| TokenError::Random(e.to_string()))?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let token = format!("{PREFIX}{hex}");
    let key = store_key(&token)?;
    let mut value = (now + ttl.as_millis() as u64).to_le_bytes().to_vec();
    value.push(role_byte(role));
    let out = store
        .txn(Txn::new().when(Compare::Absent(key.clone())).then(Op::Put { key, value, lease: None }))
        .await?;
    if !out.succeeded {
        return Err(TokenError::Random("a fresh token collided with an existing one".into()));
    }
    Ok(JoinToken(token))
}

async fn redeem_at(store: &impl MetaStore, token: &str, now: u64) -> Result<Role, TokenError> {
    let key = store_key(token.trim())?;
    let entry = store.get(&key).await?.ok_or(TokenError::Unknown)?;
    let (expiry, role) = match entry.value.as_slice() {
        [e @ .., r] if e.len() == 8 => {
            (u64::from_le_bytes(e.try_into().expect("8 bytes")), role_of(*r).ok_or(TokenError::Unknown)?)
        }
        _ => return Err(TokenError::Unknown),
    };
    // Spent either way: an expired token is deleted too.
    let spent = store
        .txn(Txn::new().when(Compare::ModRevision(key.clone(), entry.mod_revision)).then(Op::Delete { key }))
        .await?;
    if !spent.succeeded {
        return Err(TokenError::Unknown);
    }
    if expiry <= now {
        return Err(TokenError::Expired((now - expiry) / 1000));
    }
    Ok(role)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::embedded::RedbStore;

    #[tokio::test]
    async fn a_token_works_once_and_only_before_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("m.redb")).unwrap();
        let t = create_at(&store, Role::Peer, Duration::from_secs(60), 1_000_000).await.unwrap();
        assert!(t.reveal().starts_with("mdjoin-") && t.reveal().len() == 71);
        assert_eq!(format!("{t:?}"), "JoinToken(<redacted>)");
        // Only the hash is stored.
        let stored = store.list(KEY_PREFIX).await.unwrap();
        assert_eq!(stored.len(), 1);
        assert!(!String::from_utf8_lossy(&stored[0].key).contains(&t.reveal()[7..]));

        assert_eq!(redeem_at(&store, t.reveal(), 1_030_000).await.unwrap(), Role::Peer);
        let again = redeem_at(&store, t.reveal(), 1_030_000).await.unwrap_err();
        assert!(matches!(again, TokenError::Unknown), "{again}");
        assert!(again.to_string().contains("meshdisk token create"));

        let late = create_at(&store, Role::Client, Duration::from_secs(60), 1_000_000).await.unwrap();
        let err = redeem_at(&store, late.reveal(), 1_090_000).await.unwrap_err();
        assert!(matches!(err, TokenError::Expired(30)), "{err}");
        assert!(matches!(redeem_at(&store, late.reveal(), 1_000_000).await, Err(TokenError::Unknown)));

        for bad in ["", "mdjoin-", "mdjoin-xyz", &format!("mdjoin-{}", "A".repeat(64)), &t.reveal()[1..]] {
            assert!(matches!(redeem_at(&store, bad, 0).await, Err(TokenError::Malformed)), "{bad:?}");
        }
        let unknown = format!("mdjoin-{}", "0".repeat(64));
        assert!(matches!(redeem_at(&store, &unknown, 0).await, Err(TokenError::Unknown)));
        assert!(matches!(create(&store, Role::Peer, Duration::ZERO).await, Err(TokenError::Ttl(_))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_machines_racing_with_one_token_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("m.redb")).unwrap();
        for _ in 0..10 {
            let t = create(&store, Role::Peer, Duration::from_secs(60)).await.unwrap();
            let (a, b) = (store.clone(), store.clone());
            let (ta, tb) = (t.reveal().to_owned(), t.reveal().to_owned());
            let (ra, rb) = tokio::join!(
                tokio::spawn(async move { redeem(&a, &ta).await.is_ok() }),
                tokio::spawn(async move { redeem(&b, &tb).await.is_ok() })
            );
            assert_eq!(u8::from(ra.unwrap()) + u8::from(rb.unwrap()), 1);
        }
    }
}
