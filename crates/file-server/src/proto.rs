//! Messages between readers and the file server over an m2m channel. Fixed little-endian;
//! decoding checks every length.
//!
//! A session starts with the server sending the directory region (descriptor message tagged
//! [`DIRECTORY_TAG`]). A reader that misses in the directory, or finds an entry whose segment it
//! does not have yet, sends `Open`; the server answers `Opened` after sending the segment's
//! memfd as a descriptor message tagged with the segment id, or `Failed`.

pub const DIRECTORY_TAG: u64 = u64::MAX;

const OP_OPEN: u8 = 1;
const OP_OPENED: u8 = 64;
const OP_FAILED: u8 = 65;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
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

impl FailCode {
    fn from_u8(v: u8) -> Option<FailCode> {
        Some(match v {
            1 => FailCode::NotFound,
            2 => FailCode::Escapes,
            3 => FailCode::Directory,
            4 => FailCode::Special,
            5 => FailCode::Denied,
            6 => FailCode::BadPath,
            7 => FailCode::Io,
            8 => FailCode::BadRequest,
            9 => FailCode::Unstable,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open<'a> {
    pub req: u32,
    pub chunk: u32,
    pub path: &'a str,
}

impl Open<'_> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(OP_OPEN);
        out.extend_from_slice(&self.req.to_le_bytes());
        out.extend_from_slice(&self.chunk.to_le_bytes());
        out.extend_from_slice(self.path.as_bytes());
    }

    pub fn decode(b: &[u8]) -> Option<Open<'_>> {
        if b.len() < 9 || b[0] != OP_OPEN {
            return None;
        }
        Some(Open {
            req: u32::from_le_bytes([b[1], b[2], b[3], b[4]]),
            chunk: u32::from_le_bytes([b[5], b[6], b[7], b[8]]),
            path: std::str::from_utf8(&b[9..]).ok()?,
        })
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
}

impl Reply {
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
                out.push(OP_OPENED);
                out.extend_from_slice(&req.to_le_bytes());
                out.extend_from_slice(&chunk.to_le_bytes());
                for w in [id, chunk_len, chunk_size, file_size, mtime_ns as u64, ino] {
                    out.extend_from_slice(&w.to_le_bytes());
                }
            }
            Reply::Failed { req, code } => {
                out.push(OP_FAILED);
                out.extend_from_slice(&req.to_le_bytes());
                out.push(code as u8);
            }
        }
    }

    pub fn decode(b: &[u8]) -> Option<Reply> {
        let u32_at = |i: usize| -> Option<u32> {
            Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
        };
        let u64_at = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
        };
        match *b.first()? {
            OP_OPENED if b.len() == 57 => Some(Reply::Opened {
                req: u32_at(1)?,
                chunk: u32_at(5)?,
                id: u64_at(9)?,
                chunk_len: u64_at(17)?,
                chunk_size: u64_at(25)?,
                file_size: u64_at(33)?,
                mtime_ns: u64_at(41)? as i64,
                ino: u64_at(49)?,
            }),
            OP_FAILED if b.len() == 6 => Some(Reply::Failed {
                req: u32_at(1)?,
                code: FailCode::from_u8(b[5])?,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let mut b = Vec::new();
        Open {
            req: 3,
            chunk: 2,
            path: "a/b.html",
        }
        .encode(&mut b);
        assert_eq!(
            Open::decode(&b),
            Some(Open {
                req: 3,
                chunk: 2,
                path: "a/b.html"
            })
        );
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
        b.clear();
        r.encode(&mut b);
        assert_eq!(Reply::decode(&b), Some(r));
        let f = Reply::Failed {
            req: 4,
            code: FailCode::Escapes,
        };
        b.clear();
        f.encode(&mut b);
        assert_eq!(Reply::decode(&b), Some(f));
        for junk in [&[][..], &[64], &[65, 0, 0, 0, 0, 99], &[1, 0, 0]] {
            assert!(Reply::decode(junk).is_none() && Open::decode(junk).is_none());
        }
    }
}
