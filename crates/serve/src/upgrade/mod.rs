//! `splitos upgrade`: a running `splitos serve` replaced — TCP server, file server and
//! application — by the binary now at the path it was started from, every connection kept.
//!
//! The old process ([`hand_over`], on SIGUSR2 or an `upgrade` request on its control socket):
//!
//! 1. makes a private hand-over socket ([`crate::handover`]) and starts the new binary with
//!    its own arguments and `--upgrade-from <socket>`, in a process group of its own (so that
//!    it outlives the old one, whose stdout and stderr it inherits);
//! 2. checks that the process that connects is that one (`SO_PEERCRED`), and sends it copies
//!    of the persistent listeners' sockets; the new process parks them in its TCP server
//!    ([`splitos_tcp_server::migration::Migration::adopt_listener`]), so its application's
//!    listen takes them over and both accept from one kernel queue: nothing is refused;
//! 3. once the new one says `READY` (its application listens), exports every connection that
//!    may move now (direct path, or at a request boundary) and sends each with its bytes; the
//!    new process imports it (its application adopts it as after a reload);
//! 4. then drains its application as a reload does (it parks the listener and hands off each
//!    remaining connection at a request boundary) and sends what it hands off, then the
//!    connections accepted for it and never delivered, until it has exited;
//! 5. gives up its control socket, says `DONE`, and returns: the caller answers, stops its
//!    servers and exits. The new process binds the control socket and serves on.
//!
//! Until step 3 nothing has changed for the old process: if the new binary does not start, fails
//! (it says why in a `FAILED` record) or is silent, it is killed and the old one serves on. A
//! connection the new process does not take (over its budget) goes back into service in the old
//! one while its application runs, and is closed after that.

mod incoming;
pub(crate) use incoming::Incoming;

use crate::control::Control;
use crate::handover::{Link, Msg, WireError, MAX_PAYLOAD};
use crate::supervisor::Instance;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use splitos_tcp_server::migration::{Imported, Migration, Queued};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long the new process may take to connect, and then to listen.
const START_LIMIT: Duration = Duration::from_secs(20);
/// How long connections that are not at a request boundary are asked for again before the old
/// application is drained.
const EXPORT_TIME: Duration = Duration::from_secs(2);
/// How long the old application may take to hand off its connections and exit (it gives up
/// after 30 s itself).
const DRAIN_LIMIT: Duration = Duration::from_secs(40);
/// How long one record may take to be answered.
pub(crate) const RECORD_LIMIT: Duration = Duration::from_secs(10);
/// The longest an upgrade takes; a client asking for one waits that long for the answer.
pub const UPGRADE_LIMIT: Duration = Duration::from_secs(2 * 20 + 2 + 40 + 10);

/// How to start the new binary.
#[derive(Clone, Debug)]
pub struct UpgradeCommand {
    /// The path the running binary was started from (a new binary is put there).
    pub program: PathBuf,
    /// The arguments of `serve`, as this process was given them (without `--upgrade-from`).
    pub args: Vec<OsString>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("no persistent listener to hand over (is the application restarting?)")]
    NoListener,
    #[error("asking the TCP server for its listeners: {0}")]
    Listeners(#[from] splitos_tcp_server::migration::MigrationError),
    #[error("the hand-over socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the new binary {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the new binary exited ({0}) before taking over; its messages are on this server's stderr"
    )]
    Exited(ExitStatus),
    #[error("the new binary did not {0} within {1:?}")]
    Silent(&'static str, Duration),
    #[error("the new binary failed: {0}")]
    Failed(String),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the upgrade link: {0}")]
    Protocol(String),
}

/// An upgrade that happened.
#[derive(Debug)]
pub struct Upgraded {
    pub pid: u32,
    /// Connections the new process took.
    pub handed: u64,
    /// Connections that could not be handed and were closed.
    pub lost: u64,
    /// From the request to the hand-over's end.
    pub took: Duration,
    /// What went wrong after the new process had taken over, if anything.
    pub trouble: Option<String>,
}

impl std::fmt::Display for Upgraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "upgraded: pid {} serves now; {} connections handed over in {} ms",
            self.pid,
            self.handed,
            self.took.as_millis()
        )?;
        if self.lost > 0 {
            write!(f, ", {} closed", self.lost)?;
        }
        if let Some(t) = &self.trouble {
            write!(f, " ({t})")?;
        }
        Ok(())
    }
}

/// What the old process hands over with.
pub(crate) struct Outgoing<'a> {
    pub command: &'a UpgradeCommand,
    /// The private runtime directory, where the hand-over socket is made.
    pub dir: &'a Path,
    pub migration: Migration,
    /// Refuses requests while the upgrade runs; given up before `DONE`.
    pub control: &'a mut Option<Control>,
}

impl Outgoing<'_> {
    fn refuse(&self) {
        if let Some(c) = self.control.as_ref() {
            c.refuse_while("an upgrade");
        }
    }
}

pub(crate) fn me() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Kills the new process (and waits for it): it failed to take over.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The old process's side: see the module documentation. An error means the old process
/// serves on as before.
pub(crate) fn hand_over(o: Outgoing<'_>, app: &mut Instance) -> Result<Upgraded, UpgradeError> {
    let started = Instant::now();
    let uid = me();
    let listeners: Vec<(SocketAddr, OwnedFd)> = o
        .migration
        .listeners(Duration::from_secs(5))?
        .into_iter()
        .filter(|(_, owner, _)| *owner == uid)
        .map(|(a, _, fd)| (a, fd))
        .collect();
    if listeners.is_empty() {
        return Err(UpgradeError::NoListener);
    }
    let path = o.dir.join("upgrade.sock");
    let socket_err = |source: std::io::Error| UpgradeError::Socket {
        path: path.clone(),
        source,
    };
    let _ = std::fs::remove_file(&path);
    let server = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .and_then(|s| {
        rustix::net::bind(&s, &SocketAddrUnix::new(&path)?)?;
        rustix::net::listen(&s, 1)?;
        Ok(s)
    })
    .map_err(|e| socket_err(e.into()))?;
    let _remove = RemoveFile(path.clone());
    splitos_m2m::runtime::set_socket_mode(&path, 0o600).map_err(socket_err)?;
    let mut child = Command::new(&o.command.program)
        .args(&o.command.args)
        .arg("--upgrade-from")
        .arg(&path)
        // Its own process group: it must outlive this one, and a signal to this one's group
        // is not meant for it. Its output goes where this one's goes.
        .process_group(0)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|source| UpgradeError::Spawn {
            program: o.command.program.clone(),
            source,
        })?;
    let pid = child.id();
    tracing::info!(pid, program = %o.command.program.display(), "upgrade: the new binary started");
    let link = match connect_new(&o, &server, &mut child) {
        Ok(l) => l,
        Err(e) => {
            kill(&mut child);
            return Err(e);
        }
    };
    drop(server);
    if let Err(e) = start_new(&o, &link, &listeners, &mut child) {
        kill(&mut child);
        return Err(e);
    }
    // Committed: the new process accepts on the listeners too. From here connections move.
    tracing::info!(
        pid,
        "upgrade: the new binary listens; handing connections over"
    );
    // Its exit status is nobody's business now: init reaps it after this process exits.
    drop(child);
    let mut h = Hand {
        link,
        seq: 0,
        handed: 0,
        lost: 0,
        trouble: None,
    };
    export_movable(&o, &mut h);
    drain(&o, &mut h, app, &listeners, uid);
    // The new process binds the control socket once it hears `DONE`.
    drop(o.control.take());
    if h.trouble.is_none() {
        if let Err(e) = h.link.send(&Msg::Done { count: h.handed }, &[]) {
            h.trouble = Some(e.to_string());
        }
    }
    Ok(Upgraded {
        pid,
        handed: h.handed,
        lost: h.lost,
        took: started.elapsed(),
        trouble: h.trouble,
    })
}

/// Waits for the new process to connect and say hello.
fn connect_new(
    o: &Outgoing<'_>,
    server: &OwnedFd,
    child: &mut Child,
) -> Result<Link, UpgradeError> {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        o.refuse();
        if let Ok(Some(st)) = child.try_wait() {
            return Err(UpgradeError::Exited(st));
        }
        if Instant::now() >= deadline {
            return Err(UpgradeError::Silent("connect", START_LIMIT));
        }
        let fd = match rustix::net::accept_with(server, SocketFlags::CLOEXEC) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {
                let mut p = [rustix::event::PollFd::new(
                    server,
                    rustix::event::PollFlags::IN,
                )];
                let ts = rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 20_000_000,
                };
                let _ = rustix::event::poll(&mut p, Some(&ts));
                continue;
            }
            Err(e) => return Err(UpgradeError::Protocol(format!("accepting: {e}"))),
        };
        // Only the process this one started may take its connections.
        let peer = rustix::net::sockopt::socket_peercred(&fd);
        let ok = peer.as_ref().is_ok_and(|c| {
            c.uid.as_raw() == me() && c.pid.as_raw_nonzero().get() as u32 == child.id()
        });
        if !ok {
            tracing::warn!(
                ?peer,
                "upgrade: a process other than the new binary connected; ignored"
            );
            continue;
        }
        let link = Link::new(fd);
        return match link.recv(RECORD_LIMIT)? {
            (Msg::Hello { pid }, _) if pid == child.id() => Ok(link),
            (Msg::Failed(why), _) => Err(UpgradeError::Failed(why)),
            (m, _) => Err(UpgradeError::Protocol(format!(
                "expected a hello, got {m:?}"
            ))),
        };
    }
}

/// Sends the listeners and waits until the new application listens.
fn start_new(
    o: &Outgoing<'_>,
    link: &Link,
    listeners: &[(SocketAddr, OwnedFd)],
    child: &mut Child,
) -> Result<(), UpgradeError> {
    let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|(_, f)| f.as_fd()).collect();
    link.send(
        &Msg::Listeners {
            count: fds.len() as u32,
        },
        &fds,
    )?;
    let deadline = Instant::now() + START_LIMIT;
    loop {
        o.refuse();
        match link.recv(Duration::from_millis(50)) {
            Ok((Msg::Ready, _)) => return Ok(()),
            Ok((Msg::Failed(why), _)) => return Err(UpgradeError::Failed(why)),
            Ok((m, _)) => return Err(UpgradeError::Protocol(format!("expected ready, got {m:?}"))),
            Err(WireError::Timeout(_)) => {}
            Err(WireError::Closed) => {
                // It exited, most likely: say how.
                let st = child
                    .wait()
                    .map_err(|e| UpgradeError::Wire(WireError::Io(e)))?;
                return Err(UpgradeError::Exited(st));
            }
            Err(e) => return Err(e.into()),
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(UpgradeError::Exited(st));
        }
        if Instant::now() >= deadline {
            return Err(UpgradeError::Silent("listen", START_LIMIT));
        }
    }
}

/// The committed phase's state.
struct Hand {
    link: Link,
    seq: u64,
    handed: u64,
    lost: u64,
    /// The link failed: nothing more is sent.
    trouble: Option<String>,
}

impl Hand {
    /// Sends one connection and waits for the answer: `Ok(true)` if the new process took it.
    fn send(
        &mut self,
        fd: BorrowedFd<'_>,
        unsent: &Queued,
        held: &[u8],
        eof: bool,
    ) -> Result<bool, WireError> {
        // Read out first (a file sent by reference is read here): a file that shrank ends the
        // connection here rather than in the middle of its record.
        let mut bytes = Vec::with_capacity(unsent.len() as usize);
        if let Err(e) = unsent.for_each_piece(MAX_PAYLOAD, |p| {
            bytes.extend_from_slice(p);
            Ok(())
        }) {
            tracing::warn!("upgrade: a connection's queued bytes cannot be read: {e}");
            return Ok(false);
        }
        self.seq += 1;
        let seq = self.seq;
        self.link.send(
            &Msg::Conn {
                seq,
                unsent: bytes.len() as u64,
                held: held.len() as u64,
                eof,
            },
            &[fd],
        )?;
        for piece in bytes.chunks(MAX_PAYLOAD).chain(held.chunks(MAX_PAYLOAD)) {
            self.link.send(&Msg::Data(piece.to_vec()), &[])?;
        }
        match self.link.recv(RECORD_LIMIT)? {
            (Msg::Ack { seq: s, error }, _) if s == seq => {
                if let Some(why) = &error {
                    tracing::warn!("upgrade: the new process did not take a connection: {why}");
                }
                Ok(error.is_none())
            }
            (m, _) => Err(WireError::Bad(format!(
                "expected an ack of {seq}, got {m:?}"
            ))),
        }
    }

    /// Sends a connection taken out of the registry; closed if it cannot go.
    fn send_imported(&mut self, c: Imported) {
        if self.trouble.is_some() {
            self.lost += 1;
            return;
        }
        match self.send(c.fd.as_fd(), &c.unsent, &c.held, c.eof) {
            Ok(true) => self.handed += 1,
            Ok(false) => self.lost += 1,
            Err(e) => {
                self.lost += 1;
                self.broke(e);
            }
        }
    }

    fn broke(&mut self, e: WireError) {
        tracing::error!("upgrade: the hand-over link failed: {e}");
        self.trouble = Some(format!("the hand-over link failed: {e}"));
    }
}

/// Exports the connections that may move now, asking again for a bounded time.
fn export_movable(o: &Outgoing<'_>, h: &mut Hand) {
    let deadline = Instant::now() + EXPORT_TIME;
    while h.trouble.is_none() && Instant::now() < deadline {
        o.refuse();
        let flows = match o.migration.flows(1 << 20, Duration::from_secs(5)) {
            Ok(f) if !f.is_empty() => f,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!("upgrade: listing connections: {e}");
                return;
            }
        };
        let ex = match o.migration.export(&flows, Duration::from_secs(5)) {
            Ok(ex) => ex,
            Err(e) => {
                tracing::warn!("upgrade: exporting connections: {e}");
                return;
            }
        };
        let none = ex.moved.is_empty();
        for e in ex.moved {
            if h.trouble.is_some() {
                break; // the rest go back into service as they drop
            }
            let Some(fd) = e.fd() else { continue };
            match h.send(fd, &e.unsent, &e.held, e.eof) {
                // Taken: this process's copy of the socket is closed, nothing else.
                Ok(true) => {
                    h.handed += 1;
                    drop(e.moved());
                }
                // Not taken: back into service here (`Exported`'s drop).
                Ok(false) => {}
                Err(err) => h.broke(err),
            }
        }
        if none {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Drains the old application and sends what it leaves in the registry, until it has exited
/// and its TCP server holds no connection.
fn drain(
    o: &Outgoing<'_>,
    h: &mut Hand,
    app: &mut Instance,
    listeners: &[(SocketAddr, OwnedFd)],
    uid: u32,
) {
    app.signal(rustix::process::Signal::USR2);
    let deadline = Instant::now() + DRAIN_LIMIT;
    let mut exited: Option<Instant> = None;
    loop {
        o.refuse();
        app.read_reports();
        let mut n = 0;
        for (addr, _) in listeners {
            for c in o.migration.take_handed(*addr, uid) {
                n += 1;
                h.send_imported(c);
            }
        }
        if exited.is_none() && matches!(app.child.try_wait(), Ok(Some(_))) {
            exited = Some(Instant::now());
        }
        // After the application, its session ends in the TCP server, which hands on the
        // connections it left at a request boundary: wait for those a little.
        if let Some(t) = exited {
            if n == 0 && (o.migration.connections() == 0 || t.elapsed() > Duration::from_secs(1)) {
                break;
            }
        }
        if Instant::now() >= deadline {
            tracing::warn!("upgrade: the old application did not exit in time; killing it");
            let _ = app.child.kill();
            let _ = app.child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for (addr, _) in listeners {
        if let Some((_listener, orphans)) = o.migration.take_parked(*addr, uid) {
            for fd in orphans {
                let local = rustix::net::getsockname(&fd)
                    .ok()
                    .and_then(|a| SocketAddr::try_from(a).ok())
                    .unwrap_or(*addr);
                h.send_imported(Imported {
                    fd,
                    local,
                    unsent: Queued::default(),
                    held: Vec::new(),
                    eof: false,
                });
            }
        }
        for c in o.migration.take_handed(*addr, uid) {
            h.send_imported(c);
        }
    }
}

/// Removes a file when dropped (the hand-over socket).
struct RemoveFile(PathBuf);
impl Drop for RemoveFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
