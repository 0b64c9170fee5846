//! The TCP server against a raw protocol client (no application library), real kernel clients
//! (std::net), and real application processes that get `kill -9`ed.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use splitos_m2m::{ChannelConfig, Message, WaitPolicy};
use splitos_tcp_proto::{listen_flags, Event, Handle, Request, NO_ADDR};
use splitos_tcp_server::{ServerConfig, TcpServer};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn echo_through_the_server_with_a_kernel_client() {
    echo_with(server("echo"));
}

/// In poll mode the workers never sleep, so completions must be collected without a blocking
/// wait (deferred task work is run by every submit).
#[test]
fn echo_with_polling_workers() {
    echo_with(server_with("echo-poll", WaitPolicy::Poll));
}

fn echo_with(srv: TcpServer) {
    let mut app = RawApp::connect(srv.socket_path());
    app.send(Request::Hello {
        version: splitos_tcp_proto::VERSION,
        name: b"raw-test",
    });
    let (lh, addr) = app.listen("127.0.0.1:0", listen_flags::REUSE_ADDR).unwrap();
    assert_ne!(addr.port(), 0);
    let mut client = TcpStream::connect(addr).unwrap();
    let ch = match app.event() {
        Ev::Accepted(l, c, peer) => {
            assert_eq!(l, lh);
            assert_eq!(peer, client.local_addr().unwrap());
            c
        }
        other => panic!("expected Accepted, got {other:?}"),
    };
    // Small (inline) and large (buffer) reads and writes.
    for size in [1usize, 100, 4096, 70_000, 300_000] {
        let msg: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        client.write_all(&msg).unwrap();
        let got = app.read_exact(ch, size);
        assert_eq!(got, msg, "size {size}");
        for part in got.chunks(60_000) {
            app.send(Request::Send {
                handle: ch,
                data: part,
            });
        }
        let mut back = vec![0; size];
        client.set_read_timeout(Some(T)).unwrap();
        client.read_exact(&mut back).unwrap();
        assert_eq!(back, msg, "echo of size {size}");
    }
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(app.event_skip_sent(), Ev::Eof(ch));
    app.send(Request::Close { handle: ch });
    assert_eq!(app.event_skip_sent(), Ev::Closed(ch));
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // Stats are visible without asking the server.
    let snap = splitos_tcp_server::stats::read(srv.socket_path()).unwrap();
    assert_eq!(snap.server_pid, std::process::id() as u64);
    assert_eq!(snap.workers.len(), 2);
}

/// An application that queues its replies and a close and then goes away at once (a crash
/// right after answering, or a one-shot worker) still gets them carried out. The setup makes
/// the server notice the departure while sending it events, with requests still queued: the
/// application reads no events, so the client's small writes back up in the server's outbox
/// and every pass tries to deliver them; and more requests than a pass serves are waiting in
/// its ring when it leaves.
#[test]
fn a_departed_applications_last_sends_and_close_are_carried_out() {
    let srv = server("last-words");
    for round in 0..20 {
        let mut app = RawApp::connect_with(
            srv.socket_path(),
            ChannelConfig {
                ring_bytes: 64 << 10,
                wait: WaitPolicy::adaptive(),
                ..ChannelConfig::default()
            },
        );
        let (_, addr) = app.listen("127.0.0.1:0", listen_flags::REUSE_ADDR).unwrap();
        let mut client = TcpStream::connect(addr).unwrap();
        client.set_nodelay(true).unwrap();
        client.set_read_timeout(Some(T)).unwrap();
        let ch = match app.event() {
            Ev::Accepted(_, c, _) => c,
            other => panic!("expected Accepted, got {other:?}"),
        };
        // Small writes arrive as small inline events: 128 KiB of them is more than the
        // application's 64 KiB ring holds and far less than the receive window, so the server
        // reads it all (closing with unread bytes would reset the connection).
        for _ in 0..128 {
            client.write_all(&[7u8; 1024]).unwrap();
            std::thread::sleep(Duration::from_micros(50));
        }
        let parts = 3_000usize;
        let part = |i: usize| -> Vec<u8> { (0..100).map(|j| (i * 31 + j) as u8).collect() };
        for i in 0..parts {
            app.send(Request::Send {
                handle: ch,
                data: &part(i),
            });
        }
        app.send(Request::Close { handle: ch });
        drop(app);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        let want: Vec<u8> = (0..parts).flat_map(part).collect();
        assert_eq!(got.len(), want.len(), "round {round}: bytes delivered");
        assert!(got == want, "round {round}: bytes differ");
    }
}

#[test]
fn outbound_connect_and_errors_come_back_as_errno() {
    let srv = server("connect");
    let mut app = RawApp::connect(srv.socket_path());
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taddr = target.local_addr().unwrap();
    app.send(Request::Connect {
        req: 7,
        addr: taddr,
    });
    let (h, local) = match app.event() {
        Ev::Done(7, h, local, peer) => {
            assert_eq!(peer, taddr);
            (h, local)
        }
        other => panic!("expected Done, got {other:?}"),
    };
    let (mut s, from) = target.accept().unwrap();
    assert_eq!(from, local);
    app.send(Request::Send {
        handle: h,
        data: b"hi there",
    });
    let mut b = [0u8; 8];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hi there");

    // A closed port: ECONNREFUSED (111).
    drop(target);
    app.send(Request::Connect {
        req: 8,
        addr: taddr,
    });
    assert_eq!(app.event_skip_sent(), Ev::Failed(8, 111));
    // Address in use: EADDRINUSE (98).
    let (_, addr) = app.listen("127.0.0.1:0", 0).unwrap();
    assert_eq!(app.listen(&addr.to_string(), 0), Err(98));
}

#[test]
fn malformed_and_forged_requests_hurt_only_their_sender() {
    let srv = server("hostile");
    let mut good = RawApp::connect(srv.socket_path());
    let (_, addr) = good.listen("127.0.0.1:0", 0).unwrap();
    let mut evil = RawApp::connect(srv.socket_path());

    // Undecodable: a ProtocolError reply, and the session stays.
    evil.chan.send(&[200, 1, 2, 3]).unwrap();
    assert_eq!(evil.event(), Ev::ProtocolError(200, 95));
    evil.chan.send(&[2, 0]).unwrap(); // truncated Listen
    assert_eq!(evil.event(), Ev::ProtocolError(2, 22));

    // A forged handle (the good app's listener is slot 0 on some worker): EBADF, no effect.
    let forged = Handle::new(0, 0);
    evil.send(Request::Close { handle: forged });
    assert_eq!(evil.event(), Ev::Error(forged, 9));
    evil.send(Request::Send {
        handle: forged,
        data: b"x",
    });
    assert_eq!(evil.event(), Ev::Error(forged, 9));

    // The good app still accepts connections.
    let _c = TcpStream::connect(addr).unwrap();
    assert!(matches!(good.event(), Ev::Accepted(..)));

    // Repeated violations: the evil session is dropped.
    for _ in 0..100 {
        if evil.chan.send(&[250]).is_err() {
            break;
        }
    }
    let deadline = Instant::now() + T;
    loop {
        assert!(Instant::now() < deadline, "evil session never dropped");
        match evil.chan.recv_timeout(Duration::from_millis(100)) {
            Err(splitos_m2m::Error::PeerGone) => break,
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => {}
        }
    }
    let _c2 = TcpStream::connect(addr).unwrap();
    assert!(
        matches!(good.event(), Ev::Accepted(..)),
        "good app affected"
    );
}

#[test]
fn application_must_acknowledge_or_the_server_stops_reading() {
    let srv = server("backpressure");
    let mut app = RawApp::connect(srv.socket_path());
    let (_, addr) = app.listen("127.0.0.1:0", 0).unwrap();
    let mut client = TcpStream::connect(addr).unwrap();
    let h = match app.event() {
        Ev::Accepted(_, c, _) => c,
        other => panic!("{other:?}"),
    };
    // The client writes far more than the receive window; the app reads without acking.
    let writer = std::thread::spawn(move || {
        client
            .set_write_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let chunk = vec![9u8; 64 << 10];
        let mut total = 0usize;
        while total < (64 << 20) {
            match client.write(&chunk) {
                Ok(n) => total += n,
                Err(_) => break, // blocked: back-pressure reached the client
            }
        }
        (total, client)
    });
    let mut delivered = 0usize;
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        match app.chan.recv_timeout(Duration::from_millis(200)).unwrap() {
            Some(Message::Inline(b)) => {
                if let Ok(Event::Data { data, .. }) = Event::decode(b) {
                    delivered += data.len();
                }
            }
            Some(Message::Buffer(rx)) => delivered += rx.len(), // dropped: returned, not acked
            None => {}
        }
    }
    let (written, client) = writer.join().unwrap();
    let window = splitos_tcp_proto::RECV_WINDOW as usize;
    assert!(
        delivered <= window + (64 << 10) * 64,
        "server delivered {delivered} unacknowledged bytes"
    );
    assert!(
        written < 64 << 20,
        "client was never blocked ({written} bytes written)"
    );
    // Acknowledging resumes the flow.
    app.send(Request::Consumed {
        handle: h,
        bytes: delivered as u32,
    });
    let more = app.chan.recv_timeout(T).unwrap();
    assert!(more.is_some(), "no data after acknowledging");
    drop(client);
}

/// Runs as a separate application process for the kill tests (see `child_app_entry`).
fn spawn_app(role: &str, socket: &Path, addr: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child_app_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("APP_ROLE", role)
        .env("APP_SOCKET", socket)
        .env("APP_ADDR", addr)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn child_app_entry() {
    let Ok(role) = std::env::var("APP_ROLE") else {
        return;
    };
    let socket = PathBuf::from(std::env::var("APP_SOCKET").unwrap());
    if role == "server" {
        let srv = TcpServer::start(ServerConfig {
            socket,
            threads: 2,
            wait: WaitPolicy::Block,
            ..ServerConfig::default()
        })
        .unwrap();
        let mut b = [0u8; 1];
        let _ = std::io::stdin().read(&mut b); // until the parent closes stdin
        srv.shutdown();
        return;
    }
    let addr = std::env::var("APP_ADDR").unwrap();
    let mut app = RawApp::connect(&socket);
    let flags = if role == "persistent" {
        listen_flags::PERSISTENT | listen_flags::REUSE_ADDR
    } else {
        listen_flags::REUSE_ADDR
    };
    let (_, local) = app.listen(&addr, flags).expect("child listen");
    println!("LISTENING {local}");
    let start = Instant::now();
    // Echo everything on every connection until killed (bounded).
    while start.elapsed() < Duration::from_secs(30) {
        match app.chan.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(Message::Inline(b))) => {
                if let Ok(Event::Data { handle, data }) = Event::decode(b) {
                    let (h, d) = (handle, data.to_vec());
                    app.send(Request::Consumed {
                        handle: h,
                        bytes: d.len() as u32,
                    });
                    app.send(Request::Send {
                        handle: h,
                        data: &d,
                    });
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

fn wait_listening(child: &mut std::process::Child) -> SocketAddr {
    let mut out = child.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while out.read(&mut b).unwrap() == 1 {
        if b[0] == b'\n' {
            let s = String::from_utf8_lossy(&line).to_string();
            // The test harness may have written "test child_app_entry ... " on the same line.
            if let Some(at) = s.find("LISTENING ") {
                return s[at + 10..].trim().parse().unwrap();
            }
            line.clear();
        } else {
            line.push(b[0]);
        }
    }
    panic!("child never listened");
}

fn count_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Runs a server in a process of its own (so its fds can be counted) until stdin closes.
fn spawn_server_process(tag: &str) -> (std::process::Child, PathBuf) {
    let path = socket_path(tag);
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_app_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("APP_ROLE", "server")
        .env("APP_SOCKET", &path)
        .env("APP_ADDR", "")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + T;
    while splitos_tcp_server::stats::read(&path).is_err() {
        assert!(Instant::now() < deadline, "server process did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, path)
}

#[test]
fn kill_9_of_an_application_releases_everything() {
    let (mut server, socket) = spawn_server_process("kill");
    let _files = RemoveOnDrop(socket.clone());
    let server_pid = server.id();
    let mut other = RawApp::connect(&socket);
    let (_, other_addr) = other.listen("127.0.0.1:0", 0).unwrap();
    let mut baseline = None;
    let mut other_conns = Vec::new();
    for round in 0..8 {
        let mut child = spawn_app("plain", &socket, "127.0.0.1:0");
        let addr = wait_listening(&mut child);
        let mut conns: Vec<TcpStream> =
            (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for c in &mut conns {
            c.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            c.set_read_timeout(Some(T)).unwrap();
            c.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"ping");
        }
        // Kill it mid-transfer: every connection has 64 KiB on its way through the server.
        let chunk = vec![5u8; 64 << 10];
        for c in &mut conns {
            c.set_write_timeout(Some(T)).unwrap();
            c.write_all(&chunk).unwrap();
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Every connection of the dead application is closed by the server (after whatever
        // echo was already on its way).
        for c in &mut conns {
            let mut b = vec![0u8; 64 << 10];
            let mut drained = 0usize;
            loop {
                match c.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
                assert!(drained <= 64 << 10, "more bytes than were sent");
            }
        }
        // Its listening port is released (nothing accepts there any more).
        let deadline = Instant::now() + T;
        while TcpStream::connect(addr).is_ok() {
            assert!(Instant::now() < deadline, "listener left open");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        let fds = count_fds(server_pid);
        if round == 1 {
            baseline = Some(fds);
        }
        if let Some(b) = baseline {
            // One more fd per round is the other application's new connection.
            let allowed = b + (round - 1);
            assert!(
                fds <= allowed,
                "server fds grew: {b} -> {fds} after {round} kills"
            );
        }
        // The other application is unaffected.
        other_conns.push(TcpStream::connect(other_addr).unwrap());
        assert!(matches!(other.event(), Ev::Accepted(..)));
    }
    drop(server.stdin.take());
    let status = server.wait().unwrap();
    assert!(status.success(), "server process failed: {status}");
}

#[test]
fn persistent_listener_survives_a_restart_with_no_refused_connection() {
    let srv = server("persist");
    // Pick a free port, then hand it to the application.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut first = spawn_app("persistent", srv.socket_path(), &addr);
    let target = wait_listening(&mut first);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    // A bounded connect loop that counts refusals while the application restarts.
    let load = std::thread::spawn(move || {
        let (mut ok, mut refused, mut echoed) = (0u32, 0u32, 0u32);
        let start = Instant::now();
        let mut pending = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed)
            && start.elapsed() < Duration::from_secs(20)
        {
            match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                Ok(mut s) => {
                    ok += 1;
                    let _ = s.write_all(b"x");
                    pending.push(s);
                }
                Err(_) => refused += 1,
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for mut s in pending.into_iter().rev().take(20) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 1];
            if s.read(&mut b).map(|n| n == 1).unwrap_or(false) {
                echoed += 1;
            }
        }
        (ok, refused, echoed)
    });
    std::thread::sleep(Duration::from_millis(300));
    first.kill().unwrap();
    first.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(srv.parked_listeners(), 1, "listener not parked");
    let mut second = spawn_app("persistent", srv.socket_path(), &addr);
    assert_eq!(wait_listening(&mut second), target);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, refused, echoed) = load.join().unwrap();
    assert_eq!(
        srv.parked_listeners(),
        0,
        "the new instance did not take the listener over"
    );
    let _ = second.kill();
    let _ = second.wait();
    eprintln!("restart: {ok} connections, {refused} refused, {echoed} of the last 20 echoed");
    assert_eq!(refused, 0, "connections were refused during the restart");
    assert!(ok > 50, "load loop made only {ok} connections");
    assert!(
        echoed >= 15,
        "connections made after the restart were not served ({echoed}/20)"
    );
}

#[test]
fn access_policy_refuses_privileged_ports_to_other_users() {
    let mut cfg = ServerConfig {
        socket: socket_path("access"),
        wait: WaitPolicy::Block,
        ..ServerConfig::default()
    };
    // Pretend we are someone else: only ports 20000-20010 for everyone.
    cfg.access = splitos_tcp_server::AccessPolicy {
        rules: vec!["*:20000-20010".parse().unwrap()],
    };
    let srv = TcpServer::start(cfg).unwrap();
    let mut app = RawApp::connect(srv.socket_path());
    assert_eq!(app.listen("127.0.0.1:80", 0), Err(13));
    assert_eq!(app.listen("127.0.0.1:30000", 0), Err(13));
    assert!(
        app.listen("127.0.0.1:0", 0).is_ok(),
        "ephemeral port refused"
    );
    let _ = NO_ADDR;
}

#[test]
fn connection_limit_covers_outbound_connects() {
    let mut config = ServerConfig {
        socket: socket_path("limit"),
        wait: WaitPolicy::Block,
        ..ServerConfig::default()
    };
    config.budgets.conns.session = 2;
    let srv = TcpServer::start(config).unwrap();
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = target.local_addr().unwrap();
    let mut app = RawApp::connect(srv.socket_path());
    for req in 1..=2 {
        app.send(Request::Connect { req, addr });
        assert!(matches!(app.event(), Ev::Done(r, ..) if r == req));
    }
    app.send(Request::Connect { req: 3, addr });
    assert_eq!(app.event(), Ev::Failed(3, 24), "third connection allowed");
}

/// Reads from a kernel socket until `want` bytes arrived (or 10 s passed).
fn read_n(s: &mut std::net::TcpStream, want: usize) -> Vec<u8> {
    s.set_read_timeout(Some(T)).unwrap();
    let mut got = vec![0u8; want];
    s.read_exact(&mut got).expect("bytes from the server");
    got
}

/// The reload path: instance A answers part of a stream, pauses the connection while the client
/// keeps sending, parks its listener and hands the connection off with the bytes it did not
/// process; instance B, listening on the same address, adopts it and sees exactly the rest of
/// the stream, and the client sees A's reply, then B's, on one unbroken connection.
#[test]
fn connections_move_between_instances_with_their_unprocessed_bytes() {
    use splitos_tcp_proto::listen_flags::{PERSISTENT, REUSE_ADDR};
    let srv = server("handoff");
    let mut a = RawApp::connect(srv.socket_path());
    let (listener, addr) = a.listen("127.0.0.1:0", PERSISTENT | REUSE_ADDR).unwrap();
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    client.write_all(b"first;sec").unwrap();
    let conn = match a.event_skip_sent() {
        Ev::Accepted(l, c, _) if l == listener => c,
        other => panic!("unexpected {other:?}"),
    };
    let got = a.read_exact(conn, 9);
    assert_eq!(got, b"first;sec");
    a.send(Request::Send {
        handle: conn,
        data: b"reply-from-A;",
    });
    a.send(Request::Pause { handle: conn });
    assert_eq!(a.event_skip_sent(), Ev::Paused(conn));
    // Sent after the pause: held by the server, never delivered to A.
    client.write_all(b"ond;third;").unwrap();
    assert_eq!(read_n(&mut client, 13), b"reply-from-A;");
    std::thread::sleep(Duration::from_millis(50));
    // Handing off an unpaused or unknown handle is refused without harm.
    a.send(Request::Handoff {
        handle: Handle::new(999, 1),
        data: b"",
    });
    assert!(matches!(
        a.event_skip_sent(),
        Ev::Error(..) | Ev::ProtocolError(..)
    ));
    a.send(Request::Handoff {
        handle: listener,
        data: b"",
    });
    assert_eq!(a.event_skip_sent(), Ev::Closed(listener));
    // The listener is parked: B can take the address while A is still alive.
    a.send(Request::Handoff {
        handle: conn,
        data: b"sec",
    });
    assert_eq!(a.event_skip_sent(), Ev::Closed(conn));
    let mut b = RawApp::connect(srv.socket_path());
    let (_bl, baddr) = b
        .listen(&addr.to_string(), PERSISTENT | REUSE_ADDR)
        .unwrap();
    assert_eq!(baddr, addr);
    let bconn = match b.event_skip_sent() {
        Ev::Accepted(_, c, _) => c,
        other => panic!("unexpected {other:?}"),
    };
    let rest = b.read_exact(bconn, b"second;third;".len());
    assert_eq!(rest, b"second;third;");
    b.send(Request::Send {
        handle: bconn,
        data: b"reply-from-B",
    });
    assert_eq!(read_n(&mut client, 12), b"reply-from-B");
    // New connections reach B too, and A, still alive, hears of neither.
    let mut c2 = std::net::TcpStream::connect(addr).unwrap();
    c2.write_all(b"x").unwrap();
    assert!(matches!(b.event_skip_sent(), Ev::Accepted(..)));
    assert!(a
        .chan
        .recv_timeout(Duration::from_millis(200))
        .unwrap()
        .is_none());
}
