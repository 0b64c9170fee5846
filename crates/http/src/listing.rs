//! Directory listings: the HTML page for a directory that has no `index.html`.
//!
//! Names come from the file system, so they are untrusted text: each is HTML-escaped where
//! shown and percent-encoded where linked, so a file called `<script>` or `../x?y#z` can
//! neither inject markup nor point a link anywhere but at itself. Reading the directory is the
//! caller's business (it must not leave the served root); this module only renders.

use crate::conditional;
use crate::respond::{head_common, Part, Response};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

/// What a link to an entry may keep unencoded: RFC 3986's unreserved characters. Everything
/// else, `/` included, is encoded, so a name is always one relative path segment.
const LINK: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// One entry of a listed directory.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    pub name: &'a str,
    pub is_dir: bool,
    pub size: u64,
    /// Seconds since the epoch (before it: shown as the epoch).
    pub mtime: i64,
}

/// The listing of directory `dir` (relative to the root, `""` for the root itself) as a
/// complete response. `cut_at` says the entries were cut short at that many, which the page
/// then tells the reader.
pub fn page<F>(
    dir: &str,
    entries: &[Entry],
    cut_at: Option<usize>,
    head_only: bool,
) -> Response<F> {
    let title = format!("Index of /{}", html_escape(dir));
    let mut body = format!(
        "<!doctype html>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n<h1>{title}</h1>\n<table>\n"
    );
    if !dir.is_empty() {
        body.push_str("<tr><td><a href=\"../\">../</a></td><td></td><td></td></tr>\n");
    }
    for e in entries {
        let slash = if e.is_dir { "/" } else { "" };
        let size = if e.is_dir {
            "-".to_string()
        } else {
            e.size.to_string()
        };
        let when = conditional::http_date(UNIX_EPOCH + Duration::from_secs(e.mtime.max(0) as u64));
        let _ = writeln!(
            body,
            "<tr><td><a href=\"{}{slash}\">{}{slash}</a></td><td>{when}</td><td align=\"right\">{size}</td></tr>",
            link(e.name),
            html_escape(e.name)
        );
    }
    body.push_str("</table>\n");
    if let Some(n) = cut_at {
        let _ = writeln!(body, "<p>Only the first {n} entries are shown.</p>");
    }
    let mut h = head_common(200, "OK");
    let _ = write!(
        h,
        "Content-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-cache\r\n\r\n",
        body.len()
    );
    if !head_only {
        h.push_str(&body);
    }
    Response {
        parts: vec![Part::Bytes(h.into_bytes())],
        status: 200,
        body_bytes: if head_only { 0 } else { body.len() as u64 },
    }
}

/// `s` as HTML text or attribute value.
pub fn html_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A file name as a relative link to itself.
pub fn link(name: &str) -> String {
    utf8_percent_encode(name, LINK).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &Response<()>) -> String {
        match r.parts.as_slice() {
            [Part::Bytes(b)] => String::from_utf8_lossy(b).into_owned(),
            _ => panic!("one bytes part expected"),
        }
    }

    #[test]
    fn names_in_listings_cannot_inject_markup_or_links() {
        assert_eq!(
            html_escape("<script>\"x\"&'"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;"
        );
        assert_eq!(link("a b/../?#.html"), "a%20b%2F..%2F%3F%23.html");
        assert_eq!(link("ünï"), "%C3%BCn%C3%AF");
        assert_eq!(link("Az09-._~"), "Az09-._~");
        assert_eq!(
            link("%+&=;:@!$'()*,"),
            "%25%2B%26%3D%3B%3A%40%21%24%27%28%29%2A%2C"
        );
    }

    #[test]
    fn a_listing_links_every_entry_and_counts_its_body() {
        let entries = [
            Entry {
                name: "sub",
                is_dir: true,
                size: 4096,
                mtime: 0,
            },
            Entry {
                name: "a <b>.txt",
                is_dir: false,
                size: 12,
                mtime: -5,
            },
        ];
        let r = page::<()>("files/", &entries, None, false);
        let t = text(&r);
        assert_eq!(r.status, 200);
        assert!(t.starts_with("HTTP/1.1 200 OK\r\n"), "{t}");
        assert!(t.contains("<title>Index of /files/</title>"), "{t}");
        assert!(t.contains("<a href=\"../\">../</a>"), "{t}");
        assert!(t.contains("<a href=\"sub/\">sub/</a></td><td>Thu, 01 Jan 1970 00:00:00 GMT</td><td align=\"right\">-</td>"), "{t}");
        assert!(
            t.contains("<a href=\"a%20%3Cb%3E.txt\">a &lt;b&gt;.txt</a>"),
            "{t}"
        );
        assert!(t.contains(">12</td>"), "{t}");
        assert!(!t.contains("Only the first"), "{t}");
        let (head, body) = t.split_once("\r\n\r\n").unwrap_or_default();
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
        assert_eq!(r.body_bytes, body.len() as u64);
        // The root has no parent link; a cut listing says so; HEAD has the head only.
        let r = page::<()>("", &entries[..1], Some(1), true);
        let t = text(&r);
        assert!(!t.contains("../"), "{t}");
        assert!(t.ends_with("\r\n\r\n"), "{t}");
        assert_eq!(r.body_bytes, 0);
        let t = text(&page::<()>("", &entries[..1], Some(1), false));
        assert!(
            t.contains("<p>Only the first 1 entries are shown.</p>\n"),
            "{t}"
        );
        assert!(t.contains("<title>Index of /</title>"), "{t}");
    }
}
