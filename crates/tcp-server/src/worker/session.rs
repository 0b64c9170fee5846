//! Sessions: one per application channel, from the handshake until the kernel holds nothing
//! of theirs.

use super::*;

impl Worker {
    pub(super) fn take_new_sessions(&mut self) -> usize {
        let mut n = 0;
        while let Ok(ns) = self.inbox.try_recv() {
            n += 1;
            let acct = ns.acct.clone();
            if let Err(e) = self.add_session(ns) {
                tracing::warn!(worker = self.id, "could not set up a session: {e}");
                self.shared.ledger.give(&acct, Res::Sessions, 1);
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
        // Every way out below either gives the slot back or, if the kernel may still hold
        // the slot's buffer group, retires it (see `retire_slot`).
        let bufs = match BufRing::new(si.0 as u16, buf_count) {
            Ok(b) => b,
            Err(e) => {
                self.free_sessions.push(si);
                return Err(e);
            }
        };
        if let Err(e) = self.ring.register_buf_ring(&bufs) {
            self.free_sessions.push(si);
            return Err(e);
        }
        let tag = Tag {
            op: Op::SessionPoll,
            session: si.0,
            socket: 0,
        };
        if let Err(e) = self.ring.poll_readable_multi(chan.wait_fd(), tag) {
            match self.ring.unregister_buf_ring(bufs.group()) {
                Ok(()) => self.free_sessions.push(si),
                Err(ue) => self.retire_slot(si, bufs, &ue),
            }
            return Err(e);
        }
        tracing::info!(
            worker = self.id,
            session = si.0,
            pid = ns.peer.pid,
            uid = ns.peer.uid,
            "session started"
        );
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
            refused_files: HashMap::new(),
            releasing: Vec::new(),
            inflight: 1,
            dead: false,
            departing: false,
            drain_left: 0,
            dead_since: None,
            violations: 0,
            opening_route: false,
            acct: ns.acct,
            used: Default::default(),
            bytes_in: 0,
            bytes_out: 0,
        });
        self.refill(si);
        Ok(())
    }

    /// Takes session slot `si` out of use for good: its buffer ring could not be unregistered,
    /// so the kernel still holds the slot's buffer group (a new registration under it would
    /// fail) and may still write through the ring. Its memory is leaked rather than freed
    /// under the kernel; the slot is never handed out again.
    fn retire_slot(&mut self, si: SessionIx, bufs: BufRing, e: &std::io::Error) {
        tracing::error!(
            worker = self.id,
            session = si.0,
            "cannot unregister a buffer ring: {e}; leaking it and retiring its slot"
        );
        std::mem::forget(bufs);
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
                // the exit first (while sending it an event). So the session stays, and the
                // passes go on serving its requests (`REQUESTS_PER_PASS` at a time, like
                // everyone's) until its ring is empty; then `serve_requests` ends it. A
                // departed peer adds nothing, so that is at most a ring's worth: a "departed"
                // peer that writes more is alive and lying (`drain_left`).
                s.departing = true;
                s.drain_left = s.chan.ring_bytes();
                self.clear_outbox(si);
                return;
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
        let socks: Vec<SlotIx> = s.sockets.iter().copied().collect();
        self.clear_outbox(si);
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
                let si = SessionIx(si as u32);
                self.refund_all(&s);
                match self.ring.unregister_buf_ring(s.bufs.group()) {
                    Ok(()) => self.free_sessions.push(si),
                    Err(e) => {
                        // The buffers must outlive the registration too: the kernel may still
                        // pick one for a receive.
                        std::mem::forget(s.provided);
                        self.retire_slot(si, s.bufs, &e);
                    }
                }
                tracing::debug!(worker = self.id, session = si.0, "session memory released");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ServerConfig, Shared};
    use splitos_m2m::{ChannelConfig, Listener, ListenerConfig};

    /// A worker on this thread (no loop running) and a way to give it new sessions.
    struct Rig {
        worker: Worker,
        listener: Listener,
        apps: Vec<Channel>,
        path: std::path::PathBuf,
    }

    impl Rig {
        fn new(tag: &str) -> Rig {
            let path = std::env::temp_dir().join(format!(
                "splitos-worker-test-{}-{tag}.sock",
                std::process::id()
            ));
            let config = ServerConfig {
                socket: path.clone(),
                recv_buffers: 4,
                ..ServerConfig::default()
            };
            let shared = Arc::new(Shared::new(config, None));
            let (_tx, rx) = std::sync::mpsc::channel();
            let wake = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
            let worker = Worker::new(0, shared, rx, wake).unwrap();
            let listener = Listener::bind(&path, ListenerConfig::default()).unwrap();
            Rig {
                worker,
                listener,
                apps: Vec::new(),
                path,
            }
        }

        fn new_session(&mut self) -> NewSession {
            let path = self.path.clone();
            let app = std::thread::spawn(move || {
                Channel::connect(
                    &path,
                    ChannelConfig {
                        ring_bytes: 16 << 10,
                        buf_size: 4096,
                        buf_count: 4,
                        ..ChannelConfig::default()
                    },
                )
                .unwrap()
            });
            let incoming = self.listener.accept().unwrap();
            let peer = incoming.peer();
            let chan = incoming.establish().unwrap();
            self.apps.push(app.join().unwrap());
            let acct = self.worker.shared.ledger.account(peer.uid);
            NewSession { chan, peer, acct }
        }

        /// Ends session `si` and runs the worker until its memory is released.
        fn end_session(&mut self, si: SessionIx) {
            self.worker.kill_session(si);
            for _ in 0..200 {
                let _ = self.worker.ring.submit_and_wait(Duration::from_millis(5));
                self.worker.reap();
                self.worker.collect_sessions();
                if self.worker.sessions[si].is_none() {
                    return;
                }
            }
            panic!("session {si} never released");
        }

        fn live(&self) -> Vec<usize> {
            (0..self.worker.sessions.len())
                .filter(|&i| self.worker.sessions[i].is_some())
                .collect()
        }
    }

    /// A25: when arming the session's poll failed, the buffer ring stayed registered and the
    /// slot was lost; the next session took a new slot, and the group leaked for good.
    #[test]
    fn a_session_that_fails_to_start_gives_back_its_slot_and_buffer_group() {
        let mut rig = Rig::new("a25-poll");
        rig.worker.ring.faults.poll_readable = true;
        let ns = rig.new_session();
        assert!(rig.worker.add_session(ns).is_err());
        let ns = rig.new_session();
        rig.worker.add_session(ns).expect("the next session starts");
        assert_eq!(
            rig.live(),
            vec![0],
            "the failed session's slot was not reused"
        );
        assert_eq!(rig.worker.sessions.len(), 1, "a slot leaked");
    }

    /// A25: when unregistering a dead session's buffer ring failed, its slot went back to the
    /// free list while the kernel still had its group, so every later session given that slot
    /// failed (EEXIST). Such a slot is retired instead.
    #[test]
    fn a_slot_whose_buffer_group_could_not_be_unregistered_is_not_reused() {
        let mut rig = Rig::new("a25-unregister");
        let ns = rig.new_session();
        rig.worker.add_session(ns).unwrap();
        rig.worker.ring.faults.unregister_buf_ring = true;
        rig.end_session(SessionIx(0));
        for _ in 0..3 {
            let ns = rig.new_session();
            rig.worker
                .add_session(ns)
                .expect("a new session starts after a failed unregister");
        }
        assert!(
            !rig.live().contains(&0),
            "the slot with the leaked group was reused"
        );
    }
}
