//! The `file` suite: reading cached files through the shared cache vs `pread` and `mmap` of the
//! same file, and transmitting them to a client over loopback with Split-OS `send_file` vs the
//! kernel's `sendfile(2)`, for 1 KiB, 64 KiB and 4 MiB files.
//!
//! Reads run in this process (a cache hit is a directory lookup and a copy from the mapping).
//! Sends run in processes of their own with this process as the receiving client: the
//! `sendfile` sender reports its own CPU time; for Split-OS the TCP server is a separate process
//! (CPU from /proc) and the application reports its sending thread's CPU time separately, which
//! is the "no application CPU" of the target.

use crate::report::Report;
use splitos_file_server::client::FileClient;
use splitos_file_server::server::{FileServer, FileServerConfig};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Options {
    pub quick: bool,
}

const SIZES: [(&str, usize); 3] = [("1k", 1 << 10), ("64k", 64 << 10), ("4m", 4 << 20)];

/// CPU seconds (user + system) from a /proc stat file.
fn stat_cpu_s(path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (t(11) + t(12)) as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// The calling thread's CPU time.
fn thread_cpu_s() -> f64 {
    let tid = rustix::thread::gettid().as_raw_nonzero().get();
    stat_cpu_s(&format!("/proc/self/task/{tid}/stat"))
}

fn process_cpu_s() -> f64 {
    stat_cpu_s("/proc/self/stat")
}

/// Runs `f` repeatedly for about `dur`; returns bytes per second.
fn rate(bytes_per_call: usize, dur: Duration, mut f: impl FnMut() -> usize) -> f64 {
    for _ in 0..16 {
        std::hint::black_box(f());
    }
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut calls = 0u64;
    while start.elapsed() < dur {
        for _ in 0..64 {
            bytes += f() as u64;
            calls += 1;
        }
    }
    debug_assert!(bytes >= calls * bytes_per_call as u64);
    bytes as f64 / start.elapsed().as_secs_f64()
}

fn site(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    for (name, size) in SIZES {
        let body: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
        std::fs::write(dir.join(format!("f{name}.bin")), body).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn reads(report: &mut Report, root: &Path, sock: &Path, dur: Duration) -> Result<(), String> {
    let _srv = FileServer::start(FileServerConfig::new(
        root.to_path_buf(),
        sock.to_path_buf(),
    ))
    .map_err(|e| e.to_string())?;
    let mut fc = FileClient::connect(sock).map_err(|e| e.to_string())?;
    for (name, size) in SIZES {
        let path = format!("f{name}.bin");
        let mut buf = vec![0u8; size];
        fc.open(&path).map_err(|e| e.to_string())?; // warm: the first open fetches the segment
        let split = rate(size, dur, || match fc.open(&path) {
            Ok(v) => v.read_at(0, &mut buf),
            Err(_) => 0,
        });
        let file = std::fs::File::open(root.join(&path)).map_err(|e| e.to_string())?;
        let pread = rate(size, dur, || {
            rustix::io::pread(&file, &mut buf, 0).unwrap_or(0)
        });
        // SAFETY: the benchmark's own file, not modified while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
        let mmap = rate(size, dur, || {
            buf.copy_from_slice(&map[..size]);
            size
        });
        report.add(&format!("split_read_{name}"), "bytes_per_s", split);
        report.add(&format!("pread_{name}"), "bytes_per_s", pread);
        report.add(&format!("mmap_{name}"), "bytes_per_s", mmap);
        eprintln!("file: read {name}: split {split:.3e} B/s, pread {pread:.3e}, mmap {mmap:.3e}");
    }
    Ok(())
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        // Its stdin closing is its signal to stop.
        drop(self.0.stdin.take());
        crate::proc::reap_within(&mut self.0, Duration::from_secs(5));
    }
}

fn spawn(args: &[String]) -> Result<(Proc, BufReader<std::process::ChildStdout>), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let out = child.stdout.take().ok_or("no stdout")?;
    Ok((Proc(child), BufReader::new(out)))
}

fn line(out: &mut BufReader<std::process::ChildStdout>, prefix: &str) -> Result<String, String> {
    let mut l = String::new();
    loop {
        l.clear();
        if out.read_line(&mut l).map_err(|e| e.to_string())? == 0 {
            return Err(format!("peer exited before {prefix}"));
        }
        if let Some(rest) = l.trim().strip_prefix(prefix) {
            return Ok(rest.trim().to_string());
        }
    }
}

/// Receives everything from `addr`; returns (bytes, seconds).
fn receive(addr: SocketAddr) -> Result<(u64, f64), String> {
    let mut c = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let start = Instant::now();
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) => return Err(format!("receiving: {e}")),
        }
    }
    Ok((total, start.elapsed().as_secs_f64()))
}

fn cpu_of(pid: u32) -> f64 {
    stat_cpu_s(&format!("/proc/{pid}/stat"))
}

fn sends(report: &mut Report, root: &Path, tmp: &Path, total: u64) -> Result<(), String> {
    let tcp_sock = tmp.join("tcp.sock");
    let (tcp, mut out) = spawn(&[
        "echo-server".into(),
        "--kind".into(),
        "split-tcp".into(),
        "--socket".into(),
        tcp_sock.to_string_lossy().into(),
        "--wait".into(),
        "block".into(),
    ])?;
    line(&mut out, "READY")?;
    for (name, size) in SIZES {
        let count = (total / size as u64).max(1);
        for mode in ["sendfile", "split"] {
            let (peer, mut out) = spawn(&[
                "file-peer".into(),
                "--mode".into(),
                mode.into(),
                "--root".into(),
                root.to_string_lossy().into(),
                "--path".into(),
                format!("f{name}.bin"),
                "--count".into(),
                count.to_string(),
                "--socket".into(),
                tcp_sock.to_string_lossy().into(),
                "--files".into(),
                tmp.join(format!("files-{name}.sock"))
                    .to_string_lossy()
                    .into(),
            ])?;
            let addr: SocketAddr = line(&mut out, "LISTENING")?
                .parse()
                .map_err(|e| format!("{e}"))?;
            let tcp0 = cpu_of(tcp.0.id());
            let (bytes, secs) = receive(addr)?;
            let tcp1 = cpu_of(tcp.0.id());
            let cpu: Vec<f64> = line(&mut out, "CPU")?
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            drop(peer);
            if bytes != count * size as u64 {
                return Err(format!(
                    "{mode} {name}: received {bytes} of {} bytes",
                    count * size as u64
                ));
            }
            let gb = bytes as f64 / 1e9;
            let (label, server_cpu, app_cpu) = if mode == "sendfile" {
                ("sendfile", cpu.first().copied().unwrap_or(0.0), 0.0)
            } else {
                (
                    "split_send_file",
                    tcp1 - tcp0,
                    cpu.first().copied().unwrap_or(0.0),
                )
            };
            let rate = bytes as f64 / secs;
            report.add(&format!("{label}_{name}"), "bytes_per_s", rate);
            report.add(
                &format!("{label}_{name}"),
                "cpu_s_per_gb",
                (server_cpu + app_cpu) / gb,
            );
            if mode == "split" {
                report.add(&format!("{label}_{name}"), "app_cpu_s_per_gb", app_cpu / gb);
            }
            eprintln!(
                "file: send {name} {label}: {rate:.3e} B/s, cpu {:.3} s/GB (app {:.4})",
                (server_cpu + app_cpu) / gb,
                app_cpu / gb
            );
        }
    }
    drop(tcp);
    Ok(())
}

/// The sending side of one send case (run as `file-peer`).
pub fn peer_main(
    mode: &str,
    root: &Path,
    path: &str,
    count: u64,
    tcp_socket: &Path,
    files_socket: &Path,
) -> Result<(), String> {
    match mode {
        "sendfile" => {
            let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            println!("LISTENING {}", l.local_addr().map_err(|e| e.to_string())?);
            let _ = std::io::stdout().flush();
            let (s, _) = l.accept().map_err(|e| e.to_string())?;
            let file = std::fs::File::open(root.join(path)).map_err(|e| e.to_string())?;
            let len = file.metadata().map_err(|e| e.to_string())?.len() as usize;
            let cpu0 = process_cpu_s();
            for _ in 0..count {
                let mut off = 0u64;
                while (off as usize) < len {
                    let left = len - off as usize;
                    let n = rustix::fs::sendfile(&s, &file, Some(&mut off), left)
                        .map_err(|e| format!("sendfile: {e}"))?;
                    if n == 0 {
                        break;
                    }
                }
            }
            drop(s);
            println!("CPU {}", process_cpu_s() - cpu0);
        }
        "split" => {
            let _files = FileServer::start(FileServerConfig::new(
                root.to_path_buf(),
                files_socket.to_path_buf(),
            ))
            .map_err(|e| e.to_string())?;
            let mut fc = FileClient::connect(files_socket).map_err(|e| e.to_string())?;
            let view = fc.open(path).map_err(|e| e.to_string())?;
            let session = splitos::Session::connect(tcp_socket, splitos::SessionOptions::default())
                .map_err(|e| e.to_string())?;
            let l =
                splitos::net::TcpListener::bind_with(&session, "127.0.0.1:0", Default::default())
                    .map_err(|e| e.to_string())?;
            println!("LISTENING {}", l.local_addr().map_err(|e| e.to_string())?);
            let _ = std::io::stdout().flush();
            let (s, _) = l.accept().map_err(|e| e.to_string())?;
            let cpu0 = thread_cpu_s();
            for _ in 0..count {
                s.send_file(&view, 0, view.len())
                    .map_err(|e| e.to_string())?;
            }
            let app_cpu = thread_cpu_s() - cpu0;
            s.shutdown(std::net::Shutdown::Write)
                .map_err(|e| e.to_string())?;
            drop(s);
            println!("CPU {app_cpu}");
            let _ = std::io::stdout().flush();
            // Stay until the parent is done, so the TCP server can finish the queued sends.
            let mut b = [0u8; 1];
            let _ = std::io::stdin().read(&mut b);
        }
        other => return Err(format!("unknown mode {other}")),
    }
    Ok(())
}

pub fn run(opts: &Options) -> Report {
    let mut report = Report::new("file");
    let tmp: PathBuf =
        std::env::temp_dir().join(format!("splitos-bench-file-{}", std::process::id()));
    let root = tmp.join("site");
    let (dur, total) = if opts.quick {
        (Duration::from_millis(300), 256u64 << 20)
    } else {
        (Duration::from_secs(2), 2u64 << 30)
    };
    let result = site(&root)
        .and_then(|_| reads(&mut report, &root, &tmp.join("files.sock"), dur))
        .and_then(|_| sends(&mut report, &root, &tmp, total));
    if let Err(e) = result {
        eprintln!("file: FAILED: {e}");
        report.note(format!("failed: {e}"));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    for (name, _) in SIZES {
        report.ratio(
            "bytes_per_s",
            &format!("split_read_{name}"),
            &format!("pread_{name}"),
        );
        report.ratio(
            "bytes_per_s",
            &format!("split_read_{name}"),
            &format!("mmap_{name}"),
        );
        report.ratio(
            "bytes_per_s",
            &format!("split_send_file_{name}"),
            &format!("sendfile_{name}"),
        );
        report.ratio(
            "cpu_s_per_gb",
            &format!("split_send_file_{name}"),
            &format!("sendfile_{name}"),
        );
    }
    report.target("bytes_per_s", "split_read_1k", "pread_1k", 2.0, false);
    report.target(
        "bytes_per_s",
        "split_send_file_4m",
        "sendfile_4m",
        0.9,
        false,
    );
    report.note("cpu_s_per_gb: sender-side CPU (sendfile: the sending process; split: TCP server process + the application's sending thread); app_cpu_s_per_gb: the application's share");
    report
}
