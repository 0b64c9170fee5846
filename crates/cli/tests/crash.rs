//! The HTTP application of `splitos serve` crashes under load and no request fails: 50
//! keep-alive clients fetch 16 KiB files while the application is killed with SIGKILL three
//! times (once right after a reload has begun), and then once more the instance a reload is
//! starting. Every request must succeed and no connection may be closed, with the TCP
//! server's direct path on (the default) and with `--no-direct` (the application answers
//! everything).
//!
//! The clients are a Python script (http.client, one thread per keep-alive connection) that
//! counts requests, failed requests and closed connections exactly: a connection counts as
//! closed when a request on it fails, when the server ends it, or when http.client would have
//! quietly opened a new one. If `wrk` is on the PATH, a third test runs it through the same
//! kills and requires no socket error and no non-2xx answer.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::response;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_splitos");
const CONNECTIONS: usize = 50;
const FILES: usize = 16;
const FILE_BYTES: usize = 16 << 10;

/// The contents of file `i` (`/f<i>.bin`): different for every file, so that a response for
/// the wrong file is caught.
fn contents(i: usize) -> Vec<u8> {
    (0..FILE_BYTES).map(|j| ((i * 7 + j) % 251) as u8).collect()
}

/// A `splitos serve` of a fresh site, stopped and cleaned up on drop.
struct Server {
    child: Child,
    port: u16,
    site: PathBuf,
}

impl Server {
    fn start(tag: &str, extra: &[&str]) -> Server {
        let site = std::env::temp_dir().join(format!("splitos-crash-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&site);
        std::fs::create_dir_all(&site).expect("site directory");
        for i in 0..FILES {
            std::fs::write(site.join(format!("f{i}.bin")), contents(i)).expect("site file");
        }
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .arg(&site)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start splitos serve");
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _watchdog = Watchdog::new(child.id(), Duration::from_secs(30));
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let port = line
            .trim()
            .trim_start_matches("http://127.0.0.1:")
            .trim_end_matches('/')
            .parse()
            .unwrap_or(0);
        let s = Server { child, port, site };
        assert!(s.port != 0, "unexpected first line {line:?}");
        s
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The HTTP application processes: the supervisor's children.
    fn apps(&self) -> Vec<u32> {
        let pid = self.pid();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// `splitos status --json` of this server (null if it does not answer).
    fn status(&self) -> serde_json::Value {
        let out = Command::new(BIN)
            .args([
                "status",
                "--json",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
            ])
            .output();
        out.ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default()
    }

    /// Process ids of the applications connected to its TCP server (`splitos status`).
    fn sessions(&self) -> Vec<u32> {
        self.status()["tcp"]["sessions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["pid"].as_u64().map(|p| p as u32))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Requests the TCP server answered itself so far (`splitos status`; refreshed every
    /// 100 ms).
    fn direct_answers(&self) -> u64 {
        self.status()["summary"]["direct_answers"]
            .as_u64()
            .unwrap_or(0)
    }

    /// The one application process, once there is exactly one (within 20 s).
    fn the_app(&self) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let [one] = self.apps()[..] {
                return one;
            }
            assert!(Instant::now() < deadline, "apps: {:?}", self.apps());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        signal(self.pid(), rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for app in self.apps() {
            signal(app, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.site);
    }
}

/// Kills process `pid` if it is still running `limit` after this was made and this has not
/// been dropped: a blocking read of its output then ends, and the test fails instead of
/// hanging.
struct Watchdog(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Watchdog {
    fn new(pid: u32, limit: Duration) -> Watchdog {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if Instant::now() > deadline {
                    eprintln!("watchdog: process {pid} ran past {limit:?}; killing it");
                    signal(pid, rustix::process::Signal::KILL);
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Watchdog(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// The keep-alive clients: one thread per connection, each fetching random files until told
/// to stop (or for at most 180 s), checking every body. Commands on stdin: `report` prints
/// the counters as one JSON line, `stop` (or end of input) ends the run and prints them.
const CLIENTS: &str = r#"
import http.client, json, random, sys, threading, time

port, nconn, nfiles, size = (int(a) for a in sys.argv[1:5])
bodies = [bytes((i * 7 + j) % 251 for j in range(size)) for i in range(nfiles)]
lock = threading.Lock()
stats = {"requests": 0, "failures": 0, "closed": 0, "errors": []}
stop = threading.Event()
started = time.monotonic()

def note(failed, closed, why):
    with lock:
        stats["requests"] += 1
        stats["failures"] += failed
        stats["closed"] += closed
        if why and len(stats["errors"]) < 10:
            stats["errors"].append(why)

def open_conn():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    c.connect()
    return c, c.sock.getsockname()

def client(k):
    rnd = random.Random(k)
    c, local = open_conn()
    while not stop.is_set() and time.monotonic() - started < 180:
        i = rnd.randrange(nfiles)
        why = None
        try:
            c.request("GET", "/f%d.bin" % i)
            r = c.getresponse()
            b = r.read()
            if r.status != 200 or b != bodies[i]:
                why = "conn %d: /f%d.bin: status %d, %d bytes" % (k, i, r.status, len(b))
        except Exception as e:
            why = "conn %d: /f%d.bin: %r" % (k, i, e)
        # Closed: the request failed on it, the server ended it (http.client dropped the
        # socket), or http.client quietly replaced it.
        closed = why is not None or c.sock is None or c.sock.getsockname() != local
        note(why is not None, 1 if closed else 0, why)
        if closed:
            c.close()
            try:
                c, local = open_conn()
            except Exception as e:
                note(1, 0, "conn %d: reconnect: %r" % (k, e))
                time.sleep(0.1)
                c, local = http.client.HTTPConnection("127.0.0.1", port, timeout=20), None

def snapshot():
    with lock:
        return json.dumps(stats)

threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(nconn)]
for t in threads:
    t.start()
for line in sys.stdin:
    if line.strip() == "report":
        print(snapshot(), flush=True)
    else:
        break
stop.set()
for t in threads:
    t.join(30)
print(snapshot(), flush=True)
"#;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    requests: u64,
    failures: u64,
    closed: u64,
}

/// The running Python clients, stopped on drop (and killed by a watchdog after 240 s).
struct Clients {
    child: Child,
    input: Option<ChildStdin>,
    output: BufReader<ChildStdout>,
    errors: Vec<String>,
    _watchdog: Watchdog,
}

impl Clients {
    fn start(port: u16) -> Clients {
        let mut child = Command::new("python3")
            .args(["-c", CLIENTS])
            .args([port, CONNECTIONS as u16, FILES as u16].map(|n| n.to_string()))
            .arg(FILE_BYTES.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 (the clients)");
        let input = child.stdin.take();
        let output = BufReader::new(child.stdout.take().expect("clients' stdout"));
        let watchdog = Watchdog::new(child.id(), Duration::from_secs(240));
        Clients {
            child,
            input,
            output,
            errors: Vec::new(),
            _watchdog: watchdog,
        }
    }

    fn read_counts(&mut self) -> Counts {
        let mut line = String::new();
        let _ = self.output.read_line(&mut line);
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("clients said {line:?}: {e}"));
        let n = |k: &str| v[k].as_u64().unwrap_or(u64::MAX);
        if let Some(errs) = v["errors"].as_array() {
            self.errors = errs
                .iter()
                .filter_map(|e| e.as_str().map(String::from))
                .collect();
        }
        Counts {
            requests: n("requests"),
            failures: n("failures"),
            closed: n("closed"),
        }
    }

    fn report(&mut self) -> Counts {
        if let Some(i) = self.input.as_mut() {
            let _ = writeln!(i, "report");
            let _ = i.flush();
        }
        self.read_counts()
    }

    fn stop(&mut self) -> Counts {
        drop(self.input.take());
        let c = self.read_counts();
        let _ = self.child.wait();
        c
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        drop(self.input.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (up to 20 s) until a single application serves that is none of `gone`.
fn wait_for_successor(s: &Server, gone: &[u32]) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let apps = s.apps();
        if let [one] = apps[..] {
            if !gone.contains(&one) {
                return one;
            }
        }
        assert!(Instant::now() < deadline, "no successor: {apps:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How an application is killed.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// The one serving, at a random moment of the load.
    Serving,
    /// The one serving, right after a reload began (its successor is starting).
    OldDuringReload,
    /// The successor a reload is starting, before it has taken over.
    NewDuringReload,
}

/// The kills every test makes: three of the serving instance (one right after a reload
/// began), then one of an instance a reload is starting.
const KILLS: [Kill; 4] = [
    Kill::Serving,
    Kill::Serving,
    Kill::OldDuringReload,
    Kill::NewDuringReload,
];

/// Runs the kills against `s` while clients load it; `load` reads the clients' counters.
/// Returns the figures of each kill.
fn kill_rounds(s: &Server, mut load: impl FnMut() -> Counts) -> Vec<(Kill, Counts)> {
    std::thread::sleep(Duration::from_millis(1500));
    let mut per_kill = Vec::new();
    for kill in KILLS {
        let before = load();
        let old = s.the_app();
        let reloading = !matches!(kill, Kill::Serving);
        let reload = reloading.then(|| {
            Command::new(BIN)
                .args(["reload", "--listen", &format!("127.0.0.1:{}", s.port)])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("splitos reload")
        });
        let mut gone = vec![old];
        if reloading {
            // Right after the reload began: the supervisor has started the new instance,
            // which has not taken over yet.
            let deadline = Instant::now() + Duration::from_secs(5);
            let new = loop {
                if let Some(&n) = s.apps().iter().find(|&&p| p != old) {
                    break Some(n);
                }
                if Instant::now() > deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            if let Kill::NewDuringReload = kill {
                let new = new.expect("the reload started no new instance");
                // Once it has connected to the TCP server, so that it is typically taking
                // over (the old one draining) when it dies. The old instance may stay (the
                // new one died before it was ready) or be succeeded by a restarted one:
                // either way, one that is not the victim serves next.
                let deadline = Instant::now() + Duration::from_secs(5);
                while !s.sessions().contains(&new) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                gone = vec![new];
            }
        }
        signal(gone[0], rustix::process::Signal::KILL);
        let next = wait_for_successor(s, &gone);
        assert!(!gone.contains(&next));
        if let Some(mut r) = reload {
            let deadline = Instant::now() + Duration::from_secs(60);
            while r.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = r.kill();
            let _ = r.wait();
        }
        // Long enough to see the successor serve, and for the supervisor not to count it
        // among instances that die right after starting (five in a row make it give up).
        std::thread::sleep(Duration::from_millis(2500));
        let after = load();
        per_kill.push((
            kill,
            Counts {
                requests: after.requests - before.requests,
                failures: after.failures - before.failures,
                closed: after.closed - before.closed,
            },
        ));
    }
    per_kill
}

fn crash_test(tag: &str, extra: &[&str]) {
    let s = Server::start(tag, extra);
    let mut clients = Clients::start(s.port);
    let per_kill = kill_rounds(&s, || clients.report());
    let total = clients.stop();
    for (i, (kill, k)) in per_kill.iter().enumerate() {
        eprintln!(
            "{tag}: kill {} ({kill:?}): {} requests, {} failed, {} connections closed",
            i + 1,
            k.requests,
            k.failures,
            k.closed
        );
    }
    eprintln!(
        "{tag}: total over {} kills: {} requests, {} failed, {} connections closed",
        per_kill.len(),
        total.requests,
        total.failures,
        total.closed
    );
    assert_eq!(per_kill.len(), KILLS.len());
    assert!(
        per_kill.iter().all(|(_, k)| k.requests > 100),
        "the clients stalled: {per_kill:?}"
    );
    assert_eq!(
        (total.failures, total.closed),
        (0, 0),
        "failed requests and closed connections; first errors: {:#?}",
        clients.errors
    );
}

#[test]
fn kill_9_of_the_application_fails_no_request_with_the_direct_path() {
    crash_test("direct", &[]);
}

#[test]
fn kill_9_of_the_application_fails_no_request_when_it_answers_everything() {
    crash_test("no-direct", &["--no-direct"]);
}

/// The same kills under wrk (when it is installed): no socket error, no non-2xx answer.
#[test]
fn kill_9_under_wrk() {
    let Ok(out) = Command::new("wrk").arg("--version").output() else {
        eprintln!("wrk is not installed; skipped");
        return;
    };
    let _ = out;
    for (tag, extra) in [
        ("wrk-direct", &[][..]),
        ("wrk-no-direct", &["--no-direct"][..]),
    ] {
        let s = Server::start(tag, extra);
        let mut wrk = Command::new("wrk")
            .args(["-t2", "-c50", "-d20s", "--timeout", "10s"])
            .arg(format!("http://127.0.0.1:{}/f3.bin", s.port))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("wrk");
        let kills = kill_rounds(&s, Counts::default).len();
        let out = {
            let deadline = Instant::now() + Duration::from_secs(60);
            while wrk.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = wrk.kill();
            wrk.wait_with_output().expect("wrk output")
        };
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!("{tag} ({kills} kills):\n{text}");
        assert!(text.contains("Requests/sec"), "{text}");
        assert!(!text.contains("Socket errors"), "{text}");
        assert!(!text.contains("Non-2xx"), "{text}");
    }
}

/// Requests in progress when the application dies — a head half sent, a POST whose body is
/// still coming — are answered by its successor on the same connection: a GET with its file,
/// a POST with its error (405), never a silent close. A body too large to be kept for a
/// successor is refused at once (413, and the connection closes), before any crash could
/// catch it half read.
#[test]
fn requests_in_progress_when_the_application_dies_are_answered() {
    for (tag, extra) in [
        ("progress-direct", &[][..]),
        ("progress-no-direct", &["--no-direct"][..]),
    ] {
        let s = Server::start(tag, extra);
        let connect = || {
            let c = std::net::TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            BufReader::new(c)
        };
        let (mut get, mut post) = (connect(), connect());
        // Both connections have been answered once, so the application knows them.
        for c in [&mut get, &mut post] {
            c.get_mut()
                .write_all(b"GET /f1.bin HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("write");
            let (status, body) = response(c).unwrap_or_else(|e| panic!("{tag}: {e}"));
            assert_eq!((status.as_str(), body), ("HTTP/1.1 200 OK", contents(1)));
        }
        get.get_mut()
            .write_all(b"GET /f2.bin HTTP/1.1\r\nHo")
            .expect("write");
        let body = vec![b'x'; 1000];
        post.get_mut()
            .write_all(b"POST /f2.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            .and_then(|_| post.get_mut().write_all(&body[..100]))
            .expect("write");
        std::thread::sleep(Duration::from_millis(300));
        let old = s.the_app();
        signal(old, rustix::process::Signal::KILL);
        let new = wait_for_successor(&s, &[old]);
        assert_ne!(old, new);
        get.get_mut().write_all(b"st: x\r\n\r\n").expect("write");
        post.get_mut().write_all(&body[100..]).expect("write");
        let (status, body) = response(&mut get).unwrap_or_else(|e| panic!("{tag}: GET: {e}"));
        assert_eq!(
            (status.as_str(), body),
            ("HTTP/1.1 200 OK", contents(2)),
            "{tag}"
        );
        let (status, _) = response(&mut post).unwrap_or_else(|e| panic!("{tag}: POST: {e}"));
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed", "{tag}");
        // Both go on.
        for c in [&mut get, &mut post] {
            c.get_mut()
                .write_all(b"GET /f3.bin HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("write");
            let (status, body) = response(c).unwrap_or_else(|e| panic!("{tag}: {e}"));
            assert_eq!(
                (status.as_str(), body),
                ("HTTP/1.1 200 OK", contents(3)),
                "{tag}"
            );
        }
        // Too large a body to keep for a successor: refused at once, and closed.
        let mut big = connect();
        big.get_mut()
            .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            .expect("write");
        let (status, _) = response(&mut big).unwrap_or_else(|e| panic!("{tag}: big: {e}"));
        assert_eq!(status, "HTTP/1.1 413 Content Too Large", "{tag}");
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut big, &mut rest);
        assert!(rest.is_empty(), "{tag}: more after the 413");
        // Quick deaths in a row make the supervisor give up: let the successor age.
        std::thread::sleep(Duration::from_millis(2100));
    }
}

/// The connections a crashed application's successor adopts go back to the direct path: the
/// successor installs the route after it took them over, and they must get it too, or the
/// application would answer them for the rest of their lives (found with `splitos status`:
/// direct answers stopped growing after a kill).
#[test]
fn connections_handed_on_by_a_crash_return_to_the_direct_path() {
    let s = Server::start("return", &[]);
    let mut clients = Clients::start(s.port);
    std::thread::sleep(Duration::from_millis(1500));
    let old = s.the_app();
    signal(old, rustix::process::Signal::KILL);
    wait_for_successor(&s, &[old]);
    std::thread::sleep(Duration::from_millis(1500));
    let (d0, r0) = (s.direct_answers(), clients.report().requests);
    std::thread::sleep(Duration::from_millis(2000));
    let (d1, r1) = (s.direct_answers(), clients.report().requests);
    let total = clients.stop();
    assert_eq!(
        (total.failures, total.closed),
        (0, 0),
        "{:#?}",
        clients.errors
    );
    let (direct, all) = (d1 - d0, r1 - r0);
    eprintln!("after the crash: {direct} of {all} requests answered by the direct path");
    assert!(all > 100, "the clients stalled");
    assert!(
        direct * 2 > all,
        "after the crash only {direct} of {all} requests took the direct path"
    );
}
