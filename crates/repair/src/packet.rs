//! The one packet a restore has to forge: a segment from the peer that gives a restored socket
//! the peer's FIN (CLOSE_WAIT) or the acknowledgement of our own FIN (FIN_WAIT2), as libsoccr
//! does. Pure byte building, IPv4 only: an IPv4 header and a 20-byte TCP header with the
//! checksum over the pseudo-header.

use std::net::SocketAddrV4;

/// TCP flag bits.
pub(crate) const FIN: u8 = 0x01;
pub(crate) const ACK: u8 = 0x10;

/// Bytes of the packets built here: 20 of IPv4 header, 20 of TCP header, no payload.
pub(crate) const LEN: usize = 40;

/// The internet checksum (RFC 1071) of `chunks`, as if they were one buffer of even-length
/// pieces (every chunk here is).
fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for c in chunks {
        for pair in c.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            let lo = pair.get(1).copied().map_or(0, u32::from);
            sum = sum.wrapping_add(hi | lo);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 TCP segment from `src` to `dst` with no payload.
pub(crate) fn segment_v4(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
) -> [u8; LEN] {
    let mut p = [0u8; LEN];
    // IPv4 header: version 4, IHL 5; total length; DF; TTL 64; protocol TCP.
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(LEN as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let ip_sum = checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    // TCP header.
    let t = 20;
    p[t..t + 2].copy_from_slice(&src.port().to_be_bytes());
    p[t + 2..t + 4].copy_from_slice(&dst.port().to_be_bytes());
    p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    p[t + 8..t + 12].copy_from_slice(&ack.to_be_bytes());
    p[t + 12] = 5 << 4;
    p[t + 13] = flags;
    p[t + 14..t + 16].copy_from_slice(&window.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src.ip().octets());
    pseudo[4..8].copy_from_slice(&dst.ip().octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let tcp_sum = checksum(&[&pseudo, &p[t..]]);
    p[t + 16..t + 18].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        let src: SocketAddrV4 = "198.18.0.2:40000".parse().unwrap();
        let dst: SocketAddrV4 = "198.18.0.1:80".parse().unwrap();
        let p = segment_v4(src, dst, 0x8000_0000, 0xffff_ffff, FIN | ACK, 502);
        // A correct header sums to zero (the checksum field included).
        assert_eq!(checksum(&[&p[..20]]), 0);
        let mut pseudo = [0u8; 12];
        pseudo[..4].copy_from_slice(&src.ip().octets());
        pseudo[4..8].copy_from_slice(&dst.ip().octets());
        pseudo[9] = 6;
        pseudo[11] = 20;
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0);
        assert_eq!(&p[24..28], &[0x80, 0, 0, 0]);
        assert_eq!(p[33], 0x11);
    }

    #[test]
    fn rfc1071_example() {
        // The example of RFC 1071 §3: 0001 f203 f4f5 f6f7 sums to ddf2, complemented 220d.
        assert_eq!(
            checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
            0x220d
        );
    }
}
