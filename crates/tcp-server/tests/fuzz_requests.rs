//! Fuzz target for the TCP server's request handling: a hostile session sends random and
//! mutated sequences of requests (well-formed ones on real and forged handles, raw bytes,
//! buffers with junk metadata, descriptors of every kind, clients of its own listeners coming
//! and going) to a real embedded server, and after each sequence a second, well-behaved
//! application on the same worker must still be served (an echo on its established
//! connection within 2 s), and the server must not have panicked.
//!
//! Under `cargo test` (stable Rust) bolero runs the seeds (the security review's triggers)
//! and a bounded number of random inputs; with a fuzzing engine it runs for as long as one
//! likes:
//!
//! ```text
//! cargo install cargo-bolero
//! cargo bolero test --package splitos-tcp-server --test fuzz_requests hostile_request_sequences
//! ```
//!
//! When the tests run as root, the hostile session is another user (65534) than the
//! well-behaved one, so per-user budgets keep them apart as they would two tenants.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use rustix::fd::{AsFd, OwnedFd};
use splitos_m2m::{Channel, ChannelConfig, Message, WaitPolicy};
use splitos_tcp_proto::{BufferMeta, Event, Handle, Request, SockOpt};
use splitos_tcp_server::{ServerConfig, TcpServer};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Requests (counting each of a flood) one input may make.
const MAX_REQUESTS: usize = 400;
/// Random inputs after the seeds under plain `cargo test`, and the most time they may take
/// (whichever ends first; about 140 inputs a second in a debug build here).
const ITERATIONS: usize = 2000;
const TEST_TIME: Duration = Duration::from_secs(12);

/// Requests sent and handles obtained over the whole run (to show it did something).
static REQUESTS: AtomicUsize = AtomicUsize::new(0);
static HANDLES: AtomicUsize = AtomicUsize::new(0);

/// The server, the well-behaved application and its client, shared by every input.
struct Harness {
    server: TcpServer,
    good: RawApp,
    good_conn: Handle,
    good_client: TcpStream,
    good_addr: SocketAddr,
    /// Descriptors a hostile session may pass: a small sealed segment, a huge sparse one, an
    /// unsealed memfd.
    fds: [OwnedFd; 3],
    round: u64,
}

fn harness() -> &'static Mutex<Harness> {
    static H: OnceLock<Mutex<Harness>> = OnceLock::new();
    H.get_or_init(|| {
        let server = start(ServerConfig {
            threads: 1, // the hostile and the good session share the worker
            socket_mode: if can_switch_users() { 0o666 } else { 0o600 },
            persist_grace: Duration::from_millis(500),
            // A responder for the direct path (`ServeFiles`), as `splitos serve` installs one.
            direct: Some(std::sync::Arc::new(ToyDirect::new())),
            ..config("fuzz-requests")
        });
        let mut good = RawApp::connect(server.socket_path());
        let (_, good_addr) = good.listen("127.0.0.1:0", 0).expect("good listen");
        let good_client = TcpStream::connect(good_addr).expect("good client");
        good_client.set_nodelay(true).unwrap();
        good_client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let good_conn = good.accepted();
        let unsealed = rustix::fs::memfd_create("fuzz", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&unsealed, 4096).unwrap();
        Mutex::new(Harness {
            server,
            good,
            good_conn,
            good_client,
            good_addr,
            fds: [sealed_memfd(4096), sealed_memfd(64 << 30), unsealed],
            round: 0,
        })
    })
}

/// The well-behaved application must still be served: one echo on its connection.
fn good_is_served(h: &mut Harness) {
    h.round += 1;
    let msg = h.round.to_le_bytes();
    h.good_client.write_all(&msg).expect("good client writes");
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut got = Vec::new();
    while got.len() < msg.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the well-behaved application was not served within 2 s (round {})",
            h.round
        );
        let (handle, data) = match h.good.chan.recv_timeout(left) {
            Ok(Some(Message::Inline(b))) => match Event::decode(b) {
                Ok(Event::Data { handle, data }) => (handle, data.to_vec()),
                Ok(_) => continue, // accepts of hostile connects, send credit
                Err(e) => panic!("the server sent an undecodable event: {e}"),
            },
            Ok(Some(Message::Buffer(rx))) => match BufferMeta::decode(rx.meta()) {
                Ok(BufferMeta::Data(handle)) => (handle, rx.to_vec()),
                other => panic!("unexpected buffer {other:?}"),
            },
            Ok(None) => continue,
            Err(e) => panic!("the well-behaved application lost its session: {e}"),
        };
        h.good.send(Request::Consumed {
            handle,
            bytes: data.len() as u32,
        });
        if handle == h.good_conn {
            got.extend_from_slice(&data);
        }
    }
    assert_eq!(got, msg, "the well-behaved application got other bytes");
    h.good.send(Request::Send {
        handle: h.good_conn,
        data: &got,
    });
    let mut back = [0u8; 8];
    h.good_client
        .read_exact(&mut back)
        .expect("the echo came back within 2 s");
    assert_eq!(back, msg);
}

/// Reads the input as a sequence of operations.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        (self.u32() as u64) | (self.u32() as u64) << 32
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b.to_vec()
    }
}

/// The hostile session: a raw channel, the handles it was given, its listeners' addresses and
/// the clients the test opened to them.
struct Hostile {
    chan: Channel,
    handles: Vec<Handle>,
    listeners: Vec<SocketAddr>,
    clients: Vec<TcpStream>,
    buf: Vec<u8>,
    requests: usize,
}

impl Hostile {
    fn connect(path: &std::path::Path) -> Option<Hostile> {
        let config = ChannelConfig {
            ring_bytes: 64 << 10,
            buf_size: 16 << 10,
            buf_count: 4,
            wait: WaitPolicy::adaptive(),
        };
        let chan = if can_switch_users() {
            use rustix::process::Uid;
            use rustix::thread::set_thread_res_uid;
            set_thread_res_uid(None, Some(Uid::from_raw(65534)), None).ok()?;
            let c = Channel::connect(path, config);
            set_thread_res_uid(None, Some(Uid::ROOT), None).expect("switch back");
            c
        } else {
            Channel::connect(path, config)
        };
        Some(Hostile {
            chan: chan.ok()?,
            handles: Vec::new(),
            listeners: Vec::new(),
            clients: Vec::new(),
            buf: Vec::new(),
            requests: 0,
        })
    }

    /// A handle: one the server issued (0 the newest), or a forged one.
    fn handle(&self, sel: u8) -> Handle {
        if sel & 0x80 == 0 && !self.handles.is_empty() {
            let n = self.handles.len();
            return self.handles[n - 1 - sel as usize % n];
        }
        [
            Handle::new((sel & 0x7f) as u32, 0),
            Handle::new(0, 1),
            Handle(u64::MAX),
            Handle::new(1, u32::MAX),
        ][sel as usize % 4]
    }

    /// Sends one request; false once the session is gone.
    fn request(&mut self, r: Request<'_>) -> bool {
        self.buf.clear();
        r.encode(&mut self.buf);
        self.raw()
    }

    fn raw(&mut self) -> bool {
        self.requests += 1;
        let len = self.buf.len().min(self.chan.max_message_len());
        self.chan.send(&self.buf[..len]).is_ok()
    }

    /// Takes the events that have arrived, waiting up to `wait` for the first.
    fn events(&mut self, wait: Duration) -> bool {
        let mut first = true;
        loop {
            let m = if first {
                first = false;
                self.chan.recv_timeout(wait)
            } else {
                self.chan.try_recv()
            };
            match m {
                Ok(Some(Message::Inline(b))) => match Event::decode(b) {
                    Ok(Event::Done { handle, local, .. }) => {
                        self.handles.push(handle);
                        if local.port() != 0 {
                            self.listeners.push(local);
                        }
                    }
                    Ok(Event::Accepted { conn, .. }) => self.handles.push(conn),
                    Ok(_) => {}
                    Err(e) => panic!("the server sent an undecodable event: {e}"),
                },
                Ok(Some(Message::Buffer(_))) => {}
                Ok(None) => return true,
                Err(_) => return false,
            }
            self.handles.truncate(256);
            self.listeners.truncate(64);
        }
    }
}

/// Runs one input's operations; returns when the input ends, the request budget is spent or
/// the server dropped the session.
fn run(h: &mut Harness, input: &[u8]) {
    let Some(mut e) = Hostile::connect(h.server.socket_path()) else {
        return; // refused (a budget of sessions): nothing to test
    };
    let mut c = Cursor(input);
    while !c.0.is_empty() && e.requests < MAX_REQUESTS {
        let op = c.u8() % 22;
        let alive = match op {
            0 => {
                let n = c.u8() as usize % 80;
                let name = c.bytes(n);
                e.request(Request::Hello {
                    version: c.u16(),
                    name: &name,
                })
            }
            1 => {
                let addr: SocketAddr = match c.u8() % 4 {
                    0 => "127.0.0.1:0".parse().unwrap(),
                    1 => "[::1]:0".parse().unwrap(),
                    2 => "0.0.0.0:0".parse().unwrap(),
                    _ => e
                        .listeners
                        .first()
                        .copied()
                        .unwrap_or("127.0.0.1:0".parse().unwrap()),
                };
                let (flags, backlog) = (c.u8() as u32 & 7, c.u8() as u32);
                e.request(Request::Listen {
                    req: c.u32(),
                    addr,
                    backlog,
                    flags,
                }) && e.events(Duration::from_millis(20))
            }
            2 => {
                let addr = match c.u8() % 3 {
                    0 => h.good_addr,
                    1 => "127.0.0.1:1".parse().unwrap(),
                    _ => e.listeners.first().copied().unwrap_or(h.good_addr),
                };
                e.request(Request::Connect { req: c.u32(), addr })
                    && e.events(Duration::from_millis(20))
            }
            3 => {
                let handle = e.handle(c.u8());
                let data = vec![b'd'; c.u16() as usize % 16000];
                e.request(Request::Send {
                    handle,
                    data: &data,
                })
            }
            4 => {
                let handle = e.handle(c.u8());
                e.request(Request::Send { handle, data: &[] })
            }
            5 => {
                let handle = e.handle(c.u8());
                e.request(Request::ShutdownWrite { handle })
            }
            6 => {
                let handle = e.handle(c.u8());
                e.request(Request::Close { handle })
            }
            7 => {
                let handle = e.handle(c.u8());
                let opt = match c.u8() % 4 {
                    0 => SockOpt::NoDelay(true),
                    1 => SockOpt::NoDelay(false),
                    2 => SockOpt::KeepAlive(true),
                    _ => SockOpt::KeepAlive(false),
                };
                e.request(Request::SetOption {
                    req: c.u32(),
                    handle,
                    opt,
                })
            }
            8 => {
                let handle = e.handle(c.u8());
                e.request(Request::Consumed {
                    handle,
                    bytes: c.u32(),
                })
            }
            9 => {
                let handle = e.handle(c.u8());
                let file = c.u8() as u64 % 4;
                let offset = match c.u8() % 4 {
                    0 => 0,
                    1 => 1,
                    2 => 4095,
                    _ => c.u64(),
                };
                let len = match c.u8() % 5 {
                    0 => 0,
                    1 => 1,
                    2 => 4096,
                    3 => u64::MAX,
                    _ => c.u64(),
                };
                e.request(Request::SendFile {
                    handle,
                    file,
                    offset,
                    len,
                })
            }
            10 => e.request(Request::ReleaseFile {
                file: c.u8() as u64 % 4,
            }),
            11 => {
                let handle = e.handle(c.u8());
                e.request(Request::Pause { handle })
            }
            12 => {
                let handle = e.handle(c.u8());
                let n = c.u8() as usize;
                let data = c.bytes(n);
                e.request(Request::Handoff {
                    handle,
                    data: &data,
                })
            }
            13 => {
                // The route's source is opaque to the server (the test responder ignores it).
                let listener = e.handle(c.u8());
                let socket = format!("/fuzz/{:x}.sock", c.u32());
                e.request(Request::ServeFiles {
                    req: c.u32(),
                    listener,
                    header_timeout_s: c.u32(),
                    idle_timeout_s: c.u32(),
                    socket: socket.as_bytes(),
                })
            }
            14 => {
                let handle = e.handle(c.u8());
                e.request(Request::ServeDirect {
                    handle,
                    received: c.u64(),
                })
            }
            15 => {
                let tag = c.u8() as u64 % 4;
                let fd = h.fds[c.u8() as usize % 3].as_fd();
                e.chan.send_fds(tag, &[fd]).is_ok()
            }
            16 => {
                let n = c.u8() as usize;
                e.buf = c.bytes(n);
                e.raw()
            }
            17 => {
                let handle = e.handle(c.u8());
                let meta = match c.u8() % 3 {
                    0 => BufferMeta::Send(handle).encode().to_vec(),
                    1 => BufferMeta::Data(handle).encode().to_vec(),
                    _ => c.bytes(12),
                };
                let len = c.u16() as usize;
                match e.chan.alloc_buffer() {
                    Ok(Some(b)) => {
                        let len = len.min(b.capacity());
                        e.requests += 1;
                        e.chan.send_buffer_with(b, len, &meta).is_ok()
                    }
                    Ok(None) => true,
                    Err(_) => false,
                }
            }
            18 => {
                if let Some(&addr) = e.listeners.get(c.u8() as usize % e.listeners.len().max(1)) {
                    if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(50))
                    {
                        // Requests the test responder answers on a direct route, or other bytes.
                        let n = c.u8() as usize;
                        let mut bytes = c.bytes(n);
                        if n % 3 == 0 {
                            bytes = b"GET\n".repeat(n / 3 + 1);
                        }
                        let _ = s.write_all(&bytes);
                        if e.clients.len() < 16 {
                            e.clients.push(s);
                        }
                    }
                }
                e.events(Duration::from_millis(10))
            }
            19 => {
                if !e.clients.is_empty() {
                    let i = c.u8() as usize % e.clients.len();
                    e.clients.swap_remove(i);
                }
                true
            }
            20 => e.events(Duration::from_millis(5)),
            _ => {
                let handle = e.handle(c.u8());
                let n = c.u8() as usize;
                (0..n).all(|_| {
                    e.requests < MAX_REQUESTS
                        && e.request(Request::Consumed {
                            handle,
                            bytes: 1 << 16,
                        })
                })
            }
        };
        if !alive {
            break;
        }
    }
    let _ = e.events(Duration::from_millis(1));
    REQUESTS.fetch_add(e.requests, Ordering::Relaxed);
    HANDLES.fetch_add(e.handles.len(), Ordering::Relaxed);
    // The hostile session is still connected while the good one is checked.
    good_is_served(h);
    drop(e);
}

fn check(input: &[u8]) {
    let mut h = match harness().lock() {
        Ok(h) => h,
        Err(poisoned) => poisoned.into_inner(),
    };
    run(&mut h, input);
}

/// Builds an input from operations (op code, then its argument bytes).
fn ops(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn hostile_request_sequences() {
    // The harness's server lives in a static, which is never dropped: its files go with this.
    let _files = RemoveOnDrop(socket_path("fuzz-requests"));
    // Seeds: the security review's triggers, in this target's operation encoding.
    let listen_accept: &[u8] = &[1, 0, 0, 64, 1, 0, 0, 0, 18, 0, 3, b'a', b'b', b'c', 20];
    let seeds = [
        // A9: an empty send, then a close, on an accepted connection.
        ops(&[listen_accept, &[4, 0, 6, 0, 20]]),
        // A7: Consumed on forged handles, flooded.
        ops(&[&[21, 0x85, 200, 21, 0x86, 200]]),
        // A2: pause, then acknowledge what was never delivered, while the client writes.
        ops(&[
            listen_accept,
            &[11, 0, 21, 0, 100, 18, 0, 200],
            &[b'x'; 200][..],
        ]),
        // A2/A4: a sealed segment, then one-byte ranges of it on a connection.
        ops(&[listen_accept, &[15, 1, 0], &[9, 0, 1, 1, 1].repeat(50)]),
        // A4: a huge sparse segment, and an unsealed one.
        ops(&[
            listen_accept,
            &[15, 2, 1, 9, 0, 2, 0, 1, 15, 3, 2, 9, 0, 3, 0, 1],
        ]),
        // A11: listen and close, over and over.
        [1u8, 0, 0, 8, 1, 0, 0, 0, 20, 6, 0].repeat(40),
        // A19: a name with escape sequences.
        ops(&[&[0, 22], b"\x1b]0;x\x07\x1b[2J\n\r\0evil-name", &[1, 0, 20]]),
        // A5/A10: a persistent listener handed off (parked), repeatedly.
        [1u8, 0, 4, 8, 1, 0, 0, 0, 20, 12, 0, 0].repeat(20),
        // A1: the direct path on a listener, then pipelined requests it answers, unread.
        ops(&[
            &[
                1, 0, 0, 8, 1, 0, 0, 0, 20, 13, 0, 1, 2, 3, 4, 0, 0, 0, 0, 5, 0, 0, 0, 5, 0, 0, 0,
                20, 18, 0, 255,
            ],
            &[0u8; 255],
            &[20],
        ]),
        // Undecodable requests and buffers with junk metadata.
        ops(&[&[
            16, 5, 200, 1, 2, 3, 4, 16, 1, 2, 17, 0x81, 2, 0, 16, 17, 0, 0, 0, 1,
        ]]),
    ];
    let start = Instant::now();
    for seed in &seeds {
        check(seed);
    }
    // Half of the random inputs start with a listener and a client on it, so that what
    // follows has real handles to work on.
    let preamble = listen_accept.to_vec();
    bolero::check!()
        .with_iterations(ITERATIONS)
        .with_test_time(TEST_TIME)
        .with_max_len(512)
        .for_each(|input: &[u8]| match input.split_first() {
            Some((b, rest)) if b & 1 == 1 => check(&[&preamble[..], rest].concat()),
            _ => check(input),
        });
    eprintln!(
        "fuzz_requests: {} seeds and up to {ITERATIONS} inputs in {:?}: {} requests, {} handles",
        seeds.len(),
        start.elapsed(),
        REQUESTS.load(Ordering::Relaxed),
        HANDLES.load(Ordering::Relaxed),
    );
}
