//! A cluster in namespaces for the steering tests: the topology (removed on drop, also when a
//! test fails), a switch, and in each node a small TCP server that answers every new
//! connection with its node id and then echoes. Needs root, `ip` and `nft`: without them the
//! tests fail with a message; they never pass silently.

#![allow(dead_code)]

use splitos_cluster::netns;
use splitos_cluster::switch::{Switch, SwitchConfig};
use splitos_cluster::topology::Topology;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const PORT: u16 = 80;

pub fn require() {
    netns::require_root().unwrap_or_else(|e| panic!("{e}"));
    netns::require_tool("nft", "--version").unwrap_or_else(|e| panic!("{e}"));
}

/// One node's server: connections it accepted, by client port.
pub struct NodeServer {
    pub id: u16,
    pub conns: Arc<Mutex<Vec<TcpStream>>>,
    pub accepted: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodeServer {
    fn start(ns: String, id: u16, vip: std::net::Ipv4Addr) -> NodeServer {
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let accepted = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, a, s) = (conns.clone(), accepted.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            netns::enter(&ns).unwrap();
            let l = TcpListener::bind(SocketAddr::new(vip.into(), PORT)).unwrap();
            l.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                let mut idle = true;
                loop {
                    match l.accept() {
                        Ok((mut t, _)) => {
                            idle = false;
                            a.fetch_add(1, Ordering::Relaxed);
                            t.set_nonblocking(true).unwrap();
                            let _ = t.write_all(&[id as u8]);
                            c.lock().unwrap().push(t);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => panic!("accept: {e}"),
                    }
                }
                c.lock().unwrap().retain_mut(|t| loop {
                    match t.read(&mut buf) {
                        Ok(0) => return false,
                        Ok(n) => {
                            idle = false;
                            let _ = t.write_all(&buf[..n]);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                        Err(_) => return false,
                    }
                });
                if idle {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("node server did not start");
        NodeServer {
            id,
            conns,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Writes `bytes` on the connection from client port `port`.
    pub fn send_to(&self, port: u16, bytes: &[u8]) {
        let mut g = self.conns.lock().unwrap();
        let t = g
            .iter_mut()
            .find(|t| t.peer_addr().ok().map(|a| a.port()) == Some(port))
            .expect("no such connection on this node");
        t.write_all(bytes).unwrap();
    }
}

impl Drop for NodeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub struct Cluster {
    pub topo: Topology,
    pub servers: Vec<NodeServer>,
}

impl Cluster {
    /// Namespaces for `nodes` nodes, a switch over them and a server in each.
    pub fn new(tag: &str, nodes: u16) -> Cluster {
        require();
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "spt{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let topo = Topology::new(&prefix, nodes).unwrap();
        let mut c = Cluster {
            topo,
            servers: Vec::new(),
        };
        c.topo.build().unwrap();
        let (vip, sw_nodes) = (c.topo.vip, c.topo.switch_nodes());
        netns::run_in(&c.topo.switch(), || {
            Switch::create(
                splitos_cluster::switch::DEFAULT_TABLE,
                SwitchConfig::new(vip, vec![PORT]),
                &sw_nodes,
            )
            .unwrap();
        })
        .unwrap();
        for k in 1..=nodes {
            c.servers
                .push(NodeServer::start(c.topo.node(k), k, c.topo.vip));
        }
        c
    }

    /// Runs `f` with the switch, inside the switch's namespace.
    pub fn switch<R: Send>(&self, f: impl FnOnce(&mut Switch) -> R + Send) -> R {
        netns::run_in(&self.topo.switch(), || {
            let mut sw = Switch::open(splitos_cluster::switch::DEFAULT_TABLE).unwrap();
            f(&mut sw)
        })
        .unwrap()
    }

    /// Runs `f` inside the client's namespace.
    pub fn client<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        netns::run_in(&self.topo.client(), f).unwrap()
    }

    /// Runs `f` inside the switch's namespace (for nft commands of the test's own).
    pub fn in_switch<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        netns::run_in(&self.topo.switch(), f).unwrap()
    }

    pub fn vip_addr(&self) -> SocketAddr {
        SocketAddr::new(self.topo.vip.into(), PORT)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.servers.clear();
        let left = self.topo.destroy();
        if !left.is_empty() && !std::thread::panicking() {
            panic!("namespaces left behind: {left:?}");
        }
    }
}

/// Connects to the virtual IP and reads the id byte of the node that answered.
pub fn connect(vip: SocketAddr) -> (TcpStream, u16) {
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    (s, u16::from(b[0]))
}

/// Runs `nft ARGS` in the current thread's namespace and returns its stdout.
pub fn nft(args: &[&str]) -> String {
    netns::run(std::process::Command::new("nft").args(args)).unwrap()
}

/// The packet count of the first `counter packets N` in `text`.
pub fn packets(text: &str) -> u64 {
    let at = text.find("packets ").expect("a counter");
    text[at + 8..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
