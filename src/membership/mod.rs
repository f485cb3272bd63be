//! The cluster's membership: who may talk to whom.
//!
//! The directory is the cluster's certificate authority ([`ca`]): every
//! peer, attaching client and admin holds a certificate it issued, and every
//! connection is mutual TLS against that CA alone. A machine joins with a
//! one-time token ([`token`]) that the directory exchanges for a
//! certificate over the machine's own key (a CSR, so private keys never
//! leave the machine that uses them); what it gets back is kept as a
//! [`credential`].

pub mod ca;
pub mod credential;
pub mod token;
