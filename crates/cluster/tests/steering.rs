//! Targets S1–S3 of the steering switch, each in a cluster of namespaces the test builds (and
//! removes, also on failure): real TCP connections from the client namespace to the virtual IP,
//! servers in the node namespaces, the switch's nft table in between.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use splitos_cluster::switch::{Flow, NodeId};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};
use support::{connect, nft, packets, Cluster};

/// S1: 10,000 new connections spread 50% ± 5% over two nodes.
#[test]
fn s1_new_connections_spread_evenly() {
    let c = Cluster::new("s1", 2);
    let vip = c.vip_addr();
    let n = 10_000;
    let start = Instant::now();
    let counts: BTreeMap<u16, usize> = c.client(|| {
        let mut counts = BTreeMap::new();
        for i in 0..n {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "only {i} connections in 120 s"
            );
            let (s, node) = connect(vip);
            drop(s);
            *counts.entry(node).or_insert(0) += 1;
        }
        counts
    });
    let share = |k| *counts.get(&k).unwrap_or(&0) as f64 / n as f64;
    eprintln!(
        "S1: {n} connections in {:.1} s: node1 {:.2}%, node2 {:.2}%",
        start.elapsed().as_secs_f64(),
        share(1) * 100.0,
        share(2) * 100.0
    );
    for k in [1, 2] {
        assert!((0.45..=0.55).contains(&share(k)), "{counts:?}");
    }
}

/// S2: removing a third node moves only its buckets and resets none of the other nodes'
/// established flows (each still echoes on the same socket); its own flows are moved away
/// (they now reach a node that has no socket for them).
#[test]
fn s2_removing_a_node_resets_no_other_flow() {
    let c = Cluster::new("s2", 3);
    let vip = c.vip_addr();
    let conns = c.client(|| (0..300).map(|_| connect(vip)).collect::<Vec<_>>());
    let per: Vec<usize> = (1..=3)
        .map(|k| conns.iter().filter(|(_, n)| *n == k).count())
        .collect();
    assert!(per.iter().all(|&p| p > 0), "flows on each node: {per:?}");
    let (before, moved, after) = c.switch(|sw| {
        let before = sw.state().buckets.clone();
        let moved = sw.remove_node(3).unwrap();
        let after = sw.refresh().unwrap().buckets.clone();
        (before, moved, after)
    });
    assert!(!moved.is_empty());
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        if b == a {
            assert!(!moved.contains(&i));
        } else {
            assert_eq!(*b, 3, "bucket {i} moved from node {b}");
            assert!(moved.contains(&i));
        }
    }
    assert!(!after.contains(&3));
    let mut kept = 0;
    let mut lost_from_3 = 0;
    for (mut s, node) in conns {
        let ping = b"ping";
        let ok = s.write_all(ping).is_ok() && {
            let mut b = [0u8; 4];
            s.read_exact(&mut b).is_ok() && &b == ping
        };
        if node == 3 {
            lost_from_3 += usize::from(!ok);
        } else {
            assert!(ok, "a flow of node {node} broke");
            kept += 1;
        }
    }
    eprintln!(
        "S2: 300 flows (n1 {}, n2 {}, n3 {}); removing node3 moved {} of {} buckets, all node3's; \
         {kept} flows of node1/node2 echo on the same socket, 0 reset; {lost_from_3} of node3's \
         flows now reach a node without their socket",
        per[0],
        per[1],
        per[2],
        moved.len(),
        before.len()
    );
    assert!(lost_from_3 > 0, "node3's flows should have been moved away");
}

/// S3: after a flow moves from node A to node B, no packet that A still sends for it reaches
/// the client: a per-flow counter rule after the fence counts A's packets let through (0),
/// while the fence's own counter shows A did send.
#[test]
fn s3_a_fenced_node_reaches_no_client() {
    let c = Cluster::new("s3", 2);
    let vip = c.vip_addr();
    let (mut s, a) = c.client(|| connect(vip));
    let port = s.local_addr().unwrap().port();
    let b: NodeId = if a == 1 { 2 } else { 1 };
    let client_ip = splitos_cluster::topology::CLIENT_ADDR;
    let flow = Flow(SocketAddrV4::new(client_ip, port));
    // The per-flow counters: packets of this flow forwarded to the client, by the node
    // interface they came from; priority 10 runs after the fence chain (priority 0).
    let watch = format!(
        "table ip s3watch {{
            chain watch {{
                type filter hook forward priority 10; policy accept;
                ip saddr {} tcp sport 80 ip daddr {client_ip} tcp dport {port} iifname \"n1\" counter
                ip saddr {} tcp sport 80 ip daddr {client_ip} tcp dport {port} iifname \"n2\" counter
            }}
        }}",
        c.topo.vip, c.topo.vip
    );
    let from = |node: NodeId| {
        let out = c.in_switch(|| nft(&["list", "chain", "ip", "s3watch", "watch"]));
        let line = out
            .lines()
            .find(|l| l.contains(&format!("iifname \"n{node}\"")))
            .unwrap()
            .to_string();
        packets(&line)
    };
    c.in_switch(|| {
        splitos_cluster::switch::nft_apply(&watch).unwrap();
    });
    // Before the move, A's bytes reach the client (the counter works).
    c.servers[usize::from(a) - 1].send_to(port, b"before");
    let mut got = [0u8; 6];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"before");
    let a_before = from(a);
    assert!(a_before > 0);

    c.switch(|sw| sw.move_flow(flow, b).unwrap());
    let st = c.switch(|sw| sw.refresh().unwrap().clone());
    assert_eq!(st.owners.get(&flow), Some(&b));
    assert!(st.fences.contains(&(a, flow)));

    // A goes on sending (and retransmitting) for the flow.
    for _ in 0..3 {
        c.servers[usize::from(a) - 1].send_to(port, b"after!");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the client received something from the fenced node: {other:?}"),
    }
    let a_after = from(a);
    let fenced = c.switch(|sw| sw.refresh().unwrap().fenced_packets);
    eprintln!(
        "S3: node{a}'s packets of the moved flow reaching the client: {} (before the move: \
         {a_before}); dropped by the fence: {fenced}",
        a_after - a_before
    );
    assert_eq!(
        a_after, a_before,
        "packets from the fenced node got through"
    );
    assert!(
        fenced >= 3,
        "the fenced node's packets were not seen: {fenced}"
    );
}
