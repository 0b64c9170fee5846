//! Live migration end to end in a lab (issue 13 §4), with real clients in the lab's client
//! namespace (Python) and the real switch, node links and TCP_REPAIR:
//!
//! - a 64 MiB download on one keep-alive connection moves half-way and back: every byte
//!   arrives (sha256), no reset, no long stall, and the next request on the same socket is
//!   answered;
//! - 1,000 idle keep-alive connections move in one batch in under a second, and each answers
//!   its next request on the same client socket;
//! - a connection making back-to-back requests moves node1 -> node2 -> node1 100 times with
//!   no failed request, and no request waits more than 250 ms.
//!
//! Needs root, ip, nft, curl and python3 (`scripts/setup-test-host`). The tests run one at a
//! time: each builds a lab, and their timings mean little on a machine they share.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Moves every movable connection of node `from` to node `to`; the report as JSON.
fn migrate(lab: &Lab, from: &str, to: &str) -> serde_json::Value {
    let out = ok(&[
        "lab", "--name", &lab.name, "migrate", "--from", from, "--to", to, "--all", "--json",
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn moved(r: &serde_json::Value) -> usize {
    r["moved"].as_array().unwrap().len()
}

/// Moves the lab's connections from whichever node has them to the other; returns the report
/// and the node they are on now.
fn move_across(lab: &Lab) -> (serde_json::Value, &'static str) {
    let r = migrate(lab, "node1", "node2");
    if moved(&r) > 0 {
        return (r, "node2");
    }
    (migrate(lab, "node2", "node1"), "node1")
}

const DOWNLOAD: &str = r#"
import socket, time, hashlib, sys
s = socket.create_connection(('198.19.0.1', 80)); s.settimeout(10)
s.sendall(b'GET /big.bin HTTP/1.1\r\nHost: lab\r\n\r\n')
buf = b''
while b'\r\n\r\n' not in buf:
    buf += s.recv(65536)
head, body = buf.split(b'\r\n\r\n', 1)
assert head.startswith(b'HTTP/1.1 200'), head
n = int([l for l in head.split(b'\r\n') if l.lower().startswith(b'content-length')][0].split(b':')[1])
h = hashlib.sha256(body); got = len(body)
print('started', flush=True)
last = time.monotonic(); stall = 0.0
while got < n:
    d = s.recv(65536)
    if not d:
        break
    now = time.monotonic(); stall = max(stall, now - last); last = now
    h.update(d); got += len(d)
    time.sleep(0.002)  # a client slower than the server: the download is in flight a while
print('done', got, h.hexdigest(), round(stall * 1000, 1), flush=True)
s.sendall(b'GET /index.html HTTP/1.1\r\nHost: lab\r\n\r\n')
print('next', s.recv(65536).split(b'\r\n')[0].decode(), flush=True)
"#;

#[test]
fn a_download_in_flight_moves_and_every_byte_arrives() {
    let _one = serial();
    let lab = Lab::up("mvd", 2);
    let mut random = std::io::Read::take(std::fs::File::open("/dev/urandom").unwrap(), 64 << 20);
    let mut file = std::fs::File::create(lab.site.join("big.bin")).unwrap();
    std::io::copy(&mut random, &mut file).unwrap();
    drop(file);
    let expected = String::from_utf8(
        Command::new("sha256sum")
            .arg(lab.site.join("big.bin"))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let expected = expected.split_whitespace().next().unwrap().to_string();

    let mut client = Client::start(&lab, DOWNLOAD, &[]);
    assert_eq!(client.line(), "started");
    // About a tenth in, then back again at about a third.
    std::thread::sleep(Duration::from_millis(300));
    let (first, now_on) = move_across(&lab);
    assert_eq!(moved(&first), 1, "{first}");
    assert_eq!(first["live"], 1, "{first}");
    std::thread::sleep(Duration::from_millis(600));
    let back = if now_on == "node2" {
        migrate(&lab, "node2", "node1")
    } else {
        migrate(&lab, "node1", "node2")
    };
    assert_eq!(moved(&back), 1, "the download was still in flight: {back}");

    let done = client.line();
    let f: Vec<&str> = done.split_whitespace().collect();
    assert_eq!(f[0], "done", "{done}");
    assert_eq!(f[1], (64u64 << 20).to_string(), "every byte: {done}");
    assert_eq!(f[2], expected, "the same bytes: {done}");
    // The target is 100 ms (issue 13), and `splitos-bench cluster` measures it on a release
    // build; this test runs the debug build on a machine it shares, so it allows noise.
    let stall: f64 = f[3].parse().unwrap();
    assert!(stall < 250.0, "longest stall {stall} ms: {done}");
    assert_eq!(client.line(), "next HTTP/1.1 200 OK");
    eprintln!(
        "download: cut-overs {} ms and {} ms, longest stall {stall} ms",
        first["cutover_ms"], back["cutover_ms"]
    );
}

const IDLE: &str = r#"
import socket, sys, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
n = int(sys.argv[1]); want = sys.argv[2].encode()
def req(s):
    s.sendall(b'GET /index.html HTTP/1.1\r\nHost: lab\r\n\r\n')
    buf = b''
    while b'\r\n\r\n' not in buf:
        d = s.recv(4096)
        if not d: raise Exception('closed')
        buf += d
    head, body = buf.split(b'\r\n\r\n', 1)
    k = int([l for l in head.split(b'\r\n') if l.lower().startswith(b'content-length')][0].split(b':')[1])
    while len(body) < k:
        d = s.recv(4096)
        if not d: raise Exception('closed')
        body += d
    return head.startswith(b'HTTP/1.1 200') and body == want
conns = []
for i in range(n):
    s = socket.create_connection(('198.19.0.1', 80)); s.settimeout(10); conns.append(s)
print('ready', sum(req(s) for s in conns), flush=True)
sys.stdin.readline()
good = 0; bad = []
for s in conns:
    try:
        if req(s): good += 1
        else: bad.append('wrong answer')
    except Exception as e:
        bad.append(str(e))
print('after', good, len(bad), bad[:3], flush=True)
"#;

#[test]
fn a_thousand_idle_connections_move_in_one_batch() {
    let _one = serial();
    let lab = Lab::up("mvi", 2);
    let body = format!("<h1>lab {}</h1>\n", lab.name);
    let mut client = Client::start(&lab, IDLE, &["1000", &body]);
    assert_eq!(client.line(), "ready 1000");
    // The switch spread them over both nodes: gather them on node1 first.
    let gather = migrate(&lab, "node2", "node1");
    assert!(gather["refused"].as_array().unwrap().is_empty(), "{gather}");
    let batch = migrate(&lab, "node1", "node2");
    assert_eq!(moved(&batch), 1000, "{}", batch["refused"]);
    assert_eq!(batch["live"], 1000);
    let total = batch["total_ms"].as_f64().unwrap();
    assert!(total < 1000.0, "the batch took {total} ms");
    // `lab status` tells where they are: all on node2, each by a per-flow override.
    let st = lab.status();
    let nodes = st["nodes"].as_array().unwrap();
    let count = |k: usize, what: &str| nodes[k][what].as_array().unwrap().len();
    assert_eq!(count(0, "connections"), 0, "{}", st["nodes"]);
    assert_eq!(count(1, "connections"), 1000);
    assert_eq!(count(1, "owned_flows"), 1000);
    client.say("go\n");
    let after = client.line();
    assert!(after.starts_with("after 1000 0 "), "{after}");
    eprintln!(
        "1,000 connections: {total:.1} ms in all, cut-over {} ms",
        batch["cutover_ms"]
    );
}

const BACK_TO_BACK: &str = r#"
import socket, sys, time, os
stop = sys.argv[1]; want = sys.argv[2].encode()
s = socket.create_connection(('198.19.0.1', 80)); s.settimeout(5)
n = 0; failed = 0; worst = 0.0
print('running', flush=True)
deadline = time.monotonic() + 120
while not os.path.exists(stop) and time.monotonic() < deadline:
    t = time.monotonic()
    try:
        s.sendall(b'GET /index.html HTTP/1.1\r\nHost: lab\r\n\r\n')
        buf = b''
        while not (b'\r\n\r\n' in buf and buf.endswith(want)):
            d = s.recv(4096)
            if not d: raise Exception('closed')
            buf += d
        if not buf.startswith(b'HTTP/1.1 200'): failed += 1
    except Exception as e:
        failed += 1
        print('error', e, flush=True)
        break
    worst = max(worst, time.monotonic() - t); n += 1
print('requests', n, 'failed', failed, 'worst_ms', round(worst * 1000, 1), flush=True)
"#;

/// Removes a file on drop.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_busy_connection_moves_back_and_forth_a_hundred_times() {
    let _one = serial();
    let lab = Lab::up("mvb", 2);
    let body = format!("<h1>lab {}</h1>\n", lab.name);
    let stop = RemoveOnDrop(std::env::temp_dir().join(format!("{}-stop", lab.name)));
    let mut client = Client::start(&lab, BACK_TO_BACK, &[stop.0.to_str().unwrap(), &body]);
    assert_eq!(client.line(), "running");
    let (r, mut on) = move_across(&lab);
    assert_eq!(moved(&r), 1, "{r}");
    let mut cutovers = vec![r["cutover_ms"].as_f64().unwrap()];
    let started = Instant::now();
    for _ in 1..200 {
        assert!(started.elapsed() < Duration::from_secs(90), "too slow");
        let (from, to) = if on == "node1" {
            ("node1", "node2")
        } else {
            ("node2", "node1")
        };
        let r = migrate(&lab, from, to);
        assert_eq!(moved(&r), 1, "{r}");
        cutovers.push(r["cutover_ms"].as_f64().unwrap());
        on = to;
    }
    std::fs::write(&stop.0, b"").unwrap();
    let summary = client.line();
    let f: Vec<&str> = summary.split_whitespace().collect();
    assert_eq!(f[0], "requests", "{summary}");
    assert_eq!(f[3], "0", "failed requests: {summary}");
    // The target is 250 ms, the stretch 20 ms (held packets wait in the switch's hold device
    // instead of the client's retransmission timer); measured: ~5 ms. 150 ms still catches a
    // lost packet (Linux's minimum RTO is 200 ms) on a noisy machine.
    let worst: f64 = f[5].parse().unwrap();
    assert!(worst < 150.0, "a request waited {worst} ms: {summary}");
    cutovers.sort_by(f64::total_cmp);
    eprintln!(
        "200 migrations under back-to-back requests: {summary}; cut-over median {:.2} ms, max {:.2} ms",
        cutovers[100], cutovers[199]
    );
}

/// Issue 14 §5: `splitos lab drain node2` under wrk load: 0 failed requests, node2 keeps no
/// bucket and no connection, and new connections go to node1.
#[test]
fn a_node_drains_under_load_without_a_failed_request() {
    let _one = serial();
    let lab = Lab::up("mvr", 2);
    let wrk = Command::new(BIN)
        .args(["lab", "--name", &lab.name, "exec", "client", "--"])
        .args(["wrk", "-t2", "-c50", "-d5s", "http://198.19.0.1/index.html"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let out = ok(&["lab", "--name", &lab.name, "drain", "node2", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(r["buckets_moved"].as_u64().unwrap() > 0, "{r}");
    assert!(
        r["moved"].as_u64().unwrap() > 0,
        "wrk's connections on node2 moved: {r}"
    );
    let wrk = wrk.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&wrk.stdout);
    assert!(wrk.status.success(), "{report}");
    assert!(report.contains("requests in"), "{report}");
    assert!(!report.contains("Socket errors"), "{report}");
    assert!(!report.contains("Non-2xx"), "{report}");
    let st = lab.status();
    let nodes = st["nodes"].as_array().unwrap();
    assert_eq!(
        nodes[1]["connections"],
        serde_json::json!([]),
        "{}",
        st["nodes"]
    );
    let sw: serde_json::Value =
        serde_json::from_str(&lab.exec("switch", &[BIN, "switch", "status", "--json"])).unwrap();
    assert_eq!(sw["nodes"][1]["buckets"], 0, "{sw}");
    assert_eq!(sw["draining"], 0, "{sw}");
    eprintln!(
        "drain under wrk: {} connections moved in {} migrations, {:.1} ms; {}",
        r["moved"],
        r["migrations"],
        r["total_ms"].as_f64().unwrap(),
        report
            .lines()
            .find(|l| l.contains("requests in"))
            .unwrap_or("")
    );
}

const CHURN: &str = r#"
import socket, time, sys
end = time.monotonic() + float(sys.argv[1]); want = sys.argv[2].encode(); n = 0; bad = 0
while time.monotonic() < end:
    try:
        s = socket.create_connection(('198.19.0.1', 80)); s.settimeout(3)
        for i in range(3):
            s.sendall(b'GET /index.html HTTP/1.1\r\nHost: lab\r\n\r\n'); b = b''
            while not b.endswith(want):
                d = s.recv(4096)
                if not d: raise Exception('closed')
                b += d
            time.sleep(0.005)  # long enough to be listed, short enough to end mid-move
        s.close(); n += 1
    except Exception as e:
        bad += 1; print('error', e, flush=True)
print('connections', n, 'failed', bad, flush=True)
"#;

/// Connections that open, make three requests and close, while migrations run back to back:
/// a connection that ends between the listing and the move is refused (it is gone), the
/// migration reports it and ends cleanly, and no client sees an error.
#[test]
fn migrations_amid_short_connections_fail_nothing() {
    let _one = serial();
    let lab = Lab::up("mvc", 2);
    let body = format!("<h1>lab {}</h1>\n", lab.name);
    let mut client = Client::start(&lab, CHURN, &["4", &body]);
    let started = Instant::now();
    let mut moved_total = 0;
    while started.elapsed() < Duration::from_millis(3500) {
        for (from, to) in [("node1", "node2"), ("node2", "node1")] {
            moved_total += moved(&migrate(&lab, from, to));
        }
    }
    let summary = client.line();
    let f: Vec<&str> = summary.split_whitespace().collect();
    assert_eq!(f[0], "connections", "{summary}");
    assert_eq!(f[3], "0", "failed connections: {summary}");
    eprintln!("amid short connections: {summary}; {moved_total} moved");
}
