//! The io_uring seam: the ring, the operations we submit, and provided-buffer rings.
//!
//! Every `unsafe` that io_uring needs lives here, each with the invariant the caller keeps
//! (the worker's only other `unsafe` blocks are its synchronous gathered `sendmsg` in
//! `worker/send.rs` and the msghdr it zeroes, and adopting an accepted fd). The
//! key one: memory handed to the kernel (a provided buffer, a send's bytes) must stay mapped
//! and unchanged until the operation's final completion is reaped. The worker guarantees that by
//! owning the `TxBuffer`/`RxBuffer` behind each pointer until then, and by never dropping a
//! session's memory while it has operations in flight.

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use rustix::fd::{AsRawFd, BorrowedFd};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// What a completion is for. Packed into the top byte of `user_data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Accept = 1,
    Recv = 2,
    Send = 3,
    ConnectPoll = 4,
    Cancel = 5,
    SessionPoll = 6,
    Wake = 7,
    /// Waiting for a full socket to take more bytes before a synchronous send resumes.
    SendPoll = 8,
    /// Waiting for bytes (or the end) on a connection in lingering close, which are then read
    /// and discarded synchronously (`worker/linger.rs`).
    LingerPoll = 9,
}

impl Op {
    /// Every op, so that decoding is one table with the declaration (a new op cannot be
    /// forgotten by the decoder: `tags_round_trip` walks this list).
    pub const ALL: [Op; 9] = [
        Op::Accept,
        Op::Recv,
        Op::Send,
        Op::ConnectPoll,
        Op::Cancel,
        Op::SessionPoll,
        Op::Wake,
        Op::SendPoll,
        Op::LingerPoll,
    ];
}

/// `user_data` layout: op (8 bits) | session slot (24 bits) | socket slot (32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    pub op: Op,
    pub session: u32,
    pub socket: u32,
}

impl Tag {
    pub fn encode(self) -> u64 {
        ((self.op as u64) << 56) | ((self.session as u64 & 0xff_ffff) << 32) | self.socket as u64
    }

    pub fn decode(v: u64) -> Option<Tag> {
        let code = (v >> 56) as u8;
        let op = Op::ALL.into_iter().find(|op| *op as u8 == code)?;
        Some(Tag {
            op,
            session: ((v >> 32) & 0xff_ffff) as u32,
            socket: v as u32,
        })
    }
}

pub struct Completion {
    pub tag: Option<Tag>,
    pub result: i32,
    pub more: bool,
    pub buffer: Option<u16>,
}

pub struct Ring {
    ring: IoUring,
    /// Failures to inject, for tests of the error paths the kernel rarely takes.
    #[cfg(test)]
    pub faults: Faults,
    /// The last enter posted completions: more deferred work may be left (see `submit_pass`).
    productive: bool,
    last_enter: Instant,
}

/// Operations a test makes fail once (the kernel is not asked).
#[cfg(test)]
#[derive(Default)]
pub struct Faults {
    pub poll_readable: bool,
    pub unregister_buf_ring: bool,
}

#[cfg(test)]
fn injected(fault: &mut bool) -> io::Result<()> {
    if std::mem::take(fault) {
        return Err(io::Error::other("injected failure"));
    }
    Ok(())
}

/// Longest a spinning event loop goes without entering the kernel (see `Ring::submit_pass`).
const FORCED_ENTER: Duration = Duration::from_millis(1);

const POLLIN: u32 = 0x1;
const POLLOUT: u32 = 0x4;
const MSG_NOSIGNAL: i32 = 0x4000;

impl Ring {
    pub fn new(entries: u32) -> io::Result<Ring> {
        // Single issuer + deferred task work: completions are posted when this thread enters
        // the kernel (once per loop pass), instead of interrupting it whenever a packet lands.
        let ring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(entries)?;
        Ok(Ring {
            ring,
            #[cfg(test)]
            faults: Faults::default(),
            productive: false,
            last_enter: Instant::now(),
        })
    }

    fn push(&mut self, e: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: (for every caller) the entries built below reference only fds and memory
            // that the caller keeps valid until the completion is reaped (module comment).
            let pushed = unsafe { self.ring.submission().push(&e) };
            if pushed.is_ok() {
                return Ok(());
            }
            // Submission queue full: hand what we have to the kernel and retry.
            self.ring.submit()?;
        }
    }

    pub fn accept_multi(&mut self, fd: BorrowedFd<'_>, tag: Tag) -> io::Result<()> {
        let e = opcode::AcceptMulti::new(types::Fd(fd.as_raw_fd()))
            // Non-blocking, so the worker may also send on it synchronously (see
            // `Worker::send_now`) without ever sleeping in the kernel.
            .flags(
                (rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK).bits()
                    as i32,
            )
            .build()
            .user_data(tag.encode());
        self.push(e)
    }

    pub fn recv_multi(&mut self, fd: BorrowedFd<'_>, group: u16, tag: Tag) -> io::Result<()> {
        let e = opcode::RecvMulti::new(types::Fd(fd.as_raw_fd()), group)
            .build()
            .user_data(tag.encode());
        self.push(e)
    }

    /// # Safety
    /// `ptr..ptr+len` must stay mapped and unchanged until this operation's completion is reaped.
    pub unsafe fn send(
        &mut self,
        fd: BorrowedFd<'_>,
        ptr: *const u8,
        len: u32,
        tag: Tag,
    ) -> io::Result<()> {
        let e = opcode::Send::new(types::Fd(fd.as_raw_fd()), ptr, len)
            .flags(MSG_NOSIGNAL)
            .build()
            .user_data(tag.encode());
        self.push(e)
    }

    /// A gathered send (`sendmsg`): one system call, and for small pieces one TCP segment,
    /// for several queued chunks (a response head and its file body).
    ///
    /// # Safety
    /// `msg`, its iovec array and every byte range they name must stay valid and unchanged
    /// until this operation's completion is reaped.
    pub unsafe fn sendmsg(
        &mut self,
        fd: BorrowedFd<'_>,
        msg: *const libc::msghdr,
        tag: Tag,
    ) -> io::Result<()> {
        let e = opcode::SendMsg::new(types::Fd(fd.as_raw_fd()), msg)
            .flags(MSG_NOSIGNAL as u32)
            .build()
            .user_data(tag.encode());
        self.push(e)
    }

    pub fn poll_writable(&mut self, fd: BorrowedFd<'_>, tag: Tag) -> io::Result<()> {
        let e = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), POLLOUT)
            .build()
            .user_data(tag.encode());
        self.push(e)
    }

    /// One wait for a socket to become readable (bytes, the peer's end, or an error).
    pub fn poll_readable(&mut self, fd: BorrowedFd<'_>, tag: Tag) -> io::Result<()> {
        let e = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), POLLIN)
            .build()
            .user_data(tag.encode());
        self.push(e)
    }

    pub fn poll_readable_multi(&mut self, fd: BorrowedFd<'_>, tag: Tag) -> io::Result<()> {
        #[cfg(test)]
        injected(&mut self.faults.poll_readable)?;
        let e = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), POLLIN)
            .multi(true)
            .build()
            .user_data(tag.encode());
        self.push(e)
    }

    /// Cancels the operation tagged `target`; the cancel's own completion is tagged `tag`.
    pub fn cancel(&mut self, target: Tag, tag: Tag) -> io::Result<()> {
        let e = opcode::AsyncCancel::new(target.encode())
            .build()
            .user_data(tag.encode());
        self.push(e)
    }

    /// Submits queued entries and runs deferred completions, without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `submit` for the event loop's every pass: enters the kernel only when there may be
    /// something to do. The crate's `submit` always makes the system call, which in a spinning
    /// worker was 3.6 `io_uring_enter` calls per echo request (384k/s at 105k req/s; 0.8 per
    /// request with this). The kernel raises `IORING_SQ_TASKRUN` when deferred completions wait for
    /// us, but one enter runs at most 20 of them and clears the flag even when it leaves some
    /// behind, so an enter that produced completions is followed by another, and an enter
    /// happens at least every [`FORCED_ENTER`] regardless.
    pub fn submit_pass(&mut self, now: Instant) -> io::Result<()> {
        let sq = self.ring.submission();
        let quiet = sq.is_empty() && !sq.taskrun() && !sq.cq_overflow();
        drop(sq);
        if quiet
            && !self.productive
            && now.saturating_duration_since(self.last_enter) < FORCED_ENTER
        {
            return Ok(());
        }
        let before = self.ring.completion().len();
        let r = self.submit();
        self.productive = self.ring.completion().len() > before;
        self.last_enter = now;
        r
    }

    /// Submits and sleeps until at least one completion or `timeout`.
    pub fn submit_and_wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e)
                if e.raw_os_error() == Some(rustix::io::Errno::TIME.raw_os_error())
                    || e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error())
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Takes up to `max` completions.
    pub fn reap(&mut self, out: &mut Vec<Completion>, max: usize) {
        let cq = self.ring.completion();
        for cqe in cq.take(max) {
            let flags = cqe.flags();
            out.push(Completion {
                tag: Tag::decode(cqe.user_data()),
                result: cqe.result(),
                more: cqueue::more(flags),
                buffer: cqueue::buffer_select(flags),
            });
        }
    }

    pub fn register_buf_ring(&mut self, ring: &BufRing) -> io::Result<()> {
        // SAFETY: the ring memory is owned by `ring` (page-aligned anonymous mapping of
        // `entries` slots), and the worker unregisters it before dropping it.
        unsafe {
            self.ring.submitter().register_buf_ring_with_flags(
                ring.map.as_ptr() as u64,
                ring.entries,
                ring.group,
                0,
            )
        }
    }

    pub fn unregister_buf_ring(&mut self, group: u16) -> io::Result<()> {
        #[cfg(test)]
        injected(&mut self.faults.unregister_buf_ring)?;
        self.ring.submitter().unregister_buf_ring(group)
    }
}

/// A provided-buffer ring: the kernel picks a buffer from it for each multishot receive
/// completion. Buffers are the session's m2m pool slots, so received bytes land directly in
/// memory the application can read.
pub struct BufRing {
    map: memmap2::MmapMut,
    entries: u16,
    group: u16,
    tail: u16,
}

/// The kernel's `struct io_uring_buf` (uapi `io_uring.h`): one provided buffer.
mod buf_field {
    /// Size of one entry.
    pub const ENTRY_BYTES: usize = 16;
    /// `__u64 addr`: where the buffer is.
    pub const ADDR: usize = 0;
    /// `__u32 len`: its length.
    pub const LEN: usize = 8;
    /// `__u16 bid`: its id, returned in the completion's flags.
    pub const BID: usize = 12;
    /// `__u16 resv`: unused in every entry but the first, where it is the ring's tail
    /// (`struct io_uring_buf_ring` overlays `tail` on entry 0's `resv`).
    pub const TAIL: usize = 14;
}
use buf_field::ENTRY_BYTES;

impl BufRing {
    pub fn new(group: u16, min_entries: usize) -> io::Result<BufRing> {
        let entries = min_entries.next_power_of_two().clamp(1, 32768);
        let map = memmap2::MmapMut::map_anon(entries * ENTRY_BYTES)?;
        Ok(BufRing {
            map,
            entries: entries as u16,
            group,
            tail: 0,
        })
    }

    pub fn group(&self) -> u16 {
        self.group
    }

    /// Queues a buffer; it becomes visible to the kernel at the next [`BufRing::publish`].
    ///
    /// # Safety
    /// `addr..addr+len` must stay mapped and unused by anyone else until the kernel hands the
    /// buffer back in a completion (or the ring is unregistered).
    pub unsafe fn push(&mut self, addr: *mut u8, len: u32, bid: u16) {
        let slot = (self.tail & (self.entries - 1)) as usize;
        let base = self.map.as_mut_ptr();
        // SAFETY: `slot < entries`, so the 16-byte entry lies inside the mapping, which is
        // page-aligned; the fields are written at their natural alignment. The `resv` field
        // (`TAIL`) is not touched: in entry 0 it is the shared tail.
        unsafe {
            let e = base.add(slot * ENTRY_BYTES);
            e.add(buf_field::ADDR).cast::<u64>().write(addr as u64);
            e.add(buf_field::LEN).cast::<u32>().write(len);
            e.add(buf_field::BID).cast::<u16>().write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes pushed buffers visible to the kernel.
    pub fn publish(&mut self) {
        // SAFETY: `TAIL` is entry 0's `resv`, the ring tail, 2-byte aligned inside the
        // mapping; the kernel reads it concurrently, hence the atomic release store that also
        // orders the entry writes before it.
        let tail =
            unsafe { AtomicU16::from_ptr(self.map.as_mut_ptr().add(buf_field::TAIL).cast()) };
        tail.store(self.tail, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for op in Op::ALL {
            let t = Tag {
                op,
                session: 0xab_cdef,
                socket: u32::MAX,
            };
            assert_eq!(Tag::decode(t.encode()), Some(t));
        }
        assert_eq!(Tag::decode(0), None);
        assert_eq!(Tag::decode(0xff << 56), None);
        let codes: std::collections::HashSet<u8> = Op::ALL.iter().map(|op| *op as u8).collect();
        assert_eq!(codes.len(), Op::ALL.len(), "two ops share a code");
    }
}
