//! Hand-off: pausing a connection and passing it, with its unprocessed bytes, to the next
//! owner of its persistent listener.

use super::*;

impl Worker {
    /// Stops delivering a connection's data to its application; `Paused` marks the end of what
    /// was delivered, later bytes collect in `held` (at most `recv::HELD_MAX`: the application
    /// is never given them, so no `Consumed` makes room for more).
    pub(super) fn pause(&mut self, si: SessionIx, handle: Handle) {
        let Some(slot) = self.owned(si, handle) else {
            self.bad_handle(si, handle);
            return;
        };
        let Some(c) = self.conn_mut(slot) else {
            self.violation(
                si,
                op::PAUSE,
                Errno::NOTSOCK.raw_os_error(),
                "pause of a non-connection",
            );
            return;
        };
        c.paused = true;
        // Bytes the direct path had not answered yet travel with the connection (and count
        // as held from now on).
        let mut moved = 0;
        if let Some(d) = c.direct.take() {
            let mut bytes = d.conn.pending;
            moved = bytes.len() as u64;
            bytes.append(&mut c.held);
            c.held = bytes;
        }
        self.charge_arrived(si, Res::HeldBytes, moved);
        self.emit(si, Event::Paused { handle });
    }

    /// Hands a paused connection to the next owner of its persistent listener's address. It is
    /// released like a close (queued bytes flushed, receive cancelled, nothing in flight), but
    /// the fd goes to the registry instead of being closed.
    pub(super) fn handoff(&mut self, si: SessionIx, handle: Handle, data: &[u8]) {
        let Some(slot) = self.owned(si, handle) else {
            self.bad_handle(si, handle);
            return;
        };
        let Some(acct) = self.live_session(si).map(|s| s.acct.clone()) else {
            return;
        };
        // What is parked or handed off outlives the session and is charged to its user when
        // it is released; a hand-off that could not be is refused now (EMFILE, ENOBUFS), and
        // the socket stays this session's.
        let refuse = |w: &mut Worker, r: Res, over| {
            let errno = w.over_budget(si, r, over);
            w.emit(si, Event::Error { handle, errno });
        };
        // A persistent listener handed off is parked for the next instance, as if its session
        // had died, while this session finishes with its connections.
        let persistent_listener = matches!(
            self.sockets[slot].sock.as_ref().map(|s| &s.kind),
            Some(Kind::Listener(l)) if l.flags & listen_flags::PERSISTENT != 0
        );
        if persistent_listener && data.is_empty() {
            if let Err(over) = self.shared.ledger.fits(&acct, Res::Parked, 1) {
                return refuse(self, Res::Parked, over);
            }
            if let Some(Socket {
                kind: Kind::Listener(l),
                ..
            }) = self.sockets[slot].sock.as_mut()
            {
                l.park = true;
            }
            self.begin_close(slot, false);
            return;
        }
        let held = match self.conn_mut(slot) {
            Some(c) if c.paused && c.origin.is_some() && !c.failed => Some(c.held.len()),
            _ => None,
        };
        if let Some(held) = held {
            let bytes = (held + data.len()) as u64;
            let fits = self
                .shared
                .ledger
                .fits(&acct, Res::Handed, 1)
                .map_err(|o| (Res::Handed, o));
            let fits = fits.and_then(|()| {
                self.shared
                    .ledger
                    .fits(&acct, Res::HandedBytes, bytes)
                    .map_err(|o| (Res::HandedBytes, o))
            });
            if let Err((r, over)) = fits {
                return refuse(self, r, over);
            }
        }
        let ok = match self.conn_mut(slot) {
            Some(c) if held.is_some() => {
                c.handoff = Some(data.to_vec());
                true
            }
            _ => false,
        };
        if !ok {
            self.violation(
                si,
                op::HANDOFF,
                Errno::INVAL.raw_os_error(),
                "hand-off of a connection that is not paused, failed, or not from a persistent listener",
            );
            return;
        }
        self.begin_close(slot, false);
    }

    /// Adopts connections other instances handed off, for every live persistent listener here.
    /// Only when there may be something new to find: a hand-off since the last look
    /// (`Registry::handed_version`) or a new persistent listener here; and then only the
    /// persistent listeners are looked at (`Worker::persistent`), not every socket (which, with
    /// a hand-off waiting out its grace period, every pass used to do).
    pub(super) fn adopt_handed(&mut self) -> usize {
        let version = self.shared.registry.handed_version();
        if version == self.handed_seen && !self.persistent_added {
            return 0;
        }
        self.handed_seen = version;
        self.persistent_added = false;
        let mut targets = Vec::new();
        for &slot in &self.persistent {
            let Some(Socket {
                session,
                kind: Kind::Listener(l),
                closing: false,
                ..
            }) = self.sockets[slot].sock.as_ref()
            else {
                continue;
            };
            let Some(s) = self.sessions[*session].as_ref().filter(|s| !s.dead) else {
                continue;
            };
            targets.push((*session, slot, l.addr, s.peer.uid));
        }
        let mut n = 0;
        for (si, lslot, addr, uid) in targets {
            for h in self
                .shared
                .registry
                .take_handed(addr, uid, &self.shared.ledger)
            {
                n += 1;
                self.adopt(si, lslot, h);
            }
        }
        n
    }

    pub(super) fn adopt(&mut self, si: SessionIx, listener: SlotIx, h: crate::persist::Handed) {
        let Some(slot) = self.accepted(si, listener, h.fd) else {
            return;
        };
        let handle = self.handle(slot);
        tracing::debug!(
            session = si.0,
            held = h.data.len(),
            "adopted a handed-off connection"
        );
        let mut data = h.data;
        let now = self.now;
        if let Some(c) = self.conn_mut(slot) {
            c.eof = h.eof;
            // Owed to the client before anything the new owner writes (a response that was
            // on its way when the connection moved here). Empty chunks are never queued.
            for ch in h.unsent.into_chunks().rev() {
                if ch.remaining() > 0 {
                    c.sendq.push_front(ch);
                }
            }
            if let Some(d) = c.direct.as_mut() {
                // The listener's route is installed already: the handed bytes go through the
                // direct path like any received ones, so responses stay in order.
                let data = std::mem::take(&mut data);
                d.conn
                    .received(data.len(), now, |dst| dst.copy_from_slice(&data));
            } else {
                c.delivering(data.len(), |dst| dst.copy_from_slice(&data));
            }
        }
        self.want_send(slot);
        self.serve_direct(slot);
        for part in data.chunks(INLINE_DATA_MAX) {
            self.emit(si, Event::Data { handle, data: part });
        }
        if h.eof {
            self.emit(si, Event::Eof { handle });
        }
    }
}
