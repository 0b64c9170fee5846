//! `splitos serve DIR`: a static web server on the split architecture, and its reloads.
//!
//! This process is the supervisor. It runs the TCP server and the file server as threads (same
//! code and shared-memory paths as the daemons) and starts the HTTP application
//! ([`crate::http_app`]) as a child process, `splitos serve-app`, which reaches both servers
//! through shared memory. Because the servers, not the application, own the sockets and the
//! file cache, the application can be replaced while they keep every connection:
//!
//! 1. a new instance starts and connects (prints `ready`);
//! 2. the old one gets SIGUSR2: it parks its persistent listener in the TCP server, pauses each
//!    connection and hands it off with its unprocessed bytes, then exits;
//! 3. the new one takes over the listener (retrying while the old one still holds it) and
//!    adopts every handed-off connection.
//!
//! A reload is asked for with SIGHUP or `splitos reload`, which talks to the control socket
//! (`serve-ADDR.sock` in the runtime directory) and prints the outcome. An instance that dies
//! is restarted; the persistent listener keeps queueing connections meanwhile.

use crate::http_app::AppArgs;
use splitos_file_server::server::{FileServer, FileServerConfig};
use splitos_tcp_server::{ServerConfig, TcpServer};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The directory to serve.
    dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// TCP server event-loop threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Most bytes of file contents kept in memory (suffixes K, M, G).
    #[arg(long, default_value = "256M", value_parser = crate::parse_bytes)]
    cache_size: u64,
    /// Write an access log in the common log format to this file (off by default).
    #[arg(long)]
    access_log: Option<PathBuf>,
    /// Most connections at once; more are answered 503 and closed.
    #[arg(long, default_value_t = 10_000)]
    max_conns: usize,
    /// Seconds a client may take to send a request head.
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Seconds an idle keep-alive connection is kept.
    #[arg(long, default_value_t = 60)]
    idle_timeout: u64,
    /// List the contents of directories that have no index.html (names starting with "." are
    /// not shown).
    #[arg(long)]
    list_dirs: bool,
    /// Do not let the TCP server answer requests for cached files itself (the direct path);
    /// every request then goes through the HTTP application. The direct path is also off
    /// while an access log is written, since the log is the application's.
    #[arg(long)]
    no_direct: bool,
    /// How the TCP server and the HTTP application wait: block (sleep at once; the default,
    /// best when cores are shared, e.g. with a load generator), adaptive (spin 2 µs, then
    /// yield until ~30 µs, then sleep), or poll (spin; only with cores to spare).
    #[arg(long, default_value = "block")]
    wait: splitos::WaitPolicy,
    /// Control socket for `splitos reload` [default: serve-ADDR.sock in $XDG_RUNTIME_DIR/splitos
    /// or /tmp/splitos-<uid>].
    #[arg(long)]
    control_socket: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ReloadArgs {
    /// The address the server was started with (`splitos serve --listen`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Its control socket, if it was given one with --control-socket.
    #[arg(long)]
    control_socket: Option<PathBuf>,
}

/// How long a new instance may take to start, and to take over the listener.
const START_LIMIT: Duration = Duration::from_secs(20);
/// How long an old instance may take to hand off its connections and exit.
const EXIT_LIMIT: Duration = Duration::from_secs(40);
/// Instances that die this soon after starting count as failing to start; after
/// [`MAX_QUICK_DEATHS`] in a row, `serve` gives up instead of restarting forever.
const QUICK_DEATH: Duration = Duration::from_secs(2);
const MAX_QUICK_DEATHS: u32 = 5;

/// The control socket of a server listening on `addr`.
pub fn default_control_socket(addr: &str) -> PathBuf {
    let tcp = splitos_tcp_server::default_socket_path();
    let dir = tcp.parent().unwrap_or(Path::new("/tmp"));
    dir.join(format!("serve-{addr}.sock"))
}

/// One running HTTP application instance.
struct Instance {
    child: Child,
    lines: mpsc::Receiver<String>,
    started: Instant,
}

impl Instance {
    fn spawn(base: &AppArgs, takeover: bool) -> Result<Instance, String> {
        let exe = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve-app")
            .arg("--root")
            .arg(&base.root)
            .arg("--tcp-socket")
            .arg(&base.tcp_socket)
            .arg("--files-socket")
            .arg(&base.files_socket)
            .arg("--listen")
            .arg(base.listen.to_string())
            .arg("--max-conns")
            .arg(base.max_conns.to_string())
            .arg("--header-timeout")
            .arg(base.header_timeout.to_string())
            .arg("--idle-timeout")
            .arg(base.idle_timeout.to_string())
            .arg("--wait")
            .arg(base.wait.to_string());
        if let Some(l) = &base.access_log {
            cmd.arg("--access-log").arg(l);
        }
        if base.list_dirs {
            cmd.arg("--list-dirs");
        }
        if base.no_direct {
            cmd.arg("--no-direct");
        }
        if takeover {
            cmd.arg("--takeover");
        }
        // Its own process group: Ctrl-C in the terminal goes to the supervisor, which decides.
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting the HTTP application: {e}"))?;
        let out = child
            .stdout
            .take()
            .ok_or("the HTTP application has no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name("splitos-app-out".into())
            .spawn(move || forward_lines(out, tx))
            .map_err(|e| e.to_string())?;
        Ok(Instance {
            child,
            lines,
            started: Instant::now(),
        })
    }

    /// Waits for a line starting with `prefix`; fails if the instance exits or `limit` passes.
    fn expect(&mut self, prefix: &str, limit: Duration) -> Result<String, String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(l) if l.starts_with(prefix) => return Ok(l[prefix.len()..].trim().to_string()),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(st)) = self.child.try_wait() {
                        return Err(format!("the HTTP application exited ({st})"));
                    }
                    if left.is_zero() {
                        return Err(format!(
                            "the HTTP application did not report {prefix:?} within {limit:?}"
                        ));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait().map_err(|e| e.to_string())?;
                    return Err(format!("the HTTP application exited ({st})"));
                }
            }
        }
    }

    fn signal(&self, sig: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// Waits up to `limit` for the instance to exit, then kills it.
    fn reap(mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(
            pid = self.child.id(),
            "HTTP application did not exit; killing it"
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forward_lines(out: ChildStdout, tx: mpsc::Sender<String>) {
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { return };
        if tx.send(line).is_err() {
            return;
        }
    }
}

pub fn run(a: ServeArgs, stop: Arc<AtomicBool>) -> Result<(), String> {
    let meta =
        std::fs::metadata(&a.dir).map_err(|e| format!("cannot serve {}: {e}", a.dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", a.dir.display()));
    }
    let addr: SocketAddr = a
        .listen
        .parse()
        .map_err(|e| format!("--listen {:?}: {e} (expected IP:PORT)", a.listen))?;
    let root = a
        .dir
        .canonicalize()
        .map_err(|e| format!("cannot serve {}: {e}", a.dir.display()))?;
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())
        .map_err(|e| format!("cannot install a signal handler: {e}"))?;
    let private = std::env::temp_dir().join(format!("splitos-serve-{}", std::process::id()));
    std::fs::create_dir_all(&private)
        .map_err(|e| format!("creating {}: {e}", private.display()))?;
    let _cleanup = RemoveOnDrop(private.clone());
    let tcp = TcpServer::start(ServerConfig {
        socket: private.join("tcp.sock"),
        threads: a.threads,
        wait: a.wait,
        ..ServerConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let mut fcfg = FileServerConfig::new(root.clone(), private.join("files.sock"));
    fcfg.cache_bytes = a.cache_size;
    let files = FileServer::start(fcfg).map_err(|e| e.to_string())?;
    let mut base = AppArgs {
        root,
        tcp_socket: tcp.socket_path().to_path_buf(),
        files_socket: private.join("files.sock"),
        listen: addr,
        access_log: a.access_log.clone(),
        max_conns: a.max_conns,
        header_timeout: a.header_timeout,
        idle_timeout: a.idle_timeout,
        wait: a.wait,
        list_dirs: a.list_dirs,
        no_direct: a.no_direct,
        takeover: false,
    };
    let mut app = Instance::spawn(&base, false)?;
    app.expect("ready", START_LIMIT)?;
    let local: SocketAddr = app
        .expect("listening", START_LIMIT)?
        .parse()
        .map_err(|e| format!("the HTTP application reported a bad address: {e}"))?;
    // Later instances listen on the address actually bound (port 0 means "any" only once).
    base.listen = local;
    let control_path = a
        .control_socket
        .clone()
        .unwrap_or_else(|| default_control_socket(&local.to_string()));
    let control = bind_control(&control_path)?;
    let _control_cleanup = RemoveOnDrop(control_path.clone());
    println!("http://{local}/");
    let _ = std::io::stdout().flush();
    eprintln!(
        "splitos serve: serving {} at http://{local}/ (Ctrl-C to stop; `splitos reload --listen {local}` or SIGHUP to reload)",
        a.dir.display()
    );
    let mut generation = 1u64;
    let mut quick_deaths = 0u32;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        let mut asked: Option<UnixStream> = None;
        if let Ok((mut s, _)) = control.accept() {
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            let _ = BufReader::new(&mut s).read_line(&mut line);
            if line.trim() == "reload" {
                asked = Some(s);
            } else {
                let _ = writeln!(
                    s,
                    "error: unknown command {:?} (expected \"reload\")",
                    line.trim()
                );
            }
        }
        if asked.is_some() || reload.swap(false, Ordering::Relaxed) {
            let outcome = match reload_app(&base, app) {
                Ok(new) => {
                    generation += 1;
                    let msg = format!(
                        "reloaded: generation {generation}, HTTP application pid {}",
                        new.child.id()
                    );
                    app = new;
                    Ok(msg)
                }
                Err((old, e)) => {
                    app = old;
                    Err(e)
                }
            };
            match &outcome {
                Ok(m) => eprintln!("splitos serve: {m}"),
                Err(e) => {
                    eprintln!("splitos serve: reload failed, the running instance stays: {e}")
                }
            }
            if let Some(mut s) = asked {
                let _ = match outcome {
                    Ok(m) => writeln!(s, "ok: {m}"),
                    Err(e) => writeln!(s, "error: {e}"),
                };
            }
            continue;
        }
        if let Ok(Some(st)) = app.child.try_wait() {
            if app.started.elapsed() < QUICK_DEATH {
                quick_deaths += 1;
            } else {
                quick_deaths = 0;
            }
            if quick_deaths >= MAX_QUICK_DEATHS {
                return Err(format!(
                    "the HTTP application keeps dying right after starting ({st}); giving up"
                ));
            }
            eprintln!("splitos serve: the HTTP application exited ({st}); starting a new one");
            // The persistent listener survived in the TCP server; the new instance takes it.
            match Instance::spawn(&base, true) {
                Ok(mut new) => {
                    if let Err(e) = new
                        .expect("ready", START_LIMIT)
                        .and_then(|_| new.expect("listening", START_LIMIT))
                    {
                        eprintln!("splitos serve: restart failed: {e}");
                    }
                    app = new;
                    generation += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
    eprintln!("splitos serve: shutting down");
    app.signal(rustix::process::Signal::TERM);
    app.reap(Duration::from_secs(5));
    tcp.shutdown();
    files.shutdown();
    Ok(())
}

/// Starts a new instance and retires `old` in its favour. On failure the old one keeps
/// serving and is given back.
fn reload_app(base: &AppArgs, old: Instance) -> Result<Instance, (Instance, String)> {
    let mut new = match Instance::spawn(base, true) {
        Ok(n) => n,
        Err(e) => return Err((old, e)),
    };
    if let Err(e) = new.expect("ready", START_LIMIT) {
        let _ = new.child.kill();
        let _ = new.child.wait();
        return Err((old, e));
    }
    // From here the old instance lets go; the new one takes the listener as soon as it does.
    old.signal(rustix::process::Signal::USR2);
    let taken = new.expect("listening", START_LIMIT);
    old.reap(EXIT_LIMIT);
    match taken {
        Ok(_) => Ok(new),
        Err(e) => {
            // The old instance is gone; keep whatever the new one is (the supervisor loop
            // restarts it if it died). The listener stays parked in the TCP server meanwhile.
            Err((new, e))
        }
    }
}

fn bind_control(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    if UnixStream::connect(path).is_ok() {
        return Err(format!(
            "another `splitos serve` answers on {} (is one already running on this address?)",
            path.display()
        ));
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)
        .map_err(|e| format!("binding the control socket {}: {e}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(l)
}

/// `splitos reload`: asks a running `splitos serve` to replace its HTTP application.
pub fn reload(a: ReloadArgs) -> Result<(), String> {
    let path = match a.control_socket {
        Some(p) => p,
        None => {
            let addr: SocketAddr = a
                .listen
                .parse()
                .map_err(|e| format!("--listen {:?}: {e} (expected IP:PORT)", a.listen))?;
            default_control_socket(&addr.to_string())
        }
    };
    let mut s = UnixStream::connect(&path).map_err(|e| {
        format!(
            "no `splitos serve` answers on {} ({e}); give the address it listens on with --listen",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(START_LIMIT * 2 + EXIT_LIMIT))
        .map_err(|e| e.to_string())?;
    writeln!(s, "reload").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&mut s)
        .read_line(&mut line)
        .map_err(|e| format!("waiting for the outcome: {e}"))?;
    let line = line.trim();
    match line.strip_prefix("ok: ") {
        Some(m) => {
            println!("{m}");
            Ok(())
        }
        None => Err(line
            .strip_prefix("error: ")
            .unwrap_or("the server closed the control connection without an answer")
            .to_string()),
    }
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
