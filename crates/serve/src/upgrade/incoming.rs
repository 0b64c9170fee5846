//! The new process's side of `splitos upgrade` (`splitos serve --upgrade-from PATH`): connect
//! to the old process, take its listeners, and once this process's application listens, take
//! every connection it sends.

use super::{me, UpgradeError, RECORD_LIMIT, UPGRADE_LIMIT};
use crate::handover::{Link, Msg};
use rustix::fd::OwnedFd;
use rustix::net::{sockopt, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use splitos_tcp_server::migration::{Imported, Migration, Queued};
use std::net::SocketAddr;
use std::path::Path;

/// The link to the old process, and the listeners it sent.
pub(crate) struct Incoming {
    link: Link,
    listeners: Vec<OwnedFd>,
}

fn protocol(s: impl Into<String>) -> UpgradeError {
    UpgradeError::Protocol(s.into())
}

impl Incoming {
    /// Connects to the old process at `path` (it must be this process's parent, of this user)
    /// and receives its listeners.
    pub(crate) fn connect(path: &Path) -> Result<Incoming, UpgradeError> {
        let socket_err = |e: rustix::io::Errno| UpgradeError::Socket {
            path: path.to_path_buf(),
            source: e.into(),
        };
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(socket_err)?;
        rustix::net::connect(&fd, &SocketAddrUnix::new(path).map_err(socket_err)?)
            .map_err(socket_err)?;
        let peer = sockopt::socket_peercred(&fd).map_err(socket_err)?;
        let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
        if peer.uid.as_raw() != me() || peer.pid.as_raw_nonzero().get() != parent {
            return Err(protocol(format!(
                "{} is answered by pid {} of uid {}, not by the process that started this one",
                path.display(),
                peer.pid.as_raw_nonzero(),
                peer.uid.as_raw()
            )));
        }
        let link = Link::new(fd);
        link.send(
            &Msg::Hello {
                pid: std::process::id(),
            },
            &[],
        )?;
        match link.recv(RECORD_LIMIT)? {
            (Msg::Listeners { .. }, listeners) => Ok(Incoming { link, listeners }),
            (m, _) => Err(protocol(format!("expected the listeners, got {m:?}"))),
        }
    }

    /// Parks the listeners in this process's TCP server, so that the application's listen
    /// takes them over; returns the address they listen on.
    pub(crate) fn adopt(&mut self, m: &Migration) -> Result<SocketAddr, UpgradeError> {
        let mut addr = None;
        for fd in std::mem::take(&mut self.listeners) {
            let a = m
                .adopt_listener(fd, me())
                .map_err(|e| protocol(format!("a listener from the old process: {e}")))?;
            match addr {
                None => addr = Some(a),
                Some(first) if first != a => {
                    return Err(protocol(format!(
                        "listeners on {first} and {a}: one address only"
                    )))
                }
                Some(_) => {}
            }
        }
        addr.ok_or_else(|| protocol("no listener"))
    }

    /// Tells the old process why this one gives up (it serves on).
    pub(crate) fn fail(&self, why: &str) {
        let _ = self.link.send(&Msg::Failed(why.to_string()), &[]);
    }

    /// Says that the application listens, then takes every connection the old process sends
    /// until it is done; returns how many were taken. A connection that cannot be taken here
    /// is refused (the old process keeps or closes it); a bad record ends the hand-over.
    pub(crate) fn receive(self, m: &Migration) -> Result<u64, UpgradeError> {
        self.link.send(&Msg::Ready, &[])?;
        let mut taken = 0;
        loop {
            let (msg, mut fds) = self.link.recv(UPGRADE_LIMIT)?;
            let (seq, unsent, held, eof) = match msg {
                Msg::Done { count } => {
                    if count != taken {
                        tracing::warn!(count, taken, "upgrade: the old process counts otherwise");
                    }
                    return Ok(taken);
                }
                Msg::Conn {
                    seq,
                    unsent,
                    held,
                    eof,
                } => (seq, unsent, held, eof),
                m => return Err(protocol(format!("expected a connection, got {m:?}"))),
            };
            let fd = fds
                .pop()
                .ok_or_else(|| protocol("a connection without its socket"))?;
            let mut bytes = Vec::with_capacity((unsent + held) as usize);
            while (bytes.len() as u64) < unsent + held {
                match self.link.recv(RECORD_LIMIT)? {
                    (Msg::Data(d), _) if (bytes.len() + d.len()) as u64 <= unsent + held => {
                        bytes.extend_from_slice(&d)
                    }
                    (m, _) => {
                        return Err(protocol(format!(
                            "expected {} more bytes of connection {seq}, got {m:?}",
                            unsent + held - bytes.len() as u64
                        )))
                    }
                }
            }
            let held_bytes = bytes.split_off(unsent as usize);
            let error = match connection_addr(&fd) {
                Err(why) => Some(why.to_string()),
                Ok(local) => match m.reserve(local) {
                    Ok(room) => {
                        m.import(
                            room,
                            Imported {
                                fd,
                                local,
                                unsent: Queued::from_bytes(bytes),
                                held: held_bytes,
                                eof,
                            },
                        );
                        None
                    }
                    Err(e) => Some(e.to_string()),
                },
            };
            if error.is_none() {
                taken += 1;
            }
            self.link.send(&Msg::Ack { seq, error }, &[])?;
        }
    }
}

/// The local address of a connected TCP socket; anything else is refused.
fn connection_addr(fd: &OwnedFd) -> Result<SocketAddr, &'static str> {
    if sockopt::socket_type(fd).ok() != Some(SocketType::STREAM)
        || sockopt::socket_acceptconn(fd).unwrap_or(true)
    {
        return Err("not a connected stream socket");
    }
    rustix::net::getsockname(fd)
        .ok()
        .and_then(|a| SocketAddr::try_from(a).ok())
        .ok_or("not an IP socket")
}
