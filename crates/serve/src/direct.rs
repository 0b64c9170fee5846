//! The direct path of `splitos serve`: static-file requests answered inside the TCP server from
//! the file server's cache, without waking the HTTP application.
//!
//! This is the TCP server's [`DirectPath`] implemented for HTTP/1.1 and the file cache. A
//! route parses a connection's requests with the same connection loop
//! (`splitos_http::conn`, role `FastPath`) and responder the application uses, and answers
//! each from the cache as a head plus ranges of sealed segments. What the cache cannot answer
//! at once (a miss, a directory, a body, a parse error, a sibling whose existence the cache
//! does not know) is deferred: the connection goes to the application with every byte from
//! that request on.

use splitos_file_server::client::{
    lookup_of, ClientConfig, ClientError, FileClient, FileView, Piece,
};
use splitos_http::conn::{self, Budget, Policy, Role, Timeouts};
use splitos_http::request::Limits;
use splitos_http::respond::{self, Answer, FileSource, Lookup, Part};
use splitos_tcp_server::direct::{
    DirectConn, DirectPart, DirectPath, DirectRoute, Expiry, Outcome, RouteRequest,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Instant;

use rustix::io::Errno;
use std::time::Duration;

/// How long a route waits for the file server before it defers a request to the application:
/// the wait happens on a TCP-server worker, which serves everyone else meanwhile only after it.
pub const FILE_SERVER_WAIT: Duration = Duration::from_millis(100);

/// Routes that answer from a file server's cache (`ServeFiles { socket }` names its socket).
pub struct StaticFiles;

impl DirectPath for StaticFiles {
    fn open(&self, request: &RouteRequest) -> Result<Box<dyn DirectRoute>, Errno> {
        let path = Path::new(OsStr::from_bytes(&request.source));
        // Relative to what? The TCP server's working directory is no business of a tenant's.
        if !path.is_absolute() {
            return Err(Errno::INVAL);
        }
        let config = ClientConfig {
            reply_timeout: FILE_SERVER_WAIT,
            ..ClientConfig::default()
        };
        let files = FileClient::connect_with(path, config).map_err(|e| {
            tracing::warn!(path = %path.display(), "ServeFiles: cannot reach the file server: {e}");
            Errno::CONNREFUSED
        })?;
        // Who answered, from the kernel, not who owns the socket file: a path swapped after a
        // check cannot point this server at another user's files. The file server must run as
        // the application's user, or as this server's.
        let owner = files
            .server_credentials()
            .map_err(|_| Errno::CONNREFUSED)?
            .uid;
        if owner != request.peer.uid && owner != rustix::process::geteuid().as_raw() {
            tracing::warn!(
                path = %path.display(),
                owner,
                uid = request.peer.uid,
                "ServeFiles refused: the file server belongs to another user"
            );
            return Err(Errno::ACCESS);
        }
        Ok(Box::new(FilesRoute {
            files,
            policy: Policy {
                limits: Limits::default(),
                role: Role::FastPath,
                timeouts: Timeouts {
                    header: request.request_timeout,
                    idle: request.idle_timeout,
                },
            },
        }))
    }
}

/// One worker's route: a reader of the file server's cache and the connection policy.
struct FilesRoute {
    files: FileClient,
    policy: Policy,
}

/// The cache as the responder sees it: what is not cached is `Unavailable`, so a miss costs no
/// wait on the disk (a cached file whose segment this reader does not map yet costs one round
/// trip to the file server). Anything that is not a definite answer about the file (a slow or
/// dead file server, a reply out of step) is `Unavailable` too: the application decides.
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
            Err(_) => Lookup::Unavailable,
        }
    }
}

/// The response's file ranges as pieces of mapped segments, if every one is: a range whose
/// chunk cannot be fetched now, or a file passed by reference (a large one, whose `sendfile`
/// could wait on the disk inside the worker), goes to the application instead — before any
/// byte of the response is queued, so the connection stays in step.
fn mapped_parts(parts: &[Part<FileView>]) -> Option<()> {
    for part in parts {
        if let Part::File(view, offset, len) = part {
            let pieces = view.ranges(*offset, *len).ok()?;
            if pieces.iter().any(|p| matches!(p, Piece::Plain { .. })) {
                return None;
            }
        }
    }
    Some(())
}

impl DirectRoute for FilesRoute {
    fn serve(
        &mut self,
        d: &mut DirectConn,
        room: usize,
        answered: &mut u64,
        push: &mut dyn FnMut(DirectPart),
    ) -> Outcome {
        // The TCP server keeps the bytes; they are lent to a `conn::Conn` for the call (two
        // moves, no copy).
        let mut c = conn::Conn::from_parts(std::mem::take(&mut d.pending), d.last_active);
        let files = &mut self.files;
        let outcome = conn::serve(
            &mut c,
            &self.policy,
            Budget::parts(room),
            |req| match respond::respond(&mut Cached(files), req) {
                Answer::Response(r) => {
                    mapped_parts(&r.parts)?;
                    *answered += 1;
                    Some(r)
                }
                // A directory (listing or 404 is the application's call) or not cached.
                Answer::NoIndex { .. } | Answer::Defer => None,
            },
            |r| {
                for part in r.parts {
                    match part {
                        Part::Bytes(b) => push(DirectPart::Bytes(b)),
                        Part::File(view, offset, len) => {
                            // Resolved (and fetched) by `mapped_parts` already.
                            for piece in view.ranges(offset, len).unwrap_or_default() {
                                if let Piece::Mapped { seg, offset, len } = piece {
                                    push(DirectPart::File {
                                        segment: seg,
                                        offset,
                                        len,
                                    });
                                }
                            }
                        }
                    }
                }
            },
        );
        d.pending = c.into_buffer();
        match outcome {
            conn::Outcome::Wait => Outcome::More,
            conn::Outcome::Budget => Outcome::Blocked,
            conn::Outcome::Close(_) => Outcome::Close,
            conn::Outcome::HandOver(bytes) => Outcome::Defer(bytes),
        }
    }

    fn expired(&self, d: &DirectConn, now: Instant) -> Option<Expiry> {
        let t = &self.policy.timeouts;
        match d.pending_since {
            // A deadline from the request's first byte: trickling bytes do not extend it.
            Some(since) if now.saturating_duration_since(since) > t.header => Some(Expiry::Request),
            None if now.saturating_duration_since(d.last_active) > t.idle => Some(Expiry::Idle),
            _ => None,
        }
    }

    fn timeout_response(&self) -> Vec<u8> {
        match conn::request_timeout::<FileView>().parts.into_iter().next() {
            Some(Part::Bytes(b)) => b,
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use splitos_file_server::server::{FileServer, FileServerConfig};
    use splitos_tcp_server::direct::SENDQ_LIMIT;
    use std::time::Duration;

    /// A file server over a directory holding `hot.txt` (cached) and `cold.txt` (not yet), and
    /// a route on it, opened as the TCP server opens one.
    fn route(tag: &str) -> (FileServer, Box<dyn DirectRoute>, std::path::PathBuf) {
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
        let mut warm = FileClient::connect(dir.join("files.sock")).expect("file client");
        warm.open("hot.txt").expect("hot.txt");
        let route = StaticFiles
            .open(&request(dir.join("files.sock").as_os_str().as_bytes()))
            .expect("route");
        (server, route, dir)
    }

    fn request(source: &[u8]) -> RouteRequest {
        RouteRequest {
            source: source.to_vec(),
            peer: this_process(),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }

    fn this_process() -> splitos_m2m::PeerCredentials {
        splitos_m2m::PeerCredentials {
            pid: std::process::id(),
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
        }
    }

    fn get(target: &str) -> String {
        format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n")
    }

    fn conn(bytes: &[u8]) -> DirectConn {
        let mut c = DirectConn::new(Instant::now());
        c.received(bytes.len(), Instant::now(), |d| d.copy_from_slice(bytes));
        c
    }

    #[test]
    fn cached_files_are_answered_and_the_first_miss_defers_everything_after_it() {
        let (server, mut route, dir) = route("defer");
        let mut d = conn(
            (get("/hot.txt") + &get("/hot.txt") + &get("/cold.txt") + &get("/hot.txt")).as_bytes(),
        );
        let (mut parts, mut answered) = (Vec::new(), 0);
        let out = route.serve(&mut d, SENDQ_LIMIT, &mut answered, &mut |p| parts.push(p));
        assert_eq!(answered, 2);
        // Each response is a head and the file's range.
        assert!(matches!(
            parts.as_slice(),
            [
                DirectPart::Bytes(_),
                DirectPart::File {
                    offset: 0,
                    len: 4,
                    ..
                },
                DirectPart::Bytes(_),
                DirectPart::File {
                    offset: 0,
                    len: 4,
                    ..
                }
            ]
        ));
        assert_eq!(
            out,
            Outcome::Defer((get("/cold.txt") + &get("/hot.txt")).into_bytes())
        );
        assert!(d.pending.is_empty());
        server.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_send_queue_blocks_reading_and_a_partial_head_waits() {
        let (server, mut route, dir) = route("blocked");
        let mut d = conn((get("/hot.txt") + &get("/hot.txt") + "GET /hot").as_bytes());
        let mut answered = 0;
        // Room for one response (two parts) only.
        let out = route.serve(&mut d, 2, &mut answered, &mut |_| {});
        assert_eq!((out, answered), (Outcome::Blocked, 1));
        let out = route.serve(&mut d, SENDQ_LIMIT, &mut answered, &mut |_| {});
        assert_eq!(out, Outcome::More);
        assert_eq!((answered, d.pending.as_slice()), (2, &b"GET /hot"[..]));
        d.pending
            .extend_from_slice(b".txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let out = route.serve(&mut d, SENDQ_LIMIT, &mut answered, &mut |_| {});
        assert_eq!(out, Outcome::Close);
        assert_eq!(
            route.timeout_response().get(..13),
            Some(&b"HTTP/1.1 408 "[..])
        );
        server.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_request_has_a_deadline_from_its_first_byte_and_idle_connections_expire() {
        let (server, route, dir) = route("deadline");
        let t0 = Instant::now();
        let mut d = DirectConn::new(t0);
        assert_eq!(route.expired(&d, t0 + Duration::from_secs(59)), None);
        assert_eq!(
            route.expired(&d, t0 + Duration::from_secs(61)),
            Some(Expiry::Idle)
        );
        d.received(1, t0, |b| b[0] = b'G');
        // A byte every few seconds keeps it active, but not past the request's deadline.
        d.received(1, t0 + Duration::from_secs(8), |b| b[0] = b'E');
        assert_eq!(route.expired(&d, t0 + Duration::from_secs(9)), None);
        assert_eq!(
            route.expired(&d, t0 + Duration::from_secs(11)),
            Some(Expiry::Request)
        );
        server.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn routes_need_an_absolute_socket_of_a_reachable_file_server() {
        assert_eq!(
            StaticFiles.open(&request(b"files.sock")).err(),
            Some(Errno::INVAL)
        );
        assert_eq!(
            StaticFiles
                .open(&request(b"/nonexistent/splitos/files.sock"))
                .err(),
            Some(Errno::CONNREFUSED)
        );
    }
}
