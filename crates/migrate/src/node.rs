//! A node's link: the listener beside its TCP server that answers the operator and carries
//! connection records to and from other nodes (the conversation is in [`crate::wire`]).
//!
//! Everything here runs on the link's own threads, never on a TCP server worker: saving and
//! restoring a connection is a dozen system calls and may wait for the other node.
//!
//! The link trusts what reaches it only as far as its address allowlist: it belongs on the
//! cluster's private network (as a database's replication port does), and a peer outside
//! `allow` is closed on without a word. Every record is checked before it is used, and one
//! bad record ends its batch with an error: the sending node then keeps every connection.

use crate::wire::{self, Flow, Message, WireError};
use splitos_tcp_server::migration::Migration;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Conversations at once; more are told the link is busy.
const SESSIONS_MAX: usize = 8;
/// How long the TCP server's workers may take to let connections go.
pub(crate) const EXPORT_TIMEOUT: Duration = Duration::from_secs(2);
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a node keeps connections silent waiting for the operator's (or the sending
/// node's) verdict before it undoes the move by itself.
pub(crate) const VERDICT_TIMEOUT: Duration = Duration::from_secs(10);
/// Record flag: the client had shut down its side (the TCP server's view).
pub const FLAG_EOF: u32 = 1;
/// Record flag: the socket had TCP_NODELAY on (a fresh socket has it off; left off, Nagle
/// holds a small response back while restored bytes wait for their ACK, and the client's
/// delayed ACK makes that up to 200 ms).
pub const FLAG_NODELAY: u32 = 2;

/// Where a node link listens and whom it talks to.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub listen: SocketAddr,
    /// Networks (address, prefix length) whose hosts may use the link.
    pub allow: Vec<(IpAddr, u8)>,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot listen on {addr} for the node link: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the node link needs at least one --link-allow network")]
    NoAllow,
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("cannot start the node link's thread: {0}")]
    Thread(std::io::Error),
}

/// Parses `ADDR/LEN` (or a bare address, a /32 or /128).
pub fn parse_network(s: &str) -> Result<(IpAddr, u8), String> {
    let (a, l) = s.split_once('/').unwrap_or((s, ""));
    let ip: IpAddr = a
        .parse()
        .map_err(|_| format!("{s:?} is not an address or a network (ADDR/LEN)"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = if l.is_empty() {
        max
    } else {
        l.parse::<u8>()
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?
    };
    Ok((ip, len))
}

/// Whether `ip` is in one of the networks of `allow`.
pub fn allowed(allow: &[(IpAddr, u8)], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    allow.iter().any(|&(net, len)| match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - len as u32).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - len as u32).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    })
}

/// A running node link. Dropping it stops it.
pub struct NodeLink {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    local: SocketAddr,
}

pub(crate) struct Ctx {
    pub(crate) migration: Migration,
    sessions: AtomicUsize,
}

impl NodeLink {
    pub fn start(cfg: LinkConfig, migration: Migration) -> Result<NodeLink, LinkError> {
        if cfg.allow.is_empty() {
            return Err(LinkError::NoAllow);
        }
        let listener = TcpListener::bind(cfg.listen).map_err(|source| LinkError::Listen {
            addr: cfg.listen,
            source,
        })?;
        let local = listener.local_addr().map_err(|source| LinkError::Listen {
            addr: cfg.listen,
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| LinkError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = Arc::new(Ctx {
            migration,
            sessions: AtomicUsize::new(0),
        });
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("splitos-link".into())
            .spawn(move || accept_loop(listener, cfg.allow, ctx, thread_stop))
            .map_err(LinkError::Thread)?;
        tracing::info!(%local, "node link listening");
        Ok(NodeLink {
            stop,
            thread: Some(thread),
            local,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for NodeLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    allow: Vec<(IpAddr, u8)>,
    ctx: Arc<Ctx>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Acquire) {
        let (mut stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Wait for the next connection (a migration's steps are on the clock), waking
                // every 100 ms to see whether the link is stopping.
                let mut fds = [rustix::event::PollFd::new(
                    &listener,
                    rustix::event::PollFlags::IN,
                )];
                let timeout = rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                let _ = rustix::event::poll(&mut fds, Some(&timeout));
                continue;
            }
            Err(e) => {
                tracing::warn!("node link: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if !allowed(&allow, peer.ip()) {
            tracing::warn!(%peer, "node link: a peer outside --link-allow; closing");
            continue;
        }
        if ctx.sessions.fetch_add(1, Ordering::AcqRel) >= SESSIONS_MAX {
            ctx.sessions.fetch_sub(1, Ordering::AcqRel);
            let _ = stream.set_nonblocking(false);
            let _ = wire::write_message(
                &mut stream,
                &Message::Error {
                    message: format!("the node link is busy ({SESSIONS_MAX} conversations)"),
                },
            );
            continue;
        }
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("splitos-link-session".into())
            .spawn(move || {
                if let Err(e) = session(&ctx, stream) {
                    tracing::warn!(%peer, "node link: {e}");
                }
                ctx.sessions.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            tracing::error!("node link: cannot start a session thread: {e}");
        }
    }
}

fn session(ctx: &Ctx, mut s: TcpStream) -> Result<(), WireError> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(VERDICT_TIMEOUT))?;
    s.set_write_timeout(Some(VERDICT_TIMEOUT))?;
    let first = match wire::read_message(&mut s) {
        Ok(m) => m,
        Err(e) => {
            refuse(&mut s, &e.to_string());
            return Err(e);
        }
    };
    let r = match first {
        Message::List { limit } => list(ctx, &mut s, limit),
        Message::Move { to, flows } => crate::sending::move_out(ctx, &mut s, to, flows),
        Message::Batch { count, unsent } => crate::receiving::move_in(ctx, &mut s, count, unsent),
        m => Err(WireError::Unexpected {
            expected: "List, Move or Batch",
            got: wire::name(&m),
        }),
    };
    if let Err(e) = &r {
        refuse(&mut s, &e.to_string());
    }
    r
}

fn refuse(s: &mut TcpStream, message: &str) {
    let _ = wire::write_message(
        s,
        &Message::Error {
            message: message.to_string(),
        },
    );
    let _ = s.flush();
}

fn list(ctx: &Ctx, s: &mut TcpStream, limit: usize) -> Result<(), WireError> {
    let flows = ctx
        .migration
        .flows(limit.min(wire::FLOWS_MAX), EXPORT_TIMEOUT)
        .map_err(|e| WireError::Remote(e.to_string()))?;
    let flows = flows.into_iter().map(Flow::from).collect();
    wire::write_message(s, &Message::Flows { flows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_and_match() {
        let n = parse_network("198.18.0.0/15").unwrap();
        assert!(allowed(&[n], "198.19.255.1".parse().unwrap()));
        assert!(!allowed(&[n], "198.20.0.1".parse().unwrap()));
        assert!(allowed(&[n], "::ffff:198.18.1.2".parse().unwrap()));
        let one = parse_network("127.0.0.1").unwrap();
        assert_eq!(one.1, 32);
        assert!(allowed(&[one], "127.0.0.1".parse().unwrap()));
        assert!(!allowed(&[one], "127.0.0.2".parse().unwrap()));
        assert!(allowed(
            &[parse_network("0.0.0.0/0").unwrap()],
            "1.2.3.4".parse().unwrap()
        ));
        assert!(parse_network("198.18.0.0/33").is_err());
        assert!(parse_network("nonsense").is_err());
    }
}
