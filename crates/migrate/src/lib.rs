//! Live migration between Split-OS nodes.
//!
//! Each node's `splitos serve` runs a [`node::NodeLink`]: a plain TCP listener on the node's
//! own (cluster-private) address. On it the node answers an operator — which connections
//! could move, move these to that node, commit, abort — and receives connections from other
//! nodes. Moving a connection takes it out of service in the TCP server
//! (`splitos_tcp_server::migration`), saves it with `TCP_REPAIR` (`splitos_repair`) together
//! with the bytes the server held for it, sends the record over a link to the other node,
//! which restores it silently; after the operator has pointed the switch at the new node
//! (`Commit`), the new node takes the socket out of repair mode and its TCP server adopts it,
//! and the old node drops its copy without a packet. Until then every step can be undone:
//! a connection that cannot move goes back into service where it was.
//!
//! [`wire`] is the link's byte format; [`client::LinkClient`] is the operator's side (used by
//! `splitos migrate` and `splitos lab migrate` through `splitos_cluster::migrate`).

pub mod client;
pub mod node;
mod receiving;
mod sending;
pub mod wire;

pub use client::LinkClient;
pub use node::{LinkConfig, LinkError, NodeLink};
pub use wire::{Flow, Message, WireError};
