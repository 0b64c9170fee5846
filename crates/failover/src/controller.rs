//! The switch controller: makes the steering switch follow etcd. It runs where the switch is
//! (`splitos switch watch`), and while it runs it is the only writer of the switch's tables.
//!
//! It publishes the switch's ring ([`SwitchInfo`]: which node is whose successor), then
//! follows the cluster's keys from a snapshot on:
//!
//! - **an adoption** (`adopted/NAME/INC`, not yet `applied`): in one nftables transaction the
//!   listed flows get the adopter as owner, and the dead node is fenced wholly and taken out
//!   of the buckets (`Switch::take_over`); then `applied/NAME/INC` tells the adopter that the
//!   clients' packets now reach it;
//! - **a node down** (its lease gone) with no adoption within the grace period: the same
//!   fence and bucket removal, no owner changes — new connections go elsewhere;
//! - **a node up** at the address of a switch node that is fenced or holds no bucket (it
//!   restarted): it is unfenced and takes its share of buckets back; established flows of the
//!   buckets it takes keep reaching their node for a while (draining entries with a timeout),
//!   and flows adopted away from it stay fenced from it (`Switch::revive`).
//!
//! Everything is idempotent: on a restart, or when the watch breaks and a new snapshot is
//! taken, adoptions without `applied` are applied again and returned nodes revived.

pub mod status;

use crate::etcd::SwitchNode;
use crate::etcd::{Adoption, Applied, Change, EtcdError, Member, Registry, Snapshot, SwitchInfo};
use splitos_cluster::switch::{Flow, NodeId, Switch, SwitchError, Takeover};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::sync::mpsc;

/// What the controller logs once it follows etcd (the lab waits for it).
pub use splitos_cluster::lab::CONTROLLER_READY;

/// How long a dead node's successor has to adopt its flows before the switch fences the node
/// anyway.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3);
/// How long a returning node's buckets keep sending established flows to the node that held
/// them. Longer than `splitos serve`'s keep-alive idle timeout (60 s), so an idle connection
/// there has been closed or has sent a packet by then... and is not cut in between.
pub const DEFAULT_RETURN_KEEP: Duration = Duration::from_secs(90);

#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// See [`DEFAULT_GRACE`].
    pub grace: Duration,
    /// See [`DEFAULT_RETURN_KEEP`]; at most `script::RETURN_DRAIN_MAX_S`.
    pub return_keep: Duration,
    /// The longest wait between two attempts to reach etcd again.
    pub backoff_max: Duration,
}

impl Default for ControllerOptions {
    fn default() -> ControllerOptions {
        ControllerOptions {
            grace: DEFAULT_GRACE,
            return_keep: DEFAULT_RETURN_KEEP,
            backoff_max: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("the switch: {0}")]
    Switch(#[from] SwitchError),
    #[error("{0}")]
    Etcd(#[from] EtcdError),
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An incarnation of a node: its name and the revision it registered at.
type Inc = (String, i64);

struct Controller {
    sw: Switch,
    registry: Registry,
    opts: ControllerOptions,
    /// Registered nodes by name.
    members: BTreeMap<String, Member>,
    /// Every adoption seen, by incarnation.
    adoptions: BTreeMap<Inc, Adoption>,
    applied: BTreeSet<Inc>,
    /// Incarnations down and not adopted yet: their address, until the grace ends.
    pending: BTreeMap<Inc, Ipv4Addr>,
    grace_tx: mpsc::Sender<Inc>,
}

/// Follows etcd and drives switch `table` (in the current network namespace) until an error
/// it cannot retry: the switch is gone or unusable. Lost contact with etcd is retried for
/// ever (with backoff); the switch keeps its last state meanwhile.
pub async fn run(
    registry: Registry,
    table: &str,
    opts: ControllerOptions,
) -> Result<(), ControllerError> {
    let sw = Switch::open(table)?;
    if !sw.state().has_failover {
        return Err(SwitchError::BadState(format!(
            "the switch table {table:?} has no dead-node fence (it was made by an older \
             splitos): re-create it with `splitos switch down` and `splitos switch init`"
        ))
        .into());
    }
    let info = SwitchInfo {
        table: table.to_string(),
        nodes: sw
            .state()
            .nodes
            .values()
            .map(|n| SwitchNode {
                id: u32::from(n.id),
                addr: n.via,
            })
            .collect(),
    };
    let (grace_tx, mut grace_rx) = mpsc::channel(1024);
    let mut c = Controller {
        sw,
        registry,
        opts,
        members: BTreeMap::new(),
        adoptions: BTreeMap::new(),
        applied: BTreeSet::new(),
        pending: BTreeMap::new(),
        grace_tx,
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let round = async {
            c.registry.put_switch(&info).await?;
            let snap = c.registry.snapshot().await?;
            c.reconcile(&snap).await?;
            tracing::info!(
                "{CONTROLLER_READY} {} at revision {}: {} nodes registered, {} adoptions",
                c.sw.table(),
                snap.revision,
                snap.members.len(),
                snap.adoptions.len()
            );
            Ok::<i64, ControllerError>(snap.revision)
        };
        let revision = match round.await {
            Ok(r) => r,
            Err(ControllerError::Etcd(e)) => {
                tracing::warn!("etcd: {e}; trying again in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(c.opts.backoff_max);
                continue;
            }
            Err(e) => return Err(e),
        };
        backoff = Duration::from_millis(100);
        let (tx, mut rx) = mpsc::channel(1024);
        let reg = c.registry.clone();
        let mut watch = tokio::spawn(async move { reg.watch(revision, tx).await });
        let why: Result<(), ControllerError> = loop {
            tokio::select! {
                change = rx.recv() => match change {
                    Some(change) => {
                        if let Err(e) = c.handle(change).await {
                            break Err(e);
                        }
                    }
                    None => break Ok(()),
                },
                Some(inc) = grace_rx.recv() => {
                    if let Err(e) = c.grace_over(inc) {
                        break Err(e);
                    }
                }
            }
        };
        watch.abort();
        let watched = (&mut watch).await;
        match (why, watched) {
            (Err(ControllerError::Switch(e)), _) => return Err(e.into()),
            (Err(e), _) => tracing::warn!("{e}; taking a new snapshot in {backoff:?}"),
            (Ok(()), Ok(Err(e))) => tracing::warn!("the watch broke: {e}; again in {backoff:?}"),
            (Ok(()), _) => tracing::warn!("the watch ended; again in {backoff:?}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(c.opts.backoff_max);
    }
}

impl Controller {
    /// The switch node whose next hop is `addr`.
    fn node_at(&self, addr: Ipv4Addr) -> Option<NodeId> {
        self.sw
            .state()
            .nodes
            .values()
            .find(|n| n.via == addr)
            .map(|n| n.id)
    }

    fn registered_at(&self, addr: Ipv4Addr) -> Option<&Member> {
        self.members.values().find(|m| m.info.addr == addr)
    }

    /// Brings the switch in line with a snapshot (at start, and after the watch broke).
    async fn reconcile(&mut self, snap: &Snapshot) -> Result<(), ControllerError> {
        self.members = snap
            .members
            .iter()
            .map(|m| (m.info.name.clone(), m.clone()))
            .collect();
        for a in &snap.adoptions {
            self.adoptions
                .insert((a.dead.clone(), a.incarnation), a.clone());
        }
        for (name, inc, _) in &snap.applied {
            self.applied.insert((name.clone(), *inc));
        }
        // Anything down and adopted meanwhile is no longer pending.
        let adoptions = &self.adoptions;
        self.pending.retain(|inc, _| !adoptions.contains_key(inc));
        let todo: Vec<Adoption> = self
            .adoptions
            .iter()
            .filter(|(inc, _)| !self.applied.contains(*inc))
            .map(|(_, a)| a.clone())
            .collect();
        for a in todo {
            self.apply_adoption(&a).await?;
        }
        let members: Vec<Member> = self.members.values().cloned().collect();
        for m in members {
            self.node_up(&m)?;
        }
        for id in self.sw.state().nodes.keys() {
            let via = self.sw.state().nodes.get(id).map(|n| n.via);
            if via.is_some_and(|a| self.registered_at(a).is_none()) {
                tracing::info!(
                    "switch node {id} has no registered node; it stays as it is until one \
                     registers at its address or its flows are adopted"
                );
            }
        }
        Ok(())
    }

    async fn handle(&mut self, change: Change) -> Result<(), ControllerError> {
        match change {
            Change::Up(m) => {
                tracing::info!(
                    "node {} is up at {} (incarnation {}, lease {:x})",
                    m.info.name,
                    m.info.addr,
                    m.incarnation,
                    m.lease
                );
                // A node registered at this address: whatever was pending there is moot.
                let addr = m.info.addr;
                self.pending.retain(|_, a| *a != addr);
                self.members.insert(m.info.name.clone(), m.clone());
                self.node_up(&m)?;
            }
            Change::Down {
                name,
                incarnation,
                addr,
            } => {
                let known = self
                    .members
                    .get(&name)
                    .filter(|m| m.incarnation == incarnation)
                    .map(|m| m.info.addr);
                if known.is_some() {
                    self.members.remove(&name);
                }
                let inc = (name, incarnation);
                let Some(addr) = addr.or(known) else {
                    tracing::warn!("node {} went down at an unknown address", inc.0);
                    return Ok(());
                };
                if self.adoptions.contains_key(&inc) {
                    return Ok(());
                }
                tracing::info!(
                    "node {} (incarnation {}) at {addr} is down: its successor has {:?} to \
                     adopt its flows",
                    inc.0,
                    inc.1,
                    self.opts.grace
                );
                self.pending.insert(inc.clone(), addr);
                let (tx, grace) = (self.grace_tx.clone(), self.opts.grace);
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    let _ = tx.send(inc).await;
                });
            }
            Change::Adopted(a) => {
                let inc = (a.dead.clone(), a.incarnation);
                self.pending.remove(&inc);
                self.adoptions.insert(inc.clone(), a.clone());
                if !self.applied.contains(&inc) {
                    self.apply_adoption(&a).await?;
                }
            }
            Change::Applied {
                name, incarnation, ..
            } => {
                self.applied.insert((name, incarnation));
            }
            Change::Switch(_) => {}
        }
        Ok(())
    }

    /// The grace of a down incarnation is over: fence it, unless it was adopted or a node
    /// registered at its address meanwhile.
    fn grace_over(&mut self, inc: Inc) -> Result<(), ControllerError> {
        let Some(addr) = self.pending.remove(&inc) else {
            return Ok(());
        };
        if self.adoptions.contains_key(&inc) || self.registered_at(addr).is_some() {
            return Ok(());
        }
        let Some(id) = self.node_at(addr) else {
            tracing::warn!("node {} at {addr} is not a node of the switch", inc.0);
            return Ok(());
        };
        self.sw.refresh()?;
        let moved = self.sw.fence_dead(id)?;
        tracing::warn!(
            "node {} (incarnation {}) was not adopted within {:?}: switch node {id} fenced, \
             its {} buckets given to the others",
            inc.0,
            inc.1,
            self.opts.grace,
            moved.len()
        );
        Ok(())
    }

    /// A registered node: if it is a switch node that is fenced or holds no bucket, it is
    /// back.
    fn node_up(&mut self, m: &Member) -> Result<(), ControllerError> {
        let Some(id) = self.node_at(m.info.addr) else {
            tracing::warn!(
                "node {} registered at {}, which is no node of this switch",
                m.info.name,
                m.info.addr
            );
            return Ok(());
        };
        self.sw.refresh()?;
        if !self.sw.is_out(id) {
            return Ok(());
        }
        // Flows adopted away from earlier incarnations at this address stay fenced from it.
        let stale: Vec<Flow> = self
            .adoptions
            .values()
            .filter(|a| a.dead_addr == m.info.addr && a.incarnation < m.incarnation)
            .flat_map(|a| a.restore.iter().chain(&a.reset).map(|c| Flow(*c)))
            .collect();
        let keep = u32::try_from(self.opts.return_keep.as_secs()).unwrap_or(u32::MAX);
        let moved = self.sw.revive(id, &stale, keep)?;
        tracing::info!(
            "node {} is back as switch node {id}: unfenced, {} buckets given back (their \
             established flows stay where they are for {keep} s), {} flows adopted away from \
             it stay fenced",
            m.info.name,
            moved.len(),
            stale.len()
        );
        Ok(())
    }

    /// Makes the switch follow an adoption, then says so in etcd.
    async fn apply_adoption(&mut self, a: &Adoption) -> Result<(), ControllerError> {
        let Some(adopter) = self.node_at(a.adopter_addr) else {
            tracing::error!(
                "{} adopted {}'s flows, but its address {} is no node of this switch: not \
                 applied",
                a.adopter,
                a.dead,
                a.adopter_addr
            );
            return Ok(());
        };
        let flows: Vec<Flow> = a.restore.iter().chain(&a.reset).map(|c| Flow(*c)).collect();
        // A new incarnation at the dead one's address (it restarted before the adoption was
        // seen) must keep serving: then only the adopted flows are fenced from it.
        let wholly = self.registered_at(a.dead_addr).is_none();
        let t = Takeover {
            dead: self.node_at(a.dead_addr),
            adopter,
            flows,
            wholly,
        };
        self.sw.refresh()?;
        let r = match self.sw.take_over(&t) {
            Ok(r) => r,
            Err(e) => {
                // Not retried here: the same transaction would fail the same way. The next
                // snapshot (after a restart or a broken watch) tries again.
                tracing::error!(
                    "cannot apply {}'s adoption of {} (incarnation {}): {e}",
                    a.adopter,
                    a.dead,
                    a.incarnation
                );
                return Ok(());
            }
        };
        let applied = Applied {
            adopter_addr: a.adopter_addr,
            flows: r.flows,
            at_ms: now_ms(),
        };
        self.registry
            .put_applied(&a.dead, a.incarnation, &applied)
            .await?;
        self.applied.insert((a.dead.clone(), a.incarnation));
        tracing::info!(
            "{} adopted {} (incarnation {}): {} restored and {} reset flows go to switch node \
             {adopter}; {}; {} buckets moved; {} ms after the adoption",
            a.adopter,
            a.dead,
            a.incarnation,
            a.restore.len(),
            a.reset.len(),
            if r.fenced_wholly {
                "the dead node is fenced wholly"
            } else {
                "the dead node's new incarnation is fenced from those flows"
            },
            r.moved.len(),
            applied.at_ms.saturating_sub(a.at_ms)
        );
        Ok(())
    }
}
