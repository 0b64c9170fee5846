//! Target S4: one owner-map transaction takes at most 5 ms (median) for 1 element and at most
//! 100 ms for 1,000 elements, measured around `Switch::apply` (plan, `nft -f -`, wait).
//! Its own test binary, so that no other test of this crate runs beside it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use splitos_cluster::switch::{Change, Flow};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};
use support::Cluster;

fn flow(i: u32) -> Flow {
    let ip = Ipv4Addr::new(
        198,
        18,
        100 + (i / 50_000) as u8,
        1 + ((i / 250) % 250) as u8,
    );
    Flow(SocketAddrV4::new(
        ip,
        1024 + (i % 250) as u16 * 200 + (i / 62_500) as u16,
    ))
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn s4_override_transactions_are_fast() {
    let c = Cluster::new("s4", 2);
    let (one, thousand) = c.switch(|sw| {
        let mut one = Vec::new();
        for i in 0..200 {
            let t = Instant::now();
            sw.apply(&[Change::Owner(flow(i), 2)]).unwrap();
            one.push(t.elapsed());
        }
        let mut thousand = Vec::new();
        for round in 0..7u32 {
            let changes: Vec<Change> = (0..1000)
                .map(|i| Change::Owner(flow(10_000 + round * 1000 + i), 1))
                .collect();
            let t = Instant::now();
            sw.apply(&changes).unwrap();
            thousand.push(t.elapsed());
        }
        let st = sw.refresh().unwrap();
        assert_eq!(st.owners.len(), 200 + 7000);
        (one, thousand)
    });
    let (mut one, mut thousand) = (one, thousand);
    let p90 = {
        let mut v = one.clone();
        v.sort_unstable();
        v[v.len() * 9 / 10]
    };
    let m1 = median(&mut one);
    let m1000 = median(&mut thousand);
    eprintln!("S4: 1 element: median {m1:?} (p90 {p90:?}, 200 transactions); 1,000 elements: median {m1000:?} (7 transactions)");
    assert!(m1 <= Duration::from_millis(5), "1 element: median {m1:?}");
    assert!(
        m1000 <= Duration::from_millis(100),
        "1,000 elements: median {m1000:?}"
    );
}
