//! A member's saved identity: which cluster, which node and role, where the
//! directory is, and its TLS credentials. One TOML file, mode 0600, written
//! by joining (or by the directory's first start for the admin) and read on
//! every start after, so a node keeps its identity across restarts.
//! Joining, which writes one, is the client's (`client::join`).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ca::{Identity, Role, node_name};
use crate::sys::durable;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("the directory address {0:?} does not resolve to an address")]
    Address(String),
}

/// What a member keeps: see the module documentation.
#[derive(Clone, Serialize, Deserialize)]
pub struct Credential {
    pub cluster: String,
    pub node: String,
    pub role: Role,
    /// The directory's address, as given (host:port).
    pub directory: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("cluster", &self.cluster)
            .field("node", &self.node)
            .field("role", &self.role)
            .field("directory", &self.directory)
            .finish_non_exhaustive()
    }
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> CredentialError {
    CredentialError::File { path: path.to_owned(), message: e.to_string() }
}

impl Credential {
    /// Reads a credential file.
    pub fn load(path: &Path) -> Result<Self, CredentialError> {
        let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
        toml::from_str(&text).map_err(|e| file_err(path, format!("not a meshdisk credential: {e}")))
    }

    /// Writes it to `path` (mode 0600), replacing an older one atomically.
    pub fn save(&self, path: &Path) -> Result<(), CredentialError> {
        let text = toml::to_string(self).map_err(|e| file_err(path, e))?;
        durable::replace(path, text.as_bytes(), 0o600).map_err(|e| file_err(path, e))
    }

    pub fn identity(&self) -> Identity {
        Identity {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            ca_pem: self.ca_pem.clone(),
        }
    }

    /// The directory's certificate name.
    pub fn directory_name(&self) -> String {
        node_name("directory", Role::Directory, &self.cluster)
    }

    /// The directory's address, resolved.
    pub fn directory_addr(&self) -> Result<SocketAddr, CredentialError> {
        resolve(&self.directory)
    }
}

/// Resolves `host:port` to its first address.
pub fn resolve(addr: &str) -> Result<SocketAddr, CredentialError> {
    addr.to_socket_addrs()
        .map_err(|_| CredentialError::Address(addr.to_owned()))?
        .next()
        .ok_or_else(|| CredentialError::Address(addr.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn credential(node: &str) -> Credential {
        Credential {
            cluster: "home".into(),
            node: node.into(),
            role: Role::Peer,
            directory: "127.0.0.1:7700".into(),
            ca_pem: "ca".into(),
            cert_pem: "cert".into(),
            key_pem: "secret".into(),
        }
    }

    #[test]
    fn a_saved_credential_is_private_whole_and_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.toml");
        credential("peer-1").save(&path).unwrap();
        credential("peer-2").save(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Credential::load(&path).unwrap().node, "peer-2");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("identity.toml")]);
    }
}
