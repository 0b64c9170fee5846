//! Live migration, run where the switch is: the operator's side of moving connections from
//! one node to another (`splitos migrate`, and `splitos lab migrate` in the lab's switch
//! namespace).
//!
//! The order is the research brief's cut-over, with one change: (1) ask the source node which
//! connections could move; (2) one switch transaction holds them: the client's packets wait
//! in the switch's hold device (`switch::held`), neither node hears from the client; (3) the
//! source node takes them out of service, saves them, and the destination restores them,
//! silent on both sides; (4) one switch transaction makes the destination the owner and
//! fences every other node from the flows, still held; (5) the destination takes the sockets
//! out of repair mode (a window probe makes the client tell it where it is) and says so
//! (`Live`); (6) one switch transaction releases the hold, and the waiting packets go on to
//! the destination; it puts the connections into service, and the source drops its copies
//! without a packet. The change: the brief releases at (4), before the destination is out of
//! repair mode; a packet arriving in between waited for the client's retransmission (200 ms
//! and more). A connection refused at (3) is released at (4) and goes on where it was. The
//! cut-over — what a client may notice — is (2) to (6).

use crate::switch::held::HeldPackets;
use crate::switch::{Change, Flow as SwitchFlow, NodeId, Switch, SwitchError};
use serde::Serialize;
use splitos_migrate::{Flow, LinkClient, WireError};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The node link's port when a node is named by its address only.
pub const DEFAULT_LINK_PORT: u16 = 7411;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("the switch: {0}")]
    Switch(#[from] SwitchError),
    #[error("no node of the switch is reached at {0} (see `splitos switch status`)")]
    NoNode(IpAddr),
    #[error("the source and destination are the same node")]
    SameNode,
    #[error("the node link of {node} ({addr}): {source}")]
    Link {
        node: NodeId,
        addr: SocketAddr,
        source: WireError,
    },
    #[error("the switch is not initialised (no virtual IP)")]
    NoConfig,
}

/// Which connections to move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Select {
    All,
    Count(usize),
}

/// What a migration did, and how long the client could have noticed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub from: NodeId,
    pub to: NodeId,
    /// Connections now served by the destination.
    pub moved: Vec<Flow>,
    /// Connections that stayed where they were, and why.
    pub refused: Vec<(Flow, String)>,
    /// Of `moved`, how many the destination has put into service.
    pub live: usize,
    /// Client packets that arrived during the hold and went on to the new node afterwards.
    pub requeued: usize,
    /// From the hold to the release: what a client may notice (milliseconds).
    pub cutover_ms: f64,
    /// The whole operation, the listing included (milliseconds).
    pub total_ms: f64,
}

fn node_at(sw: &Switch, ip: IpAddr) -> Result<NodeId, MigrateError> {
    sw.state()
        .nodes
        .values()
        .find(|n| IpAddr::V4(n.via) == ip)
        .map(|n| n.id)
        .ok_or(MigrateError::NoNode(ip))
}

/// The switch's name for a connection to the virtual IP: its client's address.
fn switch_flow(f: &Flow) -> Option<SwitchFlow> {
    match f.peer {
        SocketAddr::V4(p) => Some(SwitchFlow(p)),
        SocketAddr::V6(_) => None,
    }
}

/// Moves connections from the node whose link is `from` to the node whose link is `to`,
/// through the switch in `table` (in this network namespace).
pub fn migrate(
    table: &str,
    from: SocketAddr,
    to: SocketAddr,
    select: Select,
) -> Result<Report, MigrateError> {
    let started = Instant::now();
    let mut sw = Switch::open(table)?;
    let cfg = sw.state().config.clone().ok_or(MigrateError::NoConfig)?;
    let (a, b) = (node_at(&sw, from.ip())?, node_at(&sw, to.ip())?);
    if a == b {
        return Err(MigrateError::SameNode);
    }
    let link = |node, addr| move |source| MigrateError::Link { node, addr, source };
    let limit = match select {
        Select::All => splitos_migrate::wire::FLOWS_MAX,
        Select::Count(n) => n,
    };
    let mut report = Report {
        from: a,
        to: b,
        ..Report::default()
    };
    let listed = LinkClient::connect(from, CONNECT_TIMEOUT)
        .and_then(|mut c| c.list(limit))
        .map_err(link(a, from))?;
    // Only what the switch steers can move.
    let flows: Vec<Flow> = listed
        .into_iter()
        .filter(|f| {
            f.local.ip() == IpAddr::V4(cfg.vip)
                && cfg.ports.contains(&f.local.port())
                && switch_flow(f).is_some()
        })
        .collect();
    if flows.is_empty() {
        report.total_ms = started.elapsed().as_secs_f64() * 1e3;
        return Ok(report);
    }
    let mut client = LinkClient::connect(from, CONNECT_TIMEOUT).map_err(link(a, from))?;
    let held: Vec<SwitchFlow> = flows.iter().filter_map(switch_flow).collect();
    // Held packets wait for the release instead of being dropped (see `switch::held`).
    let waiting = match HeldPackets::attach(table) {
        Ok(q) => Some(q),
        Err(e) => {
            tracing::info!("held packets will be dropped (the client retransmits): {e}");
            None
        }
    };
    let hold_at = Instant::now();
    sw.apply(&held.iter().map(|&f| Change::Hold(f)).collect::<Vec<_>>())?;
    let release_all = |sw: &mut Switch, waiting: Option<HeldPackets>| {
        let changes: Vec<_> = held.iter().map(|&f| Change::Release(f)).collect();
        if let Err(e) = sw.apply(&changes) {
            tracing::error!("cannot release held flows: {e}");
        }
        waiting.map(HeldPackets::release);
    };
    let (moved, refused) = match client.move_to(to, flows) {
        Ok(r) => r,
        Err(e) => {
            release_all(&mut sw, waiting);
            return Err(MigrateError::Link {
                node: a,
                addr: from,
                source: e,
            });
        }
    };
    if moved.is_empty() {
        // Nothing waits for a verdict (the source has put everything back and ended the
        // conversation): let the flows go on where they are.
        release_all(&mut sw, waiting);
        report.refused = refused;
        report.cutover_ms = hold_at.elapsed().as_secs_f64() * 1e3;
        report.total_ms = started.elapsed().as_secs_f64() * 1e3;
        return Ok(report);
    }
    // The moved flows go to B, still held (B is in repair mode until the commit); the
    // refused ones go on where they were.
    let others = sw.others(b);
    let mut changes = Vec::new();
    for f in moved.iter().filter_map(switch_flow) {
        changes.push(Change::Owner(f, b));
        changes.push(Change::Unfence(f, b));
        changes.extend(others.iter().map(|&n| Change::Fence(f, n)));
    }
    changes.extend(
        refused
            .iter()
            .filter_map(|(f, _)| switch_flow(f))
            .map(Change::Release),
    );
    if let Err(e) = sw.apply(&changes) {
        let _ = client.abort();
        release_all(&mut sw, waiting);
        return Err(e.into());
    }
    let live = client.commit();
    // Released whatever B said: a flow that did not go live there has no other home now.
    let releases: Vec<_> = moved
        .iter()
        .filter_map(switch_flow)
        .map(Change::Release)
        .collect();
    let released = sw.apply(&releases);
    // The held packets go on from a thread of their own: the device waits for stragglers,
    // which is no part of the cut-over.
    let requeue = waiting.map(|w| std::thread::spawn(move || w.release()));
    report.cutover_ms = hold_at.elapsed().as_secs_f64() * 1e3;
    let done = released
        .map_err(MigrateError::from)
        .and_then(|()| live.map_err(link(a, from)))
        .and_then(|_| client.done().map_err(link(a, from)));
    report.requeued = requeue.map_or(0, |t| t.join().unwrap_or(0));
    report.live = done?;
    report.moved = moved;
    report.refused = refused;
    report.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}

/// What a drain did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DrainReport {
    pub node: NodeId,
    /// Buckets given to the other nodes (new flows go there from the start).
    pub buckets_moved: usize,
    /// Connections moved to the other nodes, and in how many migrations.
    pub moved: usize,
    pub migrations: usize,
    /// Connections refused by a migration at the end (they stayed; see `refused`).
    pub refused: Vec<(Flow, String)>,
    pub total_ms: f64,
}

/// How long a drain keeps moving connections before it gives up on the rest.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Drains the node whose link is `from` into the nodes whose links are `to`: new flows stop
/// going to it at once (its buckets go to the others, its established flows still reach it:
/// `Switch::drain_begin`), then its connections move, spread over `to`, until it has none it
/// can move (or `DRAIN_LIMIT`), then its draining entries go. The node stays in the switch (a
/// `splitos switch remove-node` takes it out for good).
pub fn drain(
    table: &str,
    from: SocketAddr,
    to: &[SocketAddr],
) -> Result<DrainReport, MigrateError> {
    let started = Instant::now();
    let mut sw = Switch::open(table)?;
    let k = node_at(&sw, from.ip())?;
    if to.is_empty() || to.iter().any(|t| t.ip() == from.ip()) {
        return Err(MigrateError::SameNode);
    }
    for t in to {
        node_at(&sw, t.ip())?;
    }
    let mut report = DrainReport {
        node: k,
        buckets_moved: sw.drain_begin(k)?.len(),
        ..DrainReport::default()
    };
    let link = |addr| {
        move |source| MigrateError::Link {
            node: k,
            addr,
            source,
        }
    };
    let until = Instant::now() + DRAIN_LIMIT;
    let mut last_refused = Vec::new();
    while Instant::now() < until {
        let left = LinkClient::connect(from, CONNECT_TIMEOUT)
            .and_then(|mut c| c.list(splitos_migrate::wire::FLOWS_MAX))
            .map_err(link(from))?;
        if left.is_empty() {
            break;
        }
        let share = left.len().div_ceil(to.len());
        let mut moved_now = 0;
        last_refused.clear();
        for &peer in to {
            let r = migrate(table, from, peer, Select::Count(share))?;
            report.migrations += 1;
            moved_now += r.moved.len();
            last_refused.extend(r.refused);
        }
        report.moved += moved_now;
        if moved_now == 0 {
            // Only refusals (a request in progress): try again shortly.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    report.refused = last_refused;
    let mut sw = Switch::open(table)?;
    sw.drain_end(k)?;
    report.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}
