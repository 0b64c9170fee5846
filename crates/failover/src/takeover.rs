//! A successor takes over a dead node's connections.
//!
//! 1. **Adopt** in etcd ([`Registry::adopt`]): one compare-and-swap on the dead incarnation,
//!    naming every flow the successor knows of it — the ones at rest to restore, the others
//!    to reset. Whoever loses the transaction touches nothing.
//! 2. **Restore** each connection at rest from its record, in repair mode (silent), with its
//!    timestamps moved on by the time since the record was made (`splitos_repair` does that
//!    from the record's clock).
//! 3. **Wait for the switch** to follow the adoption (`applied/NAME/INCARNATION`, written by
//!    the switch controller once the flows are steered here and the dead node is fenced), so
//!    that no client packet reaches a socket that is not there yet (its kernel would reset it).
//! 4. **Go live**: repair off (each sends a window probe), into the TCP server's service like
//!    a migrated connection ([`Migration::import`]).
//! 5. **Verify** ([`crate::verify`]): every client's answer must match its record; the ones that
//!    do not, and every connection that was not at rest, are reset with the exact sequence
//!    number their client accepts, so that no client hangs.

use crate::etcd::{now_ms, Adoption, EtcdError, Member, Registry};
use crate::store::Taken;
use crate::verify::{self, Capture};
use splitos_repair::{record, socket};
use splitos_tcp_server::migration::{Flow, Imported, Migration, Queued};
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a successor waits for the switch to follow its adoption before it goes live
/// anyway (its packets then wait at the dead node's fence, and clients retransmit).
pub const APPLIED_TIMEOUT: Duration = Duration::from_secs(2);
/// How long clients have to answer the check after going live.
pub const VERIFY_WINDOW: Duration = Duration::from_millis(500);

/// Adoptions the switch follows, as the watch sees them.
#[derive(Default)]
pub struct AppliedBoard {
    seen: Mutex<HashSet<(String, i64)>>,
    cv: Condvar,
}

impl AppliedBoard {
    pub fn mark(&self, name: &str, incarnation: i64) {
        if let Ok(mut s) = self.seen.lock() {
            s.insert((name.to_string(), incarnation));
        }
        self.cv.notify_all();
    }

    /// Whether the switch followed `name`'s `incarnation` within `timeout`.
    pub fn wait(&self, name: &str, incarnation: i64, timeout: Duration) -> bool {
        let key = (name.to_string(), incarnation);
        let until = Instant::now() + timeout;
        let Ok(mut s) = self.seen.lock() else {
            return false;
        };
        loop {
            if s.contains(&key) {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = match self.cv.wait_timeout(s, left) {
                Ok((g, _)) => g,
                Err(_) => return false,
            };
        }
    }
}

/// The dead incarnation.
#[derive(Clone, Debug)]
pub struct Dead {
    pub name: String,
    pub incarnation: i64,
    pub addr: Ipv4Addr,
}

/// What a takeover did, with its timings.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    pub dead: String,
    pub incarnation: i64,
    /// This node won the adoption.
    pub adopted: bool,
    pub restored: usize,
    /// Restored, and their client's numbers matched the record.
    pub verified: usize,
    /// Restored, but their client had moved on: reset.
    pub stale: usize,
    /// Not at rest (or not restorable): reset on purpose.
    pub reset: usize,
    /// Resets sent to clients (stale and not at rest) after their answer.
    pub resets_sent: usize,
    pub switch_followed: bool,
    pub adopt_ms: f64,
    pub live_ms: f64,
    pub verify_ms: f64,
    pub errors: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("adopting in etcd: {0}")]
    Etcd(#[from] EtcdError),
}

/// Where a restored connection stands: the numbers its client must answer with.
struct Expect {
    client_seq: u32,
    client_ack: u32,
}

struct Restored {
    flow: Flow,
    restoring: socket::Restoring,
    eof: bool,
    expect: Expect,
}

fn v4(a: SocketAddr) -> Option<SocketAddrV4> {
    match a {
        SocketAddr::V4(v) => Some(v),
        SocketAddr::V6(v) => v
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, v.port())),
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Everything a takeover needs from the node.
pub struct Ctx<'a> {
    pub registry: &'a Registry,
    pub rt: &'a tokio::runtime::Handle,
    pub migration: &'a Migration,
    pub me: &'a Member,
    pub applied: &'a AppliedBoard,
}

/// Takes over `dead`'s connections that this node knows of (`taken`).
pub fn run(ctx: &Ctx<'_>, dead: &Dead, taken: Taken) -> Result<Report, TakeoverError> {
    let start = Instant::now();
    let mut report = Report {
        dead: dead.name.clone(),
        incarnation: dead.incarnation,
        ..Report::default()
    };
    // Which records can be restored here; the rest are reset.
    let mut restore: Vec<(Flow, Vec<u8>)> = Vec::new();
    let mut reset: Vec<Flow> = taken.open;
    for (flow, _epoch, bytes) in taken.idle {
        match record::parse(&bytes).and_then(|r| r.validate().map(|_| r)) {
            Ok(r) if v4(r.local).is_some() && v4(r.peer).is_some() => restore.push((flow, bytes)),
            Ok(_) => reset.push(flow),
            Err(e) => {
                report.errors.push(format!("{flow}: a bad record: {e}"));
                reset.push(flow);
            }
        }
    }
    let clients = |fs: &mut dyn Iterator<Item = &Flow>| -> Vec<SocketAddrV4> {
        fs.filter_map(|f| v4(f.peer)).collect()
    };
    let adoption = Adoption {
        dead: dead.name.clone(),
        incarnation: dead.incarnation,
        dead_addr: dead.addr,
        adopter: ctx.me.info.name.clone(),
        adopter_addr: ctx.me.info.addr,
        restore: clients(&mut restore.iter().map(|(f, _)| f)),
        reset: clients(&mut reset.iter()),
        at_ms: now_ms(),
    };
    let won = ctx.rt.block_on(ctx.registry.adopt(&adoption))?;
    report.adopt_ms = ms(start);
    if won.is_none() {
        tracing::info!(dead = %dead.name, incarnation = dead.incarnation, "another node adopted it, or it lives: nothing taken over");
        return Ok(report);
    }
    report.adopted = true;

    let mut restored = Vec::with_capacity(restore.len());
    for (flow, bytes) in &restore {
        let Ok(r) = record::parse(bytes) else {
            continue;
        };
        match socket::restore(&r, socket::RestoreOptions::default()) {
            Ok(restoring) => {
                if r.user_flags & splitos_migrate::node::FLAG_NODELAY != 0 {
                    let _ = rustix::net::sockopt::set_tcp_nodelay(restoring.fd(), true);
                }
                let fin_sent = u32::from(r.state.fin_sent());
                let fin_recv = u32::from(r.state.fin_received());
                restored.push(Restored {
                    flow: *flow,
                    restoring,
                    eof: r.user_flags & splitos_migrate::node::FLAG_EOF != 0,
                    expect: Expect {
                        client_seq: r
                            .recv_seq
                            .wrapping_add(r.recv_queue.len() as u32)
                            .wrapping_add(fin_recv),
                        client_ack: r
                            .send_seq
                            .wrapping_add(r.send_queue.len() as u32)
                            .wrapping_add(fin_sent),
                    },
                });
            }
            Err(e) => {
                report.errors.push(format!("{flow}: cannot restore: {e}"));
                reset.push(*flow);
            }
        }
    }

    report.switch_followed = ctx
        .applied
        .wait(&dead.name, dead.incarnation, APPLIED_TIMEOUT);
    if !report.switch_followed {
        tracing::warn!(dead = %dead.name, "the switch did not follow the adoption within {APPLIED_TIMEOUT:?}; going live anyway");
    }
    // The capture opens before anything goes live, so no client's answer is missed.
    let mut capture = match Capture::open() {
        Ok(c) => Some(c),
        Err(e) => {
            report
                .errors
                .push(format!("no raw socket to check clients' answers: {e}"));
            None
        }
    };
    let mut expect: HashMap<Flow, Expect> = HashMap::new();
    for x in restored {
        let fd = match x.restoring.finish() {
            Ok(fd) => fd,
            Err(e) => {
                report
                    .errors
                    .push(format!("{}: cannot go live: {e}", x.flow));
                reset.push(x.flow);
                continue;
            }
        };
        let reservation = match ctx.migration.reserve(x.flow.local) {
            Ok(r) => r,
            Err(e) => {
                report.errors.push(format!("{}: {e}", x.flow));
                let _ = socket::close_silently(fd);
                reset.push(x.flow);
                continue;
            }
        };
        ctx.migration.import(
            reservation,
            Imported {
                fd,
                local: x.flow.local,
                unsent: Queued::default(),
                held: Vec::new(),
                eof: x.eof,
            },
        );
        report.restored += 1;
        expect.insert(x.flow, x.expect);
    }
    report.live_ms = ms(start);
    report.reset = reset.len();
    let verify_start = Instant::now();
    if let Some(cap) = capture.as_mut() {
        verify_clients(cap, &mut expect, &reset, &mut report);
    } else {
        for f in &reset {
            if let (Some(l), Some(c)) = (v4(f.local), v4(f.peer)) {
                verify::probe_client(l, c);
            }
        }
    }
    report.verify_ms = ms(verify_start);
    tracing::info!(
        dead = %dead.name,
        incarnation = dead.incarnation,
        restored = report.restored,
        verified = report.verified,
        stale = report.stale,
        reset = report.reset,
        live_ms = report.live_ms,
        "took over a dead node's connections"
    );
    Ok(report)
}

/// Whether sequence number `a` comes after `b` (modulo 2^32).
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// What a client's segment says about a restored connection.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Its numbers are the checkpoint's.
    Agrees,
    /// It holds bytes the checkpoint never had: reset.
    MovedOn,
    /// It has sent bytes past the checkpoint and they are not acknowledged to it here: either
    /// still in flight (its retransmission will start exactly at the checkpoint) or taken by
    /// the dead node (no retransmission will come). Wait and see.
    Unsure,
    /// An old segment: says nothing.
    Old,
}

fn judge(seg: &crate::verify::Seg, e: &Expect) -> Verdict {
    if after(seg.ack, e.client_ack) {
        return Verdict::MovedOn;
    }
    if seg.ack != e.client_ack {
        return Verdict::Old;
    }
    if seg.seq == e.client_seq {
        Verdict::Agrees
    } else if after(seg.seq, e.client_seq) {
        Verdict::Unsure
    } else {
        Verdict::Old
    }
}

/// How long an unsure connection may take to show its retransmission (the client's timer
/// backs off 0.2, 0.4, 0.8, 1.6 s): past it, the dead node must have taken its bytes.
pub const UNSURE_WINDOW: Duration = Duration::from_millis(3500);

/// Reads clients' answers: restored connections whose client's numbers agree stay; the ones
/// whose client moved on, and the connections to reset, are reset with the client's own next
/// expected sequence number. Clients that say nothing within [`VERIFY_WINDOW`] are left as
/// they are; unsure ones are watched for [`UNSURE_WINDOW`].
fn verify_clients(
    cap: &mut Capture,
    expect: &mut HashMap<Flow, Expect>,
    reset: &[Flow],
    report: &mut Report,
) {
    let mut to_reset: HashSet<Flow> = reset.iter().copied().collect();
    for f in reset {
        if let (Some(l), Some(c)) = (v4(f.local), v4(f.peer)) {
            verify::probe_client(l, c);
        }
    }
    let start = Instant::now();
    let mut unsure: HashMap<Flow, SocketAddrV4> = HashMap::new();
    loop {
        // Restored connections not heard from yet (agreed and reset ones are gone from
        // `expect`).
        let silent = expect.len() - unsure.len();
        let first = Instant::now() < start + VERIFY_WINDOW && (silent > 0 || !to_reset.is_empty());
        if !first && unsure.is_empty() {
            break;
        }
        let until = start + if first { VERIFY_WINDOW } else { UNSURE_WINDOW };
        let seg = match cap.next(until) {
            Ok(Some(s)) => s,
            Ok(None) if Instant::now() >= start + UNSURE_WINDOW => break,
            Ok(None) => continue,
            Err(e) => {
                report.errors.push(format!("reading clients' answers: {e}"));
                break;
            }
        };
        if seg.flags & splitos_repair::flags::RST != 0 {
            continue;
        }
        let flow = Flow {
            local: SocketAddr::V4(seg.dst),
            peer: SocketAddr::V4(seg.src),
        };
        if let Some(e) = expect.get(&flow) {
            match judge(&seg, e) {
                Verdict::Agrees => {
                    report.verified += 1;
                    expect.remove(&flow);
                    unsure.remove(&flow);
                }
                Verdict::MovedOn => {
                    tracing::info!(%flow, seq = seg.seq, ack = seg.ack, want_seq = e.client_seq, want_ack = e.client_ack, "the client moved on past its checkpoint: reset");
                    verify::reset_client(seg.dst, seg.src, seg.ack);
                    // Our own socket, too: a reset at exactly its next expected number.
                    verify::reset_client(seg.src, seg.dst, e.client_seq);
                    report.stale += 1;
                    report.resets_sent += 1;
                    expect.remove(&flow);
                    unsure.remove(&flow);
                }
                Verdict::Unsure => {
                    unsure.insert(flow, seg.src);
                }
                Verdict::Old => {}
            }
        } else if to_reset.remove(&flow) {
            verify::reset_client(seg.dst, seg.src, seg.ack);
            report.resets_sent += 1;
        }
    }
    // Still unsure: their bytes went to the dead node, which never answered them.
    for (flow, client) in unsure {
        if let (Some(e), SocketAddr::V4(local)) = (expect.get(&flow), flow.local) {
            tracing::info!(%flow, "no retransmission from the client: the dead node took its bytes; reset");
            // The client's next expected number is the checkpoint's own (it acknowledged
            // nothing more), so the reset needs no answer from it.
            verify::reset_client(local, client, e.client_ack);
            verify::reset_client(client, local, e.client_seq);
            report.stale += 1;
            report.resets_sent += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::Seg;

    fn seg(seq: u32, ack: u32) -> Seg {
        Seg {
            src: "198.18.0.2:40000".parse().unwrap(),
            dst: "198.19.0.1:80".parse().unwrap(),
            seq,
            ack,
            flags: 0x10,
            payload: 0,
        }
    }

    #[test]
    fn verdicts() {
        let e = Expect {
            client_seq: 1000,
            client_ack: u32::MAX - 5,
        };
        assert_eq!(judge(&seg(1000, u32::MAX - 5), &e), Verdict::Agrees);
        // The dead node answered something after the checkpoint (wrapping past 0).
        assert_eq!(judge(&seg(1000, 10), &e), Verdict::MovedOn);
        // A request sent after the checkpoint, acknowledged or not.
        assert_eq!(judge(&seg(1039, u32::MAX - 5), &e), Verdict::Unsure);
        assert_eq!(judge(&seg(900, u32::MAX - 5), &e), Verdict::Old);
        assert_eq!(judge(&seg(1000, u32::MAX - 10), &e), Verdict::Old);
    }
}
