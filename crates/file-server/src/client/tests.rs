//! Unit tests of `client`.

use super::*;

#[test]
fn chunk_layouts_a_server_could_produce_and_no_others() {
    assert_eq!(chunk_layout(0, 0), Some((1, 1)));
    assert_eq!(chunk_layout(10, 10), Some((10, 1)));
    assert_eq!(chunk_layout(10_000, 4096), Some((4096, 3)));
    assert_eq!(
        chunk_layout(1, 0),
        None,
        "an empty first chunk of a longer file"
    );
    assert_eq!(chunk_layout(10_000, 100), None, "chunks under 4 KiB");
    assert_eq!(chunk_layout(4 << 30, 4 << 30), None, "one chunk over 1 GiB");
    assert_eq!(chunk_layout(1 << 62, 4096), None, "too many chunks");
    assert_eq!(chunk_len_of(10_000, 4096, 0), Some(4096));
    assert_eq!(chunk_len_of(10_000, 4096, 2), Some(10_000 - 8192));
    assert_eq!(chunk_len_of(10_000, 4096, 3), None);
    assert_eq!(chunk_len_of(0, 4096, 0), Some(0));
    assert_eq!(chunk_len_of(0, 4096, 1), None);
    assert_eq!(
        chunk_len_of(u64::MAX, 1 << 30, u64::MAX),
        None,
        "no overflow"
    );
}
