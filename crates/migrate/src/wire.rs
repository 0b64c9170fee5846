//! The node link's messages and their framing: the one place the link's bytes are defined.
//!
//! A frame is `SPLK` (magic), a kind byte, a big-endian u32 length and that many bytes. Kind
//! [`KIND_MESSAGE`] carries a [`Message`] as JSON (small, rare: lists of flows and verdicts);
//! kind [`KIND_RECORD`] carries one connection record in `splitos_repair`'s checked format;
//! kind [`KIND_DATA`] carries the bytes the sending TCP server had queued for a connection (a
//! response in flight: a large file's remaining range), in frames of at most [`DATA_MAX`],
//! ended by an empty one. They travel outside the record, after the commit: the connection
//! goes live on the new node with what its kernel queue held while they stream, so the
//! cut-over does not grow with the size of a download in flight, and they are read from the
//! file cache straight into the link (never gathered in one buffer).
//! Every length is bounded before anything is allocated: a peer cannot make a node hold more
//! than [`MESSAGE_MAX`] or [`RECORD_MAX`] bytes for one frame.
//!
//! A session is one TCP connection and one conversation:
//!
//! ```text
//! operator -> A: List{limit}                      A -> operator: Flows{flows}
//! operator -> A: Move{to, flows}                  A -> B: Batch{count, unsent}, count x record
//!                                                 B -> A: Restored{ok, failed}
//!                                                 A -> operator: Moved{moved, refused}
//! operator -> A: Commit | Abort                   A -> B: Commit | Abort
//!                                   after Commit: B -> A: Live{n}
//!                                                 A -> operator: Live{n}
//!                                                 A -> B: per restored record, in order:
//!                                                        data..., empty data
//!                                                 B -> A: Done{n}
//!                                                 A -> operator: Done{n}
//! ```
//!
//! Between `Moved` and `Commit` the operator points the switch at B (the flows stay held);
//! after `Live` it releases them.
//! Any side answers a message it cannot accept with `Error{message}` and ends the session.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::SocketAddr;

pub const MAGIC: [u8; 4] = *b"SPLK";
pub const KIND_MESSAGE: u8 = 1;
pub const KIND_RECORD: u8 = 2;
pub const KIND_DATA: u8 = 3;
/// The largest data frame.
pub const DATA_MAX: usize = 4 << 20;
/// The largest control message: a list of 65,536 flows as JSON fits several times.
pub const MESSAGE_MAX: usize = 16 << 20;
/// The largest record: both kernel queues and what the server had received (the queued bytes
/// travel in data frames), with room to spare.
pub const RECORD_MAX: usize = 64 << 20;
/// Connections one `Move` or `Batch` may name.
pub const FLOWS_MAX: usize = 65_536;

/// A connection, named by its two ends (as `splitos_tcp_server::migration::Flow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Flow {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

impl From<splitos_tcp_server::migration::Flow> for Flow {
    fn from(f: splitos_tcp_server::migration::Flow) -> Flow {
        Flow {
            local: f.local,
            peer: f.peer,
        }
    }
}

impl From<Flow> for splitos_tcp_server::migration::Flow {
    fn from(f: Flow) -> splitos_tcp_server::migration::Flow {
        splitos_tcp_server::migration::Flow {
            local: f.local,
            peer: f.peer,
        }
    }
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} <- {}", self.local, self.peer)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Which connections could move now (at most `limit`).
    List {
        limit: usize,
    },
    Flows {
        flows: Vec<Flow>,
    },
    /// Move these connections to the node whose link is at `to`.
    Move {
        to: SocketAddr,
        flows: Vec<Flow>,
    },
    /// Records follow, this many; `unsent[i]` bytes queued for the i-th follow the commit.
    Batch {
        count: usize,
        unsent: Vec<u64>,
    },
    /// The receiving node restored these (in repair mode, silent) and could not restore those.
    Restored {
        ok: Vec<Flow>,
        failed: Vec<(Flow, String)>,
    },
    /// The sending node's verdict for the operator: moved (waiting for `Commit`), and refused
    /// (still in service where they were).
    Moved {
        moved: Vec<Flow>,
        refused: Vec<(Flow, String)>,
    },
    /// The switch sends the moved flows to the new node (still holding their packets): go
    /// live there.
    Commit,
    /// `n` connections are out of repair mode on the new node: the switch may let their
    /// packets through. Their queued bytes and the hand-over to the TCP server follow.
    Live {
        n: usize,
    },
    /// Keep every connection where it was.
    Abort,
    /// `n` connections are live on the new node.
    Done {
        n: usize,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("link I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a Split-OS node link (bad magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("a frame of {len} bytes is over the limit of {max} for its kind")]
    TooLarge { len: usize, max: usize },
    #[error("a malformed message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("the other side said: {0}")]
    Remote(String),
    #[error("{what} names {n} connections; at most {FLOWS_MAX}")]
    TooMany { what: &'static str, n: usize },
}

/// One frame read from a link.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Message(Message),
    Record(Vec<u8>),
    Data(Vec<u8>),
}

pub fn write_message(w: &mut impl Write, m: &Message) -> Result<(), WireError> {
    let body = serde_json::to_vec(m)?;
    write_frame(w, KIND_MESSAGE, &body)
}

pub fn write_record(w: &mut impl Write, record: &[u8]) -> Result<(), WireError> {
    write_frame(w, KIND_RECORD, record)
}

/// One data frame (empty: the end of a record's data).
pub fn write_data(w: &mut impl Write, bytes: &[u8]) -> Result<(), WireError> {
    write_frame(w, KIND_DATA, bytes)
}

fn max_of(kind: u8) -> Option<usize> {
    match kind {
        KIND_MESSAGE => Some(MESSAGE_MAX),
        KIND_RECORD => Some(RECORD_MAX),
        KIND_DATA => Some(DATA_MAX),
        _ => None,
    }
}

fn write_frame(w: &mut impl Write, kind: u8, body: &[u8]) -> Result<(), WireError> {
    let max = max_of(kind).ok_or(WireError::Kind(kind))?;
    if body.len() > max {
        return Err(WireError::TooLarge {
            len: body.len(),
            max,
        });
    }
    let mut head = [0u8; 9];
    head[..4].copy_from_slice(&MAGIC);
    head[4] = kind;
    head[5..].copy_from_slice(&(body.len() as u32).to_be_bytes());
    w.write_all(&head)?;
    w.write_all(body)?;
    if kind == KIND_MESSAGE {
        // A message is a turn in the conversation: the other side waits for it.
        w.flush()?;
    }
    Ok(())
}

pub fn read_frame(r: &mut impl Read) -> Result<Frame, WireError> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head)?;
    let magic = [head[0], head[1], head[2], head[3]];
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    let kind = head[4];
    let len = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) as usize;
    let max = max_of(kind).ok_or(WireError::Kind(kind))?;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    match kind {
        KIND_RECORD => return Ok(Frame::Record(body)),
        KIND_DATA => return Ok(Frame::Data(body)),
        _ => {}
    }
    let m: Message = serde_json::from_slice(&body)?;
    match &m {
        Message::Flows { flows } | Message::Move { flows, .. } if flows.len() > FLOWS_MAX => {
            return Err(WireError::TooMany {
                what: "a message",
                n: flows.len(),
            })
        }
        Message::Batch { count, .. } if *count > FLOWS_MAX => {
            return Err(WireError::TooMany {
                what: "a batch",
                n: *count,
            })
        }
        Message::Error { message } => return Err(WireError::Remote(message.clone())),
        _ => {}
    }
    Ok(Frame::Message(m))
}

/// The next frame, which must be a message.
pub fn read_message(r: &mut impl Read) -> Result<Message, WireError> {
    match read_frame(r)? {
        Frame::Message(m) => Ok(m),
        Frame::Record(_) | Frame::Data(_) => Err(WireError::Unexpected {
            expected: "a message",
            got: "a record".into(),
        }),
    }
}

/// What a message is, for errors.
pub fn name(m: &Message) -> String {
    let s = format!("{m:?}");
    s.split([' ', '{', '(']).next().unwrap_or("?").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flow(i: u16) -> Flow {
        Flow {
            local: "198.19.0.1:80".parse().unwrap(),
            peer: SocketAddr::new("198.18.0.2".parse().unwrap(), 40000 + i),
        }
    }

    #[test]
    fn messages_and_records_round_trip() {
        let mut buf = Vec::new();
        let m = Message::Moved {
            moved: vec![flow(1)],
            refused: vec![(flow(2), "closing".into())],
        };
        write_message(&mut buf, &m).unwrap();
        write_record(&mut buf, b"record").unwrap();
        write_data(&mut buf, b"data").unwrap();
        write_data(&mut buf, b"").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap(), Frame::Message(m));
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Frame::Record(b"record".to_vec())
        );
        assert_eq!(read_frame(&mut r).unwrap(), Frame::Data(b"data".to_vec()));
        assert_eq!(read_frame(&mut r).unwrap(), Frame::Data(vec![]));
        assert!(matches!(read_frame(&mut r), Err(WireError::Io(_))));
    }

    #[test]
    fn hostile_frames_are_refused_before_allocation() {
        let mut huge = MAGIC.to_vec();
        huge.push(KIND_RECORD);
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(WireError::TooLarge { .. })
        ));
        let mut bad = b"HTTP".to_vec();
        bad.extend_from_slice(&[1, 0, 0, 0, 0]);
        assert!(matches!(
            read_frame(&mut &bad[..]),
            Err(WireError::Magic(_))
        ));
        let mut kind = MAGIC.to_vec();
        kind.extend_from_slice(&[9, 0, 0, 0, 0]);
        assert!(matches!(
            read_frame(&mut &kind[..]),
            Err(WireError::Kind(9))
        ));
        let mut buf = Vec::new();
        write_message(
            &mut buf,
            &Message::Batch {
                count: FLOWS_MAX + 1,
                unsent: vec![],
            },
        )
        .unwrap();
        assert!(matches!(
            read_frame(&mut &buf[..]),
            Err(WireError::TooMany { .. })
        ));
        let mut buf = Vec::new();
        write_message(
            &mut buf,
            &Message::Error {
                message: "no".into(),
            },
        )
        .unwrap();
        assert!(matches!(read_frame(&mut &buf[..]), Err(WireError::Remote(m)) if m == "no"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = read_frame(&mut &bytes[..]);
            let mut framed = MAGIC.to_vec();
            framed.push(KIND_MESSAGE);
            framed.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            framed.extend_from_slice(&bytes);
            let _ = read_frame(&mut &framed[..]);
        }
    }
}
