//! Something that runs beside a node's servers for the cluster: the failover agent of
//! `splitos-failover`, when `splitos serve` is built with it. The supervisor knows it only
//! through this trait, so that serving one node needs neither etcd nor its client.

use splitos_tcp_server::TcpServer;
use std::sync::Arc;

/// A running node agent. Started after the TCP server, dropped before it stops.
pub trait NodeAgent: Send {
    /// Its state, for the status file (`splitos status`, `splitos lab status`).
    fn status(&self) -> serde_json::Value;
    /// Why the node must stop now, if it must (e.g. the cluster declared it dead).
    fn fatal(&self) -> Option<String>;
}

/// Starts the node agent beside a started TCP server.
pub type AgentStart = Arc<dyn Fn(&TcpServer) -> Result<Box<dyn NodeAgent>, String> + Send + Sync>;
