//! A TCP connection as a record.
//!
//! [`socket`] saves an established (or half-closed: CLOSE_WAIT, FIN_WAIT2) kernel TCP
//! connection with `TCP_REPAIR` and restores it into a new socket, on this node or another
//! that holds the same local address; [`record`] is the byte format that carries it — the
//! kernel state, both kernel queues, and opaque room for what the TCP server and the
//! application held for the connection. The privileged calls are all in one module (`sys`).
//!
//! A save or restore needs CAP_NET_ADMIN, and the caller must keep the flow silent while it
//! runs (no packet of the connection may reach or leave either socket): on one host a netfilter
//! drop rule, in a cluster the switch's hold and fence. Packets that a restore injects carry
//! [`REPAIR_MARK`] so that such a rule can let them through.
//!
//! ```no_run
//! # fn demo(sock: std::os::fd::OwnedFd) -> Result<(), Box<dyn std::error::Error>> {
//! use std::os::fd::AsFd;
//! use splitos_repair::{record, socket};
//! // (the flow is silenced here)
//! let saved = socket::pause(sock.as_fd())?.save()?;
//! socket::close_silently(sock)?;
//! let bytes = saved.repr(socket::UserState::default()).to_vec()?;
//! // ... the bytes travel ...
//! let repr = record::parse(&bytes)?;
//! let restoring = socket::restore(&repr, socket::RestoreOptions::default())?;
//! // (the flow is let through again here)
//! let live = restoring.finish()?;
//! # drop(live); Ok(()) }
//! ```

mod packet;
pub mod record;
pub mod socket;
mod sys;

pub use record::{Record, RecordError, RecordRepr, TcpState};
pub use socket::{RepairError, Restoring, Saved};
pub use sys::{tcp_state, REPAIR_MARK};

/// Flags of the segments [`send_segment_v4`] forges.
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// Sends one forged IPv4 TCP segment without payload from `src` to `dst` through a raw socket
/// (needs CAP_NET_RAW; it carries [`REPAIR_MARK`]). A takeover uses it to ask a client where
/// its connection stands (an out-of-window ACK, which the client answers) and to reset a
/// connection that cannot go on with the exact sequence number the client expects.
pub fn send_segment_v4(
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
) -> std::io::Result<()> {
    let p = packet::segment_v4(src, dst, seq, ack, flags, window);
    sys::inject_v4(&p, dst)
}
