//! Fuzz targets for the file-server protocol, from both ends.
//!
//! - `requests`: random and mutated request bytes (and stray descriptors) from one reader into
//!   a real file server. The server must answer each with a valid reply or drop that reader,
//!   never panic, and a second, well-behaved reader must be served correctly after every input.
//! - `replies`: random and mutated reply bytes (with descriptors of every kind, or none) from a
//!   fake server into a real [`FileClient`]: it must return views or errors, never panic or
//!   hang, and whatever view it returns must read without panicking.
//!
//! Both are seeded with the review's triggers (items A3, A8, A12, A15, S6). Under `cargo test`
//! (stable Rust) bolero runs a bounded number of random and mutated inputs; with a fuzzing
//! engine it runs for as long as one likes:
//!
//! ```text
//! cargo install cargo-bolero
//! cargo bolero test --package splitos-file-server --test fuzz_protocol requests   # libFuzzer (nightly)
//! cargo bolero test --package splitos-file-server --test fuzz_protocol replies --engine afl
//! ```

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{fcntl_add_seals, ftruncate, memfd_create, MemfdFlags, SealFlags};
use splitos_file_server::client::{ClientConfig, FileClient};
use splitos_file_server::directory::DirectoryWriter;
use splitos_file_server::proto::{FailCode, Lookup, Open, Reply, DIRECTORY_TAG};
use splitos_file_server::server::{FileServer, FileServerConfig};
use splitos_m2m::{Channel, ChannelConfig, Listener, ListenerConfig, Message, WaitPolicy};
use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Removes a directory when dropped (also when the test fails).
struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn base(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("splitos-fuzzproto-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 % 251) as u8).collect()
}

fn encode_open(req: u32, chunk: u32, path: &str) -> Vec<u8> {
    let mut b = Vec::new();
    Open { req, chunk, path }.encode(&mut b);
    b
}

fn encode_lookup(req: u32, path: &str) -> Vec<u8> {
    let mut b = Vec::new();
    Lookup { req, path }.encode(&mut b);
    b
}

fn encode_reply(r: Reply) -> Vec<u8> {
    let mut b = Vec::new();
    r.encode(&mut b);
    b
}

/// A memfd of `len` bytes (sparse), sealed against every change if `seal`.
fn memfd(len: u64, seal: bool) -> OwnedFd {
    let fd = memfd_create("fuzz", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    ftruncate(&fd, len).unwrap();
    if seal {
        fcntl_add_seals(
            &fd,
            SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
        )
        .unwrap();
    }
    fd
}

// ---------------------------------------------------------------------------------------------
// Requests into a real server.

/// Missing names on `index.html`'s home slot in a directory of 64 slots (A15's trigger).
fn colliding_names() -> Vec<String> {
    use splitos_file_server::directory::key_hash;
    let home = key_hash("index.html", 0) & 63;
    (0u64..)
        .map(|i| format!("x{i}.html"))
        .filter(|n| key_hash(n, 0) & 63 == home)
        .take(8)
        .collect()
}

struct Served {
    _dir: Dir,
    sock: PathBuf,
    big: Vec<u8>,
    _server: FileServer,
    good: FileClient,
    evil: Option<Channel>,
    next_check: u32,
}

impl Served {
    fn new() -> Served {
        let dir = base("requests");
        let root = dir.0.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("index.html"), b"<h1>fuzz</h1>").unwrap();
        let big = pattern((5 << 12) + 3); // 6 chunks of 4 KiB
        std::fs::write(root.join("big.bin"), &big).unwrap();
        std::fs::write(root.join("huge.bin"), pattern(256 << 10)).unwrap(); // by reference
        std::fs::write(dir.0.join("secret"), b"never").unwrap();
        std::os::unix::fs::symlink("../secret", root.join("escape")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let sock = dir.0.join("files.sock");
        let mut cfg = FileServerConfig::new(root, sock.clone());
        cfg.chunk_size = 4096;
        cfg.cache_bytes = 1 << 20;
        cfg.by_reference_above = Some(64 << 10);
        cfg.directory_slots = 64;
        cfg.revalidate_every = Duration::from_millis(50);
        let server = FileServer::start(cfg).unwrap();
        let good = FileClient::connect(&sock).unwrap();
        Served {
            _dir: dir,
            sock,
            big,
            _server: server,
            good,
            evil: None,
            next_check: 0,
        }
    }

    fn evil(&mut self) -> &mut Channel {
        self.evil.get_or_insert_with(|| {
            Channel::connect(
                &self.sock,
                ChannelConfig {
                    ring_bytes: 64 << 10,
                    buf_size: 4096,
                    buf_count: 1,
                    wait: WaitPolicy::adaptive(),
                },
            )
            .unwrap()
        })
    }

    /// One input: sent as a request (after a stray descriptor if its first byte says so); the
    /// server must answer with a reply that decodes, or drop the reader; then the good reader
    /// must be served. An input whose first byte has 0x40 set shapes a well-formed request
    /// (see `shaped_request`); the others are sent as they are.
    fn check(&mut self, input: &[u8]) {
        let stray = input.first().is_some_and(|b| b & 0x80 != 0);
        let shaped;
        let input = match input.split_first() {
            Some((first, rest)) if first & 0x40 != 0 => {
                shaped = shaped_request(rest);
                &shaped[..]
            }
            _ => input,
        };
        let evil = self.evil();
        let max = evil.max_message_len();
        let msg = &input[..input.len().min(max)];
        let mut alive = true;
        if stray {
            alive &= evil.send_fds(7, &[memfd(4096, false).as_fd()]).is_ok();
        }
        alive &= evil.send(msg).is_ok();
        while alive {
            match evil.recv_timeout(Duration::from_secs(5)) {
                Ok(Some(Message::Inline(b))) => {
                    let r = Reply::decode(b);
                    assert!(r.is_ok(), "the server sent an undecodable reply: {r:?}");
                    // Drop any descriptor it came with.
                    while let Ok(Some(_)) = evil.try_recv_fds() {}
                    break;
                }
                Ok(Some(Message::Buffer(_))) => panic!("the server sent a buffer"),
                Ok(None) => panic!("no reply within 5 s: the server is stuck"),
                Err(_) => alive = false, // dropped: allowed, for this reader only
            }
        }
        if !alive {
            self.evil = None;
        }
        // The well-behaved reader is served, and correctly.
        let v = self.good.open("index.html").unwrap();
        assert_eq!(v.to_vec(), b"<h1>fuzz</h1>");
        self.next_check += 1;
        if self.next_check % 8 == 0 {
            let v = self.good.open("big.bin").unwrap();
            let mut buf = [0u8; 10];
            assert_eq!(v.read_at(8190, &mut buf), 10);
            assert_eq!(&buf, &self.big[8190..8200]);
            let h = self.good.open("huge.bin").unwrap();
            assert!(h.is_by_reference());
            assert_eq!(h.read_at(100_000, &mut buf), 10);
        }
    }
}

/// A well-formed request whose kind, path and chunk come from `b`: paths the server has (in
/// one chunk, several, by reference), a directory, a symlink out, a FIFO, traversal and NUL
/// tricks, and names colliding in the directory, each possibly with bytes of `b` appended.
fn shaped_request(b: &[u8]) -> Vec<u8> {
    const PATHS: [&str; 14] = [
        "index.html",
        "big.bin",
        "huge.bin",
        "sub/",
        "sub",
        "escape",
        "fifo",
        "../secret",
        "sub/../../secret",
        "a\0b",
        "",
        "./sub//./x.html",
        "index.html.gz",
        "x0.html",
    ];
    let pick = |i: usize| b.get(i).copied().unwrap_or(0) as usize;
    let req = u32::from_le_bytes([pick(1) as u8, pick(2) as u8, 0, 0]);
    let mut path = PATHS[pick(3) % PATHS.len()].to_string();
    if pick(4) % 4 == 0 {
        path.push_str(&String::from_utf8_lossy(b.get(6..).unwrap_or(&[])));
    }
    if pick(4) % 8 == 1 {
        path = colliding_names()[pick(5) % 8].clone();
    }
    let chunk = match pick(5) % 5 {
        0 => u32::MAX,
        n => (n as u32 - 1) * (pick(0) as u32 % 4),
    };
    if pick(0) % 2 == 0 {
        encode_lookup(req, &path)
    } else {
        encode_open(req, chunk, &path)
    }
}

#[test]
fn requests() {
    let served = AssertUnwindSafe(RefCell::new(Served::new()));
    let mut seeds: Vec<Vec<u8>> = vec![
        encode_open(1, u32::MAX, "big.bin"),
        encode_open(2, 6, "big.bin"), // just past the last chunk
        encode_open(3, 3, "big.bin"),
        encode_open(4, 1, "huge.bin"),
        encode_open(5, 0, "../secret"),
        encode_open(6, 0, "a\0b"),
        encode_lookup(7, "%2e%2e/secret"),
        encode_lookup(8, "escape"),
        encode_lookup(9, "fifo"),
        encode_lookup(10, "sub/"),
        encode_lookup(11, ""),
        encode_lookup(12, "/etc/passwd"),
        encode_lookup(13, &"x".repeat(5000)),
        encode_lookup(14, "index.html.gz"),
        encode_lookup(15, "big.bin"),
        encode_lookup(16, "huge.bin"),
        vec![],
        vec![1],
        vec![2, 0, 0],
        vec![200, 1, 2, 3],
        vec![64; 57],                       // a reply, sent as a request
        vec![0x81, 0, 0, 0, 0, 0, 0, 0, 0], // with a stray descriptor
    ];
    for (i, n) in colliding_names().iter().enumerate() {
        seeds.push(encode_lookup(100 + i as u32, n));
    }
    for s in &seeds {
        served.borrow_mut().check(s);
    }
    bolero::check!()
        .with_iterations(4000)
        .with_max_len(512)
        .for_each(|input: &[u8]| served.borrow_mut().check(input));
    eprintln!("requests: {} inputs checked", served.borrow().next_check);
}

// ---------------------------------------------------------------------------------------------
// Replies into a real client.

/// A server that answers every request with the current input: its first byte chooses the
/// descriptor sent before the reply, the rest is the reply (its request id patched to the
/// request's, so that it is taken as the answer and checked, not discarded as stray).
struct FakeServer {
    _dir: Dir,
    sock: PathBuf,
    input: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The descriptor the fake sends before a reply, chosen by `mode`.
fn descriptor(mode: u8, reply: &[u8], plain: &std::fs::File) -> Option<(u64, OwnedFd)> {
    let decoded = Reply::decode(reply).ok();
    let tag = decoded.and_then(|r| r.descriptor()).unwrap_or(3);
    let announced = match decoded {
        Some(Reply::Opened { chunk_len, .. }) if chunk_len <= 64 << 20 => chunk_len,
        _ => 4096,
    };
    let fd = match mode % 6 {
        0 => return None,
        1 => memfd(announced, true),
        2 => memfd(4096, true),
        3 => memfd(announced, false),
        4 => plain.try_clone().ok()?.into(),
        _ => rustix::pipe::pipe().ok()?.0,
    };
    Some((tag, fd))
}

impl FakeServer {
    fn new() -> FakeServer {
        let dir = base("replies");
        let sock = dir.0.join("files.sock");
        let plain_path = dir.0.join("plain.bin");
        std::fs::write(&plain_path, pattern(10_000)).unwrap();
        let plain = std::fs::File::open(&plain_path).unwrap();
        let listener = Listener::bind(&sock, ListenerConfig::default()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let input = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (i2, s2) = (input.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let writer = DirectoryWriter::create(64).unwrap();
            let mut chans: Vec<Channel> = Vec::new();
            while !s2.load(Ordering::Relaxed) {
                if let Ok(inc) = listener.accept() {
                    if let Ok(mut c) = inc.establish() {
                        if c.send_fds(DIRECTORY_TAG, &[writer.fd()]).is_ok() {
                            chans.push(c);
                        }
                    }
                }
                let mut idle = true;
                chans.retain_mut(|c| {
                    let req = match c.try_recv() {
                        Ok(Some(Message::Inline(b))) => b.get(1..5).map(|r| r.to_vec()),
                        Ok(_) => return true,
                        Err(_) => return false,
                    };
                    idle = false;
                    let input = i2.lock().map(|v| v.clone()).unwrap_or_default();
                    let (mode, reply) = input.split_first().map_or((0, &[][..]), |(m, r)| (*m, r));
                    let mut reply = reply.to_vec();
                    if let (Some(req), Some(field)) = (req, reply.get_mut(1..5)) {
                        field.copy_from_slice(&req);
                    }
                    if let Some((tag, fd)) = descriptor(mode, &reply, &plain) {
                        let _ = c.send_fds(tag, &[fd.as_fd()]);
                    }
                    c.send(&reply).is_ok()
                });
                if idle {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        FakeServer {
            _dir: dir,
            sock,
            input,
            stop,
            thread: Some(thread),
        }
    }
}

struct Reader {
    fake: FakeServer,
    client: Option<FileClient>,
    plain_ino: u64,
    checked: u64,
    opened: u64,
}

/// A well-formed reply whose kind and fields come from `b` (most fields small, so that many
/// are plausible and reach the client's checks and views), after the descriptor mode byte.
fn shaped(b: &[u8], plain_ino: u64) -> Vec<u8> {
    let mut it = b.iter().copied().chain(std::iter::repeat(0));
    let mut num = || {
        let bits = it.next().unwrap_or(0) % 65;
        let v = (0..8).fold(0u64, |v, _| v << 8 | it.next().unwrap_or(0) as u64);
        if bits == 64 {
            v
        } else {
            v & ((1u64 << bits) - 1)
        }
    };
    let kind = num() % 4;
    let reply = match kind {
        0 => {
            let (id, chunk) = (num(), (num() % 3) as u32);
            let chunk_size = [4096, 65536, 4 << 20, num()][(num() % 4) as usize];
            let len = num() % (chunk_size.min(1 << 20) + 1);
            let size =
                [len, chunk_size.wrapping_mul(3).wrapping_add(len), num()][(num() % 3) as usize];
            Reply::Opened {
                req: 0,
                id,
                chunk,
                chunk_len: len,
                chunk_size,
                file_size: size,
                mtime_ns: 1,
                ino: 2,
            }
        }
        1 => {
            let chunk_size = [4096, 65536, num()][(num() % 3) as usize];
            let size = [chunk_size.wrapping_mul(2 + num() % 8), num()][(num() % 2) as usize];
            Reply::Info {
                req: 0,
                chunk_size,
                file_size: size.wrapping_sub(num() % 4096),
                mtime_ns: 1,
                ino: 2,
            }
        }
        2 => Reply::OpenedFile {
            req: 0,
            id: num(),
            file_size: num(),
            mtime_ns: 1,
            ino: if num() % 2 == 0 { plain_ino } else { num() },
        },
        _ => Reply::Failed {
            req: 0,
            code: FailCode::from_u8((num() % 9 + 1) as u8).unwrap_or(FailCode::Io),
        },
    };
    encode_reply(reply)
}

impl Reader {
    fn check(&mut self, input: &[u8]) {
        // The decoder alone: what decodes re-encodes to the same bytes.
        if let Ok(r) = Reply::decode(input) {
            assert_eq!(encode_reply(r), input, "{r:?}");
        }
        // Half the inputs are raw bytes after the mode byte, half shape a reply.
        let sent = match input.split_first() {
            Some((mode, rest)) if mode & 0x40 != 0 => {
                let reply = shaped(rest, self.plain_ino);
                // Mostly the descriptor the reply's kind calls for; otherwise the mode's own.
                let fitting = match reply.first() {
                    Some(64) => 1, // Opened: a sealed memfd of its length
                    Some(67) => 4, // OpenedFile: a regular file
                    _ => 0,
                };
                let mut v = vec![if mode & 0x18 != 0 { fitting } else { *mode }];
                v.extend(reply);
                v
            }
            _ => input.to_vec(),
        };
        if let Ok(mut v) = self.fake.input.lock() {
            *v = sent;
        }
        let sock = self.fake.sock.clone();
        let client = self.client.get_or_insert_with(|| {
            let cfg = ClientConfig {
                reply_timeout: Duration::from_millis(200),
                ..ClientConfig::default()
            };
            FileClient::connect_with(&sock, cfg).unwrap()
        });
        self.checked += 1;
        if let Ok(v) = client.open("f.bin") {
            self.opened += 1;
            let mut buf = [0u8; 64];
            let _ = v.read_at(0, &mut buf);
            let _ = v.read_at(v.len().saturating_sub(1), &mut buf);
            let _ = v.ranges(v.len() / 2, v.len().min(1));
            let _ = v.ranges(0, u64::MAX);
            let _ = v.pieces(0, v.len().min(100));
        }
        if client.is_gone() {
            self.client = None;
        }
    }
}

/// The input for a reply: descriptor mode, then the reply's bytes.
fn reply_seed(mode: u8, r: Reply) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend(encode_reply(r));
    v
}

#[allow(clippy::too_many_arguments)]
fn opened(id: u64, chunk: u32, chunk_len: u64, chunk_size: u64, size: u64) -> Reply {
    Reply::Opened {
        req: 1,
        id,
        chunk,
        chunk_len,
        chunk_size,
        file_size: size,
        mtime_ns: 1,
        ino: 2,
    }
}

#[test]
fn replies() {
    let reader = AssertUnwindSafe(RefCell::new(Reader {
        fake: FakeServer::new(),
        client: None,
        plain_ino: 0,
        checked: 0,
        opened: 0,
    }));
    let ino = |p: &PathBuf| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map(|m| m.ino()).unwrap_or(0)
    };
    let plain_ino = ino(&reader.borrow().fake._dir.0.join("plain.bin"));
    reader.borrow_mut().plain_ino = plain_ino;
    let seeds = vec![
        // A3: a zero-length chunk of a 1-byte file (div_ceil by zero).
        reply_seed(1, opened(7, 0, 0, 0, 1)),
        // A3: 2^50 chunks of 4 KiB.
        reply_seed(1, opened(7, 0, 4096, 4096, 1 << 62)),
        // A3: a 3 GiB segment.
        reply_seed(2, opened(7, 0, 3 << 30, 3 << 30, 3 << 30)),
        // A reply for another chunk; id 0; the reserved "absent" id.
        reply_seed(1, opened(7, 5, 4096, 4096, 4096)),
        reply_seed(1, opened(0, 0, 4096, 4096, 4096)),
        reply_seed(1, opened(u64::MAX, 0, 4096, 4096, 4096)),
        // A sound one-chunk file, and the same with an unsealed or missing descriptor.
        reply_seed(1, opened(7, 0, 100, 4 << 20, 100)),
        reply_seed(3, opened(7, 0, 100, 4 << 20, 100)),
        reply_seed(0, opened(7, 0, 100, 4 << 20, 100)),
        // S6 / A8: a chunked file whose chunks (fetched later) then come back as the same
        // reply (chunk 0 of the wrong length for chunk 1).
        reply_seed(
            0,
            Reply::Info {
                req: 1,
                chunk_size: 4096,
                file_size: 10_000,
                mtime_ns: 1,
                ino: 2,
            },
        ),
        reply_seed(
            0,
            Reply::Info {
                req: 1,
                chunk_size: 0,
                file_size: 10,
                mtime_ns: 1,
                ino: 2,
            },
        ),
        reply_seed(
            0,
            Reply::Info {
                req: 1,
                chunk_size: 4096,
                file_size: u64::MAX,
                mtime_ns: 1,
                ino: 2,
            },
        ),
        // By reference: a regular file of the right inode, of another, a pipe, no descriptor.
        reply_seed(
            4,
            Reply::OpenedFile {
                req: 1,
                id: 9,
                file_size: 10_000,
                mtime_ns: 1,
                ino: plain_ino,
            },
        ),
        reply_seed(
            4,
            Reply::OpenedFile {
                req: 1,
                id: 9,
                file_size: u64::MAX,
                mtime_ns: 1,
                ino: plain_ino,
            },
        ),
        reply_seed(
            4,
            Reply::OpenedFile {
                req: 1,
                id: 9,
                file_size: 10,
                mtime_ns: 1,
                ino: plain_ino + 1,
            },
        ),
        reply_seed(
            5,
            Reply::OpenedFile {
                req: 1,
                id: 9,
                file_size: 10,
                mtime_ns: 1,
                ino: 2,
            },
        ),
        reply_seed(
            0,
            Reply::Failed {
                req: 1,
                code: FailCode::Unstable,
            },
        ),
        vec![0, 65, 1, 0, 0, 0, 99],
        vec![0],
        vec![],
    ];
    for s in &seeds {
        reader.borrow_mut().check(s);
    }
    bolero::check!()
        .with_iterations(4000)
        .with_max_len(256)
        .for_each(|input: &[u8]| reader.borrow_mut().check(input));
    let r = reader.borrow();
    eprintln!(
        "replies: {} inputs checked, {} opened a view",
        r.checked, r.opened
    );
}
