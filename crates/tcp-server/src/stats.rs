//! The statistics region: a file of fixed-layout counters that workers update about ten times a
//! second and that `splitos status` maps read-only — no request to the server, so looking never
//! disturbs it.
//!
//! This file is the whole contract: the [`Header`], a worker's row ([`WorkerRow`]) and a
//! session's ([`SessionRow`]) are `#[repr(C)]` structs whose field offsets (`offset_of!`) place
//! every word, pinned by `const _` assertions. They are never used in place: each row is a
//! seqlock record (`splitos_m2m::seqlock`, sequence word odd while written), so a reader copies
//! the words and never shows a torn row, then parses them into the same struct. Readers treat
//! the file as untrusted input: offsets come from the constants below, and values are only ever
//! displayed.
//!
//! ```text
//! 0      Header (4096 B): magic "SPOSSTAT" | version | workers | sessions per worker | pid |
//!        started (unix ms)
//! 4096   MAX_WORKERS worker slots of 128 B: seq | WorkerRow: busy ns | sessions | conns |
//!        listeners | bytes in | bytes out | updated (unix ms) | direct responses
//! 6144   MAX_WORKERS × SESSIONS_PER_WORKER session slots of 192 B: seq | in use | SessionRow:
//!        worker | pid | uid | conns | listeners | bytes in | bytes out | event-ring bytes used |
//!        event-ring size | events queued | name (64 B, UTF-8, NUL-padded)
//! ```

use core::mem::{offset_of, size_of};
use rustix::fd::AsFd;
use serde::Serialize;
use splitos_m2m::seqlock::SharedWords;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

/// "SPOSSTAT" in little-endian byte order.
const MAGIC: u64 = u64::from_le_bytes(*b"SPOSSTAT");
/// Bumped on any change to the layout below. 2: worker rows end with `direct_responses`
/// (version 1 files were written both with and without it).
const VERSION: u64 = 2;
pub const MAX_WORKERS: usize = 16;
pub const SESSIONS_PER_WORKER: usize = 1024;
/// Where the worker slots start: the header, padded to a page.
const WORKER_BASE: usize = 4096;
/// Bytes per worker slot: a [`WorkerRecord`], padded.
const WORKER_SLOT: usize = 128;
const SESSION_BASE: usize = WORKER_BASE + MAX_WORKERS * WORKER_SLOT;
/// Bytes per session slot: a [`SessionRecord`], padded.
const SESSION_SLOT: usize = 192;
/// Bytes of a session's name; longer names are cut.
pub const NAME_BYTES: usize = 64;
const FILE_BYTES: usize = SESSION_BASE + MAX_WORKERS * SESSIONS_PER_WORKER * SESSION_SLOT;
/// Attempts a reader makes at copying a row before it skips it.
const READ_TRIES: usize = 1000;

/// The file's first page. Written once, before the magic is stored (last, with release).
#[repr(C)]
struct Header {
    magic: u64,
    version: u64,
    /// Worker rows in use (at most [`MAX_WORKERS`]).
    workers: u64,
    sessions_per_worker: u64,
    /// The TCP server's process id.
    pid: u64,
    started_unix_ms: u64,
}

/// Byte offsets of the header words.
mod header {
    use super::{offset_of, Header};
    pub const MAGIC: usize = offset_of!(Header, magic);
    pub const VERSION: usize = offset_of!(Header, version);
    pub const WORKERS: usize = offset_of!(Header, workers);
    pub const SESSIONS_PER_WORKER: usize = offset_of!(Header, sessions_per_worker);
    pub const PID: usize = offset_of!(Header, pid);
    pub const STARTED: usize = offset_of!(Header, started_unix_ms);
}

/// What one worker thread publishes, each housekeeping pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerRow {
    /// Time spent working (not waiting) since the worker started.
    pub busy_ns: u64,
    /// Live sessions (applications) on this worker.
    pub sessions: u64,
    pub conns: u64,
    pub listeners: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// When the row was written ([`unix_ms`]).
    pub updated_unix_ms: u64,
    /// Requests answered by this thread itself (the direct path), not by an application.
    pub direct_responses: u64,
}

/// What a worker publishes for one session (one application channel).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionRow {
    pub worker: u64,
    pub pid: u64,
    pub uid: u64,
    pub conns: u64,
    pub listeners: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Bytes of the session's event ring not yet read by the application.
    pub ring_used: u64,
    pub ring_size: u64,
    /// Events waiting in the server because the ring was full.
    pub outbox: u64,
    /// The name the application gave in its hello ([`SessionRow::name_field`]).
    pub name: [u8; NAME_BYTES],
}

/// A worker slot: the seqlock's sequence word, then the row.
#[repr(C)]
struct WorkerRecord {
    seq: u64,
    row: WorkerRow,
}

/// A session slot: the sequence word, whether the slot holds a session, then the row.
#[repr(C)]
struct SessionRecord {
    seq: u64,
    /// Nonzero while a session is published here; clearing writes only this word.
    in_use: u64,
    row: SessionRow,
}

/// Words after a record's sequence word: what the seqlock record carries.
const WORKER_VALUES: usize = (size_of::<WorkerRecord>() - 8) / 8;
const SESSION_VALUES: usize = (size_of::<SessionRecord>() - 8) / 8;
/// Index of the word at byte `offset` of a row among the row's words.
const fn word(offset: usize) -> usize {
    offset / 8
}
/// Where a session row's words start among its record's values (after `in_use`).
const SESSION_ROW_AT: usize = word(offset_of!(SessionRecord, row)) - 1;

// The contract in numbers: changing any of these changes bytes `splitos status` of another
// build reads (bump VERSION).
const _: () = {
    assert!(size_of::<Header>() <= WORKER_BASE);
    assert!(header::MAGIC == 0 && header::VERSION == 8 && header::WORKERS == 16);
    assert!(header::SESSIONS_PER_WORKER == 24 && header::PID == 32 && header::STARTED == 40);
    assert!(offset_of!(WorkerRecord, seq) == 0 && offset_of!(WorkerRecord, row) == 8);
    assert!(size_of::<WorkerRow>() == 8 * 8 && size_of::<WorkerRecord>() <= WORKER_SLOT);
    assert!(offset_of!(WorkerRow, updated_unix_ms) == 6 * 8);
    assert!(offset_of!(WorkerRow, direct_responses) == 7 * 8);
    assert!(offset_of!(SessionRecord, seq) == 0 && offset_of!(SessionRecord, in_use) == 8);
    assert!(offset_of!(SessionRecord, row) == 16);
    assert!(offset_of!(SessionRow, outbox) == 9 * 8 && offset_of!(SessionRow, name) == 10 * 8);
    assert!(size_of::<SessionRow>() == 10 * 8 + NAME_BYTES && NAME_BYTES % 8 == 0);
    assert!(size_of::<SessionRecord>() <= SESSION_SLOT);
    assert!(WORKER_VALUES == 8 && SESSION_VALUES == 1 + 10 + NAME_BYTES / 8);
    assert!(WORKER_BASE % 8 == 0 && SESSION_BASE % 8 == 0);
};

impl WorkerRow {
    /// The row as the words it occupies, each at its field's offset.
    fn to_words(self) -> [u64; WORKER_VALUES] {
        let mut w = [0; WORKER_VALUES];
        w[word(offset_of!(WorkerRow, busy_ns))] = self.busy_ns;
        w[word(offset_of!(WorkerRow, sessions))] = self.sessions;
        w[word(offset_of!(WorkerRow, conns))] = self.conns;
        w[word(offset_of!(WorkerRow, listeners))] = self.listeners;
        w[word(offset_of!(WorkerRow, bytes_in))] = self.bytes_in;
        w[word(offset_of!(WorkerRow, bytes_out))] = self.bytes_out;
        w[word(offset_of!(WorkerRow, updated_unix_ms))] = self.updated_unix_ms;
        w[word(offset_of!(WorkerRow, direct_responses))] = self.direct_responses;
        w
    }

    fn from_words(w: &[u64; WORKER_VALUES]) -> WorkerRow {
        WorkerRow {
            busy_ns: w[word(offset_of!(WorkerRow, busy_ns))],
            sessions: w[word(offset_of!(WorkerRow, sessions))],
            conns: w[word(offset_of!(WorkerRow, conns))],
            listeners: w[word(offset_of!(WorkerRow, listeners))],
            bytes_in: w[word(offset_of!(WorkerRow, bytes_in))],
            bytes_out: w[word(offset_of!(WorkerRow, bytes_out))],
            updated_unix_ms: w[word(offset_of!(WorkerRow, updated_unix_ms))],
            direct_responses: w[word(offset_of!(WorkerRow, direct_responses))],
        }
    }
}

impl SessionRow {
    /// `name` as the row stores it: UTF-8, cut at [`NAME_BYTES`] (at a character boundary), NUL-padded.
    pub fn name_field(name: &str) -> [u8; NAME_BYTES] {
        let mut n = name.len().min(NAME_BYTES);
        while !name.is_char_boundary(n) {
            n -= 1;
        }
        let mut f = [0u8; NAME_BYTES];
        f[..n].copy_from_slice(&name.as_bytes()[..n]);
        f
    }

    /// The stored name, with anything that is not UTF-8 replaced.
    pub fn name(&self) -> String {
        String::from_utf8_lossy(&self.name)
            .trim_end_matches('\0')
            .to_string()
    }

    /// The row's words, written into `w` (which has exactly the row's size).
    fn to_words(self, w: &mut [u64]) {
        w[word(offset_of!(SessionRow, worker))] = self.worker;
        w[word(offset_of!(SessionRow, pid))] = self.pid;
        w[word(offset_of!(SessionRow, uid))] = self.uid;
        w[word(offset_of!(SessionRow, conns))] = self.conns;
        w[word(offset_of!(SessionRow, listeners))] = self.listeners;
        w[word(offset_of!(SessionRow, bytes_in))] = self.bytes_in;
        w[word(offset_of!(SessionRow, bytes_out))] = self.bytes_out;
        w[word(offset_of!(SessionRow, ring_used))] = self.ring_used;
        w[word(offset_of!(SessionRow, ring_size))] = self.ring_size;
        w[word(offset_of!(SessionRow, outbox))] = self.outbox;
        let name = &mut w[word(offset_of!(SessionRow, name))..];
        for (dst, bytes) in name.iter_mut().zip(self.name.chunks(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            *dst = u64::from_le_bytes(b);
        }
    }

    fn from_words(w: &[u64]) -> SessionRow {
        let mut name = [0u8; NAME_BYTES];
        let name_words = &w[word(offset_of!(SessionRow, name))..];
        for (bytes, src) in name.chunks_mut(8).zip(name_words) {
            bytes.copy_from_slice(&src.to_le_bytes());
        }
        SessionRow {
            worker: w[word(offset_of!(SessionRow, worker))],
            pid: w[word(offset_of!(SessionRow, pid))],
            uid: w[word(offset_of!(SessionRow, uid))],
            conns: w[word(offset_of!(SessionRow, conns))],
            listeners: w[word(offset_of!(SessionRow, listeners))],
            bytes_in: w[word(offset_of!(SessionRow, bytes_in))],
            bytes_out: w[word(offset_of!(SessionRow, bytes_out))],
            ring_used: w[word(offset_of!(SessionRow, ring_used))],
            ring_size: w[word(offset_of!(SessionRow, ring_size))],
            outbox: w[word(offset_of!(SessionRow, outbox))],
            name,
        }
    }
}

/// Where the statistics of the server listening on `socket` live.
pub fn stats_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".stats");
    PathBuf::from(p)
}

/// Wall-clock milliseconds, for [`WorkerRow::updated_unix_ms`] and the header.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn worker_slot(worker: usize) -> usize {
    WORKER_BASE + worker * WORKER_SLOT
}

fn session_slot(slot: usize) -> usize {
    SESSION_BASE + slot * SESSION_SLOT
}

/// The server's side: creates the file and updates rows.
pub struct StatsWriter {
    words: SharedWords,
    path: PathBuf,
}

impl StatsWriter {
    pub fn create(socket: &Path, workers: usize) -> io::Result<StatsWriter> {
        let path = stats_path(socket);
        let _ = std::fs::remove_file(&path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        file.set_len(FILE_BYTES as u64)?;
        let words = SharedWords::map_writable(file.as_fd(), FILE_BYTES)?;
        let set = |off, v| words.store(off, v, Ordering::Relaxed);
        set(header::VERSION, VERSION);
        set(header::WORKERS, workers as u64);
        set(header::SESSIONS_PER_WORKER, SESSIONS_PER_WORKER as u64);
        set(header::PID, std::process::id() as u64);
        set(header::STARTED, unix_ms());
        // Last, with release: a reader that sees the magic sees the header.
        words.store(header::MAGIC, MAGIC, Ordering::Release);
        Ok(StatsWriter { words, path })
    }

    /// Publishes worker `worker`'s row (ignored past [`MAX_WORKERS`]).
    pub fn update_worker(&self, worker: usize, row: &WorkerRow) {
        if worker >= MAX_WORKERS {
            return;
        }
        self.words
            .write_record(worker_slot(worker), &row.to_words());
    }

    /// Publishes the session in `slot` (worker × [`SESSIONS_PER_WORKER`] + index).
    pub fn update_session(&self, slot: usize, row: &SessionRow) {
        if slot >= MAX_WORKERS * SESSIONS_PER_WORKER {
            return;
        }
        let mut values = [0u64; SESSION_VALUES];
        values[0] = 1; // in use
        row.to_words(&mut values[SESSION_ROW_AT..]);
        self.words.write_record(session_slot(slot), &values);
    }

    /// Marks `slot` empty (writing only its in-use word), if it is not already.
    pub fn clear_session(&self, slot: usize) {
        if slot >= MAX_WORKERS * SESSIONS_PER_WORKER {
            return;
        }
        let base = session_slot(slot);
        let in_use = base + offset_of!(SessionRecord, in_use);
        if self.words.load(in_use, Ordering::Relaxed) != 0 {
            self.words.write_record(base, &[0]);
        }
    }
}

impl Drop for StatsWriter {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerStats {
    pub worker: usize,
    pub busy_ms: u64,
    pub sessions: u64,
    pub connections: u64,
    pub listeners: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub updated_unix_ms: u64,
    /// Requests answered by this thread itself (the direct path), not by an application.
    pub direct_responses: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionStats {
    pub worker: u64,
    pub pid: u64,
    pub uid: u64,
    pub name: String,
    pub connections: u64,
    pub listeners: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub event_ring_used: u64,
    pub event_ring_size: u64,
    pub events_queued: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub server_pid: u64,
    pub started_unix_ms: u64,
    pub workers: Vec<WorkerStats>,
    pub sessions: Vec<SessionStats>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("cannot open {path}: {source} (is the TCP server running with this socket?)")]
    Open { path: PathBuf, source: io::Error },
    #[error("{0} is not a Split-OS statistics file of a version this tool understands")]
    Format(PathBuf),
}

/// Reads a consistent snapshot of the server's statistics.
pub fn read(socket: &Path) -> Result<Snapshot, StatsError> {
    let path = stats_path(socket);
    let open_err = |source| StatsError::Open {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(open_err)?;
    let len = file.metadata().map_err(open_err)?.len();
    if len != FILE_BYTES as u64 {
        return Err(StatsError::Format(path));
    }
    let words = SharedWords::map_read_only(file.as_fd(), FILE_BYTES).map_err(open_err)?;
    let get = |off| words.load(off, Ordering::Relaxed);
    if words.load(header::MAGIC, Ordering::Acquire) != MAGIC || get(header::VERSION) != VERSION {
        return Err(StatsError::Format(path));
    }
    let nworkers = (get(header::WORKERS) as usize).min(MAX_WORKERS);
    let mut workers = Vec::new();
    for w in 0..nworkers {
        let mut v = [0u64; WORKER_VALUES];
        if !words.read_record(worker_slot(w), &mut v, READ_TRIES) {
            continue;
        }
        let row = WorkerRow::from_words(&v);
        workers.push(WorkerStats {
            worker: w,
            busy_ms: row.busy_ns / 1_000_000,
            sessions: row.sessions,
            connections: row.conns,
            listeners: row.listeners,
            bytes_in: row.bytes_in,
            bytes_out: row.bytes_out,
            updated_unix_ms: row.updated_unix_ms,
            direct_responses: row.direct_responses,
        });
    }
    let mut sessions = Vec::new();
    for slot in 0..nworkers * SESSIONS_PER_WORKER {
        let base = session_slot(slot);
        // A cheap look first: most slots are empty.
        if get(base + offset_of!(SessionRecord, in_use)) == 0 {
            continue;
        }
        let mut v = [0u64; SESSION_VALUES];
        if !words.read_record(base, &mut v, READ_TRIES) || v[0] == 0 {
            continue;
        }
        let row = SessionRow::from_words(&v[SESSION_ROW_AT..]);
        sessions.push(SessionStats {
            worker: row.worker,
            pid: row.pid,
            uid: row.uid,
            name: row.name(),
            connections: row.conns,
            listeners: row.listeners,
            bytes_in: row.bytes_in,
            bytes_out: row.bytes_out,
            event_ring_used: row.ring_used,
            event_ring_size: row.ring_size,
            events_queued: row.outbox,
        });
    }
    Ok(Snapshot {
        server_pid: get(header::PID),
        started_unix_ms: get(header::STARTED),
        workers,
        sessions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_session() -> SessionRow {
        SessionRow {
            worker: 1,
            pid: 42,
            uid: 1000,
            conns: 7,
            listeners: 2,
            bytes_in: 100,
            bytes_out: 200,
            ring_used: 64,
            ring_size: 262144,
            outbox: 3,
            name: SessionRow::name_field("echo-app"),
        }
    }

    #[test]
    fn rows_written_are_read_back() {
        let dir = std::env::temp_dir().join(format!("stats-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("tcp.sock");
        let w = StatsWriter::create(&sock, 2).unwrap();
        w.update_worker(
            1,
            &WorkerRow {
                busy_ns: 1_500_000_000,
                sessions: 1,
                conns: 7,
                listeners: 2,
                bytes_in: 100,
                bytes_out: 200,
                updated_unix_ms: 12345,
                direct_responses: 9,
            },
        );
        w.update_session(SESSIONS_PER_WORKER + 3, &sample_session());
        let s = read(&sock).unwrap();
        assert_eq!(s.server_pid, std::process::id() as u64);
        assert_eq!(s.workers.len(), 2);
        assert_eq!(s.workers[1].busy_ms, 1500);
        assert_eq!(s.workers[1].connections, 7);
        assert_eq!(s.workers[1].updated_unix_ms, 12345);
        assert_eq!(s.workers[1].direct_responses, 9);
        assert_eq!(s.sessions.len(), 1);
        assert_eq!(s.sessions[0].name, "echo-app");
        assert_eq!(s.sessions[0].pid, 42);
        assert_eq!(s.sessions[0].event_ring_size, 262144);
        assert_eq!(s.sessions[0].events_queued, 3);
        w.clear_session(SESSIONS_PER_WORKER + 3);
        assert!(read(&sock).unwrap().sessions.is_empty());
        drop(w);
        assert!(matches!(read(&sock), Err(StatsError::Open { .. })));
    }

    /// Each field's word is the one its offset in the struct names: the words are the struct's
    /// memory image, not a hand-kept order.
    #[test]
    fn rows_are_their_structs_word_for_word() {
        let row = WorkerRow {
            busy_ns: 1,
            sessions: 2,
            conns: 3,
            listeners: 4,
            bytes_in: 5,
            bytes_out: 6,
            updated_unix_ms: 7,
            direct_responses: 8,
        };
        assert_eq!(row.to_words(), [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(WorkerRow::from_words(&row.to_words()), row);

        let s = sample_session();
        let mut v = [0u64; SESSION_VALUES - SESSION_ROW_AT];
        s.to_words(&mut v);
        assert_eq!(v[..10], [1, 42, 1000, 7, 2, 100, 200, 64, 262144, 3]);
        assert_eq!(v[10], u64::from_le_bytes(*b"echo-app"));
        assert_eq!(SessionRow::from_words(&v), s);
    }

    #[test]
    fn names_are_cut_at_a_character_and_read_back_lossily() {
        let long = format!("{}é", "x".repeat(NAME_BYTES - 1));
        let f = SessionRow::name_field(&long);
        let row = SessionRow {
            name: f,
            ..sample_session()
        };
        assert_eq!(row.name(), "x".repeat(NAME_BYTES - 1));
        let mut junk = [0u8; NAME_BYTES];
        junk[..3].copy_from_slice(&[b'a', 0xff, b'b']);
        let row = SessionRow {
            name: junk,
            ..sample_session()
        };
        assert_eq!(row.name(), "a\u{fffd}b");
    }

    #[test]
    fn a_file_of_another_version_is_refused() {
        let dir = std::env::temp_dir().join(format!("stats-version-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("tcp.sock");
        let w = StatsWriter::create(&sock, 1).unwrap();
        assert!(read(&sock).is_ok());
        w.words.store(header::VERSION, 1, Ordering::Relaxed);
        assert!(matches!(read(&sock), Err(StatsError::Format(_))));
    }
}
