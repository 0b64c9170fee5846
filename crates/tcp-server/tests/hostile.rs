//! The TCP server against hostile and careless applications: each test reproduces one finding
//! of the security review (`/work/shared/reviews/security.md`, the `A`/`S` numbers) and checks
//! that only the offender pays for it.

mod common;

use common::*;
use splitos_tcp_proto::Request;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[test]
fn server_process_entry() {
    server_process_main();
}

/// A9: an empty `Send` used to become an empty chunk that the kernel "sent" (0 bytes) over and
/// over, so the queue never drained and a `Close` behind it never finished.
#[test]
fn an_empty_send_neither_spins_nor_blocks_the_close_behind_it() {
    let srv = server("a9-empty-send");
    let mut app = RawApp::connect(srv.socket_path());
    let (_, addr) = app.listen("127.0.0.1:0", 0).unwrap();
    let mut client = TcpStream::connect(addr).unwrap();
    let h = app.accepted();
    app.send(Request::Send {
        handle: h,
        data: b"before",
    });
    std::thread::sleep(Duration::from_millis(50)); // so the empty send is a chunk of its own
    app.send(Request::Send {
        handle: h,
        data: b"",
    });
    app.send(Request::Close { handle: h });
    let closed = app.wait_for(
        Duration::from_secs(3),
        |e| matches!(e, Ev::Closed(c) if *c == h),
    );
    assert!(
        closed.is_some(),
        "the close behind an empty send never finished"
    );
    client.set_read_timeout(Some(T)).unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"before");
    let _ = client.write_all(b"x");
}

/// A11: closing a listener did not give its place back, so after 256 listens over its
/// lifetime a session could never listen again (EMFILE), and the statistics showed the
/// cumulative count.
#[test]
fn closed_listeners_give_their_place_back() {
    let srv = server("a11-listeners");
    let mut app = RawApp::connect(srv.socket_path());
    let max = splitos_tcp_server::ServerConfig::default().max_listeners_per_session;
    for round in 0..=max {
        let (h, _) = app
            .listen("127.0.0.1:0", 0)
            .unwrap_or_else(|errno| panic!("listen {round} refused with errno {errno}"));
        app.send(Request::Close { handle: h });
        assert_eq!(app.event_skip_sent(), Ev::Closed(h));
    }
    // The statistics count the listeners open now (none), not every one ever opened.
    let deadline = std::time::Instant::now() + T;
    loop {
        let snap = splitos_tcp_server::stats::read(srv.socket_path()).unwrap();
        let listeners: u64 = snap.workers.iter().map(|w| w.listeners).sum();
        if listeners == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "statistics still show {listeners} listeners"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A19: the `Hello` name is shown by `splitos status` on an operator's terminal; control bytes
/// in it (escape sequences, newlines) must not get there.
#[test]
fn the_hello_name_is_stored_printable_only() {
    let srv = server("a19-name");
    let mut app = RawApp::connect(srv.socket_path());
    let evil: &[u8] = b"\x1b]0;owned\x07\x1b[2Jfake\nline\r\x00\x9b31m\xff-ok";
    app.send(Request::Hello {
        version: splitos_tcp_proto::VERSION,
        name: evil,
    });
    app.listen("127.0.0.1:0", 0).unwrap(); // a round trip: the Hello has been handled
    let deadline = std::time::Instant::now() + T;
    let name = loop {
        let snap = splitos_tcp_server::stats::read(srv.socket_path()).unwrap();
        if let Some(s) = snap.sessions.iter().find(|s| s.name.contains("ok")) {
            break s.name.clone();
        }
        assert!(std::time::Instant::now() < deadline, "session never shown");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        name.chars().all(|c| c == ' ' || c.is_ascii_graphic()),
        "name stored with unprintable characters: {name:?}"
    );
    assert!(name.contains("fake") && name.contains("-ok"), "{name:?}");
}
