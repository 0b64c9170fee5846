//! The echo example binary itself (embedded mode), checked with Rust std::net, curl and
//! Python's socket module.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{curl_telnet, python_echo_check};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Example(Child);
impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts target/<profile>/examples/echo (cargo builds examples for `cargo test`).
fn start_example() -> (Example, SocketAddr) {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir.join("examples").join("echo");
    assert!(bin.exists(), "{} not built", bin.display());
    let mut child = Command::new(bin)
        .arg("127.0.0.1:0")
        .env_remove("SPLITOS_SOCKET")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("echo: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (Example(child), addr)
}

#[test]
fn echo_example_serves_std_curl_and_python_clients() {
    let (_ex, addr) = start_example();

    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let msg: Vec<u8> = (0..100_000u32).map(|i| (i % 249) as u8).collect();
    c.write_all(&msg).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert!(
        got == msg,
        "std client: echo differs ({} bytes back)",
        got.len()
    );

    assert_eq!(
        curl_telnet(addr.port(), b"hello from curl\n"),
        "hello from curl\n"
    );

    python_echo_check(addr.port(), 500_000);
}
