//! `send_file`: file bytes go from the file server's cache to the network through the TCP
//! server, never through the application; checked byte for byte by a kernel client.

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

#[test]
fn send_file_one_byte_whole_file_and_ranges_across_chunks() {
    let base = std::env::temp_dir().join(format!("splitos-sendfile-{}", std::process::id()));
    let root = base.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let big = pattern(100 << 20, 7);
    std::fs::write(root.join("big.bin"), &big).unwrap();
    std::fs::write(root.join("one.txt"), b"x").unwrap();
    let sock = base.join("files.sock");
    let mut cfg = FileServerConfig::new(root.clone(), sock.clone());
    cfg.chunk_size = 4 << 20;
    cfg.cache_bytes = 256 << 20;
    let _files = FileServer::start(cfg).unwrap();
    let mut fc = FileClient::connect(&sock).unwrap();
    let one = fc.open("one.txt").unwrap();
    let bigv = fc.open("big.bin").unwrap();
    assert_eq!(bigv.chunks().len(), 25);

    let l = TcpListener::bind_with(&session(), "127.0.0.1:0", Default::default()).unwrap();
    let addr = l.local_addr().unwrap();
    // (offset, len) requests, sent back to back on one connection.
    let ranges: Vec<(u64, u64)> = vec![
        (0, 1),                          // from one.txt
        (0, big.len() as u64),           // the whole 100 MiB file
        ((4 << 20) - 10, 20),            // across the first chunk boundary
        ((12 << 20) - 1, (8 << 20) + 2), // spanning three chunks
        (big.len() as u64 - 5, 5),       // the tail
    ];
    let expected: Vec<u8> = {
        let mut v = b"x".to_vec();
        for (o, n) in &ranges[1..] {
            v.extend_from_slice(&big[*o as usize..(*o + *n) as usize]);
        }
        v
    };
    let reader = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        got
    });
    let (conn, _) = l.accept().unwrap();
    conn.send_file(&one, 0, 1).unwrap();
    for (o, n) in &ranges[1..] {
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
    drop(conn);
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn a_file_changed_or_evicted_mid_send_goes_out_as_one_version() {
    let base = std::env::temp_dir().join(format!("splitos-sendfile-v-{}", std::process::id()));
    let root = base.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let old = pattern(20 << 20, 1);
    std::fs::write(root.join("f.bin"), &old).unwrap();
    let sock = base.join("files.sock");
    let mut cfg = FileServerConfig::new(root.clone(), sock.clone());
    cfg.cache_bytes = 8 << 20; // smaller than the file: its chunks are evicted as it is read
    cfg.chunk_size = 1 << 20;
    let _files = FileServer::start(cfg).unwrap();
    let mut fc = FileClient::connect(&sock).unwrap();
    let view = fc.open("f.bin").unwrap();
    let l = TcpListener::bind_with(&session(), "127.0.0.1:0", Default::default()).unwrap();
    let addr = l.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        std::thread::sleep(Duration::from_millis(200)); // let the send stall on a full window
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        got
    });
    let (conn, _) = l.accept().unwrap();
    conn.send_file(&view, 0, view.len()).unwrap();
    // Rewrite and then delete the file while the transmission is in progress.
    std::fs::write(root.join("f.bin"), pattern(20 << 20, 99)).unwrap();
    std::fs::remove_file(root.join("f.bin")).unwrap();
    drop(view);
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let got = reader.join().unwrap();
    assert_eq!(got.len(), old.len());
    assert!(got == old, "the transmission mixed versions");
    drop(conn);
    let _ = std::fs::remove_dir_all(&base);
}

/// Many medium files queued back to back keep the socket busy: the TCP server sends them by
/// `sendfile` in bounded bursts and must come back for the rest at once, not at its next
/// timer tick (a lost wake-up once cost up to 100 ms per burst: 6 s here instead of 0.15 s).
#[test]
fn many_queued_files_go_out_without_stalls() {
    let base = std::env::temp_dir().join(format!("splitos-sendfile-m-{}", std::process::id()));
    let root = base.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let body = pattern(64 << 10, 3);
    std::fs::write(root.join("m.bin"), &body).unwrap();
    let sock = base.join("files.sock");
    let _files = FileServer::start(FileServerConfig::new(root.clone(), sock.clone())).unwrap();
    let mut fc = FileClient::connect(&sock).unwrap();
    let view = fc.open("m.bin").unwrap();
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
    let addr = l.local_addr().unwrap();
    const COUNT: usize = 2048;
    let reader = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        got
    });
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
    drop(conn);
    let _ = std::fs::remove_dir_all(&base);
}
