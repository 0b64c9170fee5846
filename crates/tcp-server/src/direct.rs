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

use splitos_file_server::client::{lookup_of, ClientError, FileClient, FileView, Piece};
use splitos_http::request::{self, Body, Limits, Parsed};
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

/// How long the direct path waits for a file-server reply. It asks only for segments the
/// server holds in memory (well under a millisecond); past this the worker stops waiting and
/// the request goes to the application, so a stalled file server never freezes the worker's
/// other connections for long. (A reply that comes later is recognised and dropped.)
pub(crate) const FILE_SERVER_WAIT: Duration = Duration::from_millis(100);

/// The cache as the responder sees it: what is not cached is `Unavailable`, so a miss costs no
/// wait on the disk (a cached file whose segment this worker does not map yet costs one round
/// trip to the file server). So is any failure that is not an answer about the file (a slow,
/// gone or lying file server): the application, which waits longer and reports errors, decides.
struct Cached<'a>(&'a mut FileClient);

impl FileSource for Cached<'_> {
    type File = FileView;
    fn open(&mut self, path: &str) -> Lookup<FileView> {
        match self.0.open_cached(path) {
            Ok(Some(v)) => Lookup::Found(v),
            Ok(None) => Lookup::Unavailable,
            Err(
                e @ (ClientError::NotFound
                | ClientError::Directory
                | ClientError::Escapes
                | ClientError::BadPath(_)
                | ClientError::Special
                | ClientError::Denied),
            ) => lookup_of(Err(e)),
            Err(e) => {
                tracing::debug!("direct path: file server: {e}; deferring");
                Lookup::Unavailable
            }
        }
    }
}

/// One part of a response, ready to queue: bytes, or a piece of a file already fetched.
pub(crate) enum Out {
    Bytes(Vec<u8>),
    Piece(Piece),
}

/// Answers the complete requests in `d.buf`; `push` queues each response part.
pub(crate) fn serve(
    route: &mut Route,
    d: &mut Direct,
    queued: usize,
    answered: &mut u64,
    mut push: impl FnMut(Out),
) -> Outcome {
    let limits = Limits::default();
    let mut queued = queued;
    loop {
        if d.buf.is_empty() {
            return Outcome::More;
        }
        if queued >= SENDQ_LIMIT {
            d.blocked = true;
            return Outcome::Blocked;
        }
        let (req, used) = match request::parse(&d.buf, &limits) {
            Ok(Parsed::Complete(r, n)) => (r, n),
            Ok(Parsed::Partial) => return Outcome::More,
            Err(_) => return Outcome::Defer(std::mem::take(&mut d.buf)),
        };
        if req.body != Body::None {
            return Outcome::Defer(std::mem::take(&mut d.buf));
        }
        match respond::respond(&mut Cached(&mut route.files), &req) {
            Answer::Response(r) => {
                // Every file range becomes pieces before anything is queued: a chunk that
                // cannot be had (evicted and not listed, changed, a reply that does not add
                // up) sends the request to the application, instead of leaving a head whose
                // promised body never follows.
                let mut out = Vec::with_capacity(r.parts.len());
                for part in r.parts {
                    match part {
                        Part::Bytes(b) => out.push(Out::Bytes(b)),
                        Part::File(view, off, len) => match view.ranges(off, len) {
                            Ok(pieces) => out.extend(pieces.into_iter().map(Out::Piece)),
                            Err(e) => {
                                tracing::debug!("direct path: {e}; deferring");
                                return Outcome::Defer(std::mem::take(&mut d.buf));
                            }
                        },
                    }
                }
                d.buf.drain(..used);
                *answered += 1;
                queued += out.len();
                out.into_iter().for_each(&mut push);
                if !req.keep_alive {
                    return Outcome::Close;
                }
            }
            Answer::NoIndex { .. } | Answer::Defer => {
                return Outcome::Defer(std::mem::take(&mut d.buf))
            }
        }
    }
}

/// The 408 a direct connection gets when its head does not complete in time.
pub(crate) fn timeout_response() -> Vec<u8> {
    match respond::error_page::<FileView>(408, "Request Timeout", true, false)
        .parts
        .into_iter()
        .next()
    {
        Some(Part::Bytes(b)) => b,
        _ => Vec::new(),
    }
}
