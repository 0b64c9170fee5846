//! The worker's glue for the direct path (`crate::direct`): routes opened beside the worker
//! and installed on listeners, connections answered by their route without the application,
//! deferred to the application and given back, and the routes' timeouts.

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
        c.direct = Some(Box::new(crate::direct::Direct::new(route, serial, now)));
    }

    /// Starts installing a direct-path route on a listener (see `crate::direct`): the server's
    /// [`DirectPath`] opens it on a thread of its own (opening may block on another service,
    /// and a worker must never wait), and [`Worker::take_opened_routes`] installs it.
    pub(super) fn serve_files(
        &mut self,
        si: SessionIx,
        req: u32,
        listener: Handle,
        header_timeout_s: u32,
        idle_timeout_s: u32,
        socket: &[u8],
    ) {
        let fail = |w: &mut Worker, errno: Errno| w.fail_request(si, req, errno.raw_os_error());
        let Some(slot) = self.owned(si, listener) else {
            return fail(self, Errno::BADF);
        };
        if !matches!(
            self.sockets[slot].sock.as_ref().map(|s| &s.kind),
            Some(Kind::Listener(_))
        ) {
            return fail(self, Errno::NOTSOCK);
        }
        let Some(path) = self.shared.config.direct.clone() else {
            return fail(self, Errno::OPNOTSUPP);
        };
        let Some(s) = self.live_session(si) else {
            return;
        };
        if s.opening_route {
            // One at a time per session: each costs a thread while it connects.
            return fail(self, Errno::BUSY);
        }
        s.opening_route = true;
        let request = RouteRequest {
            source: socket.to_vec(),
            peer: s.peer,
            request_timeout: Duration::from_secs(header_timeout_s.max(1) as u64),
            idle_timeout: Duration::from_secs(idle_timeout_s.max(1) as u64),
        };
        let done = self.opened_tx.clone();
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("splitos-route".into())
            .spawn(move || {
                let route = path.open(&request);
                let _ = done.send(OpenedRoute {
                    session: si,
                    req,
                    listener,
                    route,
                });
                shared.wake_all();
            });
        if let Err(e) = spawned {
            tracing::warn!(session = si.0, "cannot start a thread to open a route: {e}");
            if let Some(s) = self.live_session(si) {
                s.opening_route = false;
            }
            fail(self, Errno::AGAIN);
        }
    }

    /// Installs the routes opened since the last pass, or reports why one could not be.
    pub(super) fn take_opened_routes(&mut self) -> usize {
        let mut n = 0;
        while let Ok(opened) = self.opened_rx.try_recv() {
            n += 1;
            let OpenedRoute {
                session: si,
                req,
                listener,
                route,
            } = opened;
            let Some(s) = self.live_session(si) else {
                continue; // the application went meanwhile; the route goes with it
            };
            s.opening_route = false;
            let route = match route {
                Ok(r) => r,
                Err(errno) => {
                    tracing::info!(session = si.0, "ServeFiles refused: {errno}");
                    self.fail_request(si, req, errno.raw_os_error());
                    continue;
                }
            };
            // The listener may have closed (and its slot been reused) while the route opened.
            let Some(slot) = self.owned(si, listener) else {
                self.bad_handle(si, listener);
                continue;
            };
            self.route_serial += 1;
            let serial = self.route_serial;
            let route = crate::direct::Route { serial, route };
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
            let mut addr = None;
            if let Some(Socket {
                kind: Kind::Listener(l),
                ..
            }) = self.sockets[slot].sock.as_mut()
            {
                if let Some((old, _)) = l.route.replace((idx, serial)) {
                    self.routes[old as usize] = None;
                }
                addr = Some(l.addr);
            }
            // Connections this session already has from the listener's address — handed on by
            // an instance that crashed or reloaded, adopted before its successor installed the
            // route — may be given back to the route too (`ServeDirect`), or they would stay
            // with the application for life.
            if let (Some(addr), Some(s)) = (addr, self.sessions[si].as_ref()) {
                let conns: Vec<SlotIx> = s.sockets.iter().copied().collect();
                for c in conns {
                    if let Some(c) = self.conn_mut(c) {
                        if c.route.is_none() && c.origin == Some(addr) {
                            c.route = Some((idx, serial));
                        }
                    }
                }
            }
            tracing::info!(session = si.0, "direct path installed");
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
        n
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
            let data = std::mem::take(&mut d.conn.pending);
            c.direct = None;
            self.defer(slot, si, data);
            return;
        };
        let sendq = &mut c.sendq;
        let room = SENDQ_LIMIT.saturating_sub(sendq.len());
        let before = d.conn.pending.len();
        let outcome = route.route.serve(
            &mut d.conn,
            room,
            &mut self.direct_responses,
            &mut |part| match part {
                // Never an empty chunk: it would never leave the queue (see `send_inline`).
                DirectPart::Bytes(data) if data.is_empty() => {}
                DirectPart::Bytes(data) => sendq.push_back(Chunk::Direct { data, off: 0 }),
                DirectPart::File {
                    segment,
                    offset,
                    len,
                } => {
                    // A range outside its segment would be a responder's bug; it is dropped
                    // rather than sent from memory that is not the segment's (and so is an
                    // empty one).
                    let end = offset
                        .checked_add(len)
                        .filter(|&e| e <= segment.len() && len > 0);
                    if let Some(end) = end {
                        sendq.push_back(Chunk::File {
                            seg: segment,
                            off: offset as usize,
                            end: end as usize,
                            charged: false,
                        });
                    }
                }
            },
        );
        d.conn.answered_some(before, self.now);
        match outcome {
            Outcome::More => {}
            Outcome::Blocked => d.blocked = true,
            Outcome::Close => {
                c.linger = true;
                c.direct = None;
                self.want_send(slot);
                self.begin_close(slot, false);
                return;
            }
            Outcome::Defer(data) => {
                c.direct = None;
                self.defer(slot, si, data);
            }
        }
        self.want_send(slot);
    }

    /// Applies the routes' timeouts to direct connections: a request that does not complete
    /// in time gets the route's timeout response and the connection closes; one idle too long
    /// (nothing pending, nothing to send) closes.
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
            match r.route.expired(&d.conn, now) {
                Some(Expiry::Request) => {
                    expired.push((SlotIx(slot as u32), Some(r.route.timeout_response())))
                }
                Some(Expiry::Idle) if c.send_drained() => expired.push((SlotIx(slot as u32), None)),
                _ => {}
            }
        }
        for (slot, last_words) in expired {
            if let Some(c) = self.conn_mut(slot) {
                if let Some(data) = last_words.filter(|d| !d.is_empty()) {
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
            c.delivering(data.len(), |dst| dst.copy_from_slice(&data));
        }
        for part in data.chunks(INLINE_DATA_MAX) {
            self.emit(si, Event::Data { handle, data: part });
        }
    }
}
