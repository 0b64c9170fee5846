//! The load generator: a separate process that keeps N connections busy with 64-byte
//! request/response exchanges (one outstanding request per connection, keep-alive) and reports
//! the rate and the latency distribution.
//!
//! One mio event loop drives every connection, so the client's own cost stays small and
//! constant across the servers it is compared on.

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub const MSG: usize = 64;

pub struct ClientResult {
    pub requests: u64,
    pub elapsed: Duration,
    pub p50_us: f64,
    pub p99_us: f64,
}

struct Conn {
    sock: TcpStream,
    sent_at: Instant,
    got: usize,
    seq: u64,
}

fn request(seq: u64) -> [u8; MSG] {
    let mut m = [0u8; MSG];
    for (i, b) in m.iter_mut().enumerate() {
        *b = (seq as usize).wrapping_add(i * 31) as u8;
    }
    m[..8].copy_from_slice(&seq.to_le_bytes());
    m
}

/// Runs `conns` connections against `addr`: `warmup`, then measures for `duration`.
pub fn run(
    addr: SocketAddr,
    conns: usize,
    warmup: Duration,
    duration: Duration,
) -> io::Result<ClientResult> {
    let mut poll = Poll::new()?;
    let mut list = Vec::with_capacity(conns);
    for i in 0..conns {
        let std = std::net::TcpStream::connect(addr)?;
        std.set_nodelay(true)?;
        std.set_nonblocking(true)?;
        let mut sock = TcpStream::from_std(std);
        poll.registry()
            .register(&mut sock, Token(i), Interest::READABLE)?;
        list.push(Conn {
            sock,
            sent_at: Instant::now(),
            got: 0,
            seq: i as u64 * 1_000_000_000,
        });
    }
    for c in &mut list {
        c.sent_at = Instant::now();
        c.sock.write_all(&request(c.seq))?;
    }
    let mut events = Events::with_capacity(1024);
    let mut buf = [0u8; MSG];
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut lat_ns: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut requests = 0u64;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        poll.poll(&mut events, Some(end - now))?;
        for ev in events.iter() {
            let c = &mut list[ev.token().0];
            loop {
                match c.sock.read(&mut buf[c.got..]) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "server closed a connection",
                        ))
                    }
                    Ok(n) => {
                        c.got += n;
                        if c.got < MSG {
                            continue;
                        }
                        if buf != request(c.seq) {
                            return Err(io::Error::new(io::ErrorKind::InvalidData, "wrong echo"));
                        }
                        let now = Instant::now();
                        if now >= measure_from {
                            requests += 1;
                            lat_ns.push((now - c.sent_at).as_nanos().min(u32::MAX as u128) as u32);
                        }
                        c.got = 0;
                        c.seq += 1;
                        c.sent_at = now;
                        c.sock.write_all(&request(c.seq))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    let elapsed = start.elapsed().saturating_sub(warmup);
    lat_ns.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat_ns.is_empty() {
            return 0.0;
        }
        let i = ((lat_ns.len() as f64 * p) as usize).min(lat_ns.len() - 1);
        lat_ns[i] as f64 / 1000.0
    };
    Ok(ClientResult {
        requests,
        elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}
