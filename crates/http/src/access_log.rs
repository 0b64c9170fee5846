//! Access-log lines in the common log format (CLF), which log analysers read without
//! configuration: `host ident user [time] "request line" status bytes`.
//!
//! The request line is rebuilt from the parsed request rather than copied from the wire, so a
//! client cannot start a forged second entry: httparse accepts no space or control character
//! (newlines included) in a method or target.

use crate::conditional;
use crate::request::{Method, Request, Version};
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
        "{peer} - - [{}] \"{method} {} HTTP/{v}\" {status} {body_bytes}",
        timestamp(now),
        req.target
    )
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
}
