//! The failover agent: runs beside a node's TCP server and ties the parts together.
//!
//! - registers the node in etcd under a lease and keeps it alive; a lost lease is fatal (the
//!   node was declared dead and its connections may be adopted: it must stop answering);
//! - follows etcd (snapshot, then watch) to know the switch's ring, who is alive, and which
//!   adoptions the switch follows;
//! - streams its own checkpoints to its successor ([`crate::sender`]);
//! - keeps the checkpoints of the nodes it succeeds ([`crate::receiver`], [`crate::store`]),
//!   suspects a node whose stream goes quiet and asks etcd to end its lease;
//! - when a node it holds checkpoints of loses its lease, takes over ([`crate::takeover`]).
//!
//! etcd runs on a one-thread tokio runtime of the agent's own; everything that touches
//! sockets runs on plain threads, never on the TCP server's workers.

use crate::etcd::{Change, EtcdError, Member, NodeInfo, Registry, Snapshot};
use crate::receiver::{self, Heard, ReceiverCtx};
use crate::sender::{self, SenderCtx, SenderStats};
use crate::store::Store;
use crate::stream::{Hello, MAGIC};
use crate::takeover::{self, AppliedBoard, Dead, Report};
use splitos_tcp_server::checkpoint::CheckpointConfig;
use splitos_tcp_server::TcpServer;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Takeover reports kept for the status.
const REPORTS_KEPT: usize = 8;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub etcd: Vec<String>,
    pub cluster: String,
    pub name: String,
    /// The address the switch routes to for this node.
    pub addr: Ipv4Addr,
    pub link: Option<SocketAddr>,
    /// Where checkpoint streams from the nodes this one succeeds arrive.
    pub checkpoints_listen: SocketAddr,
    /// Who may send checkpoint streams.
    pub allow: Vec<(IpAddr, u8)>,
    pub lease_ttl: Duration,
    /// Silence after which a node this one succeeds is suspected dead.
    pub suspect_after: Duration,
    /// Bytes of checkpoints kept for the nodes this one succeeds.
    pub store_budget: usize,
    pub checkpoint: CheckpointConfig,
    /// Checkpoint this node's own connections (off: they are reset when it dies).
    pub checkpoints: bool,
}

impl AgentConfig {
    pub fn new(etcd: Vec<String>, cluster: &str, name: &str, addr: Ipv4Addr) -> AgentConfig {
        AgentConfig {
            etcd,
            cluster: cluster.to_string(),
            name: name.to_string(),
            addr,
            link: None,
            checkpoints_listen: SocketAddr::new(IpAddr::V4(addr), DEFAULT_CHECKPOINT_PORT),
            allow: Vec::new(),
            lease_ttl: Duration::from_secs(2),
            suspect_after: Duration::from_millis(300),
            store_budget: 64 << 20,
            checkpoint: CheckpointConfig::default(),
            checkpoints: true,
        }
    }
}

/// The checkpoint port unless told otherwise (the node link's port is 7411).
pub const DEFAULT_CHECKPOINT_PORT: u16 = 7412;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("cannot start the failover agent's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot listen for checkpoint streams on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("checkpoints: {0}")]
    Checkpoints(String),
    #[error("the failover agent needs at least one allowed network for checkpoint streams")]
    NoAllow,
}

/// What the agent knows of the cluster, from etcd.
#[derive(Default)]
struct View {
    snap: Snapshot,
}

struct Shared {
    cfg: AgentConfig,
    me: Member,
    registry: Registry,
    rt: tokio::runtime::Handle,
    migration: splitos_tcp_server::migration::Migration,
    view: Mutex<View>,
    successor: Arc<Mutex<Option<SocketAddr>>>,
    store: Arc<Mutex<Store>>,
    heard: Arc<Mutex<HashMap<(String, i64), Heard>>>,
    applied: AppliedBoard,
    reports: Mutex<Vec<Report>>,
    suspected: Mutex<HashMap<(String, i64), Instant>>,
    fatal: Mutex<Option<String>>,
    stop: Arc<AtomicBool>,
    sender: Arc<SenderStats>,
    checkpoints: Option<Arc<splitos_tcp_server::checkpoint::Checkpoints>>,
}

/// A running agent; stopping it (drop) says goodbye to the successor and gives up the lease.
pub struct Agent {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    threads: Vec<JoinHandle<()>>,
}

impl Agent {
    /// Registers the node and starts the agent beside `tcp`.
    pub fn start(cfg: AgentConfig, tcp: &TcpServer) -> Result<Agent, AgentError> {
        if cfg.allow.is_empty() {
            return Err(AgentError::NoAllow);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("failover-etcd")
            .enable_all()
            .build()
            .map_err(AgentError::Runtime)?;
        let listener =
            receiver::bind(cfg.checkpoints_listen).map_err(|source| AgentError::Listen {
                addr: cfg.checkpoints_listen,
                source,
            })?;
        let registry = runtime.block_on(Registry::connect(&cfg.etcd, &cfg.cluster))?;
        let info = NodeInfo {
            name: cfg.name.clone(),
            addr: cfg.addr,
            link: cfg.link,
            checkpoints: cfg.checkpoints_listen,
            pid: std::process::id(),
        };
        let me = runtime.block_on(register_patiently(&registry, &info, cfg.lease_ttl))?;
        tracing::info!(node = %cfg.name, incarnation = me.incarnation, lease = me.lease, "registered in etcd");
        let checkpoints = if cfg.checkpoints {
            let c = tcp
                .checkpoints(cfg.checkpoint.clone())
                .map_err(|e| AgentError::Checkpoints(e.to_string()))?;
            Some(Arc::new(c))
        } else {
            None
        };
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            me: me.clone(),
            registry: registry.clone(),
            rt: runtime.handle().clone(),
            migration: tcp.migration(),
            view: Mutex::new(View::default()),
            successor: Arc::new(Mutex::new(None)),
            store: Arc::new(Mutex::new(Store::new(cfg.store_budget))),
            heard: Arc::new(Mutex::new(HashMap::new())),
            applied: AppliedBoard::default(),
            reports: Mutex::new(Vec::new()),
            suspected: Mutex::new(HashMap::new()),
            fatal: Mutex::new(None),
            stop: stop.clone(),
            sender: Arc::new(SenderStats::default()),
            checkpoints: checkpoints.clone(),
            cfg,
        });
        let mut agent = Agent {
            shared: shared.clone(),
            runtime: None,
            threads: Vec::new(),
        };
        // The lease: lost means this node is dead to the cluster.
        let s = shared.clone();
        runtime.spawn(async move {
            let e = s.registry.keep_alive(s.me.lease, s.cfg.lease_ttl).await;
            if !s.stop.load(Ordering::Acquire) {
                tracing::error!("{e}: this node was declared dead; it stops so that it never answers for connections a successor adopted");
                if let Ok(mut f) = s.fatal.lock() {
                    *f = Some(format!("failover: {e}"));
                }
            }
        });
        let s = shared.clone();
        runtime.spawn(async move { follow(s).await });
        agent.runtime = Some(runtime);
        let rctx = Arc::new(ReceiverCtx {
            store: shared.store.clone(),
            heard: shared.heard.clone(),
            allow: shared.cfg.allow.clone(),
            stop: stop.clone(),
        });
        agent.spawn("checkpoints-accept", move || receiver::run(listener, rctx))?;
        let sctx = SenderCtx {
            hello: Hello {
                magic: MAGIC.to_string(),
                node: me.info.name.clone(),
                incarnation: me.incarnation,
            },
            checkpoints,
            successor: shared.successor.clone(),
            stats: shared.sender.clone(),
            stop: stop.clone(),
        };
        agent.spawn("checkpoints-out", move || sender::run(sctx))?;
        let s = shared.clone();
        agent.spawn("failover-watchdog", move || watchdog(&s))?;
        Ok(agent)
    }

    fn spawn(&mut self, name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), AgentError> {
        let t = std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(AgentError::Runtime)?;
        self.threads.push(t);
        Ok(())
    }

    /// Why the node must stop, if it must (its lease was lost).
    pub fn fatal(&self) -> Option<String> {
        self.shared.fatal.lock().ok().and_then(|f| f.clone())
    }

    /// The agent's state, for the node's status file and `splitos lab status`.
    pub fn status(&self) -> serde_json::Value {
        let s = &self.shared;
        let store = s.store.lock().map(|st| (st.stats(), st.sources())).ok();
        let successor = s.successor.lock().ok().and_then(|x| *x);
        let reports = s.reports.lock().map(|r| r.clone()).unwrap_or_default();
        let cp = s.checkpoints.as_ref().map(|c| (c.stats(), c.dropped()));
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "node": s.me.info.name,
            "incarnation": s.me.incarnation,
            "lease": s.me.lease,
            "successor": successor.map(|a| a.to_string()),
            "stream": {
                "connected": s.sender.connected.load(Ordering::Relaxed),
                "frames": get(&s.sender.frames),
                "bytes": get(&s.sender.bytes),
                "writes": get(&s.sender.writes),
                "connects": get(&s.sender.connects),
                "dropped": cp.map(|c| c.1),
            },
            "checkpoints_made": cp.map(|(c, _)| serde_json::json!({
                "idle_records": c.idle_records,
                "busy_events": c.busy_events,
                "record_ns": c.record_ns,
                "failures": c.failures,
            })),
            "held": store.as_ref().map(|(st, _)| serde_json::to_value(st).unwrap_or_default()),
            "held_from": store.map(|(_, src)| src.into_iter().map(|(n, i, f, idle)| serde_json::json!({
                "node": n, "incarnation": i, "flows": f, "idle": idle,
            })).collect::<Vec<_>>()),
            "takeovers": reports,
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(rt) = self.runtime.take() {
            // A clean stop: the successor got its goodbye, so the lease can go now.
            let s = self.shared.clone();
            let _ = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(2), s.registry.revoke(s.me.lease)).await
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Registers, waiting out a previous incarnation of this name whose lease has not expired
/// yet (a node restarted quickly after it was killed).
async fn register_patiently(
    reg: &Registry,
    info: &NodeInfo,
    ttl: Duration,
) -> Result<Member, EtcdError> {
    let until = tokio::time::Instant::now() + ttl + Duration::from_secs(3);
    loop {
        match reg.register(info, ttl).await {
            Err(EtcdError::NameTaken(_)) if tokio::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            r => return r,
        }
    }
}

/// Follows etcd: a snapshot, then its changes; again from a new snapshot when the watch fails.
async fn follow(s: Arc<Shared>) {
    while !s.stop.load(Ordering::Acquire) {
        let snap = match s.registry.snapshot().await {
            Ok(snap) => snap,
            Err(e) => {
                tracing::warn!("reading the cluster from etcd: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let rev = snap.revision;
        for (name, inc, _) in &snap.applied {
            s.applied.mark(name, *inc);
        }
        if let Ok(mut v) = s.view.lock() {
            v.snap = snap;
        }
        update_successor(&s);
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let reg = s.registry.clone();
        let watch = tokio::spawn(async move { reg.watch(rev, tx).await });
        while let Some(change) = rx.recv().await {
            apply(&s, change);
        }
        if let Ok(Err(e)) = watch.await {
            tracing::warn!("the etcd watch ended: {e}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn apply(s: &Arc<Shared>, change: Change) {
    let mut down = None;
    if let Ok(mut v) = s.view.lock() {
        let snap = &mut v.snap;
        match change {
            Change::Up(m) => {
                snap.members.retain(|x| x.info.name != m.info.name);
                snap.members.push(m);
            }
            Change::Down {
                name,
                incarnation,
                addr,
            } => {
                snap.members
                    .retain(|x| !(x.info.name == name && x.incarnation == incarnation));
                down = Some((name, incarnation, addr));
            }
            Change::Switch(sw) => snap.switch = Some(sw),
            Change::Adopted(a) => snap.adoptions.push(a),
            Change::Applied {
                name,
                incarnation,
                applied,
            } => {
                s.applied.mark(&name, incarnation);
                snap.applied.push((name, incarnation, applied));
            }
        }
    }
    update_successor(s);
    if let Some((name, incarnation, addr)) = down {
        if name == s.me.info.name && incarnation == s.me.incarnation {
            return;
        }
        let taken = s
            .store
            .lock()
            .ok()
            .and_then(|mut st| st.take(&name, incarnation));
        let Some(taken) = taken else { return };
        let dead = Dead {
            name,
            incarnation,
            addr: addr.unwrap_or(Ipv4Addr::UNSPECIFIED),
        };
        let s2 = s.clone();
        let spawned = std::thread::Builder::new()
            .name("takeover".into())
            .spawn(move || {
                let ctx = takeover::Ctx {
                    registry: &s2.registry,
                    rt: &s2.rt,
                    migration: &s2.migration,
                    me: &s2.me,
                    applied: &s2.applied,
                };
                match takeover::run(&ctx, &dead, taken) {
                    Ok(r) => {
                        if let Ok(mut rs) = s2.reports.lock() {
                            rs.push(r);
                            let n = rs.len();
                            if n > REPORTS_KEPT {
                                rs.drain(..n - REPORTS_KEPT);
                            }
                        }
                    }
                    Err(e) => tracing::error!(dead = %dead.name, "takeover failed: {e}"),
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start a takeover: {e}");
        }
    }
}

fn update_successor(s: &Shared) {
    let to = s.view.lock().ok().and_then(|v| {
        v.snap
            .successor(s.me.info.addr)
            .filter(|m| m.info.name != s.me.info.name)
            .map(|m| m.info.checkpoints)
    });
    if let Ok(mut cur) = s.successor.lock() {
        if *cur != to {
            tracing::info!(successor = ?to, "the successor changed");
            *cur = to;
        }
    }
}

/// Suspects the nodes whose streams went quiet, and asks etcd to end their leases.
fn watchdog(s: &Arc<Shared>) {
    while !s.stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
        let quiet: Vec<(String, i64)> = s
            .heard
            .lock()
            .map(|h| {
                h.iter()
                    .filter(|(_, x)| x.broken || x.last.elapsed() >= s.cfg.suspect_after)
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        for key in quiet {
            let accused = s.view.lock().ok().and_then(|v| {
                v.snap
                    .members
                    .iter()
                    .find(|m| m.info.name == key.0 && m.incarnation == key.1)
                    .cloned()
            });
            let Some(accused) = accused else {
                // Not registered (any more): its Down takes it from here.
                if let Ok(mut h) = s.heard.lock() {
                    h.remove(&key);
                }
                continue;
            };
            let again = s
                .suspected
                .lock()
                .map(|m| {
                    m.get(&key)
                        .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
                })
                .unwrap_or(true);
            if again {
                continue;
            }
            if let Ok(mut m) = s.suspected.lock() {
                m.insert(key.clone(), Instant::now());
            }
            tracing::warn!(node = %key.0, incarnation = key.1, "no word from a node this one succeeds for {:?}: asking etcd to end its lease", s.cfg.suspect_after);
            let r = s.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(2), s.registry.accuse(&s.me, &accused))
                    .await
            });
            match r {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    tracing::warn!(node = %key.0, "etcd refused: this node was accused itself, or is no longer registered")
                }
                Ok(Err(e)) => tracing::warn!(node = %key.0, "cannot end its lease: {e}"),
                Err(_) => tracing::warn!(node = %key.0, "etcd did not answer within 2 s"),
            }
        }
    }
}
