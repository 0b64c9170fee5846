//! The HTTP application of `splitos serve`: one event-driven thread serving every connection.
//!
//! It runs as its own process (started by the [`supervisor`](crate::supervisor)), so that a
//! reload can start a new instance beside it. It talks to the TCP server through a
//! [`Reactor`] and to the file server through a [`FileClient`]; it never touches file bytes:
//! a response is a head it writes and a body the TCP server sends from the file cache.
//!
//! Every request is handled to completion as soon as it is whole (opening a cached file
//! costs a directory lookup in shared memory), so between two polls every connection sits at a
//! request boundary, with at most an incomplete request buffered. That is what makes a hand-off
//! simple: on `drain` the listener is parked for the next instance, every connection is paused
//! and then handed off with its buffered bytes, and this process exits once all are gone.
//!
//! It is also what lets this process crash without failing a request. The listener is
//! *recoverable*: after queueing each response, the application marks the boundary
//! ([`Reactor::answered`], with the bytes it has not answered yet), and the TCP server keeps a
//! copy of what it delivered since. If this process dies, every connection whose responses
//! were complete goes, with its unanswered bytes, to the next instance, which answers them on
//! the same client socket. A request with a body is answered once the body is in (at most
//! [`MAX_BODY`] bytes, read and thrown away), so it is whole in those bytes too; only a
//! response the TCP server received part of cannot be finished by another process.
//!
//! The supervisor learns how the start went from two lines this writes to its `reports`
//! output ([`READY`], then [`LISTENING`] with the bound address).

use splitos::files::{FileClient, FileView};
use splitos::net::ListenOptions;
use splitos::reactor::{Events, Handle, NetEvent, Reactor, MAX_HANDOFF};
use splitos::WaitPolicy;
use splitos_file_server::path::{OpenError, Root};
use splitos_http::conn::{self, Budget, Close, Expiry, Policy, Role, Timeouts};
use splitos_http::request::{Limits, Request};
use splitos_http::respond::{error_page, respond_with, Answer, Dotfiles, Options, Part, Response};
use splitos_http::{access_log, listing};
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// The first report line: connected to both servers, about to take the listener. The
/// supervisor tells the old instance to let go of it only after this.
pub const READY: &str = "ready";
/// The second report line, followed by the address bound: serving.
pub const LISTENING: &str = "listening";
/// Later report lines, when they change: `counters <connections> <responses> <directory
/// hits>` (responses given and file lookups the shared directory answered, since this
/// instance started), for `splitos status`.
pub const COUNTERS: &str = "counters";

/// What the supervisor tells each instance it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppConfig {
    /// The served directory (for listings; files come from the file server).
    pub root: PathBuf,
    pub tcp_socket: PathBuf,
    pub files_socket: PathBuf,
    pub listen: SocketAddr,
    /// Where to append the common-log-format access log, if anywhere.
    pub access_log: Option<PathBuf>,
    /// Most connections at once; more are answered 503 and closed.
    pub max_conns: usize,
    /// Seconds a client may take to send a request (its head, and a body), from its first
    /// byte: a deadline, however slowly the bytes come.
    pub header_timeout: u64,
    /// Seconds an idle keep-alive connection is kept.
    pub idle_timeout: u64,
    pub wait: WaitPolicy,
    /// List directories that have no `index.html`.
    pub list_dirs: bool,
    /// Answer every request here, none in the TCP server.
    pub no_direct: bool,
    /// Serve dotfiles (names starting with `.`); by default they are not found.
    pub dotfiles: bool,
    /// Another instance holds the listener and is about to hand it over: retry until it does.
    pub takeover: bool,
}

impl AppConfig {
    /// The configuration as command-line arguments, the way the supervisor passes it to a new
    /// instance; the program it starts parses them back (the `splitos` command has a hidden
    /// `serve-app` subcommand for that, and a test that the two agree).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut arg = |name: &str, value: OsString| {
            a.push(name.into());
            a.push(value);
        };
        arg("--root", self.root.clone().into());
        arg("--tcp-socket", self.tcp_socket.clone().into());
        arg("--files-socket", self.files_socket.clone().into());
        arg("--listen", self.listen.to_string().into());
        arg("--max-conns", self.max_conns.to_string().into());
        arg("--header-timeout", self.header_timeout.to_string().into());
        arg("--idle-timeout", self.idle_timeout.to_string().into());
        arg("--wait", self.wait.to_string().into());
        if let Some(l) = &self.access_log {
            arg("--access-log", l.clone().into());
        }
        for (on, flag) in [
            (self.list_dirs, "--list-dirs"),
            (self.no_direct, "--no-direct"),
            (self.dotfiles, "--dotfiles"),
            (self.takeover, "--takeover"),
        ] {
            if on {
                a.push(flag.into());
            }
        }
        a
    }
}

/// Why an instance could not start or stopped early.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The TCP server could not be reached (its own message says how).
    #[error(transparent)]
    TcpServer(io::Error),
    #[error("connecting to the file server: {0}")]
    FileServer(splitos::files::ClientError),
    #[error("cannot open {}: {source}", path.display())]
    Root { path: PathBuf, source: OpenError },
    #[error("access log {}: {source}", path.display())]
    AccessLog { path: PathBuf, source: io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    /// Parking the listener for the next instance failed.
    #[error(transparent)]
    HandOffListener(io::Error),
    #[error("the TCP server went away: {0}")]
    TcpServerGone(io::Error),
}

/// How an instance ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// Connections handed to the next instance, if it was drained.
    pub handed_off: Option<usize>,
}

/// Largest request body read (and thrown away) before answering; larger ones are answered 413
/// at once and the connection closed. Small enough that a request with its body (after a
/// head of at most 16 KiB) stays within what the TCP server keeps for a recoverable
/// connection (64 KiB), so a crash while it arrives loses nothing: the successor receives it
/// whole and answers it.
pub const MAX_BODY: u64 = 32 << 10;

/// Responses one connection may produce per poll: a client pipelining thousands of requests
/// is served in slices, so that others are not starved.
const PIPELINE_SLICE: usize = 64;
/// How often timeouts are checked (and the access log flushed).
const TICK: Duration = Duration::from_millis(250);
/// The longest a poll sleeps before `stop` and `drain` (set by signals, which do not wake
/// it) are looked at again: what a reload or an upgrade waits for an idle instance (one
/// whose connections the direct path answers gets no events) to notice it must go.
const FLAG_CHECK: Duration = Duration::from_millis(50);
/// How long a draining instance waits for its connections to be handed off.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// How long an instance taking over retries a listener its predecessor still holds.
const TAKEOVER_LIMIT: Duration = Duration::from_secs(20);
/// Most entries in a directory listing.
const MAX_LISTING: usize = 10_000;
/// Most doublings of the wait before a connection is given back to the direct path again.
const MAX_RETURN_BACKOFF: u32 = 10;

/// One client connection, as this application sees it.
struct Client {
    peer: SocketAddr,
    http: conn::Conn,
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

type Reply = Response<FileView>;

struct App {
    /// Misses of precompressed siblings cost no message: the file server publishes absences.
    files: FileClient,
    root: Option<Root>,
    log: Option<io::BufWriter<std::fs::File>>,
    policy: Policy,
    options: Options,
    max_conns: usize,
    /// Responses given so far.
    responses: u64,
}

/// Runs one instance until `stop` (exit now) or `drain` (hand everything off, then exit),
/// writing its [`READY`] and [`LISTENING`] lines to `reports`.
pub fn run(
    config: AppConfig,
    stop: &AtomicBool,
    drain: &AtomicBool,
    reports: &mut impl Write,
) -> Result<Exit, AppError> {
    let mut reactor = Reactor::connect(&config.tcp_socket, config.wait, "splitos-serve")
        .map_err(AppError::TcpServer)?;
    let files = FileClient::connect(&config.files_socket).map_err(AppError::FileServer)?;
    let root = if config.list_dirs {
        Some(
            Root::open_dir(&config.root).map_err(|source| AppError::Root {
                path: config.root.clone(),
                source,
            })?,
        )
    } else {
        None
    };
    let log = match &config.access_log {
        None => None,
        Some(p) => Some(io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| AppError::AccessLog {
                    path: p.clone(),
                    source,
                })?,
        )),
    };
    // A supervisor that stopped reading is not a reason to stop serving.
    let _ = writeln!(reports, "{READY}").and_then(|_| reports.flush());
    let opts = ListenOptions {
        persistent: true,
        recoverable: true,
        ..ListenOptions::default()
    };
    let start = Instant::now();
    let (listener, local) = loop {
        match reactor.listen(config.listen, opts) {
            Ok(l) => break l,
            Err(e)
                if config.takeover
                    && e.kind() == io::ErrorKind::AddrInUse
                    && start.elapsed() < TAKEOVER_LIMIT
                    && !stop.load(Ordering::Relaxed) =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(source) => {
                return Err(AppError::Listen {
                    addr: config.listen,
                    source,
                })
            }
        }
    };
    // Static files the cache holds are answered by the TCP server itself unless every request
    // must pass through here (the access log is written here).
    let mut direct = !config.no_direct && config.access_log.is_none();
    if direct {
        if let Err(e) = reactor.serve_files(
            listener,
            &config.files_socket,
            Duration::from_secs(config.header_timeout),
            Duration::from_secs(config.idle_timeout),
        ) {
            tracing::warn!("the TCP server's direct path is off: {e}");
            direct = false;
        }
    }
    let _ = writeln!(reports, "{LISTENING} {local}").and_then(|_| reports.flush());
    let mut app = App {
        files,
        root,
        log,
        policy: Policy {
            limits: Limits::default(),
            role: Role::Final { max_body: MAX_BODY },
            timeouts: Timeouts::from_secs(config.header_timeout, config.idle_timeout),
        },
        options: Options {
            dotfiles: if config.dotfiles {
                Dotfiles::Serve
            } else {
                Dotfiles::Hide
            },
        },
        max_conns: config.max_conns,
        responses: 0,
    };
    let mut reported = (0usize, 0u64, 0u64);
    let mut conns: HashMap<Handle, Client> = HashMap::new();
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
                .map_err(AppError::HandOffListener)?;
            for (&h, c) in conns.iter_mut() {
                if !c.closing && !c.http.discarding() {
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
            FLAG_CHECK.min(next_tick.saturating_duration_since(Instant::now()))
        } else {
            Duration::ZERO
        };
        reactor
            .poll(&mut events, Some(timeout))
            .map_err(AppError::TcpServerGone)?;
        let now = Instant::now();
        for ev in events.iter() {
            match ev {
                NetEvent::Accepted { conn, peer, .. } => {
                    if conns.len() >= app.max_conns {
                        let _ = reactor.send(conn, conn::OVERLOADED);
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
                        Client {
                            peer,
                            http: conn::Conn::new(now),
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
                    c.seen_data = true;
                    if c.closing {
                        continue;
                    }
                    c.http.received(data, now);
                    if serve_buffered(&mut app, &mut reactor, conn, c) {
                        backlog.push(conn);
                    } else if direct && draining.is_none() {
                        give_back(&mut reactor, conn, c);
                    }
                    if draining.is_some() && !c.paused && !c.closing && !c.http.discarding() {
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
                        if c.http.buffered().len() > MAX_HANDOFF || c.http.discarding() {
                            c.closing = true;
                            let _ = reactor.close(conn);
                        } else {
                            c.handed = true;
                            handed_total += 1;
                            if reactor.hand_off(conn, c.http.buffered()).is_err() {
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
            let counters = (conns.len(), app.responses, app.files.directory_hits);
            if counters != reported {
                reported = counters;
                let _ = writeln!(
                    reports,
                    "{COUNTERS} {} {} {}",
                    counters.0, counters.1, counters.2
                )
                .and_then(|_| reports.flush());
            }
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
    Ok(Exit {
        handed_off: draining.map(|_| handed_total),
    })
}

/// Gives a connection the direct path had deferred back to it once this application has
/// answered everything it received (the requests that needed it were likely one-offs: a
/// file's first request, before the cache held it), backing off when it keeps coming back.
fn give_back(reactor: &mut Reactor, h: Handle, c: &mut Client) {
    if c.closing || c.paused || !c.http.at_boundary() {
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

/// Closes connections past their header or idle timeout. Connections on the direct path are
/// the TCP server's to time out.
fn expire(
    app: &App,
    reactor: &mut Reactor,
    conns: &mut HashMap<Handle, Client>,
    now: Instant,
    direct: bool,
) {
    for (&h, c) in conns.iter_mut() {
        if c.closing || c.handed || (direct && !c.seen_data) {
            continue;
        }
        match c.http.expired(now, &app.policy.timeouts) {
            Some(Expiry::Head) => {
                let _ = emit(reactor, h, conn::request_timeout());
                c.closing = true;
                let _ = reactor.close(h);
            }
            Some(Expiry::Idle) => {
                c.closing = true;
                let _ = reactor.close(h);
            }
            None => {}
        }
    }
}

/// Serves the complete requests a connection has buffered, up to a slice; returns whether
/// more remain.
fn serve_buffered(app: &mut App, reactor: &mut Reactor, h: Handle, c: &mut Client) -> bool {
    let peer = c.peer;
    let App {
        files,
        root,
        log,
        policy,
        options,
        responses,
        ..
    } = app;
    let outcome = conn::serve_marked(
        &mut c.http,
        policy,
        Budget::responses(PIPELINE_SLICE),
        |req| {
            let reply = answer(files, root.as_ref(), options, req);
            if let Some(l) = log {
                let line = access_log::line(
                    peer.ip(),
                    req,
                    reply.status,
                    reply.body_bytes,
                    SystemTime::now(),
                );
                let _ = writeln!(l, "{line}");
            }
            Some(reply)
        },
        |reply, unanswered| {
            // The response is whole in the queue: from here, if this process dies, the next
            // instance can answer what follows it.
            *responses += 1;
            if emit(reactor, h, reply) {
                let _ = reactor.answered(h, unanswered);
            }
        },
    );
    match outcome {
        conn::Outcome::Wait => false,
        conn::Outcome::Budget => true,
        conn::Outcome::Close(Close::Asked) => {
            c.closing = true;
            let _ = reactor.shutdown_write(h);
            let _ = reactor.close(h);
            false
        }
        // A hand-over is the fast path's (Role::FastPath); here it cannot happen, and closing
        // is the only safe reading of it.
        conn::Outcome::Close(Close::Refused) | conn::Outcome::HandOver(_) => {
            c.closing = true;
            let _ = reactor.close(h);
            false
        }
    }
}

/// Queues a whole response; false if the connection is being closed instead.
fn emit(reactor: &mut Reactor, h: Handle, reply: Reply) -> bool {
    for p in reply.parts {
        let r = match p {
            Part::Bytes(b) => reactor.send(h, &b),
            Part::File(f, off, len) => reactor.send_file(h, &f, off, len),
        };
        if r.is_err() {
            // The peer stopped reading (too much queued) or is gone: nothing more for it.
            let _ = reactor.close(h);
            return false;
        }
    }
    true
}

fn answer(files: &mut FileClient, root: Option<&Root>, options: &Options, req: &Request) -> Reply {
    match respond_with(files, req, options) {
        Answer::Response(r) => r,
        Answer::NoIndex { dir, head_only } => match root {
            Some(root) => list(root, &dir, head_only),
            None => error_page(404, "Not Found", false, head_only),
        },
        // The application's source always knows.
        Answer::Defer => error_page(500, "Internal Server Error", true, false),
    }
}

/// The listing of directory `rel` (for `list_dirs` when it has no index.html), read through
/// the file server's `Root` so that it cannot leave the root either.
fn list(root: &Root, rel: &str, head_only: bool) -> Reply {
    let (entries, truncated) = match root.list(rel, MAX_LISTING) {
        Ok(v) => v,
        Err(OpenError::NotFound) => return error_page(404, "Not Found", false, head_only),
        Err(OpenError::Io(e)) => {
            tracing::warn!(dir = rel, "listing failed: {e}");
            return error_page(500, "Internal Server Error", false, head_only);
        }
        Err(_) => return error_page(403, "Forbidden", false, head_only),
    };
    let entries: Vec<listing::Entry> = entries
        .iter()
        .map(|e| listing::Entry {
            name: &e.name,
            is_dir: e.is_dir,
            size: e.size,
            mtime: e.mtime,
        })
        .collect();
    listing::page(rel, &entries, truncated.then_some(MAX_LISTING), head_only)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AppConfig {
        AppConfig {
            root: "/srv/site".into(),
            tcp_socket: "/run/t.sock".into(),
            files_socket: "/run/f.sock".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            access_log: None,
            max_conns: 10,
            header_timeout: 3,
            idle_timeout: 4,
            wait: WaitPolicy::Block,
            list_dirs: false,
            no_direct: false,
            dotfiles: false,
            takeover: false,
        }
    }

    #[test]
    fn arguments_carry_every_setting_and_flags_only_when_on() {
        let a: Vec<String> = config()
            .to_args()
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            a,
            [
                "--root",
                "/srv/site",
                "--tcp-socket",
                "/run/t.sock",
                "--files-socket",
                "/run/f.sock",
                "--listen",
                "127.0.0.1:8080",
                "--max-conns",
                "10",
                "--header-timeout",
                "3",
                "--idle-timeout",
                "4",
                "--wait",
                "block",
            ]
        );
        let all = AppConfig {
            access_log: Some("/var/log/a.log".into()),
            list_dirs: true,
            no_direct: true,
            dotfiles: true,
            takeover: true,
            ..config()
        }
        .to_args();
        let tail: Vec<&str> = all[16..].iter().filter_map(|s| s.to_str()).collect();
        assert_eq!(
            tail,
            [
                "--access-log",
                "/var/log/a.log",
                "--list-dirs",
                "--no-direct",
                "--dotfiles",
                "--takeover"
            ]
        );
    }

    #[test]
    fn listings_come_from_beneath_the_root_and_hide_dotfiles() {
        let dir = std::env::temp_dir().join(format!("splitos-serve-list-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("files/sub")).expect("test directory");
        std::fs::write(dir.join("files/a <b>.txt"), b"12345").expect("test file");
        std::fs::write(dir.join("files/.secret"), b"x").expect("test file");
        let root = Root::open_dir(&dir).expect("root");
        let page = |rel: &str| {
            let r = list(&root, rel, false);
            let text = match r.parts.as_slice() {
                [Part::Bytes(b)] => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            };
            (r.status, text)
        };
        let (status, text) = page("files/");
        assert_eq!(status, 200);
        assert!(text.contains("<a href=\"sub/\">sub/</a>"), "{text}");
        assert!(
            text.contains("<a href=\"a%20%3Cb%3E.txt\">a &lt;b&gt;.txt</a>"),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");
        assert_eq!(page("missing/").0, 404);
        assert_eq!(page("../").0, 403);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
