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
//! Receive path: each session's m2m buffer pool is registered as an io_uring provided-buffer
//! ring, so the kernel writes received bytes straight into memory the application reads. Small
//! reads are copied inline into the event ring and the buffer goes straight back to the kernel;
//! large ones are handed to the application by descriptor.
//!
//! Send path: bytes arrive inline (copied once, into the connection's queue) or in the
//! application's buffers (sent by the kernel straight from shared memory). One send per
//! connection is in flight at a time, which keeps bytes in order and makes partial sends simple.

use crate::persist::Parked;
use crate::uring::{BufRing, Completion, Op, Ring, Tag};
use crate::Shared;
use rustix::fd::{AsFd, FromRawFd, OwnedFd};
use rustix::io::Errno;
use rustix::net::{self as rnet, sockopt, AddressFamily, SocketFlags, SocketType};
use splitos_file_server::client::FileClient;
use splitos_file_server::segment::Segment;
use splitos_http::respond::Part;
use splitos_m2m::{
    Channel, Error as M2mError, Message, PeerCredentials, Phase, RxBuffer, TxBuffer, WaitPolicy,
};
use splitos_tcp_proto::{
    listen_flags, BufferMeta, Event, Handle, Request, SockOpt, NO_ADDR, RECV_WINDOW, SEND_WINDOW,
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
/// window, accepts at the connection limit.
const MAX_OUTBOX: usize = 1 << 16;
/// How long connections an application closed (or shut down) before it went away keep flushing
/// their queued bytes, as the kernel does for a process that exits after `close`.
const LINGER_LIMIT: Duration = Duration::from_secs(10);
/// How long a shutting-down worker waits for the kernel to finish in-flight operations.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct NewSession {
    pub chan: Channel,
    pub peer: PeerCredentials,
}

enum Out {
    Inline(Vec<u8>),
    Buffer {
        buf: TxBuffer,
        len: usize,
        meta: [u8; BufferMeta::BYTES],
    },
}

struct Session {
    chan: Channel,
    peer: PeerCredentials,
    name: String,
    bufs: BufRing,
    /// Pool buffers currently provided to the kernel, by buffer id.
    provided: Vec<Option<TxBuffer>>,
    free_bids: Vec<u16>,
    outbox: VecDeque<Out>,
    sockets: HashSet<u32>,
    /// File segments the application passed for `SendFile`, by its tag.
    files: HashMap<u64, Arc<Segment>>,
    /// Session-level operations in flight (the wait-fd poll).
    inflight: u32,
    dead: bool,
    /// The application has gone and the requests it left are being served (see
    /// `session_failed`).
    departing: bool,
    /// When the application went away; its closed connections may flush until
    /// [`LINGER_LIMIT`] after that.
    dead_since: Option<Instant>,
    violations: u32,
    conns: u32,
    listeners: u32,
    bytes_in: u64,
    bytes_out: u64,
}

enum Chunk {
    Inline {
        data: Vec<u8>,
        off: usize,
    },
    Buf {
        rx: RxBuffer,
        off: usize,
    },
    /// Bytes the server wrote itself (a response of the direct path): outside the
    /// application's send window, like `File`.
    Direct {
        data: Vec<u8>,
        off: usize,
    },
    /// Bytes of a sealed file segment, sent straight from the shared mapping. They do not
    /// count against the send window (nothing is buffered for them) and earn no `Sent` credit.
    File {
        seg: Arc<Segment>,
        off: usize,
        end: usize,
    },
}

impl Chunk {
    fn remaining(&self) -> usize {
        match self {
            Chunk::Inline { data, off } | Chunk::Direct { data, off } => data.len() - off,
            Chunk::Buf { rx, off } => rx.len() - off,
            Chunk::File { off, end, .. } => end - off,
        }
    }

    /// The unsent bytes, as the kernel will read them.
    fn span(&self) -> (*const u8, usize) {
        match self {
            Chunk::Inline { data, off } | Chunk::Direct { data, off } => {
                (data[*off..].as_ptr(), data.len() - off)
            }
            Chunk::Buf { rx, off } => (rx.as_ptr().wrapping_add(*off), rx.len() - off),
            Chunk::File { seg, off, end } => (seg.bytes()[*off..*end].as_ptr(), end - off),
        }
    }

    fn counts_against_window(&self) -> bool {
        !matches!(self, Chunk::File { .. } | Chunk::Direct { .. })
    }
}

/// File segments one session may have passed to the server at once.
const MAX_FILES_PER_SESSION: usize = 4096;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Recv {
    Idle,
    Armed,
    Cancelling,
}

struct Conn {
    sendq: VecDeque<Chunk>,
    /// Bytes sent by the kernel and not yet reported with `Sent`.
    unreported: u64,
    /// Bytes accepted from the application and not yet confirmed with `Sent`.
    unsent: u64,
    send_inflight: bool,
    /// The send in flight is a wait for the socket to drain (`Op::SendPoll`).
    send_polling: bool,
    recv: Recv,
    /// Bytes delivered to the application and not yet acknowledged with `Consumed`.
    unacked: u64,
    eof: bool,
    failed: bool,
    shutdown_wanted: bool,
    shutdown_done: bool,
    /// The application paused delivery (`Pause`): received bytes wait in `held`.
    paused: bool,
    held: Vec<u8>,
    /// Set by `Handoff`: once the send queue is flushed, the fd and these bytes (then `held`)
    /// go to the next owner of `origin` instead of being closed.
    handoff: Option<Vec<u8>>,
    /// The address of the persistent listener this connection was accepted on, if any: only
    /// such connections can be handed off, because only there is a next owner to find.
    origin: Option<SocketAddr>,
    /// Bytes ever delivered to the application, and whether it ever wrote: a connection of a
    /// dead application with neither is untouched and goes to its successor, not to the bin.
    delivered: u64,
    written: bool,
    /// Queued for a send at the end of this pass (see `want_send`).
    send_wanted: bool,
    /// The application closed or shut down this connection: its queued bytes go out even if
    /// the application then goes away (up to [`LINGER_LIMIT`]).
    linger: bool,
    /// Chunks at the front of `sendq` the send in flight reads from.
    inflight_chunks: usize,
    /// The iovecs of a gathered send in flight, boxed so they stay put while the kernel reads.
    gather: Option<Box<Gather>>,
    /// Answered by the server itself (see `direct`) until the first request it cannot answer.
    direct: Option<Box<crate::direct::Direct>>,
    /// The direct-path route (slot, serial) of the listener it came from, so that the
    /// application can give it back (`ServeDirect`).
    route: Option<(u32, u64)>,
}

/// Chunks gathered into one `sendmsg`.
const MAX_IOV: usize = 8;

/// File ranges at least this long go out by `sendfile` (by page reference) rather than by a
/// send that copies them; below it the copy is cheaper than the extra system call.
const SENDFILE_MIN: usize = 8 * 1024;

/// Synchronous sends one connection may make in a row before others get their turn.
const SEND_NOW_ROUNDS: usize = 16;

/// What [`Worker::send_now`] did.
enum SendNow {
    /// No large file range near the front: use the ring.
    NotApplicable,
    Sent(usize),
    /// The socket takes nothing more now.
    Full,
    Failed(i32),
}

/// Points `iov` at the unsent bytes of `chunks`; returns how many entries it filled.
fn fill_iov<'a>(iov: &mut [libc::iovec], chunks: impl Iterator<Item = &'a Chunk>) -> usize {
    let mut n = 0;
    for (slot, chunk) in iov.iter_mut().zip(chunks) {
        let (ptr, len) = chunk.span();
        *slot = libc::iovec {
            iov_base: ptr as *mut libc::c_void,
            iov_len: len,
        };
        n += 1;
    }
    n
}

struct Gather {
    iov: [libc::iovec; MAX_IOV],
    msg: libc::msghdr,
}

struct ListenSock {
    addr: SocketAddr,
    /// A direct-path route installed by `ServeFiles` (index into `Worker::routes`, serial).
    route: Option<(u32, u64)>,
    flags: u32,
    accepting: bool,
    park: bool,
    orphans: Vec<OwnedFd>,
}

enum Kind {
    Listener(ListenSock),
    Conn(Box<Conn>),
    Connecting { req: u32 },
}

struct Socket {
    session: u32,
    fd: OwnedFd,
    inflight: u32,
    closing: bool,
    kind: Kind,
}

#[derive(Default)]
struct SocketSlot {
    generation: u32,
    sock: Option<Socket>,
}

pub(crate) struct Worker {
    id: usize,
    ring: Ring,
    shared: Arc<Shared>,
    inbox: Receiver<NewSession>,
    wake: OwnedFd,
    wake_armed: bool,
    sessions: Vec<Option<Session>>,
    free_sessions: Vec<u32>,
    sockets: Vec<SocketSlot>,
    free_sockets: Vec<u32>,
    completions: Vec<Completion>,
    msg: Vec<u8>,
    ev: Vec<u8>,
    starved: Vec<u32>,
    accept_retry: Vec<u32>,
    /// Connections given bytes this pass, whose send starts once all requests are read.
    send_wanted: Vec<u32>,
    /// Direct-path routes of this worker's listeners.
    routes: Vec<Option<crate::direct::Route>>,
    /// The start of the current pass: a coarse clock for activity stamps.
    now: Instant,
    route_serial: u64,
    next_direct_sweep: Instant,
    /// Requests answered by the direct path (shown by `splitos status`).
    direct_responses: u64,
    /// Emptied send buffers kept for reuse, so small sends do not allocate.
    spare: Vec<Vec<u8>>,
    next_housekeeping: Instant,
    pub(crate) busy: Duration,
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(Errno::IO.raw_os_error())
}

fn sock_addr(a: rustix::io::Result<rnet::SocketAddrAny>) -> SocketAddr {
    a.ok()
        .and_then(|a| SocketAddr::try_from(a).ok())
        .unwrap_or(NO_ADDR)
}

fn peer_addr(fd: &OwnedFd) -> SocketAddr {
    match rnet::getpeername(fd) {
        Ok(Some(a)) => SocketAddr::try_from(a).unwrap_or(NO_ADDR),
        _ => NO_ADDR,
    }
}

impl Worker {
    pub(crate) fn new(
        id: usize,
        shared: Arc<Shared>,
        inbox: Receiver<NewSession>,
        wake: OwnedFd,
    ) -> std::io::Result<Worker> {
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
            send_wanted: Vec::new(),
            routes: Vec::new(),
            now: Instant::now(),
            route_serial: 0,
            direct_responses: 0,
            next_direct_sweep: Instant::now(),
            spare: Vec::new(),
            next_housekeeping: Instant::now(),
            busy: Duration::ZERO,
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
            if self.shared.registry.has_handed() {
                work += self.adopt_handed();
            }
            for si in 0..self.sessions.len() as u32 {
                work += self.serve_requests(si);
            }
            self.start_wanted_sends();
            work += self.reap();
            // Direct-path responses produced while reaping receives.
            self.start_wanted_sends();
            self.refill_and_rearm();
            for si in 0..self.sessions.len() as u32 {
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
                    self.session_failed(si as u32, &e);
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
            self.shared.registry.expire(now);
        }
        for slot in std::mem::take(&mut self.accept_retry) {
            self.arm_accept(slot);
        }
        if self.routes.iter().any(|r| r.is_some()) && now >= self.next_direct_sweep {
            self.next_direct_sweep = now + Duration::from_secs(1);
            self.sweep_direct(now);
        }
        // Dead applications' lingering connections get a bounded time to flush.
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
                        slot,
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
            conns += s.conns as u64;
            listeners += s.listeners as u64;
            bin += s.bytes_in;
            bout += s.bytes_out;
        }
        if let Some(stats) = &self.shared.stats {
            stats.update_worker(
                self.id,
                self.busy,
                n,
                conns,
                listeners,
                bin,
                bout,
                self.direct_responses,
            );
            for (si, s) in self.sessions.iter().enumerate() {
                let slot = self.id * crate::stats::SESSIONS_PER_WORKER + si;
                match s {
                    Some(s) if !s.dead => stats.update_session(
                        slot,
                        &crate::stats::SessionRow {
                            worker: self.id as u32,
                            pid: s.peer.pid,
                            uid: s.peer.uid,
                            name: &s.name,
                            conns: s.conns,
                            listeners: s.listeners,
                            bytes_in: s.bytes_in,
                            bytes_out: s.bytes_out,
                            ring_used: s.chan.tx_backlog(),
                            ring_size: s.chan.ring_bytes(),
                            outbox: s.outbox.len() as u64,
                        },
                    ),
                    _ => stats.clear_session(slot),
                }
            }
        }
    }

    // ---- sessions ----

    fn take_new_sessions(&mut self) -> usize {
        let mut n = 0;
        while let Ok(ns) = self.inbox.try_recv() {
            n += 1;
            if let Err(e) = self.add_session(ns) {
                tracing::warn!(worker = self.id, "could not set up a session: {e}");
            }
        }
        n
    }

    fn add_session(&mut self, ns: NewSession) -> std::io::Result<()> {
        let si = match self.free_sessions.pop() {
            Some(si) => si,
            None => {
                if self.sessions.len() >= crate::stats::SESSIONS_PER_WORKER {
                    return Err(std::io::Error::other("worker has its maximum of sessions"));
                }
                self.sessions.push(None);
                self.sessions.len() as u32 - 1
            }
        };
        let mut chan = ns.chan;
        chan.set_wait_policy(WaitPolicy::Poll);
        let buf_count = self.shared.config.recv_buffers;
        let bufs = BufRing::new(si as u16, buf_count)?;
        if let Err(e) = self.ring.register_buf_ring(&bufs) {
            self.free_sessions.push(si);
            return Err(e);
        }
        let tag = Tag {
            op: Op::SessionPoll,
            session: si,
            socket: 0,
        };
        self.ring.poll_readable_multi(chan.wait_fd(), tag)?;
        tracing::info!(
            worker = self.id,
            session = si,
            pid = ns.peer.pid,
            uid = ns.peer.uid,
            "session started"
        );
        self.shared.sessions.fetch_add(1, Ordering::AcqRel);
        self.sessions[si as usize] = Some(Session {
            chan,
            peer: ns.peer,
            name: String::new(),
            bufs,
            provided: (0..buf_count).map(|_| None).collect(),
            free_bids: (0..buf_count as u16).rev().collect(),
            outbox: VecDeque::new(),
            sockets: HashSet::new(),
            files: HashMap::new(),
            inflight: 1,
            dead: false,
            departing: false,
            dead_since: None,
            violations: 0,
            conns: 0,
            listeners: 0,
            bytes_in: 0,
            bytes_out: 0,
        });
        self.refill(si);
        Ok(())
    }

    fn session(&mut self, si: u32) -> Option<&mut Session> {
        self.sessions.get_mut(si as usize)?.as_mut()
    }

    fn live_session(&mut self, si: u32) -> Option<&mut Session> {
        self.session(si).filter(|s| !s.dead)
    }

    fn session_failed(&mut self, si: u32, e: &M2mError) {
        let worker = self.id;
        let Some(s) = self.live_session(si) else {
            return;
        };
        if s.departing {
            return; // the call serving its last requests ends the session
        }
        match e {
            M2mError::PeerGone => {
                tracing::info!(worker, session = si, "application left");
                // What it queued before it went still counts: an application that writes a
                // reply, closes and exits expects the reply delivered, even when we notice
                // the exit first (while sending it an event). Bounded: a departed peer adds
                // nothing, so at most a ring's worth of requests is left.
                s.departing = true;
                s.outbox.clear();
                while self.serve_requests(si) > 0 {}
            }
            other => tracing::warn!(worker, session = si, "dropping session: {other}"),
        }
        self.kill_session(si);
    }

    /// Ends a session: persistent listeners are parked, every other socket is closed. Memory
    /// goes once the kernel has finished with it (see `collect_sessions`).
    fn kill_session(&mut self, si: u32) {
        let Some(s) = self.session(si) else { return };
        if s.dead {
            return;
        }
        s.dead = true;
        s.dead_since = Some(Instant::now());
        s.outbox.clear();
        let socks: Vec<u32> = s.sockets.iter().copied().collect();
        let tag = Tag {
            op: Op::Cancel,
            session: si,
            socket: u32::MAX,
        };
        let poll = Tag {
            op: Op::SessionPoll,
            session: si,
            socket: 0,
        };
        if self.ring.cancel(poll, tag).is_ok() {
            if let Some(s) = self.session(si) {
                s.inflight += 1;
            }
        }
        // Parking is for an application's restart, not for the server's own exit.
        let restart = !self.shared.shutdown.load(Ordering::Acquire);
        for slot in socks {
            if let Some(sock) = self.sockets[slot as usize].sock.as_mut() {
                match &mut sock.kind {
                    Kind::Listener(l) => {
                        l.park = l.flags & listen_flags::PERSISTENT != 0 && restart;
                    }
                    // Accepted but never read from or written to (the application died first):
                    // nothing is lost by giving it to the next instance, as a parked
                    // listener's backlog would have.
                    Kind::Conn(c)
                        if restart
                            && !sock.closing
                            && c.origin.is_some()
                            && c.delivered == 0
                            && !c.written
                            && !c.eof
                            && !c.failed
                            && !c.shutdown_wanted =>
                    {
                        c.paused = true;
                        c.handoff = Some(Vec::new());
                    }
                    _ => {}
                }
            }
            self.begin_close(slot, true);
        }
    }

    /// Frees dead sessions the kernel no longer references.
    fn collect_sessions(&mut self) {
        for si in 0..self.sessions.len() {
            let done = matches!(&self.sessions[si], Some(s) if s.dead && s.inflight == 0 && s.sockets.is_empty());
            if !done {
                continue;
            }
            if let Some(s) = self.sessions[si].take() {
                if let Err(e) = self.ring.unregister_buf_ring(s.bufs.group()) {
                    // The ring memory must outlive the registration: leak it rather than risk
                    // the kernel writing into freed memory.
                    tracing::error!("cannot unregister a buffer ring: {e}; leaking it");
                    std::mem::forget(s.bufs);
                    std::mem::forget(s.provided);
                }
                self.free_sessions.push(si as u32);
                self.shared.sessions.fetch_sub(1, Ordering::AcqRel);
                tracing::debug!(worker = self.id, session = si, "session memory released");
            }
        }
    }

    // ---- requests ----

    fn serve_requests(&mut self, si: u32) -> usize {
        let mut n = 0;
        while n < REQUESTS_PER_PASS {
            let mut msg = std::mem::take(&mut self.msg);
            msg.clear();
            let Some(s) = self.live_session(si) else {
                self.msg = msg;
                return n;
            };
            let item = match s.chan.try_recv() {
                Ok(None) => {
                    self.msg = msg;
                    return n;
                }
                Ok(Some(Message::Inline(b))) => {
                    msg.extend_from_slice(b);
                    None
                }
                Ok(Some(Message::Buffer(rx))) => Some(rx),
                Err(e) => {
                    self.msg = msg;
                    self.session_failed(si, &e);
                    return n;
                }
            };
            n += 1;
            match item {
                None => match Request::decode(&msg) {
                    Ok(req) => self.handle_request(si, req),
                    Err(e) => {
                        let op = msg.first().copied().unwrap_or(0);
                        self.violation(si, op, e.errno(), "undecodable request");
                    }
                },
                Some(rx) => match BufferMeta::decode(rx.meta()) {
                    Ok(BufferMeta::Send(h)) => self.send_buffer(si, h, rx),
                    _ => self.violation(
                        si,
                        0,
                        Errno::INVAL.raw_os_error(),
                        "buffer without a send header",
                    ),
                },
            }
            self.msg = msg;
        }
        n
    }

    fn violation(&mut self, si: u32, op: u8, errno: i32, what: &'static str) {
        let Some(s) = self.live_session(si) else {
            return;
        };
        s.violations += 1;
        let over = s.violations > MAX_VIOLATIONS;
        tracing::debug!(session = si, what, "protocol violation");
        self.emit(si, Event::ProtocolError { op, errno });
        if over {
            tracing::warn!(
                worker = self.id,
                session = si,
                "too many protocol violations; dropping the session"
            );
            self.kill_session(si);
        }
    }

    /// The socket `h` names, if it is open and belongs to session `si`.
    fn owned(&mut self, si: u32, h: Handle) -> Option<u32> {
        let slot = self.sockets.get(h.index() as usize)?;
        let sock = slot.sock.as_ref()?;
        (slot.generation == h.generation() && sock.session == si && !sock.closing)
            .then_some(h.index())
    }

    fn handle(&self, slot: u32) -> Handle {
        Handle::new(slot, self.sockets[slot as usize].generation)
    }

    fn conn_mut(&mut self, slot: u32) -> Option<&mut Conn> {
        match &mut self.sockets.get_mut(slot as usize)?.sock.as_mut()?.kind {
            Kind::Conn(c) => Some(c),
            _ => None,
        }
    }

    fn handle_request(&mut self, si: u32, req: Request<'_>) {
        match req {
            Request::Hello { name, .. } => {
                if let Some(s) = self.live_session(si) {
                    s.name = String::from_utf8_lossy(name).into_owned();
                }
            }
            Request::Listen {
                req,
                addr,
                backlog,
                flags,
            } => self.listen(si, req, addr, backlog, flags),
            Request::Connect { req, addr } => self.connect(si, req, addr),
            Request::Send { handle, data } => self.send_inline(si, handle, data),
            Request::ShutdownWrite { handle } => match self.owned(si, handle) {
                Some(slot) => {
                    if let Some(c) = self.conn_mut(slot) {
                        c.shutdown_wanted = true;
                        c.written = true;
                        c.linger = true;
                    }
                    self.try_shutdown(slot);
                }
                None => self.bad_handle(si, handle),
            },
            Request::Close { handle } => match self.owned(si, handle) {
                Some(slot) => {
                    if let Some(c) = self.conn_mut(slot) {
                        c.linger = true;
                    }
                    self.begin_close(slot, false)
                }
                None => self.bad_handle(si, handle),
            },
            Request::SetOption { req, handle, opt } => {
                let Some(slot) = self.owned(si, handle) else {
                    self.emit(
                        si,
                        Event::Failed {
                            req,
                            errno: Errno::BADF.raw_os_error(),
                        },
                    );
                    return;
                };
                let Some(sock) = self.sockets[slot as usize].sock.as_ref() else {
                    return;
                };
                let r = match opt {
                    SockOpt::NoDelay(on) => sockopt::set_tcp_nodelay(&sock.fd, on),
                    SockOpt::KeepAlive(on) => sockopt::set_socket_keepalive(&sock.fd, on),
                };
                let ev = match r {
                    Ok(()) => Event::Done {
                        req,
                        handle,
                        local: NO_ADDR,
                        peer: NO_ADDR,
                    },
                    Err(e) => Event::Failed {
                        req,
                        errno: e.raw_os_error(),
                    },
                };
                self.emit(si, ev);
            }
            Request::Consumed { handle, bytes } => {
                let Some(slot) = self.owned(si, handle) else {
                    return;
                };
                let Some(c) = self.conn_mut(slot) else { return };
                if bytes as u64 > c.unacked {
                    c.unacked = 0;
                    self.violation(
                        si,
                        8,
                        Errno::INVAL.raw_os_error(),
                        "consumed more than delivered",
                    );
                    return;
                }
                c.unacked -= bytes as u64;
                self.maybe_arm_recv(slot);
            }
            Request::SendFile {
                handle,
                file,
                offset,
                len,
            } => self.send_file(si, handle, file, offset, len),
            Request::ReleaseFile { file } => {
                if let Some(s) = self.live_session(si) {
                    s.files.remove(&file);
                }
            }
            Request::Pause { handle } => self.pause(si, handle),
            Request::Handoff { handle, data } => self.handoff(si, handle, data),
            Request::ServeFiles {
                req,
                listener,
                header_timeout_s,
                idle_timeout_s,
                socket,
            } => self.serve_files(si, req, listener, header_timeout_s, idle_timeout_s, socket),
            Request::ServeDirect { handle, received } => {
                self.serve_direct_again(si, handle, received)
            }
        }
    }

    /// Puts a connection the direct path had deferred back on it, if the application has seen
    /// every byte delivered (else the request is moot: the newer bytes are on their way to it).
    fn serve_direct_again(&mut self, si: u32, handle: Handle, received: u64) {
        let Some(slot) = self.owned(si, handle) else {
            self.bad_handle(si, handle);
            return;
        };
        let now = self.now;
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        let Kind::Conn(c) = &mut sock.kind else {
            self.violation(
                si,
                14,
                Errno::NOTSOCK.raw_os_error(),
                "serve-direct on a listener",
            );
            return;
        };
        let idle = !sock.closing
            && c.direct.is_none()
            && !c.paused
            && c.held.is_empty()
            && c.handoff.is_none()
            && !c.eof
            && !c.failed
            && c.delivered == received;
        let Some((route, serial)) = c.route.filter(|_| idle) else {
            return;
        };
        if !matches!(self.routes.get(route as usize), Some(Some(r)) if r.serial == serial) {
            return;
        }
        c.direct = Some(Box::new(crate::direct::Direct {
            route,
            serial,
            buf: Vec::new(),
            last_active: now,
            blocked: false,
        }));
    }

    /// Stops delivering a connection's data to its application; `Paused` marks the end of what
    /// was delivered, later bytes collect in `held` (bounded by the receive window, since the
    /// application never acknowledges them).
    fn pause(&mut self, si: u32, handle: Handle) {
        let Some(slot) = self.owned(si, handle) else {
            self.bad_handle(si, handle);
            return;
        };
        let Some(c) = self.conn_mut(slot) else {
            self.violation(
                si,
                11,
                Errno::NOTSOCK.raw_os_error(),
                "pause of a non-connection",
            );
            return;
        };
        c.paused = true;
        // Bytes the direct path had not answered yet travel with the connection.
        if let Some(d) = c.direct.take() {
            let mut bytes = d.buf;
            bytes.append(&mut c.held);
            c.held = bytes;
        }
        self.emit(si, Event::Paused { handle });
    }

    /// Hands a paused connection to the next owner of its persistent listener's address. It is
    /// released like a close (queued bytes flushed, receive cancelled, nothing in flight), but
    /// the fd goes to the registry instead of being closed.
    fn handoff(&mut self, si: u32, handle: Handle, data: &[u8]) {
        let Some(slot) = self.owned(si, handle) else {
            self.bad_handle(si, handle);
            return;
        };
        // A persistent listener handed off is parked for the next instance, as if its session
        // had died, while this session finishes with its connections.
        if let Some(Socket {
            kind: Kind::Listener(l),
            ..
        }) = self.sockets[slot as usize].sock.as_mut()
        {
            if l.flags & listen_flags::PERSISTENT != 0 && data.is_empty() {
                l.park = true;
                self.begin_close(slot, false);
                return;
            }
        }
        let ok = match self.conn_mut(slot) {
            Some(c) if c.paused && c.origin.is_some() && !c.failed => {
                c.handoff = Some(data.to_vec());
                true
            }
            _ => false,
        };
        if !ok {
            self.violation(
                si,
                12,
                Errno::INVAL.raw_os_error(),
                "hand-off of a connection that is not paused, failed, or not from a persistent listener",
            );
            return;
        }
        self.begin_close(slot, false);
    }

    /// Installs a direct-path route on a listener (see `direct`): this worker connects to the
    /// file server at `socket`, which must belong to the application's user (so an
    /// application cannot make the server talk to someone else's service).
    fn serve_files(
        &mut self,
        si: u32,
        req: u32,
        listener: Handle,
        header_timeout_s: u32,
        idle_timeout_s: u32,
        socket: &[u8],
    ) {
        let fail = |w: &mut Worker, errno: Errno| {
            w.emit(
                si,
                Event::Failed {
                    req,
                    errno: errno.raw_os_error(),
                },
            )
        };
        let Some(slot) = self.owned(si, listener) else {
            return fail(self, Errno::BADF);
        };
        if !matches!(
            self.sockets[slot as usize].sock.as_ref().map(|s| &s.kind),
            Some(Kind::Listener(_))
        ) {
            return fail(self, Errno::NOTSOCK);
        }
        let Some(uid) = self.live_session(si).map(|s| s.peer.uid) else {
            return;
        };
        use std::os::unix::ffi::OsStrExt;
        let path = std::path::Path::new(std::ffi::OsStr::from_bytes(socket));
        let owner = match rustix::fs::stat(path) {
            Ok(st) => st.st_uid,
            Err(e) => return fail(self, e),
        };
        if owner != uid && owner != rustix::process::geteuid().as_raw() {
            tracing::warn!(session = si, path = %path.display(), "ServeFiles refused: the socket belongs to another user");
            return fail(self, Errno::ACCESS);
        }
        let files = match FileClient::connect(path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(session = si, path = %path.display(), "ServeFiles: cannot reach the file server: {e}");
                return fail(self, Errno::CONNREFUSED);
            }
        };
        self.route_serial += 1;
        let route = crate::direct::Route {
            serial: self.route_serial,
            files,
            header_timeout: Duration::from_secs(header_timeout_s.max(1) as u64),
            idle_timeout: Duration::from_secs(idle_timeout_s.max(1) as u64),
        };
        let idx = match self.routes.iter().position(|r| r.is_none()) {
            Some(i) => {
                self.routes[i] = Some(route);
                i
            }
            None => {
                self.routes.push(Some(route));
                self.routes.len() - 1
            }
        } as u32;
        if let Some(Socket {
            kind: Kind::Listener(l),
            ..
        }) = self.sockets[slot as usize].sock.as_mut()
        {
            if let Some((old, _)) = l.route.replace((idx, self.route_serial)) {
                self.routes[old as usize] = None;
            }
        }
        tracing::info!(session = si, path = %path.display(), "direct path installed");
        self.emit(
            si,
            Event::Done {
                req,
                handle: listener,
                local: NO_ADDR,
                peer: NO_ADDR,
            },
        );
    }

    /// Runs the direct path on a connection's buffered bytes (see `direct::serve`).
    fn serve_direct(&mut self, slot: u32) {
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        let si = sock.session;
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        let Some(d) = c.direct.as_mut() else {
            return;
        };
        let serial = d.serial;
        let Some(route) = self
            .routes
            .get_mut(d.route as usize)
            .and_then(|r| r.as_mut())
            .filter(|r| r.serial == serial)
        else {
            // The route went with its listener: the application answers from now on.
            let data = std::mem::take(&mut d.buf);
            c.direct = None;
            self.defer(slot, si, data);
            return;
        };
        let sendq = &mut c.sendq;
        let answered = &mut self.direct_responses;
        let outcome = crate::direct::serve(route, d, sendq.len(), answered, |part| match part {
            Part::Bytes(data) => sendq.push_back(Chunk::Direct { data, off: 0 }),
            Part::File(view, off, len) => {
                for (seg, within, n) in view.pieces(off, len).unwrap_or_default() {
                    sendq.push_back(Chunk::File {
                        seg,
                        off: within as usize,
                        end: (within + n) as usize,
                    });
                }
            }
        });
        match outcome {
            crate::direct::Outcome::More | crate::direct::Outcome::Blocked => {}
            crate::direct::Outcome::Close => {
                c.linger = true;
                c.direct = None;
                self.want_send(slot);
                self.begin_close(slot, false);
                return;
            }
            crate::direct::Outcome::Defer(data) => {
                c.direct = None;
                self.defer(slot, si, data);
            }
        }
        self.want_send(slot);
    }

    /// Applies the routes' timeouts to direct connections: 408 for a head that does not
    /// complete, close for a connection idle (nothing received, nothing to send) too long.
    fn sweep_direct(&mut self, now: Instant) {
        let mut expired = Vec::new();
        for (slot, ss) in self.sockets.iter().enumerate() {
            let Some(Socket {
                kind: Kind::Conn(c),
                closing: false,
                ..
            }) = &ss.sock
            else {
                continue;
            };
            let Some(d) = &c.direct else { continue };
            let Some(r) = self.routes.get(d.route as usize).and_then(|r| r.as_ref()) else {
                continue;
            };
            let quiet = now.saturating_duration_since(d.last_active);
            if !d.buf.is_empty() && quiet > r.header_timeout {
                expired.push((slot as u32, true));
            } else if d.buf.is_empty()
                && quiet > r.idle_timeout
                && c.sendq.is_empty()
                && !c.send_inflight
            {
                expired.push((slot as u32, false));
            }
        }
        for (slot, late_head) in expired {
            if let Some(c) = self.conn_mut(slot) {
                if late_head {
                    c.sendq.push_back(Chunk::Direct {
                        data: crate::direct::timeout_response(),
                        off: 0,
                    });
                }
                c.direct = None;
                c.linger = true;
            }
            self.want_send(slot);
            self.begin_close(slot, false);
        }
    }

    /// Turns a direct connection over to its application, starting with `data`.
    fn defer(&mut self, slot: u32, si: u32, data: Vec<u8>) {
        let handle = self.handle(slot);
        if let Some(c) = self.conn_mut(slot) {
            c.unacked += data.len() as u64;
            c.delivered += data.len() as u64;
        }
        for part in data.chunks(INLINE_DATA_MAX) {
            self.emit(si, Event::Data { handle, data: part });
        }
    }

    /// Adopts connections other instances handed off, for every live persistent listener here.
    fn adopt_handed(&mut self) -> usize {
        let mut targets = Vec::new();
        for si in 0..self.sessions.len() as u32 {
            let Some(s) = self.sessions[si as usize].as_ref().filter(|s| !s.dead) else {
                continue;
            };
            let uid = s.peer.uid;
            for &slot in &s.sockets {
                if let Some(Socket {
                    kind: Kind::Listener(l),
                    closing: false,
                    ..
                }) = self.sockets[slot as usize].sock.as_ref()
                {
                    if l.flags & listen_flags::PERSISTENT != 0 {
                        targets.push((si, slot, l.addr, uid));
                    }
                }
            }
        }
        let mut n = 0;
        for (si, lslot, addr, uid) in targets {
            for h in self.shared.registry.take_handed(addr, uid) {
                n += 1;
                self.adopt(si, lslot, h);
            }
        }
        n
    }

    fn adopt(&mut self, si: u32, listener: u32, h: crate::persist::Handed) {
        let Some(slot) = self.accepted(si, listener, h.fd) else {
            return;
        };
        let handle = self.handle(slot);
        tracing::debug!(
            session = si,
            held = h.data.len(),
            "adopted a handed-off connection"
        );
        let mut data = h.data;
        if let Some(c) = self.conn_mut(slot) {
            c.eof = h.eof;
            if let Some(d) = c.direct.as_mut() {
                // The listener's route is installed already: the handed bytes go through the
                // direct path like any received ones, so responses stay in order.
                d.buf = std::mem::take(&mut data);
            } else {
                c.unacked += data.len() as u64;
                c.delivered += data.len() as u64;
            }
        }
        self.serve_direct(slot);
        for part in data.chunks(INLINE_DATA_MAX) {
            self.emit(si, Event::Data { handle, data: part });
        }
        if h.eof {
            self.emit(si, Event::Eof { handle });
        }
    }

    /// The segment the application tagged `file`, taking newly passed descriptors as needed
    /// (they were sent before the request that names them, so they are already here).
    fn file_segment(&mut self, si: u32, file: u64) -> Option<Arc<Segment>> {
        loop {
            let s = self.live_session(si)?;
            if let Some(seg) = s.files.get(&file) {
                return Some(seg.clone());
            }
            let (tag, mut fds) = match s.chan.try_recv_fds() {
                Ok(Some(m)) => m,
                Ok(None) => return None,
                Err(e) => {
                    self.session_failed(si, &e);
                    return None;
                }
            };
            if fds.len() != 1 || s.files.len() >= MAX_FILES_PER_SESSION {
                return None;
            }
            // Only sealed segments are accepted: their bytes cannot change under a send.
            match Segment::from_received_sealed(fds.remove(0)) {
                Ok(seg) => {
                    s.files.insert(tag, Arc::new(seg));
                }
                Err(_) => return None,
            }
        }
    }

    fn send_file(&mut self, si: u32, handle: Handle, file: u64, offset: u64, len: u64) {
        let Some(seg) = self.file_segment(si, file) else {
            self.violation(
                si,
                9,
                Errno::BADF.raw_os_error(),
                "unknown or unsealed file segment",
            );
            return;
        };
        let in_range = offset.checked_add(len).is_some_and(|end| end <= seg.len());
        if !in_range {
            self.violation(
                si,
                9,
                Errno::INVAL.raw_os_error(),
                "file range out of bounds",
            );
            return;
        }
        let Some(slot) = self.writable(si, handle) else {
            return;
        };
        let Some(c) = self.conn_mut(slot) else {
            return;
        };
        if len > 0 {
            c.sendq.push_back(Chunk::File {
                seg,
                off: offset as usize,
                end: (offset + len) as usize,
            });
        }
        self.want_send(slot);
    }

    /// A request named a handle that is not (or no longer) this session's: a race with a
    /// close the application has not seen yet, or a forgery. Either way it gets EBADF on that
    /// handle and touches nothing.
    fn bad_handle(&mut self, si: u32, handle: Handle) {
        self.emit(
            si,
            Event::Error {
                handle,
                errno: Errno::BADF.raw_os_error(),
            },
        );
    }

    fn alloc_socket(&mut self, si: u32, fd: OwnedFd, kind: Kind) -> u32 {
        let slot = match self.free_sockets.pop() {
            Some(s) => s,
            None => {
                self.sockets.push(SocketSlot::default());
                self.sockets.len() as u32 - 1
            }
        };
        self.sockets[slot as usize].sock = Some(Socket {
            session: si,
            fd,
            inflight: 0,
            closing: false,
            kind,
        });
        if let Some(s) = self.session(si) {
            s.sockets.insert(slot);
        }
        slot
    }

    fn listen(&mut self, si: u32, req: u32, addr: SocketAddr, backlog: u32, flags: u32) {
        let Some(s) = self.live_session(si) else {
            return;
        };
        let (uid, listeners) = (s.peer.uid, s.listeners);
        if !self.shared.config.access.may_listen(uid, addr.port()) {
            tracing::info!(
                uid,
                port = addr.port(),
                "listen refused by the access policy"
            );
            self.emit(
                si,
                Event::Failed {
                    req,
                    errno: Errno::ACCESS.raw_os_error(),
                },
            );
            return;
        }
        if listeners >= self.shared.config.max_listeners_per_session {
            self.emit(
                si,
                Event::Failed {
                    req,
                    errno: Errno::MFILE.raw_os_error(),
                },
            );
            return;
        }
        let (fd, orphans) = match self.shared.registry.take(addr, uid) {
            Some(p) => {
                tracing::info!(%addr, session = si, orphans = p.orphans.len(), "took over a persistent listener");
                (p.fd, p.orphans)
            }
            None => match open_listener(addr, backlog, flags) {
                Ok(fd) => (fd, Vec::new()),
                Err(e) => {
                    self.emit(
                        si,
                        Event::Failed {
                            req,
                            errno: e.raw_os_error(),
                        },
                    );
                    return;
                }
            },
        };
        let local = sock_addr(rnet::getsockname(&fd));
        let slot = self.alloc_socket(
            si,
            fd,
            Kind::Listener(ListenSock {
                addr: local,
                flags,
                accepting: false,
                park: false,
                route: None,
                orphans: Vec::new(),
            }),
        );
        if let Some(s) = self.session(si) {
            s.listeners += 1;
        }
        let handle = self.handle(slot);
        self.emit(
            si,
            Event::Done {
                req,
                handle,
                local,
                peer: NO_ADDR,
            },
        );
        for fd in orphans {
            self.accepted(si, slot, fd);
        }
        self.arm_accept(slot);
    }

    fn arm_accept(&mut self, slot: u32) {
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        let Kind::Listener(l) = &mut sock.kind else {
            return;
        };
        if l.accepting || sock.closing {
            return;
        }
        let tag = Tag {
            op: Op::Accept,
            session: sock.session,
            socket: slot,
        };
        match self.ring.accept_multi(sock.fd.as_fd(), tag) {
            Ok(()) => {
                l.accepting = true;
                sock.inflight += 1;
            }
            Err(e) => tracing::error!("cannot arm accept: {e}"),
        }
    }

    fn connect(&mut self, si: u32, req: u32, addr: SocketAddr) {
        // Outbound connections count against the same per-session limit as accepted ones,
        // from the moment they are started.
        let max = self.shared.config.max_conns_per_session;
        let Some(s) = self.live_session(si) else {
            return;
        };
        if s.conns >= max {
            self.emit(
                si,
                Event::Failed {
                    req,
                    errno: Errno::MFILE.raw_os_error(),
                },
            );
            return;
        }
        let family = if addr.is_ipv4() {
            AddressFamily::INET
        } else {
            AddressFamily::INET6
        };
        let fd = match rnet::socket_with(
            family,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        ) {
            Ok(fd) => fd,
            Err(e) => {
                self.emit(
                    si,
                    Event::Failed {
                        req,
                        errno: e.raw_os_error(),
                    },
                );
                return;
            }
        };
        match rnet::connect(&fd, &addr) {
            Ok(()) | Err(Errno::INPROGRESS) => {}
            Err(e) => {
                self.emit(
                    si,
                    Event::Failed {
                        req,
                        errno: e.raw_os_error(),
                    },
                );
                return;
            }
        }
        let slot = self.alloc_socket(si, fd, Kind::Connecting { req });
        if let Some(s) = self.session(si) {
            s.conns += 1;
        }
        let tag = Tag {
            op: Op::ConnectPoll,
            session: si,
            socket: slot,
        };
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        match self.ring.poll_writable(sock.fd.as_fd(), tag) {
            Ok(()) => sock.inflight += 1,
            Err(e) => {
                self.emit(
                    si,
                    Event::Failed {
                        req,
                        errno: errno_of(&e),
                    },
                );
                self.begin_close(slot, true);
            }
        }
    }

    fn connect_done(&mut self, slot: u32) {
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        let Kind::Connecting { req } = sock.kind else {
            return;
        };
        let si = sock.session;
        if sock.closing {
            return;
        }
        let result = match sockopt::socket_error(&sock.fd) {
            Ok(Ok(())) => rustix::io::ioctl_fionbio(&sock.fd, false),
            Ok(Err(e)) | Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                let local = sock_addr(rnet::getsockname(&sock.fd));
                let peer = peer_addr(&sock.fd);
                sock.kind = Kind::Conn(Box::new(new_conn()));
                let handle = self.handle(slot);
                self.emit(
                    si,
                    Event::Done {
                        req,
                        handle,
                        local,
                        peer,
                    },
                );
                self.maybe_arm_recv(slot);
            }
            Err(e) => {
                self.emit(
                    si,
                    Event::Failed {
                        req,
                        errno: e.raw_os_error(),
                    },
                );
                self.begin_close(slot, true);
            }
        }
    }

    // ---- sending ----

    /// The slot of connection `handle` if it belongs to session `si` and may still be written
    /// to; otherwise reports why on that handle (EBADF, or EPIPE after a shutdown or failure).
    fn writable(&mut self, si: u32, handle: Handle) -> Option<u32> {
        let Some(slot) = self.owned(si, handle) else {
            self.bad_handle(si, handle);
            return None;
        };
        let errno = match self.conn_mut(slot) {
            None => Errno::BADF,
            Some(c) if c.shutdown_wanted || c.failed => Errno::PIPE,
            Some(c) => {
                c.written = true;
                return Some(slot);
            }
        };
        self.emit(
            si,
            Event::Error {
                handle,
                errno: errno.raw_os_error(),
            },
        );
        None
    }

    fn send_inline(&mut self, si: u32, handle: Handle, data: &[u8]) {
        let Some(slot) = self.writable(si, handle) else {
            return;
        };
        let mut spare = self.spare.pop();
        let Some(c) = self.conn_mut(slot) else {
            return;
        };
        if c.unsent + data.len() as u64 > SEND_WINDOW as u64 {
            self.violation(si, 4, Errno::NOBUFS.raw_os_error(), "send window exceeded");
            return;
        }
        c.unsent += data.len() as u64;
        // Coalesce into the last inline chunk unless the kernel is reading from it (growing it
        // could move its bytes).
        let busy_back = c.send_inflight && c.sendq.len() <= c.inflight_chunks;
        match c.sendq.back_mut() {
            Some(Chunk::Inline { data: tail, .. }) if !busy_back && tail.len() < 64 << 10 => {
                tail.extend_from_slice(data)
            }
            _ => {
                let mut v = spare.take().unwrap_or_default();
                v.extend_from_slice(data);
                c.sendq.push_back(Chunk::Inline { data: v, off: 0 });
            }
        }
        if let Some(v) = spare {
            self.spare.push(v);
        }
        self.want_send(slot);
    }

    fn send_buffer(&mut self, si: u32, handle: Handle, rx: RxBuffer) {
        let Some(slot) = self.writable(si, handle) else {
            return;
        };
        let Some(c) = self.conn_mut(slot) else {
            return;
        };
        if c.unsent + rx.len() as u64 > SEND_WINDOW as u64 {
            self.violation(si, 4, Errno::NOBUFS.raw_os_error(), "send window exceeded");
            return;
        }
        c.unsent += rx.len() as u64;
        if !rx.is_empty() {
            c.sendq.push_back(Chunk::Buf { rx, off: 0 });
        }
        self.want_send(slot);
    }

    fn start_wanted_sends(&mut self) {
        for slot in std::mem::take(&mut self.send_wanted) {
            if let Some(c) = self.conn_mut(slot) {
                c.send_wanted = false;
            }
            self.start_send(slot);
        }
    }

    /// Defers the send of a connection that got bytes to the end of the pass, so that a head
    /// and the body requested right after it leave in one gathered send.
    fn want_send(&mut self, slot: u32) {
        if let Some(c) = self.conn_mut(slot) {
            if !c.send_wanted {
                c.send_wanted = true;
                self.send_wanted.push(slot);
            }
        }
    }

    fn start_send(&mut self, slot: u32) {
        // Large file ranges go out synchronously by `sendfile` (see `send_now`) while the
        // socket takes them; everything else, and whatever is left, through the ring.
        for _ in 0..SEND_NOW_ROUNDS {
            match self.send_now(slot) {
                SendNow::NotApplicable => break,
                SendNow::Sent(n) => self.advance_sent(slot, n),
                SendNow::Full => {
                    self.poll_send(slot);
                    return;
                }
                SendNow::Failed(errno) => {
                    self.send_failed(slot, errno);
                    return;
                }
            }
        }
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        let si = sock.session;
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        if c.send_inflight {
            return;
        }
        let Some(front) = c.sendq.front() else {
            self.try_shutdown(slot);
            self.try_finish_close(slot);
            return;
        };
        if matches!(front, Chunk::File { off, end, .. } if end - off >= SENDFILE_MIN) {
            // `SEND_NOW_ROUNDS` ran out with the socket still taking bytes: go on next pass
            // rather than copy a file range through the ring.
            self.want_send(slot);
            return;
        }
        let tag = Tag {
            op: Op::Send,
            session: si,
            socket: slot,
        };
        let chunks = c.sendq.len().min(MAX_IOV);
        let r = if chunks == 1 {
            let (ptr, len) = front.span();
            // SAFETY: the bytes belong to the chunk at the front of this connection's queue.
            // It is neither modified nor dropped until this send's completion is reaped
            // (`sent`), and an RxBuffer keeps the application's mapping alive.
            unsafe {
                self.ring
                    .send(sock.fd.as_fd(), ptr, len.min(u32::MAX as usize) as u32, tag)
            }
        } else {
            let g = c.gather.get_or_insert_with(|| {
                Box::new(Gather {
                    iov: [libc::iovec {
                        iov_base: std::ptr::null_mut(),
                        iov_len: 0,
                    }; MAX_IOV],
                    // SAFETY: msghdr is plain old data; all-zero is its empty value.
                    msg: unsafe { std::mem::zeroed() },
                })
            });
            let n = fill_iov(&mut g.iov, c.sendq.iter().take(chunks));
            g.msg.msg_iov = g.iov.as_mut_ptr();
            g.msg.msg_iovlen = n;
            // SAFETY: as for a single send, for every chunk named; the iovecs and header live
            // in this connection's boxed `Gather`, which is not touched or dropped before the
            // completion is reaped (a connection is released only with nothing in flight).
            unsafe { self.ring.sendmsg(sock.fd.as_fd(), &g.msg, tag) }
        };
        match r {
            Ok(()) => {
                c.send_inflight = true;
                c.inflight_chunks = chunks;
                sock.inflight += 1;
            }
            Err(e) => tracing::error!("cannot queue a send: {e}"),
        }
    }

    /// Sends the front of the queue synchronously when a large file range is at or near the
    /// front: `sendfile` hands the segment's pages to the socket by reference, where a send
    /// from the mapping would copy them (the copy was 16% of the server's CPU serving 16 KiB
    /// files). The bytes before the range (a response head) go first with `MSG_MORE`, so head
    /// and body still share segments. Sockets are non-blocking: a full socket answers `Full`
    /// and never sleeps.
    fn send_now(&mut self, slot: u32) -> SendNow {
        let Some(sock) = self.sockets[slot as usize].sock.as_ref() else {
            return SendNow::NotApplicable;
        };
        let Kind::Conn(c) = &sock.kind else {
            return SendNow::NotApplicable;
        };
        if c.send_inflight || c.failed {
            return SendNow::NotApplicable;
        }
        let Some(pos) =
            c.sendq.iter().take(MAX_IOV).position(
                |ch| matches!(ch, Chunk::File { off, end, .. } if end - off >= SENDFILE_MIN),
            )
        else {
            return SendNow::NotApplicable;
        };
        let r = if pos == 0 {
            let Some(Chunk::File { seg, off, end }) = c.sendq.front() else {
                return SendNow::NotApplicable;
            };
            let mut at = *off as u64;
            rustix::fs::sendfile(&sock.fd, seg.fd(), Some(&mut at), end - off)
        } else {
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOV];
            let n = fill_iov(&mut iov, c.sendq.iter().take(pos));
            // SAFETY: msghdr is plain old data; all-zero is its empty value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = n;
            // SAFETY: the iovecs name the unsent bytes of chunks this connection's queue
            // owns; nothing changes them during this call, which reads them and returns.
            let r = unsafe {
                libc::sendmsg(
                    std::os::fd::AsRawFd::as_raw_fd(&sock.fd),
                    &msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | libc::MSG_MORE,
                )
            };
            if r < 0 {
                Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO))
            } else {
                Ok(r as usize)
            }
        };
        match r {
            Ok(0) | Err(Errno::AGAIN) => SendNow::Full,
            Ok(n) => SendNow::Sent(n),
            Err(Errno::INTR) => SendNow::Sent(0),
            Err(e) => SendNow::Failed(e.raw_os_error()),
        }
    }

    /// Waits (in the ring) for a full socket to take bytes again; the wait counts as the
    /// connection's send in flight, so closing and cancelling treat it as one.
    fn poll_send(&mut self, slot: u32) {
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        let tag = Tag {
            op: Op::SendPoll,
            session: sock.session,
            socket: slot,
        };
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        match self.ring.poll_writable(sock.fd.as_fd(), tag) {
            Ok(()) => {
                c.send_inflight = true;
                c.send_polling = true;
                c.inflight_chunks = 0;
                sock.inflight += 1;
            }
            Err(e) => tracing::error!("cannot queue a poll: {e}"),
        }
    }

    fn sent(&mut self, slot: u32, res: i32) {
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        c.send_inflight = false;
        c.send_polling = false;
        c.inflight_chunks = 0;
        if res == -Errno::AGAIN.raw_os_error() {
            // The socket is non-blocking (for `send_now`), and the ring may then give up on a
            // full socket instead of waiting: nothing was sent, so wait and try again.
            self.poll_send(slot);
            return;
        }
        if res < 0 {
            self.send_failed(slot, -res);
            return;
        }
        self.advance_sent(slot, res as usize);
        self.start_send(slot);
    }

    fn send_failed(&mut self, slot: u32, errno: i32) {
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        let si = sock.session;
        let closing = sock.closing;
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        tracing::debug!(errno, "send failed");
        c.failed = true;
        c.sendq.clear();
        c.unsent = 0;
        if !closing {
            let handle = self.handle(slot);
            self.emit(si, Event::Error { handle, errno });
        }
        self.try_finish_close(slot);
    }

    /// Retires `n` sent bytes from the front of the queue, returning send credit and
    /// resuming a direct connection the full queue had stopped.
    fn advance_sent(&mut self, slot: u32, n: usize) {
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        let si = sock.session;
        let closing = sock.closing;
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        let mut n = n;
        let sent = n as u64;
        // Only window-counted bytes (inline and buffers) come back as credit.
        let mut credited = 0u64;
        while n > 0 {
            let Some(front) = c.sendq.front_mut() else {
                break;
            };
            let take = n.min(front.remaining());
            if front.counts_against_window() {
                credited += take as u64;
            }
            match front {
                Chunk::Inline { off, .. }
                | Chunk::Direct { off, .. }
                | Chunk::Buf { off, .. }
                | Chunk::File { off, .. } => *off += take,
            }
            n -= take;
            if front.remaining() == 0 {
                if let Some(Chunk::Inline { data, .. }) = c.sendq.pop_front() {
                    recycle(&mut self.spare, data);
                }
            }
        }
        c.unsent = c.unsent.saturating_sub(credited);
        // Send credit goes back in quarter-window steps, not per send: the application needs
        // it only before its window fills, and a Sent per small write would double the events.
        c.unreported += credited;
        let report = if c.unreported >= SEND_WINDOW as u64 / 4 {
            Some(std::mem::take(&mut c.unreported))
        } else {
            None
        };
        let queued = c.sendq.len();
        let unblock = match c.direct.as_mut() {
            Some(d) if d.blocked && queued < crate::direct::SENDQ_LIMIT / 2 => {
                d.blocked = false;
                true
            }
            _ => false,
        };
        if let Some(s) = self.session(si) {
            s.bytes_out += sent;
        }
        if unblock && !closing {
            self.serve_direct(slot);
            self.maybe_arm_recv(slot);
        }
        if let (false, Some(bytes)) = (closing, report) {
            let handle = self.handle(slot);
            self.emit(
                si,
                Event::Sent {
                    handle,
                    bytes: bytes as u32,
                },
            );
        }
    }

    fn try_shutdown(&mut self, slot: u32) {
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        if c.shutdown_wanted && !c.shutdown_done && c.sendq.is_empty() && !c.send_inflight {
            c.shutdown_done = true;
            let _ = rnet::shutdown(&sock.fd, rnet::Shutdown::Write);
        }
    }

    // ---- receiving ----

    fn maybe_arm_recv(&mut self, slot: u32) {
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        let si = sock.session;
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        if sock.closing
            || c.recv != Recv::Idle
            || c.eof
            || c.failed
            || c.unacked >= RECV_WINDOW as u64 / 2
            || c.direct.as_ref().is_some_and(|d| d.blocked)
        {
            return;
        }
        let Some(s) = self.sessions.get(si as usize).and_then(|s| s.as_ref()) else {
            return;
        };
        let tag = Tag {
            op: Op::Recv,
            session: si,
            socket: slot,
        };
        match self.ring.recv_multi(sock.fd.as_fd(), s.bufs.group(), tag) {
            Ok(()) => {
                c.recv = Recv::Armed;
                sock.inflight += 1;
            }
            Err(e) => tracing::error!("cannot arm a receive: {e}"),
        }
    }

    fn received(&mut self, slot: u32, cqe: &Completion) {
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        let si = sock.session;
        // The buffer the kernel filled, if any, comes out of the provided set first.
        let buf = cqe.buffer.and_then(|bid| {
            let s = self.sessions.get_mut(si as usize)?.as_mut()?;
            let b = s.provided.get_mut(bid as usize)?.take();
            s.free_bids.push(bid);
            b
        });
        let closing = sock.closing;
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        if !cqe.more {
            c.recv = Recv::Idle;
            sock.inflight -= 1;
        }
        let res = cqe.result;
        if c.paused {
            // Delivery is paused (for a hand-off): bytes, EOF and errors stay with the
            // connection and travel with it.
            if res > 0 {
                let n = res as usize;
                if let Some(b) = &buf {
                    let at = c.held.len();
                    c.held.resize(at + n, 0);
                    b.read_at(0, &mut c.held[at..]);
                }
                c.unacked += n as u64;
                if c.unacked >= RECV_WINDOW as u64 && c.recv == Recv::Armed {
                    c.recv = Recv::Cancelling;
                    self.cancel(slot, Op::Recv);
                }
            } else if res == 0 {
                c.eof = true;
            } else if res == -Errno::NOBUFS.raw_os_error() {
                self.starved.push(slot);
            } else if res != -Errno::CANCELED.raw_os_error() && res != -Errno::AGAIN.raw_os_error()
            {
                c.failed = true;
            }
            if let Some(b) = buf {
                self.provide(si, b);
            }
            if !cqe.more {
                self.maybe_arm_recv(slot);
                self.try_finish_close(slot);
            }
            return;
        }
        if res > 0 && !closing {
            if let Some(d) = c.direct.as_mut() {
                let n = res as usize;
                if let Some(b) = &buf {
                    let at = d.buf.len();
                    d.buf.resize(at + n, 0);
                    b.read_at(0, &mut d.buf[at..]);
                }
                d.last_active = self.now;
                if let Some(b) = buf {
                    self.provide(si, b);
                }
                if let Some(s) = self.session(si) {
                    s.bytes_in += n as u64;
                }
                self.serve_direct(slot);
                if !cqe.more {
                    self.maybe_arm_recv(slot);
                    self.try_finish_close(slot);
                }
                return;
            }
        }
        let handle = Handle::new(slot, self.sockets[slot as usize].generation);
        if res > 0 && !closing {
            let n = res as usize;
            let Some(buf) = buf else {
                tracing::error!("receive completion without a buffer");
                return;
            };
            if let Some(c) = self.conn_mut(slot) {
                c.unacked += n as u64;
                c.delivered += n as u64;
            }
            if let Some(s) = self.session(si) {
                s.bytes_in += n as u64;
            }
            if n <= INLINE_DATA_MAX {
                // Encode the Data event in place: header, then the bytes straight from the
                // buffer, then one copy into the ring.
                let mut ev = std::mem::take(&mut self.ev);
                ev.clear();
                Event::Data { handle, data: &[] }.encode(&mut ev);
                ev.resize(Event::DATA_HEADER + n, 0);
                buf.read_at(0, &mut ev[Event::DATA_HEADER..]);
                self.ev = ev;
                self.emit_encoded(si);
                self.provide(si, buf);
            } else {
                self.emit_buffer(si, buf, n, BufferMeta::Data(handle));
            }
            if let Some(c) = self.conn_mut(slot) {
                if c.unacked >= RECV_WINDOW as u64 && c.recv == Recv::Armed {
                    c.recv = Recv::Cancelling;
                    self.cancel(slot, Op::Recv);
                }
            }
        } else {
            if let Some(b) = buf {
                self.provide(si, b);
            }
            if res == 0 && !closing {
                if let Some(c) = self.conn_mut(slot) {
                    c.eof = true;
                }
                self.emit(si, Event::Eof { handle });
            } else if res == -Errno::NOBUFS.raw_os_error() {
                self.starved.push(slot);
            } else if res == -Errno::AGAIN.raw_os_error() {
                // Nothing to read on the non-blocking socket after all: re-armed below.
                tracing::trace!("receive gave EAGAIN");
            } else if res < 0 && res != -Errno::CANCELED.raw_os_error() && !closing {
                if let Some(c) = self.conn_mut(slot) {
                    c.failed = true;
                }
                self.emit(
                    si,
                    Event::Error {
                        handle,
                        errno: -res,
                    },
                );
            }
        }
        if !cqe.more {
            self.maybe_arm_recv(slot);
            self.try_finish_close(slot);
        }
    }

    /// Gives a buffer back to the kernel's provided set.
    fn provide(&mut self, si: u32, mut buf: TxBuffer) {
        let Some(s) = self.session(si) else { return };
        if s.dead {
            return;
        }
        let Some(bid) = s.free_bids.pop() else { return };
        let cap = buf.capacity() as u32;
        // SAFETY: the buffer is a pool slot this server owns (allocated, not sent); it stays in
        // `provided` until the kernel returns it in a completion, and the session's memory is
        // kept until the ring is unregistered.
        unsafe { s.bufs.push(buf.as_mut_ptr(), cap, bid) };
        s.bufs.publish();
        s.provided[bid as usize] = Some(buf);
    }

    /// Tops up every session's provided buffers from its pool (buffers come back as the
    /// application drops them) and re-arms receives that ran out of buffers.
    fn refill_and_rearm(&mut self) {
        for si in 0..self.sessions.len() as u32 {
            self.refill(si);
        }
        if self.starved.is_empty() {
            return;
        }
        let starved = std::mem::take(&mut self.starved);
        for slot in starved {
            let has_bufs = self.sockets[slot as usize]
                .sock
                .as_ref()
                .and_then(|s| self.sessions.get(s.session as usize)?.as_ref())
                .is_some_and(|s| s.free_bids.len() < s.provided.len());
            if has_bufs {
                self.maybe_arm_recv(slot);
            } else {
                self.starved.push(slot);
            }
        }
    }

    fn refill(&mut self, si: u32) {
        let Some(s) = self.live_session(si) else {
            return;
        };
        let mut pushed = false;
        while !s.free_bids.is_empty() {
            match s.chan.alloc_buffer() {
                Ok(Some(mut buf)) => {
                    let Some(bid) = s.free_bids.pop() else { break };
                    let cap = buf.capacity() as u32;
                    // SAFETY: as in `provide`.
                    unsafe { s.bufs.push(buf.as_mut_ptr(), cap, bid) };
                    s.provided[bid as usize] = Some(buf);
                    pushed = true;
                }
                Ok(None) => break,
                Err(e) => {
                    self.session_failed(si, &e);
                    return;
                }
            }
        }
        if pushed {
            s.bufs.publish();
        }
    }

    // ---- accepting ----

    fn accepted(&mut self, si: u32, listener: u32, fd: OwnedFd) -> Option<u32> {
        let max = self.shared.config.max_conns_per_session;
        let (origin, route) = match self.sockets[listener as usize]
            .sock
            .as_ref()
            .map(|s| &s.kind)
        {
            Some(Kind::Listener(l)) => (
                (l.flags & listen_flags::PERSISTENT != 0).then_some(l.addr),
                l.route,
            ),
            _ => (None, None),
        };
        let s = self.live_session(si)?;
        if s.conns >= max {
            tracing::warn!(
                session = si,
                max,
                "connection limit reached; refusing a connection"
            );
            return None; // dropping fd closes it
        }
        s.conns += 1;
        let local = sock_addr(rnet::getsockname(&fd));
        let peer = peer_addr(&fd);
        let mut conn = Box::new(new_conn());
        conn.origin = origin;
        conn.route = route;
        conn.direct = route.map(|(route, serial)| {
            Box::new(crate::direct::Direct {
                route,
                serial,
                buf: Vec::new(),
                last_active: self.now,
                blocked: false,
            })
        });
        let slot = self.alloc_socket(si, fd, Kind::Conn(conn));
        let conn = self.handle(slot);
        let listener = self.handle(listener);
        self.emit(
            si,
            Event::Accepted {
                listener,
                conn,
                local,
                peer,
            },
        );
        self.maybe_arm_recv(slot);
        Some(slot)
    }

    fn accept_completion(&mut self, slot: u32, cqe: &Completion) {
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        let si = sock.session;
        let closing = sock.closing;
        if !cqe.more {
            sock.inflight -= 1;
        }
        let Kind::Listener(l) = &mut sock.kind else {
            return;
        };
        if !cqe.more {
            l.accepting = false;
        }
        if cqe.result >= 0 {
            // SAFETY: a successful accept completion's result is a new fd that nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(cqe.result) };
            if closing {
                if l.park {
                    l.orphans.push(fd);
                }
            } else {
                self.accepted(si, slot, fd);
            }
        } else if cqe.result != -Errno::CANCELED.raw_os_error() {
            tracing::warn!(errno = -cqe.result, "accept failed");
        }
        if !cqe.more {
            if cqe.result < 0 && cqe.result != -Errno::CANCELED.raw_os_error() {
                // e.g. EMFILE: retry at the next housekeeping tick rather than spin.
                self.accept_retry.push(slot);
            } else {
                self.arm_accept(slot);
            }
            self.try_finish_close(slot);
        }
    }

    // ---- closing ----

    fn cancel(&mut self, slot: u32, op: Op) {
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        let target = Tag {
            op,
            session: sock.session,
            socket: slot,
        };
        let tag = Tag {
            op: Op::Cancel,
            session: sock.session,
            socket: slot,
        };
        if self.ring.cancel(target, tag).is_ok() {
            sock.inflight += 1;
        }
    }

    /// Starts closing a socket: a connection first flushes what the application queued
    /// (unless `abort`), then its receive is cancelled; the fd is closed once the kernel holds
    /// no operation on it.
    fn begin_close(&mut self, slot: u32, abort: bool) {
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        if !sock.closing {
            sock.closing = true;
        }
        match &mut sock.kind {
            // A connection being handed off still flushes: the next owner's responses must
            // follow complete ones.
            Kind::Conn(c) if abort && c.handoff.is_none() && !c.linger => {
                if !c.send_inflight {
                    c.sendq.clear();
                }
                c.unsent = 0;
            }
            _ => {}
        }
        self.try_finish_close(slot);
    }

    fn try_finish_close(&mut self, slot: u32) {
        let Some(sock) = self.sockets[slot as usize].sock.as_mut() else {
            return;
        };
        if !sock.closing {
            return;
        }
        let dead = self
            .sessions
            .get(sock.session as usize)
            .and_then(|s| s.as_ref())
            .is_none_or(|s| s.dead);
        let mut cancel = None;
        match &mut sock.kind {
            Kind::Conn(c) => {
                let abort = dead && c.handoff.is_none() && !c.linger;
                if abort && !c.send_inflight {
                    c.sendq.clear();
                }
                if !c.sendq.is_empty() || c.send_inflight {
                    if abort && c.send_inflight {
                        cancel = Some(if c.send_polling {
                            Op::SendPoll
                        } else {
                            Op::Send
                        });
                    } else {
                        return; // flushing
                    }
                } else if c.recv == Recv::Armed {
                    c.recv = Recv::Cancelling;
                    cancel = Some(Op::Recv);
                }
            }
            Kind::Listener(l) => {
                if l.accepting {
                    l.accepting = false;
                    cancel = Some(Op::Accept);
                }
            }
            Kind::Connecting { .. } => {
                if sock.inflight > 0 {
                    cancel = Some(Op::ConnectPoll);
                }
            }
        }
        if let Some(op) = cancel {
            self.cancel(slot, op);
            return;
        }
        if sock.inflight > 0 {
            return;
        }
        // Nothing in flight: release the socket.
        let Some(sock) = self.sockets[slot as usize].sock.take() else {
            return;
        };
        let si = sock.session;
        let handle = self.handle(slot);
        self.sockets[slot as usize].generation =
            self.sockets[slot as usize].generation.wrapping_add(1);
        self.free_sockets.push(slot);
        let was_conn = matches!(sock.kind, Kind::Conn(_) | Kind::Connecting { .. });
        // A socket whose connect failed never had a handle the application saw.
        let issued = !matches!(sock.kind, Kind::Connecting { .. });
        let uid = self.sessions[si as usize]
            .as_ref()
            .map_or(u32::MAX, |s| s.peer.uid);
        if let Kind::Conn(c) = sock.kind {
            if let (Some(mut data), Some(origin), false) = (c.handoff, c.origin, c.failed) {
                data.extend_from_slice(&c.held);
                tracing::debug!(%origin, held = data.len(), "connection handed off");
                self.shared.registry.hand_over(
                    origin,
                    crate::persist::Handed {
                        fd: sock.fd,
                        uid,
                        data,
                        eof: c.eof,
                        deadline: Instant::now() + self.shared.config.persist_grace,
                    },
                );
                self.shared.wake_all();
            }
        } else if let Kind::Listener(l) = sock.kind {
            if let Some((r, _)) = l.route {
                self.routes[r as usize] = None;
            }
            if l.park {
                self.shared.registry.park(
                    l.addr,
                    Parked {
                        fd: sock.fd,
                        uid,
                        orphans: l.orphans,
                        deadline: Instant::now() + self.shared.config.persist_grace,
                    },
                );
            }
        }
        if let Some(s) = self.session(si) {
            s.sockets.remove(&slot);
            if was_conn {
                s.conns = s.conns.saturating_sub(1);
            }
            if !s.dead && issued {
                self.emit(si, Event::Closed { handle });
            }
        }
    }

    // ---- completions ----

    fn reap(&mut self) -> usize {
        let mut cqes = std::mem::take(&mut self.completions);
        cqes.clear();
        self.ring.reap(&mut cqes, 4096);
        let n = cqes.len();
        for cqe in &cqes {
            let Some(tag) = cqe.tag else { continue };
            match tag.op {
                Op::Accept => self.accept_completion(tag.socket, cqe),
                Op::Recv => self.received(tag.socket, cqe),
                Op::Send => {
                    if let Some(sock) = self
                        .sockets
                        .get_mut(tag.socket as usize)
                        .and_then(|s| s.sock.as_mut())
                    {
                        sock.inflight -= 1;
                    }
                    self.sent(tag.socket, cqe.result);
                }
                Op::SendPoll => {
                    if let Some(sock) = self
                        .sockets
                        .get_mut(tag.socket as usize)
                        .and_then(|s| s.sock.as_mut())
                    {
                        sock.inflight -= 1;
                    }
                    // Readiness sent nothing; an error (a cancel) fails the connection.
                    self.sent(tag.socket, cqe.result.min(0));
                }
                Op::ConnectPoll => {
                    if let Some(sock) = self
                        .sockets
                        .get_mut(tag.socket as usize)
                        .and_then(|s| s.sock.as_mut())
                    {
                        sock.inflight -= 1;
                    }
                    self.connect_done(tag.socket);
                    self.try_finish_close(tag.socket);
                }
                Op::Cancel => {
                    if tag.socket == u32::MAX {
                        if let Some(s) = self.session(tag.session) {
                            s.inflight -= 1;
                        }
                    } else if let Some(sock) = self
                        .sockets
                        .get_mut(tag.socket as usize)
                        .and_then(|s| s.sock.as_mut())
                    {
                        sock.inflight -= 1;
                        self.try_finish_close(tag.socket);
                    }
                }
                Op::SessionPoll => {
                    if !cqe.more {
                        let rearm = match self.session(tag.session) {
                            Some(s) => {
                                s.inflight -= 1;
                                !s.dead
                            }
                            None => false,
                        };
                        if rearm {
                            self.rearm_session_poll(tag.session);
                        }
                    }
                }
                Op::Wake => {
                    crate::drain_eventfd(&self.wake);
                    if !cqe.more {
                        self.wake_armed = false;
                    }
                }
            }
        }
        self.completions = cqes;
        n
    }

    fn rearm_session_poll(&mut self, si: u32) {
        let tag = Tag {
            op: Op::SessionPoll,
            session: si,
            socket: 0,
        };
        let Some(s) = self.sessions.get_mut(si as usize).and_then(|s| s.as_mut()) else {
            return;
        };
        if self.ring.poll_readable_multi(s.chan.wait_fd(), tag).is_ok() {
            s.inflight += 1;
        }
    }

    // ---- events ----

    fn emit(&mut self, si: u32, ev: Event<'_>) {
        self.ev.clear();
        ev.encode(&mut self.ev);
        self.emit_encoded(si);
    }

    /// Sends the event encoded in `self.ev`, queueing it if the ring is full.
    fn emit_encoded(&mut self, si: u32) {
        let buf = std::mem::take(&mut self.ev);
        let r = match self.live_session(si) {
            None => Ok(()),
            Some(s) if !s.outbox.is_empty() => {
                s.outbox.push_back(Out::Inline(buf.clone()));
                Ok(())
            }
            Some(s) => match s.chan.try_send(&buf) {
                Ok(true) => Ok(()),
                Ok(false) => {
                    s.outbox.push_back(Out::Inline(buf.clone()));
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        self.ev = buf;
        self.after_emit(si, r);
    }

    fn emit_buffer(&mut self, si: u32, buf: TxBuffer, len: usize, meta: BufferMeta) {
        let meta = meta.encode();
        let r = match self.live_session(si) {
            None => Ok(()),
            Some(s) if !s.outbox.is_empty() => {
                s.outbox.push_back(Out::Buffer { buf, len, meta });
                Ok(())
            }
            Some(s) => match s.chan.try_send_buffer_with(buf, len, &meta) {
                Ok(None) => Ok(()),
                Ok(Some(buf)) => {
                    s.outbox.push_back(Out::Buffer { buf, len, meta });
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        self.after_emit(si, r);
    }

    fn after_emit(&mut self, si: u32, r: Result<(), M2mError>) {
        if let Err(e) = r {
            self.session_failed(si, &e);
            return;
        }
        let over = self
            .live_session(si)
            .is_some_and(|s| s.outbox.len() > MAX_OUTBOX);
        if over {
            tracing::warn!(
                worker = self.id,
                session = si,
                "application stopped reading events; dropping it"
            );
            self.kill_session(si);
        }
    }

    fn flush_outbox(&mut self, si: u32) {
        let Some(s) = self.live_session(si) else {
            return;
        };
        while let Some(out) = s.outbox.pop_front() {
            let r = match out {
                Out::Inline(bytes) => match s.chan.try_send(&bytes) {
                    Ok(true) => Ok(None),
                    Ok(false) => Ok(Some(Out::Inline(bytes))),
                    Err(e) => Err(e),
                },
                Out::Buffer { buf, len, meta } => {
                    match s.chan.try_send_buffer_with(buf, len, &meta) {
                        Ok(None) => Ok(None),
                        Ok(Some(buf)) => Ok(Some(Out::Buffer { buf, len, meta })),
                        Err(e) => Err(e),
                    }
                }
            };
            match r {
                Ok(None) => {}
                Ok(Some(back)) => {
                    s.outbox.push_front(back);
                    return;
                }
                Err(e) => {
                    self.session_failed(si, &e);
                    return;
                }
            }
        }
    }

    // ---- shutdown ----

    fn shutdown(&mut self) {
        for si in 0..self.sessions.len() as u32 {
            self.kill_session(si);
        }
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
        }
    }
}

/// Keeps an emptied send buffer for reuse (a bounded number, of bounded size).
fn recycle(spare: &mut Vec<Vec<u8>>, mut v: Vec<u8>) {
    if spare.len() < 1024 && v.capacity() <= 64 << 10 {
        v.clear();
        spare.push(v);
    }
}

fn new_conn() -> Conn {
    Conn {
        sendq: VecDeque::new(),
        unreported: 0,
        unsent: 0,
        send_inflight: false,
        send_polling: false,
        route: None,
        recv: Recv::Idle,
        unacked: 0,
        eof: false,
        failed: false,
        shutdown_wanted: false,
        shutdown_done: false,
        paused: false,
        held: Vec::new(),
        handoff: None,
        origin: None,
        delivered: 0,
        written: false,
        send_wanted: false,
        linger: false,
        inflight_chunks: 0,
        gather: None,
        direct: None,
    }
}

fn open_listener(addr: SocketAddr, backlog: u32, flags: u32) -> rustix::io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rnet::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    if flags & listen_flags::REUSE_ADDR != 0 {
        sockopt::set_socket_reuseaddr(&fd, true)?;
    }
    if flags & listen_flags::REUSE_PORT != 0 {
        sockopt::set_socket_reuseport(&fd, true)?;
    }
    rnet::bind(&fd, &addr)?;
    rnet::listen(&fd, backlog.clamp(1, 65535) as i32)?;
    Ok(fd)
}
