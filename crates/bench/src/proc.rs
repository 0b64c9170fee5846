//! Helpers for two-process measurements: re-spawning this executable as the peer, pinning each
//! side to its own core, and passing file descriptors over a Unix socket.

use rustix::fd::{BorrowedFd, OwnedFd};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;

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
