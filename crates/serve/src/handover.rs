//! The hand-over link of `splitos upgrade`: the one place its records are defined, written and
//! checked.
//!
//! An old `splitos serve` starts the new binary with `--upgrade-from PATH`, a Unix
//! `SOCK_SEQPACKET` socket in its private runtime directory (mode 0700, the socket 0600); the
//! new process connects and each side checks the other with `SO_PEERCRED` (same user; the old
//! one also that it is the process it started). Every record is one packet:
//!
//! ```text
//! 0       4        5      6          8                16
//! | SPUP  | version| kind | reserved | argument (u64 LE) | payload (at most MAX_PAYLOAD) |
//! ```
//!
//! | kind | way | argument | payload | descriptors |
//! |---|---|---|---|---|
//! | `HELLO` | new → old | its pid | — | — |
//! | `LISTENERS` | old → new | count | — | that many listening sockets |
//! | `READY` | new → old | — | — | — (its application listens: from here the old one hands on) |
//! | `FAILED` | new → old | — | why, UTF-8 | — |
//! | `CONN` | old → new | sequence number | unsent bytes (u64), held bytes (u64), eof (u8) | the connection |
//! | `DATA` | old → new | — | the next bytes of the connection before it: unsent, then held | — |
//! | `ACK` | new → old | sequence number | empty, or why it was not taken (UTF-8) | — |
//! | `DONE` | old → new | connections sent | — | — |
//!
//! Anything else — another magic or version, an unknown kind, a packet that was truncated,
//! lengths over the limits, descriptors where none belong or the wrong number of them — is a
//! [`WireError`]; descriptors that came with a bad record are closed with it.

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

pub const MAGIC: [u8; 4] = *b"SPUP";
pub const VERSION: u8 = 1;
/// Bytes before the payload.
pub const HEADER: usize = 16;
/// Most payload bytes in one record.
pub const MAX_PAYLOAD: usize = 32 << 10;
/// Most listening sockets in one `LISTENERS` record.
pub const MAX_LISTENERS: usize = 16;
/// Most bytes queued for the client a connection may bring (what a migration carries).
pub const MAX_UNSENT: u64 = splitos_tcp_server::migration::QUEUE_MAX as u64;
/// Most received and unanswered bytes a connection may bring (the TCP server holds at most
/// 1 MiB for a paused connection, plus 64 KiB its application had not answered).
pub const MAX_HELD: u64 = 4 << 20;

pub mod kind {
    pub const HELLO: u8 = 1;
    pub const LISTENERS: u8 = 2;
    pub const READY: u8 = 3;
    pub const FAILED: u8 = 4;
    pub const CONN: u8 = 5;
    pub const DATA: u8 = 6;
    pub const ACK: u8 = 7;
    pub const DONE: u8 = 8;
}

/// One record, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    Hello {
        pid: u32,
    },
    Listeners {
        count: u32,
    },
    Ready,
    Failed(String),
    Conn {
        seq: u64,
        unsent: u64,
        held: u64,
        eof: bool,
    },
    Data(Vec<u8>),
    Ack {
        seq: u64,
        error: Option<String>,
    },
    Done {
        count: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the other process closed the hand-over link")]
    Closed,
    #[error("nothing on the hand-over link for {0:?}")]
    Timeout(Duration),
    #[error("the hand-over link: {0}")]
    Io(#[from] std::io::Error),
    #[error("a bad hand-over record: {0}")]
    Bad(String),
}

fn bad(s: impl Into<String>) -> WireError {
    WireError::Bad(s.into())
}

impl Msg {
    /// The descriptors a record of this kind carries.
    pub fn fds(&self) -> usize {
        match self {
            Msg::Listeners { count } => *count as usize,
            Msg::Conn { .. } => 1,
            _ => 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let (k, arg, payload): (u8, u64, Vec<u8>) = match self {
            Msg::Hello { pid } => (kind::HELLO, u64::from(*pid), Vec::new()),
            Msg::Listeners { count } => (kind::LISTENERS, u64::from(*count), Vec::new()),
            Msg::Ready => (kind::READY, 0, Vec::new()),
            Msg::Failed(why) => (kind::FAILED, 0, text(why)),
            Msg::Conn {
                seq,
                unsent,
                held,
                eof,
            } => {
                let mut p = Vec::with_capacity(17);
                p.extend_from_slice(&unsent.to_le_bytes());
                p.extend_from_slice(&held.to_le_bytes());
                p.push(u8::from(*eof));
                (kind::CONN, *seq, p)
            }
            Msg::Data(b) => (kind::DATA, 0, b.clone()),
            Msg::Ack { seq, error } => (kind::ACK, *seq, error.as_deref().map_or(Vec::new(), text)),
            Msg::Done { count } => (kind::DONE, *count, Vec::new()),
        };
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(k);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&arg.to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Parses one whole record.
    pub fn decode(b: &[u8]) -> Result<Msg, WireError> {
        if b.len() < HEADER {
            return Err(bad(format!("{} bytes, shorter than a header", b.len())));
        }
        if b[..4] != MAGIC {
            return Err(bad("not a hand-over record (magic)"));
        }
        if b[4] != VERSION {
            return Err(bad(format!(
                "version {} (this binary speaks {VERSION})",
                b[4]
            )));
        }
        if b[6..8] != [0, 0] {
            return Err(bad("reserved bytes are not zero"));
        }
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[8..16]);
        let arg = u64::from_le_bytes(a);
        let p = &b[HEADER..];
        if p.len() > MAX_PAYLOAD {
            return Err(bad(format!("a payload of {} bytes", p.len())));
        }
        let empty = |m: Msg| {
            if p.is_empty() {
                Ok(m)
            } else {
                Err(bad(format!("{} payload bytes where none belong", p.len())))
            }
        };
        let small = |what: &str| -> Result<u32, WireError> {
            u32::try_from(arg).map_err(|_| bad(format!("{what} {arg}")))
        };
        match b[5] {
            kind::HELLO => empty(Msg::Hello { pid: small("pid")? }),
            kind::LISTENERS => {
                let count = small("listener count")?;
                if count == 0 || count as usize > MAX_LISTENERS {
                    return Err(bad(format!("{count} listeners")));
                }
                empty(Msg::Listeners { count })
            }
            kind::READY => empty(Msg::Ready),
            kind::FAILED => Ok(Msg::Failed(from_text(p)?)),
            kind::CONN => {
                if p.len() != 17 {
                    return Err(bad(format!("a connection record of {} bytes", p.len())));
                }
                let mut u = [0u8; 8];
                u.copy_from_slice(&p[..8]);
                let mut h = [0u8; 8];
                h.copy_from_slice(&p[8..16]);
                let (unsent, held) = (u64::from_le_bytes(u), u64::from_le_bytes(h));
                if unsent > MAX_UNSENT || held > MAX_HELD {
                    return Err(bad(format!(
                        "a connection with {unsent} unsent and {held} held bytes"
                    )));
                }
                let eof = match p[16] {
                    0 => false,
                    1 => true,
                    x => return Err(bad(format!("eof flag {x}"))),
                };
                Ok(Msg::Conn {
                    seq: arg,
                    unsent,
                    held,
                    eof,
                })
            }
            kind::DATA => {
                if p.is_empty() || arg != 0 {
                    return Err(bad("an empty data record"));
                }
                Ok(Msg::Data(p.to_vec()))
            }
            kind::ACK => Ok(Msg::Ack {
                seq: arg,
                error: (!p.is_empty()).then(|| from_text(p)).transpose()?,
            }),
            kind::DONE => empty(Msg::Done { count: arg }),
            k => Err(bad(format!("unknown kind {k}"))),
        }
    }
}

/// A message as a payload: cut to fit, on a character boundary.
fn text(s: &str) -> Vec<u8> {
    let mut end = s.len().min(MAX_PAYLOAD);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.as_bytes()[..end].to_vec()
}

fn from_text(p: &[u8]) -> Result<String, WireError> {
    String::from_utf8(p.to_vec()).map_err(|_| bad("text that is not UTF-8"))
}

/// One end of the hand-over link.
pub struct Link {
    fd: OwnedFd,
}

impl Link {
    pub fn new(fd: OwnedFd) -> Link {
        Link { fd }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Sends one record with its descriptors (as many as [`Msg::fds`] says).
    pub fn send(&self, m: &Msg, fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
        if fds.len() != m.fds() {
            return Err(bad(format!(
                "{} descriptors for a record that carries {}",
                fds.len(),
                m.fds()
            )));
        }
        let bytes = m.encode();
        let mut space =
            [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_LISTENERS))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !anc.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(bad("too many descriptors for one record"));
        }
        let n = loop {
            match sendmsg(
                &self.fd,
                &[IoSlice::new(&bytes)],
                &mut anc,
                SendFlags::NOSIGNAL,
            ) {
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET) => {
                    return Err(WireError::Closed)
                }
                r => break r.map_err(std::io::Error::from)?,
            }
        };
        if n != bytes.len() {
            return Err(bad("a record was cut short on sending"));
        }
        Ok(())
    }

    /// Waits up to `limit` for one record and its descriptors.
    pub fn recv(&self, limit: Duration) -> Result<(Msg, Vec<OwnedFd>), WireError> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ts = rustix::time::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let mut p = [rustix::event::PollFd::new(
                &self.fd,
                rustix::event::PollFlags::IN,
            )];
            match rustix::event::poll(&mut p, Some(&ts)) {
                Ok(0) if left.is_zero() => return Err(WireError::Timeout(limit)),
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => break,
                Err(e) => return Err(WireError::Io(e.into())),
            }
        }
        let mut buf = vec![0u8; HEADER + MAX_PAYLOAD + 1];
        let mut space =
            [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_LISTENERS))];
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        let msg = loop {
            match recvmsg(
                &self.fd,
                &mut [IoSliceMut::new(&mut buf)],
                &mut anc,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::CONNRESET) => return Err(WireError::Closed),
                r => break r.map_err(std::io::Error::from)?,
            }
        };
        // Taken before anything is judged, so that they are closed whatever happens.
        let mut fds = Vec::new();
        for m in anc.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = m {
                fds.extend(rights);
            }
        }
        if msg.bytes == 0 && fds.is_empty() {
            return Err(WireError::Closed);
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) {
            return Err(bad("more descriptors than any record carries"));
        }
        if msg.flags.contains(ReturnFlags::TRUNC) || msg.bytes > HEADER + MAX_PAYLOAD {
            return Err(bad("a record longer than the largest one"));
        }
        let m = Msg::decode(&buf[..msg.bytes])?;
        if fds.len() != m.fds() {
            return Err(bad(format!(
                "{} descriptors with a record that carries {}",
                fds.len(),
                m.fds()
            )));
        }
        Ok((m, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};

    fn pair() -> (Link, Link) {
        let (a, b) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        (Link::new(a), Link::new(b))
    }

    fn all() -> Vec<Msg> {
        vec![
            Msg::Hello { pid: 42 },
            Msg::Listeners { count: 2 },
            Msg::Ready,
            Msg::Failed("the new binary could not bind: ä".into()),
            Msg::Conn {
                seq: 7,
                unsent: 100,
                held: 3,
                eof: true,
            },
            Msg::Data(vec![1, 2, 3]),
            Msg::Ack {
                seq: 7,
                error: None,
            },
            Msg::Ack {
                seq: 8,
                error: Some("over budget".into()),
            },
            Msg::Done { count: 9 },
        ]
    }

    #[test]
    fn records_round_trip_and_the_header_is_pinned() {
        for m in all() {
            assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
        }
        let golden = Msg::Conn {
            seq: 0x0102,
            unsent: 5,
            held: 6,
            eof: false,
        }
        .encode();
        assert_eq!(&golden[..16], b"SPUP\x01\x05\0\0\x02\x01\0\0\0\0\0\0");
        assert_eq!(golden.len(), 16 + 17);
    }

    #[test]
    fn every_truncation_and_bad_field_is_refused() {
        // Records of a fixed size: cut short, never taken for another one. (Text and data
        // records end where their packet ends; a packet longer than the buffer is caught by
        // `MSG_TRUNC` in `Link::recv`, tested below.)
        let fixed = all()
            .into_iter()
            .filter(|m| !matches!(m, Msg::Failed(_) | Msg::Data(_) | Msg::Ack { .. }));
        for m in fixed {
            let b = m.encode();
            for cut in 0..b.len() {
                if let Ok(x) = Msg::decode(&b[..cut]) {
                    panic!("{m:?} cut at {cut} decoded as {x:?}");
                }
            }
        }
        let ok = Msg::Ready.encode();
        let mut b = ok.clone();
        b[0] = b'X';
        assert!(Msg::decode(&b).is_err(), "magic");
        let mut b = ok.clone();
        b[4] = 2;
        assert!(Msg::decode(&b).is_err(), "version");
        let mut b = ok.clone();
        b[5] = 99;
        assert!(Msg::decode(&b).is_err(), "kind");
        let mut b = ok.clone();
        b[7] = 1;
        assert!(Msg::decode(&b).is_err(), "reserved");
        let mut b = ok;
        b.push(0);
        assert!(Msg::decode(&b).is_err(), "payload where none belongs");
        let big = Msg::Conn {
            seq: 1,
            unsent: MAX_UNSENT + 1,
            held: 0,
            eof: false,
        };
        assert!(Msg::decode(&big.encode()).is_err(), "too much unsent");
        let mut b = Msg::Conn {
            seq: 1,
            unsent: 0,
            held: 0,
            eof: false,
        }
        .encode();
        b[HEADER + 16] = 2;
        assert!(Msg::decode(&b).is_err(), "eof flag");
        assert!(Msg::decode(&Msg::Listeners { count: 0 }.encode()).is_err());
        assert!(Msg::decode(&Msg::Hello { pid: 1 }.encode()[..]).is_ok());
        let mut b = Msg::Hello { pid: 1 }.encode();
        b[12] = 1; // a pid over u32
        assert!(Msg::decode(&b).is_err(), "pid");
        let mut b = Msg::Failed(String::new()).encode();
        b.extend_from_slice(&[0xff, 0xfe]);
        assert!(Msg::decode(&b).is_err(), "not UTF-8");
    }

    #[test]
    fn descriptors_travel_and_wrong_counts_are_refused() {
        let (a, b) = pair();
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd: OwnedFd = f.into();
        a.send(
            &Msg::Conn {
                seq: 1,
                unsent: 0,
                held: 0,
                eof: false,
            },
            &[fd.as_fd()],
        )
        .unwrap();
        let (m, fds) = b.recv(Duration::from_secs(5)).unwrap();
        assert!(matches!(m, Msg::Conn { seq: 1, .. }));
        assert_eq!(fds.len(), 1);
        // A sender cannot attach descriptors a record does not carry...
        assert!(a.send(&Msg::Ready, &[fd.as_fd()]).is_err());
        // ...and a receiver refuses them (here forced past `send`'s check).
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        let fds = [fd.as_fd()];
        assert!(anc.push(SendAncillaryMessage::ScmRights(&fds)));
        let ready = Msg::Ready.encode();
        sendmsg(
            a.fd(),
            &[IoSlice::new(&ready)],
            &mut anc,
            SendFlags::empty(),
        )
        .unwrap();
        let e = b.recv(Duration::from_secs(5)).err();
        assert!(matches!(e, Some(WireError::Bad(_))), "{e:?}");
        // Junk, an oversized packet, silence and a closed peer are told apart.
        rustix::net::send(a.fd(), b"junk", SendFlags::empty()).unwrap();
        assert!(matches!(
            b.recv(Duration::from_secs(5)),
            Err(WireError::Bad(_))
        ));
        let huge = vec![0u8; HEADER + MAX_PAYLOAD + 100];
        rustix::net::send(a.fd(), &huge, SendFlags::empty()).unwrap();
        assert!(matches!(
            b.recv(Duration::from_secs(5)),
            Err(WireError::Bad(_))
        ));
        assert!(matches!(
            b.recv(Duration::from_millis(50)),
            Err(WireError::Timeout(_))
        ));
        drop(a);
        assert!(matches!(
            b.recv(Duration::from_secs(5)),
            Err(WireError::Closed)
        ));
    }
}
