//! Conditional requests (RFC 9110 §13): preconditions evaluated in the order of §13.2.2.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What a representation can be compared by.
#[derive(Clone, Copy, Debug)]
pub struct Validators<'a> {
    /// A strong entity tag, with its quotes (e.g. `"5f-1a2b"`).
    pub etag: &'a str,
    pub last_modified: SystemTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Proceed,
    /// 304, no body.
    NotModified,
    /// 412.
    PreconditionFailed,
}

/// Parses an `If-Match` / `If-None-Match` list: `*` or comma-separated entity tags.
fn tags(list: &str) -> Option<Vec<(bool, &str)>> {
    let list = list.trim();
    if list == "*" {
        return None; // any
    }
    Some(
        list.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| match t.strip_prefix("W/") {
                Some(opaque) => (true, opaque),
                None => (false, t),
            })
            .collect(),
    )
}

fn matches(list: &str, etag: &str, weak_ok: bool) -> bool {
    match tags(list) {
        None => true,
        Some(ts) => ts.iter().any(|(weak, t)| (weak_ok || !weak) && *t == etag),
    }
}

/// HTTP dates have one-second resolution: compare at that resolution.
fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

fn date(v: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(v.trim()).ok()
}

/// Evaluates the preconditions of a request for a representation. `header` looks up a
/// request header by lower-case name; `safe` is true for GET and HEAD.
pub fn evaluate<'h>(
    header: impl Fn(&str) -> Option<&'h str>,
    v: &Validators<'_>,
    safe: bool,
) -> Outcome {
    if let Some(im) = header("if-match") {
        if !matches(im, v.etag, false) {
            return Outcome::PreconditionFailed;
        }
    } else if let Some(t) = header("if-unmodified-since").and_then(date) {
        if secs(v.last_modified) > secs(t) {
            return Outcome::PreconditionFailed;
        }
    }
    if let Some(inm) = header("if-none-match") {
        if matches(inm, v.etag, true) {
            return if safe {
                Outcome::NotModified
            } else {
                Outcome::PreconditionFailed
            };
        }
    } else if safe {
        if let Some(t) = header("if-modified-since").and_then(date) {
            if secs(v.last_modified) <= secs(t) {
                return Outcome::NotModified;
            }
        }
    }
    Outcome::Proceed
}

/// Whether a `Range` may be honoured given `If-Range` (an entity tag compared strongly, or a
/// date that must equal Last-Modified exactly).
pub fn range_applies(if_range: Option<&str>, v: &Validators<'_>) -> bool {
    let Some(ir) = if_range.map(str::trim) else {
        return true;
    };
    if ir.starts_with('"') {
        return ir == v.etag;
    }
    if ir.starts_with("W/") {
        return false;
    }
    date(ir).is_some_and(|t| secs(t) == secs(v.last_modified))
}

/// The `Last-Modified` / `Date` format.
pub fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> Validators<'static> {
        Validators {
            etag: "\"abc\"",
            last_modified: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        }
    }

    fn eval(hs: &[(&str, &str)], safe: bool) -> Outcome {
        let hs: Vec<(String, String)> = hs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        evaluate(
            |n| hs.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str()),
            &v(),
            safe,
        )
    }

    #[test]
    fn rfc_9110_order() {
        let lm = http_date(v().last_modified);
        let later = http_date(v().last_modified + Duration::from_secs(10));
        let earlier = http_date(v().last_modified - Duration::from_secs(10));
        assert_eq!(eval(&[], true), Outcome::Proceed);
        assert_eq!(
            eval(&[("if-none-match", "\"abc\"")], true),
            Outcome::NotModified
        );
        assert_eq!(
            eval(&[("if-none-match", "\"x\", W/\"abc\"")], true),
            Outcome::NotModified,
            "weak compare"
        );
        assert_eq!(eval(&[("if-none-match", "*")], true), Outcome::NotModified);
        assert_eq!(eval(&[("if-none-match", "\"x\"")], true), Outcome::Proceed);
        assert_eq!(
            eval(&[("if-none-match", "\"abc\"")], false),
            Outcome::PreconditionFailed
        );
        assert_eq!(
            eval(&[("if-modified-since", &lm)], true),
            Outcome::NotModified
        );
        assert_eq!(
            eval(&[("if-modified-since", &earlier)], true),
            Outcome::Proceed
        );
        // If-None-Match wins over If-Modified-Since.
        assert_eq!(
            eval(
                &[("if-none-match", "\"x\""), ("if-modified-since", &later)],
                true
            ),
            Outcome::Proceed
        );
        assert_eq!(eval(&[("if-match", "\"abc\"")], true), Outcome::Proceed);
        assert_eq!(
            eval(&[("if-match", "W/\"abc\"")], true),
            Outcome::PreconditionFailed,
            "strong compare"
        );
        assert_eq!(
            eval(&[("if-match", "\"zzz\"")], true),
            Outcome::PreconditionFailed
        );
        assert_eq!(
            eval(&[("if-unmodified-since", &earlier)], true),
            Outcome::PreconditionFailed
        );
        assert_eq!(
            eval(&[("if-unmodified-since", &later)], true),
            Outcome::Proceed
        );
        assert_eq!(
            eval(&[("if-modified-since", "not a date")], true),
            Outcome::Proceed
        );
    }

    #[test]
    fn if_range() {
        let lm = http_date(v().last_modified);
        assert!(range_applies(None, &v()));
        assert!(range_applies(Some("\"abc\""), &v()));
        assert!(!range_applies(Some("\"old\""), &v()));
        assert!(!range_applies(Some("W/\"abc\""), &v()));
        assert!(range_applies(Some(&lm), &v()));
        assert!(!range_applies(Some("Mon, 01 Jan 2001 00:00:00 GMT"), &v()));
    }
}
