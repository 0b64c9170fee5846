//! Answering a request for a static file: the one place where a request head becomes a
//! response, shared by the HTTP application and the TCP server's direct path so that both
//! answer alike.
//!
//! The file store is abstract ([`FileSource`]): the application opens files through the file
//! server, the TCP server only looks in the file cache it maps and says [`Lookup::Unavailable`]
//! for anything else, which makes the whole answer [`Answer::Defer`] ("let the application
//! handle this one"). A response is a head and file ranges ([`Part`]), never file bytes: the
//! bytes go to the network straight from the cache.

use crate::conditional::{self, Outcome, Validators};
use crate::range::{self, Ranges};
use crate::request::{Method, Request};
use crate::target;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A file as the responder needs it.
pub trait StaticFile: Clone {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A strong entity tag, with its quotes.
    fn etag(&self) -> String;
    fn modified(&self) -> SystemTime;
    /// A key that alone determines `etag()` and `modified()` (e.g. size and modification
    /// time), if the file has one: the responder then renders its validators once per key
    /// instead of once per response.
    fn version_key(&self) -> Option<(u64, i128)> {
        None
    }
    fn content_type(&self) -> &'static str;
}

/// The outcome of looking a path up.
pub enum Lookup<F> {
    Found(F),
    NotFound,
    /// The path names a directory.
    Directory,
    /// Outside the root, a special file, or not readable.
    Forbidden,
    /// This source cannot tell now (e.g. not cached); another one should answer.
    Unavailable,
    /// The store failed.
    Failed,
}

pub trait FileSource {
    type File: StaticFile;
    /// Looks up `path` (decoded, relative to the root, no leading `/`).
    fn open(&mut self, path: &str) -> Lookup<Self::File>;
    /// Looks up a precompressed sibling (`path.br` and so on); a source may remember misses.
    fn open_sibling(&mut self, path: &str) -> Lookup<Self::File> {
        self.open(path)
    }
}

pub enum Part<F> {
    Bytes(Vec<u8>),
    /// `len` bytes from `offset` of the file.
    File(F, u64, u64),
}

pub struct Response<F> {
    pub parts: Vec<Part<F>>,
    pub status: u16,
    /// Body bytes (for the access log).
    pub body_bytes: u64,
}

impl<F> Default for Response<F> {
    fn default() -> Self {
        Response {
            parts: Vec::new(),
            status: 0,
            body_bytes: 0,
        }
    }
}

impl<F> Response<F> {
    fn bytes(&mut self, b: &[u8]) {
        match self.parts.last_mut() {
            Some(Part::Bytes(v)) => v.extend_from_slice(b),
            _ => self.parts.push(Part::Bytes(b.to_vec())),
        }
    }
    fn file(&mut self, f: F, off: u64, len: u64) {
        if len > 0 {
            self.parts.push(Part::File(f, off, len));
        }
    }
}

pub enum Answer<F> {
    Response(Response<F>),
    /// A directory request whose `index.html` does not exist: list `dir` (relative, may be
    /// empty for the root) or answer 404.
    NoIndex {
        dir: String,
        head_only: bool,
    },
    /// The source could not answer (see [`Lookup::Unavailable`]).
    Defer,
}

/// A file version's validators as the response heads carry them.
struct Rendered {
    etag: String,
    /// `ETag`, `Last-Modified`, `Accept-Ranges` and `Vary` lines.
    block: String,
}

fn render(etag: String, modified: SystemTime) -> Rendered {
    let block = format!(
        "ETag: {etag}\r\nLast-Modified: {}\r\nAccept-Ranges: bytes\r\nVary: Accept-Encoding\r\n",
        conditional::http_date(modified)
    );
    Rendered { etag, block }
}

/// Slots of the per-thread cache of rendered validators (direct-mapped by version key).
const RENDERED_SLOTS: usize = 64;

/// `file`'s rendered validators: from a small per-thread cache when the file has a version
/// key. Formatting the ETag (a 128-bit hex number) and the Last-Modified date per response
/// was ~1.5% of a 1 KiB response's CPU in the profile.
fn rendered<F: StaticFile>(file: &F) -> std::rc::Rc<Rendered> {
    type Slot = Option<((u64, i128), std::rc::Rc<Rendered>)>;
    thread_local! {
        static CACHE: std::cell::RefCell<[Slot; RENDERED_SLOTS]> =
            const { std::cell::RefCell::new([const { None }; RENDERED_SLOTS]) };
    }
    let Some(key) = file.version_key() else {
        return std::rc::Rc::new(render(file.etag(), file.modified()));
    };
    let slot = (key.0 ^ (key.1 as u64) ^ ((key.1 >> 64) as u64)) as usize % RENDERED_SLOTS;
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((k, r)) = &c[slot] {
            if *k == key {
                return r.clone();
            }
        }
        let r = std::rc::Rc::new(render(file.etag(), file.modified()));
        c[slot] = Some((key, r.clone()));
        r
    })
}

/// The first lines of every response head: status, `Server`, `Date`.
pub fn head_common(status: u16, reason: &str) -> String {
    // The Date header changes once a second; rendering it per response cost more than the
    // rest of the head.
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            *d = (secs, conditional::http_date(now));
        }
        let mut h = String::with_capacity(256);
        let _ = write!(
            h,
            "HTTP/1.1 {status} {reason}\r\nServer: splitos\r\nDate: {}\r\n",
            d.1
        );
        h
    })
}

/// A small HTML error response.
pub fn error_page<F>(status: u16, reason: &str, close: bool, head_only: bool) -> Response<F> {
    let mut r = Response::default();
    let body =
        format!("<!doctype html><title>{status} {reason}</title><h1>{status} {reason}</h1>\n");
    let mut h = head_common(status, reason);
    let _ = write!(
        h,
        "Content-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n",
        body.len()
    );
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
    r.bytes(h.as_bytes());
    r.status = status;
    r.body_bytes = if head_only { 0 } else { body.len() as u64 };
    r
}

/// What to do with a request for a dotfile: a path with a segment whose name starts with `.`
/// (`/.git/config`, `/.env`, `/sub/.htpasswd`), other than a first segment `.well-known`
/// (RFC 8615).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Dotfiles {
    /// As if it did not exist: 404. A served directory is often a checkout or a project
    /// directory, whose dotfiles hold what should not be published.
    #[default]
    Hide,
    /// Serve them like any other file.
    Serve,
    /// Let another answerer decide ([`Answer::Defer`]): for a fast path that does not know
    /// the server's setting.
    Defer,
}

/// How requests are answered beyond what the request and the files say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Options {
    pub dotfiles: Dotfiles,
}

/// Whether decoded path `path` names a dotfile (see [`Dotfiles`]). `.` and `..` segments are
/// not dotfiles: they are the file store's to normalize or refuse.
pub fn is_dotfile(path: &str) -> bool {
    path.split('/')
        .filter(|s| !s.is_empty() && *s != "." && *s != "..")
        .enumerate()
        .any(|(i, s)| s.starts_with('.') && !(i == 0 && s == ".well-known"))
}

/// Answers a GET or HEAD for a static file (anything else: 405), deferring requests for
/// dotfiles to another answerer: what a fast path that does not know the setting says.
pub fn respond<S: FileSource>(src: &mut S, req: &Request) -> Answer<S::File> {
    respond_with(
        src,
        req,
        &Options {
            dotfiles: Dotfiles::Defer,
        },
    )
}

/// Answers a GET or HEAD for a static file (anything else: 405), as `options` say.
pub fn respond_with<S: FileSource>(
    src: &mut S,
    req: &Request,
    options: &Options,
) -> Answer<S::File> {
    let head_only = req.method == Method::Head;
    if !matches!(req.method, Method::Get | Method::Head) {
        return Answer::Response(error_page(405, "Method Not Allowed", false, false));
    }
    let path = match target::decode_path(&req.target) {
        Ok(p) => p,
        Err(e) => return Answer::Response(error_page(e.status, e.reason, false, head_only)),
    };
    if options.dotfiles != Dotfiles::Serve && is_dotfile(&path) {
        if options.dotfiles == Dotfiles::Defer {
            return Answer::Defer;
        }
        return Answer::Response(error_page(404, "Not Found", false, head_only));
    }
    let rel = path.trim_start_matches('/');
    let is_dir_request = rel.is_empty() || rel.ends_with('/');
    let rel_file = if is_dir_request {
        format!("{rel}index.html")
    } else {
        rel.to_string()
    };
    let file = match src.open(&rel_file) {
        Lookup::Found(f) => f,
        Lookup::Directory => {
            let location = directory_location(&path, &req.target);
            let mut r = Response::default();
            let mut h = head_common(301, "Moved Permanently");
            let _ = write!(h, "Location: {location}\r\nContent-Length: 0\r\n\r\n");
            r.bytes(h.as_bytes());
            r.status = 301;
            return Answer::Response(r);
        }
        Lookup::NotFound if is_dir_request => {
            return Answer::NoIndex {
                dir: rel.to_string(),
                head_only,
            }
        }
        Lookup::NotFound => {
            return Answer::Response(error_page(404, "Not Found", false, head_only))
        }
        Lookup::Forbidden => {
            return Answer::Response(error_page(403, "Forbidden", false, head_only))
        }
        Lookup::Unavailable => return Answer::Defer,
        Lookup::Failed => {
            return Answer::Response(error_page(500, "Internal Server Error", true, head_only))
        }
    };
    let content_type = file.content_type();
    let (file, encoding) = match precompressed(src, &rel_file, req.header("accept-encoding")) {
        Ok(Some((sibling, enc))) => (sibling, Some(enc)),
        Ok(None) => (file, None),
        Err(()) => return Answer::Defer,
    };
    let shown = rendered(&file);
    let last_modified = file.modified();
    let validators = Validators {
        etag: &shown.etag,
        last_modified,
    };
    let common = |status: u16, reason: &str| {
        let mut h = head_common(status, reason);
        h.push_str(&shown.block);
        if let Some(enc) = encoding {
            let _ = write!(h, "Content-Encoding: {enc}\r\n");
        }
        h
    };
    let mut r = Response::default();
    match conditional::evaluate(|n| req.header(n), &validators, true) {
        Outcome::NotModified => {
            r.bytes((common(304, "Not Modified") + "\r\n").as_bytes());
            r.status = 304;
            return Answer::Response(r);
        }
        Outcome::PreconditionFailed => {
            return Answer::Response(error_page(412, "Precondition Failed", false, head_only))
        }
        Outcome::Proceed => {}
    }
    let len = file.len();
    let ranges = match req.header("range") {
        Some(rg) if conditional::range_applies(req.header("if-range"), &validators) => {
            range::parse(rg, len)
        }
        _ => Ranges::Whole,
    };
    let (status, start, count, mut h) = match ranges {
        Ranges::Single(a, b) => {
            let mut h = common(206, "Partial Content");
            let _ = write!(h, "Content-Range: bytes {a}-{b}/{len}\r\n");
            (206, a, b - a + 1, h)
        }
        Ranges::Unsatisfiable => {
            let mut h = common(416, "Range Not Satisfiable");
            let _ = write!(
                h,
                "Content-Range: bytes */{len}\r\nContent-Length: 0\r\n\r\n"
            );
            r.bytes(h.as_bytes());
            r.status = 416;
            return Answer::Response(r);
        }
        Ranges::Multiple(parts) => {
            let head = common(206, "Partial Content");
            multipart(&mut r, file, &parts, head, content_type, head_only);
            return Answer::Response(r);
        }
        Ranges::Whole => (200, 0, len, common(200, "OK")),
    };
    let _ = write!(
        h,
        "Content-Type: {content_type}\r\nContent-Length: {count}\r\n\r\n"
    );
    r.bytes(h.as_bytes());
    r.status = status;
    if !head_only {
        r.file(file, start, count);
        r.body_bytes = count;
    }
    Answer::Response(r)
}

/// What a path segment keeps unencoded in a `Location`: anything but controls, space, and the
/// characters that would end or change the meaning of a path (`?`, `#`, `%`, quotes, angle
/// brackets and the like). Non-ASCII is encoded as UTF-8.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Where a request for directory `path` (decoded) is redirected: the same path, normalized
/// (empty and `.` segments dropped, so it always starts with exactly one `/` and can never be
/// read as `//host`), encoded again, with a slash and the target's query.
fn directory_location(path: &str, target: &str) -> String {
    let mut location = String::with_capacity(path.len() + 2);
    for segment in path.split('/').filter(|s| !s.is_empty() && *s != ".") {
        location.push('/');
        location.extend(percent_encoding::utf8_percent_encode(segment, SEGMENT));
    }
    location.push('/');
    if let Some((_, query)) = target.split_once('?') {
        location.push('?');
        location.push_str(query);
    }
    location
}

/// Whether an `Accept-Encoding` value accepts `coding` (present, and not with `q=0`).
pub fn accepts_encoding(accept: &str, coding: &str) -> bool {
    accept.split(',').any(|t| {
        let mut it = t.split(';');
        let token = it.next().unwrap_or("").trim();
        let q0 = it.any(|p| {
            p.trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        });
        token.eq_ignore_ascii_case(coding) && !q0
    })
}

/// The precompressed sibling (`.br`, `.zst`, `.gz`) of `rel` that the client accepts, if any;
/// `Err` if the source could not tell.
#[allow(clippy::type_complexity)]
fn precompressed<S: FileSource>(
    src: &mut S,
    rel: &str,
    accept: Option<&str>,
) -> Result<Option<(S::File, &'static str)>, ()> {
    let Some(accept) = accept else {
        return Ok(None);
    };
    for (token, ext) in [("br", "br"), ("zstd", "zst"), ("gzip", "gz")] {
        if !accepts_encoding(accept, token) {
            continue;
        }
        match src.open_sibling(&format!("{rel}.{ext}")) {
            Lookup::Found(f) => return Ok(Some((f, token))),
            Lookup::Unavailable => return Err(()),
            _ => {}
        }
    }
    Ok(None)
}

/// Several ranges as `multipart/byteranges`; every part's bytes come from the file.
fn multipart<F: StaticFile>(
    r: &mut Response<F>,
    file: F,
    parts: &[(u64, u64)],
    mut head: String,
    content_type: &str,
    head_only: bool,
) {
    const BOUNDARY: &str = "SPLITOS_BYTERANGES_7f3a9c";
    let len = file.len();
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
    let _ = write!(
        head,
        "Content-Type: multipart/byteranges; boundary={BOUNDARY}\r\nContent-Length: {total}\r\n\r\n"
    );
    r.bytes(head.as_bytes());
    r.status = 206;
    if head_only {
        return;
    }
    for (h, (a, b)) in part_heads.iter().zip(parts) {
        r.bytes(h.as_bytes());
        r.file(file.clone(), *a, b - a + 1);
        r.bytes(b"\r\n");
    }
    r.bytes(closing.as_bytes());
    r.body_bytes = total;
}

/// `mtime` in nanoseconds since the epoch as a time (negative: the epoch).
pub fn time_of_ns(mtime_ns: i128) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(mtime_ns.clamp(0, u64::MAX as i128) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{parse, Limits, Parsed};
    use std::collections::HashMap;

    #[derive(Clone)]
    struct Mem(u64);
    impl StaticFile for Mem {
        fn len(&self) -> u64 {
            self.0
        }
        fn etag(&self) -> String {
            "\"e\"".into()
        }
        fn modified(&self) -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        }
        fn content_type(&self) -> &'static str {
            "text/plain"
        }
    }
    struct Store(HashMap<&'static str, Lookup<Mem>>);
    impl FileSource for Store {
        type File = Mem;
        fn open(&mut self, path: &str) -> Lookup<Mem> {
            match self.0.get(path) {
                Some(Lookup::Found(m)) => Lookup::Found(m.clone()),
                Some(Lookup::Unavailable) => Lookup::Unavailable,
                Some(Lookup::Directory) => Lookup::Directory,
                _ => Lookup::NotFound,
            }
        }
    }

    fn req(s: &str) -> Request {
        let s = s.replacen("\r\n", "\r\nHost: x\r\n", 1);
        match parse(s.as_bytes(), &Limits::default()) {
            Ok(Parsed::Complete(r, _)) => r,
            _ => panic!("bad test request"),
        }
    }

    fn head(a: &Answer<Mem>) -> String {
        match a {
            Answer::Response(r) => match &r.parts[0] {
                Part::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
                Part::File(..) => panic!("file first"),
            },
            _ => panic!("not a response"),
        }
    }

    #[test]
    fn answers_defers_and_lists_as_the_source_allows() {
        let mut s = Store(HashMap::from([
            ("a.txt", Lookup::Found(Mem(10))),
            ("hot.txt", Lookup::Found(Mem(5))),
            ("hot.txt.br", Lookup::Unavailable),
            ("d", Lookup::Directory),
            ("cold.txt", Lookup::Unavailable),
        ]));
        let a = respond(&mut s, &req("GET /a.txt HTTP/1.1\r\n\r\n"));
        assert!(head(&a).starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head(&a).contains("Content-Length: 10\r\n"));
        match &a {
            Answer::Response(r) => assert!(matches!(r.parts[1], Part::File(_, 0, 10))),
            _ => unreachable!(),
        }
        let a = respond(
            &mut s,
            &req("GET /a.txt HTTP/1.1\r\nRange: bytes=2-4\r\n\r\n"),
        );
        assert!(head(&a).contains("Content-Range: bytes 2-4/10\r\n"));
        let a = respond(
            &mut s,
            &req("GET /a.txt HTTP/1.1\r\nIf-None-Match: \"e\"\r\n\r\n"),
        );
        assert!(head(&a).starts_with("HTTP/1.1 304"));
        let a = respond(&mut s, &req("GET /d HTTP/1.1\r\n\r\n"));
        assert!(head(&a).contains("Location: /d/\r\n"));
        assert!(matches!(
            respond(&mut s, &req("GET /cold.txt HTTP/1.1\r\n\r\n")),
            Answer::Defer
        ));
        // The file is at hand but whether a compressed sibling exists is not: defer.
        assert!(matches!(
            respond(
                &mut s,
                &req("GET /hot.txt HTTP/1.1\r\nAccept-Encoding: br\r\n\r\n")
            ),
            Answer::Defer
        ));
        // A client that refuses br (q=0) does not need to know.
        assert!(matches!(
            respond(
                &mut s,
                &req("GET /hot.txt HTTP/1.1\r\nAccept-Encoding: br;q=0\r\n\r\n")
            ),
            Answer::Response(_)
        ));
        assert!(matches!(
            respond(&mut s, &req("GET /nodir/ HTTP/1.1\r\n\r\n")),
            Answer::NoIndex { .. }
        ));
        let a = respond(&mut s, &req("DELETE /a.txt HTTP/1.1\r\n\r\n"));
        assert!(head(&a).contains("405") && head(&a).contains("Allow: GET, HEAD"));
    }

    /// Finding A28: dotfiles were served. Hidden (404) unless asked for; a fast path that
    /// does not know the setting defers them; `/.well-known/` is always served.
    #[test]
    fn dotfiles_follow_the_setting() {
        let mut s = Store(HashMap::from([
            (".git/config", Lookup::Found(Mem(6))),
            ("sub/.htpasswd", Lookup::Found(Mem(3))),
            (".well-known/security.txt", Lookup::Found(Mem(4))),
            ("a.txt", Lookup::Found(Mem(1))),
        ]));
        let with = |s: &mut Store, dotfiles, target: &str| {
            let a = respond_with(
                s,
                &req(&format!("GET {target} HTTP/1.1\r\n\r\n")),
                &Options { dotfiles },
            );
            match a {
                Answer::Defer => "defer".to_string(),
                a => head(&a)[9..12].to_string(),
            }
        };
        for t in ["/.git/config", "/%2Egit/config", "/sub/.htpasswd", "/.git/"] {
            assert_eq!(with(&mut s, Dotfiles::Hide, t), "404", "{t}");
            assert_eq!(with(&mut s, Dotfiles::Defer, t), "defer", "{t}");
            let r = respond(&mut s, &req(&format!("GET {t} HTTP/1.1\r\n\r\n")));
            assert!(matches!(r, Answer::Defer), "{t}");
        }
        assert_eq!(with(&mut s, Dotfiles::Serve, "/.git/config"), "200");
        assert_eq!(with(&mut s, Dotfiles::Serve, "/sub/.htpasswd"), "200");
        for d in [Dotfiles::Hide, Dotfiles::Serve, Dotfiles::Defer] {
            assert_eq!(with(&mut s, d, "/.well-known/security.txt"), "200");
            assert_eq!(with(&mut s, d, "/a.txt"), "200");
        }
        assert!(is_dotfile("/a/.well-known/x"), "only at the root");
        assert!(!is_dotfile("/a/../b"));
        assert!(!is_dotfile("/a.b/c."));
    }

    /// Every path is a directory.
    struct Dirs;
    impl FileSource for Dirs {
        type File = Mem;
        fn open(&mut self, _: &str) -> Lookup<Mem> {
            Lookup::Directory
        }
    }

    /// Finding A18: the redirect to a directory's slash echoed the raw target, so `GET ///docs`
    /// got `Location: ///docs/`, which a browser reads as the host `docs`. It is built from the
    /// decoded, normalized path, encoded again.
    #[test]
    fn directory_redirects_point_at_the_normalized_path() {
        let location = |target: &str| {
            let a = respond(&mut Dirs, &req(&format!("GET {target} HTTP/1.1\r\n\r\n")));
            let h = head(&a);
            assert!(h.starts_with("HTTP/1.1 301 "), "{h}");
            h.lines()
                .find_map(|l| l.strip_prefix("Location: "))
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(location("/docs"), "/docs/");
        assert_eq!(location("///docs"), "/docs/");
        assert_eq!(location("//evil.example"), "/evil.example/");
        assert_eq!(location("/a//b/./c"), "/a/b/c/");
        assert_eq!(location("/d?x=1"), "/d/?x=1");
        assert_eq!(location("/a%20b"), "/a%20b/");
        assert_eq!(location("/caf%C3%A9"), "/caf%C3%A9/");
        // Decoded control characters never reach the header.
        assert_eq!(
            location("/x%0d%0aSet-Cookie:%20a=b"),
            "/x%0D%0ASet-Cookie:%20a=b/"
        );
        assert_eq!(location("/%2F%2Fevil"), "/evil/");
    }
}
