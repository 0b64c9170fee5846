//! Sealed segments: bytes in a memfd sealed against every change, shared between processes by
//! descriptor and mapped read-only by each.
//!
//! The bytes are copied into a memfd, which is then sealed against writes, growth and
//! shrinking (`F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL`). From then on no
//! process can change them — the kernel refuses writes and writable mappings — so every reader,
//! in any process, sees exactly one version of the file, and a reference into the mapping is
//! sound (unlike a channel region, where design rule 2 forbids them). A changed file becomes a
//! *new* segment; the old one lives until its last user drops it. The copy is checked against
//! the file's size and modification time before and after, so a file rewritten during the copy
//! is copied again rather than cached torn.
//!
//! The file server makes segments of cached files; applications and the TCP server receive
//! them (with [`Segment::from_received`] and [`Segment::from_received_sealed`], which refuse
//! memory that is not sealed) and send from them. It lives in m2m, next to the region and the
//! memfd and seal calls in `sys.rs`, because all of those sides use it.
//!
//! A file too large to copy travels as a [`PlainFile`] instead: a read-only descriptor of the
//! file itself, never mapped (so a file that shrinks cannot fault anyone), read with `pread`
//! and sent with `sendfile`. Its bytes are whatever the file holds when they are read.

use crate::sys;
use memmap2::{Mmap, MmapOptions};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};

/// Copies of a file that keeps changing under us before we give up on caching it.
const MAX_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("the file kept changing while it was being read")]
    Unstable,
    #[error("shared memory from the peer is not sealed against changes")]
    NotSealed,
    #[error("the descriptor is not a regular file")]
    NotRegular,
    #[error("the file is on a FUSE file system, whose reads another user can hold forever")]
    Fuse,
    #[error("the descriptor is not the file the peer described")]
    Mismatch,
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: std::io::Error,
    },
}

fn io(context: &'static str) -> impl Fn(std::io::Error) -> SegmentError {
    move |source| SegmentError::Io { context, source }
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

    /// A strong validator for HTTP (`ETag`): size and modification time (nanoseconds), as
    /// nginx uses (it has seconds). Not the inode: two nodes serving copies of one site (copied
    /// with their times, `cp -p`, `rsync -t`) must give a file the same validator, so that a
    /// client revalidating against another node of a cluster gets its 304.
    pub fn etag(&self) -> String {
        format!("\"{:x}-{:x}\"", self.size, self.mtime_ns)
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
    pub fn load(file: impl AsFd) -> Result<Segment, SegmentError> {
        Segment::load_range(file, 0, u64::MAX)
    }

    /// Copies up to `len` bytes from `offset` (one chunk of a large file) into a new sealed
    /// segment. The segment records the version of the whole file it came from.
    pub fn load_range(file: impl AsFd, offset: u64, len: u64) -> Result<Segment, SegmentError> {
        let file = file.as_fd();
        for _ in 0..MAX_ATTEMPTS {
            let before = Version::of(&sys::stat(file).map_err(io("reading file status"))?);
            let seg_len = before.size.saturating_sub(offset).min(len);
            let fd = sys::create_sealable_memfd("splitos-file", seg_len)
                .map_err(io("creating shared memory"))?;
            let mut buf = vec![0u8; (seg_len as usize).clamp(1, 1 << 20)];
            let mut off = 0u64;
            let mut short = false;
            while off < seg_len {
                let want = buf.len().min((seg_len - off) as usize);
                let n = sys::pread(file, &mut buf[..want], offset + off)
                    .map_err(io("reading the file"))?;
                if n == 0 {
                    short = true; // truncated under us
                    break;
                }
                let mut done = 0;
                while done < n {
                    done += sys::pwrite(fd.as_fd(), &buf[done..n], off + done as u64)
                        .map_err(io("filling shared memory"))?;
                }
                off += n as u64;
            }
            let after = Version::of(&sys::stat(file).map_err(io("reading file status"))?);
            if short || after != before {
                continue;
            }
            sys::seal_contents(fd.as_fd()).map_err(io("sealing shared memory"))?;
            return Segment::map(fd, before, seg_len);
        }
        Err(SegmentError::Unstable)
    }

    /// Maps a segment of `len` bytes received from another process, after checking that it is
    /// sealed and of that size.
    pub fn from_received(fd: OwnedFd, version: Version, len: u64) -> Result<Segment, SegmentError> {
        if !sys::contents_sealed(fd.as_fd()).map_err(io("reading seals"))? {
            return Err(SegmentError::NotSealed);
        }
        let size = sys::stat(fd.as_fd())
            .map_err(io("reading segment status"))?
            .st_size as u64;
        if size != len {
            return Err(SegmentError::NotSealed);
        }
        Segment::map(fd, version, len)
    }

    /// Maps a sealed segment whose file version the receiver does not need to know (e.g. the
    /// TCP server sending it on a connection): its size is taken from the memfd itself.
    pub fn from_received_sealed(fd: OwnedFd) -> Result<Segment, SegmentError> {
        let size = sys::stat(fd.as_fd())
            .map_err(io("reading segment status"))?
            .st_size as u64;
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

/// `FUSE_SUPER_MAGIC` (linux/magic.h).
const FUSE_SUPER_MAGIC: u64 = 0x6573_5546;

/// Whether `fd` is on a FUSE file system: a read of such a file waits for a user-space daemon,
/// which any user can mount and which may never answer.
pub fn on_fuse(fd: BorrowedFd<'_>) -> bool {
    rustix::fs::fstatfs(fd).is_ok_and(|st| st.f_type as u64 == FUSE_SUPER_MAGIC)
}

/// A regular file shared by descriptor and never mapped: what a file too large to copy into a
/// [`Segment`] travels as. Read with [`PlainFile::read_at`] (`pread`); the TCP server sends it
/// with `sendfile`. Unlike a segment, its bytes can change while it is read: a reader sees
/// whatever the file holds at that moment, and a file that shrank simply ends early.
pub struct PlainFile {
    fd: OwnedFd,
    version: Version,
}

impl PlainFile {
    /// Accepts a descriptor received from another process if it is a regular file (fstat
    /// `S_ISREG`: no socket, pipe or device) and not on FUSE. Its version (and so [`len`]) is
    /// the file's as of now.
    ///
    /// [`len`]: PlainFile::len
    pub fn from_received(fd: OwnedFd) -> Result<PlainFile, SegmentError> {
        let st = sys::stat(fd.as_fd()).map_err(io("reading file status"))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(SegmentError::NotRegular);
        }
        if on_fuse(fd.as_fd()) {
            return Err(SegmentError::Fuse);
        }
        Ok(PlainFile {
            fd,
            version: Version::of(&st),
        })
    }

    /// Like [`PlainFile::from_received`], for a reader told which version the descriptor holds
    /// (by the file server): the descriptor must be that inode; the version recorded is the
    /// announced one (the size a response promises).
    pub fn from_announced(fd: OwnedFd, version: Version) -> Result<PlainFile, SegmentError> {
        let got = PlainFile::from_received(fd)?;
        if got.version.ino != version.ino {
            return Err(SegmentError::Mismatch);
        }
        Ok(PlainFile {
            fd: got.fd,
            version,
        })
    }

    /// Wraps a file this process opened itself.
    pub fn from_opened(fd: OwnedFd, version: Version) -> PlainFile {
        PlainFile { fd, version }
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The file's size when it was opened (it may have changed since).
    pub fn len(&self) -> u64 {
        self.version.size
    }

    pub fn is_empty(&self) -> bool {
        self.version.size == 0
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads from `offset` until `dst` is full or the file ends; returns how many bytes.
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < dst.len() {
            // Offsets past i64::MAX are past the end of any file (and EINVAL for pread).
            let Some(at) = offset
                .checked_add(n as u64)
                .filter(|a| *a <= i64::MAX as u64)
            else {
                break;
            };
            match sys::pread(self.fd.as_fd(), &mut dst[n..], at) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, body: &[u8]) -> std::fs::File {
        let path = std::env::temp_dir().join(format!("m2m-seg-{}-{name}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(body).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn a_loaded_segment_holds_the_bytes_and_cannot_change() {
        for size in [0usize, 1, 4097, (1 << 20) + 7] {
            let body: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let seg = Segment::load(temp_file(&format!("load{size}"), &body)).unwrap();
            assert_eq!(seg.len(), size as u64);
            assert!(seg.bytes() == body.as_slice(), "content of {size} bytes");
            assert_eq!(seg.version().size, size as u64);
            if size > 0 {
                assert!(
                    sys::pwrite(seg.fd(), b"x", 0).is_err(),
                    "write past the seal"
                );
            }
            let dup = seg.fd().try_clone_to_owned().unwrap();
            let other = Segment::from_received(dup, seg.version(), seg.len()).unwrap();
            assert!(other.bytes() == body.as_slice());
        }
    }

    #[test]
    fn a_range_is_one_chunk_of_the_whole_files_version() {
        let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let f = temp_file("range", &body);
        let seg = Segment::load_range(&f, 4096, 4096).unwrap();
        assert_eq!(seg.bytes(), &body[4096..8192]);
        assert_eq!(seg.version().size, 10_000);
        let tail = Segment::load_range(&f, 8192, 4096).unwrap();
        assert_eq!(tail.bytes(), &body[8192..]);
        assert!(Segment::load_range(&f, 20_000, 4096).unwrap().is_empty());
    }

    #[test]
    fn unsealed_or_misreported_memory_is_refused() {
        let plain = sys::create_sealable_memfd("plain", 3).unwrap();
        let v = Version {
            ino: 0,
            size: 3,
            mtime_ns: 0,
        };
        assert!(matches!(
            Segment::from_received(plain, v, 3),
            Err(SegmentError::NotSealed)
        ));
        assert!(matches!(
            Segment::from_received_sealed(sys::create_sealable_memfd("plain", 3).unwrap()),
            Err(SegmentError::NotSealed)
        ));
        let seg = Segment::load(temp_file("sized", b"abc")).unwrap();
        let dup = seg.fd().try_clone_to_owned().unwrap();
        assert!(matches!(
            Segment::from_received(dup, v, 4),
            Err(SegmentError::NotSealed)
        ));
        let dup = seg.fd().try_clone_to_owned().unwrap();
        let got = Segment::from_received_sealed(dup).unwrap();
        assert_eq!((got.len(), got.bytes()), (3, &b"abc"[..]));
    }

    #[test]
    fn a_plain_file_is_a_regular_file_read_in_place() {
        let f = temp_file("plain", b"0123456789");
        let p = PlainFile::from_received(f.into()).unwrap();
        assert_eq!(p.len(), 10);
        let mut buf = [0u8; 4];
        assert_eq!(p.read_at(8, &mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"89");
        assert_eq!(p.read_at(u64::MAX, &mut buf).unwrap(), 0);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            PlainFile::from_received(a.into()),
            Err(SegmentError::NotRegular)
        ));
        let f = temp_file("plain2", b"xy");
        let v = Version {
            ino: 1,
            size: 2,
            mtime_ns: 0,
        };
        assert!(matches!(
            PlainFile::from_announced(f.into(), v),
            Err(SegmentError::Mismatch)
        ));
    }

    #[test]
    fn etags_name_size_and_mtime_not_the_inode() {
        let v = Version {
            ino: 255,
            size: 16,
            mtime_ns: 4096,
        };
        assert_eq!(v.etag(), "\"10-1000\"");
        let copy = Version { ino: 7, ..v };
        assert_eq!(copy.etag(), v.etag(), "a copy on another node agrees");
    }
}
