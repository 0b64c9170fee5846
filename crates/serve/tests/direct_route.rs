//! Installing a direct-path route never stalls the TCP server: opening one connects to another
//! service, which may hang, and that wait happens beside the worker, not in it.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use splitos::net::ListenOptions;
use splitos::reactor::{Events, NetEvent, Reactor};
use splitos::WaitPolicy;
use splitos_tcp_server::{ServerConfig, TcpServer};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn server(dir: &Dir, direct: bool) -> TcpServer {
    TcpServer::start(ServerConfig {
        socket: dir.0.join("tcp.sock"),
        threads: 1, // every session on the one worker
        direct: direct.then(|| {
            Arc::new(splitos_serve::direct::StaticFiles)
                as Arc<dyn splitos_tcp_server::direct::DirectPath>
        }),
        ..ServerConfig::default()
    })
    .expect("TCP server")
}

fn dir(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("splitos-route-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("test directory");
    Dir(d)
}

/// A "file server" whose backlog is full and which never accepts: a connect to it waits.
fn hung_service(dir: &Dir) -> (PathBuf, UnixListener, Vec<UnixStream>) {
    let path = dir.0.join("hung.sock");
    let l = UnixListener::bind(&path).expect("bind");
    // Fill the backlog (the kernel allows backlog + 1) without accepting.
    let mut held = Vec::new();
    for _ in 0..512 {
        match rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::NONBLOCK,
            None,
        ) {
            Ok(fd) => {
                let addr = rustix::net::SocketAddrUnix::new(&path).expect("path");
                match rustix::net::connect(&fd, &addr) {
                    Ok(()) => held.push(UnixStream::from(fd)),
                    Err(_) => break,
                }
            }
            Err(_) => break,
        }
    }
    (path, l, held)
}

#[test]
fn a_hung_file_server_stalls_only_the_route_being_opened() {
    let d = dir("hung");
    let srv = server(&d, true);
    let (hung, _listener, _held) = hung_service(&d);
    let socket = srv.socket_path().to_path_buf();
    let opener = std::thread::spawn(move || {
        let mut a = Reactor::connect(&socket, WaitPolicy::Block, "a").expect("session a");
        let (l, _) = a
            .listen("127.0.0.1:0".parse().unwrap(), ListenOptions::default())
            .expect("listen");
        a.serve_files(l, &hung, Duration::from_secs(5), Duration::from_secs(5))
    });
    std::thread::sleep(Duration::from_millis(200));

    // Another application on the same worker is served meanwhile.
    let mut b = Reactor::connect(srv.socket_path(), WaitPolicy::Block, "b").expect("session b");
    let start = Instant::now();
    let (listener, addr) = b
        .listen("127.0.0.1:0".parse().unwrap(), ListenOptions::default())
        .expect("listen while a route opens");
    let _client = std::net::TcpStream::connect(addr).expect("connect");
    let mut ev = Events::new();
    let mut accepted = false;
    while !accepted && start.elapsed() < Duration::from_secs(5) {
        b.poll(&mut ev, Some(Duration::from_millis(50)))
            .expect("poll");
        accepted = ev
            .iter()
            .any(|e| matches!(e, NetEvent::Accepted { listener: l, .. } if l == listener));
    }
    assert!(accepted, "no Accepted while a route was opening");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "listen and accept took {:?}",
        start.elapsed()
    );
    assert!(
        !opener.is_finished(),
        "the route's open did not wait: the test did not hang the file server"
    );
    drop(_listener); // lets the hung connect fail, so the opener's thread ends
    let r = opener.join().expect("opener thread");
    assert!(
        r.is_err(),
        "a route to a service that never answered was installed"
    );
}

#[test]
fn a_server_without_a_direct_path_refuses_routes() {
    let d = dir("none");
    let srv = server(&d, false);
    let mut a = Reactor::connect(srv.socket_path(), WaitPolicy::Block, "a").expect("session");
    let (l, _) = a
        .listen("127.0.0.1:0".parse().unwrap(), ListenOptions::default())
        .expect("listen");
    let err = a
        .serve_files(
            l,
            &d.0.join("files.sock"),
            Duration::from_secs(5),
            Duration::from_secs(5),
        )
        .expect_err("route installed without a direct path");
    assert_eq!(
        err.raw_os_error(),
        Some(rustix::io::Errno::OPNOTSUPP.raw_os_error())
    );
}
