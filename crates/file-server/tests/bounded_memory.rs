//! Memory follows configuration (review item A8): opening a file loads nothing it does not
//! need, a large file is never copied into shared memory, and a reader keeps a bounded number
//! of bytes mapped.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use splitos_file_server::client::FileClient;
use splitos_file_server::server::{FileServer, FileServerConfig};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests here measure this process's mappings, so they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Site(PathBuf);
impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn site(tag: &str) -> (Site, PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(format!("splitos-fmem-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let sock = base.join("files.sock");
    (Site(base), root, sock)
}

fn start(root: &Path, sock: &Path, tune: impl FnOnce(&mut FileServerConfig)) -> FileServer {
    let mut cfg = FileServerConfig::new(root.to_path_buf(), sock.to_path_buf());
    tune(&mut cfg);
    FileServer::start(cfg).unwrap()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// Bytes of distinct file-cache memfds this process maps (server and reader alike: both live in
/// this test process), from /proc/self/maps.
fn mapped_cache_bytes() -> u64 {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut seen = HashSet::new();
    let mut total = 0;
    for line in maps.lines() {
        if !line.contains("memfd:splitos-file") {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(range), Some(inode)) = (f.first(), f.get(4)) else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        if seen.insert(inode.to_string()) {
            total += b - a;
        }
    }
    total
}

/// A HEAD needs the file's size and validators, a `Range: bytes=0-99` one chunk: opening a
/// file of four chunks loads none, and reading 100 bytes loads one.
#[test]
fn opening_loads_no_chunk_and_a_small_read_loads_one() {
    let _serial = serial();
    let (_s, root, sock) = site("lazy");
    let srv = start(&root, &sock, |c| {
        c.chunk_size = 64 << 10;
        c.cache_bytes = 16 << 20;
    });
    let body = pattern((200 << 10) + 3);
    std::fs::write(root.join("four.bin"), &body).unwrap();
    let mut c = FileClient::connect(&sock).unwrap();
    let v = c.open("four.bin").unwrap();
    assert_eq!(v.len(), body.len() as u64);
    assert_eq!(
        srv.stats().cached_bytes.load(Ordering::Relaxed),
        0,
        "opening loaded chunks"
    );
    let mut first = [0u8; 100];
    assert_eq!(v.read_at(0, &mut first), 100);
    assert_eq!(&first[..], &body[..100]);
    assert_eq!(
        srv.stats().cached_bytes.load(Ordering::Relaxed),
        64 << 10,
        "a read of 100 bytes loaded more than its chunk"
    );
    assert!(v.to_vec() == body, "the whole file, chunk by chunk");
}

/// A file above the by-reference threshold (here 1/8 of a 64 MiB cache) is passed as a
/// descriptor of the file itself: opening it is one round trip, and nothing is copied.
#[test]
fn a_large_file_is_opened_without_copying_it() {
    let _serial = serial();
    let (_s, root, sock) = site("large");
    let srv = start(&root, &sock, |c| c.cache_bytes = 64 << 20);
    let len: u64 = 256 << 20;
    let f = std::fs::File::create(root.join("big.iso")).unwrap();
    f.set_len(len).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"middle", len / 2).unwrap();
    drop(f);
    let mut c = FileClient::connect(&sock).unwrap();
    let before = mapped_cache_bytes();
    let start = Instant::now();
    let v = c.open("big.iso").unwrap();
    let took = start.elapsed();
    assert_eq!(v.len(), len);
    assert!(took < Duration::from_millis(100), "opening took {took:?}");
    assert_eq!(srv.stats().cached_bytes.load(Ordering::Relaxed), 0);
    assert!(mapped_cache_bytes() <= before, "a large file was mapped");
    let mut mid = [0u8; 6];
    assert_eq!(v.read_at(len / 2, &mut mid), 6);
    assert_eq!(&mid, b"middle");
    let mut tail = [1u8; 10];
    assert_eq!(v.read_at(len - 4, &mut tail), 4);
    assert_eq!(&tail[..4], &[0, 0, 0, 0]);
}

/// A reader keeps mapped at most its byte budget of segments it is not using (64 MiB by
/// default), however many files it opened: before, it kept 1024 segments of any size.
#[test]
fn a_readers_mapped_segments_are_bounded_by_bytes() {
    let _serial = serial();
    let (_s, root, sock) = site("budget");
    let _srv = start(&root, &sock, |c| {
        c.chunk_size = 1 << 20;
        c.cache_bytes = 8 << 20;
    });
    let files = 160;
    for i in 0..files {
        let f = std::fs::File::create(root.join(format!("f{i}"))).unwrap();
        f.set_len(1 << 20).unwrap();
    }
    let mut c = FileClient::connect(&sock).unwrap();
    for i in 0..files {
        let v = c.open(&format!("f{i}")).unwrap();
        assert_eq!(v.len(), 1 << 20);
    }
    let mapped = mapped_cache_bytes();
    assert!(
        mapped <= (8 + 64 + 2) << 20,
        "{} MiB of {files} MiB opened still mapped",
        mapped >> 20
    );
}
