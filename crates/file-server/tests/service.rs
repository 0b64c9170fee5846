//! The file server with readers: directory hits without messages, one whole version under
//! concurrent rewrites, eviction under pressure without freed memory, chunked files, path
//! safety through the client, and a `kill -9`ed server.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use splitos_file_server::client::{ClientError, FileClient};
use splitos_file_server::server::{FileServer, FileServerConfig};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

struct Site(PathBuf);
impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn site(tag: &str) -> (Site, PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(format!("splitos-fsvc-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("root");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("index.html"), b"<h1>split</h1>").unwrap();
    std::fs::write(base.join("secret"), b"never").unwrap();
    std::os::unix::fs::symlink("../secret", root.join("escape")).unwrap();
    let sock = base.join("files.sock");
    (Site(base), root, sock)
}

fn start(root: &Path, sock: &Path, tune: impl FnOnce(&mut FileServerConfig)) -> FileServer {
    let mut cfg = FileServerConfig::new(root.to_path_buf(), sock.to_path_buf());
    tune(&mut cfg);
    FileServer::start(cfg).unwrap()
}

#[test]
fn second_open_is_a_directory_hit() {
    let (_s, root, sock) = site("hit");
    let srv = start(&root, &sock, |_| {});
    let mut c = FileClient::connect(&sock).unwrap();
    let first = c.open("index.html").unwrap();
    assert_eq!(first.to_vec(), b"<h1>split</h1>");
    assert_eq!(first.content_type(), "text/html; charset=utf-8");
    let before = srv.stats().requests.load(Ordering::Relaxed);
    for _ in 0..100 {
        assert_eq!(
            c.open("/./index.html".trim_start_matches('/'))
                .unwrap()
                .to_vec(),
            b"<h1>split</h1>"
        );
    }
    assert_eq!(
        srv.stats().requests.load(Ordering::Relaxed),
        before,
        "hits sent messages"
    );
    assert_eq!(c.directory_hits, 100);
    assert_eq!(
        c.open("index.html").unwrap().content_type(),
        "text/html; charset=utf-8",
        "hint from the directory"
    );
    // A second reader learns the segment once, then hits too.
    let mut c2 = FileClient::connect(&sock).unwrap();
    c2.open("index.html").unwrap();
    c2.open("index.html").unwrap();
    assert_eq!(c2.directory_hits, 1);
}

#[test]
fn paths_that_leave_the_root_are_refused() {
    let (_s, root, sock) = site("paths");
    let _srv = start(&root, &sock, |_| {});
    let mut c = FileClient::connect(&sock).unwrap();
    assert!(matches!(c.open("../secret"), Err(ClientError::BadPath(_))));
    assert!(matches!(
        c.open("/etc/passwd"),
        Err(ClientError::BadPath(_))
    ));
    assert!(matches!(c.open("a\0b"), Err(ClientError::BadPath(_))));
    assert!(matches!(c.open("escape"), Err(ClientError::Escapes)));
    assert!(matches!(c.open("sub"), Err(ClientError::Directory)));
    assert!(matches!(c.open("nope.html"), Err(ClientError::NotFound)));
    assert_eq!(
        c.open("index.html").unwrap().to_vec(),
        b"<h1>split</h1>",
        "session still fine"
    );
}

#[test]
fn readers_see_one_whole_version_while_a_writer_replaces_the_file() {
    let (_s, root, sock) = site("versions");
    let _srv = start(&root, &sock, |c| {
        c.revalidate_every = Duration::from_millis(20)
    });
    let file = root.join("live.txt");
    std::fs::write(&file, vec![0u8; 1000]).unwrap();
    let writer_root = root.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut v = 1u32;
        while !s2.load(Ordering::Relaxed) {
            // Each version: every byte equal to the version, length varying with it.
            let tmp = writer_root.join(".live.tmp");
            let len = |v: u32| 1000 + ((v as u8) as usize % 7) * 100;
            std::fs::write(&tmp, vec![v as u8; len(v)]).unwrap();
            std::fs::rename(&tmp, writer_root.join("live.txt")).unwrap();
            // Also rewrite in place, which a reader could catch half-done without the checks.
            std::fs::write(
                writer_root.join("live.txt"),
                vec![(v + 1) as u8; len(v + 1)],
            )
            .unwrap();
            v += 2;
            std::thread::sleep(Duration::from_micros(300));
        }
        v
    });
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = FileClient::connect(&sock).unwrap();
                let (mut reads, mut versions) = (0, std::collections::HashSet::new());
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(1500) {
                    match c.open("live.txt") {
                        Ok(view) => {
                            let bytes = view.to_vec();
                            assert_eq!(bytes.len() as u64, view.len());
                            // An in-place rewrite truncates first: empty is a real version.
                            let Some(&first) = bytes.first() else {
                                continue;
                            };
                            assert!(
                                bytes.iter().all(|b| *b == first),
                                "torn read: mixed versions"
                            );
                            assert_eq!(
                                bytes.len(),
                                1000 + (first as usize % 7) * 100,
                                "length of another version"
                            );
                            versions.insert(first);
                            reads += 1;
                        }
                        Err(ClientError::NotFound) | Err(ClientError::Unstable) => {} // mid-rename
                        Err(e) => panic!("{e}"),
                    }
                }
                (reads, versions.len())
            })
        })
        .collect();
    for r in readers {
        let (reads, versions) = r.join().unwrap();
        assert!(reads > 50, "only {reads} reads");
        assert!(
            versions > 3,
            "changes were not picked up ({versions} versions seen)"
        );
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
}

#[test]
fn a_changed_file_is_retired_within_a_second() {
    let (_s, root, sock) = site("retire");
    let _srv = start(&root, &sock, |_| {});
    let mut c = FileClient::connect(&sock).unwrap();
    std::fs::write(root.join("a.txt"), b"old").unwrap();
    assert_eq!(c.open("a.txt").unwrap().to_vec(), b"old");
    std::fs::write(root.join("a.txt"), b"new!").unwrap();
    let start = Instant::now();
    loop {
        if c.open("a.txt").unwrap().to_vec() == b"new!" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "stale content after 1 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_file(root.join("a.txt")).unwrap();
    let start = Instant::now();
    while c.open("a.txt").is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "deleted file still served after 1 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn eviction_under_pressure_never_frees_what_a_reader_holds() {
    let (_s, root, sock) = site("evict");
    let srv = start(&root, &sock, |c| c.cache_bytes = 1 << 20);
    for i in 0..40u8 {
        std::fs::write(root.join(format!("f{i}.bin")), vec![i; 100 << 10]).unwrap();
    }
    let mut c = FileClient::connect(&sock).unwrap();
    let mut held = Vec::new();
    for round in 0..3 {
        for i in 0..40u8 {
            let v = c.open(&format!("f{i}.bin")).unwrap();
            if round == 0 && i % 4 == 0 {
                held.push((i, v));
            }
        }
    }
    assert!(
        srv.stats().evictions.load(Ordering::Relaxed) > 0,
        "nothing was evicted"
    );
    assert!(
        srv.stats().cached_bytes.load(Ordering::Relaxed) <= 1 << 20,
        "over budget"
    );
    for (i, v) in &held {
        let bytes = v.to_vec();
        assert_eq!(bytes.len(), 100 << 10);
        assert!(
            bytes.iter().all(|b| b == i),
            "held file {i} changed after eviction"
        );
    }
}

#[test]
fn large_files_come_in_chunks_of_one_version() {
    let (_s, root, sock) = site("chunks");
    let _srv = start(&root, &sock, |c| {
        c.chunk_size = 64 << 10;
        c.by_reference_above = Some(1 << 20);
    });
    let body: Vec<u8> = (0..(300 << 10) + 5)
        .map(|i: usize| (i * 7 % 251) as u8)
        .collect();
    std::fs::write(root.join("big.bin"), &body).unwrap();
    let mut c = FileClient::connect(&sock).unwrap();
    let v = c.open("big.bin").unwrap();
    assert_eq!(v.chunk_count(), 5);
    assert_eq!(v.mapped_chunks(), 0, "opening fetches no chunk");
    assert!(v.to_vec() == body);
    // A read across a chunk boundary.
    let mut buf = vec![0u8; 1000];
    assert_eq!(v.read_at((64 << 10) - 500, &mut buf), 1000);
    assert_eq!(&buf[..], &body[(64 << 10) - 500..(64 << 10) + 500]);
    let mut tail = vec![0u8; 100];
    assert_eq!(v.read_at(body.len() as u64 - 3, &mut tail), 3);
}

/// Runs a file server in a process of its own (this test binary, re-run) until killed.
#[test]
fn server_process_entry() {
    let (Ok(root), Ok(sock)) = (std::env::var("FS_ROOT"), std::env::var("FS_SOCK")) else {
        return;
    };
    let _srv = FileServer::start(FileServerConfig::new(root.into(), sock.into())).unwrap();
    std::thread::sleep(Duration::from_secs(30));
}

fn spawn_server(root: &Path, sock: &Path) -> std::process::Child {
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["server_process_entry", "--exact", "--test-threads=1"])
        .env("FS_ROOT", root)
        .env("FS_SOCK", sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "file server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn killed_server_gives_a_clear_error_and_a_restarted_one_serves() {
    let (_s, root, sock) = site("kill");
    let mut server = spawn_server(&root, &sock);
    let mut c = FileClient::connect(&sock).unwrap();
    let view = c.open("index.html").unwrap();
    server.kill().unwrap();
    server.wait().unwrap();
    let start = Instant::now();
    // Every open fails cleanly (a hit too, once the death is noticed: see
    // `a_dead_servers_directory_is_not_served_from`).
    let err = c
        .open("sub/../index.html")
        .err()
        .or_else(|| c.open("other.html").err())
        .unwrap();
    assert!(
        matches!(err, ClientError::ServerGone | ClientError::BadPath(_)),
        "{err}"
    );
    let err = match c.open("missing-file.html") {
        Err(e) => e,
        Ok(_) => panic!("a dead server answered"),
    };
    assert!(matches!(err, ClientError::ServerGone), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(
        view.to_vec(),
        b"<h1>split</h1>",
        "mapped bytes outlive the server"
    );
    let mut server = spawn_server(&root, &sock);
    let mut c2 = FileClient::connect(&sock).unwrap();
    assert_eq!(c2.open("index.html").unwrap().to_vec(), b"<h1>split</h1>");
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn inotify_retires_changed_files_without_waiting_for_revalidation() {
    let (_s, root, sock) = site("inotify");
    let srv = start(&root, &sock, |c| {
        c.revalidate_every = Duration::from_secs(3600)
    });
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::write(root.join("d/page.html"), b"first").unwrap();
    let mut c = FileClient::connect(&sock).unwrap();
    assert_eq!(c.open("d/page.html").unwrap().to_vec(), b"first");
    std::fs::write(root.join("d/page.html"), b"second").unwrap();
    let start = Instant::now();
    while c.open("d/page.html").unwrap().to_vec() != b"second" {
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "change not noticed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::remove_file(root.join("d/page.html")).unwrap();
    let start = Instant::now();
    while c.open("d/page.html").is_ok() {
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "deletion not noticed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(srv.stats().retired.load(Ordering::Relaxed) >= 2);
}

/// A path found missing is published as absent, so readers that must not wait learn it without
/// a message; creating (or renaming in) the file retracts that at once.
#[test]
fn absence_is_published_and_retracted_when_the_file_appears() {
    let (_s, root, sock) = site("absent");
    let srv = start(&root, &sock, |_| {});
    let mut c = FileClient::connect(&sock).unwrap();
    assert!(matches!(
        c.open("index.html.gz"),
        Err(ClientError::NotFound)
    ));
    assert!(matches!(c.open("sub/none.txt"), Err(ClientError::NotFound)));
    let before = srv.stats().requests.load(Ordering::Relaxed);
    for _ in 0..10 {
        assert!(matches!(
            c.open_cached("index.html.gz"),
            Err(ClientError::NotFound)
        ));
        assert!(matches!(c.open("sub/none.txt"), Err(ClientError::NotFound)));
    }
    assert_eq!(
        srv.stats().requests.load(Ordering::Relaxed),
        before,
        "known absences sent messages"
    );
    // Created in place, and renamed into place: both become visible.
    std::fs::write(root.join("index.html.gz"), b"gz").unwrap();
    std::fs::write(root.join("sub/.tmp"), b"late").unwrap();
    std::fs::rename(root.join("sub/.tmp"), root.join("sub/none.txt")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let gz = c.open("index.html.gz").map(|v| v.to_vec());
        let late = c.open("sub/none.txt").map(|v| v.to_vec());
        if let (Ok(gz), Ok(late)) = (&gz, &late) {
            assert_eq!((&gz[..], &late[..]), (&b"gz"[..], &b"late"[..]));
            break;
        }
        assert!(Instant::now() < deadline, "still absent: {gz:?} {late:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A missing directory is not recorded (nothing would notice it appear).
    assert!(matches!(c.open("nodir/x"), Err(ClientError::NotFound)));
    assert!(matches!(c.open_cached("nodir/x"), Ok(None)));
}

/// A14: after the file server dies, a reader must not go on answering from the directory it
/// left behind (a file deleted meanwhile would be served for as long as the reader lives): it
/// notices the death (the channel's peer-death check) and says `ServerGone`, which callers
/// see as "unavailable" and answer some other way.
#[test]
fn a_dead_servers_directory_is_not_served_from() {
    let (_s, root, sock) = site("frozen");
    let mut server = spawn_server(&root, &sock);
    let mut c = FileClient::connect(&sock).unwrap();
    c.open("index.html").unwrap();
    c.open("index.html").unwrap();
    assert_eq!(c.directory_hits, 1, "the second open is a directory hit");
    server.kill().unwrap();
    server.wait().unwrap();
    std::fs::remove_file(root.join("index.html")).unwrap();
    let start = Instant::now();
    loop {
        match c.open("index.html") {
            Err(ClientError::ServerGone) => break,
            Ok(_) => assert!(
                start.elapsed() < Duration::from_millis(500),
                "still serving a deleted file from a dead server's directory"
            ),
            Err(e) => panic!("{e}"),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(matches!(
        c.open_cached("index.html"),
        Err(ClientError::ServerGone)
    ));
    assert!(matches!(
        splitos_file_server::client::lookup_of(c.open("index.html")),
        splitos_http::respond::Lookup::Unavailable
    ));
}

/// Eight missing names whose hash lands on `index.html`'s home slot in a directory of 64.
fn colliding_names(target: &str) -> Vec<String> {
    use splitos_file_server::directory::key_hash;
    let home = key_hash(target, 0) & 63;
    (0u64..)
        .map(|i| format!("x{i}.html"))
        .filter(|n| key_hash(n, 0) & 63 == home)
        .take(8)
        .collect()
}

/// A15: requests for missing names whose hashes share `index.html`'s probe window fill it
/// with absences; when `index.html` changes and is cached again, its entry used to find no
/// slot and was silently left out of the directory (every direct-path request then deferred).
/// A real file now displaces absences.
#[test]
fn absences_never_crowd_a_file_out_of_the_directory() {
    let (_s, root, sock) = site("crowd");
    let srv = start(&root, &sock, |c| c.directory_slots = 64);
    let mut c = FileClient::connect(&sock).unwrap();
    c.open("index.html").unwrap();
    assert!(c.open_cached("index.html").unwrap().is_some());
    let names = colliding_names("index.html");
    for n in &names {
        assert!(matches!(c.open(n), Err(ClientError::NotFound)));
    }
    // index.html changes: retired, its slot freed; the last name's absence takes it.
    std::fs::write(root.join("index.html"), b"<h1>changed</h1>").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.open_cached("index.html").unwrap().is_some() {
        assert!(Instant::now() < deadline, "change not noticed");
        std::thread::sleep(Duration::from_millis(5));
    }
    for n in &names {
        assert!(matches!(c.open(n), Err(ClientError::NotFound)));
    }
    // Cached again: it must be in the directory, whatever the absences.
    assert_eq!(c.open("index.html").unwrap().to_vec(), b"<h1>changed</h1>");
    assert!(
        c.open_cached("index.html").unwrap().is_some(),
        "index.html is cached but not in the directory"
    );
    assert_eq!(srv.stats().unpublished.load(Ordering::Relaxed), 0);
}

/// A16: the server ran each handshake inline with a 500 ms timeout, so every connection that
/// sent no hello stalled its only thread, and with it every reader. Now a handshake proceeds
/// only once its hello is there.
#[test]
fn silent_connections_do_not_stall_the_server() {
    let (_s, root, sock) = site("silent");
    let _srv = start(&root, &sock, |_| {});
    let mut good = FileClient::connect(&sock).unwrap();
    good.open("index.html").unwrap();
    // More than the server keeps waiting (64): the oldest make way.
    let silent: Vec<std::os::unix::net::UnixStream> = (0..100)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    std::fs::write(root.join("sub/new.html"), b"new").unwrap();
    let start = Instant::now();
    assert_eq!(good.open("sub/new.html").unwrap().to_vec(), b"new");
    let took = start.elapsed();
    assert!(took < Duration::from_millis(200), "an open waited {took:?}");
    let start = Instant::now();
    let mut late = FileClient::connect(&sock).unwrap();
    late.open("index.html").unwrap();
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(300),
        "a new reader waited {took:?}"
    );
    drop(silent);
}

/// Watches this process holds on the directories `dirs` (by inode), from the fdinfo of its
/// inotify descriptors.
fn watches_on(dirs: &[PathBuf]) -> usize {
    use std::os::unix::fs::MetadataExt;
    let inodes: std::collections::HashSet<u64> = dirs
        .iter()
        .filter_map(|d| std::fs::metadata(d).ok().map(|m| m.ino()))
        .collect();
    let mut n = 0;
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let inotify = std::fs::read_link(fd.path())
            .is_ok_and(|l| l.to_string_lossy() == "anon_inode:inotify");
        if !inotify {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        for line in info.lines().filter(|l| l.starts_with("inotify wd:")) {
            let ino = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("ino:"))
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            if ino.is_some_and(|i| inodes.contains(&i)) {
                n += 1;
            }
        }
    }
    n
}

/// A22: a watch was added for the directory of every cached file and never released, so a
/// tree with many directories used up the service user's inotify watches. A watch now goes
/// when nothing cached or recorded absent is left in its directory.
#[test]
fn watches_go_with_the_files_they_watch() {
    let (_s, root, sock) = site("watches");
    let _srv = start(&root, &sock, |c| c.cache_bytes = 8 << 10);
    let dirs: Vec<PathBuf> = (0..40).map(|i| root.join(format!("d{i}"))).collect();
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("f.html"), [b'x'; 1024]).unwrap();
    }
    let mut c = FileClient::connect(&sock).unwrap();
    for i in 0..dirs.len() {
        assert_eq!(c.open(&format!("d{i}/f.html")).unwrap().len(), 1024);
    }
    // The cache holds 8 of those files; their directories, and no others, are watched.
    let held = watches_on(&dirs);
    assert!(held <= 8, "{held} directories watched for 8 cached files");
}

/// The watch budget (`max_watches`): no more directories are watched than it allows; files in
/// the others are still retired when they change (by revalidation), and absences there are
/// not published (nothing would retract them).
#[test]
fn watches_stay_within_their_budget() {
    let (_s, root, sock) = site("watch-budget");
    let _srv = start(&root, &sock, |c| {
        c.max_watches = 4;
        c.revalidate_every = Duration::from_millis(50);
    });
    let dirs: Vec<PathBuf> = (0..10).map(|i| root.join(format!("d{i}"))).collect();
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("f.html"), b"old").unwrap();
    }
    let mut c = FileClient::connect(&sock).unwrap();
    for i in 0..dirs.len() {
        c.open(&format!("d{i}/f.html")).unwrap();
    }
    assert_eq!(watches_on(&dirs), 4);
    assert!(matches!(c.open("d9/none.html"), Err(ClientError::NotFound)));
    assert!(
        matches!(c.open_cached("d9/none.html"), Ok(None)),
        "an absence published in an unwatched directory"
    );
    std::fs::write(dirs[9].join("f.html"), b"new!").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.open("d9/f.html").unwrap().to_vec() != b"new!" {
        assert!(
            Instant::now() < deadline,
            "a change in an unwatched directory was missed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Raises this process's descriptor limit to at least `want` (the server holds one per cached
/// chunk); false if the hard limit does not allow it.
fn enough_descriptors(want: u64) -> bool {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current.is_some_and(|c| c >= want) {
        return true;
    }
    if l.maximum.is_some_and(|m| m < want) {
        return false;
    }
    l.current = Some(want);
    setrlimit(Resource::Nofile, l).is_ok()
}

/// A21: revalidation checked the first 4096 keys in HashMap order on every pass, so with more
/// files cached the others were never checked when inotify missed a change. Here inotify is
/// off (no watches), 6000 files are cached and every sixth changes: all must be retired.
#[test]
fn revalidation_reaches_every_cached_file() {
    if !enough_descriptors(8192) {
        eprintln!("skipped: the descriptor limit is below 8192");
        return;
    }
    let (_s, root, sock) = site("revalidate-all");
    let srv = start(&root, &sock, |c| {
        c.max_watches = 0;
        c.revalidate_every = Duration::from_millis(20);
    });
    let n = 6000;
    for i in 0..n {
        std::fs::write(root.join(format!("sub/f{i}")), b"old").unwrap();
    }
    let mut c = FileClient::connect(&sock).unwrap();
    for i in 0..n {
        c.open(&format!("sub/f{i}")).unwrap();
    }
    let before = srv.stats().retired.load(Ordering::Relaxed);
    let changed: Vec<usize> = (0..n).step_by(6).collect();
    for i in &changed {
        std::fs::write(root.join(format!("sub/f{i}")), b"new!").unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let retired = srv.stats().retired.load(Ordering::Relaxed) - before;
        if retired >= changed.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{retired} of {} changed files retired",
            changed.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A21: a file cached again after each change left its old entry in the CLOCK queue, and
/// while the cache was under budget nothing ever took them out: the queue grew by one entry
/// per change, without bound.
#[test]
fn the_eviction_queue_does_not_grow_with_changes() {
    let (_s, root, sock) = site("clock");
    let srv = start(&root, &sock, |_| {});
    let mut c = FileClient::connect(&sock).unwrap();
    for i in 0..150u32 {
        let body = format!("version {i}");
        std::fs::write(root.join("index.html"), &body).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.open("index.html").unwrap().to_vec() != body.as_bytes() {
            assert!(Instant::now() < deadline, "change {i} not noticed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let entries = srv.stats().clock_entries.load(Ordering::Relaxed);
    assert!(
        entries <= 2 + 64,
        "{entries} queue entries for one cached file"
    );
}
