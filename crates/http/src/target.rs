//! The request target: split off the query, percent-decode the path.
//!
//! Decoding happens once, here, before anything looks at the path (a path decoded twice is the
//! classic `%252e%252e` traversal). The result still has its leading `/`; whether it may leave
//! the root is the file server's decision (it refuses `..` and opens beneath the root), so a
//! decoded `..` is passed on, not rewritten.

use crate::HttpError;
use percent_encoding::percent_decode_str;

/// The decoded path of `target` (without the query), or 400 if it decodes to something that
/// cannot be a file name: a NUL byte, or bytes that are not UTF-8.
pub fn decode_path(target: &str) -> Result<String, HttpError> {
    let raw = target.split_once('?').map_or(target, |(p, _)| p);
    let raw = raw.split_once('#').map_or(raw, |(p, _)| p);
    let bytes: Vec<u8> = percent_decode_str(raw).collect();
    if bytes.contains(&0) {
        return Err(HttpError::new(400, "Bad Request"));
    }
    String::from_utf8(bytes).map_err(|_| HttpError::new(400, "Bad Request"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_once_and_refuses_nul() {
        assert_eq!(decode_path("/a%20b/c.html?x=%2F").unwrap(), "/a b/c.html");
        assert_eq!(decode_path("/%2e%2e/etc/passwd").unwrap(), "/../etc/passwd");
        assert_eq!(
            decode_path("/%252e%252e/x").unwrap(),
            "/%2e%2e/x",
            "decoded once only"
        );
        assert_eq!(decode_path("/a%00b").unwrap_err().status, 400);
        assert_eq!(decode_path("/%ff").unwrap_err().status, 400);
    }
}
