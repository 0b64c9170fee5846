//! The receive path: provided-buffer receives into the application's pool, delivery inline or
//! by buffer, and the receive window.

use super::*;

/// Received bytes a direct-path connection may have waiting to be answered before the server
/// stops reading it: several requests' worth (the HTTP responder of `splitos serve` takes
/// heads of up to 16 KiB), for pipelining. Unanswered bytes pile up only while the connection
/// is blocked (its send queue full); the receive is then cancelled, and what was already in
/// flight (bounded by the session's buffer pool) is the most that lands beyond this.
pub(super) const DIRECT_BUF_MAX: usize = 64 << 10;

/// Received bytes a paused connection may hold (see `Conn::held`): a receive window's worth.
/// Reading stops there and resumes below half of it (it never does while the connection stays
/// paused: held bytes leave only with a hand-off), plus what was in flight.
pub(super) const HELD_MAX: usize = RECV_WINDOW as usize;

impl Worker {
    pub(super) fn maybe_arm_recv(&mut self, slot: SlotIx) {
        let Some(sock) = self.sockets[slot].sock.as_ref() else {
            return;
        };
        let si = sock.session;
        let Kind::Conn(c) = &sock.kind else {
            return;
        };
        if sock.closing || !c.may_receive() {
            return;
        }
        // Session-wide budgets of bytes that arrive unasked: held for paused connections, and
        // queued for an application behind on its events. Over one, the connection waits
        // (`budget_waiters`, retried when room is made and at housekeeping).
        let paused = c.paused;
        if (paused && self.budget_full(si, Res::HeldBytes)) || self.outbox_full(si) {
            if let Some(c) = self.conn_mut(slot) {
                if !c.budget_wait {
                    c.budget_wait = true;
                    self.budget_waiters.push(slot);
                }
            }
            return;
        }
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        let Some(s) = self.sessions.get(si.ix()).and_then(|s| s.as_ref()) else {
            return;
        };
        let tag = Tag {
            op: Op::Recv,
            session: si.0,
            socket: slot.0,
        };
        match self.ring.recv_multi(sock.fd.as_fd(), s.bufs.group(), tag) {
            Ok(()) => {
                c.recv = Recv::Armed;
                sock.inflight += 1;
            }
            Err(e) => tracing::error!("cannot arm a receive: {e}"),
        }
    }

    pub(super) fn received(&mut self, slot: SlotIx, cqe: &Completion) {
        // Before anything answers it: a standing checkpoint is stale from here on.
        self.ckpt_input(slot, cqe.result);
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let si = sock.session;
        // The buffer the kernel filled, if any, comes out of the provided set first.
        let buf = cqe.buffer.and_then(|bid| {
            let s = self.sessions.get_mut(si.ix())?.as_mut()?;
            let b = s.provided.get_mut(bid as usize)?.take();
            s.free_bids.push(bid);
            b
        });
        let closing = sock.closing;
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        if !cqe.more {
            c.recv = Recv::Idle;
        }
        let res = cqe.result;
        if c.paused {
            // Delivery is paused (for a hand-off): bytes, EOF and errors stay with the
            // connection and travel with it. The application is given none of these bytes,
            // so it cannot acknowledge them: they are bounded by `HELD_MAX` on their own, not
            // by the receive window (which `Consumed` would reopen).
            if res > 0 {
                let n = res as usize;
                let mut kept = 0;
                if let Some(b) = &buf {
                    let at = c.held.len();
                    c.held.resize(at + n, 0);
                    b.read_at(0, &mut c.held[at..]);
                    kept = n as u64;
                }
                let full = c.held.len() >= HELD_MAX;
                // Charged as they arrive (they must be kept); over a budget, reading stops.
                let over_budget = self.charge_arrived(si, Res::HeldBytes, kept);
                if let Some(c) = self.conn_mut(slot) {
                    if (full || over_budget) && c.recv == Recv::Armed {
                        c.recv = Recv::Cancelling;
                        self.cancel(slot, Op::Recv);
                    }
                }
            } else if res == 0 {
                c.eof = true;
            } else if res == -Errno::NOBUFS.raw_os_error() {
                self.starved.push(slot);
            } else if res != -Errno::CANCELED.raw_os_error() && res != -Errno::AGAIN.raw_os_error()
            {
                c.failed = true;
            }
            if let Some(b) = buf {
                self.provide(si, b);
            }
            if !cqe.more {
                self.maybe_arm_recv(slot);
                self.try_finish_close(slot);
            }
            return;
        }
        if res > 0 && !closing {
            if let Some(d) = c.direct.as_mut() {
                let n = res as usize;
                if let Some(b) = &buf {
                    d.conn.received(n, self.now, |dst| {
                        b.read_at(0, dst);
                    });
                }
                if let Some(b) = buf {
                    self.provide(si, b);
                }
                if let Some(s) = self.session(si) {
                    s.bytes_in += n as u64;
                }
                self.serve_direct(slot);
                self.stop_direct_reading(slot);
                if !cqe.more {
                    self.maybe_arm_recv(slot);
                    self.try_finish_close(slot);
                }
                return;
            }
        }
        let handle = Handle::new(slot.0, self.sockets[slot].generation);
        if res > 0 && !closing {
            let n = res as usize;
            let Some(buf) = buf else {
                tracing::error!("receive completion without a buffer");
                return;
            };
            if let Some(c) = self.conn_mut(slot) {
                c.delivering(n, |dst| {
                    buf.read_at(0, dst);
                });
            }
            if let Some(s) = self.session(si) {
                s.bytes_in += n as u64;
            }
            if n <= INLINE_DATA_MAX {
                // Encode the Data event in place: header, then the bytes straight from the
                // buffer, then one copy into the ring.
                let mut ev = std::mem::take(&mut self.ev);
                ev.clear();
                Event::Data { handle, data: &[] }.encode(&mut ev);
                ev.resize(Event::DATA_HEADER + n, 0);
                buf.read_at(0, &mut ev[Event::DATA_HEADER..]);
                self.ev = ev;
                self.emit_encoded(si);
                self.provide(si, buf);
            } else {
                self.emit_buffer(si, buf, n, BufferMeta::Data(handle));
            }
            let outbox_full = self.outbox_full(si);
            if let Some(c) = self.conn_mut(slot) {
                let stop = c.unacked >= RECV_WINDOW as u64 || outbox_full;
                if stop && c.recv == Recv::Armed {
                    c.recv = Recv::Cancelling;
                    self.cancel(slot, Op::Recv);
                }
            }
        } else {
            if let Some(b) = buf {
                self.provide(si, b);
            }
            if res == 0 && !closing {
                if let Some(c) = self.conn_mut(slot) {
                    c.eof = true;
                }
                self.emit(si, Event::Eof { handle });
            } else if res == -Errno::NOBUFS.raw_os_error() {
                self.starved.push(slot);
            } else if res == -Errno::AGAIN.raw_os_error() {
                // Nothing to read on the non-blocking socket after all: re-armed below.
                tracing::trace!("receive gave EAGAIN");
            } else if res < 0 && res != -Errno::CANCELED.raw_os_error() && !closing {
                if let Some(c) = self.conn_mut(slot) {
                    c.failed = true;
                }
                self.emit(
                    si,
                    Event::Error {
                        handle,
                        errno: -res,
                    },
                );
            }
        }
        if !cqe.more {
            self.maybe_arm_recv(slot);
            self.try_finish_close(slot);
        }
    }

    /// Cancels the receive of a direct-path connection that must not read more (blocked, or
    /// holding `DIRECT_BUF_MAX` unanswered bytes): not re-arming it is not enough, because a
    /// multishot receive goes on until cancelled. It is re-armed when the queue drains
    /// (`advance_sent`) and `Conn::may_receive` allows.
    pub(super) fn stop_direct_reading(&mut self, slot: SlotIx) {
        let Some(c) = self.conn_mut(slot) else { return };
        let full = c.direct.as_ref().is_some_and(|d| d.holds_back());
        if full && c.recv == Recv::Armed {
            c.recv = Recv::Cancelling;
            self.cancel(slot, Op::Recv);
        }
    }

    /// Retries the receives that waited for a session budget (see `maybe_arm_recv`).
    pub(super) fn retry_budget_waiters(&mut self) {
        for slot in std::mem::take(&mut self.budget_waiters) {
            if let Some(c) = self.conn_mut(slot) {
                c.budget_wait = false;
            }
            self.maybe_arm_recv(slot);
        }
    }

    /// Gives a buffer back to the kernel's provided set.
    pub(super) fn provide(&mut self, si: SessionIx, mut buf: TxBuffer) {
        let Some(s) = self.session(si) else { return };
        if s.dead {
            return;
        }
        let Some(bid) = s.free_bids.pop() else { return };
        let cap = buf.capacity() as u32;
        // SAFETY: the buffer is a pool slot this server owns (allocated, not sent); it stays in
        // `provided` until the kernel returns it in a completion, and the session's memory is
        // kept until the ring is unregistered.
        unsafe { s.bufs.push(buf.as_mut_ptr(), cap, bid) };
        s.bufs.publish();
        s.provided[bid as usize] = Some(buf);
    }

    /// Tops up every session's provided buffers from its pool (buffers come back as the
    /// application drops them) and re-arms receives that ran out of buffers.
    pub(super) fn refill_and_rearm(&mut self) {
        for si in self.session_ixs() {
            self.refill(si);
        }
        if self.starved.is_empty() {
            return;
        }
        let starved = std::mem::take(&mut self.starved);
        for slot in starved {
            let has_bufs = self.sockets[slot]
                .sock
                .as_ref()
                .and_then(|s| self.sessions.get(s.session.ix())?.as_ref())
                .is_some_and(|s| s.free_bids.len() < s.provided.len());
            if has_bufs {
                self.maybe_arm_recv(slot);
            } else {
                self.starved.push(slot);
            }
        }
    }

    pub(super) fn refill(&mut self, si: SessionIx) {
        let Some(s) = self.live_session(si) else {
            return;
        };
        let mut pushed = false;
        while !s.free_bids.is_empty() {
            match s.chan.alloc_buffer() {
                Ok(Some(mut buf)) => {
                    let Some(bid) = s.free_bids.pop() else { break };
                    let cap = buf.capacity() as u32;
                    // SAFETY: as in `provide`.
                    unsafe { s.bufs.push(buf.as_mut_ptr(), cap, bid) };
                    s.provided[bid as usize] = Some(buf);
                    pushed = true;
                }
                Ok(None) => break,
                Err(e) => {
                    self.session_failed(si, &e);
                    return;
                }
            }
        }
        if pushed {
            s.bufs.publish();
        }
    }
}
