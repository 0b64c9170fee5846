//! The supervisor of `splitos serve DIR`: the servers as threads, the HTTP application as a
//! child process, and reloads.
//!
//! It runs the TCP server and the file server as threads (same code and shared-memory paths as
//! the daemons) and starts the HTTP application ([`crate::app`]) as a child process, which
//! reaches both servers through shared memory. Because the servers, not the application, own
//! the sockets and the file cache, the application can be replaced while they keep every
//! connection:
//!
//! 1. a new instance starts and connects (reports [`READY`]);
//! 2. the old one is told to drain (SIGUSR2): it parks its persistent listener in the TCP
//!    server, pauses each connection and hands it off with its unprocessed bytes, then exits;
//! 3. the new one takes over the listener (retrying while the old one still holds it), reports
//!    [`LISTENING`], and adopts every handed-off connection.
//!
//! A reload is asked for by the caller's `reload` flag (SIGHUP, in the `splitos` command) or
//! over the [`control`] socket. An instance that dies is restarted; the
//! persistent listener keeps queueing connections meanwhile.
//!
//! An upgrade (the caller's `upgrade` flag, SIGUSR2 in the `splitos` command, or the control
//! socket) replaces this whole process by a new binary; see [`crate::upgrade`]. A supervisor
//! started with [`ServeConfig::upgrade_from`] is that new process: it takes its listener and
//! connections from the old one instead of listening itself.

use crate::app::{AppConfig, LISTENING, READY};
use crate::control::{self, default_control_socket, Ask, BindError, Control};
use crate::rundir::{AppCounters, FileCounters, ServeDir, Status};
use crate::upgrade::{self, Incoming, UpgradeCommand, UpgradeError, Upgraded};
use splitos::WaitPolicy;
use splitos_file_server::server::{FileServer, FileServerConfig};
use splitos_m2m::runtime::DirError;
use splitos_tcp_server::{ServerConfig, TcpServer};
use std::ffi::OsString;
use std::io;
use std::net::{AddrParseError, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a new instance may take to start, and to take over the listener.
const START_LIMIT: Duration = Duration::from_secs(20);
/// How long an old instance may take to hand off its connections and exit.
const EXIT_LIMIT: Duration = Duration::from_secs(40);
/// The longest a reload can take: a new instance starting and taking over, the old one
/// leaving. A client asking for one waits that long for the answer.
pub const RELOAD_LIMIT: Duration =
    Duration::from_secs(2 * START_LIMIT.as_secs() + EXIT_LIMIT.as_secs());
/// How often the status file is rewritten.
const STATUS_EVERY: Duration = Duration::from_millis(500);
/// Instances that die this soon after starting count as failing to start; after
/// [`MAX_QUICK_DEATHS`] in a row, the supervisor gives up instead of restarting forever.
const QUICK_DEATH: Duration = Duration::from_secs(2);
const MAX_QUICK_DEATHS: u32 = 5;

/// What to serve, and how.
#[derive(Clone)]
pub struct ServeConfig {
    /// The directory to serve.
    pub dir: PathBuf,
    pub listen: SocketAddr,
    /// TCP server event-loop threads.
    pub threads: usize,
    /// Most bytes of file contents the file server keeps in memory.
    pub cache_size: u64,
    /// The HTTP application's settings that pass through unchanged.
    pub access_log: Option<PathBuf>,
    pub max_conns: usize,
    pub header_timeout: u64,
    pub idle_timeout: u64,
    pub list_dirs: bool,
    pub no_direct: bool,
    /// Serve dotfiles (names starting with `.`); by default they are not found.
    pub dotfiles: bool,
    /// How the TCP server and the HTTP application wait.
    pub wait: WaitPolicy,
    /// The control socket; by default [`default_control_socket`] of the address bound.
    pub control_socket: Option<PathBuf>,
    /// How to start an instance of the HTTP application.
    pub app: AppCommand,
    /// The node link for live migration between nodes (`splitos_migrate`), if any.
    pub link: Option<splitos_migrate::LinkConfig>,
    /// Started beside the TCP server (the failover agent), if any.
    pub agent: Option<crate::agent::AgentStart>,
    /// How to start a new binary for an upgrade (`None`: upgrades are refused).
    pub upgrade: Option<UpgradeCommand>,
    /// Take over from the old process whose hand-over socket this is (see [`crate::upgrade`]).
    pub upgrade_from: Option<PathBuf>,
}

/// How to start an instance of the HTTP application: a program that parses the arguments of
/// [`AppConfig::to_args`] (after `args`) and runs [`crate::app::run`], with its reports on
/// stdout and SIGUSR2 as its drain flag.
#[derive(Clone, Debug)]
pub struct AppCommand {
    /// `None`: this executable, as `std::env::current_exe` says at each start.
    pub program: Option<PathBuf>,
    /// Arguments before the configuration's (for the `splitos` command, its subcommand).
    pub args: Vec<OsString>,
}

/// Why the supervisor could not start, or gave up.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot serve {}: {source}", dir.display())]
    CannotServe { dir: PathBuf, source: io::Error },
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The runtime directory is not safe to use, or cannot be made.
    #[error("runtime directory: {0}")]
    RuntimeDir(#[from] DirError),
    #[error(transparent)]
    TcpServer(#[from] splitos_tcp_server::ServerError),
    #[error(transparent)]
    Link(#[from] splitos_migrate::LinkError),
    #[error(transparent)]
    FileServer(#[from] splitos_file_server::server::ServerError),
    #[error(transparent)]
    Control(#[from] BindError),
    #[error("finding this executable: {0}")]
    FindExecutable(io::Error),
    #[error("starting the HTTP application: {0}")]
    Spawn(io::Error),
    #[error("the HTTP application has no stdout")]
    NoStdout,
    #[error("the HTTP application exited ({0})")]
    Exited(ExitStatus),
    #[error("the HTTP application did not report {report:?} within {limit:?}")]
    Silent {
        report: &'static str,
        limit: Duration,
    },
    #[error("the HTTP application reported a bad address: {0}")]
    BadAddress(AddrParseError),
    #[error("the HTTP application keeps dying right after starting ({0}); giving up")]
    KeepsDying(ExitStatus),
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
    #[error("this server was not given a way to start a new binary; it cannot upgrade")]
    CannotUpgrade,
    #[error(
        "a node with failover (--etcd) cannot be upgraded in place yet: drain it \
         (`splitos drain`), restart it with the new binary, and let it rejoin"
    )]
    UpgradeWithFailover,
    #[error("the failover agent: {0}")]
    Agent(String),
    #[error(transparent)]
    Io(io::Error),
}

/// A reload that happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reloaded {
    /// Instances started so far, this one included.
    pub generation: u64,
    pub pid: u32,
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "reloaded: generation {}, HTTP application pid {}",
            self.generation, self.pid
        )
    }
}

/// What the supervisor tells its caller while it runs (the caller decides who reads it).
#[derive(Debug)]
pub enum Notice<'a> {
    /// The first instance serves on `addr` (port 0 resolved).
    Serving {
        addr: SocketAddr,
    },
    /// This process took over from an old one (an upgrade): it serves on `addr` with the
    /// connections it was given.
    TookOver {
        addr: SocketAddr,
        connections: u64,
    },
    /// This process handed everything to a new one, and stops.
    Upgraded(&'a Upgraded),
    /// An upgrade failed; this process serves on.
    UpgradeFailed(&'a ServeError),
    Reloaded(Reloaded),
    /// A reload failed; the running instance stays.
    ReloadFailed(&'a ServeError),
    /// The instance exited on its own; a new one is starting.
    Restarting(ExitStatus),
    /// The new instance did not report as it should; it is kept (and restarted if it died).
    RestartFailed(&'a ServeError),
    ShuttingDown,
}

/// The canonical root to serve: `dir`, which must be a directory.
pub fn served_root(dir: &Path) -> Result<PathBuf, ServeError> {
    let cannot = |source| ServeError::CannotServe {
        dir: dir.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(dir).map_err(cannot)?;
    if !meta.is_dir() {
        return Err(ServeError::NotADirectory(dir.to_path_buf()));
    }
    dir.canonicalize().map_err(cannot)
}

mod instance;
use instance::add;
pub(crate) use instance::Instance;

/// The servers and the first application instance, started.
struct Started {
    rundir: ServeDir,
    tcp: TcpServer,
    link: Option<splitos_migrate::NodeLink>,
    agent: Option<Box<dyn crate::agent::NodeAgent>>,
    files: FileServer,
    base: AppConfig,
    app: Instance,
    /// The address the application listens on.
    local: SocketAddr,
}

/// Starts the servers and the first application instance; with `incoming`, on the listeners
/// of the process being upgraded.
fn start(
    config: &ServeConfig,
    root: PathBuf,
    incoming: Option<&mut Incoming>,
) -> Result<Started, ServeError> {
    let rundir = ServeDir::create()?;
    let private = rundir.path().to_path_buf();
    let tcp = TcpServer::start(ServerConfig {
        socket: private.join("tcp.sock"),
        threads: config.threads,
        wait: config.wait,
        direct: Some(std::sync::Arc::new(crate::direct::StaticFiles)),
        ..ServerConfig::default()
    })?;
    // Connections moved here from another node are adopted by the application's persistent
    // listener like handed-off ones; the link stops before the TCP server does.
    let link = match config.link.clone() {
        Some(cfg) => Some(splitos_migrate::NodeLink::start(cfg, tcp.migration())?),
        None => None,
    };
    let agent = match &config.agent {
        Some(start) => Some(start(&tcp).map_err(ServeError::Agent)?),
        None => None,
    };
    let mut fcfg = FileServerConfig::new(root.clone(), private.join("files.sock"));
    fcfg.cache_bytes = config.cache_size;
    let files = FileServer::start(fcfg)?;
    let mut base = AppConfig {
        root,
        tcp_socket: tcp.socket_path().to_path_buf(),
        files_socket: private.join("files.sock"),
        listen: config.listen,
        access_log: config.access_log.clone(),
        max_conns: config.max_conns,
        header_timeout: config.header_timeout,
        idle_timeout: config.idle_timeout,
        wait: config.wait,
        list_dirs: config.list_dirs,
        no_direct: config.no_direct,
        dotfiles: config.dotfiles,
        takeover: false,
    };
    if let Some(i) = incoming {
        // The old process's listener, parked here: the application's listen takes it over.
        base.listen = i.adopt(&tcp.migration())?;
    }
    let mut app = Instance::spawn(&config.app, &base, false)?;
    let reported = app
        .wait_for_report(READY, START_LIMIT)
        .and_then(|_| app.wait_for_report(LISTENING, START_LIMIT))
        .and_then(|l| l.parse::<SocketAddr>().map_err(ServeError::BadAddress));
    let local = match reported {
        Ok(l) => l,
        Err(e) => {
            let _ = app.child.kill();
            let _ = app.child.wait();
            return Err(e);
        }
    };
    // Later instances listen on the address actually bound (port 0 means "any" only once).
    base.listen = local;
    Ok(Started {
        rundir,
        tcp,
        link,
        agent,
        files,
        base,
        app,
        local,
    })
}

/// Binds the control socket. After an upgrade the old process may still be giving it up:
/// a little patience, and serving without one is better than not serving.
fn bind_control(path: &Path, upgraded: bool) -> Result<Option<Control>, ServeError> {
    if !upgraded {
        return Ok(Some(Control::bind(path)?));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Control::bind(path) {
            Ok(c) => return Ok(Some(c)),
            Err(BindError::InUse(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                tracing::error!("serving without a control socket (`splitos reload` and `splitos upgrade` will not find this server; signals still work): {e}");
                return Ok(None);
            }
        }
    }
}

/// Serves `config.dir` until `stop`; `reload` and `upgrade` (which it clears) ask for a reload
/// or an upgrade, as the control socket does. `notify` hears what happens meanwhile.
pub fn run(
    config: ServeConfig,
    stop: &AtomicBool,
    reload: &AtomicBool,
    upgrade: &AtomicBool,
    mut notify: impl FnMut(Notice),
) -> Result<(), ServeError> {
    let root = served_root(&config.dir)?;
    // The new process of an upgrade: the old one's listeners first; a failure from here until
    // the application listens is told to the old one, which then serves on.
    let mut incoming = match &config.upgrade_from {
        Some(p) => Some(Incoming::connect(p)?),
        None => None,
    };
    let Started {
        rundir,
        tcp,
        link,
        agent,
        files,
        base,
        mut app,
        local,
    } = match start(&config, root.clone(), incoming.as_mut()) {
        Ok(s) => s,
        Err(e) => {
            if let Some(i) = &incoming {
                i.fail(&e.to_string());
            }
            return Err(e);
        }
    };
    // From here this process serves, whatever becomes of the hand-over.
    let took_over = incoming.map(|i| {
        i.receive(&tcp.migration()).unwrap_or_else(|e| {
            tracing::error!("upgrade: the hand-over ended early (connections not yet sent stay with the old process): {e}");
            0
        })
    });
    let control_path = config
        .control_socket
        .clone()
        .unwrap_or_else(|| default_control_socket(local));
    let mut control = bind_control(&control_path, took_over.is_some())?;
    let mut status = Status {
        pid: std::process::id(),
        listen: local.to_string(),
        root,
        tcp_socket: tcp.socket_path().to_path_buf(),
        control_socket: control_path,
        generation: 1,
        direct: !config.no_direct && config.access_log.is_none(),
        max_conns: config.max_conns,
        cache_limit: config.cache_size,
        ..Status::default()
    };
    // Counters of instances that are gone.
    let mut retired = AppCounters::default();
    let mut next_status = Instant::now();
    let mut status_failed = false;
    match took_over {
        Some(connections) => notify(Notice::TookOver {
            addr: local,
            connections,
        }),
        None => notify(Notice::Serving { addr: local }),
    }
    let mut generation = 1u64;
    let mut quick_deaths = 0u32;
    let mut upgraded = false;
    let mut fatal = None;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        if let Some(why) = agent.as_ref().and_then(|a| a.fatal()) {
            fatal = Some(why);
            break;
        }
        app.read_reports();
        if Instant::now() >= next_status {
            next_status = Instant::now() + STATUS_EVERY;
            let fs = files.stats();
            let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            status.files = FileCounters {
                requests: get(&fs.requests),
                hits: get(&fs.hits),
                misses: get(&fs.misses),
                evictions: get(&fs.evictions),
                cached_bytes: get(&fs.cached_bytes),
            };
            status.app = add(retired, app.counters);
            status.generation = generation;
            status.app_pid = app.child.id();
            status.updated_unix_ms = splitos_tcp_server::stats::unix_ms();
            status.failover = agent.as_ref().map(|a| a.status());
            if let Err(e) = rundir.write_status(&status) {
                if !std::mem::replace(&mut status_failed, true) {
                    tracing::warn!("cannot write the status file (splitos status will not find this server): {e}");
                }
            }
        }
        let (ask, client) = match control.as_ref().and_then(Control::next_request) {
            Some((a, c)) => (Some(a), Some(c)),
            None if upgrade.swap(false, Ordering::Relaxed) => (Some(Ask::Upgrade), None),
            None if reload.swap(false, Ordering::Relaxed) => (Some(Ask::Reload), None),
            None => (None, None),
        };
        if ask == Some(Ask::Upgrade) {
            let outcome = match &config.upgrade {
                None => Err(ServeError::CannotUpgrade),
                // A new process would register the node again while this one still holds
                // its lease, and its connections would be adopted meanwhile.
                Some(_) if agent.is_some() => Err(ServeError::UpgradeWithFailover),
                Some(command) => upgrade::hand_over(
                    upgrade::Outgoing {
                        command,
                        dir: rundir.path(),
                        migration: tcp.migration(),
                        control: &mut control,
                    },
                    &mut app,
                )
                .map_err(ServeError::from),
            };
            match &outcome {
                Ok(u) => notify(Notice::Upgraded(u)),
                Err(e) => notify(Notice::UpgradeFailed(e)),
            }
            if let Some(c) = client {
                control::answer(c, outcome.as_ref());
            }
            if outcome.is_ok() {
                upgraded = true;
                break;
            }
            continue;
        }
        if ask == Some(Ask::Reload) {
            let before = app.counters;
            let mut busy = || {
                if let Some(c) = &control {
                    c.refuse_while("a reload");
                }
            };
            let outcome = match reload_app(&config.app, &base, app, &mut busy) {
                Ok(new) => {
                    retired = add(retired, before);
                    generation += 1;
                    let r = Reloaded {
                        generation,
                        pid: new.child.id(),
                    };
                    app = new;
                    Ok(r)
                }
                Err((old, e)) => {
                    app = old;
                    Err(e)
                }
            };
            match &outcome {
                Ok(r) => notify(Notice::Reloaded(*r)),
                Err(e) => notify(Notice::ReloadFailed(e)),
            }
            if let Some(s) = client {
                control::answer(s, outcome.as_ref());
            }
            continue;
        }
        if let Ok(Some(st)) = app.child.try_wait() {
            if app.started.elapsed() < QUICK_DEATH {
                quick_deaths += 1;
            } else {
                quick_deaths = 0;
            }
            if quick_deaths >= MAX_QUICK_DEATHS {
                return Err(ServeError::KeepsDying(st));
            }
            notify(Notice::Restarting(st));
            app.read_reports();
            retired = add(retired, app.counters);
            // The persistent listener survived in the TCP server; the new instance takes it.
            let mut new = Instance::spawn(&config.app, &base, true)?;
            if let Err(e) = new
                .wait_for_report(READY, START_LIMIT)
                .and_then(|_| new.wait_for_report(LISTENING, START_LIMIT))
            {
                notify(Notice::RestartFailed(&e));
            }
            app = new;
            generation += 1;
        }
    }
    if upgraded {
        // The application has exited already (it was drained).
        app.reap(Duration::from_secs(1));
    } else {
        notify(Notice::ShuttingDown);
        app.signal(rustix::process::Signal::TERM);
        app.reap(Duration::from_secs(5));
    }
    drop(control);
    drop(agent);
    drop(link);
    tcp.shutdown();
    files.shutdown();
    match fatal {
        Some(why) => Err(ServeError::Agent(why)),
        None => Ok(()),
    }
}

/// Starts a new instance and retires `old` in its favour. On failure the old one keeps
/// serving and is given back. `busy` is called every 100 ms at most meanwhile.
// Both variants carry an instance, moved once per reload: the size is of no consequence.
#[allow(clippy::result_large_err)]
fn reload_app(
    cmd: &AppCommand,
    base: &AppConfig,
    old: Instance,
    busy: &mut dyn FnMut(),
) -> Result<Instance, (Instance, ServeError)> {
    let mut new = match Instance::spawn(cmd, base, true) {
        Ok(n) => n,
        Err(e) => return Err((old, e)),
    };
    if let Err(e) = new.wait_for_report_busy(READY, START_LIMIT, busy) {
        let _ = new.child.kill();
        let _ = new.child.wait();
        return Err((old, e));
    }
    // From here the old instance lets go; the new one takes the listener as soon as it does.
    old.signal(rustix::process::Signal::USR2);
    let taken = new.wait_for_report_busy(LISTENING, START_LIMIT, busy);
    old.reap_busy(EXIT_LIMIT, busy);
    match taken {
        Ok(_) => Ok(new),
        Err(e) => {
            // The old instance is gone; keep whatever the new one is (the supervisor loop
            // restarts it if it died). The listener stays parked in the TCP server meanwhile.
            Err((new, e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> AppConfig {
        AppConfig {
            root: "/".into(),
            tcp_socket: "/nonexistent/t.sock".into(),
            files_socket: "/nonexistent/f.sock".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            access_log: None,
            max_conns: 1,
            header_timeout: 1,
            idle_timeout: 1,
            wait: WaitPolicy::Block,
            list_dirs: false,
            no_direct: false,
            dotfiles: false,
            takeover: false,
        }
    }

    /// A stand-in for the HTTP application: a shell script (the configuration's arguments
    /// land in its positional parameters, unused).
    fn script(s: &str) -> AppCommand {
        AppCommand {
            program: Some("/bin/sh".into()),
            args: vec!["-c".into(), s.into(), "app".into()],
        }
    }

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("splitos-supervisor-{}-{name}", std::process::id()))
    }

    #[test]
    fn only_an_existing_directory_is_served() {
        let dir = temp("root");
        let _ = std::fs::create_dir_all(dir.join("sub"));
        let _ = std::fs::write(dir.join("file"), b"x");
        assert_eq!(
            served_root(&dir.join("sub/../sub")).ok(),
            dir.join("sub").canonicalize().ok()
        );
        let e = served_root(&dir.join("file")).err();
        assert!(matches!(e, Some(ServeError::NotADirectory(_))), "{e:?}");
        let e = served_root(&dir.join("missing")).err();
        assert!(
            e.as_ref()
                .is_some_and(|e| e.to_string().starts_with("cannot serve ")),
            "{e:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reports_are_awaited_and_silence_or_death_is_an_error() {
        let mut i = Instance::spawn(
            &script("echo noise; echo ready; echo 'listening 127.0.0.1:5'; sleep 10"),
            &base(),
            false,
        )
        .expect("spawn");
        assert_eq!(
            i.wait_for_report(READY, START_LIMIT).ok().as_deref(),
            Some("")
        );
        assert_eq!(
            i.wait_for_report(LISTENING, START_LIMIT).ok().as_deref(),
            Some("127.0.0.1:5")
        );
        let e = i.wait_for_report(READY, Duration::from_millis(300)).err();
        assert!(
            matches!(
                e,
                Some(ServeError::Silent {
                    report: "ready",
                    ..
                })
            ),
            "{e:?}"
        );
        i.signal(rustix::process::Signal::TERM);
        i.reap(Duration::from_secs(5));

        let mut i = Instance::spawn(&script("exit 3"), &base(), false).expect("spawn");
        match i.wait_for_report(READY, START_LIMIT) {
            Err(ServeError::Exited(st)) => assert_eq!(st.code(), Some(3)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_instance_is_told_its_configuration() {
        let mut i = Instance::spawn(&script("echo \"ready $*\""), &base(), true).expect("spawn");
        let args = i.wait_for_report(READY, START_LIMIT).unwrap_or_default();
        assert!(args.starts_with("--root / --tcp-socket"), "{args}");
        assert!(args.ends_with("--takeover"), "{args}");
    }

    #[test]
    fn a_failed_reload_keeps_the_running_instance() {
        let old = Instance::spawn(&script("sleep 10"), &base(), false).expect("spawn");
        let old_pid = old.child.id();
        match reload_app(&script("exit 1"), &base(), old, &mut || {}) {
            Err((mut kept, ServeError::Exited(_))) => {
                assert_eq!(kept.child.id(), old_pid);
                assert!(matches!(kept.child.try_wait(), Ok(None)), "not running");
                kept.reap(Duration::ZERO);
            }
            Err((_, e)) => panic!("{e}"),
            Ok(_) => panic!("the reload succeeded"),
        }
    }

    #[test]
    fn an_application_that_keeps_dying_is_given_up_on() {
        let dir = temp("dying");
        let _ = std::fs::create_dir_all(&dir);
        let config = ServeConfig {
            dir: dir.clone(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            threads: 1,
            cache_size: 1 << 20,
            access_log: None,
            max_conns: 1,
            header_timeout: 1,
            idle_timeout: 1,
            list_dirs: false,
            no_direct: false,
            dotfiles: false,
            wait: WaitPolicy::Block,
            control_socket: Some(dir.join("control.sock")),
            app: script("echo ready; echo 'listening 127.0.0.1:9'"),
            link: None,
            agent: None,
            upgrade: None,
            upgrade_from: None,
        };
        let (stop, reload, upgrade) = (
            AtomicBool::new(false),
            AtomicBool::new(false),
            AtomicBool::new(false),
        );
        let mut seen = Vec::new();
        let r = run(config, &stop, &reload, &upgrade, |n| {
            seen.push(match n {
                Notice::Serving { addr } => format!("serving {addr}"),
                Notice::Restarting(_) => "restarting".into(),
                other => format!("{other:?}"),
            })
        });
        assert!(matches!(r, Err(ServeError::KeepsDying(_))), "{r:?}");
        assert_eq!(
            seen,
            [
                "serving 127.0.0.1:9",
                "restarting",
                "restarting",
                "restarting",
                "restarting"
            ]
        );
        // The control socket went with the supervisor.
        assert!(!dir.join("control.sock").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
