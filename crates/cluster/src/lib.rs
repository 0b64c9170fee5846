//! Split-OS on several nodes: the steering switch that spreads a virtual IP's flows over the
//! nodes ([`switch`]), and the pieces that build a cluster out of network namespaces on one
//! machine ([`netns`], [`topology`], and the [`lab`] that runs real servers in them) for
//! tests, demos and benchmarks; and live migration between nodes through the switch
//! ([`migrate`]). An etcd member of its own ([`etcd_member`]) is the lab's control plane when
//! it runs with failover.

pub mod etcd_member;
pub mod lab;
pub mod migrate;
pub mod netns;
pub mod switch;
pub mod topology;
