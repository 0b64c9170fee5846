//! Connections that leave this server and connections that arrive from another: the TCP
//! server's side of live migration between nodes.
//!
//! A [`Migration`] handle (from [`crate::TcpServer::migration`]) lets a thread beside the
//! workers — the node link of `splitos-migrate`, which also does the `TCP_REPAIR` work and
//! talks to the other node — ask for three things:
//!
//! - [`Migration::flows`]: the connections that could move now ([`movable`] ones).
//! - [`Migration::export`]: take connections out of service. Each worker stops sending and
//!   receiving on them, waits until the kernel holds no operation on them, and gives back the
//!   socket with what the server held for it: the bytes queued and not yet given to the kernel
//!   (responses, file ranges read out), and the bytes received and not yet answered. Nothing
//!   reaches the client or the application meanwhile; the application is told `Closed`.
//! - [`Migration::import`]: put a connection (a restored socket and those bytes) into service:
//!   it is handed to the owner of the persistent listener its local address belongs to, like
//!   a connection an application instance handed off (`crate::persist`), and its queued bytes
//!   go out before anything that owner writes.
//!
//! An [`Exported`] connection that is dropped without being taken apart goes back into
//! service here, so a failed migration never loses a connection.
//!
//! Requests reach the workers on a board ([`Board`]) they look at on every pass once its
//! version changes; answers come back on a channel, because a worker must never wait.
//!
//! [`movable`]: crate::migration#movable
//!
//! # Movable
//!
//! A connection may move when it was accepted on a persistent listener (so that there is an
//! owner to hand it to on the other side), has not failed, is not being handed off or shut
//! down, holds at most [`QUEUE_MAX`] queued bytes, and is at a request boundary as far as the
//! server can tell: answered by the direct path, or on a recoverable listener whose
//! application has answered everything it sent anything for (see `listen_flags::RECOVERABLE`).

use crate::budget::Res;
use crate::persist::Handed;
use crate::Shared;
use rustix::fd::OwnedFd;
use splitos_m2m::segment::{PlainFile, Segment};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes a moving connection may have queued (responses not yet given to the kernel): they
/// travel in its record. A download of a large file by reference queues the whole remaining
/// range, so this bounds how much of one download a migration copies.
pub const QUEUE_MAX: usize = 256 << 20;

/// One piece of what the server had queued for a connection, as it held it: file ranges stay
/// references until whoever carries them reads them (never on a worker).
#[derive(Clone)]
pub enum QueuedPart {
    Bytes(Vec<u8>),
    /// `[off, end)` of a sealed file segment.
    Segment {
        seg: Arc<Segment>,
        off: usize,
        end: usize,
    },
    /// `[off, end)` of a regular file passed by reference.
    File {
        file: Arc<PlainFile>,
        off: usize,
        end: usize,
    },
}

/// Bytes queued for a connection and not yet given to the kernel, in order.
#[derive(Clone, Default)]
pub struct Queued(pub(crate) Vec<QueuedPart>);

impl Queued {
    pub fn from_bytes(b: Vec<u8>) -> Queued {
        if b.is_empty() {
            Queued(Vec::new())
        } else {
            Queued(vec![QueuedPart::Bytes(b)])
        }
    }

    pub fn len(&self) -> u64 {
        self.0
            .iter()
            .map(|p| match p {
                QueuedPart::Bytes(b) => b.len() as u64,
                QueuedPart::Segment { off, end, .. } | QueuedPart::File { off, end, .. } => {
                    (end - off) as u64
                }
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `out` with the bytes in order, in pieces of at most `piece` bytes (file ranges
    /// are read into a buffer of that size). A file that ends early (it shrank) ends the
    /// bytes there, as `sendfile` would: the error says so.
    pub fn for_each_piece(
        &self,
        piece: usize,
        mut out: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let piece = piece.max(4096);
        let mut buf = Vec::new();
        for p in &self.0 {
            match p {
                QueuedPart::Bytes(b) => {
                    for c in b.chunks(piece) {
                        out(c)?;
                    }
                }
                QueuedPart::Segment { seg, off, end } => {
                    for c in seg.bytes()[*off..*end].chunks(piece) {
                        out(c)?;
                    }
                }
                QueuedPart::File { file, off, end } => {
                    buf.resize(piece, 0);
                    let mut at = *off;
                    while at < *end {
                        let want = (end - at).min(piece);
                        let n = rustix::io::pread(file.fd(), &mut buf[..want], at as u64)?;
                        if n == 0 {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "a file sent by reference ended early (it shrank)",
                            ));
                        }
                        out(&buf[..n])?;
                        at += n;
                    }
                }
            }
        }
        Ok(())
    }
}

/// A connection, named by its two ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} <- {}", self.local, self.peer)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("the TCP server is shutting down")]
    ShuttingDown,
    #[error("the TCP server's workers did not answer within {0:?}")]
    Timeout(Duration),
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("nobody listens on {0} here (with a persistent listener) to take the connection")]
    NoListener(SocketAddr),
    #[error("over its owner's {0} budget here")]
    Budget(&'static str),
}

/// A connection taken out of service, with what the server held for it.
pub struct Exported {
    pub flow: Flow,
    /// Bytes queued for the client and not yet given to the kernel.
    pub unsent: Queued,
    /// Bytes received from the client and not yet answered, in order.
    pub held: Vec<u8>,
    /// The client had shut down its side.
    pub eof: bool,
    pub(crate) fd: Option<OwnedFd>,
    /// Where it goes back into service if it does not move (see `Drop`).
    pub(crate) origin: SocketAddr,
    pub(crate) uid: u32,
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Exported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exported")
            .field("flow", &self.flow)
            .field("unsent", &self.unsent.len())
            .field("held", &self.held.len())
            .field("eof", &self.eof)
            .finish()
    }
}

impl Exported {
    /// The socket, still open and untouched since it left service.
    pub fn fd(&self) -> Option<rustix::fd::BorrowedFd<'_>> {
        use rustix::fd::AsFd;
        self.fd.as_ref().map(|f| f.as_fd())
    }

    /// The socket has moved on (the caller saves it and closes it silently): nothing goes back
    /// into service here. `None` only if it was taken already.
    pub fn moved(mut self) -> Option<OwnedFd> {
        self.fd.take()
    }
}

impl Drop for Exported {
    /// Not moved after all: back into service on this server.
    fn drop(&mut self) {
        let Some(fd) = self.fd.take() else { return };
        tracing::info!(flow = %self.flow, "a connection that did not move goes back into service");
        let acct = self.shared.ledger.account(self.uid);
        let data = std::mem::take(&mut self.held);
        // Forced: refusing would close a connection the client still has.
        self.shared.ledger.force(&acct, Res::Handed, 1);
        self.shared
            .ledger
            .force(&acct, Res::HandedBytes, data.len() as u64);
        self.shared.registry.hand_over(
            self.origin,
            Handed {
                fd,
                uid: self.uid,
                acct,
                data,
                unsent: std::mem::take(&mut self.unsent),
                eof: self.eof,
                deadline: Instant::now() + self.shared.config.persist_grace,
            },
        );
        self.shared.wake_all();
    }
}

/// A connection arriving: a socket in service (out of repair mode) and what travelled with it.
pub struct Imported {
    pub fd: OwnedFd,
    /// Its local address: the persistent listener that covers it takes it.
    pub local: SocketAddr,
    pub unsent: Queued,
    pub held: Vec<u8>,
    pub eof: bool,
}

/// What an export found.
#[derive(Debug, Default)]
pub struct Exports {
    pub moved: Vec<Exported>,
    /// Connections asked for that may not move now, and why; and ones not found.
    pub refused: Vec<(Flow, String)>,
}

pub(crate) enum What {
    List {
        limit: usize,
    },
    Export(HashSet<Flow>),
    /// Copies of the persistent listeners' sockets (see `crate::upgrade`).
    Listeners,
}

pub(crate) enum Reply {
    /// A worker's movable connections (for `List`).
    Listed(Vec<Flow>),
    /// A worker started exporting this many connections (for `Export`); each arrives as
    /// `Moved` once no operation is in flight on it.
    Found(Vec<Flow>),
    Moved(Exported),
    Refused(Flow, &'static str),
    /// A worker's persistent listeners: address, owner, a copy of the socket (for
    /// `Listeners`).
    Listeners(Vec<(SocketAddr, u32, OwnedFd)>),
}

pub(crate) struct Order {
    pub id: u64,
    pub what: What,
    pub tx: Mutex<Sender<Reply>>,
}

impl Order {
    pub(crate) fn reply(&self, r: Reply) {
        let tx = match self.tx.lock() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        };
        // If the asker gave up, an `Exported` in the reply is dropped: back into service.
        let _ = tx.send(r);
    }
}

/// Orders for the workers.
#[derive(Default)]
pub(crate) struct Board {
    /// Connections reserved (`Migration::reserve`) and not yet handed to their listener.
    arriving: AtomicU64,
    orders: Mutex<Vec<Arc<Order>>>,
    next_id: AtomicU64,
    version: AtomicU64,
}

impl Board {
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Orders newer than `seen` (an order id), and the newest id.
    pub(crate) fn newer_than(&self, seen: u64) -> (Vec<Arc<Order>>, u64) {
        let orders = match self.orders.lock() {
            Ok(o) => o,
            Err(p) => p.into_inner(),
        };
        let new: Vec<_> = orders.iter().filter(|o| o.id > seen).cloned().collect();
        let top = new.iter().map(|o| o.id).max().unwrap_or(seen);
        (new, top)
    }

    fn post(&self, what: What) -> (Arc<Order>, mpsc::Receiver<Reply>) {
        let (tx, rx) = mpsc::channel();
        let order = Arc::new(Order {
            id: self.next_id.fetch_add(1, Ordering::AcqRel) + 1,
            what,
            tx: Mutex::new(tx),
        });
        if let Ok(mut o) = self.orders.lock() {
            o.push(order.clone());
        }
        self.version.fetch_add(1, Ordering::AcqRel);
        (order, rx)
    }

    pub(crate) fn remove(&self, id: u64) {
        if let Ok(mut o) = self.orders.lock() {
            o.retain(|x| x.id != id);
        }
    }
}

/// Asks the workers of one TCP server to let connections go or take them in.
#[derive(Clone)]
pub struct Migration {
    pub(crate) shared: Arc<Shared>,
}

impl Migration {
    pub(crate) fn workers(&self) -> usize {
        self.shared.wakes.get().map_or(0, |w| w.len())
    }

    pub(crate) fn ask(
        &self,
        what: What,
    ) -> Result<(Arc<Order>, mpsc::Receiver<Reply>), MigrationError> {
        if self.shared.shutdown.load(Ordering::Acquire) {
            return Err(MigrationError::ShuttingDown);
        }
        let asked = self.shared.migration.post(what);
        self.shared.wake_all();
        Ok(asked)
    }

    /// Up to `limit` connections that could move now.
    pub fn flows(&self, limit: usize, timeout: Duration) -> Result<Vec<Flow>, MigrationError> {
        let (order, rx) = self.ask(What::List { limit })?;
        let deadline = Instant::now() + timeout;
        let mut flows = Vec::new();
        let mut answered = 0;
        let result = loop {
            if answered == self.workers() {
                break Ok(flows);
            }
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Reply::Listed(mut f)) => {
                    answered += 1;
                    flows.append(&mut f);
                }
                Ok(_) => {}
                Err(_) => break Err(MigrationError::Timeout(timeout)),
            }
        };
        self.shared.migration.remove(order.id);
        let mut flows = result?;
        flows.sort();
        flows.truncate(limit);
        Ok(flows)
    }

    /// Takes `flows` out of service. Connections not found, or not movable now, are in
    /// `refused`; the others arrive in `moved` once each worker has let go of them (a worker
    /// still busy at `timeout` keeps its connections in service).
    pub fn export(&self, flows: &[Flow], timeout: Duration) -> Result<Exports, MigrationError> {
        let wanted: HashSet<Flow> = flows.iter().copied().collect();
        let (order, rx) = self.ask(What::Export(wanted.clone()))?;
        let deadline = Instant::now() + timeout;
        let mut out = Exports::default();
        let mut seen: HashSet<Flow> = HashSet::new();
        let mut answered = 0;
        let mut expected = 0usize;
        let result = loop {
            if answered == self.workers() && out.moved.len() == expected {
                break Ok(());
            }
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Reply::Found(f)) => {
                    answered += 1;
                    expected += f.len();
                    seen.extend(f);
                }
                Ok(Reply::Moved(e)) => out.moved.push(e),
                Ok(Reply::Refused(f, why)) => {
                    seen.insert(f);
                    out.refused.push((f, why.to_string()));
                }
                Ok(Reply::Listed(_) | Reply::Listeners(_)) => {}
                Err(_) => break Err(MigrationError::Timeout(timeout)),
            }
        };
        self.shared.migration.remove(order.id);
        drop(order);
        if let Err(e) = result {
            // What did arrive goes back into service as `out` drops; later arrivals too, as
            // their replies find the channel closed.
            drop(rx);
            return Err(e);
        }
        for f in flows {
            if !seen.contains(f) {
                out.refused.push((*f, "no such connection here".into()));
            }
        }
        Ok(out)
    }

    /// The persistent listener (address, owner) that would take a connection to `local`.
    pub fn owner_of(&self, local: SocketAddr) -> Option<(SocketAddr, u32)> {
        self.shared.registry.listener_for(local)
    }

    /// Makes room for a connection to `local` arriving, before it is restored, so that
    /// nothing refuses it once it has left its old node: finds the persistent listener that
    /// will take it, and checks that its owner's connection budget holds it besides every
    /// arrival not yet adopted. It then counts as handed off until its listener's owner
    /// adopts it (charged without refusal: the `handed` budget bounds connections parked
    /// across application restarts, and these are on their way to one that runs).
    pub fn reserve(&self, local: SocketAddr) -> Result<Reservation, ImportError> {
        let (origin, uid) = self.owner_of(local).ok_or(ImportError::NoListener(local))?;
        let ledger = &self.shared.ledger;
        let acct = ledger.account(uid);
        let pending = self
            .shared
            .migration
            .arriving
            .fetch_add(1, Ordering::AcqRel)
            + 1;
        if ledger.fits(&acct, Res::Conns, pending).is_err() {
            self.shared
                .migration
                .arriving
                .fetch_sub(1, Ordering::AcqRel);
            return Err(ImportError::Budget(Res::Conns.name()));
        }
        ledger.force(&acct, Res::Handed, 1);
        Ok(Reservation {
            origin,
            uid,
            acct: Some(acct),
            shared: self.shared.clone(),
        })
    }

    /// Puts a connection into service with the room `r` made for it: the owner of the
    /// persistent listener adopts it (like a handed-off connection), its queued bytes first.
    pub fn import(&self, mut r: Reservation, c: Imported) {
        let Some(acct) = r.acct.take() else { return };
        // Charged without refusal: the connection is here already, and its bytes were bounded
        // by whoever brought it (the node link's batch limit).
        self.shared
            .ledger
            .force(&acct, Res::HandedBytes, c.held.len() as u64);
        tracing::debug!(local = %c.local, held = c.held.len(), unsent = c.unsent.len(), "a connection arrived");
        self.shared.registry.hand_over(
            r.origin,
            Handed {
                fd: c.fd,
                uid: r.uid,
                acct,
                data: c.held,
                unsent: c.unsent,
                eof: c.eof,
                deadline: Instant::now() + self.shared.config.persist_grace,
            },
        );
        self.shared.wake_all();
    }
}

/// Room made for one arriving connection ([`Migration::reserve`]); given back if dropped
/// unused.
pub struct Reservation {
    origin: SocketAddr,
    uid: u32,
    acct: Option<Arc<crate::budget::Account>>,
    shared: Arc<Shared>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shared
            .migration
            .arriving
            .fetch_sub(1, Ordering::AcqRel);
        if let Some(acct) = self.acct.take() {
            self.shared.ledger.give(&acct, Res::Handed, 1);
        }
    }
}
