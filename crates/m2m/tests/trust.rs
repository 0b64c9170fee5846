//! A client checks who the server is (SO_PEERCRED) before it trusts a socket with its
//! traffic: a socket of another user is refused. Needs root (to run the "server" as another
//! user); skipped otherwise.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use splitos_m2m::{Channel, ChannelConfig, Error};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;

#[test]
fn a_socket_of_another_user_is_refused() {
    if !rustix::process::geteuid().is_root() || !std::path::Path::new("/usr/bin/python3").exists() {
        eprintln!("needs root and /usr/bin/python3; skipped");
        return;
    }
    let path = std::env::temp_dir().join(format!("splitos-foreign-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    // Another user's listener where a server is expected (e.g. planted in a shared directory).
    let mut impostor = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import socket,sys,time\ns=socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen(8)\ntime.sleep(30)\n",
        ])
        .arg(&path)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 as nobody");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = Channel::connect(&path, ChannelConfig::default());
    let _ = impostor.kill();
    let _ = impostor.wait();
    let _ = std::fs::remove_file(&path);
    match r {
        Err(Error::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied);
            let m = source.to_string();
            assert!(m.contains(&format!("runs as uid {NOBODY}")), "{m}");
            assert!(m.contains("SPLITOS_SERVER_UID"), "{m}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a channel to another user's socket"),
    }
}
