//! The transport between cluster members: QUIC (quinn) with mutual TLS.
//!
//! Every endpoint presents a certificate issued by the cluster CA and
//! accepts only certificates that chain to it ([`crate::membership::ca`]):
//! TLS 1.3 only, one ALPN ([`tls::ALPN`]), the ring crypto provider. A client
//! dials a member by its certificate name
//! (`<node>.<role>.<cluster>.meshdisk.invalid`), so it cannot be talked into
//! trusting another member at the same address.

pub mod rpc;
pub mod tls;
pub mod wire;
