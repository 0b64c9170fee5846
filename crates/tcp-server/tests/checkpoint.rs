//! Checkpoints of idle connections (issue 14 §2): real clients on a persistent listener
//! answered by the direct path (or by an application on a recoverable one); the checkpoint
//! stream says when each comes into service, rests (with its record), gets busy again and
//! leaves; and checkpointing never disturbs a connection. `TCP_REPAIR` needs root (or
//! CAP_NET_ADMIN): without it the tests say so and pass vacuously.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use splitos_tcp_proto::{listen_flags, Handle, Request};
use splitos_tcp_server::checkpoint::{Flow, FLAG_EOF};
use splitos_tcp_server::direct::{
    DirectConn, DirectPart, DirectPath, DirectRoute, Expiry, Outcome, RouteRequest,
};
use splitos_tcp_server::{CheckpointConfig, CheckpointEvent, Checkpoints, TcpServer};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The response to one request line `GET <tag>`: its length depends on the tag, so that
/// counting bytes tells responses apart.
fn response(tag: &[u8]) -> Vec<u8> {
    let mut r = b"OK ".to_vec();
    r.extend_from_slice(tag);
    r.push(b' ');
    let fill = 10 + tag.iter().map(|&b| b as usize).sum::<usize>() % 200;
    r.extend(std::iter::repeat_n(b'x', fill));
    r.push(b'\n');
    r
}

/// A direct path answering each line `GET <tag>` with [`response`]; anything else goes to the
/// application.
struct Lines;

impl DirectPath for Lines {
    fn open(&self, _: &RouteRequest) -> Result<Box<dyn DirectRoute>, rustix::io::Errno> {
        Ok(Box::new(Lines))
    }
}

impl DirectRoute for Lines {
    fn serve(
        &mut self,
        conn: &mut DirectConn,
        room: usize,
        answered: &mut u64,
        push: &mut dyn FnMut(DirectPart),
    ) -> Outcome {
        let mut room = room;
        while let Some(end) = conn.pending.iter().position(|&b| b == b'\n') {
            let Some(tag) = conn.pending[..end].strip_prefix(b"GET ") else {
                return Outcome::Defer(std::mem::take(&mut conn.pending));
            };
            if room == 0 {
                return Outcome::Blocked;
            }
            push(DirectPart::Bytes(response(tag)));
            conn.pending.drain(..=end);
            room -= 1;
            *answered += 1;
        }
        Outcome::More
    }

    fn expired(&self, _: &DirectConn, _: Instant) -> Option<Expiry> {
        None
    }

    fn timeout_response(&self) -> Vec<u8> {
        Vec::new()
    }
}

fn can_repair() -> bool {
    let ok = rustix::process::geteuid().is_root();
    if !ok {
        eprintln!("skipped: TCP_REPAIR needs root");
    }
    ok
}

/// A server whose direct path is [`Lines`], checkpointing with `idle_after`.
fn checkpointing(tag: &str, idle_after: Duration) -> (TcpServer, Checkpoints) {
    let mut config = config(tag);
    config.direct = Some(Arc::new(Lines));
    let srv = start(config);
    let ck = srv
        .checkpoints(CheckpointConfig {
            idle_after,
            ..CheckpointConfig::default()
        })
        .unwrap();
    (srv, ck)
}

/// An application with a persistent listener answered by the direct path.
fn direct_listener(srv: &TcpServer) -> (RawApp, std::net::SocketAddr) {
    let mut app = RawApp::connect(srv.socket_path());
    let (l, addr) = app.listen("127.0.0.1:0", listen_flags::PERSISTENT).unwrap();
    app.req += 1;
    let req = app.req;
    app.send(Request::ServeFiles {
        req,
        listener: l,
        header_timeout_s: 60,
        idle_timeout_s: 60,
        socket: b"lines",
    });
    match app.event_skip_sent() {
        Ev::Done(r, ..) if r == req => {}
        other => panic!("ServeFiles: {other:?}"),
    }
    (app, addr)
}

fn flow_of(client: &TcpStream) -> Flow {
    Flow {
        local: client.peer_addr().unwrap(),
        peer: client.local_addr().unwrap(),
    }
}

/// Sends `GET <tag>` and reads its whole response, which must be [`response`]`(tag)`.
fn exchange(client: &mut TcpStream, tag: &str) -> (usize, usize) {
    let req = format!("GET {tag}\n");
    client.write_all(req.as_bytes()).unwrap();
    let want = response(tag.as_bytes());
    let mut got = vec![0u8; want.len()];
    client.read_exact(&mut got).unwrap();
    assert_eq!(got, want, "the response to {tag}");
    (req.len(), want.len())
}

/// Events of the checkpoint stream, collected as they come.
struct Stream {
    ck: Checkpoints,
    seen: Vec<CheckpointEvent>,
    at: usize,
}

impl Stream {
    fn new(ck: Checkpoints) -> Stream {
        Stream {
            ck,
            seen: Vec::new(),
            at: 0,
        }
    }

    /// The next event about `flow` (skipping others), within `within`.
    fn next_for(&mut self, flow: Flow, within: Duration) -> Option<CheckpointEvent> {
        let deadline = Instant::now() + within;
        loop {
            while self.at < self.seen.len() {
                let e = self.seen[self.at].clone();
                self.at += 1;
                if event_flow(&e) == flow {
                    return Some(e);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.ck.wait(left.min(Duration::from_millis(100)));
            self.ck.drain(&mut self.seen, 1024);
        }
    }
}

fn event_flow(e: &CheckpointEvent) -> Flow {
    match e {
        CheckpointEvent::Opened(f) | CheckpointEvent::Closed(f) => *f,
        CheckpointEvent::Idle { flow, .. } | CheckpointEvent::Busy { flow, .. } => *flow,
    }
}

/// Waits for the `Idle` of `flow` with `epoch`; its record's (send_seq, recv_seq), after
/// checking what the record says of the connection.
fn idle(s: &mut Stream, flow: Flow, epoch: u64) -> (u32, u32, Vec<u8>) {
    idle_eof(s, flow, epoch, false)
}

/// [`idle`], of a connection whose client has (`eof`) or has not shut down its side.
fn idle_eof(s: &mut Stream, flow: Flow, epoch: u64, eof: bool) -> (u32, u32, Vec<u8>) {
    match s.next_for(flow, Duration::from_secs(3)) {
        Some(CheckpointEvent::Idle {
            flow: f,
            epoch: e,
            record,
        }) => {
            assert_eq!((f, e), (flow, epoch));
            let r = splitos_repair::record::parse(&record).expect("a valid record");
            assert_eq!((r.local, r.peer), (flow.local, flow.peer));
            let state = if eof {
                splitos_repair::TcpState::CloseWait
            } else {
                splitos_repair::TcpState::Established
            };
            assert_eq!(r.state, state);
            assert!(r.recv_queue.is_empty() && r.send_queue.is_empty());
            assert!(r.server_unsent.is_empty() && r.server_held.is_empty());
            assert!(r.app_unanswered.is_empty());
            assert_eq!(r.user_flags & FLAG_EOF != 0, eof);
            (r.send_seq, r.recv_seq, record.clone())
        }
        other => panic!("expected Idle epoch {epoch} of {flow}, got {other:?}"),
    }
}

#[test]
fn a_resting_connection_is_checkpointed_and_reported_busy_when_it_sends_again() {
    if !can_repair() {
        return;
    }
    let (srv, ck) = checkpointing("ckpt-rest", Duration::from_millis(50));
    let (mut app, addr) = direct_listener(&srv);
    let mut s = Stream::new(ck);
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    let flow = flow_of(&client);
    assert_eq!(
        s.next_for(flow, Duration::from_secs(3)),
        Some(CheckpointEvent::Opened(flow))
    );
    exchange(&mut client, "first");
    let started = Instant::now();
    let (send1, recv1, _) = idle(&mut s, flow, 1);
    assert!(started.elapsed() < Duration::from_secs(1), "Idle took long");
    // The client speaks again: the checkpoint is stale before the answer is even needed.
    let (req2, resp2) = exchange(&mut client, "second-one");
    assert_eq!(
        s.next_for(flow, Duration::from_secs(3)),
        Some(CheckpointEvent::Busy { flow, epoch: 1 })
    );
    let (send2, recv2, record2) = idle(&mut s, flow, 2);
    assert_eq!(recv2.wrapping_sub(recv1) as usize, req2, "recv_seq advance");
    assert_eq!(
        send2.wrapping_sub(send1) as usize,
        resp2,
        "send_seq advance"
    );
    // The connection is as good as ever after two snapshots.
    exchange(&mut client, "third");
    assert_eq!(
        s.next_for(flow, Duration::from_secs(3)),
        Some(CheckpointEvent::Busy { flow, epoch: 2 })
    );
    let (send3, _, record3) = idle(&mut s, flow, 3);
    assert_ne!(send3, send2);
    assert_ne!(record3, record2);
    // A resync re-emits what stands: Opened, and the last record with the next epoch.
    s.ck.resync();
    assert_eq!(
        s.next_for(flow, Duration::from_secs(3)),
        Some(CheckpointEvent::Opened(flow))
    );
    let (_, _, again) = idle(&mut s, flow, 4);
    assert_eq!(again, record3);
    assert_eq!(s.ck.dropped(), 0);
    let stats = s.ck.stats();
    assert_eq!((stats.idle_records, stats.busy_events), (3, 2));
    assert_eq!(stats.failures, 0);
    assert!(stats.record_ns > 0);
    // The client shuts its side down: news (Busy), then a checkpoint that says so.
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(
        s.next_for(flow, Duration::from_secs(3)),
        Some(CheckpointEvent::Busy { flow, epoch: 4 })
    );
    let _ = idle_eof(&mut s, flow, 5, true);
    // The application closes it: stale, then gone.
    let h = match app.wait_for(T, |e| matches!(e, Ev::Eof(_))) {
        Some(Ev::Eof(h)) => h,
        other => panic!("expected Eof, got {other:?}"),
    };
    app.send(Request::Close { handle: h });
    assert_eq!(
        s.next_for(flow, Duration::from_secs(3)),
        Some(CheckpointEvent::Busy { flow, epoch: 5 })
    );
    assert_eq!(
        s.next_for(flow, Duration::from_secs(3)),
        Some(CheckpointEvent::Closed(flow))
    );
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn a_connection_in_the_middle_of_a_request_is_not_checkpointed() {
    if !can_repair() {
        return;
    }
    let (srv, ck) = checkpointing("ckpt-partial", Duration::from_millis(20));
    let (_app, addr) = direct_listener(&srv);
    let mut s = Stream::new(ck);
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    let flow = flow_of(&client);
    assert_eq!(
        s.next_for(flow, Duration::from_secs(3)),
        Some(CheckpointEvent::Opened(flow))
    );
    // Half a request, then a long pause: the server holds bytes it has not answered.
    client.write_all(b"GET half").unwrap();
    assert_eq!(s.next_for(flow, Duration::from_millis(600)), None);
    client.write_all(b"-way\n").unwrap();
    let want = response(b"half-way");
    let mut got = vec![0u8; want.len()];
    client.read_exact(&mut got).unwrap();
    assert_eq!(got, want);
    let _ = idle(&mut s, flow, 1);
    // A listener that is not persistent: its connections are not named at all.
    let mut app = RawApp::connect(srv.socket_path());
    let (_, plain) = app.listen("127.0.0.1:0", 0).unwrap();
    let other = TcpStream::connect(plain).unwrap();
    assert_eq!(
        s.next_for(flow_of(&other), Duration::from_millis(400)),
        None
    );
}

/// A connection a migration takes out of service is `Closed`; one that comes back (the
/// migration dropped it) is `Opened` again, its epochs counting from 1, and still works.
#[test]
fn an_exported_connection_is_closed_and_opened_again_when_it_comes_back() {
    if !can_repair() {
        return;
    }
    let (srv, ck) = checkpointing("ckpt-export", Duration::from_millis(20));
    let (_app, addr) = direct_listener(&srv);
    let mut s = Stream::new(ck);
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    let flow = flow_of(&client);
    assert_eq!(
        s.next_for(flow, Duration::from_secs(3)),
        Some(CheckpointEvent::Opened(flow))
    );
    exchange(&mut client, "before");
    let _ = idle(&mut s, flow, 1);
    let out = srv
        .migration()
        .export(&[flow], Duration::from_secs(5))
        .unwrap();
    assert_eq!(out.moved.len(), 1, "refused: {:?}", out.refused);
    assert_eq!(
        s.next_for(flow, Duration::from_secs(3)),
        Some(CheckpointEvent::Closed(flow))
    );
    drop(out); // not moved after all: back into service here
    assert_eq!(
        s.next_for(flow, Duration::from_secs(3)),
        Some(CheckpointEvent::Opened(flow))
    );
    let _ = idle(&mut s, flow, 1);
    exchange(&mut client, "after");
    assert_eq!(
        s.next_for(flow, Duration::from_secs(3)),
        Some(CheckpointEvent::Busy { flow, epoch: 1 })
    );
}

/// A tiny deterministic generator (no dependency for three random numbers).
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn many_clients_pausing_at_random_are_all_served_while_checkpointed() {
    if !can_repair() {
        return;
    }
    let (srv, ck) = checkpointing("ckpt-many", Duration::from_millis(20));
    let (_app, addr) = direct_listener(&srv);
    let clients = 200;
    let run = Duration::from_secs(2);
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            std::thread::spawn(move || {
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ ((i as u64 + 1) * 7919);
                let mut client = TcpStream::connect(addr).unwrap();
                client.set_read_timeout(Some(T)).unwrap();
                let flow = flow_of(&client);
                let started = Instant::now();
                let mut n = 0;
                while started.elapsed() < run {
                    let pause = next(&mut seed) % 180;
                    std::thread::sleep(Duration::from_millis(pause));
                    exchange(&mut client, &format!("c{i}-r{n}"));
                    n += 1;
                }
                (flow, n)
            })
        })
        .collect();
    let mut events = Vec::new();
    let mut per_client = HashMap::new();
    for t in threads {
        let (flow, n) = t.join().expect("a client failed");
        per_client.insert(flow, n);
    }
    std::thread::sleep(Duration::from_millis(300));
    s_drain(&ck, &mut events);
    assert_eq!(ck.dropped(), 0);
    let stats = ck.stats();
    assert!(
        stats.idle_records > 0,
        "nothing was checkpointed: {stats:?}"
    );
    assert!(stats.busy_events > 0, "nothing got busy again: {stats:?}");
    assert_eq!(stats.failures, 0);
    // Per flow: Opened first, then Idle and Busy alternating, epochs counting up.
    let mut state: HashMap<Flow, (bool, u64, bool)> = HashMap::new();
    for e in &events {
        let f = event_flow(e);
        let st = state.entry(f).or_insert((false, 0, false));
        match e {
            CheckpointEvent::Opened(_) => {
                assert!(!st.0, "Opened twice for {f}");
                st.0 = true;
            }
            CheckpointEvent::Idle { epoch, record, .. } => {
                assert!(st.0 && !st.2, "Idle out of turn for {f}");
                assert_eq!(*epoch, st.1 + 1);
                let r = splitos_repair::record::parse(record).unwrap();
                assert_eq!((r.local, r.peer), (f.local, f.peer));
                st.1 = *epoch;
                st.2 = true;
            }
            CheckpointEvent::Busy { epoch, .. } => {
                assert!(st.2 && *epoch == st.1, "Busy out of turn for {f}");
                st.2 = false;
            }
            CheckpointEvent::Closed(_) => {}
        }
    }
    for f in per_client.keys() {
        assert!(state.get(f).is_some_and(|s| s.0), "no Opened for {f}");
    }
    eprintln!("{} requests, {stats:?}", per_client.values().sum::<usize>());
}

fn s_drain(ck: &Checkpoints, events: &mut Vec<CheckpointEvent>) {
    while ck.drain(events, 4096) > 0 {}
}

/// An application on a recoverable persistent listener: its connection is checkpointed once
/// it has answered (marked) everything it was given, not before.
#[test]
fn an_application_connection_is_checkpointed_at_its_boundaries() {
    if !can_repair() {
        return;
    }
    let srv = start(config("ckpt-app"));
    let ck = srv
        .checkpoints(CheckpointConfig {
            idle_after: Duration::from_millis(20),
            ..CheckpointConfig::default()
        })
        .unwrap();
    assert!(
        srv.checkpoints(CheckpointConfig::default()).is_err(),
        "only one consumer"
    );
    let mut s = Stream::new(ck);
    let mut app = RawApp::connect(srv.socket_path());
    let flags = listen_flags::PERSISTENT | listen_flags::RECOVERABLE;
    let (_, addr) = app.listen("127.0.0.1:0", flags).unwrap();
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    let flow = flow_of(&client);
    let h: Handle = app.accepted();
    assert_eq!(
        s.next_for(flow, Duration::from_secs(3)),
        Some(CheckpointEvent::Opened(flow))
    );
    client.write_all(b"hello\n").unwrap();
    assert_eq!(app.read_exact(h, 6), b"hello\n");
    // Delivered and not answered: the application owes a response.
    assert_eq!(s.next_for(flow, Duration::from_millis(500)), None);
    app.send(Request::Send {
        handle: h,
        data: b"world\n",
    });
    app.send(Request::Answered {
        handle: h,
        received: 6,
    });
    let mut got = [0u8; 6];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"world\n");
    let (_, _, _) = idle(&mut s, flow, 1);
    // The application speaks first (a push): stale.
    app.send(Request::Send {
        handle: h,
        data: b"news\n",
    });
    assert_eq!(
        s.next_for(flow, Duration::from_secs(3)),
        Some(CheckpointEvent::Busy { flow, epoch: 1 })
    );
    let mut got = [0u8; 5];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"news\n");
    // Sent after the mark: not at a boundary until the next one.
    assert_eq!(s.next_for(flow, Duration::from_millis(400)), None);
    app.send(Request::Answered {
        handle: h,
        received: 6,
    });
    let _ = idle(&mut s, flow, 2);
    app.send(Request::Close { handle: h });
    assert_eq!(
        s.next_for(flow, Duration::from_secs(3)),
        Some(CheckpointEvent::Busy { flow, epoch: 2 })
    );
    drop(client); // it lingers until the client lets go
    assert_eq!(
        s.next_for(flow, Duration::from_secs(15)),
        Some(CheckpointEvent::Closed(flow))
    );
    // Dropping the handle turns checkpointing off and lets another be taken.
    drop(s);
    assert!(srv.checkpoints(CheckpointConfig::default()).is_ok());
}

/// A direct path answering every HTTP request head (up to a blank line) with a small fixed
/// response, so that `wrk` can load it.
struct Http;

const HTTP_OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

impl DirectPath for Http {
    fn open(&self, _: &RouteRequest) -> Result<Box<dyn DirectRoute>, rustix::io::Errno> {
        Ok(Box::new(Http))
    }
}

impl DirectRoute for Http {
    fn serve(
        &mut self,
        conn: &mut DirectConn,
        room: usize,
        answered: &mut u64,
        push: &mut dyn FnMut(DirectPart),
    ) -> Outcome {
        let mut room = room;
        while let Some(end) = conn.pending.windows(4).position(|w| w == b"\r\n\r\n") {
            if room == 0 {
                return Outcome::Blocked;
            }
            push(DirectPart::Bytes(HTTP_OK.to_vec()));
            conn.pending.drain(..end + 4);
            room -= 1;
            *answered += 1;
        }
        Outcome::More
    }

    fn expired(&self, _: &DirectConn, _: Instant) -> Option<Expiry> {
        None
    }

    fn timeout_response(&self) -> Vec<u8> {
        Vec::new()
    }
}

/// The cost of checkpointing connections that never rest: `wrk` keep-alive load with
/// checkpoints off and on, in interleaved rounds (run by hand, in release:
/// `cargo test --release -p splitos-tcp-server --test checkpoint -- --ignored --nocapture`).
#[test]
#[ignore = "a measurement: needs wrk, takes 20 s"]
fn wrk_keep_alive_with_checkpoints_on_and_off() {
    let mut config = config("ckpt-wrk");
    config.direct = Some(Arc::new(Http));
    config.threads = 1;
    let srv = start(config);
    let (_app, addr) = {
        let mut app = RawApp::connect(srv.socket_path());
        let (l, addr) = app.listen("127.0.0.1:0", listen_flags::PERSISTENT).unwrap();
        app.send(Request::ServeFiles {
            req: 99,
            listener: l,
            header_timeout_s: 60,
            idle_timeout_s: 60,
            socket: b"http",
        });
        assert!(matches!(app.event_skip_sent(), Ev::Done(99, ..)));
        (app, addr)
    };
    let rate = || {
        let out = std::process::Command::new("wrk")
            .args(["-t1", "-c50", "-d4s", &format!("http://{addr}/")])
            .output()
            .expect("wrk runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no rate in {text}"))
    };
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        off.push(rate());
        let ck = srv.checkpoints(CheckpointConfig::default()).unwrap();
        on.push(rate());
        std::thread::sleep(Duration::from_millis(500));
        let mut events = Vec::new();
        s_drain(&ck, &mut events);
        let count = |f: fn(&CheckpointEvent) -> bool| events.iter().filter(|e| f(e)).count();
        eprintln!(
            "{:?}, dropped {}, opened {} idle {} busy {} closed {}",
            ck.stats(),
            ck.dropped(),
            count(|e| matches!(e, CheckpointEvent::Opened(_))),
            count(|e| matches!(e, CheckpointEvent::Idle { .. })),
            count(|e| matches!(e, CheckpointEvent::Busy { .. })),
            count(|e| matches!(e, CheckpointEvent::Closed(_))),
        );
        drop(ck);
    }
    eprintln!("requests/s with checkpoints off {off:?}, on {on:?}");
}
