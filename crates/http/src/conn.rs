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
mod tests {
    use super::*;

    fn final_policy() -> Policy {
        Policy {
            limits: Limits::default(),
            role: Role::Final {
                max_body: MAX_DISCARD,
            },
            timeouts: Timeouts::from_secs(10, 60),
        }
    }

    fn fast_policy() -> Policy {
        Policy {
            role: Role::FastPath,
            ..final_policy()
        }
    }

    /// A response naming the target it answers, as one bytes part plus a one-byte "file".
    fn echo(req: &Request) -> Option<Response<u8>> {
        Some(Response {
            parts: vec![
                Part::Bytes(req.target.clone().into_bytes()),
                Part::File(0, 0, 1),
            ],
            status: 200,
            body_bytes: 1,
        })
    }

    /// Serves `conn` and returns the outcome with the first bytes part of every response.
    fn run(
        conn: &mut Conn,
        policy: &Policy,
        budget: Budget,
        answer: impl FnMut(&Request) -> Option<Response<u8>>,
    ) -> (Outcome, Vec<String>) {
        let mut out = Vec::new();
        let o = serve(conn, policy, budget, answer, |r| match r.parts.first() {
            Some(Part::Bytes(b)) => out.push(String::from_utf8_lossy(b).into_owned()),
            _ => out.push(String::new()),
        });
        (o, out)
    }

    fn get(target: &str) -> String {
        format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n")
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_and_a_partial_head_waits() {
        let t = Instant::now();
        let mut c = Conn::new(t);
        let bytes = get("/a") + &get("/b") + "GET /c HTTP/1.1\r\nHo";
        c.received(bytes.as_bytes(), t);
        let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), echo);
        assert_eq!(o, Outcome::Wait);
        assert_eq!(out, ["/a", "/b"]);
        assert_eq!(c.buffered(), b"GET /c HTTP/1.1\r\nHo");
        assert!(!c.at_boundary());
        c.received(b"st: x\r\n\r\n", t);
        let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), echo);
        assert_eq!((o, out), (Outcome::Wait, vec!["/c".to_string()]));
        assert!(c.at_boundary());
    }

    #[test]
    fn budgets_slice_pipelines() {
        let t = Instant::now();
        let mut c = Conn::new(t);
        c.received((get("/1") + &get("/2") + &get("/3")).as_bytes(), t);
        let (o, out) = run(&mut c, &final_policy(), Budget::responses(2), echo);
        assert_eq!((o, out.len()), (Outcome::Budget, 2));
        let (o, out) = run(&mut c, &final_policy(), Budget::responses(2), echo);
        assert_eq!((o, out), (Outcome::Wait, vec!["/3".to_string()]));
        // Parts: each response is two, so a budget of three parts stops after two responses.
        c.received((get("/4") + &get("/5") + &get("/6")).as_bytes(), t);
        let (o, out) = run(&mut c, &fast_policy(), Budget::parts(3), echo);
        assert_eq!((o, out.len()), (Outcome::Budget, 2));
        // An exhausted budget with nothing left to answer is not "more to do".
        let (o, _) = run(&mut c, &fast_policy(), Budget::parts(2), echo);
        assert_eq!(o, Outcome::Wait);
        let (o, _) = run(&mut c, &fast_policy(), Budget::parts(0), echo);
        assert_eq!(o, Outcome::Wait);
    }

    #[test]
    fn the_client_asking_to_close_ends_the_loop() {
        let t = Instant::now();
        let mut c = Conn::new(t);
        let bytes =
            "GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_string() + &get("/b");
        c.received(bytes.as_bytes(), t);
        for p in [final_policy(), fast_policy()] {
            let mut c2 = Conn::from_parts(c.buffered().to_vec(), t);
            let (o, out) = run(&mut c2, &p, Budget::responses(64), echo);
            assert_eq!(
                (o, out),
                (Outcome::Close(Close::Asked), vec!["/a".to_string()])
            );
        }
    }

    #[test]
    fn the_final_answerer_refuses_what_it_cannot_serve() {
        let t = Instant::now();
        for (req, status) in [
            ("GET / HTTP/1.1\r\n\r\n", "400"),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                "400",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577\r\n\r\n",
                "413",
            ),
        ] {
            let mut c = Conn::new(t);
            c.received(req.as_bytes(), t);
            let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), echo);
            assert_eq!(o, Outcome::Close(Close::Refused), "{req}");
            assert_eq!(out.len(), 1);
            assert!(
                out[0].starts_with(&format!("HTTP/1.1 {status} ")),
                "{}",
                out[0]
            );
            assert!(out[0].contains("Connection: close\r\n"), "{}", out[0]);
        }
        // A declined request gets a 500 and the connection closes.
        let mut c = Conn::new(t);
        c.received(get("/x").as_bytes(), t);
        let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), |_| None);
        assert_eq!(o, Outcome::Close(Close::Refused));
        assert!(out[0].starts_with("HTTP/1.1 500 "), "{}", out[0]);
    }

    #[test]
    fn bodies_are_thrown_away_never_parsed_as_requests() {
        let t = Instant::now();
        let mut c = Conn::new(t);
        // The body looks like a request; it must not be answered.
        let body = get("/smuggled");
        let head = format!(
            "POST /form HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        // Half the body arrives with the head, the rest later, then a real request.
        let (first, rest) = body.split_at(10);
        c.received((head + first).as_bytes(), t);
        let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), echo);
        // Answered once its body is in (see a_request_with_a_body_is_answered_when_the_body_is_in).
        assert_eq!((o, out), (Outcome::Wait, vec![]));
        assert!(c.discarding() && !c.at_boundary() && c.buffered().is_empty());
        c.received((rest.to_string() + &get("/next")).as_bytes(), t);
        assert!(!c.discarding());
        let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), echo);
        assert_eq!(
            (o, out),
            (
                Outcome::Wait,
                vec!["/form".to_string(), "/next".to_string()]
            )
        );
        // In place, too.
        let mut c = Conn::new(t);
        c.received(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab",
            t,
        );
        run(&mut c, &final_policy(), Budget::responses(64), echo);
        let more = get("/z");
        let tail = "cd".to_string() + &more;
        c.received_with(tail.len(), t, |b| b.copy_from_slice(tail.as_bytes()));
        assert_eq!(c.buffered(), more.as_bytes());
    }

    #[test]
    fn the_fast_path_hands_over_at_the_first_odd_request_with_every_byte_after_it() {
        let t = Instant::now();
        let post = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi";
        let cases = [
            // Declined by the answer function.
            get("/miss") + &get("/b"),
            // A body.
            post.to_string() + &get("/b"),
            // Malformed (no Host).
            "GET / HTTP/1.1\r\n\r\n".to_string() + &get("/b"),
        ];
        for odd in cases {
            let mut c = Conn::new(t);
            let all = get("/a") + &odd;
            c.received(all.as_bytes(), t);
            let (o, out) = run(&mut c, &fast_policy(), Budget::parts(256), |r| {
                (r.target != "/miss").then(|| echo(r)).flatten()
            });
            assert_eq!(out, ["/a"]);
            assert_eq!(o, Outcome::HandOver(odd.clone().into_bytes()));
            assert!(c.buffered().is_empty());
        }
    }

    #[test]
    fn timeouts_distinguish_a_slow_head_from_an_idle_connection() {
        let t = Instant::now();
        let to = Timeouts::from_secs(10, 60);
        let mut c = Conn::new(t);
        assert_eq!(c.expired(t + Duration::from_secs(59), &to), None);
        assert_eq!(
            c.expired(t + Duration::from_secs(61), &to),
            Some(Expiry::Idle)
        );
        c.received(b"GET / HT", t + Duration::from_secs(5));
        assert_eq!(c.expired(t + Duration::from_secs(14), &to), None);
        assert_eq!(
            c.expired(t + Duration::from_secs(16), &to),
            Some(Expiry::Head)
        );
        assert_eq!(c.last_active(), t + Duration::from_secs(5));
        // Zero means one second, not "expire at once".
        assert_eq!(Timeouts::from_secs(0, 0), Timeouts::from_secs(1, 1));
        let r = request_timeout::<u8>();
        assert_eq!(r.status, 408);
    }

    /// Finding A13: the header timeout measured inactivity, so one byte every
    /// `header − 1` seconds kept a connection (and a `--max-conns` slot) for hours. It is a
    /// deadline from the first byte of a request: the head, and a body being read, must arrive
    /// whole within it however the bytes trickle in.
    #[test]
    fn a_trickled_head_expires_at_its_deadline_not_after_a_quiet_spell() {
        let t = Instant::now();
        let to = Timeouts::from_secs(10, 60);
        let s = |n: u64| t + Duration::from_secs(n);
        let mut c = Conn::new(t);
        c.received(b"G", s(1));
        for (i, b) in b"ET / HTTP/1.1\r\n".iter().enumerate() {
            let at = s(2) + Duration::from_millis(500 * i as u64);
            if at > s(11) {
                break;
            }
            assert_eq!(c.expired(at, &to), None, "byte {i}");
            c.received(&[*b], at);
        }
        // Bytes arrived a moment ago, but the head began 10 s ago.
        assert_eq!(
            c.expired(s(11) + Duration::from_millis(1), &to),
            Some(Expiry::Head)
        );
        assert_eq!(c.request_started(), Some(s(1)));
    }

    #[test]
    fn each_request_has_its_own_deadline() {
        let t = Instant::now();
        let to = Timeouts::from_secs(10, 60);
        let s = |n: u64| t + Duration::from_secs(n);
        let mut c = Conn::new(t);
        // A request and the start of the next in one segment, at 9 s: the next one's deadline
        // runs from then.
        c.received(b"GET / HT", s(0));
        c.received(b"TP/1.1\r\nHost: x\r\n\r\nGET /b", s(9));
        let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), echo);
        assert_eq!((o, out.len()), (Outcome::Wait, 1));
        assert_eq!(c.request_started(), Some(s(9)));
        assert_eq!(c.expired(s(15), &to), None);
        assert_eq!(c.expired(s(20), &to), Some(Expiry::Head));
        // Answered whole: no deadline, the idle timeout applies.
        c.received(b" HTTP/1.1\r\nHost: x\r\n\r\n", s(12));
        run(&mut c, &final_policy(), Budget::responses(64), echo);
        assert_eq!(c.request_started(), None);
        assert_eq!(c.expired(s(30), &to), None);
        assert_eq!(c.expired(s(73), &to), Some(Expiry::Idle));
        // A body being read is part of its request: trickling it does not extend the deadline.
        c.received(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab",
            s(80),
        );
        run(&mut c, &final_policy(), Budget::responses(64), echo);
        for i in 0..9 {
            c.received(b"x", s(81 + i));
        }
        assert_eq!(c.expired(s(89), &to), None);
        assert_eq!(c.expired(s(91), &to), Some(Expiry::Head));
        // The direct path's adapter lends its state: the start travels with it.
        let lent = Conn::from_parts_started(b"GE".to_vec(), s(5), Some(s(2)));
        assert_eq!(lent.expired(s(13), &to), Some(Expiry::Head));
        assert_eq!(
            Conn::from_parts(b"GE".to_vec(), s(5)).request_started(),
            Some(s(5))
        );
    }

    /// The response to a request with a body goes out once the body is in: until then the
    /// request can still be answered by someone else (an application's successor gets the
    /// unanswered bytes, and must find a whole request there). Each response says how many
    /// received bytes it leaves unanswered.
    #[test]
    fn a_request_with_a_body_is_answered_when_the_body_is_in() {
        let t = Instant::now();
        let mut c = Conn::new(t);
        c.received(
            b"POST /f HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc",
            t,
        );
        let mut marks = Vec::new();
        let serve_now = |c: &mut Conn, marks: &mut Vec<(String, usize)>| {
            serve_marked(
                c,
                &final_policy(),
                Budget::responses(64),
                echo,
                |r, rest| match r.parts.first() {
                    Some(Part::Bytes(b)) => marks.push((String::from_utf8_lossy(b).into(), rest)),
                    _ => marks.push((String::new(), rest)),
                },
            )
        };
        assert_eq!(serve_now(&mut c, &mut marks), Outcome::Wait);
        assert!(marks.is_empty(), "answered before its body was in");
        assert!(c.discarding() && !c.at_boundary());
        c.received(b"defGET /g HTTP/1.1\r\nHost: x\r\n\r\nGET /h", t);
        assert_eq!(serve_now(&mut c, &mut marks), Outcome::Wait);
        let rest_h = "GET /h".len();
        let with_g = rest_h + "GET /g HTTP/1.1\r\nHost: x\r\n\r\n".len();
        assert_eq!(
            marks,
            [("/f".to_string(), with_g), ("/g".to_string(), rest_h)]
        );
        assert_eq!(c.buffered(), b"GET /h");
        // A body wholly in the first segment: answered at once.
        let mut c = Conn::new(t);
        c.received(
            b"POST /i HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nz",
            t,
        );
        marks.clear();
        serve_now(&mut c, &mut marks);
        assert_eq!(marks, [("/i".to_string(), 0)]);
        assert!(c.at_boundary());
    }

    /// A client that asked for `100 Continue` waits for it before sending the body; rather
    /// than make it wait, the final answer goes out at once and the connection closes after
    /// it (the body will not be read).
    #[test]
    fn expect_continue_is_answered_at_once_and_closed() {
        let t = Instant::now();
        let mut c = Conn::new(t);
        c.received(
            b"POST /f HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
            t,
        );
        let mut got = Vec::new();
        let o = serve(&mut c, &final_policy(), Budget::responses(64), echo, |r| {
            if let Some(Part::Bytes(b)) = r.parts.first() {
                got.push(String::from_utf8_lossy(b).into_owned());
            }
        });
        assert_eq!(o, Outcome::Close(Close::Refused));
        assert_eq!(got, ["/f"]);
        // With the body already in, it is an ordinary request.
        let mut c = Conn::new(t);
        c.received(
            b"POST /f HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
            t,
        );
        let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), echo);
        assert_eq!((o, out.len()), (Outcome::Wait, 1));
    }

    #[test]
    fn body_policy() {
        assert_eq!(body_to_discard(Body::None, 10), Ok(0));
        assert_eq!(body_to_discard(Body::Length(10), 10), Ok(10));
        assert_eq!(
            body_to_discard(Body::Length(11), 10).map_err(|e| e.status),
            Err(413)
        );
        assert_eq!(
            body_to_discard(Body::Chunked, 10).map_err(|e| e.status),
            Err(400)
        );
    }

    #[test]
    fn the_overload_answer_is_a_complete_closing_response() {
        let s = std::str::from_utf8(OVERLOADED).unwrap_or_default();
        assert!(s.starts_with("HTTP/1.1 503 "));
        assert!(s.contains("\r\nContent-Length: 0\r\n"));
        assert!(s.contains("\r\nConnection: close\r\n"));
        assert!(s.ends_with("\r\n\r\n"));
    }

    /// Feeds `bytes` cut at `cuts`, serving after each piece; returns every target answered.
    fn fed_in_pieces(bytes: &[u8], cuts: &[usize], policy: &Policy) -> (Vec<String>, Outcome) {
        let t = Instant::now();
        let mut c = Conn::new(t);
        let mut cuts: Vec<usize> = cuts.iter().map(|x| x % (bytes.len() + 1)).collect();
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let (mut at, mut all) = (0, Vec::new());
        let mut last = Outcome::Wait;
        for cut in cuts {
            c.received(&bytes[at..cut], t);
            at = cut;
            let (o, out) = run(&mut c, policy, Budget::responses(2), echo);
            all.extend(out);
            last = o;
            while last == Outcome::Budget {
                let (o, out) = run(&mut c, policy, Budget::responses(2), echo);
                all.extend(out);
                last = o;
            }
            if last != Outcome::Wait {
                break;
            }
        }
        (all, last)
    }

    proptest::proptest! {
        #[test]
        fn any_split_of_a_pipeline_gives_the_same_answers(
            cuts in proptest::collection::vec(0usize..1000, 0..12),
        ) {
            let pipeline = get("/a")
                + "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nGET /"
                + &get("/c")
                + "HEAD /d HTTP/1.0\r\n\r\n"
                + &get("/never");
            let (all, o) = fed_in_pieces(pipeline.as_bytes(), &cuts, &final_policy());
            proptest::prop_assert_eq!(all, vec!["/a", "/b", "/c", "/d"]);
            proptest::prop_assert_eq!(o, Outcome::Close(Close::Asked));
        }

        #[test]
        fn the_fast_path_loses_no_byte(
            data in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..400),
            prefix in 0usize..3,
            cuts in proptest::collection::vec(0usize..1000, 0..6),
        ) {
            // Some good requests, then anything: what is not answered is handed over or kept.
            let mut bytes = Vec::new();
            for _ in 0..prefix {
                bytes.extend_from_slice(get("/ok").as_bytes());
            }
            bytes.extend_from_slice(&data);
            let t = Instant::now();
            let mut c = Conn::new(t);
            let mut cuts: Vec<usize> = cuts.iter().map(|x| x % (bytes.len() + 1)).collect();
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let (mut at, mut consumed) = (0usize, 0usize);
            for cut in cuts {
                c.received(&bytes[at..cut], t);
                at = cut;
                let before = c.buffered().len();
                let mut answered = Vec::new();
                let o = serve(&mut c, &fast_policy(), Budget::parts(usize::MAX), |r: &Request| {
                    answered.push(r.target.clone());
                    echo(r)
                }, |_| {});
                match o {
                    Outcome::HandOver(rest) => {
                        proptest::prop_assert!(rest.len() <= before);
                        proptest::prop_assert_eq!(&bytes[at - rest.len()..at], &rest[..]);
                        return Ok(());
                    }
                    Outcome::Close(_) | Outcome::Wait => {
                        consumed += before - c.buffered().len();
                        proptest::prop_assert_eq!(&bytes[consumed..at], c.buffered());
                        if o != Outcome::Wait {
                            return Ok(());
                        }
                    }
                    Outcome::Budget => proptest::prop_assert!(false, "unlimited budget ran out"),
                }
            }
        }
    }
}
