//! Many connections, big transfers and a slow reader, through the library and the embedded
//! TCP server, against kernel clients. Every loop is bounded in count and time.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{echo_conn, session};
use splitos::net::TcpListener;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// A deterministic pseudo-random stream, so both ends can check content without storing it.
struct Stream(u64);
impl Stream {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

#[test]
fn two_thousand_concurrent_connections() {
    const CONNS: usize = 2000;
    const ROUNDS: usize = 3;
    let l = TcpListener::bind_with(&session(), "127.0.0.1:0", Default::default()).unwrap();
    let addr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let mut handlers = Vec::new();
        for _ in 0..CONNS {
            let (s, _) = l.accept().unwrap();
            handlers.push(
                std::thread::Builder::new()
                    .stack_size(64 << 10)
                    .spawn(move || echo_conn(s))
                    .unwrap(),
            );
        }
        for h in handlers {
            h.join().unwrap();
        }
    });
    let start = Instant::now();
    let clients: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut conns: Vec<std::net::TcpStream> = (0..CONNS / 8)
                    .map(|_| {
                        let c = std::net::TcpStream::connect(addr).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                        c
                    })
                    .collect();
                let mut gen = Stream(0x9e3779b97f4a7c15 ^ t as u64);
                for round in 0..ROUNDS {
                    let msgs: Vec<Vec<u8>> = conns
                        .iter()
                        .enumerate()
                        .map(|(i, _)| {
                            let mut m = vec![0u8; 1 + (i * 7919 + round * 104729) % (12 << 10)];
                            gen.fill(&mut m);
                            m
                        })
                        .collect();
                    for (c, m) in conns.iter_mut().zip(&msgs) {
                        c.write_all(m).unwrap();
                    }
                    for (c, m) in conns.iter_mut().zip(&msgs) {
                        let mut got = vec![0u8; m.len()];
                        c.read_exact(&mut got).unwrap();
                        assert!(got == *m, "connection content differs");
                    }
                }
                for c in &conns {
                    c.shutdown(Shutdown::Write).unwrap();
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    server.join().unwrap();
    assert!(start.elapsed() < Duration::from_secs(120));
}

const GIB: u64 = 1 << 30;

#[test]
fn one_gib_each_way_with_a_checksum() {
    let s = session();
    let l = TcpListener::bind_with(&s, "127.0.0.1:0", Default::default()).unwrap();
    let addr = l.local_addr().unwrap();
    // Inbound: a kernel client sends 1 GiB; the application reads and checks it.
    let sender = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        let mut gen = Stream(1);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..GIB / (1 << 20) {
            gen.fill(&mut buf);
            c.write_all(&buf).unwrap();
        }
        c.shutdown(Shutdown::Write).unwrap();
        // Then read 1 GiB back from the application (outbound direction).
        let mut gen = Stream(2);
        let mut want = vec![0u8; 1 << 20];
        let mut got = vec![0u8; 1 << 20];
        for _ in 0..GIB / (1 << 20) {
            c.read_exact(&mut got).unwrap();
            gen.fill(&mut want);
            assert!(got == want, "outbound content differs");
        }
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    });
    let (mut conn, _) = l.accept().unwrap();
    let mut gen = Stream(1);
    let mut want = vec![0u8; 1 << 20];
    let mut got = vec![0u8; 1 << 20];
    let mut total = 0u64;
    while total < GIB {
        conn.read_exact(&mut got).unwrap();
        gen.fill(&mut want);
        assert!(got == want, "inbound content differs at {total}");
        total += got.len() as u64;
    }
    assert_eq!(conn.read(&mut got).unwrap(), 0, "EOF after 1 GiB");
    let mut gen = Stream(2);
    for _ in 0..GIB / (1 << 20) {
        gen.fill(&mut want);
        conn.write_all(&want).unwrap();
    }
    conn.shutdown(Shutdown::Write).unwrap();
    sender.join().unwrap();
}

#[test]
fn a_slow_reader_pushes_back_to_the_sender() {
    let s = session();
    let l = TcpListener::bind_with(&s, "127.0.0.1:0", Default::default()).unwrap();
    let addr = l.local_addr().unwrap();
    let rss0 = rss_bytes();
    let writer = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let buf = vec![1u8; 256 << 10];
        let mut sent = 0u64;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            // An error is a write timeout: the window is closed.
            if let Ok(n) = c.write(&buf) {
                sent += n as u64;
            }
        }
        sent
    });
    let (mut conn, _) = l.accept().unwrap();
    let mut buf = vec![0u8; 16 << 10];
    let mut read = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        read += conn.read(&mut buf).unwrap() as u64;
        std::thread::sleep(Duration::from_millis(10));
    }
    let sent = writer.join().unwrap();
    let growth = rss_bytes().saturating_sub(rss0);
    eprintln!("slow reader: read {read} B, sender pushed {sent} B, RSS grew {growth} B");
    // The sender is held to what the reader took plus bounded buffering (receive window,
    // socket buffers), not the ~GB/s it could push.
    assert!(
        sent < read + (64 << 20),
        "sender was not held back: sent {sent}, read {read}"
    );
    assert!(growth < 64 << 20, "memory grew by {growth} bytes");
}
