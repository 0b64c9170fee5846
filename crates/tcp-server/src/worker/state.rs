//! The worker's state types: sessions, socket slots, connections and their send queues.

use super::*;

/// A session's index in `Worker::sessions` (also its buffer group and its tags' `session`).
/// Distinct from [`SlotIx`] so that the compiler catches a swapped pair.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) struct SessionIx(pub(super) u32);

/// A socket's index in `Worker::sockets` (the index half of its `Handle`, its tags' `socket`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) struct SlotIx(pub(super) u32);

impl SessionIx {
    pub(super) fn ix(self) -> usize {
        self.0 as usize
    }
}

impl SlotIx {
    pub(super) fn ix(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for SessionIx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Display for SlotIx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::ops::Index<SessionIx> for Vec<Option<Session>> {
    type Output = Option<Session>;
    fn index(&self, si: SessionIx) -> &Option<Session> {
        &self[si.ix()]
    }
}

impl std::ops::IndexMut<SessionIx> for Vec<Option<Session>> {
    fn index_mut(&mut self, si: SessionIx) -> &mut Option<Session> {
        &mut self[si.ix()]
    }
}

impl std::ops::Index<SlotIx> for Vec<SocketSlot> {
    type Output = SocketSlot;
    fn index(&self, slot: SlotIx) -> &SocketSlot {
        &self[slot.ix()]
    }
}

impl std::ops::IndexMut<SlotIx> for Vec<SocketSlot> {
    fn index_mut(&mut self, slot: SlotIx) -> &mut SocketSlot {
        &mut self[slot.ix()]
    }
}

pub(super) enum Out {
    Inline(Vec<u8>),
    Buffer {
        buf: TxBuffer,
        len: usize,
        meta: [u8; BufferMeta::BYTES],
    },
}

pub(super) struct Session {
    pub(super) chan: Channel,
    pub(super) peer: PeerCredentials,
    pub(super) name: String,
    pub(super) bufs: BufRing,
    /// Pool buffers currently provided to the kernel, by buffer id.
    pub(super) provided: Vec<Option<TxBuffer>>,
    pub(super) free_bids: Vec<u16>,
    pub(super) outbox: VecDeque<Out>,
    pub(super) sockets: HashSet<SlotIx>,
    /// Files the application passed for `SendFile`, by its tag.
    pub(super) files: HashMap<u64, SessionFile>,
    /// Tags of files refused over a budget, with the errno (see `send::MAX_REFUSED_FILES`).
    pub(super) refused_files: HashMap<u64, i32>,
    /// Files released while queued sends still read them: still charged until then.
    pub(super) releasing: Vec<SessionFile>,
    /// Session-level operations in flight (the wait-fd poll).
    pub(super) inflight: u32,
    pub(super) dead: bool,
    /// The application has gone and the requests it left are being served (see
    /// `session_failed`).
    pub(super) departing: bool,
    /// Ring bytes (record footprints) a departing session may still have served: what its
    /// ring held when it went. More means it is still writing after declaring itself gone.
    pub(super) drain_left: u64,
    /// When the application went away; its closed connections may flush until
    /// [`LINGER_LIMIT`] after that.
    pub(super) dead_since: Option<Instant>,
    pub(super) violations: u32,
    /// A `ServeFiles` route is being opened for it (one at a time).
    pub(super) opening_route: bool,
    /// Its user's budget account (see `crate::budget`), and what this session holds of each
    /// budget (its connections and listeners among them).
    pub(super) acct: Arc<crate::budget::Account>,
    pub(super) used: super::budget::Used,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
}

/// A file an application passed for `SendFile`.
#[derive(Clone)]
pub(super) enum SessionFile {
    /// A sealed segment of the file cache, mapped.
    Segment(Arc<Segment>),
    /// A regular file passed by reference (`PLAIN_FILE_TAG`), never mapped.
    Plain(Arc<PlainFile>),
}

impl SessionFile {
    /// Whether this is the last reference (no queued send reads it any more).
    pub(super) fn last_holder(&self) -> bool {
        match self {
            SessionFile::Segment(s) => Arc::strong_count(s) == 1,
            SessionFile::Plain(p) => Arc::strong_count(p) == 1,
        }
    }

    /// Address space it takes (`file-bytes`): a segment is mapped whole, a plain file not.
    pub(super) fn mapped_bytes(&self) -> u64 {
        match self {
            SessionFile::Segment(s) => s.len(),
            SessionFile::Plain(_) => 0,
        }
    }
}

/// Bytes queued on a connection. Never empty: an empty chunk would be "sent" as 0 bytes, which
/// retires nothing, so it would stay at the front of the queue for good.
pub(super) enum Chunk {
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
    /// Bytes of a sealed file segment, sent straight from the shared mapping. Their bytes do
    /// not count against the send window (nothing is buffered for them); a range the
    /// application queued (`charged`) costs `SEND_FILE_COST`, credited back once it is sent.
    File {
        seg: Arc<Segment>,
        off: usize,
        end: usize,
        charged: bool,
    },
    /// Bytes of a regular file passed by reference: never mapped, always sent by `sendfile`
    /// (from the page cache), never gathered into a ring send. Outside the send window like
    /// `File`. A file that ends before `end` (it shrank) fails the connection.
    Plain {
        file: Arc<PlainFile>,
        off: usize,
        end: usize,
        charged: bool,
    },
}

impl Chunk {
    pub(super) fn remaining(&self) -> usize {
        match self {
            Chunk::Inline { data, off } | Chunk::Direct { data, off } => data.len() - off,
            Chunk::Buf { rx, off } => rx.len() - off,
            Chunk::File { off, end, .. } | Chunk::Plain { off, end, .. } => end - off,
        }
    }

    /// The unsent bytes, as the kernel will read them.
    pub(super) fn span(&self) -> (*const u8, usize) {
        match self {
            Chunk::Inline { data, off } | Chunk::Direct { data, off } => {
                (data[*off..].as_ptr(), data.len() - off)
            }
            Chunk::Buf { rx, off } => (rx.as_ptr().wrapping_add(*off), rx.len() - off),
            Chunk::File { seg, off, end, .. } => (seg.bytes()[*off..*end].as_ptr(), end - off),
            // Not in memory: the send paths stop before a `Plain` chunk (see `send_now`), so
            // no iovec is ever built from it; if one were, it would be empty.
            Chunk::Plain { .. } => (std::ptr::NonNull::<u8>::dangling().as_ptr(), 0),
        }
    }

    pub(super) fn counts_against_window(&self) -> bool {
        !matches!(
            self,
            Chunk::File { .. } | Chunk::Direct { .. } | Chunk::Plain { .. }
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Recv {
    Idle,
    Armed,
    Cancelling,
}

pub(super) struct Conn {
    pub(super) sendq: VecDeque<Chunk>,
    /// Bytes sent by the kernel and not yet reported with `Sent`.
    pub(super) unreported: u64,
    /// Bytes accepted from the application and not yet confirmed with `Sent`.
    pub(super) unsent: u64,
    /// The one send in flight, if any (invariant 2), and the memory it lends the kernel.
    pub(super) send: InflightSend,
    pub(super) recv: Recv,
    /// Bytes delivered to the application and not yet acknowledged with `Consumed`.
    pub(super) unacked: u64,
    pub(super) eof: bool,
    pub(super) failed: bool,
    pub(super) shutdown_wanted: bool,
    pub(super) shutdown_done: bool,
    /// The application paused delivery (`Pause`): received bytes wait in `held` (at most
    /// `recv::HELD_MAX`, whatever the application acknowledges).
    pub(super) paused: bool,
    pub(super) held: Vec<u8>,
    /// Set by `Handoff`: once the send queue is flushed, the fd and these bytes (then `held`)
    /// go to the next owner of `origin` instead of being closed.
    pub(super) handoff: Option<Vec<u8>>,
    /// The address of the persistent listener this connection was accepted on, if any: only
    /// such connections can be handed off, because only there is a next owner to find.
    pub(super) origin: Option<SocketAddr>,
    /// Bytes ever delivered to the application, and whether it ever wrote: a connection of a
    /// dead application with neither is untouched and goes to its successor, not to the bin.
    pub(super) delivered: u64,
    pub(super) written: bool,
    /// Queued for a send at the end of this pass (see `want_send`).
    pub(super) send_wanted: bool,
    /// Waiting in `Worker::budget_waiters` for its session's budget to allow a receive.
    pub(super) budget_wait: bool,
    /// `SendFile` ranges queued and charged to the session (`file-ranges`), given back as
    /// they are sent or when the connection is released.
    pub(super) file_ranges: u64,
    /// The application closed or shut down this connection: its queued bytes go out even if
    /// the application then goes away (up to [`LINGER_LIMIT`]), and it may then linger
    /// (`lingering`, which is the lingering close proper).
    pub(super) linger: bool,
    /// Answered by the server itself (see `direct`) until the first request it cannot answer.
    pub(super) direct: Option<Box<crate::direct::Direct>>,
    /// The direct-path route (slot, serial) of the listener it came from, so that the
    /// application can give it back (`ServeDirect`).
    pub(super) route: Option<(u32, u64)>,
    /// On a `RECOVERABLE` listener's connection: what it takes to give it, unanswered
    /// requests included, to the application's successor if the application dies.
    pub(super) recovery: Option<Recovery>,
    /// Its two ends (local, peer), as accepted: how a migration names it.
    pub(super) flow: Option<crate::migration::Flow>,
    /// Being let go for a migration (see `migrate.rs`): nothing is sent or delivered, what is
    /// in flight is cancelled (`export_cancelled` once), and the asker gets it when nothing is.
    pub(super) export: Option<Arc<crate::migration::Order>>,
    pub(super) export_cancelled: bool,
    /// Closed gracefully and everything flushed, its sending side shut down: it reads and
    /// discards until the peer's EOF or a bound (see [`Lingering`], `worker/linger.rs`).
    pub(super) lingering: Option<Lingering>,
    /// Checkpoints of it at rest, for failover (see `worker/checkpoint.rs`).
    pub(super) ckpt: super::checkpoint::ConnCkpt,
}

/// Longest a lingering connection waits for the next bytes (nginx's `lingering_timeout`,
/// 5 s): a client that has read its response and still sends, or sends nothing and never
/// closes, is not worth more.
pub(super) const LINGER_IDLE: Duration = Duration::from_secs(5);
/// Longest a connection lingers in all (nginx's `lingering_time`, 30 s): a client that keeps
/// trickling bytes cannot keep the socket.
pub(super) const LINGER_TOTAL: Duration = Duration::from_secs(30);
/// Most bytes a lingering connection discards before it is closed anyway: what a client sends
/// after a response it is meant to read is a pipelined request or the rest of an upload the
/// server did not want; 1 MiB (nginx's default `client_max_body_size`) covers the usual
/// refused upload, and past it reading costs more than the client's chance of seeing its
/// response is worth (it is then likely not reading at all).
pub(super) const LINGER_BYTES: u64 = 1 << 20;

/// A connection in lingering close (security review item 23). Closing a socket that has
/// unread received bytes (or gets more afterwards) makes the kernel answer with RST, and an
/// RST destroys what the client has not read yet of the last response. So a graceful close,
/// once everything queued is in the kernel, shuts the sending side down (the client sees the
/// end of the response), then reads and discards until the client's EOF — or until it was
/// idle [`LINGER_IDLE`], lingered [`LINGER_TOTAL`], or discarded [`LINGER_BYTES`]. Its
/// application has been told `Closed` already; it keeps its slot and its connection budget
/// (a descriptor is held), see `worker/linger.rs`.
#[derive(Debug)]
pub(super) struct Lingering {
    since: Instant,
    last: Instant,
    discarded: u64,
    /// Ended early: the peer's EOF or an error, or cut short (the server stops, the slot was
    /// given to a new connection, the application died and its time is up).
    ended: bool,
    /// The readiness wait in the ring (`Op::LingerPoll`): Idle, Armed or Cancelling.
    pub(super) poll: Recv,
    /// Its connection budget went to a new connection (`Worker::reclaim_lingering`): its
    /// release gives nothing back.
    pub(super) gave_slot: bool,
}

impl Lingering {
    pub(super) fn new(now: Instant) -> Lingering {
        Lingering {
            since: now,
            last: now,
            discarded: 0,
            ended: false,
            poll: Recv::Idle,
            gave_slot: false,
        }
    }

    /// `n` bytes arrived and were discarded.
    pub(super) fn discarded(&mut self, n: usize, now: Instant) {
        self.discarded = self.discarded.saturating_add(n as u64);
        self.last = now;
    }

    /// Ends it at the next chance, whatever the bounds say.
    pub(super) fn end(&mut self) {
        self.ended = true;
    }

    /// Whether it is over: ended, or past one of its bounds at `now`.
    pub(super) fn over(&self, now: Instant) -> bool {
        self.ended
            || self.discarded >= LINGER_BYTES
            || now.saturating_duration_since(self.last) >= LINGER_IDLE
            || now.saturating_duration_since(self.since) >= LINGER_TOTAL
    }

    /// When it began (the oldest is the first to give its slot away).
    pub(super) fn since(&self) -> Instant {
        self.since
    }
}

/// Bytes a recoverable connection keeps a copy of, delivered after the application's last
/// request boundary. Requests are small; a connection that goes past this (a large upload,
/// a pipeline the application is slow to answer) is simply not recoverable until its next
/// boundary catches up with what was delivered.
pub(super) const RETAIN_LIMIT: usize = 64 << 10;

/// A recoverable connection's record of its application's progress (see
/// `listen_flags::RECOVERABLE`): the bytes delivered after the last `Answered` mark, and
/// whether a response may be half queued.
#[derive(Default, Debug)]
pub(super) struct Recovery {
    /// Bytes delivered after the mark, unless `overflowed`.
    retained: Vec<u8>,
    /// `Conn::delivered` at the last mark.
    answered: u64,
    /// The application sent something after the mark: a response may be half queued.
    sent_since: bool,
    /// More than [`RETAIN_LIMIT`] was delivered after the mark.
    overflowed: bool,
}

impl Recovery {
    /// Keeps a copy of `n` bytes being delivered, filled in by `copy`.
    pub(super) fn delivering(&mut self, n: usize, copy: impl FnOnce(&mut [u8])) {
        if self.overflowed {
            return;
        }
        if self.retained.len() + n > RETAIN_LIMIT {
            self.overflowed = true;
            self.retained = Vec::new();
            return;
        }
        let at = self.retained.len();
        self.retained.resize(at + n, 0);
        copy(&mut self.retained[at..]);
    }

    pub(super) fn sent(&mut self) {
        self.sent_since = true;
    }

    /// The application marked `received` (of `delivered`) bytes answered. Returns false for a
    /// mark that is behind the last one or past what was delivered.
    pub(super) fn mark(&mut self, received: u64, delivered: u64) -> bool {
        if received < self.answered || received > delivered {
            return false;
        }
        let done = (received - self.answered) as usize;
        if self.overflowed {
            if received == delivered {
                self.overflowed = false;
                self.retained.clear();
            }
        } else {
            self.retained.drain(..done.min(self.retained.len()));
        }
        self.answered = received;
        self.sent_since = false;
        true
    }

    /// Every response before the retained bytes is complete (see `unanswered`).
    pub(super) fn at_boundary(&self) -> bool {
        !self.sent_since && !self.overflowed
    }

    /// At a boundary with nothing delivered after it: the application owes nothing.
    pub(super) fn answered_all(&self) -> bool {
        self.at_boundary() && self.retained.is_empty()
    }

    /// The bytes its successor must answer, if every response before them is complete.
    pub(super) fn unanswered(&mut self) -> Option<Vec<u8>> {
        (!self.sent_since && !self.overflowed).then(|| std::mem::take(&mut self.retained))
    }
}

impl crate::direct::Direct {
    /// Whether the direct path must stop reading this connection: its send queue is full
    /// (the client does not read its responses) or it holds `DIRECT_BUF_MAX` bytes it has not
    /// answered yet.
    pub(super) fn holds_back(&self) -> bool {
        self.blocked || self.conn.pending.len() >= super::recv::DIRECT_BUF_MAX
    }
}

/// Chunks gathered into one `sendmsg`.
pub(super) const MAX_IOV: usize = 8;

pub(super) struct Gather {
    pub(super) iov: [libc::iovec; MAX_IOV],
    pub(super) msg: libc::msghdr,
}

pub(super) struct ListenSock {
    pub(super) addr: SocketAddr,
    /// A direct-path route installed by `ServeFiles` (index into `Worker::routes`, serial).
    pub(super) route: Option<(u32, u64)>,
    pub(super) flags: u32,
    pub(super) accepting: bool,
    pub(super) park: bool,
    pub(super) orphans: Vec<OwnedFd>,
}

pub(super) enum Kind {
    Listener(ListenSock),
    Conn(Box<Conn>),
    Connecting { req: u32 },
}

pub(super) struct Socket {
    pub(super) session: SessionIx,
    pub(super) fd: OwnedFd,
    pub(super) inflight: u32,
    pub(super) closing: bool,
    pub(super) kind: Kind,
}

#[derive(Default)]
pub(super) struct SocketSlot {
    pub(super) generation: u32,
    pub(super) sock: Option<Socket>,
}

impl Conn {
    pub(super) fn new() -> Conn {
        Conn {
            sendq: VecDeque::new(),
            unreported: 0,
            unsent: 0,
            send: InflightSend::default(),
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
            budget_wait: false,
            file_ranges: 0,
            linger: false,
            direct: None,
            recovery: None,
            flow: None,
            export: None,
            export_cancelled: false,
            lingering: None,
            ckpt: Default::default(),
        }
    }

    /// Whether a graceful close should linger once everything is flushed: the peer may still
    /// send (no EOF from it), the stream did not fail (a reset peer reads nothing), and the
    /// socket is not going to a next owner. Not twice.
    pub(super) fn may_linger(&self) -> bool {
        // A connection moving to another node is not closed at all: it must not send a FIN.
        self.lingering.is_none()
            && !self.eof
            && !self.failed
            && self.handoff.is_none()
            && self.export.is_none()
    }

    /// Whether a receive may be armed: none is, the stream goes on, the application has
    /// acknowledged enough of what it was given (the receive window), a paused connection
    /// holds less than half of `recv::HELD_MAX`, the direct path is not holding reads back
    /// (a full send queue or buffer), and no checkpoint is quiescing it (`checkpoint.rs`).
    /// (The socket must not be closing either; that is the socket's state, checked by the
    /// caller.)
    pub(super) fn may_receive(&self) -> bool {
        self.recv == Recv::Idle
            && !self.eof
            && !self.failed
            && self.unacked < RECV_WINDOW as u64 / 2
            && (!self.paused || self.held.len() < super::recv::HELD_MAX / 2)
            && !self.direct.as_ref().is_some_and(|d| d.holds_back())
            && !self.ckpt.quiescing
    }

    /// Untouched by its application: accepted on a persistent listener but never read from,
    /// written to, ended or failed. Such a connection of an application that died is given to
    /// its successor rather than closed; nothing is lost, as a parked listener's backlog
    /// would not lose it either.
    pub(super) fn untouched(&self) -> bool {
        self.origin.is_some()
            && self.delivered == 0
            && !self.written
            && !self.eof
            && !self.failed
            && !self.shutdown_wanted
    }

    /// Whether the application may give this connection back to the direct path
    /// (`ServeDirect`), having seen `received` bytes: only when it has seen every byte
    /// delivered and nothing is paused, held, handed off or ended, so no byte could be
    /// answered twice or out of order.
    pub(super) fn may_return_to_direct(&self, received: u64) -> bool {
        self.direct.is_none()
            && !self.paused
            && self.held.is_empty()
            && self.handoff.is_none()
            && !self.eof
            && !self.failed
            && self.delivered == received
    }

    /// Whether the connection may move to another node now, or why not (see
    /// `crate::migration`, "Movable").
    pub(super) fn movable(&self) -> Result<(), &'static str> {
        if self.origin.is_none() || self.flow.is_none() {
            return Err("not accepted on a persistent listener");
        }
        if self.failed {
            return Err("it has failed");
        }
        if self.paused || self.handoff.is_some() || self.export.is_some() {
            return Err("it is being handed off");
        }
        if self.shutdown_wanted {
            return Err("its server side is shut down");
        }
        if self.direct.is_none() && !self.recovery.as_ref().is_some_and(|r| r.at_boundary()) {
            return Err("its application is in the middle of a request");
        }
        let queued: usize = self.sendq.iter().map(Chunk::remaining).sum();
        if queued > crate::migration::QUEUE_MAX {
            return Err("more bytes are queued for it than a migration carries");
        }
        Ok(())
    }

    /// Whether a close drops the bytes still queued: when it is an abort (the owner is gone or
    /// killed it), unless the connection is being handed on (the next owner's responses must
    /// follow complete ones) or its application closed it before it went (those bytes are
    /// owed to the client, as the kernel would flush them).
    pub(super) fn abort_on_close(&self, abort: bool) -> bool {
        abort && self.handoff.is_none() && !self.linger
    }

    /// Counts `n` bytes delivered to the application, keeping a copy (filled by `copy`) where
    /// the connection is recoverable.
    pub(super) fn delivering(&mut self, n: usize, copy: impl FnOnce(&mut [u8])) {
        self.unacked += n as u64;
        self.delivered += n as u64;
        if let Some(r) = self.recovery.as_mut() {
            r.delivering(n, copy);
        }
    }

    /// What goes to the application's successor with this connection if the application has
    /// died now: the bytes after its last boundary, if it was at one (nothing half sent, no
    /// end or failure it was told of, not closing); `None` if the connection cannot go on.
    pub(super) fn successor_bytes(&mut self) -> Option<Vec<u8>> {
        if self.origin.is_none() || self.failed || self.shutdown_wanted || self.handoff.is_some() {
            return None;
        }
        if let Some(d) = self.direct.as_mut() {
            // Answered by the server alone: the application owes it nothing.
            let mut bytes = std::mem::take(&mut d.conn.pending);
            bytes.append(&mut self.held);
            return Some(bytes);
        }
        if self.untouched() {
            return Some(std::mem::take(&mut self.held));
        }
        let mut bytes = self.recovery.as_mut()?.unanswered()?;
        bytes.append(&mut self.held);
        Some(bytes)
    }

    /// Nothing queued and nothing in flight: the kernel holds every byte it was given.
    pub(super) fn send_drained(&self) -> bool {
        self.sendq.is_empty() && !self.send.busy()
    }

    /// A shutdown the application asked for may be carried out now (after its last bytes).
    pub(super) fn may_shut_down_write(&self) -> bool {
        self.shutdown_wanted && !self.shutdown_done && self.send_drained()
    }
}

/// What a connection's one send in flight is doing (invariant 2).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(super) enum SendOp {
    #[default]
    Idle,
    /// A ring send reading the first `chunks` chunks of the queue.
    Send { chunks: usize },
    /// A wait in the ring for a full socket to take bytes again (`Op::SendPoll`).
    Poll,
}

/// A connection's send in flight and the memory it lends the kernel, in one place (as
/// glommio's sources own what the kernel reads): the chunks it reads stay at the front of the
/// queue and the gathered iovecs stay in their box until its completion is reaped.
#[derive(Default)]
pub(super) struct InflightSend {
    op: SendOp,
    /// The iovecs and header of a gathered send, boxed so they stay put while the kernel reads
    /// them; kept for the connection's next gathered send.
    gather: Option<Box<Gather>>,
}

impl InflightSend {
    pub(super) fn busy(&self) -> bool {
        self.op != SendOp::Idle
    }

    /// A ring send reading the first `chunks` chunks has been queued.
    pub(super) fn sending(&mut self, chunks: usize) {
        self.op = SendOp::Send { chunks };
    }

    /// A wait for room has been queued.
    pub(super) fn polling(&mut self) {
        self.op = SendOp::Poll;
    }

    /// Its completion has been reaped: the kernel reads nothing of the queue any more.
    pub(super) fn finished(&mut self) {
        self.op = SendOp::Idle;
    }

    /// Whether the kernel may be reading the last of `queued` chunks (which then must not
    /// grow: growing could move its bytes).
    pub(super) fn reads_last_of(&self, queued: usize) -> bool {
        matches!(self.op, SendOp::Send { chunks } if queued <= chunks)
    }

    /// The ring operation to cancel for it, if one is in flight.
    pub(super) fn cancel_op(&self) -> Option<Op> {
        match self.op {
            SendOp::Idle => None,
            SendOp::Send { .. } => Some(Op::Send),
            SendOp::Poll => Some(Op::SendPoll),
        }
    }

    /// The gather header for a send of `chunks`, pointed at their unsent bytes.
    pub(super) fn gather<'a>(&mut self, chunks: impl Iterator<Item = &'a Chunk>) -> &libc::msghdr {
        let g = self.gather.get_or_insert_with(|| {
            Box::new(Gather {
                iov: [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; MAX_IOV],
                // SAFETY: msghdr is plain old data; all-zero is its empty value.
                msg: unsafe { std::mem::zeroed() },
            })
        });
        let n = super::send::fill_iov(&mut g.iov, chunks);
        g.msg.msg_iov = g.iov.as_mut_ptr();
        g.msg.msg_iovlen = n;
        &g.msg
    }
}

#[cfg(test)]
mod tests;
