//! Saving a live socket into a [`Saved`] connection, and restoring one into a new socket.
//!
//! The caller must first make sure no packet of the flow reaches either socket or leaves it
//! (a netfilter drop rule, or the switch's hold and fence); packets that [`restore`] injects
//! carry [`crate::REPAIR_MARK`] so that such a rule can let them through.
//!
//! Save follows CRIU's libsoccr: repair on; state, options and window scales from `TCP_INFO`;
//! queue lengths; MSS clamp and tsval; `TCP_REPAIR_WINDOW`; then each queue's sequence number
//! and its bytes by `MSG_PEEK`. The socket is then closed silently while still in repair mode
//! ([`close_silently`]), so it sends neither FIN nor RST.
//!
//! Restore follows libsoccr too — bind, queue sequence numbers, repair `connect`, options,
//! timestamp offset, receive queue, the sent-but-unacknowledged part of the send queue, window,
//! the half-closed state's FIN — except for the never-sent part of the send queue: libsoccr
//! writes it with repair briefly off *before* the window is restored, which passt found makes
//! an intermittent hang; here it is written only after the final repair-off
//! ([`Restoring::finish`]). [`restore`] stops before that final repair-off, so a cut-over can
//! release the switch's hold between the two (the window probe that repair-off sends then
//! reaches the peer, whose answer acknowledges what it holds: no retransmission timeout when
//! only its ACKs were lost). The kernel sends that probe only in ESTABLISHED; for CLOSE_WAIT
//! with bytes in flight `finish` forges the same probe (measured: the next answer came after
//! ~170 ms without it, at once with it).

use crate::packet;
use crate::record::{RecordRepr, TcpState, Window};
use crate::sys::{self, Queue, RepairOpt};
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{SystemTime, UNIX_EPOCH};

/// What went wrong saving or restoring a connection.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("TCP_REPAIR needs CAP_NET_ADMIN (run as root or grant the capability): {0}")]
    Permission(io::Error),
    #[error("{step}: {source}")]
    Sys {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "the socket is in TCP state {0}; only ESTABLISHED, FIN_WAIT2 and CLOSE_WAIT are saved"
    )]
    State(u8),
    #[error("{queue} queue: the kernel reported {expected} bytes but {got} could be read")]
    QueueShort {
        queue: &'static str,
        expected: u32,
        got: usize,
    },
    #[error("FIN_WAIT2 with {0} unacknowledged bytes")]
    FinWait2Data(u32),
    #[error("the socket is not an IPv4 or IPv6 TCP socket")]
    Family,
    #[error("restoring a half-closed IPv6 connection is not supported yet")]
    HalfClosedV6,
    #[error(transparent)]
    Record(#[from] crate::record::RecordError),
}

fn sys_err(step: &'static str) -> impl FnOnce(io::Error) -> RepairError {
    move |source| {
        if source.raw_os_error() == Some(libc::EPERM) {
            RepairError::Permission(source)
        } else {
            RepairError::Sys { step, source }
        }
    }
}

/// A connection's kernel state, saved from a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub state: TcpState,
    pub sack: bool,
    pub wscale: Option<(u8, u8)>,
    pub tsval: Option<u32>,
    pub mss: u16,
    pub send_seq: u32,
    pub recv_seq: u32,
    pub window: Window,
    pub saved_at_ms: u64,
    pub recv_queue: Vec<u8>,
    pub send_queue: Vec<u8>,
    pub unsent_len: u32,
}

/// What the TCP server and the application held for a connection, carried in its record
/// without being interpreted here.
#[derive(Clone, Copy, Debug, Default)]
pub struct UserState<'a> {
    pub flags: u32,
    pub server_unsent: &'a [u8],
    pub server_held: &'a [u8],
    pub app_unanswered: &'a [u8],
}

impl Saved {
    /// The record of this connection with the user-space state `user`.
    pub fn repr<'a>(&'a self, user: UserState<'a>) -> RecordRepr<'a> {
        RecordRepr {
            local: self.local,
            peer: self.peer,
            state: self.state,
            sack: self.sack,
            wscale: self.wscale,
            tsval: self.tsval,
            mss: self.mss,
            send_seq: self.send_seq,
            recv_seq: self.recv_seq,
            window: self.window,
            saved_at_ms: self.saved_at_ms,
            user_flags: user.flags,
            recv_queue: &self.recv_queue,
            send_queue: &self.send_queue,
            unsent_len: self.unsent_len,
            server_unsent: user.server_unsent,
            server_held: user.server_held,
            app_unanswered: user.app_unanswered,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A socket in repair mode: nothing the application does to it reaches the network.
#[derive(Debug)]
pub struct Paused<'fd> {
    fd: BorrowedFd<'fd>,
    /// SO_REUSEADDR before the pause: leaving repair mode clears it, and [`Paused::resume`]
    /// sets it again.
    reuse: bool,
}

/// Switches `fd` into repair mode. The flow must already be silenced.
pub fn pause(fd: BorrowedFd<'_>) -> Result<Paused<'_>, RepairError> {
    let reuse = rustix::net::sockopt::socket_reuseaddr(fd).unwrap_or(false);
    sys::repair_on(fd).map_err(sys_err("TCP_REPAIR on"))?;
    Ok(Paused { fd, reuse })
}

impl Paused<'_> {
    /// Reads the connection's whole kernel state. The socket stays paused.
    pub fn save(&self) -> Result<Saved, RepairError> {
        let fd = self.fd;
        let info = sys::info_head(fd).map_err(sys_err("TCP_INFO"))?;
        let state = TcpState::from_u8(info.state).ok_or(RepairError::State(info.state))?;
        let (outq, unsent, inq) = sys::queue_lens(fd).map_err(sys_err("queue lengths"))?;
        if state.fin_sent() && outq != 0 {
            return Err(RepairError::FinWait2Data(outq));
        }
        let mss = sys::mss(fd).map_err(sys_err("TCP_MAXSEG"))?;
        let mss = u16::try_from(mss)
            .ok()
            .filter(|&m| m > 0)
            .ok_or(RepairError::Record(crate::record::RecordError::Mss(mss)))?;
        let tsval = if info.options & crate::record::opt::TIMESTAMPS != 0 {
            Some(sys::timestamp(fd).map_err(sys_err("TCP_TIMESTAMP"))?)
        } else {
            None
        };
        let wscale = (info.options & crate::record::opt::WSCALE != 0)
            .then_some((info.snd_wscale, info.rcv_wscale));
        let window = sys::repair_window(fd).map_err(sys_err("TCP_REPAIR_WINDOW"))?;
        sys::peek_offset_off(fd);
        let (rcv_nxt, recv_queue) = read_queue(fd, Queue::Recv, inq)?;
        let (write_seq, send_queue) = read_queue(fd, Queue::Send, outq)?;
        sys::select_queue(fd, Queue::None).map_err(sys_err("TCP_REPAIR_QUEUE"))?;
        let local = address(rustix::net::getsockname(fd), "getsockname")?;
        let peer = rustix::net::getpeername(fd).and_then(|p| p.ok_or(rustix::io::Errno::NOTCONN));
        let peer = address(peer, "getpeername")?;
        Ok(Saved {
            local,
            peer,
            state,
            sack: info.options & crate::record::opt::SACK != 0,
            wscale,
            tsval,
            mss,
            // A FIN occupies one sequence number after the data; the record counts data only.
            send_seq: write_seq
                .wrapping_sub(outq)
                .wrapping_sub(u32::from(state.fin_sent())),
            recv_seq: rcv_nxt
                .wrapping_sub(inq)
                .wrapping_sub(u32::from(state.fin_received())),
            window,
            saved_at_ms: now_ms(),
            recv_queue,
            send_queue,
            unsent_len: unsent.min(outq),
        })
    }

    /// Switches repair mode off again (with a window probe) and lets the socket go on.
    pub fn resume(self) -> Result<(), RepairError> {
        sys::repair_off(self.fd, true).map_err(sys_err("TCP_REPAIR off"))?;
        // The kernel made the address exclusive on the way out of repair mode: a connection
        // that was checkpointed would otherwise keep its service's listener from being bound
        // again once its process is gone (measured: a restarted node could not listen while
        // such a connection's FIN was still pending).
        if self.reuse {
            rustix::net::sockopt::set_socket_reuseaddr(self.fd, true)
                .map_err(|e| sys_err("SO_REUSEADDR")(e.into()))?;
        }
        Ok(())
    }
}

fn address(
    r: rustix::io::Result<rustix::net::SocketAddrAny>,
    step: &'static str,
) -> Result<SocketAddr, RepairError> {
    let a = r.map_err(|e| sys_err(step)(e.into()))?;
    SocketAddr::try_from(a).map_err(|_| RepairError::Family)
}

/// Selects `q`, reads its sequence number and peeks its `len` bytes.
fn read_queue(fd: BorrowedFd<'_>, q: Queue, len: u32) -> Result<(u32, Vec<u8>), RepairError> {
    let name = if q == Queue::Recv { "receive" } else { "send" };
    sys::select_queue(fd, q).map_err(sys_err("TCP_REPAIR_QUEUE"))?;
    let seq = sys::queue_seq(fd).map_err(sys_err("TCP_QUEUE_SEQ"))?;
    if len == 0 {
        return Ok((seq, Vec::new()));
    }
    // One byte more than the kernel reported, to see that there is no more.
    let mut buf = vec![0u8; len as usize + 1];
    let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
    let (got, _) = rustix::net::recv(fd, &mut buf[..], flags)
        .map_err(|e| sys_err("peek at a queue")(e.into()))?;
    if got != len as usize {
        return Err(RepairError::QueueShort {
            queue: name,
            expected: len,
            got,
        });
    }
    buf.truncate(got);
    Ok((seq, buf))
}

/// Closes a socket silently: in repair mode (switched on here if needed) the kernel drops it
/// without a FIN, an RST or a TIME_WAIT.
///
/// The socket is first disconnected (`connect(AF_UNSPEC)`, which in repair mode sends nothing),
/// so its 4-tuple is free at once even if another reference to it lives on — a child process
/// forked by another thread holds every descriptor until it execs, and the close alone would
/// then leave the old socket hashed, making a restore's `connect` fail with EADDRNOTAVAIL.
pub fn close_silently(fd: OwnedFd) -> Result<(), RepairError> {
    sys::repair_on(fd.as_fd()).map_err(sys_err("TCP_REPAIR on"))?;
    rustix::net::connect_unspec(&fd).map_err(|e| sys_err("disconnect in repair mode")(e.into()))?;
    drop(fd);
    Ok(())
}

/// How long [`Restoring::finish`] waits for send-buffer room for the never-sent bytes.
const UNSENT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// How [`restore`] treats time.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreOptions {
    /// Milliseconds to add to the saved tsval, so that the peer never sees timestamps go
    /// backwards (PAWS). `None`: the time since the record's `saved_at_ms` by this host's clock
    /// (0 if that clock is behind the saver's).
    pub tsval_advance_ms: Option<u32>,
}

/// A restored socket still in repair mode: everything is in place except the final repair-off
/// and the never-sent bytes.
#[derive(Debug)]
pub struct Restoring {
    fd: OwnedFd,
    unsent: Vec<u8>,
    /// The probe [`Restoring::finish`] sends itself where the kernel sends none.
    probe: Option<Probe>,
}

/// A window probe to forge: from us to the peer, one below snd_una, so the peer answers with
/// an ACK that tells us what it holds.
#[derive(Debug, Clone, Copy)]
struct Probe {
    from: SocketAddrV4,
    to: SocketAddrV4,
    seq: u32,
    ack: u32,
    window: u16,
}

/// Builds a new socket holding the connection `rec`. The flow must be silenced, and no other
/// socket may hold the same 4-tuple in this network namespace.
pub fn restore(rec: &RecordRepr<'_>, opts: RestoreOptions) -> Result<Restoring, RepairError> {
    rec.validate()?;
    let half_closed = rec.state != TcpState::Established;
    if half_closed && !rec.local.is_ipv4() {
        return Err(RepairError::HalfClosedV6);
    }
    let family = if rec.local.is_ipv4() {
        rustix::net::AddressFamily::INET
    } else {
        rustix::net::AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(
        family,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| sys_err("socket")(e.into()))?;
    let s = fd.as_fd();
    sys::repair_on(s).map_err(sys_err("TCP_REPAIR on"))?;
    rustix::net::bind(s, &rec.local).map_err(|e| sys_err("bind to the local address")(e.into()))?;
    sys::select_queue(s, Queue::Recv).map_err(sys_err("TCP_REPAIR_QUEUE"))?;
    sys::set_queue_seq(s, rec.recv_seq).map_err(sys_err("TCP_QUEUE_SEQ (receive)"))?;
    sys::select_queue(s, Queue::Send).map_err(sys_err("TCP_REPAIR_QUEUE"))?;
    sys::set_queue_seq(s, rec.send_seq).map_err(sys_err("TCP_QUEUE_SEQ (send)"))?;
    rustix::net::connect(s, &rec.peer)
        .map_err(|e| sys_err("connect in repair mode (is the 4-tuple still in use?)")(e.into()))?;
    let mut opts_v: Vec<RepairOpt> = Vec::with_capacity(4);
    if rec.sack {
        opts_v.push(RepairOpt {
            code: sys::TCPOPT_SACK_PERM,
            val: 0,
        });
    }
    if let Some((snd, rcv)) = rec.wscale {
        opts_v.push(RepairOpt {
            code: sys::TCPOPT_WINDOW,
            val: u32::from(snd) | (u32::from(rcv) << 16),
        });
    }
    if rec.tsval.is_some() {
        opts_v.push(RepairOpt {
            code: sys::TCPOPT_TIMESTAMP,
            val: 0,
        });
    }
    opts_v.push(RepairOpt {
        code: sys::TCPOPT_MAXSEG,
        val: u32::from(rec.mss),
    });
    sys::set_repair_options(s, &opts_v).map_err(sys_err("TCP_REPAIR_OPTIONS"))?;
    if let Some(tsval) = rec.tsval {
        let advance = opts.tsval_advance_ms.unwrap_or_else(|| {
            u32::try_from(now_ms().saturating_sub(rec.saved_at_ms)).unwrap_or(u32::MAX / 2)
        });
        sys::set_timestamp(s, tsval.wrapping_add(advance)).map_err(sys_err("TCP_TIMESTAMP"))?;
    }
    grow_buffer(s, Queue::Recv, rec.recv_queue.len());
    // The never-sent bytes too: `finish` writes them, and must not wait for ACKs to do so.
    grow_buffer(s, Queue::Send, rec.send_queue.len());
    write_queue(s, Queue::Recv, rec.recv_queue)?;
    let sent_len = rec.send_queue.len() - rec.unsent_len as usize;
    write_queue(
        s,
        Queue::Send,
        rec.send_queue.get(..sent_len).unwrap_or(&[]),
    )?;
    sys::select_queue(s, Queue::None).map_err(sys_err("TCP_REPAIR_QUEUE"))?;
    let mut w = rec.window;
    if rec.state.fin_received() {
        // The window was saved with the peer's FIN counted in rcv_nxt; until the FIN is given
        // back below, rcv_nxt is one less (libsoccr's adjustment).
        w.rcv_wup = w.rcv_wup.wrapping_sub(1);
        w.rcv_wnd = w.rcv_wnd.wrapping_add(1);
    }
    sys::set_repair_window(s, &w).map_err(sys_err("TCP_REPAIR_WINDOW"))?;
    if half_closed {
        restore_fin(s, rec)?;
    }
    // The kernel's repair-off window probe goes out only in ESTABLISHED
    // (tcp_send_window_probe checks the state). A CLOSE_WAIT connection with bytes in flight
    // would wait for a retransmission timeout (~200 ms measured here, and Nagle holds new
    // small writes behind them), so finish() forges the same probe for it.
    let probe = match (rec.state, rec.local, rec.peer) {
        (TcpState::CloseWait, SocketAddr::V4(from), SocketAddr::V4(to)) if sent_len > 0 => {
            let shift = rec.wscale.map_or(0, |(_, rcv)| rcv);
            Some(Probe {
                from,
                to,
                seq: rec.send_seq.wrapping_sub(1),
                // rcv_nxt, past the peer's FIN.
                ack: rec
                    .recv_seq
                    .wrapping_add(rec.recv_queue.len() as u32)
                    .wrapping_add(1),
                window: u16::try_from(rec.window.rcv_wnd >> shift).unwrap_or(u16::MAX),
            })
        }
        _ => None,
    };
    Ok(Restoring {
        fd,
        probe,
        unsent: rec
            .send_queue
            .get(sent_len..)
            .map(<[u8]>::to_vec)
            .unwrap_or_default(),
    })
}

/// Puts back the FIN of a half-closed connection: our own (FIN_WAIT2: queued as sent, then
/// acknowledged by an injected ACK) or the peer's (CLOSE_WAIT: an injected FIN).
fn restore_fin(s: BorrowedFd<'_>, rec: &RecordRepr<'_>) -> Result<(), RepairError> {
    let (SocketAddr::V4(local), SocketAddr::V4(peer)) = (rec.local, rec.peer) else {
        return Err(RepairError::HalfClosedV6);
    };
    let rcv_nxt = rec.recv_seq.wrapping_add(rec.recv_queue.len() as u32);
    let snd_una = rec.send_seq;
    // The peer's advertised window, in its own scale, as our snd_wnd says it.
    let shift = rec.wscale.map_or(0, |(snd, _)| snd);
    let window = u16::try_from(rec.window.snd_wnd >> shift).unwrap_or(u16::MAX);
    match rec.state {
        TcpState::FinWait2 => {
            // With the send queue selected, shutdown queues our FIN as already sent.
            sys::select_queue(s, Queue::Send).map_err(sys_err("TCP_REPAIR_QUEUE"))?;
            rustix::net::shutdown(s, rustix::net::Shutdown::Write)
                .map_err(|e| sys_err("shutdown (FIN)")(e.into()))?;
            sys::select_queue(s, Queue::None).map_err(sys_err("TCP_REPAIR_QUEUE"))?;
            let fin_end = snd_una.wrapping_add(rec.send_queue.len() as u32 + 1);
            inject(peer, local, rcv_nxt, fin_end, packet::ACK, window)?;
        }
        TcpState::CloseWait => {
            inject(
                peer,
                local,
                rcv_nxt,
                snd_una,
                packet::FIN | packet::ACK,
                window,
            )?;
        }
        TcpState::Established => {}
    }
    Ok(())
}

fn inject(
    from: SocketAddrV4,
    to: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
) -> Result<(), RepairError> {
    let p = packet::segment_v4(from, to, seq, ack, flags, window);
    sys::inject_v4(&p, to).map_err(sys_err("inject the peer's segment (raw socket)"))
}

/// Makes a socket's buffer for queue `q` hold at least `len` bytes.
fn grow_buffer(s: BorrowedFd<'_>, q: Queue, len: usize) {
    // The queue must fit the socket's buffer, or the refill stops with EAGAIN: a connection
    // saved with a large autotuned queue (a download in flight) is restored into a socket
    // with the default size. The saved socket held it, so this one may too (the *FORCE
    // options pass the sysctl caps, as CRIU restores buffer sizes; CAP_NET_ADMIN is needed
    // for the repair anyway). The kernel doubles the value for its bookkeeping.
    // If it cannot grow, the refill below says which step fell short.
    let want = len.saturating_mul(2);
    let _ = match q {
        Queue::Send if rustix::net::sockopt::socket_send_buffer_size(s).unwrap_or(0) < want => {
            rustix::net::sockopt::set_socket_send_buffer_size_force(s, want)
        }
        Queue::Recv if rustix::net::sockopt::socket_recv_buffer_size(s).unwrap_or(0) < want => {
            rustix::net::sockopt::set_socket_recv_buffer_size_force(s, want)
        }
        _ => Ok(()),
    };
}

/// Writes `bytes` into queue `q` of a socket in repair mode. The kernel puts each call into
/// one linear buffer, so a large call can fail with ENOMEM; then smaller pieces are tried,
/// down to 1 KiB (libsoccr's rule).
fn write_queue(s: BorrowedFd<'_>, q: Queue, bytes: &[u8]) -> Result<(), RepairError> {
    if bytes.is_empty() {
        return Ok(());
    }
    sys::select_queue(s, q).map_err(sys_err("TCP_REPAIR_QUEUE"))?;
    let mut chunk = bytes.len();
    let mut off = 0;
    while off < bytes.len() {
        let end = bytes.len().min(off + chunk);
        let flags = rustix::net::SendFlags::NOSIGNAL | rustix::net::SendFlags::DONTWAIT;
        match rustix::net::send(s, &bytes[off..end], flags) {
            Ok(n) if n > 0 => off += n,
            Err(rustix::io::Errno::NOMEM) | Ok(_) if chunk > 1024 => chunk /= 2,
            Ok(_) => {
                return Err(RepairError::QueueShort {
                    queue: if q == Queue::Recv { "receive" } else { "send" },
                    expected: bytes.len() as u32,
                    got: off,
                })
            }
            Err(e) => return Err(sys_err("refill a queue")(e.into())),
        }
    }
    Ok(())
}

impl Restoring {
    /// The socket, still in repair mode.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Switches repair mode off — the kernel sends a window probe, whose answer resynchronises
    /// the peer — and only then writes the bytes that were never sent (passt's order). Returns
    /// the live socket.
    pub fn finish(self) -> Result<OwnedFd, RepairError> {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let s = self.fd.as_fd();
        sys::repair_off(s, true).map_err(sys_err("TCP_REPAIR off"))?;
        // Leaving repair mode makes the socket's address exclusive (the kernel resets its
        // reuse flag); an accepted socket inherits SO_REUSEADDR from its listener instead.
        // Without it, this connection — still bound after its process dies, while its FIN
        // waits — keeps a new listener from binding the service's address, and a restarted
        // node cannot serve.
        rustix::net::sockopt::set_socket_reuseaddr(s, true)
            .map_err(|e| sys_err("SO_REUSEADDR")(e.into()))?;
        if let Some(p) = self.probe {
            inject(p.from, p.to, p.seq, p.ack, packet::ACK, p.window)?;
        }
        let deadline = std::time::Instant::now() + UNSENT_DEADLINE;
        let flags = rustix::net::SendFlags::NOSIGNAL | rustix::net::SendFlags::DONTWAIT;
        let mut off = 0;
        while off < self.unsent.len() {
            match rustix::net::send(s, &self.unsent[off..], flags) {
                Ok(n) => off += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Err(RepairError::Sys {
                            step: "write the never-sent bytes",
                            source: io::Error::from(io::ErrorKind::TimedOut),
                        });
                    }
                    let t = Timespec::try_from(left.min(std::time::Duration::from_millis(100)))
                        .unwrap_or(Timespec {
                            tv_sec: 0,
                            tv_nsec: 100_000_000,
                        });
                    let mut p = [PollFd::new(&s, PollFlags::OUT)];
                    match rustix::event::poll(&mut p, Some(&t)) {
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(e) => return Err(sys_err("poll")(e.into())),
                    }
                }
                Err(e) => return Err(sys_err("write the never-sent bytes")(e.into())),
            }
        }
        Ok(self.fd)
    }

    /// Gives up: the half-built socket is closed silently.
    pub fn abandon(self) -> Result<(), RepairError> {
        close_silently(self.fd)
    }
}
