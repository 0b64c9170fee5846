//! The lab with failover (`splitos lab up --failover`): the control plane a node failure
//! needs, made of the same programs a deployment runs.
//!
//! - an etcd member in namespace `PREFIX-etcd`, joined to the switch by a veth
//!   (`198.19.254.1` on the switch's side, `198.19.254.2` on etcd's), so that the nodes reach
//!   it through the switch by their default route; its data under the lab's state directory;
//! - the switch controller, `splitos switch watch`, in the switch's namespace;
//! - the nodes' `splitos serve` with `--etcd ... --cluster PREFIX --node-name nodeK
//!   --checkpoint-listen 198.18.K.2:7412 --lease-ttl 1`, when the binary's `serve` has them.
//!
//! And the faults to try it with: `partition` cuts a node off from the control plane (etcd
//! and the other nodes' link and checkpoint ports) with an nftables table in the node's own
//! namespace, while its data path to the clients through the switch stays up; `heal` removes
//! that table.

use super::{io, save, LabConfig, LabError, LabProcess, LabState};
use crate::etcd_member::EtcdMember;
use crate::netns;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// etcd's address, in its namespace.
pub const ETCD_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 254, 2);
/// The switch's address on the link to etcd.
pub const ETCD_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 19, 254, 1);
pub const ETCD_PORT: u16 = 2379;
/// Where each node accepts checkpoint streams from the nodes it succeeds.
pub const CHECKPOINT_PORT: u16 = 7412;
/// The nodes' lease TTL in the lab (whole seconds: etcd's unit).
pub const LEASE_TTL_S: u32 = 1;
/// The nft table `partition` puts in a node's namespace.
pub const PARTITION_TABLE: &str = "splitos_partition";
/// How long `up` waits for the controller to follow etcd.
const CONTROLLER_WAIT: Duration = Duration::from_secs(10);

/// The lab's control plane, as written in its state file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailoverState {
    /// etcd's namespace.
    pub namespace: String,
    /// etcd's client URL.
    pub etcd: String,
    /// The cluster's name in etcd (the lab's prefix).
    pub cluster: String,
    pub data_dir: PathBuf,
    /// Whether the nodes run with failover (their `splitos serve` has `--etcd`).
    pub node_failover: bool,
}

impl FailoverState {
    pub fn new(prefix: &str) -> FailoverState {
        FailoverState {
            namespace: format!("{prefix}-etcd"),
            etcd: format!("http://{ETCD_ADDR}:{ETCD_PORT}"),
            cluster: prefix.to_string(),
            data_dir: super::state_dir(prefix).join("etcd"),
            node_failover: false,
        }
    }

    /// The failover arguments of node `k`'s `splitos serve`.
    pub fn node_args(&self, k: u16) -> Vec<String> {
        vec![
            "--etcd".into(),
            self.etcd.clone(),
            "--cluster".into(),
            self.cluster.clone(),
            "--node-name".into(),
            format!("node{k}"),
            "--checkpoint-listen".into(),
            SocketAddr::new(
                crate::topology::Topology::node_addr(k).into(),
                CHECKPOINT_PORT,
            )
            .to_string(),
            "--lease-ttl".into(),
            LEASE_TTL_S.to_string(),
        ]
    }
}

/// Whether `exe serve` takes the failover flags (the node side may be missing from a build).
fn serve_has_failover(exe: &std::path::Path) -> bool {
    std::process::Command::new(exe)
        .args(["serve", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--etcd"))
}

/// Makes etcd's namespace and link, starts etcd and the controller (called by `up` after the
/// switch, before the nodes; everything is in `st` before it is made).
pub(super) fn start(cfg: &LabConfig, f: &FailoverState, st: &mut LabState) -> Result<(), LabError> {
    let sw = format!("{}-switch", st.prefix);
    netns::create(&f.namespace)?;
    netns::veth(
        &sw,
        "etcd",
        &format!("{ETCD_GATEWAY}/24"),
        &f.namespace,
        "sw",
        &format!("{ETCD_ADDR}/24"),
    )?;
    netns::ip(&[
        "-n",
        &f.namespace,
        "route",
        "add",
        "default",
        "via",
        &ETCD_GATEWAY.to_string(),
    ])?;
    let member = EtcdMember::start(
        Some(&f.namespace),
        SocketAddr::new(ETCD_ADDR.into(), ETCD_PORT),
        &f.data_dir,
    )?;
    let log = member.log().to_path_buf();
    // `down` ends it (and removes its data with the lab's directory).
    let pid = member.detach();
    st.processes.push(LabProcess {
        namespace: f.namespace.clone(),
        pid: pid as i32,
        what: format!("etcd at {}", f.etcd),
        log,
        args: Vec::new(),
    });
    save(st)?;

    // The controller: the same command a router of a deployment runs.
    let log = st.dir.join("controller.log");
    let out = std::fs::File::create(&log).map_err(io("cannot create", &log))?;
    let err = out.try_clone().map_err(io("cannot open", &log))?;
    let args: Vec<String> = vec![
        "switch".into(),
        "watch".into(),
        "--table".into(),
        crate::switch::DEFAULT_TABLE.into(),
        "--etcd".into(),
        f.etcd.clone(),
        "--cluster".into(),
        f.cluster.clone(),
    ];
    let child = netns::command_in(&sw, &cfg.exe)
        .args(&args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| LabError::Step(format!("cannot start the switch controller: {e}")))?;
    let pid = child.id() as i32;
    drop(child);
    st.processes.push(LabProcess {
        namespace: sw,
        pid,
        what: format!("splitos switch watch (etcd {})", f.etcd),
        log: log.clone(),
        args,
    });
    save(st)?;
    let until = Instant::now() + CONTROLLER_WAIT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(super::CONTROLLER_READY) {
            break;
        }
        if !super::alive(pid) || Instant::now() >= until {
            return Err(LabError::Step(format!(
                "the switch controller did not follow etcd within {} s; its log:\n{text}",
                CONTROLLER_WAIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(f) = st.failover.as_mut() {
        f.node_failover = serve_has_failover(&cfg.exe);
    }
    save(st)
}

fn node_namespace(st: &LabState, member: &str) -> Result<String, LabError> {
    let ns = st.namespace_of(member)?;
    if !member.starts_with("node") {
        return Err(LabError::NotANode(member.to_string(), st.nodes));
    }
    Ok(ns)
}

/// The nft table that cuts a node off from the control plane: etcd's network, and the link
/// and checkpoint ports of every peer (both ways). The virtual IP's traffic with clients is
/// not touched.
fn partition_script() -> String {
    let ports = format!(
        "{{ {}, {CHECKPOINT_PORT} }}",
        crate::migrate::DEFAULT_LINK_PORT
    );
    let etcd_net = format!("{ETCD_GATEWAY}/24");
    format!(
        "table ip {PARTITION_TABLE} {{
  chain out {{
    type filter hook output priority 0; policy accept;
    ip daddr {etcd_net} counter drop
    tcp dport {ports} counter drop
    tcp sport {ports} counter drop
  }}
  chain in {{
    type filter hook input priority 0; policy accept;
    ip saddr {etcd_net} counter drop
    tcp dport {ports} counter drop
    tcp sport {ports} counter drop
  }}
}}
"
    )
}

/// Cuts node `member` of lab `prefix` off from the control plane; it keeps running and its
/// clients' packets keep reaching it (until the switch moves them).
pub fn partition(prefix: &str, member: &str) -> Result<(), LabError> {
    let st = super::load(prefix)?;
    if st.failover.is_none() {
        return Err(LabError::NoFailover(prefix.to_string()));
    }
    let ns = node_namespace(&st, member)?;
    if partitioned(&ns) {
        return Ok(());
    }
    netns::run_in(&ns, || crate::switch::nft_apply(&partition_script()))??;
    Ok(())
}

/// Undoes `partition`.
pub fn heal(prefix: &str, member: &str) -> Result<(), LabError> {
    let st = super::load(prefix)?;
    let ns = node_namespace(&st, member)?;
    if !partitioned(&ns) {
        return Ok(());
    }
    netns::run_in(&ns, || {
        crate::switch::nft_apply(&format!("delete table ip {PARTITION_TABLE}\n"))
    })??;
    Ok(())
}

/// Whether namespace `ns` has the partition table.
pub fn partitioned(ns: &str) -> bool {
    netns::run(netns::command_in(ns, "nft").args(["list", "table", "ip", PARTITION_TABLE])).is_ok()
}

/// The `failover` object of node `k`'s status (`splitos status --json` in its runtime
/// directory), if it has one.
pub fn node_failover(st: &LabState, k: u16) -> Option<serde_json::Value> {
    let exe = st.exe.as_ref()?;
    let dir = super::node_dir(st, k);
    let out = std::process::Command::new(exe)
        .args(["status", "--json"])
        .env("XDG_RUNTIME_DIR", &dir)
        .env("TMPDIR", &dir)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let find = |v: &serde_json::Value| {
        v.get("failover")
            .or_else(|| v.get("serve")?.get("failover"))
            .cloned()
    };
    find(&v).or_else(|| v.as_array()?.iter().find_map(find))
}
