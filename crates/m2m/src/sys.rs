//! The platform seam: every system call the crate makes goes through here (via rustix), except
//! `mmap`, which memmap2 makes for `region.rs`, `seqlock.rs` and `segment.rs`.
//!
//! Keeping them in one file means the rest of the crate reads as protocol logic, and a port (or
//! a seccomp policy) has one list to look at.

use rustix::event::{epoll, eventfd, EventfdFlags};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{
    fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create, MemfdFlags, SealFlags, Stat,
};
use rustix::io::{read, write, Errno};
use rustix::net::{
    recv, recvmsg, sendmsg, sockopt, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::time::Duration;

/// Seals that make a region's size immutable; without them a peer could shrink the file and
/// turn our next access into SIGBUS.
const SIZE_SEALS: SealFlags = SealFlags::SHRINK.union(SealFlags::GROW);

pub fn create_sealed_memfd(name: &str, size: u64) -> io::Result<OwnedFd> {
    let fd = memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    ftruncate(&fd, size)?;
    fcntl_add_seals(&fd, SIZE_SEALS | SealFlags::SEAL)?;
    Ok(fd)
}

/// Returns the size of a memfd received from a peer after checking that its size is sealed.
pub fn sealed_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let seals = fcntl_get_seals(fd)?;
    if !seals.contains(SIZE_SEALS) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "shared memory received from the peer is not size-sealed",
        ));
    }
    Ok(fstat(fd)?.st_size as u64)
}

/// Seals that make a segment's contents immutable (and its size, which the contents imply).
const CONTENT_SEALS: SealFlags = SIZE_SEALS.union(SealFlags::WRITE);

/// A memfd of `size` bytes that can still be written, to be sealed with [`seal_contents`].
pub fn create_sealable_memfd(name: &str, size: u64) -> io::Result<OwnedFd> {
    let fd = memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    ftruncate(&fd, size)?;
    Ok(fd)
}

/// Seals a memfd against every change: writes, size changes and further seal changes.
pub fn seal_contents(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(fcntl_add_seals(fd, CONTENT_SEALS | SealFlags::SEAL)?)
}

/// Whether a memfd received from a peer can no longer change (its contents and size sealed).
pub fn contents_sealed(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(fcntl_get_seals(fd)?.contains(CONTENT_SEALS))
}

pub fn stat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    Ok(fstat(fd)?)
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    Ok(rustix::io::pread(fd, buf, offset)?)
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    Ok(rustix::io::pwrite(fd, buf, offset)?)
}

pub fn new_eventfd() -> io::Result<OwnedFd> {
    Ok(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?)
}

pub fn ring_eventfd(fd: BorrowedFd<'_>) {
    // EAGAIN means the counter is saturated: the sleeper will wake anyway.
    let _ = write(fd, &1u64.to_ne_bytes());
}

pub fn drain_eventfd(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 8];
    let _ = read(fd, &mut buf);
}

/// One epoll set per channel end, holding its doorbell and its socket: a single fd that becomes
/// readable when the peer rings or the peer goes away, for blocking waits and event loops alike.
pub fn new_wait_set(doorbell: BorrowedFd<'_>, socket: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    epoll::add(
        &ep,
        doorbell,
        epoll::EventData::new_u64(0),
        epoll::EventFlags::IN,
    )?;
    epoll::add(
        &ep,
        socket,
        epoll::EventData::new_u64(1),
        epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
    )?;
    Ok(ep)
}

/// Sleeps on a wait set until it is readable or `timeout` passes.
pub fn wait_on(set: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let mut events = [MaybeUninit::<epoll::Event>::uninit(); 2];
    let ts = rustix::time::Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    match epoll::wait(set, &mut events[..], Some(&ts)) {
        Ok(_) | Err(Errno::INTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What the setup socket says about the peer, without blocking.
#[derive(Debug, PartialEq, Eq)]
pub enum SocketState {
    Open,
    Closed,
    /// The peer wrote bytes (after the handshake: descriptor messages) waiting to be read.
    Data,
}

pub fn socket_state(sock: BorrowedFd<'_>) -> SocketState {
    let mut b = [MaybeUninit::<u8>::uninit(); 1];
    match recv(sock, &mut b[..], RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((_, 0)) => SocketState::Closed,
        Ok(_) => SocketState::Data,
        Err(Errno::AGAIN) | Err(Errno::INTR) => SocketState::Open,
        Err(_) => SocketState::Closed,
    }
}

/// Shuts both directions of a socket down, so a peer asleep on it wakes with EOF. Errors (the
/// peer already gone) change nothing for the caller, who is leaving anyway.
pub fn shutdown(sock: BorrowedFd<'_>) {
    let _ = rustix::net::shutdown(sock, rustix::net::Shutdown::Both);
}

/// Sends `bytes` with `fds` attached (SCM_RIGHTS), in one message.
pub fn send_with_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !anc.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    let n = sendmsg(sock, &[IoSlice::new(bytes)], &mut anc, SendFlags::NOSIGNAL)?;
    if n != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short send on setup socket",
        ));
    }
    Ok(())
}

/// Receives one message of exactly `buf.len()` bytes and up to 4 fds. Fewer bytes is an error.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Vec<OwnedFd>> {
    recv_with_fds_flags(sock, buf, RecvFlags::empty())
}

/// [`recv_with_fds`] with extra flags (e.g. `DONTWAIT`: `WouldBlock` when nothing is there).
pub fn recv_with_fds_flags(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: RecvFlags,
) -> io::Result<Vec<OwnedFd>> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let want = buf.len();
    let msg = loop {
        match recvmsg(
            sock,
            &mut [IoSliceMut::new(buf)],
            &mut anc,
            RecvFlags::CMSG_CLOEXEC | flags,
        ) {
            Err(Errno::INTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many descriptors received",
        ));
    }
    if msg.bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed during setup",
        ));
    }
    if msg.bytes != want {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("setup message of {} bytes, expected {want}", msg.bytes),
        ));
    }
    Ok(fds)
}

/// Identity of the process at the other end of a Unix socket, from the kernel (SO_PEERCRED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCredentials {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

pub fn peer_credentials(sock: impl AsFd) -> io::Result<PeerCredentials> {
    let c = sockopt::socket_peercred(sock)?;
    Ok(PeerCredentials {
        pid: c.pid.as_raw_nonzero().get() as u32,
        uid: c.uid.as_raw(),
        gid: c.gid.as_raw(),
    })
}

/// A cheap monotonic clock in milliseconds (vDSO, coarse: ~4 ms resolution), for throttling
/// liveness checks on hot paths.
pub fn coarse_millis() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000
}
