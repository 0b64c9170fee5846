//! The cluster suite's failover measurements (issue 14), in a lab of their own with etcd
//! (`splitos lab up --failover`), driven through the `splitos` command as an operator would:
//!
//! - **takeover**: idle keep-alive connections gathered on node1 (one request each), node1
//!   killed (`splitos lab kill`: link cut, SIGKILL); every client sends its next request at
//!   once on the same socket. `worst_ms` is the time until the last one is answered.
//! - **kills**: rounds of a random kill (either node) at a random moment, with idle
//!   connections and downloads in flight on both nodes, the dead node restarted after each.
//!   Every connection must end one of two ways — answered correctly on the same socket, or
//!   reset (never hung past `HANG_MS`, never a wrong byte) — and etcd's adoptions must agree
//!   with the switch: each adopted flow is owned there by its adopter, and no flow is adopted
//!   by two nodes.
//! - **cost**: requests per second of `wrk` against a failover lab (checkpoints streaming to
//!   the successor) and against a lab without, in alternating rounds.

use super::{Conn, REQUEST_TIMEOUT};
use crate::report::Report;
use splitos_cluster::netns;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A connection that neither answers nor fails within this long is hung.
const HANG_MS: f64 = 5000.0;
const BIG: u64 = 64 << 20;

/// A lab made through the CLI, taken down on drop.
struct CliLab {
    splitos: PathBuf,
    name: String,
    site: PathBuf,
}

impl CliLab {
    fn up(splitos: &Path, name: &str, extra: &[&str]) -> Result<CliLab, String> {
        let site = std::env::temp_dir().join(format!("{name}-site"));
        std::fs::create_dir_all(&site).map_err(|e| format!("{}: {e}", site.display()))?;
        std::fs::write(site.join("index.html"), index(name))
            .map_err(|e| format!("writing the site: {e}"))?;
        write_big(&site.join("big.bin"))?;
        let lab = CliLab {
            splitos: splitos.to_path_buf(),
            name: name.to_string(),
            site,
        };
        let site = lab.site.display().to_string();
        let mut args = vec!["lab", "up", "--nodes", "2", "--name", name, "--site", &site];
        args.extend_from_slice(extra);
        lab.run(&args)?;
        Ok(lab)
    }

    fn run(&self, args: &[&str]) -> Result<String, String> {
        let o = Command::new(&self.splitos)
            .args(args)
            .output()
            .map_err(|e| format!("splitos {args:?}: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "splitos {args:?}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    fn lab(&self, args: &[&str]) -> Result<String, String> {
        let mut a = vec!["lab", "--name", &self.name];
        a.extend_from_slice(args);
        self.run(&a)
    }

    fn status(&self) -> Result<serde_json::Value, String> {
        let s = self.lab(&["status", "--json"])?;
        serde_json::from_str(&s).map_err(|e| format!("lab status: {e}"))
    }

    fn ns(&self, member: &str) -> String {
        format!("{}-{member}", self.name)
    }
}

impl CliLab {
    /// Copies the lab's logs out of its state directory (which `down` removes).
    fn keep_logs(&self) -> Option<PathBuf> {
        let from = PathBuf::from("/run/splitos-lab").join(&self.name);
        let to = std::env::temp_dir().join(format!("splitos-bench-{}", self.name));
        std::fs::create_dir_all(&to).ok()?;
        for e in std::fs::read_dir(&from).ok()?.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(&p, to.join(e.file_name()));
            }
        }
        Some(to)
    }
}

impl Drop for CliLab {
    fn drop(&mut self) {
        let _ = Command::new(&self.splitos)
            .args(["lab", "down", "--name", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(&self.site);
    }
}

fn index(name: &str) -> String {
    format!("<h1>failover lab {name}</h1>\n")
}

/// The download's bytes: byte i is (i / 4096 + i) mod 251, so a misplaced or wrong byte shows.
fn pattern_at(i: u64) -> u8 {
    ((i / 4096 + i) % 251) as u8
}

fn write_big(path: &Path) -> Result<(), String> {
    let mut v = Vec::with_capacity(BIG as usize);
    for i in 0..BIG {
        v.push(pattern_at(i));
    }
    std::fs::write(path, v).map_err(|e| format!("{}: {e}", path.display()))
}

/// Waits until node `k`'s agent holds at least `idle` idle checkpoints.
fn wait_checkpoints(lab: &CliLab, k: usize, idle: u64, limit: Duration) -> Result<(), String> {
    let until = Instant::now() + limit;
    loop {
        let st = lab.status()?;
        let have = st["nodes"][k - 1]["failover"]["held"]["idle"]
            .as_u64()
            .unwrap_or(0);
        if have >= idle {
            return Ok(());
        }
        if Instant::now() >= until {
            return Err(format!(
                "node{k} holds {have} of {idle} idle checkpoints after {limit:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until both nodes are registered and serving (after a restart).
fn wait_both_registered(lab: &CliLab) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let st = lab.status()?;
        let n = (0..2)
            .filter(|k| st["nodes"][k]["failover"]["incarnation"].as_i64().is_some())
            .count();
        if n == 2 {
            return Ok(());
        }
        if Instant::now() >= until {
            return Err(format!("the nodes did not both register: {}", st["nodes"]));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn failover(
    r: &mut Report,
    quick: bool,
    splitos: &Path,
    vip: SocketAddr,
) -> Result<(), String> {
    let lab = CliLab::up(
        splitos,
        &format!("sbf{}", std::process::id()),
        &["--failover"],
    )?;
    let result = takeover(r, &lab, vip, if quick { 50 } else { 100 })
        .and_then(|()| {
            let rounds = std::env::var("SPLITOS_BENCH_KILLS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(if quick { 4 } else { 100 });
            kills(r, &lab, vip, rounds)
        })
        .and_then(|()| cost(r, splitos, &lab, vip, if quick { 3 } else { 5 }));
    if result.is_err() || r.get("kills", "open_failed").is_some_and(|n| n > 0.0) {
        if let Some(d) = lab.keep_logs() {
            r.note(format!(
                "failover: the lab's logs are kept in {}",
                d.display()
            ));
        }
    }
    drop(lab);
    result
}

fn takeover(r: &mut Report, lab: &CliLab, vip: SocketAddr, n: usize) -> Result<(), String> {
    let client = lab.ns("client");
    let mut conns = netns::run_in(&client, || -> Result<Vec<Conn>, String> {
        (0..n)
            .map(|i| {
                let mut c = Conn::open(vip).map_err(|e| format!("connection {i}: {e}"))?;
                c.get().map_err(|e| format!("connection {i}: {e}"))?;
                Ok(c)
            })
            .collect()
    })
    .map_err(|e| e.to_string())??;
    lab.lab(&["migrate", "--from", "node2", "--to", "node1", "--all"])?;
    wait_checkpoints(lab, 2, n as u64, Duration::from_secs(15))?;
    let killed = Instant::now();
    lab.lab(&["kill", "node1"])?;
    let kill_ms = killed.elapsed().as_secs_f64() * 1e3;
    let t0 = Instant::now();
    let mut ok = 0;
    let mut worst = 0f64;
    let mut errors = Vec::new();
    for c in conns.iter_mut() {
        if let Err(e) = c.send() {
            errors.push(e);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in conns.iter_mut() {
        match c.receive(deadline) {
            Ok(()) => ok += 1,
            Err(e) => errors.push(e),
        }
        worst = worst.max(t0.elapsed().as_secs_f64() * 1e3);
    }
    let report = lab.status()?["nodes"][1]["failover"]["takeovers"]
        .as_array()
        .and_then(|t| t.last().cloned())
        .unwrap_or_default();
    r.add("takeover", "worst_ms", worst);
    r.detail("takeover", "count", n as f64);
    r.detail("takeover", "ok_after", ok as f64);
    r.detail("takeover", "kill_ms", kill_ms);
    for m in [
        "restored", "verified", "stale", "reset", "live_ms", "adopt_ms",
    ] {
        if let Some(v) = report[m].as_f64() {
            r.detail("takeover", m, v);
        }
    }
    r.note(format!(
        "takeover: {n} idle keep-alive connections on node1, node1 killed (`lab kill`, {kill_ms:.0} \
         ms); every client sent its next request at once on the same socket; worst_ms until \
         the last answer; node2's report: {report}"
    ));
    for e in errors.iter().take(3) {
        r.note(format!("takeover: a request failed: {e}"));
    }
    drop(conns);
    lab.lab(&["restart", "node1"])?;
    wait_both_registered(lab)?;
    if ok != n {
        return Err(format!(
            "takeover: only {ok} of {n} answered after the kill"
        ));
    }
    Ok(())
}

/// How one connection of a kill round ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Answered,
    Reset,
    Hung,
    Wrong(String),
}

/// An idle connection's next request after the kill.
fn idle_next(c: &mut Conn) -> (End, f64) {
    let t = Instant::now();
    let end = match c
        .send()
        .and_then(|()| c.receive(Instant::now() + Duration::from_millis(HANG_MS as u64)))
    {
        Ok(()) => End::Answered,
        Err(e) if e.contains("no answer") => End::Hung,
        Err(e) if e.contains("reset") || e.contains("closed") || e.contains("Broken pipe") => {
            End::Reset
        }
        Err(e) if e.contains("answered") => End::Wrong(e),
        Err(_) => End::Reset,
    };
    (end, t.elapsed().as_secs_f64() * 1e3)
}

/// A download in flight: reads the rest, checking every byte, until its end, a reset or
/// `HANG_MS` of silence.
fn download_rest(s: &mut std::net::TcpStream, mut at: u64, body_start: u64) -> (End, f64) {
    let t = Instant::now();
    let _ = s.set_read_timeout(Some(Duration::from_millis(HANG_MS as u64)));
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                let end = if at - body_start == BIG {
                    End::Answered
                } else {
                    End::Reset
                };
                return (end, t.elapsed().as_secs_f64() * 1e3);
            }
            Ok(n) => {
                for (i, b) in buf[..n].iter().enumerate() {
                    let pos = at + i as u64 - body_start;
                    if *b != pattern_at(pos) {
                        return (End::Wrong(format!("byte {pos} is wrong")), 0.0);
                    }
                }
                at += n as u64;
                if at - body_start == BIG {
                    return (End::Answered, t.elapsed().as_secs_f64() * 1e3);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (End::Reset, t.elapsed().as_secs_f64() * 1e3)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (End::Hung, t.elapsed().as_secs_f64() * 1e3)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return (End::Reset, t.elapsed().as_secs_f64() * 1e3),
        }
    }
}

/// Starts a download and reads its head and a little of its body.
fn download_start(vip: SocketAddr) -> Result<(std::net::TcpStream, u64, u64), String> {
    use std::io::Write;
    let fd = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::STREAM,
        None,
    )
    .map_err(|e| e.to_string())?;
    // A small receive buffer keeps the download in flight for the whole round.
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&fd, 64 << 10);
    let _ = rustix::net::sockopt::set_socket_timeout(
        &fd,
        rustix::net::sockopt::Timeout::Send,
        Some(REQUEST_TIMEOUT),
    );
    rustix::net::connect(&fd, &vip).map_err(|e| format!("connecting: {e}"))?;
    let mut s = std::net::TcpStream::from(fd);
    s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: lab\r\n\r\n")
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("download head: {e}"))?;
        if n == 0 {
            return Err("the download closed before its head".into());
        }
        got.extend_from_slice(&buf[..n]);
    }
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
    if !got.starts_with(b"HTTP/1.1 200") {
        return Err("the download was not answered 200".into());
    }
    let body = &got[end..];
    for (i, b) in body.iter().enumerate() {
        if *b != pattern_at(i as u64) {
            return Err(format!("download byte {i} is wrong"));
        }
    }
    Ok((s, got.len() as u64, end as u64))
}

/// A small deterministic generator (xorshift), so a run's kills can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn kills(r: &mut Report, lab: &CliLab, vip: SocketAddr, rounds: usize) -> Result<(), String> {
    let client = lab.ns("client");
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (mut answered, mut reset, mut hung, mut wrong) = (0usize, 0usize, 0usize, 0usize);
    let mut reset_ms: Vec<f64> = Vec::new();
    let mut twice = 0usize;
    let mut disagree = 0usize;
    let mut adoptions_seen = 0usize;
    let mut open_failed = 0usize;
    let started = Instant::now();
    for round in 0..rounds {
        let victim = if rng.next() % 2 == 0 {
            "node1"
        } else {
            "node2"
        };
        // A connection that cannot be opened (or answered) now is a failure of the cluster
        // between rounds: counted, and the round goes on with the others.
        let (mut idle, mut downloads, failed) = netns::run_in(&client, || {
            let mut failed = Vec::new();
            let idle: Vec<Conn> = (0..10)
                .filter_map(|_| {
                    let mut c = Conn::open(vip).map_err(|e| failed.push(e)).ok()?;
                    c.get().map_err(|e| failed.push(e)).ok()?;
                    Some(c)
                })
                .collect();
            let downloads: Vec<_> = (0..2)
                .filter_map(|_| download_start(vip).map_err(|e| failed.push(e)).ok())
                .collect();
            (idle, downloads, failed)
        })
        .map_err(|e| e.to_string())?;
        for e in &failed {
            r.note(format!("kills: round {round}: opening a connection: {e}"));
        }
        open_failed += failed.len();
        // Sometimes at once (before any checkpoint), mostly once they rested.
        let pause = Duration::from_millis(rng.next() % 400);
        std::thread::sleep(pause);
        lab.lab(&["kill", victim])?;
        let ends = idle
            .iter_mut()
            .map(idle_next)
            .chain(
                downloads
                    .iter_mut()
                    .map(|(s, at, body)| download_rest(s, *at, *body)),
            )
            .collect::<Vec<_>>();
        for end in ends {
            match end {
                (End::Answered, _) => answered += 1,
                (End::Reset, ms) => {
                    reset += 1;
                    reset_ms.push(ms);
                }
                (End::Hung, _) => hung += 1,
                (End::Wrong(e), _) => {
                    wrong += 1;
                    r.note(format!("kills: round {round}: {e}"));
                }
            }
        }
        drop(idle);
        drop(downloads);
        // etcd and the switch agree: every adopted flow is owned by its adopter.
        let st = lab.status()?;
        let adoptions = st["adoptions"].as_array().cloned().unwrap_or_default();
        adoptions_seen = adoptions.len();
        let mut seen = std::collections::HashSet::<(String, String)>::new();
        for a in &adoptions {
            let inc = a["incarnation"].to_string();
            for f in a["flows"].as_array().into_iter().flatten() {
                if !seen.insert((f.to_string(), inc.clone())) {
                    twice += 1;
                }
            }
        }
        // The newest adoption's flows are owned, at the switch, by their adopter.
        if let Some(last) = adoptions
            .iter()
            .max_by_key(|a| a["at_ms"].as_u64().unwrap_or(0))
        {
            let adopter = last["adopter"].as_str().unwrap_or("");
            let k: usize = adopter.trim_start_matches("node").parse().unwrap_or(0);
            if k >= 1 {
                let owned: std::collections::HashSet<String> = st["nodes"][k - 1]["owned_flows"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.as_str().unwrap_or("").to_string())
                    .collect();
                for f in last["flows"].as_array().into_iter().flatten() {
                    if !owned.contains(f.as_str().unwrap_or("")) {
                        disagree += 1;
                    }
                }
            }
        }
        lab.lab(&["restart", victim])?;
        wait_both_registered(lab)?;
    }
    reset_ms.sort_by(f64::total_cmp);
    let worst_reset = reset_ms.last().copied().unwrap_or(0.0);
    r.add("kills", "hung", hung as f64);
    r.add("kills", "wrong", wrong as f64);
    r.add("kills", "adopted_twice", twice as f64);
    r.add("kills", "switch_disagrees", disagree as f64);
    r.add("kills", "open_failed", open_failed as f64);
    r.detail("kills", "rounds", rounds as f64);
    r.detail("kills", "answered", answered as f64);
    r.detail("kills", "reset", reset as f64);
    r.detail("kills", "worst_reset_ms", worst_reset);
    r.detail("kills", "adoptions", adoptions_seen as f64);
    r.detail("kills", "seconds", started.elapsed().as_secs_f64());
    r.note(format!(
        "kills: {rounds} rounds of a random node killed at a random moment (0-400 ms after 10 \
         idle connections and 2 downloads opened), restarted after; each connection answered \
         on its socket or reset (worst reset {worst_reset:.0} ms after its next read), never hung \
         ({HANG_MS} ms) or wrong"
    ));
    Ok(())
}

/// wrk's requests per second against the lab `lab`, for `secs` seconds; `close`: a new
/// connection per request.
fn wrk(lab: &CliLab, vip: SocketAddr, secs: u64, close: bool) -> Result<f64, String> {
    let mut cmd = netns::command_in(&lab.ns("client"), "wrk");
    cmd.args(["-t1", "-c50", &format!("-d{secs}s")]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd
        .arg(format!("http://{vip}/index.html"))
        .output()
        .map_err(|e| format!("wrk: {e} (apt-get install wrk)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("wrk printed no rate: {text}"))
}

/// What checkpoints cost: two failover labs alike but for `--no-checkpoints` on the nodes of
/// one, measured in alternating rounds, with keep-alive connections (a connection rests only
/// between wrk's requests, so it is seldom checkpointed) and with a connection per request
/// (each one opened and closed: two events on the stream).
fn cost(
    r: &mut Report,
    splitos: &Path,
    with: &CliLab,
    vip: SocketAddr,
    rounds: usize,
) -> Result<(), String> {
    let without = CliLab::up(
        splitos,
        &format!("sbn{}", std::process::id()),
        &["--failover", "--node-arg=--no-checkpoints"],
    )?;
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (close, on_name, off_name) in [
        (false, "checkpoints_on", "checkpoints_off"),
        (true, "checkpoints_on_close", "checkpoints_off_close"),
    ] {
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            on.push(wrk(with, vip, 2, close)?);
            off.push(wrk(&without, vip, 2, close)?);
        }
        r.add(on_name, "req_per_s", med(on));
        r.add(off_name, "req_per_s", med(off));
        r.ratio("req_per_s", on_name, off_name);
    }
    r.note(format!(
        "cost: wrk -t1 -c50 for 2 s (keep-alive; and `Connection: close`, *_close) on two \
         failover labs alike but for --no-checkpoints on one's nodes, {rounds} alternating \
         rounds, medians"
    ));
    Ok(())
}
