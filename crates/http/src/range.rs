//! `Range: bytes=...` against a representation of known length (RFC 9110 §14).

/// What to send for a `Range` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ranges {
    /// No usable Range header: send the whole representation (200).
    Whole,
    /// One satisfiable range, inclusive bounds (206 with Content-Range).
    Single(u64, u64),
    /// Several satisfiable ranges, inclusive bounds (206 multipart/byteranges).
    Multiple(Vec<(u64, u64)>),
    /// Syntactically valid but none satisfiable (416 with `Content-Range: bytes */len`).
    Unsatisfiable,
}

/// More ranges than this in one request are treated as no Range at all: a defence against
/// requests that ask for thousands of overlapping ranges to amplify work.
pub const MAX_RANGES: usize = 16;

fn parse_one(spec: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let (a, b) = spec.trim().split_once('-').ok_or(())?;
    let num = |s: &str| -> Result<u64, ()> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(());
        }
        s.parse().map_err(|_| ())
    };
    if a.is_empty() {
        // Suffix range: the last n bytes.
        let n = num(b)?;
        if n == 0 || len == 0 {
            return Ok(None);
        }
        return Ok(Some((len.saturating_sub(n), len - 1)));
    }
    let start = num(a)?;
    let end = if b.is_empty() { u64::MAX } else { num(b)? };
    if end < start {
        return Err(());
    }
    if start >= len {
        return Ok(None);
    }
    Ok(Some((start, end.min(len - 1))))
}

/// Interprets a `Range` header value for a representation of `len` bytes. Malformed headers
/// and other units are ignored (whole representation), as the RFC asks; so are ranges that
/// add up to more bytes than the representation has (`bytes=0-,0-,…` would otherwise send it
/// many times over for one request), as nginx does.
pub fn parse(header: &str, len: u64) -> Ranges {
    let Some(specs) = header.trim().strip_prefix("bytes=") else {
        return Ranges::Whole;
    };
    let mut out = Vec::new();
    let mut count = 0;
    for spec in specs.split(',') {
        if spec.trim().is_empty() {
            continue;
        }
        count += 1;
        if count > MAX_RANGES {
            return Ranges::Whole;
        }
        match parse_one(spec, len) {
            Err(()) => return Ranges::Whole,
            Ok(None) => {}
            Ok(Some(r)) => out.push(r),
        }
    }
    let total = out
        .iter()
        .fold(0u64, |sum, (a, b)| sum.saturating_add(b - a + 1));
    if total > len {
        return Ranges::Whole;
    }
    match out.len() {
        0 if count == 0 => Ranges::Whole,
        0 => Ranges::Unsatisfiable,
        1 => Ranges::Single(out[0].0, out[0].1),
        _ => Ranges::Multiple(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_of_a_1000_byte_file() {
        assert_eq!(parse("bytes=0-99", 1000), Ranges::Single(0, 99));
        assert_eq!(parse("bytes=900-", 1000), Ranges::Single(900, 999));
        assert_eq!(parse("bytes=-100", 1000), Ranges::Single(900, 999));
        assert_eq!(parse("bytes=-5000", 1000), Ranges::Single(0, 999));
        assert_eq!(parse("bytes=990-2000", 1000), Ranges::Single(990, 999));
        assert_eq!(
            parse("bytes=0-0, 10-19", 1000),
            Ranges::Multiple(vec![(0, 0), (10, 19)])
        );
        assert_eq!(parse("bytes=1000-", 1000), Ranges::Unsatisfiable);
        assert_eq!(parse("bytes=-0", 1000), Ranges::Unsatisfiable);
        assert_eq!(
            parse("bytes=5-1", 1000),
            Ranges::Whole,
            "malformed: ignored"
        );
        assert_eq!(parse("bytes=a-b", 1000), Ranges::Whole);
        assert_eq!(parse("items=0-1", 1000), Ranges::Whole);
        assert_eq!(parse("bytes=0-0", 0), Ranges::Unsatisfiable);
        let many = (0..20)
            .map(|i| format!("{i}-{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(parse(&format!("bytes={many}"), 1000), Ranges::Whole);
    }

    /// Finding A17: sixteen `0-` ranges asked for the file sixteen times over. Ranges that
    /// add up to more than the file are ignored (the whole file, once), as nginx does.
    #[test]
    fn ranges_adding_up_to_more_than_the_file_are_ignored() {
        let all = vec!["0-"; MAX_RANGES].join(",");
        assert_eq!(parse(&format!("bytes={all}"), 1000), Ranges::Whole);
        assert_eq!(parse("bytes=0-599,400-999", 1000), Ranges::Whole);
        assert_eq!(parse("bytes=-600,0-500", 1000), Ranges::Whole);
        // Up to the length, even overlapping, is still served as asked.
        assert_eq!(
            parse("bytes=0-499,400-899", 1000),
            Ranges::Multiple(vec![(0, 499), (400, 899)])
        );
        assert_eq!(
            parse("bytes=0-499,500-999", 1000),
            Ranges::Multiple(vec![(0, 499), (500, 999)])
        );
        assert_eq!(parse("bytes=0-", 1000), Ranges::Single(0, 999));
    }
}
