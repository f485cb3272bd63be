//! Fixed-newstyle negotiation: the server greets, the client haggles over
//! options, and the connection either enters transmission with a
//! [`Session`] or closes.
//!
//! Option payloads are parsed by pure functions ([`parse_info_request`],
//! [`parse_meta_context_request`]); [`negotiate`] only moves bytes and keeps
//! the per-connection state (structured replies, selected contexts).
//! A malformed option earns `NBD_REP_ERR_INVALID` and haggling goes on; only
//! a broken frame (bad magic, unknown client flags, an unknown export named
//! by `NBD_OPT_EXPORT_NAME`, too many options) closes the connection.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::*;

/// Options longer than this are refused with `NBD_REP_ERR_TOO_BIG` (their
/// payload is read and dropped in pieces, never allocated).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// A client that haggles longer than this is cut off.
pub const MAX_OPTIONS: usize = 128;
/// NBD strings (export names, queries) are at most 4096 bytes.
const MAX_STRING: usize = 4096;

/// The export this server offers: its identity and capabilities, computed
/// once when the server starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    /// Transmission flags, before the per-connection DF bit.
    pub tflags: u16,
    /// The metadata contexts a client may list and select.
    pub contexts: Vec<MetaContext>,
}

impl Export {
    /// Whether a client naming `name` means this export. The empty name
    /// always means the default export.
    pub fn answers_to(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("i/o during handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("client sent unknown flags {0:#x}")]
    ClientFlags(u32),
    #[error("bad option magic {0:#018x}")]
    BadMagic(u64),
    #[error("client asked for export {0:?}, which does not exist")]
    UnknownExport(String),
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: Vec<u8>,
    pub requests: Vec<u16>,
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: Vec<u8>,
    pub queries: Vec<Vec<u8>>,
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("option payload is truncated");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<&'a [u8], &'static str> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return Err("string longer than 4096 bytes");
        }
        self.take(len)
    }
    fn finish(&self) -> Result<(), &'static str> {
        if self.0.is_empty() { Ok(()) } else { Err("trailing bytes after option payload") }
    }
}

pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, &'static str> {
    let mut c = Cursor(data);
    let name = c.string()?.to_vec();
    let n = c.u16()?;
    let requests = (0..n).map(|_| c.u16()).collect::<Result<_, _>>()?;
    c.finish()?;
    Ok(InfoRequest { name, requests })
}

pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, &'static str> {
    let mut c = Cursor(data);
    let export = c.string()?.to_vec();
    let n = c.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(c.string()?.to_vec());
    }
    c.finish()?;
    Ok(MetaContextRequest { export, queries })
}

/// A metadata context this server knows how to answer BLOCK_STATUS for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MetaContext {
    /// `base:allocation`: holes and zeroes (the spec's).
    BaseAllocation,
    /// `meshdisk:health`: per-range redundancy (ours; docs/formats.md).
    MeshdiskHealth,
}

impl MetaContext {
    pub const ALL: [MetaContext; 2] = [MetaContext::BaseAllocation, MetaContext::MeshdiskHealth];

    pub fn name(self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => BASE_ALLOCATION,
            MetaContext::MeshdiskHealth => MESHDISK_HEALTH,
        }
    }

    /// The id SET_META_CONTEXT gives it and BLOCK_STATUS chunks carry.
    pub fn id(self) -> u32 {
        match self {
            MetaContext::BaseAllocation => BASE_ALLOCATION_ID,
            MetaContext::MeshdiskHealth => MESHDISK_HEALTH_ID,
        }
    }

    /// Its namespace with the colon (`base:`), the wildcard that lists it.
    pub fn namespace(self) -> &'static str {
        let name = self.name();
        &name[..=name.find(':').expect("context names have a namespace")]
    }
}

/// The contexts of `offered` that `queries` name, each once, in
/// [`MetaContext::ALL`] order. A query names a context by its full name;
/// when listing, a bare namespace (`base:`, `meshdisk:`) names every
/// offered context in it, and no query at all names every offered context.
/// Selecting with a bare namespace or no query selects nothing (the spec
/// says so for `base:`; we treat `meshdisk:` alike). Unknown queries are
/// ignored, as the spec requires.
pub fn matching_contexts(queries: &[Vec<u8>], listing: bool, offered: &[MetaContext]) -> Vec<MetaContext> {
    let named = |c: MetaContext| {
        if queries.is_empty() {
            return listing;
        }
        queries.iter().any(|q| q == c.name().as_bytes() || (listing && q == c.namespace().as_bytes()))
    };
    MetaContext::ALL.into_iter().filter(|c| offered.contains(c) && named(*c)).collect()
}

/// Option replies for one option, built in memory and sent in one write.
struct Replies {
    out: BytesMut,
    option: u32,
}

impl Replies {
    fn new(option: u32) -> Self {
        Self { out: BytesMut::with_capacity(256), option }
    }
    fn reply(&mut self, kind: u32, data: &[u8]) {
        put_option_reply(&mut self.out, self.option, kind, data.len() as u32);
        self.out.put_slice(data);
    }
    fn ack(&mut self) {
        self.reply(REP_ACK, &[]);
    }
    fn error(&mut self, kind: u32, message: &str) {
        self.reply(kind, truncate_utf8(message, MAX_STRING).as_bytes());
    }
    fn info(&mut self, info: u16, data: &[u8]) {
        let mut b = Vec::with_capacity(2 + data.len());
        b.extend_from_slice(&info.to_be_bytes());
        b.extend_from_slice(data);
        self.reply(REP_INFO, &b);
    }
    fn meta_context(&mut self, id: u32, name: &str) {
        let mut b = Vec::with_capacity(4 + name.len());
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(name.as_bytes());
        self.reply(REP_META_CONTEXT, &b);
    }
    async fn send<W: AsyncWrite + Unpin>(self, wr: &mut W) -> std::io::Result<()> {
        wr.write_all(&self.out).await?;
        wr.flush().await
    }
}

fn export_info(export: &Export, tflags: u16) -> [u8; 10] {
    let mut b = [0u8; 10];
    b[..8].copy_from_slice(&export.size.to_be_bytes());
    b[8..].copy_from_slice(&tflags.to_be_bytes());
    b
}

fn block_size_info() -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&MIN_BLOCK.to_be_bytes());
    b[4..8].copy_from_slice(&PREFERRED_BLOCK.to_be_bytes());
    b[8..].copy_from_slice(&MAX_PAYLOAD.to_be_bytes());
    b
}

/// Runs the handshake. `Ok(None)` means the client ended it politely
/// (`NBD_OPT_ABORT` or end of stream before choosing an export).
pub async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    export: &Export,
) -> Result<Option<Session>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(NBD_MAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    wr.write_all(&greeting).await?;
    wr.flush().await?;

    let client_flags = match rd.read_u32().await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::ClientFlags(client_flags));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    let mut structured = false;
    // The contexts the last SET_META_CONTEXT selected.
    let mut selected: Vec<MetaContext> = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let mut head = [0u8; 16];
        match rd.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let magic = u64::from_be_bytes(head[..8].try_into().unwrap());
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadMagic(magic));
        }
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let mut r = Replies::new(option);
        if len > MAX_OPTION_LEN {
            tokio::io::copy(&mut (&mut *rd).take(len.into()), &mut tokio::io::sink()).await?;
            if option == OPT_EXPORT_NAME {
                return Err(HandshakeError::UnknownExport("<over-long name>".into()));
            }
            r.error(REP_ERR_TOO_BIG, "option is too long");
            r.send(wr).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        let tflags = export.tflags | if structured { TFLAG_SEND_DF } else { 0 };
        let session = |selected: &[MetaContext], max_payload| Session {
            size: export.size,
            tflags,
            structured,
            base_allocation: selected.contains(&MetaContext::BaseAllocation),
            meshdisk_health: selected.contains(&MetaContext::MeshdiskHealth),
            max_payload,
        };

        match option {
            OPT_EXPORT_NAME => {
                if !export.answers_to(&data) {
                    return Err(HandshakeError::UnknownExport(String::from_utf8_lossy(&data).into()));
                }
                let mut out = BytesMut::with_capacity(10 + 124);
                out.put_slice(&export_info(export, tflags));
                if !no_zeroes {
                    out.put_bytes(0, 124);
                }
                wr.write_all(&out).await?;
                wr.flush().await?;
                // No block sizes were sent on this path: accept what the
                // reference server does.
                return Ok(Some(session(&selected, EXPORT_NAME_MAX_PAYLOAD)));
            }
            OPT_ABORT => {
                r.ack();
                let _ = r.send(wr).await;
                return Ok(None);
            }
            OPT_LIST if !data.is_empty() => r.error(REP_ERR_INVALID, "NBD_OPT_LIST takes no data"),
            OPT_LIST => {
                let mut b = Vec::new();
                b.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                b.extend_from_slice(export.name.as_bytes());
                if let Some(d) = &export.description {
                    b.extend_from_slice(d.as_bytes());
                }
                r.reply(REP_SERVER, &b);
                r.ack();
            }
            OPT_STARTTLS => r.error(REP_ERR_POLICY, "TLS is not configured on this server"),
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                Err(why) => r.error(REP_ERR_INVALID, why),
                Ok(req) if !export.answers_to(&req.name) => r.error(
                    REP_ERR_UNKNOWN,
                    &format!(
                        "no export named {:?}; this server has {:?}",
                        String::from_utf8_lossy(&req.name),
                        export.name
                    ),
                ),
                Ok(req) => {
                    r.info(INFO_EXPORT, &export_info(export, tflags));
                    if req.requests.contains(&INFO_NAME) {
                        r.info(INFO_NAME, export.name.as_bytes());
                    }
                    if let (true, Some(d)) = (req.requests.contains(&INFO_DESCRIPTION), &export.description) {
                        r.info(INFO_DESCRIPTION, d.as_bytes());
                    }
                    r.info(INFO_BLOCK_SIZE, &block_size_info());
                    r.ack();
                    if option == OPT_GO {
                        r.send(wr).await?;
                        return Ok(Some(session(&selected, MAX_PAYLOAD)));
                    }
                }
            },
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                r.error(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            }
            OPT_STRUCTURED_REPLY if structured => {
                r.error(REP_ERR_INVALID, "structured replies already negotiated")
            }
            OPT_STRUCTURED_REPLY => {
                structured = true;
                r.ack();
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let setting = option == OPT_SET_META_CONTEXT;
                // SET replaces the selection even when it fails.
                if setting {
                    selected.clear();
                }
                match parse_meta_context_request(&data) {
                    Err(why) => r.error(REP_ERR_INVALID, why),
                    Ok(_) if !structured => {
                        r.error(REP_ERR_INVALID, "negotiate structured replies before metadata contexts")
                    }
                    Ok(req) if !export.answers_to(&req.export) => r.error(REP_ERR_UNKNOWN, "no such export"),
                    Ok(req) => {
                        let found = matching_contexts(&req.queries, !setting, &export.contexts);
                        for &c in &found {
                            // Listed contexts carry id 0, as the spec asks.
                            r.meta_context(if setting { c.id() } else { 0 }, c.name());
                        }
                        if setting {
                            selected = found;
                        }
                        r.ack();
                    }
                }
            }
            _ => r.error(REP_ERR_UNSUP, "option not supported by meshdisk"),
        }
        r.send(wr).await?;
    }
    Err(HandshakeError::TooManyOptions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn string(s: &[u8]) -> Vec<u8> {
        let mut b = (s.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(s);
        b
    }

    #[test]
    fn info_request_parses() {
        let mut d = string(b"disk");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let r = parse_info_request(&d).unwrap();
        assert_eq!(r.name, b"disk");
        assert_eq!(r.requests, vec![INFO_NAME, INFO_BLOCK_SIZE]);
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        d.push(0);
        assert!(parse_info_request(&d).is_err());
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn meta_context_request_parses() {
        let mut d = string(b"");
        d.extend_from_slice(&2u32.to_be_bytes());
        d.extend_from_slice(&string(b"base:allocation"));
        d.extend_from_slice(&string(b"qemu:dirty-bitmap:x"));
        let r = parse_meta_context_request(&d).unwrap();
        assert_eq!(r.queries.len(), 2);
        let base = [MetaContext::BaseAllocation];
        let alloc = vec![MetaContext::BaseAllocation];
        assert_eq!(matching_contexts(&r.queries, false, &base), alloc);
        assert!(matching_contexts(&[b"base:".to_vec()], false, &base).is_empty());
        assert_eq!(matching_contexts(&[b"base:".to_vec()], true, &base), alloc);
        assert_eq!(matching_contexts(&[], true, &base), alloc);
        assert!(matching_contexts(&[], false, &base).is_empty());
        // A count far larger than the payload is a clean error.
        let mut d = string(b"");
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_context_request(&d).is_err());
    }

    #[test]
    fn health_context_is_matched_only_where_offered() {
        use MetaContext::*;
        let q = |qs: &[&str]| qs.iter().map(|q| q.as_bytes().to_vec()).collect::<Vec<_>>();
        let both = [BaseAllocation, MeshdiskHealth];
        // Listing: everything, by namespace, or by name.
        assert_eq!(matching_contexts(&[], true, &both), vec![BaseAllocation, MeshdiskHealth]);
        assert_eq!(matching_contexts(&q(&["meshdisk:"]), true, &both), vec![MeshdiskHealth]);
        assert_eq!(matching_contexts(&q(&["base:"]), true, &both), vec![BaseAllocation]);
        assert_eq!(matching_contexts(&q(&["meshdisk:health"]), true, &both), vec![MeshdiskHealth]);
        // Selecting: by full name only; each once, in a fixed order.
        assert!(matching_contexts(&q(&["meshdisk:"]), false, &both).is_empty());
        assert_eq!(
            matching_contexts(
                &q(&["meshdisk:health", "x-other:thing", "base:allocation", "meshdisk:health"]),
                false,
                &both
            ),
            vec![BaseAllocation, MeshdiskHealth]
        );
        // Unknown leaves and namespaces are ignored, not errors.
        assert!(matching_contexts(&q(&["meshdisk:wealth", "meshdisk", "health"]), false, &both).is_empty());
        // A backend without a health map: the context does not exist.
        let base = [BaseAllocation];
        assert!(matching_contexts(&q(&["meshdisk:health"]), false, &base).is_empty());
        assert!(matching_contexts(&q(&["meshdisk:"]), true, &base).is_empty());
        assert_eq!(matching_contexts(&[], true, &base), vec![BaseAllocation]);
        assert_eq!(MeshdiskHealth.namespace(), "meshdisk:");
        assert_ne!(BaseAllocation.id(), MeshdiskHealth.id());
    }

    proptest! {
        #[test]
        fn option_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_info_request(&data);
            let _ = parse_meta_context_request(&data);
        }
    }
}
