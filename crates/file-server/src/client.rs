//! A reader of the file server: an application or the TCP server.
//!
//! A hit costs a lookup in the shared directory and no message: the entry names a segment the
//! reader already maps. Otherwise the reader asks the server, which sends the segment's memfd
//! and a reply; the reader checks the segment (sealed, of the announced size) before mapping it.
//! A file made of several chunks is returned only if every chunk comes from the same version of
//! the file, so a reader never stitches two versions together.

use crate::directory::{DirectoryReader, Entry};
use crate::path::{normalize, PathError};
use crate::proto::{FailCode, Open, ProtoError, Reply, DIRECTORY_TAG};
use splitos_m2m::segment::{Segment, Version};
use splitos_m2m::{Channel, ChannelConfig, Message, WaitPolicy};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Segments a reader keeps mapped; older ones are dropped (their memory goes when unused).
const MAX_SEGMENTS: usize = 1024;
/// How long a reader waits for the server to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest chunk a server may use (its configuration allows 4 KiB to 1 GiB): nothing
/// larger is ever mapped, whatever a reply or the directory says.
pub const MAX_CHUNK_BYTES: u64 = 1 << 30;
/// The smallest chunk of a file of several chunks.
pub const MIN_CHUNK_BYTES: u64 = 4096;
/// Most chunks a file may have (4 TiB in 4 MiB chunks): a reply announcing more is refused.
pub const MAX_CHUNKS: u64 = 1 << 20;

/// How a file of `size` bytes is split when its first chunk holds `first_len` bytes: the chunk
/// size and the number of chunks, or `None` if no valid server splits a file that way. A file
/// of one chunk is the whole file (its chunk size is then its length, at least 1).
pub fn chunk_layout(size: u64, first_len: u64) -> Option<(u64, u64)> {
    if first_len == size {
        return (size <= MAX_CHUNK_BYTES).then_some((size.max(1), 1));
    }
    if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&first_len) || first_len > size {
        return None;
    }
    let count = size.div_ceil(first_len);
    (count <= MAX_CHUNKS).then_some((first_len, count))
}

/// The length chunk `k` must have in a file of `size` bytes cut into `chunk_size` chunks
/// (as [`chunk_layout`] returned), or `None` if there is no such chunk.
pub fn chunk_len_of(size: u64, chunk_size: u64, k: u64) -> Option<u64> {
    let start = k.checked_mul(chunk_size)?;
    if k == 0 && size == 0 {
        return Some(0);
    }
    (start < size).then(|| (size - start).min(chunk_size))
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no such file")]
    NotFound,
    #[error("the path leaves the served root")]
    Escapes,
    #[error("the path is a directory")]
    Directory,
    #[error("not a regular file")]
    Special,
    #[error("permission denied")]
    Denied,
    #[error("invalid path: {0}")]
    BadPath(#[from] PathError),
    #[error("the file server failed to read the file")]
    ServerIo,
    #[error("the file kept changing while it was being read")]
    Unstable,
    #[error("the file server has gone away")]
    ServerGone,
    #[error("the file server broke the protocol: {0}")]
    Protocol(&'static str),
    #[error("the file server sent a reply that does not decode: {0}")]
    BadReply(#[source] ProtoError),
    #[error(transparent)]
    Channel(splitos_m2m::Error),
}

impl From<splitos_m2m::Error> for ClientError {
    fn from(e: splitos_m2m::Error) -> ClientError {
        match e {
            splitos_m2m::Error::PeerGone => ClientError::ServerGone,
            other => ClientError::Channel(other),
        }
    }
}

/// One version of a whole file, mapped. Cheap to clone; the bytes never change.
#[derive(Clone)]
pub struct FileView {
    chunks: Vec<Arc<Segment>>,
    chunk_size: u64,
    version: Version,
    content_type: &'static str,
}

impl FileView {
    pub fn len(&self) -> u64 {
        self.version.size
    }

    pub fn is_empty(&self) -> bool {
        self.version.size == 0
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The content type the directory published for the file (from its extension).
    pub fn content_type(&self) -> &'static str {
        self.content_type
    }

    /// The segments, in order (for transmitting straight from shared memory).
    pub fn chunks(&self) -> &[Arc<Segment>] {
        &self.chunks
    }

    /// The pieces of the byte range `offset..offset+len`: (segment, offset within it, length),
    /// one per chunk it touches; `None` if the range passes the end of the file.
    pub fn pieces(&self, offset: u64, len: u64) -> Option<Vec<(Arc<Segment>, u64, u64)>> {
        let end = offset.checked_add(len).filter(|e| *e <= self.len())?;
        let chunk_size = self.chunk_size.max(1);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = (pos / chunk_size) as usize;
            let seg = self.chunks.get(i)?;
            let within = pos - i as u64 * chunk_size;
            let part = seg.len().checked_sub(within)?.min(end - pos);
            if part == 0 {
                return None;
            }
            out.push((seg.clone(), within, part));
            pos += part;
        }
        Some(out)
    }

    /// Copies bytes from `offset` on; returns how many.
    pub fn read_at(&self, mut offset: u64, dst: &mut [u8]) -> usize {
        let mut n = 0;
        while n < dst.len() && offset < self.len() {
            let i = (offset / self.chunk_size.max(1)) as usize;
            let Some(seg) = self.chunks.get(i) else { break };
            let within = (offset - i as u64 * self.chunk_size) as usize;
            let bytes = seg.bytes();
            if within >= bytes.len() {
                break;
            }
            let take = (bytes.len() - within).min(dst.len() - n);
            dst[n..n + take].copy_from_slice(&bytes[within..within + take]);
            n += take;
            offset += take as u64;
        }
        n
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len() as usize];
        let n = self.read_at(0, &mut v);
        v.truncate(n);
        v
    }
}

/// The file version a directory entry describes.
fn entry_version(e: &Entry) -> Version {
    Version {
        ino: e.ino,
        size: e.file_size,
        mtime_ns: e.mtime_ns as i128,
    }
}

impl splitos_http::respond::StaticFile for FileView {
    fn len(&self) -> u64 {
        self.version.size
    }
    fn etag(&self) -> String {
        self.version.etag()
    }
    fn modified(&self) -> std::time::SystemTime {
        splitos_http::respond::time_of_ns(self.version.mtime_ns)
    }
    fn content_type(&self) -> &'static str {
        self.content_type
    }
}

impl splitos_http::respond::FileSource for FileClient {
    type File = FileView;
    fn open(&mut self, path: &str) -> splitos_http::respond::Lookup<FileView> {
        lookup_of(FileClient::open(self, path))
    }
}

/// A file client's answer as the shared responder sees it.
pub fn lookup_of(r: Result<FileView, ClientError>) -> splitos_http::respond::Lookup<FileView> {
    use splitos_http::respond::Lookup;
    match r {
        Ok(v) => Lookup::Found(v),
        Err(ClientError::NotFound) => Lookup::NotFound,
        Err(ClientError::Directory) => Lookup::Directory,
        Err(
            ClientError::Escapes
            | ClientError::BadPath(_)
            | ClientError::Special
            | ClientError::Denied,
        ) => Lookup::Forbidden,
        Err(e) => {
            tracing::warn!(path_error = %e, "file server");
            Lookup::Failed
        }
    }
}

pub struct FileClient {
    chan: Channel,
    directory: DirectoryReader,
    segments: HashMap<u64, Arc<Segment>>,
    next_req: u32,
    out: Vec<u8>,
    /// Requests answered by the directory alone (no message), for observability and tests.
    pub directory_hits: u64,
}

impl FileClient {
    /// Connects to the file server at `socket` and maps its directory.
    pub fn connect(socket: impl AsRef<Path>) -> Result<FileClient, ClientError> {
        let mut chan = Channel::connect(
            socket,
            ChannelConfig {
                ring_bytes: 64 << 10,
                buf_size: 4096,
                buf_count: 1,
                wait: WaitPolicy::adaptive(),
            },
        )?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let dir_fd = loop {
            if let Some((tag, mut fds)) = chan.try_recv_fds()? {
                if tag == DIRECTORY_TAG && fds.len() == 1 {
                    break fds.remove(0);
                }
                return Err(ClientError::Protocol(
                    "the first message was not the directory",
                ));
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Protocol("no directory from the server"));
            }
            let mut fds = [rustix::event::PollFd::from_borrowed_fd(
                chan.wait_fd(),
                rustix::event::PollFlags::IN,
            )];
            let ts = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 10_000_000,
            };
            let _ = rustix::event::poll(&mut fds, Some(&ts));
        };
        let directory = DirectoryReader::open(dir_fd)
            .map_err(|_| ClientError::Protocol("the directory region is malformed"))?;
        Ok(FileClient {
            chan,
            directory,
            segments: HashMap::new(),
            next_req: 0,
            out: Vec::new(),
            directory_hits: 0,
        })
    }

    /// Opens a whole file (one consistent version of it).
    pub fn open(&mut self, path: &str) -> Result<FileView, ClientError> {
        let path = normalize(path)?;
        for _ in 0..3 {
            let (first, e0) = self.chunk(&path, 0)?;
            let (chunk_size, chunks) = chunk_layout(e0.file_size, e0.chunk_len as u64)
                .ok_or(ClientError::Protocol("impossible file or chunk size"))?;
            let mut view = vec![first];
            let mut consistent = true;
            for k in 1..chunks {
                let (seg, e) = self.chunk(&path, k as u32)?;
                if (e.file_size, e.mtime_ns, e.ino) != (e0.file_size, e0.mtime_ns, e0.ino) {
                    consistent = false;
                    break;
                }
                if Some(seg.len()) != chunk_len_of(e0.file_size, chunk_size, k) {
                    return Err(ClientError::Protocol("a chunk of the wrong length"));
                }
                view.push(seg);
            }
            if consistent {
                return Ok(FileView {
                    chunks: view,
                    chunk_size,
                    version: Version {
                        ino: e0.ino,
                        size: e0.file_size,
                        mtime_ns: e0.mtime_ns as i128,
                    },
                    content_type: splitos_http::mime::from_code(e0.content_type),
                });
            }
        }
        Err(ClientError::Unstable)
    }

    /// Opens a file only if the cache holds it (its first chunk is in the shared directory):
    /// `Ok(None)` otherwise, and `Err(NotFound)` if the directory records the path as absent,
    /// both without a message to the server. A hit on a segment this client does not map yet
    /// costs one round trip, with no disk access (the server has it).
    pub fn open_cached(&mut self, path: &str) -> Result<Option<FileView>, ClientError> {
        let path = normalize(path)?;
        match self.directory.lookup(&path, 0) {
            None => Ok(None),
            Some(e) if e.is_absent() => Err(ClientError::NotFound),
            Some(_) => self.open(&path).map(Some),
        }
    }

    /// One chunk: from the directory if we map its segment already, else from the server.
    fn chunk(&mut self, path: &str, chunk: u32) -> Result<(Arc<Segment>, Entry), ClientError> {
        if let Some(e) = self.directory.lookup(path, chunk) {
            if e.is_absent() && chunk == 0 {
                self.directory_hits += 1;
                return Err(ClientError::NotFound);
            }
            if let Some(seg) = self.segments.get(&e.id) {
                if seg.len() == e.chunk_len as u64 && seg.version() == entry_version(&e) {
                    self.directory_hits += 1;
                    return Ok((seg.clone(), e));
                }
            }
        }
        self.next_req = self.next_req.wrapping_add(1);
        let req = self.next_req;
        self.out.clear();
        Open { req, chunk, path }.encode(&mut self.out);
        let out = std::mem::take(&mut self.out);
        let sent = self.chan.send(&out);
        self.out = out;
        sent?;
        let m = self
            .chan
            .recv_timeout(REPLY_TIMEOUT)?
            .ok_or(ClientError::Protocol("no reply in time"))?;
        let Message::Inline(b) = m else {
            return Err(ClientError::Protocol("unexpected buffer"));
        };
        let reply = Reply::decode(b).map_err(ClientError::BadReply)?;
        match reply {
            Reply::Failed { code, .. } => Err(match code {
                FailCode::NotFound => ClientError::NotFound,
                FailCode::Escapes => ClientError::Escapes,
                FailCode::Directory => ClientError::Directory,
                FailCode::Special => ClientError::Special,
                FailCode::Denied => ClientError::Denied,
                FailCode::BadPath => ClientError::BadPath(PathError::Empty),
                FailCode::Unstable => ClientError::Unstable,
                FailCode::Io | FailCode::BadRequest => ClientError::ServerIo,
            }),
            Reply::Opened {
                req: r,
                id,
                chunk: c,
                chunk_len,
                chunk_size,
                file_size,
                mtime_ns,
                ino,
            } => {
                if r != req || c != chunk {
                    return Err(ClientError::Protocol("reply does not match the request"));
                }
                if id == 0 || id == crate::directory::ABSENT {
                    return Err(ClientError::Protocol("reserved segment id"));
                }
                // The server's chunk size must be one it could use, and this chunk exactly as
                // long as that size makes it: then the length is at most `MAX_CHUNK_BYTES`.
                if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_size)
                    || chunk_len_of(file_size, chunk_size, chunk as u64) != Some(chunk_len)
                    || file_size.div_ceil(chunk_size) > MAX_CHUNKS
                {
                    return Err(ClientError::Protocol(
                        "impossible chunk, chunk or file size",
                    ));
                }
                let (tag, mut fds) = self
                    .chan
                    .try_recv_fds()?
                    .ok_or(ClientError::Protocol("segment descriptor missing"))?;
                if tag != id || fds.len() != 1 {
                    return Err(ClientError::Protocol("segment descriptor mislabelled"));
                }
                let version = Version {
                    ino,
                    size: file_size,
                    mtime_ns: mtime_ns as i128,
                };
                let seg =
                    Segment::from_received(fds.remove(0), version, chunk_len).map_err(|_| {
                        ClientError::Protocol("segment is not sealed or has the wrong size")
                    })?;
                let seg = Arc::new(seg);
                if self.segments.len() >= MAX_SEGMENTS {
                    if let Some(k) = self.segments.keys().next().copied() {
                        self.segments.remove(&k);
                    }
                }
                self.segments.insert(id, seg.clone());
                Ok((
                    seg,
                    Entry {
                        id,
                        path: path.to_string(),
                        chunk,
                        chunk_len: chunk_len as u32,
                        file_size,
                        mtime_ns,
                        ino,
                        content_type: splitos_http::mime::code(path),
                    },
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_layouts_a_server_could_produce_and_no_others() {
        assert_eq!(chunk_layout(0, 0), Some((1, 1)));
        assert_eq!(chunk_layout(10, 10), Some((10, 1)));
        assert_eq!(chunk_layout(10_000, 4096), Some((4096, 3)));
        assert_eq!(
            chunk_layout(1, 0),
            None,
            "an empty first chunk of a longer file"
        );
        assert_eq!(chunk_layout(10_000, 100), None, "chunks under 4 KiB");
        assert_eq!(chunk_layout(4 << 30, 4 << 30), None, "one chunk over 1 GiB");
        assert_eq!(chunk_layout(1 << 62, 4096), None, "too many chunks");
        assert_eq!(chunk_len_of(10_000, 4096, 0), Some(4096));
        assert_eq!(chunk_len_of(10_000, 4096, 2), Some(10_000 - 8192));
        assert_eq!(chunk_len_of(10_000, 4096, 3), None);
        assert_eq!(chunk_len_of(0, 4096, 0), Some(0));
        assert_eq!(chunk_len_of(0, 4096, 1), None);
        assert_eq!(
            chunk_len_of(u64::MAX, 1 << 30, u64::MAX),
            None,
            "no overflow"
        );
    }
}
