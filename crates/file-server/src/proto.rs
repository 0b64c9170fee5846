//! Messages between readers and the file server over an m2m channel: the whole contract of
//! that conversation, in one file. Fixed little-endian, laid out in `mod field` (sizes derived
//! from the field widths); decoding checks every length and code and says what was wrong
//! ([`ProtoError`]). There is no version field (the directory they share has its own): a layout
//! change must change a message's length or op code, so that a peer of another build fails to
//! decode it instead of misreading it.
//!
//! A session starts with the server sending the directory region (descriptor message tagged
//! [`DIRECTORY_TAG`]). A reader that misses in the directory sends `Lookup`; the server answers
//! with what the file is, without loading more than a response could need:
//!
//! - `Opened`: a file of one chunk (most files), whose segment it has loaded;
//! - `Info`: a file of several chunks, described but not loaded; the reader asks for each
//!   chunk it needs with `Open`, which is answered with `Opened` too;
//! - `OpenedFile`: a file above the server's by-reference threshold, which it never copies: it
//!   sends a read-only descriptor of the file itself (opened beneath the root), which the
//!   reader reads with `pread` and the TCP server sends with `sendfile`;
//! - `Failed`.
//!
//! `Opened` and `OpenedFile` follow a descriptor message tagged with their `id`, so the
//! descriptor is always there when the reply is read. Every reply names its request (`req`): a
//! reader that gave up waiting recognises, and discards, late replies (and their descriptors).
//! `Open` of a file that has become large may be answered with `OpenedFile` too.

use core::ops::Range;

/// The tag of the descriptor message that carries the directory region.
pub const DIRECTORY_TAG: u64 = u64::MAX;

/// Declares a `#[repr(u8)]` enum and its decoding from one list, so each code is written once
/// (the style of smoltcp's `enum_with_unknown!`, without the `Unknown` variant: an unknown code
/// is a decoding error here).
macro_rules! u8_codes {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $code:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant = $code, )+
        }

        impl $name {
            /// The value with code `v`, if there is one.
            $vis fn from_u8(v: u8) -> Option<$name> {
                match v {
                    $( $code => Some($name::$variant), )+
                    _ => None,
                }
            }
        }
    };
}

u8_codes! {
    /// The first byte of every message.
    enum Op {
        Open = 1,
        Lookup = 2,
        Opened = 64,
        Failed = 65,
        Info = 66,
        OpenedFile = 67,
    }
}

u8_codes! {
    /// Why the server could not open a file.
    pub enum FailCode {
        NotFound = 1,
        Escapes = 2,
        Directory = 3,
        Special = 4,
        Denied = 5,
        BadPath = 6,
        Io = 7,
        BadRequest = 8,
        /// The file kept changing while the server copied it.
        Unstable = 9,
    }
}

/// Where each field lies, in bytes. Each field starts where the previous one ends, so the
/// message sizes below are derived from the field widths, not counted by hand.
mod field {
    use super::Range;

    /// The field of `len` bytes right after `prev`.
    const fn next(prev: Range<usize>, len: usize) -> Range<usize> {
        prev.end..prev.end + len
    }

    /// Op code, u8: the same position in every message.
    pub const OP: Range<usize> = 0..1;

    /// `Open`: op | req u32 | chunk u32 | path (UTF-8, the rest of the message).
    pub mod open {
        use super::{next, Range, OP};
        pub const REQ: Range<usize> = next(OP, 4);
        pub const CHUNK: Range<usize> = next(REQ, 4);
        pub const PATH: usize = CHUNK.end;
    }

    /// `Lookup`: op | req u32 | path (UTF-8, the rest of the message).
    pub mod lookup {
        use super::{next, Range, OP};
        pub const REQ: Range<usize> = next(OP, 4);
        pub const PATH: usize = REQ.end;
    }

    /// `Opened`: op | req u32 | chunk u32 | id u64 | chunk_len u64 | chunk_size u64 |
    /// file_size u64 | mtime_ns i64 | ino u64.
    pub mod opened {
        use super::{next, Range, OP};
        pub const REQ: Range<usize> = next(OP, 4);
        pub const CHUNK: Range<usize> = next(REQ, 4);
        pub const ID: Range<usize> = next(CHUNK, 8);
        pub const CHUNK_LEN: Range<usize> = next(ID, 8);
        pub const CHUNK_SIZE: Range<usize> = next(CHUNK_LEN, 8);
        pub const FILE_SIZE: Range<usize> = next(CHUNK_SIZE, 8);
        pub const MTIME: Range<usize> = next(FILE_SIZE, 8);
        pub const INO: Range<usize> = next(MTIME, 8);
        pub const BYTES: usize = INO.end;
    }

    /// `Info`: op | req u32 | chunk_size u64 | file_size u64 | mtime_ns i64 | ino u64.
    pub mod info {
        use super::{next, Range, OP};
        pub const REQ: Range<usize> = next(OP, 4);
        pub const CHUNK_SIZE: Range<usize> = next(REQ, 8);
        pub const FILE_SIZE: Range<usize> = next(CHUNK_SIZE, 8);
        pub const MTIME: Range<usize> = next(FILE_SIZE, 8);
        pub const INO: Range<usize> = next(MTIME, 8);
        pub const BYTES: usize = INO.end;
    }

    /// `OpenedFile`: op | req u32 | id u64 | file_size u64 | mtime_ns i64 | ino u64.
    pub mod opened_file {
        use super::{next, Range, OP};
        pub const REQ: Range<usize> = next(OP, 4);
        pub const ID: Range<usize> = next(REQ, 8);
        pub const FILE_SIZE: Range<usize> = next(ID, 8);
        pub const MTIME: Range<usize> = next(FILE_SIZE, 8);
        pub const INO: Range<usize> = next(MTIME, 8);
        pub const BYTES: usize = INO.end;
    }

    /// `Failed`: op | req u32 | code u8.
    pub mod failed {
        use super::{next, Range, OP};
        pub const REQ: Range<usize> = next(OP, 4);
        pub const CODE: Range<usize> = next(REQ, 1);
        pub const BYTES: usize = CODE.end;
    }
}

// The format in numbers: changing one changes bytes on the wire between builds.
const _: () = {
    assert!(field::open::PATH == 9);
    assert!(field::lookup::PATH == 5);
    assert!(field::opened::BYTES == 57);
    assert!(field::failed::BYTES == 6);
    assert!(field::info::BYTES == 37);
    assert!(field::opened_file::BYTES == 37);
};

/// Why bytes are not a message of this protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("empty message")]
    Empty,
    #[error("unknown operation {0}")]
    UnknownOp(u8),
    #[error("operation {0} is not valid here")]
    WrongOp(u8),
    #[error("{what} of {len} bytes is shorter than its {need}-byte header")]
    Short {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("{what} of {len} bytes, expected {want}")]
    Length {
        what: &'static str,
        len: usize,
        want: usize,
    },
    #[error("the path is not UTF-8")]
    PathNotUtf8,
    #[error("unknown failure code {0}")]
    UnknownFailCode(u8),
}

/// Decodes the op byte.
fn op(b: &[u8]) -> Result<Op, ProtoError> {
    let first = *b.first().ok_or(ProtoError::Empty)?;
    Op::from_u8(first).ok_or(ProtoError::UnknownOp(first))
}

// Fixed-width little-endian fields. Callers check the message length first, so `b[at]` is in
// bounds; the ranges come from `field`, whose widths match the types.
fn u32_at(b: &[u8], at: Range<usize>) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at]);
    u32::from_le_bytes(w)
}
fn u64_at(b: &[u8], at: Range<usize>) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at]);
    u64::from_le_bytes(w)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open<'a> {
    pub req: u32,
    pub chunk: u32,
    pub path: &'a str,
}

impl Open<'_> {
    /// Bytes before the path.
    pub const HEADER: usize = field::open::PATH;

    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut h = [0u8; Self::HEADER];
        h[field::OP.start] = Op::Open as u8;
        h[field::open::REQ].copy_from_slice(&self.req.to_le_bytes());
        h[field::open::CHUNK].copy_from_slice(&self.chunk.to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(self.path.as_bytes());
    }

    pub fn decode(b: &[u8]) -> Result<Open<'_>, ProtoError> {
        match op(b)? {
            Op::Open => {}
            other => return Err(ProtoError::WrongOp(other as u8)),
        }
        if b.len() < Self::HEADER {
            return Err(ProtoError::Short {
                what: "Open",
                len: b.len(),
                need: Self::HEADER,
            });
        }
        Ok(Open {
            req: u32_at(b, field::open::REQ),
            chunk: u32_at(b, field::open::CHUNK),
            path: std::str::from_utf8(&b[field::open::PATH..])
                .map_err(|_| ProtoError::PathNotUtf8)?,
        })
    }
}

/// "What is this file?": the first question about a path the directory does not answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup<'a> {
    pub req: u32,
    pub path: &'a str,
}

impl Lookup<'_> {
    /// Bytes before the path.
    pub const HEADER: usize = field::lookup::PATH;

    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut h = [0u8; Self::HEADER];
        h[field::OP.start] = Op::Lookup as u8;
        h[field::lookup::REQ].copy_from_slice(&self.req.to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(self.path.as_bytes());
    }
}

/// A request, as the server decodes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Open(Open<'a>),
    Lookup(Lookup<'a>),
}

impl Request<'_> {
    pub fn decode(b: &[u8]) -> Result<Request<'_>, ProtoError> {
        match op(b)? {
            Op::Open => Open::decode(b).map(Request::Open),
            Op::Lookup => {
                if b.len() < Lookup::HEADER {
                    return Err(ProtoError::Short {
                        what: "Lookup",
                        len: b.len(),
                        need: Lookup::HEADER,
                    });
                }
                Ok(Request::Lookup(Lookup {
                    req: u32_at(b, field::lookup::REQ),
                    path: std::str::from_utf8(&b[field::lookup::PATH..])
                        .map_err(|_| ProtoError::PathNotUtf8)?,
                }))
            }
            other => Err(ProtoError::WrongOp(other as u8)),
        }
    }

    /// The request id (to answer a request that is otherwise refused).
    pub fn req(&self) -> u32 {
        match self {
            Request::Open(o) => o.req,
            Request::Lookup(l) => l.req,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Opened {
        req: u32,
        id: u64,
        chunk: u32,
        chunk_len: u64,
        chunk_size: u64,
        file_size: u64,
        mtime_ns: i64,
        ino: u64,
    },
    Failed {
        req: u32,
        code: FailCode,
    },
    /// A file of several chunks, not loaded: the reader asks for the chunks it needs.
    Info {
        req: u32,
        chunk_size: u64,
        file_size: u64,
        mtime_ns: i64,
        ino: u64,
    },
    /// A file passed by reference: the descriptor message tagged `id` carries it.
    OpenedFile {
        req: u32,
        id: u64,
        file_size: u64,
        mtime_ns: i64,
        ino: u64,
    },
}

impl Reply {
    /// Bytes of an `Opened` reply.
    pub const OPENED_BYTES: usize = field::opened::BYTES;
    /// Bytes of a `Failed` reply.
    pub const FAILED_BYTES: usize = field::failed::BYTES;
    /// Bytes of an `Info` reply.
    pub const INFO_BYTES: usize = field::info::BYTES;
    /// Bytes of an `OpenedFile` reply.
    pub const OPENED_FILE_BYTES: usize = field::opened_file::BYTES;

    /// The request this answers.
    pub fn req(&self) -> u32 {
        match *self {
            Reply::Opened { req, .. }
            | Reply::Failed { req, .. }
            | Reply::Info { req, .. }
            | Reply::OpenedFile { req, .. } => req,
        }
    }

    /// The tag of the descriptor message sent just before this reply, if it has one.
    pub fn descriptor(&self) -> Option<u64> {
        match *self {
            Reply::Opened { id, .. } | Reply::OpenedFile { id, .. } => Some(id),
            Reply::Failed { .. } | Reply::Info { .. } => None,
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Reply::Opened {
                req,
                id,
                chunk,
                chunk_len,
                chunk_size,
                file_size,
                mtime_ns,
                ino,
            } => {
                use field::opened as f;
                let mut b = [0u8; Self::OPENED_BYTES];
                b[field::OP.start] = Op::Opened as u8;
                b[f::REQ].copy_from_slice(&req.to_le_bytes());
                b[f::CHUNK].copy_from_slice(&chunk.to_le_bytes());
                b[f::ID].copy_from_slice(&id.to_le_bytes());
                b[f::CHUNK_LEN].copy_from_slice(&chunk_len.to_le_bytes());
                b[f::CHUNK_SIZE].copy_from_slice(&chunk_size.to_le_bytes());
                b[f::FILE_SIZE].copy_from_slice(&file_size.to_le_bytes());
                b[f::MTIME].copy_from_slice(&mtime_ns.to_le_bytes());
                b[f::INO].copy_from_slice(&ino.to_le_bytes());
                out.extend_from_slice(&b);
            }
            Reply::Failed { req, code } => {
                use field::failed as f;
                let mut b = [0u8; Self::FAILED_BYTES];
                b[field::OP.start] = Op::Failed as u8;
                b[f::REQ].copy_from_slice(&req.to_le_bytes());
                b[f::CODE.start] = code as u8;
                out.extend_from_slice(&b);
            }
            Reply::Info {
                req,
                chunk_size,
                file_size,
                mtime_ns,
                ino,
            } => {
                use field::info as f;
                let mut b = [0u8; Self::INFO_BYTES];
                b[field::OP.start] = Op::Info as u8;
                b[f::REQ].copy_from_slice(&req.to_le_bytes());
                b[f::CHUNK_SIZE].copy_from_slice(&chunk_size.to_le_bytes());
                b[f::FILE_SIZE].copy_from_slice(&file_size.to_le_bytes());
                b[f::MTIME].copy_from_slice(&mtime_ns.to_le_bytes());
                b[f::INO].copy_from_slice(&ino.to_le_bytes());
                out.extend_from_slice(&b);
            }
            Reply::OpenedFile {
                req,
                id,
                file_size,
                mtime_ns,
                ino,
            } => {
                use field::opened_file as f;
                let mut b = [0u8; Self::OPENED_FILE_BYTES];
                b[field::OP.start] = Op::OpenedFile as u8;
                b[f::REQ].copy_from_slice(&req.to_le_bytes());
                b[f::ID].copy_from_slice(&id.to_le_bytes());
                b[f::FILE_SIZE].copy_from_slice(&file_size.to_le_bytes());
                b[f::MTIME].copy_from_slice(&mtime_ns.to_le_bytes());
                b[f::INO].copy_from_slice(&ino.to_le_bytes());
                out.extend_from_slice(&b);
            }
        }
    }

    pub fn decode(b: &[u8]) -> Result<Reply, ProtoError> {
        let exact = |what, want| {
            if b.len() == want {
                Ok(())
            } else {
                Err(ProtoError::Length {
                    what,
                    len: b.len(),
                    want,
                })
            }
        };
        match op(b)? {
            Op::Opened => {
                use field::opened as f;
                exact("Opened", Self::OPENED_BYTES)?;
                Ok(Reply::Opened {
                    req: u32_at(b, f::REQ),
                    chunk: u32_at(b, f::CHUNK),
                    id: u64_at(b, f::ID),
                    chunk_len: u64_at(b, f::CHUNK_LEN),
                    chunk_size: u64_at(b, f::CHUNK_SIZE),
                    file_size: u64_at(b, f::FILE_SIZE),
                    mtime_ns: u64_at(b, f::MTIME) as i64,
                    ino: u64_at(b, f::INO),
                })
            }
            Op::Failed => {
                use field::failed as f;
                exact("Failed", Self::FAILED_BYTES)?;
                let code = b[f::CODE.start];
                Ok(Reply::Failed {
                    req: u32_at(b, f::REQ),
                    code: FailCode::from_u8(code).ok_or(ProtoError::UnknownFailCode(code))?,
                })
            }
            Op::Info => {
                use field::info as f;
                exact("Info", Self::INFO_BYTES)?;
                Ok(Reply::Info {
                    req: u32_at(b, f::REQ),
                    chunk_size: u64_at(b, f::CHUNK_SIZE),
                    file_size: u64_at(b, f::FILE_SIZE),
                    mtime_ns: u64_at(b, f::MTIME) as i64,
                    ino: u64_at(b, f::INO),
                })
            }
            Op::OpenedFile => {
                use field::opened_file as f;
                exact("OpenedFile", Self::OPENED_FILE_BYTES)?;
                Ok(Reply::OpenedFile {
                    req: u32_at(b, f::REQ),
                    id: u64_at(b, f::ID),
                    file_size: u64_at(b, f::FILE_SIZE),
                    mtime_ns: u64_at(b, f::MTIME) as i64,
                    ino: u64_at(b, f::INO),
                })
            }
            other => Err(ProtoError::WrongOp(other as u8)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut b = Vec::new();
        f(&mut b);
        b
    }

    #[test]
    fn open_round_trips_in_the_documented_layout() {
        let o = Open {
            req: 3,
            chunk: 2,
            path: "a/b.html",
        };
        let b = encoded(|b| o.encode(b));
        assert_eq!(b[0], 1);
        assert_eq!(&b[1..5], &3u32.to_le_bytes());
        assert_eq!(&b[5..9], &2u32.to_le_bytes());
        assert_eq!(&b[9..], b"a/b.html");
        assert_eq!(Open::decode(&b), Ok(o));
        let empty_path = Open {
            req: 0,
            chunk: 0,
            path: "",
        };
        assert_eq!(
            Open::decode(&encoded(|b| empty_path.encode(b))),
            Ok(empty_path)
        );
    }

    #[test]
    fn replies_round_trip() {
        let r = Reply::Opened {
            req: 1,
            id: 9,
            chunk: 0,
            chunk_len: 10,
            chunk_size: 4 << 20,
            file_size: 10,
            mtime_ns: -5,
            ino: 77,
        };
        let b = encoded(|b| r.encode(b));
        assert_eq!(b.len(), 57);
        assert_eq!(Reply::decode(&b), Ok(r));
        for code in 1..=9 {
            let f = Reply::Failed {
                req: 4,
                code: FailCode::from_u8(code).unwrap(),
            };
            let b = encoded(|b| f.encode(b));
            assert_eq!(b, [65, 4, 0, 0, 0, code]);
            assert_eq!(Reply::decode(&b), Ok(f));
        }
    }

    #[test]
    fn lookups_info_and_opened_files_round_trip() {
        let l = Lookup {
            req: 7,
            path: "big.iso",
        };
        let b = encoded(|b| l.encode(b));
        assert_eq!(b[0], 2);
        assert_eq!(&b[1..5], &7u32.to_le_bytes());
        assert_eq!(&b[5..], b"big.iso");
        assert_eq!(Request::decode(&b), Ok(Request::Lookup(l)));
        assert_eq!(
            Request::decode(&[2, 0, 0]),
            Err(ProtoError::Short {
                what: "Lookup",
                len: 3,
                need: 5
            })
        );
        let o = Open {
            req: 1,
            chunk: 2,
            path: "x",
        };
        assert_eq!(
            Request::decode(&encoded(|b| o.encode(b))),
            Ok(Request::Open(o))
        );
        assert_eq!(Request::decode(&[64; 57]), Err(ProtoError::WrongOp(64)));
        for r in [
            Reply::Info {
                req: 3,
                chunk_size: 4 << 20,
                file_size: 10 << 20,
                mtime_ns: -1,
                ino: 9,
            },
            Reply::OpenedFile {
                req: 4,
                id: 11,
                file_size: 4 << 30,
                mtime_ns: 5,
                ino: 6,
            },
        ] {
            let b = encoded(|b| r.encode(b));
            assert_eq!(b.len(), 37);
            assert_eq!(Reply::decode(&b), Ok(r));
            for n in 0..b.len() {
                assert!(Reply::decode(&b[..n]).is_err());
            }
        }
        assert_eq!(
            encoded(|b| Reply::Info {
                req: 0,
                chunk_size: 0,
                file_size: 0,
                mtime_ns: 0,
                ino: 0
            }
            .encode(b))[0],
            66
        );
        let f = Reply::OpenedFile {
            req: 4,
            id: 11,
            file_size: 1,
            mtime_ns: 0,
            ino: 0,
        };
        assert_eq!((f.req(), f.descriptor()), (4, Some(11)));
        assert_eq!(encoded(|b| f.encode(b))[0], 67);
    }

    #[test]
    fn fail_codes_are_one_table() {
        for code in 0..=255u8 {
            match FailCode::from_u8(code) {
                Some(c) => assert_eq!(c as u8, code),
                None => assert!(code == 0 || code > 9, "{code} lost"),
            }
        }
        assert_eq!(FailCode::Unstable as u8, 9);
    }

    #[test]
    fn truncated_and_garbage_input_is_rejected_with_a_reason() {
        let opened = encoded(|b| {
            Reply::Opened {
                req: 1,
                id: 2,
                chunk: 3,
                chunk_len: 4,
                chunk_size: 5,
                file_size: 6,
                mtime_ns: 7,
                ino: 8,
            }
            .encode(b)
        });
        for n in 0..opened.len() {
            assert!(Reply::decode(&opened[..n]).is_err(), "{n} bytes accepted");
        }
        let mut long = opened.clone();
        long.push(0);
        assert!(matches!(
            Reply::decode(&long),
            Err(ProtoError::Length { want: 57, .. })
        ));
        assert_eq!(Reply::decode(&[]), Err(ProtoError::Empty));
        assert_eq!(Reply::decode(&[200]), Err(ProtoError::UnknownOp(200)));
        assert_eq!(Reply::decode(&[1; 9]), Err(ProtoError::WrongOp(1)));
        assert_eq!(
            Reply::decode(&[65, 0, 0, 0, 0, 99]),
            Err(ProtoError::UnknownFailCode(99))
        );
        assert_eq!(Open::decode(&[64; 20]), Err(ProtoError::WrongOp(64)));
        assert_eq!(
            Open::decode(&[1, 0, 0]),
            Err(ProtoError::Short {
                what: "Open",
                len: 3,
                need: 9
            })
        );
        assert_eq!(
            Open::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0xff]),
            Err(ProtoError::PathNotUtf8)
        );
    }
}
