//! The shape of a cluster on one machine: a `client` namespace, a `switch` namespace and
//! `node1`..`nodeN`, joined by veth pairs, all named with one prefix. Used by the lab and by
//! the tests; addresses come only from 198.18.0.0/15 and exist only inside these namespaces.
//!
//! ```text
//!  client (198.18.0.2, "sw") ── (198.18.0.1, "c") switch ("nK", 198.18.K.1) ── ("sw", 198.18.K.2) nodeK
//!                                                                    the virtual IP on each node's lo
//! ```

use crate::netns::{self, NetnsError};
use crate::switch::{Node, NodeId};
use std::net::Ipv4Addr;

/// The virtual IP unless told otherwise.
pub const DEFAULT_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Most nodes a topology can have (one /24 of 198.18.0.0/16 each).
pub const MAX_NODES: u16 = 254;

/// Names and addresses of one cluster's namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub prefix: String,
    pub nodes: u16,
    pub vip: Ipv4Addr,
}

impl Topology {
    pub fn new(prefix: &str, nodes: u16) -> Result<Topology, NetnsError> {
        netns::check_name(&format!("{prefix}-switch"))?;
        if nodes == 0 || nodes > MAX_NODES {
            return Err(NetnsError::BadName(format!(
                "{nodes} nodes (1..={MAX_NODES})"
            )));
        }
        Ok(Topology {
            prefix: prefix.to_string(),
            nodes,
            vip: DEFAULT_VIP,
        })
    }

    pub fn client(&self) -> String {
        format!("{}-client", self.prefix)
    }
    pub fn switch(&self) -> String {
        format!("{}-switch", self.prefix)
    }
    pub fn node(&self, k: NodeId) -> String {
        format!("{}-node{k}", self.prefix)
    }
    /// Every namespace, client first.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = vec![self.client(), self.switch()];
        v.extend((1..=self.nodes).map(|k| self.node(k)));
        v
    }
    /// Node `k`'s address on its link to the switch.
    pub fn node_addr(k: NodeId) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, k as u8, 2)
    }
    /// The nodes as the switch sees them.
    pub fn switch_nodes(&self) -> Vec<Node> {
        (1..=self.nodes)
            .filter_map(|k| Node::new(k, Self::node_addr(k), &format!("n{k}")).ok())
            .collect()
    }

    /// Creates the namespaces and links. On an error, what was made is left for
    /// [`Topology::destroy`].
    pub fn build(&self) -> Result<(), NetnsError> {
        for ns in self.namespaces() {
            if netns::exists(&ns) {
                return Err(NetnsError::Command {
                    cmd: format!("ip netns add {ns}"),
                    stderr: "the namespace already exists (is the lab up? `splitos lab down`)"
                        .into(),
                });
            }
        }
        let (c, s) = (self.client(), self.switch());
        netns::create(&c)?;
        netns::create(&s)?;
        netns::veth(&s, "c", "198.18.0.1/24", &c, "sw", "198.18.0.2/24")?;
        netns::ip(&["-n", &c, "route", "add", "default", "via", "198.18.0.1"])?;
        for k in 1..=self.nodes {
            let n = self.node(k);
            netns::create(&n)?;
            netns::veth(
                &s,
                &format!("n{k}"),
                &format!("198.18.{k}.1/24"),
                &n,
                "sw",
                &format!("{}/24", Self::node_addr(k)),
            )?;
            netns::ip(&[
                "-n",
                &n,
                "route",
                "add",
                "default",
                "via",
                &format!("198.18.{k}.1"),
            ])?;
            netns::ip(&[
                "-n",
                &n,
                "addr",
                "add",
                &format!("{}/32", self.vip),
                "dev",
                "lo",
            ])?;
        }
        Ok(())
    }

    /// Kills every process left in the namespaces and deletes them. Never fails half-way:
    /// returns what it could not remove.
    pub fn destroy(&self) -> Vec<String> {
        destroy_prefixed(&self.namespaces())
    }
}

/// Kills the processes inside `namespaces` (TERM, then KILL after a second) and deletes the
/// namespaces; returns the ones that could not be deleted.
pub fn destroy_prefixed(namespaces: &[String]) -> Vec<String> {
    use rustix::process::{kill_process, Pid, Signal};
    for sig in [Signal::TERM, Signal::KILL] {
        let mut any = false;
        for ns in namespaces {
            for p in netns::pids(ns) {
                if let Some(pid) = Pid::from_raw(p) {
                    any |= kill_process(pid, sig).is_ok();
                }
            }
        }
        if !any {
            break;
        }
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::time::Instant::now() < until
            && namespaces.iter().any(|ns| !netns::pids(ns).is_empty())
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    namespaces
        .iter()
        .filter(|ns| netns::delete(ns).is_err())
        .cloned()
        .collect()
}
