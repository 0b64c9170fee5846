//! Split-OS on several nodes: the steering switch that spreads a virtual IP's flows over the
//! nodes ([`switch`]), and the pieces that build a cluster out of network namespaces on one
//! machine ([`netns`], [`topology`]) for tests, demos and benchmarks.

pub mod netns;
pub mod switch;
pub mod topology;
