//! A channel end: a duplex pair of rings, two buffer pools, a doorbell each way, and the setup
//! socket kept open as the peer-death signal.
//!
//! Fast paths (`try_send`, `try_recv`, batches) touch only shared memory. The kernel is entered
//! only to ring a doorbell for a peer that said it is going to sleep, to sleep ourselves, or —
//! at most every 10 ms — to peek at the setup socket, whose EOF is how a `kill -9`ed peer is
//! noticed (the kernel closes its fds; nothing the dead process could have done is needed).

use crate::layout::fd_message::{self, FdMessage};
use crate::layout::{descriptor, header, record, Params};
use crate::pool::{RxBuffer, RxPool, TxBuffer, TxPool};
use crate::region::Region;
use crate::ring::{Consumer, Producer, RingError};
use crate::shm_ring::ShmRing;
use crate::sys::{self, SocketState};
use crate::wait::Phase;
use crate::{Error, WaitPolicy};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Descriptors one message may carry (the format is [`fd_message`]).
pub const MAX_FDS_PER_MESSAGE: usize = fd_message::MAX_FDS;
/// Descriptor messages a channel end holds for its user before the peer counts as flooding it.
const MAX_FD_INBOX: usize = 256;

/// How often, at most, a busy channel asks the kernel whether the peer is still there.
const LIVENESS_INTERVAL_MS: u64 = 10;

/// Spins of the bare readiness check before a wait starts its bookkeeping (~1-2 µs).
const FAST_SPINS: u32 = 256;

/// Parameters a side asks for when it connects. The accepting side may clamp them to its limits.
#[derive(Clone, Copy, Debug)]
pub struct ChannelConfig {
    /// Bytes in each message ring (power of two). The largest inline message is a quarter.
    pub ring_bytes: usize,
    /// Bytes per pool buffer (power of two).
    pub buf_size: usize,
    /// Buffers in each direction's pool.
    pub buf_count: usize,
    /// How blocking operations wait.
    pub wait: WaitPolicy,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            ring_bytes: 256 << 10,
            buf_size: 64 << 10,
            buf_count: 64,
            wait: WaitPolicy::default(),
        }
    }
}

impl ChannelConfig {
    pub(crate) fn params(&self) -> Params {
        Params {
            ring_bytes: self.ring_bytes as u64,
            buf_size: self.buf_size as u64,
            buf_count: self.buf_count as u64,
        }
    }
}

/// A received message: bytes copied out of the ring, or a buffer read in place.
#[derive(Debug)]
pub enum Message<'a> {
    Inline(&'a [u8]),
    Buffer(RxBuffer),
}

#[derive(Clone, Copy, Debug)]
enum Failure {
    PeerGone,
    Corrupt(&'static str),
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        match f {
            Failure::PeerGone => Error::PeerGone,
            Failure::Corrupt(what) => Error::Corrupt(what),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WaitFor {
    Message,
    Room(usize),
    FreeBuffer,
}

/// One end of a duplex memory-to-memory channel. `Send`, not `Sync`: one thread drives it.
pub struct Channel {
    region: Arc<Region>,
    side: usize,
    tx: Producer<ShmRing>,
    rx: Consumer<ShmRing>,
    tx_pool: TxPool,
    rx_pool: RxPool,
    doorbell: OwnedFd,
    peer_doorbell: Arc<OwnedFd>,
    wait_set: OwnedFd,
    socket: OwnedFd,
    policy: WaitPolicy,
    scratch: Vec<u8>,
    failed: Option<Failure>,
    next_liveness_check: u64,
    /// Descriptor messages received on the setup socket and not yet taken.
    fd_inbox: VecDeque<(u64, Vec<OwnedFd>)>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("side", &self.side)
            .field("params", &self.region.layout().params)
            .field("policy", &self.policy)
            .field("failed", &self.failed)
            .finish()
    }
}

impl Channel {
    /// Both ends of a channel in this process (tests, embedded servers). Same code paths as a
    /// cross-process channel.
    pub fn pair(config: ChannelConfig) -> Result<(Channel, Channel), Error> {
        let (region, _fd) = Region::create(config.params())?;
        let region = Arc::new(region);
        let (a, b) = UnixStream::pair().map_err(|e| Error::io("creating a socket pair", e))?;
        let bell_a = sys::new_eventfd().map_err(|e| Error::io("creating a doorbell", e))?;
        let bell_b = sys::new_eventfd().map_err(|e| Error::io("creating a doorbell", e))?;
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| Error::io("duplicating a doorbell", e))
        };
        let end_a = Channel::assemble(
            region.clone(),
            0,
            dup(&bell_a)?,
            dup(&bell_b)?,
            a.into(),
            config.wait,
        )?;
        let end_b = Channel::assemble(region, 1, bell_b, bell_a, b.into(), config.wait)?;
        Ok((end_a, end_b))
    }

    pub(crate) fn assemble(
        region: Arc<Region>,
        side: usize,
        doorbell: OwnedFd,
        peer_doorbell: OwnedFd,
        socket: OwnedFd,
        policy: WaitPolicy,
    ) -> Result<Channel, Error> {
        let l = *region.layout();
        let (mine, theirs) = (l.dirs[side], l.dirs[1 - side]);
        let ring = |d: crate::layout::DirectionLayout| {
            ShmRing::new(region.clone(), d.ring_ctl, d.ring_data, l.params.ring_bytes)
        };
        let tx = Producer::new(ring(mine), l.max_message);
        let rx = Consumer::new(ring(theirs), l.max_message);
        let peer_doorbell = Arc::new(peer_doorbell);
        let wait_set = sys::new_wait_set(doorbell.as_fd(), socket.as_fd())
            .map_err(|e| Error::io("creating the channel's wait set", e))?;
        Ok(Channel {
            tx_pool: TxPool::new(region.clone(), mine),
            rx_pool: RxPool::new(region.clone(), theirs, peer_doorbell.clone()),
            region,
            side,
            tx,
            rx,
            doorbell,
            peer_doorbell,
            wait_set,
            socket,
            policy,
            scratch: vec![0; l.max_message as usize],
            failed: None,
            next_liveness_check: 0,
            fd_inbox: VecDeque::new(),
        })
    }

    pub fn set_wait_policy(&mut self, policy: WaitPolicy) {
        self.policy = policy;
    }

    pub fn wait_policy(&self) -> WaitPolicy {
        self.policy
    }

    /// Largest message `send`/`try_send` accept; larger payloads go in buffers.
    pub fn max_message_len(&self) -> usize {
        self.tx.max_message() as usize
    }

    /// Capacity of each pool buffer.
    pub fn buffer_size(&self) -> usize {
        self.region.layout().params.buf_size as usize
    }

    /// Who is at the other end, from the kernel (SO_PEERCRED of the setup socket): the
    /// credentials the peer had when the channel was set up, which it cannot forge.
    pub fn peer_credentials(&self) -> std::io::Result<sys::PeerCredentials> {
        sys::peer_credentials(&self.socket)
    }

    /// A file descriptor that becomes readable when the peer rings this end's doorbell or goes
    /// away. For event loops: call [`Channel::prepare_wait`] first, then wait for readability,
    /// then retry the operation. Blocking methods use the same fd.
    pub fn wait_fd(&self) -> BorrowedFd<'_> {
        self.wait_set.as_fd()
    }

    /// True if the peer has gone or broke the protocol (the channel is then permanently failed).
    pub fn is_closed(&self) -> bool {
        self.failed.is_some()
    }

    /// Whether the peer is still there, without sending or receiving: `Err(PeerGone)` once it
    /// has gone (also by `kill -9`; noticed within ~10 ms, as on every other call). Cheap
    /// enough for every lookup of a reader that otherwise touches only shared memory.
    pub fn check_alive(&mut self) -> Result<(), Error> {
        self.check_peer()
    }

    fn fail(&mut self, f: Failure) -> Error {
        if self.failed.is_none() {
            self.failed = Some(f);
            if let Failure::Corrupt(what) = f {
                tracing::warn!(what, "m2m peer broke the protocol; closing the channel");
                self.leave();
            }
        }
        f.into()
    }

    fn ring_err(&mut self, e: RingError) -> Error {
        let RingError::Corrupt(what) = e;
        self.fail(Failure::Corrupt(what))
    }

    /// Tells the peer we are gone: flag in shared memory, a doorbell ring, and a socket
    /// shutdown (the flag is for a peer that polls, the others for one that sleeps).
    fn leave(&self) {
        self.region.store_u64(
            header::side_state(self.side) + header::CLOSED,
            1,
            Ordering::Release,
        );
        sys::ring_eventfd(self.peer_doorbell.as_fd());
        sys::shutdown(self.socket.as_fd());
    }

    /// Fails the channel if the peer is known to be gone. Cheap: one shared load, and a coarse
    /// clock read that gates the socket peek.
    fn check_peer(&mut self) -> Result<(), Error> {
        if let Some(f) = self.failed {
            return Err(f.into());
        }
        let peer_state = header::side_state(1 - self.side) + header::CLOSED;
        if self.region.load_u64(peer_state, Ordering::Acquire) != 0 {
            return Err(self.fail(Failure::PeerGone));
        }
        let now = sys::coarse_millis();
        if now >= self.next_liveness_check {
            self.next_liveness_check = now + LIVENESS_INTERVAL_MS;
            match sys::socket_state(self.socket.as_fd()) {
                SocketState::Open => {}
                SocketState::Closed => return Err(self.fail(Failure::PeerGone)),
                SocketState::Data => self.pull_fd_messages()?,
            }
        }
        Ok(())
    }

    fn wake_peer_if_sleeping(&self) {
        if self.tx.consumer_needs_wake() {
            sys::ring_eventfd(self.peer_doorbell.as_fd());
        }
    }

    fn publish_rx_head(&mut self) {
        if self.rx.publish() {
            sys::ring_eventfd(self.peer_doorbell.as_fd());
        }
    }

    fn check_len(&self, len: usize) -> Result<(), Error> {
        let max = self.max_message_len();
        if len > max {
            return Err(Error::MessageTooLarge { len, max });
        }
        Ok(())
    }

    // ---- file descriptors ----

    /// Sends file descriptors to the peer with a caller-chosen tag (e.g. which file they are).
    /// They travel over the setup socket, not the rings: this is a system call, meant for
    /// setting things up (sharing a memfd once), not for every message.
    pub fn send_fds(&mut self, tag: u64, fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        if fds.is_empty() || fds.len() > MAX_FDS_PER_MESSAGE {
            return Err(Error::Config(format!(
                "a descriptor message carries 1 to {MAX_FDS_PER_MESSAGE} descriptors, not {}",
                fds.len()
            )));
        }
        self.check_peer()?;
        let m = FdMessage {
            count: fds.len() as u32,
            tag,
        }
        .encode();
        sys::send_with_fds(self.socket.as_fd(), &m, fds).map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                self.fail(Failure::PeerGone)
            }
            _ => Error::io("sending descriptors", e),
        })
    }

    /// Takes the next descriptor message the peer sent, if one has arrived. Never blocks.
    pub fn try_recv_fds(&mut self) -> Result<Option<(u64, Vec<OwnedFd>)>, Error> {
        if let Some(m) = self.fd_inbox.pop_front() {
            return Ok(Some(m));
        }
        if let Some(f) = self.failed {
            return Err(f.into());
        }
        match sys::socket_state(self.socket.as_fd()) {
            SocketState::Data => self.pull_fd_messages()?,
            SocketState::Closed => return Err(self.fail(Failure::PeerGone)),
            SocketState::Open => {}
        }
        Ok(self.fd_inbox.pop_front())
    }

    /// Reads every waiting descriptor message into the inbox, validating each. Keeping the
    /// socket drained is also what stops it from waking sleepers over and over.
    fn pull_fd_messages(&mut self) -> Result<(), Error> {
        loop {
            let mut m = [0u8; fd_message::BYTES];
            let fds = match sys::recv_with_fds_flags(
                self.socket.as_fd(),
                &mut m,
                rustix::net::RecvFlags::DONTWAIT,
            ) {
                Ok(fds) => fds,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(self.fail(Failure::PeerGone))
                }
                Err(_) => {
                    return Err(self.fail(Failure::Corrupt("malformed message on the setup socket")))
                }
            };
            let Ok(msg) = FdMessage::decode(&m, fds.len()) else {
                return Err(self.fail(Failure::Corrupt("malformed descriptor message")));
            };
            if self.fd_inbox.len() >= MAX_FD_INBOX {
                return Err(self.fail(Failure::Corrupt("too many unclaimed descriptor messages")));
            }
            self.fd_inbox.push_back((msg.tag, fds));
        }
    }

    // ---- sending ----

    /// Sends one message if the ring has room; `Ok(false)` if it is full. Never blocks.
    pub fn try_send(&mut self, msg: &[u8]) -> Result<bool, Error> {
        self.check_len(msg.len())?;
        self.check_peer()?;
        match self.tx.try_push(record::KIND_INLINE, &[msg]) {
            Ok(true) => {
                self.wake_peer_if_sleeping();
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => Err(self.ring_err(e)),
        }
    }

    /// Sends one message, waiting for room according to the wait policy.
    pub fn send(&mut self, msg: &[u8]) -> Result<(), Error> {
        while !self.try_send(msg)? {
            self.wait(WaitFor::Room(msg.len()), None)?;
        }
        Ok(())
    }

    /// Starts a batch: many messages, one wake-up check for the peer at the end.
    pub fn send_batch(&mut self) -> SendBatch<'_> {
        SendBatch {
            chan: self,
            pushed: 0,
        }
    }

    /// Takes a free buffer from this side's pool, or `None` if all are in flight.
    pub fn alloc_buffer(&mut self) -> Result<Option<TxBuffer>, Error> {
        self.check_peer()?;
        self.tx_pool.alloc().map_err(|e| self.ring_err(e))
    }

    /// Like [`Channel::alloc_buffer`], waiting up to `timeout` (forever if `None`) for the peer
    /// to return one. `Ok(None)` means the timeout passed.
    pub fn alloc_buffer_wait(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<TxBuffer>, Error> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(b) = self.alloc_buffer()? {
                return Ok(Some(b));
            }
            if !self.wait(WaitFor::FreeBuffer, deadline)? {
                return Ok(None);
            }
        }
    }

    /// Sends the first `len` bytes of `buf` to the peer without copying them, waiting for ring
    /// room according to the wait policy.
    pub fn send_buffer(&mut self, buf: TxBuffer, len: usize) -> Result<(), Error> {
        self.send_buffer_with(buf, len, &[])
    }

    /// Like [`Channel::send_buffer`], with up to 48 bytes of metadata that travel in the same
    /// record (the receiver reads them with [`RxBuffer::meta`]).
    pub fn send_buffer_with(
        &mut self,
        buf: TxBuffer,
        len: usize,
        meta: &[u8],
    ) -> Result<(), Error> {
        let mut buf = buf;
        loop {
            match self.try_send_buffer_with(buf, len, meta)? {
                None => return Ok(()),
                Some(back) => {
                    buf = back;
                    self.wait(WaitFor::Room(descriptor::BYTES + meta.len()), None)?;
                }
            }
        }
    }

    /// Non-blocking [`Channel::send_buffer_with`]: hands the buffer back (`Ok(Some(buf))`) if
    /// the ring is full, so an event loop can queue it.
    pub fn try_send_buffer_with(
        &mut self,
        buf: TxBuffer,
        len: usize,
        meta: &[u8],
    ) -> Result<Option<TxBuffer>, Error> {
        if meta.len() > descriptor::MAX_META {
            return Err(Error::MessageTooLarge {
                len: meta.len(),
                max: descriptor::MAX_META,
            });
        }
        if len > buf.capacity() {
            return Err(Error::BufferOverflow {
                offset: 0,
                len,
                capacity: buf.capacity(),
            });
        }
        self.check_peer()?;
        match self.tx.has_room(descriptor::BYTES + meta.len()) {
            Ok(true) => {}
            Ok(false) => return Ok(Some(buf)),
            Err(e) => return Err(self.ring_err(e)),
        }
        let d = self.tx_pool.commit(buf, len);
        match self.tx.try_push(record::KIND_BUFFER, &[&d, meta]) {
            Ok(true) => {
                self.wake_peer_if_sleeping();
                Ok(None)
            }
            // has_room said yes and only we produce: unreachable unless the head went
            // backwards, which refresh_head reports as corruption.
            Ok(false) => Err(self.fail(Failure::Corrupt("ring space vanished"))),
            Err(e) => Err(self.ring_err(e)),
        }
    }

    /// Bytes this end has sent that the peer has not yet consumed, as of the peer's last
    /// published head (for statistics).
    pub fn tx_backlog(&self) -> u64 {
        self.tx.backlog()
    }

    /// Size of each message ring in bytes.
    pub fn ring_bytes(&self) -> u64 {
        self.region.layout().params.ring_bytes
    }

    // ---- receiving ----

    /// Whether a message is waiting. Never blocks.
    fn has_message(&mut self) -> Result<bool, Error> {
        match self.rx.peek() {
            Ok(p) => Ok(p.is_some()),
            Err(e) => Err(self.ring_err(e)),
        }
    }

    /// Whether receiving must stop before looking at the ring. A peer that has *gone* may
    /// still have left messages, and its last words count: an application that queues a send
    /// and a close and then exits expects both to happen, even if we noticed the exit first
    /// (while sending to it). A corrupt channel stops at once.
    fn stops_receiving(&self) -> Result<(), Error> {
        match self.failed {
            Some(f @ Failure::Corrupt(_)) => Err(f.into()),
            Some(Failure::PeerGone) | None => Ok(()),
        }
    }

    /// Receives one message if there is one. Never blocks. Messages a departed peer left are
    /// delivered before `PeerGone`.
    pub fn try_recv(&mut self) -> Result<Option<Message<'_>>, Error> {
        self.stops_receiving()?;
        let peeked = match self.rx.peek() {
            Ok(Some(p)) => p,
            Ok(None) => {
                // Idle: the moment to give back space and look at the peer.
                self.publish_rx_head();
                self.check_peer()?;
                return Ok(None);
            }
            Err(e) => return Err(self.ring_err(e)),
        };
        if peeked.kind == record::KIND_BUFFER {
            let buf = self.take_buffer(peeked.len)?;
            return Ok(Some(Message::Buffer(buf)));
        }
        self.rx.consume(&mut self.scratch[..peeked.len]);
        if self.rx.unpublished() >= self.rx.capacity() / 4 {
            self.publish_rx_head();
        }
        Ok(Some(Message::Inline(&self.scratch[..peeked.len])))
    }

    fn take_buffer(&mut self, len: usize) -> Result<RxBuffer, Error> {
        if !(descriptor::BYTES..=descriptor::BYTES + descriptor::MAX_META).contains(&len) {
            return Err(self.fail(Failure::Corrupt("buffer record of the wrong size")));
        }
        let mut d = [0u8; descriptor::BYTES + descriptor::MAX_META];
        self.rx.consume(&mut d[..len]);
        self.rx_pool.accept(&d[..len]).map_err(|e| self.ring_err(e))
    }

    /// Receives one message, waiting according to the wait policy.
    pub fn recv(&mut self) -> Result<Message<'_>, Error> {
        // Without a deadline, `wait` returns only once a message is there.
        if !self.has_message()? {
            self.wait(WaitFor::Message, None)?;
        }
        self.try_recv()?
            .ok_or(Error::Corrupt("a published record disappeared"))
    }

    /// Receives one message, waiting at most `timeout`; `Ok(None)` if none came.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Message<'_>>, Error> {
        if !self.wait_readable(Some(timeout))? {
            return Ok(None);
        }
        self.try_recv()
    }

    /// Hands up to `max` waiting messages to `f`, then gives the space back to the producer in
    /// one index update. Never blocks; returns how many messages were handled.
    pub fn recv_batch(
        &mut self,
        max: usize,
        mut f: impl FnMut(Message<'_>),
    ) -> Result<usize, Error> {
        self.stops_receiving()?;
        let mut n = 0;
        while n < max {
            let p = match self.rx.peek() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => return Err(self.ring_err(e)),
            };
            if p.kind == record::KIND_BUFFER {
                let b = self.take_buffer(p.len)?;
                f(Message::Buffer(b));
            } else {
                self.rx.consume(&mut self.scratch[..p.len]);
                f(Message::Inline(&self.scratch[..p.len]));
            }
            n += 1;
        }
        self.publish_rx_head();
        if n == 0 {
            self.check_peer()?;
        }
        Ok(n)
    }

    /// Waits until a message is available. `Ok(false)` if `timeout` passed first.
    pub fn wait_readable(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
        let deadline = timeout.map(|t| Instant::now() + t);
        self.wait(WaitFor::Message, deadline)
    }

    /// Waits until a message of `len` bytes fits. `Ok(false)` if `timeout` passed first.
    pub fn wait_writable(&mut self, len: usize, timeout: Option<Duration>) -> Result<bool, Error> {
        self.check_len(len)?;
        let deadline = timeout.map(|t| Instant::now() + t);
        self.wait(WaitFor::Room(len), deadline)
    }

    // ---- waiting ----

    fn ready(&mut self, what: WaitFor) -> Result<bool, Error> {
        let r = match what {
            WaitFor::Message => return self.has_message(),
            WaitFor::Room(len) => self.tx.has_room(len),
            WaitFor::FreeBuffer => self.tx_pool.reclaim(),
        };
        r.map_err(|e| self.ring_err(e))
    }

    /// The wait loop shared by every blocking operation. Returns false on timeout.
    fn wait(&mut self, what: WaitFor, deadline: Option<Instant>) -> Result<bool, Error> {
        // A peer that answers at once does so within a few hundred nanoseconds: look for that
        // before paying for clocks, liveness checks or index publication.
        if self.policy != WaitPolicy::Block {
            for _ in 0..FAST_SPINS {
                if self.ready(what)? {
                    return Ok(true);
                }
                std::hint::spin_loop();
            }
        }
        // Give back consumed space first: the peer may be blocked on it while we block on it.
        self.publish_rx_head();
        let start = Instant::now();
        let mut round = 0u32;
        loop {
            if self.ready(what)? {
                return Ok(true);
            }
            self.check_peer()?;
            round = round.wrapping_add(1);
            if let Some(d) = deadline {
                if round % 32 == 0 && Instant::now() >= d {
                    return Ok(false);
                }
            }
            match self.policy.phase(start.elapsed()) {
                Phase::Spin => std::hint::spin_loop(),
                Phase::Yield => std::thread::yield_now(),
                Phase::Sleep => self.sleep(what, deadline)?,
            }
        }
    }

    /// One sleep on the wait set, after announcing it in shared memory and re-checking.
    fn sleep(&mut self, what: WaitFor, deadline: Option<Instant>) -> Result<(), Error> {
        if !self.prepare(what)? {
            return Ok(());
        }
        let mut timeout = crate::wait::MAX_SLEEP;
        if let Some(d) = deadline {
            timeout = timeout.min(d.saturating_duration_since(Instant::now()));
        }
        let r = sys::wait_on(self.wait_set.as_fd(), timeout);
        self.disarm(what);
        self.next_liveness_check = 0;
        r.map_err(|e| Error::io("waiting for the peer", e))
    }

    /// For event loops: announces that this end is about to wait for a message, so the peer
    /// will ring. Returns false if a message is already there (do not wait). Drains the
    /// doorbell, so call it before polling [`Channel::wait_fd`], and call it again after every
    /// wake-up: it is also where a dead peer is reported.
    pub fn prepare_wait(&mut self) -> Result<bool, Error> {
        self.prepare(WaitFor::Message)
    }

    /// Like [`Channel::prepare_wait`], for waiting until a message of `len` bytes fits.
    pub fn prepare_wait_writable(&mut self, len: usize) -> Result<bool, Error> {
        self.check_len(len)?;
        self.prepare(WaitFor::Room(len))
    }

    fn prepare(&mut self, what: WaitFor) -> Result<bool, Error> {
        // About to sleep, so a full liveness check is cheap by comparison.
        self.next_liveness_check = 0;
        self.check_peer()?;
        self.publish_rx_head();
        sys::drain_eventfd(self.doorbell.as_fd());
        let armed = match what {
            WaitFor::Message => self.rx.arm(),
            WaitFor::Room(len) => self.tx.arm(len),
            WaitFor::FreeBuffer => self.tx_pool.returns.arm(),
        };
        armed.map_err(|e| self.ring_err(e))
    }

    fn disarm(&mut self, what: WaitFor) {
        match what {
            WaitFor::Message => self.rx.disarm(),
            WaitFor::Room(_) => self.tx.disarm(),
            WaitFor::FreeBuffer => self.tx_pool.returns.disarm(),
        }
    }

    /// Withdraws a [`Channel::prepare_wait`] announcement after waking.
    pub fn finish_wait(&mut self) {
        self.disarm(WaitFor::Message);
        self.tx.disarm();
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        if self.failed.is_none() {
            self.leave();
        }
    }
}

/// Messages pushed under one wake-up check; see [`Channel::send_batch`].
pub struct SendBatch<'a> {
    chan: &'a mut Channel,
    pushed: usize,
}

impl SendBatch<'_> {
    /// Appends a message if it fits; `Ok(false)` when the ring is full.
    pub fn try_push(&mut self, msg: &[u8]) -> Result<bool, Error> {
        self.chan.check_len(msg.len())?;
        if self.pushed == 0 {
            self.chan.check_peer()?;
        }
        match self.chan.tx.try_push(record::KIND_INLINE, &[msg]) {
            Ok(true) => {
                self.pushed += 1;
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => Err(self.chan.ring_err(e)),
        }
    }

    /// Messages pushed so far.
    pub fn len(&self) -> usize {
        self.pushed
    }

    pub fn is_empty(&self) -> bool {
        self.pushed == 0
    }

    /// Ends the batch (dropping it does the same).
    pub fn publish(self) {}
}

impl Drop for SendBatch<'_> {
    fn drop(&mut self) {
        if self.pushed > 0 {
            self.chan.wake_peer_if_sleeping();
        }
    }
}
