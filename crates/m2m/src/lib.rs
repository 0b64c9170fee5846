//! Memory-to-memory channels between processes.
//!
//! A [`Channel`] joins two processes through one shared region: a ring of variable-length
//! messages each way, a pool of large payload buffers each way passed by descriptor, and an
//! eventfd doorbell each way that is rung only when the receiving side has said, in shared
//! memory, that it is going to sleep. Steady-state sends and receives make no system call.
//!
//! Everything read from shared memory is treated as hostile input: a peer that writes garbage
//! ends its channel with [`Error::Corrupt`], never a panic or an out-of-bounds access. A peer
//! that dies, even by `kill -9`, is noticed within ~10 ms ([`Error::PeerGone`]).
//!
//! ```no_run
//! use splitos_m2m::{Channel, ChannelConfig, Listener, ListenerConfig, Message};
//! # fn main() -> Result<(), splitos_m2m::Error> {
//! // server
//! let listener = Listener::bind("/tmp/demo.sock", ListenerConfig::default())?;
//! // client (another process)
//! let mut client = Channel::connect("/tmp/demo.sock", ChannelConfig::default())?;
//! client.send(b"hello")?;
//! let mut server = listener.accept()?.establish()?;
//! if let Message::Inline(bytes) = server.recv()? {
//!     assert_eq!(bytes, b"hello");
//! }
//! # Ok(()) }
//! ```
//!
//! Module map: `layout` is the contract (shared memory and the setup socket's messages); `ring`
//! the SPSC protocol; `region` the mapping and the only pointer arithmetic; `pool` payload
//! buffers; `channel` the duplex end and its waiting; `connect` the socket handshake; `sys` every
//! system call. Two modules are not part of a channel but are shared memory every side uses:
//! `seqlock`, the one implementation of the single-writer tables other crates publish (the file
//! server's directory, the TCP server's statistics), and `segment`, sealed memfds that carry
//! file bytes no process can change.

mod channel;
mod connect;
mod error;
pub mod layout;
mod pool;
mod region;
mod ring;
#[cfg(test)]
mod ring_model;
pub mod runtime;
pub mod segment;
pub mod seqlock;
mod shm_ring;
mod sys;
mod wait;

#[cfg(feature = "tokio")]
mod async_channel;
#[cfg(feature = "tokio")]
pub use async_channel::AsyncChannel;

pub use channel::{Channel, ChannelConfig, Message, SendBatch, MAX_FDS_PER_MESSAGE};
pub use connect::{Incoming, Listener, ListenerConfig, TRUST_UID_ENV};
pub use error::Error;
pub use pool::{RxBuffer, TxBuffer};
pub use sys::PeerCredentials;
pub use wait::{Phase, WaitPolicy};
