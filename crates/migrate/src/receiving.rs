//! The receiving node's side of a move: restore each record silently and report; on `Commit`
//! take the sockets out of repair mode at once (the kernel sends what it holds for them), read
//! the bytes the old server had queued for each, and hand each connection to its listener's
//! owner here; on anything else drop them without a packet.

use crate::node::{Ctx, FLAG_EOF, FLAG_NODELAY};
use crate::wire::{self, Flow, Frame, Message, WireError};
use splitos_repair::{record, socket};
use splitos_tcp_server::migration::{Imported, Queued, Reservation};
use std::net::TcpStream;

/// Bytes a receiving node holds for restored connections of one batch before they go live
/// (their queued responses and unanswered requests); records beyond it are refused.
const BATCH_BYTES_MAX: u64 = 1 << 30;

/// A connection restored here, silent until the commit.
struct Arrival {
    restoring: socket::Restoring,
    /// Its place in the TCP server, taken before the commit.
    reservation: Reservation,
    flow: Flow,
    /// Bytes its old server had queued: they arrive after the commit.
    unsent: u64,
    held: Vec<u8>,
    eof: bool,
}

fn abandon(arrivals: Vec<Arrival>) {
    for x in arrivals {
        if let Err(e) = x.restoring.abandon() {
            tracing::warn!(flow = %x.flow, "cannot drop a restored connection silently: {e}");
        }
    }
}

fn unexpected(expected: &'static str, got: Frame) -> WireError {
    WireError::Unexpected {
        expected,
        got: match got {
            Frame::Message(m) => wire::name(&m),
            Frame::Record(_) => "a record".into(),
            Frame::Data(_) => "a data frame".into(),
        },
    }
}

pub(crate) fn move_in(
    ctx: &Ctx,
    a: &mut TcpStream,
    count: usize,
    unsent: Vec<u64>,
) -> Result<(), WireError> {
    if unsent.len() != count {
        return Err(WireError::Remote(format!(
            "a batch of {count} records with {} queue lengths",
            unsent.len()
        )));
    }
    let mut arrivals: Vec<Arrival> = Vec::new();
    let mut failed = Vec::new();
    let mut batch_bytes = 0u64;
    for &queued in &unsent {
        let bytes = match wire::read_frame(a) {
            Ok(Frame::Record(b)) => b,
            Ok(other) => {
                abandon(arrivals);
                return Err(unexpected("a record", other));
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
        let reservation = match ctx.migration.reserve(repr.local) {
            Ok(r) => r,
            Err(e) => {
                failed.push((flow, e.to_string()));
                continue;
            }
        };
        let size = queued
            + (repr.server_unsent.len() + repr.server_held.len() + repr.app_unanswered.len())
                as u64;
        if batch_bytes + size > BATCH_BYTES_MAX {
            failed.push((flow, "over the bytes one batch may hold".to_string()));
            continue;
        }
        if !repr.server_unsent.is_empty() {
            failed.push((flow, "queued bytes inside the record".to_string()));
            continue;
        }
        match socket::restore(&repr, socket::RestoreOptions::default()) {
            Ok(restoring) => {
                if repr.user_flags & FLAG_NODELAY != 0 {
                    let _ = rustix::net::sockopt::set_tcp_nodelay(restoring.fd(), true);
                }
                batch_bytes += size;
                let mut held = repr.app_unanswered.to_vec();
                held.extend_from_slice(repr.server_held);
                arrivals.push(Arrival {
                    restoring,
                    reservation,
                    flow,
                    unsent: queued,
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
            let n = go_live(ctx, a, arrivals)?;
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

/// Out of repair mode, all of them first (the switch already sends their packets here); then
/// each one's queued bytes, and into service.
fn go_live(ctx: &Ctx, a: &mut TcpStream, arrivals: Vec<Arrival>) -> Result<usize, WireError> {
    let mut live = Vec::with_capacity(arrivals.len());
    for x in arrivals {
        let fd = match x.restoring.finish() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::error!(flow = %x.flow, "a moved connection could not go live: {e}");
                None
            }
        };
        live.push((fd, x.reservation, x.flow, x.unsent, x.held, x.eof));
    }
    let n_live = live.iter().filter(|x| x.0.is_some()).count();
    wire::write_message(a, &Message::Live { n: n_live })?;
    let mut n = 0;
    for (fd, reservation, flow, declared, held, eof) in live {
        let mut unsent = Vec::with_capacity(declared.min(BATCH_BYTES_MAX) as usize);
        loop {
            match wire::read_frame(a)? {
                Frame::Data(d) if d.is_empty() => break,
                Frame::Data(d) => {
                    if unsent.len() as u64 + d.len() as u64 > declared {
                        return Err(WireError::Remote(format!(
                            "more queued bytes than the {declared} announced for {flow}"
                        )));
                    }
                    unsent.extend_from_slice(&d);
                }
                other => return Err(unexpected("a data frame", other)),
            }
        }
        let Some(fd) = fd else { continue };
        let c = Imported {
            fd,
            local: flow.local,
            unsent: Queued::from_bytes(unsent),
            held,
            eof,
        };
        ctx.migration.import(reservation, c);
        n += 1;
    }
    Ok(n)
}
