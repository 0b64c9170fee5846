//! `TcpListener` and `TcpStream` with the names and behaviour of `std::net`, served by the
//! Split-OS TCP server: porting an application is mostly a change of imports.
//!
//! Small writes travel inline through the request ring (one copy); writes of 16 KiB or more are
//! written into a shared buffer and sent by the server straight from it. Reads come out of the
//! session's per-connection queue, in place when the server delivered a buffer.

use crate::session::{Creates, Session, WaitKey};
use splitos_tcp_proto::{
    listen_flags, BufferMeta, Handle, Request, SockOpt, SEND_FILE_COST, SEND_WINDOW,
};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Writes at least this large go through a shared buffer instead of the ring.
const BUFFER_WRITE_MIN: usize = 16 << 10;

fn resolve(addr: impl ToSocketAddrs) -> io::Result<Vec<SocketAddr>> {
    let v: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    if v.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "could not resolve to any addresses",
        ));
    }
    Ok(v)
}

/// Options for [`TcpListener::bind_with`].
#[derive(Clone, Copy, Debug)]
pub struct ListenOptions {
    pub backlog: u32,
    /// SO_REUSEPORT: several sessions (or processes) share the port.
    pub reuse_port: bool,
    /// Keep the listening socket open in the server if this process dies, so that a restarted
    /// instance listening on the same address takes it over without refusing a connection.
    pub persistent: bool,
    /// With `persistent`: the application marks each connection's request boundaries
    /// ([`crate::reactor::Reactor::answered`]); if it dies, connections whose responses are
    /// complete go to its successor with their unanswered requests, which it answers.
    pub recoverable: bool,
}

impl ListenOptions {
    /// The protocol's listen flags for these options (SO_REUSEADDR always, as std does on Unix).
    pub(crate) fn flags(&self) -> u32 {
        let mut flags = listen_flags::REUSE_ADDR;
        if self.reuse_port {
            flags |= listen_flags::REUSE_PORT;
        }
        if self.persistent {
            flags |= listen_flags::PERSISTENT;
            if self.recoverable {
                flags |= listen_flags::RECOVERABLE;
            }
        }
        flags
    }
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            backlog: 1024,
            reuse_port: false,
            persistent: false,
            recoverable: false,
        }
    }
}

pub struct TcpListener {
    pub(crate) session: Session,
    pub(crate) handle: Handle,
    pub(crate) local: SocketAddr,
}

impl TcpListener {
    /// Like `std::net::TcpListener::bind`, on the process's default session.
    pub fn bind(addr: impl ToSocketAddrs) -> io::Result<TcpListener> {
        Self::bind_with(&crate::default_session()?, addr, ListenOptions::default())
    }

    /// Binds on a given session with options.
    pub fn bind_with(
        session: &Session,
        addr: impl ToSocketAddrs,
        opts: ListenOptions,
    ) -> io::Result<TcpListener> {
        let flags = opts.flags();
        let mut last = None;
        for a in resolve(addr)? {
            let r = session.call(Creates::Listener, |req| Request::Listen {
                req,
                addr: a,
                backlog: opts.backlog,
                flags,
            });
            match r {
                Ok((handle, local, _)) => {
                    return Ok(TcpListener {
                        session: session.clone(),
                        handle,
                        local,
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no address")))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    pub fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let h = self.handle;
        let (conn, local, peer) = self.session.wait_until(WaitKey::Socket(h), None, |st| {
            let ls = st.listeners.entry(h).or_default();
            Ok(ls.queue.pop_front())
        })?;
        Ok((
            TcpStream::new(self.session.clone(), conn, local, peer),
            peer,
        ))
    }

    pub fn incoming(&self) -> impl Iterator<Item = io::Result<TcpStream>> + '_ {
        std::iter::repeat_with(move || self.accept().map(|(s, _)| s))
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        if let Ok(mut st) = self.session.lock() {
            // Connections accepted but never taken are closed with the listener.
            if let Some(ls) = st.listeners.get_mut(&self.handle) {
                let pending: Vec<Handle> = ls.queue.drain(..).map(|(h, _, _)| h).collect();
                for h in pending {
                    if let Some(c) = st.conns.get_mut(&h) {
                        c.closed = true;
                    }
                    let _ = st.request(Request::Close { handle: h });
                }
            }
            let _ = st.request(Request::Close {
                handle: self.handle,
            });
        }
    }
}

pub(crate) struct StreamInner {
    pub(crate) session: Session,
    pub(crate) handle: Handle,
    pub(crate) local: SocketAddr,
    pub(crate) peer: SocketAddr,
    read_timeout: Mutex<Option<Duration>>,
    write_timeout: Mutex<Option<Duration>>,
}

impl Drop for StreamInner {
    fn drop(&mut self) {
        if let Ok(mut st) = self.session.lock() {
            if let Some(c) = st.conns.get_mut(&self.handle) {
                c.closed = true;
                c.rx.clear();
            }
            let _ = st.request(Request::Close {
                handle: self.handle,
            });
        }
    }
}

/// A TCP connection owned by the Split-OS TCP server.
#[derive(Clone)]
pub struct TcpStream {
    pub(crate) inner: Arc<StreamInner>,
}

impl std::fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStream")
            .field("local", &self.inner.local)
            .field("peer", &self.inner.peer)
            .finish()
    }
}

fn deadline(t: &Mutex<Option<Duration>>) -> Option<Instant> {
    t.lock().ok().and_then(|t| *t).map(|d| Instant::now() + d)
}

impl TcpStream {
    pub(crate) fn new(
        session: Session,
        handle: Handle,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> TcpStream {
        TcpStream {
            inner: Arc::new(StreamInner {
                session,
                handle,
                local,
                peer,
                read_timeout: Mutex::new(None),
                write_timeout: Mutex::new(None),
            }),
        }
    }

    /// Like `std::net::TcpStream::connect`, on the process's default session.
    pub fn connect(addr: impl ToSocketAddrs) -> io::Result<TcpStream> {
        Self::connect_with(&crate::default_session()?, addr)
    }

    pub fn connect_with(session: &Session, addr: impl ToSocketAddrs) -> io::Result<TcpStream> {
        let mut last = None;
        for a in resolve(addr)? {
            match session.call(Creates::Connection, |req| Request::Connect { req, addr: a }) {
                Ok((handle, local, peer)) => {
                    return Ok(TcpStream::new(session.clone(), handle, local, peer));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no address")))
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.inner.peer)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.inner.local)
    }

    /// A second handle to the same connection (the connection closes when the last goes).
    pub fn try_clone(&self) -> io::Result<TcpStream> {
        Ok(self.clone())
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        if t == Some(Duration::ZERO) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "zero timeout"));
        }
        *self
            .inner
            .read_timeout
            .lock()
            .map_err(|_| io::Error::other("poisoned"))? = t;
        Ok(())
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        if t == Some(Duration::ZERO) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "zero timeout"));
        }
        *self
            .inner
            .write_timeout
            .lock()
            .map_err(|_| io::Error::other("poisoned"))? = t;
        Ok(())
    }

    fn set_option(&self, opt: SockOpt) -> io::Result<()> {
        let h = self.inner.handle;
        self.inner
            .session
            .call(Creates::Nothing, |req| Request::SetOption {
                req,
                handle: h,
                opt,
            })
            .map(|_| ())
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.set_option(SockOpt::NoDelay(on))
    }

    pub fn set_keepalive(&self, on: bool) -> io::Result<()> {
        self.set_option(SockOpt::KeepAlive(on))
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let h = self.inner.handle;
        let mut st = self.inner.session.lock()?;
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            if let Some(c) = st.conns.get_mut(&h) {
                c.eof = true;
                c.rx.clear();
                c.held = 0;
            }
        }
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            st.request(Request::ShutdownWrite { handle: h })?;
        }
        Ok(())
    }

    /// Transmits `len` bytes from `offset` of a file opened through the file server, straight
    /// from the shared cache: this process never touches the bytes. The file's sealed segments
    /// are handed to the TCP server once and reused; the bytes go out as the version `file`
    /// holds, whatever happens to the file meanwhile. A file passed by reference (too large to
    /// cache) goes out by `sendfile` from the file itself: if it shrinks meanwhile, the
    /// connection fails (the response ends short), and if it is rewritten the bytes sent are
    /// those it holds when they are sent. Returns once the send is queued; like a write, it
    /// waits (up to the write timeout) while the connection's send window is full: each queued
    /// range costs `SEND_FILE_COST` of it until the server has sent it.
    pub fn send_file(
        &self,
        file: &splitos_file_server::client::FileView,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let h = self.inner.handle;
        let dl = deadline(&self.inner.write_timeout);
        for piece in crate::file_tags::pieces(file, offset, len)? {
            self.inner
                .session
                .wait_until(WaitKey::Socket(h), dl, |st| try_send_piece(st, h, &piece))?;
        }
        Ok(())
    }

    fn read_impl(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let h = self.inner.handle;
        let dl = deadline(&self.inner.read_timeout);
        self.inner
            .session
            .wait_until(WaitKey::Socket(h), dl, |st| try_read(st, h, buf))
    }

    fn write_impl(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let h = self.inner.handle;
        let dl = deadline(&self.inner.write_timeout);
        self.inner
            .session
            .wait_until(WaitKey::Socket(h), dl, |st| try_write(st, h, buf))
    }
}

/// Hands as much of `buf` to the server as the send window allows; `None` if it is full.
pub(crate) fn try_write(
    st: &mut crate::session::State,
    h: Handle,
    buf: &[u8],
) -> io::Result<Option<usize>> {
    let max_inline = st.chan.max_message_len() - Request::SEND_HEADER;
    let Some(c) = st.conns.get(&h) else {
        return Err(io::Error::from(io::ErrorKind::NotConnected));
    };
    if let Some(errno) = c.error {
        return Err(io::Error::from_raw_os_error(errno));
    }
    let room = SEND_WINDOW as u64 - c.unconfirmed.min(SEND_WINDOW as u64);
    if room == 0 {
        return Ok(None);
    }
    let mut n = buf.len().min(room as usize);
    if n >= BUFFER_WRITE_MIN {
        let alloc = st.chan.alloc_buffer().map_err(|e| st.fail(e))?;
        if let Some(mut b) = alloc {
            n = n.min(b.capacity());
            b.write(0, &buf[..n]).map_err(|e| st.fail(e))?;
            let meta = BufferMeta::Send(h).encode();
            st.chan
                .send_buffer_with(b, n, &meta)
                .map_err(|e| st.fail(e))?;
            if let Some(c) = st.conns.get_mut(&h) {
                c.unconfirmed += n as u64;
            }
            return Ok(Some(n));
        }
    }
    n = n.min(max_inline);
    st.request(Request::Send {
        handle: h,
        data: &buf[..n],
    })?;
    if let Some(c) = st.conns.get_mut(&h) {
        c.unconfirmed += n as u64;
    }
    Ok(Some(n))
}

/// Queues one piece of a `send_file` if the send window has room for its cost; `None` if not.
fn try_send_piece(
    st: &mut crate::session::State,
    h: Handle,
    piece: &splitos_file_server::client::Piece,
) -> io::Result<Option<()>> {
    let Some(c) = st.conns.get(&h) else {
        return Err(io::Error::from(io::ErrorKind::NotConnected));
    };
    if let Some(errno) = c.error {
        return Err(io::Error::from_raw_os_error(errno));
    }
    if c.unconfirmed + SEND_FILE_COST as u64 > SEND_WINDOW as u64 {
        return Ok(None);
    }
    let (tag, released) = st.files.tag(&mut st.chan, piece).map_err(|e| st.fail(e))?;
    for old in released {
        st.request(Request::ReleaseFile { file: old })?;
    }
    let (within, part) = crate::file_tags::span(piece);
    st.request(Request::SendFile {
        handle: h,
        file: tag,
        offset: within,
        len: part,
    })?;
    if let Some(c) = st.conns.get_mut(&h) {
        c.unconfirmed += SEND_FILE_COST as u64;
    }
    Ok(Some(()))
}

/// Takes received bytes of `h` if there are any; `Some(0)` at EOF; `None` if nothing yet.
pub(crate) fn try_read(
    st: &mut crate::session::State,
    h: Handle,
    buf: &mut [u8],
) -> io::Result<Option<usize>> {
    let Some(c) = st.conns.get(&h) else {
        return Err(io::Error::from(io::ErrorKind::NotConnected));
    };
    if !c.rx.is_empty() {
        return st.read_into(h, buf).map(Some);
    }
    if let Some(errno) = c.error {
        return Err(io::Error::from_raw_os_error(errno));
    }
    if c.eof {
        return Ok(Some(0));
    }
    Ok(None)
}

impl Read for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_impl(buf)
    }
}

impl Read for &TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_impl(buf)
    }
}

impl Write for TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_impl(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for &TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_impl(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
