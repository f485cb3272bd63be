//! Joining: the node makes a key and a CSR, dials the directory with the
//! join-token client configuration (no certificate; the directory must
//! chain to the CA the token pins) and spends the token for a certificate.

use std::net::SocketAddr;
use std::time::Duration;

use crate::api::{DirRequest, DirResponse};
use crate::membership::ca::{CaError, CertName, Role, new_key_and_csr, node_name, pem_certs};
use crate::membership::credential::{Credential, CredentialError, resolve};
use crate::membership::token::{self, TokenError};
use crate::transport::rpc::{Pool, RpcError, endpoint};
use crate::transport::tls::{TlsError, join_client_config};

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("joining: {0}")]
    Rpc(#[from] RpcError),
    #[error("the directory refused to let this node join: {0}")]
    Refused(String),
    #[error("the directory answered something unexpected: {0}")]
    Unexpected(String),
}

/// Joins the cluster whose directory is at `directory` with `token`, as a
/// node that expects `role`; returns the new credential (not yet saved).
pub async fn join(
    directory: &str,
    token_text: &str,
    role: Role,
    name: Option<String>,
) -> Result<Credential, JoinError> {
    let parsed = token::parse(token_text)?;
    let addr = resolve(directory)?;
    let (key, csr_pem) = new_key_and_csr()?;
    let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("valid");
    let ep = endpoint(bind, None, join_client_config(parsed.ca_pin)?)?;
    let pool = Pool::new(ep.clone());
    let dir_name = node_name("directory", Role::Directory, parsed.cluster);
    let req = DirRequest::Join { token: token_text.trim().to_owned(), role, csr_pem, name };
    let answer = pool.call(addr, &dir_name, &req, Vec::new(), Duration::from_secs(15)).await;
    ep.close(0u32.into(), b"joined");
    let (resp, _): (DirResponse, _) = answer?;
    match resp {
        DirResponse::Joined { node, cluster, cert_pem, ca_pem } => {
            let got = pem_certs(&cert_pem)?.first().and_then(|c| CertName::of_cert(c));
            if got.is_none_or(|n| n.role != role || n.node != node || n.cluster != cluster) {
                return Err(JoinError::Unexpected(format!(
                    "a certificate that does not name {} {node} of cluster {cluster}",
                    role.as_str()
                )));
            }
            Ok(Credential {
                cluster,
                node,
                role,
                directory: directory.to_owned(),
                ca_pem,
                cert_pem,
                key_pem: key.serialize_pem(),
            })
        }
        DirResponse::Error(e) => Err(JoinError::Refused(e.message)),
        other => Err(JoinError::Unexpected(format!("{other:?}"))),
    }
}
