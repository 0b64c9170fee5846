//! The tokio flavour: an async echo and an axum router over Split-OS, driven by kernel clients.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "axum")]

mod common;

use common::session;

use std::io::{Read, Write};
use std::time::Duration;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A Split-OS listener on an ephemeral port, bound on a fresh runtime (which the caller moves
/// to the server thread).
fn listen() -> (
    tokio::runtime::Runtime,
    splitos::tokio::TcpListener,
    std::net::SocketAddr,
) {
    let s = session();
    let rt = runtime();
    let listener = rt
        .block_on(splitos::tokio::TcpListener::bind_with(
            &s,
            "127.0.0.1:0",
            Default::default(),
        ))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    (rt, listener, addr)
}

#[test]
fn axum_router_answers_many_requests() {
    let (rt, listener, addr) = listen();
    let app =
        axum::Router::new().route(
            "/hello/{name}",
            axum::routing::get(
                |axum::extract::Path(n): axum::extract::Path<String>| async move {
                    format!("Hello, {n}!")
                },
            ),
        );
    std::thread::spawn(move || {
        rt.block_on(async move {
            let _ = axum::serve(listener, app).await;
        })
    });
    for i in 0..50 {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            c,
            "GET /hello/n{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp)
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert!(resp.starts_with("HTTP/1.1 200"), "request {i}: {resp}");
        assert!(
            resp.ends_with(&format!("Hello, n{i}!")),
            "request {i}: {resp}"
        );
    }
}

#[test]
fn async_echo_with_many_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (rt, listener, addr) = listen();
    std::thread::spawn(move || {
        rt.block_on(async move {
            loop {
                let Ok((mut c, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    loop {
                        match c.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if c.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        })
    });
    let clients: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut conns: Vec<std::net::TcpStream> = (0..25)
                    .map(|_| {
                        let c = std::net::TcpStream::connect(addr).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        c
                    })
                    .collect();
                for round in 0..20u32 {
                    for (i, c) in conns.iter_mut().enumerate() {
                        let msg = vec![
                            (t * 31 + i as u32 + round) as u8;
                            1 + (i * 97 + round as usize * 13) % 3000
                        ];
                        c.write_all(&msg).unwrap();
                        let mut got = vec![0u8; msg.len()];
                        c.read_exact(&mut got)
                            .unwrap_or_else(|e| panic!("conn {i} round {round}: {e}"));
                        assert_eq!(got, msg);
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
}
