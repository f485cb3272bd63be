//! `meshdisk serve` with the NBD clients people use: libnbd's tools
//! (nbdinfo, nbdcopy, nbdsh), QEMU's (qemu-img, qemu-io) and the `nbd`
//! crate's synchronous client, over TCP and unix sockets, with the RAM and
//! the file backend.

mod common;

use std::process::Command;

use common::{Served, have_tools, nbdsh, pattern, run, sha256_file, stdout_of};

#[test]
fn nbdinfo_sees_the_export_and_its_capabilities() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let s = Served::start(&["--memory", "256M", "--export", "disk0", "--description", "test disk"]);
    let uri = s.tcp_uri.clone();
    let list = stdout_of(Command::new("nbdinfo").args(["--list", &uri]));
    assert!(list.contains("export=\"disk0\""), "{list}");
    assert!(list.contains("description: test disk"), "{list}");
    let size = stdout_of(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(size.trim(), (256u64 << 20).to_string());
    for can in ["flush", "fua", "trim", "zero", "fast-zero", "cache", "multi-conn", "df", "structured-reply"]
    {
        let ok = Command::new("nbdinfo").args(["--can", can, &uri]).status().unwrap().success();
        assert!(ok, "nbdinfo --can {can}");
    }
    let ro = Command::new("nbdinfo").args(["--is", "readonly", &uri]).status().unwrap().success();
    assert!(!ro);
    let info = stdout_of(Command::new("nbdinfo").arg(&s.unix_uri));
    assert!(info.contains("block_size_preferred: 4096"), "{info}");
    assert!(info.contains("block_size_maximum: 33554432"), "{info}");
    assert!(info.contains("base:allocation"), "{info}");
}

#[test]
fn nbdinfo_map_shows_holes_after_trim() {
    if !have_tools(&["nbdinfo", "nbdcopy", "nbdsh"]) {
        return;
    }
    let s = Served::memory("64M");
    let src = s.path("src.bin");
    std::fs::write(&src, pattern(3, 64 << 20)).unwrap();
    run(Command::new("nbdcopy").arg(&src).arg(&s.unix_uri));
    let map = stdout_of(Command::new("nbdinfo").args(["--map", "--totals", &s.unix_uri]));
    assert!(map.contains("100.0%") && map.contains("data"), "fully written: {map}");
    nbdsh(&s.unix_uri, "h.trim(16 << 20, 8 << 20)\nh.zero(8 << 20, 40 << 20)\n");
    let map = stdout_of(Command::new("nbdinfo").args(["--map", &s.unix_uri]));
    let rows: Vec<Vec<&str>> = map.lines().map(|l| l.split_whitespace().collect()).collect();
    let expect = [
        ("0", "8388608", "0"),
        ("8388608", "16777216", "3"),
        ("25165824", "16777216", "0"),
        ("41943040", "8388608", "3"),
        ("50331648", "16777216", "0"),
    ];
    for (row, want) in rows.iter().zip(expect) {
        assert_eq!((row[0], row[1], row[2]), want, "map:\n{map}");
    }
    assert_eq!(rows.len(), expect.len(), "map:\n{map}");
}

#[test]
fn nbdcopy_round_trip_over_tcp_and_unix() {
    if !have_tools(&["nbdcopy"]) {
        return;
    }
    let s = Served::memory("128M");
    let src = s.path("src.bin");
    std::fs::write(&src, pattern(11, 96 << 20)).unwrap();
    // nbdcopy uses several connections when the server allows multi-conn.
    run(Command::new("nbdcopy").args(["--connections", "4", "--requests", "32"]).arg(&src).arg(&s.tcp_uri));
    let out = s.path("out.bin");
    run(Command::new("nbdcopy").arg(&s.unix_uri).arg(&out));
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), 128 << 20);
    assert!(got[..96 << 20] == std::fs::read(&src).unwrap()[..], "data differs");
    assert!(got[96 << 20..].iter().all(|&b| b == 0), "unwritten tail reads as zeroes");
}

#[test]
fn qemu_img_convert_and_compare() {
    if !have_tools(&["qemu-img"]) {
        return;
    }
    let s = Served::memory("64M");
    let img = s.path("disk.raw");
    let mut data = pattern(5, 64 << 20);
    data[10 << 20..20 << 20].fill(0); // a hole qemu-img may skip
    std::fs::write(&img, &data).unwrap();
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&img).arg(&s.tcp_uri));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&img).arg(&s.unix_uri));
    let back = s.path("back.qcow2");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&s.tcp_uri).arg(&back));
    run(Command::new("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&back).arg(&img));
}

#[test]
fn qemu_io_patterns() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let s = Served::memory("64M");
    let out = stdout_of(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xa5 0 1M",
        "-c",
        "write -P 0x5a 1M 3M",
        "-c",
        "write -P 0x11 4095 3",
        "-c",
        "write -z 8M 2M",
        "-c",
        "aio_write -P 0x77 16M 64k",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0xa5 0 4095",
        "-c",
        "read -P 0x11 4095 3",
        "-c",
        "read -P 0x5a 1M 3M",
        "-c",
        "read -P 0 8M 2M",
        "-c",
        "read -P 0x77 16M 64k",
        "-c",
        "flush",
        &s.tcp_uri,
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    assert_eq!(out.matches("read ").count(), 5, "{out}");
}

#[test]
fn nbdsh_edge_cases() {
    if !have_tools(&["nbdsh"]) {
        return;
    }
    let s = Served::memory("16M");
    let script = r#"
size = h.get_size()
assert size == 16 << 20
def errno_of(f):
    try:
        f()
    except nbd.Error as e:
        # libnbd gives the errno as a name or a number, by version
        return e.errno if isinstance(e.errno, str) else errno.errorcode[e.errno]
    return None
# out of range: EINVAL for reads, ENOSPC for writes; the handle keeps working
assert errno_of(lambda: h.pread(10, size - 5)) == "EINVAL"
assert errno_of(lambda: h.pwrite(b"x" * 10, size - 5)) == "ENOSPC"
assert errno_of(lambda: h.zero(10, size - 5)) == "ENOSPC"
assert errno_of(lambda: h.trim(10, size)) == "EINVAL"
assert errno_of(lambda: h.block_status(10, size, lambda *a: 0)) == "EINVAL"
# zero-length requests are no-ops
assert h.pread(0, 0) == b""
h.pwrite(b"", size)
# FUA writes and flush
h.pwrite(b"A" * 4096, 4096, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(4096, 4096) == b"A" * 4096
# trim, then block status reports a hole that reads as zeroes
h.pwrite(b"B" * (1 << 20), 1 << 20)
h.trim(1 << 20, 1 << 20)
seen = []
def cb(ctx, off, entries, err):
    seen.append((ctx, off, list(entries)))
    return 0
h.block_status(1 << 20, 1 << 20, cb)
ctx, off, entries = seen[0]
assert ctx == "base:allocation" and off == 1 << 20
assert entries[0] == 1 << 20 and entries[1] == (nbd.STATE_HOLE | nbd.STATE_ZERO), entries
assert h.pread(1 << 20, 1 << 20) == bytes(1 << 20)
# REQ_ONE: one extent only
h.pwrite(b"C" * 65536, 4 << 20)
seen.clear()
h.block_status(8 << 20, 4 << 20, cb, nbd.CMD_FLAG_REQ_ONE)
assert len(seen[0][2]) == 2, seen
# write zeroes, with and without FAST_ZERO and NO_HOLE
h.pwrite(b"D" * 65536, 6 << 20)
h.zero(65536, 6 << 20, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(65536, 6 << 20) == bytes(65536)
h.pwrite(b"E" * 65536, 6 << 20)
h.zero(65536, 6 << 20, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
assert h.pread(65536, 6 << 20) == bytes(65536)
# cache is accepted
h.cache(1 << 20, 0)
# DF reads come back as one chunk, holes included
chunks = []
def chunk(buf, off, status, err):
    chunks.append((off, status, len(buf)))
    return 0
h.pread_structured(2 << 20, 4 << 20, chunk, nbd.CMD_FLAG_DF)
assert len(chunks) == 1, chunks
print("EDGE-CASES-OK")
"#;
    let out = nbdsh(&s.tcp_uri, &format!("import errno\n{script}"));
    assert!(out.contains("EDGE-CASES-OK"), "{out}");
}

#[test]
fn nbd_crate_client_uses_export_name_and_zero_padding() {
    use nbd::client::{NbdClient, handshake};
    use std::io::{Read, Seek, SeekFrom, Write};
    let s = Served::start(&["--memory", "8M", "--export", "vol"]);
    let mut tcp = std::net::TcpStream::connect(&s.tcp_addr).unwrap();
    // NBD_OPT_EXPORT_NAME without NO_ZEROES: the crate expects 124 zeroes.
    let export = handshake(&mut tcp, b"vol").unwrap();
    assert_eq!(export.size, 8 << 20);
    assert!(export.send_flush && export.send_trim && !export.readonly);
    let mut c = NbdClient::new(&mut tcp, &export);
    let data = pattern(9, 1 << 20);
    c.seek(SeekFrom::Start(3 << 20)).unwrap();
    c.write_all(&data).unwrap();
    c.flush().unwrap();
    let mut back = vec![0; 1 << 20];
    c.seek(SeekFrom::Start(3 << 20)).unwrap();
    c.read_exact(&mut back).unwrap();
    assert!(back == data);
    // An unknown export name ends the connection (EXPORT_NAME cannot fail politely).
    let mut tcp = std::net::TcpStream::connect(&s.tcp_addr).unwrap();
    assert!(handshake(&mut tcp, b"nope").is_err());
}

#[test]
fn file_backend_serves_a_file_and_flushes_on_sigterm() {
    if !have_tools(&["nbdcopy", "nbdsh"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    let file_arg = file.to_str().unwrap().to_string();
    let mut s = Served::start_in(dir, &["--file", &file_arg, "--size", "64M"]);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 64 << 20, "created at the asked size");
    let src = s.path("src.bin");
    std::fs::write(&src, pattern(21, 64 << 20)).unwrap();
    run(Command::new("nbdcopy").arg(&src).arg(&s.tcp_uri));
    let out = s.path("out.bin");
    run(Command::new("nbdcopy").arg(&s.unix_uri).arg(&out));
    assert_eq!(sha256_file(&src), sha256_file(&out));
    // Trim punches a hole in the file; block status sees it.
    let script = "h.trim(16 << 20, 8 << 20, nbd.CMD_FLAG_FUA)\n\
                  seen = []\n\
                  h.block_status(16 << 20, 8 << 20, lambda c, o, e, err: seen.append(list(e)) or 0)\n\
                  assert seen[0][1] & nbd.STATE_HOLE, seen\n\
                  assert h.pread(4096, 8 << 20) == bytes(4096)\n\
                  h.pwrite(b'Z' * 4096, 0, nbd.CMD_FLAG_FUA)\n";
    nbdsh(&s.unix_uri, script);
    let status = s.stop();
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    let on_disk = std::fs::read(&file).unwrap();
    assert_eq!(&on_disk[..4096], &[b'Z'; 4096][..]);
    assert!(on_disk[8 << 20..24 << 20].iter().all(|&b| b == 0));
    let src = std::fs::read(&src).unwrap();
    assert!(on_disk[24 << 20..] == src[24 << 20..]);
    // Serving the same file again, read-only, without a size.
    let dir = tempfile::tempdir().unwrap();
    let s = Served::start_in(dir, &["--file", &file_arg, "--read-only"]);
    let out = s.path("again.bin");
    run(Command::new("nbdcopy").arg(&s.unix_uri).arg(&out));
    assert!(std::fs::read(&out).unwrap() == on_disk);
}

#[test]
fn sigterm_finishes_in_flight_requests_and_exits_cleanly() {
    use common::rawclient::RawClient;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    let file_arg = file.to_str().unwrap().to_string();
    let mut s = Served::start_in(dir, &["--file", &file_arg, "--size", "32M"]);
    let mut c = RawClient::handshake(&s.socket, false);
    let data = pattern(4, 16 << 20);
    // 16 writes of 1 MiB queued, then SIGTERM before reading any reply.
    for i in 0..16u64 {
        let off = (i as usize) << 20;
        c.request(0, 1, i, off as u64, 1 << 20, &data[off..off + (1 << 20)]);
    }
    common::signal(s.pid(), "TERM");
    let mut acked = 0;
    for _ in 0..16 {
        let (err, _) = c.simple_reply();
        assert_eq!(err, 0);
        acked += 1;
    }
    assert_eq!(acked, 16);
    assert!(c.closed(), "the server closes the connection after draining");
    let status = s.stop();
    assert!(status.success(), "{status}");
    assert!(std::fs::read(&file).unwrap()[..16 << 20] == data[..]);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let bin = common::meshdisk_bin();
    let out = Command::new(&bin).args(["serve", "--memory", "12Q"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit"));
    let out = Command::new(&bin).args(["serve", "--memory", "1G", "--listen", "none"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to listen on"));
    let out = Command::new(&bin).args(["serve", "--file", "/nonexistent/dir/x.img"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/dir/x.img"));
}
