//! The shared directory: a hash table in shared memory that the file server publishes and
//! readers search without sending a message.
//!
//! One writer (the file server), any number of readers in other processes, which map the region
//! read-only and treat it as untrusted input. Each slot is a small record under a sequence
//! counter: the writer makes the counter odd, writes the fields, makes it even again; a reader
//! copies the fields between two reads of an even, unchanged counter, so it never returns a torn
//! entry (it retries a bounded number of times, then reports a miss). Every field is read with an
//! atomic load — no Rust reference into the region — and the bytes an entry points to live in
//! their own sealed segment, so an entry is replaced, never edited in a way a reader could see
//! half of.
//!
//! A key (path and chunk number) lives in one of `PROBE` slots from its hash; a lookup checks all
//! of them, so removal needs no tombstones. An entry that finds no free slot is not published:
//! readers miss and ask the server, which still has it (the server first displaces absences
//! from the window, and counts what it still cannot place).
//!
//! An entry may also record that a path does *not* exist ([`ABSENT`]): the server publishes one
//! after a lookup failed, once it watches the directory, and retracts it when the directory
//! changes. That lets a reader that must not wait (the TCP server's direct path) know that a
//! precompressed sibling is missing without asking.

use core::mem::{offset_of, size_of};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{
    fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create, MemfdFlags, SealFlags,
};
use splitos_m2m::seqlock::SharedWords;
use std::sync::atomic::Ordering;

/// "SPOSFDIR" in little-endian byte order.
const MAGIC: u64 = u64::from_le_bytes(*b"SPOSFDIR");
/// Bumped on any change that changes what a reader of another build would read: the header,
/// the slot layout, [`key_hash`], [`PROBE`] — and the content-type codes. An entry stores its
/// content type as an index into `splitos_http::mime::TYPES`, so that table (its order and its
/// members) is covered by this version too; `splitos-http`'s test `type_codes_are_pinned`
/// lists it and fails on any change, to send whoever changes it here.
const VERSION: u64 = 1;
/// Bytes before the first slot: the [`Header`], padded to a page.
const HEADER: usize = 4096;
/// Bytes per slot: a [`Slot`], padded.
pub const SLOT: usize = 256;
/// Slots a key may occupy, counted from its hash.
pub const PROBE: usize = 8;
/// Longest path a slot holds; longer paths are served, just never from the directory.
pub const MAX_KEY_PATH: usize = 184;
/// Most slots a directory has: the writer creates no more, and a reader maps no more (a
/// region of 256 MiB), whatever a hostile server's header says.
pub const MAX_SLOTS: usize = 1 << 20;
/// Attempts a lookup makes at copying a slot the writer is changing before it counts as a
/// miss: the direct path must never wait on the file server.
const RETRIES: usize = 64;

/// The region header at offset 0, written once by the file server before it shares the region.
/// Never used in place (the region is shared): it fixes the offsets in [`header`].
#[repr(C)]
struct Header {
    magic: u64,
    version: u64,
    /// Number of slots: a power of two, at least [`PROBE`]; the region is
    /// `HEADER + slots * SLOT` bytes.
    slots: u64,
}

/// Byte offsets of the header words.
mod header {
    use super::{offset_of, Header};
    pub const MAGIC: usize = offset_of!(Header, magic);
    pub const VERSION: usize = offset_of!(Header, version);
    pub const SLOTS: usize = offset_of!(Header, slots);
}

/// One slot, at `HEADER + index * SLOT`: a seqlock record (`splitos_m2m::seqlock`) whose
/// sequence word is `seq` and whose values are the words after it. Never used in place: it
/// fixes the positions in [`field`].
#[repr(C)]
struct Slot {
    /// Odd while the writer changes the slot.
    seq: u64,
    /// Segment id; 0 = empty slot, [`ABSENT`] = the path does not exist.
    id: u64,
    /// `key_hash(path, chunk)`.
    hash: u64,
    file_size: u64,
    /// Chunk index (low 32 bits) | chunk length (high 32 bits).
    chunk: u64,
    mtime_ns: u64,
    ino: u64,
    /// Path length (bits 0..16) | content-type code (bits 16..24: an index into
    /// `splitos_http::mime::TYPES`).
    path_len: u64,
    /// The path's bytes, zero-padded to whole words.
    path: [u8; MAX_KEY_PATH],
}

/// Index of a slot field among the record's values (the words after the sequence word).
const fn value_index(offset: usize) -> usize {
    offset / 8 - 1
}

/// Positions of the slot fields among the record's values.
mod field {
    use super::{offset_of, size_of, value_index, Slot};
    pub const ID: usize = value_index(offset_of!(Slot, id));
    pub const HASH: usize = value_index(offset_of!(Slot, hash));
    pub const FILE_SIZE: usize = value_index(offset_of!(Slot, file_size));
    pub const CHUNK: usize = value_index(offset_of!(Slot, chunk));
    pub const MTIME: usize = value_index(offset_of!(Slot, mtime_ns));
    pub const INO: usize = value_index(offset_of!(Slot, ino));
    pub const PATH_LEN: usize = value_index(offset_of!(Slot, path_len));
    /// The first of the path's words.
    pub const PATH: usize = value_index(offset_of!(Slot, path));
    /// Words a record carries after its sequence word.
    pub const VALUES: usize = value_index(size_of::<Slot>());
}

// The contract in numbers: changing any of these changes bytes readers of other builds
// interpret (bump VERSION).
const _: () = {
    assert!(size_of::<Header>() <= HEADER);
    assert!(header::MAGIC == 0 && header::VERSION == 8 && header::SLOTS == 16);
    assert!(size_of::<Slot>() <= SLOT && MAX_KEY_PATH % 8 == 0);
    assert!(offset_of!(Slot, seq) == 0);
    assert!(field::ID == 0 && field::HASH == 1 && field::FILE_SIZE == 2 && field::CHUNK == 3);
    assert!(field::MTIME == 4 && field::INO == 5 && field::PATH_LEN == 6 && field::PATH == 7);
    assert!(field::VALUES == field::PATH + MAX_KEY_PATH / 8);
};

/// The `id` of an entry that records a path's absence (chunk 0; the other fields are zero).
pub const ABSENT: u64 = u64::MAX;

/// What a directory entry says about one chunk of one file version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The segment holding the bytes (nonzero).
    pub id: u64,
    pub path: String,
    pub chunk: u32,
    pub chunk_len: u32,
    pub file_size: u64,
    pub mtime_ns: i64,
    pub ino: u64,
    /// Content-type hint: an index into `splitos_http::mime::TYPES` (a code covered by
    /// [`VERSION`]).
    pub content_type: u8,
}

impl Entry {
    /// An entry saying that `path` did not exist when the server last looked.
    pub fn absent(path: &str) -> Entry {
        Entry {
            id: ABSENT,
            path: path.to_string(),
            chunk: 0,
            chunk_len: 0,
            file_size: 0,
            mtime_ns: 0,
            ino: 0,
            content_type: 0,
        }
    }

    pub fn is_absent(&self) -> bool {
        self.id == ABSENT
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("the directory region is malformed: {0}")]
    Malformed(&'static str),
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: std::io::Error,
    },
}

fn io(context: &'static str) -> impl Fn(rustix::io::Errno) -> DirectoryError {
    move |e| DirectoryError::Io {
        context,
        source: e.into(),
    }
}

/// Hash of a key. It is part of the shared-memory contract — the writer and readers may be
/// different builds — so it is a fixed function (FNV-1a), not std's unspecified hasher.
pub fn key_hash(path: &str, chunk: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.bytes().chain(chunk.to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The mapped region: the [`Header`], then `slots` seqlock records laid out as [`Slot`]s.
struct Map {
    words: SharedWords,
    slots: usize,
}

/// Byte offset of slot `slot`'s sequence word.
fn slot_base(slot: usize) -> usize {
    HEADER + slot * SLOT
}

/// The file server's side.
pub struct DirectoryWriter {
    map: Map,
    fd: OwnedFd,
    /// Private copy of what each slot holds, so the writer never reads shared memory back.
    owners: Vec<Option<(u64, String, u32)>>,
}

impl DirectoryWriter {
    /// Creates a directory of `slots` slots (rounded up to a power of two).
    pub fn create(slots: usize) -> Result<DirectoryWriter, DirectoryError> {
        let slots = slots.next_power_of_two().clamp(PROBE, MAX_SLOTS);
        let len = HEADER + slots * SLOT;
        let fd = memfd_create(
            "splitos-directory",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(io("creating the directory"))?;
        ftruncate(&fd, len as u64).map_err(io("sizing the directory"))?;
        fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(io("sealing the directory"))?;
        let words = SharedWords::map_writable(fd.as_fd(), len).map_err(|e| DirectoryError::Io {
            context: "mapping the directory",
            source: e,
        })?;
        words.store(header::VERSION, VERSION, Ordering::Relaxed);
        words.store(header::SLOTS, slots as u64, Ordering::Relaxed);
        // Last, with release: a reader that sees the magic sees the rest.
        words.store(header::MAGIC, MAGIC, Ordering::Release);
        let m = Map { words, slots };
        Ok(DirectoryWriter {
            map: m,
            fd,
            owners: vec![None; slots],
        })
    }

    /// The region, to hand to readers.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn write_slot(&mut self, slot: usize, e: Option<&Entry>) {
        let mut v = [0u64; field::VALUES];
        let n = match e {
            // An id of 0 empties the slot; readers ignore the other words.
            None => field::ID + 1,
            Some(e) => {
                let path = e.path.as_bytes();
                v[field::ID] = e.id;
                v[field::HASH] = key_hash(&e.path, e.chunk);
                v[field::FILE_SIZE] = e.file_size;
                v[field::CHUNK] = e.chunk as u64 | (e.chunk_len as u64) << 32;
                v[field::MTIME] = e.mtime_ns as u64;
                v[field::INO] = e.ino;
                v[field::PATH_LEN] = path.len() as u64 | (e.content_type as u64) << 16;
                for (i, chunk) in path.chunks(8).enumerate() {
                    let mut w = [0u8; 8];
                    w[..chunk.len()].copy_from_slice(chunk);
                    v[field::PATH + i] = u64::from_le_bytes(w);
                }
                // Words past the path's keep older bytes, which the length hides.
                field::PATH + path.len().div_ceil(8)
            }
        };
        self.map.words.write_record(slot_base(slot), &v[..n]);
    }

    /// Publishes `e` (replacing any entry for the same key). Returns false if it could not be
    /// placed (path too long, or every probe slot taken by other keys).
    pub fn publish(&mut self, e: &Entry) -> bool {
        if e.id == 0 || e.path.len() > MAX_KEY_PATH {
            return false;
        }
        let start = key_hash(&e.path, e.chunk) as usize;
        let mask = self.map.slots - 1;
        let mut free = None;
        for i in 0..PROBE {
            let slot = (start + i) & mask;
            match &self.owners[slot] {
                Some((_, p, c)) if *p == e.path && *c == e.chunk => {
                    free = Some(slot);
                    break;
                }
                None if free.is_none() => free = Some(slot),
                _ => {}
            }
        }
        let Some(slot) = free else { return false };
        self.write_slot(slot, Some(e));
        self.owners[slot] = Some((e.id, e.path.clone(), e.chunk));
        true
    }

    /// The paths of the absence entries in the probe window of `path`/`chunk`: the entries a
    /// real file's may displace when its window is full.
    pub fn absences_in_window(&self, path: &str, chunk: u32) -> Vec<String> {
        let start = key_hash(path, chunk) as usize;
        let mask = self.map.slots - 1;
        (0..PROBE)
            .filter_map(|i| match &self.owners[(start + i) & mask] {
                Some((ABSENT, p, _)) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// Removes the entry for `path`/`chunk`, if published.
    pub fn remove(&mut self, path: &str, chunk: u32) {
        let start = key_hash(path, chunk) as usize;
        let mask = self.map.slots - 1;
        for i in 0..PROBE {
            let slot = (start + i) & mask;
            if matches!(&self.owners[slot], Some((_, p, c)) if p == path && *c == chunk) {
                self.write_slot(slot, None);
                self.owners[slot] = None;
                return;
            }
        }
    }
}

/// A reader's view: maps a region received from the file server, read-only.
pub struct DirectoryReader {
    map: Map,
}

impl DirectoryReader {
    pub fn open(fd: OwnedFd) -> Result<DirectoryReader, DirectoryError> {
        let seals = fcntl_get_seals(&fd).map_err(io("reading directory seals"))?;
        if !seals.contains(SealFlags::SHRINK | SealFlags::GROW) {
            return Err(DirectoryError::Malformed("not size-sealed"));
        }
        let len = fstat(&fd).map_err(io("reading directory size"))?.st_size as u64;
        if len < (HEADER + PROBE * SLOT) as u64 {
            return Err(DirectoryError::Malformed("too small"));
        }
        if len > (HEADER + MAX_SLOTS * SLOT) as u64 {
            return Err(DirectoryError::Malformed("larger than any directory"));
        }
        let len = len as usize;
        let words =
            SharedWords::map_read_only(fd.as_fd(), len).map_err(|e| DirectoryError::Io {
                context: "mapping the directory",
                source: e,
            })?;
        if words.load(header::MAGIC, Ordering::Acquire) != MAGIC
            || words.load(header::VERSION, Ordering::Relaxed) != VERSION
        {
            return Err(DirectoryError::Malformed("wrong magic or version"));
        }
        let slots = words.load(header::SLOTS, Ordering::Relaxed) as usize;
        if !slots.is_power_of_two() || slots < PROBE || HEADER + slots.saturating_mul(SLOT) != len {
            return Err(DirectoryError::Malformed(
                "slot count disagrees with the size",
            ));
        }
        Ok(DirectoryReader {
            map: Map { words, slots },
        })
    }

    /// Copies slot `slot` consistently; `None` if empty, unreadable (writer mid-update for too
    /// long) or malformed.
    fn read_slot(&self, slot: usize) -> Option<Entry> {
        let mut v = [0u64; field::VALUES];
        if !self.map.words.read_record(slot_base(slot), &mut v, RETRIES) {
            return None;
        }
        let id = v[field::ID];
        let chunk = v[field::CHUNK];
        let len_word = v[field::PATH_LEN];
        let path_len = (len_word & 0xffff) as usize;
        if id == 0 || path_len > MAX_KEY_PATH {
            return None;
        }
        let mut path = [0u8; MAX_KEY_PATH];
        for (bytes, w) in path.chunks_mut(8).zip(&v[field::PATH..]) {
            bytes.copy_from_slice(&w.to_le_bytes());
        }
        let path = String::from_utf8(path[..path_len].to_vec()).ok()?;
        Some(Entry {
            id,
            path,
            chunk: chunk as u32,
            chunk_len: (chunk >> 32) as u32,
            file_size: v[field::FILE_SIZE],
            mtime_ns: v[field::MTIME] as i64,
            ino: v[field::INO],
            content_type: (len_word >> 16) as u8,
        })
    }

    /// Finds the entry for `path`/`chunk` without a message to the server.
    pub fn lookup(&self, path: &str, chunk: u32) -> Option<Entry> {
        let start = key_hash(path, chunk) as usize;
        let mask = self.map.slots - 1;
        (0..PROBE)
            .filter_map(|i| self.read_slot((start + i) & mask))
            .find(|e| e.path == path && e.chunk == chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, path: &str) -> Entry {
        Entry {
            id,
            path: path.into(),
            chunk: 0,
            chunk_len: id as u32,
            file_size: id * 3,
            mtime_ns: id as i64 * 7,
            ino: id * 11,
            content_type: (id % 7) as u8,
        }
    }

    fn reader(w: &DirectoryWriter) -> DirectoryReader {
        DirectoryReader::open(w.fd().try_clone_to_owned().unwrap()).unwrap()
    }

    #[test]
    fn publish_lookup_replace_remove() {
        let mut w = DirectoryWriter::create(64).unwrap();
        let r = reader(&w);
        assert!(r.lookup("a.html", 0).is_none());
        assert!(w.publish(&entry(5, "a.html")));
        assert_eq!(r.lookup("a.html", 0), Some(entry(5, "a.html")));
        assert!(r.lookup("a.html", 1).is_none());
        assert!(w.publish(&entry(9, "a.html")));
        assert_eq!(r.lookup("a.html", 0).unwrap().id, 9, "replaced in place");
        w.remove("a.html", 0);
        assert!(r.lookup("a.html", 0).is_none());
        assert!(!w.publish(&entry(1, &"x".repeat(MAX_KEY_PATH + 1))));
    }

    #[test]
    fn a_full_probe_window_declines_instead_of_evicting_others() {
        let mut w = DirectoryWriter::create(8).unwrap();
        let mut placed = 0;
        for i in 1..=20u64 {
            if w.publish(&entry(i, &format!("f{i}"))) {
                placed += 1;
            }
        }
        assert_eq!(placed, 8);
        let r = reader(&w);
        let found = (1..=20u64)
            .filter(|i| r.lookup(&format!("f{i}"), 0).is_some())
            .count();
        assert_eq!(found, 8);
    }

    #[test]
    fn absences_in_a_window_are_listed_for_displacement() {
        let mut w = DirectoryWriter::create(8).unwrap();
        assert!(w.publish(&entry(1, "real")));
        assert!(w.publish(&Entry::absent("gone-a")));
        assert!(w.publish(&Entry::absent("gone-b")));
        // With 8 slots every key's window is the whole table.
        let mut found = w.absences_in_window("anything", 0);
        found.sort();
        assert_eq!(found, ["gone-a", "gone-b"]);
    }

    #[test]
    fn readers_never_see_a_torn_entry() {
        let mut w = DirectoryWriter::create(16).unwrap();
        let r = reader(&w);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            let (mut seen, mut torn) = (0u64, 0u64);
            while !s2.load(Ordering::Relaxed) {
                if let Some(e) = r.lookup("hot.html", 0) {
                    seen += 1;
                    if e != entry(e.id, "hot.html") {
                        torn += 1;
                    }
                }
            }
            (seen, torn)
        });
        for i in 1..200_000u64 {
            w.publish(&entry(i, "hot.html"));
            if i % 3 == 0 {
                w.remove("hot.html", 0);
            }
        }
        stop.store(true, Ordering::Relaxed);
        let (seen, torn) = t.join().unwrap();
        assert_eq!(torn, 0, "{torn} torn entries out of {seen}");
        assert!(seen > 0);
    }

    #[test]
    fn malformed_regions_are_refused() {
        let fd = memfd_create("x", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        ftruncate(&fd, (HEADER + 8 * SLOT) as u64).unwrap();
        assert!(
            matches!(DirectoryReader::open(fd), Err(DirectoryError::Malformed(_))),
            "unsealed"
        );
        let fd = memfd_create("x", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        ftruncate(&fd, (HEADER + 8 * SLOT) as u64).unwrap();
        fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).unwrap();
        assert!(
            matches!(DirectoryReader::open(fd), Err(DirectoryError::Malformed(_))),
            "no magic"
        );
    }

    #[test]
    fn another_version_or_a_lying_slot_count_is_refused() {
        let w = DirectoryWriter::create(16).unwrap();
        assert!(DirectoryReader::open(w.fd().try_clone_to_owned().unwrap()).is_ok());
        w.map
            .words
            .store(header::VERSION, VERSION + 1, Ordering::Relaxed);
        assert!(matches!(
            DirectoryReader::open(w.fd().try_clone_to_owned().unwrap()),
            Err(DirectoryError::Malformed("wrong magic or version"))
        ));
        w.map
            .words
            .store(header::VERSION, VERSION, Ordering::Relaxed);
        w.map.words.store(header::SLOTS, 32, Ordering::Relaxed);
        assert!(matches!(
            DirectoryReader::open(w.fd().try_clone_to_owned().unwrap()),
            Err(DirectoryError::Malformed(_))
        ));
    }
}
