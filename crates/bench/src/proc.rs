//! Helpers for two-process measurements: re-spawning this executable as the peer, pinning each
//! side to its own core, passing file descriptors over a Unix socket, and the watchdogs that keep
//! either side from waiting forever on the other.

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::fd::{BorrowedFd, OwnedFd};
use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Waits up to `grace` for a child that was asked to stop (a signal, its stdin closed), then
/// kills it; either way it is reaped.
pub fn reap_within(child: &mut std::process::Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Pins the calling thread to `cpu` if the machine has it (the kernel refuses a CPU that is not
/// online). Returns whether it did. The mask is not checked against our current affinity on
/// purpose: a peer inherits the parent's single-CPU mask and must still move to its own CPU.
pub fn pin(cpu: usize) -> bool {
    if cpu >= rustix::thread::CpuSet::MAX_CPU {
        return false;
    }
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).is_ok()
}

/// Number of CPUs the machine has online.
pub fn online_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => b
                        .parse::<usize>()
                        .ok()?
                        .checked_sub(a.parse().ok()?)
                        .map(|n| n + 1),
                    None => r.parse::<usize>().ok().map(|_| 1),
                })
                .sum::<Option<usize>>()
        })
        .unwrap_or(1)
}

pub fn send_fds(sock: BorrowedFd<'_>, fds: &[BorrowedFd<'_>]) -> Result<(), String> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    if !anc.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err("too many fds".into());
    }
    sendmsg(sock, &[IoSlice::new(b"F")], &mut anc, SendFlags::NOSIGNAL)
        .map_err(|e| format!("sending fds: {e}"))?;
    Ok(())
}

pub fn recv_fds(sock: BorrowedFd<'_>) -> Result<Vec<OwnedFd>, String> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let mut b = [0u8; 1];
    recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut b)],
        &mut anc,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| format!("receiving fds: {e}"))?;
    let mut fds = Vec::new();
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(r) = m {
            fds.extend(r);
        }
    }
    Ok(fds)
}

/// Percentile of sorted samples.
pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i] as f64
}

fn timespec(d: Duration) -> Timespec {
    Timespec {
        tv_sec: d.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: d.subsec_nanos().into(),
    }
}

/// `poll(2)` that restarts after signals with the time that is left.
fn poll_until(fds: &mut [PollFd<'_>], timeout: Duration) -> std::io::Result<()> {
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match poll(fds, Some(&timespec(left))) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// In a peer: ends the process when the parent hangs up the control connection (its death
/// looks the same to the kernel) or when `deadline` passes, whatever the main thread is blocked
/// in at the time. A blocking read on an eventfd, for one, never returns when the writer dies,
/// because the reader holds the same eventfd.
pub fn exit_with_parent(ctl: &UnixStream, deadline: Duration) -> Result<(), String> {
    let ctl = ctl
        .try_clone()
        .map_err(|e| format!("duplicating the control socket: {e}"))?;
    std::thread::Builder::new()
        .name("parent-watch".into())
        .spawn(move || {
            let mut fds = [PollFd::new(&ctl, PollFlags::RDHUP)];
            let r = poll_until(&mut fds, deadline);
            if r.is_ok() && !fds[0].revents().is_empty() {
                std::process::exit(0); // the parent is done with us, or gone
            }
            eprintln!("splitos-bench peer: no end after {deadline:?}; exiting");
            std::process::exit(3);
        })
        .map_err(|e| format!("starting the watch thread: {e}"))?;
    Ok(())
}

/// What a [`Watchdog`] adds to its eventfd: far above the counts a peer writes, so that the
/// reader can tell the peer's answer (`value % WAKE != 0`) from the watchdog's alone.
pub const WAKE: u64 = 1 << 32;

/// In the parent: bounds a case in time whatever the peer does. At `deadline` it kills the
/// peer, which ends every wait on it (an m2m channel reports `PeerGone`, a socket or pipe EOF),
/// even if the peer is stuck or stopped. When the peer exits, for whatever reason, it also adds
/// [`WAKE`] to the eventfd `wake`: a parent blocked reading an eventfd needs that, because it
/// holds that eventfd itself, so the peer's death alone never ends the read.
pub struct Watchdog {
    stop: Arc<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn start(
        peer_pid: u32,
        wake: Option<OwnedFd>,
        deadline: Duration,
    ) -> Result<Watchdog, String> {
        let pid = i32::try_from(peer_pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| format!("bad peer pid {peer_pid}"))?;
        let pidfd = pidfd_open(pid, PidfdFlags::empty()).map_err(|e| format!("pidfd_open: {e}"))?;
        let stop = Arc::new(
            eventfd(0, EventfdFlags::CLOEXEC).map_err(|e| format!("creating an eventfd: {e}"))?,
        );
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("peer-watch".into())
            .spawn(move || {
                let mut fds = [
                    PollFd::new(&pidfd, PollFlags::IN),
                    PollFd::new(&*s, PollFlags::IN),
                ];
                let r = poll_until(&mut fds, deadline);
                if r.is_ok() && !fds[1].revents().is_empty() {
                    return; // the case ended normally
                }
                if r.is_err() || fds[0].revents().is_empty() {
                    // A pidfd names this process only, even after it has been reaped, so this
                    // can never hit a process that reused the pid.
                    let _ = pidfd_send_signal(&pidfd, Signal::KILL);
                }
                if let Some(w) = &wake {
                    let _ = rustix::io::write(w, &WAKE.to_ne_bytes());
                }
            })
            .map_err(|e| format!("starting the watch thread: {e}"))?;
        Ok(Watchdog {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = rustix::io::write(&*self.stop, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
