//! The `http` suite: `splitos serve` against nginx serving the same directory, both driven by
//! wrk (keep-alive, 50 connections) for 1 KiB, 16 KiB and 1 MiB files. It installs nothing:
//! it finds `nginx` and `wrk` on the PATH (`apt-get install -y nginx-light wrk`) and the
//! `splitos` binary next to this one (`cargo build --release -p splitos-cli`).
//!
//! nginx gets one worker per thread given to Split-OS's TCP server, `sendfile on`,
//! `tcp_nopush on`, `open_file_cache`, keep-alive and no access log. Server CPU is read from
//! /proc over each wrk run (for nginx: all its processes).

use crate::report::Report;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Options {
    pub quick: bool,
}

const FILES: [(&str, usize); 3] = [("1k", 1 << 10), ("16k", 16 << 10), ("1m", 1 << 20)];

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

/// CPU seconds of `pid` and its threads, plus its children (nginx workers) if any.
fn cpu_tree(pid: u32) -> f64 {
    let read = |p: u32| -> f64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            return 0.0;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return 0.0;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        (t(11) + t(12)) as f64 / rustix::param::clock_ticks_per_second() as f64
    };
    let mut total = read(pid);
    if let Ok(kids) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        for k in kids.split_whitespace().filter_map(|k| k.parse().ok()) {
            total += read(k);
        }
    }
    total
}

fn wait_port(port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("nothing listening on port {port}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn start_nginx(
    nginx: &Path,
    root: &Path,
    tmp: &Path,
    workers: usize,
) -> Result<(Proc, u16), String> {
    let port = free_port()?;
    let conf = format!(
        "worker_processes {workers};\ndaemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_timeout 65;\n  keepalive_requests 1000000;\n\
           open_file_cache max=10000 inactive=60s;\n  open_file_cache_valid 60s;\n\
           client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n  fastcgi_temp_path {tmp}/fcgi;\n\
           uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n\
           server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
        tmp = tmp.display(),
        root = root.display(),
    );
    let path = tmp.join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    let child = Command::new(nginx)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting nginx: {e}"))?;
    let p = Proc(child);
    wait_port(port)?;
    Ok((p, port))
}

fn start_splitos(bin: &Path, root: &Path, threads: usize) -> Result<(Proc, u16), String> {
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            &threads.to_string(),
        ])
        .arg(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting splitos serve: {e}"))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let p = Proc(child);
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let port: u16 = line
        .trim()
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches('/')
        .parse()
        .map_err(|_| format!("unexpected output from splitos serve: {line:?}"))?;
    Ok((p, port))
}

/// Runs wrk; returns (requests per second, p99 latency in µs).
fn wrk(wrk: &Path, port: u16, path: &str, secs: u64) -> Result<(f64, f64), String> {
    let out = Command::new(wrk)
        .args(["-t1", "-c50", &format!("-d{secs}s"), "--latency"])
        .arg(format!("http://127.0.0.1:{port}/{path}"))
        .output()
        .map_err(|e| format!("running wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("wrk printed no rate:\n{text}"))?;
    if text.contains("Non-2xx") {
        return Err(format!("wrk saw errors:\n{text}"));
    }
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| v.trim())
        .and_then(|v| {
            let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
            let n: f64 = num.parse().ok()?;
            Some(match unit {
                "us" => n,
                "ms" => n * 1e3,
                "s" => n * 1e6,
                _ => return None,
            })
        })
        .ok_or_else(|| format!("wrk printed no p99:\n{text}"))?;
    Ok((rps, p99))
}

pub fn run(opts: &Options) -> Report {
    let mut r = Report::new("http");
    if let Err(e) = run_inner(opts, &mut r) {
        eprintln!("http: FAILED: {e}");
        r.note(format!("failed: {e}"));
    }
    for (name, _) in FILES {
        for m in ["req_per_s", "req_per_cpu_s", "p99_us"] {
            r.ratio(m, &format!("splitos_{name}"), &format!("nginx_{name}"));
        }
        r.target(
            "req_per_s",
            &format!("splitos_{name}"),
            &format!("nginx_{name}"),
            1.0,
            false,
        );
        r.target(
            "req_per_cpu_s",
            &format!("splitos_{name}"),
            &format!("nginx_{name}"),
            1.0,
            false,
        );
        r.target(
            "p99_us",
            &format!("splitos_{name}"),
            &format!("nginx_{name}"),
            1.2,
            true,
        );
    }
    r
}

fn run_inner(opts: &Options, r: &mut Report) -> Result<(), String> {
    let nginx = which("nginx").ok_or("nginx not found (apt-get install -y nginx-light)")?;
    let wrk_bin = which("wrk").ok_or("wrk not found (apt-get install -y wrk)")?;
    let splitos = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name("splitos");
    if !splitos.is_file() {
        return Err(format!(
            "{} not found (cargo build --release -p splitos-cli)",
            splitos.display()
        ));
    }
    let tmp = std::env::temp_dir().join(format!("splitos-bench-http-{}", std::process::id()));
    let root = tmp.join("site");
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    for (name, size) in FILES {
        let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        std::fs::write(root.join(format!("{name}.bin")), body).map_err(|e| e.to_string())?;
    }
    let threads = 1;
    // Both servers run side by side and take turns, round by round, so that drift in the
    // machine's speed (frequency, neighbours) over the run falls on both alike.
    let (rounds, secs) = if opts.quick { (2, 2) } else { (4, 5) };
    let (splitos_proc, splitos_port) = start_splitos(&splitos, &root, threads)?;
    let (nginx_proc, nginx_port) = start_nginx(&nginx, &root, &tmp, threads)?;
    let servers = [
        ("splitos", splitos_proc.0.id(), splitos_port),
        ("nginx", nginx_proc.0.id(), nginx_port),
    ];
    for (size, _) in FILES {
        let path = format!("{size}.bin");
        let mut totals = [(0.0f64, 0.0f64, 0.0f64); 2]; // requests, CPU seconds, p99 sum
        for (_, _, port) in servers {
            wrk(&wrk_bin, port, &path, 1)?; // warm caches
        }
        for _ in 0..rounds {
            for (i, (_, pid, port)) in servers.iter().enumerate() {
                let c0 = cpu_tree(*pid);
                let (rps, p99) = wrk(&wrk_bin, *port, &path, secs)?;
                totals[i].0 += rps * secs as f64;
                totals[i].1 += cpu_tree(*pid) - c0;
                totals[i].2 += p99;
            }
        }
        for (i, (name, _, _)) in servers.iter().enumerate() {
            let (reqs, cpu, p99s) = totals[i];
            let label = format!("{name}_{size}");
            let rps = reqs / (rounds * secs) as f64;
            let per_cpu = reqs / cpu.max(1e-9);
            let p99 = p99s / rounds as f64;
            r.add(&label, "req_per_s", rps);
            r.add(&label, "req_per_cpu_s", per_cpu);
            r.add(&label, "p99_us", p99);
            eprintln!("http: {label}: {rps:.0} req/s, {per_cpu:.0} req/CPU-s, p99 {p99:.0} µs");
        }
    }
    drop(splitos_proc);
    drop(nginx_proc);
    r.note(format!(
        "wrk -t1 -c50 keep-alive; per size {rounds} alternating rounds of {secs} s per server (p99: mean of rounds); \
         nginx {threads} worker (sendfile, tcp_nopush, open_file_cache, no access log); splitos serve with {threads} TCP server thread"
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
