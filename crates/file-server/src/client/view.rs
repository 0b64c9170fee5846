//! What a reader holds of a file: a [`FileView`] of one version — one sealed segment, chunks
//! fetched as a range needs them, or the file itself passed by reference — and the byte
//! ranges ([`Piece`]s) it is sent as.

use super::*;

/// One byte range of a file, as it is sent: from a mapped segment, or from the file itself.
#[derive(Clone)]
pub enum Piece {
    /// `len` bytes from `offset` of a sealed segment.
    Mapped {
        seg: Arc<Segment>,
        offset: u64,
        len: u64,
    },
    /// `len` bytes from `offset` of a file passed by reference (sent with `sendfile`).
    Plain {
        file: Arc<PlainFile>,
        offset: u64,
        len: u64,
    },
}

impl Piece {
    pub fn len(&self) -> u64 {
        match self {
            Piece::Mapped { len, .. } | Piece::Plain { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One version of a whole file. Cheap to clone; a mapped chunk's bytes never change.
#[derive(Clone)]
pub struct FileView {
    inner: Arc<View>,
}

pub(super) struct View {
    pub(super) version: Version,
    pub(super) content_type: &'static str,
    pub(super) body: Body,
}

pub(super) enum Body {
    /// The whole file in one segment (most files, and empty ones).
    One(Arc<Segment>),
    /// Several chunks, fetched when first needed.
    Chunks(Chunks),
    /// The file itself, passed by reference.
    Plain(Arc<PlainFile>),
}

pub(super) struct Chunks {
    /// The file's path, to fetch its chunks by.
    pub(super) path: String,
    pub(super) chunk_size: u64,
    pub(super) count: u64,
    pub(super) fetched: Mutex<HashMap<u32, Arc<Segment>>>,
    pub(super) link: Weak<Mutex<Link>>,
    /// Only chunks the directory lists are fetched: the TCP server's direct path must never
    /// make the file server read the disk.
    pub(super) cached_only: bool,
}

impl FileView {
    pub(super) fn new(version: Version, content_type: &'static str, body: Body) -> FileView {
        FileView {
            inner: Arc::new(View {
                version,
                content_type,
                body,
            }),
        }
    }

    pub fn len(&self) -> u64 {
        self.inner.version.size
    }

    pub fn is_empty(&self) -> bool {
        self.inner.version.size == 0
    }

    pub fn version(&self) -> Version {
        self.inner.version
    }

    /// The content type the directory published for the file (from its extension).
    pub fn content_type(&self) -> &'static str {
        self.inner.content_type
    }

    /// Whether the file was passed by reference (too large to copy into the cache).
    pub fn is_by_reference(&self) -> bool {
        matches!(self.inner.body, Body::Plain(_))
    }

    /// Chunks the file is cached in (0 for a file passed by reference).
    pub fn chunk_count(&self) -> u64 {
        match &self.inner.body {
            Body::One(_) => 1,
            Body::Chunks(c) => c.count,
            Body::Plain(_) => 0,
        }
    }

    /// Chunks this view has mapped so far.
    pub fn mapped_chunks(&self) -> usize {
        match &self.inner.body {
            Body::One(_) => 1,
            Body::Chunks(c) => relock(&c.fetched).len(),
            Body::Plain(_) => 0,
        }
    }

    /// The pieces of the byte range `offset..offset+len`, in order, fetching the chunks they
    /// need. An empty range has no pieces.
    pub fn ranges(&self, offset: u64, len: u64) -> Result<Vec<Piece>, ClientError> {
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.len())
            .ok_or(ClientError::OutOfRange)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        match &self.inner.body {
            Body::One(seg) => Ok(vec![Piece::Mapped {
                seg: seg.clone(),
                offset,
                len,
            }]),
            Body::Plain(file) => Ok(vec![Piece::Plain {
                file: file.clone(),
                offset,
                len,
            }]),
            Body::Chunks(c) => {
                let mut out = Vec::new();
                let mut pos = offset;
                while pos < end {
                    let k = pos / c.chunk_size;
                    let seg = self.chunk(c, k)?;
                    let within = pos - k * c.chunk_size;
                    let part = seg.len().saturating_sub(within).min(end - pos);
                    if part == 0 {
                        return Err(ClientError::Protocol("a chunk shorter than its file says"));
                    }
                    out.push(Piece::Mapped {
                        seg,
                        offset: within,
                        len: part,
                    });
                    pos += part;
                }
                Ok(out)
            }
        }
    }

    /// The mapped pieces of a range as (segment, offset within it, length), as before files
    /// could be passed by reference: `None` if the range passes the end, a chunk cannot be
    /// fetched, or the file is passed by reference (it has no segments). Kept for callers
    /// written against it; [`FileView::ranges`] says why, and covers every file.
    pub fn pieces(&self, offset: u64, len: u64) -> Option<Vec<(Arc<Segment>, u64, u64)>> {
        self.ranges(offset, len)
            .ok()?
            .into_iter()
            .map(|p| match p {
                Piece::Mapped { seg, offset, len } => Some((seg, offset, len)),
                Piece::Plain { .. } => None,
            })
            .collect()
    }

    /// Chunk `k`, fetched (and checked to be of this view's version) on first use.
    pub(super) fn chunk(&self, c: &Chunks, k: u64) -> Result<Arc<Segment>, ClientError> {
        let k = u32::try_from(k).map_err(|_| ClientError::OutOfRange)?;
        if let Some(seg) = relock(&c.fetched).get(&k) {
            return Ok(seg.clone());
        }
        let link = c.link.upgrade().ok_or(ClientError::ServerGone)?;
        let seg = relock(&link).fetch_chunk(
            &c.path,
            k,
            self.inner.version,
            c.chunk_size,
            c.cached_only,
        )?;
        relock(&c.fetched).insert(k, seg.clone());
        Ok(seg)
    }

    /// Copies bytes from `offset` on; returns how many (fewer at the end of the file).
    pub fn try_read_at(&self, offset: u64, dst: &mut [u8]) -> Result<usize, ClientError> {
        let want = (dst.len() as u64).min(self.len().saturating_sub(offset));
        if want == 0 {
            return Ok(0);
        }
        // Most files are one segment: copied straight from it, with no list of pieces.
        if let Body::One(seg) = &self.inner.body {
            let (a, l) = (offset as usize, want as usize);
            let src = seg
                .bytes()
                .get(a..a + l)
                .ok_or(ClientError::Protocol("a chunk shorter than its file says"))?;
            dst[..l].copy_from_slice(src);
            return Ok(l);
        }
        let mut n = 0usize;
        for piece in self.ranges(offset, want)? {
            match piece {
                Piece::Mapped { seg, offset, len } => {
                    let bytes = seg.bytes();
                    let (a, l) = (offset as usize, len as usize);
                    let src = bytes
                        .get(a..a + l)
                        .ok_or(ClientError::Protocol("a chunk shorter than its file says"))?;
                    dst[n..n + l].copy_from_slice(src);
                    n += l;
                }
                Piece::Plain { file, offset, len } => {
                    let got = file
                        .read_at(offset, &mut dst[n..n + len as usize])
                        .map_err(ClientError::Read)?;
                    n += got;
                    if got < len as usize {
                        break; // the file shrank: it ends here
                    }
                }
            }
        }
        Ok(n)
    }

    /// Copies bytes from `offset` on; returns how many (0 on an error).
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> usize {
        self.try_read_at(offset, dst).unwrap_or(0)
    }

    /// The whole file. (Meant for small files: it allocates the file's size.)
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len() as usize];
        let n = self.read_at(0, &mut v);
        v.truncate(n);
        v
    }
}

/// The file version a directory entry describes.
pub(super) fn entry_version(e: &Entry) -> Version {
    Version {
        ino: e.ino,
        size: e.file_size,
        mtime_ns: e.mtime_ns as i128,
    }
}

impl splitos_http::respond::StaticFile for FileView {
    fn len(&self) -> u64 {
        self.inner.version.size
    }
    fn etag(&self) -> String {
        self.inner.version.etag()
    }
    fn modified(&self) -> std::time::SystemTime {
        splitos_http::respond::time_of_ns(self.inner.version.mtime_ns)
    }
    fn version_key(&self) -> Option<(u64, i128)> {
        // The ETag is size and mtime; Last-Modified is the mtime.
        Some((self.inner.version.size, self.inner.version.mtime_ns))
    }
    fn content_type(&self) -> &'static str {
        self.inner.content_type
    }
}

impl splitos_http::respond::FileSource for FileClient {
    type File = FileView;
    fn open(&mut self, path: &str) -> splitos_http::respond::Lookup<FileView> {
        lookup_of(FileClient::open(self, path))
    }
}
