//! Failover end to end in a lab with etcd (issue 14), real clients in the lab's client
//! namespace (Python), the real switch and its controller, and real deaths (`lab kill`:
//! SIGKILL to every process of the node and its link cut):
//!
//! - 100 idle keep-alive connections on node1; node1 is killed; every client's next request
//!   is answered on the same socket, by node2, within 3 s of the kill;
//! - a download in flight when its node dies is reset on purpose (the client fails fast, it
//!   does not hang), while an idle connection beside it carries on;
//! - a node cut off from the control plane but alive: its idle connections are adopted, and
//!   once the switch fences it none of its packets reaches a client.
//!
//! Needs root, ip, nft, python3 and etcd (`scripts/setup-test-host`), and a `splitos` built
//! with the `failover` feature (`cargo test --all-features`, as the README's command runs).

#![cfg(feature = "failover")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;
use std::time::{Duration, Instant};

/// Reads one response on `s` and tells whether it is a 200 with the body `want` (the
/// scripts below define `want`).
const ANSWER: &str = r#"
def answer(s):
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
"#;

/// A client script with [`ANSWER`] (a definition: `want` is looked up when it runs).
fn script(body: &str) -> String {
    format!("{ANSWER}{body}")
}

const CLIENT: &str = r#"
import socket, sys, time, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
n = int(sys.argv[1]); want = sys.argv[2].encode()
REQ = b'GET /index.html HTTP/1.1\r\nHost: lab\r\n\r\n'
conns = []
for i in range(n):
    s = socket.create_connection(('198.19.0.1', 80)); s.settimeout(10); conns.append(s)
    s.sendall(REQ)
print('ready', sum(answer(s) for s in conns), flush=True)
sys.stdin.readline()
t0 = time.monotonic()
for s in conns: s.sendall(REQ)
good = 0; bad = []; worst = 0.0
for s in conns:
    try:
        if answer(s): good += 1
        else: bad.append('wrong answer')
    except Exception as e:
        bad.append(repr(e))
    worst = max(worst, time.monotonic() - t0)
print('after', good, len(bad), round(worst * 1000), bad[:3], flush=True)
"#;

/// `lab status`'s view of node `k` (1-based): its failover object.
fn failover(lab: &Lab, k: usize) -> serde_json::Value {
    lab.status()["nodes"][k - 1]["failover"].clone()
}

/// Waits until node `k` holds at least `idle` idle checkpoints from the other nodes.
fn wait_for_checkpoints(lab: &Lab, k: usize, idle: u64) {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let f = failover(lab, k);
        if f["held"]["idle"].as_u64().unwrap_or(0) >= idle {
            return;
        }
        assert!(
            Instant::now() < until,
            "node{k} holds no {idle} idle checkpoints after 15 s: {f}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn gather_on(lab: &Lab, to: &str, from: &str) {
    let out = ok(&[
        "lab", "--name", &lab.name, "migrate", "--from", from, "--to", to, "--all", "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["refused"].as_array().is_none_or(Vec::is_empty), "{v}");
}

/// The takeover report node `k` keeps of a dead node, once there is one.
fn takeover_report(lab: &Lab, k: usize) -> serde_json::Value {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let f = failover(lab, k);
        if let Some(r) = f["takeovers"].as_array().and_then(|t| t.last()) {
            return r.clone();
        }
        assert!(
            Instant::now() < until,
            "no takeover reported by node{k}: {f}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn idle_connections_resume_on_the_successor_when_their_node_is_killed() {
    let _one = serial();
    let lab = Lab::up_with("foi", 2, &["--failover"]);
    let body = format!("<h1>lab {}</h1>\n", lab.name);
    let mut client = Client::start(&lab, &script(CLIENT), &["100", &body]);
    assert_eq!(client.line(), "ready 100");
    gather_on(&lab, "node1", "node2");
    wait_for_checkpoints(&lab, 2, 100);
    let killed = Instant::now();
    ok(&["lab", "--name", &lab.name, "kill", "node1"]);
    client.say("go\n");
    let after = client.line();
    let since_kill = killed.elapsed();
    let parts: Vec<&str> = after.split_whitespace().collect();
    assert_eq!(parts[..3], ["after", "100", "0"], "{after}");
    let worst: u64 = parts[3].parse().unwrap();
    assert!(worst < 3000, "the last client waited {worst} ms: {after}");
    let report = takeover_report(&lab, 2);
    assert_eq!(report["adopted"], true, "{report}");
    assert_eq!(report["restored"], 100, "{report}");
    assert_eq!(report["stale"], 0, "{report}");
    eprintln!(
        "100 idle connections: every next request answered {worst} ms after it was sent \
         ({since_kill:?} after the kill); takeover {report}"
    );
}

const TRANSFER: &str = r#"
import socket, sys, time
want = sys.argv[1].encode()
REQ = b'GET /index.html HTTP/1.1\r\nHost: lab\r\n\r\n'
a = socket.create_connection(('198.19.0.1', 80)); a.settimeout(10)
a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
a.sendall(b'GET /big.bin HTTP/1.1\r\nHost: lab\r\n\r\n')
got = len(a.recv(65536))
b = socket.create_connection(('198.19.0.1', 80)); b.settimeout(10)
b.sendall(REQ)
print('ready', answer(b), flush=True)
sys.stdin.readline()
t0 = time.monotonic()
b.sendall(REQ)
okb = answer(b); tb = time.monotonic() - t0
outcome = 'hung'
while time.monotonic() - t0 < 9:
    try:
        d = a.recv(65536)
        if not d: outcome = 'eof'; break
        got += len(d)
    except ConnectionResetError: outcome = 'reset'; break
    except socket.timeout: outcome = 'hung'; break
ta = time.monotonic() - t0
print('after', okb, round(tb * 1000), outcome, round(ta * 1000), got, flush=True)
"#;

/// A failover lab whose client (TRANSFER) has a download stalled in flight and an idle
/// connection, both on node1, the idle one checkpointed at node2.
fn transfer_on_node1(tag: &str) -> (Lab, Client) {
    let lab = Lab::up_with(tag, 2, &["--failover"]);
    // Far more than fits in the client's and the server's buffers: the download is in
    // flight, not finished, when the node dies.
    let big = std::fs::File::create(lab.site.join("big.bin")).unwrap();
    big.set_len(256 << 20).unwrap();
    let body = format!("<h1>lab {}</h1>\n", lab.name);
    let mut client = Client::start(&lab, &script(TRANSFER), &[&body]);
    assert_eq!(client.line(), "ready True");
    gather_on(&lab, "node1", "node2");
    wait_for_checkpoints(&lab, 2, 1);
    (lab, client)
}

/// Lets TRANSFER's client go on; asserts that its idle connection was answered and its
/// download reset, and returns the client's report.
fn idle_answered_download_reset(client: &mut Client) -> String {
    client.say("go\n");
    let after = client.line();
    let parts: Vec<&str> = after.split_whitespace().collect();
    assert_eq!(
        parts[..2],
        ["after", "True"],
        "the idle one failed: {after}"
    );
    assert_eq!(parts[3], "reset", "the download was not reset: {after}");
    after
}

#[test]
fn a_transfer_in_flight_is_reset_and_an_idle_neighbour_carries_on() {
    let _one = serial();
    let (lab, mut client) = transfer_on_node1("fot");
    // Both known to node2: the idle one with its record, the download as open.
    let until = Instant::now() + Duration::from_secs(10);
    while failover(&lab, 2)["held"]["flows"].as_u64().unwrap_or(0) < 2 {
        assert!(Instant::now() < until, "{}", failover(&lab, 2));
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(&["lab", "--name", &lab.name, "kill", "node1"]);
    let after = idle_answered_download_reset(&mut client);
    let report = takeover_report(&lab, 2);
    assert_eq!(report["restored"], 1, "{report}");
    assert_eq!(report["reset"], 1, "{report}");
    eprintln!("idle neighbour answered, download reset: {after}; takeover {report}");
}

#[test]
fn a_node_cut_off_but_alive_reaches_no_client_once_fenced() {
    let _one = serial();
    let (lab, mut client) = transfer_on_node1("fop");
    // Cut off from etcd and node2 while its clients still reach it: node2 hears nothing,
    // has etcd end node1's lease, adopts, and the switch fences node1.
    ok(&["lab", "--name", &lab.name, "partition", "node1"]);
    let report = takeover_report(&lab, 2);
    assert_eq!(report["adopted"], true, "{report}");
    assert_eq!(report["switch_followed"], true, "{report}");
    // From the fence on, node1's packets stop at the switch, though it still sends (the
    // stalled download's window probes).
    let counters = |lab: &Lab| {
        let n1 = lab.status()["nodes"][0].clone();
        (
            n1["forwarded_packets"].as_u64().unwrap(),
            n1["dead_dropped_packets"].as_u64().unwrap(),
        )
    };
    let (fwd0, dropped0) = counters(&lab);
    std::thread::sleep(Duration::from_millis(1500));
    let (fwd1, dropped1) = counters(&lab);
    assert_eq!(fwd0, fwd1, "node1 still reached clients after its fence");
    assert!(dropped1 > dropped0, "node1 sent nothing the fence stopped");
    let after = idle_answered_download_reset(&mut client);
    let fenced1 = dropped1 - dropped0;
    eprintln!("partitioned node1: {after}; fenced packets {fenced1}");
}
