//! The switch's side of a node failure, with real connections through a switch in namespaces:
//! a node fenced as dead reaches no client (its packets counted as dropped, none counted as
//! forwarded) and new connections go to the others; when it comes back, it takes buckets
//! again without breaking the others' established connections, and new connections in the
//! buckets it took complete their handshake with it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use splitos_cluster::switch::{Flow, Takeover};
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::time::Duration;
use support::{connect, Cluster};

fn echoes(s: &mut TcpStream, what: &[u8]) -> bool {
    if s.write_all(what).is_err() {
        return false;
    }
    let mut got = vec![0u8; what.len()];
    s.read_exact(&mut got).is_ok() && got == what
}

#[test]
fn a_dead_node_reaches_no_client_and_comes_back_without_a_reset() {
    let c = Cluster::new("fo", 2);
    let vip = c.vip_addr();
    let mut conns: Vec<(TcpStream, u16)> = c.client(|| (0..40).map(|_| connect(vip)).collect());
    assert!(conns.iter().any(|(_, n)| *n == 1) && conns.iter().any(|(_, n)| *n == 2));
    let st = c.switch(|sw| sw.refresh().unwrap().clone());
    assert!(st.has_failover);
    let fwd1 = st.counters[&1].forwarded;
    assert!(
        fwd1 > 0,
        "node1's greetings were counted: {:?}",
        st.counters
    );

    // Node 1 dies as far as the switch knows; it goes on sending.
    let moved = c.switch(|sw| sw.fence_dead(1).unwrap());
    assert!(!moved.is_empty());
    let st = c.switch(|sw| sw.refresh().unwrap().clone());
    assert!(st.dead.contains(&1));
    assert!(st.buckets.iter().all(|&b| b == 2));
    for (s, n) in &conns {
        if *n == 1 {
            c.servers[0].send_to(s.local_addr().unwrap().port(), b"zombie");
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    for (s, n) in conns.iter_mut() {
        if *n == 1 {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut b = [0u8; 16];
            assert!(
                s.read(&mut b).is_err(),
                "a dead node's bytes reached the client"
            );
        }
    }
    let st = c.switch(|sw| sw.refresh().unwrap().clone());
    eprintln!("dead node1: counters {:?}", st.counters);
    assert_eq!(
        st.counters[&1].forwarded, fwd1,
        "0 packets of a dead node forwarded"
    );
    assert!(st.counters[&1].dead_dropped > 0);
    // New connections all go to node 2; node 2's connections carry on.
    let new: Vec<(TcpStream, u16)> = c.client(|| (0..10).map(|_| connect(vip)).collect());
    assert!(new.iter().all(|(_, n)| *n == 2));
    for (s, n) in conns.iter_mut() {
        if *n == 2 {
            assert!(echoes(s, b"still"), "node2's connection broke");
        }
    }

    // Node 1 is back; the flow adopted from it (say node 2 took over one of its clients)
    // stays fenced from it.
    let adopted = conns.iter().find(|(_, n)| *n == 1).unwrap();
    let adopted = Flow(SocketAddrV4::new(
        splitos_cluster::topology::CLIENT_ADDR,
        adopted.0.local_addr().unwrap().port(),
    ));
    c.switch(|sw| {
        sw.take_over(&Takeover {
            dead: Some(1),
            adopter: 2,
            flows: vec![adopted],
            wholly: true,
        })
        .unwrap()
    });
    let back = c.switch(|sw| sw.revive(1, &[adopted], 60).unwrap());
    assert!(!back.is_empty());
    let st = c.switch(|sw| sw.refresh().unwrap().clone());
    assert!(!st.dead.contains(&1));
    assert!(st.fences.contains(&(1, adopted)));
    assert_eq!(st.owners.get(&adopted), Some(&2));
    assert!(back.iter().all(|b| st.draining.get(b) == Some(&2)));
    // Every established connection of node 2, also those in the buckets node 1 took, goes on.
    let mut all2: Vec<(TcpStream, u16)> = conns.into_iter().filter(|(_, n)| *n == 2).collect();
    all2.extend(new);
    for (s, _) in all2.iter_mut() {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert!(echoes(s, b"after the return"), "node2's connection broke");
    }
    // New connections reach both, and those that reach node 1 (begun in a draining bucket)
    // complete and echo.
    let mut fresh: Vec<(TcpStream, u16)> = c.client(|| (0..30).map(|_| connect(vip)).collect());
    assert!(
        fresh.iter().any(|(_, n)| *n == 1),
        "node 1 got no new connection"
    );
    for (s, n) in fresh.iter_mut() {
        assert!(echoes(s, b"new one"), "a new connection to node{n} broke");
    }

    // Now the adopter dies too: the adopted flow's owner override goes, and its fences with
    // it — a new connection from that client port follows the bucket table, and must not find
    // node 1 fenced (found by the kill rounds of `splitos-bench cluster`: connects timed out).
    c.switch(|sw| sw.fence_dead(2).unwrap());
    let st = c.switch(|sw| sw.refresh().unwrap().clone());
    assert_eq!(st.owners.get(&adopted), None);
    assert!(
        !st.fences.iter().any(|(_, f)| *f == adopted),
        "{:?}",
        st.fences
    );
    // Node 2 back: the flow is over, so nothing is fenced from it for that port.
    c.switch(|sw| sw.revive(2, &[adopted], 60).unwrap());
    let st = c.switch(|sw| sw.refresh().unwrap().clone());
    assert!(
        !st.fences.iter().any(|(_, f)| *f == adopted),
        "{:?}",
        st.fences
    );
}
