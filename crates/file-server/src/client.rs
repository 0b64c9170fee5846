//! A reader of the file server: an application or the TCP server.
//!
//! A hit costs a lookup in the shared directory and no message: the entry names a segment the
//! reader already maps. Otherwise the reader asks the server, which sends the segment's memfd
//! and a reply; the reader checks the segment (sealed, of the announced size) before mapping it,
//! and checks every reply against the request and against what any server could say (chunk
//! sizes, lengths, counts), so a lying server gets errors, never a panic or a huge mapping.
//!
//! Opening a file fetches only what every response needs: its size and validators. A file of
//! one chunk (most files) comes with its segment; a file of several chunks is a [`FileView`]
//! that fetches each chunk when a read or a send first touches it (a HEAD maps nothing, a
//! `Range: bytes=0-99` one chunk), each checked to be of the version opened, so a reader never
//! stitches two versions together (a file that changed between two chunks gives
//! [`ClientError::Unstable`]). A file above the server's by-reference threshold arrives as a
//! descriptor of the file itself ([`PlainFile`]): read with `pread`, sent with `sendfile`, never
//! copied or mapped.
//!
//! A reader keeps the segments it fetched mapped for later hits, up to a byte budget
//! ([`ClientConfig::max_mapped_bytes`]); past it the least recently used go (their memory goes
//! when no view or send holds them). It notices a dead server (the channel's peer-death check,
//! on every open and chunk fetch) and from then on answers [`ClientError::ServerGone`] instead
//! of serving from a directory nobody updates. A reply that comes after its request gave up waiting
//! (the server stalled) is recognised by its request id and discarded, with its descriptor,
//! so one timeout costs that request only.

use crate::directory::{DirectoryReader, Entry, ABSENT};
use crate::path::{normalize, PathError};
use crate::proto::{FailCode, Lookup, Open, ProtoError, Reply, DIRECTORY_TAG};
use rustix::fd::OwnedFd;
use splitos_m2m::segment::{PlainFile, Segment, Version};
use splitos_m2m::{Channel, ChannelConfig, Message, WaitPolicy};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

mod caches;
mod view;

use caches::{PlainCache, SegmentCache};
use view::{entry_version, Body, Chunks};
pub use view::{FileView, Piece};

/// How long a new reader waits for the server's directory.
const DIRECTORY_TIMEOUT: Duration = Duration::from_secs(10);

/// A reader's limits.
#[derive(Clone, Copy, Debug)]
pub struct ClientConfig {
    /// Bytes of segments kept mapped for later hits (besides what live views hold).
    pub max_mapped_bytes: u64,
    /// Segments kept mapped for later hits (each is a mapping and a descriptor).
    pub max_segments: usize,
    /// Files passed by reference kept open for later opens of the same version.
    pub max_plain_files: usize,
    /// How long a request waits for its reply.
    pub reply_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            max_mapped_bytes: 64 << 20,
            max_segments: 1024,
            max_plain_files: 64,
            reply_timeout: Duration::from_secs(10),
        }
    }
}

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
    #[error("the file server did not answer in time")]
    Timeout,
    #[error("not in the file cache")]
    NotCached,
    #[error("the range passes the end of the file")]
    OutOfRange,
    #[error("reading the file: {0}")]
    Read(#[source] std::io::Error),
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

fn fail_error(code: FailCode) -> ClientError {
    match code {
        FailCode::NotFound => ClientError::NotFound,
        FailCode::Escapes => ClientError::Escapes,
        FailCode::Directory => ClientError::Directory,
        FailCode::Special => ClientError::Special,
        FailCode::Denied => ClientError::Denied,
        FailCode::BadPath => ClientError::BadPath(PathError::Empty),
        FailCode::Unstable => ClientError::Unstable,
        FailCode::Io | FailCode::BadRequest => ClientError::ServerIo,
    }
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here panics while holding a lock; if something did, the data is still sound (a
    // map of segments, a channel that resynchronises by request id).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A file client's answer as the shared responder sees it. A server that is gone, or a file
/// not in the cache of a reader that must not wait, is `Unavailable`: another source (the
/// application, a reconnected client) should answer.
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
        Err(ClientError::ServerGone | ClientError::NotCached) => Lookup::Unavailable,
        Err(e) => {
            tracing::warn!(path_error = %e, "file server");
            Lookup::Failed
        }
    }
}

/// What the reader shares with its views: the channel, the directory and the caches.
struct Link {
    chan: Channel,
    directory: DirectoryReader,
    segments: SegmentCache,
    plain: PlainCache,
    next_req: u32,
    /// The oldest request that ended without its reply (timed out or failed), if any since the
    /// last one answered in order: replies from there up to the current request are late.
    unanswered_since: Option<u32>,
    out: Vec<u8>,
    cfg: ClientConfig,
    gone: bool,
}

/// What `Link::lookup` found, and whether it took no message.
struct Found {
    view: FileView,
    hit: bool,
}

impl Link {
    /// Marks the server gone on any channel failure (the channel is then unusable anyway).
    fn lost(&mut self, e: splitos_m2m::Error) -> ClientError {
        self.gone = true;
        e.into()
    }

    /// Fails once the server is gone: a directory nobody updates must not be served from
    /// (files deleted or changed since would be served as they were, indefinitely). The check
    /// costs a shared-memory load and a coarse clock read; the kernel is asked at most every
    /// 10 ms, so a `kill -9`ed server is noticed within about that.
    fn alive(&mut self) -> Result<(), ClientError> {
        if self.gone {
            return Err(ClientError::ServerGone);
        }
        self.chan.check_alive().map_err(|e| self.lost(e))
    }

    /// Sends the request `encode` writes (given its id) and returns its reply, with the
    /// descriptor that came before it if it has one. Late replies to earlier requests, and
    /// their descriptors, are dropped on the way.
    fn round_trip(
        &mut self,
        encode: impl FnOnce(u32, &mut Vec<u8>),
    ) -> Result<(Reply, Option<OwnedFd>), ClientError> {
        self.next_req = self.next_req.wrapping_add(1);
        let req = self.next_req;
        self.out.clear();
        encode(req, &mut self.out);
        let out = std::mem::take(&mut self.out);
        let sent = self.chan.send(&out);
        self.out = out;
        sent.map_err(|e| self.lost(e))?;
        let r = self.await_reply(req);
        if r.is_err() {
            self.unanswered_since.get_or_insert(req);
        }
        r
    }

    fn await_reply(&mut self, req: u32) -> Result<(Reply, Option<OwnedFd>), ClientError> {
        let deadline = Instant::now() + self.cfg.reply_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = match self.chan.recv_timeout(left) {
                Err(e) => return Err(self.lost(e)),
                Ok(None) => return Err(ClientError::Timeout),
                Ok(Some(Message::Inline(b))) => Reply::decode(b).map_err(ClientError::BadReply)?,
                Ok(Some(Message::Buffer(_))) => {
                    return Err(ClientError::Protocol("a buffer instead of a reply"))
                }
            };
            // The descriptor a reply announces was sent just before it (replies and
            // descriptors are in the same order), late ones included.
            let fd = match reply.descriptor() {
                None => None,
                Some(id) => {
                    let (tag, mut fds) = self
                        .chan
                        .try_recv_fds()
                        .map_err(|e| self.lost(e))?
                        .ok_or(ClientError::Protocol("descriptor missing"))?;
                    if tag != id || fds.len() != 1 {
                        return Err(ClientError::Protocol("descriptor mislabelled"));
                    }
                    fds.pop()
                }
            };
            let r = reply.req();
            if r == req {
                // The server answers in order: everything before has arrived.
                self.unanswered_since = None;
                return Ok((reply, fd));
            }
            let late = self
                .unanswered_since
                .is_some_and(|first| req.wrapping_sub(r) <= req.wrapping_sub(first));
            if !late {
                return Err(ClientError::Protocol("a reply to no outstanding request"));
            }
            // A reply to a request that gave up waiting: dropped, descriptor and all.
            tracing::debug!(
                late = r,
                waiting = req,
                "discarding a late file-server reply"
            );
        }
    }

    /// Finds out what `path` is: from the directory if it can, else by asking (unless
    /// `cached_only`, when a path the directory does not list is `Ok(None)`).
    fn lookup(
        &mut self,
        this: &Arc<Mutex<Link>>,
        path: &str,
        cached_only: bool,
    ) -> Result<Option<Found>, ClientError> {
        self.alive()?;
        let chunks = |chunk_size, count, cached_only| Chunks {
            path: path.to_string(),
            chunk_size,
            count,
            fetched: Mutex::new(HashMap::new()),
            link: Arc::downgrade(this),
            cached_only,
        };
        match self.directory.lookup(path, 0) {
            Some(e) if e.is_absent() => return Err(ClientError::NotFound),
            Some(e) => {
                let version = entry_version(&e);
                let content_type = splitos_http::mime::from_code(e.content_type);
                // An entry no server would write is ignored: the server is asked instead.
                if let Some((chunk_size, count)) = chunk_layout(e.file_size, e.chunk_len as u64) {
                    let mapped = self
                        .segments
                        .get(e.id)
                        .filter(|s| s.len() == e.chunk_len as u64 && s.version() == version);
                    if count == 1 {
                        if let Some(seg) = mapped {
                            let view = FileView::new(version, content_type, Body::One(seg));
                            return Ok(Some(Found { view, hit: true }));
                        }
                    } else {
                        // Described by the entry: nothing to fetch until a chunk is needed.
                        let c = chunks(chunk_size, count, cached_only);
                        if let Some(seg) = mapped {
                            relock(&c.fetched).insert(0, seg);
                        }
                        let view = FileView::new(version, content_type, Body::Chunks(c));
                        return Ok(Some(Found { view, hit: true }));
                    }
                }
            }
            None if cached_only => return Ok(None),
            None => {}
        }
        let (reply, fd) = self.round_trip(|req, out| Lookup { req, path }.encode(out))?;
        // Asked, not found in the directory: the type by the path, as the server would record.
        let content_type = splitos_http::mime::from_code(splitos_http::mime::code(path));
        let view = match reply {
            Reply::Failed { code, .. } => return Err(fail_error(code)),
            Reply::Opened {
                id,
                chunk,
                chunk_len,
                chunk_size,
                file_size,
                mtime_ns,
                ino,
                ..
            } => {
                let version = Version {
                    ino,
                    size: file_size,
                    mtime_ns: mtime_ns as i128,
                };
                // Only a file of one chunk comes whole.
                if chunk != 0 || chunk_len != file_size {
                    return Err(ClientError::Protocol("a partial file as a whole one"));
                }
                let seg = self.accept_segment(fd, id, 0, chunk_len, chunk_size, version)?;
                FileView::new(version, content_type, Body::One(seg))
            }
            Reply::Info {
                chunk_size,
                file_size,
                mtime_ns,
                ino,
                ..
            } => {
                let count = file_size.div_ceil(chunk_size.max(1));
                if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_size)
                    || !(2..=MAX_CHUNKS).contains(&count)
                {
                    return Err(ClientError::Protocol("impossible chunk or file size"));
                }
                let version = Version {
                    ino,
                    size: file_size,
                    mtime_ns: mtime_ns as i128,
                };
                let c = chunks(chunk_size, count, cached_only);
                FileView::new(version, content_type, Body::Chunks(c))
            }
            Reply::OpenedFile {
                file_size,
                mtime_ns,
                ino,
                ..
            } => {
                let version = Version {
                    ino,
                    size: file_size,
                    mtime_ns: mtime_ns as i128,
                };
                let fd = fd.ok_or(ClientError::Protocol("descriptor missing"))?;
                if cached_only {
                    // Sending it would read the disk: not for a reader that must not wait.
                    return Ok(None);
                }
                let file = match self.plain.get(path, version) {
                    Some(f) => f, // the same file again: keep the descriptor already known
                    None => {
                        let f = Arc::new(PlainFile::from_announced(fd, version).map_err(|_| {
                            ClientError::Protocol("a file passed by reference that is not it")
                        })?);
                        self.plain.insert(path, f.clone());
                        f
                    }
                };
                FileView::new(version, content_type, Body::Plain(file))
            }
        };
        Ok(Some(Found { view, hit: false }))
    }

    /// Checks a received segment against its reply and maps it.
    fn accept_segment(
        &mut self,
        fd: Option<OwnedFd>,
        id: u64,
        chunk: u32,
        chunk_len: u64,
        chunk_size: u64,
        version: Version,
    ) -> Result<Arc<Segment>, ClientError> {
        let fd = fd.ok_or(ClientError::Protocol("descriptor missing"))?;
        if id == 0 || id == ABSENT {
            return Err(ClientError::Protocol("reserved segment id"));
        }
        // The server's chunk size must be one it could use, and this chunk exactly as long as
        // that size makes it: then its length is at most `MAX_CHUNK_BYTES`.
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_size)
            || chunk_len_of(version.size, chunk_size, chunk as u64) != Some(chunk_len)
            || version.size.div_ceil(chunk_size) > MAX_CHUNKS
        {
            return Err(ClientError::Protocol(
                "impossible chunk, chunk or file size",
            ));
        }
        let seg = Segment::from_received(fd, version, chunk_len)
            .map_err(|_| ClientError::Protocol("segment is not sealed or has the wrong size"))?;
        let seg = Arc::new(seg);
        self.segments.insert(id, seg.clone());
        Ok(seg)
    }

    /// Chunk `k` of version `version` of `path` (cut in `chunk_size` chunks): mapped already,
    /// or asked for.
    fn fetch_chunk(
        &mut self,
        path: &str,
        k: u32,
        version: Version,
        chunk_size: u64,
        cached_only: bool,
    ) -> Result<Arc<Segment>, ClientError> {
        self.alive()?;
        let want =
            chunk_len_of(version.size, chunk_size, k as u64).ok_or(ClientError::OutOfRange)?;
        let mut listed = false;
        if let Some(e) = self.directory.lookup(path, k) {
            if entry_version(&e) == version && e.chunk_len as u64 == want {
                listed = true;
                if let Some(seg) = self.segments.get(e.id) {
                    if seg.len() == want && seg.version() == version {
                        return Ok(seg);
                    }
                }
            }
        }
        if cached_only && !listed {
            return Err(ClientError::NotCached);
        }
        let (reply, fd) = self.round_trip(|req, out| {
            Open {
                req,
                chunk: k,
                path,
            }
            .encode(out)
        })?;
        match reply {
            Reply::Failed { code, .. } => Err(fail_error(code)),
            Reply::Opened {
                id,
                chunk,
                chunk_len,
                chunk_size: cs,
                file_size,
                mtime_ns,
                ino,
                ..
            } => {
                if chunk != k {
                    return Err(ClientError::Protocol("reply does not match the request"));
                }
                let got = Version {
                    ino,
                    size: file_size,
                    mtime_ns: mtime_ns as i128,
                };
                let seg = self.accept_segment(fd, id, chunk, chunk_len, cs, got)?;
                if got != version {
                    return Err(ClientError::Unstable); // the file changed since it was opened
                }
                if cs != chunk_size {
                    return Err(ClientError::Protocol("the chunk size changed"));
                }
                Ok(seg)
            }
            // A file that is now large or no longer chunked is another version.
            Reply::OpenedFile { .. } | Reply::Info { .. } => Err(ClientError::Unstable),
        }
    }
}

pub struct FileClient {
    link: Arc<Mutex<Link>>,
    /// Opens answered by the directory alone (no message), for observability and tests.
    pub directory_hits: u64,
}

impl FileClient {
    /// Who the file server is, from the kernel: a caller that serves others' requests from it
    /// checks this rather than the socket file's owner, which a path swap could change
    /// between a check and the connect.
    pub fn server_credentials(&self) -> std::io::Result<splitos_m2m::PeerCredentials> {
        relock(&self.link).chan.peer_credentials()
    }

    /// Connects to the file server at `socket` and maps its directory.
    pub fn connect(socket: impl AsRef<Path>) -> Result<FileClient, ClientError> {
        FileClient::connect_with(socket, ClientConfig::default())
    }

    /// [`FileClient::connect`] with limits other than the defaults.
    pub fn connect_with(
        socket: impl AsRef<Path>,
        cfg: ClientConfig,
    ) -> Result<FileClient, ClientError> {
        let mut chan = Channel::connect(
            socket,
            ChannelConfig {
                ring_bytes: 64 << 10,
                buf_size: 4096,
                buf_count: 1,
                wait: WaitPolicy::adaptive(),
            },
        )?;
        let deadline = Instant::now() + DIRECTORY_TIMEOUT;
        let dir_fd = loop {
            if let Some((tag, mut fds)) = chan.try_recv_fds()? {
                if tag == DIRECTORY_TAG && fds.len() == 1 {
                    if let Some(fd) = fds.pop() {
                        break fd;
                    }
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
        let link = Link {
            chan,
            directory,
            segments: SegmentCache {
                map: HashMap::new(),
                clock: VecDeque::new(),
                bytes: 0,
                max_bytes: cfg.max_mapped_bytes,
                max_count: cfg.max_segments,
            },
            plain: PlainCache {
                map: HashMap::new(),
                order: VecDeque::new(),
                max: cfg.max_plain_files,
            },
            next_req: 0,
            unanswered_since: None,
            out: Vec::new(),
            cfg,
            gone: false,
        };
        Ok(FileClient {
            link: Arc::new(Mutex::new(link)),
            directory_hits: 0,
        })
    }

    /// Opens a file: one version of it, with nothing more fetched than its description (and
    /// the segment of a file of one chunk). Its chunks come when a read or a send needs them.
    pub fn open(&mut self, path: &str) -> Result<FileView, ClientError> {
        let path = normalize(path)?;
        match self.find(&path, false)? {
            Some(v) => Ok(v),
            // Only a reader that must not wait is told "not cached".
            None => Err(ClientError::NotCached),
        }
    }

    /// Opens a file only if the cache holds it (its first chunk is in the shared directory):
    /// `Ok(None)` otherwise, and `Err(NotFound)` if the directory records the path as absent,
    /// both without a message to the server. A hit on a segment this client does not map yet
    /// costs one round trip, with no disk access (the server has it); so do the chunks of a
    /// file of several, fetched when needed and only if the directory lists them.
    pub fn open_cached(&mut self, path: &str) -> Result<Option<FileView>, ClientError> {
        let path = normalize(path)?;
        self.find(&path, true)
    }

    fn find(&mut self, path: &str, cached_only: bool) -> Result<Option<FileView>, ClientError> {
        let found = relock(&self.link).lookup(&self.link, path, cached_only);
        match found {
            Ok(Some(Found { view, hit })) => {
                self.directory_hits += hit as u64;
                Ok(Some(view))
            }
            Ok(None) => Ok(None),
            Err(ClientError::NotFound) => {
                // Known absent without a message when the directory said so.
                Err(ClientError::NotFound)
            }
            Err(e) => Err(e),
        }
    }

    /// Bytes of segments kept mapped for later hits.
    pub fn mapped_bytes(&self) -> u64 {
        relock(&self.link).segments.bytes
    }

    /// Whether the server has been found gone: every open then fails with `ServerGone`, and
    /// the owner should connect a new client (views already open keep their bytes).
    pub fn is_gone(&self) -> bool {
        relock(&self.link).gone
    }
}

#[cfg(test)]
mod tests;
