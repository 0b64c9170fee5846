//! The servers the `http` suite compares, each started as its documentation recommends for
//! static files (sendfile, keep-alive without a request cap, open-file caching, no access log,
//! one worker per thread given to Split-OS's TCP server), and the wrk client that drives them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process, stopped (TERM, then KILL after 5 s) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        crate::proc::reap_within(&mut self.0, Duration::from_secs(5));
    }
}

/// One server under test, listening on `port`; its CPU is its process tree's.
pub struct Server {
    pub name: &'static str,
    pub proc: Proc,
    pub port: u16,
}

pub fn which(name: &str) -> Option<PathBuf> {
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

/// CPU seconds of `pid` and its threads, plus its children (nginx and lighttpd workers).
pub fn cpu_tree(pid: u32) -> f64 {
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

fn wait_port(port: u16, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!(
                "{what}: nothing listening on port {port} after 10 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn spawn(cmd: &mut Command, what: &str, port: u16) -> Result<Proc, String> {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {what}: {e}"))?;
    let p = Proc(child);
    wait_port(port, what)?;
    Ok(p)
}

pub fn nginx(bin: &Path, root: &Path, tmp: &Path, workers: usize) -> Result<Server, String> {
    let port = free_port()?;
    let dir = tmp.join("nginx");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let conf = format!(
        "worker_processes {workers};\ndaemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_timeout 65;\n  keepalive_requests 1000000;\n\
           open_file_cache max=10000 inactive=60s;\n  open_file_cache_valid 60s;\n\
           client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n  fastcgi_temp_path {tmp}/fcgi;\n\
           uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n\
           server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
        tmp = dir.display(),
        root = root.display(),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    let proc = spawn(
        Command::new(bin).arg("-c").arg(&path).arg("-p").arg(&dir),
        "nginx",
        port,
    )?;
    Ok(Server {
        name: "nginx",
        proc,
        port,
    })
}

/// lighttpd 1.4 with the `sendfile` network backend, its stat cache, keep-alive without a cap
/// and no access log (mod_accesslog not loaded); `server.max-worker` only above one worker
/// (one process otherwise, as its docs advise).
pub fn lighttpd(bin: &Path, root: &Path, tmp: &Path, workers: usize) -> Result<Server, String> {
    let port = free_port()?;
    let dir = tmp.join("lighttpd");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut conf = format!(
        "server.document-root = \"{root}\"\nserver.bind = \"127.0.0.1\"\nserver.port = {port}\n\
         server.pid-file = \"{tmp}/lighttpd.pid\"\nserver.errorlog = \"{tmp}/error.log\"\n\
         server.network-backend = \"sendfile\"\nserver.event-handler = \"linux-sysepoll\"\n\
         server.stat-cache-engine = \"simple\"\nserver.max-fds = 16384\nserver.max-connections = 8192\n\
         server.max-keep-alive-requests = 1000000\nserver.max-keep-alive-idle = 65\n\
         mimetype.assign = (\".bin\" => \"application/octet-stream\", \"\" => \"application/octet-stream\")\n",
        tmp = dir.display(),
        root = root.display(),
    );
    if workers > 1 {
        conf.push_str(&format!("server.max-worker = {workers}\n"));
    }
    let path = dir.join("lighttpd.conf");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    let proc = spawn(
        Command::new(bin).arg("-D").arg("-f").arg(&path),
        "lighttpd",
        port,
    )?;
    Ok(Server {
        name: "lighttpd",
        proc,
        port,
    })
}

/// h2o 2.2 with `num-threads` workers and its file handler (sendfile, and its built-in cache of
/// open files), no access log (none configured). No pid file: h2o writes it after dropping
/// privileges.
pub fn h2o(bin: &Path, root: &Path, tmp: &Path, workers: usize) -> Result<Server, String> {
    let port = free_port()?;
    let dir = tmp.join("h2o");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // As root, h2o drops privileges to `user`; the site and its directory must be readable.
    let user = if rustix::process::geteuid().is_root() {
        "user: nobody\n"
    } else {
        ""
    };
    let conf = format!(
        "{user}num-threads: {workers}\nerror-log: {tmp}/error.log\nmax-connections: 8192\n\
         listen:\n  host: 127.0.0.1\n  port: {port}\n\
         hosts:\n  default:\n    paths:\n      /:\n        file.dir: {root}\n",
        tmp = dir.display(),
        root = root.display(),
    );
    let path = dir.join("h2o.conf");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    let proc = spawn(Command::new(bin).arg("-c").arg(&path), "h2o", port)?;
    Ok(Server {
        name: "h2o",
        proc,
        port,
    })
}

pub fn splitos(bin: &Path, root: &Path, threads: usize) -> Result<Server, String> {
    splitos_with(bin, root, threads, &[])
}

/// `splitos serve` with more arguments.
pub fn splitos_with(
    bin: &Path,
    root: &Path,
    threads: usize,
    extra: &[&str],
) -> Result<Server, String> {
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            &threads.to_string(),
        ])
        .args(extra)
        .arg(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting splitos serve: {e}"))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let proc = Proc(child);
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
    Ok(Server {
        name: "splitos",
        proc,
        port,
    })
}

/// The ceiling: this benchmark's own minimal server (see `ceiling.rs`), answering every request
/// with `size` bytes from memory.
pub fn ceiling(bench: &Path, size: usize, threads: usize) -> Result<Server, String> {
    let port = free_port()?;
    let proc = spawn(
        Command::new(bench).args([
            "http-ceiling",
            "--port",
            &port.to_string(),
            "--size",
            &size.to_string(),
            "--threads",
            &threads.to_string(),
        ]),
        "the ceiling server",
        port,
    )?;
    Ok(Server {
        name: "ceiling",
        proc,
        port,
    })
}

/// Runs wrk with `threads` threads and 50 connections per thread; returns (requests per
/// second, p99 latency in µs).
pub fn wrk(
    wrk: &Path,
    port: u16,
    path: &str,
    secs: u64,
    threads: usize,
) -> Result<(f64, f64), String> {
    let out = Command::new(wrk)
        .args([
            &format!("-t{threads}"),
            &format!("-c{}", 50 * threads),
            &format!("-d{secs}s"),
            "--latency",
        ])
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
