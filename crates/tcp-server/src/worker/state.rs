//! The worker's state types: sessions, socket slots, connections and their send queues.

use super::*;

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
    pub(super) sockets: HashSet<u32>,
    /// File segments the application passed for `SendFile`, by its tag.
    pub(super) files: HashMap<u64, Arc<Segment>>,
    /// Session-level operations in flight (the wait-fd poll).
    pub(super) inflight: u32,
    pub(super) dead: bool,
    /// The application has gone and the requests it left are being served (see
    /// `session_failed`).
    pub(super) departing: bool,
    /// When the application went away; its closed connections may flush until
    /// [`LINGER_LIMIT`] after that.
    pub(super) dead_since: Option<Instant>,
    pub(super) violations: u32,
    pub(super) conns: u32,
    pub(super) listeners: u32,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
}

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
    /// Bytes of a sealed file segment, sent straight from the shared mapping. They do not
    /// count against the send window (nothing is buffered for them) and earn no `Sent` credit.
    File {
        seg: Arc<Segment>,
        off: usize,
        end: usize,
    },
}

impl Chunk {
    pub(super) fn remaining(&self) -> usize {
        match self {
            Chunk::Inline { data, off } | Chunk::Direct { data, off } => data.len() - off,
            Chunk::Buf { rx, off } => rx.len() - off,
            Chunk::File { off, end, .. } => end - off,
        }
    }

    /// The unsent bytes, as the kernel will read them.
    pub(super) fn span(&self) -> (*const u8, usize) {
        match self {
            Chunk::Inline { data, off } | Chunk::Direct { data, off } => {
                (data[*off..].as_ptr(), data.len() - off)
            }
            Chunk::Buf { rx, off } => (rx.as_ptr().wrapping_add(*off), rx.len() - off),
            Chunk::File { seg, off, end } => (seg.bytes()[*off..*end].as_ptr(), end - off),
        }
    }

    pub(super) fn counts_against_window(&self) -> bool {
        !matches!(self, Chunk::File { .. } | Chunk::Direct { .. })
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
    pub(super) send_inflight: bool,
    /// The send in flight is a wait for the socket to drain (`Op::SendPoll`).
    pub(super) send_polling: bool,
    pub(super) recv: Recv,
    /// Bytes delivered to the application and not yet acknowledged with `Consumed`.
    pub(super) unacked: u64,
    pub(super) eof: bool,
    pub(super) failed: bool,
    pub(super) shutdown_wanted: bool,
    pub(super) shutdown_done: bool,
    /// The application paused delivery (`Pause`): received bytes wait in `held`.
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
    /// The application closed or shut down this connection: its queued bytes go out even if
    /// the application then goes away (up to [`LINGER_LIMIT`]).
    pub(super) linger: bool,
    /// Chunks at the front of `sendq` the send in flight reads from.
    pub(super) inflight_chunks: usize,
    /// The iovecs of a gathered send in flight, boxed so they stay put while the kernel reads.
    pub(super) gather: Option<Box<Gather>>,
    /// Answered by the server itself (see `direct`) until the first request it cannot answer.
    pub(super) direct: Option<Box<crate::direct::Direct>>,
    /// The direct-path route (slot, serial) of the listener it came from, so that the
    /// application can give it back (`ServeDirect`).
    pub(super) route: Option<(u32, u64)>,
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
    pub(super) session: u32,
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

pub(super) fn new_conn() -> Conn {
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
