//! Lingering close (security review item 23, as nginx's `lingering_close`): a connection
//! closed gracefully whose peer has not ended its side is not closed as soon as its last
//! bytes are in the kernel. Closing a socket with unread received bytes — or one that receives
//! more afterwards — makes the kernel answer with RST, and an RST makes the client's kernel
//! drop what it has not read yet of the last response (and ours what it has not sent). So the
//! sending side is shut down (the client sees the response end), and what still arrives is
//! read and discarded until the client's EOF or a bound (`state::Lingering`: idle 5 s, 30 s in
//! all, 1 MiB).
//!
//! The wait is a single-shot readiness poll in the ring (`Op::LingerPoll`), counted in the
//! socket's `inflight` like any operation (invariant 3), and the bytes are discarded by a
//! synchronous `recv(MSG_TRUNC)`, which for TCP drops them without copying. No receive into the
//! session's provided buffers: those are the application's memory (and a dead session's are
//! not given back to the kernel), and nothing of a lingering connection is ever delivered.
//!
//! What it holds: its slot, its descriptor and its session's connection budget, until it
//! ends; so lingering sockets count against `conns` at every level and are bounded by it.
//! Its application is told `Closed` when lingering begins, as it would have been without it,
//! and forgets the handle then. A connection over the budget takes the budget of its
//! session's oldest lingering connection rather than being refused (`reclaim_lingering`):
//! lingering is a courtesy to clients that are done, not a reason to turn new ones away. A
//! stopping server does not linger (`try_finish_close`), and ends what lingers at once.

use super::*;

/// Bytes one `recv` discards (with `MSG_TRUNC` nothing is copied into the buffer; it only has
/// to be as long as what is asked for).
const DISCARD_CHUNK: usize = 64 << 10;
/// `recv` calls per wake-up, so that one client sending fast cannot hold the worker; the
/// poll is level-triggered, so what is left wakes it again at once.
const DISCARDS_PER_WAKE: usize = 16;

impl Worker {
    /// Starts lingering on a connection closed gracefully, flushed, with nothing in flight:
    /// shuts its sending side down, waits for bytes and tells its application `Closed`.
    /// Returns false when it cannot linger (the caller then releases it at once).
    pub(super) fn start_lingering(&mut self, slot: SlotIx) -> bool {
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return false;
        };
        let si = sock.session;
        let Kind::Conn(c) = &mut sock.kind else {
            return false;
        };
        if !c.shutdown_done {
            c.shutdown_done = true;
            // A failure means the connection is gone already (ENOTCONN after a reset):
            // nothing to linger for.
            if rnet::shutdown(&sock.fd, rnet::Shutdown::Write).is_err() {
                return false;
            }
        }
        let tag = Tag {
            op: Op::LingerPoll,
            session: si.0,
            socket: slot.0,
        };
        if let Err(e) = self.ring.poll_readable(sock.fd.as_fd(), tag) {
            tracing::warn!(slot = slot.0, "cannot wait on a lingering connection: {e}");
            return false;
        }
        sock.inflight += 1;
        let mut l = Lingering::new(self.now);
        l.poll = Recv::Armed;
        c.lingering = Some(l);
        self.lingering.push(slot);
        // The application asked for the close and is owed nothing more on this connection:
        // it is told now, not when the client lets go (its own view, e.g. `--max-conns`, must
        // not wait for a client). The handle is refused from now on (the socket is closing)
        // and stays unused until the slot is released.
        let handle = self.handle(slot);
        if self.live_session(si).is_some() {
            self.emit(si, Event::Closed { handle });
        }
        true
    }

    /// A lingering connection's readiness wait finished (`res`: its poll result): discards
    /// what arrived, then waits again, or ends it at the peer's EOF, an error or a bound.
    pub(super) fn lingered(&mut self, slot: SlotIx, res: i32) {
        let now = self.now;
        let Worker {
            sockets, discard, ..
        } = self;
        let Some(sock) = sockets.get_mut(slot.ix()).and_then(|s| s.sock.as_mut()) else {
            return;
        };
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        let Some(l) = c.lingering.as_mut() else {
            return;
        };
        let cancelled = l.poll == Recv::Cancelling;
        l.poll = Recv::Idle;
        if res < 0 {
            if res != -Errno::CANCELED.raw_os_error() {
                l.end();
            }
        } else if !cancelled && !l.over(now) {
            if discard.len() < DISCARD_CHUNK {
                discard.resize(DISCARD_CHUNK, 0);
            }
            for _ in 0..DISCARDS_PER_WAKE {
                let flags = rnet::RecvFlags::TRUNC | rnet::RecvFlags::DONTWAIT;
                match rnet::recv(&sock.fd, &mut discard[..], flags) {
                    // The peer's EOF: it has everything and let go; closing sends no RST.
                    Ok((_, 0)) => l.end(),
                    Ok((_, n)) => l.discarded(n, now),
                    Err(Errno::AGAIN) => break,
                    Err(Errno::INTR) => continue,
                    // Reset or failed: nothing left to protect.
                    Err(_) => l.end(),
                }
                if l.over(now) {
                    break;
                }
            }
        }
        if !l.over(now) && !cancelled {
            let tag = Tag {
                op: Op::LingerPoll,
                session: sock.session.0,
                socket: slot.0,
            };
            match self.ring.poll_readable(sock.fd.as_fd(), tag) {
                Ok(()) => {
                    l.poll = Recv::Armed;
                    sock.inflight += 1;
                }
                Err(e) => {
                    tracing::warn!(slot = slot.0, "cannot wait on a lingering connection: {e}");
                    l.end();
                }
            }
        }
        self.try_finish_close(slot);
    }

    /// Ends the lingering connections that are past a bound at `now` (housekeeping), or all
    /// of them when the server stops (`try_finish_close` ends each then).
    pub(super) fn expire_lingering(&mut self, now: Instant, all: bool) {
        let mut list = std::mem::take(&mut self.lingering);
        list.sort_unstable_by_key(|s| s.0);
        list.dedup();
        for slot in list {
            let over = match self.conn_mut(slot).and_then(|c| c.lingering.as_ref()) {
                Some(l) => all || l.over(now),
                None => continue, // released (its slot may be reused by now)
            };
            if over {
                self.try_finish_close(slot);
            }
            if self.conn_mut(slot).is_some_and(|c| c.lingering.is_some()) {
                self.lingering.push(slot);
            }
        }
    }

    /// A new connection of session `si` is over its connection budget: ends the session's
    /// oldest lingering connection and gives its budget to the new one, which then need not
    /// be refused. Returns whether there was one. Its descriptor closes once its poll is
    /// cancelled (this pass or the next), so for that moment the session holds one descriptor
    /// more than its budget — as it does whenever an accept is refused, since the accepted
    /// descriptor is open when the budget is checked.
    pub(super) fn reclaim_lingering(&mut self, si: SessionIx) -> bool {
        let oldest = self
            .lingering
            .iter()
            .filter_map(|&slot| {
                let sock = self.sockets.get(slot.ix())?.sock.as_ref()?;
                let Kind::Conn(c) = &sock.kind else {
                    return None;
                };
                let l = c.lingering.as_ref()?;
                (sock.session == si && !l.gave_slot).then_some((l.since(), slot))
            })
            .min_by_key(|&(since, slot)| (since, slot.0));
        let Some((_, slot)) = oldest else {
            return false;
        };
        if let Some(l) = self.conn_mut(slot).and_then(|c| c.lingering.as_mut()) {
            l.gave_slot = true;
            l.end();
        }
        tracing::debug!(
            session = si.0,
            slot = slot.0,
            "connection budget full: a lingering connection gives its place to a new one"
        );
        self.try_finish_close(slot);
        true
    }
}
