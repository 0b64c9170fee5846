//! Sockets: listening, accepting, connecting, and the slots that hold them.

use super::*;

pub(super) fn sock_addr(a: rustix::io::Result<rnet::SocketAddrAny>) -> SocketAddr {
    a.ok()
        .and_then(|a| SocketAddr::try_from(a).ok())
        .unwrap_or(NO_ADDR)
}

pub(super) fn peer_addr(fd: &OwnedFd) -> SocketAddr {
    match rnet::getpeername(fd) {
        Ok(Some(a)) => SocketAddr::try_from(a).unwrap_or(NO_ADDR),
        _ => NO_ADDR,
    }
}

pub(super) fn open_listener(
    addr: SocketAddr,
    backlog: u32,
    flags: u32,
) -> rustix::io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rnet::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    if flags & listen_flags::REUSE_ADDR != 0 {
        sockopt::set_socket_reuseaddr(&fd, true)?;
    }
    if flags & listen_flags::REUSE_PORT != 0 {
        sockopt::set_socket_reuseport(&fd, true)?;
    }
    rnet::bind(&fd, &addr)?;
    rnet::listen(&fd, backlog.clamp(1, 65535) as i32)?;
    Ok(fd)
}

/// Connections a listener being parked keeps for its successor.
const MAX_ORPHANS: usize = 64;

impl Worker {
    pub(super) fn alloc_socket(&mut self, si: SessionIx, fd: OwnedFd, kind: Kind) -> SlotIx {
        let slot = match self.free_sockets.pop() {
            Some(s) => s,
            None => {
                self.sockets.push(SocketSlot::default());
                SlotIx(self.sockets.len() as u32 - 1)
            }
        };
        self.sockets[slot].sock = Some(Socket {
            session: si,
            fd,
            inflight: 0,
            closing: false,
            kind,
        });
        if let Some(s) = self.session(si) {
            s.sockets.insert(slot);
        }
        slot
    }

    pub(super) fn listen(
        &mut self,
        si: SessionIx,
        req: u32,
        addr: SocketAddr,
        backlog: u32,
        flags: u32,
    ) {
        let Some(s) = self.live_session(si) else {
            return;
        };
        let uid = s.peer.uid;
        if !self.shared.config.access.may_listen(uid, addr.port()) {
            tracing::info!(
                uid,
                port = addr.port(),
                "listen refused by the access policy"
            );
            self.fail_request(si, req, Errno::ACCESS.raw_os_error());
            return;
        }
        if let Err(over) = self.charge(si, Res::Listeners, 1) {
            let errno = self.over_budget(si, Res::Listeners, over);
            self.fail_request(si, req, errno);
            return;
        }
        let registry = &self.shared.registry;
        let taken = registry.take(addr, uid, &self.shared.ledger);
        let (fd, orphans, local) = match taken {
            Some(p) => {
                tracing::info!(%addr, session = si.0, orphans = p.orphans.len(), "took over a persistent listener");
                let local = sock_addr(rnet::getsockname(&p.fd));
                (p.fd, p.orphans, local)
            }
            None => match registry.open_listener(addr, uid, || {
                let fd = open_listener(addr, backlog, flags)?;
                let local = rnet::getsockname(&fd).map(|a| sock_addr(Ok(a)))?;
                Ok((fd, local))
            }) {
                Ok((fd, local)) => (fd, Vec::new(), local),
                Err(e) => {
                    self.refund(si, Res::Listeners, 1);
                    self.fail_request(si, req, e.raw_os_error());
                    return;
                }
            },
        };
        let slot = self.alloc_socket(
            si,
            fd,
            Kind::Listener(ListenSock {
                addr: local,
                flags,
                accepting: false,
                park: false,
                route: None,
                orphans: Vec::new(),
            }),
        );
        if flags & listen_flags::PERSISTENT != 0 {
            self.persistent.insert(slot);
            self.persistent_added = true;
        }
        let handle = self.handle(slot);
        self.emit(
            si,
            Event::Done {
                req,
                handle,
                local,
                peer: NO_ADDR,
            },
        );
        for fd in orphans {
            self.accepted(si, slot, fd);
        }
        self.arm_accept(slot);
    }

    pub(super) fn arm_accept(&mut self, slot: SlotIx) {
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let Kind::Listener(l) = &mut sock.kind else {
            return;
        };
        if l.accepting || sock.closing {
            return;
        }
        let tag = Tag {
            op: Op::Accept,
            session: sock.session.0,
            socket: slot.0,
        };
        match self.ring.accept_multi(sock.fd.as_fd(), tag) {
            Ok(()) => {
                l.accepting = true;
                sock.inflight += 1;
            }
            Err(e) => tracing::error!("cannot arm accept: {e}"),
        }
    }

    pub(super) fn accepted(
        &mut self,
        si: SessionIx,
        listener: SlotIx,
        fd: OwnedFd,
    ) -> Option<SlotIx> {
        let (origin, route, recoverable) =
            match self.sockets[listener].sock.as_ref().map(|s| &s.kind) {
                Some(Kind::Listener(l)) => (
                    (l.flags & listen_flags::PERSISTENT != 0).then_some(l.addr),
                    l.route,
                    l.flags & listen_flags::RECOVERABLE != 0,
                ),
                _ => (None, None, false),
            };
        self.live_session(si)?;
        if let Err(over) = self.charge(si, Res::Conns, 1) {
            // A lingering connection of this session gives up its budget rather than a new
            // one being refused (see `linger.rs`).
            if !self.reclaim_lingering(si) {
                tracing::warn!(
                    session = si.0,
                    "connection limit reached (over {over} budget); refusing a connection"
                );
                return None; // dropping fd closes it
            }
        }
        let local = sock_addr(rnet::getsockname(&fd));
        let peer = peer_addr(&fd);
        let mut conn = Box::new(Conn::new());
        conn.origin = origin;
        conn.flow = Some(crate::migration::Flow { local, peer });
        conn.route = route;
        if recoverable && origin.is_some() {
            conn.recovery = Some(Recovery::default());
        }
        conn.direct = route
            .map(|(route, serial)| Box::new(crate::direct::Direct::new(route, serial, self.now)));
        let slot = self.alloc_socket(si, fd, Kind::Conn(conn));
        let conn = self.handle(slot);
        let listener = self.handle(listener);
        self.emit(
            si,
            Event::Accepted {
                listener,
                conn,
                local,
                peer,
            },
        );
        self.ckpt_opened(slot);
        self.maybe_arm_recv(slot);
        Some(slot)
    }

    pub(super) fn accept_completion(&mut self, slot: SlotIx, cqe: &Completion) {
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let si = sock.session;
        let closing = sock.closing;
        let Kind::Listener(l) = &mut sock.kind else {
            return;
        };
        if !cqe.more {
            l.accepting = false;
        }
        if cqe.result >= 0 {
            // SAFETY: a successful accept completion's result is a new fd that nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(cqe.result) };
            if closing {
                // Accepted while it is being parked: kept for the successor (a few at most, as
                // accepting stops with the close; beyond that, closed).
                if l.park && l.orphans.len() < MAX_ORPHANS {
                    l.orphans.push(fd);
                }
            } else {
                self.accepted(si, slot, fd);
            }
        } else if cqe.result != -Errno::CANCELED.raw_os_error() {
            tracing::warn!(errno = -cqe.result, "accept failed");
        }
        if !cqe.more {
            if cqe.result < 0 && cqe.result != -Errno::CANCELED.raw_os_error() {
                // e.g. EMFILE: retry at the next housekeeping tick rather than spin.
                self.accept_retry.push(slot);
            } else {
                self.arm_accept(slot);
            }
            self.try_finish_close(slot);
        }
    }

    pub(super) fn connect(&mut self, si: SessionIx, req: u32, addr: SocketAddr) {
        // Outbound connections count against the same budgets as accepted ones, from the
        // moment they are started.
        if self.live_session(si).is_none() {
            return;
        }
        if let Err(over) = self.charge(si, Res::Conns, 1) {
            let errno = self.over_budget(si, Res::Conns, over);
            self.fail_request(si, req, errno);
            return;
        }
        let family = if addr.is_ipv4() {
            AddressFamily::INET
        } else {
            AddressFamily::INET6
        };
        let fd = match rnet::socket_with(
            family,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        ) {
            Ok(fd) => fd,
            Err(e) => {
                self.refund(si, Res::Conns, 1);
                self.fail_request(si, req, e.raw_os_error());
                return;
            }
        };
        match rnet::connect(&fd, &addr) {
            Ok(()) | Err(Errno::INPROGRESS) => {}
            Err(e) => {
                self.refund(si, Res::Conns, 1);
                self.fail_request(si, req, e.raw_os_error());
                return;
            }
        }
        let slot = self.alloc_socket(si, fd, Kind::Connecting { req });
        let tag = Tag {
            op: Op::ConnectPoll,
            session: si.0,
            socket: slot.0,
        };
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        match self.ring.poll_writable(sock.fd.as_fd(), tag) {
            Ok(()) => sock.inflight += 1,
            Err(e) => {
                self.fail_request(si, req, errno_of(&e));
                self.begin_close(slot, true);
            }
        }
    }

    pub(super) fn connect_done(&mut self, slot: SlotIx) {
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let Kind::Connecting { req } = sock.kind else {
            return;
        };
        let si = sock.session;
        if sock.closing {
            return;
        }
        // The socket stays non-blocking, as accepted ones are: the ring copes with EAGAIN, and
        // the synchronous `sendfile` path relies on it never sleeping (a blocking outbound
        // socket let one slow peer stall every session of this worker).
        let result = match sockopt::socket_error(&sock.fd) {
            Ok(r) => r,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                let local = sock_addr(rnet::getsockname(&sock.fd));
                let peer = peer_addr(&sock.fd);
                sock.kind = Kind::Conn(Box::new(Conn::new()));
                let handle = self.handle(slot);
                self.emit(
                    si,
                    Event::Done {
                        req,
                        handle,
                        local,
                        peer,
                    },
                );
                self.maybe_arm_recv(slot);
            }
            Err(e) => {
                self.fail_request(si, req, e.raw_os_error());
                self.begin_close(slot, true);
            }
        }
    }
}
