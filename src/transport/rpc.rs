//! Request and response over QUIC: one bidirectional stream per call.
//!
//! ```text
//! caller ── frame(Head { msg: request,  payload: n }) ── n raw bytes ── FIN ─►
//!        ◄─ frame(Head { msg: response, payload: m }) ── m raw bytes ── FIN ──
//! ```
//!
//! Frames are [`wire`] frames (size-limited before allocating). Payloads
//! (shards) travel outside postcard: the caller hands over `Bytes` that go
//! to quinn without a copy, the receiver reads them into one buffer of the
//! announced length, which is checked against [`MAX_PAYLOAD`] and paid for
//! from the server's byte budget first. A server that runs out of budget
//! stops reading the stream, and QUIC flow control pushes back on the
//! sender: that is the backpressure.
//!
//! Endpoints are tuned as measured on loopback (docs/performance.md):
//! 16 MiB socket buffers (no drops under load), path MTU discovery up to
//! 6,000 bytes with the endpoint's UDP payload limit raised to match, and
//! payloads written as `Bytes` chunks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, Endpoint, EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::tls::{explain, remote_name};
use super::wire::{self, MAX_MESSAGE, WireError};
use crate::membership::ca::CertName;

/// Largest payload a call may carry: a 16 MiB shard and its header.
pub const MAX_PAYLOAD: usize = (16 << 20) + 4096;

/// Largest response frame a caller reads (a cluster's status grows with its
/// peers); requests stay within [`MAX_MESSAGE`].
const MAX_RESPONSE: usize = 4 << 20;

/// Largest request frame from a caller without a certificate (a join: a
/// token and a CSR), which may also send no payload.
const ANONYMOUS_MESSAGE: usize = 8 << 10;

/// Most connections a server keeps at once.
const MAX_CONNECTIONS: usize = 4096;

/// How long writing a response may take before the call is dropped.
const RESPONSE_DEADLINE: Duration = Duration::from_secs(60);

/// Bytes of request payloads a server holds at once, over all streams.
const SERVER_BUDGET: usize = 512 << 20;

/// Concurrent calls per connection (QUIC stream credit).
const STREAMS_PER_CONNECTION: u32 = 256;

/// The largest UDP payload we send once the path allows it. Measured on
/// loopback (docs/performance.md): 3,000 and 9,000 to 65,000 bytes were
/// all slower.
const MAX_UDP_PAYLOAD: u16 = 6000;

/// Socket buffers; without them loopback drops thousands of packets per GiB.
const SOCKET_BUFFER: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("cannot reach {name} at {addr}: {message}")]
    Connect { addr: SocketAddr, name: String, message: String },
    #[error("connection to {name} lost: {message}")]
    Lost { name: String, message: String },
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("payload of {len} bytes is over the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("the other side closed the call without answering")]
    NoAnswer,
    #[error("socket: {0}")]
    Socket(#[from] std::io::Error),
}

#[derive(Serialize, Deserialize)]
struct Head<M> {
    msg: M,
    payload: u32,
}

/// The QUIC settings every meshdisk connection uses.
pub fn transport_config() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(STREAMS_PER_CONNECTION))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(10_000))));
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD).interval(Duration::from_secs(60));
    t.mtu_discovery_config(Some(mtu));

    Arc::new(t)
}

fn set_buffer(fd: i32, force: i32, normal: i32, size: usize) {
    let size = size as libc::c_int;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let ptr = (&size as *const libc::c_int).cast();
    // SAFETY: `fd` is an open socket, `ptr` points at a c_int of `len` bytes.
    let forced = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, force, ptr, len) } == 0;
    if !forced {
        // Without CAP_NET_ADMIN the kernel caps this at net.core.*mem_max.
        // SAFETY: as above.
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, normal, ptr, len) };
    }
}

/// Stateless-reset tokens keyed by a secret that survives restarts: a
/// node that comes back on the same address resets its callers' old
/// connections at their first packet (they reconnect at once) instead of
/// leaving them to time out.
struct ResetKey([u8; 32]);

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], out: &mut [u8]) {
        out.copy_from_slice(blake3::keyed_hash(&self.0, data).as_bytes());
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let expected = blake3::keyed_hash(&self.0, data);
        // blake3::Hash compares in constant time.
        match <[u8; 32]>::try_from(signature) {
            Ok(s) if expected == blake3::Hash::from_bytes(s) => Ok(()),
            _ => Err(quinn::crypto::CryptoError),
        }
    }
}

/// A QUIC endpoint bound to `bind`, serving `server` if given, dialling
/// with `client`.
pub fn endpoint(
    bind: SocketAddr,
    server: Option<quinn::ServerConfig>,
    client: quinn::ClientConfig,
) -> Result<Endpoint, RpcError> {
    endpoint_with(bind, server, client, None)
}

/// Like [`endpoint`] for a long-lived server (directory, peer): its
/// stateless resets are keyed by `secret` (derived from its private key),
/// so they stay valid across restarts.
pub fn server_endpoint(
    bind: SocketAddr,
    server: quinn::ServerConfig,
    client: quinn::ClientConfig,
    secret: &[u8],
) -> Result<Endpoint, RpcError> {
    let key = blake3::derive_key("meshdisk 2026 quic stateless reset", secret);
    endpoint_with(bind, Some(server), client, Some(key))
}

fn endpoint_with(
    bind: SocketAddr,
    server: Option<quinn::ServerConfig>,
    client: quinn::ClientConfig,
    reset_key: Option<[u8; 32]>,
) -> Result<Endpoint, RpcError> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind(bind)?;
    let fd = socket.as_raw_fd();
    set_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, SOCKET_BUFFER);
    set_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, SOCKET_BUFFER);
    let mut config = EndpointConfig::default();
    if let Some(k) = reset_key {
        config.reset_key(Arc::new(ResetKey(k)));
        // Connection IDs carry a check keyed the same way: without it a
        // restarted node drops its callers' packets as foreign instead of
        // answering them with a reset.
        let cid_key = u64::from_le_bytes(
            blake3::keyed_hash(&k, b"connection ids").as_bytes()[..8].try_into().expect("8 bytes"),
        );
        config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    }
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| std::io::Error::other(format!("QUIC endpoint: {e}")))?;
    let server = server.map(|mut s| {
        s.transport_config(transport_config());
        s
    });
    let mut ep = Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))?;
    let mut client = client;
    client.transport_config(transport_config());
    ep.set_default_client_config(client);
    Ok(ep)
}

/// One connection, made once by whoever asks first.
type Slot = Arc<tokio::sync::OnceCell<Connection>>;

/// Connections to other nodes, one per (address, name), made on first use
/// and remade when lost.
pub struct Pool {
    endpoint: Endpoint,
    conns: tokio::sync::Mutex<HashMap<(SocketAddr, String), Slot>>,
    connect_timeout: Duration,
    /// Nodes whose last connect failed, when and why: asked again only
    /// [`RETRY_AFTER`] later, so a dead node costs its callers one connect
    /// timeout, not one each.
    failed: std::sync::Mutex<HashMap<(SocketAddr, String), (std::time::Instant, String)>>,
    /// UDP bytes of the connections no longer in `conns` (closed and
    /// forgotten), so [`Pool::network`] counts every connection this pool
    /// ever made. Changed only under the `conns` lock.
    retired: std::sync::Mutex<Network>,
}

/// UDP bytes a pool's QUIC connections sent and received: every byte on
/// the wire except the IP and UDP headers (QUIC headers, handshakes,
/// ACKs, keep-alives, retransmissions, the calls' framing and payloads).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub sent: u64,
    pub received: u64,
}

impl Network {
    fn of(c: &Connection) -> Self {
        let s = c.stats();
        Self { sent: s.udp_tx.bytes, received: s.udp_rx.bytes }
    }

    fn add(&mut self, o: Network) {
        self.sent += o.sent;
        self.received += o.received;
    }

    /// Both ways.
    pub fn total(&self) -> u64 {
        self.sent + self.received
    }
}

/// How long a node whose connect failed is taken as unreachable.
const RETRY_AFTER: Duration = Duration::from_secs(2);

impl Pool {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            conns: Default::default(),
            connect_timeout: Duration::from_secs(5),
            failed: Default::default(),
            retired: Default::default(),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The connection to `name` at `addr`, connecting if there is none.
    pub async fn connect(&self, addr: SocketAddr, name: &str) -> Result<Connection, RpcError> {
        let key = (addr, name.to_owned());
        if let Some((at, message)) = self.failed.lock().expect("failed").get(&key) {
            let ago = at.elapsed();
            if ago < RETRY_AFTER {
                return Err(RpcError::Connect {
                    addr,
                    name: name.to_owned(),
                    message: format!("{message} (the last try, {} ms ago)", ago.as_millis()),
                });
            }
        }
        loop {
            let cell = self.conns.lock().await.entry(key.clone()).or_default().clone();
            let conn = cell
                .get_or_try_init(|| async {
                    let connecting = self.endpoint.connect(addr, name).map_err(|e| RpcError::Connect {
                        addr,
                        name: name.to_owned(),
                        message: e.to_string(),
                    })?;
                    match tokio::time::timeout(self.connect_timeout, connecting).await {
                        Ok(Ok(c)) => {
                            // Reachable again: callers need not wait out the memory.
                            self.failed.lock().expect("failed").remove(&key);
                            Ok(c)
                        }
                        Ok(Err(e)) => {
                            Err(RpcError::Connect { addr, name: name.to_owned(), message: explain(&e) })
                        }
                        Err(_) => Err(RpcError::Connect {
                            addr,
                            name: name.to_owned(),
                            message: format!(
                                "no answer within {:?}: is it running, and is its UDP port reachable?",
                                self.connect_timeout
                            ),
                        }),
                    }
                })
                .await;
            let conn = match conn {
                Ok(c) => c.clone(),
                Err(e) => {
                    self.forget(&key, &cell).await;
                    if let RpcError::Connect { message, .. } = &e {
                        let mut failed = self.failed.lock().expect("failed");
                        if failed.len() >= 4096 {
                            failed.clear();
                        }
                        failed.insert(key, (std::time::Instant::now(), message.clone()));
                    }
                    return Err(e);
                }
            };
            if conn.close_reason().is_none() {
                return Ok(conn);
            }
            self.forget(&key, &cell).await;
        }
    }

    async fn forget(&self, key: &(SocketAddr, String), cell: &Slot) {
        let mut conns = self.conns.lock().await;
        if conns.get(key).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            conns.remove(key);
            // A forgotten connection is closed: its counts are final.
            if let Some(c) = cell.get() {
                self.retired.lock().expect("retired").add(Network::of(c));
            }
        }
    }

    /// The UDP bytes of every connection this pool made, open or closed
    /// since (a connect that never completed is not counted).
    pub async fn network(&self) -> Network {
        let conns = self.conns.lock().await;
        let mut total = *self.retired.lock().expect("retired");
        for c in conns.values().filter_map(|cell| cell.get()) {
            total.add(Network::of(c));
        }
        total
    }

    /// One call to `name` at `addr`, within `timeout` (connecting included).
    /// The payload is the concatenation of `payload`'s pieces.
    pub async fn call<Q: Serialize, R: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        name: &str,
        req: &Q,
        payload: Vec<Bytes>,
        timeout: Duration,
    ) -> Result<(R, Bytes), RpcError> {
        tokio::time::timeout(timeout, async {
            let conn = self.connect(addr, name).await?;
            match call(&conn, name, req, payload.clone()).await {
                // The other side restarted and its new endpoint reset our
                // old connection: the request reached no application, so
                // it is sent once more on a fresh connection.
                Err(RpcError::Lost { .. })
                    if matches!(conn.close_reason(), Some(quinn::ConnectionError::Reset)) =>
                {
                    let conn = self.connect(addr, name).await?;
                    call(&conn, name, req, payload).await
                }
                other => other,
            }
        })
        .await
        .map_err(|_| RpcError::Timeout(timeout))?
    }

    /// Path statistics of every open connection: (name, MTU, lost packets,
    /// sent packets).
    pub async fn path_stats(&self) -> Vec<(String, u16, u64, u64)> {
        let conns = self.conns.lock().await;
        conns
            .iter()
            .filter_map(|((_, name), cell)| {
                let c = cell.get()?;
                let p = c.stats().path;
                Some((name.clone(), p.current_mtu, p.lost_packets, p.sent_packets))
            })
            .collect()
    }

    /// The smoothed round-trip time to a node we are connected to.
    pub async fn rtt(&self, addr: SocketAddr, name: &str) -> Option<Duration> {
        let cell = self.conns.lock().await.get(&(addr, name.to_owned())).cloned()?;
        cell.get().filter(|c| c.close_reason().is_none()).map(Connection::rtt)
    }
}

/// One call on an open connection; the payload is the concatenation of
/// `payload`'s pieces, each handed to quinn without a copy.
pub async fn call<Q: Serialize, R: DeserializeOwned>(
    conn: &Connection,
    name: &str,
    req: &Q,
    payload: Vec<Bytes>,
) -> Result<(R, Bytes), RpcError> {
    let result = call_inner(conn, name, req, payload).await;
    if result.is_ok() {
        return result;
    }
    // When the connection itself ended, its reason (a refused certificate,
    // a malformed message, a restart) says more than the stream's error;
    // it may arrive a moment after the stream's end.
    let reason = match conn.close_reason() {
        Some(r) => Some(r),
        None => tokio::time::timeout(Duration::from_millis(250), conn.closed()).await.ok(),
    };
    match reason {
        Some(reason) => Err(RpcError::Lost { name: name.to_owned(), message: explain(&reason) }),
        None => result,
    }
}

async fn call_inner<Q: Serialize, R: DeserializeOwned>(
    conn: &Connection,
    name: &str,
    req: &Q,
    payload: Vec<Bytes>,
) -> Result<(R, Bytes), RpcError> {
    let lost = |e: &dyn std::fmt::Display| RpcError::Lost { name: name.to_owned(), message: e.to_string() };
    let len: usize = payload.iter().map(Bytes::len).sum();
    if len > MAX_PAYLOAD {
        return Err(RpcError::TooLarge { len, limit: MAX_PAYLOAD });
    }
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&explain(&e)))?;
    let head = wire::encode(&Head { msg: req, payload: len as u32 })?;
    let mut chunks = Vec::with_capacity(1 + payload.len());
    chunks.push(Bytes::from(head));
    chunks.extend(payload);
    send.write_all_chunks(&mut chunks).await.map_err(|e| lost(&e))?;
    send.finish().map_err(|e| lost(&e))?;
    let head: Head<R> = wire::read(&mut recv, MAX_RESPONSE).await?.ok_or(RpcError::NoAnswer)?;
    let payload = read_payload(&mut recv, head.payload as usize).await.map_err(|e| lost(&e))?;
    Ok((head.msg, payload))
}

async fn read_payload(recv: &mut quinn::RecvStream, len: usize) -> Result<Bytes, String> {
    if len > MAX_PAYLOAD {
        return Err(format!("payload of {len} bytes is over the limit of {MAX_PAYLOAD}"));
    }
    if len == 0 {
        return Ok(Bytes::new());
    }
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        match recv.read_chunk(len - buf.len(), true).await.map_err(|e| e.to_string())? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None => return Err(format!("stream ended after {} of {len} payload bytes", buf.len())),
        }
    }
    Ok(Bytes::from(buf))
}

/// Who made a call: the certificate's name, if the client presented one
/// (only the directory lets clients in without).
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: Option<CertName>,
    pub addr: SocketAddr,
    pub rtt: Duration,
}

/// What a server does with calls.
pub trait Handler: Send + Sync + 'static {
    type Request: DeserializeOwned + Send;
    type Response: Serialize + Send;

    /// Answers one call.
    fn handle(
        &self,
        caller: Caller,
        req: Self::Request,
        payload: Bytes,
    ) -> impl Future<Output = (Self::Response, Bytes)> + Send;
}

/// How long one call may take to arrive, from its first byte to its last.
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// Serves calls on `endpoint` until `stop` is cancelled.
pub async fn serve<H: Handler>(endpoint: Endpoint, handler: Arc<H>, stop: CancellationToken) {
    let budget = Arc::new(Semaphore::new(SERVER_BUDGET));
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            () = stop.cancelled() => break,
        };
        if endpoint.open_connections() > MAX_CONNECTIONS {
            incoming.refuse();
            continue;
        }
        let (handler, budget, stop) = (handler.clone(), budget.clone(), stop.clone());
        tasks.spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!("refused a connection: {}", explain(&e));
                    return;
                }
            };
            connection(conn, handler, budget, stop).await;
        });
    }
    tasks.close();
    endpoint.close(VarInt::from_u32(0), b"shutting down");
}

async fn connection<H: Handler>(
    conn: Connection,
    handler: Arc<H>,
    budget: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let name = remote_name(&conn);
    let addr = conn.remote_address();
    tracing::debug!("connection from {addr} ({name:?})");
    loop {
        let (send, recv) = tokio::select! {
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("connection from {addr} ended: {e}");
                    return;
                }
            },
            () = stop.cancelled() => return,
        };
        let caller = Caller { name: name.clone(), addr, rtt: conn.rtt() };
        let (handler, budget, conn) = (handler.clone(), budget.clone(), conn.clone());
        tokio::spawn(async move {
            if let Err(e) = stream(handler, caller.clone(), send, recv, budget).await {
                // A malformed call ends its connection, and only that.
                tracing::info!("closing the connection from {} ({:?}): {e}", caller.addr, caller.name);
                let reason = e.as_bytes();
                conn.close(VarInt::from_u32(2), &reason[..reason.len().min(200)]);
            }
        });
    }
}

async fn stream<H: Handler>(
    handler: Arc<H>,
    caller: Caller,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    budget: Arc<Semaphore>,
) -> Result<(), String> {
    let anonymous = caller.name.is_none();
    let from = caller.addr;
    let limit = if anonymous { ANONYMOUS_MESSAGE } else { MAX_MESSAGE };
    let arrived = tokio::time::timeout(REQUEST_DEADLINE, async {
        let head: Head<H::Request> = match wire::read(&mut recv, limit).await {
            Ok(Some(h)) => h,
            Ok(None) => return Err(None),
            Err(e) => return Err(Some(e.to_string())),
        };
        let len = head.payload as usize;
        if anonymous && len > 0 {
            return Err(Some("a caller without a certificate may send no payload".to_string()));
        }
        if len > MAX_PAYLOAD {
            return Err(Some(format!("payload of {len} bytes is over the limit of {MAX_PAYLOAD}")));
        }
        let permit = budget.acquire_many_owned(len as u32).await.map_err(|e| Some(e.to_string()))?;
        let payload = read_payload(&mut recv, len).await.map_err(Some)?;
        Ok((head.msg, payload, permit))
    })
    .await;
    let (resp, out) = match arrived {
        Ok(Ok((req, payload, permit))) => {
            let answer = handler.handle(caller, req, payload).await;
            drop(permit);
            answer
        }
        Ok(Err(None)) => return Ok(()),
        Ok(Err(Some(why))) => {
            // Reset, not finish: the caller must not take the end of the
            // stream for an empty answer before the connection closes.
            let _ = send.reset(VarInt::from_u32(2));
            return Err(format!("malformed call: {why}"));
        }
        Err(_) => {
            let _ = send.reset(VarInt::from_u32(2));
            return Err(format!("call not received within {REQUEST_DEADLINE:?}"));
        }
    };
    let head = wire::encode(&Head { msg: resp, payload: out.len() as u32 }).map_err(|e| e.to_string())?;
    let mut chunks = [Bytes::from(head), out];
    // A caller that does not read its answers must not pin them forever.
    match tokio::time::timeout(RESPONSE_DEADLINE, send.write_all_chunks(&mut chunks)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!("answering {from}: {e}");
            return Ok(());
        }
        Err(_) => {
            let _ = send.reset(VarInt::from_u32(3));
            tracing::info!("{from} did not read its answer within {RESPONSE_DEADLINE:?}");
            return Ok(());
        }
    }
    let _ = send.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::ca::Identity;
    use crate::membership::ca::{ClusterCa, Role, new_key_and_csr, node_name};
    use crate::transport::tls::{ClientAuth, client_config, server_config};

    fn member(ca: &ClusterCa, node: &str, role: Role) -> Identity {
        let (key, csr) = new_key_and_csr().unwrap();
        Identity {
            cert_pem: format!("{}{}", ca.issue(&csr, node, role).unwrap(), ca.cert_pem()),
            key_pem: key.serialize_pem(),
            ca_pem: ca.cert_pem().into(),
        }
    }

    /// An [`Echo`] server, peer-1 of cluster "home", and a pool calling it
    /// as the client "laptop".
    struct EchoPeer {
        _dir: tempfile::TempDir,
        client_id: Identity,
        addr: SocketAddr,
        name: String,
        pool: Pool,
        stop: CancellationToken,
    }

    fn echo_peer() -> EchoPeer {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create(dir.path(), "home").unwrap();
        let server_id = member(&ca, "peer-1", Role::Peer);
        let client_id = member(&ca, "laptop", Role::Client);
        let ep = endpoint(
            "127.0.0.1:0".parse().unwrap(),
            Some(server_config(&server_id, ClientAuth::Required).unwrap()),
            client_config(&server_id).unwrap(),
        )
        .unwrap();
        let addr = ep.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(ep, Arc::new(Echo), stop.clone()));
        let name = node_name("peer-1", Role::Peer, "home");
        let pool = Pool::new(
            endpoint("127.0.0.1:0".parse().unwrap(), None, client_config(&client_id).unwrap()).unwrap(),
        );
        EchoPeer { _dir: dir, client_id, addr, name, pool, stop }
    }

    /// Answers with the caller's node name and the payload reversed.
    struct Echo;

    impl Handler for Echo {
        type Request = String;
        type Response = String;

        async fn handle(&self, caller: Caller, req: String, payload: Bytes) -> (String, Bytes) {
            let who = caller.name.map_or("nobody".into(), |n| n.node);
            let mut back = payload.to_vec();
            back.reverse();
            (format!("{req} from {who}"), Bytes::from(back))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_carry_payloads_and_a_malformed_call_closes_only_its_connection() {
        let EchoPeer { _dir, client_id, addr, name, pool, stop } = echo_peer();

        // A payload in pieces arrives whole; the answer's payload too.
        let payload =
            vec![Bytes::from_static(b"abc"), Bytes::from(vec![7u8; 1 << 20]), Bytes::from_static(b"xyz")];
        let (resp, back): (String, Bytes) =
            pool.call(addr, &name, &"hello".to_string(), payload, Duration::from_secs(10)).await.unwrap();
        assert_eq!(resp, "hello from laptop");
        assert_eq!(back.len(), 3 + (1 << 20) + 3);
        assert_eq!(&back[..3], b"zyx");

        // Too large is refused before anything is sent.
        let big = vec![Bytes::from(vec![0u8; MAX_PAYLOAD + 1])];
        let err = pool
            .call::<_, String>(addr, &name, &"x".to_string(), big, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(matches!(err, RpcError::TooLarge { .. }), "{err}");

        // A second connection sends garbage: it is closed, with the reason.
        let other =
            endpoint("127.0.0.1:0".parse().unwrap(), None, client_config(&client_id).unwrap()).unwrap();
        let conn = other.connect(addr, &name).unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[5, 0, 0, 0, 1, 0, 0xff, 0xff, 0xff]).await.unwrap();
        send.finish().unwrap();
        let _ = recv.read_to_end(1024).await;
        let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.unwrap();
        assert!(reason.to_string().contains("malformed call"), "{reason}");
        // A frame announcing more than the limit: refused from its length.
        let conn = other.connect(addr, &name).unwrap().await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.unwrap();
        assert!(reason.to_string().contains("over the limit"), "{reason}");

        // The first connection is untouched.
        let (resp, _): (String, Bytes) =
            pool.call(addr, &name, &"again".to_string(), vec![], Duration::from_secs(10)).await.unwrap();
        assert_eq!(resp, "again from laptop");
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_network_count_keeps_the_bytes_of_closed_connections() {
        let EchoPeer { _dir, addr, name, pool, stop, .. } = echo_peer();
        assert_eq!(pool.network().await, Network::default());
        let mib = vec![Bytes::from(vec![7u8; 1 << 20])];
        let _: (String, Bytes) =
            pool.call(addr, &name, &"a".to_string(), mib, Duration::from_secs(10)).await.unwrap();
        // The payload both ways, and the handshake's certificates on top.
        let first = pool.network().await;
        assert!(first.sent > 1 << 20 && first.received > 1 << 20, "{first:?}");

        // Closed, then replaced by the next call: its bytes stay counted.
        let conn = pool.connect(addr, &name).await.unwrap();
        conn.close(VarInt::from_u32(0), b"test");
        let _: (String, Bytes) =
            pool.call(addr, &name, &"b".to_string(), vec![], Duration::from_secs(10)).await.unwrap();
        assert!(pool.connect(addr, &name).await.unwrap().stable_id() != conn.stable_id(), "a new connection");
        let after = pool.network().await;
        assert!(after.sent > first.sent && after.received > first.received, "{first:?} then {after:?}");
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_without_a_certificate_may_send_small_messages_and_no_payload() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create(dir.path(), "home").unwrap();
        let server_id = member(&ca, "directory", Role::Directory);
        let ep = endpoint(
            "127.0.0.1:0".parse().unwrap(),
            Some(server_config(&server_id, ClientAuth::Optional).unwrap()),
            client_config(&server_id).unwrap(),
        )
        .unwrap();
        let addr = ep.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(ep, Arc::new(Echo), stop.clone()));
        let name = node_name("directory", Role::Directory, "home");
        let pin = crate::membership::ca::ca_pin(&crate::membership::ca::pem_certs(ca.cert_pem()).unwrap()[0]);
        let join = || {
            let ep = endpoint(
                "127.0.0.1:0".parse().unwrap(),
                None,
                crate::transport::tls::join_client_config(&pin).unwrap(),
            );
            Pool::new(ep.unwrap())
        };
        let pool = join();
        let (resp, _): (String, Bytes) =
            pool.call(addr, &name, &"join".to_string(), vec![], Duration::from_secs(10)).await.unwrap();
        assert_eq!(resp, "join from nobody");
        let err = join()
            .call::<_, String>(
                addr,
                &name,
                &"x".to_string(),
                vec![Bytes::from_static(b"data")],
                Duration::from_secs(10),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("may send no payload"), "{err}");
        let err = join()
            .call::<_, String>(addr, &name, &"y".repeat(9000), vec![], Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
        stop.cancel();
    }
}
