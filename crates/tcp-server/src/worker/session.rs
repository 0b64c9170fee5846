//! Sessions: one per application channel, from the handshake until the kernel holds nothing
//! of theirs.

use super::*;

impl Worker {
    pub(super) fn take_new_sessions(&mut self) -> usize {
        let mut n = 0;
        while let Ok(ns) = self.inbox.try_recv() {
            n += 1;
            if let Err(e) = self.add_session(ns) {
                tracing::warn!(worker = self.id, "could not set up a session: {e}");
            }
        }
        n
    }

    pub(super) fn add_session(&mut self, ns: NewSession) -> std::io::Result<()> {
        let si = match self.free_sessions.pop() {
            Some(si) => si,
            None => {
                if self.sessions.len() >= crate::stats::SESSIONS_PER_WORKER {
                    return Err(std::io::Error::other("worker has its maximum of sessions"));
                }
                self.sessions.push(None);
                SessionIx(self.sessions.len() as u32 - 1)
            }
        };
        let mut chan = ns.chan;
        chan.set_wait_policy(WaitPolicy::Poll);
        let buf_count = self.shared.config.recv_buffers;
        let bufs = BufRing::new(si.0 as u16, buf_count)?;
        if let Err(e) = self.ring.register_buf_ring(&bufs) {
            self.free_sessions.push(si);
            return Err(e);
        }
        let tag = Tag {
            op: Op::SessionPoll,
            session: si.0,
            socket: 0,
        };
        self.ring.poll_readable_multi(chan.wait_fd(), tag)?;
        tracing::info!(
            worker = self.id,
            session = si.0,
            pid = ns.peer.pid,
            uid = ns.peer.uid,
            "session started"
        );
        self.shared.sessions.fetch_add(1, Ordering::AcqRel);
        self.sessions[si] = Some(Session {
            chan,
            peer: ns.peer,
            name: String::new(),
            bufs,
            provided: (0..buf_count).map(|_| None).collect(),
            free_bids: (0..buf_count as u16).rev().collect(),
            outbox: VecDeque::new(),
            sockets: HashSet::new(),
            files: HashMap::new(),
            inflight: 1,
            dead: false,
            departing: false,
            dead_since: None,
            violations: 0,
            opening_route: false,
            conns: 0,
            listeners: 0,
            bytes_in: 0,
            bytes_out: 0,
        });
        self.refill(si);
        Ok(())
    }

    /// Every session index this worker has (live, dead or free), for passes over all of them.
    pub(super) fn session_ixs(&self) -> impl Iterator<Item = SessionIx> + use<> {
        (0..self.sessions.len() as u32).map(SessionIx)
    }

    pub(super) fn session(&mut self, si: SessionIx) -> Option<&mut Session> {
        self.sessions.get_mut(si.ix())?.as_mut()
    }

    pub(super) fn live_session(&mut self, si: SessionIx) -> Option<&mut Session> {
        self.session(si).filter(|s| !s.dead)
    }

    pub(super) fn session_failed(&mut self, si: SessionIx, e: &M2mError) {
        let worker = self.id;
        let Some(s) = self.live_session(si) else {
            return;
        };
        if s.departing {
            return; // the call serving its last requests ends the session
        }
        match e {
            M2mError::PeerGone => {
                tracing::info!(worker, session = si.0, "application left");
                // What it queued before it went still counts: an application that writes a
                // reply, closes and exits expects the reply delivered, even when we notice
                // the exit first (while sending it an event). Bounded: a departed peer adds
                // nothing, so at most a ring's worth of requests is left.
                s.departing = true;
                s.outbox.clear();
                while self.serve_requests(si) > 0 {}
            }
            other => tracing::warn!(worker, session = si.0, "dropping session: {other}"),
        }
        self.kill_session(si);
    }

    /// Ends a session: persistent listeners are parked, every other socket is closed. Memory
    /// goes once the kernel has finished with it (see `collect_sessions`).
    pub(super) fn kill_session(&mut self, si: SessionIx) {
        let Some(s) = self.session(si) else { return };
        if s.dead {
            return;
        }
        s.dead = true;
        s.dead_since = Some(Instant::now());
        s.outbox.clear();
        let socks: Vec<SlotIx> = s.sockets.iter().copied().collect();
        let tag = Tag {
            op: Op::Cancel,
            session: si.0,
            socket: SESSION_LEVEL.0,
        };
        let poll = Tag {
            op: Op::SessionPoll,
            session: si.0,
            socket: 0,
        };
        if self.ring.cancel(poll, tag).is_ok() {
            if let Some(s) = self.session(si) {
                s.inflight += 1;
            }
        }
        // Parking is for an application's restart, not for the server's own exit.
        let restart = !self.shared.shutdown.load(Ordering::Acquire);
        for slot in socks {
            if let Some(sock) = self.sockets[slot].sock.as_mut() {
                match &mut sock.kind {
                    Kind::Listener(l) => {
                        l.park = l.flags & listen_flags::PERSISTENT != 0 && restart;
                    }
                    // A connection the application owes nothing (untouched, answered by the
                    // direct path, or at a request boundary on a recoverable listener) goes on
                    // to its successor with the bytes still to answer, as a parked listener's
                    // backlog would: a crash then loses nothing that could be saved. Its
                    // queued responses are complete, so they flush first.
                    Kind::Conn(c) if restart && !sock.closing => {
                        if let Some(bytes) = c.successor_bytes() {
                            c.paused = true;
                            c.direct = None;
                            c.handoff = Some(bytes);
                        }
                    }
                    _ => {}
                }
            }
            self.begin_close(slot, true);
        }
    }

    /// Frees dead sessions the kernel no longer references.
    pub(super) fn collect_sessions(&mut self) {
        for si in 0..self.sessions.len() {
            let done = matches!(&self.sessions[si], Some(s) if s.dead && s.inflight == 0 && s.sockets.is_empty());
            if !done {
                continue;
            }
            if let Some(s) = self.sessions[si].take() {
                if let Err(e) = self.ring.unregister_buf_ring(s.bufs.group()) {
                    // The ring memory must outlive the registration: leak it rather than risk
                    // the kernel writing into freed memory.
                    tracing::error!("cannot unregister a buffer ring: {e}; leaking it");
                    std::mem::forget(s.bufs);
                    std::mem::forget(s.provided);
                }
                self.free_sessions.push(SessionIx(si as u32));
                self.shared.sessions.fetch_sub(1, Ordering::AcqRel);
                tracing::debug!(worker = self.id, session = si, "session memory released");
            }
        }
    }
}
