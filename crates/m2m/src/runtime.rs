//! Runtime directories: where the sockets and statistics files of Split-OS servers live, made
//! safe to use and kept tidy.
//!
//! A per-user directory holds them: `$XDG_RUNTIME_DIR/splitos` when the session has a runtime
//! directory (private to the user, emptied at logout), else `/tmp/splitos-<uid>` ([`user_dir`]).
//! Another local user can pre-create a path in `/tmp`, so a directory is used only after it has
//! been checked ([`private_dir`]): a real directory (a symbolic link is not followed), owned by
//! this user, writable by nobody else. Directories this crate creates are made with mode 0700
//! in the `mkdir` itself, never widened afterwards.
//!
//! Processes that are killed leave their files behind; names that carry the owner's process
//! id let the next start find those whose owner is gone and remove them ([`remove_dead`]).

use rustix::fs::Mode;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a runtime directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is a symbolic link; a runtime directory must be a real directory (remove the link)", path.display())]
    Symlink { path: PathBuf },
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("{} belongs to uid {owner}, not to this user (uid {me}); refusing to use it: someone else may control what is in it (remove it, or set XDG_RUNTIME_DIR)", path.display())]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error("{} has mode {mode:04o}, so other users may put files in it; refusing to use it (chmod 700 it, or remove it)", path.display())]
    Mode { path: PathBuf, mode: u32 },
}

impl From<DirError> for io::Error {
    fn from(e: DirError) -> io::Error {
        let kind = match &e {
            DirError::Io { source, .. } => source.kind(),
            DirError::NotADirectory { .. } => io::ErrorKind::NotADirectory,
            _ => io::ErrorKind::PermissionDenied,
        };
        io::Error::new(kind, e.to_string())
    }
}

/// This user's runtime directory for Split-OS: `$XDG_RUNTIME_DIR/splitos`, else
/// `/tmp/splitos-<uid>`. Nothing is created or checked here; see [`private_dir`].
pub fn user_dir() -> PathBuf {
    user_dir_in(
        std::env::var_os("XDG_RUNTIME_DIR"),
        rustix::process::getuid().as_raw(),
    )
}

fn user_dir_in(runtime_dir: Option<std::ffi::OsString>, uid: u32) -> PathBuf {
    match runtime_dir {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("splitos"),
        _ => PathBuf::from(format!("/tmp/splitos-{uid}")),
    }
}

fn me() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Makes sure `path` is a directory only this user can change: creates it with mode 0700
/// (its parents as usual) if it does not exist, then checks, without following a symbolic
/// link, that it is a directory owned by this user that neither group nor others may write.
pub fn private_dir(path: &Path) -> Result<(), DirError> {
    let io_err = |source| DirError::Io {
        path: path.to_path_buf(),
        source,
    };
    if fs::symlink_metadata(path).is_err() {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|source| DirError::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        match rustix::fs::mkdir(path, Mode::from_raw_mode(0o700)) {
            // Someone else made it meanwhile: the check below judges theirs.
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io_err(e.into())),
        }
    }
    let meta = fs::symlink_metadata(path).map_err(io_err)?;
    check_private(path, &meta)
}

fn check_private(path: &Path, meta: &fs::Metadata) -> Result<(), DirError> {
    let path = path.to_path_buf();
    if meta.file_type().is_symlink() {
        return Err(DirError::Symlink { path });
    }
    if !meta.is_dir() {
        return Err(DirError::NotADirectory { path });
    }
    let me = me();
    if meta.uid() != me {
        return Err(DirError::Owner {
            path,
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(DirError::Mode { path, mode });
    }
    Ok(())
}

/// Checks a directory someone chose for a socket (not necessarily a private one): it must be
/// owned by this user or by root, and if others may write in it, it must be sticky (as `/tmp`
/// is), so that nobody else can remove or replace a socket this user made there. Symbolic
/// links in the path are followed: the path is the caller's choice.
pub fn check_socket_dir(path: &Path) -> Result<(), DirError> {
    let meta = fs::metadata(path).map_err(|source| DirError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let path = path.to_path_buf();
    if !meta.is_dir() {
        return Err(DirError::NotADirectory { path });
    }
    let me = me();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(DirError::Owner {
            path,
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return Err(DirError::Mode { path, mode });
    }
    Ok(())
}

/// Makes sure the directory that will hold socket `socket` can be used: a missing one is
/// created as a [`private_dir`], and so is checked this user's own [`user_dir`]; any other
/// existing one gets [`check_socket_dir`].
pub fn socket_dir(socket: &Path) -> Result<(), DirError> {
    let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if fs::symlink_metadata(dir).is_err() || dir == user_dir() {
        private_dir(dir)
    } else {
        check_socket_dir(dir)
    }
}

/// Whether process `pid` exists (a zombie counts: its parent has not reaped it yet). A
/// process of another user counts too.
pub fn pid_alive(pid: u32) -> bool {
    let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    !matches!(
        rustix::process::test_kill_process(p),
        Err(rustix::io::Errno::SRCH)
    )
}

/// The process id in a runtime file's name: `<prefix><pid>`, alone or followed by `-` and
/// anything (`embedded-<pid>-<n>.sock`, `serve-<pid>`). A name where other characters follow
/// the digits (`serve-127.0.0.1:80.sock`) has none.
pub fn owner_pid(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let end = rest.find('-').unwrap_or(rest.len());
    let digits = &rest[..end];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Removes the entries of `dir` named `<prefix><pid>[-…]` (see [`owner_pid`]) whose process is
/// gone and that belong to this user: the files and directories of killed processes. Returns
/// how many it removed. Entries it cannot judge or remove are left alone.
pub fn remove_dead(dir: &Path, prefix: &str) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let me = me();
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| owner_pid(n, prefix)) else {
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        let path = e.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.uid() != me {
            continue;
        }
        let gone = if meta.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if gone.is_ok() {
            tracing::debug!(path = %path.display(), pid, "removed a dead process's runtime file");
            removed += 1;
        }
    }
    removed
}

/// Makes sure `path`, just bound as a Unix socket, is still a socket of this user (not
/// something swapped in since), then sets its permission bits.
pub fn set_socket_mode(path: &Path, mode: u32) -> io::Result<()> {
    let st = rustix::fs::lstat(path)?;
    let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
    if kind != rustix::fs::FileType::Socket || st.st_uid != me() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} was replaced after it was bound; refusing to change its permissions",
                path.display()
            ),
        ));
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("splitos-runtime-{}-{name}", std::process::id()))
    }

    #[test]
    fn the_runtime_directory_else_a_per_user_one_in_tmp() {
        assert_eq!(
            user_dir_in(Some("/run/user/7".into()), 7),
            PathBuf::from("/run/user/7/splitos")
        );
        assert_eq!(user_dir_in(None, 7), PathBuf::from("/tmp/splitos-7"));
        assert_eq!(
            user_dir_in(Some("".into()), 7),
            PathBuf::from("/tmp/splitos-7")
        );
    }

    #[test]
    fn private_directories_are_created_0700_and_checked() {
        let base = temp("private");
        let _ = fs::remove_dir_all(&base);
        let d = base.join("a/b");
        private_dir(&d).expect("created");
        let mode = fs::metadata(&d)
            .map(|m| m.permissions().mode() & 0o777)
            .ok();
        assert_eq!(mode, Some(0o700));
        private_dir(&d).expect("an existing good one is fine");
        // Writable by others: refused, and left as it is.
        let open = base.join("open");
        fs::create_dir_all(&open).expect("dir");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = private_dir(&open).err();
        assert!(
            matches!(e, Some(DirError::Mode { mode: 0o777, .. })),
            "{e:?}"
        );
        assert!(e.is_some_and(|e| e.to_string().contains("chmod 700")));
        // A symbolic link to a good directory: refused, not followed.
        let link = base.join("link");
        std::os::unix::fs::symlink(&d, &link).expect("symlink");
        assert!(matches!(private_dir(&link), Err(DirError::Symlink { .. })));
        // A file.
        let file = base.join("file");
        fs::write(&file, b"x").expect("file");
        assert!(matches!(
            private_dir(&file),
            Err(DirError::NotADirectory { .. })
        ));
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn socket_directories_may_be_shared_only_if_sticky() {
        assert!(
            check_socket_dir(Path::new("/tmp")).is_ok(),
            "root's sticky /tmp"
        );
        let base = temp("shared");
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).expect("dir");
        fs::set_permissions(&base, fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(matches!(
            check_socket_dir(&base),
            Err(DirError::Mode { .. })
        ));
        fs::set_permissions(&base, fs::Permissions::from_mode(0o1777)).expect("chmod");
        assert!(check_socket_dir(&base).is_ok());
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(check_socket_dir(&base).is_ok());
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn files_of_dead_processes_are_removed_and_others_kept() {
        let dir = temp("dead");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        // A process that has exited (and been reaped) has a dead pid.
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let dead = child.id();
        let _ = child.wait();
        let live = std::process::id();
        for name in [
            format!("embedded-{dead}-0.sock"),
            format!("embedded-{dead}-0.sock.stats"),
            format!("embedded-{live}-0.sock"),
            "embedded-x-0.sock".to_string(),
            format!("other-{dead}.sock"),
        ] {
            fs::write(dir.join(name), b"").expect("file");
        }
        fs::create_dir_all(dir.join(format!("serve-{dead}/sub"))).expect("dir");
        assert_eq!(remove_dead(&dir, "embedded-"), 2);
        assert_eq!(remove_dead(&dir, "serve-"), 1);
        let mut left: Vec<String> = fs::read_dir(&dir)
            .map(|r| {
                r.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        left.sort();
        let mut want = vec![
            format!("embedded-{live}-0.sock"),
            "embedded-x-0.sock".to_string(),
            format!("other-{dead}.sock"),
        ];
        want.sort();
        assert_eq!(left, want);
        assert_eq!(owner_pid("serve-12", "serve-"), Some(12));
        assert_eq!(owner_pid("serve-12-x.json", "serve-"), Some(12));
        assert_eq!(owner_pid("serve-127.0.0.1:80.sock", "serve-"), None);
        assert_eq!(owner_pid("serve-", "serve-"), None);
        assert_eq!(owner_pid("serve-test-12", "serve-"), None);
        let _ = fs::remove_dir_all(&dir);
    }
}
