//! The NBD server: accepts connections on TCP and unix sockets, negotiates,
//! then runs each connection's transmission phase.
//!
//! A connection is two halves that run at once:
//!
//! ```text
//!  socket ──► reader: frame ─► validate ─► (consume payload) ─► execute ──┐
//!                                          refused: error reply ──────────┤
//!                                                                          ▼
//!  socket ◄── writer: drain every finished reply, encode, one writev ◄── channel
//! ```
//!
//! The reader runs each request's backend call at once; when the backend
//! finishes without waiting (RAM), the reply is ready before the next
//! header is parsed, and no task is spawned. When it must wait (io_uring,
//! network), the call moves to its own task, so requests complete out of
//! order. The writer batches whatever replies are ready into a single
//! vectored write; read data goes out from the backend's own buffers.
//!
//! ## Bounds
//!
//! Every request holds permits for its bytes (its payload or read length,
//! plus [`REQUEST_OVERHEAD`]) from the moment its header is read until its
//! reply has been written:
//! - per connection, [`Limits::connection_bytes`] (default 64 MiB): when a
//!   client has that much in flight, we stop reading its socket;
//! - per server, [`Limits::server_bytes`] (default 512 MiB), shared by all
//!   connections;
//! - at most [`Limits::connections`] connections (default 256); more are
//!   closed at once.
//!
//! A request larger than a budget (a 64 MiB WRITE from a client that
//! entered with `NBD_OPT_EXPORT_NAME`, or any request under small limits)
//! is charged the whole budget instead of its size: it waits until nothing
//! else is in flight, then runs alone, rather than wait forever.
//!
//! Beyond the permits, a connection's read buffer holds at most
//! [`READ_BUFFER`] bytes that were received but not yet parsed.

use std::future::Future;
use std::io::IoSlice;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};

use super::errors::reply_for;
use super::handshake::{Export, MetaContext, negotiate};
use super::proto::*;
use crate::backend::{self, Backend, ReadData, ReadPiece, ZeroFlags};
use crate::sys::pool::BufferPool;

/// Bytes each request is charged on top of its payload, so that a flood of
/// zero-length requests is bounded too.
pub const REQUEST_OVERHEAD: u32 = 4096;
/// Receive buffer per connection.
pub const READ_BUFFER: usize = 256 * 1024;
/// A client has this long to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// After a shutdown request, connections get this long to drain.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Write payloads up to this size are copied out of the receive buffer.
const SMALL_PAYLOAD: usize = 64 * 1024;
/// The writer sends at most this many replies in one vectored write.
const MAX_BATCH: usize = 256;

static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// In-flight bounds; see the module docs.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub connection_bytes: u32,
    pub server_bytes: u32,
    pub connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { connection_bytes: 64 << 20, server_bytes: 512 << 20, connections: 256 }
    }
}

/// How the export is presented.
#[derive(Clone, Debug, Default)]
pub struct ServerConfig {
    pub export_name: String,
    pub description: Option<String>,
    /// Refuse writes even if the backend could take them.
    pub read_only: bool,
    pub limits: Limits,
}

/// An NBD server for one backend, shareable by any number of listeners.
pub struct Server<B> {
    inner: Arc<Inner<B>>,
}

impl<B> Clone for Server<B> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

struct Inner<B> {
    backend: Arc<B>,
    export: Export,
    limits: Limits,
    budget: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    stop: CancellationToken,
    tasks: TaskTracker,
    pool: Arc<BufferPool>,
}

impl<B: Backend> Server<B> {
    pub fn new(backend: Arc<B>, config: ServerConfig) -> Self {
        let f = backend.features();
        let read_only = config.read_only || f.read_only;
        let mut tflags = TFLAG_HAS_FLAGS;
        let mut set = |on: bool, flag: u16| {
            if on {
                tflags |= flag
            }
        };
        set(read_only, TFLAG_READ_ONLY);
        set(f.flush, TFLAG_SEND_FLUSH | TFLAG_SEND_FUA);
        set(f.trim && !read_only, TFLAG_SEND_TRIM);
        set(f.write_zeroes && !read_only, TFLAG_SEND_WRITE_ZEROES);
        set(f.fast_zero && f.write_zeroes && !read_only, TFLAG_SEND_FAST_ZERO);
        set(f.cache, TFLAG_SEND_CACHE);
        set(f.multi_conn, TFLAG_CAN_MULTI_CONN);
        let mut contexts = vec![MetaContext::BaseAllocation];
        if f.health {
            contexts.push(MetaContext::MeshdiskHealth);
        }
        let export = Export {
            name: config.export_name,
            description: config.description,
            size: backend.size(),
            tflags,
            contexts,
        };
        let limits = config.limits;
        Self {
            inner: Arc::new(Inner {
                backend,
                export,
                limits,
                budget: Arc::new(Semaphore::new(limits.server_bytes as usize)),
                connections: Arc::new(Semaphore::new(limits.connections)),
                stop: CancellationToken::new(),
                tasks: TaskTracker::new(),
                pool: BufferPool::new(),
            }),
        }
    }

    /// Accepts TCP connections until [`Server::shutdown`].
    pub async fn serve_tcp(&self, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let (rd, wr) = stream.into_split();
                    self.spawn_connection(rd, wr, addr.to_string());
                }
                Err(e) => {
                    warn!("accept on tcp listener: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Accepts unix-socket connections until [`Server::shutdown`].
    pub async fn serve_unix(&self, listener: UnixListener) {
        let mut n = 0u64;
        loop {
            let accepted = tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    n += 1;
                    let (rd, wr) = stream.into_split();
                    self.spawn_connection(rd, wr, format!("unix#{n}"));
                }
                Err(e) => {
                    warn!("accept on unix listener: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn spawn_connection<R, W>(&self, rd: R, wr: W, peer: String)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(slot) = self.inner.connections.clone().try_acquire_owned() else {
            warn!(%peer, "refusing connection: {} connections already open", self.inner.limits.connections);
            return;
        };
        let inner = self.inner.clone();
        self.inner.tasks.spawn(async move {
            inner.connection(rd, wr, &peer).await;
            drop(slot);
        });
    }

    /// Serves one already-connected stream to completion (tests, fuzzing).
    pub async fn serve_stream<R, W>(&self, rd: R, wr: W, peer: &str)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        self.inner.clone().connection(rd, wr, peer).await;
    }

    /// Stops accepting, lets every connection finish the requests it has
    /// read (up to [`DRAIN_TIMEOUT`]), then flushes the backend.
    pub async fn shutdown(&self) -> backend::Result<()> {
        self.drain(DRAIN_TIMEOUT).await;
        self.inner.backend.flush().await
    }

    /// As [`shutdown`](Self::shutdown), all of it within `limit`: the drain
    /// gets at most `limit` (and [`DRAIN_TIMEOUT`]), the flush what is left.
    /// For a backend whose flush waits on the network, which may be gone.
    pub async fn shutdown_within(&self, limit: Duration) -> backend::Result<()> {
        let start = tokio::time::Instant::now();
        self.drain(DRAIN_TIMEOUT.min(limit)).await;
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, self.inner.backend.flush()).await {
            Ok(flushed) => flushed,
            Err(_) => Err(backend::Error::failed(
                backend::ErrorKind::Unavailable,
                "flush",
                0,
                0,
                format!("did not finish within {} s of the shutdown", limit.as_secs()),
            )),
        }
    }

    /// Stops accepting and waits up to `limit` for the connections to
    /// finish the requests they have read.
    async fn drain(&self, limit: Duration) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        if tokio::time::timeout(limit, self.inner.tasks.wait()).await.is_err() {
            warn!("connections still busy after {limit:?}; flushing anyway");
        }
    }
}

/// A reply on its way to the writer, holding its request's permits.
struct Outgoing {
    reply: Reply,
    _permits: Permits,
}

/// Bytes a request holds from the connection's and the server's budgets.
type Permits = (OwnedSemaphorePermit, OwnedSemaphorePermit);

enum Reply {
    Ok {
        cookie: u64,
    },
    Error {
        cookie: u64,
        error: NbdError,
        message: String,
    },
    Read {
        cookie: u64,
        offset: u64,
        data: ReadData,
        df: bool,
    },
    /// One chunk per selected context: its id and descriptors.
    BlockStatus {
        cookie: u64,
        chunks: Vec<(u32, Vec<(u32, u32)>)>,
    },
}

fn command_name(c: &Command) -> &'static str {
    match c {
        Command::Read { .. } => "read",
        Command::Write { .. } => "write",
        Command::Disconnect => "disconnect",
        Command::Flush => "flush",
        Command::Trim { .. } => "trim",
        Command::Cache { .. } => "cache",
        Command::WriteZeroes { .. } => "write zeroes",
        Command::BlockStatus { .. } => "block status",
    }
}

/// Runs one validated command against the backend.
async fn execute<B: Backend>(
    backend: Arc<B>,
    cookie: u64,
    cmd: Command,
    payload: Bytes,
    peer: Arc<str>,
) -> Reply {
    let result = match cmd {
        Command::Read { offset, length, df } => match backend.read(offset, length).await {
            Ok(data) => {
                return Reply::Read { cookie, offset, data, df };
            }
            Err(e) => Err(e),
        },
        Command::Write { offset, fua, .. } => backend.write(offset, payload, fua).await,
        Command::Flush => backend.flush().await,
        Command::Trim { offset, length, fua } => backend.trim(offset, length, fua).await,
        Command::Cache { offset, length } => backend.cache(offset, length).await,
        Command::WriteZeroes { offset, length, fua, no_hole, fast } => {
            let flags = ZeroFlags { fua, may_trim: !no_hole, fast };
            backend.write_zeroes(offset, length, flags).await
        }
        Command::BlockStatus { offset, length, req_one, allocation, health } => {
            let mut chunks = Vec::with_capacity(2);
            let mut failed = None;
            if allocation {
                match backend.block_status(offset, length).await {
                    Ok(extents) => {
                        let runs = extents.iter().map(|e| {
                            (
                                e.length,
                                if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 },
                            )
                        });
                        chunks.push((BASE_ALLOCATION_ID, descriptors(runs, length, req_one)));
                    }
                    Err(e) => failed = Some(e),
                }
            }
            if health && failed.is_none() {
                match backend.health_status(offset, length).await {
                    Ok(extents) => {
                        let runs = extents.iter().map(|e| (e.length, e.flags()));
                        chunks.push((MESHDISK_HEALTH_ID, descriptors(runs, length, req_one)));
                    }
                    Err(e) => failed = Some(e),
                }
            }
            match failed {
                None => return Reply::BlockStatus { cookie, chunks },
                Some(e) => Err(e),
            }
        }
        Command::Disconnect => unreachable!("DISC is handled by the reader"),
    };
    match result {
        Ok(()) => Reply::Ok { cookie },
        Err(e) => {
            // The cause goes to the log first, then the reply.
            let (error, advice) = reply_for(e.kind());
            match e.kind() {
                // Clients that probe FAST_ZERO expect this refusal; it is not a fault.
                backend::ErrorKind::NotSupported => debug!(%peer, "{} refused: {e}", command_name(&cmd)),
                backend::ErrorKind::Corrupt => error!(%peer, "{} failed: {e}{advice}", command_name(&cmd)),
                _ => warn!(%peer, "{} failed: {e}{advice}", command_name(&cmd)),
            }
            Reply::Error { cookie, error, message: e.to_string() }
        }
    }
}

/// Turns one context's runs (length, status flags) into descriptors: at
/// least one, none longer than the request in total, one only with
/// REQ_ONE.
fn descriptors(runs: impl Iterator<Item = (u64, u32)>, length: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut out = Vec::with_capacity(runs.size_hint().0.max(1));
    let mut left = u64::from(length);
    for (run, flags) in runs {
        if left == 0 || (req_one && !out.is_empty()) {
            break;
        }
        let n = run.min(left);
        if n == 0 {
            continue;
        }
        out.push((n as u32, flags));
        left -= n;
    }
    if out.is_empty() {
        out.push((length, 0));
    }
    out
}

impl<B: Backend> Inner<B> {
    /// Waits until `bytes` fit in both the connection's and the server's
    /// budget; more than a whole budget is charged as that whole budget
    /// (a semaphore never grants more permits than it holds).
    async fn permits(&self, conn_budget: &Arc<Semaphore>, bytes: u32) -> Permits {
        let conn = bytes.min(self.limits.connection_bytes);
        let server = bytes.min(self.limits.server_bytes);
        (
            conn_budget.clone().acquire_many_owned(conn).await.expect("never closed"),
            self.budget.clone().acquire_many_owned(server).await.expect("never closed"),
        )
    }

    async fn connection<R, W>(self: Arc<Self>, mut rd: R, mut wr: W, peer: &str)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let negotiated = tokio::select! {
            _ = self.stop.cancelled() => return,
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate(&mut rd, &mut wr, &self.export)) => r,
        };
        let session = match negotiated {
            Ok(Ok(Some(s))) => s,
            Ok(Ok(None)) => return debug!(%peer, "client ended the handshake"),
            Ok(Err(e)) => return warn!(%peer, "handshake failed: {e}"),
            Err(_) => return warn!(%peer, "handshake timed out after {HANDSHAKE_TIMEOUT:?}"),
        };
        debug!(%peer, structured = session.structured, "transmission phase");

        let (tx, rx) = mpsc::unbounded_channel();
        // Cancelled when either half dies, so the other stops too.
        let conn_stop = self.stop.child_token();
        let writer = tokio::spawn(writer(wr, rx, session.structured, conn_stop.clone()));
        let peer: Arc<str> = peer.into();
        if let Err(why) = self.clone().reader(rd, &session, tx, &conn_stop, &peer).await {
            warn!(%peer, "closing connection: {why}");
        }
        // The writer ends once every in-flight request has replied.
        match writer.await {
            Ok(Err(e)) => debug!(%peer, "writing replies: {e}"),
            Err(e) => warn!(%peer, "reply writer panicked: {e}"),
            Ok(Ok(())) => debug!(%peer, "connection closed"),
        }
    }

    /// Reads requests until DISC, end of stream, shutdown, or a framing
    /// error (returned, so the caller can log why the connection closed).
    async fn reader<R>(
        self: Arc<Self>,
        mut rd: R,
        session: &Session,
        tx: mpsc::UnboundedSender<Outgoing>,
        stop: &CancellationToken,
        peer: &Arc<str>,
    ) -> Result<(), String>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let conn_budget = Arc::new(Semaphore::new(self.limits.connection_bytes as usize));
        let mut buf = BytesMut::with_capacity(READ_BUFFER);
        loop {
            while buf.len() < REQUEST_HEADER_LEN {
                if buf.capacity() - buf.len() < REQUEST_HEADER_LEN * 4 {
                    buf.reserve(READ_BUFFER);
                }
                let n = tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Ok(()),
                    n = rd.read_buf(&mut buf) => n.map_err(|e| format!("reading request: {e}"))?,
                };
                if n == 0 {
                    return if buf.is_empty() {
                        Ok(())
                    } else {
                        Err("stream ended inside a request header".into())
                    };
                }
            }
            let raw: &[u8; REQUEST_HEADER_LEN] = buf[..REQUEST_HEADER_LEN].try_into().unwrap();
            let header = RequestHeader::parse(raw).map_err(|e| e.to_string())?;
            buf.advance(REQUEST_HEADER_LEN);

            let cmd = match validate(&header, session) {
                Ok(Command::Disconnect) => return Ok(()),
                Ok(cmd) => cmd,
                Err(refusal) => {
                    debug!(%peer, cookie = header.cookie, kind = header.kind, "refused request: {}", refusal.reason);
                    // Error replies count against the budget too, so a client
                    // that floods bad requests and reads no replies is bounded.
                    let permits = self.permits(&conn_budget, REQUEST_OVERHEAD).await;
                    discard(&mut rd, &mut buf, header.payload_len()).await?;
                    let reply = Reply::Error {
                        cookie: header.cookie,
                        error: refusal.error,
                        message: refusal.reason.to_string(),
                    };
                    let _ = tx.send(Outgoing { reply, _permits: permits });
                    continue;
                }
            };

            let bytes = match cmd {
                Command::Read { length, .. } | Command::Write { length, .. } => length,
                _ => 0,
            } + REQUEST_OVERHEAD;
            let permits = self.permits(&conn_budget, bytes).await;
            let payload = match cmd {
                Command::Write { length, .. } => {
                    read_payload(&mut rd, &mut buf, length as usize, &self.pool).await?
                }
                _ => Bytes::new(),
            };

            let fut = execute(self.backend.clone(), header.cookie, cmd, payload, peer.clone());
            let mut fut = Box::pin(fut);
            // Run it here if the backend needs no waiting; otherwise it
            // continues on its own task. A future polled once with a no-op
            // waker registers the real waker on its next poll.
            match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(reply) => {
                    let _ = tx.send(Outgoing { reply, _permits: permits });
                }
                Poll::Pending => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let reply = fut.await;
                        let _ = tx.send(Outgoing { reply, _permits: permits });
                    });
                }
            }
        }
    }
}

/// The payload of a WRITE. Small payloads are copied out of the receive
/// buffer (so that buffer is never pinned by in-flight requests and is
/// reused as is); large ones are read from the socket straight into a
/// pooled buffer.
async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    len: usize,
    pool: &Arc<BufferPool>,
) -> Result<Bytes, String> {
    if len <= SMALL_PAYLOAD && buf.len() >= len {
        let payload = Bytes::copy_from_slice(&buf[..len]);
        buf.advance(len);
        return Ok(payload);
    }
    let mut payload = pool.take(len);
    let from_buf = len.min(buf.len());
    payload.extend_from_slice(&buf[..from_buf]);
    buf.advance(from_buf);
    while payload.len() < len {
        let want = (len - payload.len()) as u64;
        let n = (&mut *rd)
            .take(want)
            .read_buf(&mut payload)
            .await
            .map_err(|e| format!("reading write payload: {e}"))?;
        if n == 0 {
            return Err("stream ended inside a write payload".into());
        }
    }
    Ok(pool.freeze(payload))
}

/// Consumes the payload of a refused request so the stream stays in sync.
async fn discard<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut, len: u32) -> Result<(), String> {
    let from_buf = (len as usize).min(buf.len());
    buf.advance(from_buf);
    let rest = u64::from(len) - from_buf as u64;
    if rest > 0 {
        let copied = tokio::io::copy(&mut rd.take(rest), &mut tokio::io::sink())
            .await
            .map_err(|e| format!("skipping refused payload: {e}"))?;
        if copied < rest {
            return Err("stream ended inside a refused payload".into());
        }
    }
    Ok(())
}

/// Encodes replies for the socket, coalescing headers between data buffers.
struct Encoder {
    structured: bool,
    head: BytesMut,
    parts: Vec<Bytes>,
}

impl Encoder {
    fn cut(&mut self) {
        if !self.head.is_empty() {
            self.parts.push(self.head.split().freeze());
        }
    }

    fn data(&mut self, b: Bytes) {
        self.cut();
        self.parts.push(b);
    }

    fn zeroes(&mut self, mut n: usize) {
        self.cut();
        while n > 0 {
            let k = n.min(ZEROES.len());
            self.parts.push(Bytes::from_static(&ZEROES[..k]));
            n -= k;
        }
    }

    /// Read data as plain bytes, holes written out as zeroes.
    fn flat(&mut self, data: ReadData) {
        for piece in data.pieces {
            match piece {
                ReadPiece::Data(b) => self.data(b),
                ReadPiece::Zero(n) => self.zeroes(n as usize),
            }
        }
    }

    fn encode(&mut self, reply: Reply) {
        let h = &mut self.head;
        match reply {
            Reply::Ok { cookie } => put_simple_reply(h, cookie, 0),
            Reply::Error { cookie, error, message } => {
                if self.structured {
                    put_error_chunk(h, cookie, error.code(), &message)
                } else {
                    put_simple_reply(h, cookie, error.code())
                }
            }
            Reply::BlockStatus { cookie, chunks } => {
                let n = chunks.len();
                for (i, (context, extents)) in chunks.iter().enumerate() {
                    put_block_status_chunk(h, cookie, i + 1 == n, *context, extents);
                }
            }
            Reply::Read { cookie, data, .. } if !self.structured => {
                put_simple_reply(h, cookie, 0);
                self.flat(data);
            }
            Reply::Read { cookie, data, .. } if data.is_empty() => put_done_chunk(h, cookie),
            Reply::Read { cookie, offset, data, df: true } => {
                put_data_chunk_header(h, cookie, true, offset, data.len() as u32);
                self.flat(data);
            }
            Reply::Read { cookie, offset, data, df: false } => {
                // One OFFSET_DATA chunk per run of data, one OFFSET_HOLE per
                // run of zeroes; the last chunk carries DONE.
                let mut pos = offset;
                let mut pieces = data.pieces.into_iter().peekable();
                while let Some(piece) = pieces.next() {
                    match piece {
                        ReadPiece::Zero(n) => {
                            put_hole_chunk(&mut self.head, cookie, pieces.peek().is_none(), pos, n);
                            pos += u64::from(n);
                        }
                        ReadPiece::Data(first) => {
                            let mut run = vec![first];
                            while let Some(ReadPiece::Data(_)) = pieces.peek() {
                                let Some(ReadPiece::Data(b)) = pieces.next() else { unreachable!() };
                                run.push(b);
                            }
                            let n: usize = run.iter().map(Bytes::len).sum();
                            put_data_chunk_header(
                                &mut self.head,
                                cookie,
                                pieces.peek().is_none(),
                                pos,
                                n as u32,
                            );
                            for b in run {
                                self.data(b);
                            }
                            pos += n as u64;
                        }
                    }
                }
            }
        }
    }

    fn finish(&mut self) -> Vec<Bytes> {
        self.cut();
        std::mem::take(&mut self.parts)
    }
}

/// Writes replies until every sender is gone (all requests answered).
async fn writer<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    structured: bool,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let mut enc = Encoder { structured, head: BytesMut::with_capacity(16 * 1024), parts: Vec::new() };
    let mut batch: Vec<Outgoing> = Vec::with_capacity(MAX_BATCH);
    let result = async {
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            for out in batch.iter_mut() {
                let reply = std::mem::replace(&mut out.reply, Reply::Ok { cookie: 0 });
                enc.encode(reply);
            }
            let parts = enc.finish();
            write_all_vectored(&mut wr, &parts).await?;
            // Permits go back only once the bytes are on the socket.
            batch.clear();
        }
        wr.flush().await?;
        wr.shutdown().await
    }
    .await;
    if result.is_err() {
        stop.cancel();
    }
    result
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(wr: &mut W, parts: &[Bytes]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|b| IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = wr.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Binds a unix socket at `path`, replacing a stale socket file left by a
/// previous run (but never any other kind of file).
pub fn bind_unix(path: &PathBuf) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is in use by another server", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    UnixListener::bind(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client entering with NBD_OPT_EXPORT_NAME over an in-memory
    /// stream; returns its halves after the export's size and flags.
    async fn export_name_client(
        server: &Server<crate::backend::memory::MemoryBackend>,
    ) -> (tokio::io::ReadHalf<tokio::io::DuplexStream>, tokio::io::WriteHalf<tokio::io::DuplexStream>) {
        let (client, conn) = tokio::io::duplex(256 * 1024);
        let (srd, swr) = tokio::io::split(conn);
        let server = server.clone();
        tokio::spawn(async move { server.serve_stream(srd, swr, "test").await });
        let (mut rd, mut wr) = tokio::io::split(client);
        let mut greeting = [0u8; 18];
        rd.read_exact(&mut greeting).await.unwrap();
        let mut hello = Vec::new();
        hello.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        hello.extend_from_slice(&0u32.to_be_bytes());
        wr.write_all(&hello).await.unwrap();
        let mut export = [0u8; 10];
        rd.read_exact(&mut export).await.unwrap();
        (rd, wr)
    }

    async fn simple_reply<R: AsyncRead + Unpin>(rd: &mut R, cookie: u64) -> u32 {
        let mut b = [0u8; 16];
        rd.read_exact(&mut b).await.unwrap();
        assert_eq!(u32::from_be_bytes(b[..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
        assert_eq!(u64::from_be_bytes(b[8..].try_into().unwrap()), cookie);
        u32::from_be_bytes(b[4..8].try_into().unwrap())
    }

    #[tokio::test]
    async fn a_request_larger_than_every_budget_runs_alone_instead_of_waiting_forever() {
        use crate::backend::memory::MemoryBackend;
        // Budgets of 1 MiB: a 1 MiB write costs 1 MiB + REQUEST_OVERHEAD,
        // more than either holds, and a 2 MiB read twice that.
        let limits = Limits { connection_bytes: 1 << 20, server_bytes: 1 << 20, connections: 4 };
        let server =
            Server::new(Arc::new(MemoryBackend::new(4 << 20)), ServerConfig { limits, ..Default::default() });
        let (mut rd, mut wr) = export_name_client(&server).await;
        let data: Vec<u8> = (0..2 << 20).map(|i: u32| (i % 251) as u8).collect();
        let mut req = BytesMut::new();
        for (cookie, offset) in [(1u64, 0u64), (2, 1 << 20)] {
            RequestHeader { flags: 0, kind: CMD_WRITE, cookie, offset, length: 1 << 20 }.encode(&mut req);
            req.extend_from_slice(&data[offset as usize..][..1 << 20]);
        }
        RequestHeader { flags: 0, kind: CMD_READ, cookie: 3, offset: 0, length: 2 << 20 }.encode(&mut req);
        let sending = tokio::spawn(async move {
            wr.write_all(&req).await.unwrap();
            wr
        });
        let done = async {
            assert_eq!(simple_reply(&mut rd, 1).await, 0);
            assert_eq!(simple_reply(&mut rd, 2).await, 0);
            assert_eq!(simple_reply(&mut rd, 3).await, 0);
            let mut back = vec![0u8; 2 << 20];
            rd.read_exact(&mut back).await.unwrap();
            assert!(back == data, "read back what was written");
        };
        tokio::time::timeout(Duration::from_secs(20), done)
            .await
            .expect("the server hung on a large request");
        drop(sending.await.unwrap());
    }

    /// RAM with a made-up health map: the first 8 KiB degraded, the next
    /// 4 KiB only in a local log, the rest whole.
    struct Healthy(crate::backend::memory::MemoryBackend);

    impl Backend for Healthy {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn features(&self) -> backend::Features {
            backend::Features { health: true, ..self.0.features() }
        }
        async fn read(&self, offset: u64, length: u32) -> backend::Result<ReadData> {
            self.0.read(offset, length).await
        }
        async fn write(&self, offset: u64, data: Bytes, fua: bool) -> backend::Result<()> {
            self.0.write(offset, data, fua).await
        }
        async fn flush(&self) -> backend::Result<()> {
            self.0.flush().await
        }
        async fn trim(&self, offset: u64, length: u32, fua: bool) -> backend::Result<()> {
            self.0.trim(offset, length, fua).await
        }
        async fn write_zeroes(&self, offset: u64, length: u32, flags: ZeroFlags) -> backend::Result<()> {
            self.0.write_zeroes(offset, length, flags).await
        }
        async fn block_status(&self, offset: u64, length: u32) -> backend::Result<Vec<backend::Extent>> {
            self.0.block_status(offset, length).await
        }
        async fn cache(&self, offset: u64, length: u32) -> backend::Result<()> {
            self.0.cache(offset, length).await
        }
        async fn health_status(
            &self,
            offset: u64,
            length: u32,
        ) -> backend::Result<Vec<backend::HealthExtent>> {
            use backend::Redundancy::*;
            let mut out = Vec::new();
            let (mut at, end) = (offset, offset + u64::from(length));
            for (upto, r, local) in [(8192, Degraded, false), (12288, Whole, true), (u64::MAX, Whole, false)]
            {
                if at < end && at < upto {
                    let n = upto.min(end) - at;
                    backend::push_health(&mut out, n, r, local);
                    at += n;
                }
            }
            Ok(out)
        }
    }

    /// Sends one option; returns its replies up to the final one, as
    /// (reply type, data).
    async fn haggle<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        rd: &mut R,
        wr: &mut W,
        option: u32,
        data: &[u8],
    ) -> Vec<(u32, Vec<u8>)> {
        let mut b = BytesMut::new();
        bytes::BufMut::put_u64(&mut b, IHAVEOPT);
        bytes::BufMut::put_u32(&mut b, option);
        bytes::BufMut::put_u32(&mut b, data.len() as u32);
        b.extend_from_slice(data);
        wr.write_all(&b).await.unwrap();
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; 20];
            rd.read_exact(&mut h).await.unwrap();
            assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), OPT_REPLY_MAGIC);
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            rd.read_exact(&mut d).await.unwrap();
            out.push((kind, d));
            if kind != REP_META_CONTEXT && kind != REP_INFO && kind != REP_SERVER {
                return out;
            }
        }
    }

    fn meta_request(queries: &[&str]) -> Vec<u8> {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// (id, name) of each context a LIST or SET replied with.
    fn contexts(replies: &[(u32, Vec<u8>)]) -> Vec<(u32, String)> {
        replies
            .iter()
            .filter(|(k, _)| *k == REP_META_CONTEXT)
            .map(|(_, d)| {
                (u32::from_be_bytes(d[..4].try_into().unwrap()), String::from_utf8(d[4..].to_vec()).unwrap())
            })
            .collect()
    }

    #[tokio::test]
    async fn both_contexts_are_listed_selected_and_answered_one_chunk_each() {
        let server = Server::new(
            Arc::new(Healthy(crate::backend::memory::MemoryBackend::new(1 << 20))),
            ServerConfig::default(),
        );
        let (client, conn) = tokio::io::duplex(256 * 1024);
        let (srd, swr) = tokio::io::split(conn);
        tokio::spawn(async move { server.serve_stream(srd, swr, "test").await });
        let (mut rd, mut wr) = tokio::io::split(client);
        let mut greeting = [0u8; 18];
        rd.read_exact(&mut greeting).await.unwrap();
        wr.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).await.unwrap();
        assert_eq!(haggle(&mut rd, &mut wr, OPT_STRUCTURED_REPLY, &[]).await, vec![(REP_ACK, vec![])]);

        let listed = haggle(&mut rd, &mut wr, OPT_LIST_META_CONTEXT, &meta_request(&[])).await;
        let names = vec![(0, BASE_ALLOCATION.to_string()), (0, MESHDISK_HEALTH.to_string())];
        assert_eq!(contexts(&listed), names);
        let listed = haggle(&mut rd, &mut wr, OPT_LIST_META_CONTEXT, &meta_request(&["meshdisk:"])).await;
        assert_eq!(contexts(&listed), vec![(0, MESHDISK_HEALTH.to_string())]);
        let set = haggle(
            &mut rd,
            &mut wr,
            OPT_SET_META_CONTEXT,
            &meta_request(&[MESHDISK_HEALTH, BASE_ALLOCATION]),
        )
        .await;
        let ids = vec![
            (BASE_ALLOCATION_ID, BASE_ALLOCATION.to_string()),
            (MESHDISK_HEALTH_ID, MESHDISK_HEALTH.to_string()),
        ];
        assert_eq!(contexts(&set), ids);
        assert_eq!(set.last().unwrap().0, REP_ACK);
        let go = haggle(&mut rd, &mut wr, OPT_GO, &[0, 0, 0, 0, 0, 0]).await;
        assert_eq!(go.last().unwrap().0, REP_ACK);

        // Block status of 0..16 KiB, then the same with REQ_ONE.
        let mut req = BytesMut::new();
        RequestHeader { flags: 0, kind: CMD_BLOCK_STATUS, cookie: 1, offset: 0, length: 16384 }
            .encode(&mut req);
        RequestHeader {
            flags: CMD_FLAG_REQ_ONE,
            kind: CMD_BLOCK_STATUS,
            cookie: 2,
            offset: 0,
            length: 16384,
        }
        .encode(&mut req);
        wr.write_all(&req).await.unwrap();
        // (cookie, chunk flags, context id, descriptors)
        type Chunk = (u64, u16, u32, Vec<(u32, u32)>);
        let mut chunks: Vec<Chunk> = Vec::new();
        while chunks.len() < 4 {
            let mut h = [0u8; 20];
            rd.read_exact(&mut h).await.unwrap();
            assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), STRUCTURED_REPLY_MAGIC);
            assert_eq!(u16::from_be_bytes([h[6], h[7]]), REPLY_TYPE_BLOCK_STATUS);
            let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            rd.read_exact(&mut d).await.unwrap();
            let id = u32::from_be_bytes(d[..4].try_into().unwrap());
            let extents = d[4..]
                .chunks(8)
                .map(|e| {
                    (
                        u32::from_be_bytes(e[..4].try_into().unwrap()),
                        u32::from_be_bytes(e[4..].try_into().unwrap()),
                    )
                })
                .collect();
            chunks.push((
                u64::from_be_bytes(h[8..16].try_into().unwrap()),
                u16::from_be_bytes([h[4], h[5]]),
                id,
                extents,
            ));
        }
        let of = |cookie| {
            chunks.iter().filter(|c| c.0 == cookie).map(|c| (c.1, c.2, c.3.clone())).collect::<Vec<_>>()
        };
        assert_eq!(
            of(1),
            vec![
                (0, BASE_ALLOCATION_ID, vec![(16384, STATE_HOLE | STATE_ZERO)]),
                (REPLY_FLAG_DONE, MESHDISK_HEALTH_ID, vec![(8192, 1), (4096, 8), (4096, 0)]),
            ]
        );
        assert_eq!(
            of(2),
            vec![
                (0, BASE_ALLOCATION_ID, vec![(16384, STATE_HOLE | STATE_ZERO)]),
                (REPLY_FLAG_DONE, MESHDISK_HEALTH_ID, vec![(8192, 1)]),
            ]
        );
    }

    #[test]
    fn descriptors_respect_request() {
        let d = |runs: &[(u64, u32)], length, req_one| descriptors(runs.iter().copied(), length, req_one);
        assert_eq!(d(&[(10, 3), (10, 0)], 15, false), vec![(10, 3), (5, 0)]);
        assert_eq!(d(&[(10, 3), (10, 0)], 15, true), vec![(10, 3)]);
        assert_eq!(d(&[], 15, false), vec![(15, 0)]);
        assert_eq!(d(&[(1 << 40, 0)], 7, false), vec![(7, 0)]);
        assert_eq!(d(&[(0, 1), (4, 9), (8, 1)], 100, false), vec![(4, 9), (8, 1)]);
    }

    #[test]
    fn structured_read_encoding_marks_last_chunk_done() {
        let mut enc = Encoder { structured: true, head: BytesMut::new(), parts: Vec::new() };
        let data = ReadData {
            pieces: vec![
                ReadPiece::Data(Bytes::from_static(b"abcd")),
                ReadPiece::Zero(4096),
                ReadPiece::Data(Bytes::from_static(b"ef")),
            ],
        };
        enc.encode(Reply::Read { cookie: 9, offset: 100, data, df: false });
        let wire: Vec<u8> = enc.finish().concat();
        // data chunk (20+8+4), hole chunk (20+12), data chunk (20+8+2)
        assert_eq!(wire.len(), 32 + 32 + 30);
        let flags = |at: usize| u16::from_be_bytes([wire[at + 4], wire[at + 5]]);
        assert_eq!(flags(0), 0);
        assert_eq!(flags(32), 0);
        assert_eq!(flags(64), REPLY_FLAG_DONE);
        assert_eq!(u64::from_be_bytes(wire[84..92].try_into().unwrap()), 100 + 4 + 4096);
    }

    #[test]
    fn df_read_is_one_chunk_with_zeroes() {
        let mut enc = Encoder { structured: true, head: BytesMut::new(), parts: Vec::new() };
        let data =
            ReadData { pieces: vec![ReadPiece::Zero(100_000), ReadPiece::Data(Bytes::from_static(b"x"))] };
        enc.encode(Reply::Read { cookie: 1, offset: 0, data, df: true });
        let wire: Vec<u8> = enc.finish().concat();
        assert_eq!(wire.len(), 28 + 100_001);
        assert_eq!(u32::from_be_bytes(wire[16..20].try_into().unwrap()), 100_009);
        assert!(wire[28..28 + 100_000].iter().all(|&b| b == 0));
        assert_eq!(wire[28 + 100_000], b'x');
    }
}
