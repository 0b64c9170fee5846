//! The lab: a Split-OS cluster made of network namespaces on one machine, for tests, demos and
//! benchmarks. `up` builds the [`Topology`] (a client, a switch and N nodes), runs
//! `splitos switch init` in the switch namespace and a real `splitos serve` of the site in
//! every node, bound to the virtual IP on the node's loopback — the same commands a
//! multi-machine deployment runs; the lab adds no behaviour of its own.
//!
//! Everything the lab makes is named by its prefix and written down in a state file
//! (`state.json` under [`state_dir`]) before it is made, so `down` removes every namespace,
//! process and file of the lab even after the lab itself crashed. Namespaces are matched by
//! exact name (`PREFIX-client`, `PREFIX-switch`, `PREFIX-nodeN`), so a lab never touches
//! another whose prefix merely starts the same way.

use crate::netns::{self, NetnsError};
use crate::switch::NodeId;
use crate::topology::{self, Topology};
use serde::{Deserialize, Serialize};

pub mod failover;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The prefix unless told otherwise.
pub const DEFAULT_PREFIX: &str = "splitos-lab";

/// What the switch controller (`splitos switch watch`) logs once it follows etcd; the lab
/// waits for it in the controller's log.
pub const CONTROLLER_READY: &str = "switch controller: following etcd for table";

/// What went wrong in the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{0}")]
    Netns(#[from] NetnsError),
    #[error(
        "lab {0:?} is already up (see `splitos lab status`, remove it with `splitos lab down`)"
    )]
    AlreadyUp(String),
    #[error("no lab {0:?} is up (start one with `splitos lab up`)")]
    NotUp(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the site {0} is not a directory")]
    Site(PathBuf),
    #[error(
        "the lab's state file {path} is unreadable: {reason} (run `splitos lab down` to clean up)"
    )]
    State { path: PathBuf, reason: String },
    #[error("{0}")]
    Step(String),
    #[error("unknown member {0:?}: expected client, switch or node1..node{1}")]
    Member(String, u16),
    #[error("{0:?} is not a node (expected node1..node{1})")]
    NotANode(String, u16),
    #[error("{0}")]
    Migrate(#[from] crate::migrate::MigrateError),
    #[error("{0}")]
    Etcd(#[from] crate::etcd_member::EtcdMemberError),
    #[error("{0}")]
    Switch(#[from] crate::switch::SwitchError),
    #[error("lab {0:?} runs without failover (make it with `splitos lab up --failover`)")]
    NoFailover(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LabError + 'a {
    move |source| LabError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// How to build a lab.
#[derive(Clone, Debug)]
pub struct LabConfig {
    pub prefix: String,
    pub nodes: u16,
    /// The directory the nodes serve; `None`: a small demo site made in the state directory.
    pub site: Option<PathBuf>,
    pub port: u16,
    /// The `splitos` binary the lab runs in the namespaces.
    pub exe: PathBuf,
    /// More arguments for every node's `splitos serve` (after the lab's own).
    pub node_args: Vec<String>,
}

/// A process the lab started.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabProcess {
    pub namespace: String,
    pub pid: i32,
    pub what: String,
    pub log: PathBuf,
    /// Its arguments after the `splitos` binary, for `lab restart` (empty for processes not
    /// restarted that way, and in state files of older labs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
}

/// What a lab is made of; written to `state.json` as it is built.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabState {
    pub prefix: String,
    pub nodes: u16,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub site: PathBuf,
    pub dir: PathBuf,
    pub namespaces: Vec<String>,
    pub processes: Vec<LabProcess>,
    /// The binary the lab runs (for `lab restart`).
    #[serde(default)]
    pub exe: Option<PathBuf>,
    /// The control plane, when the lab runs with failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<failover::FailoverState>,
}

impl LabState {
    /// The namespace of `member` (`client`, `switch` or `nodeK`).
    pub fn namespace_of(&self, member: &str) -> Result<String, LabError> {
        let ok = match member {
            "client" | "switch" => true,
            "etcd" => self.failover.is_some(),
            m => m
                .strip_prefix("node")
                .and_then(|k| k.parse::<u16>().ok())
                .is_some_and(|k| (1..=self.nodes).contains(&k)),
        };
        if ok {
            Ok(format!("{}-{member}", self.prefix))
        } else {
            Err(LabError::Member(member.to_string(), self.nodes))
        }
    }
}

/// Where a lab keeps its state: `$XDG_RUNTIME_DIR/splitos-lab/PREFIX`, else
/// `/run/splitos-lab/PREFIX`.
pub fn state_dir(prefix: &str) -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from("/run"));
    base.join("splitos-lab").join(prefix)
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

fn save(st: &LabState) -> Result<(), LabError> {
    let path = state_file(&st.dir);
    let tmp = st.dir.join("state.json.tmp");
    let text = serde_json::to_vec_pretty(st).map_err(|e| LabError::State {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    std::fs::write(&tmp, text).map_err(io("cannot write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("cannot write", &path))
}

/// The state of lab `prefix`, if it is up (or was, and crashed).
pub fn load(prefix: &str) -> Result<LabState, LabError> {
    netns::check_name(prefix)?;
    let dir = state_dir(prefix);
    let path = state_file(&dir);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LabError::NotUp(prefix.to_string()))
        }
        Err(e) => return Err(io("cannot read", &path)(e)),
    };
    serde_json::from_slice(&text).map_err(|e| LabError::State {
        path,
        reason: e.to_string(),
    })
}

/// The namespaces that belong to lab `prefix` by name (exactly `PREFIX-client`,
/// `PREFIX-switch`, `PREFIX-etcd` or `PREFIX-nodeN`).
pub fn namespaces_named(prefix: &str) -> Vec<String> {
    let lead = format!("{prefix}-");
    netns::list_with_prefix(&lead)
        .into_iter()
        .filter(|n| {
            let rest = &n[lead.len()..];
            rest == "client"
                || rest == "switch"
                || rest == "etcd"
                || rest
                    .strip_prefix("node")
                    .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect()
}

const DEMO_INDEX: &str = "<!doctype html>\n<title>Split-OS lab</title>\n<h1>Split-OS lab</h1>\n\
<p>Served by <code>splitos serve</code> on one of the lab's nodes, behind the steering switch.</p>\n";

/// Builds lab `cfg.prefix` and returns its state. On failure everything made so far is
/// removed again.
pub fn up(cfg: &LabConfig) -> Result<LabState, LabError> {
    up_with(cfg, false)
}

/// [`up`], and with `failover` the control plane a node failure needs: an etcd member, the
/// switch controller, and the nodes registered in etcd (see [`failover`]).
pub fn up_with(cfg: &LabConfig, failover: bool) -> Result<LabState, LabError> {
    netns::require_root()?;
    netns::require_tool("nft", "--version")?;
    let topo = Topology::new(&cfg.prefix, cfg.nodes)?;
    let dir = state_dir(&cfg.prefix);
    if dir.exists() || !namespaces_named(&cfg.prefix).is_empty() {
        return Err(LabError::AlreadyUp(cfg.prefix.clone()));
    }
    if let Some(site) = &cfg.site {
        if !site.is_dir() {
            return Err(LabError::Site(site.clone()));
        }
    }
    std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
    let site = match &cfg.site {
        Some(s) => std::fs::canonicalize(s).map_err(io("cannot resolve", s))?,
        None => {
            let s = dir.join("site");
            std::fs::create_dir_all(&s).map_err(io("cannot create", &s))?;
            let index = s.join("index.html");
            std::fs::write(&index, DEMO_INDEX).map_err(io("cannot write", &index))?;
            s
        }
    };
    let mut st = LabState {
        prefix: cfg.prefix.clone(),
        nodes: cfg.nodes,
        vip: topo.vip,
        port: cfg.port,
        site,
        dir: dir.clone(),
        namespaces: topo.namespaces(),
        processes: Vec::new(),
        exe: Some(cfg.exe.clone()),
        failover: None,
    };
    if failover {
        let f = failover::FailoverState::new(&cfg.prefix);
        st.namespaces.push(f.namespace.clone());
        st.failover = Some(f);
    }
    // Written down before anything is made, so that `down` finds it after a crash.
    save(&st)?;
    match build(cfg, &topo, &mut st) {
        Ok(()) => Ok(st),
        Err(e) => {
            let _ = down(&cfg.prefix);
            Err(e)
        }
    }
}

fn build(cfg: &LabConfig, topo: &Topology, st: &mut LabState) -> Result<(), LabError> {
    topo.build()?;
    // The switch: the same command a router of a real deployment runs.
    let mut init = netns::command_in(&topo.switch(), &cfg.exe);
    init.args(["switch", "init", "--vip", &topo.vip.to_string()])
        .args(["--port", &cfg.port.to_string()]);
    for n in topo.switch_nodes() {
        init.arg("--node")
            .arg(format!("{}={}@{}", n.id, n.via, n.dev));
    }
    netns::run(&mut init).map_err(|e| LabError::Step(format!("starting the switch: {e}")))?;
    if let Some(f) = st.failover.clone() {
        failover::start(cfg, &f, st)?;
    }
    // The nodes: `splitos serve` of the site on the virtual IP.
    let listen = SocketAddr::new(topo.vip.into(), cfg.port);
    for k in 1..=topo.nodes {
        let mut args: Vec<String> = vec![
            "serve".into(),
            st.site.display().to_string(),
            "--listen".into(),
            listen.to_string(),
            "--control-socket".into(),
            node_dir(st, k).join("control.sock").display().to_string(),
            // The node link, on the node's own address, for the lab's private networks only.
            "--link".into(),
            node_link(k).to_string(),
            "--link-allow".into(),
            LAB_NETWORK.into(),
        ];
        if let Some(f) = &st.failover {
            if f.node_failover {
                args.extend(f.node_args(k));
            }
        }
        args.extend(cfg.node_args.iter().cloned());
        let p = spawn_node(&cfg.exe, st, k, args)?;
        st.processes.push(p);
        save(st)?;
    }
    for k in 1..=topo.nodes {
        wait_node(st, k)?;
    }
    Ok(())
}

/// Node `k`'s private directory (its runtime files).
fn node_dir(st: &LabState, k: NodeId) -> PathBuf {
    st.dir.join(format!("node{k}"))
}

/// Starts `splitos ARGS` as node `k`'s server, in its namespace, logged to `nodeK.log`.
fn spawn_node(
    exe: &Path,
    st: &LabState,
    k: NodeId,
    args: Vec<String>,
) -> Result<LabProcess, LabError> {
    let ns = format!("{}-node{k}", st.prefix);
    let tmp = node_dir(st, k);
    std::fs::create_dir_all(&tmp).map_err(io("cannot create", &tmp))?;
    // A runtime directory is private to its user.
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io("cannot protect", &tmp))?;
    let log = st.dir.join(format!("node{k}.log"));
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(io("cannot create", &log))?;
    let err = out.try_clone().map_err(io("cannot open", &log))?;
    let mut serve = netns::command_in(&ns, exe);
    serve
        .args(&args)
        // serve keeps its private sockets under its runtime (or, in older builds,
        // temporary) directory: make both the lab's, so they go with it.
        .env("XDG_RUNTIME_DIR", &tmp)
        .env("TMPDIR", &tmp)
        // The log is a file: no colour codes in it.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let child = serve
        .spawn()
        .map_err(|e| LabError::Step(format!("cannot start splitos serve in {ns}: {e}")))?;
    let listen = SocketAddr::new(st.vip.into(), st.port);
    // The child is not waited for: it outlives `up`, and `down` ends it.
    Ok(LabProcess {
        namespace: ns,
        pid: child.id() as i32,
        what: format!("splitos serve {} on {listen}", st.site.display()),
        log,
        args,
    })
}

/// Waits until node `k` serves the virtual IP; its log in the error if it does not.
fn wait_node(st: &LabState, k: NodeId) -> Result<(), LabError> {
    let ns = format!("{}-node{k}", st.prefix);
    wait_serving(&ns, SocketAddr::new(st.vip.into(), st.port)).map_err(|e| {
        let log = std::fs::read_to_string(st.dir.join(format!("node{k}.log"))).unwrap_or_default();
        LabError::Step(format!("{e}; its log:\n{log}"))
    })
}

/// Starts node `member` (`nodeK`) of lab `prefix` again, after `lab kill` (or a crash), with
/// the arguments it was first started with: its link to the switch up again, then
/// `splitos serve`; waits until it serves.
pub fn restart(prefix: &str, member: &str) -> Result<LabProcess, LabError> {
    let mut st = load(prefix)?;
    let ns = st.namespace_of(member)?;
    let k: NodeId = member
        .strip_prefix("node")
        .and_then(|k| k.parse().ok())
        .ok_or_else(|| LabError::NotANode(member.to_string(), st.nodes))?;
    let at = st
        .processes
        .iter()
        .rposition(|p| p.namespace == ns && !p.args.is_empty())
        .ok_or_else(|| {
            LabError::Step(format!(
                "the lab's state has no command line for {member} (a lab made by an older splitos)"
            ))
        })?;
    if alive(st.processes[at].pid) || !netns::pids(&ns).is_empty() {
        return Err(LabError::Step(format!(
            "{member} is running (stop it first with `splitos lab kill {member}`)"
        )));
    }
    // `lab kill` took its link down, and the routes through it went with it.
    netns::ip(&["-n", &ns, "link", "set", "sw", "up"])?;
    netns::ip(&[
        "-n",
        &ns,
        "route",
        "replace",
        "default",
        "via",
        &format!("198.18.{k}.1"),
    ])?;
    let exe = st
        .exe
        .clone()
        .or_else(|| std::env::current_exe().ok())
        .ok_or_else(|| LabError::Step("cannot find the splitos binary".into()))?;
    let p = spawn_node(&exe, &st, k, st.processes[at].args.clone())?;
    st.processes[at] = p.clone();
    save(&st)?;
    wait_node(&st, k)?;
    Ok(p)
}

/// Waits (at most 20 s) until something accepts connections on `addr` inside `ns`.
fn wait_serving(ns: &str, addr: SocketAddr) -> Result<(), LabError> {
    let until = Instant::now() + Duration::from_secs(20);
    netns::run_in(ns, || loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= until {
            return Err(LabError::Step(format!(
                "splitos serve in {ns} did not start listening on {addr} within 20 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    })?
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
        .is_some_and(|dead| !dead)
}

/// What `down` did.
#[derive(Debug, Default)]
pub struct DownReport {
    pub namespaces: Vec<String>,
    pub processes: usize,
    pub left: Vec<String>,
}

/// Removes lab `prefix`: its processes (TERM, then KILL), its namespaces (and whatever still
/// runs in them) and its state directory. Works from the state file and, after a crash, from
/// the namespaces' names alone.
pub fn down(prefix: &str) -> Result<DownReport, LabError> {
    netns::check_name(prefix)?;
    netns::require_root()?;
    let st = load(prefix).ok();
    let dir = state_dir(prefix);
    let mut namespaces = namespaces_named(prefix);
    if let Some(st) = &st {
        for n in &st.namespaces {
            if !namespaces.contains(n) && netns::exists(n) {
                namespaces.push(n.clone());
            }
        }
    }
    if st.is_none() && namespaces.is_empty() && !dir.exists() {
        return Err(LabError::NotUp(prefix.to_string()));
    }
    let mut report = DownReport::default();
    if let Some(st) = &st {
        report.processes = stop_processes(&st.processes);
    }
    report.left = topology::destroy_prefixed(&namespaces);
    report.namespaces = namespaces;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io("cannot remove", &dir))?;
    }
    // The parent directory goes too when no other lab is left in it.
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(report)
}

/// TERM to each live process, a grace period, then KILL; returns how many were live.
fn stop_processes(ps: &[LabProcess]) -> usize {
    use rustix::process::{kill_process, Pid, Signal};
    let live: Vec<&LabProcess> = ps.iter().filter(|p| alive(p.pid)).collect();
    for p in &live {
        if let Some(pid) = Pid::from_raw(p.pid) {
            let _ = kill_process(pid, Signal::TERM);
        }
    }
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until && live.iter().any(|p| alive(p.pid)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in &live {
        if alive(p.pid) {
            if let Some(pid) = Pid::from_raw(p.pid) {
                let _ = kill_process(pid, Signal::KILL);
            }
        }
    }
    live.len()
}

/// A lab's state with each process's and namespace's liveness.
#[derive(Debug, Serialize)]
pub struct LabStatus {
    #[serde(flatten)]
    pub state: LabState,
    pub processes_alive: Vec<bool>,
    pub namespaces_present: Vec<bool>,
    /// Each node's connections and the flows the switch sends to it by name.
    pub nodes: Vec<NodeStatus>,
    /// Whether the lab's etcd answers healthy (labs with failover).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_healthy: Option<bool>,
}

/// What one node holds, as its node link and the switch say.
#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub node: NodeId,
    /// Connections its TCP server could move now (keep-alive connections between requests:
    /// most of them); `None` if its link did not answer (then `link_error` says why).
    pub connections: Option<Vec<splitos_migrate::Flow>>,
    pub link_error: Option<String>,
    /// Flows the switch sends to this node by a per-flow override (moved ones), whatever
    /// their bucket says.
    pub owned_flows: Vec<SocketAddr>,
    /// Fenced wholly by the switch as dead.
    pub dead: bool,
    /// Buckets of new flows the switch gives it.
    pub buckets: usize,
    /// Packets the switch forwarded from it to clients, and dropped as from a dead node.
    pub forwarded_packets: u64,
    pub dead_dropped_packets: u64,
    /// Cut off from the control plane (`lab partition`).
    pub partitioned: bool,
    /// The `failover` part of the node's own status, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<serde_json::Value>,
}

pub fn status(prefix: &str) -> Result<LabStatus, LabError> {
    let state = load(prefix)?;
    let nodes =
        netns::run_in(&state.namespace_of("switch")?, || node_status(&state)).unwrap_or_default();
    let etcd_healthy = state.failover.as_ref().map(|f| {
        crate::etcd_member::healthy(
            Some(&f.namespace),
            SocketAddr::new(failover::ETCD_ADDR.into(), failover::ETCD_PORT),
        )
    });
    Ok(LabStatus {
        etcd_healthy,
        processes_alive: state.processes.iter().map(|p| alive(p.pid)).collect(),
        namespaces_present: state.namespaces.iter().map(|n| netns::exists(n)).collect(),
        nodes,
        state,
    })
}

/// Asks every node's link (from the switch's namespace, where the links are reached) and
/// reads the switch's overrides.
fn node_status(st: &LabState) -> Vec<NodeStatus> {
    let sw = crate::switch::Switch::open(crate::switch::DEFAULT_TABLE)
        .map(|sw| sw.state().clone())
        .unwrap_or_default();
    let owners = &sw.owners;
    (1..=st.nodes)
        .map(|k| {
            let listed = splitos_migrate::LinkClient::connect(node_link(k), Duration::from_secs(1))
                .and_then(|mut c| c.list(splitos_migrate::wire::FLOWS_MAX));
            NodeStatus {
                node: k,
                link_error: listed.as_ref().err().map(|e| e.to_string()),
                connections: listed.ok(),
                owned_flows: owners
                    .iter()
                    .filter(|(_, &n)| n == k)
                    .map(|(f, _)| SocketAddr::V4(f.0))
                    .collect(),
                dead: sw.dead.contains(&k),
                buckets: sw.buckets.iter().filter(|&&b| b == k).count(),
                forwarded_packets: sw.counters.get(&k).map_or(0, |c| c.forwarded),
                dead_dropped_packets: sw.counters.get(&k).map_or(0, |c| c.dead_dropped),
                partitioned: failover::partitioned(&format!("{}-node{k}", st.prefix)),
                failover: st
                    .failover
                    .as_ref()
                    .and_then(|_| failover::node_failover(st, k)),
            }
        })
        .collect()
}

/// The lab's addresses: the only ones it uses, and the only ones its node links accept.
const LAB_NETWORK: &str = "198.18.0.0/15";

/// Node `k`'s link address.
fn node_link(k: NodeId) -> SocketAddr {
    SocketAddr::new(
        Topology::node_addr(k).into(),
        crate::migrate::DEFAULT_LINK_PORT,
    )
}

/// Moves connections from node `from` to node `to` of lab `prefix` (both `nodeK`): the
/// operator's side runs in the switch namespace, as `splitos migrate` would on a router.
pub fn migrate(
    prefix: &str,
    from: &str,
    to: &str,
    select: crate::migrate::Select,
) -> Result<crate::migrate::Report, LabError> {
    let st = load(prefix)?;
    let node = |m: &str| -> Result<NodeId, LabError> {
        st.namespace_of(m)?;
        m.strip_prefix("node")
            .and_then(|k| k.parse().ok())
            .ok_or_else(|| LabError::NotANode(m.to_string(), st.nodes))
    };
    let (a, b) = (node(from)?, node(to)?);
    let sw = st.namespace_of("switch")?;
    let table = crate::switch::DEFAULT_TABLE;
    let r = netns::run_in(&sw, || {
        crate::migrate::migrate(table, node_link(a), node_link(b), select)
    })??;
    Ok(r)
}

/// Drains node `member` (`nodeK`) of lab `prefix` into all its other nodes (see
/// `migrate::drain`), from the switch namespace.
pub fn drain(prefix: &str, member: &str) -> Result<crate::migrate::DrainReport, LabError> {
    let st = load(prefix)?;
    st.namespace_of(member)?;
    let k: NodeId = member
        .strip_prefix("node")
        .and_then(|k| k.parse().ok())
        .ok_or_else(|| LabError::NotANode(member.to_string(), st.nodes))?;
    let peers: Vec<SocketAddr> = (1..=st.nodes).filter(|&n| n != k).map(node_link).collect();
    let sw = st.namespace_of("switch")?;
    let table = crate::switch::DEFAULT_TABLE;
    let r = netns::run_in(&sw, || crate::migrate::drain(table, node_link(k), &peers))??;
    Ok(r)
}

/// What `kill` did.
#[derive(Debug, Serialize)]
pub struct KillReport {
    pub node: NodeId,
    /// Processes of the node's namespace sent SIGKILL.
    pub killed: Vec<i32>,
}

/// Kills node `member` (`nodeK`) of lab `prefix` the hard way, as a machine dies: SIGKILL to
/// every process in its namespace, and its link to the switch cut (its interface down), so
/// nothing it might still send reaches anyone. The namespace stays (`down` removes it).
pub fn kill(prefix: &str, member: &str) -> Result<KillReport, LabError> {
    use rustix::process::{kill_process, Pid, Signal};
    let st = load(prefix)?;
    let ns = st.namespace_of(member)?;
    let node: NodeId = member
        .strip_prefix("node")
        .and_then(|k| k.parse().ok())
        .ok_or_else(|| LabError::NotANode(member.to_string(), st.nodes))?;
    // The link first: a process between two signals must not get a packet out.
    netns::ip(&["-n", &ns, "link", "set", "sw", "down"])?;
    let mut killed = Vec::new();
    // Bounded: a process forked between the listing and the signal is caught next round.
    for _ in 0..10 {
        let pids = netns::pids(&ns);
        if pids.is_empty() {
            break;
        }
        for p in pids {
            if let Some(pid) = Pid::from_raw(p) {
                if kill_process(pid, Signal::KILL).is_ok() && !killed.contains(&p) {
                    killed.push(p);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(KillReport { node, killed })
}

/// Replaces this process with `program args...` run inside lab `prefix`'s `member`
/// namespace; returns only on failure.
pub fn exec(prefix: &str, member: &str, program: &str, args: &[String]) -> LabError {
    let st = match load(prefix) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let ns = match st.namespace_of(member) {
        Ok(n) => n,
        Err(e) => return e,
    };
    let e = netns::command_in(&ns, program).args(args).exec();
    LabError::Step(format!("cannot run {program} in {ns}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members() {
        let st = LabState {
            prefix: "p".into(),
            nodes: 2,
            vip: topology::DEFAULT_VIP,
            port: 80,
            site: "/s".into(),
            dir: "/d".into(),
            namespaces: vec![],
            processes: vec![],
            exe: None,
            failover: None,
        };
        assert_eq!(st.namespace_of("node2").unwrap(), "p-node2");
        assert_eq!(st.namespace_of("client").unwrap(), "p-client");
        for bad in ["node3", "node0", "nodex", "host", "node-1"] {
            assert!(st.namespace_of(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn state_dir_is_per_prefix() {
        assert!(state_dir("x").ends_with("splitos-lab/x"));
    }
}
