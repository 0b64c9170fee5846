//! Path safety against a traversal list, symlink escapes and special files; sealed segments
//! with exact content that nobody can change.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use splitos_file_server::path::{OpenError, Root};
use splitos_file_server::segment::{Segment, SegmentError};
use std::os::unix::fs::symlink;
use std::path::PathBuf;

struct Tree(PathBuf);
impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// root/{index.html, sub/a.txt, link-in -> sub/a.txt, link-out -> /etc/passwd, up -> ..,
/// fifo}, and a secret file beside the root.
fn tree(tag: &str) -> (Tree, Root) {
    let base = std::env::temp_dir().join(format!("splitos-fs-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("root");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("index.html"), b"<h1>hi</h1>").unwrap();
    std::fs::write(root.join("sub/a.txt"), b"inside").unwrap();
    std::fs::write(base.join("secret"), b"do not serve").unwrap();
    symlink("sub/a.txt", root.join("link-in")).unwrap();
    symlink("/etc/passwd", root.join("link-out")).unwrap();
    symlink("../secret", root.join("link-up")).unwrap();
    symlink("..", root.join("up")).unwrap();
    symlink("/dev/null", root.join("devnull")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let r = Root::open_dir(&root).unwrap();
    (Tree(base), r)
}

#[test]
fn only_regular_files_beneath_the_root_are_opened() {
    let (_t, root) = tree("paths");
    assert_eq!(root.open("index.html").unwrap().path, "index.html");
    assert_eq!(root.open("./sub//a.txt").unwrap().path, "sub/a.txt");
    assert!(
        root.open("link-in").is_ok(),
        "a symlink that stays inside is fine"
    );
    for bad in [
        "../secret",
        "sub/../../secret",
        "/etc/passwd",
        "..",
        "sub/..",
        "a\0b",
        "",
    ] {
        assert!(
            matches!(root.open(bad), Err(OpenError::Path(_))),
            "{bad:?} not refused as a path"
        );
    }
    for escape in [
        "link-out",
        "link-up",
        "up/secret",
        "up/root/index.html",
        "devnull",
    ] {
        assert!(
            matches!(root.open(escape), Err(OpenError::Escapes)),
            "{escape:?}: {:?}",
            root.open(escape).err()
        );
    }
    assert!(matches!(root.open("fifo"), Err(OpenError::Special)));
    assert!(matches!(root.open("sub"), Err(OpenError::Directory)));
    assert!(matches!(
        root.open("missing.html"),
        Err(OpenError::NotFound)
    ));
    // Percent-encoded names are literal names here (decoding is the HTTP layer's job).
    assert!(matches!(
        root.open("%2e%2e/secret"),
        Err(OpenError::NotFound)
    ));
}

#[test]
fn segments_hold_exact_sealed_content() {
    let (t, root) = tree("segments");
    for size in [0usize, 1, 4096, (1 << 20) + 7] {
        let body: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(t.0.join("root/f.bin"), &body).unwrap();
        let seg = Segment::load(root.open("f.bin").unwrap()).unwrap();
        assert_eq!(seg.len(), size as u64);
        assert!(seg.bytes() == body.as_slice(), "content of {size} bytes");
        if size > 0 {
            // Nobody can change the bytes: writes are refused by the seal.
            let err = rustix::io::pwrite(seg.fd(), b"x", 0).unwrap_err();
            assert_eq!(err, rustix::io::Errno::PERM);
        }
        // Another process's view (here: a duplicate fd) sees the same bytes.
        let dup = seg.fd().try_clone_to_owned().unwrap();
        let other = Segment::from_received(dup, seg.version(), seg.len()).unwrap();
        assert!(other.bytes() == body.as_slice());
    }
}

#[test]
fn a_changed_file_is_a_new_version_and_unsealed_memory_is_refused() {
    let (t, root) = tree("versions");
    std::fs::write(t.0.join("root/v.txt"), b"one").unwrap();
    let v1 = Segment::load(root.open("v.txt").unwrap()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(10));
    std::fs::write(t.0.join("root/v.txt"), b"two!").unwrap();
    let v2 = Segment::load(root.open("v.txt").unwrap()).unwrap();
    assert_ne!(v1.version(), v2.version());
    assert_ne!(v1.version().etag(), v2.version().etag());
    assert_eq!(v1.bytes(), b"one", "the old version stays intact");
    assert_eq!(v2.bytes(), b"two!");

    let plain = rustix::fs::memfd_create("x", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&plain, 3).unwrap();
    assert!(matches!(
        Segment::from_received(plain, v1.version(), 3),
        Err(SegmentError::NotSealed)
    ));
}
