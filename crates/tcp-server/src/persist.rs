//! Persistent listeners parked between application instances.
//!
//! When a session that owns a persistent listener dies, its listening socket is not closed:
//! accepting stops, the socket is parked here with any connections accepted but not yet
//! delivered, and the kernel keeps queueing new connections in the listen backlog. A session of
//! the same user that listens on the same address within the grace period takes the socket over,
//! so no connection attempt is refused across an application restart. After the grace period
//! the socket is closed.

use rustix::fd::OwnedFd;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;

pub struct Parked {
    pub fd: OwnedFd,
    pub uid: u32,
    /// Connections accepted for the dead instance but never delivered to it.
    pub orphans: Vec<OwnedFd>,
    pub deadline: Instant,
}

#[derive(Default)]
pub struct Registry {
    parked: Mutex<HashMap<SocketAddr, Parked>>,
}

impl Registry {
    pub fn park(&self, addr: SocketAddr, p: Parked) {
        if let Ok(mut m) = self.parked.lock() {
            tracing::info!(%addr, orphans = p.orphans.len(), "parked persistent listener");
            m.insert(addr, p);
        }
    }

    /// Takes over a parked listener on `addr` if `uid` owns it. An address given with port 0
    /// never matches (it asks for a fresh ephemeral port).
    pub fn take(&self, addr: SocketAddr, uid: u32) -> Option<Parked> {
        if addr.port() == 0 {
            return None;
        }
        let mut m = self.parked.lock().ok()?;
        match m.get(&addr) {
            Some(p) if p.uid == uid => m.remove(&addr),
            _ => None,
        }
    }

    /// Closes listeners whose grace period has passed.
    pub fn expire(&self, now: Instant) {
        if let Ok(mut m) = self.parked.lock() {
            m.retain(|addr, p| {
                let keep = p.deadline > now;
                if !keep {
                    tracing::info!(%addr, "persistent listener expired; closing it");
                }
                keep
            });
        }
    }

    pub fn len(&self) -> usize {
        self.parked.lock().map(|m| m.len()).unwrap_or(0)
    }
}
