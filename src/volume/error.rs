//! What opening, serving or closing a volume can fail with.

use std::io;
use std::path::PathBuf;

use crate::backend;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{0}")]
    Cluster(#[from] crate::client::ClientError),
    #[error("the key does not open volume {0}: use the key file or passphrase it was created with")]
    WrongKey(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("io_uring: {0}")]
    Ring(#[source] io::Error),
    #[error(transparent)]
    Backend(#[from] backend::Error),
}
