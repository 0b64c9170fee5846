//! The etcd side of failover against a real etcd member (started here, on loopback, with its
//! data in a temporary directory that goes with it): registration under a lease, a name that
//! is taken, the adoption's compare-and-swap, and the watch telling of a node's death.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use splitos_cluster::etcd_member::EtcdMember;
use splitos_failover::etcd::{Adoption, Change, NodeInfo, Registry};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// A real etcd on a free loopback port, its data in a temporary directory; gone on drop.
fn etcd(tag: &str) -> EtcdMember {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("splitos-etcd-{tag}-{}", std::process::id()));
    EtcdMember::start(None, SocketAddr::from(([127, 0, 0, 1], port)), &dir)
        .expect("etcd (apt-get install etcd-server)")
}

/// A registry for cluster `cluster` once etcd answers (it may take a moment to elect itself).
async fn registry(etcd: &EtcdMember, cluster: &str) -> Registry {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match Registry::connect(&[etcd.endpoint().to_string()], cluster).await {
            Ok(r) if r.snapshot().await.is_ok() => return r,
            _ if Instant::now() < until => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("etcd does not answer"),
        }
    }
}

fn info(name: &str, last: u8) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        addr: Ipv4Addr::new(198, 18, last, 2),
        link: None,
        checkpoints: SocketAddr::from(([198, 18, last, 2], 7412)),
        pid: 1,
    }
}

#[test]
fn leases_names_adoptions_and_deaths() {
    let etcd = etcd("reg");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reg = registry(&etcd, "t1").await;
        let ttl = Duration::from_secs(1);
        let n1 = reg.register(&info("node1", 1), ttl).await.unwrap();
        let n2 = reg.register(&info("node2", 2), ttl).await.unwrap();
        assert!(n2.incarnation > n1.incarnation);
        let e = reg.register(&info("node1", 9), ttl).await.unwrap_err();
        assert!(e.to_string().contains("registered already"), "{e}");

        let snap = reg.snapshot().await.unwrap();
        assert_eq!(snap.members.len(), 2);
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let r2 = reg.clone();
        let rev = snap.revision;
        tokio::spawn(async move { r2.watch(rev, tx).await });

        let adoption = Adoption {
            dead: "node1".into(),
            incarnation: n1.incarnation,
            dead_addr: n1.info.addr,
            adopter: "node2".into(),
            adopter_addr: n2.info.addr,
            restore: vec!["198.18.0.2:40000".parse().unwrap()],
            reset: vec!["198.18.0.2:40001".parse().unwrap()],
            at_ms: 0,
        };
        // Alive: nobody may adopt it.
        assert_eq!(reg.adopt(&adoption).await.unwrap(), None);

        // Kept alive, node2 outlives node1's lease, which nobody renews.
        let keeper = reg.clone();
        let lease2 = n2.lease;
        tokio::spawn(async move { keeper.keep_alive(lease2, ttl).await });
        let t = Instant::now();
        let down = loop {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some(Change::Down {
                    name,
                    incarnation,
                    addr,
                })) => break (name, incarnation, addr, t.elapsed()),
                Ok(Some(_)) => {}
                other => panic!("no Down within 5 s: {other:?}"),
            }
        };
        assert_eq!(down.0, "node1");
        assert_eq!(down.1, n1.incarnation);
        assert_eq!(down.2, Some(n1.info.addr));
        eprintln!("node1's 1 s lease ended after {:?}", down.3);

        // Once, and only once.
        assert!(reg.adopt(&adoption).await.unwrap().is_some());
        assert_eq!(reg.adopt(&adoption).await.unwrap(), None);
        // A new incarnation of node1 does not make the old one adoptable again.
        let n1b = reg.register(&info("node1", 1), ttl).await.unwrap();
        assert!(n1b.incarnation > n1.incarnation);
        assert_eq!(reg.adopt(&adoption).await.unwrap(), None);
        let snap = reg.snapshot().await.unwrap();
        assert_eq!(snap.adoptions, vec![adoption.clone()]);
        // node2 is still registered: its lease was kept alive all along.
        assert!(snap.members.iter().any(|m| m.info.name == "node2"));
        // Revoking a lease is a death too, at once.
        reg.revoke(n1b.lease).await.unwrap();
        let t = Instant::now();
        loop {
            match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
                Ok(Some(Change::Down { incarnation, .. })) if incarnation == n1b.incarnation => {
                    break
                }
                Ok(Some(_)) => {}
                other => panic!("no Down after a revoke: {other:?}"),
            }
        }
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    });
}

#[test]
fn of_two_nodes_that_accuse_each_other_at_once_one_survives() {
    let etcd = etcd("acc");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reg = registry(&etcd, "t2").await;
        let ttl = Duration::from_secs(5);
        for round in 0..10 {
            let a = reg
                .register(&info(&format!("a{round}"), 1), ttl)
                .await
                .unwrap();
            let b = reg
                .register(&info(&format!("b{round}"), 2), ttl)
                .await
                .unwrap();
            let (ra, rb) = tokio::join!(reg.accuse(&a, &b), reg.accuse(&b, &a));
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            assert!(ra ^ rb, "round {round}: a accused b {ra}, b accused a {rb}");
            let snap = reg.snapshot().await.unwrap();
            let alive: Vec<&str> = snap.members.iter().map(|m| m.info.name.as_str()).collect();
            let survivor = if ra { &a } else { &b };
            let loser = if ra { &b } else { &a };
            assert!(alive.contains(&survivor.info.name.as_str()), "{alive:?}");
            assert!(!alive.contains(&loser.info.name.as_str()), "{alive:?}");
            // The loser, gone, can accuse nobody any more.
            assert!(!reg.accuse(loser, survivor).await.unwrap());
            reg.revoke(survivor.lease).await.unwrap();
        }
    });
}
