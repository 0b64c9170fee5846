//! Completions: what each finished io_uring operation means for its socket or session.

use super::*;

impl Worker {
    pub(super) fn reap(&mut self) -> usize {
        let mut cqes = std::mem::take(&mut self.completions);
        cqes.clear();
        self.ring.reap(&mut cqes, 4096);
        let n = cqes.len();
        for cqe in &cqes {
            let Some(tag) = cqe.tag else { continue };
            let (si, slot) = (SessionIx(tag.session), SlotIx(tag.socket));
            if !cqe.more {
                self.op_done(tag);
            }
            match tag.op {
                Op::Accept => self.accept_completion(slot, cqe),
                Op::Recv => self.received(slot, cqe),
                Op::Send => self.sent(slot, cqe.result),
                // Readiness sent nothing; an error (a cancel) fails the connection.
                Op::SendPoll => self.sent(slot, cqe.result.min(0)),
                Op::LingerPoll => self.lingered(slot, cqe.result),
                Op::ConnectPoll => {
                    self.connect_done(slot);
                    self.try_finish_close(slot);
                }
                Op::Cancel => {
                    if slot != SESSION_LEVEL {
                        self.try_finish_close(slot);
                    }
                }
                Op::SessionPoll => {
                    if !cqe.more && self.live_session(si).is_some() {
                        self.rearm_session_poll(si);
                    }
                }
                Op::Wake => {
                    crate::drain_eventfd(&self.wake);
                    if !cqe.more {
                        self.wake_armed = false;
                    }
                }
            }
        }
        self.completions = cqes;
        n
    }

    /// Retires an operation the kernel has finished with (a single-shot one's completion, a
    /// multishot one's last): the count that keeps its socket's or session's memory alive
    /// (invariants 3 and 4) goes down before anything reacts to the completion.
    fn op_done(&mut self, tag: Tag) {
        let (si, slot) = (SessionIx(tag.session), SlotIx(tag.socket));
        match tag.op {
            Op::Wake => {}
            Op::SessionPoll => {
                if let Some(s) = self.session(si) {
                    s.inflight -= 1;
                }
            }
            Op::Cancel if slot == SESSION_LEVEL => {
                if let Some(s) = self.session(si) {
                    s.inflight -= 1;
                }
            }
            Op::Accept
            | Op::Recv
            | Op::Send
            | Op::SendPoll
            | Op::LingerPoll
            | Op::ConnectPoll
            | Op::Cancel => {
                if let Some(sock) = self
                    .sockets
                    .get_mut(slot.ix())
                    .and_then(|s| s.sock.as_mut())
                {
                    sock.inflight -= 1;
                }
            }
        }
    }

    pub(super) fn rearm_session_poll(&mut self, si: SessionIx) {
        let tag = Tag {
            op: Op::SessionPoll,
            session: si.0,
            socket: 0,
        };
        let Some(s) = self.sessions.get_mut(si.ix()).and_then(|s| s.as_mut()) else {
            return;
        };
        if self.ring.poll_readable_multi(s.chan.wait_fd(), tag).is_ok() {
            s.inflight += 1;
        }
    }
}
