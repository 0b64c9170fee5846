//! The worker's side of checkpoints (`crate::checkpoint`): noticing connections at rest,
//! snapshotting them without disturbing them, and telling the consumer when a snapshot went
//! stale.
//!
//! # Finding rest without a system call per request
//!
//! While checkpointing is on, a connection stamps `ConnCkpt::last` (the pass's clock, no
//! system call) when a receive completes and when its send queue empties. Every housekeeping
//! tick (100 ms) `ckpt_sweep` looks for connections that could move now
//! (`Conn::movable`), have nothing queued, nothing unanswered, and were stamped at least
//! `idle_after` ago. Only those cost a system call: `SIOCOUTQ` must say the client has
//! acknowledged every byte sent to it (a record with bytes in flight would be a migration,
//! not a checkpoint). A connection that never rests costs two stores per request.
//!
//! # Snapshotting safely
//!
//! A socket in `TCP_REPAIR` mode must not see a receive run (`recvmsg` fails there, and the
//! connection would be failed), and a connection's multishot receive is always armed. So,
//! as a migration's export does, the connection is quiesced first: its receive is cancelled
//! (`ConnCkpt::quiescing` keeps it from being re-armed), and `ckpt_settle`, after each reap,
//! waits until the kernel holds no operation on the socket (`Socket::inflight == 0`). Then,
//! on the worker thread and in one go: pause, save, resume (always, whatever the save did),
//! encode, re-arm the receive. Anything that happens meanwhile wins over the checkpoint:
//! input raced with the cancel (`ckpt_input` ends the quiescing and the bytes are handled as
//! usual), the application sent or closed (`ckpt_stale`), the connection closed or was
//! exported (the slot's `closing`) — the receive is then simply re-armed. A save that shows
//! bytes in the kernel's queues (input arrived while paused) is thrown away. A save that fails
//! leaves the connection untouched and is not retried until the connection has been busy
//! again. The overriding rule is that checkpointing never loses or corrupts a connection.

use super::*;
use crate::checkpoint::{CheckpointEvent, FLAG_EOF, FLAG_NODELAY};
use splitos_repair::{socket, RepairError};
use std::os::fd::{AsRawFd, BorrowedFd};

/// A connection's checkpoint state.
#[derive(Default, Debug)]
pub(super) struct ConnCkpt {
    /// When it last received bytes or emptied its send queue (kept only while checkpointing
    /// is on; `None`: not yet seen).
    pub(super) last: Option<Instant>,
    /// `Opened` was pushed to the current consumer: `Closed` follows when it leaves.
    pub(super) opened: bool,
    /// Its last `Idle`'s record, while that stands (no `Busy` since): re-emitted by a resync.
    pub(super) record: Option<Vec<u8>>,
    /// `Idle` events so far (the last one's epoch).
    pub(super) epoch: u64,
    /// Its receive is being cancelled for a snapshot: not re-armed until `ckpt_settle`.
    pub(super) quiescing: bool,
    /// A snapshot failed in this rest period: not tried again until it has been busy.
    pub(super) refused: bool,
}

#[derive(Debug, thiserror::Error)]
enum SnapError {
    #[error(transparent)]
    Save(#[from] RepairError),
    #[error("the socket could not leave repair mode: {0}")]
    Stuck(RepairError),
}

impl Worker {
    /// Turns checkpointing on or off, or resyncs, after the consumer asked (see
    /// `checkpoint::Switch`); called when the switch's generation changed.
    pub(super) fn ckpt_refresh(&mut self) {
        let generation = self.shared.checkpoints.generation();
        if generation == self.ckpt_generation {
            return;
        }
        self.ckpt_generation = generation;
        let hub = self.shared.checkpoints.current();
        let same = matches!((&self.ckpt, &hub), (Some(a), Some(b)) if Arc::ptr_eq(a, b));
        let now = self.now;
        for ss in &mut self.sockets {
            let Some(Socket {
                kind: Kind::Conn(c),
                closing,
                ..
            }) = ss.sock.as_mut()
            else {
                continue;
            };
            if !same {
                // A new consumer (or none) knows nothing of what the last one was told.
                let quiescing = c.ckpt.quiescing;
                c.ckpt = ConnCkpt {
                    quiescing,
                    last: Some(now),
                    ..ConnCkpt::default()
                };
            }
            let (Some(hub), Some(flow), Some(_), false) = (&hub, c.flow, c.origin, *closing) else {
                continue;
            };
            hub.push(CheckpointEvent::Opened(flow));
            c.ckpt.opened = true;
            if let Some(record) = &c.ckpt.record {
                c.ckpt.epoch += 1;
                hub.push(CheckpointEvent::Idle {
                    flow,
                    epoch: c.ckpt.epoch,
                    record: record.clone(),
                });
            }
        }
        self.ckpt = hub;
    }

    /// A connection came into service (accepted, adopted, imported).
    pub(super) fn ckpt_opened(&mut self, slot: SlotIx) {
        let now = self.now;
        let Some(hub) = self.ckpt.clone() else { return };
        let Some(c) = self.conn_mut(slot) else { return };
        if let (Some(flow), Some(_)) = (c.flow, c.origin) {
            c.ckpt.opened = true;
            c.ckpt.last = Some(now);
            hub.push(CheckpointEvent::Opened(flow));
        }
    }

    /// A socket left this worker (released).
    pub(super) fn ckpt_closed(&self, sock: &Socket) {
        if let (Some(hub), Kind::Conn(c)) = (&self.ckpt, &sock.kind) {
            if let (true, Some(flow)) = (c.ckpt.opened, c.flow) {
                hub.push(CheckpointEvent::Closed(flow));
            }
        }
    }

    /// A receive completed with `res`: input (bytes, EOF, an error) makes the connection busy.
    #[inline]
    pub(super) fn ckpt_input(&mut self, slot: SlotIx, res: i32) {
        if self.ckpt.is_none() {
            return;
        }
        // Cancelled, nothing to read after all, out of buffers: no news from the client.
        let quiet = [Errno::CANCELED, Errno::AGAIN, Errno::NOBUFS];
        if res < 0 && quiet.iter().any(|e| res == -e.raw_os_error()) {
            return;
        }
        self.ckpt_stale(slot);
    }

    /// The connection is busy (input, bytes queued, closing): a quiescing snapshot is called
    /// off, and a standing `Idle` record is declared stale (`Busy`).
    #[inline]
    pub(super) fn ckpt_stale(&mut self, slot: SlotIx) {
        if self.ckpt.is_none() {
            return;
        }
        let now = self.now;
        let Some(c) = self.conn_mut(slot) else { return };
        c.ckpt.last = Some(now);
        c.ckpt.quiescing = false;
        c.ckpt.refused = false;
        if c.ckpt.record.take().is_none() {
            return;
        }
        let (flow, epoch) = (c.flow, c.ckpt.epoch);
        if let (Some(hub), Some(flow)) = (&self.ckpt, flow) {
            hub.push(CheckpointEvent::Busy { flow, epoch });
            hub.busy_events.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts quiescing every connection that has been at rest long enough (housekeeping).
    pub(super) fn ckpt_sweep(&mut self, now: Instant) {
        let Some(idle_after) = self.ckpt.as_ref().map(|h| h.config.idle_after) else {
            return;
        };
        for ix in 0..self.sockets.len() {
            let slot = SlotIx(ix as u32);
            let generation = self.sockets[slot].generation;
            let Some(sock) = self.sockets[slot].sock.as_mut() else {
                continue;
            };
            let si = sock.session;
            let Kind::Conn(c) = &mut sock.kind else {
                continue;
            };
            let k = &mut c.ckpt;
            if sock.closing || !k.opened || k.record.is_some() || k.quiescing || k.refused {
                continue;
            }
            let last = *k.last.get_or_insert(now);
            if now.saturating_duration_since(last) < idle_after || !at_rest(c) {
                continue;
            }
            let live = matches!(self.sessions.get(si.ix()), Some(Some(s)) if !s.dead);
            // Every byte sent acknowledged by the client; else look again at the next tick.
            if !live || unacked(sock.fd.as_fd()) != Some(0) {
                continue;
            }
            c.ckpt.quiescing = true;
            let armed = c.recv == Recv::Armed;
            if armed {
                c.recv = Recv::Cancelling;
            }
            self.ckpt_pending.push((slot, generation));
            if armed {
                self.cancel(slot, Op::Recv);
            }
        }
    }

    /// Snapshots the quiesced connections that have nothing in flight any more, and re-arms
    /// the receive of every one done with (snapshotted or called off). After each reap.
    pub(super) fn ckpt_settle(&mut self) {
        for (slot, generation) in std::mem::take(&mut self.ckpt_pending) {
            if self.sockets.get(slot.ix()).map(|s| s.generation) != Some(generation) {
                continue; // released meanwhile
            }
            let Some(sock) = self.sockets[slot].sock.as_mut() else {
                continue;
            };
            let Kind::Conn(c) = &mut sock.kind else {
                continue;
            };
            if c.ckpt.quiescing && sock.inflight > 0 {
                self.ckpt_pending.push((slot, generation));
                continue;
            }
            let quiesced = std::mem::take(&mut c.ckpt.quiescing);
            if quiesced && !sock.closing && at_rest(c) && self.ckpt.is_some() {
                self.snapshot(slot);
            }
            self.maybe_arm_recv(slot);
        }
    }

    /// Records a quiesced connection (nothing in flight on it) and pushes its `Idle`.
    fn snapshot(&mut self, slot: SlotIx) {
        let Some(hub) = self.ckpt.clone() else { return };
        let now = self.now;
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        let Some(flow) = c.flow else { return };
        let started = Instant::now();
        let taken = take_record(sock.fd.as_fd(), c.eof);
        let mut stuck = false;
        match taken {
            Ok(Some(record)) => {
                c.ckpt.epoch += 1;
                c.ckpt.record = Some(record.clone());
                hub.push(CheckpointEvent::Idle {
                    flow,
                    epoch: c.ckpt.epoch,
                    record,
                });
                hub.idle_records.fetch_add(1, Ordering::Relaxed);
            }
            // Bytes reached the kernel's queues meanwhile: the receive re-armed after this
            // delivers them, and the rest starts again after that.
            Ok(None) => c.ckpt.last = Some(now),
            Err(e) => {
                c.ckpt.refused = true;
                hub.failures.fetch_add(1, Ordering::Relaxed);
                stuck = matches!(e, SnapError::Stuck(_));
                if stuck {
                    tracing::error!(%flow, "checkpoint: {e}; failing the connection");
                } else if !hub.failure_logged.swap(true, Ordering::Relaxed) {
                    tracing::debug!(%flow, "checkpoint failed, connection left as it was: {e}");
                }
            }
        }
        let ns = started.elapsed().as_nanos() as u64;
        hub.record_ns.fetch_add(ns, Ordering::Relaxed);
        if stuck {
            // Never seen: resuming a socket just paused does not fail. Whatever it can still
            // do, it cannot go on silently; its application is told.
            self.overrun(slot, Errno::IO.raw_os_error());
        }
    }
}

/// Whether a connection is at a request boundary with nothing held: it may move now
/// (`movable`), nothing is queued or in flight to send, nothing received waits to be
/// answered (the direct path's pending bytes, a recoverable application's unanswered ones,
/// bytes held for a pause).
fn at_rest(c: &Conn) -> bool {
    let answered = match &c.direct {
        Some(d) => d.conn.pending.is_empty(),
        None => c.recovery.as_ref().is_some_and(Recovery::answered_all),
    };
    answered
        && c.held.is_empty()
        && c.lingering.is_none()
        && c.send_drained()
        && c.movable().is_ok()
}

/// Bytes sent and not yet acknowledged by the peer (or not yet sent), from `SIOCOUTQ`.
fn unacked(fd: BorrowedFd<'_>) -> Option<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ, the same request number) writes one int through the pointer,
    // which points at `n` for the whole call; the descriptor is borrowed, so open.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    (r == 0).then_some(n)
}

/// The record of a quiesced connection, as a migration builds it; `None` when the kernel
/// holds bytes in either queue (it was not at rest after all). The socket leaves repair mode
/// whatever happens; `SnapError::Stuck` if it cannot.
fn take_record(fd: BorrowedFd<'_>, eof: bool) -> Result<Option<Vec<u8>>, SnapError> {
    let nodelay = rustix::net::sockopt::tcp_nodelay(fd).unwrap_or(false);
    let paused = socket::pause(fd)?;
    let saved = paused.save();
    if let Err(first) = paused.resume() {
        tracing::warn!("checkpoint: leaving repair mode failed ({first}); trying again");
        socket::pause(fd)
            .and_then(|p| p.resume())
            .map_err(SnapError::Stuck)?;
    }
    let saved = saved?;
    if !saved.recv_queue.is_empty() || !saved.send_queue.is_empty() {
        return Ok(None);
    }
    let user = socket::UserState {
        flags: if eof { FLAG_EOF } else { 0 } | if nodelay { FLAG_NODELAY } else { 0 },
        ..socket::UserState::default()
    };
    Ok(Some(saved.repr(user).to_vec().map_err(RepairError::from)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection of a persistent listener on the direct path, with nothing pending.
    fn direct_conn() -> Conn {
        let mut c = Conn::new();
        let local: SocketAddr = "127.0.0.1:80".parse().unwrap_or(NO_ADDR);
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap_or(NO_ADDR);
        c.origin = Some(local);
        c.flow = Some(crate::migration::Flow { local, peer });
        c.direct = Some(Box::new(crate::direct::Direct::new(0, 1, Instant::now())));
        c
    }

    #[test]
    fn rest_is_a_boundary_with_nothing_queued_held_or_unanswered() {
        let c = direct_conn();
        assert!(at_rest(&c));
        let mut c = direct_conn();
        c.origin = None;
        assert!(!at_rest(&c), "not on a persistent listener");
        let mut c = direct_conn();
        if let Some(d) = c.direct.as_mut() {
            d.conn.pending = b"GET /".to_vec();
        }
        assert!(!at_rest(&c), "half a request");
        let mut c = direct_conn();
        c.sendq.push_back(Chunk::Direct {
            data: b"HTTP".to_vec(),
            off: 0,
        });
        assert!(!at_rest(&c), "a response queued");
        let mut c = direct_conn();
        c.send.polling();
        assert!(!at_rest(&c), "a send in flight");
        let mut c = direct_conn();
        c.held = b"x".to_vec();
        assert!(!at_rest(&c), "bytes held");
        let mut c = direct_conn();
        c.shutdown_wanted = true;
        assert!(!at_rest(&c), "its sending side is shut down");
    }

    #[test]
    fn an_application_connection_rests_only_once_it_answered_everything() {
        let mut c = direct_conn();
        c.direct = None;
        assert!(
            !at_rest(&c),
            "not recoverable: the application's state is unknown"
        );
        c.recovery = Some(Recovery::default());
        assert!(at_rest(&c));
        c.delivering(5, |b| b.copy_from_slice(b"hello"));
        assert!(!at_rest(&c), "delivered, not answered");
        if let Some(r) = c.recovery.as_mut() {
            r.sent();
            assert!(r.mark(5, 5));
        }
        assert!(at_rest(&c), "answered");
        if let Some(r) = c.recovery.as_mut() {
            r.sent();
        }
        assert!(!at_rest(&c), "sent after the mark");
    }

    #[test]
    fn a_quiescing_connection_arms_no_receive() {
        let mut c = direct_conn();
        assert!(c.may_receive());
        c.ckpt.quiescing = true;
        assert!(!c.may_receive());
    }
}
