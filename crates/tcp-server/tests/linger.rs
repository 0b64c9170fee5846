//! Lingering close (security review item 23) at the TCP server's level: a connection its
//! application closes while the client still sends is shut down for sending and read (and
//! discarded) until the client lets go, so the client never gets an RST for bytes the
//! application did not read; the application is told `Closed` at once; the connection keeps
//! its budget while it lingers, and gives it to a new connection rather than see it refused.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use splitos_tcp_proto::Request;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Connections the server holds now (across workers), from its statistics, which are
/// refreshed every 100 ms: waits up to `T` for `want`.
fn wait_for_conns(srv: &splitos_tcp_server::TcpServer, want: u64) -> bool {
    let deadline = Instant::now() + T;
    loop {
        let snap = splitos_tcp_server::stats::read(srv.socket_path()).unwrap();
        if snap.workers.iter().map(|w| w.connections).sum::<u64>() == want {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_closed_connection_reads_what_the_client_still_sends_until_it_lets_go() {
    let srv = server("linger-rst");
    let mut app = RawApp::connect(srv.socket_path());
    let (_, addr) = app.listen("127.0.0.1:0", 0).unwrap();
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    client.set_write_timeout(Some(T)).unwrap();
    let h = app.accepted();
    app.send(Request::Send {
        handle: h,
        data: b"response",
    });
    app.send(Request::Close { handle: h });
    let started = Instant::now();
    let closed = app.wait_for(T, |e| matches!(e, Ev::Closed(c) if *c == h));
    assert!(closed.is_some(), "the application was never told Closed");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "Closed waited for the client: {:?}",
        started.elapsed()
    );
    // The client sees the response and its end (the sending side is shut down)...
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"response");
    // ...and may go on sending what the application never read: the server discards it
    // instead of answering with RST (which would make these writes fail).
    for round in 0..4 {
        client
            .write_all(&[b'x'; 64 << 10])
            .unwrap_or_else(|e| panic!("write {round} after the close failed: {e}"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        wait_for_conns(&srv, 1),
        "a lingering connection holds its budget"
    );
    drop(client);
    assert!(
        wait_for_conns(&srv, 0),
        "the connection was not released when the client let go"
    );
}

#[test]
fn a_lingering_connection_gives_its_budget_to_a_new_one() {
    let mut config = config("linger-budget");
    config.budgets.conns.session = 1;
    let srv = start(config);
    let mut app = RawApp::connect(srv.socket_path());
    let (_, addr) = app.listen("127.0.0.1:0", 0).unwrap();
    let mut first = TcpStream::connect(addr).unwrap();
    first.set_read_timeout(Some(T)).unwrap();
    let h = app.accepted();
    app.send(Request::Close { handle: h });
    assert!(app
        .wait_for(T, |e| matches!(e, Ev::Closed(c) if *c == h))
        .is_some());
    let mut got = Vec::new();
    first.read_to_end(&mut got).unwrap(); // shut down for sending: lingering
    assert!(wait_for_conns(&srv, 1));
    // At its budget, the session takes a new connection in place of the lingering one.
    let _second = TcpStream::connect(addr).unwrap();
    let accepted = app.wait_for(T, |e| matches!(e, Ev::Accepted(..)));
    assert!(
        accepted.is_some(),
        "a new connection was refused for a lingering one"
    );
    assert!(wait_for_conns(&srv, 1), "one connection, not two");
}
