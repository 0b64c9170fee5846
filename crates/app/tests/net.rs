//! The library against real kernel clients: Rust std::net, curl and Python's socket module.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{curl_telnet, echo_conn, python_echo_check, session};
use splitos::net::{TcpListener, TcpStream};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

fn echo_server(conns: usize) -> std::net::SocketAddr {
    let l = TcpListener::bind_with(&session(), "127.0.0.1:0", Default::default()).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for _ in 0..conns {
            let Ok((s, _)) = l.accept() else { return };
            std::thread::spawn(move || echo_conn(s));
        }
    });
    addr
}

#[test]
fn echo_with_a_std_client() {
    let addr = echo_server(1);
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let msg: Vec<u8> = (0..200_000u32).map(|i| (i * 13) as u8).collect();
    c.write_all(&msg).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), msg.len());
    assert!(got == msg, "echo differs");
}

#[test]
fn echo_with_python() {
    let addr = echo_server(1);
    python_echo_check(addr.port(), 300_000);
}

#[test]
fn echo_with_curl() {
    let addr = echo_server(1);
    assert_eq!(
        curl_telnet(addr.port(), b"split-os says hello\n"),
        "split-os says hello\n"
    );
}

#[test]
fn outbound_connect_and_errors() {
    let s = session();
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = target.local_addr().unwrap();
    let mut c = TcpStream::connect_with(&s, addr).unwrap();
    assert_eq!(c.peer_addr().unwrap(), addr);
    let (mut t, from) = target.accept().unwrap();
    assert_eq!(from, c.local_addr().unwrap());
    c.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    t.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    t.write_all(b"pong").unwrap();
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");
    c.set_nodelay(true).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let err = c.read(&mut b).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    drop(t);
    assert_eq!(c.read(&mut b).unwrap(), 0, "EOF after the peer closed");
    drop(target);
    let err = TcpStream::connect_with(&s, addr).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let l = TcpListener::bind_with(&s, "127.0.0.1:0", Default::default()).unwrap();
    let err = TcpListener::bind_with(&s, l.local_addr().unwrap(), Default::default())
        .err()
        .unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
}
