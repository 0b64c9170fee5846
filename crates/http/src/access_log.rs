//! Access-log lines in the common log format (CLF), which log analysers read without
//! configuration: `host ident user [time] "request line" status bytes`.
//!
//! The request line is rebuilt from the parsed request rather than copied from the wire, and
//! its method and target are escaped ([`escape`]): httparse accepts no space or control
//! character (newlines included) in them, but it does accept `"`, `\\` and bytes past ASCII
//! in a target, which would end the quoted field early or confuse a reader. So a client can
//! neither start a forged second entry nor make a line unparseable.

use crate::conditional;
use crate::request::{Method, Request, Version};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

/// One log line (without its newline) for `req` from `peer`, answered with `status` and
/// `body_bytes` bytes of body, at `now`.
pub fn line(peer: IpAddr, req: &Request, status: u16, body_bytes: u64, now: SystemTime) -> String {
    let method = match &req.method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Other(m) => m.as_str(),
    };
    let v = match req.version {
        Version::Http10 => "1.0",
        Version::Http11 => "1.1",
    };
    format!(
        "{peer} - - [{}] \"{} {} HTTP/{v}\" {status} {body_bytes}",
        timestamp(now),
        escape(method),
        escape(&req.target)
    )
}

/// `s` as it may appear inside a quoted log field: printable ASCII as is, except `"` and `\\`;
/// those, spaces, controls and every byte past ASCII as `\\xHH` (nginx's escaping), so the
/// field ends at the one `"` that closes it and the line stays ASCII.
pub fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    let plain = |b: u8| b.is_ascii_graphic() && b != b'"' && b != b'\\';
    if s.bytes().all(plain) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for b in s.bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{b:02X}");
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The common log format's timestamp, in UTC: `24/Nov/2026:19:11:42 +0000`.
pub fn timestamp(t: SystemTime) -> String {
    // Rearranged from the HTTP date ("Tue, 24 Nov 2026 19:11:42 GMT"), which has every field.
    let d = conditional::http_date(t);
    let p: Vec<&str> = d.split_whitespace().collect();
    match p.as_slice() {
        [_, day, mon, year, time, _] => format!("{day}/{mon}/{year}:{time} +0000"),
        _ => d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{parse, Limits, Parsed};
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn clf_timestamp() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(timestamp(t), "18/Nov/2026:11:06:40 +0000");
        assert_eq!(timestamp(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
    }

    #[test]
    fn clf_line() {
        let raw = b"HEAD /a%20b?x=1 HTTP/1.0\r\nHost: x\r\n\r\n";
        let Ok(Parsed::Complete(req, _)) = parse(raw, &Limits::default()) else {
            panic!("test request does not parse");
        };
        let l = line(
            "192.0.2.7".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            &req,
            404,
            153,
            UNIX_EPOCH,
        );
        assert_eq!(
            l,
            "192.0.2.7 - - [01/Jan/1970:00:00:00 +0000] \"HEAD /a%20b?x=1 HTTP/1.0\" 404 153"
        );
        let v6 = line(
            "::1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            &req,
            200,
            0,
            UNIX_EPOCH,
        );
        assert!(v6.starts_with("::1 - - ["), "{v6}");
    }

    /// Finding A20: httparse accepts `"` (and `\\`, and bytes past ASCII) in a target, which
    /// broke the quoted request field of the common log format. They are escaped as `\\xHH`,
    /// as nginx does, so every line has exactly one request field.
    #[test]
    fn quotes_and_odd_bytes_in_a_target_are_escaped() {
        let raw = b"GET /a\"b\\c?q=\"x\"\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n";
        let Ok(Parsed::Complete(req, _)) = parse(raw, &Limits::default()) else {
            panic!("httparse refused the test request");
        };
        let l = line(IpAddr::from([127, 0, 0, 1]), &req, 404, 0, UNIX_EPOCH);
        assert_eq!(
            l,
            "127.0.0.1 - - [01/Jan/1970:00:00:00 +0000] \"GET /a\\x22b\\x5Cc?q=\\x22x\\x22\\xC3\\xA9 HTTP/1.1\" 404 0"
        );
        assert_eq!(l.matches('"').count(), 2, "{l}");
    }
}
