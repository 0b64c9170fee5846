//! A node dies and its idle keep-alive connections carry on at a peer.
//!
//! - [`etcd`]: leases, the switch's ring, adoptions — the cluster's state in etcd.
pub mod controller;
pub mod etcd;
