//! The worker's side of migration (`crate::migration`): which of its connections could move,
//! and letting connections go — stopped, with nothing in flight, and given back with the bytes
//! the server held for them.

use super::*;
use crate::migration::{Flow, Order, Reply, What};

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
            }
        }
        orders.len()
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
        let unsent = queued_bytes(&sendq);
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

/// The bytes of a send queue, read out (file ranges included): they travel in the record.
fn queued_bytes(sendq: &VecDeque<Chunk>) -> Vec<u8> {
    let total: usize = sendq.iter().map(Chunk::remaining).sum();
    let mut out = Vec::with_capacity(total);
    for ch in sendq {
        match ch {
            Chunk::Inline { data, off } | Chunk::Direct { data, off } => {
                out.extend_from_slice(&data[*off..])
            }
            Chunk::Buf { rx, off } => {
                let at = out.len();
                out.resize(at + rx.len() - off, 0);
                rx.read_at(*off, &mut out[at..]);
            }
            Chunk::File { seg, off, end, .. } => out.extend_from_slice(&seg.bytes()[*off..*end]),
            Chunk::Plain { file, off, end, .. } => {
                let at = out.len();
                out.resize(at + (end - off), 0);
                let mut done = 0;
                while at + done < out.len() {
                    match rustix::io::pread(file.fd(), &mut out[at + done..], (off + done) as u64) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => done += n,
                    }
                }
                if at + done < out.len() {
                    // The file shrank: the client gets what there is, as with `sendfile`.
                    tracing::warn!(
                        "a file sent by reference ended early while its connection moved"
                    );
                    out.truncate(at + done);
                    return out;
                }
            }
        }
    }
    out
}
