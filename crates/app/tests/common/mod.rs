//! Helpers shared by the library's integration tests.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::Shutdown;

/// A session with this process's embedded TCP server (2 worker threads), logging to the test.
pub fn session() -> splitos::Session {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    splitos::embedded::start(splitos::embedded::Options {
        threads: 2,
        wait: splitos::WaitPolicy::adaptive(),
    })
    .and_then(|e| e.session())
    .expect("embedded server")
}

/// Echoes a connection until EOF, then shuts down writing.
pub fn echo_conn(mut s: splitos::net::TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// Runs curl in telnet mode against `port` with `input`; returns what it printed. curl never
/// half-closes in this mode, so it ends at --max-time (exit 28) after printing the echo.
pub fn curl_telnet(port: u16, input: &[u8]) -> String {
    let mut child = std::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "2",
            &format!("telnet://127.0.0.1:{port}"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl runs");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input).expect("write to curl");
    }
    let out = child.wait_with_output().expect("curl finishes");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a Python client that sends `len` bytes, half-closes and checks the echo.
pub fn python_echo_check(port: u16, len: usize) {
    let script = format!(
        "import socket\ns=socket.create_connection(('127.0.0.1',{port}),timeout=10)\nmsg=bytes(i%251 for i in range({len}))\ns.sendall(msg)\ns.shutdown(socket.SHUT_WR)\ngot=b''\nwhile True:\n    d=s.recv(65536)\n    if not d: break\n    got+=d\nassert got==msg, (len(got), len(msg))\nprint('ok', len(got))\n"
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ok {len}")
    );
}
