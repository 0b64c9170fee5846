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

/// S4: a file system mounted beneath the root (a bind mount of somewhere else, say) was
/// followed: `RESOLVE_BENEATH` stops paths leaving the root's tree, not crossing into another
/// mount inside it. With `RESOLVE_NO_XDEV` such paths are refused as escaping, as are
/// listings of the mount. The mount is made in a private mount namespace of a child process
/// (this test binary, re-run under `unshare -m`), so nothing outside it sees it; without the
/// privilege for that, the test is skipped.
#[test]
fn a_mount_beneath_the_root_is_not_followed() {
    if let Ok(root) = std::env::var("FS_XDEV_ROOT") {
        // The child, in its own mount namespace.
        let root = PathBuf::from(root);
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(root.join("mnt"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(mounted, "mount failed in the private namespace");
        std::fs::write(root.join("mnt/other.html"), b"another file system").unwrap();
        let r = Root::open_dir(&root).unwrap();
        assert!(r.open("index.html").is_ok());
        assert!(
            matches!(r.open("mnt/other.html"), Err(OpenError::Escapes)),
            "a file on another mount beneath the root was opened"
        );
        assert!(matches!(r.list("mnt", 10), Err(OpenError::Escapes)));
        // Unless the operator asks for it.
        let follow = Root::open_dir_with(&root, true).unwrap();
        assert!(follow.open("mnt/other.html").is_ok());
        return;
    }
    let (t, _) = tree("xdev");
    let root = t.0.join("root");
    std::fs::create_dir_all(root.join("mnt")).unwrap();
    let out = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "a_mount_beneath_the_root_is_not_followed",
            "--exact",
            "--test-threads=1",
        ])
        .env("FS_XDEV_ROOT", &root)
        .output();
    let Ok(out) = out else {
        eprintln!("skipped: no unshare(1)");
        return;
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && text.contains("unshare failed") {
        eprintln!("skipped: cannot make a mount namespace here: {text}");
        return;
    }
    assert!(out.status.success(), "{text}");
}
