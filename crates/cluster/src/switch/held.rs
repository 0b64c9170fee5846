//! Packets of held flows wait instead of being dropped.
//!
//! The hold rule marks the client's packets of a moving flow with [`HOLD_MARK`], and policy
//! routing sends that mark to a TUN device of the switch ([`device`]). While a migration runs,
//! the operator's process has the device open ([`HeldPackets`]): the packets collect in its
//! queue, and once the switch sends the flow to its new node they are written back into the
//! device, enter the switch again as if just received, and go where the flow goes now. A
//! request sent during a cut-over then waits for the cut-over, not for the client's
//! retransmission timer (at least 200 ms on Linux). With nobody attached (no migration
//! running), the kernel drops what is routed to the device: a plain hold, and the client
//! retransmits.
//!
//! Why a TUN device and not a netfilter queue: the queue needs the kernel's `nft_queue`, which
//! is a module on most distributions and absent from some kernels (this machine's among
//! them); TUN is everywhere. It costs one copy of each held packet through this process.

use crate::netns;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// The mark of a held packet (clear of node ids and bucket marks).
pub const HOLD_MARK: u32 = 0x484f_4c44;
/// The policy-routing table that sends held packets to the device.
pub const HOLD_ROUTE_TABLE: u32 = super::ROUTE_TABLE_BASE - 1;
/// Packets the device queues for a migration; more are dropped (and retransmitted).
const QUEUE_LEN: u32 = 10_000;
/// How long the device must stay quiet after a release before it is closed.
const QUIET: Duration = Duration::from_millis(5);
/// The most spent letting held packets through after a release.
const RELEASE_BUDGET: Duration = Duration::from_millis(50);

/// The device of switch `table`: `sph-` and the start of the table's name (15 bytes at most).
pub fn device(table: &str) -> String {
    let mut d = format!("sph-{table}");
    d.truncate(15);
    d
}

/// Creates the device and its routing (`splitos switch init`).
pub fn setup(table: &str) -> Result<(), netns::NetnsError> {
    let dev = device(table);
    let rt = HOLD_ROUTE_TABLE.to_string();
    let mark = format!("{HOLD_MARK:#x}");
    teardown(table);
    netns::ip(&["tuntap", "add", "dev", &dev, "mode", "tun"])?;
    netns::ip(&[
        "link",
        "set",
        &dev,
        "txqueuelen",
        &QUEUE_LEN.to_string(),
        "up",
    ])?;
    // Re-injected packets enter through the device with the client's source address.
    let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter"), "0");
    netns::ip(&["rule", "add", "fwmark", &mark, "lookup", &rt])?;
    netns::ip(&["route", "replace", "default", "dev", &dev, "table", &rt])?;
    Ok(())
}

/// Removes what `setup` made (nothing to undo is not an error).
pub fn teardown(table: &str) {
    let rt = HOLD_ROUTE_TABLE.to_string();
    let mark = format!("{HOLD_MARK:#x}");
    while netns::ip(&["rule", "del", "fwmark", &mark, "lookup", &rt]).is_ok() {}
    let _ = netns::ip(&["route", "flush", "table", &rt]);
    let _ = netns::ip(&["link", "del", &device(table)]);
}

/// The held packets' device, open for the length of one migration.
pub struct HeldPackets {
    fd: OwnedFd,
}

/// How long an attach waits for the device to carry packets.
const RUNNING_WAIT: Duration = Duration::from_millis(200);

/// Waits until `dev` is running. Attaching turns the carrier on, but the kernel starts the
/// device's queue a moment later (its link watcher, on a work queue): packets routed to it
/// before then are dropped (seen as the TX drops of the first migration after a quiet spell,
/// and a 200 ms wait for the client whose request was among them).
fn wait_running(dev: &str) -> std::io::Result<()> {
    let sock = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )?;
    let until = Instant::now() + RUNNING_WAIT;
    loop {
        let mut ifr = [0u8; 40];
        ifr[..dev.len()].copy_from_slice(dev.as_bytes());
        // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags (a short at offset
        // 16) into a `struct ifreq` (40 bytes on Linux), which `ifr` is, for this call only.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::SIOCGIFFLAGS,
                ifr.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let flags = i32::from(u16::from_ne_bytes([ifr[16], ifr[17]]));
        if flags & libc::IFF_RUNNING != 0 {
            return Ok(());
        }
        if Instant::now() >= until {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the hold device {dev} did not start within {RUNNING_WAIT:?}"),
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

impl HeldPackets {
    /// Opens the device of switch `table`. `Err` if it cannot be (another migration has it,
    /// or an older switch without one): held packets are then dropped, as a plain hold does.
    pub fn attach(table: &str) -> std::io::Result<HeldPackets> {
        let fd = rustix::fs::open(
            "/dev/net/tun",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        // struct ifreq: the name (16 bytes, NUL-terminated), then the flags (a short).
        let mut ifr = [0u8; 40];
        let dev = device(table);
        ifr[..dev.len()].copy_from_slice(dev.as_bytes());
        let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as u16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads (and may write back) a `struct ifreq`, which is 40 bytes on
        // Linux; `ifr` is that large and lives across the call; the fd is a tun control fd.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                TUNSETIFF,
                ifr.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        wait_running(&dev)?;
        Ok(HeldPackets { fd })
    }

    /// Sends every packet held so far through the switch again (after the release), and
    /// detaches. Returns how many.
    ///
    /// A packet the switch was already forwarding when the release was committed still
    /// arrives here a moment later; closing the device at once would drop it (and cost its
    /// client a retransmission timeout, seen once in ~200 migrations). So the device stays
    /// open until it has been quiet for [`QUIET`].
    pub fn release(self) -> usize {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let until = Instant::now() + RELEASE_BUDGET;
        let mut buf = vec![0u8; 65_536];
        let mut n = 0;
        while Instant::now() < until && n < QUEUE_LEN as usize {
            match rustix::io::read(self.fd.as_fd(), &mut buf) {
                Ok(len) if len > 0 => {
                    if rustix::io::write(self.fd.as_fd(), &buf[..len]).is_ok() {
                        n += 1;
                    }
                }
                _ => {
                    // Empty (non-blocking): wait a little for stragglers.
                    let quiet = Timespec {
                        tv_sec: 0,
                        tv_nsec: QUIET.as_nanos() as i64,
                    };
                    let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
                    match poll(&mut fds, Some(&quiet)) {
                        Ok(0) => break,
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(_) => break,
                    }
                }
            }
        }
        n
    }
}
