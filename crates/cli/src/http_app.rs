//! The HTTP application of `splitos serve`: one event-driven thread serving every connection.
//!
//! It runs as its own process (`splitos serve-app`, started by `splitos serve`), so that a
//! reload can start a new instance beside it. It talks to the TCP server through a
//! [`Reactor`] and to the file server through a [`FileClient`]; it never touches file bytes:
//! a response is a head it writes and a body the TCP server sends from the file cache.
//!
//! Every request is handled to completion as soon as its head is parsed (opening a cached file
//! costs a directory lookup in shared memory), so between two polls every connection sits at a
//! request boundary, with at most an incomplete head buffered. That is what makes a hand-off
//! simple: on SIGUSR2 the listener is parked for the next instance, every connection is paused
//! and then handed off with its buffered bytes, and this process exits once all are gone.

use splitos::files::{FileClient, FileView};
use splitos::net::ListenOptions;
use splitos::reactor::{Events, Handle, NetEvent, Reactor, MAX_HANDOFF};
use splitos_file_server::path::Root;
use splitos_http::conditional;
use splitos_http::request::{self, Body, Limits, Method, Parsed, Request, Version};
use splitos_http::respond::{error_page, head_common, respond, Answer, Part, Response};
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Arguments `splitos serve` passes to each instance it starts (not meant to be typed).
#[derive(clap::Args, Clone, Debug)]
pub struct AppArgs {
    /// The served directory (for listings; files come from the file server).
    #[arg(long)]
    pub root: PathBuf,
    #[arg(long)]
    pub tcp_socket: PathBuf,
    #[arg(long)]
    pub files_socket: PathBuf,
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long)]
    pub access_log: Option<PathBuf>,
    #[arg(long, default_value_t = 10_000)]
    pub max_conns: usize,
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
    #[arg(long, default_value_t = 60)]
    pub idle_timeout: u64,
    #[arg(long, default_value = "block")]
    pub wait: splitos::WaitPolicy,
    #[arg(long)]
    pub list_dirs: bool,
    /// Answer every request here, none in the TCP server.
    #[arg(long)]
    pub no_direct: bool,
    /// Another instance holds the listener and is about to hand it over: retry until it does.
    #[arg(long)]
    pub takeover: bool,
}

/// Largest request body read (and discarded) on a GET or HEAD before giving up with 413.
const MAX_DISCARD: u64 = 1 << 20;
/// Responses one connection may produce per poll: a client pipelining thousands of requests
/// is served in slices, so that others are not starved.
const PIPELINE_SLICE: usize = 64;
/// How often timeouts are checked (and the access log flushed).
const TICK: Duration = Duration::from_millis(250);
/// How long a draining instance waits for its connections to be handed off.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// Most entries in a directory listing.
const MAX_LISTING: usize = 10_000;

struct Conn {
    peer: SocketAddr,
    buf: Vec<u8>,
    /// Body bytes of the last request still to be read and thrown away.
    discard: u64,
    last_active: Instant,
    closing: bool,
    paused: bool,
    handed: bool,
    /// Data has reached this application since the connection was last on the direct path;
    /// until then the TCP server answers it and applies its timeouts.
    seen_data: bool,
    /// Times this connection was given back to the direct path, and the batches of requests
    /// answered here since: each return waits for twice as many batches as the one before, so
    /// a connection whose requests keep needing the application (a miss, a precompressed
    /// sibling the cache does not know) soon stops bouncing.
    returns: u32,
    batches: u32,
}

/// Most doublings of the wait before a connection is given back to the direct path again.
const MAX_RETURN_BACKOFF: u32 = 10;

type Reply = Response<FileView>;

struct App {
    /// Misses of precompressed siblings cost no message: the file server publishes absences.
    files: FileClient,
    root: Option<Root>,
    log: Option<std::io::BufWriter<std::fs::File>>,
    args: AppArgs,
    limits: Limits,
}

/// Runs one instance until `stop` (exit now) or `drain` (hand everything off, then exit).
pub fn run(args: AppArgs, stop: Arc<AtomicBool>, drain: Arc<AtomicBool>) -> Result<(), String> {
    let mut reactor = Reactor::connect(&args.tcp_socket, args.wait, "splitos-serve")
        .map_err(|e| e.to_string())?;
    let files = FileClient::connect(&args.files_socket)
        .map_err(|e| format!("connecting to the file server: {e}"))?;
    let root = if args.list_dirs {
        Some(
            Root::open_dir(&args.root)
                .map_err(|e| format!("cannot open {}: {e}", args.root.display()))?,
        )
    } else {
        None
    };
    let log = match &args.access_log {
        None => None,
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("access log {}: {e}", p.display()))?,
        )),
    };
    // Ready: the supervisor may now tell the old instance to let go of the listener.
    println!("ready");
    let _ = std::io::stdout().flush();
    let opts = ListenOptions {
        persistent: true,
        ..ListenOptions::default()
    };
    let start = Instant::now();
    let (listener, local) = loop {
        match reactor.listen(args.listen, opts) {
            Ok(l) => break l,
            Err(e)
                if args.takeover
                    && e.kind() == std::io::ErrorKind::AddrInUse
                    && start.elapsed() < Duration::from_secs(20)
                    && !stop.load(Ordering::Relaxed) =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(format!("cannot listen on {}: {e}", args.listen)),
        }
    };
    // Static files the cache holds are answered by the TCP server itself unless every request
    // must pass through here (the access log is written here).
    let mut direct = !args.no_direct && args.access_log.is_none();
    if direct {
        if let Err(e) = reactor.serve_files(
            listener,
            &args.files_socket,
            Duration::from_secs(args.header_timeout),
            Duration::from_secs(args.idle_timeout),
        ) {
            tracing::warn!("the TCP server's direct path is off: {e}");
            direct = false;
        }
    }
    println!("listening {local}");
    let _ = std::io::stdout().flush();
    let mut app = App {
        files,
        root,
        log,
        limits: Limits::default(),
        args,
    };
    let mut conns: HashMap<Handle, Conn> = HashMap::new();
    let mut events = Events::new();
    // Connections with complete requests left over from a pipelining slice.
    let mut backlog: Vec<Handle> = Vec::new();
    let mut next_tick = Instant::now() + TICK;
    let mut draining: Option<Instant> = None;
    let mut handed_total = 0usize;
    while !stop.load(Ordering::Relaxed) {
        if draining.is_none() && drain.load(Ordering::Relaxed) {
            draining = Some(Instant::now());
            reactor
                .hand_off_listener(listener)
                .map_err(|e| e.to_string())?;
            for (&h, c) in conns.iter_mut() {
                if !c.closing && c.discard == 0 {
                    c.paused = true;
                    let _ = reactor.pause(h);
                }
            }
        }
        if let Some(since) = draining {
            if conns.is_empty() {
                break;
            }
            if since.elapsed() > DRAIN_LIMIT {
                tracing::warn!(
                    left = conns.len(),
                    "connections not handed off in time; closing them"
                );
                break;
            }
        }
        let timeout = if backlog.is_empty() {
            TICK.min(next_tick.saturating_duration_since(Instant::now()))
        } else {
            Duration::ZERO
        };
        reactor
            .poll(&mut events, Some(timeout))
            .map_err(|e| format!("the TCP server went away: {e}"))?;
        let now = Instant::now();
        for ev in events.iter() {
            match ev {
                NetEvent::Accepted { conn, peer, .. } => {
                    if conns.len() >= app.args.max_conns {
                        let _ = reactor.send(conn, b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                        let _ = reactor.close(conn);
                        continue;
                    }
                    // Head and body are two sends: without TCP_NODELAY Nagle's algorithm holds
                    // the body until the client's delayed ACK of the head (40 ms).
                    let _ = reactor.set_nodelay(conn, true);
                    let paused = draining.is_some();
                    if paused {
                        let _ = reactor.pause(conn);
                    }
                    conns.insert(
                        conn,
                        Conn {
                            peer,
                            buf: Vec::new(),
                            discard: 0,
                            last_active: now,
                            closing: false,
                            paused,
                            handed: false,
                            seen_data: false,
                            returns: 0,
                            batches: 0,
                        },
                    );
                }
                NetEvent::Data { conn, data } => {
                    let Some(c) = conns.get_mut(&conn) else {
                        continue;
                    };
                    c.last_active = now;
                    c.seen_data = true;
                    if c.closing {
                        continue;
                    }
                    let mut data = data;
                    if c.discard > 0 {
                        let take = (c.discard as usize).min(data.len());
                        c.discard -= take as u64;
                        data = &data[take..];
                    }
                    c.buf.extend_from_slice(data);
                    if serve_buffered(&mut app, &mut reactor, conn, c) {
                        backlog.push(conn);
                    } else if direct && draining.is_none() {
                        give_back(&mut reactor, conn, c);
                    }
                    if draining.is_some() && !c.paused && !c.closing && c.discard == 0 {
                        c.paused = true;
                        let _ = reactor.pause(conn);
                    }
                }
                NetEvent::Eof { conn } => {
                    if let Some(c) = conns.get_mut(&conn) {
                        if !c.closing && !c.paused {
                            c.closing = true;
                            let _ = reactor.close(conn);
                        }
                    }
                }
                NetEvent::Error { conn, .. } => {
                    if let Some(c) = conns.get_mut(&conn) {
                        if !c.closing {
                            c.closing = true;
                            let _ = reactor.close(conn);
                        }
                    }
                }
                NetEvent::Paused { conn } => {
                    if let Some(c) = conns.get_mut(&conn) {
                        if c.closing || c.handed {
                            continue;
                        }
                        // Everything delivered has been served; what is left is at most an
                        // incomplete head, which the next instance receives first.
                        if c.buf.len() > MAX_HANDOFF || c.discard > 0 {
                            c.closing = true;
                            let _ = reactor.close(conn);
                        } else {
                            c.handed = true;
                            handed_total += 1;
                            if reactor.hand_off(conn, &c.buf).is_err() {
                                c.closing = true;
                                let _ = reactor.close(conn);
                            }
                        }
                    }
                }
                NetEvent::Closed { conn } => {
                    conns.remove(&conn);
                }
            }
        }
        // Serve the next slice of heavily pipelined connections.
        for conn in std::mem::take(&mut backlog) {
            if let Some(c) = conns.get_mut(&conn) {
                if !c.closing && serve_buffered(&mut app, &mut reactor, conn, c) {
                    backlog.push(conn);
                }
            }
        }
        if now >= next_tick {
            next_tick = now + TICK;
            expire(&app, &mut reactor, &mut conns, now, direct);
            if let Some(l) = &mut app.log {
                let _ = l.flush();
            }
        }
    }
    if let Some(l) = &mut app.log {
        let _ = l.flush();
    }
    for (&h, c) in &conns {
        if !c.handed && !c.closing {
            let _ = reactor.close(h);
        }
    }
    let _ = reactor.flush();
    if draining.is_some() {
        eprintln!(
            "splitos serve: instance {} handed off {handed_total} connections and exits",
            std::process::id()
        );
    }
    Ok(())
}

/// Gives a connection the direct path had deferred back to it once this application has
/// answered everything it received (the requests that needed it were likely one-offs: a
/// file's first request, before the cache held it), backing off when it keeps coming back.
fn give_back(reactor: &mut Reactor, h: Handle, c: &mut Conn) {
    if c.closing || c.paused || c.discard > 0 || !c.buf.is_empty() {
        return;
    }
    c.batches += 1;
    if c.batches < 1 << c.returns.min(MAX_RETURN_BACKOFF) {
        return;
    }
    if reactor.serve_direct(h).is_ok() {
        c.returns += 1;
        c.batches = 0;
        c.seen_data = false;
    }
}

/// Closes connections past their header or idle timeout.
fn expire(
    app: &App,
    reactor: &mut Reactor,
    conns: &mut HashMap<Handle, Conn>,
    now: Instant,
    direct: bool,
) {
    let header = Duration::from_secs(app.args.header_timeout.max(1));
    let idle = Duration::from_secs(app.args.idle_timeout.max(1));
    for (&h, c) in conns.iter_mut() {
        if c.closing || c.handed || (direct && !c.seen_data) {
            continue;
        }
        let quiet = now.saturating_duration_since(c.last_active);
        if !c.buf.is_empty() && quiet > header {
            let r = error_page(408, "Request Timeout", true, false);
            emit(reactor, h, r);
            c.closing = true;
            let _ = reactor.close(h);
        } else if c.buf.is_empty() && quiet > idle {
            c.closing = true;
            let _ = reactor.close(h);
        }
    }
}

/// Serves the complete requests in `c.buf`, up to a slice; returns whether more remain.
fn serve_buffered(app: &mut App, reactor: &mut Reactor, h: Handle, c: &mut Conn) -> bool {
    let mut served = 0;
    while !c.closing && c.discard == 0 {
        if served == PIPELINE_SLICE {
            return true;
        }
        let (req, used) = match request::parse(&c.buf, &app.limits) {
            Ok(Parsed::Complete(r, n)) => (r, n),
            Ok(Parsed::Partial) => return false,
            Err(e) => {
                let r = error_page(e.status, e.reason, true, false);
                emit(reactor, h, r);
                c.closing = true;
                let _ = reactor.close(h);
                return false;
            }
        };
        c.buf.drain(..used);
        served += 1;
        // A body is read and discarded (bounded), never parsed as the next request.
        match req.body {
            Body::None => {}
            Body::Chunked => {
                let r = error_page(400, "Bad Request", true, false);
                emit(reactor, h, r);
                c.closing = true;
                let _ = reactor.close(h);
                return false;
            }
            Body::Length(n) if n > MAX_DISCARD => {
                let r = error_page(413, "Content Too Large", true, false);
                emit(reactor, h, r);
                c.closing = true;
                let _ = reactor.close(h);
                return false;
            }
            Body::Length(n) => {
                let take = (n as usize).min(c.buf.len());
                c.buf.drain(..take);
                c.discard = n - take as u64;
            }
        }
        let reply = handle(app, &req);
        log(app, c.peer, &req, reply.status, reply.body_bytes);
        emit(reactor, h, reply);
        if !req.keep_alive {
            c.closing = true;
            let _ = reactor.shutdown_write(h);
            let _ = reactor.close(h);
        }
    }
    false
}

fn emit(reactor: &mut Reactor, h: Handle, reply: Reply) {
    for p in reply.parts {
        let r = match p {
            Part::Bytes(b) => reactor.send(h, &b),
            Part::File(f, off, len) => reactor.send_file(h, &f, off, len),
        };
        if r.is_err() {
            // The peer stopped reading (too much queued) or is gone: nothing more for it.
            let _ = reactor.close(h);
            return;
        }
    }
}

fn log(app: &mut App, peer: SocketAddr, req: &Request, status: u16, bytes: u64) {
    let Some(l) = &mut app.log else { return };
    let method = match &req.method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Other(m) => m.as_str(),
    };
    let v = if req.version == Version::Http10 {
        "1.0"
    } else {
        "1.1"
    };
    let now = httpdate_clf(SystemTime::now());
    let _ = writeln!(
        l,
        "{} - - [{now}] \"{method} {} HTTP/{v}\" {status} {bytes}",
        peer.ip(),
        req.target
    );
}

/// The common log format's timestamp, in UTC.
fn httpdate_clf(t: SystemTime) -> String {
    // "Tue, 24 Nov 2026 19:11:42 GMT" → "24/Nov/2026:19:11:42 +0000"
    let d = conditional::http_date(t);
    let p: Vec<&str> = d.split_whitespace().collect();
    match p.as_slice() {
        [_, day, mon, year, time, _] => format!("{day}/{mon}/{year}:{time} +0000"),
        _ => d,
    }
}

fn handle(app: &mut App, req: &Request) -> Reply {
    match respond(&mut app.files, req) {
        Answer::Response(r) => r,
        Answer::NoIndex { dir, head_only } => match &app.root {
            Some(root) => listing(root, &dir, head_only),
            None => error_page(404, "Not Found", false, head_only),
        },
        // The application's source always knows.
        Answer::Defer => error_page(500, "Internal Server Error", true, false),
    }
}

/// An HTML listing of directory `rel` (for `--list-dirs` when it has no index.html).
fn listing(root: &Root, rel: &str, head_only: bool) -> Reply {
    let (entries, truncated) = match root.list(rel, MAX_LISTING) {
        Ok(v) => v,
        Err(splitos_file_server::path::OpenError::NotFound) => {
            return error_page(404, "Not Found", false, head_only)
        }
        Err(splitos_file_server::path::OpenError::Io(e)) => {
            tracing::warn!(dir = rel, "listing failed: {e}");
            return error_page(500, "Internal Server Error", false, head_only);
        }
        Err(_) => return error_page(403, "Forbidden", false, head_only),
    };
    let title = format!("Index of /{}", html_escape(rel));
    let mut body = format!(
        "<!doctype html>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n<h1>{title}</h1>\n<table>\n"
    );
    if !rel.is_empty() {
        body.push_str("<tr><td><a href=\"../\">../</a></td><td></td><td></td></tr>\n");
    }
    for e in &entries {
        let slash = if e.is_dir { "/" } else { "" };
        let size = if e.is_dir {
            "-".to_string()
        } else {
            e.size.to_string()
        };
        let when = conditional::http_date(UNIX_EPOCH + Duration::from_secs(e.mtime.max(0) as u64));
        body.push_str(&format!(
            "<tr><td><a href=\"{}{slash}\">{}{slash}</a></td><td>{when}</td><td align=\"right\">{size}</td></tr>\n",
            percent_encode(&e.name),
            html_escape(&e.name)
        ));
    }
    body.push_str("</table>\n");
    if truncated {
        body.push_str(&format!(
            "<p>Only the first {MAX_LISTING} entries are shown.</p>\n"
        ));
    }
    let mut h = head_common(200, "OK");
    h.push_str(&format!(
        "Content-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-cache\r\n\r\n",
        body.len()
    ));
    if !head_only {
        h.push_str(&body);
    }
    Response {
        parts: vec![Part::Bytes(h.into_bytes())],
        status: 200,
        body_bytes: if head_only { 0 } else { body.len() as u64 },
    }
}

fn html_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Percent-encodes a file name for use as a relative link (everything but unreserved bytes).
fn percent_encode(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_listings_cannot_inject_markup_or_links() {
        assert_eq!(
            html_escape("<script>\"x\"&'"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;"
        );
        assert_eq!(percent_encode("a b/../?#.html"), "a%20b%2F..%2F%3F%23.html");
        assert_eq!(percent_encode("ünï"), "%C3%BCn%C3%AF");
    }

    #[test]
    fn clf_timestamp() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let s = httpdate_clf(t);
        assert!(s.ends_with(" +0000"), "{s}");
        assert_eq!(s.len(), "24/Nov/2026:19:11:42 +0000".len(), "{s}");
    }
}
