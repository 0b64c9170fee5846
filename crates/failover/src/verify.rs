//! Asking clients where their connections stand, after a takeover.
//!
//! A checkpoint says how a connection stood when it was last at rest; the dead node may have
//! gone on with it since (a request that arrived just before the death, whose BUSY never
//! left). A restored socket that is behind its client would hang: each side ignores the
//! other's numbers. So the successor checks each one against the client itself: a restored
//! socket's window probe (sent when it leaves repair mode), or for a connection that is not
//! restored a forged out-of-window ACK, makes the client answer with its own sequence and
//! acknowledgement numbers. A raw socket sees that answer ([`Capture`]); where the numbers
//! are not the checkpoint's, the connection is reset with the one sequence number the client
//! accepts (RFC 5961: exactly its next expected), so it fails at once instead of hanging.

use rustix::fd::OwnedFd;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

/// One inbound TCP segment's header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload: usize,
}

/// Parses an IPv4 packet carrying TCP (as a raw IPPROTO_TCP socket reads it).
pub fn parse(p: &[u8]) -> Option<Seg> {
    if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 6 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
    let t = p.get(ihl..total)?;
    if t.len() < 20 {
        return None;
    }
    let doff = usize::from(t[12] >> 4) * 4;
    if doff < 20 || doff > t.len() {
        return None;
    }
    let ip = |o: usize| Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
    let be32 = |o: usize| u32::from_be_bytes([t[o], t[o + 1], t[o + 2], t[o + 3]]);
    Some(Seg {
        src: SocketAddrV4::new(ip(12), u16::from_be_bytes([t[0], t[1]])),
        dst: SocketAddrV4::new(ip(16), u16::from_be_bytes([t[2], t[3]])),
        seq: be32(4),
        ack: be32(8),
        flags: t[13],
        payload: t.len() - doff,
    })
}

/// A raw socket that sees a copy of every TCP segment arriving in this network namespace.
pub struct Capture {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Capture {
    /// Needs CAP_NET_RAW.
    pub fn open() -> io::Result<Capture> {
        let fd = rustix::net::socket_with(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::RAW,
            rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
            Some(rustix::net::ipproto::TCP),
        )?;
        // Big enough that a burst of segments during the check is not dropped.
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&fd, 4 << 20);
        Ok(Capture {
            fd,
            buf: vec![0; 65536],
        })
    }

    /// The next segment before `until`, or `None` when the time is up.
    pub fn next(&mut self, until: Instant) -> io::Result<Option<Seg>> {
        loop {
            match rustix::net::recv(&self.fd, &mut self.buf[..], rustix::net::RecvFlags::empty()) {
                Ok((n, _)) => {
                    if let Some(s) = parse(&self.buf[..n]) {
                        return Ok(Some(s));
                    }
                }
                Err(rustix::io::Errno::AGAIN) => {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    let mut fds = [rustix::event::PollFd::new(
                        &self.fd,
                        rustix::event::PollFlags::IN,
                    )];
                    let ts = rustix::time::Timespec {
                        tv_sec: 0,
                        tv_nsec: left.min(Duration::from_millis(50)).as_nanos() as i64,
                    };
                    let _ = rustix::event::poll(&mut fds, Some(&ts));
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Resets the client's side of `local <- client` whose next expected sequence number is
/// `client_rcv_nxt` (the acknowledgement number of the client's last segment).
pub fn reset_client(local: SocketAddrV4, client: SocketAddrV4, client_rcv_nxt: u32) {
    if let Err(e) = splitos_repair::send_segment_v4(
        local,
        client,
        client_rcv_nxt,
        0,
        splitos_repair::flags::RST,
        0,
    ) {
        tracing::warn!(%client, "cannot reset a connection that could not go on: {e}");
    }
}

/// Sends `client` an ACK it cannot accept (far outside its window), which it answers with an
/// ACK carrying its own numbers.
pub fn probe_client(local: SocketAddrV4, client: SocketAddrV4) {
    // Half the sequence space away from anything plausible: a segment this far from the
    // window is unacceptable whatever the client's numbers are, except with probability
    // window/2^32.
    let seq = 0x8000_0000u32 ^ u32::from(client.port()) << 8;
    if let Err(e) =
        splitos_repair::send_segment_v4(local, client, seq, 0, splitos_repair::flags::ACK, 0)
    {
        tracing::warn!(%client, "cannot probe a connection to reset it: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_forger_builds_and_rejects_garbage() {
        // An IPv4 header (IHL 5) and a TCP header (data offset 5), from 1.2.3.4:80 to
        // 5.6.7.8:9000, seq 7, ack 9, ACK.
        let mut p = [0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[9] = 6;
        p[12..16].copy_from_slice(&[1, 2, 3, 4]);
        p[16..20].copy_from_slice(&[5, 6, 7, 8]);
        p[20..22].copy_from_slice(&80u16.to_be_bytes());
        p[22..24].copy_from_slice(&9000u16.to_be_bytes());
        p[24..28].copy_from_slice(&7u32.to_be_bytes());
        p[28..32].copy_from_slice(&9u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x10;
        let s = parse(&p).unwrap();
        assert_eq!(s.src, "1.2.3.4:80".parse().unwrap());
        assert_eq!(s.dst, "5.6.7.8:9000".parse().unwrap());
        assert_eq!((s.seq, s.ack, s.flags, s.payload), (7, 9, 0x10, 0));
        assert!(parse(&p[..30]).is_none());
        let mut q = p;
        q[32] = 15 << 4;
        assert!(parse(&q).is_none());
        for n in 0..p.len() {
            let _ = parse(&p[..n]);
        }
    }
}
