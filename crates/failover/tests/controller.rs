//! The switch controller against a real etcd member and a real switch, both in a namespace
//! the test builds (and removes, also on failure): fake nodes register with
//! `Registry::register` at the switch nodes' addresses; a node whose lease goes is fenced and
//! loses its buckets after the grace; an adoption moves the listed flows to the adopter, fences
//! the dead node and is marked applied within a second; an incarnation is adopted once; a
//! node that registers again gets its buckets back; and a controller started after an
//! adoption applies it from the snapshot. Needs root, `ip`, `nft` and `etcd`: without them it
//! fails saying so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../cluster/tests/support/mod.rs"]
mod support;

use splitos_cluster::etcd_member::EtcdMember;
use splitos_cluster::switch::{Flow, State, Switch, DEFAULT_TABLE};
use splitos_failover::controller::{self, ControllerOptions};
use splitos_failover::etcd::{Adoption, Member, NodeInfo, Registry};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};
use support::Cluster;

const TTL: Duration = Duration::from_secs(5);
const GRACE: Duration = Duration::from_secs(1);

fn node(k: u8) -> NodeInfo {
    let addr = Ipv4Addr::new(198, 18, k, 2);
    NodeInfo {
        name: format!("node{k}"),
        addr,
        link: None,
        checkpoints: SocketAddr::new(addr.into(), 7412),
        pid: std::process::id(),
    }
}

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(splitos_cluster::topology::CLIENT_ADDR, port)
}

fn switch_state() -> State {
    Switch::open(DEFAULT_TABLE).unwrap().state().clone()
}

/// Polls `f` every 20 ms until it holds, for at most `limit`; returns how long it took.
async fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.elapsed()
}

async fn register(reg: &Registry, k: u8) -> Member {
    let m = reg.register(&node(k), TTL).await.unwrap();
    let (r, lease) = (reg.clone(), m.lease);
    tokio::spawn(async move { r.keep_alive(lease, TTL).await });
    m
}

fn adoption(dead: &Member, adopter: &Member, restore: &[u16], reset: &[u16]) -> Adoption {
    Adoption {
        dead: dead.info.name.clone(),
        incarnation: dead.incarnation,
        dead_addr: dead.info.addr,
        adopter: adopter.info.name.clone(),
        adopter_addr: adopter.info.addr,
        restore: restore.iter().map(|&p| client(p)).collect(),
        reset: reset.iter().map(|&p| client(p)).collect(),
        at_ms: 0,
    }
}

async fn applied(reg: &Registry, m: &Member) -> bool {
    reg.snapshot()
        .await
        .unwrap()
        .applied
        .iter()
        .any(|(n, i, _)| *n == m.info.name && *i == m.incarnation)
}

#[test]
fn the_switch_follows_leases_and_adoptions_in_etcd() {
    let c = Cluster::new("ctl", 2);
    let sw_ns = c.topo.switch();
    // etcd on the switch namespace's loopback, where the controller (and this test) reach it.
    let port = splitos_cluster::netns::run_in(&sw_ns, || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    })
    .unwrap();
    let dir = std::env::temp_dir().join(format!("splitos-ctl-etcd-{}", std::process::id()));
    let etcd =
        EtcdMember::start(Some(&sw_ns), SocketAddr::from(([127, 0, 0, 1], port)), &dir).unwrap();
    let endpoint = etcd.endpoint().to_string();
    let cluster = format!("ctltest{}", std::process::id());
    splitos_cluster::netns::run_in(&sw_ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(scenario(&endpoint, &cluster));
    })
    .unwrap();
    drop(etcd);
    assert!(!dir.exists(), "etcd's data is left");
}

async fn scenario(endpoint: &str, cluster: &str) {
    let reg = Registry::connect(&[endpoint.to_string()], cluster)
        .await
        .unwrap();
    let opts = ControllerOptions {
        grace: GRACE,
        ..ControllerOptions::default()
    };
    let ctl = tokio::spawn(controller::run(reg.clone(), DEFAULT_TABLE, opts.clone()));
    let mut published = false;
    for _ in 0..250 {
        if reg.snapshot().await.unwrap().switch.is_some() {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        published,
        "the controller did not publish the switch's ring"
    );
    let sw = reg.snapshot().await.unwrap().switch.unwrap();
    assert_eq!(sw.nodes.len(), 2);

    let n1 = register(&reg, 1).await;
    let n2 = register(&reg, 2).await;
    let st = switch_state();
    assert!(st.dead.is_empty() && st.buckets.contains(&1) && st.buckets.contains(&2));

    // A lease goes: nothing during the grace, then node 1 is fenced and out of the buckets.
    reg.revoke(n1.lease).await.unwrap();
    tokio::time::sleep(GRACE / 3).await;
    assert!(
        switch_state().dead.is_empty(),
        "fenced before the grace ended"
    );
    let took = until(GRACE + Duration::from_secs(3), "node 1 fenced", || {
        let st = switch_state();
        st.dead.contains(&1) && st.buckets.iter().all(|&b| b == 2)
    })
    .await;
    eprintln!("node 1 fenced {took:?} after its lease went (grace {GRACE:?})");

    // It registers again: back in the buckets, unfenced.
    let n1 = register(&reg, 1).await;
    until(Duration::from_secs(3), "node 1 back", || {
        let st = switch_state();
        !st.dead.contains(&1) && st.buckets.contains(&1)
    })
    .await;

    // A live incarnation cannot be adopted.
    assert_eq!(
        reg.adopt(&adoption(&n1, &n2, &[4000], &[])).await.unwrap(),
        None
    );

    // Node 1 dies; node 2 adopts two restored flows and one reset one before the grace ends.
    reg.revoke(n1.lease).await.unwrap();
    let a = adoption(&n1, &n2, &[4001, 4002], &[4003]);
    assert!(reg.adopt(&a).await.unwrap().is_some());
    let t = Instant::now();
    while !applied(&reg, &n1).await {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "not applied within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("adoption applied {:?} after it was written", t.elapsed());
    let st = switch_state();
    for p in [4001, 4002, 4003] {
        assert_eq!(st.owners.get(&Flow(client(p))), Some(&2), "flow {p}");
    }
    assert!(st.dead.contains(&1));
    assert!(st.buckets.iter().all(|&b| b == 2));
    // Adopted once.
    assert_eq!(reg.adopt(&a).await.unwrap(), None);

    // Node 1 comes back: buckets again, and the flows adopted from it stay fenced from it.
    let n1 = register(&reg, 1).await;
    until(
        Duration::from_secs(3),
        "node 1 back after the adoption",
        || {
            let st = switch_state();
            !st.dead.contains(&1)
                && st.buckets.contains(&1)
                && [4001, 4002, 4003]
                    .iter()
                    .all(|&p| st.fences.contains(&(1, Flow(client(p)))))
        },
    )
    .await;

    // The controller stops; node 1 dies and is adopted meanwhile; a new controller applies
    // the adoption from its snapshot.
    ctl.abort();
    let _ = ctl.await;
    reg.revoke(n1.lease).await.unwrap();
    let a = adoption(&n1, &n2, &[5001], &[]);
    assert!(reg.adopt(&a).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!applied(&reg, &n1).await);
    let ctl = tokio::spawn(controller::run(reg.clone(), DEFAULT_TABLE, opts));
    let t = Instant::now();
    while !applied(&reg, &n1).await {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "not applied after a restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = switch_state();
    assert_eq!(st.owners.get(&Flow(client(5001))), Some(&2));
    assert!(st.dead.contains(&1));
    ctl.abort();
    let _ = ctl.await;
    reg.revoke(n2.lease).await.unwrap();
}
