//! `large`: one full GET of a file far larger than Split-OS's file cache (4 GiB, `--quick`
//! 512 MiB; `splitos serve --cache-size 64M`, so the file goes by reference from the page
//! cache with `sendfile`), against nginx (sendfile, `tcp_nopush`) serving the same file — the
//! hardening issue's bar is nginx's rate. The client is this benchmark: one connection,
//! reading into a 1 MiB buffer until the announced length, timed from the request to the last
//! byte. Servers alternate round by round.

use super::servers::{self, Server};
use crate::report::Report;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Bytes per second of one full GET of `path` from `port`.
fn get(port: u16, path: &str, len: u64) -> Result<f64, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    s.write_all(
        format!("GET /{path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::new();
    let mut head_done = false;
    let mut body = 0u64;
    while body < len {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("after {body} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        if head_done {
            body += n as u64;
            continue;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head_done = true;
            body = (head.len() - end - 4) as u64;
            if !head.starts_with(b"HTTP/1.1 200") {
                let first = String::from_utf8_lossy(&head[..end.min(40)]).into_owned();
                return Err(format!("answered {first:?}"));
            }
        } else if head.len() > 64 << 10 {
            return Err("no response head".into());
        }
    }
    if body != len {
        return Err(format!("{body} bytes of {len}"));
    }
    Ok(len as f64 / t.elapsed().as_secs_f64())
}

pub(super) fn measure(
    r: &mut Report,
    quick: bool,
    splitos_bin: &Path,
    root: &Path,
    nginx: Option<&Server>,
) -> Result<(), String> {
    let len: u64 = if quick { 512 << 20 } else { 4 << 30 };
    let path = "large.bin";
    {
        // Written in 8 MiB pieces of a pattern: the file is the point, not its bytes.
        let mut f = std::fs::File::create(root.join(path)).map_err(|e| e.to_string())?;
        let piece: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let mut left = len;
        while left > 0 {
            let n = left.min(piece.len() as u64) as usize;
            f.write_all(&piece[..n]).map_err(|e| e.to_string())?;
            left -= n as u64;
        }
    }
    let me = servers::splitos_with(splitos_bin, root, 1, &["--cache-size", "64M"])?;
    let mut all: Vec<(&str, u16)> = vec![("splitos_large", me.port)];
    if let Some(n) = nginx {
        all.push(("nginx_large", n.port));
    }
    for (_, port) in &all {
        get(*port, path, len)?; // warm: the page cache, the servers' file caches
    }
    let rounds = if quick { 2 } else { 4 };
    let mut best = vec![0.0f64; all.len()];
    let mut sum = vec![0.0f64; all.len()];
    for _ in 0..rounds {
        for (i, (name, port)) in all.iter().enumerate() {
            let bps = get(*port, path, len).map_err(|e| format!("{name}: {e}"))?;
            best[i] = best[i].max(bps);
            sum[i] += bps;
        }
    }
    for (i, (name, _)) in all.iter().enumerate() {
        let mean = sum[i] / rounds as f64 / 1e9;
        r.add(name, "gb_per_s", mean);
        r.detail(name, "best_gb_per_s", best[i] / 1e9);
        eprintln!("http: {name}: {mean:.2} GB/s (best {:.2})", best[i] / 1e9);
    }
    let _ = std::fs::remove_file(root.join(path));
    r.ratio("gb_per_s", "splitos_large", "nginx_large");
    r.target("gb_per_s", "splitos_large", "nginx_large", 1.0, false);
    r.note(format!(
        "large: one full GET of a {} MiB file, {rounds} alternating rounds (mean; best in details); \
         splitos serve --cache-size 64M (the file by reference, sendfile), nginx sendfile + tcp_nopush",
        len >> 20
    ));
    drop(me);
    Ok(())
}
