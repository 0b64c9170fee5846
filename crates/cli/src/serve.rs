//! `splitos serve DIR`: a static web server on the split architecture.
//!
//! The TCP server and the file server run as threads of this process (embedded, same code and
//! shared-memory paths as the daemons); the HTTP application uses the `splitos` library. File
//! bytes never pass through the application: the response head is written, then the body is
//! handed to the TCP server with `send_file`, which transmits it straight from the file
//! server's sealed segments. The listener is persistent, so the server's socket survives an
//! application restart.

use splitos::files::{ClientError, FileClient, FileView};
use splitos::net::{ListenOptions, TcpListener, TcpStream};
use splitos_file_server::server::{FileServer, FileServerConfig};
use splitos_http::conditional::{self, Outcome, Validators};
use splitos_http::range::{self, Ranges};
use splitos_http::request::{self, Body, Limits, Method, Parsed, Request, Version};
use splitos_http::target;
use splitos_tcp_server::{ServerConfig, TcpServer};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The directory to serve.
    dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// TCP server event-loop threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Most bytes of file contents kept in memory (suffixes K, M, G).
    #[arg(long, default_value = "256M", value_parser = crate::parse_bytes)]
    cache_size: u64,
    /// Write an access log in the common log format to this file (off by default).
    #[arg(long)]
    access_log: Option<PathBuf>,
    /// Most connections at once; more are answered 503 and closed.
    #[arg(long, default_value_t = 10_000)]
    max_conns: usize,
    /// Seconds a client may take to send a request head.
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Seconds an idle keep-alive connection is kept.
    #[arg(long, default_value_t = 60)]
    idle_timeout: u64,
    /// How the TCP server and the HTTP application wait: block (sleep at once; the default,
    /// best when cores are shared, e.g. with a load generator), adaptive (spin ~30 µs first),
    /// or poll (spin; only with cores to spare).
    #[arg(long, default_value = "block")]
    wait: splitos::WaitPolicy,
}

/// File-server readers shared by the connection threads (each reader is one channel).
const READERS: usize = 8;
/// Largest request body read (and discarded) on a GET or HEAD before giving up with 413.
const MAX_DISCARD: u64 = 1 << 20;

struct App {
    readers: Vec<Mutex<FileClient>>,
    /// Precompressed siblings known not to exist, and until when that is trusted: browsers ask
    /// for encodings on every request, and a miss costs a message to the file server.
    no_sibling: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    log: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    live: AtomicUsize,
    max_conns: usize,
    header_timeout: Duration,
    idle_timeout: Duration,
}

pub fn run(a: ServeArgs, stop: Arc<AtomicBool>) -> Result<(), String> {
    let meta =
        std::fs::metadata(&a.dir).map_err(|e| format!("cannot serve {}: {e}", a.dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", a.dir.display()));
    }
    let addr: SocketAddr = a
        .listen
        .parse()
        .map_err(|e| format!("--listen {:?}: {e} (expected IP:PORT)", a.listen))?;
    let private = std::env::temp_dir().join(format!("splitos-serve-{}", std::process::id()));
    std::fs::create_dir_all(&private)
        .map_err(|e| format!("creating {}: {e}", private.display()))?;
    let cleanup = scopeguard(private.clone());
    let tcp = TcpServer::start(ServerConfig {
        socket: private.join("tcp.sock"),
        threads: a.threads,
        wait: a.wait,
        ..ServerConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let mut fcfg = FileServerConfig::new(a.dir.clone(), private.join("files.sock"));
    fcfg.cache_bytes = a.cache_size;
    let files = FileServer::start(fcfg).map_err(|e| e.to_string())?;
    let readers = (0..READERS)
        .map(|_| FileClient::connect(private.join("files.sock")).map(Mutex::new))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("connecting to the file server: {e}"))?;
    let log = match &a.access_log {
        None => None,
        Some(p) => Some(Mutex::new(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("access log {}: {e}", p.display()))?,
        ))),
    };
    let session = splitos::Session::connect(
        tcp.socket_path(),
        splitos::SessionOptions {
            wait: a.wait,
            ..splitos::SessionOptions::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let listener = TcpListener::bind_with(
        &session,
        addr,
        ListenOptions {
            persistent: true,
            ..ListenOptions::default()
        },
    )
    .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("http://{local}/");
    let _ = std::io::stdout().flush();
    eprintln!(
        "splitos serve: serving {} at http://{local}/ (Ctrl-C to stop)",
        a.dir.display()
    );
    let app = Arc::new(App {
        readers,
        no_sibling: Mutex::new(std::collections::HashMap::new()),
        log,
        live: AtomicUsize::new(0),
        max_conns: a.max_conns,
        header_timeout: Duration::from_secs(a.header_timeout.max(1)),
        idle_timeout: Duration::from_secs(a.idle_timeout.max(1)),
    });
    let acceptor = {
        let app = app.clone();
        std::thread::Builder::new()
            .name("splitos-accept".into())
            .spawn(move || accept_loop(listener, app))
            .map_err(|e| e.to_string())?
    };
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("splitos serve: shutting down");
    if let Some(l) = &app.log {
        if let Ok(mut w) = l.lock() {
            let _ = w.flush();
        }
    }
    // Stopping the TCP server closes every connection and ends the accept loop.
    tcp.shutdown();
    let _ = acceptor.join();
    files.shutdown();
    drop(cleanup);
    Ok(())
}

struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn scopeguard(p: PathBuf) -> Cleanup {
    Cleanup(p)
}

fn accept_loop(listener: TcpListener, app: Arc<App>) {
    let mut n = 0usize;
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(_) => return, // the TCP server is gone: shutting down
        };
        n = n.wrapping_add(1);
        if app.live.load(Ordering::Relaxed) >= app.max_conns {
            let _ = (&stream).write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            continue;
        }
        app.live.fetch_add(1, Ordering::Relaxed);
        let app2 = app.clone();
        let reader = n % READERS;
        let spawned = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                connection(stream, peer, &app2, reader);
                app2.live.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            app.live.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Serves one connection: requests in order (pipelined ones too), until close or timeout.
fn connection(stream: TcpStream, peer: SocketAddr, app: &App, reader: usize) {
    // The head and the body go out as two sends: without TCP_NODELAY, Nagle's algorithm holds
    // the body back until the client's (delayed) ACK of the head — 40 ms per small response.
    let _ = stream.set_nodelay(true);
    let limits = Limits::default();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        // Parse what we have; read more only when the head is incomplete.
        let (req, used) = loop {
            match request::parse(&buf, &limits) {
                Ok(Parsed::Complete(r, n)) => break (r, n),
                Ok(Parsed::Partial) => {}
                Err(e) => {
                    let _ = respond_error(&stream, e.status, e.reason, true, false);
                    return;
                }
            }
            let timeout = if buf.is_empty() {
                app.idle_timeout
            } else {
                app.header_timeout
            };
            let _ = stream.set_read_timeout(Some(timeout));
            match (&stream).read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut && !buf.is_empty() => {
                    let _ = respond_error(&stream, 408, "Request Timeout", true, false);
                    return;
                }
                Err(_) => return,
            }
        };
        buf.drain(..used);
        // A body is read and discarded (bounded), never left to be parsed as the next request.
        match req.body {
            Body::None => {}
            Body::Chunked => {
                let _ = respond_error(&stream, 400, "Bad Request", true, false);
                return;
            }
            Body::Length(n) if n > MAX_DISCARD => {
                let _ = respond_error(&stream, 413, "Content Too Large", true, false);
                return;
            }
            Body::Length(n) => {
                let mut left = n as usize;
                let take = left.min(buf.len());
                buf.drain(..take);
                left -= take;
                while left > 0 {
                    match (&stream).read(&mut chunk[..left.min(16 << 10)]) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => left -= k,
                    }
                }
            }
        }
        let keep = req.keep_alive;
        let (status, bytes) = match handle(&stream, &req, app, reader) {
            Ok(r) => r,
            Err(_) => return,
        };
        log(app, peer, &req, status, bytes);
        if !keep {
            let _ = stream.shutdown(std::net::Shutdown::Write);
            return;
        }
    }
}

fn log(app: &App, peer: SocketAddr, req: &Request, status: u16, bytes: u64) {
    let Some(l) = &app.log else { return };
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
    if let Ok(mut w) = l.lock() {
        let _ = writeln!(
            w,
            "{} - - [{now}] \"{method} {} HTTP/{v}\" {status} {bytes}",
            peer.ip(),
            req.target
        );
    }
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

fn head_common(status: u16, reason: &str) -> String {
    format!(
        "HTTP/1.1 {status} {reason}\r\nServer: splitos\r\nDate: {}\r\n",
        conditional::http_date(SystemTime::now())
    )
}

fn respond_error(
    stream: &TcpStream,
    status: u16,
    reason: &str,
    close: bool,
    head_only: bool,
) -> std::io::Result<(u16, u64)> {
    let body =
        format!("<!doctype html><title>{status} {reason}</title><h1>{status} {reason}</h1>\n");
    let mut h = head_common(status, reason);
    h.push_str(&format!(
        "Content-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n",
        body.len()
    ));
    if status == 405 {
        h.push_str("Allow: GET, HEAD\r\n");
    }
    if close {
        h.push_str("Connection: close\r\n");
    }
    h.push_str("\r\n");
    if !head_only {
        h.push_str(&body);
    }
    (&*stream).write_all(h.as_bytes())?;
    Ok((status, if head_only { 0 } else { body.len() as u64 }))
}

fn open(app: &App, reader: usize, path: &str) -> Result<FileView, ClientError> {
    let mut fc = app.readers[reader]
        .lock()
        .map_err(|_| ClientError::Protocol("reader lock poisoned"))?;
    fc.open(path)
}

fn handle(
    stream: &TcpStream,
    req: &Request,
    app: &App,
    reader: usize,
) -> std::io::Result<(u16, u64)> {
    let head_only = req.method == Method::Head;
    if !matches!(req.method, Method::Get | Method::Head) {
        return respond_error(stream, 405, "Method Not Allowed", false, false);
    }
    let path = match target::decode_path(&req.target) {
        Ok(p) => p,
        Err(e) => return respond_error(stream, e.status, e.reason, false, head_only),
    };
    let rel = path.trim_start_matches('/');
    let rel_file = if rel.is_empty() || rel.ends_with('/') {
        format!("{rel}index.html")
    } else {
        rel.to_string()
    };
    let view = match open(app, reader, &rel_file) {
        Ok(v) => v,
        Err(ClientError::Directory) => {
            let location = format!("{}/", req.target.split('?').next().unwrap_or("/"));
            let mut h = head_common(301, "Moved Permanently");
            h.push_str(&format!(
                "Location: {location}\r\nContent-Length: 0\r\n\r\n"
            ));
            (&*stream).write_all(h.as_bytes())?;
            return Ok((301, 0));
        }
        Err(ClientError::NotFound) => {
            return respond_error(stream, 404, "Not Found", false, head_only)
        }
        Err(
            ClientError::Escapes
            | ClientError::BadPath(_)
            | ClientError::Special
            | ClientError::Denied,
        ) => return respond_error(stream, 403, "Forbidden", false, head_only),
        Err(_) => return respond_error(stream, 500, "Internal Server Error", true, head_only),
    };
    let content_type = view.content_type();
    let (view, encoding) =
        match precompressed(app, reader, &rel_file, req.header("accept-encoding")) {
            Some((sibling, enc)) => (sibling, Some(enc)),
            None => (view, None),
        };
    let v = view.version();
    let etag = v.etag();
    let last_modified = UNIX_EPOCH + Duration::from_nanos(v.mtime_ns.max(0) as u64);
    let validators = Validators {
        etag: &etag,
        last_modified,
    };
    let common = |status: u16, reason: &str| {
        let mut h = head_common(status, reason);
        h.push_str(&format!(
            "ETag: {etag}\r\nLast-Modified: {}\r\nAccept-Ranges: bytes\r\nVary: Accept-Encoding\r\n",
            conditional::http_date(last_modified)
        ));
        if let Some(enc) = encoding {
            h.push_str(&format!("Content-Encoding: {enc}\r\n"));
        }
        h
    };
    match conditional::evaluate(|n| req.header(n), &validators, true) {
        Outcome::NotModified => {
            let h = common(304, "Not Modified") + "\r\n";
            (&*stream).write_all(h.as_bytes())?;
            return Ok((304, 0));
        }
        Outcome::PreconditionFailed => {
            return respond_error(stream, 412, "Precondition Failed", false, head_only)
        }
        Outcome::Proceed => {}
    }
    let len = view.len();
    let ranges = match req.header("range") {
        Some(r) if conditional::range_applies(req.header("if-range"), &validators) => {
            range::parse(r, len)
        }
        _ => Ranges::Whole,
    };
    let (status, start, count, mut h) = match ranges {
        Ranges::Single(a, b) => {
            let mut h = common(206, "Partial Content");
            h.push_str(&format!("Content-Range: bytes {a}-{b}/{len}\r\n"));
            (206, a, b - a + 1, h)
        }
        Ranges::Unsatisfiable => {
            let mut h = common(416, "Range Not Satisfiable");
            h.push_str(&format!(
                "Content-Range: bytes */{len}\r\nContent-Length: 0\r\n\r\n"
            ));
            (&*stream).write_all(h.as_bytes())?;
            return Ok((416, 0));
        }
        Ranges::Multiple(parts) => {
            return multipart(
                stream,
                &view,
                &parts,
                common(206, "Partial Content"),
                content_type,
                head_only,
            );
        }
        Ranges::Whole => (200, 0, len, common(200, "OK")),
    };
    h.push_str(&format!(
        "Content-Type: {content_type}\r\nContent-Length: {count}\r\n\r\n"
    ));
    (&*stream).write_all(h.as_bytes())?;
    if head_only || count == 0 {
        return Ok((status, 0));
    }
    stream.send_file(&view, start, count)?;
    Ok((status, count))
}

/// The precompressed sibling (`.br`, `.zst`, `.gz`) of `rel` that the client accepts, if any.
fn precompressed(
    app: &App,
    reader: usize,
    rel: &str,
    accept: Option<&str>,
) -> Option<(FileView, &'static str)> {
    let accept = accept?;
    let accepts = |name: &str| {
        accept.split(',').any(|t| {
            let mut it = t.split(';');
            let token = it.next().unwrap_or("").trim();
            let q0 = it.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            token.eq_ignore_ascii_case(name) && !q0
        })
    };
    for (token, ext) in [("br", "br"), ("zstd", "zst"), ("gzip", "gz")] {
        if !accepts(token) {
            continue;
        }
        let sibling = format!("{rel}.{ext}");
        let now = std::time::Instant::now();
        if let Ok(cache) = app.no_sibling.lock() {
            if cache.get(&sibling).is_some_and(|until| *until > now) {
                continue;
            }
        }
        match open(app, reader, &sibling) {
            Ok(v) => return Some((v, token)),
            Err(_) => {
                if let Ok(mut cache) = app.no_sibling.lock() {
                    if cache.len() > 10_000 {
                        cache.clear();
                    }
                    cache.insert(sibling, now + Duration::from_secs(1));
                }
            }
        }
    }
    None
}

/// Several ranges as `multipart/byteranges`; every part's bytes are sent from the file cache.
fn multipart(
    stream: &TcpStream,
    view: &FileView,
    parts: &[(u64, u64)],
    mut head: String,
    content_type: &str,
    head_only: bool,
) -> std::io::Result<(u16, u64)> {
    const BOUNDARY: &str = "SPLITOS_BYTERANGES_7f3a9c";
    let len = view.len();
    let part_heads: Vec<String> = parts
        .iter()
        .map(|(a, b)| {
            format!("--{BOUNDARY}\r\nContent-Type: {content_type}\r\nContent-Range: bytes {a}-{b}/{len}\r\n\r\n")
        })
        .collect();
    let closing = format!("--{BOUNDARY}--\r\n");
    let total: u64 = part_heads
        .iter()
        .zip(parts)
        .map(|(h, (a, b))| h.len() as u64 + (b - a + 1) + 2)
        .sum::<u64>()
        + closing.len() as u64;
    head.push_str(&format!(
        "Content-Type: multipart/byteranges; boundary={BOUNDARY}\r\nContent-Length: {total}\r\n\r\n"
    ));
    (&*stream).write_all(head.as_bytes())?;
    if head_only {
        return Ok((206, 0));
    }
    for (h, (a, b)) in part_heads.iter().zip(parts) {
        (&*stream).write_all(h.as_bytes())?;
        stream.send_file(view, *a, b - a + 1)?;
        (&*stream).write_all(b"\r\n")?;
    }
    (&*stream).write_all(closing.as_bytes())?;
    Ok((206, total))
}
