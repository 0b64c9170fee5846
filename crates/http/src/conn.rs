//! One HTTP/1.1 connection, sans I/O: received bytes in, responses out.
//!
//! The HTTP application and the TCP server's direct path serve connections the same way —
//! parse a head, decide what to do with its body, answer, repeat for pipelined requests, and
//! give up on heads that take too long or connections that stay idle — so that loop lives here
//! once. The caller owns the socket and the clock: it feeds received bytes with
//! [`Conn::received`], runs [`serve`] with a function that answers a request and one that
//! sends a response, and asks [`Conn::expired`] from time to time. Nothing here blocks, reads
//! a clock or does I/O, which is what lets both an io_uring worker and an event-loop
//! application use it, and lets the tests below drive it by hand.
//!
//! The two callers differ in one respect, their [`Role`]: the application has the last word
//! and refuses what it cannot serve, while the direct path answers only the plain cases and
//! hands the connection over, with every byte it has not answered, at the first other one.

use crate::request::{self, Body, Limits, Parsed, Request};
use crate::respond::{error_page, Part, Response};
use crate::HttpError;
use std::time::{Duration, Instant};

/// Largest request body the final answerer reads (and throws away) before answering 413: a
/// static-file server has no use for bodies, but closing on every small one would break
/// clients that send, say, an empty-bodied POST on a keep-alive connection.
pub const MAX_DISCARD: u64 = 1 << 20;

/// The answer to a connection accepted over the connection limit, sent before reading
/// anything from it. It is written out in full, without `Date`, because it is sent when the
/// server is busiest and no request exists to answer.
pub const OVERLOADED: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Who answers what on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The last word (the HTTP application): malformed requests and bodies it will not read
    /// are refused with their status and the connection closed; other bodies, up to
    /// `max_body` bytes, are read and thrown away.
    Final { max_body: u64 },
    /// A fast path (the TCP server's direct path): only requests without a body that the
    /// answer function takes are served here. The first other one — malformed, with a body,
    /// or declined — hands the connection over with that request and everything after it,
    /// so the next answerer sees the byte stream exactly where this one stopped and responses
    /// stay in order.
    FastPath,
}

/// How long a client may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// To complete a request once its first byte arrived: its head, and a body being read
    /// (then 408). A deadline, not an inactivity timer: bytes trickled in do not extend it.
    pub header: Duration,
    /// To start another request on an idle keep-alive connection (then closed).
    pub idle: Duration,
}

impl Timeouts {
    /// From seconds, each at least one: a zero would expire connections between two polls.
    pub fn from_secs(header: u64, idle: u64) -> Timeouts {
        Timeouts {
            header: Duration::from_secs(header.max(1)),
            idle: Duration::from_secs(idle.max(1)),
        }
    }
}

/// Everything that decides how a connection is served; one per listener, shared by its
/// connections.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub limits: Limits,
    pub role: Role,
    pub timeouts: Timeouts,
}

/// How much one [`serve`] call may produce before it returns [`Outcome::Budget`], so that a
/// client pipelining thousands of requests is served in slices and cannot starve the others
/// (or fill a send queue without bound).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub responses: usize,
    pub parts: usize,
}

impl Budget {
    /// At most `n` responses.
    pub fn responses(n: usize) -> Budget {
        Budget {
            responses: n,
            parts: usize::MAX,
        }
    }
    /// At most `n` response parts (a send queue's free entries).
    pub fn parts(n: usize) -> Budget {
        Budget {
            responses: usize::MAX,
            parts: n,
        }
    }
}

/// Why a connection should be closed after what [`serve`] sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// The client asked for it (`Connection: close`, or HTTP/1.0 without keep-alive): the
    /// response is complete and the write side can be shut down cleanly after it.
    Asked,
    /// A refusal (malformed request, unreadable body): its error page says `Connection:
    /// close` and nothing after it is read.
    Refused,
}

/// What the caller should do after [`serve`].
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Everything complete is answered: wait for more bytes.
    Wait,
    /// The budget ran out with requests still buffered: call again later (after the send
    /// queue drained, or after serving the other connections).
    Budget,
    /// Close the connection after what was sent.
    Close(Close),
    /// [`Role::FastPath`] only: this side does not take the connection further; these are
    /// the bytes it received and did not answer, starting at a request boundary.
    HandOver(Vec<u8>),
}

/// What [`Conn::expired`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// A request (its head, or a body being read) started but did not complete in time: send
    /// [`request_timeout`] and close.
    Head,
    /// Nothing arrived for the idle timeout: close.
    Idle,
}

/// The parse state of one connection: bytes received and not yet answered.
#[derive(Debug)]
pub struct Conn {
    buf: Vec<u8>,
    /// Body bytes of the last request still to arrive and be thrown away.
    discard: u64,
    /// The request whose body is being thrown away ([`Role::Final`]): it is answered once the
    /// body is in, so that until then it is still whole in what was received.
    pending: Option<Request>,
    last_active: Instant,
    /// When the first byte of the request being received arrived (`None` between requests):
    /// the header timeout is a deadline from here.
    started: Option<Instant>,
}

impl Conn {
    pub fn new(now: Instant) -> Conn {
        Conn::from_parts_started(Vec::new(), now, None)
    }

    /// A connection whose unanswered bytes and last activity are kept elsewhere (the direct
    /// path's connection state, until the worker holds a `Conn` itself). Bytes buffered are
    /// taken to have started a request at `last_active`; [`Conn::from_parts_started`] says
    /// when they did.
    pub fn from_parts(buf: Vec<u8>, last_active: Instant) -> Conn {
        let started = (!buf.is_empty()).then_some(last_active);
        Conn::from_parts_started(buf, last_active, started)
    }

    /// Like [`Conn::from_parts`], with the first byte of the request being received arriving at
    /// `started` (what [`Conn::request_started`] said when the state was last given up).
    pub fn from_parts_started(
        buf: Vec<u8>,
        last_active: Instant,
        started: Option<Instant>,
    ) -> Conn {
        let started = if buf.is_empty() {
            None
        } else {
            started.or(Some(last_active))
        };
        Conn {
            buf,
            discard: 0,
            pending: None,
            last_active,
            started,
        }
    }

    /// The unanswered bytes, giving the state up.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// When the first byte of the request being received arrived: the header timeout runs
    /// from here. `None` between requests.
    pub fn request_started(&self) -> Option<Instant> {
        self.started
    }

    /// Bytes arrived from the client.
    pub fn received(&mut self, data: &[u8], now: Instant) {
        self.received_with(data.len(), now, |dst| dst.copy_from_slice(data));
    }

    /// Like [`Conn::received`], for `n` bytes that `read` copies in place: a receiver whose
    /// bytes sit in memory it must copy out anyway (a provided buffer) copies them once.
    pub fn received_with(&mut self, n: usize, now: Instant, read: impl FnOnce(&mut [u8])) {
        self.last_active = now;
        if n > 0 && self.started.is_none() {
            // The first byte of a request (or of the rest of a body being read).
            self.started = Some(now);
        }
        let at = self.buf.len();
        self.buf.resize(at + n, 0);
        read(&mut self.buf[at..]);
        let skip = self.discard.min(n as u64) as usize;
        self.discard -= skip as u64;
        self.buf.drain(at..at + skip);
    }

    /// Received bytes not answered yet: at most an incomplete head between [`serve`] calls,
    /// unless the budget ran out.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Whether the body of the last request is still arriving (and being thrown away), so the
    /// byte stream is not at a request boundary even with nothing buffered.
    pub fn discarding(&self) -> bool {
        self.discard > 0
    }

    /// Whether every byte received has been answered: the connection sits between requests.
    pub fn at_boundary(&self) -> bool {
        self.buf.is_empty() && self.discard == 0 && self.pending.is_none()
    }

    pub fn last_active(&self) -> Instant {
        self.last_active
    }

    /// Whether the client has used up a timeout: a request (head, or a body being read) not
    /// complete [`Timeouts::header`] after its first byte, however recent the last byte, or
    /// nothing at all for [`Timeouts::idle`] between requests. Only the caller knows whether
    /// it is still sending to the client, which may count as activity; it checks that itself.
    pub fn expired(&self, now: Instant, t: &Timeouts) -> Option<Expiry> {
        if let Some(started) = self.started {
            return (now.saturating_duration_since(started) > t.header).then_some(Expiry::Head);
        }
        let quiet = now.saturating_duration_since(self.last_active);
        (self.at_boundary() && quiet > t.idle).then_some(Expiry::Idle)
    }

    /// After answering: between requests the deadline is off; a next request already begun
    /// (its bytes came with the last one's, at the latest at the last receive) has its own.
    fn answered_one(&mut self) {
        self.started = if self.at_boundary() {
            None
        } else {
            Some(self.last_active)
        };
    }
}

/// Answers the complete requests buffered in `conn`, in order, within `budget`.
///
/// `answer` turns a request into a response, or declines it with `None` ([`Role::FastPath`]:
/// hand the connection over; [`Role::Final`]: 500, which a final answerer should never
/// need). `send` gets each response, refusals included, whole and in order.
pub fn serve<F>(
    conn: &mut Conn,
    policy: &Policy,
    budget: Budget,
    answer: impl FnMut(&Request) -> Option<Response<F>>,
    mut send: impl FnMut(Response<F>),
) -> Outcome {
    serve_marked(conn, policy, budget, answer, |r, _| send(r))
}

/// Like [`serve`], telling `send` with each response how many received bytes are still
/// unanswered after it: the requests before them are all answered once it is sent, which is
/// the request boundary an application marks for its successor
/// (`splitos::reactor::Reactor::answered`). ([`Role::Final`] answers a request with a body
/// only once the body is in, so the count is always at a boundary.)
pub fn serve_marked<F>(
    conn: &mut Conn,
    policy: &Policy,
    budget: Budget,
    mut answer: impl FnMut(&Request) -> Option<Response<F>>,
    mut send: impl FnMut(Response<F>, usize),
) -> Outcome {
    let (mut responses, mut parts) = (0usize, 0usize);
    let mut sent = |r: Response<F>, rest: usize, responses: &mut usize, parts: &mut usize| {
        *responses += 1;
        *parts = parts.saturating_add(r.parts.len());
        send(r, rest);
    };
    loop {
        if conn.discard > 0 {
            return Outcome::Wait;
        }
        if conn.buf.is_empty() && conn.pending.is_none() {
            return Outcome::Wait;
        }
        if responses >= budget.responses || parts >= budget.parts {
            return Outcome::Budget;
        }
        if let Some(req) = conn.pending.take() {
            // Its body is in: answer it now.
            conn.answered_one();
            let Some(r) = answer(&req) else {
                sent(
                    error_page(500, "Internal Server Error", true, false),
                    conn.buf.len(),
                    &mut responses,
                    &mut parts,
                );
                return Outcome::Close(Close::Refused);
            };
            sent(r, conn.buf.len(), &mut responses, &mut parts);
            if !req.keep_alive {
                return Outcome::Close(Close::Asked);
            }
            continue;
        }
        let (req, used) = match request::parse(&conn.buf, &policy.limits) {
            Ok(Parsed::Complete(r, n)) => (r, n),
            Ok(Parsed::Partial) => return Outcome::Wait,
            Err(e) => match policy.role {
                Role::FastPath => return hand_over(conn),
                Role::Final { .. } => {
                    sent(refusal(e), conn.buf.len(), &mut responses, &mut parts);
                    return Outcome::Close(Close::Refused);
                }
            },
        };
        match policy.role {
            Role::FastPath => {
                if req.body != Body::None {
                    return hand_over(conn);
                }
                let Some(r) = answer(&req) else {
                    return hand_over(conn);
                };
                conn.buf.drain(..used);
                conn.answered_one();
                sent(r, conn.buf.len(), &mut responses, &mut parts);
            }
            Role::Final { max_body } => {
                conn.buf.drain(..used);
                // A body is read and thrown away, never parsed as the next request.
                match body_to_discard(req.body, max_body) {
                    Ok(n) => {
                        let here = n.min(conn.buf.len() as u64);
                        conn.buf.drain(..here as usize);
                        conn.discard = n - here;
                    }
                    Err(e) => {
                        sent(refusal(e), conn.buf.len(), &mut responses, &mut parts);
                        return Outcome::Close(Close::Refused);
                    }
                }
                if conn.discard > 0 {
                    if expects_continue(&req) {
                        // The client waits for `100 Continue` before sending the body: give it
                        // the final answer now instead, and close after it (the body will not
                        // be read, so nothing after it could be told from body bytes).
                        let r = answer(&req).unwrap_or_else(|| {
                            error_page(500, "Internal Server Error", true, false)
                        });
                        sent(closing(r), conn.buf.len(), &mut responses, &mut parts);
                        return Outcome::Close(Close::Refused);
                    }
                    // Answered when the body is in (at the top of the loop).
                    conn.pending = Some(req);
                    return Outcome::Wait;
                }
                conn.answered_one();
                let Some(r) = answer(&req) else {
                    sent(
                        error_page(500, "Internal Server Error", true, false),
                        conn.buf.len(),
                        &mut responses,
                        &mut parts,
                    );
                    return Outcome::Close(Close::Refused);
                };
                sent(r, conn.buf.len(), &mut responses, &mut parts);
            }
        }
        if !req.keep_alive {
            return Outcome::Close(Close::Asked);
        }
    }
}

/// How many body bytes a final answerer reads and throws away for a request, or why it
/// refuses it: a chunked body cannot be skipped without decoding it (400), and a body over
/// `max` is not worth reading (413).
pub fn body_to_discard(body: Body, max: u64) -> Result<u64, HttpError> {
    match body {
        Body::None => Ok(0),
        Body::Chunked => Err(HttpError::new(400, "Bad Request")),
        Body::Length(n) if n > max => Err(HttpError::new(413, "Content Too Large")),
        Body::Length(n) => Ok(n),
    }
}

/// The 408 for a head that did not complete in time.
pub fn request_timeout<F>() -> Response<F> {
    error_page(408, "Request Timeout", true, false)
}

/// Whether the client waits for `100 Continue` before it sends the body.
fn expects_continue(req: &Request) -> bool {
    req.version == crate::request::Version::Http11
        && req
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

/// `r` with `Connection: close` in its head (the head is its first part, ending in an empty
/// line), if it does not say so already.
fn closing<F>(mut r: Response<F>) -> Response<F> {
    if let Some(Part::Bytes(b)) = r.parts.first_mut() {
        if let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = &b[..end + 2];
            let has = head
                .windows(19)
                .any(|w| w.eq_ignore_ascii_case(b"connection: close\r\n"));
            if !has {
                b.splice(end + 2..end + 2, b"Connection: close\r\n".iter().copied());
            }
        }
    }
    r
}

fn refusal<F>(e: HttpError) -> Response<F> {
    error_page(e.status, e.reason, true, false)
}

fn hand_over(conn: &mut Conn) -> Outcome {
    Outcome::HandOver(std::mem::take(&mut conn.buf))
}

#[cfg(test)]
mod tests;
