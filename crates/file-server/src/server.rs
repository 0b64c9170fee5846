//! The file server: one thread that owns the cache, publishes the shared directory, and answers
//! readers' misses over m2m channels.
//!
//! A file is cached as chunks (`chunk_size` bytes each; most files are one chunk), each in its
//! own sealed segment. The cache keeps at most `cache_bytes` of segments and evicts with CLOCK
//! (a chunk asked for again since the hand last passed is spared once). Evicting a chunk removes
//! its directory entry and drops the server's mapping; readers that still map the segment keep
//! the bytes alive — the kernel frees them when the last mapping goes, including when a reader
//! dies holding it. Cached files are re-checked (size, modification time, inode) every
//! `revalidate_every`, and changed or deleted ones are retired from the directory.
//!
//! A file larger than the by-reference threshold ([`FileServerConfig::by_reference_above`]) is
//! never copied: the server opens it beneath the root and passes the read-only descriptor, which
//! the reader reads with `pread` and the TCP server sends with `sendfile` from the page cache.
//! So a file never takes more of the cache than the threshold, whatever its size, and a HEAD
//! of a 4 GiB file costs an `openat2` and a descriptor message. A file of several chunks below
//! it is described by `Lookup` without being loaded; each chunk is loaded when a reader asks.

use crate::directory::{DirectoryWriter, Entry};
use crate::path::{OpenError, Root};
use crate::proto::{FailCode, Reply, Request, DIRECTORY_TAG};
use rustix::fd::AsFd;
use splitos_m2m::segment::{Segment, Version};
use splitos_m2m::{Channel, Incoming, Listener, ListenerConfig, Message, WaitPolicy};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod changes;

#[derive(Clone, Debug)]
pub struct FileServerConfig {
    /// The directory whose files are served; nothing outside it ever is.
    pub root: PathBuf,
    /// Unix socket readers connect to.
    pub socket: PathBuf,
    /// Most bytes of file contents kept cached.
    pub cache_bytes: u64,
    /// Files are cached in chunks of this many bytes.
    pub chunk_size: u64,
    /// Files larger than this are passed by reference (a descriptor of the file itself) and
    /// never copied into the cache. `None`: the smaller of 4 chunks and 1/8 of the cache (see
    /// [`FileServerConfig::by_reference_threshold`]).
    pub by_reference_above: Option<u64>,
    /// Slots in the shared directory.
    pub directory_slots: usize,
    pub max_sessions: usize,
    /// How often cached files are checked for changes.
    pub revalidate_every: Duration,
    /// Most directories watched with inotify at once (each watch counts against the user's
    /// `fs.inotify.max_user_watches`, shared with their other programs). A directory is
    /// watched while it holds a cached file or a recorded absence; beyond the limit, changes
    /// are found by revalidation, and absences are not published (nothing would retract them).
    pub max_watches: usize,
    /// Whether paths may cross into file systems mounted beneath the root. Off: a file on
    /// another mount (a bind mount of somewhere else) is refused as leaving the root.
    pub follow_mounts: bool,
}

impl FileServerConfig {
    pub fn new(root: PathBuf, socket: PathBuf) -> FileServerConfig {
        FileServerConfig {
            root,
            socket,
            cache_bytes: 256 << 20,
            chunk_size: 4 << 20,
            by_reference_above: None,
            directory_slots: 16384,
            max_sessions: 1024,
            revalidate_every: Duration::from_millis(500),
            max_watches: 4096,
            follow_mounts: false,
        }
    }
}

impl FileServerConfig {
    /// The size above which a file is passed by reference. By default the smaller of:
    ///
    /// - 4 chunks: copying a large file buys nothing over `sendfile` from the page cache (both
    ///   hand pages to the socket by reference) and costs a full read of it up front, shared
    ///   memory that cannot be reclaimed, and a cache flush; a copy pays off for small, hot files
    ///   (immutable versions, the TCP server's direct path, no `open` per request), and a few
    ///   chunks cover those;
    /// - 1/8 of the cache: no single file may take more than that, so a request for one big
    ///   file cannot evict most of the cache.
    pub fn by_reference_threshold(&self) -> u64 {
        self.by_reference_above
            .unwrap_or_else(|| (4 * self.chunk_size).min(self.cache_bytes / 8))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot serve {path}: {source}")]
    Root { path: PathBuf, source: OpenError },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Channel(#[from] splitos_m2m::Error),
    #[error(transparent)]
    Directory(#[from] crate::directory::DirectoryError),
    #[error("starting the server thread: {0}")]
    Thread(std::io::Error),
}

/// Counters, readable while the server runs.
#[derive(Default, Debug)]
pub struct Stats {
    pub requests: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    pub retired: AtomicU64,
    pub cached_bytes: AtomicU64,
    /// Opens answered with a descriptor of the file itself (files above the threshold).
    pub by_reference: AtomicU64,
    /// Cached chunks that found no slot in the directory (their probe window full of other
    /// files' chunks, absences already displaced): readers ask for them every time.
    pub unpublished: AtomicU64,
    /// Entries in the eviction (CLOCK) queue: at most about twice the cached chunks.
    pub clock_entries: AtomicU64,
}

pub struct FileServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
}

impl FileServer {
    pub fn start(cfg: FileServerConfig) -> Result<FileServer, ServerError> {
        if cfg.chunk_size < 4096 || cfg.chunk_size > (1 << 30) {
            return Err(ServerError::Config(
                "chunk size must be 4 KiB to 1 GiB".into(),
            ));
        }
        let root = Root::open_dir_with(&cfg.root, cfg.follow_mounts).map_err(|source| {
            ServerError::Root {
                path: cfg.root.clone(),
                source,
            }
        })?;
        let listener = Listener::bind(
            &cfg.socket,
            ListenerConfig {
                max_ring_bytes: 64 << 10,
                max_buf_size: 4096,
                max_buf_count: 1,
                handshake_timeout: HANDSHAKE_TIMEOUT,
                wait: WaitPolicy::Block,
                ..ListenerConfig::default()
            },
        )?;
        listener.set_nonblocking(true)?;
        let directory = DirectoryWriter::create(cfg.directory_slots)?;
        // Changes are noticed through inotify where it is available, and by revalidation always.
        let inotify = rustix::fs::inotify::init(
            rustix::fs::inotify::CreateFlags::CLOEXEC | rustix::fs::inotify::CreateFlags::NONBLOCK,
        )
        .map_err(|e| tracing::warn!("inotify unavailable ({e}); relying on revalidation"))
        .ok();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let by_reference_above = cfg.by_reference_threshold();
        let mut state = State {
            by_reference_above,
            cfg,
            root,
            listener,
            directory,
            sessions: Vec::new(),
            pending: VecDeque::new(),
            cache: BTreeMap::new(),
            clock: VecDeque::new(),
            revalidated_to: None,
            absent_revalidated_to: None,
            bytes: 0,
            next_id: 1,
            stats: stats.clone(),
            out: Vec::new(),
            inotify,
            watches: HashMap::new(),
            watched_dirs: HashMap::new(),
            dir_users: HashMap::new(),
            absent: BTreeSet::new(),
            absent_order: VecDeque::new(),
        };
        let s2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("splitos-files".into())
            .spawn(move || state.run(&s2))
            .map_err(ServerError::Thread)?;
        Ok(FileServer {
            stop,
            thread: Some(thread),
            stats,
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

type Key = (String, u32);

struct Cached {
    id: u64,
    segment: Segment,
    referenced: bool,
}

struct State {
    cfg: FileServerConfig,
    by_reference_above: u64,
    root: Root,
    listener: Listener,
    directory: DirectoryWriter,
    sessions: Vec<Channel>,
    /// Connections whose hello has not arrived, oldest first, with their deadlines.
    pending: VecDeque<(Incoming, Instant)>,
    /// Ordered, so that revalidation can go round it in laps (see `revalidate`).
    cache: BTreeMap<Key, Cached>,
    /// The CLOCK queue: (key, id of the chunk pushed). An entry whose key has been dropped or
    /// cached again since (another id) is stale: skipped when it comes up, and compacted away
    /// when stale ones could outnumber live ones.
    clock: VecDeque<(Key, u64)>,
    /// Where the last revalidation pass stopped (`None`: start from the first key).
    revalidated_to: Option<Key>,
    absent_revalidated_to: Option<String>,
    bytes: u64,
    next_id: u64,
    stats: Arc<Stats>,
    out: Vec<u8>,
    inotify: Option<rustix::fd::OwnedFd>,
    /// Watched directories (relative to the root, "" for the root) by watch descriptor.
    watches: HashMap<i32, String>,
    watched_dirs: HashMap<String, i32>,
    /// Cached chunks and recorded absences per directory: its watch goes with the last.
    dir_users: HashMap<String, usize>,
    /// Paths published as absent, oldest first (bounded by `max_absent`).
    absent: BTreeSet<String>,
    absent_order: VecDeque<String>,
}

/// Cached chunks (and as many absences) re-checked per revalidation pass; the next pass goes on
/// from where this one stopped, so every one is checked within `n / 4096 + 1` passes.
const REVALIDATE_BATCH: usize = 4096;

/// How long a connecting reader may take to say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(500);
/// Connections waiting for their hello at most; past it the oldest is dropped, so silent
/// connections cannot hold every place (a real reader's hello follows its connect at once).
const MAX_PENDING: usize = 64;

/// Absent paths recorded at most, as a share of the directory's slots: they must never crowd
/// out the entries of cached files.
const ABSENT_SHARE: usize = 8;

/// The directory part of a normalized relative path ("" for the root).
fn dir_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(d, _)| d)
}

fn fail_code(e: &OpenError) -> FailCode {
    match e {
        OpenError::Path(_) => FailCode::BadPath,
        OpenError::NotFound => FailCode::NotFound,
        OpenError::Escapes => FailCode::Escapes,
        OpenError::Directory => FailCode::Directory,
        OpenError::Special => FailCode::Special,
        OpenError::Denied => FailCode::Denied,
        OpenError::Io(_) => FailCode::Io,
    }
}

impl State {
    fn run(&mut self, stop: &AtomicBool) {
        let mut next_check = Instant::now() + self.cfg.revalidate_every;
        while !stop.load(Ordering::Acquire) {
            let mut work = self.accept();
            work += self.handshakes();
            let mut i = 0;
            while i < self.sessions.len() {
                match self.serve(i) {
                    Ok(n) => {
                        work += n;
                        i += 1;
                    }
                    Err(e) => {
                        tracing::debug!("dropping a file server reader: {e}");
                        self.sessions.swap_remove(i);
                    }
                }
            }
            work += self.file_changes();
            if Instant::now() >= next_check {
                self.revalidate();
                next_check = Instant::now() + self.cfg.revalidate_every;
            }
            if work == 0 {
                self.sleep(next_check);
            }
        }
    }

    fn sleep(&mut self, until: Instant) {
        let mut armed = true;
        for s in &mut self.sessions {
            armed &= s.prepare_wait().unwrap_or(false);
        }
        if armed {
            let mut fds: Vec<rustix::event::PollFd<'_>> =
                Vec::with_capacity(self.sessions.len() + self.pending.len() + 2);
            fds.push(rustix::event::PollFd::new(
                &self.listener,
                rustix::event::PollFlags::IN,
            ));
            for s in &self.sessions {
                fds.push(rustix::event::PollFd::from_borrowed_fd(
                    s.wait_fd(),
                    rustix::event::PollFlags::IN,
                ));
            }
            // A change to a watched file wakes the loop at once, not at the next tick.
            if let Some(ino) = &self.inotify {
                fds.push(rustix::event::PollFd::new(
                    ino,
                    rustix::event::PollFlags::IN,
                ));
            }
            // A hello arriving wakes the loop; the oldest deadline ends the sleep.
            for (inc, _) in &self.pending {
                fds.push(rustix::event::PollFd::new(
                    inc,
                    rustix::event::PollFlags::IN,
                ));
            }
            let until = self.pending.front().map_or(until, |(_, d)| until.min(*d));
            let t = until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            let ts = rustix::time::Timespec {
                tv_sec: t.as_secs() as i64,
                tv_nsec: t.subsec_nanos() as _,
            };
            let _ = rustix::event::poll(&mut fds, Some(&ts));
        }
        for s in &mut self.sessions {
            s.finish_wait();
        }
    }

    /// Takes new connections. None is set up here: its handshake waits in `pending` until its
    /// hello arrives (see `handshakes`), so a connection that says nothing costs this thread
    /// nothing.
    fn accept(&mut self) -> usize {
        let mut n = 0;
        while let Ok(incoming) = self.listener.accept() {
            n += 1;
            if self.sessions.len() + self.pending.len() >= self.cfg.max_sessions {
                // A fresh socket's buffer is empty: the refusal does not wait.
                let _ = incoming.reject("the file server has its maximum number of readers");
                continue;
            }
            if self.pending.len() >= MAX_PENDING {
                self.pending.pop_front(); // the oldest silent one goes
            }
            self.pending
                .push_back((incoming, Instant::now() + HANDSHAKE_TIMEOUT));
        }
        n
    }

    /// Sets up the pending connections whose hello has arrived (then `establish` reads it at
    /// once, and its reply fits the fresh socket's empty buffer), and drops those past their
    /// deadline. Never waits.
    fn handshakes(&mut self) -> usize {
        if self.pending.is_empty() {
            return 0;
        }
        let ready: Vec<bool> = {
            let mut fds: Vec<rustix::event::PollFd<'_>> = self
                .pending
                .iter()
                .map(|(inc, _)| rustix::event::PollFd::new(inc, rustix::event::PollFlags::IN))
                .collect();
            let zero = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            if rustix::event::poll(&mut fds, Some(&zero)).is_err() {
                return 0;
            }
            // Readable, hung up or failed: either way `establish` will not wait.
            fds.iter().map(|f| !f.revents().is_empty()).collect()
        };
        let now = Instant::now();
        let mut n = 0;
        let mut waiting = VecDeque::with_capacity(self.pending.len());
        for ((incoming, deadline), ready) in
            std::mem::take(&mut self.pending).into_iter().zip(ready)
        {
            if !ready {
                if now < deadline {
                    waiting.push_back((incoming, deadline));
                }
                continue; // past its deadline: dropped (closed)
            }
            n += 1;
            let Ok(mut chan) = incoming.establish() else {
                continue;
            };
            if chan.send_fds(DIRECTORY_TAG, &[self.directory.fd()]).is_ok() {
                self.sessions.push(chan);
            }
        }
        self.pending = waiting;
        n
    }

    fn serve(&mut self, i: usize) -> Result<usize, splitos_m2m::Error> {
        let mut n = 0;
        let mut req_buf = Vec::new();
        while n < 64 {
            req_buf.clear();
            match self.sessions[i].try_recv()? {
                None => break,
                Some(Message::Inline(b)) => req_buf.extend_from_slice(b),
                Some(Message::Buffer(_)) => {} // not part of the protocol: ignored (returned)
            }
            n += 1;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let reply = match Request::decode(&req_buf) {
                Err(e) => {
                    tracing::debug!("session {i}: undecodable request: {e}");
                    // Answered under its id if it has one, so the reader stays in step.
                    let req = req_buf
                        .get(1..5)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u32::from_le_bytes);
                    Reply::Failed {
                        req,
                        code: FailCode::BadRequest,
                    }
                }
                Ok(Request::Open(open)) => {
                    let path = open.path.to_string();
                    self.open(i, open.req, &path, open.chunk, false)?
                }
                Ok(Request::Lookup(l)) => {
                    let path = l.path.to_string();
                    self.open(i, l.req, &path, 0, true)?
                }
            };
            self.out.clear();
            reply.encode(&mut self.out);
            let out = std::mem::take(&mut self.out);
            let r = self.sessions[i].send(&out);
            self.out = out;
            r?;
        }
        Ok(n)
    }

    /// Serves chunk `chunk` of `path`: from the cache if its version is current, else loaded.
    /// A `lookup` (the reader's first question) of a file of several chunks loads none and
    /// describes the file; a file above the by-reference threshold is passed as itself.
    fn open(
        &mut self,
        session: usize,
        req: u32,
        path: &str,
        chunk: u32,
        lookup: bool,
    ) -> Result<Reply, splitos_m2m::Error> {
        let opened = match self.root.open(path) {
            Ok(o) => o,
            Err(e) => {
                if matches!(e, OpenError::NotFound) && chunk == 0 {
                    self.note_absent(path);
                }
                return Ok(Reply::Failed {
                    req,
                    code: fail_code(&e),
                });
            }
        };
        let version = Version::of(&opened.stat);
        // A file on FUSE is copied as before: a TCP server refuses such descriptors (a FUSE
        // daemon can hold a read forever), and the copy is made here, where that wait is ours.
        if version.size > self.by_reference_above
            && !splitos_m2m::segment::on_fuse(opened.fd.as_fd())
        {
            return self.by_reference(session, req, opened, version);
        }
        let cs = self.cfg.chunk_size;
        let chunks = version.size.div_ceil(cs).max(1);
        if chunk as u64 >= chunks {
            return Ok(Reply::Failed {
                req,
                code: FailCode::BadRequest,
            });
        }
        if lookup && chunks > 1 {
            return Ok(Reply::Info {
                req,
                chunk_size: cs,
                file_size: version.size,
                mtime_ns: version.mtime_ns as i64,
                ino: version.ino,
            });
        }
        let key = (opened.path.clone(), chunk);
        let current = self
            .cache
            .get(&key)
            .is_some_and(|c| c.segment.version() == version);
        if current {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            let segment = match Segment::load_range(&opened, chunk as u64 * cs, cs) {
                Ok(s) => s,
                Err(e) => {
                    let code = match e {
                        splitos_m2m::segment::SegmentError::Unstable => FailCode::Unstable,
                        _ => FailCode::Io,
                    };
                    return Ok(Reply::Failed { req, code });
                }
            };
            if segment.len() > self.cfg.cache_bytes {
                // Larger than the whole cache: served this once, never kept.
                let id = self.next_id;
                self.next_id += 1;
                self.sessions[session].send_fds(id, &[segment.fd()])?;
                return Ok(opened_reply(req, id, chunk, cs, &segment));
            }
            self.insert(key.clone(), segment);
        }
        let Some(c) = self.cache.get_mut(&key) else {
            return Ok(Reply::Failed {
                req,
                code: FailCode::Io,
            });
        };
        c.referenced = true;
        let (id, reply) = (c.id, opened_reply(req, c.id, chunk, cs, &c.segment));
        let fd = c
            .segment
            .fd()
            .try_clone_to_owned()
            .map_err(|e| splitos_m2m::Error::Io {
                context: "duplicating a segment",
                source: e,
            })?;
        self.sessions[session].send_fds(id, &[fd.as_fd()])?;
        Ok(reply)
    }

    /// Passes `opened` itself to the reader: a descriptor opened read-only beneath the root.
    fn by_reference(
        &mut self,
        session: usize,
        req: u32,
        opened: crate::path::Opened,
        version: Version,
    ) -> Result<Reply, splitos_m2m::Error> {
        // Readers of large files read them start to end: a larger readahead window (it belongs
        // to the open file, which the descriptor shares) serves `sendfile` from the page cache.
        let _ = rustix::fs::fadvise(&opened.fd, 0, None, rustix::fs::Advice::Sequential);
        let id = self.next_id;
        self.next_id += 1;
        self.sessions[session].send_fds(id, &[opened.fd.as_fd()])?;
        self.stats.by_reference.fetch_add(1, Ordering::Relaxed);
        Ok(Reply::OpenedFile {
            req,
            id,
            file_size: version.size,
            mtime_ns: version.mtime_ns as i64,
            ino: version.ino,
        })
    }

    /// Publishes that `path` does not exist, if a change to it would be noticed: its directory
    /// is watched first and the path checked again after, so a file created in between is
    /// either seen by the check or reported by inotify.
    fn note_absent(&mut self, path: &str) {
        let Ok(path) = crate::path::normalize(path) else {
            return;
        };
        if self.absent.contains(&path) || path.len() > crate::directory::MAX_KEY_PATH {
            return;
        }
        let dir = dir_of(&path).to_string();
        self.use_dir(&dir);
        // No inotify, no watch to spare, or the directory is missing too: nothing would
        // retract it. Or the file is there after all.
        if !self.watched_dirs.contains_key(&dir)
            || !matches!(self.root.open(&path), Err(OpenError::NotFound))
        {
            self.release_dir(&dir);
            return;
        }
        let max = (self.cfg.directory_slots / ABSENT_SHARE).max(1);
        while self.absent.len() >= max {
            let Some(old) = self.absent_order.pop_front() else {
                break;
            };
            self.forget_absent(&old);
        }
        if self.directory.publish(&Entry::absent(&path)) {
            self.absent.insert(path.clone());
            self.absent_order.push_back(path);
        } else {
            self.release_dir(&dir);
        }
    }

    /// Retracts the absence of `path`, if published.
    fn forget_absent(&mut self, path: &str) {
        if self.absent.remove(path) {
            self.directory.remove(path, 0);
            self.release_dir(dir_of(path));
            // `absent_order` keeps the stale name; it is skipped when it comes up.
            if self.absent_order.len() > 2 * self.absent.len() + 64 {
                let live = &self.absent;
                self.absent_order.retain(|p| live.contains(p));
            }
        }
    }

    fn insert(&mut self, key: Key, segment: Segment) {
        self.forget_absent(&key.0);
        self.uncache(&key);
        let len = segment.len();
        while self.bytes + len > self.cfg.cache_bytes {
            let Some((k, id)) = self.clock.pop_front() else {
                break;
            };
            match self.cache.get_mut(&k) {
                Some(c) if c.id != id => {} // stale: cached again since, under a newer entry
                Some(c) if c.referenced => {
                    c.referenced = false;
                    self.clock.push_back((k, id));
                }
                Some(_) => {
                    self.uncache(&k);
                    self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                }
                None => {} // retired or replaced
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let v = segment.version();
        self.publish_cached(&Entry {
            id,
            path: key.0.clone(),
            chunk: key.1,
            chunk_len: len as u32,
            file_size: v.size,
            mtime_ns: v.mtime_ns as i64,
            ino: v.ino,
            content_type: splitos_http::mime::code(&key.0),
        });
        self.bytes += len;
        self.cache.insert(
            key.clone(),
            Cached {
                id,
                segment,
                referenced: false,
            },
        );
        self.use_dir(dir_of(&key.0));
        self.clock.push_back((key, id));
        // Entries of chunks retired or re-cached stay until they come up; while the cache is
        // under budget nothing comes up, so they are swept here before they can pile up.
        if self.clock.len() > 2 * self.cache.len() + 64 {
            let cache = &self.cache;
            self.clock
                .retain(|(k, id)| cache.get(k).is_some_and(|c| c.id == *id));
        }
        self.publish_stats();
    }

    /// Publishes a cached chunk's entry. Absences in its probe window give way to it (they are
    /// only an optimisation for misses; a cached file's entry is what readers hit). One that
    /// still finds no slot is counted and logged, never silently dropped: readers then miss
    /// and ask, and are answered from the cache.
    fn publish_cached(&mut self, e: &Entry) {
        if e.path.len() > crate::directory::MAX_KEY_PATH || self.directory.publish(e) {
            return; // published, or a path too long for any slot (served, never listed)
        }
        for absent in self.directory.absences_in_window(&e.path, e.chunk) {
            self.forget_absent(&absent);
        }
        if !self.directory.publish(e) {
            self.stats.unpublished.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                path = e.path,
                chunk = e.chunk,
                "no directory slot for a cached chunk"
            );
        }
    }

    /// Drops a cached chunk: its bytes, its directory entry, its claim on its directory's
    /// watch. Whether it was cached.
    fn uncache(&mut self, key: &Key) -> bool {
        let Some(c) = self.cache.remove(key) else {
            return false;
        };
        self.bytes -= c.segment.len();
        self.directory.remove(&key.0, key.1);
        self.release_dir(dir_of(&key.0));
        true
    }

    fn publish_stats(&self) {
        self.stats.cached_bytes.store(self.bytes, Ordering::Relaxed);
        self.stats
            .clock_entries
            .store(self.clock.len() as u64, Ordering::Relaxed);
    }
}

fn opened_reply(req: u32, id: u64, chunk: u32, chunk_size: u64, s: &Segment) -> Reply {
    let v = s.version();
    Reply::Opened {
        req,
        id,
        chunk,
        chunk_len: s.len(),
        chunk_size,
        file_size: v.size,
        mtime_ns: v.mtime_ns as i64,
        ino: v.ino,
    }
}
