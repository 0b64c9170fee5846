//! The checkpoint stream: how a node tells its successor about its connections, and how the
//! successor notices that the node has gone quiet.
//!
//! One TCP connection from a node to its successor's checkpoint port. It opens with a
//! [`Hello`] (JSON, naming the node and its incarnation) and then carries frames:
//!
//! ```text
//! kind u8 | length u32 (big-endian) | payload
//!   OPENED  flow                      a connection the successor must know of
//!   IDLE    flow, epoch u64, record   the connection at rest: its record (splitos_repair)
//!   BUSY    flow, epoch u64           its last IDLE is stale
//!   CLOSED  flow
//!   BEAT    (empty)                   sent when nothing else was, every BEAT_EVERY
//!   BYE     (empty)                   a clean shutdown: forget this incarnation
//! flow = local (16-byte IPv6 or IPv4-mapped address, port u16) . peer (same)
//! ```
//!
//! Framing is checked before anything is used: a frame longer than [`FRAME_MAX`], an unknown
//! kind, or a payload of the wrong size ends the stream with an error (the node reconnects and
//! sends its state again); records are parsed only at takeover.

use serde::{Deserialize, Serialize};
use splitos_tcp_server::migration::Flow;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

pub const MAGIC: &str = "splitos-checkpoints/1";
/// Longest frame payload: an idle connection's record has empty queues (~100 bytes).
pub const FRAME_MAX: usize = 64 << 10;
/// How often a node that had nothing else to send says it is alive.
pub const BEAT_EVERY: Duration = Duration::from_millis(50);
const FLOW_LEN: usize = 36;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: String,
    pub node: String,
    pub incarnation: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Opened(Flow),
    Idle {
        flow: Flow,
        epoch: u64,
        record: Vec<u8>,
    },
    Busy {
        flow: Flow,
        epoch: u64,
    },
    Closed(Flow),
    Beat,
    Bye,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the checkpoint stream: {0}")]
    Io(#[from] io::Error),
    #[error("the checkpoint stream: {0}")]
    Bad(String),
}

fn bad<T>(why: impl Into<String>) -> Result<T, StreamError> {
    Err(StreamError::Bad(why.into()))
}

mod kind {
    pub const OPENED: u8 = 1;
    pub const IDLE: u8 = 2;
    pub const BUSY: u8 = 3;
    pub const CLOSED: u8 = 4;
    pub const BEAT: u8 = 5;
    pub const BYE: u8 = 6;
}

fn put_addr(out: &mut Vec<u8>, a: SocketAddr) {
    let v6 = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&v6.octets());
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> SocketAddr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[..16]);
    let v6 = Ipv6Addr::from(o);
    let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    SocketAddr::new(ip, u16::from_be_bytes([b[16], b[17]]))
}

fn put_flow(out: &mut Vec<u8>, f: &Flow) {
    put_addr(out, f.local);
    put_addr(out, f.peer);
}

fn get_flow(b: &[u8]) -> Result<Flow, StreamError> {
    if b.len() < FLOW_LEN {
        return bad("a frame too short for its flow");
    }
    Ok(Flow {
        local: get_addr(&b[..18]),
        peer: get_addr(&b[18..36]),
    })
}

fn get_epoch(b: &[u8]) -> Result<u64, StreamError> {
    let e: [u8; 8] = b
        .get(FLOW_LEN..FLOW_LEN + 8)
        .and_then(|s| s.try_into().ok())
        .map_or_else(|| bad("a frame too short for its epoch"), Ok)?;
    Ok(u64::from_be_bytes(e))
}

impl Frame {
    /// Appends the frame's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 5]);
        let k = match self {
            Frame::Opened(f) => {
                put_flow(out, f);
                kind::OPENED
            }
            Frame::Idle {
                flow,
                epoch,
                record,
            } => {
                put_flow(out, flow);
                out.extend_from_slice(&epoch.to_be_bytes());
                out.extend_from_slice(record);
                kind::IDLE
            }
            Frame::Busy { flow, epoch } => {
                put_flow(out, flow);
                out.extend_from_slice(&epoch.to_be_bytes());
                kind::BUSY
            }
            Frame::Closed(f) => {
                put_flow(out, f);
                kind::CLOSED
            }
            Frame::Beat => kind::BEAT,
            Frame::Bye => kind::BYE,
        };
        let len = (out.len() - start - 5) as u32;
        out[start] = k;
        out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
    }

    /// Decodes one frame of kind `k` from its payload.
    pub fn decode(k: u8, p: &[u8]) -> Result<Frame, StreamError> {
        let exact = |n: usize| {
            if p.len() == n {
                Ok(())
            } else {
                bad(format!(
                    "a frame of kind {k} with {} bytes, not {n}",
                    p.len()
                ))
            }
        };
        Ok(match k {
            kind::OPENED => {
                exact(FLOW_LEN)?;
                Frame::Opened(get_flow(p)?)
            }
            kind::CLOSED => {
                exact(FLOW_LEN)?;
                Frame::Closed(get_flow(p)?)
            }
            kind::BUSY => {
                exact(FLOW_LEN + 8)?;
                Frame::Busy {
                    flow: get_flow(p)?,
                    epoch: get_epoch(p)?,
                }
            }
            kind::IDLE => {
                if p.len() <= FLOW_LEN + 8 {
                    return bad("an IDLE frame without a record");
                }
                Frame::Idle {
                    flow: get_flow(p)?,
                    epoch: get_epoch(p)?,
                    record: p[FLOW_LEN + 8..].to_vec(),
                }
            }
            kind::BEAT => {
                exact(0)?;
                Frame::Beat
            }
            kind::BYE => {
                exact(0)?;
                Frame::Bye
            }
            _ => return bad(format!("unknown frame kind {k}")),
        })
    }
}

/// Writes the hello: its JSON length (u32) and the JSON.
pub fn write_hello(w: &mut impl Write, h: &Hello) -> Result<(), StreamError> {
    let j = serde_json::to_vec(h).map_err(|e| StreamError::Bad(e.to_string()))?;
    w.write_all(&(j.len() as u32).to_be_bytes())?;
    w.write_all(&j)?;
    Ok(())
}

pub fn read_hello(r: &mut impl Read) -> Result<Hello, StreamError> {
    let mut l = [0u8; 4];
    r.read_exact(&mut l)?;
    let len = u32::from_be_bytes(l) as usize;
    if len > 4096 {
        return bad(format!("a hello of {len} bytes"));
    }
    let mut j = vec![0u8; len];
    r.read_exact(&mut j)?;
    let h: Hello = serde_json::from_slice(&j).map_err(|e| StreamError::Bad(e.to_string()))?;
    if h.magic != MAGIC {
        return bad(format!("not a checkpoint stream ({:?})", h.magic));
    }
    Ok(h)
}

/// Reads the next frame (blocking; the socket's read timeout bounds the wait).
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Frame, StreamError> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > FRAME_MAX {
        return bad(format!("a frame of {len} bytes (at most {FRAME_MAX})"));
    }
    buf.resize(len, 0);
    r.read_exact(buf)?;
    Frame::decode(head[0], buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flow(a: [u8; 4], p: u16, b: [u8; 4], q: u16) -> Flow {
        Flow {
            local: SocketAddr::from((a, p)),
            peer: SocketAddr::from((b, q)),
        }
    }

    #[test]
    fn frames_round_trip() {
        let f = flow([198, 19, 0, 1], 80, [198, 18, 0, 2], 40000);
        let v6 = Flow {
            local: "[2001:db8::1]:443".parse().unwrap(),
            peer: "[2001:db8::2]:5000".parse().unwrap(),
        };
        let frames = vec![
            Frame::Opened(f),
            Frame::Idle {
                flow: v6,
                epoch: 7,
                record: vec![1, 2, 3],
            },
            Frame::Busy { flow: f, epoch: 7 },
            Frame::Closed(v6),
            Frame::Beat,
            Frame::Bye,
        ];
        let mut bytes = Vec::new();
        for fr in &frames {
            fr.encode(&mut bytes);
        }
        let mut r = &bytes[..];
        let mut buf = Vec::new();
        for fr in &frames {
            assert_eq!(&read_frame(&mut r, &mut buf).unwrap(), fr);
        }
        assert!(r.is_empty());
    }

    #[test]
    fn hello_is_checked() {
        let mut b = Vec::new();
        let h = Hello {
            magic: "nope".into(),
            node: "n".into(),
            incarnation: 1,
        };
        write_hello(&mut b, &h).unwrap();
        assert!(read_hello(&mut &b[..]).is_err());
    }

    proptest! {
        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut r = &bytes[..];
            let mut buf = Vec::new();
            for _ in 0..10 {
                if read_frame(&mut r, &mut buf).is_err() { break; }
            }
        }
    }
}
