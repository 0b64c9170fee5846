//! What the TCP server's integration tests share: a server in this process, and `RawApp`, an
//! application that speaks the protocol by hand (so a test can play a hostile one).

#![allow(dead_code)] // each test binary uses its own part of this

use splitos_m2m::{Channel, ChannelConfig, Message, WaitPolicy};
use splitos_tcp_proto::{BufferMeta, Event, Handle, Request};
use splitos_tcp_server::{ServerConfig, TcpServer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const T: Duration = Duration::from_secs(10);

/// The server removes its socket and statistics files when it stops.
pub fn socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "splitos-srv-test-{}-{tag}.sock",
        std::process::id()
    ))
}

pub fn server(tag: &str) -> TcpServer {
    server_with(tag, WaitPolicy::Block)
}

pub fn server_with(tag: &str, wait: WaitPolicy) -> TcpServer {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    TcpServer::start(ServerConfig {
        socket: socket_path(tag),
        threads: 2,
        wait,
        persist_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    })
    .expect("server starts")
}

/// An event with its payload copied out of the ring.
#[derive(Debug, PartialEq, Eq)]
pub enum Ev {
    Done(u32, Handle, SocketAddr, SocketAddr),
    Failed(u32, i32),
    Accepted(Handle, Handle, SocketAddr),
    Data(Handle, Vec<u8>),
    Eof(Handle),
    Sent(Handle, u32),
    Error(Handle, i32),
    Closed(Handle),
    ProtocolError(u8, i32),
    Paused(Handle),
}

/// A minimal application speaking the protocol by hand.
pub struct RawApp {
    pub chan: Channel,
    pub req: u32,
    buf: Vec<u8>,
}

impl RawApp {
    pub fn connect(path: &Path) -> RawApp {
        RawApp::connect_with(
            path,
            ChannelConfig {
                wait: WaitPolicy::adaptive(),
                ..ChannelConfig::default()
            },
        )
    }

    pub fn connect_with(path: &Path, config: ChannelConfig) -> RawApp {
        let chan = Channel::connect(path, config).expect("connect to server");
        RawApp {
            chan,
            req: 0,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, r: Request<'_>) {
        self.try_send(r).expect("send request");
    }

    /// Sends a request; the channel's error if the server has dropped this session.
    pub fn try_send(&mut self, r: Request<'_>) -> Result<(), splitos_m2m::Error> {
        self.buf.clear();
        r.encode(&mut self.buf);
        let b = std::mem::take(&mut self.buf);
        let sent = self.chan.send(&b);
        self.buf = b;
        sent
    }

    pub fn event(&mut self) -> Ev {
        let m = self
            .chan
            .recv_timeout(T)
            .expect("channel alive")
            .expect("an event within 10 s");
        decode(m)
    }

    /// Next event that is not a send confirmation.
    pub fn event_skip_sent(&mut self) -> Ev {
        loop {
            match self.event() {
                Ev::Sent(..) => {}
                e => return e,
            }
        }
    }

    pub fn listen(&mut self, addr: &str, flags: u32) -> Result<(Handle, SocketAddr), i32> {
        self.req += 1;
        let req = self.req;
        self.send(Request::Listen {
            req,
            addr: addr.parse().unwrap(),
            backlog: 1024,
            flags,
        });
        match self.event() {
            Ev::Done(r, h, local, _) if r == req => Ok((h, local)),
            Ev::Failed(r, errno) if r == req => Err(errno),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Reads `n` bytes of connection `h`, acknowledging them.
    pub fn read_exact(&mut self, h: Handle, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            match self.event_skip_sent() {
                Ev::Data(dh, d) if dh == h => {
                    self.send(Request::Consumed {
                        handle: h,
                        bytes: d.len() as u32,
                    });
                    got.extend(d);
                }
                other => panic!("unexpected {other:?} while reading"),
            }
        }
        got
    }
}

/// The configuration `server` uses, for a test to adjust.
pub fn config(tag: &str) -> ServerConfig {
    ServerConfig {
        socket: socket_path(tag),
        threads: 2,
        wait: WaitPolicy::Block,
        persist_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    }
}

pub fn start(config: ServerConfig) -> TcpServer {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    TcpServer::start(config).expect("server starts")
}

impl RawApp {
    /// A listen that skips whatever other events come first (a busy session's data): whether
    /// it succeeded, within `T`.
    pub fn listen_amid_traffic(&mut self, addr: &str) -> bool {
        self.req += 1;
        let req = self.req;
        self.send(Request::Listen {
            req,
            addr: addr.parse().unwrap(),
            backlog: 16,
            flags: 0,
        });
        matches!(
            self.wait_for(
                T,
                |e| matches!(e, Ev::Done(r, ..) | Ev::Failed(r, _) if *r == req)
            ),
            Some(Ev::Done(..))
        )
    }

    /// The next `Accepted` (skipping send credit): the new connection's handle.
    pub fn accepted(&mut self) -> Handle {
        match self.event_skip_sent() {
            Ev::Accepted(_, c, _) => c,
            other => panic!("expected Accepted, got {other:?}"),
        }
    }

    /// Events until `want` matches one (skipping the others), for at most `within`; the
    /// matching event, or `None` if time ran out or the channel ended.
    pub fn wait_for(&mut self, within: Duration, want: impl Fn(&Ev) -> bool) -> Option<Ev> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let ev = match self.chan.recv_timeout(left) {
                Ok(Some(m)) => decode(m),
                Ok(None) | Err(_) => return None,
            };
            if want(&ev) {
                return Some(ev);
            }
        }
    }
}

fn decode(m: Message<'_>) -> Ev {
    match m {
        Message::Inline(b) => match Event::decode(b).expect("server sent a valid event") {
            Event::Done {
                req,
                handle,
                local,
                peer,
            } => Ev::Done(req, handle, local, peer),
            Event::Failed { req, errno } => Ev::Failed(req, errno),
            Event::Accepted {
                listener,
                conn,
                peer,
                ..
            } => Ev::Accepted(listener, conn, peer),
            Event::Data { handle, data } => Ev::Data(handle, data.to_vec()),
            Event::Eof { handle } => Ev::Eof(handle),
            Event::Sent { handle, bytes } => Ev::Sent(handle, bytes),
            Event::Error { handle, errno } => Ev::Error(handle, errno),
            Event::Closed { handle } => Ev::Closed(handle),
            Event::ProtocolError { op, errno } => Ev::ProtocolError(op, errno),
            Event::Paused { handle } => Ev::Paused(handle),
        },
        Message::Buffer(rx) => match BufferMeta::decode(rx.meta()) {
            Ok(BufferMeta::Data(h)) => Ev::Data(h, rx.to_vec()),
            other => panic!("unexpected buffer meta {other:?}"),
        },
    }
}

/// Resident memory of a process, from /proc.
pub fn rss_bytes(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

pub fn count_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A server in a process of its own (so that its memory and descriptors can be measured
/// alone), until the returned child's stdin closes. The calling test binary must have a test
/// named `server_process_entry` that calls [`server_process_main`]. `env` adjusts it:
/// `SERVER_SOCKET_MODE` (octal), `SERVER_TOY_DIRECT` (the direct path answered by
/// [`ToyDirect`]), `SERVER_NOFILE` (a soft descriptor limit set before it starts;
/// the hard one too if `SERVER_NOFILE_HARD` is set), `SERVER_LIMITS` (`--limit` settings,
/// comma-separated), `SERVER_THREADS`. A server that fails to start says so on stderr
/// (`START FAILED: ...`) and exits with status 3.
/// Removes a server's socket and statistics file when dropped: for servers a test kills.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(splitos_tcp_server::stats::stats_path(&self.0));
    }
}

pub fn spawn_server_process(tag: &str, env: &[(&str, &str)]) -> (std::process::Child, PathBuf) {
    use std::process::{Command, Stdio};
    let path = socket_path(tag);
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "server_process_entry",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("SERVER_SOCKET", &path)
    .stdin(Stdio::piped())
    .stdout(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn the server process");
    let deadline = std::time::Instant::now() + T;
    while splitos_tcp_server::stats::read(&path).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "server process did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, path)
}

/// The body of a test binary's `server_process_entry` (see [`spawn_server_process`]); does
/// nothing when not run as one.
pub fn server_process_main() {
    use std::io::Read;
    let Some(socket) = std::env::var_os("SERVER_SOCKET") else {
        return;
    };
    let env = |k: &str| std::env::var(k).ok();
    if let Some(n) = env("SERVER_NOFILE").and_then(|v| v.parse::<u64>().ok()) {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let mut l = getrlimit(Resource::Nofile);
        l.current = Some(n);
        if env("SERVER_NOFILE_HARD").is_some() {
            l.maximum = Some(n);
        }
        setrlimit(Resource::Nofile, l).expect("lower the descriptor limit");
    }
    let mut config = ServerConfig {
        socket: PathBuf::from(socket),
        threads: env("SERVER_THREADS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
        wait: WaitPolicy::Block,
        persist_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    };
    if let Some(m) = env("SERVER_SOCKET_MODE").and_then(|v| u32::from_str_radix(&v, 8).ok()) {
        config.socket_mode = m;
    }
    if env("SERVER_TOY_DIRECT").is_some() {
        config.direct = Some(std::sync::Arc::new(ToyDirect::new()));
    }
    for l in env("SERVER_LIMITS").iter().flat_map(|v| v.split(',')) {
        config.budgets.set(&l.parse().expect("a valid limit"));
    }
    let srv = match TcpServer::start(config) {
        Ok(srv) => srv,
        Err(e) => {
            eprintln!("START FAILED: {e}");
            std::process::exit(3);
        }
    };
    let mut b = [0u8; 1];
    let _ = std::io::stdin().read(&mut b); // until the parent closes stdin
    srv.shutdown();
}

/// An application that speaks m2m itself, straight on the shared region (the documented wire
/// format, as `crates/m2m/tests/cross_process.rs` does): it can do what the `Channel` API never
/// lets a well-behaved peer do, such as declaring itself gone and writing on.
pub struct RawPeer {
    sock: std::os::unix::net::UnixStream,
    map: memmap2::MmapRaw,
    /// The server's doorbell (an eventfd).
    bell: rustix::fd::OwnedFd,
    ring: u64,
    ring_ctl: usize,
    ring_data: usize,
    tail: u64,
}

impl RawPeer {
    /// Connects asking for a `ring_bytes` request ring (the server may grant less).
    pub fn connect(path: &Path, ring_bytes: u64) -> RawPeer {
        use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        use splitos_m2m::layout::{self, Layout, Params};
        use std::io::Write;
        use std::mem::MaybeUninit;
        let mut sock = std::os::unix::net::UnixStream::connect(path).expect("connect");
        let mut hello = [0u8; 64];
        hello[..8].copy_from_slice(b"SPOSHELO");
        hello[8..12].copy_from_slice(&layout::VERSION.to_le_bytes());
        hello[16..24].copy_from_slice(&ring_bytes.to_le_bytes());
        hello[24..32].copy_from_slice(&4096u64.to_le_bytes());
        hello[32..40].copy_from_slice(&4u64.to_le_bytes());
        sock.write_all(&hello).expect("hello");
        let mut reply = [0u8; 128];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(3))];
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        recvmsg(
            &sock,
            &mut [std::io::IoSliceMut::new(&mut reply)],
            &mut anc,
            RecvFlags::empty(),
        )
        .expect("reply");
        let mut fds = Vec::new();
        for m in anc.drain() {
            if let RecvAncillaryMessage::ScmRights(r) = m {
                fds.extend(r);
            }
        }
        assert_eq!(fds.len(), 3, "the server sent region and doorbells");
        let word = |at: usize| u64::from_le_bytes(reply[at..at + 8].try_into().unwrap());
        let params = Params {
            ring_bytes: word(16),
            buf_size: word(24),
            buf_count: word(32),
        };
        let l = Layout::new(params).expect("a valid layout");
        let map = memmap2::MmapOptions::new()
            .len(l.region_size)
            .map_raw(&fds[0])
            .expect("map the region");
        let bell = fds.swap_remove(1);
        RawPeer {
            sock,
            map,
            bell,
            ring: params.ring_bytes,
            ring_ctl: l.dirs[1].ring_ctl,
            ring_data: l.dirs[1].ring_data,
            tail: 0,
        }
    }

    fn word(&self, off: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(off % 8 == 0 && off + 8 <= self.map.len());
        // SAFETY: `off` is 8-aligned and inside the mapping, which lives as long as `self`;
        // the word is shared with the server, hence accessed atomically only.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(self.map.as_mut_ptr().add(off).cast()) }
    }

    /// Writes one request record if the ring has room; false if it is full.
    pub fn try_push(&mut self, msg: &[u8]) -> bool {
        use splitos_m2m::layout::record;
        use std::sync::atomic::Ordering;
        let footprint = record::footprint(msg.len() as u64);
        let head = self.word(self.ring_ctl).load(Ordering::Acquire);
        if self.tail - head + footprint + record::HEADER_BYTES > self.ring {
            return false;
        }
        let mask = self.ring - 1;
        let mut padded = msg.to_vec();
        padded.resize((footprint - record::HEADER_BYTES) as usize, 0);
        for (i, w) in padded.chunks(8).enumerate() {
            let at = (self.tail + record::HEADER_BYTES + 8 * i as u64) & mask;
            let v = u64::from_le_bytes(w.try_into().unwrap());
            self.word(self.ring_data + at as usize)
                .store(v, Ordering::Relaxed);
        }
        let next = self.tail + footprint;
        self.word(self.ring_data + (next & mask) as usize)
            .store(0, Ordering::Relaxed);
        let header = record::encode(record::KIND_INLINE, msg.len() as u32, self.tail);
        self.word(self.ring_data + (self.tail & mask) as usize)
            .store(header, Ordering::Release);
        self.tail = next;
        true
    }

    pub fn push_request(&mut self, r: Request<'_>) -> bool {
        let mut b = Vec::new();
        r.encode(&mut b);
        self.try_push(&b)
    }

    /// Wakes the server's event loop.
    pub fn ring_bell(&self) {
        let _ = rustix::io::write(&self.bell, &1u64.to_ne_bytes());
    }

    /// Sets this side's CLOSED word: to the server, this application has left.
    pub fn declare_closed(&self) {
        use splitos_m2m::layout::header;
        self.word(header::side_state(1) + header::CLOSED)
            .store(1, std::sync::atomic::Ordering::Release);
    }

    /// Whether the server has closed the channel (its end of the setup socket).
    pub fn dropped_by_server(&self) -> bool {
        let mut b = [0u8; 16];
        matches!(
            rustix::net::recv(
                &self.sock,
                &mut b,
                rustix::net::RecvFlags::DONTWAIT | rustix::net::RecvFlags::PEEK
            ),
            Ok((0, _))
        )
    }
}

/// A sealed memfd of `len` bytes (what `SendFile` accepts): sparse, so any size costs nothing.
pub fn sealed_memfd(len: u64) -> rustix::fd::OwnedFd {
    use rustix::fs::{fcntl_add_seals, ftruncate, memfd_create, MemfdFlags, SealFlags};
    let fd = memfd_create(
        "splitos-test",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .expect("memfd");
    ftruncate(&fd, len).expect("size the memfd");
    fcntl_add_seals(&fd, SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW).expect("seal");
    fd
}

/// Whether this process may act as other users (tests of what one user can do to another).
pub fn can_switch_users() -> bool {
    rustix::process::geteuid().is_root()
}

/// Connects a `RawApp` as user `uid`: the server sees that uid (SO_PEERCRED records the
/// credentials of the connecting thread, which switches only its own effective uid, and back).
pub fn connect_as(uid: u32, path: &Path) -> RawApp {
    use rustix::process::Uid;
    use rustix::thread::set_thread_res_uid;
    set_thread_res_uid(None, Some(Uid::from_raw(uid)), None).expect("switch the thread's uid");
    let app = Channel::connect(
        path,
        ChannelConfig {
            wait: WaitPolicy::adaptive(),
            ..ChannelConfig::default()
        },
    );
    set_thread_res_uid(None, Some(Uid::ROOT), None).expect("switch back");
    RawApp {
        chan: app.expect("connect to the server as another user"),
        req: 0,
        buf: Vec::new(),
    }
}

/// The soft "Max open files" limit of a process.
pub fn soft_fd_limit(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A direct-path responder for tests (the real one, HTTP over the file cache, lives above the
/// TCP server): each line `GET` is answered with a short head and 64 KiB of a sealed segment;
/// the first other line hands the connection to the application.
pub struct ToyDirect(std::sync::Arc<splitos_m2m::segment::Segment>);

impl ToyDirect {
    pub fn new() -> ToyDirect {
        let seg = splitos_m2m::segment::Segment::from_received_sealed(sealed_memfd(64 << 10))
            .expect("a sealed segment");
        ToyDirect(std::sync::Arc::new(seg))
    }
}

impl Default for ToyDirect {
    fn default() -> Self {
        ToyDirect::new()
    }
}

impl splitos_tcp_server::direct::DirectPath for ToyDirect {
    fn open(
        &self,
        _request: &splitos_tcp_server::direct::RouteRequest,
    ) -> Result<Box<dyn splitos_tcp_server::direct::DirectRoute>, rustix::io::Errno> {
        Ok(Box::new(ToyRoute(self.0.clone())))
    }
}

struct ToyRoute(std::sync::Arc<splitos_m2m::segment::Segment>);

impl splitos_tcp_server::direct::DirectRoute for ToyRoute {
    fn serve(
        &mut self,
        conn: &mut splitos_tcp_server::direct::DirectConn,
        room: usize,
        answered: &mut u64,
        push: &mut dyn FnMut(splitos_tcp_server::direct::DirectPart),
    ) -> splitos_tcp_server::direct::Outcome {
        use splitos_tcp_server::direct::{DirectPart, Outcome};
        let mut room = room;
        loop {
            let Some(end) = conn.pending.iter().position(|&b| b == b'\n') else {
                return Outcome::More;
            };
            if &conn.pending[..end] != b"GET" {
                return Outcome::Defer(std::mem::take(&mut conn.pending));
            }
            if room < 2 {
                return Outcome::Blocked;
            }
            conn.pending.drain(..=end);
            push(DirectPart::Bytes(b"200 64K\n".to_vec()));
            push(DirectPart::File {
                segment: self.0.clone(),
                offset: 0,
                len: self.0.len(),
            });
            room -= 2;
            *answered += 1;
        }
    }

    fn expired(
        &self,
        _conn: &splitos_tcp_server::direct::DirectConn,
        _now: std::time::Instant,
    ) -> Option<splitos_tcp_server::direct::Expiry> {
        None
    }

    fn timeout_response(&self) -> Vec<u8> {
        Vec::new()
    }
}
