//! Which file segments a session has passed to the TCP server for `send_file`, under which tag.
//!
//! A segment's memfd crosses to the server once (by SCM_RIGHTS, tagged); later sends name the
//! tag. The set is bounded: past [`MAX_FILES`] the least recently registered segment is
//! released, and the server drops its mapping once sends from it are done. Shared by the
//! blocking library and the reactor.

use splitos_file_server::segment::Segment;
use splitos_m2m::{Channel, Error};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Segments a session keeps registered with the server.
pub(crate) const MAX_FILES: usize = 1024;

pub(crate) struct FileTags {
    /// By the segment's address: (tag, segment). The file client hands out one `Arc` per
    /// mapped segment, and holding it here keeps the address from being reused while the
    /// server may still be told about it. (Keyed by address, not by inode, because an `fstat`
    /// per send cost 1% of a small-file server's CPU.)
    files: HashMap<usize, (u64, Arc<Segment>)>,
    order: VecDeque<usize>,
    next: u64,
}

impl Default for FileTags {
    fn default() -> Self {
        FileTags {
            files: HashMap::new(),
            order: VecDeque::new(),
            next: 1,
        }
    }
}

impl FileTags {
    /// The tag under which the server knows `seg`, passing its memfd over `chan` the first
    /// time. Also returns a tag to release (send `ReleaseFile`) if the set was full.
    pub(crate) fn tag(
        &mut self,
        chan: &mut Channel,
        seg: &Arc<Segment>,
    ) -> Result<(u64, Option<u64>), Error> {
        let key = Arc::as_ptr(seg) as usize;
        if let Some((tag, _)) = self.files.get(&key) {
            return Ok((*tag, None));
        }
        let mut released = None;
        if self.files.len() >= MAX_FILES {
            if let Some(old) = self.order.pop_front() {
                released = self.files.remove(&old).map(|(tag, _)| tag);
            }
        }
        let tag = self.next;
        self.next += 1;
        chan.send_fds(tag, &[seg.fd()])?;
        self.files.insert(key, (tag, seg.clone()));
        self.order.push_back(key);
        Ok((tag, released))
    }
}

/// The pieces of a `send_file` of `len` bytes from `offset`: (segment, offset within it,
/// length), one per chunk the range touches.
pub(crate) fn pieces(
    file: &splitos_file_server::client::FileView,
    offset: u64,
    len: u64,
) -> std::io::Result<Vec<(Arc<Segment>, u64, u64)>> {
    file.pieces(offset, len).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "range beyond the end of the file",
        )
    })
}
