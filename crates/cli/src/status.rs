//! `splitos status`: the TCP server's statistics file as tables or JSON.

use splitos_tcp_server::stats;
use std::fmt::Write as _;
use std::io::Write as _;
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

pub fn run(socket: PathBuf, json: bool) -> Result<(), String> {
    let text = render(&socket, json)?;
    // A reader that went away (`splitos status | head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("writing: {e}")),
        _ => Ok(()),
    }
}

fn render(socket: &std::path::Path, json: bool) -> Result<String, String> {
    let snap = stats::read(socket).map_err(|e| e.to_string())?;
    let mut o = String::new();
    if json {
        let s = serde_json::to_string_pretty(&snap).map_err(|e| e.to_string())?;
        return Ok(s + "\n");
    }
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
