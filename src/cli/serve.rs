//! `meshdisk serve`: a RAM disk or a file over NBD, no cluster. Also the
//! NBD listening that `attach` shares: bind TCP and/or a unix socket,
//! print the URIs, serve until stopped, then flush.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::backend::Backend;
use crate::backend::file::FileBackend;
use crate::backend::memory::MemoryBackend;
use crate::cli::{CliError, stop_on_signals};
use crate::nbd::server::bind_unix;
use crate::nbd::{Server, ServerConfig};
use crate::size::{human, parse_size};
use crate::sys::uring::Uring;

#[derive(Args)]
pub struct ServeArgs {
    /// Serve a sparse disk of this size held in RAM (e.g. 1G).
    #[arg(long, value_parser = parse_size, conflicts_with = "file", required_unless_present = "file")]
    memory: Option<u64>,
    /// Serve this file or block device through io_uring.
    #[arg(long)]
    file: Option<PathBuf>,
    /// With --file: create the file, or extend it (sparsely), to this size.
    #[arg(long, value_parser = parse_size, requires = "file")]
    size: Option<u64>,
    /// TCP address to listen on, or `none`. Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: String,
    /// Also (or only) listen on this unix socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Export name clients ask for (the empty name always works too).
    #[arg(long, default_value = "")]
    export: String,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Description shown by `nbdinfo` and other clients.
    #[arg(long)]
    description: Option<String>,
}

/// `meshdisk serve`.
pub async fn run(args: ServeArgs) -> Result<(), CliError> {
    let listen = Listen {
        listen: args.listen,
        socket: args.socket,
        export: args.export,
        description: args.description,
        read_only: args.read_only,
    };
    if let Some(size) = args.memory {
        if size == 0 {
            return Err(CliError::Argument("--memory must be larger than 0".into()));
        }
        let backend = Arc::new(MemoryBackend::new(size));
        serve_nbd(backend, &listen, format!("memory ({})", human(size)), stop_on_signals(None)?, None).await
    } else {
        let path = args.file.expect("clap requires --file without --memory");
        let ring = Uring::new(256).map_err(CliError::io("setting up io_uring"))?;
        // The error names the path already.
        let backend = FileBackend::open(&ring, &path, args.size, args.read_only)
            .map_err(CliError::io("serving a file"))?;
        let what = format!("file {} ({})", path.display(), human(backend.size()));
        serve_nbd(Arc::new(backend), &listen, what, stop_on_signals(None)?, None).await
    }
}

/// Where an NBD server listens and what it calls its export.
pub struct Listen {
    /// A TCP address, or `none`.
    pub listen: String,
    pub socket: Option<PathBuf>,
    pub export: String,
    pub description: Option<String>,
    pub read_only: bool,
}

/// Serves `backend` (described as `what` in the log) until `stop`, then
/// finishes the requests in flight and flushes, all within `limit` if
/// given (a volume's flush waits on peers that may be gone; a file's does
/// not). The URIs clients use are printed on stdout, one a line, once
/// listening.
pub async fn serve_nbd<B: Backend>(
    backend: Arc<B>,
    args: &Listen,
    what: String,
    stop: CancellationToken,
    limit: Option<Duration>,
) -> Result<(), CliError> {
    let config = ServerConfig {
        export_name: args.export.clone(),
        description: args.description.clone(),
        read_only: args.read_only,
        ..Default::default()
    };
    let server = Server::new(backend, config);
    let mut uris = Vec::new();
    let mut listeners = tokio::task::JoinSet::new();

    if args.listen != "none" {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .map_err(|source| CliError::Listen { addr: args.listen.clone(), source })?;
        let addr = listener.local_addr().map_err(CliError::io("reading the TCP listener's address"))?;
        uris.push(format!("nbd://{addr}/{}", uri_escape(&args.export)));
        let s = server.clone();
        listeners.spawn(async move { s.serve_tcp(listener).await });
    }
    if let Some(path) = &args.socket {
        let listener =
            bind_unix(path).map_err(CliError::io(format_args!("listening on {}", path.display())))?;
        uris.push(format!("nbd+unix:///{}?socket={}", uri_escape(&args.export), path.display()));
        let s = server.clone();
        listeners.spawn(async move { s.serve_unix(listener).await });
    }
    if uris.is_empty() {
        return Err(CliError::NothingToListenOn);
    }

    info!("serving {what} as export {:?}", args.export);
    let mut stdout = std::io::stdout().lock();
    for uri in &uris {
        let _ = writeln!(stdout, "{uri}");
    }
    let _ = stdout.flush();
    drop(stdout);

    stop.cancelled().await;
    info!("finishing in-flight requests");
    let flushed = match limit {
        Some(limit) => server.shutdown_within(limit).await,
        None => server.shutdown().await,
    };
    while listeners.join_next().await.is_some() {}
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    flushed.map_err(CliError::Flush)?;
    info!("stopped cleanly");
    Ok(())
}

/// What stays as it is in a URI path segment: RFC 3986's unreserved
/// characters (letters, digits, `-._~`); everything else is %XX.
const URI_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Percent-encodes an export name for the path of an NBD URI.
fn uri_escape(name: &str) -> String {
    utf8_percent_encode(name, URI_UNRESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_are_percent_encoded_in_uris() {
        assert_eq!(uri_escape(""), "");
        assert_eq!(uri_escape("disk-0.img_~x"), "disk-0.img_~x");
        assert_eq!(uri_escape("my disk/1?"), "my%20disk%2F1%3F");
        assert_eq!(uri_escape("é"), "%C3%A9");
    }
}
