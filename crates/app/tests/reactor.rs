//! The event-driven interface against a TCP server in this process and kernel clients: sends
//! past the send window wait in order behind each other, and a connection moves between two
//! reactors (instances) with its unprocessed bytes, the client seeing one unbroken stream.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use splitos::net::ListenOptions;
use splitos::reactor::{Events, Handle, NetEvent, Reactor};
use splitos::WaitPolicy;
use splitos_tcp_server::{ServerConfig, TcpServer};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A TCP server on a socket of its own; it removes its files when dropped.
fn server(tag: &str) -> TcpServer {
    let socket =
        std::env::temp_dir().join(format!("splitos-reactor-{}-{tag}.sock", std::process::id()));
    TcpServer::start(ServerConfig {
        socket,
        threads: 1,
        ..ServerConfig::default()
    })
    .expect("TCP server")
}

/// Polls until `want` matches an event (bounded: 10 s).
fn until<T>(
    r: &mut Reactor,
    ev: &mut Events,
    mut want: impl FnMut(&NetEvent<'_>) -> Option<T>,
) -> T {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < end, "event did not come within 10 s");
        r.poll(ev, Some(Duration::from_millis(50))).unwrap();
        // The whole batch goes through `want` (it may collect data), the first match returns.
        let mut found = None;
        for e in ev.iter() {
            if let Some(v) = want(&e) {
                found.get_or_insert(v);
            }
        }
        if let Some(v) = found {
            return v;
        }
    }
}

#[test]
fn sends_past_the_window_queue_in_order_and_connections_move_between_instances() {
    let srv = server("handoff");
    let mut a = Reactor::connect(srv.socket_path(), WaitPolicy::Block, "a").unwrap();
    let persistent = ListenOptions {
        persistent: true,
        ..ListenOptions::default()
    };
    let (listener, addr) = a
        .listen("127.0.0.1:0".parse().unwrap(), persistent)
        .unwrap();
    let mut ev = Events::new();

    let mut client = TcpStream::connect(addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(b"hello").unwrap();
    let mut conn = None;
    let mut got = Vec::new();
    until(&mut a, &mut ev, |e| {
        match e {
            NetEvent::Accepted {
                listener: l,
                conn: c,
                ..
            } if *l == listener => conn = Some(*c),
            NetEvent::Data { conn: c, data } => {
                assert_eq!(Some(*c), conn);
                got.extend_from_slice(data);
            }
            _ => {}
        }
        (got.len() >= 5).then_some(())
    });
    let conn: Handle = conn.unwrap();
    assert_eq!(got, b"hello");

    // 3 MiB in 3 sends, three times the send window: they wait here and go out in order as
    // the server confirms, while the client reads.
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i % 253) as u8).collect();
    for part in big.chunks(1 << 20) {
        a.send(conn, part).unwrap();
    }
    a.send(conn, b"|end-of-A").unwrap();
    let want = big.len() + 9;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; want];
        client.read_exact(&mut buf).unwrap();
        (client, buf)
    });
    let end = Instant::now() + Duration::from_secs(20);
    while !reader.is_finished() {
        assert!(Instant::now() < end, "3 MiB did not arrive within 20 s");
        a.poll(&mut ev, Some(Duration::from_millis(10))).unwrap();
    }
    let (mut client, buf) = reader.join().unwrap();
    assert!(
        buf[..big.len()] == big[..],
        "bytes out of order or corrupted"
    );
    assert_eq!(&buf[big.len()..], b"|end-of-A");

    // Half a request arrives; A pauses, more arrives (held by the server), A hands the
    // connection off with the half it did not process, and parks its listener.
    client.write_all(b"GET /x").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut partial = Vec::new();
    a.poll(&mut ev, Some(Duration::from_millis(200))).unwrap();
    for e in ev.iter() {
        if let NetEvent::Data { data, .. } = e {
            partial.extend_from_slice(data);
        }
    }
    a.pause(conn).unwrap();
    until(&mut a, &mut ev, |e| {
        match e {
            NetEvent::Data { data, .. } => partial.extend_from_slice(data),
            NetEvent::Paused { conn: c } if *c == conn => return Some(()),
            _ => {}
        }
        None
    });
    client.write_all(b" HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(partial, b"GET /x");
    a.hand_off(conn, &partial).unwrap();
    a.hand_off_listener(listener).unwrap();
    until(&mut a, &mut ev, |e| {
        matches!(e, NetEvent::Closed { conn: c } if *c == conn).then_some(())
    });

    let mut b = Reactor::connect(srv.socket_path(), WaitPolicy::Block, "b").unwrap();
    let (_l, baddr) = b.listen(addr, persistent).unwrap();
    assert_eq!(baddr, addr);
    let mut bconn = None;
    let mut rest = Vec::new();
    until(&mut b, &mut ev, |e| {
        match e {
            NetEvent::Accepted { conn, .. } => bconn = Some(*conn),
            NetEvent::Data { conn: c, data } => {
                assert_eq!(Some(*c), bconn);
                rest.extend_from_slice(data);
            }
            _ => {}
        }
        rest.ends_with(b"\r\n\r\n").then_some(())
    });
    let bconn = bconn.unwrap();
    assert_eq!(rest, b"GET /x HTTP/1.1\r\n\r\n");
    b.send(bconn, b"from-B").unwrap();
    b.close(bconn).unwrap();
    b.flush().unwrap();
    let mut tail = Vec::new();
    client.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, b"from-B");
    // Operations on a handle that is gone fail cleanly.
    assert!(a.send(conn, b"x").is_err());
}

/// Reads from `client` until `want` bytes came (bounded by its read timeout).
fn read_exactly(client: &mut TcpStream, want: usize) -> Vec<u8> {
    let mut buf = vec![0u8; want];
    client.read_exact(&mut buf).unwrap();
    buf
}

/// An application that dies (its reactor dropped without a word: to the server that is a
/// crash) between requests on a recoverable listener: the response it had queued completes,
/// and the request it had received but not answered goes, with its bytes, to the next
/// instance, which answers it on the same client socket. A connection that died half way
/// through a response cannot be finished by anyone and is closed.
#[test]
fn a_crash_between_requests_loses_no_request_and_no_connection() {
    let srv = server("recover");
    let recoverable = ListenOptions {
        persistent: true,
        recoverable: true,
        ..ListenOptions::default()
    };
    let mut a = Reactor::connect(srv.socket_path(), WaitPolicy::Block, "a").unwrap();
    let (listener, addr) = a
        .listen("127.0.0.1:0".parse().unwrap(), recoverable)
        .unwrap();
    let mut ev = Events::new();
    let mut clean = TcpStream::connect(addr).unwrap();
    let mut torn = TcpStream::connect(addr).unwrap();
    for c in [&clean, &torn] {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let mut conns = Vec::new();
    until(&mut a, &mut ev, |e| {
        if let NetEvent::Accepted {
            listener: l, conn, ..
        } = e
        {
            assert_eq!(*l, listener);
            conns.push(*conn);
        }
        (conns.len() == 2).then_some(())
    });

    // Each connection gets one request that A answers and marks, then one it only reads.
    clean.write_all(b"one\n").unwrap();
    torn.write_all(b"one\n").unwrap();
    let mut seen = 0;
    until(&mut a, &mut ev, |e| {
        if let NetEvent::Data { data, .. } = e {
            seen += data.len();
        }
        (seen == 8).then_some(())
    });
    for &c in &conns {
        a.send(c, b"answer one\n").unwrap();
        a.answered(c, 0).unwrap();
    }
    a.flush().unwrap();
    assert_eq!(read_exactly(&mut clean, 11), b"answer one\n");
    assert_eq!(read_exactly(&mut torn, 11), b"answer one\n");
    clean.write_all(b"two\n").unwrap();
    torn.write_all(b"two\n").unwrap();
    let mut seen = 0;
    until(&mut a, &mut ev, |e| {
        if let NetEvent::Data { data, .. } = e {
            seen += data.len();
        }
        (seen == 8).then_some(())
    });
    // On the second connection A has begun its answer: that one cannot go on.
    let torn_conn = conns[1];
    a.send(torn_conn, b"answ").unwrap();
    a.flush().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(a); // the crash

    // The successor takes over the listener and the connection with its unanswered request.
    let mut b = Reactor::connect(srv.socket_path(), WaitPolicy::Block, "b").unwrap();
    // The server notices the death within milliseconds; until it has parked the listener, the
    // address is still in use (as for any restart: the successor retries).
    let deadline = Instant::now() + Duration::from_secs(5);
    let baddr = loop {
        match b.listen(addr, recoverable) {
            Ok((_, a)) => break a,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("the successor could not take the listener over: {e}"),
        }
    };
    assert_eq!(baddr, addr);
    let mut got = Vec::new();
    let mut conn = None;
    until(&mut b, &mut ev, |e| {
        match e {
            NetEvent::Accepted { conn: c, .. } => conn = Some(*c),
            NetEvent::Data { data, .. } => got.extend_from_slice(data),
            _ => {}
        }
        (got.len() >= 4).then_some(())
    });
    assert_eq!(
        got, b"two\n",
        "the unanswered request went to the successor"
    );
    let conn = conn.expect("the connection was adopted");
    b.send(conn, b"answer two\n").unwrap();
    b.answered(conn, 0).unwrap();
    b.flush().unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let mut reply = Vec::new();
    clean
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    while reply.len() < 11 {
        assert!(Instant::now() < end, "no answer from the successor");
        b.poll(&mut ev, Some(Duration::from_millis(10))).unwrap();
        let mut buf = [0u8; 64];
        match clean.read(&mut buf) {
            Ok(0) => panic!("the recovered connection was closed"),
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    assert_eq!(reply, b"answer two\n", "same client socket, next answer");

    // The torn one: its half answer went out (the kernel had it), then the connection ended.
    let mut rest = Vec::new();
    let _ = torn.read_to_end(&mut rest);
    assert_eq!(rest, b"answ");
}
