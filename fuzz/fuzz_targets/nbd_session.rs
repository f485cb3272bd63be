//! A whole connection: arbitrary client bytes against the real server and
//! the RAM backend, over an in-memory stream. The first byte chooses
//! whether the bytes start at the handshake or after a valid one (so the
//! fuzzer spends its time on transmission requests too). The server must
//! neither panic nor hang: the stream always ends, and so must it.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use meshdisk::backend::memory::MemoryBackend;
use meshdisk::nbd::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn handshake() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    let mut option = |opt: u32, data: &[u8]| {
        b.extend_from_slice(b"IHAVEOPT");
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
    };
    option(8, &[]);
    let mut meta = Vec::new();
    meta.extend_from_slice(&0u32.to_be_bytes());
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    option(10, &meta);
    option(7, &[0, 0, 0, 0, 0, 0]);
    b
}

fuzz_target!(|data: &[u8]| {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap());
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut input = if mode & 1 == 1 { handshake() } else { Vec::new() };
    input.extend_from_slice(rest);
    rt.block_on(async move {
        let server = Server::new(Arc::new(MemoryBackend::new(1 << 20)), ServerConfig::default());
        let (client, conn) = tokio::io::duplex(64 * 1024);
        let (srd, swr) = tokio::io::split(conn);
        let (mut crd, mut cwr) = tokio::io::split(client);
        let feed = tokio::spawn(async move {
            let _ = cwr.write_all(&input).await;
            let _ = cwr.shutdown().await;
        });
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 64 * 1024];
            while matches!(crd.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        server.serve_stream(srd, swr, "fuzz").await;
        let _ = feed.await;
        let _ = drain.await;
    });
});
