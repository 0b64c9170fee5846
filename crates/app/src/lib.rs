//! The Split-OS application library.
//!
//! Applications use [`net::TcpListener`] and [`net::TcpStream`] as they would `std::net`'s; the
//! sockets live in the Split-OS TCP server, which does all protocol work on its own cores and
//! talks to this process through shared memory, so reads and writes make no system call.
//!
//! Which server: the process's default [`Session`] connects to `$SPLITOS_SOCKET`, else to
//! `$XDG_RUNTIME_DIR/splitos/tcp.sock`, else `/tmp/splitos-<uid>/tcp.sock` (where
//! `splitos tcp-server` listens by default). With `SPLITOS_EMBEDDED=1`, or after
//! `embedded::start`, the server instead runs as threads inside this process — same code,
//! same shared-memory path, no daemon needed.
//!
//! Features: `embedded` (default) links the TCP server for that mode; without it the library
//! is the client side only. `tokio` adds async sockets, `axum` an `axum::serve` listener.

#[cfg(feature = "embedded")]
pub mod embedded;
mod file_tags;
pub mod net;
pub mod reactor;
mod session;
#[cfg(feature = "tokio")]
pub mod tokio;

pub use session::{Session, SessionOptions};

/// Files through the memory-mapped file server: open a file, read it in place, and pass it to
/// [`net::TcpStream::send_file`].
pub mod files {
    pub use splitos_file_server::client::{ClientConfig, ClientError, FileClient, FileView, Piece};
}
pub use splitos_m2m::WaitPolicy;

use std::io;
use std::sync::{Mutex, OnceLock};

static DEFAULT: OnceLock<Mutex<Option<Session>>> = OnceLock::new();

/// The process-wide session, created on first use.
pub fn default_session() -> io::Result<Session> {
    let cell = DEFAULT.get_or_init(|| Mutex::new(None));
    let mut slot = cell
        .lock()
        .map_err(|_| io::Error::other("default session lock poisoned"))?;
    if let Some(s) = slot.as_ref() {
        return Ok(s.clone());
    }
    let s = if std::env::var_os("SPLITOS_EMBEDDED").is_some_and(|v| v == "1") {
        embedded_session()?
    } else {
        Session::connect(
            splitos_tcp_proto::default_socket_path(),
            SessionOptions::default(),
        )?
    };
    *slot = Some(s.clone());
    Ok(s)
}

#[cfg(feature = "embedded")]
fn embedded_session() -> io::Result<Session> {
    embedded::start(embedded::Options::default())?.session()
}

/// Asked for embedded mode, built without it: say so rather than quietly using a daemon the
/// user did not ask for.
#[cfg(not(feature = "embedded"))]
fn embedded_session() -> io::Result<Session> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "SPLITOS_EMBEDDED=1, but this build of the splitos library has no embedded mode (cargo feature `embedded`)",
    ))
}

/// Makes `session` the default for `TcpListener::bind`/`TcpStream::connect`.
pub fn set_default_session(session: Session) -> io::Result<()> {
    let cell = DEFAULT.get_or_init(|| Mutex::new(None));
    *cell
        .lock()
        .map_err(|_| io::Error::other("default session lock poisoned"))? = Some(session);
    Ok(())
}
