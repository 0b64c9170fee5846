//! The worker's glue for the direct path (`crate::direct`): routes on listeners, answering
//! cached files without the application, giving connections to the application and back.

use super::*;

impl Worker {
    /// Puts a connection the direct path had deferred back on it, if the application has seen
    /// every byte delivered (else the request is moot: the newer bytes are on their way to it).
    pub(super) fn serve_direct_again(&mut self, si: SessionIx, handle: Handle, received: u64) {
        let Some(slot) = self.owned(si, handle) else {
            self.bad_handle(si, handle);
            return;
        };
        let now = self.now;
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let Kind::Conn(c) = &mut sock.kind else {
            self.violation(
                si,
                op::SERVE_DIRECT,
                Errno::NOTSOCK.raw_os_error(),
                "serve-direct on a listener",
            );
            return;
        };
        let idle = !sock.closing && c.may_return_to_direct(received);
        let Some((route, serial)) = c.route.filter(|_| idle) else {
            return;
        };
        if !matches!(self.routes.get(route as usize), Some(Some(r)) if r.serial == serial) {
            return;
        }
        c.direct = Some(Box::new(crate::direct::Direct {
            route,
            serial,
            buf: Vec::new(),
            last_active: now,
            blocked: false,
        }));
    }

    /// Installs a direct-path route on a listener (see `direct`): this worker connects to the
    /// file server at `socket`, which must belong to the application's user (so an
    /// application cannot make the server talk to someone else's service).
    pub(super) fn serve_files(
        &mut self,
        si: SessionIx,
        req: u32,
        listener: Handle,
        header_timeout_s: u32,
        idle_timeout_s: u32,
        socket: &[u8],
    ) {
        let fail = |w: &mut Worker, errno: Errno| {
            w.emit(
                si,
                Event::Failed {
                    req,
                    errno: errno.raw_os_error(),
                },
            )
        };
        let Some(slot) = self.owned(si, listener) else {
            return fail(self, Errno::BADF);
        };
        if !matches!(
            self.sockets[slot].sock.as_ref().map(|s| &s.kind),
            Some(Kind::Listener(_))
        ) {
            return fail(self, Errno::NOTSOCK);
        }
        let Some(uid) = self.live_session(si).map(|s| s.peer.uid) else {
            return;
        };
        use std::os::unix::ffi::OsStrExt;
        let path = std::path::Path::new(std::ffi::OsStr::from_bytes(socket));
        let owner = match rustix::fs::stat(path) {
            Ok(st) => st.st_uid,
            Err(e) => return fail(self, e),
        };
        if owner != uid && owner != rustix::process::geteuid().as_raw() {
            tracing::warn!(session = si.0, path = %path.display(), "ServeFiles refused: the socket belongs to another user");
            return fail(self, Errno::ACCESS);
        }
        let files = match FileClient::connect(path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(session = si.0, path = %path.display(), "ServeFiles: cannot reach the file server: {e}");
                return fail(self, Errno::CONNREFUSED);
            }
        };
        self.route_serial += 1;
        let route = crate::direct::Route {
            serial: self.route_serial,
            files,
            header_timeout: Duration::from_secs(header_timeout_s.max(1) as u64),
            idle_timeout: Duration::from_secs(idle_timeout_s.max(1) as u64),
        };
        let idx = match self.routes.iter().position(|r| r.is_none()) {
            Some(i) => {
                self.routes[i] = Some(route);
                i
            }
            None => {
                self.routes.push(Some(route));
                self.routes.len() - 1
            }
        } as u32;
        if let Some(Socket {
            kind: Kind::Listener(l),
            ..
        }) = self.sockets[slot].sock.as_mut()
        {
            if let Some((old, _)) = l.route.replace((idx, self.route_serial)) {
                self.routes[old as usize] = None;
            }
        }
        tracing::info!(session = si.0, path = %path.display(), "direct path installed");
        self.emit(
            si,
            Event::Done {
                req,
                handle: listener,
                local: NO_ADDR,
                peer: NO_ADDR,
            },
        );
    }

    /// Runs the direct path on a connection's buffered bytes (see `direct::serve`).
    pub(super) fn serve_direct(&mut self, slot: SlotIx) {
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let si = sock.session;
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        let Some(d) = c.direct.as_mut() else {
            return;
        };
        let serial = d.serial;
        let Some(route) = self
            .routes
            .get_mut(d.route as usize)
            .and_then(|r| r.as_mut())
            .filter(|r| r.serial == serial)
        else {
            // The route went with its listener: the application answers from now on.
            let data = std::mem::take(&mut d.buf);
            c.direct = None;
            self.defer(slot, si, data);
            return;
        };
        let sendq = &mut c.sendq;
        let answered = &mut self.direct_responses;
        let outcome = crate::direct::serve(route, d, sendq.len(), answered, |part| match part {
            // Never an empty chunk: it would never leave the queue (see `send_inline`).
            Part::Bytes(data) if data.is_empty() => {}
            Part::Bytes(data) => sendq.push_back(Chunk::Direct { data, off: 0 }),
            Part::File(view, off, len) => {
                let pieces = view.pieces(off, len).unwrap_or_default();
                for (seg, within, n) in pieces.into_iter().filter(|p| p.2 > 0) {
                    sendq.push_back(Chunk::File {
                        seg,
                        off: within as usize,
                        end: (within + n) as usize,
                    });
                }
            }
        });
        match outcome {
            crate::direct::Outcome::More | crate::direct::Outcome::Blocked => {}
            crate::direct::Outcome::Close => {
                c.linger = true;
                c.direct = None;
                self.want_send(slot);
                self.begin_close(slot, false);
                return;
            }
            crate::direct::Outcome::Defer(data) => {
                c.direct = None;
                self.defer(slot, si, data);
            }
        }
        self.want_send(slot);
    }

    /// Applies the routes' timeouts to direct connections: 408 for a head that does not
    /// complete, close for a connection idle (nothing received, nothing to send) too long.
    pub(super) fn sweep_direct(&mut self, now: Instant) {
        let mut expired = Vec::new();
        for (slot, ss) in self.sockets.iter().enumerate() {
            let Some(Socket {
                kind: Kind::Conn(c),
                closing: false,
                ..
            }) = &ss.sock
            else {
                continue;
            };
            let Some(d) = &c.direct else { continue };
            let Some(r) = self.routes.get(d.route as usize).and_then(|r| r.as_ref()) else {
                continue;
            };
            let quiet = now.saturating_duration_since(d.last_active);
            if !d.buf.is_empty() && quiet > r.header_timeout {
                expired.push((SlotIx(slot as u32), true));
            } else if d.buf.is_empty() && quiet > r.idle_timeout && c.send_drained() {
                expired.push((SlotIx(slot as u32), false));
            }
        }
        for (slot, late_head) in expired {
            if let Some(c) = self.conn_mut(slot) {
                let data = crate::direct::timeout_response();
                if late_head && !data.is_empty() {
                    c.sendq.push_back(Chunk::Direct { data, off: 0 });
                }
                c.direct = None;
                c.linger = true;
            }
            self.want_send(slot);
            self.begin_close(slot, false);
        }
    }

    /// Turns a direct connection over to its application, starting with `data`.
    pub(super) fn defer(&mut self, slot: SlotIx, si: SessionIx, data: Vec<u8>) {
        let handle = self.handle(slot);
        if let Some(c) = self.conn_mut(slot) {
            c.unacked += data.len() as u64;
            c.delivered += data.len() as u64;
        }
        for part in data.chunks(INLINE_DATA_MAX) {
            self.emit(si, Event::Data { handle, data: part });
        }
    }
}
