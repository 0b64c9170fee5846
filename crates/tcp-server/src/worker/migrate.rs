//! The worker's side of migration (`crate::migration`): which of its connections could move,
//! and letting connections go — stopped, with nothing in flight, and given back with the bytes
//! the server held for them.

use super::*;
use crate::migration::{Flow, Order, Queued, QueuedPart, Reply, What};

impl Worker {
    /// Answers the migration orders posted since the last look.
    pub(super) fn take_orders(&mut self) -> usize {
        let version = self.shared.migration.version();
        if version == self.orders_version {
            return 0;
        }
        self.orders_version = version;
        let (orders, newest) = self.shared.migration.newer_than(self.orders_seen);
        self.orders_seen = newest;
        for order in &orders {
            match &order.what {
                What::List { limit } => {
                    let flows = self.movable_flows(*limit);
                    order.reply(Reply::Listed(flows));
                }
                What::Export(wanted) => self.export(order, wanted),
                What::Listeners => order.reply(Reply::Listeners(self.listener_copies())),
            }
        }
        orders.len()
    }

    /// A copy of each live persistent listener's socket, with its address and owner.
    fn listener_copies(&self) -> Vec<(SocketAddr, u32, OwnedFd)> {
        let mut out = Vec::new();
        for &slot in &self.persistent {
            let Some(Socket {
                session,
                fd,
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
            match fd.try_clone() {
                Ok(copy) => out.push((l.addr, s.peer.uid, copy)),
                Err(e) => tracing::warn!(addr = %l.addr, "cannot copy a listener's socket: {e}"),
            }
        }
        out
    }

    fn movable_flows(&self, limit: usize) -> Vec<Flow> {
        self.sockets
            .iter()
            .filter_map(|s| match s.sock.as_ref() {
                Some(Socket {
                    closing: false,
                    kind: Kind::Conn(c),
                    ..
                }) if c.movable().is_ok() => c.flow,
                _ => None,
            })
            .take(limit)
            .collect()
    }

    fn export(&mut self, order: &Arc<Order>, wanted: &HashSet<Flow>) {
        let mut found = Vec::new();
        let mut slots = Vec::new();
        for (ix, s) in self.sockets.iter().enumerate() {
            let Some(Socket {
                closing,
                kind: Kind::Conn(c),
                ..
            }) = s.sock.as_ref()
            else {
                continue;
            };
            let Some(flow) = c.flow.filter(|f| wanted.contains(f)) else {
                continue;
            };
            match c.movable() {
                Ok(()) if !closing => {
                    found.push(flow);
                    slots.push(SlotIx(ix as u32));
                }
                Ok(()) => order.reply(Reply::Refused(flow, "it is closing")),
                Err(why) => order.reply(Reply::Refused(flow, why)),
            }
        }
        // Before any `Moved`, which may follow at once.
        order.reply(Reply::Found(found));
        for slot in slots {
            self.start_export(slot, order.clone());
        }
    }

    /// Stops a connection as a pause does (nothing more reaches its application or the direct
    /// path: received bytes are held), cancels what is in flight on it, and lets it go once
    /// nothing is (`try_finish_close`, then `release_exported`).
    fn start_export(&mut self, slot: SlotIx, order: Arc<Order>) {
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let si = sock.session;
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        // Unanswered bytes first, in stream order: the direct path's pending request bytes,
        // or what a recoverable connection's application was given and has not answered.
        let mut held = match c.direct.take() {
            Some(d) => d.conn.pending,
            None => c
                .recovery
                .as_mut()
                .and_then(|r| r.unanswered())
                .unwrap_or_default(),
        };
        let moved = held.len() as u64;
        held.append(&mut c.held);
        c.held = held;
        c.paused = true;
        c.export = Some(order);
        sock.closing = true;
        self.charge_arrived(si, Res::HeldBytes, moved);
        self.try_finish_close(slot);
    }

    /// Whether a connection is being let go: no send may start on it.
    pub(super) fn exporting(&self, slot: SlotIx) -> bool {
        matches!(
            self.sockets[slot].sock.as_ref().map(|s| &s.kind),
            Some(Kind::Conn(c)) if c.export.is_some()
        )
    }

    /// Gives a connection that has nothing in flight any more to whoever asked for it.
    pub(super) fn release_exported(&mut self, fd: OwnedFd, c: Box<Conn>, uid: u32) {
        let Conn {
            sendq,
            held,
            eof,
            origin,
            flow,
            export,
            ..
        } = *c;
        let (Some(order), Some(origin), Some(flow)) = (export, origin, flow) else {
            return; // never: `movable` requires an origin and a flow
        };
        let unsent = queued_parts(&sendq);
        tracing::debug!(%flow, unsent = unsent.len(), held = held.len(), "a connection leaves");
        order.reply(Reply::Moved(crate::migration::Exported {
            flow,
            unsent,
            held,
            eof,
            fd: Some(fd),
            origin,
            uid,
            shared: self.shared.clone(),
        }));
    }
}

/// What a send queue holds, for the record: bytes copied (the application's buffers are its
/// shared memory, reused once a send is done), file ranges by reference (read by the link's
/// thread, never here).
fn queued_parts(sendq: &VecDeque<Chunk>) -> Queued {
    let parts = sendq
        .iter()
        .map(|ch| match ch {
            Chunk::Inline { data, off } | Chunk::Direct { data, off } => {
                QueuedPart::Bytes(data[*off..].to_vec())
            }
            Chunk::Buf { rx, off } => {
                let mut b = vec![0u8; rx.len() - off];
                rx.read_at(*off, &mut b);
                QueuedPart::Bytes(b)
            }
            Chunk::File { seg, off, end, .. } => QueuedPart::Segment {
                seg: seg.clone(),
                off: *off,
                end: *end,
            },
            Chunk::Plain { file, off, end, .. } => QueuedPart::File {
                file: file.clone(),
                off: *off,
                end: *end,
            },
        })
        .collect();
    Queued(parts)
}

impl Queued {
    /// The chunks to queue for these bytes on a connection adopted here. Outside the send
    /// window and every budget, like the direct path's responses: they were accepted already.
    pub(super) fn into_chunks(self) -> impl DoubleEndedIterator<Item = Chunk> {
        self.0.into_iter().map(|p| match p {
            QueuedPart::Bytes(data) => Chunk::Direct { data, off: 0 },
            QueuedPart::Segment { seg, off, end } => Chunk::File {
                seg,
                off,
                end,
                charged: false,
            },
            QueuedPart::File { file, off, end } => Chunk::Plain {
                file,
                off,
                end,
                charged: false,
            },
        })
    }
}
