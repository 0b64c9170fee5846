//! Embedded mode: the TCP server runs as threads of this process, reached over a private Unix
//! socket with the same m2m channels a daemon would use — for tests, quick starts, and machines
//! where a daemon is unwanted.

use crate::{Session, SessionOptions};
use splitos_m2m::WaitPolicy;
use splitos_tcp_server::{ServerConfig, TcpServer};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

#[derive(Clone, Debug)]
pub struct Options {
    /// TCP server event-loop threads.
    pub threads: usize,
    pub wait: WaitPolicy,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            threads: 1,
            wait: WaitPolicy::adaptive(),
        }
    }
}

/// A TCP server running inside this process. It stops when the last `Embedded` is dropped
/// and every session opened from it is gone.
#[derive(Clone)]
pub struct Embedded {
    server: Arc<TcpServer>,
    wait: WaitPolicy,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);
/// Embedded servers' socket names start with this, then the process id.
const PREFIX: &str = "embedded-";
static PROCESS_SERVER: OnceLock<Embedded> = OnceLock::new();

/// Starts an embedded server (the first call per process; later calls return the same one).
pub fn start(options: Options) -> io::Result<Embedded> {
    if let Some(e) = PROCESS_SERVER.get() {
        return Ok(e.clone());
    }
    let e = start_new(options)?;
    Ok(PROCESS_SERVER.get_or_init(|| e).clone())
}

/// Starts a separate embedded server (tests that need several).
///
/// Its socket (and statistics file beside it) is `embedded-<pid>-<n>.sock` in this user's
/// runtime directory ([`splitos_m2m::runtime::user_dir`], checked before use). A process
/// that ends without dropping its server — a `static` one is never dropped, and a killed
/// process drops nothing — leaves them behind; each start removes those of processes that
/// are gone (and those an older version left directly in `/tmp`).
pub fn start_new(options: Options) -> io::Result<Embedded> {
    use splitos_m2m::runtime;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = runtime::user_dir();
    runtime::private_dir(&dir)
        .map_err(|e| io::Error::other(format!("starting the embedded TCP server: {e}")))?;
    runtime::remove_dead(&dir, PREFIX);
    runtime::remove_dead(&std::env::temp_dir(), "splitos-embedded-");
    let socket = dir.join(format!("{PREFIX}{}-{n}.sock", std::process::id()));
    let server = TcpServer::start(ServerConfig {
        socket,
        threads: options.threads,
        wait: options.wait,
        ..ServerConfig::default()
    })
    .map_err(|e| io::Error::other(format!("starting the embedded TCP server: {e}")))?;
    Ok(Embedded {
        server: Arc::new(server),
        wait: options.wait,
    })
}

impl Embedded {
    /// A new session with this server.
    pub fn session(&self) -> io::Result<Session> {
        Session::connect(
            self.server.socket_path(),
            SessionOptions {
                wait: self.wait,
                ..SessionOptions::default()
            },
        )
    }

    pub fn socket_path(&self) -> PathBuf {
        self.server.socket_path().to_path_buf()
    }
}
