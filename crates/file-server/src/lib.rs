//! The memory-mapped file server: it owns a cache of file contents in shared memory that
//! applications and the TCP server read in place.
//!
//! - [`path`]: turning a requested path into one that cannot leave the served root, and opening
//!   it with the kernel enforcing that (`openat2` with `RESOLVE_BENEATH`), refusing anything that
//!   is not a regular file;
//! - [`server`]: the cache of sealed segments, eviction, change detection, and the sessions;
//! - [`directory`]: the lookup table in shared memory that readers search without a message;
//! - [`proto`]: the messages between readers and the server;
//! - [`client`]: the reader's side, [`client::FileClient`].
//!
//! A cached file's bytes live in [`segment`]s: memfds sealed against every change, so any number
//! of processes can map them and no reader can ever see torn or changing bytes. They are
//! `splitos_m2m::segment`, re-exported here for the crates that import them from this one.

#![forbid(unsafe_code)]

pub mod client;
pub mod directory;
pub mod path;
pub mod proto;
pub mod server;

pub use splitos_m2m::segment;

/// Where readers find the file server when nothing else is said:
/// `$XDG_RUNTIME_DIR/splitos/files.sock`, else `/tmp/splitos-<uid>/files.sock` — beside the
/// TCP server's socket, so one directory holds a user's Split-OS sockets.
pub fn default_socket_path() -> std::path::PathBuf {
    socket_path_in(
        std::env::var_os("XDG_RUNTIME_DIR"),
        rustix::process::getuid().as_raw(),
    )
}

fn socket_path_in(runtime_dir: Option<std::ffi::OsString>, uid: u32) -> std::path::PathBuf {
    match runtime_dir {
        Some(d) => std::path::PathBuf::from(d)
            .join("splitos")
            .join("files.sock"),
        None => std::path::PathBuf::from(format!("/tmp/splitos-{uid}/files.sock")),
    }
}

#[cfg(test)]
mod socket_path_tests {
    use super::socket_path_in;
    use std::path::PathBuf;

    #[test]
    fn the_runtime_directory_else_a_per_user_temporary_one() {
        assert_eq!(
            socket_path_in(Some("/run/user/7".into()), 7),
            PathBuf::from("/run/user/7/splitos/files.sock")
        );
        assert_eq!(
            socket_path_in(None, 7),
            PathBuf::from("/tmp/splitos-7/files.sock")
        );
    }
}
