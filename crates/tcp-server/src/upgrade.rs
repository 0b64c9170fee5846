//! Listeners and connections passed between two TCP servers on one node: the TCP server's side
//! of a binary upgrade (`splitos upgrade`), where an old process hands everything to a new one
//! over a Unix socket and no `TCP_REPAIR` is needed (the socket itself travels).
//!
//! - [`Migration::listeners`]: copies of the persistent listeners' sockets, for the new
//!   process.
//! - [`Migration::adopt_listener`]: a listening socket from the old process becomes a parked
//!   persistent listener here, so the new application's persistent listen on that address
//!   takes it over (`Registry::take`) and accepts from the same kernel queue: no connection
//!   attempt is refused or lost across the upgrade.
//! - [`Migration::take_parked`] and [`Migration::take_handed`]: what the old application left
//!   in the registry when it drained (its parked listener with the connections accepted for it
//!   and never delivered, and the connections it handed off), taken out to be sent on.
//!
//! Connections go on with [`Migration::export`] and [`Migration::import`] as between nodes.

use crate::budget::Res;
use crate::migration::{Imported, Migration, MigrationError, Reply, What};
use crate::persist::Parked;
use rustix::fd::OwnedFd;
use rustix::net::{sockopt, SocketType};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("not a listening TCP socket ({0})")]
    NotAListener(&'static str),
    #[error("looking at the socket: {0}")]
    Io(#[from] rustix::io::Errno),
    #[error("over the parked listeners budget")]
    Budget,
}

/// The local address of a socket, if it is an IP one.
fn local_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    rustix::net::getsockname(fd)
        .ok()
        .and_then(|a| SocketAddr::try_from(a).ok())
}

impl Migration {
    /// A copy of the socket of every persistent listener that an application holds now, with
    /// its address and owner's uid. Several copies of one socket are never returned.
    pub fn listeners(
        &self,
        timeout: Duration,
    ) -> Result<Vec<(SocketAddr, u32, OwnedFd)>, MigrationError> {
        let (order, rx) = self.ask(What::Listeners)?;
        let deadline = Instant::now() + timeout;
        let mut out: Vec<(SocketAddr, u32, OwnedFd)> = Vec::new();
        let mut answered = 0;
        let result = loop {
            if answered == self.workers() {
                break Ok(());
            }
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Reply::Listeners(l)) => {
                    answered += 1;
                    out.extend(l);
                }
                Ok(_) => {}
                Err(_) => break Err(MigrationError::Timeout(timeout)),
            }
        };
        self.shared.migration.remove(order.id);
        result?;
        // One kernel socket may be held twice (never by this server, but cheap to rule out):
        // a socket is its inode.
        let mut seen = std::collections::HashSet::new();
        out.retain(|(_, _, fd)| rustix::fs::fstat(fd).is_ok_and(|st| seen.insert(st.st_ino)));
        Ok(out)
    }

    /// Parks `fd`, a listening TCP socket passed from another process, as a persistent
    /// listener of `uid` on its address: the next persistent listen of that user there takes
    /// it over. Returns the address.
    pub fn adopt_listener(&self, fd: OwnedFd, uid: u32) -> Result<SocketAddr, AdoptError> {
        if sockopt::socket_type(&fd)? != SocketType::STREAM {
            return Err(AdoptError::NotAListener("not a stream socket"));
        }
        if !sockopt::socket_acceptconn(&fd)? {
            return Err(AdoptError::NotAListener("it does not listen"));
        }
        let local = local_addr(&fd).ok_or(AdoptError::NotAListener("not an IP socket"))?;
        let ledger = &self.shared.ledger;
        let acct = ledger.account(uid);
        ledger
            .take(&acct, Res::Parked, 1)
            .map_err(|_| AdoptError::Budget)?;
        // Recorded as the user's claim on the port, as a listener opened here would be.
        let claimed = self
            .shared
            .registry
            .open_listener(local, uid, || Ok(((), local)));
        if let Err(e) = claimed {
            ledger.give(&acct, Res::Parked, 1);
            return Err(AdoptError::Io(e));
        }
        self.shared.registry.park(
            local,
            Parked {
                fd,
                uid,
                acct,
                orphans: Vec::new(),
                deadline: Instant::now() + self.shared.config.persist_grace,
            },
        );
        Ok(local)
    }

    /// Connections the server holds now, lingering ones included (handed-off ones waiting
    /// for an owner are not).
    pub fn connections(&self) -> u64 {
        self.shared.ledger.total_used(Res::Conns)
    }

    /// Takes out a listener `uid` parked on `addr` for good: its socket and the connections
    /// accepted for its last owner and never delivered.
    pub fn take_parked(&self, addr: SocketAddr, uid: u32) -> Option<(OwnedFd, Vec<OwnedFd>)> {
        let p = self.shared.registry.take(addr, uid, &self.shared.ledger)?;
        self.shared.registry.release_port(addr, uid);
        Some((p.fd, p.orphans))
    }

    /// Takes out the connections handed off on the persistent listener `addr` of `uid` that
    /// wait for an owner, with what travels with them.
    pub fn take_handed(&self, addr: SocketAddr, uid: u32) -> Vec<Imported> {
        self.shared
            .registry
            .take_handed(addr, uid, &self.shared.ledger)
            .into_iter()
            .map(|h| Imported {
                local: local_addr(&h.fd).unwrap_or(addr),
                fd: h.fd,
                unsent: h.unsent,
                held: h.data,
                eof: h.eof,
            })
            .collect()
    }
}
