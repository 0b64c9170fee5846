//! The privileged part: every system call that needs CAP_NET_ADMIN — `TCP_REPAIR` and the
//! options that only work in repair mode, and the raw socket that injects a FIN or an ACK — plus
//! the read-only queue and state queries that go with them. Nothing else in the crate touches
//! the kernel's repair interface, so a later privileged helper (the passt-repair pattern: a
//! small process that receives sockets by SCM_RIGHTS and applies these calls) wraps exactly
//! this module.
//!
//! Kernel ABI values that `libc` does not export are spelled here, with their header.

use crate::record::Window;
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `include/uapi/linux/tcp.h`: values of `TCP_REPAIR`.
const TCP_REPAIR_ON: libc::c_int = 1;
const TCP_REPAIR_OFF: libc::c_int = 0;
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;

/// `include/uapi/linux/tcp.h`: values of `TCP_REPAIR_QUEUE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum Queue {
    None = 0,
    Recv = 1,
    Send = 2,
}

/// `include/net/tcp.h`: option kinds accepted by `TCP_REPAIR_OPTIONS`.
pub(crate) const TCPOPT_MAXSEG: u32 = 2;
pub(crate) const TCPOPT_WINDOW: u32 = 3;
pub(crate) const TCPOPT_SACK_PERM: u32 = 4;
pub(crate) const TCPOPT_TIMESTAMP: u32 = 8;

/// `include/uapi/linux/sockios.h`: bytes in the send queue never sent.
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// The mark on injected packets, so that a netfilter rule that silences a flow can let them
/// through (`meta mark 0xc114 accept`); the value CRIU's libsoccr uses.
pub const REPAIR_MARK: u32 = 0xC114;

/// `struct tcp_repair_opt`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct RepairOpt {
    pub code: u32,
    pub val: u32,
}

/// `struct tcp_repair_window`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RepairWindow {
    snd_wl1: u32,
    snd_wnd: u32,
    max_window: u32,
    rcv_wnd: u32,
    rcv_wup: u32,
}

fn setsockopt<T: Copy>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    val: &T,
) -> io::Result<()> {
    setsockopt_slice(fd, level, name, core::slice::from_ref(val))
}

fn setsockopt_slice<T: Copy>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    vals: &[T],
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(core::mem::size_of_val(vals))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `vals` is a live slice of plain `#[repr(C)]`/integer values of exactly `len`
    // bytes; the kernel only reads them. `fd` is a borrowed, open descriptor.
    let r = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, vals.as_ptr().cast(), len) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads a socket option into a `T` and returns it with the length the kernel wrote.
fn getsockopt<T: Copy + Default>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<(T, usize)> {
    let mut val = T::default();
    let mut len = core::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `val` is a valid, writable `T` (plain integers or a `#[repr(C)]` struct of
    // them, for which any bytes are a valid value) and `len` is its size, so the kernel writes
    // at most `len` bytes into it. `fd` is a borrowed, open descriptor.
    let r =
        unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut val).cast(), &mut len) };
    if r == 0 {
        Ok((val, len as usize))
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt_u32(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<u32> {
    getsockopt::<u32>(fd, level, name).map(|(v, _)| v)
}

fn ioctl_int(fd: BorrowedFd<'_>, request: libc::c_ulong) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these socket ioctls (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD) write one `int` through the
    // pointer, which points at `v`. `fd` is a borrowed, open descriptor.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, &raw mut v) };
    if r == 0 {
        u32::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Switches repair mode on.
pub(crate) fn repair_on(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, &TCP_REPAIR_ON)
}

/// Switches repair mode off; with `probe`, the kernel sends a window probe, whose answer
/// resynchronises the peer.
pub(crate) fn repair_off(fd: BorrowedFd<'_>, probe: bool) -> io::Result<()> {
    let v = if probe {
        TCP_REPAIR_OFF
    } else {
        TCP_REPAIR_OFF_NO_WP
    };
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, &v)
}

/// The first bytes of `struct tcp_info` that a save needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct InfoHead {
    pub state: u8,
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
}

/// `TCP_INFO`, its first seven bytes: state, ca_state, retransmits, probes, backoff, options,
/// and the window scales (send in the low nibble, receive in the high one).
pub(crate) fn info_head(fd: BorrowedFd<'_>) -> io::Result<InfoHead> {
    let (b, len) = getsockopt::<[u8; 8]>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    if len < 7 {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    Ok(InfoHead {
        state: b[0],
        options: b[5],
        snd_wscale: b[6] & 0x0f,
        rcv_wscale: b[6] >> 4,
    })
}

/// The kernel's TCP state number of a socket (`TCP_ESTABLISHED` = 1, `TCP_FIN_WAIT2` = 5,
/// `TCP_CLOSE_WAIT` = 8, ...). Needs no privilege.
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<u8> {
    info_head(fd).map(|h| h.state)
}

/// Queue lengths: (`SIOCOUTQ` = write_seq − snd_una, `SIOCOUTQNSD` = the never-sent part,
/// `SIOCINQ` = received and unread, a FIN not counted).
pub(crate) fn queue_lens(fd: BorrowedFd<'_>) -> io::Result<(u32, u32, u32)> {
    Ok((
        ioctl_int(fd, libc::TIOCOUTQ as libc::c_ulong)?,
        ioctl_int(fd, SIOCOUTQNSD)?,
        ioctl_int(fd, libc::FIONREAD as libc::c_ulong)?,
    ))
}

/// Switches `SO_PEEK_OFF` off, so that `MSG_PEEK` reads a queue from its start (a socket
/// whose owner used peek offsets would otherwise be saved short). Best effort: kernels before
/// 6.10 do not support it on TCP, and there it cannot be on.
pub(crate) fn peek_offset_off(fd: BorrowedFd<'_>) {
    let _ = setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_PEEK_OFF,
        &(-1 as libc::c_int),
    );
}

/// `TCP_MAXSEG`; in repair mode the kernel reports the MSS clamp.
pub(crate) fn mss(fd: BorrowedFd<'_>) -> io::Result<u32> {
    getsockopt_u32(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG)
}

/// `TCP_TIMESTAMP`: the tsval the socket would send now.
pub(crate) fn timestamp(fd: BorrowedFd<'_>) -> io::Result<u32> {
    getsockopt_u32(fd, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP)
}

/// Sets the socket's timestamp offset so that its tsval continues from `tsval`.
pub(crate) fn set_timestamp(fd: BorrowedFd<'_>, tsval: u32) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP, &tsval)
}

pub(crate) fn repair_window(fd: BorrowedFd<'_>) -> io::Result<Window> {
    let (w, len) = getsockopt::<RepairWindow>(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW)?;
    if len != core::mem::size_of::<RepairWindow>() {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    Ok(Window {
        snd_wl1: w.snd_wl1,
        snd_wnd: w.snd_wnd,
        max_window: w.max_window,
        rcv_wnd: w.rcv_wnd,
        rcv_wup: w.rcv_wup,
    })
}

pub(crate) fn set_repair_window(fd: BorrowedFd<'_>, w: &Window) -> io::Result<()> {
    let raw = RepairWindow {
        snd_wl1: w.snd_wl1,
        snd_wnd: w.snd_wnd,
        max_window: w.max_window,
        rcv_wnd: w.rcv_wnd,
        rcv_wup: w.rcv_wup,
    };
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, &raw)
}

/// Selects the queue that `send`, `recv(MSG_PEEK)` and `TCP_QUEUE_SEQ` act on.
pub(crate) fn select_queue(fd: BorrowedFd<'_>, q: Queue) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, &(q as i32))
}

/// `TCP_QUEUE_SEQ` of the selected queue: rcv_nxt or write_seq.
pub(crate) fn queue_seq(fd: BorrowedFd<'_>) -> io::Result<u32> {
    getsockopt_u32(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)
}

/// Sets the selected queue's sequence number (only on a socket that is still closed).
pub(crate) fn set_queue_seq(fd: BorrowedFd<'_>, seq: u32) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, &seq)
}

pub(crate) fn set_repair_options(fd: BorrowedFd<'_>, opts: &[RepairOpt]) -> io::Result<()> {
    setsockopt_slice(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_OPTIONS, opts)
}

/// Sends one complete IPv4 packet (header included) to `dst` through a raw socket whose
/// packets carry [`REPAIR_MARK`]. Used to give a restored socket the peer's FIN or ACK.
pub(crate) fn inject_v4(packet: &[u8], dst: SocketAddrV4) -> io::Result<()> {
    use rustix::net::{AddressFamily, SendFlags, SocketFlags, SocketType};
    let raw = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        Some(rustix::net::ipproto::RAW),
    )?;
    setsockopt(
        std::os::fd::AsFd::as_fd(&raw),
        libc::SOL_SOCKET,
        libc::SO_MARK,
        &REPAIR_MARK,
    )?;
    let n = rustix::net::sendto(&raw, packet, SendFlags::empty(), &dst)?;
    if n != packet.len() {
        return Err(io::Error::from(io::ErrorKind::WriteZero));
    }
    Ok(())
}
