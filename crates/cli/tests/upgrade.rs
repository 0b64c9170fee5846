//! `splitos upgrade`: a running `splitos serve` replaced as a whole by a new process under
//! load, with every connection kept. wrk runs through the upgrade (no socket error, no non-2xx
//! answer), keep-alive connections opened before it are answered after it on the same socket,
//! and the process that answers is a new one. SIGUSR2 does the same; a new binary that fails
//! leaves the old process serving, and another upgrade or reload meanwhile is refused.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::response;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_splitos");
const FILE_BYTES: usize = 16 << 10;

fn contents() -> Vec<u8> {
    (0..FILE_BYTES).map(|j| (j % 251) as u8).collect()
}

/// Whether process `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// A `splitos serve` of a fresh site with its own control socket; whichever process serves it
/// at the end (the first one or one it was upgraded to) is stopped on drop, and the files go.
struct Server {
    first: Child,
    port: u16,
    dir: PathBuf,
    control: PathBuf,
}

impl Server {
    /// Starts `program` (the test binary or a copy of it) as `splitos serve`.
    fn start(tag: &str, program: &Path, extra: &[&str]) -> Server {
        let dir =
            std::env::temp_dir().join(format!("splitos-upgrade-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("site")).unwrap();
        std::fs::write(dir.join("site/f.bin"), contents()).unwrap();
        let control = dir.join("control.sock");
        let mut first = Command::new(program)
            .args(["serve", "--listen", "127.0.0.1:0", "--control-socket"])
            .arg(&control)
            .args(extra)
            .arg(dir.join("site"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start splitos serve");
        let mut line = String::new();
        let _ = BufReader::new(first.stdout.take().unwrap()).read_line(&mut line);
        let port = line
            .trim()
            .trim_start_matches("http://127.0.0.1:")
            .trim_end_matches('/')
            .parse()
            .unwrap_or(0);
        let s = Server {
            first,
            port,
            dir,
            control,
        };
        assert!(s.port != 0, "unexpected first line {line:?}");
        s
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/f.bin", self.port)
    }

    /// The process answering on the control socket (the one serving now).
    fn serving_pid(&self) -> Option<u32> {
        let s = std::os::unix::net::UnixStream::connect(&self.control).ok()?;
        let c = rustix::net::sockopt::socket_peercred(&s).ok()?;
        Some(c.pid.as_raw_nonzero().get() as u32)
    }

    /// Waits until a process other than `old` answers on the control socket.
    fn wait_for_new(&self, old: u32) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(p) = self.serving_pid().filter(|&p| p != old) {
                return p;
            }
            assert!(Instant::now() < deadline, "no new process took over");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the first process to exit, and returns its exit code.
    fn first_exits(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.first.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    fn control_cmd(&self, what: &str) -> Output {
        Command::new(BIN)
            .arg(what)
            .arg("--control-socket")
            .arg(&self.control)
            .output()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let mut pids = vec![self.first.id()];
        pids.extend(self.serving_pid());
        for &p in &pids {
            signal(p, rustix::process::Signal::TERM);
        }
        let _ = self.first.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for &p in &pids {
            if alive(p) {
                signal(p, rustix::process::Signal::KILL);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Keep-alive connections, each answered once already.
fn hold(port: u16, n: usize) -> Vec<BufReader<TcpStream>> {
    (0..n)
        .map(|_| {
            let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut c = BufReader::new(c);
            ask(&mut c).unwrap_or_else(|e| panic!("before the upgrade: {e}"));
            c
        })
        .collect()
}

/// One request on `c`, its answer checked.
fn ask(c: &mut BufReader<TcpStream>) -> Result<(), String> {
    c.get_mut()
        .write_all(b"GET /f.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let (status, body) = response(c)?;
    if status != "HTTP/1.1 200 OK" || body != contents() {
        return Err(format!("{status}, {} bytes", body.len()));
    }
    Ok(())
}

/// Each held connection answers its next request on the same socket.
fn all_answer(held: &mut [BufReader<TcpStream>], when: &str) {
    for (i, c) in held.iter_mut().enumerate() {
        if let Err(e) = ask(c) {
            panic!("connection {i} {when}: {e}");
        }
    }
}

fn wrk(url: &str, secs: u32) -> Child {
    Command::new("wrk")
        .args(["-t2", "-c50", &format!("-d{secs}s"), "--timeout", "5s", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wrk")
}

fn wrk_report(mut w: Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = w.kill();
    let out = w.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn requests_per_sec(report: &str) -> f64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in {report}"))
}

fn have_wrk() -> bool {
    Command::new("wrk").arg("--version").output().is_ok()
}

/// Under wrk: 0 failed requests, 0 closed connections, and the new process serves afterwards.
fn upgrade_under_wrk(tag: &str, extra: &[&str]) {
    let mut s = Server::start(tag, Path::new(BIN), extra);
    let old = s.first.id();
    let mut held = hold(s.port, 20);
    let before = wrk_report(wrk(&s.url(), 2));
    assert!(!before.contains("Socket errors"), "{before}");
    let during = wrk(&s.url(), 6);
    std::thread::sleep(Duration::from_secs(2));
    let asked = Instant::now();
    let out = s.control_cmd("upgrade");
    let answered = asked.elapsed();
    let code = s.first_exits(Duration::from_secs(60));
    let exited = asked.elapsed();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(code, Some(0), "the old process exits cleanly");
    let new = s.wait_for_new(old);
    assert!(
        said.starts_with(&format!("upgraded: pid {new} serves now")),
        "{said}"
    );
    let report = wrk_report(during);
    eprintln!(
        "{tag}: {said}\n  upgrade answered after {answered:?}, old process exited after {exited:?}\n  \
         wrk before: {:.0} req/s, during (6 s with the upgrade): {:.0} req/s\n{report}",
        requests_per_sec(&before),
        requests_per_sec(&report)
    );
    assert!(!report.contains("Socket errors"), "{report}");
    assert!(!report.contains("Non-2xx"), "{report}");
    all_answer(&mut held, "after the upgrade");
    assert!(alive(new) && !alive(old));
    // New connections too; and the new process can be upgraded in turn.
    let mut more = hold(s.port, 2);
    let out = s.control_cmd("upgrade");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let newer = s.wait_for_new(new);
    assert_ne!(newer, old);
    all_answer(&mut held, "after a second upgrade");
    all_answer(&mut more, "after a second upgrade");
}

#[test]
fn upgrade_under_wrk_keeps_every_connection() {
    if !have_wrk() {
        eprintln!("wrk is not installed; skipped");
        return;
    }
    upgrade_under_wrk("wrk-direct", &[]);
    upgrade_under_wrk("wrk-no-direct", &["--no-direct"]);
}

#[test]
fn sigusr2_upgrades() {
    let mut s = Server::start("usr2", Path::new(BIN), &[]);
    let old = s.first.id();
    let mut held = hold(s.port, 5);
    let t = Instant::now();
    signal(old, rustix::process::Signal::USR2);
    let code = s.first_exits(Duration::from_secs(60));
    eprintln!("SIGUSR2: the old process exited after {:?}", t.elapsed());
    assert_eq!(code, Some(0));
    let new = s.wait_for_new(old);
    assert!(alive(new));
    all_answer(&mut held, "after SIGUSR2");
}

/// A copy of the binary the test can replace, in the server's directory.
fn copy_of_binary(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("splitos");
    std::fs::copy(BIN, &p).unwrap();
    p
}

/// Puts a script at `path` (written beside it, then renamed over it, as an install does).
fn install_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_failing_new_binary_leaves_the_old_one_serving() {
    let bindir = std::env::temp_dir().join(format!("splitos-upgrade-{}-bin", std::process::id()));
    let program = copy_of_binary(&bindir);
    let mut s = Server::start("failing", &program, &[]);
    let old = s.first.id();
    let mut held = hold(s.port, 3);

    // 1. The new binary exits at once.
    install_script(&program, "echo 'broken build' >&2\nexit 1");
    let out = s.control_cmd("upgrade");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("exited (exit status: 1) before taking over"),
        "{err}"
    );

    // 2. It starts, connects and fails (here: a configuration the TCP server refuses); it
    //    says why, and `splitos upgrade` repeats it.
    install_script(
        &program,
        &format!("exec {} \"$@\" --threads 0", bindir.join("real").display()),
    );
    std::fs::copy(BIN, bindir.join("real")).unwrap();
    let out = s.control_cmd("upgrade");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the new binary failed: invalid configuration"),
        "{err}"
    );

    // 3. While one upgrade runs (a new binary that takes its time), another upgrade and a
    //    reload are refused at once.
    install_script(&program, "sleep 3\nexit 1");
    let control = s.control.clone();
    let slow = std::thread::spawn(move || {
        Command::new(BIN)
            .args(["upgrade", "--control-socket"])
            .arg(&control)
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    for what in ["upgrade", "reload"] {
        let t = Instant::now();
        let out = s.control_cmd(what);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(
            err.contains("refused: an upgrade is in progress"),
            "{what}: {err}"
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{what} waited");
    }
    let out = slow.join().unwrap();
    assert_eq!(out.status.code(), Some(1));

    // The old process serves on, on the same connections, and its runtime files are its own.
    assert_eq!(s.serving_pid(), Some(old));
    assert!(s.first.try_wait().unwrap().is_none());
    all_answer(&mut held, "after failed upgrades");
    let mut fresh = hold(s.port, 1);
    all_answer(&mut fresh, "after failed upgrades");

    // 4. With a good binary back in place, the upgrade goes through.
    std::fs::copy(BIN, bindir.join("splitos.tmp")).unwrap();
    std::fs::rename(bindir.join("splitos.tmp"), &program).unwrap();
    let out = s.control_cmd("upgrade");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.first_exits(Duration::from_secs(60)), Some(0));
    s.wait_for_new(old);
    all_answer(&mut held, "after the upgrade");
    drop(s);
    let _ = std::fs::remove_dir_all(&bindir);
}
