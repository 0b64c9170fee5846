//! `send_file` of a file passed by reference (above the file server's threshold, so never
//! copied into the cache): the TCP server sends it with `sendfile` from the file itself. Byte
//! for byte like a cached file; a file that shrinks mid-send ends the response short and
//! closes the connection (what nginx does), and the server goes on serving.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::session;
use splitos::files::FileClient;
use splitos::net::TcpListener;
use splitos_file_server::server::{FileServer, FileServerConfig};
use std::io::Read;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

struct Site {
    base: std::path::PathBuf,
    root: std::path::PathBuf,
    client: FileClient,
    files: FileServer,
}

impl Site {
    fn new(tag: &str, files: &[(&str, &[u8])]) -> Site {
        let base =
            std::env::temp_dir().join(format!("splitos-sendplain-{tag}-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(&root).unwrap();
        for (name, bytes) in files {
            std::fs::write(root.join(name), bytes).unwrap();
        }
        let sock = base.join("files.sock");
        let mut cfg = FileServerConfig::new(root.clone(), sock.clone());
        cfg.by_reference_above = Some(64 << 10);
        let files = FileServer::start(cfg).unwrap();
        let client = FileClient::connect(&sock).unwrap();
        Site {
            base,
            root,
            client,
            files,
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// A kernel client that connects, waits `delay`, and reads until EOF or an error (at most
/// 30 s), returning what it got.
fn read_all(addr: std::net::SocketAddr, delay: Duration) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        std::thread::sleep(delay);
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    })
}

#[test]
fn a_file_passed_by_reference_goes_out_byte_for_byte() {
    let big = pattern(40 << 20, 7);
    let mut site = Site::new("ranges", &[("big.bin", &big), ("one.txt", b"x")]);
    let one = site.client.open("one.txt").unwrap();
    let bigv = site.client.open("big.bin").unwrap();
    assert!(bigv.is_by_reference() && !one.is_by_reference());
    assert_eq!(bigv.mapped_chunks(), 0);
    // The segments-only view of a range (kept for older callers) has none for it.
    assert!(bigv.pieces(0, 1).is_none() && one.pieces(0, 1).is_some());
    let l = TcpListener::bind_with(&session(), "127.0.0.1:0", Default::default()).unwrap();
    let ranges: Vec<(u64, u64)> = vec![
        (0, big.len() as u64),
        (10, 20),
        ((12 << 20) - 1, (8 << 20) + 2),
        (big.len() as u64 - 5, 5),
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
    assert!(conn.send_file(&bigv, 1, big.len() as u64).is_err());
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let got = reader.join().unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "bytes differ");
    assert_eq!(site.files.stats().cached_bytes.load(Ordering::Relaxed), 1);
    assert!(site.files.stats().by_reference.load(Ordering::Relaxed) >= 1);
    // Opening it again reuses the descriptor the TCP server already has.
    let again = site.client.open("big.bin").unwrap();
    let (p1, p2) = (bigv.ranges(0, 1).unwrap(), again.ranges(0, 1).unwrap());
    match (&p1[0], &p2[0]) {
        (
            splitos::files::Piece::Plain { file: a, .. },
            splitos::files::Piece::Plain { file: b, .. },
        ) => assert!(std::sync::Arc::ptr_eq(a, b)),
        _ => panic!("not by reference"),
    }
}

/// The file is truncated while the client is not reading yet: the response ends short and the
/// connection closes (bounded time, no spinning), and the next connection is served.
#[test]
fn a_file_that_shrinks_mid_send_ends_the_connection() {
    let big = pattern(64 << 20, 3);
    let mut site = Site::new("shrink", &[("big.bin", &big)]);
    let view = site.client.open("big.bin").unwrap();
    let l = TcpListener::bind_with(&session(), "127.0.0.1:0", Default::default()).unwrap();
    let reader = read_all(l.local_addr().unwrap(), Duration::from_millis(300));
    let (conn, _) = l.accept().unwrap();
    conn.send_file(&view, 0, view.len()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(site.root.join("big.bin"))
        .unwrap();
    f.set_len(1 << 20).unwrap();
    let start = Instant::now();
    let got = reader.join().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(
        got.len() < big.len(),
        "all {} bytes of a truncated file",
        got.len()
    );
    // What the file still holds arrives intact. Bytes past the new end that were already
    // handed to the socket (by page reference) arrive as the old bytes or as zeros, page by
    // page: the response is short anyway, and the closed connection says so.
    let kept = got.len().min(1 << 20);
    assert!(got[..kept] == big[..kept], "the part the file kept differs");
    drop(conn);
    // The server goes on: a fresh connection gets the (now short) file whole.
    let small = site.client.open("big.bin").unwrap();
    assert_eq!(small.len(), 1 << 20);
    let reader = read_all(l.local_addr().unwrap(), Duration::ZERO);
    let (conn, _) = l.accept().unwrap();
    conn.send_file(&small, 0, small.len()).unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(reader.join().unwrap() == big[..1 << 20]);
}
