//! `send_file`: file bytes go from the file server's cache to the network through the TCP
//! server, never through the application; checked byte for byte by a kernel client.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::session;
use splitos::files::FileClient;
use splitos::net::TcpListener;
use splitos_file_server::server::{FileServer, FileServerConfig};
use std::io::Read;
use std::time::Duration;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A served directory holding `files`, its file server (tuned by `tune`) and a client; the
/// directory goes when the fixture does.
struct Site {
    base: std::path::PathBuf,
    root: std::path::PathBuf,
    client: FileClient,
    _files: FileServer,
}

impl Site {
    fn new(tag: &str, files: &[(&str, &[u8])], tune: impl FnOnce(&mut FileServerConfig)) -> Site {
        let base =
            std::env::temp_dir().join(format!("splitos-sendfile-{tag}-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(&root).unwrap();
        for (name, bytes) in files {
            std::fs::write(root.join(name), bytes).unwrap();
        }
        let sock = base.join("files.sock");
        let mut cfg = FileServerConfig::new(root.clone(), sock.clone());
        tune(&mut cfg);
        let files = FileServer::start(cfg).unwrap();
        let client = FileClient::connect(&sock).unwrap();
        Site {
            base,
            root,
            client,
            _files: files,
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// A kernel client that connects to `addr`, waits `delay`, and reads until EOF (bounded by a
/// 30 s read timeout).
fn read_all(addr: std::net::SocketAddr, delay: Duration) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        std::thread::sleep(delay);
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        got
    })
}

#[test]
fn send_file_one_byte_whole_file_and_ranges_across_chunks() {
    let big = pattern(100 << 20, 7);
    let mut site = Site::new("ranges", &[("big.bin", &big), ("one.txt", b"x")], |cfg| {
        cfg.chunk_size = 4 << 20;
        cfg.cache_bytes = 256 << 20;
        cfg.by_reference_above = Some(u64::MAX); // in chunks (see send_plain_file.rs)
    });
    let one = site.client.open("one.txt").unwrap();
    let bigv = site.client.open("big.bin").unwrap();
    assert_eq!(bigv.chunk_count(), 25);

    let l = TcpListener::bind_with(&session(), "127.0.0.1:0", Default::default()).unwrap();
    // (offset, len) requests, sent back to back on one connection.
    let ranges: Vec<(u64, u64)> = vec![
        (0, big.len() as u64),           // the whole 100 MiB file
        ((4 << 20) - 10, 20),            // across the first chunk boundary
        ((12 << 20) - 1, (8 << 20) + 2), // spanning three chunks
        (big.len() as u64 - 5, 5),       // the tail
    ];
    let mut expected = b"x".to_vec();
    for (o, n) in &ranges {
        expected.extend_from_slice(&big[*o as usize..(*o + *n) as usize]);
    }
    let reader = read_all(l.local_addr().unwrap(), Duration::ZERO);
    let (conn, _) = l.accept().unwrap();
    conn.send_file(&one, 0, 1).unwrap();
    for (o, n) in &ranges {
        conn.send_file(&bigv, *o, *n).unwrap();
    }
    assert!(
        conn.send_file(&one, 0, 2).is_err(),
        "range past the end accepted"
    );
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let got = reader.join().unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "bytes differ");
}

#[test]
fn a_file_changed_or_evicted_mid_send_goes_out_as_one_version() {
    let old = pattern(20 << 20, 1);
    let mut site = Site::new("version", &[("f.bin", &old)], |cfg| {
        cfg.cache_bytes = 8 << 20; // smaller than the file: its chunks are evicted as it is read
        cfg.chunk_size = 1 << 20;
        cfg.by_reference_above = Some(u64::MAX); // copied in chunks, not passed by reference
    });
    let view = site.client.open("f.bin").unwrap();
    let l = TcpListener::bind_with(&session(), "127.0.0.1:0", Default::default()).unwrap();
    // The reader waits first, so that the send stalls on a full window.
    let reader = read_all(l.local_addr().unwrap(), Duration::from_millis(200));
    let (conn, _) = l.accept().unwrap();
    conn.send_file(&view, 0, view.len()).unwrap();
    // Rewrite and then delete the file while the transmission is in progress.
    std::fs::write(site.root.join("f.bin"), pattern(20 << 20, 99)).unwrap();
    std::fs::remove_file(site.root.join("f.bin")).unwrap();
    drop(view);
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let got = reader.join().unwrap();
    assert_eq!(got.len(), old.len());
    assert!(got == old, "the transmission mixed versions");
}

/// Many medium files queued back to back keep the socket busy: the TCP server sends them by
/// `sendfile` in bounded bursts and must come back for the rest at once, not at its next
/// timer tick (a lost wake-up once cost up to 100 ms per burst: 6 s here instead of 0.15 s).
#[test]
fn many_queued_files_go_out_without_stalls() {
    let body = pattern(64 << 10, 3);
    let mut site = Site::new("many", &[("m.bin", &body)], |_| {});
    let view = site.client.open("m.bin").unwrap();
    // A server that sleeps as soon as it has nothing to do: spinning would hide a lost wake-up.
    let server = splitos::embedded::start(splitos::embedded::Options {
        threads: 1,
        wait: splitos::WaitPolicy::Block,
    })
    .unwrap();
    let l = TcpListener::bind_with(
        &server.session().unwrap(),
        "127.0.0.1:0",
        Default::default(),
    )
    .unwrap();
    const COUNT: usize = 2048;
    let reader = read_all(l.local_addr().unwrap(), Duration::ZERO);
    let (conn, _) = l.accept().unwrap();
    let start = std::time::Instant::now();
    for _ in 0..COUNT {
        conn.send_file(&view, 0, view.len()).unwrap();
    }
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let got = reader.join().unwrap();
    let took = start.elapsed();
    assert_eq!(got.len(), COUNT * body.len());
    assert!(got.chunks(body.len()).all(|c| c == body), "bytes differ");
    assert!(
        took < Duration::from_secs(3),
        "128 MiB of queued files took {took:?}: the server stalled between bursts"
    );
}

/// A file range of 8 KiB or more sent on a connection the application *opened*, to a peer that
/// does not read, must not stall the worker for everyone else on it. Outbound sockets were
/// made blocking once connected, and the `sendfile` fast path then slept in the kernel until
/// the peer read, holding every session of that worker.
#[test]
fn a_slow_reader_on_an_outbound_connection_stalls_nobody_else() {
    use splitos::net::TcpStream;
    use std::io::Write;
    let body = pattern(4 << 20, 5);
    let mut site = Site::new("outbound", &[("o.bin", &body)], |_| {});
    let view = site.client.open("o.bin").unwrap();
    // One worker, so both applications' sessions share it.
    let server = splitos::embedded::start_new(splitos::embedded::Options {
        threads: 1,
        wait: splitos::WaitPolicy::adaptive(),
    })
    .unwrap();
    let sink = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sender = server.session().unwrap();
    let out = TcpStream::connect_with(&sender, sink.local_addr().unwrap()).unwrap();
    let (mut peer, _) = sink.accept().unwrap();
    const COPIES: usize = 8; // 32 MiB: far more than the socket buffers hold
    for _ in 0..COPIES {
        out.send_file(&view, 0, view.len()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));

    // Another application on the same worker is served meanwhile. It runs on a thread of its
    // own, so that a stalled worker fails the test instead of hanging it.
    let other = server.session().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let app = std::thread::spawn(move || {
        let start = std::time::Instant::now();
        let r = (|| -> std::io::Result<Vec<u8>> {
            let l = TcpListener::bind_with(&other, "127.0.0.1:0", Default::default())?;
            let mut c = std::net::TcpStream::connect(l.local_addr()?)?;
            let (s, _) = l.accept()?;
            c.write_all(b"ping")?;
            let mut buf = [0u8; 64];
            let n = (&s).read(&mut buf)?;
            (&s).write_all(&buf[..n])?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut got = [0u8; 4];
            c.read_exact(&mut got)?;
            Ok(got.to_vec())
        })();
        let _ = done_tx.send((r, start.elapsed()));
    });
    let served = done_rx.recv_timeout(Duration::from_secs(3));

    // Now read everything, which also frees a stalled worker so the test ends either way.
    peer.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut got = vec![0u8; COPIES * body.len()];
    peer.read_exact(&mut got).unwrap();
    let _ = app.join();
    assert!(got.chunks(body.len()).all(|c| c == body), "bytes differ");
    let (echoed, took) =
        served.expect("the other application was not served while one peer did not read");
    assert_eq!(echoed.unwrap(), b"ping");
    assert!(took < Duration::from_secs(1), "the echo took {took:?}");
}
