//! The TCP server's direct path in front of a file server that stalls or lies: a request it
//! cannot answer completely goes to the application (which answers "deferred"); it is never
//! answered with a head whose body does not follow (review S6), and a stalled file server costs
//! a short wait and a deferral, not a 500, and not the requests after it (review A12).

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};
use splitos::reactor::{Events, NetEvent, Reactor};
use splitos_file_server::directory::{DirectoryWriter, Entry};
use splitos_file_server::proto::{Reply, DIRECTORY_TAG};
use splitos_m2m::{Channel, Listener, ListenerConfig, Message};
use splitos_tcp_server::{ServerConfig, TcpServer};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A file server speaking the protocol by hand: it publishes `entries` in its directory and
/// answers each request with `answer`.
struct Fake {
    base: PathBuf,
    sock: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn fake(
    tag: &str,
    entries: Vec<Entry>,
    mut answer: impl FnMut(&[u8], &mut Channel) + Send + 'static,
) -> Fake {
    let base = std::env::temp_dir().join(format!("splitos-dhostile-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let sock = base.join("files.sock");
    let listener = Listener::bind(&sock, ListenerConfig::default()).unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut dir = DirectoryWriter::create(64).unwrap();
        for e in &entries {
            assert!(dir.publish(e));
        }
        let mut chans: Vec<Channel> = Vec::new();
        while !s2.load(Ordering::Relaxed) {
            if let Ok(inc) = listener.accept() {
                if let Ok(mut c) = inc.establish() {
                    if c.send_fds(DIRECTORY_TAG, &[dir.fd()]).is_ok() {
                        chans.push(c);
                    }
                }
            }
            let mut idle = true;
            for c in &mut chans {
                if let Ok(Some(Message::Inline(b))) = c.try_recv() {
                    let req = b.to_vec();
                    idle = false;
                    answer(&req, c);
                }
            }
            if idle {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    });
    Fake {
        base,
        sock,
        stop,
        thread: Some(thread),
    }
}

fn req_of(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[1..5].try_into().unwrap())
}

fn chunk_of(b: &[u8]) -> u32 {
    if b[0] == 1 {
        u32::from_le_bytes(b[5..9].try_into().unwrap())
    } else {
        0
    }
}

fn sealed_with(body: &[u8]) -> OwnedFd {
    let fd = memfd_create("dhostile", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::io::pwrite(&fd, body, 0).unwrap();
    fcntl_add_seals(
        &fd,
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )
    .unwrap();
    fd
}

/// Sends segment `seg` as `id` and an `Opened` reply for it.
fn send_opened(c: &mut Channel, b: &[u8], id: u64, seg: &OwnedFd, len: u64, cs: u64, size: u64) {
    let mut out = Vec::new();
    Reply::Opened {
        req: req_of(b),
        id,
        chunk: chunk_of(b),
        chunk_len: len,
        chunk_size: cs,
        file_size: size,
        mtime_ns: 1,
        ino: 2,
    }
    .encode(&mut out);
    let _ = c.send_fds(id, &[seg.as_fd()]);
    let _ = c.send(&out);
}

fn entry(id: u64, path: &str, chunk: u32, chunk_len: u32, size: u64) -> Entry {
    Entry {
        id,
        path: path.into(),
        chunk,
        chunk_len,
        file_size: size,
        mtime_ns: 1,
        ino: 2,
        content_type: 0,
    }
}

/// A TCP server with `splitos serve`'s direct path and an application that installs it on
/// its listener (to `files`) and answers every request that reaches it with the body
/// "deferred".
struct App {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _server: TcpServer,
    dir: PathBuf,
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn app(files: PathBuf) -> App {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "splitos-direct-hostile-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let server = TcpServer::start(ServerConfig {
        socket: dir.join("tcp.sock"),
        threads: 1,
        direct: Some(Arc::new(splitos_serve::direct::StaticFiles)),
        ..ServerConfig::default()
    })
    .unwrap();
    let mut r =
        Reactor::connect(server.socket_path(), splitos::WaitPolicy::adaptive(), "t").unwrap();
    let (listener, addr) = r
        .listen("127.0.0.1:0".parse().unwrap(), Default::default())
        .unwrap();
    r.serve_files(
        listener,
        &files,
        Duration::from_secs(10),
        Duration::from_secs(60),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut events = Events::new();
        let mut bufs: std::collections::HashMap<_, Vec<u8>> = Default::default();
        while !s2.load(Ordering::Relaxed) {
            if r.poll(&mut events, Some(Duration::from_millis(10)))
                .is_err()
            {
                return;
            }
            let mut replies = Vec::new();
            for ev in events.iter() {
                if let NetEvent::Data { conn, data } = ev {
                    let b = bufs.entry(conn).or_default();
                    b.extend_from_slice(data);
                    while let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") {
                        b.drain(..end + 4);
                        replies.push(conn);
                    }
                }
            }
            for conn in replies {
                let _ = r.send(
                    conn,
                    b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ndeferred",
                );
            }
        }
    });
    App {
        addr,
        stop,
        thread: Some(thread),
        _server: server,
        dir,
    }
}

/// One request on `c`; the response's status line and body (read by its Content-Length), or
/// an error if it does not arrive whole within 2 s.
fn get(c: &mut TcpStream, path: &str) -> Result<(String, Vec<u8>), String> {
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 16 << 10];
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| format!("no length in {head:?}"))?;
            if got.len() >= end + 4 + len {
                let body = got[end + 4..end + 4 + len].to_vec();
                got.drain(..end + 4 + len);
                if !got.is_empty() {
                    return Err(format!("{} bytes after the response", got.len()));
                }
                let status = head.lines().next().unwrap_or("").to_string();
                return Ok((status, body));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "incomplete response: {:?}",
                String::from_utf8_lossy(&got)
            ));
        }
        match c.read(&mut buf) {
            Ok(0) => return Err("closed".into()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("{e} after {:?}", String::from_utf8_lossy(&got))),
        }
    }
}

/// S6: a file of two chunks whose second chunk, when fetched, has the wrong length. The direct
/// path had already queued a head with `Content-Length: 8192` when it found out, and then sent
/// no body: the client waits for bytes that never come (or reads the next response as body).
#[test]
fn a_chunk_that_fails_to_fetch_defers_the_request_instead_of_desyncing_it() {
    let first = sealed_with(&[b'a'; 4096]);
    let liar = sealed_with(&[b'b'; 100]);
    let f = fake(
        "s6",
        vec![
            entry(5, "two.bin", 0, 4096, 8192),
            entry(6, "two.bin", 1, 4096, 8192),
        ],
        move |b, c| match chunk_of(b) {
            0 => send_opened(c, b, 5, &first, 4096, 4096, 8192),
            _ => send_opened(c, b, 6, &liar, 100, 4096, 8192),
        },
    );
    let a = app(f.sock.clone());
    let mut c = TcpStream::connect(a.addr).unwrap();
    let (status, body) = get(&mut c, "/two.bin").unwrap();
    assert_eq!(
        (status.as_str(), &body[..]),
        ("HTTP/1.1 200 OK", &b"deferred"[..])
    );
    // The connection is still in step.
    let (_, body) = get(&mut c, "/two.bin").unwrap();
    assert_eq!(body, b"deferred");
}

/// A12 on the direct path: the file server stalls on the first request for longer than the
/// direct path waits. That request goes to the application (no 500, no worker frozen for the
/// stall), and once the stall is over the direct path answers again: the late reply did not
/// put the reader off by one.
#[test]
fn a_stalled_file_server_makes_the_direct_path_defer_then_recover() {
    let seg = sealed_with(b"hello");
    let mut n = 0;
    let f = fake("stall", vec![entry(9, "s.txt", 0, 5, 5)], move |b, c| {
        n += 1;
        if n == 1 {
            std::thread::sleep(Duration::from_millis(1500));
        }
        send_opened(c, b, 9, &seg, 5, 4 << 20, 5);
    });
    let a = app(f.sock.clone());
    let mut c = TcpStream::connect(a.addr).unwrap();
    let start = Instant::now();
    let (status, body) = get(&mut c, "/s.txt").unwrap();
    let took = start.elapsed();
    assert_eq!(
        (status.as_str(), &body[..]),
        ("HTTP/1.1 200 OK", &b"deferred"[..])
    );
    assert!(
        took < Duration::from_millis(1000),
        "the worker waited {took:?}"
    );
    std::thread::sleep(Duration::from_millis(1600));
    let mut direct = 0;
    for _ in 0..5 {
        let mut c = TcpStream::connect(a.addr).unwrap();
        let (status, body) = get(&mut c, "/s.txt").unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        direct += (body == b"hello") as usize;
    }
    assert_eq!(direct, 5, "the direct path did not recover after the stall");
}
