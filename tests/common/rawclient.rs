//! A deliberately small, blocking NBD client that can send anything,
//! including requests no well-behaved client would: the tool for testing
//! how the server treats bad input.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_MAGIC: u32 = 0x6744_6698;
pub const CHUNK_MAGIC: u32 = 0x668e_33ef;

pub struct RawClient {
    pub s: UnixStream,
    pub size: u64,
    pub tflags: u16,
    pub structured: bool,
}

#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl RawClient {
    pub fn connect(path: &Path) -> UnixStream {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    fn u16(&mut self) -> u16 {
        let mut b = [0; 2];
        self.s.read_exact(&mut b).unwrap();
        u16::from_be_bytes(b)
    }
    fn u32(&mut self) -> u32 {
        let mut b = [0; 4];
        self.s.read_exact(&mut b).unwrap();
        u32::from_be_bytes(b)
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0; 8];
        self.s.read_exact(&mut b).unwrap();
        u64::from_be_bytes(b)
    }

    /// Fixed newstyle + NO_ZEROES; optional STRUCTURED_REPLY and
    /// `base:allocation`; then NBD_OPT_GO for the default export.
    pub fn handshake(path: &Path, structured: bool) -> Self {
        let s = Self::connect(path);
        let mut c = RawClient { s, size: 0, tflags: 0, structured };
        assert_eq!(c.u64(), 0x4e42_444d_4147_4943, "NBDMAGIC");
        assert_eq!(c.u64(), 0x4948_4156_454f_5054, "IHAVEOPT");
        let _flags = c.u16();
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        if structured {
            c.option(8, &[]);
            let (_, kind, _) = c.option_reply();
            assert_eq!(kind, 1, "structured replies acked");
            let mut d = Vec::new();
            d.extend_from_slice(&0u32.to_be_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&15u32.to_be_bytes());
            d.extend_from_slice(b"base:allocation");
            c.option(10, &d);
            let (_, kind, data) = c.option_reply();
            assert_eq!(kind, 4, "meta context reply");
            assert_eq!(&data[4..], b"base:allocation");
            assert_eq!(c.option_reply().1, 1);
        }
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        c.option(7, &d);
        loop {
            let (_, kind, data) = c.option_reply();
            match kind {
                1 => break,
                3 if u16::from_be_bytes([data[0], data[1]]) == 0 => {
                    c.size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    c.tflags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                }
                3 => {}
                other => panic!("unexpected GO reply {other:#x}"),
            }
        }
        c
    }

    /// The old way in: fixed newstyle + NO_ZEROES, then
    /// NBD_OPT_EXPORT_NAME for the default export, so the client is never
    /// told any block size. Simple replies only.
    pub fn handshake_export_name(path: &Path) -> Self {
        let s = Self::connect(path);
        let mut c = RawClient { s, size: 0, tflags: 0, structured: false };
        assert_eq!(c.u64(), 0x4e42_444d_4147_4943, "NBDMAGIC");
        assert_eq!(c.u64(), 0x4948_4156_454f_5054, "IHAVEOPT");
        let _flags = c.u16();
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        c.option(1, &[]);
        c.size = c.u64();
        c.tflags = c.u16();
        c
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// `(option, reply type, data)`
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), 0x0003_e889_0455_65a9, "option reply magic");
        let option = self.u32();
        let kind = self.u32();
        let len = self.u32();
        let mut data = vec![0; len as usize];
        self.s.read_exact(&mut data).unwrap();
        (option, kind, data)
    }

    pub fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// A simple reply: `(error, cookie)`.
    pub fn simple_reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_MAGIC, "simple reply magic");
        let error = self.u32();
        (error, self.u64())
    }

    pub fn chunk(&mut self) -> Chunk {
        assert_eq!(self.u32(), CHUNK_MAGIC, "structured reply magic");
        let flags = self.u16();
        let kind = self.u16();
        let cookie = self.u64();
        let len = self.u32();
        let mut payload = vec![0; len as usize];
        self.s.read_exact(&mut payload).unwrap();
        Chunk { flags, kind, cookie, payload }
    }

    /// Reads any reply: simple (error) or all chunks up to DONE; returns
    /// `(cookie, error)` where error is the NBD error or 0.
    pub fn any_reply(&mut self) -> (u64, u32) {
        let mut magic = [0; 4];
        self.s.read_exact(&mut magic).unwrap();
        match u32::from_be_bytes(magic) {
            SIMPLE_MAGIC => {
                let error = self.u32();
                (self.u64(), error)
            }
            CHUNK_MAGIC => {
                let mut error = 0;
                let mut cookie;
                let mut first = true;
                loop {
                    if !first {
                        assert_eq!(self.u32(), CHUNK_MAGIC);
                    }
                    first = false;
                    let flags = self.u16();
                    let kind = self.u16();
                    cookie = self.u64();
                    let len = self.u32();
                    let mut payload = vec![0; len as usize];
                    self.s.read_exact(&mut payload).unwrap();
                    if kind & 0x8000 != 0 {
                        error = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    }
                    if flags & 1 != 0 {
                        break;
                    }
                }
                (cookie, error)
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Reads `len` bytes with a simple-reply READ.
    pub fn read_simple(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, 0, cookie, offset, len, &[]);
        let (error, c) = self.simple_reply();
        assert_eq!((error, c), (0, cookie));
        let mut data = vec![0; len as usize];
        self.s.read_exact(&mut data).unwrap();
        data
    }

    /// True once the server has closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}
