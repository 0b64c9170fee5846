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
            if !cqe.more {
                self.op_done(tag);
            }
            match tag.op {
                Op::Accept => self.accept_completion(tag.socket, cqe),
                Op::Recv => self.received(tag.socket, cqe),
                Op::Send => self.sent(tag.socket, cqe.result),
                // Readiness sent nothing; an error (a cancel) fails the connection.
                Op::SendPoll => self.sent(tag.socket, cqe.result.min(0)),
                Op::ConnectPoll => {
                    self.connect_done(tag.socket);
                    self.try_finish_close(tag.socket);
                }
                Op::Cancel => {
                    if tag.socket != SESSION_LEVEL {
                        self.try_finish_close(tag.socket);
                    }
                }
                Op::SessionPoll => {
                    if !cqe.more && self.live_session(tag.session).is_some() {
                        self.rearm_session_poll(tag.session);
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
        match tag.op {
            Op::Wake => {}
            Op::SessionPoll => {
                if let Some(s) = self.session(tag.session) {
                    s.inflight -= 1;
                }
            }
            Op::Cancel if tag.socket == SESSION_LEVEL => {
                if let Some(s) = self.session(tag.session) {
                    s.inflight -= 1;
                }
            }
            Op::Accept | Op::Recv | Op::Send | Op::SendPoll | Op::ConnectPoll | Op::Cancel => {
                if let Some(sock) = self
                    .sockets
                    .get_mut(tag.socket as usize)
                    .and_then(|s| s.sock.as_mut())
                {
                    sock.inflight -= 1;
                }
            }
        }
    }

    pub(super) fn rearm_session_poll(&mut self, si: u32) {
        let tag = Tag {
            op: Op::SessionPoll,
            session: si,
            socket: 0,
        };
        let Some(s) = self.sessions.get_mut(si as usize).and_then(|s| s.as_mut()) else {
            return;
        };
        if self.ring.poll_readable_multi(s.chan.wait_fd(), tag).is_ok() {
            s.inflight += 1;
        }
    }
}
