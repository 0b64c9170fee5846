//! Fuzz target for the request parser and the code that runs on what it returns.
//!
//! Under `cargo test` (stable Rust) bolero feeds it a few thousand random and mutated inputs,
//! seeded with real requests; with a fuzzing engine it runs for as long as one likes:
//!
//! ```text
//! cargo install cargo-bolero
//! cargo bolero test --package splitos-http --test fuzz_request request_head   # libFuzzer (needs nightly)
//! cargo bolero test --package splitos-http --test fuzz_request request_head --engine afl
//! ```
//!
//! Whatever the bytes, parsing must end in a request, "need more" or a 4xx/5xx error, never a
//! panic or a hang, and what it returns must be consistent: a complete head consumed within
//! the buffer, and re-parsing exactly those bytes gives the same request.

use splitos_http::request::{parse, Body, Limits, Parsed};
use splitos_http::{range, target};

fn check(input: &[u8]) {
    let limits = Limits {
        max_request_line: 256,
        max_head: 1024,
        max_headers: 16,
    };
    match parse(input, &limits) {
        Ok(Parsed::Complete(req, used)) => {
            assert!(
                used > 0 && used <= input.len(),
                "consumed {used} of {}",
                input.len()
            );
            assert!(
                used <= limits.max_head,
                "a head longer than the limit was accepted"
            );
            assert!(req.headers.len() <= limits.max_headers);
            assert!(!matches!(req.body, Body::Length(_) | Body::Chunked) || used <= input.len());
            // The same bytes alone parse to the same request.
            match parse(&input[..used], &limits) {
                Ok(Parsed::Complete(again, n)) => {
                    assert_eq!(n, used);
                    assert_eq!(again.target, req.target);
                    assert_eq!(again.body, req.body);
                    assert_eq!(again.keep_alive, req.keep_alive);
                }
                other => panic!("re-parsing the head gave {other:?}"),
            }
            // What the server does next with it must not panic either.
            // (A decoded `..` is passed on: refusing it is the file server's job.)
            if let Ok(path) = target::decode_path(&req.target) {
                assert!(!path.contains('\0'), "{path:?}");
            }
            if let Some(r) = req.header("range") {
                for len in [0u64, 1, 100, u64::MAX] {
                    if let range::Ranges::Single(a, b) = range::parse(r, len) {
                        assert!(a <= b && b < len, "{r:?} on {len} bytes gave {a}-{b}");
                    }
                }
            }
        }
        Ok(Parsed::Partial) => {
            assert!(
                input.len() <= limits.max_head,
                "an over-long head is still 'partial'"
            );
        }
        Err(e) => assert!((400..600).contains(&e.status), "status {}", e.status),
    }
}

#[test]
fn request_head() {
    // Seeds: requests the server sees every day, which the engine mutates.
    for seed in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET /a%20b/../c?q=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"HEAD /f HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1,5-\r\nIf-None-Match: \"x\", W/\"y\"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        check(seed);
    }
    bolero::check!()
        .with_iterations(20_000)
        .for_each(|input: &[u8]| check(input));
}
