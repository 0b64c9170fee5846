//! The steering switch: spreads the TCP flows of a virtual IP over the nodes that serve it,
//! with the kernel's nftables and policy routing, and lets single flows be moved, held and
//! fenced. It runs in the switch's network namespace (or on the router of a real deployment);
//! the nodes hold the virtual IP on their loopback and answer the clients straight back
//! through the switch (direct routing: no NAT, no connection tracking).
//!
//! - **New flows** are hashed into buckets (`jhash(client addr . port) mod N`); a bucket table
//!   names each bucket's node ([`buckets`]); a node leaving moves only its own buckets.
//! - **Moved flows** have an entry in the owners map, which overrides the bucket.
//! - **Held flows** (being moved) have their client packets set aside ([`held`]): kept for the
//!   new node while a migration runs, else dropped (the client retransmits).
//! - **Fences** drop what a node that no longer owns a flow still sends for it.
//! - **Dead nodes** ([`failover`]) are fenced wholly — nothing they send as the virtual IP
//!   reaches a client — and out of the bucket table, until they come back.
//!
//! Every change is one `nft -f -` transaction ([`script`]), so the kernel applies all of it or
//! none of it. The kernel is also the only store of the switch's state: [`Switch::open`] reads
//! it back (`nft -j list table`), so any process — the `splitos switch` command, a controller,
//! a test — can change a running switch.

pub mod buckets;
mod drain;
mod failover;
pub mod held;
mod nft;
mod parse;
pub mod script;

pub use buckets::NodeId;
pub use failover::{Takeover, TakeoverReport};

use crate::netns;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};

/// The nft table a switch lives in unless told otherwise.
pub const DEFAULT_TABLE: &str = "splitos";
/// Node `id`'s routing table is `ROUTE_TABLE_BASE + id`.
pub const ROUTE_TABLE_BASE: u32 = 1000;
/// Buckets unless told otherwise: a multiple of 2, 3, 4, 6 and 8, so up to four nodes get
/// exactly equal shares.
pub const DEFAULT_BUCKETS: u16 = 240;

/// What went wrong steering.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("nft failed: {stderr}")]
    Nft { stderr: String, script: String },
    #[error("cannot run nft (apt-get install -y nftables): {0}")]
    NftMissing(std::io::Error),
    #[error("no switch table {0:?} here (start one with `splitos switch init`)")]
    NoTable(String),
    #[error("a switch table {0:?} already exists (remove it with `splitos switch down`)")]
    Exists(String),
    #[error("the switch table's contents are not understood: {0}")]
    BadState(String),
    #[error("bad table name {0:?} (letters, digits, '_' and '-', at most 32)")]
    BadTable(String),
    #[error("bad interface name {0:?} (at most 15 of letters, digits, '_', '-', '.')")]
    BadDevice(String),
    #[error("node id must be 1..=65535")]
    BadNodeId,
    #[error("node {0} is already a member")]
    NodeExists(NodeId),
    #[error("node {0} is not a member")]
    NoNode(NodeId),
    #[error("buckets must be 1..=65535 and at least one port given")]
    BadConfig,
    #[error("routing: {0}")]
    Route(#[from] netns::NetnsError),
    #[error("sysctl {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the switch steers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchConfig {
    /// The virtual IP the nodes share.
    pub vip: Ipv4Addr,
    /// The TCP ports of the virtual IP that are steered.
    pub ports: Vec<u16>,
    /// Hash buckets for new flows.
    pub buckets: u16,
    /// The hash seed.
    pub seed: u32,
}

impl SwitchConfig {
    pub fn new(vip: Ipv4Addr, ports: Vec<u16>) -> SwitchConfig {
        SwitchConfig {
            vip,
            ports,
            buckets: DEFAULT_BUCKETS,
            seed: 0x5eed_c1a5,
        }
    }
}

/// A node behind the switch: its id (also its packet mark), the address the switch forwards
/// its flows to, and the switch's interface towards it (fences match on it).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Node {
    pub id: NodeId,
    pub via: Ipv4Addr,
    pub dev: String,
}

impl Node {
    pub fn new(id: NodeId, via: Ipv4Addr, dev: &str) -> Result<Node, SwitchError> {
        if id == 0 {
            return Err(SwitchError::BadNodeId);
        }
        check_dev(dev)?;
        Ok(Node {
            id,
            via,
            dev: dev.to_string(),
        })
    }
}

impl std::str::FromStr for Node {
    type Err = String;
    /// `ID=VIA@DEV`, e.g. `1=198.18.1.2@n1`.
    fn from_str(s: &str) -> Result<Node, String> {
        let bad = || format!("{s:?} is not a node like 1=198.18.1.2@n1 (ID=NEXT_HOP@INTERFACE)");
        let (id, rest) = s.split_once('=').ok_or_else(bad)?;
        let (via, dev) = rest.split_once('@').ok_or_else(bad)?;
        let id: NodeId = id.parse().map_err(|_| bad())?;
        let via: Ipv4Addr = via.parse().map_err(|_| bad())?;
        Node::new(id, via, dev).map_err(|e| e.to_string())
    }
}

/// A flow, named by the client's address and port (the virtual IP's side is the service).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Flow(pub SocketAddrV4);

/// One change to a running switch; a list of them is applied as one transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The flow's packets go to this node from now on, whatever its bucket says.
    Owner(Flow, NodeId),
    /// The flow follows its bucket again.
    ClearOwner(Flow),
    /// Drop the client's packets of the flow (while it moves).
    Hold(Flow),
    /// Let them through again.
    Release(Flow),
    /// Drop what this node still sends for the flow.
    Fence(Flow, NodeId),
    /// Stop doing that.
    Unfence(Flow, NodeId),
}

/// A switch's state, as read from (and kept in step with) the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub config: Option<SwitchConfig>,
    pub nodes: BTreeMap<NodeId, Node>,
    /// Node of each bucket.
    pub buckets: Vec<NodeId>,
    pub owners: BTreeMap<Flow, NodeId>,
    pub hold: BTreeSet<Flow>,
    /// (fenced node, flow).
    pub fences: BTreeSet<(NodeId, Flow)>,
    /// Buckets being drained (index → the node they left): established flows of theirs still
    /// go there, new ones follow the bucket table (see `drain`).
    pub draining: BTreeMap<usize, NodeId>,
    /// Packets dropped by the hold and by fences, since the table was made.
    pub held_packets: u64,
    pub fenced_packets: u64,
    /// Nodes fenced wholly (dead, or cut off and replaced): nothing they send as the virtual
    /// IP is forwarded.
    pub dead: BTreeSet<NodeId>,
    /// Per node: what the switch forwarded from it to clients, and dropped as from a dead node.
    pub counters: BTreeMap<NodeId, NodeCounters>,
    /// Whether the table has the dead-node fence and the per-node counters (tables made by
    /// older versions do not; the switch controller needs them).
    pub has_failover: bool,
}

/// Packet counters of one node, read from the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeCounters {
    /// Packets from the node's interface with the virtual IP as source, forwarded to clients
    /// (after every fence).
    pub forwarded: u64,
    /// Packets from the node dropped because it was fenced as dead.
    pub dead_dropped: u64,
}

impl State {
    /// Buckets per node.
    pub fn bucket_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut m: BTreeMap<NodeId, usize> = self.nodes.keys().map(|&k| (k, 0)).collect();
        for b in &self.buckets {
            *m.entry(*b).or_insert(0) += 1;
        }
        m
    }

    /// A JSON description (for `splitos switch status --json`).
    pub fn to_json(&self) -> Value {
        let flows = |f: &Flow| Value::String(f.0.to_string());
        serde_json::json!({
            "vip": self.config.as_ref().map(|c| c.vip.to_string()),
            "ports": self.config.as_ref().map(|c| c.ports.clone()),
            "buckets": self.buckets.len(),
            "nodes": self.nodes.values().map(|n| {
                let c = self.counters.get(&n.id).copied().unwrap_or_default();
                serde_json::json!({
                    "id": n.id, "via": n.via.to_string(), "dev": n.dev,
                    "buckets": self.buckets.iter().filter(|&&b| b == n.id).count(),
                    "dead": self.dead.contains(&n.id),
                    "forwarded_packets": c.forwarded,
                    "dead_dropped_packets": c.dead_dropped,
                })
            }).collect::<Vec<_>>(),
            "owners": self.owners.iter().map(|(f, n)| serde_json::json!({"flow": flows(f), "node": n})).collect::<Vec<_>>(),
            "hold": self.hold.iter().map(flows).collect::<Vec<_>>(),
            "draining": self.draining.len(),
            "dead": self.dead.iter().collect::<Vec<_>>(),
            "fences": self.fences.iter().map(|(n, f)| serde_json::json!({"flow": flows(f), "node": n})).collect::<Vec<_>>(),
            "held_packets": self.held_packets,
            "fenced_packets": self.fenced_packets,
        })
    }
}

fn check_dev(dev: &str) -> Result<(), SwitchError> {
    let ok = !dev.is_empty()
        && dev.len() <= 15
        && dev
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(SwitchError::BadDevice(dev.to_string()))
    }
}

/// Checks an nft table name.
pub fn check_table(table: &str) -> Result<(), SwitchError> {
    let ok = !table.is_empty()
        && table.len() <= 32
        && table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SwitchError::BadTable(table.to_string()))
    }
}

/// Applies `script` as one transaction (see `nft`).
pub fn nft_apply(script: &str) -> Result<(), SwitchError> {
    nft::apply(script)
}

/// `list table ip TABLE`, parsed; `None` if there is no such table.
fn nft_list(table: &str) -> Result<Option<Value>, SwitchError> {
    let Some(text) = nft::list_json(table)? else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| SwitchError::BadState(e.to_string()))
}

/// Routing for one node: `ip rule fwmark ID lookup 1000+ID` and, in that table, the virtual
/// IP via the node.
fn route_add(vip: Ipv4Addr, n: &Node) -> Result<(), SwitchError> {
    let table = (ROUTE_TABLE_BASE + u32::from(n.id)).to_string();
    let id = n.id.to_string();
    netns::ip(&[
        "route",
        "replace",
        &format!("{vip}/32"),
        "via",
        &n.via.to_string(),
        "dev",
        &n.dev,
        "table",
        &table,
    ])?;
    // Replace rather than duplicate a rule left from an earlier run.
    let _ = netns::ip(&["rule", "del", "fwmark", &id, "lookup", &table]);
    netns::ip(&[
        "rule", "add", "fwmark", &id, "lookup", &table, "priority", &table,
    ])?;
    Ok(())
}

fn route_del(n: &Node) {
    let table = (ROUTE_TABLE_BASE + u32::from(n.id)).to_string();
    let _ = netns::ip(&["rule", "del", "fwmark", &n.id.to_string(), "lookup", &table]);
    let _ = netns::ip(&["route", "flush", "table", &table]);
}

fn write_sysctl(path: &str, value: &str) -> Result<(), SwitchError> {
    std::fs::write(path, value).map_err(|source| SwitchError::Sysctl {
        path: path.to_string(),
        source,
    })
}

/// Forwarding on, reverse-path filtering off (replies come from the virtual IP, which this
/// host routes only by mark) — for the namespace the calling thread is in.
fn forwarding(devs: &[&str]) -> Result<(), SwitchError> {
    write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    for d in ["all", "default"]
        .iter()
        .copied()
        .chain(devs.iter().copied())
    {
        write_sysctl(&format!("/proc/sys/net/ipv4/conf/{d}/rp_filter"), "0")?;
    }
    Ok(())
}

/// A running switch: its table's name and a mirror of the kernel's state, kept in step by
/// every change made through it.
#[derive(Debug)]
pub struct Switch {
    table: String,
    state: State,
}

impl Switch {
    /// Sets up a switch in the current network namespace: forwarding, one routing table per
    /// node, and the nft table with a bucket table spread evenly over `nodes`.
    pub fn create(table: &str, cfg: SwitchConfig, nodes: &[Node]) -> Result<Switch, SwitchError> {
        check_table(table)?;
        if cfg.buckets == 0 || cfg.ports.is_empty() {
            return Err(SwitchError::BadConfig);
        }
        if nft_list(table)?.is_some() {
            return Err(SwitchError::Exists(table.to_string()));
        }
        let mut ids = BTreeSet::new();
        for n in nodes {
            if !ids.insert(n.id) {
                return Err(SwitchError::NodeExists(n.id));
            }
        }
        let devs: Vec<&str> = nodes.iter().map(|n| n.dev.as_str()).collect();
        forwarding(&devs)?;
        let ids: Vec<NodeId> = ids.into_iter().collect();
        let b = buckets::initial(usize::from(cfg.buckets), &ids);
        let made = nodes
            .iter()
            .try_for_each(|n| route_add(cfg.vip, n))
            .and_then(|()| held::setup(table).map_err(SwitchError::from))
            .and_then(|()| nft_apply(&script::create(table, &cfg, nodes, &b)));
        if let Err(e) = made {
            // Leave no half-made switch behind.
            nodes.iter().for_each(route_del);
            held::teardown(table);
            return Err(e);
        }
        Ok(Switch {
            table: table.to_string(),
            state: State {
                config: Some(cfg),
                nodes: nodes.iter().map(|n| (n.id, n.clone())).collect(),
                buckets: b,
                has_failover: true,
                ..State::default()
            },
        })
    }

    /// The switch whose table is `table` in the current network namespace.
    pub fn open(table: &str) -> Result<Switch, SwitchError> {
        check_table(table)?;
        let v = nft_list(table)?.ok_or_else(|| SwitchError::NoTable(table.to_string()))?;
        Ok(Switch {
            table: table.to_string(),
            state: parse::parse_state(&v)?,
        })
    }

    /// Reads the state back from the kernel (counters included).
    pub fn refresh(&mut self) -> Result<&State, SwitchError> {
        let v = nft_list(&self.table)?.ok_or_else(|| SwitchError::NoTable(self.table.clone()))?;
        self.state = parse::parse_state(&v)?;
        Ok(&self.state)
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    fn vip(&self) -> Result<Ipv4Addr, SwitchError> {
        self.state
            .config
            .as_ref()
            .map(|c| c.vip)
            .ok_or_else(|| SwitchError::BadState("no config".into()))
    }

    /// Adds a node: its routing, then one transaction that names it and gives it its share of
    /// buckets (taken only from the other nodes' surplus). Returns the buckets that moved.
    pub fn add_node(&mut self, n: Node) -> Result<Vec<usize>, SwitchError> {
        if self.state.nodes.contains_key(&n.id) {
            return Err(SwitchError::NodeExists(n.id));
        }
        forwarding(&[&n.dev])?;
        route_add(self.vip()?, &n)?;
        let ids: Vec<NodeId> = self.state.nodes.keys().copied().collect();
        let new = buckets::with(&self.state.buckets, n.id, &ids);
        let mut s = script::add_node(&self.table, &n, self.state.has_failover);
        s.push_str(&script::rebucket(&self.table, &self.state.buckets, &new));
        if let Err(e) = nft_apply(&s) {
            route_del(&n);
            return Err(e);
        }
        let moved = buckets::moved(&self.state.buckets, &new);
        self.state.buckets = new;
        self.state.nodes.insert(n.id, n);
        Ok(moved)
    }

    /// Every node but `id`.
    pub(crate) fn others(&self, id: NodeId) -> Vec<NodeId> {
        self.state
            .nodes
            .keys()
            .copied()
            .filter(|&k| k != id)
            .collect()
    }

    /// Removes a node: one transaction that gives its buckets (and only those) to the others
    /// and forgets it, then its routing. Flows it owned by override, and fences against it,
    /// are dropped from the maps in the same transaction. Returns the buckets that moved.
    pub fn remove_node(&mut self, id: NodeId) -> Result<Vec<usize>, SwitchError> {
        let n = self
            .state
            .nodes
            .get(&id)
            .cloned()
            .ok_or(SwitchError::NoNode(id))?;
        let rest = self.others(id);
        let new = buckets::without(&self.state.buckets, id, &rest);
        let mut s = script::rebucket(&self.table, &self.state.buckets, &new);
        let owned: Vec<Flow> = self
            .state
            .owners
            .iter()
            .filter(|(_, &o)| o == id)
            .map(|(f, _)| *f)
            .collect();
        for f in &owned {
            s.push_str(&script::clear_owner(&self.table, f));
        }
        let fenced: Vec<Flow> = self
            .state
            .fences
            .iter()
            .filter(|(o, _)| *o == id)
            .map(|(_, f)| *f)
            .collect();
        for f in &fenced {
            s.push_str(&script::unfence(&self.table, &n.dev, f));
        }
        // Nothing may point at it any more: its whole-node fence and draining entries go too.
        if self.state.dead.contains(&id) {
            s.push_str(&script::delete_dead(&self.table, &n.dev));
        }
        let draining: Vec<usize> = self
            .state
            .draining
            .iter()
            .filter(|(_, &o)| o == id)
            .map(|(&b, _)| b)
            .collect();
        s.push_str(&script::delete_draining(&self.table, &draining));
        s.push_str(&script::delete_node(
            &self.table,
            &n,
            self.state.has_failover,
        ));
        nft_apply(&s)?;
        route_del(&n);
        let moved = buckets::moved(&self.state.buckets, &new);
        self.state.buckets = new;
        self.state.nodes.remove(&id);
        self.state.dead.remove(&id);
        self.state.counters.remove(&id);
        for b in draining {
            self.state.draining.remove(&b);
        }
        for f in owned {
            self.state.owners.remove(&f);
        }
        for f in fenced {
            self.state.fences.remove(&(id, f));
        }
        Ok(moved)
    }

    /// The transaction for `changes` against the current state, and the state after it.
    /// Changes that are already true are left out (nft refuses adding an element that exists
    /// with another value, and deleting one that does not exist).
    pub fn plan(&self, changes: &[Change]) -> Result<(String, State), SwitchError> {
        let mut st = self.state.clone();
        let mut s = String::new();
        let t = &self.table;
        let dev = |id: NodeId, st: &State| -> Result<String, SwitchError> {
            st.nodes
                .get(&id)
                .map(|n| n.dev.clone())
                .ok_or(SwitchError::NoNode(id))
        };
        for c in changes {
            match c {
                Change::Owner(f, n) => {
                    if !st.nodes.contains_key(n) {
                        return Err(SwitchError::NoNode(*n));
                    }
                    match st.owners.get(f) {
                        Some(o) if o == n => {}
                        Some(_) => {
                            s.push_str(&script::clear_owner(t, f));
                            s.push_str(&script::set_owner(t, f, *n));
                        }
                        None => s.push_str(&script::set_owner(t, f, *n)),
                    }
                    st.owners.insert(*f, *n);
                }
                Change::ClearOwner(f) => {
                    if st.owners.remove(f).is_some() {
                        s.push_str(&script::clear_owner(t, f));
                    }
                }
                Change::Hold(f) => {
                    if st.hold.insert(*f) {
                        s.push_str(&script::hold(t, f));
                    }
                }
                Change::Release(f) => {
                    if st.hold.remove(f) {
                        s.push_str(&script::release(t, f));
                    }
                }
                Change::Fence(f, n) => {
                    let d = dev(*n, &st)?;
                    if st.fences.insert((*n, *f)) {
                        s.push_str(&script::fence(t, &d, f));
                    }
                }
                Change::Unfence(f, n) => {
                    let d = dev(*n, &st)?;
                    if st.fences.remove(&(*n, *f)) {
                        s.push_str(&script::unfence(t, &d, f));
                    }
                }
            }
        }
        Ok((s, st))
    }

    /// Applies `changes` as one atomic transaction.
    pub fn apply(&mut self, changes: &[Change]) -> Result<(), SwitchError> {
        let (s, st) = self.plan(changes)?;
        if !s.is_empty() {
            nft_apply(&s)?;
        }
        self.state = st;
        Ok(())
    }

    /// Moves a flow to node `to` in one transaction: `to` owns it, every other node is fenced
    /// from it, and a hold on it is released.
    pub fn move_flow(&mut self, f: Flow, to: NodeId) -> Result<(), SwitchError> {
        let mut c = vec![Change::Owner(f, to), Change::Unfence(f, to)];
        for &n in self.state.nodes.keys() {
            if n != to {
                c.push(Change::Fence(f, n));
            }
        }
        c.push(Change::Release(f));
        self.apply(&c)
    }

    /// Removes the switch's table and routing from the current namespace.
    pub fn destroy(self) -> Result<(), SwitchError> {
        nft_apply(&format!("delete table ip {}\n", self.table))?;
        for n in self.state.nodes.values() {
            route_del(n);
        }
        held::teardown(&self.table);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_syntax() {
        let n: Node = "3=198.18.3.2@n3".parse().unwrap();
        assert_eq!(
            n,
            Node::new(3, "198.18.3.2".parse().unwrap(), "n3").unwrap()
        );
        for bad in [
            "0=1.2.3.4@x",
            "1=1.2.3.4",
            "1=x@y",
            "1=1.2.3.4@a\"b",
            "1=1.2.3.4@0123456789abcdef",
        ] {
            assert!(bad.parse::<Node>().is_err(), "{bad}");
        }
    }

    #[test]
    fn plans_skip_what_is_already_true() {
        let sw = Switch {
            table: "t".into(),
            state: State {
                nodes: [
                    (1, Node::new(1, Ipv4Addr::LOCALHOST, "n1").unwrap()),
                    (2, Node::new(2, Ipv4Addr::LOCALHOST, "n2").unwrap()),
                ]
                .into(),
                ..State::default()
            },
        };
        let f = Flow("198.18.0.2:4000".parse().unwrap());
        let (s, st) = sw
            .plan(&[
                Change::Owner(f, 2),
                Change::Owner(f, 1),
                Change::Release(f),
                Change::Fence(f, 2),
            ])
            .unwrap();
        assert_eq!(
            s,
            "add element ip t owners { 198.18.0.2 . 4000 : 2 }\n\
             delete element ip t owners { 198.18.0.2 . 4000 }\n\
             add element ip t owners { 198.18.0.2 . 4000 : 1 }\n\
             add element ip t fences { \"n2\" . 198.18.0.2 . 4000 }\n"
        );
        assert_eq!(st.owners.get(&f), Some(&1));
        assert!(sw.plan(&[Change::Owner(f, 9)]).is_err());
    }
}
