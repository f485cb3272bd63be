//! The cluster certificate authority.
//!
//! Created on the directory's first start: an ECDSA P-256 key and a
//! self-signed CA certificate, written to `ca.key` (mode 0600) and `ca.crt`
//! in the directory's data folder. Node certificates are issued over a
//! node's certificate signing request, but everything in them (names,
//! usages, validity) is the CA's choice, never the request's: the name is
//! `<node>.<role>.<cluster>.meshdisk.invalid`, the usages allow TLS client
//! and server authentication, and the CA constrains itself to those names.
//! [`verifier`] builds the rustls verifier every meshdisk endpoint uses:
//! only chains to this one CA are accepted.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use crate::sys::durable;

/// The name suffix of every meshdisk certificate (`.invalid` never resolves).
const NAME_SUFFIX: &str = "meshdisk.invalid";

/// Node certificates are valid this long; they are renewed well before.
const NODE_VALIDITY_DAYS: i64 = 365;
const CA_VALIDITY_DAYS: i64 = 20 * 365;

/// A member's credentials: its certificate chain and key, and the CA it
/// trusts.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity(<key redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{0} already holds a cluster CA; refusing to replace it (every member's certificate would stop working)"
    )]
    Exists(PathBuf),
    #[error("no cluster CA in {0} (is this the directory's data folder?)")]
    Missing(PathBuf),
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("the node name {0:?} must be 1 to 63 characters of a-z, 0-9 and '-'")]
    BadName(String),
    #[error("TLS verifier: {0}")]
    Verifier(String),
}

/// What a certificate holder is allowed to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Role {
    Directory,
    Peer,
    Client,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Directory => "directory",
            Role::Peer => "peer",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "directory" => Role::Directory,
            "peer" => Role::Peer,
            "client" => Role::Client,
            "admin" => Role::Admin,
            _ => return Err(format!("unknown role {s:?} (peer, client or admin)")),
        })
    }
}

/// Who a certificate names: node, role and cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertName {
    pub node: String,
    pub role: Role,
    pub cluster: String,
}

impl std::fmt::Display for CertName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} of cluster {}", self.role.as_str(), self.node, self.cluster)
    }
}

impl CertName {
    /// Parses `<node>.<role>.<cluster>.meshdisk.invalid`.
    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_suffix(NAME_SUFFIX)?.strip_suffix('.')?;
        let mut parts = rest.split('.');
        let (node, role, cluster) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || check_label(node).is_err() || check_label(cluster).is_err() {
            return None;
        }
        Some(Self { node: node.to_owned(), role: role.parse().ok()?, cluster: cluster.to_owned() })
    }

    /// The name in a (verified) certificate's subject alternative names.
    pub fn of_cert(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Self::parse(d),
            _ => None,
        })
    }

    /// The name to dial this node by.
    pub fn dns(&self) -> String {
        node_name(&self.node, self.role, &self.cluster)
    }
}

/// The fingerprint a join token pins the CA with: blake3 of the CA
/// certificate (DER), first 16 bytes, hex.
pub fn ca_pin(der: &[u8]) -> String {
    hex::encode(&blake3::hash(der).as_bytes()[..16])
}

/// A DNS label: what node and cluster ids must look like.
pub fn check_label(s: &str) -> Result<(), CaError> {
    let ok = (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok { Ok(()) } else { Err(CaError::BadName(s.to_owned())) }
}

/// The certificate name of `node` with `role` in `cluster`.
pub fn node_name(node: &str, role: Role, cluster: &str) -> String {
    format!("{node}.{}.{cluster}.{NAME_SUFFIX}", role.as_str())
}

/// The directory's certificate authority.
pub struct ClusterCa {
    cluster: String,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").field("cluster", &self.cluster).finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io { path: path.to_owned(), source }
}

impl ClusterCa {
    /// Creates a new CA for cluster `cluster` in `dir`. Never overwrites.
    pub fn create(dir: &Path, cluster: &str) -> Result<Self, CaError> {
        check_label(cluster)?;
        let (key_path, cert_path) = (dir.join("ca.key"), dir.join("ca.crt"));
        if key_path.exists() || cert_path.exists() {
            return Err(CaError::Exists(dir.to_owned()));
        }
        let key = KeyPair::generate()?;
        let params = ca_params(cluster)?;
        let cert_pem = params.self_signed(&key)?.pem();
        write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&cert_path, cert_pem.as_bytes(), 0o644)?;
        Ok(Self { cluster: cluster.to_owned(), cert_pem, issuer: Issuer::new(params, key) })
    }

    /// Loads the CA of cluster `cluster` from `dir`.
    pub fn load(dir: &Path, cluster: &str) -> Result<Self, CaError> {
        let (key_path, cert_path) = (dir.join("ca.key"), dir.join("ca.crt"));
        if !key_path.exists() || !cert_path.exists() {
            return Err(CaError::Missing(dir.to_owned()));
        }
        let key = KeyPair::from_pem(&std::fs::read_to_string(&key_path).map_err(io(&key_path))?)?;
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Self { cluster: cluster.to_owned(), cert_pem, issuer })
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The CA certificate, PEM: what every member trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's pin (see [`ca_pin`]).
    pub fn pin(&self) -> Result<String, CaError> {
        let der = pem_certs(&self.cert_pem)?;
        let first = der.first().ok_or_else(|| CaError::Verifier("ca.crt holds no certificate".into()))?;
        Ok(ca_pin(first))
    }

    /// Issues a certificate for `node` in `role` over the public key of
    /// `csr_pem`. Only the key is taken from the request.
    pub fn issue(&self, csr_pem: &str, node: &str, role: Role) -> Result<String, CaError> {
        check_label(node)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let name = node_name(node, role, &self.cluster);
        let mut params = CertificateParams::new(vec![name.clone()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, format!("meshdisk cluster {}", self.cluster));
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(NODE_VALIDITY_DAYS);
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
    }
}

fn ca_params(cluster: &str) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("meshdisk cluster {cluster} CA"));
    dn.push(DnType::OrganizationName, format!("meshdisk cluster {cluster}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // The CA may only vouch for this cluster's names.
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DnsName(format!("{cluster}.{NAME_SUFFIX}"))],
        excluded_subtrees: Vec::new(),
    });
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
    Ok(params)
}

/// Through the one durable write, which also syncs the folder so the new
/// names survive a crash; never overwrites an existing file.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    durable::create_new(path, bytes, mode).map_err(io(path))
}

/// A new key pair and a certificate signing request for it, PEM; what a
/// joining node sends (the key stays with it).
pub fn new_key_and_csr() -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// The verifier every meshdisk endpoint uses for its peers' certificates:
/// chains to `ca_pem` only, client and server authentication both.
pub fn verifier(ca_pem: &str) -> Result<Arc<dyn ClientCertVerifier>, CaError> {
    verifier_with(ca_pem, false)
}

/// As [`verifier`]; with `optional`, a client may also come without any
/// certificate (the directory's join path), but one it presents must still
/// chain to `ca_pem`.
pub fn verifier_with(ca_pem: &str, optional: bool) -> Result<Arc<dyn ClientCertVerifier>, CaError> {
    let mut roots = RootCertStore::empty();
    for der in pem_certs(ca_pem)? {
        roots.add(der).map_err(|e| CaError::Verifier(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = if optional { builder.allow_unauthenticated() } else { builder };
    builder.build().map_err(|e| CaError::Verifier(e.to_string()))
}

/// The certificates in a PEM text, DER-encoded.
pub fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Verifier(format!("reading PEM certificates: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::UnixTime;

    fn accepted(verifier: &Arc<dyn ClientCertVerifier>, cert_pem: &str) -> Result<(), String> {
        let certs = pem_certs(cert_pem).unwrap();
        verifier.verify_client_cert(&certs[0], &[], UnixTime::now()).map(drop).map_err(|e| e.to_string())
    }

    #[test]
    fn members_are_accepted_and_strangers_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create(dir.path(), "home").unwrap();
        let v = verifier(ca.cert_pem()).unwrap();

        let (_key, csr) = new_key_and_csr().unwrap();
        let cert = ca.issue(&csr, "peer-1", Role::Peer).unwrap();
        accepted(&v, &cert).unwrap();

        // A self-signed certificate with the right name is refused.
        let key = KeyPair::generate().unwrap();
        let forged = CertificateParams::new(vec![node_name("peer-1", Role::Peer, "home")])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem();
        assert!(accepted(&v, &forged).is_err());

        // So is a member of another cluster.
        let other_dir = tempfile::tempdir().unwrap();
        let other = ClusterCa::create(other_dir.path(), "work").unwrap();
        let (_k, csr2) = new_key_and_csr().unwrap();
        let stranger = other.issue(&csr2, "peer-1", Role::Peer).unwrap();
        let err = accepted(&v, &stranger).unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    #[test]
    fn the_ca_is_kept_private_never_replaced_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create(dir.path(), "home").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(ClusterCa::create(dir.path(), "home"), Err(CaError::Exists(_))));
        let again = ClusterCa::load(dir.path(), "home").unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        // Certificates issued after a reload still chain to the same CA.
        let (_k, csr) = new_key_and_csr().unwrap();
        accepted(&verifier(ca.cert_pem()).unwrap(), &again.issue(&csr, "c1", Role::Client).unwrap()).unwrap();
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(ClusterCa::load(empty.path(), "home"), Err(CaError::Missing(_))));
    }

    #[test]
    fn the_ca_files_are_whole_with_their_modes_and_no_temporary_is_left() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create(dir.path(), "home").unwrap();
        let mode =
            |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("ca.key"), 0o600);
        assert_eq!(mode("ca.crt") & 0o600, 0o600);
        assert_eq!(std::fs::read_to_string(dir.path().join("ca.crt")).unwrap(), ca.cert_pem());
        KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("ca.key")).unwrap()).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["ca.crt", "ca.key"]);
    }

    #[test]
    fn names_come_from_the_ca_not_from_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create(dir.path(), "home").unwrap();
        // The request asks for another name; the certificate carries ours.
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(vec!["evil.example.com".to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let cert = ca.issue(&csr, "peer-2", Role::Peer).unwrap();
        let der = pem_certs(&cert).unwrap().remove(0);
        let text = String::from_utf8_lossy(der.as_ref());
        assert!(text.contains("peer-2.peer.home.meshdisk.invalid"));
        assert!(!text.contains("evil.example.com"));
        for bad in ["", "Peer", "-x", "x-", "a.b", &"a".repeat(64)] {
            assert!(matches!(ca.issue(&csr, bad, Role::Peer), Err(CaError::BadName(_))), "{bad:?}");
        }
        assert!(ClusterCa::create(tempfile::tempdir().unwrap().path(), "Bad_Name").is_err());
    }
}
