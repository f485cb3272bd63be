//! One-time join tokens: `meshdisk token create` makes one, a joining
//! machine spends it once to get its certificate.
//!
//! A token is `mdjoin-<cluster>-<CA pin>-<secret>`: the cluster's name, the
//! first 128 bits of the blake3 hash of the cluster CA's certificate (32 hex
//! digits) and 256 random bits (64 hex digits). The joining machine trusts
//! the directory only if it presents a chain to the pinned CA, so one string
//! carries both what proves the newcomer and what proves the directory (as
//! kubeadm's token and CA hash do). The directory stores only the blake3
//! hash of the secret (key `tokens/<hash>`), with its expiry and the role it
//! grants, so a copy of the directory's database cannot be used to join.
//! The directory keeps and spends them (`directory::tokens`).

use std::time::Duration;

use crate::membership::ca::Role;

pub(crate) const PREFIX: &str = "mdjoin-";

/// A join token. Its `Debug` hides the secret part.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(pub(crate) String);

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
    #[error(
        "that is not a meshdisk join token (they look like mdjoin-<cluster>-<32 hex digits>-<64 hex digits>, as `meshdisk token create` prints them)"
    )]
    Malformed,
    #[error(
        "this join token is for cluster {token_cluster}, but this directory serves cluster {ours}: use a token from this cluster's admin"
    )]
    OtherCluster { token_cluster: String, ours: String },
    #[error(
        "unknown or already used join token: ask the cluster admin for a new one (`meshdisk token create`)"
    )]
    Unknown,
    #[error(
        "this join token expired {0} s ago: ask the cluster admin for a new one (`meshdisk token create`)"
    )]
    Expired(u64),
    #[error(
        "this join token is for a {} but this node joins as a {}: ask for one made with `meshdisk token create --role {}`",
        token.as_str(), want.as_str(), want.as_str()
    )]
    WrongRole { token: Role, want: Role },
    #[error("a join token must live 1 s to 30 days, got {0:?}")]
    Ttl(Duration),
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
}

pub(crate) fn role_byte(role: Role) -> u8 {
    match role {
        Role::Directory => 0,
        Role::Peer => 1,
        Role::Client => 2,
        Role::Admin => 3,
    }
}

pub(crate) fn role_of(b: u8) -> Option<Role> {
    Some(match b {
        0 => Role::Directory,
        1 => Role::Peer,
        2 => Role::Client,
        3 => Role::Admin,
        _ => return None,
    })
}

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A token's parts, as the joining machine reads them.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub cluster: &'a str,
    pub ca_pin: &'a str,
    pub(crate) secret: &'a str,
}

/// Splits a token into its parts; `Malformed` unless all are well formed.
pub fn parse(token: &str) -> Result<Parsed<'_>, TokenError> {
    let rest = token.trim().strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
    let mut parts = rest.rsplitn(3, '-');
    let (secret, ca_pin, cluster) = match (parts.next(), parts.next(), parts.next()) {
        (Some(s), Some(p), Some(c)) => (s, p, c),
        _ => return Err(TokenError::Malformed),
    };
    if !lower_hex(secret, 64)
        || !lower_hex(ca_pin, 32)
        || crate::membership::ca::check_label(cluster).is_err()
    {
        return Err(TokenError::Malformed);
    }
    Ok(Parsed { cluster, ca_pin, secret })
}
