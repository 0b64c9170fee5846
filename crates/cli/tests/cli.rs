//! The `splitos` command as a user runs it: a daemon, `status` against it, clean shutdown on
//! SIGTERM, and clear errors.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_splitos");

#[test]
fn daemon_status_and_clean_shutdown() {
    let sock = std::env::temp_dir().join(format!("splitos-cli-test-{}.sock", std::process::id()));
    let mut daemon = Command::new(BIN)
        .args([
            "tcp-server",
            "--threads",
            "2",
            "--wait",
            "block",
            "--socket",
        ])
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = Command::new(BIN)
            .args(["status", "--json", "--socket"])
            .arg(&sock)
            .output()
            .unwrap();
        if out.status.success() {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "status never worked: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["server_pid"].as_u64(), Some(daemon.id() as u64));
    assert_eq!(v["workers"].as_array().map(|a| a.len()), Some(2));
    let table = Command::new(BIN)
        .args(["status", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("no applications connected"), "{text}");

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(daemon.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "daemon exit: {status}");
    assert!(!sock.exists(), "socket left behind");
}

/// Finding A19: an application's name (any 64 bytes it chose in its hello) was printed raw, so
/// one could send terminal escapes to the operator running `splitos status`. The TCP server
/// stores printable ASCII only (anything else becomes `?`), and `status` escapes control and
/// bidirectional-override characters in whatever it reads.
#[test]
fn status_escapes_application_names() {
    let sock = std::env::temp_dir().join(format!("splitos-cli-names-{}.sock", std::process::id()));
    let mut daemon = Command::new(BIN)
        .args(["tcp-server", "--wait", "block", "--socket"])
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _stop = KillOnDrop(daemon.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let evil = "\x1b]0;owned\x07\x1b[2Jx\u{202e}y\\z";
    let _app = loop {
        match splitos::reactor::Reactor::connect(&sock, splitos::WaitPolicy::Block, evil) {
            Ok(r) => break r,
            Err(e) => assert!(Instant::now() < deadline, "no TCP server: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = loop {
        let out = Command::new(BIN)
            .args(["status", "--socket"])
            .arg(&sock)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !text.contains("no applications connected") && out.status.success() {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the session never showed: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text:?}");
    assert!(!text.contains('\u{202e}'), "{text:?}");
    assert!(text.contains("?]0;owned??[2Jx???y\\\\z"), "{text}");
    drop(_app);
    drop(_stop); // SIGTERM: the daemon removes its socket and statistics file
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(!sock.exists(), "socket left behind");
}

/// Sends SIGTERM to a process when dropped (the test's cleanup, even when it fails).
struct KillOnDrop(u32);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0 as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
}

#[test]
fn errors_say_what_to_do() {
    let out = Command::new(BIN)
        .args(["status", "--socket", "/nonexistent/tcp.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is the TCP server running"), "{err}");
    let out = Command::new(BIN)
        .args(["tcp-server", "--wait", "sometimes"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("poll, adaptive, adaptive:<N>us"));
    let out = Command::new(BIN)
        .args(["tcp-server", "--socket-mode", "999"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new(BIN)
        .args([
            "tcp-server",
            "--threads",
            "0",
            "--socket",
            "/tmp/x-splitos-never.sock",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("threads must be"));
}

#[test]
fn file_server_serves_and_stops_cleanly() {
    let base = std::env::temp_dir().join(format!("splitos-cli-fs-{}", std::process::id()));
    let root = base.join("site");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), b"hello from the file server").unwrap();
    let sock = base.join("files.sock");
    let mut daemon = Command::new(BIN)
        .args(["file-server", "--cache-size", "8M", "--root"])
        .arg(&root)
        .arg("--socket")
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        match splitos_file_server::client::FileClient::connect(&sock) {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "file server never came up: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        client.open("index.html").unwrap().to_vec(),
        b"hello from the file server"
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(daemon.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = daemon.wait().unwrap();
    assert!(status.success());
    let out = Command::new(BIN)
        .args([
            "file-server",
            "--root",
            "/nonexistent-splitos-root",
            "--socket",
        ])
        .arg(base.join("x.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot serve"));
    let _ = std::fs::remove_dir_all(&base);
}
