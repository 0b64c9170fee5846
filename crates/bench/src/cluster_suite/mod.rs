//! The `cluster` suite: live migration of TCP connections between the nodes of a lab
//! (`splitos_cluster::lab`: network namespaces for a client, the steering switch and two nodes,
//! each running `splitos serve` on the virtual IP), measured with a real client.
//!
//! - **cut-over**: a client thread (in the client's namespace) makes back-to-back keep-alive
//!   `GET /index.html` requests on one connection while the suite moves that connection
//!   node1 → node2 → node1 ... with `lab::migrate`; `Report::cutover_ms` (the switch's hold to
//!   its release) of every migration that moved it, and the client's request latencies.
//! - **baseline**: the same client on the same connection for as long again, with no
//!   migration: what a migration adds to the worst request is the ratio of the two.
//! - **batch**: many idle keep-alive connections (one request each) gathered on node1, then all
//!   moved to node2 in one migration (`Select::All`); every one must answer its next request.
//!
//! Needs root (namespaces, nftables) and the `splitos` binary next to this one. The lab is
//! named `sbc<pid>` and is removed before the suite returns, also when it fails or panics.

mod download;
mod failover;

use crate::report::Report;
use splitos_cluster::lab::{self, LabConfig};
use splitos_cluster::migrate::Select;
use splitos_cluster::netns;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub struct Options {
    pub quick: bool,
}

const REQUEST: &[u8] = b"GET /index.html HTTP/1.1\r\nHost: 198.19.0.1\r\n\r\n";
/// A request with no answer within this long has failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The most a response head may take.
const HEAD_MAX: usize = 64 << 10;

/// Runs the suite, prints its report (and writes it with `json`); fails when the suite could
/// not run or a measurement failed part-way (the partial report is printed first).
pub fn main(opts: &Options, json: Option<PathBuf>) -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err(
            "cluster: needs root (it builds network namespaces and an nftables switch); \
             run it as root, e.g. `sudo target/release/splitos-bench cluster --quick`"
                .into(),
        );
    }
    let bench = std::env::current_exe()
        .map_err(|e| format!("cluster: cannot find this program's own path: {e}"))?;
    let splitos = bench.with_file_name("splitos");
    if !splitos.is_file() {
        return Err(format!(
            "cluster: {} not found: the lab runs `splitos serve` on each node; build it with \
             `cargo build --release -p splitos-cli`",
            splitos.display()
        ));
    }
    let mut r = Report::new("cluster");
    let outcome = measure(opts, &mut r, splitos);
    if let Err(e) = &outcome {
        eprintln!("cluster: FAILED: {e}");
        r.note(format!("failed: {e}"));
    }
    targets(opts, &mut r);
    crate::finish(r, json)?;
    outcome.map_err(|e| format!("cluster: {e}"))
}

fn batch_name(quick: bool) -> &'static str {
    if quick {
        "batch"
    } else {
        "batch1000"
    }
}

fn targets(opts: &Options, r: &mut Report) {
    for m in ["p50_ms", "p99_ms", "max_ms"] {
        r.ratio(m, "client_migrating", "client_baseline");
    }
    r.bound("cutover", "median_ms", "<", 5.0);
    r.bound("cutover", "p99_ms", "<", 20.0);
    r.bound("cutover", "client_worst_ms", "<=", 250.0);
    r.bound("cutover", "client_failed", "==", 0.0);
    r.bound("download", "stall_ms", "<", 100.0);
    r.bound("download", "intact", "==", 1.0);
    r.bound("download", "moves", "==", 2.0);
    let b = batch_name(opts.quick);
    r.bound(b, "total_ms", "<", 1000.0);
    r.bound("takeover", "worst_ms", "<", 3000.0);
    r.bound("kills", "hung", "==", 0.0);
    r.bound("kills", "wrong", "==", 0.0);
    r.bound("kills", "adopted_twice", "==", 0.0);
    r.bound("kills", "switch_disagrees", "==", 0.0);
    r.bound("kills", "open_failed", "==", 0.0);
    r.target("req_per_s", "checkpoints_on", "checkpoints_off", 0.9, false);
    r.target(
        "req_per_s",
        "checkpoints_on_close",
        "checkpoints_off_close",
        0.9,
        false,
    );
    if let Some(n) = r
        .details
        .iter()
        .find(|e| e.name == b && e.metric == "count")
        .map(|e| e.value)
    {
        r.bound(b, "ok_after", "==", n);
    } else {
        r.bound(b, "ok_after", "==", 1000.0);
    }
}

/// The lab, removed when dropped (on an error or a panic) unless `down` already did.
struct LabGuard {
    prefix: String,
    up: bool,
}

impl LabGuard {
    fn down(mut self) -> Result<(), String> {
        self.up = false;
        let d = lab::down(&self.prefix).map_err(|e| format!("lab down: {e}"))?;
        if d.left.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "lab down: could not remove {} (try `ip netns del NAME`)",
                d.left.join(", ")
            ))
        }
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if self.up {
            if let Err(e) = lab::down(&self.prefix) {
                eprintln!(
                    "cluster: removing lab {}: {e} (run `splitos lab --name {} down`)",
                    self.prefix, self.prefix
                );
            }
        }
    }
}

/// Raises the soft open-file limit (inherited by the lab's servers) to the hard one.
fn raise_nofile(need: u64) -> Result<(), String> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    let hard = l.maximum.unwrap_or(u64::MAX);
    if l.current.unwrap_or(u64::MAX) >= need {
        return Ok(());
    }
    if hard < need {
        return Err(format!(
            "the open-file limit's hard maximum is {hard}, the batch needs {need} (ulimit -Hn {need})"
        ));
    }
    l.current = Some(hard.min(1 << 20));
    setrlimit(Resource::Nofile, l).map_err(|e| format!("raising the open-file limit: {e}"))
}

fn measure(opts: &Options, r: &mut Report, splitos: PathBuf) -> Result<(), String> {
    let splitos_exe = splitos.clone();
    let batch = if opts.quick { 200 } else { 1000 };
    // The client's sockets live in this process; the servers inherit the limit.
    raise_nofile(batch as u64 + 1024)?;
    let prefix = format!("sbc{}", std::process::id());
    let cfg = LabConfig {
        prefix: prefix.clone(),
        nodes: 2,
        site: None,
        port: 80,
        exe: splitos,
        node_args: Vec::new(),
    };
    let t = Instant::now();
    eprintln!(
        "cluster: building lab {prefix} (if interrupted: `splitos lab --name {prefix} down`)"
    );
    let st = lab::up(&cfg).map_err(|e| format!("lab up: {e}"))?;
    let guard = LabGuard {
        prefix: prefix.clone(),
        up: true,
    };
    eprintln!("cluster: lab up in {:.1} s", t.elapsed().as_secs_f64());
    let client_ns = st.namespace_of("client").map_err(|e| e.to_string())?;
    let vip = SocketAddr::new(st.vip.into(), st.port);
    let migrations = if opts.quick { 30 } else { 100 };
    let result = cutover(r, &prefix, &client_ns, vip, migrations)
        .and_then(|()| download::download(r, &prefix, &client_ns, vip, &st.site))
        .and_then(|()| batch_move(r, opts, &prefix, &client_ns, vip, batch));
    if result.is_err() {
        keep_logs(r, &st);
    }
    let down = guard.down();
    result.and(down)?;
    // Failover: a lab of its own, with etcd and the switch's controller.
    failover::failover(r, opts.quick, &splitos_exe, vip)
}

/// Copies the nodes' logs out of the lab (which `down` removes) and says where they are.
fn keep_logs(r: &mut Report, st: &lab::LabState) {
    let dir = std::env::temp_dir().join(format!("splitos-bench-cluster-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let mut kept = 0;
    for p in &st.processes {
        if let Some(name) = p.log.file_name() {
            kept += usize::from(std::fs::copy(&p.log, dir.join(name)).is_ok());
        }
    }
    if kept > 0 {
        eprintln!("cluster: the nodes' logs are in {}", dir.display());
        r.note(format!("the nodes' logs are kept in {}", dir.display()));
    }
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Result<Conn, String> {
        let s = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Conn {
            s,
            buf: Vec::with_capacity(4096),
        })
    }

    fn send(&mut self) -> Result<(), String> {
        self.s
            .write_all(REQUEST)
            .map_err(|e| format!("sending: {e}"))
    }

    /// Reads one whole `200` response (head and `Content-Length` body) by `deadline`.
    fn receive(&mut self, deadline: Instant) -> Result<(), String> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                if !head.starts_with("HTTP/1.1 200") {
                    let first = head.lines().next().unwrap_or("");
                    return Err(format!("answered {first:?}"));
                }
                let len = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                    .ok_or("a response without Content-Length")?;
                let need = end + 4 + len;
                if self.buf.len() >= need {
                    self.buf.drain(..need);
                    return Ok(());
                }
            } else if self.buf.len() > HEAD_MAX {
                return Err("a response head of more than 64 KiB".into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("no answer in time".into());
            }
            self.s
                .set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            match self.s.read(&mut chunk) {
                Ok(0) => return Err("the connection was closed".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(format!("no answer within {REQUEST_TIMEOUT:?}"))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("receiving: {e}")),
            }
        }
    }

    fn get(&mut self) -> Result<(), String> {
        self.send()?;
        self.receive(Instant::now() + REQUEST_TIMEOUT)
    }
}

/// What the client is doing: its requests' latencies go to the phase's list.
const WARMUP: u8 = 0;
const MIGRATING: u8 = 1;
const BASELINE: u8 = 2;
const STOP: u8 = 3;
/// Failed requests after which the client gives up.
const FAILURES_MAX: u64 = 20;
/// The client stops by itself after this long, whatever the suite does.
const CLIENT_MAX: Duration = Duration::from_secs(240);

#[derive(Default)]
struct ClientOut {
    /// Latencies in milliseconds, per phase.
    lat: [Vec<f64>; 3],
    failed: [u64; 3],
    errors: Vec<String>,
}

/// The client thread, stopped (and joined) when dropped.
struct Client {
    phase: Arc<AtomicU8>,
    done: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<ClientOut, String>>>,
}

impl Client {
    fn start(ns: &str, addr: SocketAddr) -> Client {
        let phase = Arc::new(AtomicU8::new(WARMUP));
        let done = Arc::new(AtomicU64::new(0));
        let (p, d, ns) = (phase.clone(), done.clone(), ns.to_string());
        let handle = std::thread::spawn(move || client_loop(&ns, addr, &p, &d));
        Client {
            phase,
            done,
            handle: Some(handle),
        }
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    fn running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Waits (at most `limit`) until the client has answered `n` more requests.
    fn wait_requests(&self, n: u64, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        let want = self.done() + n;
        while self.done() < want {
            if Instant::now() >= until || !self.running() {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    fn set(&self, phase: u8) {
        self.phase.store(phase, Ordering::Relaxed);
    }

    fn finish(mut self) -> Result<ClientOut, String> {
        self.set(STOP);
        match self.handle.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("the client thread panicked".into()),
            None => Err("the client was already stopped".into()),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.set(STOP);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn client_loop(
    ns: &str,
    addr: SocketAddr,
    phase: &AtomicU8,
    done: &AtomicU64,
) -> Result<ClientOut, String> {
    netns::enter(ns).map_err(|e| e.to_string())?;
    let mut out = ClientOut::default();
    let mut conn = Conn::open(addr)?;
    let started = Instant::now();
    let mut failures = 0;
    loop {
        let p = phase.load(Ordering::Relaxed);
        if p >= STOP || started.elapsed() > CLIENT_MAX {
            return Ok(out);
        }
        let t = Instant::now();
        match conn.get() {
            Ok(()) => {
                out.lat[p as usize].push(t.elapsed().as_secs_f64() * 1e3);
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                out.failed[p as usize] += 1;
                failures += 1;
                if out.errors.len() < 10 {
                    out.errors.push(e);
                }
                if failures >= FAILURES_MAX {
                    return Err(format!(
                        "the client gave up after {failures} failed requests: {}",
                        out.errors.join("; ")
                    ));
                }
                // A new connection, so that the suite goes on (it is the one moved next).
                conn = Conn::open(addr)?;
            }
        }
    }
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn other(node: u16) -> u16 {
    3 - node
}

fn cutover(
    r: &mut Report,
    prefix: &str,
    client_ns: &str,
    vip: SocketAddr,
    migrations: usize,
) -> Result<(), String> {
    let client = Client::start(client_ns, vip);
    if !client.wait_requests(200, Duration::from_secs(5)) {
        return Err(match client.finish() {
            Err(e) => format!("the client: {e}"),
            Ok(_) => "the client did not get 200 answers within 5 s".into(),
        });
    }
    client.set(MIGRATING);
    let phase_start = Instant::now();
    let limit = Duration::from_secs(if migrations <= 30 { 20 } else { 60 });
    let mut cut = Vec::new();
    let mut total = Vec::new();
    let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
    let (mut at, mut not_listed, mut not_live, mut attempts) = (1u16, 0usize, 0usize, 0usize);
    while cut.len() < migrations
        && attempts < migrations * 5
        && phase_start.elapsed() < limit
        && client.running()
    {
        attempts += 1;
        let (from, to) = (format!("node{at}"), format!("node{}", other(at)));
        let rep = lab::migrate(prefix, &from, &to, Select::Count(1))
            .map_err(|e| format!("migrating {from} -> {to}: {e}"))?;
        for (_, why) in &rep.refused {
            *refusals.entry(why.clone()).or_default() += 1;
        }
        if rep.moved.len() == 1 {
            cut.push(rep.cutover_ms);
            total.push(rep.total_ms);
            if rep.live != 1 {
                not_live += 1;
            }
            at = other(at);
            // The next move only once the client is back to back on its new node.
            client.wait_requests(5, Duration::from_secs(2));
            std::thread::sleep(Duration::from_millis(5));
        } else {
            if rep.refused.is_empty() {
                // Not listed on `from`: it is on the other node (the first time) or was not
                // movable just then.
                not_listed += 1;
                at = other(at);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let migrating_for = phase_start.elapsed();
    client.set(BASELINE);
    // The same connection, as long again, with nothing moving.
    let until = Instant::now() + migrating_for;
    while Instant::now() < until && client.running() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = client.finish().map_err(|e| format!("the client: {e}"))?;
    let moved = cut.len();
    let cut = sorted(cut);
    let total = sorted(total);
    let mig = sorted(out.lat[MIGRATING as usize].clone());
    let base = sorted(out.lat[BASELINE as usize].clone());
    let warm = sorted(out.lat[WARMUP as usize].clone());
    // Requests that waited for a retransmission (the kernel's minimum RTO is 200 ms).
    let stalls = mig.iter().filter(|&&l| l >= 100.0).count();
    eprintln!(
        "cluster: cutover: {moved} migrations in {:.1} s ({attempts} attempts): median {:.2} ms, \
         p99 {:.2} ms, max {:.2} ms; client {} requests, worst {:.1} ms, {} failed; \
         {stalls} took >= 100 ms; baseline {} requests, worst {:.1} ms; p50 warm-up {:.3} ms, \
         migrating {:.3} ms, baseline {:.3} ms",
        migrating_for.as_secs_f64(),
        pct(&cut, 50.0),
        pct(&cut, 99.0),
        pct(&cut, 100.0),
        mig.len(),
        pct(&mig, 100.0),
        out.failed[MIGRATING as usize],
        base.len(),
        pct(&base, 100.0),
        pct(&warm, 50.0),
        pct(&mig, 50.0),
        pct(&base, 50.0),
    );
    if moved > 0 {
        r.add("cutover", "median_ms", pct(&cut, 50.0));
        r.add("cutover", "p99_ms", pct(&cut, 99.0));
    }
    for (name, v) in [("client_migrating", &mig), ("client_baseline", &base)] {
        if !v.is_empty() {
            r.add(name, "p50_ms", pct(v, 50.0));
            r.add(name, "p99_ms", pct(v, 99.0));
            r.add(name, "max_ms", pct(v, 100.0));
        }
    }
    r.detail("cutover", "count", moved as f64);
    if moved > 0 {
        r.detail("cutover", "max_ms", pct(&cut, 100.0));
        r.detail("cutover", "total_median_ms", pct(&total, 50.0));
    }
    if !mig.is_empty() {
        r.detail("cutover", "client_worst_ms", pct(&mig, 100.0));
    }
    r.detail(
        "cutover",
        "client_failed",
        out.failed[MIGRATING as usize] as f64,
    );
    r.detail("cutover", "client_requests", mig.len() as f64);
    r.detail("cutover", "client_stalls_100ms", stalls as f64);
    r.detail("cutover", "seconds", migrating_for.as_secs_f64());
    r.detail(
        "client_baseline",
        "failed",
        out.failed[BASELINE as usize] as f64,
    );
    r.detail("client_baseline", "requests", base.len() as f64);
    r.detail("cutover", "not_listed", not_listed as f64);
    r.detail(
        "cutover",
        "refused",
        refusals.values().sum::<usize>() as f64,
    );
    if let (Some(&w), Some(&b)) = (mig.last(), base.last()) {
        println!(
            "cluster: worst request while migrating {w:.2} ms vs {b:.2} ms without: {:.1}x",
            w / b
        );
    }
    r.note(format!(
        "cutover: one keep-alive connection making back-to-back GET /index.html requests, moved \
         node1<->node2 {moved} times ({attempts} attempts, {not_listed} found nothing to move on \
         the source node); cutover_ms is the switch's hold to its release; client_* are the \
         same client's request latencies while migrating and, for as long again, without"
    ));
    for (why, n) in &refusals {
        r.note(format!("cutover: refused {n}x: {why}"));
    }
    if not_live > 0 {
        r.note(format!(
            "cutover: {not_live} moved connections were not reported live by the destination"
        ));
    }
    if !out.errors.is_empty() {
        r.note(format!("client errors: {}", out.errors.join("; ")));
    }
    if moved < migrations {
        return Err(format!(
            "only {moved} of {migrations} migrations moved the connection ({attempts} attempts, \
             {not_listed} empty, refusals {refusals:?})"
        ));
    }
    Ok(())
}

fn batch_move(
    r: &mut Report,
    opts: &Options,
    prefix: &str,
    client_ns: &str,
    vip: SocketAddr,
    count: usize,
) -> Result<(), String> {
    let name = batch_name(opts.quick);
    let t = Instant::now();
    let mut conns: Vec<Conn> = netns::run_in(client_ns, || -> Result<Vec<Conn>, String> {
        let mut v = Vec::with_capacity(count);
        for i in 0..count {
            let mut c = Conn::open(vip).map_err(|e| format!("connection {i}: {e}"))?;
            c.get().map_err(|e| format!("connection {i}: {e}"))?;
            v.push(c);
        }
        Ok(v)
    })
    .map_err(|e| e.to_string())??;
    eprintln!(
        "cluster: batch: {count} connections opened in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    // Gather them on node1 (the switch spread them over both nodes).
    let mut gathered = 0;
    for _ in 0..3 {
        let rep = lab::migrate(prefix, "node2", "node1", Select::All)
            .map_err(|e| format!("gathering on node1: {e}"))?;
        gathered += rep.moved.len();
        if rep.refused.is_empty() {
            break;
        }
    }
    let rep = lab::migrate(prefix, "node1", "node2", Select::All)
        .map_err(|e| format!("moving the batch node1 -> node2: {e}"))?;
    eprintln!(
        "cluster: batch: {} moved node1 -> node2 in {:.1} ms (cut-over {:.1} ms), {} refused; \
         {gathered} had been gathered on node1 first",
        rep.moved.len(),
        rep.total_ms,
        rep.cutover_ms,
        rep.refused.len()
    );
    // Every connection's next request, sent on all of them first, then read.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut sent = vec![false; conns.len()];
    for (c, s) in conns.iter_mut().zip(sent.iter_mut()) {
        match c.send() {
            Ok(()) => *s = true,
            Err(e) => *errors.entry(e).or_default() += 1,
        }
    }
    let mut ok = 0;
    for (c, s) in conns.iter_mut().zip(&sent) {
        if !s {
            continue;
        }
        match c.receive(deadline) {
            Ok(()) => ok += 1,
            Err(e) => *errors.entry(e).or_default() += 1,
        }
    }
    drop(conns);
    r.add(name, "total_ms", rep.total_ms);
    r.detail(name, "count", count as f64);
    r.detail(name, "moved", rep.moved.len() as f64);
    r.detail(name, "refused", rep.refused.len() as f64);
    r.detail(name, "live", rep.live as f64);
    r.detail(name, "cutover_ms", rep.cutover_ms);
    r.detail(name, "ok_after", ok as f64);
    r.detail(name, "gathered", gathered as f64);
    r.note(format!(
        "{name}: {count} idle keep-alive connections (one request each), gathered on node1 \
         ({gathered} moved there from node2), then all moved to node2 in one migration; \
         total_ms is that whole operation (listing included), ok_after the connections that \
         answered their next request"
    ));
    let mut why: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, w) in &rep.refused {
        *why.entry(w.as_str()).or_default() += 1;
    }
    for (w, n) in why {
        r.note(format!("{name}: refused {n}x: {w}"));
    }
    for (e, n) in &errors {
        r.note(format!("{name}: after the move, {n} requests failed: {e}"));
    }
    if ok != count {
        return Err(format!(
            "{name}: only {ok} of {count} connections answered after the move"
        ));
    }
    Ok(())
}
