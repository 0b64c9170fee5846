//! Persistent listeners parked between application instances.
//!
//! When a session that owns a persistent listener dies, its listening socket is not closed:
//! accepting stops, the socket is parked here with any connections accepted but not yet
//! delivered, and the kernel keeps queueing new connections in the listen backlog. A session of
//! the same user that listens on the same address within the grace period takes the socket over,
//! so no connection attempt is refused across an application restart. After the grace period
//! the socket is closed.
//!
//! Connections travel the same way. An application instance that is being replaced pauses each
//! connection between requests and hands it off ([`Registry::hand_over`]) with the bytes it
//! received but did not process; the worker that owns a live persistent listener on the
//! connection's address (the new instance's) adopts it, and until one does, it waits here for
//! the grace period. The fd moves between workers; its unprocessed bytes move with it.

use crate::budget::{Account, Ledger, Res};
use rustix::fd::OwnedFd;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A connection an application instance handed off, waiting for its next owner.
pub struct Handed {
    pub fd: OwnedFd,
    pub uid: u32,
    /// Charged for it (`Res::Handed`, and `Res::HandedBytes` for `data`) until it is adopted
    /// or expires.
    pub(crate) acct: Arc<Account>,
    /// Received bytes nobody has processed yet, in stream order.
    pub data: Vec<u8>,
    /// The peer had already shut down its side.
    pub eof: bool,
    pub deadline: Instant,
}

pub struct Parked {
    pub fd: OwnedFd,
    pub uid: u32,
    /// Charged for it (`Res::Parked`) until it is taken over or expires.
    pub(crate) acct: Arc<Account>,
    /// Connections accepted for the dead instance but never delivered to it.
    pub orphans: Vec<OwnedFd>,
    pub deadline: Instant,
}

#[derive(Default)]
pub struct Registry {
    parked: Mutex<HashMap<SocketAddr, Parked>>,
    handed: Mutex<HashMap<SocketAddr, Vec<Handed>>>,
    /// Connections in `handed`, read without the lock on every worker pass.
    handed_count: AtomicUsize,
}

impl Registry {
    pub fn park(&self, addr: SocketAddr, p: Parked, ledger: &Ledger) {
        if let Ok(mut m) = self.parked.lock() {
            tracing::info!(%addr, orphans = p.orphans.len(), "parked persistent listener");
            if let Some(old) = m.insert(addr, p) {
                ledger.give(&old.acct, Res::Parked, 1);
            }
        }
    }

    /// Takes over a parked listener on `addr` if `uid` owns it. An address given with port 0
    /// never matches (it asks for a fresh ephemeral port).
    pub fn take(&self, addr: SocketAddr, uid: u32, ledger: &Ledger) -> Option<Parked> {
        if addr.port() == 0 {
            return None;
        }
        let mut m = self.parked.lock().ok()?;
        let p = match m.get(&addr) {
            Some(p) if p.uid == uid => m.remove(&addr),
            _ => None,
        }?;
        ledger.give(&p.acct, Res::Parked, 1);
        Some(p)
    }

    /// Leaves a connection accepted on `addr` for the next owner of that address.
    pub fn hand_over(&self, addr: SocketAddr, h: Handed) {
        if let Ok(mut m) = self.handed.lock() {
            m.entry(addr).or_default().push(h);
            self.handed_count.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Whether any handed-off connection waits for an owner.
    pub fn has_handed(&self) -> bool {
        self.handed_count.load(Ordering::Acquire) > 0
    }

    /// Takes the connections handed off on `addr` by applications of user `uid`.
    pub fn take_handed(&self, addr: SocketAddr, uid: u32, ledger: &Ledger) -> Vec<Handed> {
        let Ok(mut m) = self.handed.lock() else {
            return Vec::new();
        };
        let Some(list) = m.get_mut(&addr) else {
            return Vec::new();
        };
        let (mine, rest): (Vec<Handed>, Vec<Handed>) = list.drain(..).partition(|h| h.uid == uid);
        *list = rest;
        if list.is_empty() {
            m.remove(&addr);
        }
        self.handed_count.fetch_sub(mine.len(), Ordering::AcqRel);
        for h in &mine {
            give_handed(ledger, h);
        }
        mine
    }

    /// Closes listeners and handed-off connections whose grace period has passed.
    pub fn expire(&self, now: Instant, ledger: &Ledger) {
        if let Ok(mut m) = self.handed.lock() {
            for (addr, list) in m.iter_mut() {
                let before = list.len();
                list.retain(|h| {
                    let keep = h.deadline > now;
                    if !keep {
                        give_handed(ledger, h);
                    }
                    keep
                });
                if list.len() < before {
                    tracing::warn!(%addr, closed = before - list.len(), "handed-off connections found no new owner in time; closing them");
                    self.handed_count
                        .fetch_sub(before - list.len(), Ordering::AcqRel);
                }
            }
            m.retain(|_, list| !list.is_empty());
        }
        if let Ok(mut m) = self.parked.lock() {
            m.retain(|addr, p| {
                let keep = p.deadline > now;
                if !keep {
                    tracing::info!(%addr, "persistent listener expired; closing it");
                    ledger.give(&p.acct, Res::Parked, 1);
                }
                keep
            });
        }
    }

    pub fn len(&self) -> usize {
        self.parked.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// Gives back what a handed-off connection was charged.
fn give_handed(ledger: &Ledger, h: &Handed) {
    ledger.give(&h.acct, Res::Handed, 1);
    ledger.give(&h.acct, Res::HandedBytes, h.data.len() as u64);
}
