//! Echo server over Split-OS: every byte a client sends comes back, until the client shuts
//! down its write side; then the connection is closed.
//!
//!     cargo run --release -p splitos --example echo -- 127.0.0.1:7000
//!
//! Runs the TCP server embedded in this process unless SPLITOS_SOCKET names a running
//! `splitos tcp-server`. One thread per connection, at most MAX_CONNS at once.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const MAX_CONNS: usize = 4096;

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    if std::env::var_os("SPLITOS_SOCKET").is_none()
        && std::env::var_os("SPLITOS_EMBEDDED").is_none()
    {
        match splitos::embedded::start(splitos::embedded::Options::default())
            .and_then(|e| e.session())
        {
            Ok(s) => {
                if let Err(e) = splitos::set_default_session(s) {
                    eprintln!("echo: {e}");
                    std::process::exit(1);
                }
            }
            Err(e) => {
                eprintln!("echo: cannot start the embedded TCP server: {e}");
                std::process::exit(1);
            }
        }
    }
    let listener = match splitos::net::TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("echo: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    match listener.local_addr() {
        Ok(a) => println!("echo: listening on {a}"),
        Err(e) => eprintln!("echo: {e}"),
    }
    let live = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("echo: accept failed: {e}");
                return;
            }
        };
        if live.load(Ordering::Relaxed) >= MAX_CONNS {
            continue; // dropping the stream closes it
        }
        live.fetch_add(1, Ordering::Relaxed);
        let live = live.clone();
        let spawned = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
                let _ = stream.shutdown(Shutdown::Write);
                live.fetch_sub(1, Ordering::Relaxed);
            });
        if let Err(e) = spawned {
            eprintln!("echo: cannot start a connection thread: {e}");
        }
    }
}
