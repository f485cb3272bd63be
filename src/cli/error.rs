//! What a command fails with. The lower layers' errors keep their type up
//! to here (a caller can still match on a [`ClientError`]'s kind, say);
//! `main` prints the error once, as `meshdisk: error: MESSAGE`, and exits
//! with status 1. Wrapped errors print exactly as their own `Display` does.

use std::fmt::Display;
use std::path::PathBuf;

use crate::backend;
use crate::cli::demo::DemoError;
use crate::cli::passphrase::PassphraseError;
use crate::client::ClientError;
use crate::client::join::JoinError;
use crate::codec::GeometryError;
use crate::codec::bench::BenchError;
use crate::codec::key::KeyError;
use crate::codec::keyslot::KeySlotError;
use crate::directory::DirectoryError;
use crate::membership::credential::CredentialError;
use crate::peer::PeerError;
use crate::volume::VolumeError;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An argument clap accepted but the command cannot use; the message
    /// names the option and what it must be.
    #[error("{0}")]
    Argument(String),
    /// A system call or file, with what we were doing (often a path).
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    /// Not `#[from]`: without its `std` feature (which only the tests
    /// turn on) `getrandom::Error` is no `std::error::Error`.
    #[error("the operating system's random number generator failed: {0}")]
    Random(getrandom::Error),
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),

    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    KeySlots(#[from] KeySlotError),
    /// The volume's key slots refused the key given (or do not parse).
    #[error("volume {volume}: {source}")]
    Unlock { volume: String, source: KeySlotError },
    #[error(transparent)]
    Passphrase(#[from] PassphraseError),
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    #[error(transparent)]
    Bench(#[from] BenchError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(transparent)]
    Join(#[from] JoinError),
    /// Boxed, as the large errors below are: every command returns this type.
    #[error(transparent)]
    Client(Box<ClientError>),
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    /// Boxed: a peer's error is large and every command returns this type.
    #[error(transparent)]
    Peer(Box<PeerError>),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Attach(Box<crate::volume::v2::AttachError>),
    #[error(transparent)]
    Demo(#[from] DemoError),

    #[error("{} exists already: this machine has joined (remove the file to join again)", .0.display())]
    AlreadyJoined(PathBuf),
    #[error(
        "volume {0} has no passphrase, only key files: give --key-file (`meshdisk volume passwd {0} --key-file FILE` sets a passphrase)"
    )]
    NoPassphrase(String),
    #[error("not confirmed; nothing was deleted")]
    NotConfirmed,
    #[error(
        "{} is in use by meshdisk attach (pid {pid}): run `meshdisk detach {volume}` first, or give another --cache-dir",
        .state.display()
    )]
    StateInUse { state: PathBuf, pid: i32, volume: String },
    #[error("volume {volume} is not attached from {}", .state.display())]
    NotAttached { volume: String, state: PathBuf },
    #[error("volume {volume} is not attached (its attach process {pid} is gone)")]
    AttachGone { volume: String, pid: i32 },
    #[error("attach (pid {0}) is still flushing after 5 minutes")]
    StillFlushing(i32),
    #[error("detaching: {0}")]
    Detach(VolumeError),

    #[error("listening on {addr}: {source} (choose another with --listen, or --listen none)")]
    Listen { addr: String, source: std::io::Error },
    #[error("nothing to listen on: give --socket PATH or a --listen address")]
    NothingToListenOn,
    #[error("final flush failed: {0}")]
    Flush(backend::Error),

    #[error("no peer is up: start some (`meshdisk peer`) and try again")]
    NoPeerUp,
    #[error("no benchmark shards on any peer: run the put phase first")]
    NoBenchShards,
    /// A benchmark call to one peer failed: `what` is "put to", "get from", ...
    #[error("{what} {peer}: {source}")]
    PeerCall { what: &'static str, peer: String, source: Box<ClientError> },
}

impl From<getrandom::Error> for CliError {
    fn from(e: getrandom::Error) -> Self {
        CliError::Random(e)
    }
}

impl CliError {
    /// For `map_err`: an I/O error with what we were doing, e.g.
    /// `.map_err(CliError::io(path.display()))`.
    pub fn io(context: impl Display) -> impl FnOnce(std::io::Error) -> CliError {
        let context = context.to_string();
        move |source| CliError::Io { context, source }
    }
}

impl From<crate::volume::v2::AttachError> for CliError {
    fn from(e: crate::volume::v2::AttachError) -> Self {
        CliError::Attach(Box::new(e))
    }
}

impl From<PeerError> for CliError {
    fn from(e: PeerError) -> Self {
        Self::Peer(Box::new(e))
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        Self::Client(Box::new(e))
    }
}
