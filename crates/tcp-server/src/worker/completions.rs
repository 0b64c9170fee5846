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
            match tag.op {
                Op::Accept => self.accept_completion(tag.socket, cqe),
                Op::Recv => self.received(tag.socket, cqe),
                Op::Send => {
                    if let Some(sock) = self
                        .sockets
                        .get_mut(tag.socket as usize)
                        .and_then(|s| s.sock.as_mut())
                    {
                        sock.inflight -= 1;
                    }
                    self.sent(tag.socket, cqe.result);
                }
                Op::SendPoll => {
                    if let Some(sock) = self
                        .sockets
                        .get_mut(tag.socket as usize)
                        .and_then(|s| s.sock.as_mut())
                    {
                        sock.inflight -= 1;
                    }
                    // Readiness sent nothing; an error (a cancel) fails the connection.
                    self.sent(tag.socket, cqe.result.min(0));
                }
                Op::ConnectPoll => {
                    if let Some(sock) = self
                        .sockets
                        .get_mut(tag.socket as usize)
                        .and_then(|s| s.sock.as_mut())
                    {
                        sock.inflight -= 1;
                    }
                    self.connect_done(tag.socket);
                    self.try_finish_close(tag.socket);
                }
                Op::Cancel => {
                    if tag.socket == u32::MAX {
                        if let Some(s) = self.session(tag.session) {
                            s.inflight -= 1;
                        }
                    } else if let Some(sock) = self
                        .sockets
                        .get_mut(tag.socket as usize)
                        .and_then(|s| s.sock.as_mut())
                    {
                        sock.inflight -= 1;
                        self.try_finish_close(tag.socket);
                    }
                }
                Op::SessionPoll => {
                    if !cqe.more {
                        let rearm = match self.session(tag.session) {
                            Some(s) => {
                                s.inflight -= 1;
                                !s.dead
                            }
                            None => false,
                        };
                        if rearm {
                            self.rearm_session_poll(tag.session);
                        }
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
