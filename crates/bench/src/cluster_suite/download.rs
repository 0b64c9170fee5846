//! `download`: a 64 MiB download on one keep-alive connection, moved node to node twice while
//! in flight (at about a tenth and at about four tenths). The client reads at ~30 MB/s (a
//! client slower than the server, as across the Internet), checks every byte against the
//! file, and records the longest gap between two reads: what a user of the download notices.

use super::{lab, other, Report, Select, REQUEST_TIMEOUT};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: usize = 64 << 20;
/// The client's pace: a 64 KiB read, then this pause.
const PACE: Duration = Duration::from_millis(2);
const DEADLINE: Duration = Duration::from_secs(60);

/// The file's bytes: a xorshift stream, so that a byte out of place shows.
fn content() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(SIZE);
    while v.len() < SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(SIZE);
    v
}

struct Outcome {
    got: usize,
    intact: bool,
    stall_ms: f64,
}

fn client(ns: &str, vip: SocketAddr, want: &[u8], progress: &AtomicU64) -> Result<Outcome, String> {
    splitos_cluster::netns::enter(ns).map_err(|e| e.to_string())?;
    let mut s = TcpStream::connect_timeout(&vip, REQUEST_TIMEOUT)
        .map_err(|e| format!("download: connecting: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: 198.19.0.1\r\n\r\n")
        .map_err(|e| format!("download: sending: {e}"))?;
    let started = Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    let mut head = Vec::new();
    let body_start = loop {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("download: the head: {e}"))?;
        if n == 0 {
            return Err("download: closed before the head".into());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if head.len() > 64 << 10 {
            return Err("download: no head".into());
        }
    };
    if !head.starts_with(b"HTTP/1.1 200") {
        return Err("download: not a 200".into());
    }
    let mut got = head.len() - body_start;
    let mut intact = want.get(..got) == Some(&head[body_start..]);
    let (mut last, mut stall) = (Instant::now(), Duration::ZERO);
    while got < want.len() && started.elapsed() < DEADLINE {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("download: after {got} bytes: {e}"))?;
        if n == 0 {
            return Err(format!("download: closed after {got} bytes"));
        }
        let now = Instant::now();
        stall = stall.max(now - last);
        last = now;
        intact &= want.get(got..got + n) == Some(&buf[..n]);
        got += n;
        progress.store(got as u64, Ordering::Release);
        std::thread::sleep(PACE);
    }
    Ok(Outcome {
        got,
        intact,
        stall_ms: stall.as_secs_f64() * 1e3,
    })
}

pub(super) fn download(
    r: &mut Report,
    prefix: &str,
    client_ns: &str,
    vip: SocketAddr,
    site: &Path,
) -> Result<(), String> {
    let want = Arc::new(content());
    std::fs::write(site.join("big.bin"), want.as_slice())
        .map_err(|e| format!("download: writing the file: {e}"))?;
    let progress = Arc::new(AtomicU64::new(0));
    let (ns, w, p) = (client_ns.to_string(), want.clone(), progress.clone());
    let t = std::thread::spawn(move || client(&ns, vip, &w, &p));
    let mut cutovers = Vec::new();
    let mut on: Option<u16> = None;
    for share in [10, 40] {
        let until = Instant::now() + DEADLINE;
        while progress.load(Ordering::Acquire) < (SIZE * share / 100) as u64 {
            if Instant::now() > until || t.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let tries: Vec<u16> = match on {
            Some(n) => vec![n],
            None => vec![1, 2],
        };
        for from in tries {
            let to = other(from);
            let rep = lab::migrate(
                prefix,
                &format!("node{from}"),
                &format!("node{to}"),
                Select::All,
            )
            .map_err(|e| format!("download: migrate: {e}"))?;
            if !rep.moved.is_empty() {
                cutovers.push(rep.cutover_ms);
                on = Some(to);
                break;
            }
        }
    }
    let out = t
        .join()
        .map_err(|_| "download: the client panicked".to_string())??;
    let _ = std::fs::remove_file(site.join("big.bin"));
    r.add("download", "stall_ms", out.stall_ms);
    r.add(
        "download",
        "cutover_ms",
        cutovers.iter().copied().fold(0.0, f64::max),
    );
    r.detail("download", "moves", cutovers.len() as f64);
    r.detail(
        "download",
        "intact",
        f64::from(u8::from(out.intact && out.got == SIZE)),
    );
    eprintln!(
        "cluster: download: 64 MiB moved {} times in flight, cut-overs {:?} ms, longest stall {:.1} ms, {}",
        cutovers.len(),
        cutovers.iter().map(|c| (c * 100.0).round() / 100.0).collect::<Vec<_>>(),
        out.stall_ms,
        if out.intact && out.got == SIZE { "every byte intact" } else { "BYTES DIFFER" }
    );
    Ok(())
}
