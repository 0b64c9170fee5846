//! The direct path's seam: requests answered inside the TCP server, by a responder that is
//! implemented above it.
//!
//! An application may install a route on a listener (`ServeFiles`): the worker then hands the
//! bytes of that listener's connections to the route's [`DirectRoute`] and queues what it
//! answers — bytes, and ranges of sealed file segments sent straight from shared memory —
//! without waking the application. The first request the responder will not answer turns the
//! connection over to the application: it receives that request's bytes and everything after
//! as ordinary `Data`, so responses stay in order and the application keeps the last word on
//! every odd case. When it has answered all of it, the application may give the connection
//! back (`ServeDirect`).
//!
//! The TCP server knows no application protocol: what a request is, how it is answered and
//! how long one may take to arrive are the responder's. `splitos serve` implements it for
//! static files over HTTP/1.1 (`splitos_serve::direct`), with the same connection loop and
//! responder its application uses. A server started without a [`DirectPath`] refuses
//! `ServeFiles` with `EOPNOTSUPP`.
//!
//! Opening a route may block (it connects to another service), so the worker never does it:
//! [`DirectPath::open`] runs on a thread of its own and the worker installs the result.

use splitos_m2m::segment::Segment;
use splitos_m2m::PeerCredentials;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Response parts a direct connection may have queued before the server stops reading it (a
/// client that pipelines without reading gets back-pressure, not an unbounded queue).
pub const SENDQ_LIMIT: usize = 256;

/// What a route answers from and how patient it is, as the application asked (`ServeFiles`).
#[derive(Clone, Debug)]
pub struct RouteRequest {
    /// What to answer from, as the application named it (for `splitos serve`: the path of its
    /// file server's socket). Opaque to the TCP server.
    pub source: Vec<u8>,
    /// The application's credentials, from the kernel: a responder must not give one tenant
    /// access to what only another may reach.
    pub peer: PeerCredentials,
    /// How long a request may take to arrive, from its first byte.
    pub request_timeout: Duration,
    /// How long a connection may sit idle (nothing received, nothing to send).
    pub idle_timeout: Duration,
}

/// Opens routes: the part of a direct path that lives above the TCP server.
pub trait DirectPath: Send + Sync {
    /// A route for `request`, or the errno the application gets (`Failed`). Called on a thread
    /// of its own, never on a worker, so it may block on a connect; it should still bound
    /// every wait.
    fn open(&self, request: &RouteRequest) -> Result<Box<dyn DirectRoute>, rustix::io::Errno>;
}

/// One route of one worker: answers the requests of its listener's connections.
pub trait DirectRoute: Send {
    /// Answers what it can of the requests at the front of `conn.pending`, queueing each
    /// response's parts with `push` and counting answered requests in `answered`; at most
    /// `room` parts fit in the connection's send queue now.
    fn serve(
        &mut self,
        conn: &mut DirectConn,
        room: usize,
        answered: &mut u64,
        push: &mut dyn FnMut(DirectPart),
    ) -> Outcome;

    /// Whether `conn` has outlived this route's patience at `now`.
    fn expired(&self, conn: &DirectConn, now: Instant) -> Option<Expiry>;

    /// What a connection whose request did not complete in time is sent before it is closed.
    fn timeout_response(&self) -> Vec<u8>;
}

/// A response part.
pub enum DirectPart {
    /// Bytes the responder wrote (a head, a small body).
    Bytes(Vec<u8>),
    /// `len` bytes at `offset` of a sealed segment, sent from shared memory.
    File {
        segment: Arc<Segment>,
        offset: u64,
        len: u64,
    },
}

/// What the worker does with a direct connection after [`DirectRoute::serve`].
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Wait for more bytes.
    More,
    /// Responses are queued; close after them.
    Close,
    /// The send queue is full: stop reading until it drains.
    Blocked,
    /// Hand the connection to the application with these bytes.
    Defer(Vec<u8>),
}

/// Why a direct connection is ended by its route's timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// A request began and did not complete in time: answer `timeout_response`, then close.
    Request,
    /// Nothing happened for too long: close.
    Idle,
}

/// The TCP server's side of a direct connection: what it received and has not had answered,
/// and when. Lent to the route for each call.
#[derive(Debug)]
pub struct DirectConn {
    /// Received bytes not answered yet: at most an incomplete request, or pipelined ones
    /// held back by [`SENDQ_LIMIT`].
    pub pending: Vec<u8>,
    /// When anything last arrived.
    pub last_active: Instant,
    /// When the first of the `pending` bytes arrived (`None` when nothing is pending): a
    /// request's deadline runs from there, so trickling bytes do not extend it.
    pub pending_since: Option<Instant>,
}

impl DirectConn {
    pub fn new(now: Instant) -> DirectConn {
        DirectConn {
            pending: Vec::new(),
            last_active: now,
            pending_since: None,
        }
    }

    /// Appends `n` received bytes, written by `fill`.
    pub fn received(&mut self, n: usize, now: Instant, fill: impl FnOnce(&mut [u8])) {
        let at = self.pending.len();
        self.pending.resize(at + n, 0);
        fill(&mut self.pending[at..]);
        self.last_active = now;
        if at == 0 && n > 0 {
            self.pending_since = Some(now);
        }
    }

    /// After a route took bytes from the front of `pending` (was `before` long): what is left
    /// is a new request, whose time starts now.
    pub(crate) fn answered_some(&mut self, before: usize, now: Instant) {
        if self.pending.is_empty() {
            self.pending_since = None;
        } else if self.pending.len() != before {
            self.pending_since = Some(now);
        }
    }
}

/// A connection's state while the server answers it directly.
pub(crate) struct Direct {
    pub route: u32,
    pub serial: u64,
    pub conn: DirectConn,
    /// Reading stopped until the send queue drains.
    pub blocked: bool,
}

impl Direct {
    pub(crate) fn new(route: u32, serial: u64, now: Instant) -> Direct {
        Direct {
            route,
            serial,
            conn: DirectConn::new(now),
            blocked: false,
        }
    }
}

/// One installed route of a worker.
pub(crate) struct Route {
    /// Unique per worker: a connection names its route by slot and serial, so a slot reused
    /// by another listener's route is never mistaken for its own.
    pub serial: u64,
    pub route: Box<dyn DirectRoute>,
}
