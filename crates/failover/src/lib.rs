//! A node dies and its idle keep-alive connections carry on at a peer, on the same client
//! sockets (issue 14; background in `../shared/research/cooperative-servers.md` §2, §4).
//!
//! - [`etcd`]: leases, the switch's ring, adoptions: the cluster's state, in etcd.
//! - [`stream`], [`sender`], [`receiver`]: a node streams checkpoints of its connections to
//!   its successor, which notices when the stream goes quiet.
//! - [`store`]: what a successor keeps, within a byte budget.
//! - [`takeover`], [`verify`]: adopting a dead node's connections, restoring the ones at rest,
//!   and resetting on purpose the ones that cannot go on.
//! - [`agent`]: all of it beside a node's TCP server.
//! - [`controller`]: the switch's side: it follows etcd and is the only writer of the switch.

pub mod agent;
pub mod controller;
pub mod etcd;
pub mod receiver;
pub mod sender;
pub mod store;
pub mod stream;
pub mod takeover;
pub mod verify;

pub use agent::{Agent, AgentConfig, AgentError};
