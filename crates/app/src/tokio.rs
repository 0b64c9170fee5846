//! The tokio flavour: `TcpListener` and `TcpStream` implementing tokio's `AsyncRead` and
//! `AsyncWrite`, so hyper and axum run over Split-OS unchanged (`axum::serve` takes the listener
//! through axum's `Listener` trait, with the `axum` feature).
//!
//! One driver task per session sleeps on the session's wait fd through tokio's reactor; when
//! the server rings, it drains the events into the per-socket queues and wakes exactly the
//! tasks whose sockets got something. Socket operations never block a runtime thread: they take
//! what is queued or register their waker and return `Pending`.

use crate::net::{try_read, try_write};
use crate::session::{Creates, Session, Shared, WaitKey};
use splitos_tcp_proto::{Handle, Request};
use std::future::poll_fn;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Starts the session's driver task if it is not running. Must be called inside a runtime.
fn ensure_driver(session: &Session) -> io::Result<()> {
    let mut st = session.lock()?;
    if st.driver {
        return Ok(());
    }
    let fd = session.dup_wait_fd()?;
    // SAFETY: `fd` is a fresh duplicate that the AsyncFd owns and nothing else closes or
    // replaces while it is registered.
    let fd = unsafe { AsyncFd::register(fd) }?;
    st.driver = true;
    tokio::spawn(drive(session.weak(), fd));
    Ok(())
}

async fn drive(session: Weak<Shared>, fd: AsyncFd<rustix::fd::OwnedFd>) {
    loop {
        let Some(shared) = session.upgrade() else {
            return;
        };
        let s = Session::from_shared(shared);
        let armed = {
            let Ok(mut st) = s.lock() else { return };
            let pumped = st.pump();
            st.notify_touched();
            if let Err(e) = pumped {
                tracing::warn!("Split-OS session ended: {e}");
                st.wake_all_tasks();
                st.driver = false;
                return;
            }
            match st.chan.prepare_wait() {
                Ok(a) => a,
                Err(e) => {
                    let _ = st.fail(e);
                    st.wake_all_tasks();
                    st.driver = false;
                    return;
                }
            }
        };
        drop(s); // do not keep the session alive while asleep
        if !armed {
            tokio::task::yield_now().await;
            continue;
        }
        match fd.readable().await {
            Ok(mut guard) => guard.clear_ready(),
            Err(e) => {
                tracing::warn!("Split-OS driver cannot wait: {e}");
                return;
            }
        }
        if let Some(shared) = session.upgrade() {
            if let Ok(mut st) = Session::from_shared(shared).lock() {
                st.chan.finish_wait();
            }
        }
    }
}

/// Polls `f` on the pumped state; registers the waker under `key` when it yields nothing.
fn poll_state<T>(
    session: &Session,
    key: WaitKey,
    cx: &mut Context<'_>,
    f: impl FnOnce(&mut crate::session::State) -> io::Result<Option<T>>,
) -> Poll<io::Result<T>> {
    if let Err(e) = ensure_driver(session) {
        return Poll::Ready(Err(e));
    }
    let mut st = match session.lock() {
        Ok(st) => st,
        Err(e) => return Poll::Ready(Err(e)),
    };
    if let Err(e) = st.pump() {
        return Poll::Ready(Err(e));
    }
    st.notify_touched();
    match f(&mut st) {
        Ok(Some(v)) => Poll::Ready(Ok(v)),
        Ok(None) => {
            st.register_waker(key, cx.waker());
            Poll::Pending
        }
        Err(e) => Poll::Ready(Err(e)),
    }
}

async fn call(
    session: &Session,
    creates: Creates,
    make: impl FnOnce(u32) -> Request<'static>,
) -> io::Result<(Handle, SocketAddr, SocketAddr)> {
    let req = session.start_call(creates, make)?;
    poll_fn(|cx| {
        poll_state(session, WaitKey::Reply(req), cx, |st| {
            st.take_reply(req).transpose()
        })
    })
    .await
}

pub struct TcpListener {
    inner: crate::net::TcpListener,
}

impl TcpListener {
    /// Binds on the process's default session (see [`crate::default_session`]).
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<TcpListener> {
        Self::bind_with(&crate::default_session()?, addr, Default::default()).await
    }

    pub async fn bind_with(
        session: &Session,
        addr: impl ToSocketAddrs,
        opts: crate::net::ListenOptions,
    ) -> io::Result<TcpListener> {
        let flags = opts.flags();
        let mut last = None;
        for a in addr.to_socket_addrs()? {
            let r = call(session, Creates::Listener, |req| Request::Listen {
                req,
                addr: a,
                backlog: opts.backlog,
                flags,
            })
            .await;
            match r {
                Ok((handle, local, _)) => {
                    return Ok(TcpListener {
                        inner: crate::net::TcpListener {
                            session: session.clone(),
                            handle,
                            local,
                        },
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address")))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.inner.local)
    }

    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let h = self.inner.handle;
        let session = &self.inner.session;
        let (conn, local, peer) = poll_fn(|cx| {
            poll_state(session, WaitKey::Socket(h), cx, |st| {
                Ok(st.listeners.entry(h).or_default().queue.pop_front())
            })
        })
        .await?;
        let s = crate::net::TcpStream::new(session.clone(), conn, local, peer);
        Ok((TcpStream { inner: s }, peer))
    }
}

/// A connection owned by the Split-OS TCP server, for tokio.
pub struct TcpStream {
    inner: crate::net::TcpStream,
}

impl TcpStream {
    pub async fn connect(addr: impl ToSocketAddrs) -> io::Result<TcpStream> {
        Self::connect_with(&crate::default_session()?, addr).await
    }

    pub async fn connect_with(
        session: &Session,
        addr: impl ToSocketAddrs,
    ) -> io::Result<TcpStream> {
        let mut last = None;
        for a in addr.to_socket_addrs()? {
            match call(session, Creates::Connection, |req| Request::Connect {
                req,
                addr: a,
            })
            .await
            {
                Ok((h, local, peer)) => {
                    return Ok(TcpStream {
                        inner: crate::net::TcpStream::new(session.clone(), h, local, peer),
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address")))
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.peer_addr()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn parts(&self) -> (&Session, Handle) {
        (&self.inner.inner.session, self.inner.inner.handle)
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (session, h) = self.parts();
        let dst = buf.initialize_unfilled();
        match poll_state(session, WaitKey::Socket(h), cx, |st| try_read(st, h, dst)) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let (session, h) = self.parts();
        poll_state(session, WaitKey::Socket(h), cx, |st| try_write(st, h, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.inner.shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(feature = "axum")]
impl axum::serve::Listener for TcpListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match TcpListener::accept(self).await {
                Ok(c) => return c,
                Err(e) => {
                    // As axum does for its own listener: report, back off, go on.
                    tracing::error!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }
}

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send + Sync>() {}
    is_send::<TcpStream>();
    is_send::<Arc<Shared>>();
}
