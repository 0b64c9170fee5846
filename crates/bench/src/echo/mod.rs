//! The `echo` suite: 64-byte request/response over N keep-alive connections, against the
//! Split-OS TCP server with an application, a plain epoll (mio) server, a tokio server and a
//! single-process io_uring server, all in one run. Each server runs in processes of its own and
//! the load comes from another process, so server CPU time can be read from /proc and reported
//! as requests per server CPU-second.

pub mod client;
pub mod servers;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Options {
    pub quick: bool,
    pub conns: usize,
    pub wait: String,
    /// Servers on [`SERVER_CPU`], the client on [`CLIENT_CPU`].
    pub pin: bool,
}

/// Where the pinned servers run: every server gets this one core (the Split-OS TCP server and
/// its application share it), so none has more CPU than another.
pub const SERVER_CPU: usize = 1;
/// Where the pinned load generator runs, away from the server it measures.
pub const CLIENT_CPU: usize = 0;

/// `--cpu N` for a re-spawned server or client, when pinning.
fn cpu_args(opts: &Options, cpu: usize) -> Vec<String> {
    if opts.pin {
        vec!["--cpu".into(), cpu.to_string()]
    } else {
        Vec::new()
    }
}

/// Pins this process before it starts any thread (threads inherit the mask).
fn pin_self(cpu: Option<usize>) -> Result<(), String> {
    match cpu {
        Some(c) if !crate::proc::pin(c) => Err(format!("cannot pin to CPU {c}")),
        _ => Ok(()),
    }
}

#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: &'static str,
    pub req_per_s: f64,
    pub req_per_cpu_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub cpu_s: f64,
}

/// CPU seconds (user + system, all threads) a process has used so far.
fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("reading /proc/{pid}/stat: {e}"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("malformed /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or("malformed /proc stat")
    };
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Ok((ticks(11)? + ticks(12)?) as f64 / hz)
}

struct ServerProc {
    child: Child,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    args: &[S],
) -> Result<(ServerProc, BufReader<ChildStdout>), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning {args:?}: {e}"))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    Ok((ServerProc { child }, BufReader::new(out)))
}

fn wait_line(out: &mut BufReader<ChildStdout>, prefix: &str) -> Result<String, String> {
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err(format!("server exited before printing {prefix}"));
        }
        if let Some(rest) = line.trim().strip_prefix(prefix) {
            return Ok(rest.trim().to_string());
        }
    }
}

/// Starts the Split-OS pair: the TCP server process, then the echo application on it.
fn spawn_split(
    opts: &Options,
    sock: &std::path::Path,
) -> Result<(ServerProc, ServerProc, SocketAddr), String> {
    let sock_s = sock.to_string_lossy().to_string();
    let args = |kind: &str| {
        let mut a: Vec<String> = [
            "echo-server",
            "--kind",
            kind,
            "--socket",
            &sock_s,
            "--wait",
            &opts.wait,
        ]
        .map(String::from)
        .to_vec();
        a.extend(cpu_args(opts, SERVER_CPU));
        a
    };
    let (tcp, mut out) = spawn(&args("split-tcp"))?;
    wait_line(&mut out, "READY")?;
    let (app, mut out) = spawn(&args("split-app"))?;
    let addr = wait_line(&mut out, "LISTENING")?
        .parse()
        .map_err(|e| format!("bad address: {e}"))?;
    Ok((tcp, app, addr))
}

/// A server under test, started once and driven in several rounds.
struct Running {
    /// Applications after the server they use: dropped in reverse, so none sees its server
    /// vanish.
    procs: Vec<ServerProc>,
    addr: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
    }
}

fn start_case(
    name: &'static str,
    opts: &Options,
    tmp: &std::path::Path,
) -> Result<Running, String> {
    if name == "split" {
        let (tcp, app, addr) = spawn_split(opts, &tmp.join("tcp.sock"))?;
        return Ok(Running {
            procs: vec![tcp, app],
            addr,
        });
    }
    let mut args: Vec<String> = vec!["echo-server".into(), "--kind".into(), name.into()];
    args.extend(cpu_args(opts, SERVER_CPU));
    let (p, mut out) = spawn(&args)?;
    let addr = wait_line(&mut out, "LISTENING")?
        .parse()
        .map_err(|e| format!("bad address: {e}"))?;
    Ok(Running {
        procs: vec![p],
        addr,
    })
}

/// One round against one server: (requests, elapsed s, p50 µs, p99 µs, server CPU s).
fn drive(r: &Running, opts: &Options) -> Result<(f64, f64, f64, f64, f64), String> {
    let (warmup, duration) = if opts.quick {
        (Duration::from_millis(300), Duration::from_millis(1200))
    } else {
        (Duration::from_millis(500), Duration::from_secs(4))
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let client = Command::new(exe)
        .args([
            "echo-client",
            "--addr",
            &r.addr.to_string(),
            "--conns",
            &opts.conns.to_string(),
            "--warmup-ms",
            &warmup.as_millis().to_string(),
            "--duration-ms",
            &duration.as_millis().to_string(),
        ])
        .args(cpu_args(opts, CLIENT_CPU))
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning the client: {e}"))?;
    std::thread::sleep(warmup);
    let pids: Vec<u32> = r.procs.iter().map(|p| p.child.id()).collect();
    let cpu0: f64 = pids
        .iter()
        .map(|&p| cpu_seconds(p))
        .sum::<Result<f64, String>>()?;
    let output = client.wait_with_output().map_err(|e| e.to_string())?;
    let cpu1: f64 = pids
        .iter()
        .map(|&p| cpu_seconds(p))
        .sum::<Result<f64, String>>()?;
    if !output.status.success() {
        return Err(format!("client failed: {}", output.status));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .ok_or("client printed no result")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let [requests, elapsed_s, p50, p99] = v[..] else {
        return Err(format!("malformed client result {line:?}"));
    };
    Ok((requests, elapsed_s, p50, p99, (cpu1 - cpu0).max(1e-9)))
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> Result<u64, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| "no VmRSS".to_string())
}

/// Raises the open-file limit to its hard maximum (idle-connection runs need many fds).
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    let _ = setrlimit(Resource::Nofile, l);
}

/// Memory the Split-OS TCP server holds per idle connection: its RSS with `n` idle
/// connections open, minus its RSS before, over `n`.
fn idle_memory(opts: &Options, tmp: &std::path::Path, n: usize) -> Result<f64, String> {
    let (tcp, app, addr) = spawn_split(opts, &tmp.join("idle.sock"))?;
    let addr = addr.to_string();
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_bytes(tcp.child.id())?;
    let (client, mut out) = spawn(&["echo-idle", "--addr", &addr, "--conns", &n.to_string()])?;
    wait_line(&mut out, "OPEN")?;
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_bytes(tcp.child.id())?;
    drop(client);
    drop(app);
    drop(tcp);
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// Opens `n` connections, says OPEN, and holds them until stdin closes.
pub fn idle_client_main(addr: SocketAddr, n: usize) -> Result<(), String> {
    raise_fd_limit();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(std::net::TcpStream::connect(addr).map_err(|e| format!("connection {i}: {e}"))?);
    }
    println!("OPEN");
    let _ = std::io::stdout().flush();
    let stop = servers::stop_flag();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Runs every case; a failed case is reported and skipped. All servers run side by side
/// (idle ones sleep) and the client visits them in turn, round after round, so that drift in
/// the machine's speed over the run (±15% over a minute here) falls on every case alike.
pub fn run(opts: &Options) -> Vec<CaseResult> {
    let tmp = std::env::temp_dir().join(format!("splitos-bench-echo-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&tmp);
    let rounds = if opts.quick { 3 } else { 4 };
    // A Split-OS server in poll mode spins while idle and would slow the others' rounds: it is
    // started for each of its own rounds instead.
    let spins_idle = |name: &str| name == "split" && opts.wait == "poll";
    let mut running = Vec::new();
    for name in ["split", "epoll", "tokio", "io_uring"] {
        let r = if spins_idle(name) {
            None
        } else {
            match start_case(name, opts, &tmp) {
                Ok(r) => Some(r),
                Err(e) => {
                    eprintln!("echo: {name}: FAILED to start: {e}");
                    continue;
                }
            }
        };
        running.push((name, r, [0.0f64; 5], true));
    }
    for round in 0..rounds {
        for (name, r, acc, ok) in running.iter_mut().filter(|c| c.3) {
            let fresh = if r.is_none() {
                start_case(name, opts, &tmp).map(Some)
            } else {
                Ok(None)
            };
            let result = fresh.and_then(|fresh| match (fresh.as_ref(), r.as_ref()) {
                (Some(f), _) | (None, Some(f)) => drive(f, opts),
                (None, None) => Err("not running".into()),
            });
            match result {
                Ok(v) => {
                    for (a, x) in acc.iter_mut().zip([v.0, v.1, v.2, v.3, v.4]) {
                        *a += x;
                    }
                }
                Err(e) => {
                    eprintln!("echo: {name} round {round}: FAILED: {e}");
                    *ok = false;
                }
            }
        }
    }
    let mut results = Vec::new();
    for (name, _, [requests, elapsed, p50, p99, cpu], ok) in &running {
        if !ok {
            continue;
        }
        let c = CaseResult {
            name,
            req_per_s: requests / elapsed,
            req_per_cpu_s: requests / cpu,
            p50_us: p50 / rounds as f64,
            p99_us: p99 / rounds as f64,
            cpu_s: *cpu,
        };
        eprintln!(
            "echo: {}: {:.0} req/s, {:.0} req/CPU-s, p99 {:.1} µs",
            c.name, c.req_per_s, c.req_per_cpu_s, c.p99_us
        );
        results.push(c);
    }
    drop(running);
    let _ = std::fs::remove_dir_all(&tmp);
    results
}

pub fn client_main(
    addr: SocketAddr,
    conns: usize,
    warmup_ms: u64,
    duration_ms: u64,
    cpu: Option<usize>,
) -> Result<(), String> {
    pin_self(cpu)?;
    let r = client::run(
        addr,
        conns,
        Duration::from_millis(warmup_ms),
        Duration::from_millis(duration_ms),
    )
    .map_err(|e| format!("client: {e}"))?;
    println!(
        "RESULT {} {} {} {}",
        r.requests,
        r.elapsed.as_secs_f64(),
        r.p50_us,
        r.p99_us
    );
    Ok(())
}

pub fn server_main(
    kind: &str,
    socket: Option<PathBuf>,
    wait: &str,
    cpu: Option<usize>,
) -> Result<(), String> {
    pin_self(cpu)?;
    raise_fd_limit();
    let stop = servers::stop_flag();
    let wait: splitos_m2m::WaitPolicy = wait.parse()?;
    let r = match (kind, socket) {
        ("epoll", _) => servers::epoll(stop),
        ("tokio", _) => servers::tokio(stop),
        ("io_uring", _) => servers::io_uring(stop),
        ("split-tcp", Some(s)) => servers::split_tcp_server(stop, &s, wait),
        ("split-app", Some(s)) => servers::split_app(stop, &s, wait),
        (k, _) => return Err(format!("unknown server kind {k:?} (or missing --socket)")),
    };
    r.map_err(|e| format!("{kind} server: {e}"))
}

/// Runs the suite and turns it into a report with ratios against epoll and the targets.
pub fn report(opts: &Options) -> crate::report::Report {
    let mut r = crate::report::Report::new("echo");
    for c in run(opts) {
        r.add(c.name, "req_per_s", c.req_per_s);
        r.add(c.name, "req_per_cpu_s", c.req_per_cpu_s);
        r.add(c.name, "p50_us", c.p50_us);
        r.add(c.name, "p99_us", c.p99_us);
        r.add(c.name, "server_cpu_s", c.cpu_s);
    }
    for name in ["split", "tokio", "io_uring"] {
        for m in ["req_per_s", "req_per_cpu_s", "p99_us"] {
            r.ratio(m, name, "epoll");
        }
    }
    let n = if opts.quick { 2_000 } else { 10_000 };
    let tmp = std::env::temp_dir().join(format!("splitos-bench-idle-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&tmp);
    eprint!("echo: TCP server memory with {n} idle connections ... ");
    match idle_memory(opts, &tmp, n) {
        Ok(b) => {
            eprintln!("{b:.0} bytes per connection");
            r.add("split", "idle_conn_bytes", b);
            r.note(format!("idle_conn_bytes: TCP server RSS growth with {n} idle connections, per connection (kernel socket memory not included)"));
        }
        Err(e) => {
            eprintln!("FAILED: {e}");
            r.note(format!("idle memory failed: {e}"));
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    r.target("req_per_cpu_s", "split", "epoll", 1.3, false);
    r.target("req_per_s", "split", "epoll", 1.0, false);
    r.note(format!(
        "{} connections, 64-byte messages, client in its own process; all servers up at once, the client visits each in turn for {} rounds; {}; Split-OS wait policy: {}; server CPU = utime+stime of the server processes (TCP server + application for split)",
        opts.conns,
        if opts.quick { 3 } else { 4 },
        if opts.pin {
            format!("every server pinned to CPU {SERVER_CPU} (the Split-OS TCP server and application share it), the client to CPU {CLIENT_CPU}")
        } else {
            "not pinned".to_string()
        },
        opts.wait
    ));
    if opts.pin && opts.wait == "poll" {
        r.note("poll with pinning: the TCP server and the application spin on one core and starve each other; use --no-pin to measure poll".to_string());
    }
    r
}
