//! The sending node's side of a move: take the connections out of service, save them, send
//! their records to the other node, report to the operator; on `Commit` drop this node's
//! copies without a packet and stream the bytes the server had queued for them; on anything
//! else put them back into service here.

use crate::node::{Ctx, CONNECT_TIMEOUT, EXPORT_TIMEOUT, FLAG_EOF, FLAG_NODELAY, VERDICT_TIMEOUT};
use crate::wire::{self, Flow, Message, WireError};
use splitos_repair::{socket, RepairError};
use splitos_tcp_server::migration::Exported;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

/// Switches a connection that did not move out of repair mode; dropping it then puts it back
/// into service.
fn resume(e: &Exported) {
    if let Some(fd) = e.fd() {
        if let Err(err) = socket::pause(fd).and_then(|p| p.resume()) {
            tracing::error!(flow = %e.flow, "cannot resume a connection that did not move: {err}");
        }
    }
}

/// Saves a connection taken out of service; it stays in repair mode (silent). The bytes the
/// server had queued are not in the record: they follow the commit in data frames.
fn save(e: &Exported) -> Result<Vec<u8>, RepairError> {
    let Some(fd) = e.fd() else {
        return Err(RepairError::Sys {
            step: "finding the socket",
            source: std::io::Error::from_raw_os_error(rustix::io::Errno::BADF.raw_os_error()),
        });
    };
    let nodelay = rustix::net::sockopt::tcp_nodelay(fd).unwrap_or(false);
    let saved = socket::pause(fd)?.save()?;
    let user = socket::UserState {
        flags: if e.eof { FLAG_EOF } else { 0 } | if nodelay { FLAG_NODELAY } else { 0 },
        server_unsent: &[],
        server_held: &e.held,
        app_unanswered: &[],
    };
    Ok(saved.repr(user).to_vec()?)
}

fn moved_none(op: &mut TcpStream, refused: Vec<(Flow, String)>) -> Result<(), WireError> {
    wire::write_message(
        op,
        &Message::Moved {
            moved: vec![],
            refused,
        },
    )
}

pub(crate) fn move_out(
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
        return moved_none(op, refused);
    }
    let mut peer = match send_batch(to, &saved) {
        Ok(p) => p,
        Err(e) => {
            undo_all(saved, &mut refused, &format!("the other node: {e}"));
            return moved_none(op, refused);
        }
    };
    let (ok, failed) = match wire::read_message(&mut peer) {
        Ok(Message::Restored { ok, failed }) => (ok, failed),
        Ok(m) => {
            let e = format!("the other node answered {}", wire::name(&m));
            undo_all(saved, &mut refused, &e);
            return moved_none(op, refused);
        }
        Err(e) => {
            undo_all(saved, &mut refused, &format!("the other node: {e}"));
            return moved_none(op, refused);
        }
    };
    let restored_at = started.elapsed();
    // The other node answers in record order; the data frames after the commit go in the
    // same order, for the restored ones only.
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
    match reported.and_then(|()| wire::read_message(op)) {
        Ok(Message::Commit) => {
            let n = commit(op, &mut peer, moving)?;
            wire::write_message(op, &Message::Done { n })
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

/// The switch sends the moved flows to the other node now: it goes live with them while this
/// node drops its copies without a packet and streams what its server had queued for them.
/// Returns how many the other node put into service.
fn commit(
    op: &mut TcpStream,
    peer: &mut TcpStream,
    moving: Vec<Exported>,
) -> Result<usize, WireError> {
    wire::write_message(peer, &Message::Commit)?;
    let live = wire::read_message(peer);
    // Passed on at once: the operator releases the flows' held packets on it.
    let forwarded = match &live {
        Ok(m @ Message::Live { .. }) => wire::write_message(op, m),
        Ok(m) => Err(WireError::Unexpected {
            expected: "Live",
            got: wire::name(m),
        }),
        Err(e) => Err(WireError::Remote(format!("the other node: {e}"))),
    };
    let mut w = std::io::BufWriter::with_capacity(256 << 10, &mut *peer);
    let mut streamed = Ok(());
    for mut e in moving {
        let flow = e.flow;
        let unsent = std::mem::take(&mut e.unsent);
        if let Some(fd) = e.moved() {
            if let Err(err) = socket::close_silently(fd) {
                tracing::warn!(%flow, "cannot close a moved connection silently: {err}");
            }
        }
        if streamed.is_err() {
            continue; // the link broke: the rest are only closed
        }
        streamed = unsent
            .for_each_piece(wire::DATA_MAX, |piece| {
                wire::write_data(&mut w, piece).map_err(|e| match e {
                    WireError::Io(io) => io,
                    other => std::io::Error::other(other.to_string()),
                })
            })
            .map_err(WireError::Io)
            .and_then(|()| wire::write_data(&mut w, &[]));
    }
    forwarded?;
    streamed?;
    w.flush()?;
    drop(w);
    match wire::read_message(peer)? {
        Message::Done { n } => Ok(n),
        m => Err(WireError::Unexpected {
            expected: "Done",
            got: wire::name(&m),
        }),
    }
}

fn send_batch(to: SocketAddr, saved: &[(Exported, Vec<u8>)]) -> Result<TcpStream, WireError> {
    let mut peer = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)?;
    peer.set_nodelay(true)?;
    peer.set_read_timeout(Some(VERDICT_TIMEOUT))?;
    peer.set_write_timeout(Some(VERDICT_TIMEOUT))?;
    let mut w = std::io::BufWriter::with_capacity(256 << 10, &mut peer);
    let unsent = saved.iter().map(|(e, _)| e.unsent.len()).collect();
    wire::write_message(
        &mut w,
        &Message::Batch {
            count: saved.len(),
            unsent,
        },
    )?;
    for (_, rec) in saved {
        wire::write_record(&mut w, rec)?;
    }
    w.flush()?;
    drop(w);
    Ok(peer)
}
