//! Files passed by reference (`PLAIN_FILE_TAG`): the worker accepts only regular files, sends
//! them by `sendfile` in order with the connection's other bytes, and ends a connection whose
//! file turns out shorter than the range (it shrank) instead of retrying forever.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use rustix::fd::AsFd;
use splitos_m2m::{Channel, ChannelConfig, Message, WaitPolicy};
use splitos_tcp_proto::{op, Event, Handle, Request, PLAIN_FILE_TAG};
use splitos_tcp_server::{ServerConfig, TcpServer};
use std::io::Read;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

struct Temp(PathBuf);
impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_file(tag: &str, body: &[u8]) -> (Temp, std::fs::File) {
    let p = std::env::temp_dir().join(format!("splitos-plain-{}-{tag}", std::process::id()));
    std::fs::write(&p, body).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    (Temp(p), f)
}

fn server(tag: &str) -> TcpServer {
    TcpServer::start(ServerConfig {
        socket: std::env::temp_dir().join(format!(
            "splitos-plain-test-{}-{tag}.sock",
            std::process::id()
        )),
        threads: 1,
        wait: WaitPolicy::Block,
        ..ServerConfig::default()
    })
    .expect("server starts")
}

/// A minimal application speaking the protocol by hand: the events it needs here.
struct App {
    chan: Channel,
    buf: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
enum Ev {
    Accepted(Handle),
    Error(Handle, i32),
    ProtocolError(u8, i32),
    Other,
}

impl App {
    fn connect(srv: &TcpServer) -> App {
        let chan = Channel::connect(
            srv.socket_path(),
            ChannelConfig {
                wait: WaitPolicy::adaptive(),
                ..ChannelConfig::default()
            },
        )
        .unwrap();
        App {
            chan,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, r: Request<'_>) {
        self.buf.clear();
        r.encode(&mut self.buf);
        let b = std::mem::take(&mut self.buf);
        self.chan.send(&b).unwrap();
        self.buf = b;
    }

    /// The next event that is not a send confirmation or data.
    fn event(&mut self) -> Ev {
        loop {
            let m = self
                .chan
                .recv_timeout(T)
                .unwrap()
                .expect("an event in time");
            let Message::Inline(b) = m else { continue };
            return match Event::decode(b).unwrap() {
                Event::Accepted { conn, .. } => Ev::Accepted(conn),
                Event::Error { handle, errno } => Ev::Error(handle, errno),
                Event::ProtocolError { op, errno } => Ev::ProtocolError(op, errno),
                Event::Sent { .. } | Event::Data { .. } => continue,
                _ => Ev::Other,
            };
        }
    }
}

/// Listens, connects a kernel client, and returns the connection's handle and the client.
fn connection(app: &mut App) -> (Handle, TcpStream) {
    app.send(Request::Listen {
        req: 1,
        addr: "127.0.0.1:0".parse().unwrap(),
        backlog: 16,
        flags: 0,
    });
    let m = app.chan.recv_timeout(T).unwrap().expect("listen answered");
    let Message::Inline(b) = m else {
        panic!("unexpected buffer")
    };
    let Ok(Event::Done { local, .. }) = Event::decode(b) else {
        panic!("listen failed")
    };
    let client = TcpStream::connect(local).unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    let Ev::Accepted(conn) = app.event() else {
        panic!("no connection")
    };
    (conn, client)
}

/// Reads until EOF (or an error), at most `T`.
fn read_to_end(c: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 64 << 10];
    let start = Instant::now();
    while start.elapsed() < T {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

#[test]
fn a_plain_file_goes_out_in_order_with_inline_bytes() {
    let srv = server("order");
    let mut app = App::connect(&srv);
    let (conn, mut client) = connection(&mut app);
    let (_t, f) = temp_file("order", b"hello world");
    let tag = PLAIN_FILE_TAG | 1;
    app.chan.send_fds(tag, &[f.as_fd()]).unwrap();
    app.send(Request::Send {
        handle: conn,
        data: b"<",
    });
    app.send(Request::SendFile {
        handle: conn,
        file: tag,
        offset: 6,
        len: 5,
    });
    app.send(Request::Send {
        handle: conn,
        data: b"|",
    });
    app.send(Request::SendFile {
        handle: conn,
        file: tag,
        offset: 0,
        len: 5,
    });
    app.send(Request::Send {
        handle: conn,
        data: b">",
    });
    app.send(Request::Close { handle: conn });
    assert_eq!(read_to_end(&mut client), b"<world|hello>");
}

#[test]
fn only_regular_files_are_taken_by_reference() {
    let srv = server("regular");
    let mut app = App::connect(&srv);
    let (conn, _client) = connection(&mut app);
    let (r, _w) = rustix::pipe::pipe().unwrap();
    app.chan.send_fds(PLAIN_FILE_TAG | 7, &[r.as_fd()]).unwrap();
    app.send(Request::SendFile {
        handle: conn,
        file: PLAIN_FILE_TAG | 7,
        offset: 0,
        len: 1,
    });
    assert_eq!(app.event(), Ev::ProtocolError(op::SEND_FILE, 9), "a pipe");
    // A regular file without the tag bit is not a sealed segment either.
    let (_t, f) = temp_file("untagged", b"abc");
    app.chan.send_fds(8, &[f.as_fd()]).unwrap();
    app.send(Request::SendFile {
        handle: conn,
        file: 8,
        offset: 0,
        len: 1,
    });
    assert_eq!(app.event(), Ev::ProtocolError(op::SEND_FILE, 9), "unsealed");
}

/// A file that is shorter than the range sent (it shrank after the application opened it):
/// the client gets what there is and then the end of the connection, the application gets an
/// error, and the worker goes on serving (it does not retry the empty `sendfile`).
#[test]
fn a_file_shorter_than_its_range_ends_the_connection() {
    let srv = server("short");
    let mut app = App::connect(&srv);
    let (conn, mut client) = connection(&mut app);
    let (_t, f) = temp_file("short", b"0123456789");
    let tag = PLAIN_FILE_TAG | 1;
    app.chan.send_fds(tag, &[f.as_fd()]).unwrap();
    app.send(Request::SendFile {
        handle: conn,
        file: tag,
        offset: 0,
        len: 1 << 20,
    });
    let start = Instant::now();
    assert_eq!(read_to_end(&mut client), b"0123456789");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(app.event(), Ev::Error(conn, 5), "EIO to the application");
    // The worker still serves: a second connection gets its bytes.
    let (conn2, mut client2) = {
        app.send(Request::Listen {
            req: 2,
            addr: "127.0.0.1:0".parse().unwrap(),
            backlog: 16,
            flags: 0,
        });
        let local = loop {
            let m = app.chan.recv_timeout(T).unwrap().expect("listen answered");
            if let Message::Inline(b) = m {
                if let Ok(Event::Done { req: 2, local, .. }) = Event::decode(b) {
                    break local;
                }
            }
        };
        let c = TcpStream::connect(local).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        let Ev::Accepted(h) = app.event() else {
            panic!("no connection")
        };
        (h, c)
    };
    app.send(Request::SendFile {
        handle: conn2,
        file: tag,
        offset: 2,
        len: 3,
    });
    app.send(Request::Close { handle: conn2 });
    assert_eq!(read_to_end(&mut client2), b"234");
}
