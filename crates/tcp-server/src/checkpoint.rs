//! Checkpoints of idle connections: the TCP server's side of failover (issue 14 §2).
//!
//! When a node dies, a peer (its *successor*) takes over the connections that were idle
//! between requests, on the same client sockets. For that it needs, at every moment, a record
//! of each such connection's kernel state. This module is the stream those records travel on:
//! the workers push [`CheckpointEvent`]s, and one thread beside them — the failover agent of
//! `splitos-failover` — drains them ([`Checkpoints`]) and sends them to the successor.
//!
//! - [`CheckpointEvent::Opened`] / [`CheckpointEvent::Closed`]: a connection on a persistent
//!   listener came into or left service here (the successor resets, on takeover, the flows it
//!   knows and cannot restore).
//! - [`CheckpointEvent::Idle`]: a connection that could move now (`migration`, "Movable") has
//!   been at rest — at a request boundary, nothing queued, every byte it sent acknowledged by
//!   the client — for [`CheckpointConfig::idle_after`]: its record, as a migration builds it.
//! - [`CheckpointEvent::Busy`]: that record went stale (bytes arrived, or the server or the
//!   application started sending or closing). Pushed as soon as the worker sees the input,
//!   before the request is answered.
//!
//! Checkpointing is off, and costs nothing, until [`crate::TcpServer::checkpoints`] is called;
//! it turns off again when the [`Checkpoints`] handle is dropped. How the workers find
//! connections at rest and snapshot them without disturbing them is in
//! `worker/checkpoint.rs`.
//!
//! The queue is bounded ([`CheckpointConfig::queue_max`]): beyond it events are dropped and
//! counted ([`Checkpoints::dropped`]), because a worker must never wait for the consumer. A
//! consumer that sees `dropped` grow must forget what it learned and call
//! [`Checkpoints::resync`]. Events are pushed the moment they happen, under one short lock,
//! so they are in order per flow even when a connection moves between workers (its `Closed`
//! on the old one is pushed before it is handed to the new one, which pushes `Opened`).

use crate::Shared;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub use crate::migration::Flow;

/// Record flag (the record's `user_flags`): the client had shut down its side. The same value
/// as the node link's (`splitos_migrate`), which restores these records.
pub const FLAG_EOF: u32 = 1;
/// Record flag: the socket had `TCP_NODELAY` on. The same value as the node link's.
pub const FLAG_NODELAY: u32 = 2;

/// How checkpoints are taken and queued.
#[derive(Clone, Debug)]
pub struct CheckpointConfig {
    /// How long a connection must be at rest (at a request boundary, nothing queued, every
    /// byte it sent acknowledged by the client) before it is checkpointed. Default 50 ms.
    /// Workers look every 100 ms (their housekeeping tick), so a connection is checkpointed
    /// between `idle_after` and `idle_after` + 100 ms after it came to rest.
    pub idle_after: Duration,
    /// Most events waiting to be drained; beyond it events are dropped and counted. Default
    /// 65 536.
    pub queue_max: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            idle_after: Duration::from_millis(50),
            queue_max: 65_536,
        }
    }
}

/// What happened to one connection, in the order it happened (per flow).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointEvent {
    /// A connection this server can checkpoint came into service (accepted on, or handed to
    /// or imported into, a persistent listener's owner).
    Opened(Flow),
    /// The connection is at rest; `record` is its connection record (`splitos_repair` record
    /// bytes, `RecordRepr::to_vec`) as a migration builds it: flags [`FLAG_EOF`] and
    /// [`FLAG_NODELAY`], and no bytes held by the server or the application. `epoch` counts
    /// the flow's `Idle` events since its `Opened` (the first is 1); a resync re-emits the
    /// last record of a connection still at rest with the next epoch.
    Idle {
        flow: Flow,
        epoch: u64,
        record: Vec<u8>,
    },
    /// The connection last reported `Idle` (with this `epoch`) received bytes or is sending or
    /// closing: that record is stale.
    Busy { flow: Flow, epoch: u64 },
    /// The connection left service here (closed, failed, exported by a migration, handed
    /// elsewhere). Only for flows whose `Opened` went to this consumer (before a resync, it
    /// may name one the consumer has since forgotten).
    Closed(Flow),
}

/// Counters for status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointStats {
    /// `Idle` records made (not counting the ones a resync re-emits).
    pub idle_records: u64,
    /// `Busy` events.
    pub busy_events: u64,
    /// Time the workers spent making records (quiesced socket: pause, save, resume, encode).
    pub record_ns: u64,
    /// Snapshots that failed (`TCP_REPAIR` refused, an odd TCP state): the connection stayed
    /// in service untouched and is not checkpointed until it has been busy again.
    pub failures: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoints are being taken already: only one consumer may exist at a time")]
    InUse,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<CheckpointEvent>,
    /// The consumer sleeps in `wait`: a push must wake it.
    waiting: bool,
}

/// The queue and counters of one consumer, shared by the workers.
pub(crate) struct Hub {
    pub(crate) config: CheckpointConfig,
    queue: Mutex<Queue>,
    ready: Condvar,
    dropped: AtomicU64,
    pub(crate) idle_records: AtomicU64,
    pub(crate) busy_events: AtomicU64,
    pub(crate) record_ns: AtomicU64,
    pub(crate) failures: AtomicU64,
    /// The first failure was logged (at debug: one is enough to explain the counter).
    pub(crate) failure_logged: AtomicBool,
}

impl Hub {
    pub(crate) fn new(config: CheckpointConfig) -> Hub {
        Hub {
            config,
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            dropped: AtomicU64::new(0),
            idle_records: AtomicU64::new(0),
            busy_events: AtomicU64::new(0),
            record_ns: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            failure_logged: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues an event, or drops and counts it when the queue is full. Never waits for the
    /// consumer: the lock is only ever held to move events in or out.
    pub(crate) fn push(&self, ev: CheckpointEvent) {
        let mut q = self.lock();
        if q.events.len() >= self.config.queue_max {
            drop(q);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.events.push_back(ev);
        // A wake-up costs a system call: only when the consumer sleeps.
        if q.waiting {
            q.waiting = false;
            self.ready.notify_one();
        }
    }

    fn drain(&self, out: &mut Vec<CheckpointEvent>, max: usize) -> usize {
        let mut q = self.lock();
        let n = max.min(q.events.len());
        out.extend(q.events.drain(..n));
        n
    }

    fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = self.lock();
        while q.events.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            q.waiting = true;
            q = match self.ready.wait_timeout(q, left) {
                Ok((q, _)) => q,
                Err(p) => p.into_inner().0,
            };
        }
        q.waiting = false;
        !q.events.is_empty()
    }

    fn clear(&self) {
        self.lock().events.clear();
    }
}

/// Which consumer the workers feed, if any: they look at `generation` on every pass (one
/// atomic load) and at `hub` only when it changed (turned on or off, or a resync).
#[derive(Default)]
pub(crate) struct Switch {
    generation: AtomicU64,
    hub: Mutex<Option<Arc<Hub>>>,
}

impl Switch {
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn current(&self) -> Option<Arc<Hub>> {
        self.hub
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn changed(&self, shared: &Shared) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        shared.wake_all();
    }
}

/// The consumer side of the checkpoint stream (see the module documentation); from
/// [`crate::TcpServer::checkpoints`]. Only one exists at a time; dropping it turns
/// checkpointing off (and lets a new one be taken).
pub struct Checkpoints {
    hub: Arc<Hub>,
    shared: Arc<Shared>,
}

impl Checkpoints {
    pub(crate) fn start(
        shared: &Arc<Shared>,
        config: CheckpointConfig,
    ) -> Result<Checkpoints, CheckpointError> {
        let hub = Arc::new(Hub::new(config));
        {
            let mut current = shared
                .checkpoints
                .hub
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if current.is_some() {
                return Err(CheckpointError::InUse);
            }
            *current = Some(hub.clone());
        }
        shared.checkpoints.changed(shared);
        Ok(Checkpoints {
            hub,
            shared: shared.clone(),
        })
    }

    /// Moves up to `max` waiting events into `out`, in the order they happened per flow;
    /// returns how many.
    pub fn drain(&self, out: &mut Vec<CheckpointEvent>, max: usize) -> usize {
        self.hub.drain(out, max)
    }

    /// Blocks until an event is waiting or `timeout` passes; whether one is waiting.
    pub fn wait(&self, timeout: Duration) -> bool {
        self.hub.wait(timeout)
    }

    /// Events dropped because the queue was full (since this handle was taken).
    pub fn dropped(&self) -> u64 {
        self.hub.dropped.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> CheckpointStats {
        let h = &self.hub;
        CheckpointStats {
            idle_records: h.idle_records.load(Ordering::Relaxed),
            busy_events: h.busy_events.load(Ordering::Relaxed),
            record_ns: h.record_ns.load(Ordering::Relaxed),
            failures: h.failures.load(Ordering::Relaxed),
        }
    }

    /// Asks every worker to re-emit `Opened` for every connection it can checkpoint and `Idle`
    /// (with the next epoch) for every one at rest — after the consumer lost events or its
    /// successor changed. The events still queued are discarded first: the consumer should
    /// forget what it knew and rebuild from what follows (events that happen meanwhile stay
    /// in order per flow, so at worst a flow is named twice).
    pub fn resync(&self) {
        self.hub.clear();
        self.shared.checkpoints.changed(&self.shared);
    }
}

impl Drop for Checkpoints {
    /// Checkpointing turns off: the workers stop at their next pass.
    fn drop(&mut self) {
        {
            let mut current = self
                .shared
                .checkpoints
                .hub
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if current.as_ref().is_some_and(|h| Arc::ptr_eq(h, &self.hub)) {
                *current = None;
            }
        }
        self.shared.checkpoints.changed(&self.shared);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn flow(port: u16) -> Flow {
        Flow {
            local: SocketAddr::from(([127, 0, 0, 1], 80)),
            peer: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    #[test]
    fn events_come_out_in_order_and_up_to_max() {
        let hub = Hub::new(CheckpointConfig::default());
        for p in 1..=5 {
            hub.push(CheckpointEvent::Opened(flow(p)));
        }
        let mut out = Vec::new();
        assert_eq!(hub.drain(&mut out, 3), 3);
        assert_eq!(hub.drain(&mut out, 10), 2);
        assert_eq!(hub.drain(&mut out, 10), 0);
        let ports: Vec<u16> = out
            .iter()
            .map(|e| match e {
                CheckpointEvent::Opened(f) => f.peer.port(),
                _ => 0,
            })
            .collect();
        assert_eq!(ports, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let hub = Hub::new(CheckpointConfig {
            queue_max: 2,
            ..CheckpointConfig::default()
        });
        for p in 1..=5 {
            hub.push(CheckpointEvent::Closed(flow(p)));
        }
        assert_eq!(hub.dropped.load(Ordering::Relaxed), 3);
        let mut out = Vec::new();
        assert_eq!(hub.drain(&mut out, 10), 2);
        assert_eq!(out[1], CheckpointEvent::Closed(flow(2)));
        hub.push(CheckpointEvent::Closed(flow(6)));
        assert_eq!(hub.drain(&mut out, 10), 1);
    }

    #[test]
    fn wait_times_out_empty_and_wakes_on_a_push() {
        let hub = Arc::new(Hub::new(CheckpointConfig::default()));
        let t = Instant::now();
        assert!(!hub.wait(Duration::from_millis(30)));
        assert!(t.elapsed() >= Duration::from_millis(30));
        let pusher = {
            let hub = hub.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                hub.push(CheckpointEvent::Opened(flow(9)));
            })
        };
        let t = Instant::now();
        assert!(hub.wait(Duration::from_secs(10)));
        assert!(t.elapsed() < Duration::from_secs(5), "woken by the push");
        pusher.join().ok();
        // Something waiting: no wait at all.
        assert!(hub.wait(Duration::from_secs(10)));
    }
}
