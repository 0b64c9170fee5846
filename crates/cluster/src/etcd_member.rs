//! One etcd member of its own, as a child process: the lab's control plane (in its own
//! namespace) and the tests' (on 127.0.0.1 with a free port). A real deployment points
//! `--etcd` at an existing cluster instead; nothing else here depends on this module.
//!
//! The member runs with short raft timers (`--heartbeat-interval 10 --election-timeout
//! 100`, in milliseconds) so that a single member elects itself at once and one-second
//! leases expire on time; its data directory and log go with it: [`EtcdMember`] kills the
//! process and removes both on drop, unless [`EtcdMember::detach`]ed (the lab then records
//! them and removes them with itself).

use crate::netns::{self, NetnsError};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a new member may take to answer healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum EtcdMemberError {
    #[error("`etcd` is not installed (Debian: apt-get install -y etcd-server)")]
    Missing,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Netns(#[from] NetnsError),
    #[error("etcd at {endpoint} was not healthy within {secs} s; its log ({log}):\n{tail}")]
    Unhealthy {
        endpoint: String,
        secs: u64,
        log: PathBuf,
        tail: String,
    },
}

/// A running etcd member (see the module's comment).
#[derive(Debug)]
pub struct EtcdMember {
    child: Option<Child>,
    pid: u32,
    endpoint: String,
    data_dir: PathBuf,
    log: PathBuf,
    /// Left running on purpose: drop neither kills it nor removes its files.
    detached: bool,
}

/// A port nobody listens on at `ip` now (in the calling thread's namespace).
fn free_port(ip: IpAddr) -> std::io::Result<u16> {
    Ok(TcpListener::bind(SocketAddr::new(ip, 0))?
        .local_addr()?
        .port())
}

/// Whether etcd's `/health` at `addr` says healthy (asked from the calling thread's
/// namespace).
fn healthy_here(addr: SocketAddr) -> bool {
    let ask = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300))?;
        s.set_read_timeout(Some(Duration::from_millis(1000)))?;
        write!(s, "GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    ask().is_ok_and(|r| r.contains("\"health\":\"true\""))
}

/// Whether the etcd at `addr` (inside `netns`, if given) answers healthy.
pub fn healthy(netns: Option<&str>, addr: SocketAddr) -> bool {
    match netns {
        Some(ns) => netns::run_in(ns, || healthy_here(addr)).unwrap_or(false),
        None => healthy_here(addr),
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl EtcdMember {
    /// Starts a one-member cluster serving clients at `client_addr` (inside network
    /// namespace `netns`, if given; its peer port is any free one at the same address), with
    /// its data in `data_dir` (made, private) and its log beside it (`DATA_DIR.log`), and
    /// waits until it answers healthy (at most [`START_TIMEOUT`]).
    pub fn start(
        netns: Option<&str>,
        client_addr: SocketAddr,
        data_dir: &Path,
    ) -> Result<EtcdMember, EtcdMemberError> {
        let ok = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(EtcdMemberError::Missing);
        }
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| EtcdMemberError::Io { what, path, source }
        };
        std::fs::create_dir_all(data_dir).map_err(io("cannot create", data_dir))?;
        // etcd refuses a data directory others can read.
        std::fs::set_permissions(
            data_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(io("cannot protect", data_dir))?;
        let log = data_dir.with_extension("log");
        let ip = client_addr.ip();
        let peer_port = match netns {
            Some(ns) => netns::run_in(ns, || free_port(ip))?,
            None => free_port(ip),
        }
        .map_err(io(
            "no free port for etcd's peers at",
            Path::new(&ip.to_string()),
        ))?;
        let client = format!("http://{client_addr}");
        let peer = format!("http://{}", SocketAddr::new(ip, peer_port));
        let out = std::fs::File::create(&log).map_err(io("cannot create", &log))?;
        let err = out.try_clone().map_err(io("cannot open", &log))?;
        let mut cmd = match netns {
            Some(ns) => netns::command_in(ns, "etcd"),
            None => Command::new("etcd"),
        };
        cmd.args(["--name", "splitos"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("splitos={peer}")])
            .args(["--initial-cluster-state", "new"])
            // Short raft timers: one member elects itself at once, and leases of one second
            // expire within about that (the defaults, 100 and 1000 ms, add a second).
            .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
            // `Registry::connect` pings every second to notice a dead etcd soon; etcd's
            // default (5 s) answers pings that frequent with GOAWAY, breaking every watch
            // and lease keep-alive stream a few seconds after it starts.
            .args(["--grpc-keepalive-min-time", "500ms"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // Its own process group: a Ctrl-C at the terminal of a test or of `lab up` does not
        // reach it half-way through; Drop (or the lab's `down`) ends it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(io("cannot start etcd for", data_dir))?;
        let member = EtcdMember {
            pid: child.id(),
            child: Some(child),
            endpoint: client,
            data_dir: data_dir.to_path_buf(),
            log,
            detached: false,
        };
        let until = Instant::now() + START_TIMEOUT;
        loop {
            if healthy(netns, client_addr) {
                return Ok(member);
            }
            if Instant::now() >= until || !crate::lab::alive(member.pid as i32) {
                return Err(EtcdMemberError::Unhealthy {
                    endpoint: member.endpoint.clone(),
                    secs: START_TIMEOUT.as_secs(),
                    log: member.log.clone(),
                    tail: tail(&member.log),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its client URL, `http://ADDR:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Leaves the member running past this value (the caller owns its pid, data and log).
    pub fn detach(mut self) -> u32 {
        self.child = None;
        self.detached = true;
        self.pid
    }

    /// Kills the member at once (as a machine dies) and waits for it; its data stays until
    /// drop.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        let _ = std::fs::remove_file(&self.log);
    }
}
