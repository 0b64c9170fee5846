//! The memory-mapped file server (being built): it owns a cache of file contents in shared
//! memory that applications and the TCP server read in place.
//!
//! What exists so far are its two foundations, each usable on its own:
//! - [`path`]: turning a requested path into one that cannot leave the served root, and opening
//!   it with the kernel enforcing that (`openat2` with `RESOLVE_BENEATH`), refusing anything that
//!   is not a regular file;
//! - [`segment`]: a file's bytes copied into a memfd that is then sealed against every change,
//!   so any number of processes can map it and no reader can ever see torn or changing bytes.

pub mod client;
pub mod directory;
pub mod path;
pub mod proto;
pub mod segment;
pub mod server;
