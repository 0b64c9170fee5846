//! tokio integration: await a channel through tokio's reactor instead of blocking a thread.
//!
//! The channel's wait fd (an epoll set of its doorbell and its setup socket) is registered with
//! tokio; the arm → re-check → await sequence is the same handshake the blocking path uses, so
//! a wake-up is never lost and a dead peer wakes the task too.

use crate::{Channel, Error, Message};
use rustix::fd::OwnedFd;
use tokio::io::unix::AsyncFd;

pub struct AsyncChannel {
    chan: Channel,
    fd: AsyncFd<OwnedFd>,
}

impl AsyncChannel {
    /// Wraps a channel. Must be called inside a tokio runtime with IO enabled.
    pub fn new(chan: Channel) -> Result<AsyncChannel, Error> {
        let fd = chan
            .wait_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicating the channel's wait fd", e))?;
        // SAFETY: `fd` is an OwnedFd that the AsyncFd owns from here on; nothing else closes or
        // replaces it while it is registered.
        let fd =
            unsafe { AsyncFd::register(fd) }.map_err(|e| Error::io("registering with tokio", e))?;
        Ok(AsyncChannel { chan, fd })
    }

    /// The channel, for the non-blocking calls (`try_recv`, `try_send`, batches, buffers).
    pub fn get_mut(&mut self) -> &mut Channel {
        &mut self.chan
    }

    pub fn into_inner(self) -> Channel {
        self.chan
    }

    async fn wait(&mut self, writable: Option<usize>) -> Result<(), Error> {
        loop {
            let armed = match writable {
                None => self.chan.prepare_wait()?,
                Some(len) => self.chan.prepare_wait_writable(len)?,
            };
            if !armed {
                return Ok(());
            }
            let mut guard = self
                .fd
                .readable()
                .await
                .map_err(|e| Error::io("waiting for the peer", e))?;
            guard.clear_ready();
            self.chan.finish_wait();
        }
    }

    /// Resolves when a message is waiting (or fails when the peer is gone).
    pub async fn readable(&mut self) -> Result<(), Error> {
        self.wait(None).await
    }

    /// Resolves when a message of `len` bytes fits.
    pub async fn writable(&mut self, len: usize) -> Result<(), Error> {
        self.wait(Some(len)).await
    }

    pub async fn send(&mut self, msg: &[u8]) -> Result<(), Error> {
        while !self.chan.try_send(msg)? {
            self.writable(msg.len()).await?;
        }
        Ok(())
    }

    /// Waits for the next message and hands it to `f`.
    pub async fn recv_with<R>(&mut self, f: impl FnOnce(Message<'_>) -> R) -> Result<R, Error> {
        loop {
            if let Some(m) = self.chan.try_recv()? {
                return Ok(f(m));
            }
            self.readable().await?;
        }
    }
}
