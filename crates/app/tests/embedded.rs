//! Embedded servers' runtime files: in this user's runtime directory, and those of processes
//! that are gone removed at the next start (finding A24: test runs left
//! `/tmp/splitos-embedded-*.sock` and `.stats` files of killed processes that nothing removed).

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use splitos::embedded::{start_new, Options};

#[test]
fn files_of_dead_processes_are_removed_when_an_embedded_server_starts() {
    let dir = splitos_m2m::runtime::user_dir();
    let tmp = std::env::temp_dir();
    let mut child = std::process::Command::new("true").spawn().expect("true");
    let dead = child.id();
    let _ = child.wait();
    std::fs::create_dir_all(&dir).expect("runtime directory");
    let stale = [
        dir.join(format!("embedded-{dead}-0.sock")),
        dir.join(format!("embedded-{dead}-0.sock.stats")),
        tmp.join(format!("splitos-embedded-{dead}-3.sock")),
        tmp.join(format!("splitos-embedded-{dead}-3.sock.stats")),
    ];
    for p in &stale {
        std::fs::write(p, b"").expect("stale file");
    }
    let server = start_new(Options::default()).expect("embedded server");
    let socket = server.socket_path();
    assert_eq!(socket.parent(), Some(dir.as_path()), "{}", socket.display());
    let name = socket.file_name().and_then(|n| n.to_str()).unwrap_or("");
    assert!(
        name.starts_with(&format!("embedded-{}-", std::process::id())),
        "{name}"
    );
    for p in &stale {
        assert!(!p.exists(), "{} was left", p.display());
    }
    assert!(socket.exists());
}
