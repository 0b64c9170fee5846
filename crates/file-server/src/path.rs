//! Path safety: nothing outside the root is ever opened.
//!
//! Two layers. [`normalize`] rejects what is malformed or suspicious on its face (NUL bytes,
//! absolute paths, `..` segments, over-long paths) and collapses `.` and repeated slashes, so
//! the cache has one key per file. [`Root::open`] then opens the result with `openat2(2)` and
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`, so the kernel itself refuses
//! any resolution — through symlinks included — that would leave the root or cross into another
//! file system mounted beneath it (a bind mount of somewhere else is outside the tree the
//! operator pointed at, whatever its path; [`Root::open_dir_with`] can allow it), and
//! `O_NONBLOCK` keeps a FIFO from blocking the open. Only regular files are served; directories are reported as such (an HTTP
//! layer maps them to `index.html` or a redirect), everything else is refused.
//! Percent-decoding is the HTTP layer's job and happens before [`normalize`].

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{fstat, openat2, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;
use std::path::Path;

/// Longest path accepted, in bytes (PATH_MAX).
pub const MAX_PATH: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the path contains a NUL byte")]
    Nul,
    #[error("the path is absolute; paths are relative to the served root")]
    Absolute,
    #[error("the path contains '..', which could leave the served root")]
    ParentSegment,
    #[error("the path is longer than {MAX_PATH} bytes")]
    TooLong,
    #[error("the path names nothing (it is empty)")]
    Empty,
}

/// Checks a requested path and puts it in canonical form: segments joined by single slashes,
/// without `.` segments. A trailing slash is kept (it asks for a directory).
pub fn normalize(request: &str) -> Result<String, PathError> {
    if request.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    if request.contains('\0') {
        return Err(PathError::Nul);
    }
    if request.starts_with('/') {
        return Err(PathError::Absolute);
    }
    let mut out = String::with_capacity(request.len());
    for seg in request.split('/') {
        match seg {
            "" | "." => continue,
            ".." => return Err(PathError::ParentSegment),
            s => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(s);
            }
        }
    }
    if out.is_empty() {
        return Err(PathError::Empty);
    }
    if request.ends_with('/') {
        out.push('/');
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("no such file")]
    NotFound,
    #[error("the path leaves the served root (through a symlink or a mount)")]
    Escapes,
    #[error("the path is a directory")]
    Directory,
    #[error("the path is not a regular file (device, FIFO or socket); refused")]
    Special,
    #[error("permission denied")]
    Denied,
    #[error("opening the file failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A directory whose contents may be served, and nothing outside it.
pub struct Root {
    dir: OwnedFd,
    resolve: ResolveFlags,
}

/// An opened regular file beneath the root.
pub struct Opened {
    pub fd: OwnedFd,
    pub stat: Stat,
    /// The canonical relative path (the cache key).
    pub path: String,
}

/// So that an opened file can be copied into a segment: `Segment::load(&opened)`.
impl AsFd for Opened {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Root {
    /// The directory at `path`; paths beneath it never cross into another mount.
    pub fn open_dir(path: &Path) -> Result<Root, OpenError> {
        Root::open_dir_with(path, false)
    }

    /// [`Root::open_dir`], choosing whether paths may cross into file systems mounted beneath
    /// the root (`follow_mounts`: content bind-mounted into the tree on purpose). Symlinks and
    /// `..` still cannot leave it either way.
    pub fn open_dir_with(path: &Path, follow_mounts: bool) -> Result<Root, OpenError> {
        let dir = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::NOENT => OpenError::NotFound,
            Errno::NOTDIR => OpenError::Special,
            e => OpenError::Io(e.into()),
        })?;
        let mut resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        if !follow_mounts {
            resolve |= ResolveFlags::NO_XDEV;
        }
        Ok(Root { dir, resolve })
    }

    /// Opens `request` (already percent-decoded) beneath the root.
    pub fn open(&self, request: &str) -> Result<Opened, OpenError> {
        let path = normalize(request)?;
        let fd = openat2(
            self.dir.as_fd(),
            path.trim_end_matches('/'),
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
            Mode::empty(),
            self.resolve,
        )
        .map_err(|e| match e {
            Errno::NOENT | Errno::NOTDIR => OpenError::NotFound,
            Errno::XDEV | Errno::LOOP => OpenError::Escapes,
            Errno::ACCESS | Errno::PERM => OpenError::Denied,
            e => OpenError::Io(e.into()),
        })?;
        let stat = fstat(&fd).map_err(|e| OpenError::Io(e.into()))?;
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => Ok(Opened { fd, stat, path }),
            FileType::Directory => Err(OpenError::Directory),
            _ => Err(OpenError::Special),
        }
    }
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry {
    pub name: String,
    pub is_dir: bool,
    pub size: u64,
    pub mtime: i64,
}

impl Root {
    /// Lists directory `request` (already percent-decoded; `""` is the root) beneath the root:
    /// names not starting with `.`, directories first then by name, at most `max` entries.
    /// Returns the entries and whether the listing was cut short.
    pub fn list(&self, request: &str, max: usize) -> Result<(Vec<ListEntry>, bool), OpenError> {
        let rel = request.trim_matches('/');
        let path = if rel.is_empty() {
            ".".to_string()
        } else {
            normalize(rel)?
        };
        let fd = openat2(
            self.dir.as_fd(),
            path.as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::DIRECTORY,
            Mode::empty(),
            self.resolve,
        )
        .map_err(|e| match e {
            Errno::NOENT | Errno::NOTDIR => OpenError::NotFound,
            Errno::XDEV | Errno::LOOP => OpenError::Escapes,
            Errno::ACCESS | Errno::PERM => OpenError::Denied,
            e => OpenError::Io(e.into()),
        })?;
        let dir = rustix::fs::Dir::read_from(&fd).map_err(|e| OpenError::Io(e.into()))?;
        let mut out = Vec::new();
        let mut truncated = false;
        for ent in dir {
            let ent = ent.map_err(|e| OpenError::Io(e.into()))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if out.len() >= max {
                truncated = true;
                break;
            }
            // lstat-like: a symlink is described, not followed (it may point outside).
            let Ok(st) =
                rustix::fs::statat(&fd, ent.file_name(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            else {
                continue;
            };
            let kind = FileType::from_raw_mode(st.st_mode);
            out.push(ListEntry {
                name,
                is_dir: kind == FileType::Directory,
                size: st.st_size.max(0) as u64,
                mtime: st.st_mtime,
            });
        }
        out.sort_by(|a, b| b.is_dir.cmp(&a.is_dir).then_with(|| a.name.cmp(&b.name)));
        Ok((out, truncated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_rejects() {
        assert_eq!(normalize("a/./b//c.html").unwrap(), "a/b/c.html");
        assert_eq!(normalize("docs/").unwrap(), "docs/");
        assert_eq!(normalize("./index.html").unwrap(), "index.html");
        for (bad, err) in [
            ("../etc/passwd", PathError::ParentSegment),
            ("a/../../b", PathError::ParentSegment),
            ("a/..", PathError::ParentSegment),
            ("/etc/passwd", PathError::Absolute),
            ("a\0b", PathError::Nul),
            ("", PathError::Empty),
            ("./", PathError::Empty),
        ] {
            assert_eq!(normalize(bad), Err(err), "{bad:?}");
        }
        assert_eq!(normalize(&"a/".repeat(3000)), Err(PathError::TooLong));
    }
}
