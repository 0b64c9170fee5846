//! The `m2m` suite: one-way latency and throughput of memory-to-memory channels against the
//! physical floor (a cache-line ping-pong), the kernel's IPC (Unix socket, pipe, eventfd) and
//! iceoryx2, between two processes pinned to different cores.
//!
//! The peer is this executable re-run as `m2m-peer`. It connects back over a Unix socket (the
//! control socket), over which the parent also passes fds, and which doubles as the data path of
//! the Unix-socket cases. Every loop on both sides has a deadline, the parent notices a peer
//! that exited, and the peer exits when the parent goes away (`proc::exit_with_parent`).

mod iceoryx;

use crate::proc::{
    exit_with_parent, online_cpus, percentile, pin, recv_fds, send_fds, Watchdog, WAKE,
};
use crate::report::Report;
use iceoryx::{iceoryx2_parent, iceoryx2_peer};
use rustix::fd::{AsFd, OwnedFd};
use splitos_m2m::{Channel, ChannelConfig, Listener, ListenerConfig, Message, WaitPolicy};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MSG: usize = 64;
const BIG: usize = 64 << 10;
/// No single case may take longer than this, on either side.
const CASE_DEADLINE: Duration = Duration::from_secs(30);

pub struct Options {
    pub quick: bool,
}

struct Plan {
    spin_iters: usize,
    block_iters: usize,
    rounds: usize,
    throughput: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                spin_iters: 60_000,
                block_iters: 5_000,
                rounds: 3,
                throughput: Duration::from_secs(1),
            }
        } else {
            Plan {
                spin_iters: 200_000,
                block_iters: 30_000,
                rounds: 5,
                throughput: Duration::from_secs(3),
            }
        }
    }
}

fn deadline_passed(start: Instant) -> bool {
    start.elapsed() > CASE_DEADLINE
}

/// A directory of our own under the temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(case: &str) -> Result<TempDir, String> {
        let dir =
            std::env::temp_dir().join(format!("splitos-bench-m2m-{}-{case}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running peer process and the control connection to it. Dropping it kills and reaps the
/// peer and removes its directory.
struct Peer {
    child: Child,
    ctl: UnixStream,
    _deadline: Watchdog,
    dir: TempDir,
}

impl Peer {
    fn spawn(case: &str, iters: usize) -> Result<Peer, String> {
        let dir = TempDir::new(case)?;
        let listener = UnixListener::bind(dir.0.join("ctl.sock"))
            .map_err(|e| format!("binding the control socket: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args(["m2m-peer", "--case", case, "--dir"])
            .arg(&dir.0)
            .args(["--iters", &iters.to_string()])
            .spawn()
            .map_err(|e| format!("spawning the peer: {e}"))?;
        let connected = (|| {
            let deadline = Watchdog::start(child.id(), None, CASE_DEADLINE)?;
            let start = Instant::now();
            let ctl = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if let Ok(Some(st)) = child.try_wait() {
                            return Err(format!("the peer exited before connecting ({st})"));
                        }
                        if start.elapsed() > Duration::from_secs(10) {
                            return Err("the peer did not connect within 10 s".into());
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => return Err(format!("accepting the peer: {e}")),
                }
            };
            ctl.set_nonblocking(false).map_err(|e| e.to_string())?;
            ctl.set_read_timeout(Some(CASE_DEADLINE))
                .map_err(|e| e.to_string())?;
            Ok((ctl, deadline))
        })();
        match connected {
            Ok((ctl, deadline)) => Ok(Peer {
                child,
                ctl,
                _deadline: deadline,
                dir,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    fn m2m_path(&self) -> PathBuf {
        self.dir.0.join("m2m.sock")
    }

    /// Fails once the case is past its deadline or the peer has exited, for loops that would
    /// otherwise spin on a dead peer until the deadline.
    fn check(&mut self, start: Instant) -> Result<(), String> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Err(format!("the peer exited ({st})"));
        }
        if deadline_passed(start) {
            return Err(format!("no answer within {CASE_DEADLINE:?}"));
        }
        Ok(())
    }

    /// Tells the peer to connect to a fresh m2m listener and returns the parent's end.
    fn m2m_channel(&mut self) -> Result<Channel, String> {
        let listener = Listener::bind(self.m2m_path(), ListenerConfig::default())
            .map_err(|e| e.to_string())?;
        // Non-blocking, so that a peer that dies before connecting cannot hang us in accept.
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        self.ctl.write_all(b"L").map_err(|e| e.to_string())?;
        let start = Instant::now();
        let incoming = loop {
            match listener.accept() {
                Ok(i) => break i,
                Err(splitos_m2m::Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    self.check(start)?;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        if incoming.peer().pid != self.child.id() {
            return Err(format!(
                "pid {} connected instead of the peer",
                incoming.peer().pid
            ));
        }
        incoming.establish().map_err(|e| e.to_string())
    }

    /// Waits for the peer's one-byte "ready".
    fn ready(&mut self) -> Result<(), String> {
        let mut b = [0u8; 1];
        self.ctl
            .read_exact(&mut b)
            .map_err(|e| format!("peer not ready: {e}"))
    }

    fn finish(mut self) -> Result<(), String> {
        let _ = self.ctl.shutdown(std::net::Shutdown::Both);
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(()),
                Ok(Some(st)) => return Err(format!("peer exited with {st}")),
                Ok(None) if start.elapsed() > Duration::from_secs(10) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err("peer did not exit; killed it".into());
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Round-trip samples in ns → (median one-way, p99 one-way).
fn one_way(mut samples: Vec<u64>) -> (f64, f64) {
    samples.sort_unstable();
    (
        percentile(&samples, 0.5) / 2.0,
        percentile(&samples, 0.99) / 2.0,
    )
}

/// Times `iters` round trips and drops the first tenth: each case is a fresh process pair,
/// whose caches, branch predictors and page tables warm up during those.
fn timed(iters: usize, mut rt: impl FnMut(u64) -> Result<(), String>) -> Result<Vec<u64>, String> {
    let mut v = Vec::with_capacity(iters);
    for i in 0..iters {
        let t = Instant::now();
        rt(i as u64 + 1)?;
        v.push(t.elapsed().as_nanos() as u64);
    }
    v.drain(..iters / 10);
    Ok(v)
}

/// Median cost of the clock reads that bracket every sample; it is part of every round trip
/// measured here, so it shrinks the ratios of the fastest cases a little.
fn timer_overhead_ns() -> f64 {
    let mut v: Vec<u64> = (0..10_000)
        .map(|_| Instant::now().elapsed().as_nanos() as u64)
        .collect();
    v.sort_unstable();
    percentile(&v, 0.5)
}

fn shared_lines(fd: &OwnedFd) -> Result<memmap2::MmapRaw, String> {
    memmap2::MmapOptions::new()
        .len(4096)
        .map_raw(fd)
        .map_err(|e| format!("mapping: {e}"))
}

fn line(map: &memmap2::MmapRaw, off: usize) -> &AtomicU64 {
    assert!(off % 128 == 0 && off + 8 <= map.len());
    // SAFETY: the offset is 8-aligned and inside the 4 KiB shared mapping (asserted), which
    // outlives the returned reference (tied to `map`); both processes only access it atomically.
    unsafe { AtomicU64::from_ptr(map.as_mut_ptr().add(off).cast()) }
}

/// Spins until `a` holds `v`, calling `check` now and then (rarely enough not to show in the
/// measurement) so that a dead or stuck peer ends the wait.
fn spin_until(
    a: &AtomicU64,
    v: u64,
    mut check: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let mut n = 0u32;
    while a.load(Ordering::Acquire) != v {
        n = n.wrapping_add(1);
        if n % (1 << 20) == 0 {
            check()?;
        }
        std::hint::spin_loop();
    }
    Ok(())
}

fn deadline_check(start: Instant) -> impl FnMut() -> Result<(), String> {
    move || {
        if deadline_passed(start) {
            Err("the parent stopped answering".into())
        } else {
            Ok(())
        }
    }
}

fn latency_case(case: &str, iters: usize) -> Result<Vec<u64>, String> {
    let mut peer = Peer::spawn(case, iters)?;
    let start = Instant::now();
    let samples = match case {
        "cacheline" => {
            let fd = rustix::fs::memfd_create("splitos-bench", rustix::fs::MemfdFlags::CLOEXEC)
                .map_err(|e| e.to_string())?;
            rustix::fs::ftruncate(&fd, 4096).map_err(|e| e.to_string())?;
            let map = shared_lines(&fd)?;
            send_fds(peer.ctl.as_fd(), &[fd.as_fd()])?;
            let (a, b) = (line(&map, 0), line(&map, 128));
            timed(iters, |i| {
                a.store(i, Ordering::Release);
                spin_until(b, i, || peer.check(start))
            })?
        }
        "unix_socket" => {
            peer.ready()?;
            let mut s = peer.ctl.try_clone().map_err(|e| e.to_string())?;
            let mut buf = [7u8; MSG];
            timed(iters, |_| {
                s.write_all(&buf).map_err(|e| e.to_string())?;
                s.read_exact(&mut buf).map_err(|e| e.to_string())
            })?
        }
        "pipe" => {
            let (p2c_r, p2c_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| e.to_string())?;
            let (c2p_r, c2p_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| e.to_string())?;
            send_fds(peer.ctl.as_fd(), &[p2c_r.as_fd(), c2p_w.as_fd()])?;
            drop((p2c_r, c2p_w));
            let mut w = std::fs::File::from(p2c_w);
            let mut r = std::fs::File::from(c2p_r);
            let mut buf = [7u8; MSG];
            timed(iters, |_| {
                w.write_all(&buf).map_err(|e| e.to_string())?;
                r.read_exact(&mut buf).map_err(|e| e.to_string())
            })?
        }
        "eventfd" => {
            let flags = rustix::event::EventfdFlags::CLOEXEC;
            let a = rustix::event::eventfd(0, flags).map_err(|e| e.to_string())?;
            let b = rustix::event::eventfd(0, flags).map_err(|e| e.to_string())?;
            send_fds(peer.ctl.as_fd(), &[a.as_fd(), b.as_fd()])?;
            let wake = rustix::io::dup(&b).map_err(|e| e.to_string())?;
            let _watchdog = Watchdog::start(peer.child.id(), Some(wake), CASE_DEADLINE)?;
            let mut v = [0u8; 8];
            timed(iters, |_| {
                rustix::io::write(&a, &1u64.to_ne_bytes()).map_err(|e| e.to_string())?;
                rustix::io::read(&b, &mut v).map_err(|e| e.to_string())?;
                if u64::from_ne_bytes(v) % WAKE == 0 {
                    return Err("the peer exited or stopped answering".into());
                }
                Ok(())
            })?
        }
        "iceoryx2" => iceoryx2_parent(&mut peer, iters)?,
        m2m => {
            let policy = policy_of(m2m)?;
            // The peer's exit ends these waits (PeerGone), and the peer is bounded in time.
            let mut ch = peer.m2m_channel()?;
            ch.set_wait_policy(policy);
            let msg = [7u8; MSG];
            timed(iters, |_| {
                ch.send(&msg).map_err(|e| e.to_string())?;
                match ch.recv().map_err(|e| e.to_string())? {
                    Message::Inline(b) if b.len() == MSG => Ok(()),
                    _ => Err("wrong reply".into()),
                }
            })?
        }
    };
    peer.finish()?;
    Ok(samples)
}

fn policy_of(case: &str) -> Result<WaitPolicy, String> {
    match case {
        "m2m_poll" => Ok(WaitPolicy::Poll),
        "m2m_adaptive" => Ok(WaitPolicy::adaptive()),
        "m2m_block" => Ok(WaitPolicy::Block),
        other => Err(format!("unknown case {other}")),
    }
}

// ---- throughput ----

/// A message of `len` bytes (at least 16) filled with a pattern.
fn record(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Stamps `seq` at both ends of a record, so that the reader sees whether all of it arrived.
fn stamp(rec: &mut [u8], seq: u64) {
    let n = rec.len();
    rec[..8].copy_from_slice(&seq.to_le_bytes());
    rec[n - 8..].copy_from_slice(&seq.to_le_bytes());
}

/// The sequence number of a record, if both of its stamps agree.
fn seq_of(rec: &[u8]) -> Option<u64> {
    let n = rec.len();
    let head = rec.get(..8)?;
    let tail = rec.get(n.checked_sub(8)?..)?;
    (head == tail).then(|| {
        let mut s = [0u8; 8];
        s.copy_from_slice(head);
        u64::from_le_bytes(s)
    })
}

/// Returns messages (or bytes) per second received by the parent.
fn throughput_case(case: &str, dur: Duration) -> Result<f64, String> {
    let mut peer = Peer::spawn(case, 0)?;
    let mut expected = 0u64;
    let check = |got: Option<u64>, expected: &mut u64| -> Result<(), String> {
        match got {
            Some(g) if g == *expected => {
                *expected += 1;
                Ok(())
            }
            Some(g) => Err(format!("{case}: got message {g}, expected {}", *expected)),
            None => Err(format!("{case}: message {} arrived torn", *expected)),
        }
    };
    let rate = match case {
        "m2m_64B" | "m2m_64KiB" => {
            let mut ch = peer.m2m_channel()?;
            ch.set_wait_policy(WaitPolicy::Poll);
            let mut local = vec![0u8; BIG];
            let mut err = None;
            let start = Instant::now();
            while start.elapsed() < dur {
                let n = ch
                    .recv_batch(usize::MAX, |m| {
                        let got = match m {
                            Message::Inline(b) => seq_of(b),
                            // Copied out so that every byte is really read, as an application
                            // that keeps the data would.
                            Message::Buffer(rx) => match rx.copy_to(&mut local) {
                                BIG => seq_of(&local),
                                _ => None,
                            },
                        };
                        if let Err(e) = check(got, &mut expected) {
                            err.get_or_insert(e);
                        }
                    })
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    ch.wait_readable(Some(Duration::from_millis(10)))
                        .map_err(|e| e.to_string())?;
                }
            }
            let secs = start.elapsed().as_secs_f64();
            if let Some(e) = err {
                return Err(e);
            }
            let unit = if case == "m2m_64B" { 1.0 } else { BIG as f64 };
            expected as f64 * unit / secs
        }
        "unix_socket_64B" | "unix_socket_64KiB" => {
            peer.ready()?;
            let mut s = peer.ctl.try_clone().map_err(|e| e.to_string())?;
            let rec = if case == "unix_socket_64B" { MSG } else { BIG };
            let mut buf = vec![0u8; BIG.max(rec)];
            let start = Instant::now();
            if rec == MSG {
                let mut carry = 0usize;
                while start.elapsed() < dur {
                    let n = s.read(&mut buf[carry..]).map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("peer closed".into());
                    }
                    let have = carry + n;
                    let whole = have / MSG * MSG;
                    for r in buf[..whole].chunks(MSG) {
                        check(seq_of(r), &mut expected)?;
                    }
                    buf.copy_within(whole..have, 0);
                    carry = have - whole;
                }
            } else {
                while start.elapsed() < dur {
                    s.read_exact(&mut buf[..BIG]).map_err(|e| e.to_string())?;
                    check(seq_of(&buf), &mut expected)?;
                }
            }
            let secs = start.elapsed().as_secs_f64();
            let unit = if rec == MSG { 1.0 } else { BIG as f64 };
            expected as f64 * unit / secs
        }
        other => return Err(format!("unknown case {other}")),
    };
    drop(peer.ctl.shutdown(std::net::Shutdown::Both));
    let _ = peer.finish();
    Ok(rate)
}

// ---- the peer process ----

pub fn peer_main(case: &str, dir: &Path, iters: usize) -> Result<(), String> {
    iceoryx2::prelude::set_log_level(iceoryx2::prelude::LogLevel::Error);
    if online_cpus() >= 2 {
        pin(1);
    }
    let mut ctl =
        UnixStream::connect(dir.join("ctl.sock")).map_err(|e| format!("peer: connecting: {e}"))?;
    ctl.set_read_timeout(Some(CASE_DEADLINE))
        .map_err(|e| e.to_string())?;
    exit_with_parent(&ctl, CASE_DEADLINE + Duration::from_secs(5))?;
    let start = Instant::now();
    match case {
        "cacheline" => {
            let fds = recv_fds(ctl.as_fd())?;
            let fd = fds.first().ok_or("no memfd")?;
            let map = shared_lines(fd)?;
            let (a, b) = (line(&map, 0), line(&map, 128));
            for i in 1..=iters as u64 {
                spin_until(a, i, deadline_check(start))?;
                b.store(i, Ordering::Release);
            }
        }
        "unix_socket" => {
            ctl.write_all(b"R").map_err(|e| e.to_string())?;
            let mut buf = [0u8; MSG];
            for _ in 0..iters {
                ctl.read_exact(&mut buf).map_err(|e| e.to_string())?;
                ctl.write_all(&buf).map_err(|e| e.to_string())?;
            }
        }
        "pipe" => {
            let mut fds = recv_fds(ctl.as_fd())?.into_iter();
            let (Some(r), Some(w)) = (fds.next(), fds.next()) else {
                return Err("expected two pipe ends".into());
            };
            let (mut r, mut w) = (std::fs::File::from(r), std::fs::File::from(w));
            let mut buf = [0u8; MSG];
            for _ in 0..iters {
                r.read_exact(&mut buf).map_err(|e| e.to_string())?;
                w.write_all(&buf).map_err(|e| e.to_string())?;
            }
        }
        "eventfd" => {
            let mut fds = recv_fds(ctl.as_fd())?.into_iter();
            let (Some(a), Some(b)) = (fds.next(), fds.next()) else {
                return Err("expected two eventfds".into());
            };
            let mut v = [0u8; 8];
            for _ in 0..iters {
                rustix::io::read(&a, &mut v).map_err(|e| e.to_string())?;
                rustix::io::write(&b, &1u64.to_ne_bytes()).map_err(|e| e.to_string())?;
            }
        }
        "iceoryx2" => iceoryx2_peer(&mut ctl, iters)?,
        "m2m_poll" | "m2m_adaptive" | "m2m_block" => {
            let mut go = [0u8; 1];
            ctl.read_exact(&mut go).map_err(|e| e.to_string())?;
            let config = ChannelConfig {
                wait: policy_of(case)?,
                ..ChannelConfig::default()
            };
            let mut ch =
                Channel::connect(dir.join("m2m.sock"), config).map_err(|e| e.to_string())?;
            let mut buf = [0u8; MSG];
            for _ in 0..iters {
                match ch.recv().map_err(|e| e.to_string())? {
                    Message::Inline(b) if b.len() == MSG => buf.copy_from_slice(b),
                    _ => return Err("unexpected message".into()),
                }
                ch.send(&buf).map_err(|e| e.to_string())?;
            }
        }
        "m2m_64B" | "m2m_64KiB" => {
            let mut go = [0u8; 1];
            ctl.read_exact(&mut go).map_err(|e| e.to_string())?;
            let config = ChannelConfig {
                wait: WaitPolicy::Poll,
                ..ChannelConfig::default()
            };
            let mut ch =
                Channel::connect(dir.join("m2m.sock"), config).map_err(|e| e.to_string())?;
            let mut seq = 0u64;
            let mut msg = record(if case == "m2m_64B" { MSG } else { BIG });
            // Until the parent hangs up (PeerGone) or the deadline.
            while !deadline_passed(start) {
                let r: Result<(), splitos_m2m::Error> = if case == "m2m_64B" {
                    let mut batch = ch.send_batch();
                    let mut pushed = 0;
                    loop {
                        stamp(&mut msg, seq);
                        match batch.try_push(&msg) {
                            Ok(true) => {
                                seq += 1;
                                pushed += 1;
                            }
                            Ok(false) => break,
                            Err(e) => return peer_end(e),
                        }
                    }
                    batch.publish();
                    if pushed == 0 {
                        ch.wait_writable(MSG, Some(Duration::from_millis(100)))
                            .map(|_| ())
                    } else {
                        Ok(())
                    }
                } else {
                    match ch.alloc_buffer_wait(Some(Duration::from_millis(100))) {
                        Ok(Some(mut b)) => {
                            stamp(&mut msg, seq);
                            b.write(0, &msg)
                                .and_then(|_| ch.send_buffer(b, BIG))
                                .map(|_| seq += 1)
                        }
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    }
                };
                if let Err(e) = r {
                    return peer_end(e);
                }
            }
        }
        "unix_socket_64B" | "unix_socket_64KiB" => {
            ctl.write_all(b"R").map_err(|e| e.to_string())?;
            let len = if case == "unix_socket_64B" { MSG } else { BIG };
            let mut msg = record(len);
            let mut seq = 0u64;
            while !deadline_passed(start) {
                stamp(&mut msg, seq);
                // One write(2) per message: what a message-at-a-time user of a socket pays.
                if ctl.write_all(&msg).is_err() {
                    return Ok(()); // the parent hung up: done
                }
                seq += 1;
            }
        }
        other => return Err(format!("unknown case {other}")),
    }
    Ok(())
}

/// The parent hanging up ends a throughput case normally.
fn peer_end(e: splitos_m2m::Error) -> Result<(), String> {
    match e {
        splitos_m2m::Error::PeerGone => Ok(()),
        other => Err(other.to_string()),
    }
}

// ---- the suite ----

/// Runs a case; if it failed at its deadline, says so, since the error the parent saw is then
/// only the consequence (the watchdog killed the peer).
fn explain_deadline<T>(
    start: Instant,
    case: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    case().map_err(|e| {
        if start.elapsed() >= CASE_DEADLINE {
            format!("{e} (the case reached its {CASE_DEADLINE:?} deadline and the peer was killed)")
        } else {
            e
        }
    })
}

pub fn run(opts: &Options) -> Report {
    let plan = Plan::new(opts.quick);
    let mut report = Report::new("m2m");
    iceoryx2::prelude::set_log_level(iceoryx2::prelude::LogLevel::Error);
    let cpus = online_cpus();
    if cpus < 2 {
        report.note("only 1 CPU: the two processes are not pinned and share it");
    } else if pin(0) {
        report.note("parent pinned to CPU 0, peer to CPU 1");
    } else {
        report.note("could not pin the parent to CPU 0: processes not pinned");
    }
    report.note(format!(
        "one-way latency = median (p99 in details) of per-iteration round trip / 2, including \
         ~{:.0} ns of clock reads per round trip",
        timer_overhead_ns()
    ));
    // Spin cases are interleaved over several rounds so that a change in where the hypervisor
    // places the two vCPUs affects every case alike; samples are pooled per case.
    let spin_cases = ["cacheline", "m2m_poll", "m2m_adaptive", "iceoryx2"];
    let block_cases = ["m2m_block", "unix_socket", "pipe", "eventfd"];
    let mut pooled: Vec<(&str, Vec<u64>)> = Vec::new();
    for round in 0..plan.rounds {
        for case in spin_cases.iter().chain(block_cases.iter()) {
            let is_block = block_cases.contains(case);
            if is_block && round > 0 {
                continue; // kernel wake-ups dominate these; one round is plenty
            }
            let iters = if is_block {
                plan.block_iters
            } else {
                plan.spin_iters / plan.rounds
            };
            eprint!("m2m: {case} (round {}) ... ", round + 1);
            match explain_deadline(Instant::now(), || latency_case(case, iters)) {
                Ok(s) => {
                    let (med, _) = one_way(s.clone());
                    eprintln!("{med:.0} ns one-way");
                    match pooled.iter_mut().find(|(n, _)| n == case) {
                        Some((_, v)) => v.extend(s),
                        None => pooled.push((case, s)),
                    }
                }
                Err(e) => {
                    eprintln!("FAILED: {e}");
                    report.note(format!("{case} failed: {e}"));
                }
            }
        }
    }
    for (case, s) in pooled {
        let (med, p99) = one_way(s);
        report.add(case, "one_way_ns", med);
        report.detail(case, "one_way_p99_ns", p99);
    }
    for case in [
        "m2m_64B",
        "unix_socket_64B",
        "m2m_64KiB",
        "unix_socket_64KiB",
    ] {
        eprint!("m2m: {case} ... ");
        match explain_deadline(Instant::now(), || throughput_case(case, plan.throughput)) {
            Ok(rate) => {
                let metric = if case.ends_with("64B") {
                    "msgs_per_s"
                } else {
                    "bytes_per_s"
                };
                eprintln!("{rate:.0} {metric}");
                report.add(case, metric, rate);
            }
            Err(e) => {
                eprintln!("FAILED: {e}");
                report.note(format!("{case} failed: {e}"));
            }
        }
    }
    for name in [
        "m2m_poll",
        "m2m_adaptive",
        "m2m_block",
        "unix_socket",
        "pipe",
        "eventfd",
        "iceoryx2",
    ] {
        report.ratio("one_way_ns", name, "cacheline");
    }
    report.ratio("one_way_ns", "m2m_poll", "iceoryx2");
    report.ratio("one_way_ns", "m2m_adaptive", "m2m_poll");
    report.ratio("msgs_per_s", "m2m_64B", "unix_socket_64B");
    report.ratio("bytes_per_s", "m2m_64KiB", "unix_socket_64KiB");
    report.target("one_way_ns", "m2m_poll", "cacheline", 1.5, true);
    report.target("one_way_ns", "m2m_poll", "iceoryx2", 1.0, true);
    report.target("one_way_ns", "m2m_adaptive", "m2m_poll", 1.5, true);
    report.target("msgs_per_s", "m2m_64B", "unix_socket_64B", 20.0, false);
    report.target("bytes_per_s", "m2m_64KiB", "unix_socket_64KiB", 3.0, false);
    report
}
