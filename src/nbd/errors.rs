//! The one place backend errors become NBD errors (nbdkit's errno table):
//! the errno the client gets for each kind of failure, and what the log
//! adds to the cause so the operator knows what to do about it. The server
//! logs the real cause first, then replies.

use super::proto::NbdError;
use crate::backend;

/// The one table from backend errors to NBD errors: the errno the client
/// gets for each kind of failure, and what the log adds to the cause so
/// the operator knows what to do about it.
pub(super) fn reply_for(kind: backend::ErrorKind) -> (NbdError, &'static str) {
    use backend::ErrorKind as K;
    match kind {
        K::Io => (NbdError::Io, ""),
        K::Fenced => (
            NbdError::Io,
            "; this writer was fenced (another machine holds the lease now, or it lapsed): writes fail until \
             the export is attached again, here with --force only if the other machine is gone",
        ),
        K::Unavailable => (
            NbdError::Io,
            "; too few peers or shards are reachable: it works again once enough of them are back",
        ),
        K::Corrupt => (NbdError::Io, "; the data is damaged beyond repair"),
        K::Full => (NbdError::NoSpc, "; answering ENOSPC"),
        K::Denied => (NbdError::Perm, ""),
        K::Invalid => (NbdError::Inval, ""),
        K::NotSupported => (NbdError::NotSup, ""),
    }
}

/// The NBD error a backend error is answered with.
pub fn nbd_error(e: &backend::Error) -> NbdError {
    reply_for(e.kind()).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_backend_error_has_its_nbd_error() {
        use backend::{Error, ErrorKind as K};
        let failed = |kind| nbd_error(&Error::failed(kind, "write", 0, 4096, "why"));
        assert_eq!(failed(K::Io), NbdError::Io);
        assert_eq!(failed(K::Fenced), NbdError::Io);
        assert_eq!(failed(K::Unavailable), NbdError::Io);
        assert_eq!(failed(K::Corrupt), NbdError::Io);
        assert_eq!(failed(K::Full), NbdError::NoSpc);
        assert_eq!(failed(K::Denied), NbdError::Perm);
        assert_eq!(failed(K::Invalid), NbdError::Inval);
        assert_eq!(failed(K::NotSupported), NbdError::NotSup);
        // The older variants keep their answers.
        let os = |errno| nbd_error(&Error::io("write", 0, 1, std::io::Error::from_raw_os_error(errno)));
        assert_eq!(os(libc::ENOSPC), NbdError::NoSpc);
        assert_eq!(os(libc::EDQUOT), NbdError::NoSpc);
        assert_eq!(os(libc::EROFS), NbdError::Perm);
        assert_eq!(os(libc::EIO), NbdError::Io);
        assert_eq!(nbd_error(&Error::ReadOnly { op: "write" }), NbdError::Perm);
        assert_eq!(nbd_error(&Error::FastZeroUnsupported { offset: 0 }), NbdError::NotSup);
        let poisoned = Error::Poisoned { op: "read", cause: "EIO".into() };
        assert_eq!(nbd_error(&poisoned), NbdError::Io);
        // The fenced writer's log says what happened and what to do.
        assert!(reply_for(K::Fenced).1.contains("fenced") && reply_for(K::Fenced).1.contains("--force"));
    }
}
