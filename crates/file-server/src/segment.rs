//! A file's bytes in sealed shared memory.
//!
//! The bytes are copied into a memfd, which is then sealed against writes, growth and
//! shrinking (`F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL`). From then on no
//! process can change them — the kernel refuses writes and writable mappings — so every reader,
//! in any process, sees exactly one version of the file, and a reference into the mapping is
//! sound. A changed file becomes a *new* segment; the old one lives until its last user drops
//! it. The copy is checked against the file's size and modification time before and after, so a
//! file rewritten during the copy is copied again rather than cached torn.

use crate::path::Opened;
use memmap2::{Mmap, MmapOptions};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{
    fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create, MemfdFlags, SealFlags,
};
use rustix::io::{pread, pwrite};

const SEALS: SealFlags = SealFlags::WRITE
    .union(SealFlags::SHRINK)
    .union(SealFlags::GROW)
    .union(SealFlags::SEAL);
/// Copies of a file that keeps changing under us before we give up on caching it.
const MAX_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("the file kept changing while it was being read")]
    Unstable,
    #[error("shared memory from the peer is not sealed against changes")]
    NotSealed,
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: std::io::Error,
    },
}

fn io(context: &'static str) -> impl Fn(rustix::io::Errno) -> SegmentError {
    move |e| SegmentError::Io {
        context,
        source: e.into(),
    }
}

/// The identity of one version of a file: inode, size, modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Version {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl Version {
    pub fn of(st: &rustix::fs::Stat) -> Version {
        Version {
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128,
        }
    }

    /// A strong validator for HTTP (`ETag`), in the style nginx uses.
    pub fn etag(&self) -> String {
        format!("\"{:x}-{:x}-{:x}\"", self.ino, self.size, self.mtime_ns)
    }
}

pub struct Segment {
    fd: OwnedFd,
    map: Option<Mmap>,
    /// The version of the whole file this segment was copied from.
    version: Version,
    /// Bytes in this segment (the whole file, or one chunk of it).
    len: u64,
}

impl Segment {
    /// Copies an opened file into a new sealed segment.
    pub fn load(file: &Opened) -> Result<Segment, SegmentError> {
        Segment::load_range(file, 0, u64::MAX)
    }

    /// Copies up to `len` bytes from `offset` (one chunk of a large file) into a new sealed
    /// segment. The segment records the version of the whole file it came from.
    pub fn load_range(file: &Opened, offset: u64, len: u64) -> Result<Segment, SegmentError> {
        for _ in 0..MAX_ATTEMPTS {
            let before = Version::of(&fstat(&file.fd).map_err(io("reading file status"))?);
            let seg_len = before.size.saturating_sub(offset).min(len);
            let fd = memfd_create(
                "splitos-file",
                MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
            )
            .map_err(io("creating shared memory"))?;
            ftruncate(&fd, seg_len).map_err(io("sizing shared memory"))?;
            let mut buf = vec![0u8; (seg_len as usize).clamp(1, 1 << 20)];
            let mut off = 0u64;
            let mut short = false;
            while off < seg_len {
                let want = buf.len().min((seg_len - off) as usize);
                let n = pread(&file.fd, &mut buf[..want], offset + off)
                    .map_err(io("reading the file"))?;
                if n == 0 {
                    short = true; // truncated under us
                    break;
                }
                let mut done = 0;
                while done < n {
                    done += pwrite(&fd, &buf[done..n], off + done as u64)
                        .map_err(io("filling shared memory"))?;
                }
                off += n as u64;
            }
            let after = Version::of(&fstat(&file.fd).map_err(io("reading file status"))?);
            if short || after != before {
                continue;
            }
            fcntl_add_seals(&fd, SEALS).map_err(io("sealing shared memory"))?;
            return Segment::map(fd, before, seg_len);
        }
        Err(SegmentError::Unstable)
    }

    /// Maps a segment of `len` bytes received from another process, after checking that it is
    /// sealed and of that size.
    pub fn from_received(fd: OwnedFd, version: Version, len: u64) -> Result<Segment, SegmentError> {
        let seals = fcntl_get_seals(&fd).map_err(io("reading seals"))?;
        let need = SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW;
        if !seals.contains(need) {
            return Err(SegmentError::NotSealed);
        }
        let size = fstat(&fd).map_err(io("reading segment status"))?.st_size as u64;
        if size != len {
            return Err(SegmentError::NotSealed);
        }
        Segment::map(fd, version, len)
    }

    /// Maps a sealed segment whose file version the receiver does not need to know (e.g. the
    /// TCP server sending it on a connection): its size is taken from the memfd itself.
    pub fn from_received_sealed(fd: OwnedFd) -> Result<Segment, SegmentError> {
        let size = fstat(&fd).map_err(io("reading segment status"))?.st_size as u64;
        let v = Version {
            ino: 0,
            size,
            mtime_ns: 0,
        };
        Segment::from_received(fd, v, size)
    }

    fn map(fd: OwnedFd, version: Version, len: u64) -> Result<Segment, SegmentError> {
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the memfd is sealed against writes, shrinking and growth (checked or set
            // by the callers), so the mapped bytes can never change or disappear while mapped:
            // the invariant `Mmap` requires.
            Some(
                unsafe { MmapOptions::new().len(len as usize).map(&fd) }.map_err(|e| {
                    SegmentError::Io {
                        context: "mapping shared memory",
                        source: e,
                    }
                })?,
            )
        };
        Ok(Segment {
            fd,
            map,
            version,
            len,
        })
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes. Immutable for the life of the segment (see the module comment).
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The memfd, to hand to another process (which maps it with [`Segment::from_received`]).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
