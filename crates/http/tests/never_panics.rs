//! Whatever a client sends, the parsers answer with a value or an error — never a panic.

use proptest::prelude::*;
use splitos_http::{conditional, range, request, target};

proptest! {
    #[test]
    fn request_parser(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = request::parse(&bytes, &request::Limits::default());
    }

    #[test]
    fn request_parser_on_almost_valid_heads(
        target in "[ -~]{0,64}", name in "[A-Za-z-]{1,16}", value in "[ -~]{0,64}", n in 0u8..4,
    ) {
        let head = format!("GET {target} HTTP/1.1\r\nHost: x\r\n{name}: {value}\r\n{}\r\n", "X: y\r\n".repeat(n as usize));
        if let Ok(request::Parsed::Complete(r, used)) = request::parse(head.as_bytes(), &request::Limits::default()) {
            prop_assert!(used <= head.len());
            prop_assert!(r.target.starts_with('/'));
        }
    }

    #[test]
    fn ranges(header in "[ -~]{0,64}", len in 0u64..10_000) {
        match range::parse(&header, len) {
            range::Ranges::Single(a, b) => prop_assert!(a <= b && b < len),
            range::Ranges::Multiple(rs) => {
                prop_assert!(rs.len() <= range::MAX_RANGES);
                for (a, b) in rs { prop_assert!(a <= b && b < len); }
            }
            _ => {}
        }
    }

    #[test]
    fn targets_and_preconditions(t in "[ -~]{0,64}", h in "[ -~]{0,64}") {
        let _ = target::decode_path(&t);
        let v = conditional::Validators { etag: "\"e\"", last_modified: std::time::SystemTime::UNIX_EPOCH };
        let _ = conditional::evaluate(|_| Some(h.as_str()), &v, true);
        let _ = conditional::range_applies(Some(&h), &v);
    }
}
