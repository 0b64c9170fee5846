//! A reader facing a file server that lies: every reply it could send must end in an error
//! (or a correct view), never a panic, a hang, or a mapping larger than the protocol allows.
//! (Review items A3 — the client side — and A12.)
//!
//! The fake server here speaks the wire protocol by hand: it answers each request with
//! whatever the test's closure sends (descriptor messages and raw reply bytes).

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{fcntl_add_seals, ftruncate, memfd_create, MemfdFlags, SealFlags};
use splitos_file_server::client::{ClientConfig, ClientError, FileClient};
use splitos_file_server::directory::DirectoryWriter;
use splitos_file_server::proto::{Reply, DIRECTORY_TAG};
use splitos_m2m::{Channel, Listener, ListenerConfig, Message};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the fake server hands a reader as its directory.
enum Dir {
    /// A real, empty directory (every lookup misses, so every open asks the server).
    Real,
    /// These bytes' memfd, as given.
    Fd(OwnedFd),
}

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

/// Starts a fake file server that calls `answer(request, channel)` for each request.
fn fake(tag: &str, dir: Dir, mut answer: impl FnMut(&[u8], &mut Channel) + Send + 'static) -> Fake {
    let base = std::env::temp_dir().join(format!("splitos-hostile-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let sock = base.join("files.sock");
    let listener = Listener::bind(&sock, ListenerConfig::default()).unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let thread = std::thread::spawn(move || {
        let writer = DirectoryWriter::create(64).unwrap();
        let dir_fd = match &dir {
            Dir::Real => writer.fd(),
            Dir::Fd(fd) => fd.as_fd(),
        };
        let mut chans: Vec<Channel> = Vec::new();
        while !s2.load(Ordering::Relaxed) {
            if let Ok(inc) = listener.accept() {
                if let Ok(mut c) = inc.establish() {
                    if c.send_fds(DIRECTORY_TAG, &[dir_fd]).is_ok() {
                        chans.push(c);
                    }
                }
            }
            let mut idle = true;
            for c in &mut chans {
                let req = match c.try_recv() {
                    Ok(Some(Message::Inline(b))) => b.to_vec(),
                    _ => continue,
                };
                idle = false;
                answer(&req, c);
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

/// The request id of a request (the same position in every request).
fn req_of(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[1..5].try_into().unwrap())
}

/// The chunk an `Open` asks for (0 for anything else).
fn chunk_of(b: &[u8]) -> u32 {
    if b[0] == 1 {
        u32::from_le_bytes(b[5..9].try_into().unwrap())
    } else {
        0
    }
}

/// A memfd of `len` bytes (sparse), sealed against every change.
fn sealed(len: u64) -> OwnedFd {
    let fd = memfd_create("hostile", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    ftruncate(&fd, len).unwrap();
    fcntl_add_seals(
        &fd,
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )
    .unwrap();
    fd
}

/// A sealed memfd holding `body`.
fn sealed_with(body: &[u8]) -> OwnedFd {
    let fd = memfd_create("hostile", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::io::pwrite(&fd, body, 0).unwrap();
    fcntl_add_seals(
        &fd,
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )
    .unwrap();
    fd
}

fn encode(r: Reply) -> Vec<u8> {
    let mut b = Vec::new();
    r.encode(&mut b);
    b
}

#[allow(clippy::too_many_arguments)]
fn opened(req: u32, id: u64, chunk: u32, chunk_len: u64, chunk_size: u64, size: u64) -> Vec<u8> {
    encode(Reply::Opened {
        req,
        id,
        chunk,
        chunk_len,
        chunk_size,
        file_size: size,
        mtime_ns: 1,
        ino: 2,
    })
}

/// Runs `f` on a thread of its own and returns its result, failing the test if it panics or
/// takes longer than `limit` (the thread is then left behind; the test fails anyway).
fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => {
            let _ = t.join();
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("still running after {limit:?}"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            panic!("the reader panicked on a hostile reply")
        }
    }
}

/// Opens `path` through a new reader of `f`, within 5 s; the error text, or "ok".
fn open_result(f: &Fake, path: &'static str) -> Result<u64, String> {
    let sock = f.sock.clone();
    bounded(Duration::from_secs(5), move || {
        let mut c = FileClient::connect(&sock).map_err(|e| e.to_string())?;
        let v = c.open(path).map_err(|e| e.to_string())?;
        // Whatever was accepted must also read without panicking.
        let mut buf = [0u8; 64];
        let _ = v.read_at(0, &mut buf);
        let _ = v.read_at(v.len().saturating_sub(1), &mut buf);
        Ok(v.len())
    })
}

/// A3: `chunk_len = 0` with `file_size = 1` made `div_ceil(0)` panic.
#[test]
fn a_zero_chunk_length_is_an_error_not_a_panic() {
    let f = fake("zero", Dir::Real, |b, c| {
        let req = req_of(b);
        c.send_fds(7, &[sealed(0).as_fd()]).unwrap();
        c.send(&opened(req, 7, chunk_of(b), 0, 0, 1)).unwrap();
    });
    let r = open_result(&f, "a.html");
    assert!(r.is_err(), "{r:?}");
}

/// A3: an attacker-chosen chunk count (2^50 chunks of 4 KiB) cost one round trip each.
#[test]
fn an_endless_file_is_refused_at_once() {
    let seg = sealed(4096);
    let mut id = 0u64;
    let f = fake("endless", Dir::Real, move |b, c| {
        id += 1;
        let req = req_of(b);
        c.send_fds(id, &[seg.as_fd()]).unwrap();
        c.send(&opened(req, id, chunk_of(b), 4096, 4096, 1 << 62))
            .unwrap();
    });
    let start = Instant::now();
    let r = open_result(&f, "a.html");
    assert!(r.is_err(), "{r:?}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

/// A3: a segment of any size up to 4 GiB was mapped; the protocol's largest chunk is 1 GiB.
#[test]
fn a_segment_larger_than_any_chunk_is_not_mapped() {
    let f = fake("huge-seg", Dir::Real, |b, c| {
        let req = req_of(b);
        let len = 3u64 << 30;
        c.send_fds(9, &[sealed(len).as_fd()]).unwrap();
        c.send(&opened(req, 9, 0, len, len, len)).unwrap();
    });
    let r = open_result(&f, "a.html");
    assert!(r.is_err(), "{r:?}");
}

/// A3: a directory region of any size was mapped (here 1 TiB, with a consistent header).
#[test]
fn an_oversized_directory_region_is_refused() {
    let slots: u64 = 1 << 32;
    let len = 4096 + slots * 256;
    let fd = memfd_create(
        "hostile-dir",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .unwrap();
    ftruncate(&fd, len).unwrap();
    let mut header = Vec::new();
    header.extend_from_slice(b"SPOSFDIR");
    header.extend_from_slice(&1u64.to_le_bytes());
    header.extend_from_slice(&slots.to_le_bytes());
    rustix::io::pwrite(&fd, &header, 0).unwrap();
    fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL).unwrap();
    let f = fake("huge-dir", Dir::Fd(fd), |_, _| {});
    let sock = f.sock.clone();
    let r = bounded(Duration::from_secs(5), move || {
        FileClient::connect(&sock)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    assert!(r.is_err(), "a 1 TiB directory was accepted");
}

/// Replies that contradict the request or themselves: each is an error.
#[test]
fn inconsistent_replies_are_errors() {
    type Lie = fn(u32, u32) -> (Option<u64>, Vec<u8>);
    let lies: [(&str, Lie); 6] = [
        // A reply for another chunk than asked.
        ("wrong chunk", |req, _| {
            (Some(4096), opened(req, 3, 5, 4096, 4096, 4096))
        }),
        // Segment id 0 (means "empty slot" in the directory).
        ("id 0", |req, ch| {
            (Some(4096), opened(req, 0, ch, 4096, 4096, 4096))
        }),
        // A chunk longer than the file.
        ("chunk past the end", |req, ch| {
            (Some(8192), opened(req, 3, ch, 8192, 8192, 4096))
        }),
        // A first chunk shorter than the chunk size of a file of several chunks.
        ("short first chunk", |req, ch| {
            (Some(100), opened(req, 3, ch, 100, 4096, 10_000))
        }),
        // No descriptor before the reply.
        ("no descriptor", |req, ch| {
            (None, opened(req, 3, ch, 4096, 4096, 4096))
        }),
        // A reply to a request never sent.
        ("future request", |req, ch| {
            (Some(4096), opened(req + 5, 3, ch, 4096, 4096, 4096))
        }),
    ];
    for (what, lie) in lies {
        let f = fake(&what.replace(' ', "-"), Dir::Real, move |b, c| {
            let (fd, reply) = lie(req_of(b), chunk_of(b));
            if let Some(len) = fd {
                c.send_fds(3, &[sealed(len).as_fd()]).unwrap();
            }
            c.send(&reply).unwrap();
        });
        let sock = f.sock.clone();
        let r = bounded(Duration::from_secs(15), move || {
            let mut c = FileClient::connect(&sock).map_err(|e| e.to_string())?;
            let v = c.open("a.html").map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 16 << 10];
            let n = v.read_at(0, &mut buf);
            Ok::<_, String>((v.len(), n))
        });
        assert!(r.is_err(), "{what}: accepted as {r:?}");
    }
}

/// A12: a reply that arrives after its request gave up waiting used to be taken by the next
/// request (and its descriptor too), leaving the reader off by one for good. Now late replies
/// and their descriptors are recognised by request id and dropped.
#[test]
fn a_reader_resynchronises_after_a_reply_timeout() {
    const BODY: &[u8] = b"<h1>late</h1>";
    let seg = sealed_with(BODY);
    let (mut n, mut id) = (0u32, 100u64);
    let f = fake("late", Dir::Real, move |b, c| {
        n += 1;
        if n == 1 {
            std::thread::sleep(Duration::from_millis(600)); // a stall: the reader gives up
        }
        id += 1;
        let len = BODY.len() as u64;
        let _ = c.send_fds(id, &[seg.as_fd()]);
        let _ = c.send(&opened(req_of(b), id, chunk_of(b), len, 4 << 20, len));
    });
    let sock = f.sock.clone();
    let r = bounded(Duration::from_secs(10), move || {
        let cfg = ClientConfig {
            reply_timeout: Duration::from_millis(200),
            ..ClientConfig::default()
        };
        let mut c = FileClient::connect_with(&sock, cfg).map_err(|e| e.to_string())?;
        match c.open("a.html") {
            Err(ClientError::Timeout) => {}
            other => return Err(format!("first open: {:?}", other.map(|v| v.len()))),
        }
        std::thread::sleep(Duration::from_millis(600)); // the stall ends; its reply is late

        for i in 0..5 {
            let v = c
                .open("a.html")
                .map_err(|e| format!("open {i} after it: {e}"))?;
            if v.to_vec() != BODY {
                return Err(format!("open {i} after it: wrong bytes"));
            }
        }
        Ok(())
    });
    assert_eq!(r, Ok(()));
}
