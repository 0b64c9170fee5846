//! The messages applications and the TCP server exchange over an m2m channel.
//!
//! One channel is one *session*. The application sends [`Request`]s, the server answers with
//! [`Event`]s. Sockets are named by [`Handle`]s that the server issues per session; a handle
//! carries a generation, so a handle that was closed (or never issued) is rejected rather than
//! reaching someone else's socket.
//!
//! Flow control is credit-based, per connection, in both directions:
//! - send: the application may have at most [`SEND_WINDOW`] bytes handed to the server and not
//!   yet confirmed by an [`Event::Sent`]; the server refuses more.
//! - receive: the server delivers at most [`RECV_WINDOW`] bytes that the application has not
//!   acknowledged with [`Request::Consumed`]; past that it stops reading the socket, so the
//!   kernel's receive window closes and back-pressure reaches the remote peer.
//!
//! Payloads travel inline in the ring (`Send`/`Data` records) or, when large, in m2m buffers
//! whose metadata is a [`BufferMeta`]. Encoding is fixed little-endian; decoding checks every
//! length and never panics on any input (see the property tests).

#![forbid(unsafe_code)]

use core::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

mod socket_path;
pub use socket_path::default_socket_path;

pub const VERSION: u16 = 1;

/// Bytes an application may have in flight to the server per connection.
pub const SEND_WINDOW: u32 = 1 << 20;
/// What one [`Request::SendFile`] counts against [`SEND_WINDOW`]: a queued file range holds
/// server memory (a record, not the bytes), so without a cost an application could queue
/// ranges without bound. Its credit comes back with `Sent` once the range is sent; at most
/// `SEND_WINDOW / SEND_FILE_COST` (16,384) ranges wait per connection.
pub const SEND_FILE_COST: u32 = 64;
/// Bytes the server delivers per connection before the application acknowledges them.
pub const RECV_WINDOW: u32 = 1 << 20;
/// Longest application name in a [`Request::Hello`].
pub const MAX_NAME: usize = 64;
/// Longest file-server socket path in a [`Request::ServeFiles`] (a Unix socket path's limit).
pub const MAX_SOCKET_PATH: usize = 107;
/// Most unprocessed bytes a [`Request::Handoff`] may carry back to the server.
pub const MAX_HANDOFF: usize = 32 << 10;
/// Set in the tag of a descriptor message (and so in the `file` of the `SendFile` and
/// `ReleaseFile` requests naming it) that carries a plain regular file rather than a sealed
/// segment: a file too large for the file cache, passed by reference. The server accepts only
/// a regular file there (`fstat` `S_ISREG`, not on FUSE), never maps it, and sends it with
/// `sendfile`; if the file is shorter than a range sent from it, that connection fails.
pub const PLAIN_FILE_TAG: u64 = 1 << 63;

/// A socket, as named within one session: slot index and generation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Handle(pub u64);

impl Handle {
    pub fn new(index: u32, generation: u32) -> Handle {
        Handle(index as u64 | (generation as u64) << 32)
    }
    pub fn index(self) -> u32 {
        self.0 as u32
    }
    pub fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// Options of [`Request::Listen`].
pub mod listen_flags {
    /// SO_REUSEADDR.
    pub const REUSE_ADDR: u32 = 1;
    /// SO_REUSEPORT: several sessions share the port; the kernel spreads connections.
    pub const REUSE_PORT: u32 = 2;
    /// Keep the listening socket open for a grace period if the session dies, so a restarted
    /// application that listens on the same address takes it over with no refused connection.
    pub const PERSISTENT: u32 = 4;
    /// With `PERSISTENT`: the application marks each connection's request boundaries
    /// ([`Request::Answered`](super::Request::Answered)), and the server keeps a copy of what it
    /// delivered after the last mark. If the application dies, a connection whose responses
    /// are complete goes on to its successor with those bytes, which answers them: a crash
    /// then fails no request.
    pub const RECOVERABLE: u32 = 8;
    pub const ALL: u32 = REUSE_ADDR | REUSE_PORT | PERSISTENT | RECOVERABLE;
}

/// Socket options of [`Request::SetOption`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SockOpt {
    NoDelay(bool),
    KeepAlive(bool),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Request<'a> {
    /// Optional first message: who this session is (shown by `splitos status`).
    Hello {
        version: u16,
        name: &'a [u8],
    },
    Listen {
        req: u32,
        addr: SocketAddr,
        backlog: u32,
        flags: u32,
    },
    Connect {
        req: u32,
        addr: SocketAddr,
    },
    /// Bytes to send on a connection, inline.
    Send {
        handle: Handle,
        data: &'a [u8],
    },
    /// Shut down the write side once queued bytes are sent.
    ShutdownWrite {
        handle: Handle,
    },
    /// Close once queued bytes are sent; the server answers with [`Event::Closed`].
    Close {
        handle: Handle,
    },
    SetOption {
        req: u32,
        handle: Handle,
        opt: SockOpt,
    },
    /// The application has read `bytes` more bytes of this connection.
    Consumed {
        handle: Handle,
        bytes: u32,
    },
    /// Send `len` bytes from `offset` of a sealed file segment straight from shared memory.
    /// The segment's memfd was passed earlier as a descriptor message tagged `file`; with
    /// [`PLAIN_FILE_TAG`] set in the tag, a plain file sent by `sendfile`.
    SendFile {
        handle: Handle,
        file: u64,
        offset: u64,
        len: u64,
    },
    /// The application will not name segment `file` again; the server drops its mapping once
    /// queued sends from it are done.
    ReleaseFile {
        file: u64,
    },
    /// Stop delivering this connection's data; the server answers with [`Event::Paused`], after
    /// which no `Data` for it reaches this session. Bytes that arrive meanwhile wait in the
    /// server. The first half of handing a connection to another application instance.
    Pause {
        handle: Handle,
    },
    /// Give a paused connection, accepted on a persistent listener, to whichever session listens
    /// on that address next (or already does): `data` (at most [`MAX_HANDOFF`] bytes) is what
    /// this application received but did not process; the new owner receives it first, then
    /// whatever the server held back since the pause. Bytes queued for sending still go out
    /// first; then this session gets [`Event::Closed`] and the handle is retired.
    ///
    /// On a persistent listener (with no data) it parks the listener for the next instance, as
    /// the session's death would, while this session finishes with its connections.
    Handoff {
        handle: Handle,
        data: &'a [u8],
    },
    /// Answer static-file requests on connections of `listener` in the server itself, from the
    /// cache of the file server at `socket` (a Unix socket owned by this application's user):
    /// GET and HEAD for files the cache holds. The first request of a connection that the
    /// server cannot answer (anything else) and all that follow reach the application as
    /// `Data`, as they would without the route. The server closes connections of the route
    /// idle for `idle_timeout_s`, and answers 408 to a head not completed in
    /// `header_timeout_s`. Replied to with `Done` or `Failed`.
    ServeFiles {
        req: u32,
        listener: Handle,
        header_timeout_s: u32,
        idle_timeout_s: u32,
        socket: &'a [u8],
    },
    /// Give a connection that the direct path handed to this application back to it: the
    /// server answers its next requests itself again (until the next one it cannot). Honoured
    /// only if the application has seen every byte of it — `received` equals the bytes the
    /// server ever delivered on it — and nothing is paused or handed off; otherwise ignored,
    /// and the bytes keep arriving as `Data`. No reply either way.
    ServeDirect {
        handle: Handle,
        received: u64,
    },
    /// A request boundary: every request in the first `received` bytes delivered on this
    /// connection is answered, its response fully queued. On a `RECOVERABLE` listener's
    /// connection the server forgets its copy of those bytes; if the application dies later,
    /// the connection and the bytes after the mark go to its successor, provided nothing was
    /// sent after the mark (a response half queued cannot be finished by someone else). A mark
    /// past what was delivered is a protocol violation. No reply.
    Answered {
        handle: Handle,
        received: u64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Event<'a> {
    /// A request succeeded. `handle` is the new socket for Listen/Connect, else the request's.
    Done {
        req: u32,
        handle: Handle,
        local: SocketAddr,
        peer: SocketAddr,
    },
    /// A request failed with this errno.
    Failed { req: u32, errno: i32 },
    Accepted {
        listener: Handle,
        conn: Handle,
        local: SocketAddr,
        peer: SocketAddr,
    },
    /// Bytes received on a connection, inline.
    Data { handle: Handle, data: &'a [u8] },
    /// The peer shut down its write side.
    Eof { handle: Handle },
    /// `bytes` more bytes of this connection were accepted by the kernel (send credit back).
    Sent { handle: Handle, bytes: u32 },
    /// The connection failed (e.g. ECONNRESET); no more data will come.
    Error { handle: Handle, errno: i32 },
    /// The handle is retired: its close finished, or the server closed it.
    Closed { handle: Handle },
    /// The server could not make sense of a request (it is dropped); `errno` says why.
    ProtocolError { op: u8, errno: i32 },
    /// Answer to [`Request::Pause`]: every byte delivered for this connection precedes this event.
    Paused { handle: Handle },
}

/// What an m2m buffer carries, in the buffer's metadata.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BufferMeta {
    /// Application → server: send the buffer's bytes on this connection.
    Send(Handle),
    /// Server → application: bytes received on this connection.
    Data(Handle),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message truncated")]
    Truncated,
    #[error("unknown operation {0}")]
    UnknownOp(u8),
    #[error("trailing bytes after the message")]
    Trailing,
    #[error("invalid socket address")]
    BadAddress,
    #[error("invalid field value")]
    BadValue,
}

impl DecodeError {
    /// The errno a server reports for a request that failed to decode.
    pub fn errno(self) -> i32 {
        match self {
            DecodeError::UnknownOp(_) => 95, // EOPNOTSUPP
            _ => 22,                         // EINVAL
        }
    }
}

/// The op codes: the first byte of every request and event, and of a [`BufferMeta`]. Public so
/// that a server can name the request it reports in [`Event::ProtocolError`] (`op::SEND`, not
/// `4`); [`Request::op`] and [`Event::op`] give a message's code.
pub mod op {
    // Requests (application → server).
    pub const HELLO: u8 = 1;
    pub const LISTEN: u8 = 2;
    pub const CONNECT: u8 = 3;
    pub const SEND: u8 = 4;
    pub const SHUTDOWN_WRITE: u8 = 5;
    pub const CLOSE: u8 = 6;
    pub const SET_OPTION: u8 = 7;
    pub const CONSUMED: u8 = 8;
    pub const SEND_FILE: u8 = 9;
    pub const RELEASE_FILE: u8 = 10;
    pub const PAUSE: u8 = 11;
    pub const HANDOFF: u8 = 12;
    pub const SERVE_FILES: u8 = 13;
    pub const SERVE_DIRECT: u8 = 14;
    pub const ANSWERED: u8 = 15;

    // Events (server → application).
    pub const DONE: u8 = 64;
    pub const FAILED: u8 = 65;
    pub const ACCEPTED: u8 = 66;
    pub const DATA: u8 = 67;
    pub const EOF: u8 = 68;
    pub const SENT: u8 = 69;
    pub const ERROR: u8 = 70;
    pub const CLOSED: u8 = 71;
    pub const PROTOCOL_ERROR: u8 = 72;
    pub const PAUSED: u8 = 73;

    // Buffer metadata.
    pub const META_SEND: u8 = 128;
    pub const META_DATA: u8 = 129;
}

/// Bytes of the op code in front of every message.
const OP_BYTES: usize = size_of::<u8>();
/// Bytes of an encoded [`Handle`].
const HANDLE_BYTES: usize = size_of::<u64>();
/// Bytes of an encoded socket address: family u8 | pad u8 | port u16 | ip 16 B | flowinfo u32 |
/// scope u32.
const ADDR_BYTES: usize =
    2 * size_of::<u8>() + size_of::<u16>() + size_of::<[u8; 16]>() + 2 * size_of::<u32>();
const _: () = assert!(ADDR_BYTES == 28);

/// Appends fixed-size little-endian fields.
struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn handle(&mut self, h: Handle) -> &mut Self {
        self.0.extend_from_slice(&h.0.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// family u8 (4/6/0) | pad u8 | port u16 | ip 16 B | v6 flowinfo u32 | v6 scope u32
    fn addr(&mut self, a: SocketAddr) -> &mut Self {
        let mut b = [0u8; ADDR_BYTES];
        b[2..4].copy_from_slice(&a.port().to_le_bytes());
        match a {
            SocketAddr::V4(v4) => {
                b[0] = 4;
                b[4..8].copy_from_slice(&v4.ip().octets());
            }
            SocketAddr::V6(v6) => {
                b[0] = 6;
                b[4..20].copy_from_slice(&v6.ip().octets());
                b[20..24].copy_from_slice(&v6.flowinfo().to_le_bytes());
                b[24..28].copy_from_slice(&v6.scope_id().to_le_bytes());
            }
        }
        self.bytes(&b)
    }
}

/// Reads fixed-size fields, failing with `Truncated` instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Truncated)?;
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.take()?))
    }
    fn handle(&mut self) -> Result<Handle, DecodeError> {
        Ok(Handle(u64::from_le_bytes(self.take()?)))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    fn addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let b: [u8; ADDR_BYTES] = self.take()?;
        let port = u16::from_le_bytes([b[2], b[3]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        match b[0] {
            4 => Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::new(b[4], b[5], b[6], b[7]),
                port,
            ))),
            6 => {
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&b[4..20]);
                Ok(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(ip),
                    port,
                    u32_at(20),
                    u32_at(24),
                )))
            }
            _ => Err(DecodeError::BadAddress),
        }
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing)
        }
    }
}

/// The address reported when there is none (e.g. `peer` of a listener).
pub const NO_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

impl<'a> Request<'a> {
    /// The op code this request is encoded with (its first byte).
    pub fn op(&self) -> u8 {
        match self {
            Request::Hello { .. } => op::HELLO,
            Request::Listen { .. } => op::LISTEN,
            Request::Connect { .. } => op::CONNECT,
            Request::Send { .. } => op::SEND,
            Request::ShutdownWrite { .. } => op::SHUTDOWN_WRITE,
            Request::Close { .. } => op::CLOSE,
            Request::SetOption { .. } => op::SET_OPTION,
            Request::Consumed { .. } => op::CONSUMED,
            Request::SendFile { .. } => op::SEND_FILE,
            Request::ReleaseFile { .. } => op::RELEASE_FILE,
            Request::Pause { .. } => op::PAUSE,
            Request::Handoff { .. } => op::HANDOFF,
            Request::ServeFiles { .. } => op::SERVE_FILES,
            Request::ServeDirect { .. } => op::SERVE_DIRECT,
            Request::Answered { .. } => op::ANSWERED,
        }
    }

    /// Appends the encoding to `out` (which the caller typically reuses).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer(out);
        w.u8(self.op());
        match *self {
            Request::Hello { version, name } => {
                w.u16(version).bytes(name);
            }
            Request::Listen {
                req,
                addr,
                backlog,
                flags,
            } => {
                w.u32(req).u32(backlog).u32(flags).addr(addr);
            }
            Request::Connect { req, addr } => {
                w.u32(req).addr(addr);
            }
            Request::Send { handle, data } => {
                w.handle(handle).bytes(data);
            }
            Request::ShutdownWrite { handle } => {
                w.handle(handle);
            }
            Request::Close { handle } => {
                w.handle(handle);
            }
            Request::SetOption { req, handle, opt } => {
                let (code, on) = match opt {
                    SockOpt::NoDelay(on) => (1, on),
                    SockOpt::KeepAlive(on) => (2, on),
                };
                w.u32(req).handle(handle).u8(code).u8(on as u8);
            }
            Request::Consumed { handle, bytes } => {
                w.handle(handle).u32(bytes);
            }
            Request::SendFile {
                handle,
                file,
                offset,
                len,
            } => {
                w.handle(handle).u64(file).u64(offset).u64(len);
            }
            Request::ReleaseFile { file } => {
                w.u64(file);
            }
            Request::Pause { handle } => {
                w.handle(handle);
            }
            Request::Handoff { handle, data } => {
                w.handle(handle).bytes(data);
            }
            Request::ServeFiles {
                req,
                listener,
                header_timeout_s,
                idle_timeout_s,
                socket,
            } => {
                w.u32(req)
                    .handle(listener)
                    .u32(header_timeout_s)
                    .u32(idle_timeout_s)
                    .bytes(socket);
            }
            Request::ServeDirect { handle, received } | Request::Answered { handle, received } => {
                w.handle(handle).u64(received);
            }
        }
    }

    /// Bytes of header in front of the payload of an inline `Send`: op, handle.
    pub const SEND_HEADER: usize = OP_BYTES + HANDLE_BYTES;

    pub fn decode(bytes: &'a [u8]) -> Result<Request<'a>, DecodeError> {
        let mut r = Reader(bytes);
        let op = r.u8()?;
        let req = match op {
            op::HELLO => {
                let version = r.u16()?;
                let name = r.rest();
                if name.len() > MAX_NAME {
                    return Err(DecodeError::BadValue);
                }
                Request::Hello { version, name }
            }
            op::LISTEN => {
                let req = r.u32()?;
                let backlog = r.u32()?;
                let flags = r.u32()?;
                if flags & !listen_flags::ALL != 0 {
                    return Err(DecodeError::BadValue);
                }
                Request::Listen {
                    req,
                    backlog,
                    flags,
                    addr: r.addr()?,
                }
            }
            op::CONNECT => Request::Connect {
                req: r.u32()?,
                addr: r.addr()?,
            },
            op::SEND => Request::Send {
                handle: r.handle()?,
                data: r.rest(),
            },
            op::SHUTDOWN_WRITE => Request::ShutdownWrite {
                handle: r.handle()?,
            },
            op::CLOSE => Request::Close {
                handle: r.handle()?,
            },
            op::SET_OPTION => {
                let req = r.u32()?;
                let handle = r.handle()?;
                let code = r.u8()?;
                let on = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::BadValue),
                };
                let opt = match code {
                    1 => SockOpt::NoDelay(on),
                    2 => SockOpt::KeepAlive(on),
                    _ => return Err(DecodeError::BadValue),
                };
                Request::SetOption { req, handle, opt }
            }
            op::CONSUMED => Request::Consumed {
                handle: r.handle()?,
                bytes: r.u32()?,
            },
            op::SEND_FILE => Request::SendFile {
                handle: r.handle()?,
                file: r.u64()?,
                offset: r.u64()?,
                len: r.u64()?,
            },
            op::RELEASE_FILE => Request::ReleaseFile { file: r.u64()? },
            op::PAUSE => Request::Pause {
                handle: r.handle()?,
            },
            op::HANDOFF => {
                let handle = r.handle()?;
                let data = r.rest();
                if data.len() > MAX_HANDOFF {
                    return Err(DecodeError::BadValue);
                }
                Request::Handoff { handle, data }
            }
            op::SERVE_FILES => {
                let req = r.u32()?;
                let listener = r.handle()?;
                let header_timeout_s = r.u32()?;
                let idle_timeout_s = r.u32()?;
                let socket = r.rest();
                if socket.is_empty() || socket.len() > MAX_SOCKET_PATH || socket.contains(&0) {
                    return Err(DecodeError::BadValue);
                }
                Request::ServeFiles {
                    req,
                    listener,
                    header_timeout_s,
                    idle_timeout_s,
                    socket,
                }
            }
            op::SERVE_DIRECT => Request::ServeDirect {
                handle: r.handle()?,
                received: r.u64()?,
            },
            op::ANSWERED => Request::Answered {
                handle: r.handle()?,
                received: r.u64()?,
            },
            other => return Err(DecodeError::UnknownOp(other)),
        };
        r.end()?;
        Ok(req)
    }
}

impl<'a> Event<'a> {
    /// The op code this event is encoded with (its first byte).
    pub fn op(&self) -> u8 {
        match self {
            Event::Done { .. } => op::DONE,
            Event::Failed { .. } => op::FAILED,
            Event::Accepted { .. } => op::ACCEPTED,
            Event::Data { .. } => op::DATA,
            Event::Eof { .. } => op::EOF,
            Event::Sent { .. } => op::SENT,
            Event::Error { .. } => op::ERROR,
            Event::Closed { .. } => op::CLOSED,
            Event::ProtocolError { .. } => op::PROTOCOL_ERROR,
            Event::Paused { .. } => op::PAUSED,
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer(out);
        w.u8(self.op());
        match *self {
            Event::Done {
                req,
                handle,
                local,
                peer,
            } => {
                w.u32(req).handle(handle).addr(local).addr(peer);
            }
            Event::Failed { req, errno } => {
                w.u32(req).i32(errno);
            }
            Event::Accepted {
                listener,
                conn,
                local,
                peer,
            } => {
                w.handle(listener).handle(conn).addr(local).addr(peer);
            }
            Event::Data { handle, data } => {
                w.handle(handle).bytes(data);
            }
            Event::Eof { handle } => {
                w.handle(handle);
            }
            Event::Sent { handle, bytes } => {
                w.handle(handle).u32(bytes);
            }
            Event::Error { handle, errno } => {
                w.handle(handle).i32(errno);
            }
            Event::Closed { handle } => {
                w.handle(handle);
            }
            Event::ProtocolError { op: o, errno } => {
                w.u8(o).i32(errno);
            }
            Event::Paused { handle } => {
                w.handle(handle);
            }
        }
    }

    /// Bytes of header in front of the payload of an inline `Data`: op, handle.
    pub const DATA_HEADER: usize = OP_BYTES + HANDLE_BYTES;

    pub fn decode(bytes: &'a [u8]) -> Result<Event<'a>, DecodeError> {
        let mut r = Reader(bytes);
        let ev = match r.u8()? {
            op::DONE => Event::Done {
                req: r.u32()?,
                handle: r.handle()?,
                local: r.addr()?,
                peer: r.addr()?,
            },
            op::FAILED => Event::Failed {
                req: r.u32()?,
                errno: r.i32()?,
            },
            op::ACCEPTED => Event::Accepted {
                listener: r.handle()?,
                conn: r.handle()?,
                local: r.addr()?,
                peer: r.addr()?,
            },
            op::DATA => Event::Data {
                handle: r.handle()?,
                data: r.rest(),
            },
            op::EOF => Event::Eof {
                handle: r.handle()?,
            },
            op::SENT => Event::Sent {
                handle: r.handle()?,
                bytes: r.u32()?,
            },
            op::ERROR => Event::Error {
                handle: r.handle()?,
                errno: r.i32()?,
            },
            op::CLOSED => Event::Closed {
                handle: r.handle()?,
            },
            op::PROTOCOL_ERROR => Event::ProtocolError {
                op: r.u8()?,
                errno: r.i32()?,
            },
            op::PAUSED => Event::Paused {
                handle: r.handle()?,
            },
            other => return Err(DecodeError::UnknownOp(other)),
        };
        r.end()?;
        Ok(ev)
    }
}

impl BufferMeta {
    /// Bytes of the encoding: op, handle.
    pub const BYTES: usize = OP_BYTES + HANDLE_BYTES;

    pub fn encode(&self) -> [u8; Self::BYTES] {
        let (o, h) = match *self {
            BufferMeta::Send(h) => (op::META_SEND, h),
            BufferMeta::Data(h) => (op::META_DATA, h),
        };
        let mut b = [0u8; Self::BYTES];
        b[0] = o;
        b[1..].copy_from_slice(&h.0.to_le_bytes());
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<BufferMeta, DecodeError> {
        let mut r = Reader(bytes);
        let o = r.u8()?;
        let h = r.handle()?;
        r.end()?;
        match o {
            op::META_SEND => Ok(BufferMeta::Send(h)),
            op::META_DATA => Ok(BufferMeta::Data(h)),
            other => Err(DecodeError::UnknownOp(other)),
        }
    }
}

#[cfg(test)]
mod tests;
