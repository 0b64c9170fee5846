//! `splitos serve` through real clients: curl (status codes, ranges, validators, HEAD,
//! keep-alive reuse), Python's http.client, raw sockets for pipelining and malformed requests,
//! and 1,000 concurrent keep-alive connections with every body checked.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_splitos");
type Server = common::Served;

fn serve(tag: &str) -> Server {
    serve_with(tag, &[])
}

fn serve_with(tag: &str, extra: &[&str]) -> Server {
    serve_env(tag, extra, &[])
}

/// `splitos serve` with more arguments and environment variables.
fn serve_env(tag: &str, extra: &[&str], env: &[(&str, &std::path::Path)]) -> Server {
    let site =
        std::env::temp_dir().join(format!("splitos-serve-test-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(site.join("docs")).unwrap();
    std::fs::write(site.join("index.html"), b"<h1>home</h1>").unwrap();
    std::fs::write(site.join("docs/index.html"), b"<h1>docs</h1>").unwrap();
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(site.join("data.bin"), &body).unwrap();
    common::Served::start(site, extra, env)
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
    // The redirect to a directory's slash names the normalized path, never `//host`.
    let r = raw(
        s.port,
        b"GET ///docs?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        r.starts_with("HTTP/1.1 301") && r.contains("\r\nLocation: /docs/?x=1\r\n"),
        "{r}"
    );
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
    assert!(
        !r.contains("HTTP/1.1 404"),
        "the body was parsed as a request: {r}"
    );
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
    // A quote in the target must not end the request field early.
    let r = raw(
        s.port,
        b"GET /q\"uote HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    drop(s); // SIGTERM: the log is flushed on the way out
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[2].contains("\"GET /q\\x22uote HTTP/1.1\" 404 "),
        "{}",
        lines[2]
    );
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

/// Reads one HTTP/1.1 response (head, then a Content-Length body) from a keep-alive connection.
fn read_response(c: &mut BufReader<TcpStream>) -> std::io::Result<(String, Vec<u8>)> {
    let mut status = String::new();
    c.read_line(&mut status)?;
    if status.is_empty() {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    }
    let mut len = 0usize;
    loop {
        let mut l = String::new();
        if c.read_line(&mut l)? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        if l == "\r\n" {
            break;
        }
        if let Some(v) = l.strip_prefix("Content-Length: ") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; len];
    c.read_exact(&mut body)?;
    Ok((status.trim().to_string(), body))
}

/// The HTTP application's process: the serve process's only child.
fn app_pid(server_pid: u32) -> Option<u32> {
    let kids =
        std::fs::read_to_string(format!("/proc/{server_pid}/task/{server_pid}/children")).ok()?;
    kids.split_whitespace().next()?.parse().ok()
}

/// Reloads under load: keep-alive clients (never reconnecting) and connection-per-request
/// clients run a bounded loop, every body checked, while the application is replaced four
/// times (`splitos reload` three times, SIGHUP once). No request may fail, no keep-alive
/// connection may be dropped, and the application process must really be a new one each time.
#[test]
fn reload_under_load_fails_no_request_and_keeps_every_connection() {
    let s = serve("reload");
    let port = s.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut clients = Vec::new();
    for t in 0..12 {
        let stop = stop.clone();
        let data = data.clone();
        clients.push(std::thread::spawn(move || -> Result<u64, String> {
            let keep_alive = t % 3 != 0;
            let open = || -> Result<BufReader<TcpStream>, String> {
                let c = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
                c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                Ok(BufReader::new(c))
            };
            let mut conn = open()?;
            let mut done = 0u64;
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && done < 200_000 {
                if std::time::Instant::now() > deadline {
                    return Err("the load loop ran past its 60 s bound".into());
                }
                let (path, want): (&str, &[u8]) = if done % 2 == 0 {
                    ("/", b"<h1>home</h1>")
                } else {
                    ("/data.bin", &data)
                };
                let close = if keep_alive {
                    ""
                } else {
                    "Connection: close\r\n"
                };
                let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{close}\r\n");
                conn.get_mut()
                    .write_all(req.as_bytes())
                    .map_err(|e| format!("request {done} on thread {t}: write: {e}"))?;
                let (status, body) = read_response(&mut conn)
                    .map_err(|e| format!("request {done} ({path}) on thread {t}: {e}"))?;
                if status != "HTTP/1.1 200 OK" || body != want {
                    return Err(format!(
                        "request {done} ({path}) on thread {t}: {status}, {} bytes",
                        body.len()
                    ));
                }
                done += 1;
                if !keep_alive {
                    conn = open()?;
                }
            }
            Ok(done)
        }));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut pids = vec![app_pid(s.child.id()).expect("the application process")];
    for round in 0..4 {
        if round == 2 {
            rustix::process::kill_process(
                rustix::process::Pid::from_raw(s.child.id() as i32).unwrap(),
                rustix::process::Signal::HUP,
            )
            .unwrap();
            let t0 = std::time::Instant::now();
            while app_pid(s.child.id()) == pids.last().copied() {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "SIGHUP did not reload"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            // Let the old instance finish exiting.
            std::thread::sleep(Duration::from_millis(300));
        } else {
            let out = Command::new(BIN)
                .args(["reload", "--listen", &format!("127.0.0.1:{port}")])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.starts_with("reloaded: generation"),
                "reload {round}: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let pid = app_pid(s.child.id()).expect("an application after the reload");
        assert!(!pids.contains(&pid), "reload {round} kept process {pid}");
        pids.push(pid);
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        total += c.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(total > 100, "only {total} requests were served");
    // Everyone reached the new instance too.
    assert_eq!(code(&[&format!("http://127.0.0.1:{port}/")]), "200");
}

/// An application that is killed (kill -9) is restarted; the listener lives in the TCP server,
/// so connection attempts made meanwhile wait in its backlog instead of being refused.
#[test]
fn a_killed_application_is_restarted_and_no_connection_is_refused() {
    let s = serve("restart");
    let old = app_pid(s.child.id()).expect("the application process");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(old as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    // Once the supervisor has started the successor, and typically before that one listens,
    // connect. The kernel accepts into the parked listener's backlog; the successor answers.
    // (Connections the application held go on to the successor too: see tests/crash.rs.)
    let t0 = std::time::Instant::now();
    while app_pid(s.child.id()).is_none_or(|p| p == old) {
        assert!(t0.elapsed() < Duration::from_secs(10), "no new instance");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).expect("not refused");
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    assert!(out.ends_with("<h1>home</h1>"), "{out}");
    let new = app_pid(s.child.id()).expect("a new application");
    assert_ne!(new, old);
}

#[test]
fn directory_listings_only_when_asked_and_never_outside_the_root() {
    let s = serve_with("list", &["--list-dirs"]);
    std::fs::create_dir_all(s.site.join("files/sub")).unwrap();
    std::fs::write(s.site.join("files/a <b>.txt"), b"x").unwrap();
    std::fs::write(s.site.join("files/.secret"), b"x").unwrap();
    std::os::unix::fs::symlink("/etc", s.site.join("files/escape")).unwrap();
    let page = curl(&[&format!("http://127.0.0.1:{}/files/", s.port)]);
    assert!(page.contains("Index of /files/"), "{page}");
    assert!(page.contains("<a href=\"sub/\">sub/</a>"), "{page}");
    assert!(
        page.contains("<a href=\"a%20%3Cb%3E.txt\">a &lt;b&gt;.txt</a>"),
        "{page}"
    );
    assert!(!page.contains("secret"), "dotfiles are listed: {page}");
    // Listed (it is there), but neither the link nor a listing through it leaves the root.
    assert!(page.contains("escape"), "{page}");
    let through = format!("http://127.0.0.1:{}/files/escape/", s.port);
    assert_eq!(code(&[&through]), "403");
    assert_eq!(
        code(&[&format!("http://127.0.0.1:{}/files/escape/passwd", s.port)]),
        "403"
    );
    assert_eq!(
        code(&[&format!("http://127.0.0.1:{}/files/nothere/", s.port)]),
        "404"
    );
    // A directory with an index.html is served the page, not a listing.
    assert_eq!(
        curl(&[&format!("http://127.0.0.1:{}/docs/", s.port)]),
        "<h1>docs</h1>"
    );
    let plain = serve("nolist");
    std::fs::create_dir_all(plain.site.join("files")).unwrap();
    assert_eq!(
        code(&[&format!("http://127.0.0.1:{}/files/", plain.port)]),
        "404"
    );
}

#[test]
fn reload_without_a_server_says_so() {
    let out = Command::new(BIN)
        .args(["reload", "--listen", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no `splitos serve` answers"), "{err}");
}

/// `splitos status --json --listen` of `s` (with `env`).
fn status_json(s: &Server, env: &[(&str, &std::path::Path)]) -> serde_json::Value {
    let out = Command::new(BIN)
        .args([
            "status",
            "--json",
            "--listen",
            &format!("127.0.0.1:{}", s.port),
        ])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Requests answered by the TCP server itself so far, from `splitos status`.
fn direct_responses(s: &Server) -> u64 {
    // The statistics are refreshed every 100 ms.
    std::thread::sleep(Duration::from_millis(250));
    status_json(s, &[])["summary"]["direct_answers"]
        .as_u64()
        .unwrap()
}

/// The direct path: once the cache holds a file, the TCP server answers requests for it
/// without the application; a request it cannot answer (a 404 here) goes to the application
/// with everything after it, and responses stay in request order. With an access log, every
/// request goes through the application (the log is its own).
#[test]
fn the_tcp_server_answers_cached_files_itself_and_keeps_the_order() {
    let s = serve_with("direct", &["--idle-timeout", "2"]);
    let url = format!("http://127.0.0.1:{}/", s.port);
    assert_eq!(curl(&[&url]), "<h1>home</h1>"); // the first one fills the cache
    let before = direct_responses(&s);
    for _ in 0..5 {
        assert_eq!(curl(&[&url]), "<h1>home</h1>");
    }
    let after = direct_responses(&s);
    assert!(after >= before + 5, "direct responses {before} -> {after}");
    let r = raw(
        s.port,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /docs/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let home = r.find("<h1>home</h1>").expect("first response");
    let missing = r.find("404 Not Found").expect("second response");
    let docs = r.find("<h1>docs</h1>").expect("third response");
    assert!(home < missing && missing < docs, "out of order: {r}");
    // Idle connections answered directly are closed by the TCP server (--idle-timeout 2).
    let mut c = BufReader::new(TcpStream::connect(("127.0.0.1", s.port)).unwrap());
    c.get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    c.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (status, body) = read_response(&mut c).unwrap();
    assert_eq!(
        (status.as_str(), &body[..]),
        ("HTTP/1.1 200 OK", &b"<h1>home</h1>"[..])
    );
    let t0 = std::time::Instant::now();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("closed, not timed out");
    assert!(rest.is_empty());
    let idle = t0.elapsed();
    assert!(
        idle >= Duration::from_millis(1500) && idle < Duration::from_secs(6),
        "closed after {idle:?}"
    );

    let log = std::env::temp_dir().join(format!("splitos-direct-log-{}.log", std::process::id()));
    let logged = serve_with("direct-log", &["--access-log", log.to_str().unwrap()]);
    let url = format!("http://127.0.0.1:{}/", logged.port);
    for _ in 0..3 {
        assert_eq!(curl(&[&url]), "<h1>home</h1>");
    }
    assert_eq!(direct_responses(&logged), 0);
    let _ = std::fs::remove_file(&log);
}

/// A keep-alive connection whose first request the direct path could not answer (the file was
/// not cached yet) goes back to it once the application has answered; one whose requests keep
/// needing the application bounces with a growing back-off, every response in order. (A
/// missing file does not need the application once the file server has published its absence.)
#[test]
fn connections_return_to_the_direct_path_after_the_application_answers() {
    let s = serve("return");
    let mut c = BufReader::new(TcpStream::connect(("127.0.0.1", s.port)).unwrap());
    c.get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let get = |c: &mut BufReader<TcpStream>, path: &str| {
        c.get_mut()
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        read_response(c).unwrap()
    };
    let home = (String::from("HTTP/1.1 200 OK"), b"<h1>home</h1>".to_vec());
    assert_eq!(get(&mut c, "/"), home); // a miss: the application answers
    let before = direct_responses(&s);
    for _ in 0..5 {
        assert_eq!(get(&mut c, "/"), home);
    }
    let after = direct_responses(&s);
    assert_eq!(after, before + 5, "the same connection, answered directly");

    // A request with a body (which the direct path never answers) before every three hits.
    for i in 0..10 {
        c.get_mut()
            .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
            .unwrap();
        let (status, _) = read_response(&mut c).unwrap();
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed", "round {i}");
        for _ in 0..3 {
            assert_eq!(get(&mut c, "/"), home, "round {i}");
        }
    }
    let bounced = direct_responses(&s) - after;
    assert!(
        (1..30).contains(&bounced),
        "{bounced} of 30 hits answered directly: expected some, with back-off not all"
    );
}

/// Browsers always send Accept-Encoding: once the file server has found that a file has no
/// precompressed sibling, the TCP server knows it too and answers such requests itself.
#[test]
fn requests_accepting_compression_are_answered_directly_when_no_sibling_exists() {
    let s = serve("encodings");
    let url = format!("http://127.0.0.1:{}/", s.port);
    let ask = || curl(&["-H", "Accept-Encoding: gzip, br, zstd", &url]);
    assert_eq!(ask(), "<h1>home</h1>"); // the application looks for the siblings
    let before = direct_responses(&s);
    for _ in 0..5 {
        assert_eq!(ask(), "<h1>home</h1>");
    }
    assert_eq!(direct_responses(&s), before + 5);
    // A sibling that appears is served from then on (the TCP server defers until it is cached).
    std::fs::write(s.site.join("index.html.gz"), b"gzipped").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let got = loop {
        let got = curl(&["-H", "Accept-Encoding: gzip", &url]);
        if got == "gzipped" || std::time::Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(got, "gzipped");
}

/// Finding A28: files whose names start with a dot (`.git/config`, `.env`, `.htpasswd`) were
/// served. By default they are not found (404), on the direct path as in the application,
/// except under `/.well-known/` (RFC 8615: ACME challenges, security.txt); `--dotfiles`
/// serves them.
#[test]
fn dotfiles_are_not_served_unless_asked() {
    let hidden = serve("dotfiles");
    let shown = serve_with("dotfiles-on", &["--dotfiles"]);
    for s in [&hidden, &shown] {
        std::fs::create_dir_all(s.site.join(".git")).unwrap();
        std::fs::create_dir_all(s.site.join(".well-known")).unwrap();
        std::fs::create_dir_all(s.site.join("sub")).unwrap();
        std::fs::write(s.site.join(".git/config"), b"[core]").unwrap();
        std::fs::write(s.site.join(".env"), b"SECRET=1").unwrap();
        std::fs::write(s.site.join("sub/.htpasswd"), b"u:p").unwrap();
        std::fs::write(s.site.join(".well-known/security.txt"), b"Contact: x").unwrap();
    }
    let url = |s: &Server, p: &str| format!("http://127.0.0.1:{}{p}", s.port);
    // Twice each: the first request fills the cache, the second may be answered directly.
    for _ in 0..2 {
        for p in [
            "/.git/config",
            "/.env",
            "/sub/.htpasswd",
            "/%2egit/config",
            "/.git/",
        ] {
            assert_eq!(code(&[&url(&hidden, p)]), "404", "{p}");
        }
        assert_eq!(
            curl(&[&url(&hidden, "/.well-known/security.txt")]),
            "Contact: x"
        );
        assert_eq!(curl(&[&url(&shown, "/.git/config")]), "[core]");
        assert_eq!(curl(&[&url(&shown, "/.env")]), "SECRET=1");
        assert_eq!(curl(&[&url(&shown, "/sub/.htpasswd")]), "u:p");
    }
    assert_eq!(curl(&[&url(&hidden, "/")]), "<h1>home</h1>");
}

/// Trickles a request head that never ends into a new connection, one byte every 300 ms, and
/// returns how long after the first byte the server answered 408 and closed (`None`: it did
/// not within `limit`).
fn trickle_until_408(port: u16, limit: Duration) -> Option<Duration> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_millis(300))).ok()?;
    let t0 = std::time::Instant::now();
    let mut got = Vec::new();
    let head = b"GET /trickle HTTP/1.1\r\nX-Slow: ";
    let mut i = 0usize;
    while t0.elapsed() < limit {
        let b = head.get(i).copied().unwrap_or(b'a');
        i += 1;
        let _ = c.write_all(&[b]);
        let mut buf = [0u8; 512];
        match c.read(&mut buf) {
            Ok(0) => {
                let text = String::from_utf8_lossy(&got);
                return text.starts_with("HTTP/1.1 408").then(|| t0.elapsed());
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    None
}

/// Finding A13 (slow loris): the header timeout was an inactivity timer, so a byte every
/// `--header-timeout − 1` seconds kept a connection for hours. It is a deadline from the
/// first byte of the request. Here the HTTP application answers everything (--no-direct).
#[test]
fn a_trickled_head_gets_408_at_the_header_deadline() {
    let s = serve_with("loris", &["--no-direct", "--header-timeout", "2"]);
    let port = s.port;
    let lorises: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || trickle_until_408(port, Duration::from_secs(8))))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(code(&[&format!("http://127.0.0.1:{port}/")]), "200");
    for l in lorises {
        let after = l.join().unwrap();
        // Deadline 2 s, checked every 250 ms, after a byte every 300 ms.
        assert!(
            after.is_some_and(|d| d >= Duration::from_millis(1900) && d < Duration::from_secs(4)),
            "408 after {after:?}"
        );
    }
}

/// The same through the TCP server's direct path (the default), whose deadline is the
/// direct route's (`splitos_serve::direct`, from `DirectConn::pending_since`).
#[test]
fn a_trickled_head_gets_408_at_the_header_deadline_on_the_direct_path() {
    let s = serve_with("loris-direct", &["--header-timeout", "2"]);
    let after = trickle_until_408(s.port, Duration::from_secs(8));
    assert!(
        after.is_some_and(|d| d < Duration::from_secs(4)),
        "408 after {after:?}"
    );
}

/// A private runtime directory for one test: `XDG_RUNTIME_DIR` for the processes it starts.
struct RuntimeDir(std::path::PathBuf);
impl RuntimeDir {
    fn new(tag: &str) -> RuntimeDir {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("splitos-xdg-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        RuntimeDir(d)
    }
    fn env(&self) -> [(&'static str, &std::path::Path); 1] {
        [("XDG_RUNTIME_DIR", self.0.as_path())]
    }
}
impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Item 3: `splitos status` finds a running `splitos serve` (it said there was no server):
/// by `--listen`, or all of them with no argument, with connections, direct answers, the
/// file cache's hit ratio and the budgets in use.
#[test]
fn status_finds_serve_instances_and_shows_cache_and_budgets() {
    let rt = RuntimeDir::new("status");
    let env = rt.env();
    let a = serve_env("status-a", &["--max-conns", "500"], &env);
    let b = serve_env("status-b", &["--no-direct"], &env);
    let mut c = BufReader::new(TcpStream::connect(("127.0.0.1", a.port)).unwrap());
    c.get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for _ in 0..6 {
        c.get_mut()
            .write_all(b"GET /data.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (status, body) = read_response(&mut c).unwrap();
        assert_eq!((status.as_str(), body.len()), ("HTTP/1.1 200 OK", 100_000));
    }
    // The status file is rewritten twice a second.
    std::thread::sleep(Duration::from_millis(1200));
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("status")
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, text, err) = run(&["--listen", &format!("127.0.0.1:{}", a.port)]);
    assert!(ok, "{err}");
    assert!(
        text.contains(&format!("http://127.0.0.1:{}/", a.port)),
        "{text}"
    );
    assert!(
        text.contains("1 connections of 500 (--max-conns)"),
        "{text}"
    );
    assert!(text.contains("direct path       on"), "{text}");
    assert!(
        text.contains("% hits") && text.contains("(--cache-size)"),
        "{text}"
    );
    assert!(text.contains("splitos-serve"), "the session table: {text}");
    let v = status_json(&a, &env);
    assert!(v["summary"]["direct_answers"].as_u64() > Some(0), "{v}");
    let ratio = v["summary"]["cache_hit_ratio"].as_f64().unwrap_or(0.0);
    assert!(ratio > 0.5 && ratio < 1.0, "one miss, then hits: {v}");
    assert_eq!(v["serve"]["app"]["connections"].as_u64(), Some(1), "{v}");
    assert_eq!(v["serve"]["max_conns"].as_u64(), Some(500), "{v}");
    assert!(
        v["serve"]["files"]["cached_bytes"].as_u64() >= Some(100_000),
        "{v}"
    );
    // No argument: every server of this user.
    let (ok, text, err) = run(&[]);
    assert!(ok, "{err}");
    for s in [&a, &b] {
        assert!(
            text.contains(&format!("http://127.0.0.1:{}/", s.port)),
            "{text}"
        );
    }
    assert!(text.contains("direct path       off"), "{text}");
    let (ok, text, _) = run(&["--json"]);
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(ok && all.as_array().map(|a| a.len()) == Some(2), "{text}");
    // An address nobody serves: says which ones are served.
    let (ok, _, err) = run(&["--listen", "127.0.0.1:1"]);
    assert!(!ok && err.contains("running ones listen on"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{}", a.port)), "{err}");
    drop((a, b));
    let (ok, _, err) = run(&[]);
    assert!(
        !ok && err.contains("no Split-OS server of this user is running"),
        "{err}"
    );
}

/// Starts `splitos serve` with `env` and returns its exit status and stderr if it exits within
/// 10 s (it is killed otherwise).
fn serve_refusal(env: &[(&str, &std::path::Path)]) -> (bool, String) {
    let site = std::env::temp_dir().join(format!("splitos-refusal-site-{}", std::process::id()));
    std::fs::create_dir_all(&site).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg(&site)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let exited = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            _ if std::time::Instant::now() > deadline => break None,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&site);
    (
        exited.is_some_and(|s| !s.success()),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Findings A6, A24: the runtime directory is used only if it is this user's own, writable
/// by no one else and not a symbolic link (`splitos serve` refuses with a clear error);
/// `$XDG_RUNTIME_DIR` comes first; the files of supervisors that were killed are removed at
/// the next start.
#[test]
fn the_runtime_directory_is_checked_and_dead_servers_files_removed() {
    use std::os::unix::fs::PermissionsExt;
    let rt = RuntimeDir::new("runtime");
    let env = rt.env();
    let dir = rt.0.join("splitos");
    // Writable by others.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (refused, err) = serve_refusal(&env);
    assert!(
        refused && err.contains("has mode 0777") && err.contains("chmod 700"),
        "{err}"
    );
    // Another user's (root can make one).
    if rustix::process::geteuid().is_root() {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let (refused, err) = serve_refusal(&env);
        assert!(refused && err.contains("belongs to uid 65534"), "{err}");
    }
    // A symbolic link to a good directory.
    std::fs::remove_dir_all(&dir).unwrap();
    let elsewhere = rt.0.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
    let (refused, err) = serve_refusal(&env);
    assert!(refused && err.contains("symbolic link"), "{err}");
    std::fs::remove_file(&dir).unwrap();

    // What a killed supervisor leaves: its directory, the control socket it named, and (from
    // older versions) a directory in /tmp.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = dir.join(format!("serve-{dead}"));
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("tcp.sock.stats"), b"").unwrap();
    let control = dir.join("serve-127.0.0.1:9.sock");
    drop(std::os::unix::net::UnixListener::bind(&control).unwrap());
    std::fs::write(
        stale.join("serve.json"),
        serde_json::json!({
            "pid": dead,
            "listen": "127.0.0.1:9",
            "root": "/",
            "tcp_socket": stale.join("tcp.sock"),
            "control_socket": control,
            "generation": 1,
            "app_pid": 0,
            "direct": true,
            "max_conns": 1,
            "cache_limit": 1,
            "files": {"requests": 0, "hits": 0, "misses": 0, "evictions": 0, "cached_bytes": 0},
            "app": {"connections": 0, "responses": 0, "directory_hits": 0},
            "updated_unix_ms": 0
        })
        .to_string(),
    )
    .unwrap();
    let legacy = std::env::temp_dir().join(format!("splitos-serve-{dead}"));
    std::fs::create_dir_all(&legacy).unwrap();
    std::fs::write(legacy.join("tcp.sock.stats"), b"").unwrap();
    // A live server's control socket is never touched.
    let live = dir.join("serve-127.0.0.1:10.sock");
    let _live = std::os::unix::net::UnixListener::bind(&live).unwrap();

    let s = serve_env("runtime", &[], &env);
    assert!(!stale.exists(), "a dead supervisor's directory was left");
    assert!(
        !control.exists(),
        "a dead supervisor's control socket was left"
    );
    assert!(!legacy.exists(), "an old version's /tmp directory was left");
    assert!(live.exists());
    // XDG_RUNTIME_DIR first: the new supervisor's directory and control socket are there.
    let mine = dir.join(format!("serve-{}", s.child.id()));
    assert!(mine.join("tcp.sock").exists(), "{}", mine.display());
    let mode = std::fs::metadata(&mine).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert!(dir
        .join(format!("serve-127.0.0.1:{}.sock", s.port))
        .exists());
    assert_eq!(
        curl(&[&format!("http://127.0.0.1:{}/", s.port)]),
        "<h1>home</h1>"
    );
    drop(s);
    assert!(!mine.exists(), "a clean exit removes its directory");
}

/// Issue 13 §6: two nodes serving copies of one site (copied with their times) give a file
/// the same `ETag`, so a client revalidating against the other node gets its 304; a copy with
/// another modification time does not match.
#[test]
fn validators_agree_across_servers_of_copied_sites() {
    let a = serve("etag-a");
    let b = serve("etag-b");
    let url = |s: &Server, p: &str| format!("http://127.0.0.1:{}{p}", s.port);
    // Same bytes, different inodes; the copy gets the original's times (as `cp -p` does).
    let touched = Command::new("touch")
        .arg("-r")
        .arg(a.site.join("data.bin"))
        .arg(b.site.join("data.bin"))
        .status()
        .unwrap();
    assert!(touched.success());
    let etag = etag_of_path(&a, "/data.bin");
    assert_eq!(etag_of_path(&b, "/data.bin"), etag);
    assert_eq!(
        code(&[
            "-H",
            &format!("If-None-Match: {etag}"),
            &url(&b, "/data.bin")
        ]),
        "304"
    );
    // index.html was written at another moment on each side: no false match.
    let home = etag_of_path(&a, "/index.html");
    assert_ne!(home, etag_of_path(&b, "/index.html"));
    assert_eq!(
        code(&[
            "-H",
            &format!("If-None-Match: {home}"),
            &url(&b, "/index.html")
        ]),
        "200"
    );
}

fn etag_of_path(s: &Server, path: &str) -> String {
    let head = curl(&["-I", &format!("http://127.0.0.1:{}{path}", s.port)]);
    head.lines()
        .find_map(|l| l.strip_prefix("ETag: "))
        .unwrap_or_else(|| panic!("no ETag in {head}"))
        .trim()
        .to_string()
}
