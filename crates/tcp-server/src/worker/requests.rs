//! Requests from applications: read from the ring, decoded, handles validated, dispatched.

use super::*;

/// An application's name as the server stores it (and `splitos status` prints it on an
/// operator's terminal): printable ASCII only, anything else (escape sequences, newlines,
/// non-UTF-8, other scripts) becomes `?`.
pub(super) fn printable_name(name: &[u8]) -> String {
    name.iter()
        .map(|&b| {
            if b == b' ' || b.is_ascii_graphic() {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

impl Worker {
    pub(super) fn serve_requests(&mut self, si: SessionIx) -> usize {
        let mut n = 0;
        while n < REQUESTS_PER_PASS {
            let mut msg = std::mem::take(&mut self.msg);
            msg.clear();
            let Some(s) = self.live_session(si) else {
                self.msg = msg;
                return n;
            };
            let departing = s.departing;
            let item = match s.chan.try_recv() {
                Ok(None) => {
                    self.msg = msg;
                    return n;
                }
                Ok(Some(Message::Inline(b))) => {
                    msg.extend_from_slice(b);
                    None
                }
                Ok(Some(Message::Buffer(rx))) => Some(rx),
                Err(e) => {
                    self.msg = msg;
                    if departing {
                        // Its last requests are served: the session ends now.
                        self.kill_session(si);
                    } else {
                        self.session_failed(si, &e);
                    }
                    return n;
                }
            };
            n += 1;
            if departing {
                let len = match &item {
                    None => msg.len(),
                    Some(rx) => splitos_m2m::layout::descriptor::BYTES + rx.meta().len(),
                };
                let footprint = splitos_m2m::layout::record::footprint(len as u64);
                let Some(s) = self.live_session(si) else {
                    self.msg = msg;
                    return n;
                };
                match s.drain_left.checked_sub(footprint) {
                    Some(left) => s.drain_left = left,
                    None => {
                        tracing::warn!(
                            worker = self.id,
                            session = si.0,
                            "application declared itself gone yet keeps writing requests; \
                             treating its channel as corrupt and dropping it"
                        );
                        self.msg = msg;
                        self.kill_session(si);
                        return n;
                    }
                }
            }
            match item {
                None => match Request::decode(&msg) {
                    Ok(req) => self.handle_request(si, req),
                    Err(e) => {
                        let op = msg.first().copied().unwrap_or(0);
                        self.violation(si, op, e.errno(), "undecodable request");
                    }
                },
                Some(rx) => match BufferMeta::decode(rx.meta()) {
                    Ok(BufferMeta::Send(h)) => self.send_buffer(si, h, rx),
                    _ => self.violation(
                        si,
                        op::META_SEND,
                        Errno::INVAL.raw_os_error(),
                        "buffer without a send header",
                    ),
                },
            }
            self.msg = msg;
        }
        n
    }

    /// Whether `h` may name a socket session `si` held: its own socket still closing, or one
    /// whose slot has moved on since (an older generation). A request on such a handle is a
    /// race with a close the application has not heard of yet; on any other it is a forgery.
    pub(super) fn maybe_stale(&self, si: SessionIx, h: Handle) -> bool {
        let Some(slot) = self.sockets.get(h.index() as usize) else {
            return false;
        };
        let age = slot.generation.wrapping_sub(h.generation());
        match &slot.sock {
            Some(sock) if age == 0 => sock.session == si,
            _ => age > 0 && age < 1 << 31,
        }
    }

    /// The socket `h` names, if it is open and belongs to session `si`.
    pub(super) fn owned(&mut self, si: SessionIx, h: Handle) -> Option<SlotIx> {
        let slot = self.sockets.get(h.index() as usize)?;
        let sock = slot.sock.as_ref()?;
        (slot.generation == h.generation() && sock.session == si && !sock.closing)
            .then_some(SlotIx(h.index()))
    }

    pub(super) fn handle(&self, slot: SlotIx) -> Handle {
        Handle::new(slot.0, self.sockets[slot].generation)
    }

    pub(super) fn conn_mut(&mut self, slot: SlotIx) -> Option<&mut Conn> {
        match &mut self.sockets.get_mut(slot.ix())?.sock.as_mut()?.kind {
            Kind::Conn(c) => Some(c),
            _ => None,
        }
    }

    pub(super) fn handle_request(&mut self, si: SessionIx, req: Request<'_>) {
        match req {
            Request::Hello { name, .. } => {
                if let Some(s) = self.live_session(si) {
                    s.name = printable_name(name);
                }
            }
            Request::Listen {
                req,
                addr,
                backlog,
                flags,
            } => self.listen(si, req, addr, backlog, flags),
            Request::Connect { req, addr } => self.connect(si, req, addr),
            Request::Send { handle, data } => self.send_inline(si, handle, data),
            Request::ShutdownWrite { handle } => match self.owned(si, handle) {
                Some(slot) => {
                    if let Some(c) = self.conn_mut(slot) {
                        c.shutdown_wanted = true;
                        c.written = true;
                        c.linger = true;
                    }
                    self.ckpt_stale(slot);
                    self.try_shutdown(slot);
                }
                None => self.bad_handle(si, handle),
            },
            Request::Close { handle } => match self.owned(si, handle) {
                Some(slot) => {
                    if let Some(c) = self.conn_mut(slot) {
                        c.linger = true;
                    }
                    self.begin_close(slot, false)
                }
                None => self.bad_handle(si, handle),
            },
            Request::SetOption { req, handle, opt } => {
                let Some(slot) = self.owned(si, handle) else {
                    self.fail_request(si, req, Errno::BADF.raw_os_error());
                    return;
                };
                let Some(sock) = self.sockets[slot].sock.as_ref() else {
                    return;
                };
                let r = match opt {
                    SockOpt::NoDelay(on) => sockopt::set_tcp_nodelay(&sock.fd, on),
                    SockOpt::KeepAlive(on) => sockopt::set_socket_keepalive(&sock.fd, on),
                };
                let ev = match r {
                    Ok(()) => Event::Done {
                        req,
                        handle,
                        local: NO_ADDR,
                        peer: NO_ADDR,
                    },
                    Err(e) => Event::Failed {
                        req,
                        errno: e.raw_os_error(),
                    },
                };
                self.emit(si, ev);
            }
            Request::Consumed { handle, bytes } => {
                let Some(slot) = self.owned(si, handle) else {
                    // A late acknowledgement of a connection that has just closed is normal;
                    // one for a handle this session never had is not (and costs no event,
                    // so it must count).
                    if !self.maybe_stale(si, handle) {
                        self.violation(
                            si,
                            op::CONSUMED,
                            Errno::BADF.raw_os_error(),
                            "consumed on a handle never issued to this session",
                        );
                    }
                    return;
                };
                let Some(c) = self.conn_mut(slot) else {
                    self.violation(
                        si,
                        op::CONSUMED,
                        Errno::NOTSOCK.raw_os_error(),
                        "consumed on a listener",
                    );
                    return;
                };
                if bytes as u64 > c.unacked {
                    c.unacked = 0;
                    self.violation(
                        si,
                        op::CONSUMED,
                        Errno::INVAL.raw_os_error(),
                        "consumed more than delivered",
                    );
                    return;
                }
                c.unacked -= bytes as u64;
                self.maybe_arm_recv(slot);
            }
            Request::SendFile {
                handle,
                file,
                offset,
                len,
            } => self.send_file(si, handle, file, offset, len),
            Request::ReleaseFile { file } => {
                if let Some(s) = self.live_session(si) {
                    s.refused_files.remove(&file);
                    if let Some(seg) = s.files.remove(&file) {
                        self.release_file(si, seg);
                    }
                }
            }
            Request::Pause { handle } => self.pause(si, handle),
            Request::Handoff { handle, data } => self.handoff(si, handle, data),
            Request::ServeFiles {
                req,
                listener,
                header_timeout_s,
                idle_timeout_s,
                socket,
            } => self.serve_files(si, req, listener, header_timeout_s, idle_timeout_s, socket),
            Request::ServeDirect { handle, received } => {
                self.serve_direct_again(si, handle, received)
            }
            Request::Answered { handle, received } => {
                let Some(slot) = self.owned(si, handle) else {
                    return;
                };
                let ok = match self.conn_mut(slot) {
                    Some(c) => {
                        let delivered = c.delivered;
                        c.recovery
                            .as_mut()
                            .is_none_or(|r| r.mark(received, delivered))
                    }
                    None => false,
                };
                if !ok {
                    self.violation(
                        si,
                        op::ANSWERED,
                        Errno::INVAL.raw_os_error(),
                        "answered mark behind the last or past what was delivered",
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_keep_printable_ascii_only() {
        assert_eq!(super::printable_name(b"web-1 (v2)"), "web-1 (v2)");
        assert_eq!(
            super::printable_name(b"\x1b[2Jx\ny\x00\xff\x7f"),
            "?[2Jx?y???"
        );
        assert_eq!(super::printable_name("caf\u{e9}".as_bytes()), "caf??");
    }
}
