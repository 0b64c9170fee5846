//! Closing: flush, cancel what is in flight, linger (`linger.rs`), then release the slot (or
//! park / hand on).

use super::*;

impl Worker {
    pub(super) fn cancel(&mut self, slot: SlotIx, op: Op) {
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let target = Tag {
            op,
            session: sock.session.0,
            socket: slot.0,
        };
        let tag = Tag {
            op: Op::Cancel,
            session: sock.session.0,
            socket: slot.0,
        };
        if self.ring.cancel(target, tag).is_ok() {
            sock.inflight += 1;
        }
    }

    /// Starts closing a socket: a connection first flushes what the application queued
    /// (unless `abort`), then its receive is cancelled; a graceful close then lingers until
    /// the peer's EOF or a bound (`linger.rs`); the fd is closed once the kernel holds no
    /// operation on it.
    pub(super) fn begin_close(&mut self, slot: SlotIx, abort: bool) {
        self.ckpt_stale(slot);
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        if !sock.closing {
            sock.closing = true;
        }
        match &mut sock.kind {
            // A connection being handed off still flushes: the next owner's responses must
            // follow complete ones.
            Kind::Conn(c) if c.abort_on_close(abort) => {
                if !c.send.busy() {
                    c.sendq.clear();
                }
                c.unsent = 0;
            }
            _ => {}
        }
        self.try_finish_close(slot);
    }

    pub(super) fn try_finish_close(&mut self, slot: SlotIx) {
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        if !sock.closing {
            return;
        }
        let dead = self
            .sessions
            .get(sock.session.ix())
            .and_then(|s| s.as_ref())
            .is_none_or(|s| s.dead);
        // A stopping server neither starts nor goes on lingering: the client would keep the
        // exit waiting (up to `LINGER_TOTAL`) for a courtesy.
        let stopping = self.shared.shutdown.load(Ordering::Acquire);
        let now = self.now;
        let mut cancel = None;
        match &mut sock.kind {
            // Let go for a migration: cancel the send and the receive in flight (once), keep
            // the queue (it travels).
            Kind::Conn(c) if c.export.is_some() => {
                if !c.export_cancelled {
                    c.export_cancelled = true;
                    let recv = (c.recv == Recv::Armed).then_some(Op::Recv);
                    if recv.is_some() {
                        c.recv = Recv::Cancelling;
                    }
                    let ops = [c.send.cancel_op(), recv];
                    if ops.iter().any(Option::is_some) {
                        for op in ops.into_iter().flatten() {
                            self.cancel(slot, op);
                        }
                        return;
                    }
                }
            }
            Kind::Conn(c) => {
                let abort = c.abort_on_close(dead);
                if abort && !c.send.busy() {
                    c.sendq.clear();
                }
                if let Some(l) = c.lingering.as_mut() {
                    // Everything was flushed and the receive retired before it began: its
                    // readiness wait is all that can be in flight.
                    if abort || stopping {
                        l.end();
                    }
                    if !l.over(now) {
                        return; // lingering
                    }
                    if l.poll == Recv::Armed {
                        l.poll = Recv::Cancelling;
                        cancel = Some(Op::LingerPoll);
                    }
                } else if !c.send_drained() {
                    match c.send.cancel_op() {
                        Some(op) if abort => cancel = Some(op),
                        _ => return, // flushing
                    }
                } else if c.recv == Recv::Armed {
                    c.recv = Recv::Cancelling;
                    cancel = Some(Op::Recv);
                }
            }
            Kind::Listener(l) => {
                if l.accepting {
                    l.accepting = false;
                    cancel = Some(Op::Accept);
                }
            }
            Kind::Connecting { .. } => {
                if sock.inflight > 0 {
                    cancel = Some(Op::ConnectPoll);
                }
            }
        }
        if let Some(op) = cancel {
            self.cancel(slot, op);
            return;
        }
        if sock.inflight > 0 {
            return;
        }
        // Nothing in flight, everything flushed: a graceful close whose peer may still send
        // lingers first (`linger.rs`); an abort, a hand-off or a stopping server does not.
        let linger = !stopping
            && matches!(&sock.kind, Kind::Conn(c) if c.may_linger() && !c.abort_on_close(dead));
        if linger && self.start_lingering(slot) {
            return;
        }
        // Release the socket.
        let Some(sock) = self.sockets[slot].sock.take() else {
            return;
        };
        self.ckpt_closed(&sock);
        // A lingering connection's application was told `Closed` when lingering began, and
        // one that gave its connection budget to a new connection has none to give back.
        let (told, gave_slot) = match &sock.kind {
            Kind::Conn(c) => c
                .lingering
                .as_ref()
                .map_or((false, false), |l| (true, l.gave_slot)),
            _ => (false, false),
        };
        let si = sock.session;
        let handle = self.handle(slot);
        self.sockets[slot].generation = self.sockets[slot].generation.wrapping_add(1);
        self.free_sockets.push(slot);
        let was_conn = matches!(sock.kind, Kind::Conn(_) | Kind::Connecting { .. });
        let was_listener = matches!(sock.kind, Kind::Listener(_));
        // A socket whose connect failed never had a handle the application saw.
        let issued = !matches!(sock.kind, Kind::Connecting { .. });
        let Some(acct) = self.sessions[si].as_ref().map(|s| s.acct.clone()) else {
            return; // a socket outlives its session only by a bug: the fd is closed here
        };
        let uid = acct.uid;
        let grace = Instant::now() + self.shared.config.persist_grace;
        let shared = Arc::clone(&self.shared);
        let ledger = &shared.ledger;
        if let Kind::Conn(c) = sock.kind {
            self.refund(si, Res::HeldBytes, c.held.len() as u64);
            self.refund(si, Res::FileRanges, c.file_ranges);
            if c.export.is_some() {
                self.release_exported(sock.fd, c, uid);
            } else if let (Some(mut data), Some(origin), false) = (c.handoff, c.origin, c.failed) {
                data.extend_from_slice(&c.held);
                // What is handed off outlives the session: it is charged to its user.
                let bytes = data.len() as u64;
                let charged = ledger.take(&acct, Res::Handed, 1).and_then(|()| {
                    ledger
                        .take(&acct, Res::HandedBytes, bytes)
                        .inspect_err(|_| ledger.give(&acct, Res::Handed, 1))
                });
                match charged {
                    Ok(()) => {
                        tracing::debug!(%origin, held = data.len(), "connection handed off");
                        shared.registry.hand_over(
                            origin,
                            crate::persist::Handed {
                                fd: sock.fd,
                                uid,
                                acct,
                                data,
                                unsent: Default::default(),
                                eof: c.eof,
                                deadline: grace,
                            },
                        );
                        shared.wake_all();
                    }
                    Err(over) => tracing::warn!(
                        %origin,
                        uid,
                        "a handed-off connection is over {over} budget of hand-offs; closing it"
                    ),
                }
            }
        } else if let Kind::Listener(l) = sock.kind {
            self.persistent.remove(&slot);
            if let Some((r, _)) = l.route {
                self.routes[r as usize] = None;
            }
            // A parked listener keeps its user's claim on the port; a closed one gives it up.
            let parked = l.park
                && match ledger.take(&acct, Res::Parked, 1) {
                    Ok(()) => {
                        shared.registry.park(
                            l.addr,
                            Parked {
                                fd: sock.fd,
                                uid,
                                acct,
                                orphans: l.orphans,
                                deadline: grace,
                            },
                        );
                        true
                    }
                    Err(over) => {
                        tracing::warn!(
                            addr = %l.addr,
                            uid,
                            "a persistent listener is over {over} budget of parked listeners; \
                             closing it instead"
                        );
                        false
                    }
                };
            if !parked {
                shared.registry.release_port(l.addr, uid);
            }
        }
        if was_conn && !gave_slot {
            self.refund(si, Res::Conns, 1);
        }
        if was_listener {
            self.refund(si, Res::Listeners, 1);
        }
        if let Some(s) = self.session(si) {
            s.sockets.remove(&slot);
            if !s.dead && issued && !told {
                self.emit(si, Event::Closed { handle });
            }
        }
    }
}
