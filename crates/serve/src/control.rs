//! The control socket of a running `splitos serve`: how `splitos reload` asks it for a reload
//! and `splitos upgrade` for an upgrade.
//!
//! One line each way over a Unix socket (mode 0600, so only the user who runs the server can
//! ask): the client writes `reload` or `upgrade`, the supervisor answers `ok: <what happened>`
//! or `error: <why not>` once it is over; a request that comes while another one runs is
//! answered at once with an error. Both ends are here so that they cannot drift.

use std::fmt::Display;
use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

const RELOAD: &str = "reload";
const UPGRADE: &str = "upgrade";
const OK: &str = "ok: ";
const ERROR: &str = "error: ";

/// The control socket of a server listening on `addr`, when it was not given one: in this
/// user's runtime directory ([`splitos_m2m::runtime::user_dir`]), named after the address so
/// that servers on several addresses do not collide.
pub fn default_control_socket(addr: SocketAddr) -> PathBuf {
    splitos_m2m::runtime::user_dir().join(format!("serve-{addr}.sock"))
}

/// Why `splitos reload` or `splitos upgrade` did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Nothing listens on the control socket: no server, or one on another address.
    #[error("no `splitos serve` answers on {} ({source})", path.display())]
    NoServer { path: PathBuf, source: io::Error },
    /// The socket belongs to a process of another user: not this user's server.
    #[error("{} is served by uid {uid}, not by this user or root; refusing to talk to it", path.display())]
    Untrusted { path: PathBuf, uid: u32 },
    #[error(transparent)]
    Io(io::Error),
    #[error("waiting for the outcome: {0}")]
    Wait(io::Error),
    /// The server tried and failed; the running instance stays.
    #[error("{0}")]
    Failed(String),
    #[error("the server closed the control connection without an answer")]
    NoAnswer,
}

/// What a client may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// Replace the HTTP application.
    Reload,
    /// Replace the whole server with the binary now at its path (see `crate::upgrade`).
    Upgrade,
}

impl Ask {
    fn word(self) -> &'static str {
        match self {
            Ask::Reload => RELOAD,
            Ask::Upgrade => UPGRADE,
        }
    }
}

/// Asks the server whose control socket is `path` for a reload and waits up to `limit` for
/// the outcome, which it returns.
pub fn request_reload(path: &Path, limit: Duration) -> Result<String, ReloadError> {
    request(path, Ask::Reload, limit)
}

/// Asks the server whose control socket is `path` for `ask` and waits up to `limit` for the
/// outcome, which it returns.
pub fn request(path: &Path, ask: Ask, limit: Duration) -> Result<String, ReloadError> {
    let mut s = UnixStream::connect(path).map_err(|source| ReloadError::NoServer {
        path: path.to_path_buf(),
        source,
    })?;
    // Whoever could put a socket there must not be able to answer for the server.
    let uid = rustix::net::sockopt::socket_peercred(&s)
        .map_err(|e| ReloadError::Io(e.into()))?
        .uid
        .as_raw();
    if uid != rustix::process::geteuid().as_raw() && uid != 0 {
        return Err(ReloadError::Untrusted {
            path: path.to_path_buf(),
            uid,
        });
    }
    s.set_read_timeout(Some(limit)).map_err(ReloadError::Io)?;
    writeln!(s, "{}", ask.word()).map_err(ReloadError::Io)?;
    let mut line = String::new();
    BufReader::new(&mut s)
        .read_line(&mut line)
        .map_err(ReloadError::Wait)?;
    let line = line.trim();
    match (line.strip_prefix(OK), line.strip_prefix(ERROR)) {
        (Some(m), _) => Ok(m.to_string()),
        (None, Some(e)) => Err(ReloadError::Failed(e.to_string())),
        (None, None) => Err(ReloadError::NoAnswer),
    }
}

/// Why the control socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Its directory is missing and cannot be made, or is not safe to use.
    #[error("the control socket's directory: {0}")]
    Dir(#[from] splitos_m2m::runtime::DirError),
    #[error("another `splitos serve` answers on {} (is one already running on this address?)", .0.display())]
    InUse(PathBuf),
    #[error("binding the control socket {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Io(io::Error),
}

/// The supervisor's end: a non-blocking listener, polled between other work. The socket file
/// goes with it.
pub(crate) struct Control {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Control {
    /// Binds `path`, replacing a stale socket but never a live one.
    pub(crate) fn bind(path: &Path) -> Result<Control, BindError> {
        splitos_m2m::runtime::socket_dir(path)?;
        if UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|source| BindError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        // Only this user may ask for a reload (the socket just made, nothing swapped in).
        splitos_m2m::runtime::set_socket_mode(path, 0o600).map_err(BindError::Io)?;
        listener.set_nonblocking(true).map_err(BindError::Io)?;
        Ok(Control {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// A client's request, if one is waiting; anything else it asked is answered with an
    /// error here. The client waits for [`answer`] on the returned stream.
    pub(crate) fn next_request(&self) -> Option<(Ask, UnixStream)> {
        let (mut s, _) = self.listener.accept().ok()?;
        let _ = s.set_nonblocking(false);
        // A client that connects and says nothing must not stall the supervisor for long.
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut line = String::new();
        let _ = BufReader::new(&mut s).read_line(&mut line);
        match line.trim() {
            RELOAD => return Some((Ask::Reload, s)),
            UPGRADE => return Some((Ask::Upgrade, s)),
            _ => {}
        }
        let _ = writeln!(
            s,
            "{ERROR}unknown command {:?} (expected \"{RELOAD}\" or \"{UPGRADE}\")",
            line.trim()
        );
        None
    }

    /// Answers every waiting request with an error: `busy` (a reload or an upgrade) runs.
    pub(crate) fn refuse_while(&self, busy: &str) {
        while let Some((ask, s)) = self.next_request() {
            tracing::info!(?ask, "refused: {busy} is in progress");
            answer(s, Err::<&str, _>(format!("refused: {busy} is in progress")));
        }
    }
}

/// Tells a waiting client the outcome of its reload.
pub(crate) fn answer(mut s: UnixStream, outcome: Result<impl Display, impl Display>) {
    let _ = match outcome {
        Ok(m) => writeln!(s, "{OK}{m}"),
        Err(e) => writeln!(s, "{ERROR}{e}"),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "splitos-serve-control-{}-{name}",
            std::process::id()
        ))
    }

    #[test]
    fn default_socket_is_named_after_the_address() {
        let p = default_control_socket(SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(
            p.file_name().and_then(|n| n.to_str()),
            Some("serve-127.0.0.1:8080.sock")
        );
        assert_eq!(p.parent(), Some(splitos_m2m::runtime::user_dir().as_path()));
    }

    /// Runs one exchange: the supervisor side answers `outcome` to a reload request.
    fn exchange(
        name: &str,
        outcome: Result<&'static str, &'static str>,
    ) -> Result<String, ReloadError> {
        let path = temp(name);
        let control = Control::bind(&path).expect("bind");
        let server = std::thread::spawn(move || loop {
            if let Some((_, s)) = control.next_request() {
                answer(s, outcome);
                return control;
            }
            std::thread::sleep(Duration::from_millis(5));
        });
        let r = request_reload(&path, Duration::from_secs(10));
        let control = server.join().expect("server thread");
        // A live server's socket is never taken over.
        assert!(matches!(Control::bind(&path), Err(BindError::InUse(_))));
        drop(control);
        assert!(!path.exists(), "the socket file goes with the listener");
        r
    }

    #[test]
    fn a_reload_request_gets_the_outcome() {
        assert_eq!(
            exchange("ok", Ok("reloaded: generation 2")).ok(),
            Some("reloaded: generation 2".to_string())
        );
        match exchange("err", Err("the new instance exited")) {
            Err(ReloadError::Failed(m)) => assert_eq!(m, "the new instance exited"),
            other => panic!("{other:?}"),
        }
    }

    /// A control socket of another user's process is not asked anything (root only: the
    /// impostor runs as nobody; skipped otherwise).
    #[test]
    fn another_users_socket_is_refused() {
        use std::os::unix::process::CommandExt;
        let python = Path::new("/usr/bin/python3");
        if !rustix::process::geteuid().is_root() || !python.exists() {
            return;
        }
        let path = temp("foreign");
        let _ = std::fs::remove_file(&path);
        let mut impostor = std::process::Command::new(python)
            .args([
                "-c",
                "import socket,sys,time\ns=socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen(8)\ntime.sleep(30)\n",
            ])
            .arg(&path)
            .uid(65534)
            .gid(65534)
            .spawn()
            .expect("python3 as nobody");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !path.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let r = request_reload(&path, Duration::from_secs(2));
        let _ = impostor.kill();
        let _ = impostor.wait();
        let _ = std::fs::remove_file(&path);
        assert!(
            matches!(r, Err(ReloadError::Untrusted { uid: 65534, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn nobody_listening_and_unknown_commands_are_told_apart() {
        let path = temp("none");
        assert!(matches!(
            request_reload(&path, Duration::from_secs(1)),
            Err(ReloadError::NoServer { .. })
        ));
        // A stale socket file (its server died) is replaced.
        let stale = UnixListener::bind(&path).expect("stale socket");
        drop(stale);
        let control = Control::bind(&path).expect("bind over a stale socket");
        let mut c = UnixStream::connect(&path).expect("connect");
        writeln!(c, "restart").expect("write");
        // The connection and its line are already queued: one look answers it.
        assert!(control.next_request().is_none());
        let mut line = String::new();
        BufReader::new(&mut c).read_line(&mut line).expect("read");
        assert_eq!(
            line,
            "error: unknown command \"restart\" (expected \"reload\" or \"upgrade\")\n"
        );
        // While one request runs, others are refused at once.
        let mut c = UnixStream::connect(&path).expect("connect");
        writeln!(c, "upgrade").expect("write");
        control.refuse_while("an upgrade");
        let mut line = String::new();
        BufReader::new(&mut c).read_line(&mut line).expect("read");
        assert_eq!(line, "error: refused: an upgrade is in progress\n");
        drop(control);
        let _ = std::fs::remove_file(&path);
    }
}
