//! A session: this process's m2m channel to the TCP server, and the demultiplexing of its events
//! into per-socket queues.
//!
//! Any thread may drive the session: whoever holds the lock drains every waiting event into the
//! queues of the sockets they belong to, then looks at its own. A thread that finds nothing
//! spins briefly (per the wait policy), then announces in shared memory that it will sleep,
//! releases the lock and sleeps on the channel's wait fd, which wakes on the server's doorbell
//! or its death. Every queue is bounded: receive data by the server's receive window per
//! connection, accepted connections by the listen backlog, replies by the requests in flight.

use splitos_m2m::{
    Channel, ChannelConfig, Error as M2mError, Message, Phase, RxBuffer, WaitPolicy,
};
use splitos_tcp_proto::{BufferMeta, Event, Handle, Request};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Acknowledge received bytes to the server after this many (or when a queue empties).
const ACK_EVERY: u32 = 64 << 10;
/// Received buffers a connection may hold in place before further ones are copied out, so one
/// slow reader cannot pin the whole receive pool the server shares among connections.
const HELD_BUFFERS: usize = 4;
/// Longest single sleep; a safety net, wake-ups normally come from the doorbell.
const MAX_SLEEP: Duration = Duration::from_millis(50);

/// How a session talks to the server.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// How threads wait for the server.
    pub wait: WaitPolicy,
    /// Name shown by `splitos status`.
    pub name: String,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            wait: WaitPolicy::adaptive(),
            name: std::env::args()
                .next()
                .and_then(|a| {
                    Path::new(&a)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                })
                .unwrap_or_default(),
        }
    }
}

pub(crate) enum Chunk {
    Bytes(Vec<u8>, usize),
    Buf(RxBuffer, usize),
}

impl Chunk {
    fn remaining(&self) -> usize {
        match self {
            Chunk::Bytes(v, off) => v.len() - off,
            Chunk::Buf(b, off) => b.len() - off,
        }
    }
}

#[derive(Default)]
pub(crate) struct Conn {
    pub rx: VecDeque<Chunk>,
    pub held: usize,
    pub eof: bool,
    pub error: Option<i32>,
    pub unacked: u32,
    /// Bytes handed to the server and not yet confirmed sent.
    pub unconfirmed: u64,
    pub closed: bool,
}

#[derive(Default)]
pub(crate) struct ListenState {
    pub queue: VecDeque<(Handle, SocketAddr, SocketAddr)>,
}

/// What a request in flight will create, so that its socket's queue exists before the first
/// event for it is pumped (they can arrive in the same batch as the reply).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Creates {
    Listener,
    Connection,
    Nothing,
}

pub(crate) enum Reply {
    Done(Handle, SocketAddr, SocketAddr),
    Failed(i32),
}

pub(crate) struct State {
    pub chan: Channel,
    next_req: u32,
    replies: HashMap<u32, Reply>,
    pending: HashMap<u32, Creates>,
    pub conns: HashMap<Handle, Conn>,
    pub listeners: HashMap<Handle, ListenState>,
    dead: Option<String>,
    out: Vec<u8>,
    /// A thread is asleep on the channel's wait fd; the others wait on condition variables.
    leader: bool,
    /// Condition variables of what threads are waiting for, notified when the pump touches it.
    waiting: HashMap<WaitKey, (Arc<Condvar>, usize)>,
    /// Tasks of the tokio flavour waiting for a key; woken like the condition variables.
    pub(crate) wakers: HashMap<WaitKey, Vec<std::task::Waker>>,
    /// File segments passed to the server for `send_file`.
    pub(crate) files: crate::file_tags::FileTags,
    /// Whether the tokio driver task of this session is running.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) driver: bool,
    touched: Vec<WaitKey>,
}

/// What a thread waits for: a socket's events, or a request's reply.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum WaitKey {
    Socket(Handle),
    Reply(u32),
}

#[doc(hidden)]
pub struct Shared {
    state: Mutex<State>,
    wait_fd: OwnedFd,
    policy: WaitPolicy,
}

/// A connection to the TCP server. Cheap to clone; sockets keep their session alive.
#[derive(Clone)]
pub struct Session {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) fn m2m_err(e: M2mError) -> io::Error {
    match e {
        M2mError::PeerGone => io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the Split-OS TCP server has gone away",
        ),
        M2mError::Io { context, source } => {
            io::Error::new(source.kind(), format!("{context}: {source}"))
        }
        other => io::Error::other(other.to_string()),
    }
}

impl Session {
    /// Connects to the TCP server listening on `socket`.
    pub fn connect(socket: impl AsRef<Path>, options: SessionOptions) -> io::Result<Session> {
        let socket = socket.as_ref();
        let chan = Channel::connect(
            socket,
            ChannelConfig {
                wait: options.wait,
                ..ChannelConfig::default()
            },
        )
        .map_err(|e| match e {
            M2mError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound || source.kind() == io::ErrorKind::ConnectionRefused => {
                io::Error::new(
                    source.kind(),
                    format!(
                        "no Split-OS TCP server at {} (start `splitos tcp-server`, point SPLITOS_SOCKET at one, or set SPLITOS_EMBEDDED=1)",
                        socket.display()
                    ),
                )
            }
            other => m2m_err(other),
        })?;
        let wait_fd = chan.wait_fd().try_clone_to_owned()?;
        let mut state = State {
            chan,
            next_req: 0,
            replies: HashMap::new(),
            pending: HashMap::new(),
            conns: HashMap::new(),
            listeners: HashMap::new(),
            dead: None,
            out: Vec::with_capacity(256),
            leader: false,
            waiting: HashMap::new(),
            wakers: HashMap::new(),
            files: Default::default(),
            driver: false,
            touched: Vec::new(),
        };
        let mut name = options.name.into_bytes();
        name.truncate(splitos_tcp_proto::MAX_NAME);
        state.request(Request::Hello {
            version: splitos_tcp_proto::VERSION,
            name: &name,
        })?;
        Ok(Session {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                wait_fd,
                policy: options.wait,
            }),
        })
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn weak(&self) -> std::sync::Weak<Shared> {
        Arc::downgrade(&self.shared)
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn from_shared(shared: Arc<Shared>) -> Session {
        Session { shared }
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn dup_wait_fd(&self) -> io::Result<OwnedFd> {
        use std::os::fd::AsFd;
        self.shared.wait_fd.as_fd().try_clone_to_owned()
    }

    /// Sends a request with a fresh id without waiting; the reply is taken with
    /// [`State::take_reply`].
    pub(crate) fn start_call(
        &self,
        creates: Creates,
        make: impl FnOnce(u32) -> Request<'static>,
    ) -> io::Result<u32> {
        let mut st = self.lock()?;
        st.next_req = st.next_req.wrapping_add(1);
        let req = st.next_req;
        st.pending.insert(req, creates);
        if let Err(e) = st.request(make(req)) {
            st.pending.remove(&req);
            return Err(e);
        }
        Ok(req)
    }

    pub(crate) fn lock(&self) -> io::Result<MutexGuard<'_, State>> {
        self.shared
            .state
            .lock()
            .map_err(|_| io::Error::other("a thread panicked while driving the Split-OS session"))
    }

    /// Sends a request with a fresh id and waits for its reply.
    pub(crate) fn call(
        &self,
        creates: Creates,
        make: impl FnOnce(u32) -> Request<'static>,
    ) -> io::Result<(Handle, SocketAddr, SocketAddr)> {
        let req = self.start_call(creates, make)?;
        self.wait_until(WaitKey::Reply(req), None, |st| {
            st.take_reply(req).transpose()
        })
    }

    /// Runs `f` on the drained state until it yields a value, waiting per the wait policy.
    ///
    /// Leader/followers: one waiting thread (the leader) sleeps on the channel's wait fd; the
    /// others sleep on a condition variable for what they wait for, and the pump wakes exactly
    /// those whose sockets got events — so a thousand blocked readers do not all wake for each
    /// doorbell.
    pub(crate) fn wait_until<T>(
        &self,
        key: WaitKey,
        deadline: Option<Instant>,
        mut f: impl FnMut(&mut State) -> io::Result<Option<T>>,
    ) -> io::Result<T> {
        let start = Instant::now();
        let mut st = self.lock()?;
        loop {
            st.pump()?;
            st.notify_touched();
            if let Some(v) = f(&mut st)? {
                return Ok(v);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
            }
            let mut timeout = MAX_SLEEP;
            if let Some(d) = deadline {
                timeout = timeout.min(d.saturating_duration_since(now));
            }
            let phase = self.shared.policy.phase(now - start);
            if phase != Phase::Sleep {
                drop(st);
                if phase == Phase::Spin {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                st = self.lock()?;
                continue;
            }
            if !st.leader {
                st.leader = true;
                let armed = match st.chan.prepare_wait() {
                    Ok(a) => a,
                    Err(e) => {
                        st.leader = false;
                        st.wake_one();
                        return Err(st.fail(e));
                    }
                };
                if armed {
                    drop(st);
                    let mut fds = [rustix::event::PollFd::new(
                        &self.shared.wait_fd,
                        rustix::event::PollFlags::IN,
                    )];
                    let ts = rustix::time::Timespec {
                        tv_sec: timeout.as_secs() as i64,
                        tv_nsec: timeout.subsec_nanos() as _,
                    };
                    let _ = rustix::event::poll(&mut fds, Some(&ts));
                    st = self.lock()?;
                    st.chan.finish_wait();
                }
                st.leader = false;
                // Someone else may need to take over the fd while we look at our own queue.
                st.wake_one();
                continue;
            }
            let cv = {
                let e = st
                    .waiting
                    .entry(key)
                    .or_insert_with(|| (Arc::new(Condvar::new()), 0));
                e.1 += 1;
                e.0.clone()
            };
            st = cv
                .wait_timeout(st, timeout)
                .map_err(|_| io::Error::other("session lock poisoned"))?
                .0;
            if let Some(e) = st.waiting.get_mut(&key) {
                e.1 -= 1;
                if e.1 == 0 {
                    st.waiting.remove(&key);
                }
            }
        }
    }
}

impl State {
    pub(crate) fn take_reply(
        &mut self,
        req: u32,
    ) -> Option<io::Result<(Handle, SocketAddr, SocketAddr)>> {
        self.replies.remove(&req).map(|r| match r {
            Reply::Done(h, l, p) => Ok((h, l, p)),
            Reply::Failed(errno) => Err(io::Error::from_raw_os_error(errno)),
        })
    }

    fn touch(&mut self, key: WaitKey) {
        if !self.waiting.is_empty() || !self.wakers.is_empty() {
            self.touched.push(key);
        }
    }

    pub(crate) fn notify_touched(&mut self) {
        for key in std::mem::take(&mut self.touched) {
            if let Some((cv, _)) = self.waiting.get(&key) {
                cv.notify_all();
            }
            if let Some(ws) = self.wakers.remove(&key) {
                ws.into_iter().for_each(|w| w.wake());
            }
        }
    }

    /// Wakes every waiting task (the session failed: they must see the error).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn wake_all_tasks(&mut self) {
        for (_, ws) in self.wakers.drain() {
            ws.into_iter().for_each(|w| w.wake());
        }
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn register_waker(&mut self, key: WaitKey, w: &std::task::Waker) {
        let v = self.wakers.entry(key).or_default();
        if !v.iter().any(|x| x.will_wake(w)) {
            v.push(w.clone());
        }
    }

    /// Wakes one follower so it can become the leader.
    fn wake_one(&self) {
        if let Some((cv, _)) = self.waiting.values().next() {
            cv.notify_one();
        }
    }

    pub(crate) fn fail(&mut self, e: M2mError) -> io::Error {
        let err = m2m_err(e);
        self.dead.get_or_insert_with(|| err.to_string());
        err
    }

    pub(crate) fn check_alive(&self) -> io::Result<()> {
        match &self.dead {
            Some(why) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                why.clone(),
            )),
            None => Ok(()),
        }
    }

    pub(crate) fn request(&mut self, r: Request<'_>) -> io::Result<()> {
        self.check_alive()?;
        self.out.clear();
        r.encode(&mut self.out);
        let out = std::mem::take(&mut self.out);
        let res = self.chan.send(&out);
        self.out = out;
        res.map_err(|e| self.fail(e))
    }

    /// Drains every waiting event into the per-socket queues.
    pub(crate) fn pump(&mut self) -> io::Result<usize> {
        self.check_alive()?;
        let mut total = 0;
        loop {
            // In arrival order: data for a connection may follow its Accepted in one batch.
            let mut items: Vec<Item> = Vec::new();
            let n = self
                .chan
                .recv_batch(256, |m| match m {
                    Message::Inline(b) => match Event::decode(b) {
                        Ok(Event::Data { handle, data }) => {
                            items.push(Item::Data(handle, Chunk::Bytes(data.to_vec(), 0)))
                        }
                        Ok(ev) => items.extend(OwnedEvent::of(ev).map(Item::Event)),
                        Err(e) => tracing::warn!("undecodable event from the TCP server: {e}"),
                    },
                    Message::Buffer(rx) => match BufferMeta::decode(rx.meta()) {
                        Ok(BufferMeta::Data(h)) => items.push(Item::Data(h, Chunk::Buf(rx, 0))),
                        _ => tracing::warn!("buffer without a data header from the TCP server"),
                    },
                })
                .map_err(|e| self.fail(e))?;
            for item in items {
                match item {
                    Item::Data(h, chunk) => self.deliver(h, chunk),
                    Item::Event(ev) => self.apply(ev)?,
                }
            }
            total += n;
            if n < 256 {
                return Ok(total);
            }
        }
    }

    fn deliver(&mut self, h: Handle, chunk: Chunk) {
        self.touch(WaitKey::Socket(h));
        let Some(c) = self.conns.get_mut(&h) else {
            return; // a socket we closed: its late data is dropped (and any buffer returned)
        };
        let chunk = match chunk {
            Chunk::Buf(rx, off) if c.held >= HELD_BUFFERS => Chunk::Bytes(rx.to_vec(), off),
            Chunk::Buf(rx, off) => {
                c.held += 1;
                Chunk::Buf(rx, off)
            }
            b => b,
        };
        c.rx.push_back(chunk);
    }

    fn apply(&mut self, ev: OwnedEvent) -> io::Result<()> {
        let key = match ev {
            OwnedEvent::Done(req, ..) | OwnedEvent::Failed(req, _) => Some(WaitKey::Reply(req)),
            OwnedEvent::Accepted(l, ..) => Some(WaitKey::Socket(l)),
            OwnedEvent::Eof(h)
            | OwnedEvent::Sent(h, _)
            | OwnedEvent::Error(h, _)
            | OwnedEvent::Closed(h) => Some(WaitKey::Socket(h)),
            OwnedEvent::ProtocolError(..) => None,
        };
        if let Some(k) = key {
            self.touch(k);
        }
        match ev {
            OwnedEvent::Done(req, h, local, peer) => {
                match self.pending.remove(&req) {
                    Some(Creates::Listener) => {
                        self.listeners.insert(h, ListenState::default());
                    }
                    Some(Creates::Connection) => {
                        self.conns.insert(h, Conn::default());
                    }
                    _ => {}
                }
                self.replies.insert(req, Reply::Done(h, local, peer));
            }
            OwnedEvent::Failed(req, errno) => {
                self.pending.remove(&req);
                self.replies.insert(req, Reply::Failed(errno));
            }
            OwnedEvent::Accepted(l, conn, local, peer) => match self.listeners.get_mut(&l) {
                Some(ls) => {
                    self.conns.insert(conn, Conn::default());
                    ls.queue.push_back((conn, local, peer));
                }
                None => self.request(Request::Close { handle: conn })?,
            },
            OwnedEvent::Eof(h) => {
                if let Some(c) = self.conns.get_mut(&h) {
                    c.eof = true;
                }
            }
            OwnedEvent::Sent(h, n) => {
                if let Some(c) = self.conns.get_mut(&h) {
                    c.unconfirmed = c.unconfirmed.saturating_sub(n as u64);
                }
            }
            OwnedEvent::Error(h, errno) => {
                if let Some(c) = self.conns.get_mut(&h) {
                    c.error.get_or_insert(errno);
                }
            }
            OwnedEvent::Closed(h) => {
                if self.conns.get(&h).is_some_and(|c| c.closed) {
                    self.conns.remove(&h);
                }
                self.listeners.remove(&h);
            }
            OwnedEvent::ProtocolError(op, errno) => {
                tracing::warn!(op, errno, "the TCP server rejected a request");
            }
        }
        Ok(())
    }

    /// Copies received bytes of `h` into `buf`; acknowledges them to the server in batches.
    pub(crate) fn read_into(&mut self, h: Handle, buf: &mut [u8]) -> io::Result<usize> {
        let Some(c) = self.conns.get_mut(&h) else {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        };
        let mut n = 0;
        while n < buf.len() {
            let Some(front) = c.rx.front_mut() else { break };
            let take = (buf.len() - n).min(front.remaining());
            match front {
                Chunk::Bytes(v, off) => {
                    buf[n..n + take].copy_from_slice(&v[*off..*off + take]);
                    *off += take;
                }
                Chunk::Buf(rx, off) => {
                    rx.read_at(*off, &mut buf[n..n + take]);
                    *off += take;
                }
            }
            n += take;
            if front.remaining() == 0 {
                if let Some(Chunk::Buf(..)) = c.rx.pop_front() {
                    c.held -= 1;
                }
            }
        }
        c.unacked += n as u32;
        if c.unacked >= ACK_EVERY || (c.rx.is_empty() && c.unacked > 0) {
            let bytes = std::mem::take(&mut c.unacked);
            self.request(Request::Consumed { handle: h, bytes })?;
        }
        Ok(n)
    }
}

enum Item {
    Data(Handle, Chunk),
    Event(OwnedEvent),
}

/// An event with its borrowed parts copied, so it outlives the ring record.
enum OwnedEvent {
    Done(u32, Handle, SocketAddr, SocketAddr),
    Failed(u32, i32),
    Accepted(Handle, Handle, SocketAddr, SocketAddr),
    Eof(Handle),
    Sent(Handle, u32),
    Error(Handle, i32),
    Closed(Handle),
    ProtocolError(u8, i32),
}

impl OwnedEvent {
    /// `None` for `Data`, which the pump queues itself.
    fn of(e: Event<'_>) -> Option<OwnedEvent> {
        Some(match e {
            Event::Done {
                req,
                handle,
                local,
                peer,
            } => OwnedEvent::Done(req, handle, local, peer),
            Event::Failed { req, errno } => OwnedEvent::Failed(req, errno),
            Event::Accepted {
                listener,
                conn,
                local,
                peer,
            } => OwnedEvent::Accepted(listener, conn, local, peer),
            // The blocking library never pauses connections (the reactor does).
            Event::Data { .. } | Event::Paused { .. } => return None,
            Event::Eof { handle } => OwnedEvent::Eof(handle),
            Event::Sent { handle, bytes } => OwnedEvent::Sent(handle, bytes),
            Event::Error { handle, errno } => OwnedEvent::Error(handle, errno),
            Event::Closed { handle } => OwnedEvent::Closed(handle),
            Event::ProtocolError { op, errno } => OwnedEvent::ProtocolError(op, errno),
        })
    }
}
