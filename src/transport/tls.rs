//! TLS configuration for QUIC endpoints: mutual authentication against the
//! cluster CA.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use rustls::DigitallySignedStruct;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{ServerName, UnixTime};

use crate::membership::ca::{CaError, CertName, Identity, ca_pin, pem_certs, verifier_with};

/// The application protocol every meshdisk connection speaks (versioned).
pub const ALPN: &[u8] = b"meshdisk/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("the private key is not valid PEM: {0}")]
    Key(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn key(id: &Identity) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).map_err(|e| TlsError::Key(format!("{e:?}")))
}

fn chain(id: &Identity) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    Ok(pem_certs(&id.cert_pem)?)
}

/// Whether a server lets clients in without a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate from the cluster CA.
    Required,
    /// Clients may come without one (the directory, for joining); one that
    /// is presented must still be from the cluster CA.
    Optional,
}

/// A QUIC server configuration that checks client certificates against the
/// cluster CA.
pub fn server_config(id: &Identity, auth: ClientAuth) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier_with(&id.ca_pem, auth == ClientAuth::Optional)?)
        .with_single_cert(chain(id)?, key(id)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// A QUIC client configuration that presents `id` and trusts only the
/// cluster CA.
pub fn client_config(id: &Identity) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for der in pem_certs(&id.ca_pem)? {
        roots.add(der).map_err(|e| TlsError::Config(e.to_string()))?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain(id)?, key(id)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// The client configuration of a machine joining with a token: no client
/// certificate yet, and the directory is trusted only if its chain includes
/// the CA whose pin the token carries.
pub fn join_client_config(pin: &str) -> Result<quinn::ClientConfig, TlsError> {
    let verifier = Arc::new(PinnedCa { pin: pin.to_owned(), provider: provider() });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// Who is on the other end of `conn`, from its verified certificate; `None`
/// for a client that presented none.
pub fn remote_name(conn: &quinn::Connection) -> Option<CertName> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    CertName::of_cert(certs.first()?)
}

/// Trusts a server whose chain contains the pinned CA and whose certificate
/// that CA signed for the name dialled.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates.iter().find(|c| ca_pin(c) == self.pin).ok_or_else(|| {
            rustls::Error::General(
                "the directory's CA is not the one the join token names: the token is for another cluster, or something is in between"
                    .into(),
            )
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|e| rustls::Error::General(e.to_string()))?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A refused connection, said so that the refused side knows what to do.
pub fn explain(e: &quinn::ConnectionError) -> String {
    let raw = e.to_string();
    let has = |needles: &[&str]| needles.iter().any(|n| raw.contains(n));
    // The other side closed the handshake because of what we presented.
    let by_them = raw.contains("aborted by peer");
    let hint = if has(&["CertificateRequired", "certificate required", "error 116"]) {
        "the other side wants a certificate from its cluster and this node has none: join first (`--join TOKEN`)"
    } else if by_them && has(&["UnknownIssuer", "UnknownCA", "BadCertificate", "error 42", "error 48"]) {
        "the other side does not accept this node's certificate: it was not issued by its cluster's CA (another cluster, or self-made); join this cluster with a token from its admin"
    } else if has(&["UnknownIssuer", "UnknownCA"]) {
        "the other side's certificate is not from this node's cluster CA: it belongs to another cluster (check the address)"
    } else if has(&["not valid for name", "NotValidForName"]) {
        "the other side's certificate names another node: the address now belongs to someone else"
    } else if has(&["timed out"]) {
        "no answer: is it running, and is the address and UDP port reachable?"
    } else {
        return raw;
    };
    format!("{raw}: {hint}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::ca::{ClusterCa, Role, new_key_and_csr, node_name};
    use std::net::SocketAddr;

    fn member(ca: &ClusterCa, node: &str, role: Role) -> Identity {
        let (key, csr) = new_key_and_csr().unwrap();
        Identity {
            cert_pem: ca.issue(&csr, node, role).unwrap(),
            key_pem: key.serialize_pem(),
            ca_pem: ca.cert_pem().into(),
        }
    }

    type Refusals = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

    /// A server that echoes one stream per connection; returns its address
    /// and the handshakes it refused.
    fn echo_server(id: &Identity) -> (quinn::Endpoint, SocketAddr, Refusals) {
        let ep = quinn::Endpoint::server(
            server_config(id, ClientAuth::Required).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = ep.local_addr().unwrap();
        let accept = ep.clone();
        let refusals = Refusals::default();
        let seen = refusals.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accept.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let conn = match incoming.await {
                        Ok(conn) => conn,
                        Err(e) => return seen.lock().unwrap().push(e.to_string()),
                    };
                    if let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let data = recv.read_to_end(1 << 20).await.unwrap_or_default();
                        let _ = send.write_all(&data).await;
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    }
                });
            }
        });
        (ep, addr, refusals)
    }

    async fn echo(client: &Identity, addr: SocketAddr, name: &str) -> Result<Vec<u8>, String> {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(client_config(client).map_err(|e| e.to_string())?);
        let conn = ep.connect(addr, name).map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"hello, member").await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn members_talk_and_strangers_are_turned_away() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create(dir.path(), "home").unwrap();
        let peer = member(&ca, "peer-1", Role::Peer);
        let client = member(&ca, "laptop", Role::Client);
        let (_server, addr, refusals) = echo_server(&peer);
        let peer_name = node_name("peer-1", Role::Peer, "home");

        assert_eq!(echo(&client, addr, &peer_name).await.unwrap(), b"hello, member");

        // A member of another cluster: its certificate does not chain to our
        // CA, and it does not trust ours either.
        let other_dir = tempfile::tempdir().unwrap();
        let other = ClusterCa::create(other_dir.path(), "work").unwrap();
        let stranger = member(&other, "laptop", Role::Client);
        let err = echo(&stranger, addr, &peer_name).await.unwrap_err();
        assert!(err.contains("invalid peer certificate: UnknownIssuer"), "{err}");

        // Our client with a stranger's key but our CA: the server refuses it.
        let forged = Identity { ca_pem: ca.cert_pem().into(), ..stranger.clone() };
        assert!(echo(&forged, addr, &peer_name).await.is_err());
        // The server's side of the failed handshake may land a moment later.
        for _ in 0..100 {
            if !refusals.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let refused = refusals.lock().unwrap().clone();
        assert!(refused.iter().any(|e| e.contains("UnknownIssuer")), "server side: {refused:?}");

        // Dialling a member under another member's name fails: the name is
        // part of what is checked.
        let wrong = node_name("peer-2", Role::Peer, "home");
        let err = echo(&client, addr, &wrong).await.unwrap_err();
        assert!(err.contains("certificate not valid for name"), "{err}");
    }
}
