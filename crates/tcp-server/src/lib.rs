//! The Split-OS TCP server: it owns every network socket of its applications and does all
//! protocol work on its own threads, driving the kernel TCP stack through io_uring. Applications
//! reach it over m2m channels (one per session) and never make a network system call.
//!
//! Threads: one *control* thread accepts channels on the Unix socket (handshakes run on short
//! helper threads, so a slow client cannot stall the others) and hands each new session to a
//! *worker* (`worker/`), round-robin. Each worker owns an io_uring, its sessions and all their
//! sockets; nothing on the data path is shared between threads.
//!
//! Run it as a daemon (`splitos tcp-server`) or embedded in an application process with
//! [`TcpServer::start`]; both use the same code.

mod access;
mod budget;
pub mod checkpoint;
pub mod direct;
pub mod migration;
mod persist;
pub mod stats;
pub mod upgrade;
mod uring;
mod worker;

pub use access::{AccessPolicy, Rule};
pub use budget::{Budgets, Limit, LimitSetting, FDS_PER_SESSION, FD_RESERVE, LIMIT_NAMES};
pub use checkpoint::{
    CheckpointConfig, CheckpointError, CheckpointEvent, CheckpointStats, Checkpoints,
};

use rustix::fd::{AsFd, OwnedFd};
use splitos_m2m::{Channel, Listener, ListenerConfig, WaitPolicy};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

// Defined with the protocol, so applications know it without linking the server.
pub use splitos_tcp_proto::default_socket_path;

#[derive(Clone)]
pub struct ServerConfig {
    /// Unix socket applications connect to.
    pub socket: PathBuf,
    /// Permission bits of that socket (0600: only this user's applications).
    pub socket_mode: u32,
    /// Event-loop threads.
    pub threads: usize,
    /// CPUs to pin the event-loop threads to, one each in turn (empty: no pinning).
    pub cpus: Vec<usize>,
    /// How idle event loops wait: `Poll` spins (lowest latency, a core each), `Block` sleeps.
    pub wait: WaitPolicy,
    pub access: AccessPolicy,
    /// How long a dead application's persistent listeners stay open for its successor.
    pub persist_grace: Duration,
    /// What one session, one user and the whole server may make the server hold (sessions,
    /// connections, listeners, ... see [`Budgets`]); the default fits the process's
    /// descriptor limit.
    pub budgets: Budgets,
    /// Receive buffers provided to the kernel per session (taken from its m2m pool).
    pub recv_buffers: usize,
    /// What answers `ServeFiles` routes (the direct path), if anything: the TCP server itself
    /// knows no application protocol. `None`: `ServeFiles` fails with EOPNOTSUPP.
    pub direct: Option<Arc<dyn direct::DirectPath>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            socket: default_socket_path(),
            socket_mode: 0o600,
            threads: 1,
            cpus: Vec::new(),
            wait: WaitPolicy::adaptive(),
            access: AccessPolicy::default_for(rustix::process::getuid().as_raw()),
            persist_grace: Duration::from_secs(30),
            budgets: Budgets::default(),
            recv_buffers: 64,
            direct: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(
        "the budgets need {need} open files (connections, listeners, parked and handed-off \
         connections, file segments, {per_session} per session, {reserve} spare) but the hard \
         limit is {hard}: raise it (e.g. `ulimit -Hn {need}` as root before starting, or \
         LimitNOFILE={need} in a systemd unit) or lower the totals (--limit total.conns=N, ...)"
    )]
    Descriptors {
        need: u64,
        hard: u64,
        per_session: u64,
        reserve: u64,
    },
    /// The socket's directory is missing and cannot be made, or is not safe to use (see
    /// [`splitos_m2m::runtime::socket_dir`]).
    #[error("the socket directory: {0}")]
    SocketDir(#[from] splitos_m2m::runtime::DirError),
    #[error(transparent)]
    Channel(#[from] splitos_m2m::Error),
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: std::io::Error,
    },
}

pub(crate) struct Shared {
    pub config: ServerConfig,
    pub registry: persist::Registry,
    pub shutdown: AtomicBool,
    pub stats: Option<stats::StatsWriter>,
    /// Per-user and total use of every budget.
    pub ledger: budget::Ledger,
    /// Every worker's wake-up eventfd, set once all have started: a connection handed off on
    /// one worker may be adopted by a listener on another.
    pub wakes: std::sync::OnceLock<Vec<Arc<OwnedFd>>>,
    /// Connections asked to leave, and questions about which could (see `migration`).
    pub migration: migration::Board,
    /// The consumer of checkpoints of idle connections, if one is taking them (`checkpoint`).
    pub checkpoints: checkpoint::Switch,
}

impl Shared {
    pub(crate) fn new(config: ServerConfig, stats: Option<stats::StatsWriter>) -> Shared {
        Shared {
            ledger: budget::Ledger::new(&config.budgets, shared_socket(config.socket_mode)),
            config,
            registry: persist::Registry::default(),
            shutdown: AtomicBool::new(false),
            stats,
            wakes: std::sync::OnceLock::new(),
            migration: migration::Board::default(),
            checkpoints: checkpoint::Switch::default(),
        }
    }

    pub(crate) fn wake_all(&self) {
        for w in self.wakes.get().into_iter().flatten() {
            ring_eventfd(w);
        }
    }
}

struct WorkerHandle {
    inbox: Sender<worker::NewSession>,
    wake: Arc<OwnedFd>,
    thread: JoinHandle<()>,
}

/// A running server. Dropping it shuts it down.
pub struct TcpServer {
    shared: Arc<Shared>,
    control: Option<JoinHandle<()>>,
    workers: Vec<WorkerHandle>,
    socket: PathBuf,
}

/// Whether a control socket of this mode lets other users in (then per-user budgets left to
/// the server are a quarter of the totals, see `Limit::user`).
fn shared_socket(mode: u32) -> bool {
    mode & 0o077 != 0
}

/// Raises the soft descriptor limit to `need` (up to the hard limit); an error says how to get
/// more when the hard limit is lower.
fn ensure_descriptors(need: u64) -> Result<(), ServerError> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    let soft = l.current.unwrap_or(u64::MAX);
    let hard = l.maximum.unwrap_or(u64::MAX);
    if soft >= need {
        return Ok(());
    }
    if hard < need {
        return Err(ServerError::Descriptors {
            need,
            hard,
            per_session: budget::FDS_PER_SESSION,
            reserve: budget::FD_RESERVE,
        });
    }
    l.current = Some(need);
    setrlimit(Resource::Nofile, l).map_err(|e| ServerError::Io {
        context: "raising the open-file limit",
        source: e.into(),
    })?;
    tracing::info!(
        from = soft,
        to = need,
        "raised the open-file limit for the budgets"
    );
    Ok(())
}

pub(crate) fn drain_eventfd(fd: &OwnedFd) {
    let mut b = [0u8; 8];
    let _ = rustix::io::read(fd, &mut b);
}

fn ring_eventfd(fd: &OwnedFd) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

impl TcpServer {
    /// Binds the control socket, starts the worker threads, and returns once applications can
    /// connect.
    pub fn start(config: ServerConfig) -> Result<TcpServer, ServerError> {
        if config.threads == 0 || config.threads > stats::MAX_WORKERS {
            return Err(ServerError::Config(format!(
                "threads must be 1..={}, got {}",
                stats::MAX_WORKERS,
                config.threads
            )));
        }
        if config.recv_buffers == 0 || config.recv_buffers > 4096 {
            return Err(ServerError::Config("recv_buffers must be 1..=4096".into()));
        }
        if config.budgets.sessions.total == 0 || config.budgets.conns.total == 0 {
            return Err(ServerError::Config(
                "the session and connection totals must be at least 1".into(),
            ));
        }
        ensure_descriptors(config.budgets.fd_need())?;
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let Some(bad) = config.cpus.iter().find(|&&c| c >= ncpu.max(1024)) {
            return Err(ServerError::Config(format!("cpu {bad} does not exist")));
        }
        // Created private (mode 0700 in the mkdir itself) if missing; this user's default
        // directory is checked like one (owned by this user, no one else may write, not a
        // symbolic link), and any other directory must not let others replace the socket.
        splitos_m2m::runtime::socket_dir(&config.socket)?;
        let listener = Listener::bind(
            &config.socket,
            ListenerConfig {
                mode: config.socket_mode,
                max_ring_bytes: 4 << 20,
                max_buf_size: 1 << 20,
                // 256 x 1 MiB per direction at most: a session cannot make the server map more.
                max_buf_count: 256,
                handshake_timeout: Duration::from_secs(2),
                wait: WaitPolicy::Poll,
            },
        )?;
        listener.set_nonblocking(true)?;
        let stats = match stats::StatsWriter::create(&config.socket, config.threads) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("statistics disabled: cannot create the stats file: {e}");
                None
            }
        };
        let shared = Arc::new(Shared::new(config.clone(), stats));
        let mut workers: Vec<WorkerHandle> = Vec::new();
        for id in 0..config.threads {
            let (tx, rx) = mpsc::channel();
            let wake = rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )
            .map_err(|e| ServerError::Io {
                context: "creating a wake-up eventfd",
                source: e.into(),
            })?;
            let wake = Arc::new(wake);
            let worker_wake = wake
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| ServerError::Io {
                    context: "duplicating an eventfd",
                    source: e,
                })?;
            let cpu = (!config.cpus.is_empty()).then(|| config.cpus[id % config.cpus.len()]);
            // The io_uring is created on its own thread: it is set up single-issuer, which
            // binds it to the creating thread.
            let (ready_tx, ready_rx) = mpsc::channel();
            let worker_shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("splitos-tcp-{id}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        let mut set = rustix::thread::CpuSet::new();
                        set.set(cpu);
                        if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
                            tracing::warn!(cpu, "cannot pin worker: {e}");
                        }
                    }
                    match worker::Worker::new(id, worker_shared, rx, worker_wake) {
                        Ok(mut w) => {
                            let _ = ready_tx.send(Ok(()));
                            w.run();
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|e| ServerError::Io {
                    context: "starting a worker thread",
                    source: e,
                })?;
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = thread.join();
                    shared.shutdown.store(true, Ordering::Release);
                    for w in &workers {
                        ring_eventfd(&w.wake);
                    }
                    return Err(ServerError::Io {
                        context: "creating an io_uring (is it disabled? see /proc/sys/kernel/io_uring_disabled)",
                        source: e,
                    });
                }
                Err(_) => {
                    return Err(ServerError::Config(
                        "a worker thread died while starting".into(),
                    ))
                }
            }
            workers.push(WorkerHandle {
                inbox: tx,
                wake,
                thread,
            });
        }
        let _ = shared
            .wakes
            .set(workers.iter().map(|w| w.wake.clone()).collect());
        let routes: Vec<(Sender<worker::NewSession>, Arc<OwnedFd>)> = workers
            .iter()
            .map(|w| (w.inbox.clone(), w.wake.clone()))
            .collect();
        let ctl_shared = shared.clone();
        let control = std::thread::Builder::new()
            .name("splitos-tcp-ctl".into())
            .spawn(move || control_loop(listener, routes, ctl_shared))
            .map_err(|e| ServerError::Io {
                context: "starting the control thread",
                source: e,
            })?;
        tracing::info!(socket = %config.socket.display(), threads = config.threads, wait = %config.wait, "TCP server running");
        Ok(TcpServer {
            shared,
            control: Some(control),
            workers,
            socket: config.socket,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// A handle for moving connections out of and into this server (see [`migration`]).
    pub fn migration(&self) -> migration::Migration {
        migration::Migration {
            shared: self.shared.clone(),
        }
    }

    /// Starts checkpointing idle connections (see [`checkpoint`]) and returns the stream of
    /// events. Only one consumer exists at a time: a second call while the first handle lives
    /// fails with [`CheckpointError::InUse`]; dropping the handle turns checkpointing off.
    pub fn checkpoints(&self, config: CheckpointConfig) -> Result<Checkpoints, CheckpointError> {
        Checkpoints::start(&self.shared, config)
    }

    /// Persistent listeners currently parked (waiting for their application to come back).
    pub fn parked_listeners(&self) -> usize {
        self.shared.registry.len()
    }

    /// Stops accepting sessions, closes every socket, and joins the threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.control.is_none() && self.workers.is_empty() {
            return; // stopped already (`shutdown`, then drop)
        }
        self.shared.shutdown.store(true, Ordering::Release);
        for w in &self.workers {
            ring_eventfd(&w.wake);
        }
        if let Some(c) = self.control.take() {
            let _ = c.join();
        }
        for w in self.workers.drain(..) {
            let _ = w.thread.join();
        }
        // The files this server made go with it; a killed server's are removed by the next
        // start (the socket is replaced, the statistics file recreated).
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(stats::stats_path(&self.socket));
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Concurrent handshakes; more clients wait in the socket's backlog.
const MAX_HANDSHAKES: usize = 32;

fn control_loop(
    listener: Listener,
    routes: Vec<(Sender<worker::NewSession>, Arc<OwnedFd>)>,
    shared: Arc<Shared>,
) {
    let next = Arc::new(AtomicUsize::new(0));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let routes = Arc::new(routes);
    while !shared.shutdown.load(Ordering::Acquire) {
        let mut fds = [rustix::event::PollFd::new(
            &listener,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        let _ = rustix::event::poll(&mut fds, Some(&ts));
        if handshakes.load(Ordering::Acquire) >= MAX_HANDSHAKES {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let incoming = match listener.accept() {
            Ok(i) => i,
            Err(splitos_m2m::Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::WouldBlock =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!("accepting an application failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peer = incoming.peer();
        // A session is charged from its handshake on (so a burst of connects cannot overshoot),
        // and given back by its worker when its memory goes, or below if it never starts.
        let acct = shared.ledger.account(peer.uid);
        if let Err(over) = shared.ledger.take(&acct, budget::Res::Sessions, 1) {
            let why = match over {
                budget::Over::User => "this user has its maximum number of sessions",
                _ => "the TCP server has its maximum number of sessions",
            };
            tracing::info!(uid = peer.uid, "session refused: {why}");
            let _ = incoming.reject(why);
            continue;
        }
        handshakes.fetch_add(1, Ordering::AcqRel);
        let (routes, next, in_progress) = (routes.clone(), next.clone(), handshakes.clone());
        let hs_shared = shared.clone();
        let hs_acct = acct.clone();
        let spawned = std::thread::Builder::new()
            .name("splitos-tcp-hs".into())
            .spawn(move || {
                let r = incoming.establish();
                in_progress.fetch_sub(1, Ordering::AcqRel);
                let chan: Channel = match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::info!(pid = peer.pid, "handshake with an application failed: {e}");
                        hs_shared.ledger.give(&hs_acct, budget::Res::Sessions, 1);
                        return;
                    }
                };
                let i = next.fetch_add(1, Ordering::Relaxed) % routes.len();
                let (tx, wake) = &routes[i];
                let ns = worker::NewSession {
                    chan,
                    peer,
                    acct: hs_acct,
                };
                match tx.send(ns) {
                    Ok(()) => ring_eventfd(wake),
                    Err(std::sync::mpsc::SendError(ns)) => {
                        hs_shared.ledger.give(&ns.acct, budget::Res::Sessions, 1)
                    }
                }
            });
        if let Err(e) = spawned {
            handshakes.fetch_sub(1, Ordering::AcqRel);
            shared.ledger.give(&acct, budget::Res::Sessions, 1);
            tracing::warn!("cannot start a handshake thread: {e}");
        }
    }
}
