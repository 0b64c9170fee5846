//! Reading a switch's state back from the kernel: `nft -j list table` output parsed into a
//! [`State`]. The kernel's table is the switch's only store, so this is how every process
//! that drives a switch learns what it is.

use super::{script, Flow, Node, NodeId, State, SwitchConfig, SwitchError};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

/// A number in nft's JSON: a number, or a string in decimal or 0x-hex.
fn num(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s
            .strip_prefix("0x")
            .map_or_else(|| s.parse().ok(), |h| u64::from_str_radix(h, 16).ok()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<&str> {
    v.as_str()
}

/// The parts of a concatenated element (or a single value as one part).
fn parts(v: &Value) -> Vec<&Value> {
    let v = v.get("elem").and_then(|e| e.get("val")).unwrap_or(v);
    match v.get("concat").and_then(Value::as_array) {
        Some(a) => a.iter().collect(),
        None => vec![v],
    }
}

fn flow_of(ip: &Value, port: &Value) -> Option<Flow> {
    let ip: Ipv4Addr = text(ip)?.parse().ok()?;
    let port = u16::try_from(num(port)?).ok()?;
    Some(Flow(SocketAddrV4::new(ip, port)))
}

/// Reads a switch's state out of `nft -j list table` output.
pub(super) fn parse_state(v: &Value) -> Result<State, SwitchError> {
    let bad = |what: &str| SwitchError::BadState(what.to_string());
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no nftables array"))?;
    let mut st = State::default();
    let mut buckets: BTreeMap<u32, NodeId> = BTreeMap::new();
    let mut fences_by_dev: Vec<(String, Flow)> = Vec::new();
    let mut dead_devs: Vec<String> = Vec::new();
    for item in items {
        if let Some(c) = item.get("counter") {
            let packets = c.get("packets").and_then(num).unwrap_or(0);
            let name = c.get("name").and_then(Value::as_str).unwrap_or("");
            let node = |p: &str| -> Option<NodeId> { name.strip_prefix(p)?.parse().ok() };
            match name {
                "held" => st.held_packets = packets,
                "fenced" => st.fenced_packets = packets,
                _ => {
                    if let Some(id) = node("fwd_") {
                        st.counters.entry(id).or_default().forwarded = packets;
                    } else if let Some(id) = node("dead_") {
                        st.counters.entry(id).or_default().dead_dropped = packets;
                    }
                }
            }
            continue;
        }
        let Some(set) = item.get("set").or_else(|| item.get("map")) else {
            continue;
        };
        let name = set.get("name").and_then(Value::as_str).unwrap_or("");
        if name == "dead" {
            st.has_failover = true;
        }
        // Connections the packet path remembers as new (possibly many): nothing to keep.
        if name == "fresh" {
            continue;
        }
        let empty = Vec::new();
        let elems = set.get("elem").and_then(Value::as_array).unwrap_or(&empty);
        for e in elems {
            // An element with a timeout is an object around its value.
            let e = e.get("elem").and_then(|x| x.get("val")).unwrap_or(e);
            // Map elements are [key, value]; set elements are the key.
            let (key, val) = match e.as_array() {
                Some(kv) if kv.len() == 2 => (&kv[0], Some(&kv[1])),
                _ => (e, None),
            };
            let p = parts(key);
            match (name, p.as_slice(), val) {
                ("config", [ip, port, n, seed], None) => {
                    let vip: Ipv4Addr = text(ip)
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| bad("config vip"))?;
                    let port = num(port)
                        .and_then(|p| u16::try_from(p).ok())
                        .ok_or_else(|| bad("config port"))?;
                    let n = num(n)
                        .and_then(|p| u16::try_from(p).ok())
                        .ok_or_else(|| bad("config buckets"))?;
                    let seed = num(seed)
                        .and_then(|p| u32::try_from(p).ok())
                        .ok_or_else(|| bad("config seed"))?;
                    let c = st.config.get_or_insert(SwitchConfig {
                        vip,
                        ports: Vec::new(),
                        buckets: n,
                        seed,
                    });
                    c.ports.push(port);
                    c.ports.sort_unstable();
                }
                ("nodes", [id, via, dev], None) => {
                    let id = num(id)
                        .and_then(|i| NodeId::try_from(i).ok())
                        .ok_or_else(|| bad("node id"))?;
                    let via: Ipv4Addr = text(via)
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| bad("node address"))?;
                    let dev = text(dev).ok_or_else(|| bad("node interface"))?;
                    st.nodes.insert(id, Node::new(id, via, dev)?);
                }
                ("buckets", [b], Some(n)) => {
                    let b = num(b)
                        .and_then(|b| u32::try_from(b).ok())
                        .ok_or_else(|| bad("bucket"))?;
                    let n = num(n)
                        .and_then(|n| NodeId::try_from(n).ok())
                        .ok_or_else(|| bad("bucket node"))?;
                    buckets.insert(b, n);
                }
                ("draining", [b], Some(n)) => {
                    let b = num(b)
                        .and_then(|b| u32::try_from(b).ok())
                        .and_then(|b| b.checked_sub(script::BUCKET_MARK_BASE))
                        .ok_or_else(|| bad("draining bucket"))?;
                    let n = num(n)
                        .and_then(|n| NodeId::try_from(n).ok())
                        .ok_or_else(|| bad("draining node"))?;
                    st.draining.insert(b as usize, n);
                }
                ("owners", [ip, port], Some(n)) => {
                    let f = flow_of(ip, port).ok_or_else(|| bad("owner flow"))?;
                    let n = num(n)
                        .and_then(|n| NodeId::try_from(n).ok())
                        .ok_or_else(|| bad("owner node"))?;
                    st.owners.insert(f, n);
                }
                ("hold", [ip, port], None) => {
                    st.hold
                        .insert(flow_of(ip, port).ok_or_else(|| bad("held flow"))?);
                }
                ("fences", [dev, ip, port], None) => {
                    let dev = text(dev).ok_or_else(|| bad("fence interface"))?;
                    let f = flow_of(ip, port).ok_or_else(|| bad("fenced flow"))?;
                    fences_by_dev.push((dev.to_string(), f));
                }
                ("dead", [dev], None) => {
                    dead_devs.push(text(dev).ok_or_else(|| bad("dead interface"))?.to_string());
                }
                // Which counter is whose: the counters' names say it too.
                ("node_fwd" | "node_dead", [_], Some(_)) => {}
                _ => return Err(bad(&format!("unexpected element in {name}: {e}"))),
            }
        }
    }
    let cfg = st.config.as_ref().ok_or_else(|| bad("no config"))?;
    st.buckets = (0..u32::from(cfg.buckets))
        .map(|i| {
            buckets
                .get(&(script::BUCKET_MARK_BASE + i))
                .copied()
                .unwrap_or(0)
        })
        .collect();
    for (dev, f) in fences_by_dev {
        let id = st
            .nodes
            .values()
            .find(|n| n.dev == dev)
            .map(|n| n.id)
            .ok_or_else(|| bad(&format!("fence on unknown interface {dev}")))?;
        st.fences.insert((id, f));
    }
    for dev in dead_devs {
        let id = st
            .nodes
            .values()
            .find(|n| n.dev == dev)
            .map(|n| n.id)
            .ok_or_else(|| bad(&format!("dead fence on unknown interface {dev}")))?;
        st.dead.insert(id);
    }
    // Counters of nodes that are gone (none should be) are not reported.
    st.counters.retain(|id, _| st.nodes.contains_key(id));
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_from_nft_json() {
        // As printed by nft 1.0.6 (`nft -j list table ip splitos`), trimmed.
        let j = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"table": {"family": "ip", "name": "splitos", "handle": 5}},
          {"set": {"name": "config", "elem": [{"concat": ["198.19.0.1", 80, 2, 24301]}]}},
          {"set": {"name": "nodes", "elem": [{"concat": [1, "198.18.1.2", "n1"]}, {"concat": [2, "198.18.2.2", "n2"]}]}},
          {"map": {"name": "buckets", "elem": [[65536, 1], [65537, 2]]}},
          {"map": {"name": "owners", "elem": [[{"concat": ["198.18.0.2", 4000]}, 2]]}},
          {"set": {"name": "hold", "flags": ["timeout"], "elem": [{"concat": ["198.18.0.2", 4001]},
            {"elem": {"val": {"concat": ["198.18.0.2", 4002]}, "timeout": 30, "expires": 29}}]}},
          {"map": {"name": "draining", "elem": [[65537, 2]]}},
          {"set": {"name": "fences", "elem": [{"concat": ["n1", "198.18.0.2", 4000]}]}},
          {"set": {"name": "dead", "type": "ifname", "elem": ["n2"]}},
          {"map": {"name": "node_fwd", "type": "ifname", "map": "counter", "elem": [["n1", "fwd_1"]]}},
          {"set": {"name": "fresh", "elem": [{"elem": {"val": {"concat": ["198.18.0.2", 9]}, "timeout": 150, "expires": 3}}]}},
          {"counter": {"name": "fwd_1", "packets": 11, "bytes": 420}},
          {"counter": {"name": "dead_2", "packets": 3, "bytes": 420}},
          {"counter": {"name": "fenced", "packets": 7, "bytes": 420}}]}"#;
        let st = parse_state(&serde_json::from_str(j).unwrap()).unwrap();
        let f = |p| Flow(SocketAddrV4::new("198.18.0.2".parse().unwrap(), p));
        assert_eq!(st.buckets, vec![1, 2]);
        assert_eq!(st.owners.get(&f(4000)), Some(&2));
        assert!(st.hold.contains(&f(4001)));
        assert!(st.hold.contains(&f(4002)), "an element with a timeout");
        assert_eq!(st.draining.get(&1), Some(&2));
        assert!(st.fences.contains(&(1, f(4000))));
        assert_eq!(st.fenced_packets, 7);
        assert!(st.has_failover);
        assert_eq!(st.dead, [2].into());
        assert_eq!(st.counters[&1].forwarded, 11);
        assert_eq!(st.counters[&2].dead_dropped, 3);
        assert_eq!(st.config.unwrap().ports, vec![80]);
    }
}
