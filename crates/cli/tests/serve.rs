//! `splitos serve` through real clients: curl (status codes, ranges, validators, HEAD,
//! keep-alive reuse), Python's http.client, raw sockets for pipelining and malformed requests,
//! and 1,000 concurrent keep-alive connections with every body checked.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_splitos");

struct Server {
    child: Child,
    port: u16,
    site: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.child.id() as i32).unwrap(),
            rustix::process::Signal::TERM,
        );
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.site);
    }
}

fn serve(tag: &str) -> Server {
    serve_with(tag, &[])
}

fn serve_with(tag: &str, extra: &[&str]) -> Server {
    let site =
        std::env::temp_dir().join(format!("splitos-serve-test-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(site.join("docs")).unwrap();
    std::fs::write(site.join("index.html"), b"<h1>home</h1>").unwrap();
    std::fs::write(site.join("docs/index.html"), b"<h1>docs</h1>").unwrap();
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(site.join("data.bin"), &body).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .arg(&site)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|_| panic!("unexpected first line {line:?}"));
    Server { child, port, site }
}

/// Only the status code of a curl request.
fn code(args: &[&str]) -> String {
    let mut all = vec!["-w", "%{http_code}", "-o", "/dev/null"];
    all.extend_from_slice(args);
    curl(&all)
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn curl_sees_the_behaviour_users_expect() {
    let s = serve("curl");
    let url = |p: &str| format!("http://127.0.0.1:{}{p}", s.port);
    assert_eq!(curl(&[&url("/")]), "<h1>home</h1>");
    assert_eq!(code(&[&url("/nope")]), "404");
    assert_eq!(
        curl(&[
            "-w",
            "%{http_code} %{redirect_url}",
            "-o",
            "/dev/null",
            &url("/docs")
        ]),
        format!("301 {}", url("/docs/"))
    );
    assert_eq!(curl(&["-L", &url("/docs")]), "<h1>docs</h1>");
    let head = curl(&["-I", &url("/data.bin")]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("Content-Length: 100000"), "{head}");
    assert!(
        head.contains("Content-Type: application/octet-stream"),
        "{head}"
    );
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("ETag: "))
        .unwrap()
        .trim()
        .to_string();
    let lm = head
        .lines()
        .find_map(|l| l.strip_prefix("Last-Modified: "))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        code(&["-H", &format!("If-None-Match: {etag}"), &url("/data.bin")]),
        "304"
    );
    assert_eq!(
        code(&["-H", &format!("If-Modified-Since: {lm}"), &url("/data.bin")]),
        "304"
    );
    assert_eq!(
        code(&["-H", "If-Match: \"other\"", &url("/data.bin")]),
        "412"
    );
    let part = curl(&["-i", "-H", "Range: bytes=10-19", &url("/data.bin")]);
    assert!(part.starts_with("HTTP/1.1 206"), "{part}");
    assert!(part.contains("Content-Range: bytes 10-19/100000"), "{part}");
    assert!(part.as_bytes().ends_with(&(10..20u8).collect::<Vec<u8>>()));
    assert_eq!(
        code(&["-H", "Range: bytes=200000-", &url("/data.bin")]),
        "416"
    );
    assert_eq!(
        code(&[
            "-H",
            "Range: bytes=0-1",
            "-H",
            "If-Range: \"stale\"",
            &url("/data.bin")
        ]),
        "200"
    );
    let post = curl(&["-i", "-X", "POST", &url("/")]);
    assert!(
        post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET, HEAD"),
        "{post}"
    );
    assert_eq!(code(&["--path-as-is", &url("/../../etc/passwd")]), "403");
    assert_eq!(code(&[&url("/%2e%2e/%2e%2e/etc/passwd")]), "403");
    // Keep-alive reuse: one connection for two requests.
    let two = Command::new("curl")
        .args([
            "-s",
            "-v",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            &url("/"),
            &url("/data.bin"),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&two.stderr);
    assert!(
        err.contains("Re-using existing connection") || err.contains("Reusing existing"),
        "{err}"
    );
}

#[test]
fn python_http_client_keeps_the_connection_alive() {
    let s = serve("python");
    let script = format!(
        "import http.client\nc=http.client.HTTPConnection('127.0.0.1',{},timeout=10)\nfor i in range(20):\n    c.request('GET','/data.bin')\n    r=c.getresponse()\n    b=r.read()\n    assert r.status==200 and len(b)==100000 and b[:3]==bytes([0,1,2]), (r.status, len(b))\nc.request('HEAD','/')\nr=c.getresponse(); r.read()\nassert r.status==200 and r.getheader('Content-Length')=='13'\nprint('ok')\n",
        s.port
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

fn raw(port: u16, req: &[u8]) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(req).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn pipelining_and_hostile_requests() {
    let s = serve("raw");
    let two = raw(s.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /docs/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let first = two.find("<h1>home</h1>").expect("first response");
    let second = two.find("<h1>docs</h1>").expect("second response");
    assert!(first < second, "responses out of order");
    let v10 = raw(s.port, b"GET / HTTP/1.0\r\n\r\n");
    assert!(
        v10.starts_with("HTTP/1.1 200") && v10.ends_with("<h1>home</h1>"),
        "{v10}"
    );
    for (req, want) in [
        (
            &b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            "400",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "400",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n folded\r\n\r\n",
            "400",
        ),
        (b"GARBAGE\r\n\r\n", "400"),
    ] {
        let r = raw(s.port, req);
        assert!(
            r.starts_with(&format!("HTTP/1.1 {want}")),
            "{:?} -> {r}",
            String::from_utf8_lossy(req)
        );
    }
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(10_000));
    assert!(raw(s.port, long.as_bytes()).starts_with("HTTP/1.1 414"));
    let many: String = (0..200).map(|i| format!("X-{i}: v\r\n")).collect();
    assert!(raw(
        s.port,
        format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes()
    )
    .starts_with("HTTP/1.1 431"));
    // A body on GET is consumed, not parsed as the next request.
    let r = raw(s.port, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\n\r\nGET /nope HTTP/1.1GET /docs/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(!r.contains("404"), "the body was parsed as a request: {r}");
    assert!(r.contains("<h1>docs</h1>"), "{r}");
}

#[test]
fn a_thousand_concurrent_keep_alive_connections() {
    let s = serve("many");
    let port = s.port;
    let threads: Vec<_> = (0..10)
        .map(|_| {
            std::thread::spawn(move || {
                let mut conns: Vec<BufReader<TcpStream>> = (0..100)
                    .map(|_| {
                        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                        BufReader::new(c)
                    })
                    .collect();
                for _round in 0..3 {
                    for c in &mut conns {
                        c.get_mut()
                            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                            .unwrap();
                    }
                    for c in &mut conns {
                        let mut len = 0usize;
                        loop {
                            let mut l = String::new();
                            c.read_line(&mut l).unwrap();
                            if l == "\r\n" {
                                break;
                            }
                            if let Some(v) = l.strip_prefix("Content-Length: ") {
                                len = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0u8; len];
                        c.read_exact(&mut body).unwrap();
                        assert_eq!(body, b"<h1>home</h1>");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn access_log_in_common_log_format() {
    let log = std::env::temp_dir().join(format!("splitos-serve-log-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let s = serve_with("log", &["--access-log", log.to_str().unwrap()]);
    assert_eq!(
        curl(&[&format!("http://127.0.0.1:{}/", s.port)]),
        "<h1>home</h1>"
    );
    assert_eq!(
        curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{}/x", s.port)
        ]),
        "404"
    );
    drop(s); // SIGTERM: the log is flushed on the way out
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("127.0.0.1 - - ["), "{}", lines[0]);
    assert!(
        lines[0].ends_with("\"GET / HTTP/1.1\" 200 13"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("\"GET /x HTTP/1.1\" 404 "),
        "{}",
        lines[1]
    );
    let _ = std::fs::remove_file(&log);
}

#[test]
fn precompressed_siblings_and_multipart_ranges() {
    let s = serve("encodings");
    let text = "split-os ".repeat(500);
    std::fs::write(s.site.join("page.txt"), &text).unwrap();
    let gz = Command::new("gzip")
        .args(["-k", "-9"])
        .arg(s.site.join("page.txt"))
        .status()
        .unwrap();
    assert!(gz.success());
    let url = format!("http://127.0.0.1:{}/page.txt", s.port);
    // Asked for gzip: the .gz sibling, decoded by curl to the original text.
    let head = curl(&["-s", "-D", "-", "-o", "/dev/null", "--compressed", &url]);
    assert!(head.contains("Content-Encoding: gzip"), "{head}");
    assert!(head.contains("Vary: Accept-Encoding"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; charset=utf-8"),
        "{head}"
    );
    assert_eq!(curl(&["--compressed", &url]), text);
    // Not asked for (or refused with q=0): the identity representation.
    let plain = curl(&["-s", "-D", "-", "-o", "/dev/null", &url]);
    assert!(!plain.contains("Content-Encoding"), "{plain}");
    let refused = curl(&[
        "-s",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        "Accept-Encoding: gzip;q=0",
        &url,
    ]);
    assert!(!refused.contains("Content-Encoding"), "{refused}");
    // Several ranges: multipart/byteranges with each part's Content-Range.
    let multi = curl(&[
        "-i",
        "-H",
        "Range: bytes=0-1,9-10",
        &format!("http://127.0.0.1:{}/data.bin", s.port),
    ]);
    assert!(multi.starts_with("HTTP/1.1 206"), "{multi}");
    assert!(multi.contains("multipart/byteranges; boundary="), "{multi}");
    assert!(multi.contains("Content-Range: bytes 0-1/100000"), "{multi}");
    assert!(
        multi.contains("Content-Range: bytes 9-10/100000"),
        "{multi}"
    );
}
