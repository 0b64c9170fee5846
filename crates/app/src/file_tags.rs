//! Which files a session has passed to the TCP server for `send_file`, under which tag.
//!
//! A file's descriptor crosses to the server once (by SCM_RIGHTS, tagged); later sends name
//! the tag. Two kinds cross: sealed segments of the file cache (the server maps them), and
//! files passed by reference (too large to cache; the server sends them with `sendfile` and
//! never maps them), whose tags carry [`PLAIN_FILE_TAG`]. The set is bounded by count, by the
//! bytes of the segments it keeps mapped, and by the number of plain files it keeps open: past
//! a bound the least recently registered go (`ReleaseFile`), and the server drops them once
//! sends from them are done. Shared by the blocking library and the reactor.

use splitos_file_server::client::{FileView, Piece};
use splitos_file_server::segment::{PlainFile, Segment};
use splitos_m2m::{Channel, Error};
use splitos_tcp_proto::PLAIN_FILE_TAG;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Files a session keeps registered with the server.
pub(crate) const MAX_FILES: usize = 1024;
/// Bytes of segments a session keeps registered (each stays mapped while registered, here and
/// in the server).
pub(crate) const MAX_BYTES: u64 = 64 << 20;
/// Files passed by reference a session keeps registered (each is an open descriptor here and
/// in the server).
pub(crate) const MAX_PLAIN: usize = 64;

/// What a registration holds: the file, so that its address stays unique while registered.
enum Held {
    Segment(Arc<Segment>),
    Plain(#[allow(dead_code)] Arc<PlainFile>),
}

pub(crate) struct FileTags {
    /// By the address of the `Arc` the file client handed out: (tag, the file). Holding it
    /// here keeps the address from being reused while the server may still be told about it.
    /// (Keyed by address, not by inode, because an `fstat` per send cost 1% of a small-file
    /// server's CPU.)
    files: HashMap<usize, (u64, Held)>,
    order: VecDeque<usize>,
    next: u64,
    bytes: u64,
    plain: usize,
}

impl Default for FileTags {
    fn default() -> Self {
        FileTags {
            files: HashMap::new(),
            order: VecDeque::new(),
            next: 1,
            bytes: 0,
            plain: 0,
        }
    }
}

impl FileTags {
    /// The tag under which the server knows the file `piece` is sent from, passing its
    /// descriptor over `chan` the first time; and the tags to release (send `ReleaseFile` for
    /// each, before the send) to stay within bounds. The returned tag is never among them.
    pub(crate) fn tag(
        &mut self,
        chan: &mut Channel,
        piece: &Piece,
    ) -> Result<(u64, Vec<u64>), Error> {
        let (key, seg_bytes, is_plain) = match piece {
            Piece::Mapped { seg, .. } => (Arc::as_ptr(seg) as usize, seg.len(), false),
            Piece::Plain { file, .. } => (Arc::as_ptr(file) as usize, 0, true),
        };
        if let Some((tag, _)) = self.files.get(&key) {
            return Ok((*tag, Vec::new()));
        }
        let mut released = Vec::new();
        while !self.files.is_empty()
            && (self.files.len() >= MAX_FILES
                || self.bytes + seg_bytes > MAX_BYTES
                || (is_plain && self.plain >= MAX_PLAIN))
        {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some((tag, held)) = self.files.remove(&old) {
                match held {
                    Held::Segment(s) => self.bytes -= s.len(),
                    Held::Plain(_) => self.plain -= 1,
                }
                released.push(tag);
            }
        }
        let mut tag = self.next;
        self.next += 1;
        let held = match piece {
            Piece::Mapped { seg, .. } => {
                chan.send_fds(tag, &[seg.fd()])?;
                Held::Segment(seg.clone())
            }
            Piece::Plain { file, .. } => {
                tag |= PLAIN_FILE_TAG;
                chan.send_fds(tag, &[file.fd()])?;
                Held::Plain(file.clone())
            }
        };
        self.bytes += seg_bytes;
        self.plain += is_plain as usize;
        self.files.insert(key, (tag, held));
        self.order.push_back(key);
        Ok((tag, released))
    }
}

/// The pieces of a `send_file` of `len` bytes from `offset`, one per chunk the range touches
/// (fetching the chunks not mapped yet).
pub(crate) fn pieces(file: &FileView, offset: u64, len: u64) -> std::io::Result<Vec<Piece>> {
    use splitos_file_server::client::ClientError;
    file.ranges(offset, len).map_err(|e| match e {
        ClientError::OutOfRange => std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "range beyond the end of the file",
        ),
        e => std::io::Error::other(e),
    })
}

/// Where a piece starts in its file and how long it is.
pub(crate) fn span(piece: &Piece) -> (u64, u64) {
    match piece {
        Piece::Mapped { offset, len, .. } | Piece::Plain { offset, len, .. } => (*offset, *len),
    }
}
