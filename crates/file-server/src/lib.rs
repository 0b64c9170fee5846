//! The memory-mapped file server: it owns a cache of file contents in shared memory that
//! applications and the TCP server read in place.
//!
//! - [`path`]: turning a requested path into one that cannot leave the served root, and opening
//!   it with the kernel enforcing that (`openat2` with `RESOLVE_BENEATH`), refusing anything that
//!   is not a regular file;
//! - [`server`]: the cache of sealed segments, eviction, change detection, and the sessions;
//! - [`directory`]: the lookup table in shared memory that readers search without a message;
//! - [`proto`]: the messages between readers and the server;
//! - [`client`]: the reader's side, [`client::FileClient`].
//!
//! A cached file's bytes live in [`segment`]s: memfds sealed against every change, so any number
//! of processes can map them and no reader can ever see torn or changing bytes. They are
//! `splitos_m2m::segment`, re-exported here for the crates that import them from this one.

pub mod client;
pub mod directory;
pub mod path;
pub mod proto;
pub mod server;

pub use splitos_m2m::segment;
