//! `splitos status`: what the servers of this user are doing, as tables or JSON.
//!
//! A TCP server's statistics file (mapped read-only: the server is not disturbed), and for a
//! `splitos serve`, the status file its supervisor keeps beside it (`splitos_serve::rundir`):
//! its address, the HTTP application, the direct path, the file cache and its budgets. With
//! no argument, every server of this user is shown: the TCP server daemon at the default
//! socket if it runs, and each `splitos serve`.

use splitos_m2m::runtime;
use splitos_serve::rundir::{self, Status};
use splitos_tcp_server::stats;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Text a peer chose (an application's name), made safe to print on a terminal: control
/// characters (escape sequences, bells, newlines) and the invisible ones that reorder or hide
/// text (bidirectional overrides, zero-width characters) appear as `\u{..}`, and `\` as `\\`,
/// so what is shown is what was sent, and nothing is interpreted.
pub(crate) fn printable(s: &str) -> String {
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
    };
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if hidden(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// What `splitos status` looks at.
pub struct Target {
    /// A TCP server's socket (`--socket`).
    pub socket: Option<PathBuf>,
    /// The address a `splitos serve` listens on (`--listen`).
    pub listen: Option<String>,
}

pub fn run(target: Target, json: bool) -> Result<(), String> {
    let text = render(target, json)?;
    // A reader that went away (`splitos status | head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("writing: {e}")),
        _ => Ok(()),
    }
}

/// A server found to show.
enum Found {
    Tcp(PathBuf),
    Serve(Box<Status>),
}

fn render(target: Target, json: bool) -> Result<String, String> {
    let found = match (target.socket, target.listen) {
        (Some(socket), _) => vec![Found::Tcp(socket)],
        (None, Some(listen)) => vec![Found::Serve(Box::new(serve_on(&listen)?))],
        (None, None) => everything()?,
    };
    if json {
        let mut values = Vec::new();
        for f in &found {
            values.push(match f {
                Found::Tcp(socket) => {
                    let snap = stats::read(socket).map_err(|e| e.to_string())?;
                    serde_json::to_value(&snap).map_err(|e| e.to_string())?
                }
                Found::Serve(s) => serve_json(s),
            });
        }
        // One server: its object, as before; several: an array of them.
        let v = match <[_; 1]>::try_from(values) {
            Ok([one]) => one,
            Err(all) => serde_json::Value::Array(all),
        };
        return serde_json::to_string_pretty(&v)
            .map(|s| s + "\n")
            .map_err(|e| e.to_string());
    }
    let mut o = String::new();
    for (i, f) in found.iter().enumerate() {
        if i > 0 {
            o.push('\n');
        }
        match f {
            Found::Tcp(socket) => o += &render_tcp(socket)?,
            Found::Serve(s) => o += &render_serve(s)?,
        }
    }
    Ok(o)
}

/// The `splitos serve` of this user listening on `listen`.
fn serve_on(listen: &str) -> Result<Status, String> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| format!("--listen {listen:?}: {e} (expected IP:PORT)"))?;
    let running = rundir::running();
    if let Some(s) = running
        .iter()
        .find(|s| s.listen.parse::<SocketAddr>().ok() == Some(addr))
    {
        return Ok(s.clone());
    }
    let others: Vec<String> = running.iter().map(|s| s.listen.clone()).collect();
    Err(if others.is_empty() {
        format!(
            "no `splitos serve` of this user listens on {addr}: none is running (looked in {})",
            runtime::user_dir().display()
        )
    } else {
        format!(
            "no `splitos serve` of this user listens on {addr}; the running ones listen on {}",
            others.join(", ")
        )
    })
}

/// Every server of this user: the TCP server daemon at the default socket, if it runs, and
/// every `splitos serve`.
fn everything() -> Result<Vec<Found>, String> {
    let mut found = Vec::new();
    let daemon = splitos_tcp_server::default_socket_path();
    if stats::read(&daemon).is_ok_and(|s| runtime::pid_alive(s.server_pid as u32)) {
        found.push(Found::Tcp(daemon.clone()));
    }
    let mut serves = rundir::running();
    serves.sort_by(|a, b| a.listen.cmp(&b.listen));
    found.extend(serves.into_iter().map(|s| Found::Serve(Box::new(s))));
    if found.is_empty() {
        return Err(format!(
            "no Split-OS server of this user is running: no TCP server at {} (start one with \
             `splitos tcp-server`, or give its --socket) and no `splitos serve` in {}",
            daemon.display(),
            runtime::user_dir().display()
        ));
    }
    Ok(found)
}

/// What `splitos status` derives from a serve's counters and its TCP server's.
#[derive(serde::Serialize)]
struct Summary {
    /// Requests the TCP server answered itself (each one a file found in the cache).
    direct_answers: u64,
    /// File lookups answered from memory: by the TCP server (direct answers), by the
    /// application's shared-directory reader, and by the file server from its cache.
    cache_hits: u64,
    /// File lookups that read the file from disk.
    cache_misses: u64,
    /// `cache_hits / (cache_hits + cache_misses)`, if there were any.
    cache_hit_ratio: Option<f64>,
}

fn summary(s: &Status, snap: Option<&stats::Snapshot>) -> Summary {
    let direct_answers = snap.map_or(0, |n| n.workers.iter().map(|w| w.direct_responses).sum());
    let cache_hits = direct_answers + s.app.directory_hits + s.files.hits;
    let cache_misses = s.files.misses;
    let total = cache_hits + cache_misses;
    Summary {
        direct_answers,
        cache_hits,
        cache_misses,
        cache_hit_ratio: (total > 0).then(|| cache_hits as f64 / total as f64),
    }
}

fn serve_json(s: &Status) -> serde_json::Value {
    let snap = stats::read(&s.tcp_socket).ok();
    serde_json::json!({
        "serve": s,
        "summary": summary(s, snap.as_ref()),
        "tcp": snap,
    })
}

fn render_serve(s: &Status) -> Result<String, String> {
    let mut o = String::new();
    let snap = stats::read(&s.tcp_socket);
    let sum = summary(s, snap.as_ref().ok());
    let _ = writeln!(
        o,
        "splitos serve pid {} — http://{}/ serving {}",
        s.pid,
        s.listen,
        printable(&s.root.display().to_string())
    );
    let _ = writeln!(
        o,
        "  HTTP application  pid {} (instance {}), {} connections of {} (--max-conns), {} responses",
        s.app_pid, s.generation, s.app.connections, s.max_conns, s.app.responses
    );
    let _ = writeln!(
        o,
        "  direct path       {}, {} requests answered by the TCP server itself",
        if s.direct { "on" } else { "off" },
        sum.direct_answers
    );
    let ratio = sum
        .cache_hit_ratio
        .map_or("no lookups yet".to_string(), |r| {
            format!("{:.1}% hits", 100.0 * r)
        });
    let _ = writeln!(
        o,
        "  file cache        {ratio} ({} from memory, {} read from disk); {} of {} (--cache-size) in use, {} evictions",
        sum.cache_hits,
        sum.cache_misses,
        bytes(s.files.cached_bytes),
        bytes(s.cache_limit),
        s.files.evictions
    );
    let _ = writeln!(o);
    match snap {
        Ok(_) => o += &render_tcp(&s.tcp_socket)?,
        Err(e) => {
            let _ = writeln!(o, "(TCP server statistics unavailable: {e})");
        }
    }
    Ok(o)
}

fn render_tcp(socket: &std::path::Path) -> Result<String, String> {
    let snap = stats::read(socket).map_err(|e| e.to_string())?;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "TCP server pid {} — socket {}",
        snap.server_pid,
        socket.display()
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:>6} {:>8} {:>8} {:>9} {:>12} {:>12} {:>10} {:>10}",
        "thread", "sessions", "conns", "listeners", "bytes in", "bytes out", "busy", "direct"
    );
    for w in &snap.workers {
        let _ = writeln!(
            o,
            "{:>6} {:>8} {:>8} {:>9} {:>12} {:>12} {:>9.1}s {:>10}",
            w.worker,
            w.sessions,
            w.connections,
            w.listeners,
            bytes(w.bytes_in),
            bytes(w.bytes_out),
            w.busy_ms as f64 / 1000.0,
            w.direct_responses
        );
    }
    let _ = writeln!(o);
    if snap.sessions.is_empty() {
        let _ = writeln!(o, "no applications connected");
        return Ok(o);
    }
    let _ = writeln!(
        o,
        "{:>8} {:>6} {:>6} {:<20} {:>6} {:>9} {:>12} {:>12} {:>14} {:>7}",
        "pid",
        "uid",
        "thread",
        "name",
        "conns",
        "listeners",
        "bytes in",
        "bytes out",
        "event ring",
        "queued"
    );
    for s in &snap.sessions {
        let ring = if s.event_ring_size > 0 {
            format!(
                "{:.0}% of {}",
                100.0 * s.event_ring_used as f64 / s.event_ring_size as f64,
                bytes(s.event_ring_size)
            )
        } else {
            "-".into()
        };
        let _ = writeln!(
            o,
            "{:>8} {:>6} {:>6} {:<20} {:>6} {:>9} {:>12} {:>12} {:>14} {:>7}",
            s.pid,
            s.uid,
            s.worker,
            if s.name.is_empty() {
                "-".to_string()
            } else {
                printable(&s.name)
            },
            s.connections,
            s.listeners,
            bytes(s.bytes_in),
            bytes(s.bytes_out),
            ring,
            s.events_queued
        );
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn names_are_shown_without_anything_a_terminal_interprets() {
        assert_eq!(printable("splitos-serve"), "splitos-serve");
        assert_eq!(printable("café ✓"), "café ✓");
        assert_eq!(printable("a\x1b[2Jb\x07"), "a\\u{1b}[2Jb\\u{7}");
        assert_eq!(printable("x\ny\r"), "x\\u{a}y\\u{d}");
        assert_eq!(printable("\u{202e}abc\u{200b}"), "\\u{202e}abc\\u{200b}");
        assert_eq!(
            printable("a\\u{1b}"),
            "a\\\\u{1b}",
            "a literal backslash is not an escape"
        );
    }
}
