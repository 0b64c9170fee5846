//! The ceiling of the `http` suite: the least a static HTTP server can do per request on this
//! machine. It reads requests only as far as the end of each head (`\r\n\r\n`), never parses
//! them, and answers every one with the same response — a fixed head and `size` bytes — from
//! memory, with non-blocking `write` from an epoll loop (mio) per thread, each on its own
//! `SO_REUSEPORT` listener so the kernel spreads connections. No file system, no validators,
//! no timeouts: whatever a real server spends beyond this is the price of being a server.
//!
//! epoll was chosen over io_uring for it: the echo suite measured the io_uring echo server at
//! 0.69–0.76x of the epoll one on this machine (one request per connection per pass leaves
//! io_uring's batching nothing to batch).

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

const LISTENER: Token = Token(usize::MAX);

/// One connection: bytes of a head not yet complete, and responses owed.
struct Conn {
    stream: TcpStream,
    /// The tail of the input that may hold the start of a `\r\n\r\n` (at most 3 bytes).
    carry: Vec<u8>,
    /// Responses still to write, and how far into the first one we are.
    owed: u64,
    written: usize,
    writable_wanted: bool,
}

/// Runs the ceiling server on 127.0.0.1:`port` with `threads` event loops until killed.
pub fn main(port: u16, size: usize, threads: usize) -> Result<(), String> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nServer: ceiling\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
    );
    let mut response = head.into_bytes();
    response.extend((0..size).map(|i| (i % 251) as u8));
    let response: Arc<[u8]> = response.into();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut handles = Vec::new();
    for _ in 0..threads.max(1) {
        let listener = reuseport_listener(addr)?;
        let response = response.clone();
        handles.push(std::thread::spawn(move || event_loop(listener, &response)));
    }
    for h in handles {
        h.join()
            .map_err(|_| "a ceiling thread panicked".to_string())??;
    }
    Ok(())
}

fn reuseport_listener(addr: SocketAddr) -> Result<TcpListener, String> {
    use rustix::net::{sockopt, AddressFamily, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| e.to_string())?;
    sockopt::set_socket_reuseaddr(&fd, true).map_err(|e| e.to_string())?;
    sockopt::set_socket_reuseport(&fd, true).map_err(|e| e.to_string())?;
    rustix::net::bind(&fd, &addr).map_err(|e| format!("bind {addr}: {e}"))?;
    rustix::net::listen(&fd, 4096).map_err(|e| e.to_string())?;
    Ok(TcpListener::from_std(std::net::TcpListener::from(fd)))
}

fn event_loop(mut listener: TcpListener, response: &[u8]) -> Result<(), String> {
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(|e| e.to_string())?;
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e.to_string());
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                while let Ok((mut stream, _)) = listener.accept() {
                    let _ = stream.set_nodelay(true);
                    let i = conns.iter().position(|c| c.is_none()).unwrap_or_else(|| {
                        conns.push(None);
                        conns.len() - 1
                    });
                    if poll
                        .registry()
                        .register(&mut stream, Token(i), Interest::READABLE)
                        .is_ok()
                    {
                        conns[i] = Some(Conn {
                            stream,
                            carry: Vec::new(),
                            owed: 0,
                            written: 0,
                            writable_wanted: false,
                        });
                    }
                }
                continue;
            }
            let i = ev.token().0;
            let Some(Some(c)) = conns.get_mut(i) else {
                continue;
            };
            if !serve(c, &mut buf, response) {
                if let Some(mut c) = conns[i].take() {
                    let _ = poll.registry().deregister(&mut c.stream);
                }
                continue;
            }
            let want = c.owed > 0;
            if want != c.writable_wanted {
                c.writable_wanted = want;
                let interest = if want {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                let _ = poll
                    .registry()
                    .reregister(&mut c.stream, Token(i), interest);
            }
        }
    }
}

/// Reads what there is, counts completed heads, writes what is owed. False: close it.
fn serve(c: &mut Conn, buf: &mut [u8], response: &[u8]) -> bool {
    loop {
        match c.stream.read(buf) {
            Ok(0) => return false,
            Ok(n) => {
                c.owed += count_heads(&mut c.carry, &buf[..n]);
                if n < buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    while c.owed > 0 {
        match c.stream.write(&response[c.written..]) {
            Ok(n) => {
                c.written += n;
                if c.written == response.len() {
                    c.written = 0;
                    c.owed -= 1;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    true
}

/// Counts the `\r\n\r\n` sequences in `carry` + `data`, keeping the last 3 bytes for next time.
fn count_heads(carry: &mut Vec<u8>, data: &[u8]) -> u64 {
    const END: &[u8] = b"\r\n\r\n";
    carry.extend_from_slice(data);
    let mut n = 0;
    let mut at = 0;
    while let Some(p) = carry[at..].windows(4).position(|w| w == END) {
        n += 1;
        at += p + 4;
    }
    let keep = (carry.len() - at).min(3);
    carry.drain(..carry.len() - keep);
    n
}

#[cfg(test)]
mod tests {
    use super::count_heads;

    #[test]
    fn heads_are_counted_across_reads() {
        let mut carry = Vec::new();
        let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(count_heads(&mut carry, req), 1);
        let two = [&req[..], &req[..]].concat();
        let (a, b) = two.split_at(req.len() + 25); // split inside the second terminator
        assert_eq!(count_heads(&mut carry, a), 1);
        assert_eq!(count_heads(&mut carry, b), 1);
        assert!(carry.len() <= 3);
    }
}
