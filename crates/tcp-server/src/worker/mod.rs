//! One event-loop thread: its io_uring, the application sessions assigned to it, and every
//! socket those sessions own.
//!
//! A session (one m2m channel) lives on exactly one worker, so its channel keeps a single
//! producer and consumer on this side and no socket state is shared between threads. The loop
//! alternates between draining requests from the sessions' rings, reaping io_uring completions,
//! refilling receive buffers and flushing events; it sleeps in `io_uring_enter` only when a full
//! pass found nothing to do (per the wait policy), with each session's wait fd armed as a poll
//! so that a doorbell or a dead application wakes it.
//!
//! # Rooms
//!
//! One struct, [`Worker`], extended from one file per concern (as smoltcp's
//! `iface/interface/*.rs` extend one interface):
//!
//! | file | concern |
//! |---|---|
//! | `mod.rs` | the loop and its pass, sleeping, housekeeping, shutdown |
//! | `state.rs` | the state types: `Session`, `SocketSlot`/`Socket`/`Kind`, `Conn`, `Chunk` |
//! | `completions.rs` | what each finished io_uring operation means |
//! | `requests.rs` | reading, decoding and dispatching requests; handle validation |
//! | `events.rs` | events to the application, the outbox, protocol violations |
//! | `session.rs` | sessions from arrival to release; an application's death |
//! | `sockets.rs` | listen, accept, connect |
//! | `send.rs` | the send path: inline, buffer and file chunks, `sendfile`, send credit |
//! | `recv.rs` | the receive path: provided buffers, delivery, the receive window |
//! | `close.rs` | closing: flush, cancel, release, park |
//! | `linger.rs` | lingering close: shut down sending, discard until the peer's EOF or a bound |
//! | `handoff.rs` | pause and hand-off to the next owner of a persistent listener |
//! | `migrate.rs` | letting connections go to another node (`crate::migration`) |
//! | `checkpoint.rs` | snapshots of connections at rest, for failover (`crate::checkpoint`) |
//! | `direct.rs` | the glue of the direct path (the protocol side is `crate::direct`) |
//! | `budget.rs` | charging sessions against their budgets (`crate::budget`) and giving back |
//!
//! Receive path: each session's m2m buffer pool is registered as an io_uring provided-buffer
//! ring, so the kernel writes received bytes straight into memory the application reads. Small
//! reads are copied inline into the event ring and the buffer goes straight back to the kernel;
//! large ones are handed to the application by descriptor.
//!
//! Send path: bytes arrive inline (copied once, into the connection's queue), in the
//! application's buffers (sent by the kernel straight from shared memory), as ranges of sealed
//! file segments (`SendFile`; large ranges by `sendfile`, by page reference), or are written by
//! the server itself (the direct path's responses).
//!
//! # Invariants
//!
//! Every file here relies on these; a change that breaks one is a memory-safety bug, not a
//! logic bug, because the kernel reads and writes this memory asynchronously.
//!
//! 1. **Memory handed to the kernel outlives its operation.** The bytes a send reads (the
//!    chunks at the front of `Conn::sendq`, and the boxed `Gather` iovecs), the provided
//!    buffers a receive writes into (`Session::provided`) and the buffer ring itself stay
//!    where they are until the operation's completion is reaped. Nothing in flight is moved,
//!    grown or dropped; a send's chunks are only advanced in `advance_sent` after it completes.
//! 2. **One send in flight per connection** (`Conn::send`, an `InflightSend`: a ring send or
//!    a `SendPoll` wait), which keeps bytes in order and partial sends simple; a synchronous
//!    `sendfile` runs only when none is in flight.
//! 3. **A socket slot is freed only when no operation is in flight on it**
//!    (`Socket::inflight == 0`, counted up when an operation is queued and down when its
//!    completion is reaped; a lingering connection's readiness wait is one); its generation
//!    then changes, so stale handles are refused.
//! 4. **A session's memory goes only when it owns no socket and no operation**
//!    (`Session::inflight == 0` and `sockets` empty; see `collect_sessions`): its pool backs
//!    provided buffers and its channel the wait-fd poll.
//! 5. **Windows bound memory.** A connection holds at most `SEND_WINDOW` unsent application
//!    bytes (`Conn::unsent`; credit returns with `Sent`) and arms no receive while
//!    `RECV_WINDOW / 2` delivered bytes are unacknowledged (`Conn::unacked`, lowered by
//!    `Consumed`). File ranges and the direct path's responses are outside the send window: a
//!    file range holds a reference to a segment, not a copy, and the direct path stops reading
//!    (cancels the receive of) a connection whose queue reaches `direct::SENDQ_LIMIT` chunks
//!    or that holds `recv::DIRECT_BUF_MAX` unanswered bytes. Across connections, budgets per
//!    session, user and server (`crate::budget`, charged in `budget.rs`) bound what no window
//!    does: descriptors, mapped segments, queued file ranges, bytes held for paused
//!    connections and events queued for slow applications.

mod budget;
mod checkpoint;
mod close;
mod completions;
mod direct;
mod events;
mod handoff;
mod linger;
mod migrate;
mod recv;
mod requests;
mod send;
mod session;
mod sockets;
mod state;

use state::*;

use crate::budget::Res;
use crate::direct::{DirectPart, Expiry, Outcome, RouteRequest, SENDQ_LIMIT};
use crate::persist::Parked;
use crate::uring::{BufRing, Completion, Op, Ring, Tag};
use crate::Shared;
use rustix::fd::{AsFd, FromRawFd, OwnedFd};
use rustix::io::Errno;
use rustix::net::{self as rnet, sockopt, AddressFamily, SocketFlags, SocketType};
use splitos_m2m::segment::{PlainFile, Segment};
use splitos_m2m::{
    Channel, Error as M2mError, Message, PeerCredentials, Phase, RxBuffer, TxBuffer, WaitPolicy,
};
use splitos_tcp_proto::{
    listen_flags, op, BufferMeta, Event, Handle, Request, SockOpt, NO_ADDR, PLAIN_FILE_TAG,
    RECV_WINDOW, SEND_FILE_COST, SEND_WINDOW,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Received reads up to this size are copied into the event ring; larger ones go by buffer.
const INLINE_DATA_MAX: usize = 4096;
/// Requests handled per session per pass, so one busy session cannot starve the others.
const REQUESTS_PER_PASS: usize = 256;
/// Protocol violations a session may commit before it is disconnected.
const MAX_VIOLATIONS: u32 = 64;
/// Events queued for an application that has stopped reading them before it is disconnected.
/// Normal back-pressure never gets near this: receives stop at the buffer pool and the receive
/// window, and for the whole session at half of this or at its outbox budget (`outbox_full`);
/// accepts stop at the connection budgets.
const MAX_OUTBOX: usize = 1 << 16;
/// How long connections an application closed (or shut down) before it went away keep flushing
/// their queued bytes (and lingering, `linger.rs`), as the kernel does for a process that exits
/// after `close`.
const LINGER_LIMIT: Duration = Duration::from_secs(10);
/// The socket of a tag for an operation on a session rather than a socket (the cancel of its
/// wait-fd poll).
const SESSION_LEVEL: SlotIx = SlotIx(u32::MAX);
/// How long a shutting-down worker waits for the kernel to finish in-flight operations.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A route a helper thread opened (or could not) for `ServeFiles`.
struct OpenedRoute {
    session: SessionIx,
    req: u32,
    listener: Handle,
    route: Result<Box<dyn crate::direct::DirectRoute>, Errno>,
}

pub(crate) struct NewSession {
    pub chan: Channel,
    pub peer: PeerCredentials,
    /// Its user's account, already charged for this session.
    pub acct: Arc<crate::budget::Account>,
}

pub(crate) struct Worker {
    id: usize,
    ring: Ring,
    shared: Arc<Shared>,
    inbox: Receiver<NewSession>,
    wake: OwnedFd,
    wake_armed: bool,
    sessions: Vec<Option<Session>>,
    free_sessions: Vec<SessionIx>,
    sockets: Vec<SocketSlot>,
    free_sockets: Vec<SlotIx>,
    completions: Vec<Completion>,
    msg: Vec<u8>,
    ev: Vec<u8>,
    /// Connections whose receive waits for a free buffer of their session's pool.
    starved: Vec<SlotIx>,
    accept_retry: Vec<SlotIx>,
    /// Connections whose receive waits for a session budget (held or outbox bytes).
    budget_waiters: Vec<SlotIx>,
    /// Connections given bytes this pass, whose send starts once all requests are read.
    send_wanted: Vec<SlotIx>,
    /// This worker's persistent listeners (where handed-off connections may be adopted), and
    /// whether one was added since `adopt_handed` last looked, which also remembers the
    /// registry's hand-off version it saw.
    persistent: HashSet<SlotIx>,
    persistent_added: bool,
    handed_seen: u64,
    /// Direct-path routes of this worker's listeners.
    routes: Vec<Option<crate::direct::Route>>,
    /// Routes opened on helper threads (see `serve_files`), waiting to be installed.
    opened_tx: std::sync::mpsc::Sender<OpenedRoute>,
    opened_rx: Receiver<OpenedRoute>,
    /// The start of the current pass: a coarse clock for activity stamps.
    now: Instant,
    route_serial: u64,
    next_direct_sweep: Instant,
    /// Requests answered by the direct path (shown by `splitos status`).
    direct_responses: u64,
    /// Emptied send buffers kept for reuse, so small sends do not allocate.
    spare: Vec<Vec<u8>>,
    /// Connections in lingering close (see `linger.rs`; may hold released slots, skipped).
    lingering: Vec<SlotIx>,
    /// Where lingering connections' bytes are "read" (with `MSG_TRUNC`, never written).
    discard: Vec<u8>,
    next_housekeeping: Instant,
    pub(crate) busy: Duration,
    /// The migration board's version last seen, and the newest order answered.
    orders_version: u64,
    orders_seen: u64,
    /// The checkpoint consumer fed, if checkpointing is on (`checkpoint.rs`), the switch's
    /// generation last seen, and the connections being quiesced for a snapshot (slot and
    /// generation).
    ckpt: Option<Arc<crate::checkpoint::Hub>>,
    ckpt_generation: u64,
    ckpt_pending: Vec<(SlotIx, u32)>,
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(Errno::IO.raw_os_error())
}

impl Worker {
    pub(crate) fn new(
        id: usize,
        shared: Arc<Shared>,
        inbox: Receiver<NewSession>,
        wake: OwnedFd,
    ) -> std::io::Result<Worker> {
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        Ok(Worker {
            id,
            ring: Ring::new(4096)?,
            shared,
            inbox,
            wake,
            wake_armed: false,
            sessions: Vec::new(),
            free_sessions: Vec::new(),
            sockets: Vec::new(),
            free_sockets: Vec::new(),
            completions: Vec::with_capacity(1024),
            msg: Vec::with_capacity(64 << 10),
            ev: Vec::with_capacity(8 << 10),
            starved: Vec::new(),
            accept_retry: Vec::new(),
            budget_waiters: Vec::new(),
            send_wanted: Vec::new(),
            persistent: HashSet::new(),
            persistent_added: false,
            handed_seen: 0,
            routes: Vec::new(),
            opened_tx,
            opened_rx,
            now: Instant::now(),
            route_serial: 0,
            direct_responses: 0,
            next_direct_sweep: Instant::now(),
            spare: Vec::new(),
            lingering: Vec::new(),
            discard: Vec::new(),
            next_housekeeping: Instant::now(),
            busy: Duration::ZERO,
            orders_version: 0,
            orders_seen: 0,
            ckpt: None,
            ckpt_generation: 0,
            ckpt_pending: Vec::new(),
        })
    }

    /// Runs until the server shuts down.
    pub(crate) fn run(&mut self) {
        let wait = self.shared.config.wait;
        let mut idle_since: Option<Instant> = None;
        while !self.shared.shutdown.load(Ordering::Acquire) {
            let pass_start = Instant::now();
            self.now = pass_start;
            if !self.wake_armed {
                let tag = Tag {
                    op: Op::Wake,
                    session: 0,
                    socket: 0,
                };
                if let Err(e) = self.ring.poll_readable_multi(self.wake.as_fd(), tag) {
                    tracing::error!(worker = self.id, "cannot arm wake-up poll: {e}");
                    return;
                }
                self.wake_armed = true;
            }
            let mut work = self.take_new_sessions();
            work += self.take_opened_routes();
            work += self.take_orders();
            if self.shared.checkpoints.generation() != self.ckpt_generation {
                self.ckpt_refresh();
            }
            if self.shared.registry.has_handed() {
                work += self.adopt_handed();
            }
            for si in self.session_ixs() {
                work += self.serve_requests(si);
            }
            self.start_wanted_sends();
            work += self.reap();
            // Direct-path responses produced while reaping receives.
            self.start_wanted_sends();
            if !self.ckpt_pending.is_empty() {
                self.ckpt_settle();
            }
            self.refill_and_rearm();
            for si in self.session_ixs() {
                self.flush_outbox(si);
            }
            self.collect_sessions();
            if let Err(e) = self.ring.submit_pass(pass_start) {
                tracing::error!(worker = self.id, "io_uring submit failed: {e}");
            }
            if pass_start >= self.next_housekeeping {
                self.housekeeping(pass_start);
            }
            // Sends left for the next pass (a connection that used up its synchronous rounds)
            // are work: sleeping on them would stall a socket that can take more.
            if work > 0 || !self.send_wanted.is_empty() {
                self.busy += pass_start.elapsed();
                idle_since = None;
                continue;
            }
            let since = *idle_since.get_or_insert(pass_start);
            match wait.phase(pass_start.duration_since(since)) {
                Phase::Spin => std::hint::spin_loop(),
                // Give the core to whoever wants it (on a small machine, often the very client
                // or application we are waiting for) before paying for a sleep and a wake-up.
                Phase::Yield => std::thread::yield_now(),
                Phase::Sleep => self.sleep(),
            }
        }
        self.shutdown();
    }

    /// Arms every session's channel and sleeps in io_uring until a completion (a doorbell poll,
    /// a socket operation, a wake-up) or the housekeeping tick.
    fn sleep(&mut self) {
        let mut ready = false;
        for si in 0..self.sessions.len() {
            let Some(s) = self.sessions[si].as_mut() else {
                continue;
            };
            if s.dead {
                continue;
            }
            match s.chan.prepare_wait() {
                Ok(true) => {}
                Ok(false) => ready = true,
                Err(e) => {
                    self.session_failed(SessionIx(si as u32), &e);
                    ready = true;
                }
            }
        }
        if !ready {
            let timeout = self
                .next_housekeeping
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            if let Err(e) = self.ring.submit_and_wait(timeout) {
                tracing::error!(worker = self.id, "io_uring wait failed: {e}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for s in self.sessions.iter_mut().flatten() {
            s.chan.finish_wait();
        }
    }

    fn housekeeping(&mut self, now: Instant) {
        self.next_housekeeping = now + Duration::from_millis(100);
        if self.id == 0 {
            self.shared.registry.expire(now, &self.shared.ledger);
            self.shared.ledger.prune();
        }
        for slot in std::mem::take(&mut self.accept_retry) {
            self.arm_accept(slot);
        }
        for si in self.session_ixs() {
            self.take_passed_files(si);
            self.settle_released_files(si);
        }
        self.retry_budget_waiters();
        if self.routes.iter().any(|r| r.is_some()) && now >= self.next_direct_sweep {
            self.next_direct_sweep = now + Duration::from_secs(1);
            self.sweep_direct(now);
        }
        if !self.lingering.is_empty() {
            self.expire_lingering(now, false);
        }
        if self.ckpt.is_some() {
            self.ckpt_sweep(now);
        }
        // Dead applications' closed connections get a bounded time to flush (and linger).
        let mut overdue = Vec::new();
        for s in self.sessions.iter().flatten() {
            if s.dead_since
                .is_some_and(|t| now.duration_since(t) > LINGER_LIMIT)
            {
                overdue.extend(s.sockets.iter().copied());
            }
        }
        for slot in overdue {
            if let Some(c) = self.conn_mut(slot) {
                if c.linger || c.handoff.is_some() {
                    c.linger = false;
                    c.handoff = None;
                    tracing::debug!(
                        slot = slot.0,
                        "a dead application's connection did not flush in time; aborting it"
                    );
                }
            }
            self.try_finish_close(slot);
        }
        let sessions = self.sessions.iter().flatten().filter(|s| !s.dead);
        let (mut n, mut conns, mut listeners, mut bin, mut bout) = (0u64, 0u64, 0u64, 0u64, 0u64);
        for s in sessions {
            n += 1;
            conns += s.used.get(Res::Conns);
            listeners += s.used.get(Res::Listeners);
            bin += s.bytes_in;
            bout += s.bytes_out;
        }
        if let Some(stats) = &self.shared.stats {
            stats.update_worker(
                self.id,
                &crate::stats::WorkerRow {
                    busy_ns: self.busy.as_nanos() as u64,
                    sessions: n,
                    conns,
                    listeners,
                    bytes_in: bin,
                    bytes_out: bout,
                    updated_unix_ms: crate::stats::unix_ms(),
                    direct_responses: self.direct_responses,
                },
            );
            for (si, s) in self.sessions.iter().enumerate() {
                let slot = self.id * crate::stats::SESSIONS_PER_WORKER + si;
                match s {
                    Some(s) if !s.dead => stats.update_session(
                        slot,
                        &crate::stats::SessionRow {
                            worker: self.id as u64,
                            pid: s.peer.pid.into(),
                            uid: s.peer.uid.into(),
                            conns: s.used.get(Res::Conns),
                            listeners: s.used.get(Res::Listeners),
                            bytes_in: s.bytes_in,
                            bytes_out: s.bytes_out,
                            ring_used: s.chan.tx_backlog(),
                            ring_size: s.chan.ring_bytes(),
                            outbox: s.outbox.len() as u64,
                            name: crate::stats::SessionRow::name_field(&s.name),
                        },
                    ),
                    _ => stats.clear_session(slot),
                }
            }
        }
    }

    fn shutdown(&mut self) {
        for si in self.session_ixs() {
            self.kill_session(si);
        }
        // Lingering connections (of dead sessions too, which `kill_session` skips) end now:
        // the server's exit does not wait for clients to let go.
        self.expire_lingering(Instant::now(), true);
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let _ = self.ring.submit();
            self.reap();
            self.collect_sessions();
            if self.sessions.iter().all(|s| s.is_none()) || Instant::now() >= deadline {
                break;
            }
            let _ = self.ring.submit_and_wait(Duration::from_millis(10));
        }
        let left = self.sessions.iter().flatten().count();
        if left > 0 {
            // The kernel still holds operations on their memory: leak rather than free it.
            tracing::error!(
                worker = self.id,
                left,
                "sessions still busy at shutdown; leaking their memory"
            );
            for s in self.sessions.drain(..).flatten() {
                std::mem::forget(s);
            }
            // Their sockets too: a send in flight reads its connection's queued chunks and
            // gathered iovecs, which would otherwise be freed when the worker drops, after the
            // ring is closed but maybe before the kernel has finished tearing it down. The
            // descriptors are closed (the kernel keeps its own reference while it needs one).
            for slot in self.sockets.drain(..) {
                if let Some(sock) = slot.sock {
                    if sock.inflight > 0 {
                        let Socket { fd, kind, .. } = sock;
                        std::mem::forget(kind);
                        drop(fd);
                    }
                }
            }
        }
    }
}
