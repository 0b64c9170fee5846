//! Where a running `splitos serve` keeps its sockets, and says what it is doing.
//!
//! Each supervisor has a private directory `serve-<pid>` in this user's runtime directory
//! ([`splitos_m2m::runtime::user_dir`]: `$XDG_RUNTIME_DIR/splitos`, else
//! `/tmp/splitos-<uid>`), both checked before use: owned by this user, writable by no one
//! else, not a symbolic link. It holds the TCP server's and the file server's sockets, the
//! TCP server's statistics file, and [`STATUS_FILE`], which the supervisor rewrites twice a
//! second with what `splitos status` shows beside the TCP server's statistics (the address,
//! the file cache's counters, the budgets).
//!
//! A supervisor that is killed cannot remove its directory: the next one to start removes
//! those whose process is gone ([`remove_dead`]), with the control socket each one named.

use serde::{Deserialize, Serialize};
use splitos_m2m::runtime::{self, DirError};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Private directories are named this, then the supervisor's process id.
pub const PREFIX: &str = "serve-";
/// The status file in a private directory.
pub const STATUS_FILE: &str = "serve.json";

/// What a running `splitos serve` says about itself (the [`STATUS_FILE`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The supervisor's process id.
    pub pid: u32,
    /// The address it serves on.
    pub listen: String,
    pub root: PathBuf,
    /// The TCP server's socket (its statistics file is beside it).
    pub tcp_socket: PathBuf,
    pub control_socket: PathBuf,
    /// HTTP application instances started so far, and the current one's process id.
    pub generation: u64,
    pub app_pid: u32,
    /// Whether the TCP server answers cached files itself (the direct path).
    pub direct: bool,
    /// `--max-conns`: most connections the application takes at once.
    pub max_conns: usize,
    /// `--cache-size`: most bytes of file contents the file server keeps.
    pub cache_limit: u64,
    pub files: FileCounters,
    pub app: AppCounters,
    pub updated_unix_ms: u64,
    /// The failover agent's state (`splitos_failover::Agent::status`), on a node that runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<serde_json::Value>,
}

/// The file server's counters: opens that reached it (a reader that finds a file in the
/// shared directory sends no message, and is counted by the reader).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCounters {
    pub requests: u64,
    /// Opens answered from the cache.
    pub hits: u64,
    /// Opens that read the file from disk.
    pub misses: u64,
    pub evictions: u64,
    pub cached_bytes: u64,
}

/// What the HTTP application instances report: connections now, and since the first one
/// started, responses and the file lookups their shared-directory reader answered alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppCounters {
    pub connections: u64,
    pub responses: u64,
    pub directory_hits: u64,
}

/// This supervisor's private directory; removed on drop.
#[derive(Debug)]
pub struct ServeDir {
    path: PathBuf,
}

impl ServeDir {
    /// Prepares this user's runtime directory (checked, the files of dead supervisors
    /// removed) and creates this process's private one in it.
    pub fn create() -> Result<ServeDir, DirError> {
        let user = runtime::user_dir();
        runtime::private_dir(&user)?;
        remove_dead(&user);
        // Left in /tmp by versions that put the private directory there.
        runtime::remove_dead(&std::env::temp_dir(), "splitos-serve-");
        let path = user.join(format!("{PREFIX}{}", std::process::id()));
        if std::fs::symlink_metadata(&path).is_ok() {
            // A dead process with this same pid left it (pids are reused), in a directory
            // only this user can write.
            let _ = std::fs::remove_dir_all(&path);
        }
        runtime::private_dir(&path)?;
        Ok(ServeDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the status file (write, then rename: a reader sees one whole version).
    pub fn write_status(&self, status: &Status) -> io::Result<()> {
        let text = serde_json::to_vec_pretty(status).map_err(io::Error::other)?;
        let tmp = self.path.join(format!("{STATUS_FILE}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.path.join(STATUS_FILE))
    }
}

impl Drop for ServeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The pid of a private directory's name (`serve-<pid>`, nothing else).
fn dir_pid(name: &str) -> Option<u32> {
    let pid = runtime::owner_pid(name, PREFIX)?;
    (name == format!("{PREFIX}{pid}")).then_some(pid)
}

fn status_in(dir: &Path) -> Option<Status> {
    let text = std::fs::read(dir.join(STATUS_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Removes the private directories in `user` of supervisors that are gone, with the control
/// sockets they named (if still a socket of this user that nobody answers). Returns how many.
pub fn remove_dead(user: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(user) else {
        return 0;
    };
    let me = rustix::process::geteuid().as_raw();
    let mut removed = 0;
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(dir_pid) else {
            continue;
        };
        let dir = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        if pid == std::process::id()
            || runtime::pid_alive(pid)
            || !meta.is_dir()
            || meta.uid() != me
        {
            continue;
        }
        if let Some(s) = status_in(&dir) {
            let control = &s.control_socket;
            let stale = std::fs::symlink_metadata(control)
                .is_ok_and(|m| m.file_type().is_socket() && m.uid() == me)
                && std::os::unix::net::UnixStream::connect(control).is_err();
            if stale {
                let _ = std::fs::remove_file(control);
            }
        }
        if std::fs::remove_dir_all(&dir).is_ok() {
            tracing::debug!(dir = %dir.display(), pid, "removed a dead supervisor's directory");
            removed += 1;
        }
    }
    removed
}

/// The `splitos serve` instances of this user that are running, as their status files say,
/// in no particular order.
pub fn running() -> Vec<Status> {
    let Ok(entries) = std::fs::read_dir(runtime::user_dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str().and_then(dir_pid)?;
            if !runtime::pid_alive(pid) {
                return None;
            }
            status_in(&e.path()).filter(|s| s.pid == pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_directories_are_told_from_control_sockets() {
        assert_eq!(dir_pid("serve-42"), Some(42));
        assert_eq!(dir_pid("serve-42-x"), None);
        assert_eq!(dir_pid("serve-127.0.0.1:8080.sock"), None);
        assert_eq!(dir_pid("serve-[::1]:80.sock"), None);
    }

    #[test]
    fn status_files_round_trip() {
        let dir = std::env::temp_dir().join(format!("splitos-rundir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let d = ServeDir { path: dir.clone() };
        let s = Status {
            pid: 7,
            listen: "127.0.0.1:80".into(),
            files: FileCounters {
                hits: 3,
                ..FileCounters::default()
            },
            ..Status::default()
        };
        d.write_status(&s).expect("write");
        assert_eq!(status_in(&dir), Some(s));
        drop(d);
        assert!(!dir.exists(), "removed on drop");
    }
}
