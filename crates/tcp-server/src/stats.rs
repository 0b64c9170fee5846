//! The statistics region: a file of fixed-layout counters that workers update about ten times a
//! second and that `splitos status` maps read-only — no request to the server, so looking never
//! disturbs it.
//!
//! Each row is guarded by a sequence counter (odd while being written): a reader retries until
//! it sees the same even value before and after copying the row, so it never shows a torn row.
//! Readers treat the file as untrusted input: offsets come from the constants below, and values
//! are only ever displayed.
//!
//! ```text
//! 0        header: magic "SPOSSTAT" | version | workers | sessions per worker | pid | started (unix ms)
//! 4096     MAX_WORKERS worker rows of 128 B: seq | busy ns | sessions | conns | listeners | bytes in | bytes out | updated (unix ms)
//! 4096+W   session rows of 192 B: seq | in use | worker | pid | uid | conns | listeners | bytes in | bytes out
//!          | event-ring bytes used | event-ring size | events queued | name (64 B)
//! ```

use rustix::fd::AsFd;
use serde::Serialize;
use splitos_m2m::seqlock::SharedWords;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MAGIC: u64 = u64::from_le_bytes(*b"SPOSSTAT");
const VERSION: u64 = 1;
pub const MAX_WORKERS: usize = 16;
pub const SESSIONS_PER_WORKER: usize = 1024;
const WORKER_BASE: usize = 4096;
const WORKER_ROW: usize = 128;
const SESSION_BASE: usize = WORKER_BASE + MAX_WORKERS * WORKER_ROW;
const SESSION_ROW: usize = 192;
const NAME_AT: usize = 12 * 8;
const NAME_BYTES: usize = 64;
const FILE_BYTES: usize = SESSION_BASE + MAX_WORKERS * SESSIONS_PER_WORKER * SESSION_ROW;

/// Where the statistics of the server listening on `socket` live.
pub fn stats_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".stats");
    PathBuf::from(p)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Attempts a reader makes at copying a row before it skips it.
const READ_TRIES: usize = 1000;

struct Map {
    words: SharedWords,
}

impl Map {
    fn get(&self, off: usize) -> u64 {
        self.words.load(off, Ordering::Relaxed)
    }
    fn set(&self, off: usize, v: u64) {
        self.words.store(off, v, Ordering::Relaxed)
    }

    /// Writes a row under its sequence counter.
    fn write_row(&self, base: usize, values: &[u64]) {
        self.words.write_record(base, values)
    }

    /// Copies `n` words of a row (after its sequence word) consistently.
    fn read_row(&self, base: usize, n: usize) -> Option<Vec<u64>> {
        let mut v = vec![0; n];
        self.words
            .read_record(base, &mut v, READ_TRIES)
            .then_some(v)
    }
}

/// The server's side: creates the file and updates rows.
pub struct StatsWriter {
    map: Map,
    path: PathBuf,
}

pub struct SessionRow<'a> {
    pub worker: u32,
    pub pid: u32,
    pub uid: u32,
    pub name: &'a str,
    pub conns: u32,
    pub listeners: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub ring_used: u64,
    pub ring_size: u64,
    pub outbox: u64,
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
        let map = Map {
            words: SharedWords::map_writable(file.as_fd(), FILE_BYTES)?,
        };
        map.set(8, VERSION);
        map.set(16, workers as u64);
        map.set(24, SESSIONS_PER_WORKER as u64);
        map.set(32, std::process::id() as u64);
        map.set(40, unix_ms());
        map.words.store(0, MAGIC, Ordering::Release);
        Ok(StatsWriter { map, path })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn update_worker(
        &self,
        worker: usize,
        busy: Duration,
        sessions: u64,
        conns: u64,
        listeners: u64,
        bytes_in: u64,
        bytes_out: u64,
        direct: u64,
    ) {
        if worker >= MAX_WORKERS {
            return;
        }
        self.map.write_row(
            WORKER_BASE + worker * WORKER_ROW,
            &[
                busy.as_nanos() as u64,
                sessions,
                conns,
                listeners,
                bytes_in,
                bytes_out,
                unix_ms(),
                direct,
            ],
        );
    }

    pub fn update_session(&self, slot: usize, r: &SessionRow<'_>) {
        if slot >= MAX_WORKERS * SESSIONS_PER_WORKER {
            return;
        }
        let base = SESSION_BASE + slot * SESSION_ROW;
        let mut name = [0u8; NAME_BYTES];
        let n = r.name.len().min(NAME_BYTES);
        name[..n].copy_from_slice(&r.name.as_bytes()[..n]);
        let mut words = vec![
            1,
            r.worker as u64,
            r.pid as u64,
            r.uid as u64,
            r.conns as u64,
            r.listeners as u64,
            r.bytes_in,
            r.bytes_out,
            r.ring_used,
            r.ring_size,
            r.outbox,
        ];
        words.extend(name.chunks(8).map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        }));
        self.map.write_row(base, &words);
    }

    pub fn clear_session(&self, slot: usize) {
        if slot >= MAX_WORKERS * SESSIONS_PER_WORKER {
            return;
        }
        let base = SESSION_BASE + slot * SESSION_ROW;
        if self.map.get(base + 8) != 0 {
            self.map.write_row(base, &[0]);
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
    let map = Map {
        words: SharedWords::map_read_only(file.as_fd(), FILE_BYTES).map_err(open_err)?,
    };
    if map.words.load(0, Ordering::Acquire) != MAGIC || map.get(8) != VERSION {
        return Err(StatsError::Format(path));
    }
    let nworkers = (map.get(16) as usize).min(MAX_WORKERS);
    let mut workers = Vec::new();
    for w in 0..nworkers {
        if let Some(v) = map.read_row(WORKER_BASE + w * WORKER_ROW, 8) {
            workers.push(WorkerStats {
                worker: w,
                busy_ms: v[0] / 1_000_000,
                sessions: v[1],
                connections: v[2],
                listeners: v[3],
                bytes_in: v[4],
                bytes_out: v[5],
                updated_unix_ms: v[6],
                direct_responses: v[7],
            });
        }
    }
    let mut sessions = Vec::new();
    for slot in 0..nworkers * SESSIONS_PER_WORKER {
        let base = SESSION_BASE + slot * SESSION_ROW;
        if map.get(base + 8) == 0 {
            continue;
        }
        let Some(v) = map.read_row(base, 11 + NAME_BYTES / 8) else {
            continue;
        };
        if v[0] == 0 {
            continue;
        }
        let name_bytes: Vec<u8> = v[11..].iter().flat_map(|w| w.to_le_bytes()).collect();
        let name = String::from_utf8_lossy(&name_bytes)
            .trim_end_matches('\0')
            .to_string();
        debug_assert_eq!(NAME_AT, 12 * 8);
        sessions.push(SessionStats {
            worker: v[1],
            pid: v[2],
            uid: v[3],
            name,
            connections: v[4],
            listeners: v[5],
            bytes_in: v[6],
            bytes_out: v[7],
            event_ring_used: v[8],
            event_ring_size: v[9],
            events_queued: v[10],
        });
    }
    Ok(Snapshot {
        server_pid: map.get(32),
        started_unix_ms: map.get(40),
        workers,
        sessions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_written_are_read_back() {
        let dir = std::env::temp_dir().join(format!("stats-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("tcp.sock");
        let w = StatsWriter::create(&sock, 2).unwrap();
        w.update_worker(1, Duration::from_millis(1500), 1, 7, 2, 100, 200, 9);
        w.update_session(
            SESSIONS_PER_WORKER + 3,
            &SessionRow {
                worker: 1,
                pid: 42,
                uid: 1000,
                name: "echo-app",
                conns: 7,
                listeners: 2,
                bytes_in: 100,
                bytes_out: 200,
                ring_used: 64,
                ring_size: 262144,
                outbox: 0,
            },
        );
        let s = read(&sock).unwrap();
        assert_eq!(s.workers.len(), 2);
        assert_eq!(s.workers[1].busy_ms, 1500);
        assert_eq!(s.workers[1].connections, 7);
        assert_eq!(s.workers[1].direct_responses, 9);
        assert_eq!(s.sessions.len(), 1);
        assert_eq!(s.sessions[0].name, "echo-app");
        assert_eq!(s.sessions[0].pid, 42);
        assert_eq!(s.sessions[0].event_ring_size, 262144);
        w.clear_session(SESSIONS_PER_WORKER + 3);
        assert!(read(&sock).unwrap().sessions.is_empty());
        drop(w);
        assert!(matches!(read(&sock), Err(StatsError::Open { .. })));
    }
}
