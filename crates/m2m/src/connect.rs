//! Setting channels up: a listener on a Unix socket path, `Channel::connect`, and the handshake.
//!
//! The accepting side creates the region (so it alone decides how much memory a client costs,
//! within [`ListenerConfig`] limits) and sends the memfd and both doorbells with SCM_RIGHTS. The
//! kernel tells it who the client is (SO_PEERCRED) before any memory is spent, so a server can
//! refuse by uid. The socket stays open for the channel's life as the peer-death signal.
//!
//! The hello and reply formats are in [`crate::layout::handshake`].

use crate::layout::handshake::{
    Hello, Reply, HELLO_BYTES, REPLY_BYTES, STATUS_OK, STATUS_REFUSED, STATUS_VERSION,
};
use crate::layout::{self, Params};
use crate::region::Region;
use crate::runtime;
use crate::sys::{self, PeerCredentials};
use crate::{Channel, ChannelConfig, Error, WaitPolicy};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Limits and settings of the accepting side.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// Permission bits of the socket file. The default lets only the owner connect.
    pub mode: u32,
    pub max_ring_bytes: usize,
    pub max_buf_size: usize,
    pub max_buf_count: usize,
    /// How long a connecting client may take to say hello.
    pub handshake_timeout: Duration,
    /// Wait policy of the channels this listener establishes.
    pub wait: WaitPolicy,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            mode: 0o600,
            max_ring_bytes: 4 << 20,
            max_buf_size: 1 << 20,
            max_buf_count: 256,
            handshake_timeout: Duration::from_secs(2),
            wait: WaitPolicy::default(),
        }
    }
}

/// Rounds a requested size to a power of two within `[min, max]`.
fn clamp_pow2(req: u64, min: u64, max: u64) -> u64 {
    let max = if max.is_power_of_two() {
        max
    } else {
        max.next_power_of_two() / 2
    };
    req.max(min)
        .checked_next_power_of_two()
        .unwrap_or(max)
        .clamp(min, max.max(min))
}

/// A Unix-socket listener that hands out channels.
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
    config: ListenerConfig,
}

impl Listener {
    /// Binds `path`. A stale socket file left by a dead server is replaced; a live one is not.
    /// The directory must be safe for a socket ([`runtime::socket_dir`]: a missing one is
    /// created private; an existing one others may write in must be sticky), and the
    /// permission bits are set only on the socket this call made.
    pub fn bind(path: impl AsRef<Path>, config: ListenerConfig) -> Result<Listener, Error> {
        let path = path.as_ref().to_path_buf();
        runtime::socket_dir(&path)
            .map_err(|e| Error::io("checking the channel socket's directory", e))?;
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(Error::io(
                    "binding the channel socket",
                    io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a socket", path.display()),
                    ),
                ));
            }
            match UnixStream::connect(&path) {
                Ok(_) => {
                    return Err(Error::io(
                        "binding the channel socket",
                        io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("another server is listening on {}", path.display()),
                        ),
                    ))
                }
                Err(_) => {
                    std::fs::remove_file(&path)
                        .map_err(|e| Error::io("removing a stale socket file", e))?;
                }
            }
        }
        let inner =
            UnixListener::bind(&path).map_err(|e| Error::io("binding the channel socket", e))?;
        runtime::set_socket_mode(&path, config.mode)
            .map_err(|e| Error::io("setting the channel socket's permissions", e))?;
        Ok(Listener {
            inner,
            path,
            config,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next client. Only a failure of the listener itself is an error here; a
    /// misbehaving client surfaces later, from [`Incoming::establish`].
    pub fn accept(&self) -> Result<Incoming, Error> {
        loop {
            let (stream, _) = match self.inner.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("accepting a channel", e)),
            };
            // A client that vanished between connect and accept has no credentials: skip it.
            let Ok(peer) = sys::peer_credentials(&stream) else {
                continue;
            };
            return Ok(Incoming {
                stream,
                peer,
                config: self.config.clone(),
            });
        }
    }

    /// Makes `accept` return `WouldBlock` errors instead of waiting, for event loops.
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<(), Error> {
        self.inner
            .set_nonblocking(nonblocking)
            .map_err(|e| Error::io("setting the listener non-blocking", e))
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A client that has connected but has no channel yet.
#[derive(Debug)]
pub struct Incoming {
    stream: UnixStream,
    peer: PeerCredentials,
    config: ListenerConfig,
}

/// The connection's socket: it becomes readable when the client's hello has arrived (then
/// [`Incoming::establish`] does not wait), so an event loop can poll it among its others.
impl AsFd for Incoming {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl Incoming {
    /// Who is connecting, as the kernel reports it.
    pub fn peer(&self) -> PeerCredentials {
        self.peer
    }

    /// Refuses the client with a reason it will see in its error.
    pub fn reject(self, reason: &str) -> Result<(), Error> {
        self.stream
            .set_write_timeout(Some(self.config.handshake_timeout))
            .map_err(|e| Error::io("refusing a channel", e))?;
        let reply = Reply::refuse(STATUS_REFUSED, reason).encode();
        sys::send_with_fds(self.stream.as_fd(), &reply, &[])
            .map_err(|e| Error::io("refusing a channel", e))
    }

    /// Reads the client's hello, creates the region within this listener's limits, and sends
    /// it over.
    pub fn establish(self) -> Result<Channel, Error> {
        let c = &self.config;
        self.stream
            .set_read_timeout(Some(c.handshake_timeout))
            .and_then(|_| self.stream.set_write_timeout(Some(c.handshake_timeout)))
            .map_err(|e| Error::io("configuring the channel socket", e))?;
        let mut hello = [0u8; HELLO_BYTES];
        let fds = sys::recv_with_fds(self.stream.as_fd(), &mut hello).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                Error::Handshake("client sent no hello in time".into())
            } else {
                Error::Handshake(format!("reading the client's hello: {e}"))
            }
        })?;
        if !fds.is_empty() {
            return Err(Error::Handshake(
                "client sent file descriptors in its hello".into(),
            ));
        }
        let hello = Hello::decode(&hello).map_err(|e| Error::Handshake(e.to_string()))?;
        let version = hello.version;
        if version != layout::VERSION {
            let why = format!(
                "client speaks m2m version {version}, this server speaks {}",
                layout::VERSION
            );
            let refusal = Reply::refuse(STATUS_VERSION, &why).encode();
            let _ = sys::send_with_fds(self.stream.as_fd(), &refusal, &[]);
            return Err(Error::Handshake(why));
        }
        let asked = hello.params;
        let params = Params {
            ring_bytes: clamp_pow2(
                asked.ring_bytes,
                layout::MIN_RING_BYTES,
                (c.max_ring_bytes as u64).min(layout::MAX_RING_BYTES),
            ),
            buf_size: clamp_pow2(
                asked.buf_size,
                layout::MIN_BUF_SIZE,
                (c.max_buf_size as u64).min(layout::MAX_BUF_SIZE),
            ),
            buf_count: asked
                .buf_count
                .clamp(1, (c.max_buf_count as u64).min(layout::MAX_BUF_COUNT)),
        };
        let (region, memfd) = Region::create(params)?;
        let bell_mine = sys::new_eventfd().map_err(|e| Error::io("creating a doorbell", e))?;
        let bell_theirs = sys::new_eventfd().map_err(|e| Error::io("creating a doorbell", e))?;
        let ok = Reply::ok(params, region.len() as u64).encode();
        sys::send_with_fds(
            self.stream.as_fd(),
            &ok,
            &[memfd.as_fd(), bell_mine.as_fd(), bell_theirs.as_fd()],
        )
        .map_err(|e| Error::Handshake(format!("sending the region to the client: {e}")))?;
        let peer_bell = bell_theirs;
        Channel::assemble(
            Arc::new(region),
            0,
            bell_mine,
            peer_bell,
            self.stream.into(),
            c.wait,
        )
    }
}

/// The environment variable that names one more uid whose servers a client trusts, besides
/// its own and root's: a server run by a service user (`splitos tcp-server` as `splitos`,
/// shared by several users through `--socket-mode` and `--allow`).
pub const TRUST_UID_ENV: &str = "SPLITOS_SERVER_UID";

/// Whether a client running as `me` may use a server running as `server`: its own uid, root's,
/// or the one `trusted` names.
fn server_trusted(server: u32, me: u32, trusted: Option<&str>) -> bool {
    server == me
        || server == 0
        || trusted.and_then(|t| t.trim().parse::<u32>().ok()) == Some(server)
}

impl Channel {
    /// Connects to a [`Listener`] at `path`, asking for `config`'s sizes (the server may grant
    /// smaller ones).
    ///
    /// The server must run as this user or as root (or as the uid in [`TRUST_UID_ENV`]), as
    /// the kernel reports it (SO_PEERCRED): whoever can put a socket at `path` must not be
    /// able to pose as the server and read this process's traffic.
    pub fn connect(path: impl AsRef<Path>, config: ChannelConfig) -> Result<Channel, Error> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|e| Error::Io {
            context: "connecting to the channel socket",
            source: io::Error::new(e.kind(), format!("{}: {e}", path.display())),
        })?;
        let server = sys::peer_credentials(&stream)
            .map_err(|e| Error::io("asking the kernel who the server is", e))?;
        let me = rustix::process::geteuid().as_raw();
        let trusted = std::env::var(TRUST_UID_ENV).ok();
        if !server_trusted(server.uid, me, trusted.as_deref()) {
            return Err(Error::Io {
                context: "checking who the server is",
                source: io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "the server at {} runs as uid {}, not as this user (uid {me}) or root; \
                         refusing to use it (set {TRUST_UID_ENV}={} to trust that user)",
                        path.display(),
                        server.uid,
                        server.uid
                    ),
                ),
            });
        }
        let timeout = Some(Duration::from_secs(5));
        stream
            .set_read_timeout(timeout)
            .and_then(|_| stream.set_write_timeout(timeout))
            .map_err(|e| Error::io("configuring the channel socket", e))?;
        let hello = Hello {
            version: layout::VERSION,
            params: config.params(),
        }
        .encode();
        // A server that refuses may answer and close before reading our hello, so a failed send
        // is reported only if there is no reply to explain it.
        let sent = sys::send_with_fds(stream.as_fd(), &hello, &[]);
        let mut r = [0u8; REPLY_BYTES];
        let fds = match (sys::recv_with_fds(stream.as_fd(), &mut r), sent) {
            (Ok(fds), _) => fds,
            (Err(_), Err(e)) => return Err(Error::Handshake(format!("sending hello: {e}"))),
            (Err(e), Ok(())) => {
                return Err(Error::Handshake(format!("reading the server's reply: {e}")))
            }
        };
        let reply = Reply::decode(&r).map_err(|e| Error::Handshake(e.to_string()))?;
        let Reply {
            version,
            status,
            granted,
            region_size,
            reason,
        } = reply;
        match status {
            STATUS_OK if version == layout::VERSION => {}
            STATUS_OK => {
                return Err(Error::Handshake(format!(
                    "server speaks m2m version {version}, we speak {}",
                    layout::VERSION
                )))
            }
            STATUS_VERSION | STATUS_REFUSED => return Err(Error::Rejected(reason)),
            other => {
                return Err(Error::Handshake(format!(
                    "server replied with status {other}"
                )))
            }
        }
        let [memfd, bell_theirs, bell_mine]: [OwnedFd; 3] = fds
            .try_into()
            .map_err(|_| Error::Handshake("server sent the wrong number of descriptors".into()))?;
        let region = Region::open(memfd, granted)?;
        if region.len() as u64 != region_size {
            return Err(Error::Handshake(
                "server's region size disagrees with its reply".into(),
            ));
        }
        Channel::assemble(
            Arc::new(region),
            1,
            bell_mine,
            bell_theirs,
            stream.into(),
            config.wait,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_of_this_user_or_root_or_a_named_uid_are_trusted() {
        assert!(server_trusted(1000, 1000, None));
        assert!(server_trusted(0, 1000, None));
        assert!(!server_trusted(1001, 1000, None));
        assert!(server_trusted(1001, 1000, Some("1001")));
        assert!(!server_trusted(1001, 1000, Some("1002")));
        assert!(!server_trusted(1001, 1000, Some("x")));
        assert!(!server_trusted(1, 0, None), "root trusts only root");
    }

    #[test]
    fn clamp_rounds_into_range() {
        assert_eq!(clamp_pow2(0, 4096, 1 << 20), 4096);
        assert_eq!(clamp_pow2(5000, 4096, 1 << 20), 8192);
        assert_eq!(clamp_pow2(u64::MAX, 4096, 1 << 20), 1 << 20);
        assert_eq!(clamp_pow2(1 << 30, 4096, 3 << 20), 2 << 20);
    }
}
