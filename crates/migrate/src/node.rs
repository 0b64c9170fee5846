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

use crate::wire::{self, Flow, Frame, Message, WireError};
use splitos_repair::{record, socket, RepairError};
use splitos_tcp_server::migration::{Exported, Imported, Migration};
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Conversations at once; more are told the link is busy.
const SESSIONS_MAX: usize = 8;
/// How long the TCP server's workers may take to let connections go.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a node keeps connections silent waiting for the operator's (or the sending
/// node's) verdict before it undoes the move by itself.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes a receiving node holds for restored connections of one batch before they go live
/// (their queued responses and unanswered requests); records beyond it are refused.
const BATCH_BYTES_MAX: usize = 1 << 30;
/// Record flag: the client had shut down its side (the TCP server's view).
const FLAG_EOF: u32 = 1;

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

fn allowed(allow: &[(IpAddr, u8)], ip: IpAddr) -> bool {
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

struct Ctx {
    migration: Migration,
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
        Message::Move { to, flows } => move_out(ctx, &mut s, to, flows),
        Message::Batch { count } => move_in(ctx, &mut s, count),
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

/// Switches a connection that did not move out of repair mode; dropping it then puts it back
/// into service.
fn resume(e: &Exported) {
    if let Some(fd) = e.fd() {
        if let Err(err) = socket::pause(fd).and_then(|p| p.resume()) {
            tracing::error!(flow = %e.flow, "cannot resume a connection that did not move: {err}");
        }
    }
}

/// Saves a connection taken out of service; it stays in repair mode (silent).
fn save(e: &Exported) -> Result<Vec<u8>, RepairError> {
    let Some(fd) = e.fd() else {
        return Err(RepairError::Sys {
            step: "finding the socket",
            source: std::io::Error::from_raw_os_error(libc_ebadf()),
        });
    };
    let saved = socket::pause(fd)?.save()?;
    let user = socket::UserState {
        flags: if e.eof { FLAG_EOF } else { 0 },
        server_unsent: &e.unsent,
        server_held: &e.held,
        app_unanswered: &[],
    };
    Ok(saved.repr(user).to_vec()?)
}

fn libc_ebadf() -> i32 {
    rustix::io::Errno::BADF.raw_os_error()
}

/// The sending node: takes the connections out of service, saves them, sends the records to
/// `to`, reports to the operator, and on `Commit` drops its copies (on anything else puts
/// them back into service).
fn move_out(
    ctx: &Ctx,
    op: &mut TcpStream,
    to: SocketAddr,
    flows: Vec<Flow>,
) -> Result<(), WireError> {
    let started = Instant::now();
    let wanted: Vec<_> = flows.iter().map(|&f| f.into()).collect();
    let exports = ctx
        .migration
        .export(&wanted, EXPORT_TIMEOUT)
        .map_err(|e| WireError::Remote(e.to_string()))?;
    let mut refused: Vec<(Flow, String)> = exports
        .refused
        .into_iter()
        .map(|(f, why)| (f.into(), why))
        .collect();
    let exported_at = started.elapsed();
    let mut saved: Vec<(Exported, Vec<u8>)> = Vec::new();
    for e in exports.moved {
        match save(&e) {
            Ok(rec) => saved.push((e, rec)),
            Err(err) => {
                resume(&e);
                refused.push((e.flow.into(), format!("cannot save it: {err}")));
            }
        }
    }
    let saved_at = started.elapsed();
    let undo_all =
        |saved: Vec<(Exported, Vec<u8>)>, refused: &mut Vec<(Flow, String)>, why: &str| {
            for (e, _) in saved {
                resume(&e);
                refused.push((e.flow.into(), why.to_string()));
            }
        };
    if saved.is_empty() {
        return wire::write_message(
            op,
            &Message::Moved {
                moved: vec![],
                refused,
            },
        );
    }
    let mut peer = match send_batch(to, &saved) {
        Ok(p) => p,
        Err(e) => {
            undo_all(saved, &mut refused, &format!("the other node: {e}"));
            return wire::write_message(
                op,
                &Message::Moved {
                    moved: vec![],
                    refused,
                },
            );
        }
    };
    let (ok, failed) = match wire::read_message(&mut peer) {
        Ok(Message::Restored { ok, failed }) => (ok, failed),
        Ok(m) => {
            let e = format!("the other node answered {}", wire::name(&m));
            undo_all(saved, &mut refused, &e);
            return wire::write_message(
                op,
                &Message::Moved {
                    moved: vec![],
                    refused,
                },
            );
        }
        Err(e) => {
            undo_all(saved, &mut refused, &format!("the other node: {e}"));
            return wire::write_message(
                op,
                &Message::Moved {
                    moved: vec![],
                    refused,
                },
            );
        }
    };
    let restored_at = started.elapsed();
    let ok_set: std::collections::HashSet<Flow> = ok.iter().copied().collect();
    let mut moving = Vec::new();
    for (e, _) in saved {
        let f: Flow = e.flow.into();
        if ok_set.contains(&f) {
            moving.push(e);
        } else {
            resume(&e);
            let why = failed
                .iter()
                .find(|(x, _)| *x == f)
                .map_or("the other node did not restore it".to_string(), |(_, w)| {
                    format!("the other node: {w}")
                });
            refused.push((f, why));
        }
    }
    tracing::debug!(
        moving = moving.len(),
        refused = refused.len(),
        ?exported_at,
        ?saved_at,
        ?restored_at,
        "connections silent on both nodes; waiting for the operator"
    );
    let moved: Vec<Flow> = moving.iter().map(|e| e.flow.into()).collect();
    let reported = wire::write_message(op, &Message::Moved { moved, refused });
    let verdict = reported.and_then(|()| wire::read_message(op));
    match verdict {
        Ok(Message::Commit) => {
            let done = wire::write_message(&mut peer, &Message::Commit)
                .and_then(|()| wire::read_message(&mut peer));
            // The switch sends these flows to the other node now: this node's copies go
            // without a packet, whatever the other node answered.
            for e in moving {
                let flow = e.flow;
                if let Some(fd) = e.moved() {
                    if let Err(err) = socket::close_silently(fd) {
                        tracing::warn!(%flow, "cannot close a moved connection silently: {err}");
                    }
                }
            }
            match done {
                Ok(Message::Done { n }) => wire::write_message(op, &Message::Done { n }),
                Ok(m) => Err(WireError::Unexpected {
                    expected: "Done",
                    got: wire::name(&m),
                }),
                Err(e) => Err(e),
            }
        }
        other => {
            // Abort, an error or silence: everything stays here.
            let _ = wire::write_message(&mut peer, &Message::Abort);
            let n = moving.len();
            for e in &moving {
                resume(e);
            }
            drop(moving);
            match other {
                Ok(Message::Abort) => wire::write_message(op, &Message::Done { n: 0 }),
                Ok(m) => Err(WireError::Unexpected {
                    expected: "Commit or Abort",
                    got: wire::name(&m),
                }),
                Err(e) => {
                    tracing::warn!(n, "no verdict from the operator; the connections stay here");
                    Err(e)
                }
            }
        }
    }
}

fn send_batch(to: SocketAddr, saved: &[(Exported, Vec<u8>)]) -> Result<TcpStream, WireError> {
    let mut peer = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)?;
    peer.set_nodelay(true)?;
    peer.set_read_timeout(Some(VERDICT_TIMEOUT))?;
    peer.set_write_timeout(Some(VERDICT_TIMEOUT))?;
    let mut w = std::io::BufWriter::with_capacity(256 << 10, &mut peer);
    wire::write_message(&mut w, &Message::Batch { count: saved.len() })?;
    for (_, rec) in saved {
        wire::write_record(&mut w, rec)?;
    }
    w.flush()?;
    drop(w);
    Ok(peer)
}

/// A connection restored here, silent until the commit.
struct Arrival {
    restoring: socket::Restoring,
    flow: Flow,
    unsent: Vec<u8>,
    held: Vec<u8>,
    eof: bool,
}

/// The receiving node: restores each record silently, reports, and on `Commit` puts them into
/// service here (on anything else drops them without a packet).
fn move_in(ctx: &Ctx, a: &mut TcpStream, count: usize) -> Result<(), WireError> {
    let mut arrivals: Vec<Arrival> = Vec::new();
    let mut failed = Vec::new();
    let mut held_bytes = 0usize;
    let abandon = |arrivals: Vec<Arrival>| {
        for x in arrivals {
            if let Err(e) = x.restoring.abandon() {
                tracing::warn!(flow = %x.flow, "cannot drop a restored connection silently: {e}");
            }
        }
    };
    for _ in 0..count {
        let bytes = match wire::read_frame(a) {
            Ok(Frame::Record(b)) => b,
            Ok(Frame::Message(m)) => {
                abandon(arrivals);
                return Err(WireError::Unexpected {
                    expected: "a record",
                    got: wire::name(&m),
                });
            }
            Err(e) => {
                abandon(arrivals);
                return Err(e);
            }
        };
        let repr = match record::parse(&bytes) {
            Ok(r) => r,
            Err(e) => {
                abandon(arrivals);
                return Err(WireError::Remote(format!("a bad record: {e}")));
            }
        };
        let flow = Flow {
            local: repr.local,
            peer: repr.peer,
        };
        if ctx.migration.owner_of(repr.local).is_none() {
            failed.push((flow, format!("nobody listens on {} there", repr.local)));
            continue;
        }
        let size = repr.server_unsent.len() + repr.server_held.len() + repr.app_unanswered.len();
        if held_bytes + size > BATCH_BYTES_MAX {
            failed.push((flow, "over the bytes one batch may hold".to_string()));
            continue;
        }
        match socket::restore(&repr, socket::RestoreOptions::default()) {
            Ok(restoring) => {
                held_bytes += size;
                let mut held = repr.app_unanswered.to_vec();
                held.extend_from_slice(repr.server_held);
                arrivals.push(Arrival {
                    restoring,
                    flow,
                    unsent: repr.server_unsent.to_vec(),
                    held,
                    eof: repr.user_flags & FLAG_EOF != 0,
                });
            }
            Err(e) => failed.push((flow, format!("cannot restore it: {e}"))),
        }
    }
    let ok = arrivals.iter().map(|x| x.flow).collect();
    if let Err(e) = wire::write_message(a, &Message::Restored { ok, failed }) {
        abandon(arrivals);
        return Err(e);
    }
    match wire::read_message(a) {
        Ok(Message::Commit) => {
            let mut n = 0;
            for x in arrivals {
                let flow = x.flow;
                let fd = match x.restoring.finish() {
                    Ok(fd) => fd,
                    Err(e) => {
                        tracing::error!(%flow, "a moved connection could not go live: {e}");
                        continue;
                    }
                };
                let c = Imported {
                    fd,
                    local: flow.local,
                    unsent: x.unsent,
                    held: x.held,
                    eof: x.eof,
                };
                match ctx.migration.import(c) {
                    Ok(()) => n += 1,
                    Err((e, _)) => tracing::error!(%flow, "a moved connection was lost: {e}"),
                }
            }
            wire::write_message(a, &Message::Done { n })
        }
        other => {
            abandon(arrivals);
            match other {
                Ok(Message::Abort) => Ok(()),
                Ok(m) => Err(WireError::Unexpected {
                    expected: "Commit or Abort",
                    got: wire::name(&m),
                }),
                Err(e) => Err(e),
            }
        }
    }
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
