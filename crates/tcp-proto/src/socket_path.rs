//! Where the TCP server's control socket is when nobody says otherwise.
//!
//! Both sides need the same answer — the server to listen there, every application to find it —
//! and an application need not link the server to know it, so it lives with the protocol.

use std::ffi::OsString;
use std::path::PathBuf;

/// Where applications find the server when nothing else is said: `$SPLITOS_SOCKET`, else
/// `$XDG_RUNTIME_DIR/splitos/tcp.sock`, else `/tmp/splitos-<uid>/tcp.sock`.
pub fn default_socket_path() -> PathBuf {
    choose(
        std::env::var_os("SPLITOS_SOCKET"),
        std::env::var_os("XDG_RUNTIME_DIR"),
        rustix::process::getuid().as_raw(),
    )
}

fn choose(socket: Option<OsString>, runtime_dir: Option<OsString>, uid: u32) -> PathBuf {
    if let Some(p) = socket {
        return PathBuf::from(p);
    }
    if let Some(d) = runtime_dir {
        return PathBuf::from(d).join("splitos").join("tcp.sock");
    }
    // Per user, so that one user's server is never another's by accident.
    PathBuf::from(format!("/tmp/splitos-{uid}/tcp.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_decides_in_order() {
        let s = |v: &str| Some(OsString::from(v));
        assert_eq!(
            choose(s("/x/tcp.sock"), s("/run/user/7"), 7),
            PathBuf::from("/x/tcp.sock")
        );
        assert_eq!(
            choose(None, s("/run/user/7"), 7),
            PathBuf::from("/run/user/7/splitos/tcp.sock")
        );
        assert_eq!(
            choose(None, None, 7),
            PathBuf::from("/tmp/splitos-7/tcp.sock")
        );
    }
}
