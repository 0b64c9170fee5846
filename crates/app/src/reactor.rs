//! An event-driven interface to the TCP server, for applications that run their own loop (one
//! thread serving many connections, as nginx's workers do).
//!
//! Where [`crate::net`] gives each socket a blocking stream and hands every wake-up to the
//! thread waiting for that socket, a [`Reactor`] owns one session's channel outright and hands
//! the application everything that arrived in one batch: [`Reactor::poll`] fills an [`Events`]
//! (in the manner of mio's `Poll`/`Events`), the application reacts, and the requests it makes
//! meanwhile are encoded into one arena and published together, with one wake-up check for the
//! server per batch. No lock, no thread hand-off, no allocation per event.
//!
//! Flow control is kept here: bytes delivered in `Events` count as consumed (they are the
//! application's now); sends beyond the connection's send window wait in a per-connection
//! queue, in order with the files, closes and hand-offs queued behind them, and go out as the
//! server confirms earlier bytes.
//!
//! Hand-off: [`Reactor::pause`] then, after [`NetEvent::Paused`], [`Reactor::hand_off`] gives a
//! connection (with the bytes the application has not processed) to whichever instance listens
//! on its address next; [`Reactor::hand_off_listener`] parks the listener for it. This is how
//! `splitos serve` replaces its HTTP application without dropping a connection.

use crate::file_tags::{pieces, FileTags};
use crate::net::ListenOptions;
use crate::session::m2m_err;
use splitos_file_server::client::{FileView, Piece};
use splitos_m2m::{Channel, ChannelConfig, Message, WaitPolicy};
use splitos_tcp_proto::{BufferMeta, Event, Request, SockOpt, SEND_FILE_COST, SEND_WINDOW};
pub use splitos_tcp_proto::{Handle, MAX_HANDOFF};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// Most bytes one connection may have waiting here for send window; more is an error, so a
/// peer that never reads cannot make the application buffer without bound.
pub const MAX_QUEUED: usize = 8 << 20;
/// Events taken from the ring per batch.
const BATCH: usize = 1024;

/// What happened, as handed to the application by [`Events::iter`].
#[derive(Debug, PartialEq, Eq)]
pub enum NetEvent<'a> {
    /// A new connection on `listener` (also: a connection handed off by another instance,
    /// whose unprocessed bytes follow as `Data`).
    Accepted {
        listener: Handle,
        conn: Handle,
        peer: SocketAddr,
    },
    Data {
        conn: Handle,
        data: &'a [u8],
    },
    /// The peer shut down its side; no more data will come.
    Eof {
        conn: Handle,
    },
    /// The connection failed (errno); close it.
    Error {
        conn: Handle,
        errno: i32,
    },
    /// The handle is retired: closed, or handed off. Its state here is gone.
    Closed {
        conn: Handle,
    },
    /// Every byte of this connection the server will deliver to this instance has been
    /// delivered (see [`Reactor::pause`]).
    Paused {
        conn: Handle,
    },
}

#[derive(Debug)]
enum Raw {
    Accepted(Handle, Handle, SocketAddr),
    Data(Handle, usize, usize),
    Eof(Handle),
    Error(Handle, i32),
    Closed(Handle),
    Paused(Handle),
}

/// A batch of events, reused across polls.
#[derive(Default, Debug)]
pub struct Events {
    items: Vec<Raw>,
    data: Vec<u8>,
}

impl Events {
    pub fn new() -> Events {
        Events::default()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    fn clear(&mut self) {
        self.items.clear();
        self.data.clear();
    }

    pub fn iter(&self) -> impl Iterator<Item = NetEvent<'_>> {
        self.items.iter().map(|r| match *r {
            Raw::Accepted(listener, conn, peer) => NetEvent::Accepted {
                listener,
                conn,
                peer,
            },
            Raw::Data(conn, a, b) => NetEvent::Data {
                conn,
                data: &self.data[a..b],
            },
            Raw::Eof(conn) => NetEvent::Eof { conn },
            Raw::Error(conn, errno) => NetEvent::Error { conn, errno },
            Raw::Closed(conn) => NetEvent::Closed { conn },
            Raw::Paused(conn) => NetEvent::Paused { conn },
        })
    }

    fn push_data(&mut self, conn: Handle, bytes: &[u8]) {
        let a = self.data.len();
        self.data.extend_from_slice(bytes);
        self.items.push(Raw::Data(conn, a, self.data.len()));
    }
}

/// An operation that must wait behind earlier sends of its connection.
enum Queued {
    Bytes(Vec<u8>),
    /// Registered (tagged) only when sent, so a registration cannot lapse while it waits.
    File(Piece),
    Close,
    ShutdownWrite,
    Handoff(Vec<u8>),
    /// Give the connection back to the direct path, having seen this many bytes of it.
    ServeDirect(u64),
    /// A request boundary: every request in this many bytes is answered (see `answered`).
    Answered(u64),
}

#[derive(Default)]
struct Conn {
    /// Inline bytes handed to the server and not yet confirmed sent.
    unconfirmed: u64,
    /// Delivered bytes not yet acknowledged to the server.
    unacked: u32,
    /// Bytes ever delivered: the server honours a `ServeDirect` only if it delivered no more.
    received: u64,
    queue: VecDeque<Queued>,
    queued_bytes: usize,
}

/// One session with the TCP server, driven by the application's own loop. See the module docs.
pub struct Reactor {
    chan: Channel,
    next_req: u32,
    /// Encoded requests waiting to be published, back to back, with their ends.
    out: Vec<u8>,
    ends: Vec<usize>,
    conns: HashMap<Handle, Conn>,
    files: FileTags,
    /// Events that arrived while [`Reactor::listen`] waited for its reply.
    stash: Events,
    max_inline: usize,
    /// Scratch for one poll: send confirmations, and connections that received data.
    sent: Vec<(Handle, u32)>,
    touched: Vec<Handle>,
}

impl Reactor {
    /// Connects to the TCP server at `socket`; `name` is shown by `splitos status`.
    pub fn connect(socket: impl AsRef<Path>, wait: WaitPolicy, name: &str) -> io::Result<Reactor> {
        let socket = socket.as_ref();
        let chan = Channel::connect(
            socket,
            ChannelConfig {
                wait,
                ..ChannelConfig::default()
            },
        )
        .map_err(|e| {
            let e = m2m_err(e);
            io::Error::new(
                e.kind(),
                format!("connecting to the TCP server at {}: {e}", socket.display()),
            )
        })?;
        let max_inline = chan.max_message_len() - Request::SEND_HEADER;
        let mut r = Reactor {
            chan,
            next_req: 0,
            out: Vec::with_capacity(64 << 10),
            ends: Vec::new(),
            conns: HashMap::new(),
            files: FileTags::default(),
            stash: Events::new(),
            max_inline,
            sent: Vec::new(),
            touched: Vec::new(),
        };
        let mut name = name.as_bytes().to_vec();
        name.truncate(splitos_tcp_proto::MAX_NAME);
        r.push(Request::Hello {
            version: splitos_tcp_proto::VERSION,
            name: &name,
        });
        r.flush()?;
        Ok(r)
    }

    fn push(&mut self, r: Request<'_>) {
        r.encode(&mut self.out);
        self.ends.push(self.out.len());
    }

    fn req_id(&mut self) -> u32 {
        self.next_req = self.next_req.wrapping_add(1);
        self.next_req
    }

    /// Listens on `addr` and waits for the server's answer (events that arrive meanwhile are
    /// kept for the next poll). A persistent listener left by an earlier instance on the same
    /// address is taken over, with any connections it handed off.
    pub fn listen(
        &mut self,
        addr: SocketAddr,
        opts: ListenOptions,
    ) -> io::Result<(Handle, SocketAddr)> {
        let flags = opts.flags();
        let req = self.req_id();
        self.push(Request::Listen {
            req,
            addr,
            backlog: opts.backlog,
            flags,
        });
        self.flush()?;
        self.wait_reply(req)
    }

    /// Has the TCP server answer static-file requests on `listener`'s connections itself,
    /// from the cache of the file server at `files_socket` (which must belong to this user),
    /// until a request it cannot answer; that one and all after it arrive here as usual. The
    /// server applies the timeouts to the connections it answers.
    pub fn serve_files(
        &mut self,
        listener: Handle,
        files_socket: &Path,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let req = self.req_id();
        let secs = |d: Duration| d.as_secs().clamp(1, u32::MAX as u64) as u32;
        self.push(Request::ServeFiles {
            req,
            listener,
            header_timeout_s: secs(header_timeout),
            idle_timeout_s: secs(idle_timeout),
            socket: files_socket.as_os_str().as_bytes(),
        });
        self.flush()?;
        self.wait_reply(req).map(|_| ())
    }

    /// Waits (up to 10 s) for the reply to request `req`, keeping other events for the next
    /// poll.
    fn wait_reply(&mut self, req: u32) -> io::Result<(Handle, SocketAddr)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut answer = None;
            let mut stash = std::mem::take(&mut self.stash);
            let mut credit = None;
            // One message at a time: everything after the answer stays in the ring, in order.
            let n = self
                .chan
                .recv_batch(1, |m| match m {
                    Message::Inline(b) => match Event::decode(b) {
                        Ok(Event::Done {
                            req: r,
                            handle,
                            local,
                            ..
                        }) if r == req => answer = Some(Ok((handle, local))),
                        Ok(Event::Failed { req: r, errno }) if r == req => {
                            answer = Some(Err(io::Error::from_raw_os_error(errno)))
                        }
                        Ok(Event::Sent { handle, bytes }) => credit = Some((handle, bytes)),
                        _ => stash_message(&mut stash, Message::Inline(b)),
                    },
                    other => stash_message(&mut stash, other),
                })
                .map_err(m2m_err)?;
            self.stash = stash;
            if let Some((h, bytes)) = credit {
                if let Some(c) = self.conns.get_mut(&h) {
                    c.unconfirmed = c.unconfirmed.saturating_sub(bytes as u64);
                }
            }
            if let Some(a) = answer {
                return a;
            }
            if n == 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the TCP server did not answer within 10 s",
                    ));
                }
                self.chan.wait_readable(Some(left)).map_err(m2m_err)?;
            }
        }
    }

    /// Publishes queued requests, then waits up to `timeout` (forever if `None`) for events
    /// and fills `events` with all that arrived. Returns how many.
    pub fn poll(&mut self, events: &mut Events, timeout: Option<Duration>) -> io::Result<usize> {
        self.flush()?;
        events.clear();
        if !self.stash.is_empty() {
            std::mem::swap(events, &mut self.stash);
        } else if !self.chan.wait_readable(timeout).map_err(m2m_err)? {
            return Ok(0);
        }
        // Events kept from a wait for a reply are accounted for like new ones.
        let mut before = 0;
        loop {
            let mut sent = std::mem::take(&mut self.sent);
            let n = self
                .chan
                .recv_batch(BATCH, |m| match m {
                    Message::Inline(b) => match Event::decode(b) {
                        Ok(Event::Sent { handle, bytes }) => sent.push((handle, bytes)),
                        _ => stash_message(events, Message::Inline(b)),
                    },
                    other => stash_message(events, other),
                })
                .map_err(m2m_err)?;
            for &(h, bytes) in &sent {
                if let Some(c) = self.conns.get_mut(&h) {
                    c.unconfirmed = c.unconfirmed.saturating_sub(bytes as u64);
                }
                self.drain_queue(h);
            }
            sent.clear();
            self.sent = sent;
            for i in before..events.items.len() {
                match events.items[i] {
                    Raw::Accepted(_, conn, _) => {
                        self.conns.insert(conn, Conn::default());
                    }
                    Raw::Data(conn, a, b) => {
                        if let Some(c) = self.conns.get_mut(&conn) {
                            if c.unacked == 0 {
                                self.touched.push(conn);
                            }
                            c.unacked += (b - a) as u32;
                            c.received += (b - a) as u64;
                        }
                    }
                    Raw::Closed(conn) => {
                        self.conns.remove(&conn);
                    }
                    _ => {}
                }
            }
            before = events.items.len();
            if n < BATCH {
                break;
            }
        }
        // Acknowledge what this batch delivered, so the server keeps reading.
        let touched = std::mem::take(&mut self.touched);
        for &handle in &touched {
            if let Some(c) = self.conns.get_mut(&handle) {
                let bytes = std::mem::take(&mut c.unacked);
                if bytes > 0 {
                    self.push(Request::Consumed { handle, bytes });
                }
            }
        }
        self.touched = touched;
        self.touched.clear();
        Ok(events.len())
    }

    fn conn(&mut self, h: Handle) -> io::Result<&mut Conn> {
        self.conns
            .get_mut(&h)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no such connection"))
    }

    /// Queues `data` for sending on `conn`, after anything queued before it.
    pub fn send(&mut self, conn: Handle, data: &[u8]) -> io::Result<()> {
        let max_inline = self.max_inline;
        let c = self.conn(conn)?;
        // The common case (nothing waiting, room in the window) goes straight to the arena.
        if c.queue.is_empty()
            && data.len() <= max_inline
            && c.unconfirmed + data.len() as u64 <= SEND_WINDOW as u64
        {
            c.unconfirmed += data.len() as u64;
            self.push(Request::Send { handle: conn, data });
            return Ok(());
        }
        if c.queued_bytes + data.len() > MAX_QUEUED {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "the peer is not reading: too many bytes queued for this connection",
            ));
        }
        c.queue.push_back(Queued::Bytes(data.to_vec()));
        c.queued_bytes += data.len();
        self.drain_queue(conn);
        Ok(())
    }

    /// Sends `len` bytes from `offset` of `file` straight from the file server's cache; this
    /// process never touches them. In order with the connection's other sends.
    pub fn send_file(
        &mut self,
        conn: Handle,
        file: &FileView,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.conn(conn)?;
        for piece in pieces(file, offset, len)? {
            let c = self.conn(conn)?;
            // Each range costs window until it is sent, like bytes: queued here past it.
            if c.queue.is_empty() && c.unconfirmed + SEND_FILE_COST as u64 <= SEND_WINDOW as u64 {
                c.unconfirmed += SEND_FILE_COST as u64;
                self.send_piece(conn, &piece)?;
            } else {
                c.queue.push_back(Queued::File(piece));
            }
        }
        self.drain_queue(conn);
        Ok(())
    }

    /// Registers the file of `piece` with the server if needed and requests its send.
    fn send_piece(&mut self, conn: Handle, piece: &Piece) -> io::Result<()> {
        let (tag, released) = self.files.tag(&mut self.chan, piece).map_err(m2m_err)?;
        for old in released {
            self.push(Request::ReleaseFile { file: old });
        }
        let (offset, len) = crate::file_tags::span(piece);
        self.push(Request::SendFile {
            handle: conn,
            file: tag,
            offset,
            len,
        });
        Ok(())
    }

    /// Closes `conn` once everything queued on it is sent. [`NetEvent::Closed`] follows.
    pub fn close(&mut self, conn: Handle) -> io::Result<()> {
        self.conn(conn)?.queue.push_back(Queued::Close);
        self.drain_queue(conn);
        Ok(())
    }

    /// Shuts down the sending side once everything queued on `conn` is sent.
    pub fn shutdown_write(&mut self, conn: Handle) -> io::Result<()> {
        self.conn(conn)?.queue.push_back(Queued::ShutdownWrite);
        self.drain_queue(conn);
        Ok(())
    }

    pub fn set_nodelay(&mut self, conn: Handle, on: bool) -> io::Result<()> {
        self.conn(conn)?;
        let req = self.req_id();
        self.push(Request::SetOption {
            req,
            handle: conn,
            opt: SockOpt::NoDelay(on),
        });
        Ok(())
    }

    /// Asks the server to stop delivering `conn`'s data; [`NetEvent::Paused`] follows, after
    /// every byte delivered before it.
    pub fn pause(&mut self, conn: Handle) -> io::Result<()> {
        self.conn(conn)?;
        self.push(Request::Pause { handle: conn });
        Ok(())
    }

    /// Hands a paused connection to the next instance listening on its (persistent) address,
    /// with `unprocessed`: the bytes received and not acted on, which the next owner receives
    /// first. Goes after everything queued on the connection; [`NetEvent::Closed`] follows.
    pub fn hand_off(&mut self, conn: Handle, unprocessed: &[u8]) -> io::Result<()> {
        if unprocessed.len() > MAX_HANDOFF {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {MAX_HANDOFF} unprocessed bytes can be handed off"),
            ));
        }
        self.conn(conn)?
            .queue
            .push_back(Queued::Handoff(unprocessed.to_vec()));
        self.drain_queue(conn);
        Ok(())
    }

    /// Parks a persistent listener for the next instance, which takes it over when it listens
    /// on the same address; until then the kernel queues new connections.
    pub fn hand_off_listener(&mut self, listener: Handle) -> io::Result<()> {
        self.push(Request::Handoff {
            handle: listener,
            data: &[],
        });
        self.flush()
    }

    /// Gives `conn` back to the direct path of its listener (see [`Reactor::serve_files`]),
    /// after everything queued on it: the TCP server answers its next requests itself again.
    /// Call it only with nothing of the connection left unprocessed. If data arrived that this
    /// reactor has not yet returned from `poll`, the server ignores the request and the data
    /// arrives as usual, so a caller never loses bytes; it may simply try again later.
    pub fn serve_direct(&mut self, conn: Handle) -> io::Result<()> {
        let c = self.conn(conn)?;
        let received = c.received;
        c.queue.push_back(Queued::ServeDirect(received));
        self.drain_queue(conn);
        Ok(())
    }

    /// Marks a request boundary on `conn`, after everything queued on it: every request it
    /// received is answered except the last `unprocessed` bytes (a request not complete yet,
    /// or pipelined ones not answered yet). On a listener with
    /// [`ListenOptions::recoverable`](crate::net::ListenOptions), this is what lets the server
    /// give the connection and those bytes to this application's successor if it dies: call it
    /// after queueing each complete response. Elsewhere it costs one small request.
    pub fn answered(&mut self, conn: Handle, unprocessed: usize) -> io::Result<()> {
        let c = self.conn(conn)?;
        let Some(mark) = c.received.checked_sub(unprocessed as u64) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "more bytes unprocessed than this connection received",
            ));
        };
        c.queue.push_back(Queued::Answered(mark));
        self.drain_queue(conn);
        Ok(())
    }

    /// Connections this reactor has open.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Encodes as much of `conn`'s queue as its send window allows.
    fn drain_queue(&mut self, conn: Handle) {
        loop {
            let max_inline = self.max_inline;
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            let room = (SEND_WINDOW as u64).saturating_sub(c.unconfirmed) as usize;
            let Some(front) = c.queue.front_mut() else {
                return;
            };
            match front {
                Queued::Bytes(b) => {
                    if room == 0 {
                        return;
                    }
                    let n = b.len().min(room).min(max_inline);
                    c.unconfirmed += n as u64;
                    c.queued_bytes -= n;
                    let part: Vec<u8> = if n == b.len() {
                        let Some(Queued::Bytes(b)) = c.queue.pop_front() else {
                            return;
                        };
                        b
                    } else {
                        b.drain(..n).collect()
                    };
                    self.push(Request::Send {
                        handle: conn,
                        data: &part,
                    });
                }
                Queued::File(_) if (room as u64) < SEND_FILE_COST as u64 => return,
                _ => {
                    let Some(q) = c.queue.pop_front() else { return };
                    if matches!(q, Queued::File(_)) {
                        c.unconfirmed += SEND_FILE_COST as u64;
                    }
                    match q {
                        Queued::File(piece) => {
                            // Fails only with the channel, which the next call reports.
                            let _ = self.send_piece(conn, &piece);
                        }
                        Queued::Close => self.push(Request::Close { handle: conn }),
                        Queued::ShutdownWrite => self.push(Request::ShutdownWrite { handle: conn }),
                        Queued::Handoff(data) => self.push(Request::Handoff {
                            handle: conn,
                            data: &data,
                        }),
                        Queued::ServeDirect(received) => self.push(Request::ServeDirect {
                            handle: conn,
                            received,
                        }),
                        Queued::Answered(received) => self.push(Request::Answered {
                            handle: conn,
                            received,
                        }),
                        Queued::Bytes(_) => {}
                    }
                }
            }
        }
    }

    /// Publishes every queued request, waiting for ring space if the server is behind.
    pub fn flush(&mut self) -> io::Result<()> {
        let mut start = 0;
        let mut i = 0;
        while i < self.ends.len() {
            let mut batch = self.chan.send_batch();
            while i < self.ends.len() {
                let end = self.ends[i];
                if !batch.try_push(&self.out[start..end]).map_err(m2m_err)? {
                    break;
                }
                start = end;
                i += 1;
            }
            let stuck = batch.is_empty();
            batch.publish();
            if stuck && i < self.ends.len() {
                let len = self.ends[i] - start;
                self.chan.wait_writable(len, None).map_err(m2m_err)?;
            }
        }
        self.out.clear();
        self.ends.clear();
        Ok(())
    }
}

/// Adds a message from the server to `events` (everything but `Sent` and replies).
fn stash_message(events: &mut Events, m: Message<'_>) {
    match m {
        Message::Inline(b) => match Event::decode(b) {
            Ok(Event::Data { handle, data }) => events.push_data(handle, data),
            Ok(Event::Accepted {
                listener,
                conn,
                peer,
                ..
            }) => events.items.push(Raw::Accepted(listener, conn, peer)),
            Ok(Event::Eof { handle }) => events.items.push(Raw::Eof(handle)),
            Ok(Event::Error { handle, errno }) => events.items.push(Raw::Error(handle, errno)),
            Ok(Event::Closed { handle }) => events.items.push(Raw::Closed(handle)),
            Ok(Event::Paused { handle }) => events.items.push(Raw::Paused(handle)),
            Ok(Event::ProtocolError { op, errno }) => {
                tracing::warn!(op, errno, "the TCP server rejected a request")
            }
            // Replies to requests nobody waits for (socket options).
            Ok(Event::Done { .. } | Event::Failed { .. } | Event::Sent { .. }) => {}
            Err(e) => tracing::warn!("undecodable event from the TCP server: {e}"),
        },
        Message::Buffer(rx) => match BufferMeta::decode(rx.meta()) {
            Ok(BufferMeta::Data(h)) => {
                let a = events.data.len();
                events.data.resize(a + rx.len(), 0);
                rx.read_at(0, &mut events.data[a..]);
                events.items.push(Raw::Data(h, a, events.data.len()));
            }
            _ => tracing::warn!("buffer without a data header from the TCP server"),
        },
    }
}
