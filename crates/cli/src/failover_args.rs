//! `splitos serve`'s failover flags, and the agent they start (`splitos_failover`). Only a
//! binary built with the `failover` feature has the agent; without it, the flags are still
//! understood, and asking for failover says how to get it.

use std::net::{IpAddr, SocketAddr};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct FailoverArgs {
    /// Take part in failover with the etcd cluster at URL (http://HOST:PORT; comma-separated
    /// for several members): this node holds a lease there, streams checkpoints of its idle
    /// connections to its successor, and takes over the idle connections of the nodes it
    /// succeeds when they die. Needs --node-name and --link-allow (who may send checkpoints).
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The cluster's name: its keys in etcd live under /splitos/NAME/.
    #[arg(long, value_name = "NAME", default_value = "splitos")]
    pub cluster: String,
    /// This node's name in the cluster (unique among the live nodes).
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// The address the switch routes to for this node [default: the address of --link].
    #[arg(long, value_name = "IP")]
    pub node_addr: Option<IpAddr>,
    /// Where checkpoint streams from the nodes this one succeeds arrive [default: the node
    /// address, port 7412]. Only hosts of --link-allow may connect.
    #[arg(long, value_name = "ADDR")]
    pub checkpoint_listen: Option<SocketAddr>,
    /// Seconds of the node's etcd lease: how long after its death etcd declares it dead at
    /// the latest (its successor usually notices first; see --suspect-after-ms).
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    pub lease_ttl: u64,
    /// Milliseconds without a word from a node this one succeeds before asking etcd to end its
    /// lease (a node that is wrongly suspected restarts; it never answers beside its successor).
    #[arg(long, value_name = "MS", default_value_t = 300)]
    pub suspect_after_ms: u64,
    /// Milliseconds a connection rests (answered, every byte acknowledged) before it is
    /// checkpointed to the successor.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    pub checkpoint_idle_ms: u64,
    /// Most bytes of checkpoints kept for the nodes this one succeeds.
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = crate::parse_bytes)]
    pub checkpoint_budget: u64,
    /// Take part in failover (lease, fencing, adopting for others) without checkpointing this
    /// node's own connections: when it dies they are reset, not resumed. For measuring what
    /// checkpoints cost.
    #[arg(long)]
    pub no_checkpoints: bool,
}

/// The agent's starter, or `None` without --etcd.
pub fn agent_start(
    a: &FailoverArgs,
    link: Option<SocketAddr>,
    allow: &[(IpAddr, u8)],
) -> Result<Option<splitos_serve::agent::AgentStart>, String> {
    if a.etcd.is_empty() {
        if a.node_name.is_some() || a.checkpoint_listen.is_some() || a.node_addr.is_some() {
            return Err("--node-name, --node-addr and --checkpoint-listen need --etcd URL".into());
        }
        return Ok(None);
    }
    let name = a
        .node_name
        .clone()
        .ok_or("--etcd needs --node-name NAME (this node's name in the cluster)")?;
    if allow.is_empty() {
        return Err(
            "--etcd needs at least one --link-allow NET (who may send checkpoint streams)".into(),
        );
    }
    let addr = match a.node_addr.or(link.map(|l| l.ip())) {
        Some(IpAddr::V4(v4)) => v4,
        Some(IpAddr::V6(_)) => return Err("--node-addr: the switch steers IPv4 only".into()),
        None => return Err("--etcd needs --node-addr IP (or --link ADDR to take it from)".into()),
    };
    if a.lease_ttl == 0 || a.lease_ttl > 3600 {
        return Err("--lease-ttl must be 1..=3600 seconds".into());
    }
    build(a, name, addr, link, allow)
}

#[cfg(feature = "failover")]
fn build(
    a: &FailoverArgs,
    name: String,
    addr: std::net::Ipv4Addr,
    link: Option<SocketAddr>,
    allow: &[(IpAddr, u8)],
) -> Result<Option<splitos_serve::agent::AgentStart>, String> {
    use splitos_failover::{Agent, AgentConfig};
    use std::time::Duration;
    let mut cfg = AgentConfig::new(a.etcd.clone(), &a.cluster, &name, addr);
    cfg.link = link;
    if let Some(c) = a.checkpoint_listen {
        cfg.checkpoints_listen = c;
    }
    cfg.allow = allow.to_vec();
    cfg.lease_ttl = Duration::from_secs(a.lease_ttl);
    cfg.suspect_after = Duration::from_millis(a.suspect_after_ms.max(20));
    cfg.store_budget = usize::try_from(a.checkpoint_budget).unwrap_or(usize::MAX);
    cfg.checkpoint.idle_after = Duration::from_millis(a.checkpoint_idle_ms);
    cfg.checkpoints = !a.no_checkpoints;
    struct Running(Agent);
    impl splitos_serve::agent::NodeAgent for Running {
        fn status(&self) -> serde_json::Value {
            self.0.status()
        }
        fn fatal(&self) -> Option<String> {
            self.0.fatal()
        }
    }
    Ok(Some(std::sync::Arc::new(move |tcp| {
        Agent::start(cfg.clone(), tcp)
            .map(|a| Box::new(Running(a)) as Box<dyn splitos_serve::agent::NodeAgent>)
            .map_err(|e| e.to_string())
    })))
}

#[cfg(not(feature = "failover"))]
fn build(
    _: &FailoverArgs,
    _: String,
    _: std::net::Ipv4Addr,
    _: Option<SocketAddr>,
    _: &[(IpAddr, u8)],
) -> Result<Option<splitos_serve::agent::AgentStart>, String> {
    Err(
        "this splitos was built without failover support (--etcd); build it with \
         `cargo build --release -p splitos-cli --features failover` (needs protoc: \
         apt-get install protobuf-compiler)"
            .into(),
    )
}
