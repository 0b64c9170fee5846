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
//!
//! Ports belong to users. Every listening socket is the server's, so the kernel's own rule
//! (only sockets of one uid share a port through SO_REUSEPORT) cannot tell tenants apart: the
//! registry keeps, per port, which users listen on which addresses (live or parked), and
//! refuses a listen that overlaps another user's (EADDRINUSE). Parked listeners are kept per
//! (address, user), several per key: an application with several REUSE_PORT sessions on one
//! address parks them all, and its next instance takes them over one by one.

use crate::budget::{Account, Ledger, Res};
use rustix::fd::OwnedFd;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// Bytes owed to the client before anything its next owner writes (the responses a
    /// connection that moved from another node had queued there).
    pub unsent: crate::migration::Queued,
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

/// Users listening on a port: (address, user, listeners live or parked there).
type Claims = Vec<(IpAddr, u32, u32)>;

/// `a` as the kernel compares it: an IPv4-mapped IPv6 address is the IPv4 address.
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether listeners on `a` and `b` (same port) would receive some of the same connections:
/// the same address, or a wildcard covering the other (`::` covers IPv4 too: the server never
/// sets IPV6_V6ONLY).
pub(crate) fn overlaps(a: IpAddr, b: IpAddr) -> bool {
    match (canonical(a), canonical(b)) {
        (IpAddr::V4(x), IpAddr::V4(y)) => x == y || x.is_unspecified() || y.is_unspecified(),
        (IpAddr::V6(x), IpAddr::V6(y)) => x == y || x.is_unspecified() || y.is_unspecified(),
        (IpAddr::V6(x), IpAddr::V4(_)) | (IpAddr::V4(_), IpAddr::V6(x)) => x.is_unspecified(),
    }
}

#[derive(Default)]
pub struct Registry {
    parked: Mutex<HashMap<(SocketAddr, u32), VecDeque<Parked>>>,
    /// Who listens where, by port (see the module documentation).
    ports: Mutex<HashMap<u16, Claims>>,
    handed: Mutex<HashMap<SocketAddr, Vec<Handed>>>,
    /// Connections in `handed`, read without the lock on every worker pass.
    handed_count: AtomicUsize,
    /// Bumped by every hand-off, so a worker looks for owners only when something new waits.
    handed_version: AtomicU64,
}

impl Registry {
    /// Opens a listener for user `uid` with `open` (which returns it and the address it got),
    /// unless another user listens on an overlapping address of that port (EADDRINUSE); the
    /// user's claim on the address is recorded. The check, the bind and the record happen
    /// under one lock, so two users cannot race each other onto a port; the bound address is
    /// checked again (a port-0 bind with SO_REUSEPORT may land on a port in use).
    pub fn open_listener<T>(
        &self,
        addr: SocketAddr,
        uid: u32,
        open: impl FnOnce() -> rustix::io::Result<(T, SocketAddr)>,
    ) -> rustix::io::Result<(T, SocketAddr)> {
        let mut ports = match self.ports.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let taken = |ports: &HashMap<u16, Claims>, a: SocketAddr| {
            ports.get(&a.port()).is_some_and(|claims| {
                claims
                    .iter()
                    .any(|&(ip, owner, _)| owner != uid && overlaps(ip, a.ip()))
            })
        };
        if addr.port() != 0 && taken(&ports, addr) {
            tracing::info!(%addr, uid, "listen refused: another user listens on that port");
            return Err(rustix::io::Errno::ADDRINUSE);
        }
        let (sock, local) = open()?;
        if taken(&ports, local) {
            tracing::info!(%local, uid, "listen refused: another user listens on that port");
            return Err(rustix::io::Errno::ADDRINUSE);
        }
        let claims = ports.entry(local.port()).or_default();
        match claims
            .iter_mut()
            .find(|(ip, owner, _)| *ip == local.ip() && *owner == uid)
        {
            Some(c) => c.2 += 1,
            None => claims.push((local.ip(), uid, 1)),
        }
        Ok((sock, local))
    }

    /// A listener of `uid` on `addr` (recorded by `open_listener`) is closed for good.
    pub fn release_port(&self, addr: SocketAddr, uid: u32) {
        let mut ports = match self.ports.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some(claims) = ports.get_mut(&addr.port()) else {
            return;
        };
        if let Some(i) = claims
            .iter()
            .position(|(ip, owner, _)| *ip == addr.ip() && *owner == uid)
        {
            claims[i].2 -= 1;
            if claims[i].2 == 0 {
                claims.swap_remove(i);
            }
        }
        if claims.is_empty() {
            ports.remove(&addr.port());
        }
    }

    pub fn park(&self, addr: SocketAddr, p: Parked) {
        if let Ok(mut m) = self.parked.lock() {
            tracing::info!(%addr, orphans = p.orphans.len(), "parked persistent listener");
            m.entry((addr, p.uid)).or_default().push_back(p);
        }
    }

    /// Takes over a listener `uid` parked on `addr` (the longest parked, if several). An
    /// address given with port 0 never matches (it asks for a fresh ephemeral port).
    pub fn take(&self, addr: SocketAddr, uid: u32, ledger: &Ledger) -> Option<Parked> {
        if addr.port() == 0 {
            return None;
        }
        let mut m = self.parked.lock().ok()?;
        let list = m.get_mut(&(addr, uid))?;
        let p = list.pop_front();
        if list.is_empty() {
            m.remove(&(addr, uid));
        }
        let p = p?;
        ledger.give(&p.acct, Res::Parked, 1);
        Some(p)
    }

    /// The live or parked persistent listener whose address covers `local` (the same address,
    /// or a wildcard, on the same port), and its owner: where a connection to `local` that
    /// arrives from elsewhere belongs.
    pub fn listener_for(&self, local: SocketAddr) -> Option<(SocketAddr, u32)> {
        let ports = match self.ports.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let claims = ports.get(&local.port())?;
        let exact = claims
            .iter()
            .find(|&&(ip, _, _)| canonical(ip) == canonical(local.ip()));
        exact
            .or_else(|| claims.iter().find(|&&(ip, _, _)| overlaps(ip, local.ip())))
            .map(|&(ip, uid, _)| (SocketAddr::new(ip, local.port()), uid))
    }

    /// Leaves a connection accepted on `addr` for the next owner of that address.
    pub fn hand_over(&self, addr: SocketAddr, h: Handed) {
        if let Ok(mut m) = self.handed.lock() {
            m.entry(addr).or_default().push(h);
            self.handed_count.fetch_add(1, Ordering::AcqRel);
            self.handed_version.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Changes whenever a connection is handed off (see `Worker::adopt_handed`).
    pub fn handed_version(&self) -> u64 {
        self.handed_version.load(Ordering::Acquire)
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
        let mut expired = Vec::new();
        if let Ok(mut m) = self.parked.lock() {
            for ((addr, uid), list) in m.iter_mut() {
                list.retain(|p| {
                    let keep = p.deadline > now;
                    if !keep {
                        tracing::info!(%addr, "persistent listener expired; closing it");
                        ledger.give(&p.acct, Res::Parked, 1);
                        expired.push((*addr, *uid));
                    }
                    keep
                });
            }
            m.retain(|_, list| !list.is_empty());
        }
        for (addr, uid) in expired {
            self.release_port(addr, uid);
        }
    }

    /// Listeners parked now.
    pub fn len(&self) -> usize {
        self.parked
            .lock()
            .map(|m| m.values().map(|l| l.len()).sum())
            .unwrap_or(0)
    }
}

/// Gives back what a handed-off connection was charged.
fn give_handed(ledger: &Ledger, h: &Handed) {
    ledger.give(&h.acct, Res::Handed, 1);
    ledger.give(&h.acct, Res::HandedBytes, h.data.len() as u64);
}

#[cfg(test)]
mod tests {
    use super::overlaps;

    #[test]
    fn addresses_overlap_as_the_kernel_delivers_connections() {
        let ip = |s: &str| s.parse().unwrap();
        for (a, b) in [
            ("127.0.0.1", "127.0.0.1"),
            ("0.0.0.0", "127.0.0.1"),
            ("::", "127.0.0.1"),
            ("::", "::1"),
            ("::ffff:127.0.0.1", "127.0.0.1"),
            ("::ffff:0.0.0.0", "10.0.0.1"),
        ] {
            assert!(overlaps(ip(a), ip(b)), "{a} {b}");
            assert!(overlaps(ip(b), ip(a)), "{b} {a}");
        }
        for (a, b) in [
            ("127.0.0.1", "127.0.0.2"),
            ("0.0.0.0", "::1"),
            ("::1", "::2"),
            ("10.0.0.1", "::1"),
        ] {
            assert!(!overlaps(ip(a), ip(b)), "{a} {b}");
        }
    }
}
