//! The direct path: static-file requests answered inside the TCP server from the file cache.
//!
//! An application may install a route on a listener (`ServeFiles`): the worker then parses the
//! requests of that listener's connections itself (with the same `splitos-http` responder the
//! application uses) and queues each response as a head plus file ranges sent straight from the
//! file server's sealed segments. The application is not woken for these requests at all. The
//! first request the cache cannot answer (a miss, a directory, a body, a parse error, a sibling
//! whose existence the cache does not know) turns the connection over to the application: it
//! receives that request's bytes and everything after as ordinary `Data`, so responses stay in
//! order and the application keeps the last word on every odd case. When it has answered all
//! of it, the application may give the connection back (`ServeDirect`).
//!
//! The connection loop itself (parse, pipelining, which requests are odd) is
//! `splitos_http::conn`'s, shared with the application, so both read a byte stream alike; this
//! module supplies the cache as the answer and lends the worker's connection state to it. The
//! worker's timeout sweep applies the rules of `conn::Conn::expired` to the same state.

use splitos_file_server::client::{lookup_of, FileClient, FileView};
use splitos_http::conn::{self, Budget, Policy, Role, Timeouts};
use splitos_http::request::Limits;
use splitos_http::respond::{self, Answer, FileSource, Lookup, Part};
use std::time::{Duration, Instant};

/// Responses a direct connection may have queued before the server stops reading it (a
/// client that pipelines without reading gets back-pressure, not an unbounded queue).
pub(crate) const SENDQ_LIMIT: usize = 256;

/// One installed route: a file-server reader of this worker, and the timeouts to apply.
pub(crate) struct Route {
    /// Unique per worker: a connection names its route by slot and serial, so a slot reused
    /// by another listener's route is never mistaken for its own.
    pub serial: u64,
    pub files: FileClient,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

/// A connection's state while the server answers it directly.
pub(crate) struct Direct {
    pub route: u32,
    pub serial: u64,
    /// Received bytes not yet answered (at most an incomplete head, or pipelined requests
    /// held back by `SENDQ_LIMIT`).
    pub buf: Vec<u8>,
    pub last_active: Instant,
    /// Reading stopped until the send queue drains.
    pub blocked: bool,
}

/// What the worker should do with a direct connection after [`serve`].
pub(crate) enum Outcome {
    /// Wait for more bytes.
    More,
    /// Responses are queued; close after them (the client asked).
    Close,
    /// The send queue is full: stop reading until it drains.
    Blocked,
    /// Hand the connection to the application with these bytes.
    Defer(Vec<u8>),
}

/// The cache as the responder sees it: what is not cached is `Unavailable`, so a miss costs no
/// wait on the disk (a cached file whose segment this worker does not map yet costs one round
/// trip to the file server).
struct Cached<'a>(&'a mut FileClient);

impl FileSource for Cached<'_> {
    type File = FileView;
    fn open(&mut self, path: &str) -> Lookup<FileView> {
        match self.0.open_cached(path) {
            Ok(Some(v)) => Lookup::Found(v),
            Ok(None) => Lookup::Unavailable,
            Err(e) => lookup_of(Err(e)),
        }
    }
}

/// Answers the complete requests in `d.buf`; `push` queues each response part.
///
/// An adapter for the worker as it is: its [`Direct`] keeps the buffer and the last activity
/// itself, so they are lent to a [`conn::Conn`] for the call (two moves, no copy). Once
/// `Direct` holds a `Conn`, the worker calls [`serve_conn`] directly.
pub(crate) fn serve(
    route: &mut Route,
    d: &mut Direct,
    queued: usize,
    answered: &mut u64,
    push: impl FnMut(Part<FileView>),
) -> Outcome {
    let mut c = conn::Conn::from_parts(std::mem::take(&mut d.buf), d.last_active);
    let outcome = serve_conn(route, &mut c, queued, answered, push);
    d.buf = c.into_buffer();
    if matches!(outcome, Outcome::Blocked) {
        d.blocked = true;
    }
    outcome
}

/// Answers the complete requests buffered in `c` from the cache, given `queued` responses
/// parts already in the connection's send queue; `push` queues each response part and
/// `answered` counts the responses.
pub(crate) fn serve_conn(
    route: &mut Route,
    c: &mut conn::Conn,
    queued: usize,
    answered: &mut u64,
    mut push: impl FnMut(Part<FileView>),
) -> Outcome {
    let policy = route.policy();
    let files = &mut route.files;
    let outcome = conn::serve(
        c,
        &policy,
        Budget::parts(SENDQ_LIMIT.saturating_sub(queued)),
        |req| match respond::respond(&mut Cached(files), req) {
            Answer::Response(r) => {
                *answered += 1;
                Some(r)
            }
            // A directory (listing or 404 is the application's call) or not cached.
            Answer::NoIndex { .. } | Answer::Defer => None,
        },
        |r| r.parts.into_iter().for_each(&mut push),
    );
    match outcome {
        conn::Outcome::Wait => Outcome::More,
        conn::Outcome::Budget => Outcome::Blocked,
        conn::Outcome::Close(_) => Outcome::Close,
        conn::Outcome::HandOver(bytes) => Outcome::Defer(bytes),
    }
}

impl Route {
    /// How this route's connections are served: only the plain cases, the rest deferred; the
    /// timeouts are what the worker's sweep should ask `conn::Conn::expired` about.
    pub(crate) fn policy(&self) -> Policy {
        Policy {
            limits: Limits::default(),
            role: Role::FastPath,
            timeouts: Timeouts {
                header: self.header_timeout,
                idle: self.idle_timeout,
            },
        }
    }
}

/// The 408 a direct connection gets when its head does not complete in time.
pub(crate) fn timeout_response() -> Vec<u8> {
    match conn::request_timeout::<FileView>().parts.into_iter().next() {
        Some(Part::Bytes(b)) => b,
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use splitos_file_server::server::{FileServer, FileServerConfig};

    /// A file server over a directory holding `hot.txt` (cached) and `cold.txt` (not yet).
    fn route(tag: &str) -> (FileServer, Route, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("splitos-direct-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("site")).expect("test directory");
        std::fs::write(dir.join("site/hot.txt"), b"hot!").expect("test file");
        std::fs::write(dir.join("site/cold.txt"), b"cold").expect("test file");
        let server = FileServer::start(FileServerConfig::new(
            dir.join("site"),
            dir.join("files.sock"),
        ))
        .expect("file server");
        let mut files = FileClient::connect(dir.join("files.sock")).expect("file client");
        files.open("hot.txt").expect("hot.txt");
        let route = Route {
            serial: 1,
            files,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        };
        (server, route, dir)
    }

    fn get(target: &str) -> String {
        format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n")
    }

    #[test]
    fn cached_files_are_answered_and_the_first_miss_defers_everything_after_it() {
        let (server, mut route, dir) = route("defer");
        let mut d = Direct {
            route: 0,
            serial: 1,
            buf: (get("/hot.txt") + &get("/hot.txt") + &get("/cold.txt") + &get("/hot.txt"))
                .into_bytes(),
            last_active: Instant::now(),
            blocked: false,
        };
        let (mut parts, mut answered) = (Vec::new(), 0);
        let out = serve(&mut route, &mut d, 0, &mut answered, |p| parts.push(p));
        assert_eq!(answered, 2);
        // Each response is a head and the file's range.
        assert!(matches!(
            parts.as_slice(),
            [
                Part::Bytes(_),
                Part::File(_, 0, 4),
                Part::Bytes(_),
                Part::File(_, 0, 4)
            ]
        ));
        match out {
            Outcome::Defer(bytes) => {
                assert_eq!(bytes, (get("/cold.txt") + &get("/hot.txt")).into_bytes())
            }
            _ => panic!("not deferred"),
        }
        assert!(d.buf.is_empty() && !d.blocked);
        server.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_send_queue_blocks_reading_and_a_partial_head_waits() {
        let (server, mut route, dir) = route("blocked");
        let mut d = Direct {
            route: 0,
            serial: 1,
            buf: (get("/hot.txt") + &get("/hot.txt") + "GET /hot").into_bytes(),
            last_active: Instant::now(),
            blocked: false,
        };
        let mut answered = 0;
        // Room for one response (two parts) only.
        let out = serve(&mut route, &mut d, SENDQ_LIMIT - 2, &mut answered, |_| {});
        assert!(matches!(out, Outcome::Blocked) && d.blocked);
        assert_eq!(answered, 1);
        d.blocked = false;
        let out = serve(&mut route, &mut d, 0, &mut answered, |_| {});
        assert!(matches!(out, Outcome::More) && !d.blocked);
        assert_eq!((answered, d.buf.as_slice()), (2, &b"GET /hot"[..]));
        d.buf
            .extend_from_slice(b".txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let out = serve(&mut route, &mut d, 0, &mut answered, |_| {});
        assert!(matches!(out, Outcome::Close));
        assert_eq!(timeout_response().get(..13), Some(&b"HTTP/1.1 408 "[..]));
        server.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
