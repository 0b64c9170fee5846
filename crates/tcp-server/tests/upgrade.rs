//! Listeners passed between two TCP servers on one node (`splitos upgrade`): a copy of a
//! persistent listener's socket, adopted by another server, is taken over there by the next
//! persistent listen on its address (a plain bind would fail: the old server still holds
//! it); anything that is not a listening TCP socket is refused.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use splitos_tcp_proto::listen_flags;
use splitos_tcp_server::upgrade::AdoptError;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[test]
fn a_listener_moves_to_another_server_and_accepts_there() {
    let old = server("upgrade-old");
    let new = server("upgrade-new");
    let uid = rustix::process::geteuid().as_raw();
    let mut app = RawApp::connect(old.socket_path());
    let (_, addr) = app
        .listen("127.0.0.1:0", listen_flags::PERSISTENT)
        .expect("listen");
    let copies = old.migration().listeners(T).expect("listeners");
    assert_eq!(copies.len(), 1, "one listener, one copy");
    let (at, owner, fd) = copies.into_iter().next().unwrap();
    assert_eq!((at, owner), (addr, uid));
    assert_eq!(new.migration().adopt_listener(fd, uid).unwrap(), addr);

    // The new server's application takes it over (the address is in use otherwise).
    let mut next = RawApp::connect(new.socket_path());
    let (_, got) = next
        .listen(&addr.to_string(), listen_flags::PERSISTENT)
        .expect("the adopted listener is taken over");
    assert_eq!(got, addr);
    // The old application lets go of it (it dies): connections reach the new one.
    drop(app);
    std::thread::sleep(Duration::from_millis(200));
    let _ = old.migration().take_parked(addr, uid);
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    let h = next.accepted();
    c.write_all(b"ping").unwrap();
    assert_eq!(next.read_exact(h, 4), b"ping");
    next.send(splitos_tcp_proto::Request::Send {
        handle: h,
        data: b"pong",
    });
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");
}

#[test]
fn only_listening_tcp_sockets_are_adopted() {
    let srv = server("upgrade-refuse");
    let uid = rustix::process::geteuid().as_raw();
    let m = srv.migration();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let e = m.adopt_listener(udp.into(), uid).err();
    assert!(matches!(e, Some(AdoptError::NotAListener(_))), "{e:?}");
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let e = m.adopt_listener(c.into(), uid).err();
    assert!(matches!(e, Some(AdoptError::NotAListener(_))), "{e:?}");
    let unix = std::os::unix::net::UnixListener::bind(
        std::env::temp_dir().join(format!("splitos-upgrade-{}.sock", std::process::id())),
    );
    if let Ok(u) = unix {
        let path = u
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()));
        let e = m.adopt_listener(u.into(), uid).err();
        assert!(matches!(e, Some(AdoptError::NotAListener(_))), "{e:?}");
        if let Some(p) = path {
            let _ = std::fs::remove_file(p);
        }
    }
    // A real listener is adopted, and can be taken out again.
    let addr = l.local_addr().unwrap();
    assert_eq!(m.adopt_listener(l.into(), uid).unwrap(), addr);
    assert!(m.take_parked(addr, uid).is_some());
    assert!(m.take_parked(addr, uid).is_none());
}
