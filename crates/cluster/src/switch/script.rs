//! The nftables side of the switch as text: the table that steers a virtual IP, and the
//! transactions that change it. Pure string building; `nft -f -` applies each script as one
//! atomic transaction (all of it or none of it).
//!
//! ```text
//! table ip splitos {
//!   set config   { type ipv4_addr . inet_service . mark . mark }  # vip . port . buckets . seed
//!   set nodes    { type mark . ipv4_addr . ifname }               # id . next hop . interface
//!   map buckets  { type mark : mark }           # 0x10000 + bucket -> node id
//!   map owners   { type ipv4_addr . inet_service : mark }  # client . port -> node id (moved flows)
//!   set hold     { type ipv4_addr . inet_service }         # flows being moved: dropped
//!   set fences   { type ifname . ipv4_addr . inet_service }  # node interface . client . port
//!   map draining { type mark : mark; timeout }  # bucket mark -> the node it left
//!   set fresh    { type ipv4_addr . inet_service; dynamic, timeout 120s }  # new in a draining bucket
//!   set dead     { type ifname }                # interfaces of dead nodes
//!   map node_fwd, node_dead { type ifname : counter }  # "nK" -> counter fwd_K / dead_K
//!   chain steer { prerouting, mangle:
//!     VIP:ports from a held flow: drop
//!     VIP:ports: mark = 0x10000 + jhash(client addr . client port) mod N
//!     VIP:ports, a first SYN in a draining bucket: remember the flow in fresh
//!     VIP:ports, not a first SYN, not fresh: mark = draining[mark]  (a miss leaves the bucket)
//!     VIP:ports: mark = buckets[mark]
//!     VIP:ports: mark = owners[client . port]   (a miss leaves the bucket's node)
//!   }
//!   chain fence { forward, filter:
//!     from VIP, arriving on a dead node's interface: count (dead_K), drop
//!     from VIP:ports, arriving on a fenced node's interface for that client: drop
//!     from VIP:ports: count (fwd_K of the interface's node) }
//! }
//! ```
//! The mark then picks the node's routing table (`ip rule fwmark ID lookup 1000+ID`), whose
//! one route sends the VIP to that node: no NAT, and the nodes answer straight back.
//!
//! The bucket number travels through the mark because nft 1.0.6 crashes listing a map typed
//! `typeof jhash ...` (checked on this machine), while `type mark : mark` lists fine.

use super::{Flow, Node, NodeId, SwitchConfig};
use std::fmt::Write as _;

/// Marks at and above this carry a bucket number between two rules of `steer`.
pub const BUCKET_MARK_BASE: u32 = 0x1_0000;

/// How long a connection begun in a draining bucket is known as new there, so that its
/// packets after the SYN follow the bucket table and not the draining entry. Longer than any
/// draining entry lives: a drain ends within seconds, and a returning node's draining entries
/// expire after at most [`RETURN_DRAIN_MAX_S`].
pub const FRESH_TIMEOUT_S: u32 = 150;
/// The longest a draining entry made for a returning node may live.
pub const RETURN_DRAIN_MAX_S: u32 = 120;
/// Most connections remembered as new in draining buckets at once; beyond it a new
/// connection in a draining bucket has its packets after the SYN sent to the bucket's old
/// node (which resets it). At 2^20 that is about 7,000 new connections a second in draining
/// buckets; elements are allocated as used.
pub const FRESH_MAX: u32 = 1 << 20;

/// The named counters of node `id`: (forwarded to clients, dropped as dead).
pub fn counter_names(id: NodeId) -> (String, String) {
    (format!("fwd_{id}"), format!("dead_{id}"))
}

fn ports(cfg: &SwitchConfig) -> String {
    let p: Vec<String> = cfg.ports.iter().map(u16::to_string).collect();
    format!("{{ {} }}", p.join(", "))
}

fn flow_key(f: &Flow) -> String {
    format!("{} . {}", f.0.ip(), f.0.port())
}

fn fence_key(dev: &str, f: &Flow) -> String {
    format!("\"{dev}\" . {}", flow_key(f))
}

fn node_key(n: &Node) -> String {
    format!("{} . {} . \"{}\"", n.id, n.via, n.dev)
}

/// The whole table, with `nodes` and the bucket table `buckets` (index = bucket).
pub fn create(table: &str, cfg: &SwitchConfig, nodes: &[Node], buckets: &[NodeId]) -> String {
    let vip = cfg.vip;
    let ports = ports(cfg);
    let mut s = String::new();
    let _ = writeln!(s, "table ip {table} {{");
    let _ = writeln!(
        s,
        "  set config {{ type ipv4_addr . inet_service . mark . mark; }}"
    );
    let _ = writeln!(s, "  set nodes {{ type mark . ipv4_addr . ifname; }}");
    let _ = writeln!(s, "  map buckets {{ type mark : mark; }}");
    let _ = writeln!(s, "  map draining {{ type mark : mark; flags timeout; }}");
    let _ = writeln!(
        s,
        "  map owners {{ type ipv4_addr . inet_service : mark; }}"
    );
    // Held flows expire: an operator that dies in the middle of a migration must not leave
    // a flow held for good (see `HOLD_TIMEOUT`).
    let _ = writeln!(
        s,
        "  set hold {{ type ipv4_addr . inet_service; flags timeout; }}"
    );
    let _ = writeln!(
        s,
        "  set fences {{ type ifname . ipv4_addr . inet_service; }}"
    );
    let _ = writeln!(
        s,
        "  set fresh {{ type ipv4_addr . inet_service; flags dynamic, timeout; timeout {FRESH_TIMEOUT_S}s; size {FRESH_MAX}; }}"
    );
    let _ = writeln!(s, "  set dead {{ type ifname; }}");
    let _ = writeln!(s, "  map node_fwd {{ type ifname : counter; }}");
    let _ = writeln!(s, "  map node_dead {{ type ifname : counter; }}");
    let _ = writeln!(s, "  counter held {{}}");
    let _ = writeln!(s, "  counter fenced {{}}");
    let _ = writeln!(s, "  chain steer {{");
    let _ = writeln!(
        s,
        "    type filter hook prerouting priority mangle; policy accept;"
    );
    let _ = writeln!(
        s,
        "    ip daddr {vip} tcp dport {ports} ip saddr . tcp sport @hold counter name \"held\" meta mark set {:#x} accept",
        super::held::HOLD_MARK
    );
    let _ = writeln!(
        s,
        "    ip daddr {vip} tcp dport {ports} meta mark set jhash ip saddr . tcp sport mod {} seed {:#x} offset {:#x}",
        cfg.buckets, cfg.seed, BUCKET_MARK_BASE
    );
    // A draining bucket's established flows (anything but a first SYN) stay with the node
    // it left; a miss leaves the bucket mark, and the bucket table decides. After a hit the
    // mark is a node id, which the bucket table (keyed by bucket marks) does not know.
    // A connection that began in the bucket after it started draining is not one of them:
    // its first SYN puts it in `fresh`, and the rest of its packets follow the bucket table
    // with it (without this, the handshake's ACK would go to the old node, which resets it).
    let _ = writeln!(
        s,
        "    ip daddr {vip} tcp dport {ports} tcp flags & (syn | ack) == syn meta mark @draining update @fresh {{ ip saddr . tcp sport }}"
    );
    let _ = writeln!(
        s,
        "    ip daddr {vip} tcp dport {ports} tcp flags & (syn | ack) != syn ip saddr . tcp sport != @fresh meta mark set meta mark map @draining"
    );
    let _ = writeln!(
        s,
        "    ip daddr {vip} tcp dport {ports} meta mark set meta mark map @buckets"
    );
    let _ = writeln!(
        s,
        "    ip daddr {vip} tcp dport {ports} meta mark set ip saddr . tcp sport map @owners"
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain fence {{");
    let _ = writeln!(
        s,
        "    type filter hook forward priority filter; policy accept;"
    );
    // A dead node: nothing it sends as the virtual IP (any port: every answer a client could
    // take for the service's) goes on. Its other traffic does, so that it can reach the
    // control plane (etcd) and come back as a new incarnation.
    let _ = writeln!(
        s,
        "    ip saddr {vip} iifname @dead counter name iifname map @node_dead drop"
    );
    let _ = writeln!(
        s,
        "    ip saddr {vip} tcp sport {ports} iifname . ip daddr . tcp dport @fences counter name \"fenced\" drop"
    );
    // What got through, per node (a miss — not a node's interface — counts nothing).
    let _ = writeln!(
        s,
        "    ip saddr {vip} tcp sport {ports} counter name iifname map @node_fwd"
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");
    let cfg_elems: Vec<String> = cfg
        .ports
        .iter()
        .map(|p| format!("{vip} . {p} . {} . {:#x}", cfg.buckets, cfg.seed))
        .collect();
    let _ = writeln!(
        s,
        "add element ip {table} config {{ {} }}",
        cfg_elems.join(", ")
    );
    for n in nodes {
        s.push_str(&add_node(table, n, true));
    }
    s.push_str(&bucket_elements(table, "add", buckets, 0..buckets.len()));
    s
}

/// `add`/`delete` lines for buckets `which` of `table_map`.
fn bucket_elements(
    table: &str,
    verb: &str,
    buckets: &[NodeId],
    which: impl IntoIterator<Item = usize>,
) -> String {
    let elems: Vec<String> = which
        .into_iter()
        .filter_map(|i| {
            buckets.get(i).map(|n| {
                if verb == "delete" {
                    format!("{:#x}", BUCKET_MARK_BASE + i as u32)
                } else {
                    format!("{:#x} : {n}", BUCKET_MARK_BASE + i as u32)
                }
            })
        })
        .collect();
    if elems.is_empty() {
        return String::new();
    }
    format!(
        "{verb} element ip {table} buckets {{ {} }}\n",
        elems.join(", ")
    )
}

/// Rewrites the buckets that differ between `old` and `new` (delete then add, in one
/// transaction with whatever else the script holds).
pub fn rebucket(table: &str, old: &[NodeId], new: &[NodeId]) -> String {
    let moved = super::buckets::moved(old, new);
    let mut s = bucket_elements(table, "delete", old, moved.iter().copied());
    s.push_str(&bucket_elements(table, "add", new, moved));
    s
}

/// Names node `n`, with its two counters (`counters`: the table has them, see
/// `State::has_failover`).
pub fn add_node(table: &str, n: &Node, counters: bool) -> String {
    if !counters {
        return format!("add element ip {table} nodes {{ {} }}\n", node_key(n));
    }
    let (fwd, dead) = counter_names(n.id);
    let dev = &n.dev;
    format!(
        "add element ip {table} nodes {{ {} }}\n\
         add counter ip {table} {fwd}\n\
         add counter ip {table} {dead}\n\
         add element ip {table} node_fwd {{ \"{dev}\" : \"{fwd}\" }}\n\
         add element ip {table} node_dead {{ \"{dev}\" : \"{dead}\" }}\n",
        node_key(n)
    )
}

/// Forgets node `n` and its counters (their map elements first: a counter in use cannot go).
pub fn delete_node(table: &str, n: &Node, counters: bool) -> String {
    if !counters {
        return format!("delete element ip {table} nodes {{ {} }}\n", node_key(n));
    }
    let (fwd, dead) = counter_names(n.id);
    let dev = &n.dev;
    format!(
        "delete element ip {table} node_fwd {{ \"{dev}\" }}\n\
         delete element ip {table} node_dead {{ \"{dev}\" }}\n\
         delete counter ip {table} {fwd}\n\
         delete counter ip {table} {dead}\n\
         delete element ip {table} nodes {{ {} }}\n",
        node_key(n)
    )
}

/// Fences node `dev` wholly (see `create`).
pub fn add_dead(table: &str, dev: &str) -> String {
    format!("add element ip {table} dead {{ \"{dev}\" }}\n")
}

pub fn delete_dead(table: &str, dev: &str) -> String {
    format!("delete element ip {table} dead {{ \"{dev}\" }}\n")
}

/// Draining entries: `(bucket, node it left)`, each expiring after `timeout_s` (0: never).
pub fn add_draining(table: &str, entries: &[(usize, NodeId)], timeout_s: u32) -> String {
    if entries.is_empty() {
        return String::new();
    }
    let t = if timeout_s > 0 {
        format!(" timeout {timeout_s}s")
    } else {
        String::new()
    };
    let elems: Vec<String> = entries
        .iter()
        .map(|&(b, n)| format!("{:#x}{t} : {n}", BUCKET_MARK_BASE + b as u32))
        .collect();
    format!(
        "add element ip {table} draining {{ {} }}\n",
        elems.join(", ")
    )
}

pub fn delete_draining(table: &str, buckets: &[usize]) -> String {
    if buckets.is_empty() {
        return String::new();
    }
    let elems: Vec<String> = buckets
        .iter()
        .map(|&b| format!("{:#x}", BUCKET_MARK_BASE + b as u32))
        .collect();
    format!(
        "delete element ip {table} draining {{ {} }}\n",
        elems.join(", ")
    )
}

pub fn set_owner(table: &str, f: &Flow, node: NodeId) -> String {
    format!(
        "add element ip {table} owners {{ {} : {node} }}\n",
        flow_key(f)
    )
}

pub fn clear_owner(table: &str, f: &Flow) -> String {
    format!("delete element ip {table} owners {{ {} }}\n", flow_key(f))
}

/// How long a flow stays held if nobody releases it. Longer than any migration may take (the
/// node link gives up on a verdict after 10 s, and undoes the move), so a release never finds
/// its element gone; short enough that a crashed operator costs its clients a pause, not
/// their connections.
pub const HOLD_TIMEOUT_S: u32 = 30;

pub fn hold(table: &str, f: &Flow) -> String {
    format!(
        "add element ip {table} hold {{ {} timeout {HOLD_TIMEOUT_S}s }}\n",
        flow_key(f)
    )
}

pub fn release(table: &str, f: &Flow) -> String {
    format!("delete element ip {table} hold {{ {} }}\n", flow_key(f))
}

pub fn fence(table: &str, dev: &str, f: &Flow) -> String {
    format!(
        "add element ip {table} fences {{ {} }}\n",
        fence_key(dev, f)
    )
}

pub fn unfence(table: &str, dev: &str, f: &Flow) -> String {
    format!(
        "delete element ip {table} fences {{ {} }}\n",
        fence_key(dev, f)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_script_reads_like_the_sketch() {
        let cfg = SwitchConfig {
            vip: "198.19.0.1".parse().unwrap(),
            ports: vec![80, 8080],
            buckets: 4,
            seed: 0x5eed,
        };
        let nodes = [
            Node::new(1, "198.18.1.2".parse().unwrap(), "n1").unwrap(),
            Node::new(2, "198.18.2.2".parse().unwrap(), "n2").unwrap(),
        ];
        let s = create("splitos", &cfg, &nodes, &[1, 2, 1, 2]);
        assert!(s.contains(
            "ip daddr 198.19.0.1 tcp dport { 80, 8080 } meta mark set jhash ip saddr . tcp sport mod 4 seed 0x5eed offset 0x10000"
        ));
        assert!(s.contains("add element ip splitos nodes { 2 . 198.18.2.2 . \"n2\" }"));
        assert!(s.contains(
            "add element ip splitos buckets { 0x10000 : 1, 0x10001 : 2, 0x10002 : 1, 0x10003 : 2 }"
        ));
        assert!(s.contains("198.19.0.1 . 8080 . 4 . 0x5eed"));
    }

    #[test]
    fn rebucket_touches_only_moved_buckets() {
        let s = rebucket("t", &[1, 2, 3, 1], &[1, 2, 1, 1]);
        assert_eq!(
            s,
            "delete element ip t buckets { 0x10002 }\nadd element ip t buckets { 0x10002 : 1 }\n"
        );
        assert_eq!(rebucket("t", &[1, 2], &[1, 2]), "");
    }
}
