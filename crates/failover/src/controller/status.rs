//! What etcd says about a cluster, for people (`splitos lab status`): each registered node's
//! lease and incarnation, and each adoption with whether the switch follows it.

use crate::etcd::{EtcdError, Registry, SwitchInfo};
use serde::Serialize;
use std::net::Ipv4Addr;
use std::time::Duration;

/// One registered node.
#[derive(Clone, Debug, Serialize)]
pub struct LeaseStatus {
    pub name: String,
    pub addr: Ipv4Addr,
    pub incarnation: i64,
    /// The lease's id, in hex as etcdctl prints it.
    pub lease: String,
    /// Seconds left before the lease expires without a keep-alive (`None`: not asked or
    /// not answered).
    pub ttl_s: Option<i64>,
    pub granted_ttl_s: Option<i64>,
    pub pid: u32,
}

/// One adoption: who took over whose flows.
#[derive(Clone, Debug, Serialize)]
pub struct AdoptionStatus {
    pub dead: String,
    pub incarnation: i64,
    pub adopter: String,
    pub restored: usize,
    pub reset: usize,
    /// The clients of the flows it names (restored, then reset): what `splitos-bench
    /// cluster` checks against the switch's owners.
    pub flows: Vec<std::net::SocketAddrV4>,
    /// Whether the switch controller has applied it.
    pub applied: bool,
    pub at_ms: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    pub revision: i64,
    pub leases: Vec<LeaseStatus>,
    pub adoptions: Vec<AdoptionStatus>,
    pub switch: Option<SwitchInfo>,
}

/// Reads cluster `cluster`'s state from etcd at `endpoints` (lease TTLs asked one by one,
/// each with a short timeout).
pub async fn cluster_status(
    endpoints: &[String],
    cluster: &str,
) -> Result<ClusterStatus, EtcdError> {
    let reg = Registry::connect(endpoints, cluster).await?;
    let snap = reg.snapshot().await?;
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(1));
    let mut client = etcd_client::Client::connect(endpoints, Some(opts))
        .await
        .ok();
    let mut leases = Vec::new();
    for m in &snap.members {
        let ttl = match client.as_mut() {
            Some(c) => c
                .lease_time_to_live(m.lease, None)
                .await
                .ok()
                .map(|r| (r.ttl(), r.granted_ttl())),
            None => None,
        };
        leases.push(LeaseStatus {
            name: m.info.name.clone(),
            addr: m.info.addr,
            incarnation: m.incarnation,
            lease: format!("{:x}", m.lease),
            ttl_s: ttl.map(|t| t.0),
            granted_ttl_s: ttl.map(|t| t.1),
            pid: m.info.pid,
        });
    }
    let adoptions = snap
        .adoptions
        .iter()
        .map(|a| AdoptionStatus {
            dead: a.dead.clone(),
            incarnation: a.incarnation,
            adopter: a.adopter.clone(),
            restored: a.restore.len(),
            reset: a.reset.len(),
            flows: a.restore.iter().chain(&a.reset).copied().collect(),
            applied: snap
                .applied
                .iter()
                .any(|(n, i, _)| *n == a.dead && *i == a.incarnation),
            at_ms: a.at_ms,
        })
        .collect();
    Ok(ClusterStatus {
        revision: snap.revision,
        leases,
        adoptions,
        switch: snap.switch,
    })
}
