//! `Content-Type` by file extension. Text types carry `charset=utf-8`.

/// The content type for a path, by its extension (case-insensitive); `application/octet-stream`
/// when unknown.
pub fn content_type(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path);
    let ext = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => ext.to_ascii_lowercase(),
        _ => return "application/octet-stream",
    };
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "txt" | "text" | "log" => "text/plain; charset=utf-8",
        "md" => "text/markdown; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "bmp" => "image/bmp",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "pdf" => "application/pdf",
        "wasm" => "application/wasm",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "tar" => "application/x-tar",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "wav" => "audio/wav",
        _ => "application/octet-stream",
    }
}

/// Every type [`content_type`] can return, so a type fits in one byte (shared memory stores
/// the index: see [`code`] and [`from_code`]).
///
/// The indices are a shared-memory contract: the file server's directory stores them, and a
/// reader may be another build. Reordering, removing or adding a type changes what other builds
/// read, so it needs a bump of the directory's `VERSION` (`crates/file-server/src/directory.rs`);
/// the test `type_codes_are_pinned` fails until the new table is written down there too.
pub const TYPES: [&str; 31] = [
    "application/octet-stream",
    "text/html; charset=utf-8",
    "text/css; charset=utf-8",
    "text/javascript; charset=utf-8",
    "application/json",
    "text/plain; charset=utf-8",
    "text/markdown; charset=utf-8",
    "text/csv; charset=utf-8",
    "application/xml",
    "image/svg+xml",
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "image/avif",
    "image/x-icon",
    "image/bmp",
    "font/woff",
    "font/woff2",
    "font/ttf",
    "font/otf",
    "application/pdf",
    "application/wasm",
    "application/zip",
    "application/gzip",
    "application/x-tar",
    "video/mp4",
    "video/webm",
    "audio/mpeg",
    "audio/ogg",
    "audio/wav",
];

/// The index of `content_type(path)` in [`TYPES`].
pub fn code(path: &str) -> u8 {
    let t = content_type(path);
    TYPES.iter().position(|x| *x == t).unwrap_or(0) as u8
}

/// The type with index `code`; unknown codes (from an untrusted peer) give the default.
pub fn from_code(code: u8) -> &'static str {
    TYPES.get(code as usize).copied().unwrap_or(TYPES[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_extension() {
        assert_eq!(content_type("/index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("a/B.PNG"), "image/png");
        assert_eq!(content_type("style.css"), "text/css; charset=utf-8");
        assert_eq!(content_type("/.hidden"), "application/octet-stream");
        assert_eq!(content_type("/README"), "application/octet-stream");
        assert_eq!(content_type("/x.tar.gz"), "application/gzip");
        for p in ["a.html", "b.png", "c.unknown", "d.woff2"] {
            assert_eq!(from_code(code(p)), content_type(p));
        }
        assert_eq!(from_code(255), "application/octet-stream");
    }

    /// The code table, written out: the directory in shared memory stores these indices. If
    /// this fails, bump `VERSION` in `crates/file-server/src/directory.rs`, then update the list.
    #[test]
    fn type_codes_are_pinned() {
        let pinned = [
            (0, "application/octet-stream"),
            (1, "text/html; charset=utf-8"),
            (2, "text/css; charset=utf-8"),
            (3, "text/javascript; charset=utf-8"),
            (4, "application/json"),
            (5, "text/plain; charset=utf-8"),
            (6, "text/markdown; charset=utf-8"),
            (7, "text/csv; charset=utf-8"),
            (8, "application/xml"),
            (9, "image/svg+xml"),
            (10, "image/png"),
            (11, "image/jpeg"),
            (12, "image/gif"),
            (13, "image/webp"),
            (14, "image/avif"),
            (15, "image/x-icon"),
            (16, "image/bmp"),
            (17, "font/woff"),
            (18, "font/woff2"),
            (19, "font/ttf"),
            (20, "font/otf"),
            (21, "application/pdf"),
            (22, "application/wasm"),
            (23, "application/zip"),
            (24, "application/gzip"),
            (25, "application/x-tar"),
            (26, "video/mp4"),
            (27, "video/webm"),
            (28, "audio/mpeg"),
            (29, "audio/ogg"),
            (30, "audio/wav"),
        ];
        assert_eq!(TYPES.len(), pinned.len(), "a type was added or removed");
        for (code, ty) in pinned {
            assert_eq!(TYPES[code], ty, "code {code} changed");
            assert_eq!(from_code(code as u8), ty);
        }
    }
}
