//! What the `splitos` command's tests share: a lab that is taken down on drop (also when a
//! test fails), running `splitos` commands, a served directory that goes with its server,
//! and reading one HTTP response.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;

pub const BIN: &str = env!("CARGO_BIN_EXE_splitos");

pub fn require() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the lab test builds network namespaces: run it as root"
    );
    for (tool, arg) in [("ip", "-V"), ("nft", "--version"), ("curl", "--version")] {
        let ok = Command::new(tool)
            .arg(arg)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "the lab test needs `{tool}` (apt-get install -y iproute2 nftables curl)"
        );
    }
}

pub fn splitos(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

pub fn ok(args: &[&str]) -> String {
    let o = splitos(args);
    assert!(
        o.status.success(),
        "splitos {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A lab that is taken down on drop, also when the test fails.
pub struct Lab {
    pub name: String,
    pub site: PathBuf,
}

impl Lab {
    pub fn up(tag: &str, nodes: u16) -> Lab {
        Lab::up_with(tag, nodes, &[])
    }

    /// A lab with more arguments for `lab up` (e.g. `--failover`).
    pub fn up_with(tag: &str, nodes: u16, extra: &[&str]) -> Lab {
        require();
        let name = format!("splt{tag}{}", std::process::id());
        let site = std::env::temp_dir().join(format!("{name}-site"));
        std::fs::create_dir_all(&site).unwrap();
        std::fs::write(site.join("index.html"), format!("<h1>lab {name}</h1>\n")).unwrap();
        let lab = Lab { name, site };
        let out = ok(&[
            "lab",
            "up",
            "--nodes",
            &nodes.to_string(),
            "--site",
            lab.site.to_str().unwrap(),
            "--name",
            &lab.name,
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>());
        assert!(out.contains("198.19.0.1"), "{out}");
        assert!(out.contains(&format!("--name {}", lab.name)), "{out}");
        lab
    }

    pub fn exec(&self, member: &str, cmd: &[&str]) -> String {
        let mut a = vec!["lab", "--name", &self.name, "exec", member, "--"];
        a.extend_from_slice(cmd);
        ok(&a)
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&ok(&["lab", "status", "--json", "--name", &self.name])).unwrap()
    }

    pub fn namespaces_left(&self) -> Vec<String> {
        String::from_utf8_lossy(
            &Command::new("ip")
                .args(["netns", "list"])
                .output()
                .unwrap()
                .stdout,
        )
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{}-", self.name)))
        .map(str::to_string)
        .collect()
    }

    /// Takes the lab down and checks that nothing of it is left.
    pub fn down_and_check(&self, pids: &[i32], dir: &std::path::Path) {
        let out = ok(&["lab", "down", "--name", &self.name]);
        assert!(out.contains("is down"), "{out}");
        assert_eq!(self.namespaces_left(), Vec::<String>::new());
        for &p in pids {
            assert!(!live(p), "process {p} is still running");
        }
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = splitos(&["lab", "down", "--name", &self.name]);
        let _ = std::fs::remove_dir_all(&self.site);
    }
}

/// Whether `pid` is a live process (a zombie is not: nothing runs, only its exit status waits).
pub fn live(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next());
            !matches!(state, Some(Some('Z' | 'X')))
        })
        .unwrap_or(false)
}

/// `splitos serve` of a directory the test made, on a loopback port; on drop the server is
/// stopped (TERM) and the directory removed, also when the test fails.
pub struct Served {
    pub child: std::process::Child,
    pub port: u16,
    pub site: PathBuf,
}

impl Served {
    /// Starts `splitos serve --listen 127.0.0.1:0 EXTRA SITE` with `env` and reads the port
    /// from its first line. The guard owns `site` before the server starts, so a failed start
    /// cleans up too.
    pub fn start(site: PathBuf, extra: &[&str], env: &[(&str, &std::path::Path)]) -> Served {
        let mut s = Served {
            child: Command::new(BIN)
                .args(["serve", "--listen", "127.0.0.1:0"])
                .args(extra)
                .arg(&site)
                .envs(env.iter().copied())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
            port: 0,
            site,
        };
        let mut line = String::new();
        if let Some(out) = s.child.stdout.take() {
            std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).unwrap();
        }
        s.port = line
            .trim()
            .trim_start_matches("http://127.0.0.1:")
            .trim_end_matches('/')
            .parse()
            .unwrap_or_else(|_| panic!("unexpected first line {line:?}"));
        s
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.site);
    }
}

/// Reads one response (head and Content-Length body) from `c`.
pub fn response(
    c: &mut std::io::BufReader<std::net::TcpStream>,
) -> Result<(String, Vec<u8>), String> {
    use std::io::BufRead;
    let mut status = String::new();
    let mut len = 0usize;
    loop {
        let mut l = String::new();
        match c.read_line(&mut l) {
            Ok(0) => return Err(format!("closed (after {status:?})")),
            Ok(_) => {}
            Err(e) => return Err(format!("{e} (after {status:?})")),
        }
        if status.is_empty() {
            status = l.trim().to_string();
            continue;
        }
        if l == "\r\n" {
            break;
        }
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length: ") {
            len = v.trim().parse().map_err(|e| format!("{e}"))?;
        }
    }
    let mut body = vec![0u8; len];
    std::io::Read::read_exact(c, &mut body).map_err(|e| e.to_string())?;
    Ok((status, body))
}

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Labs of one test binary one at a time: two at once share two cores and time out.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// A Python client in the lab's client namespace, killed on drop.
pub struct Client {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Client {
    pub fn start(lab: &Lab, script: &str, args: &[&str]) -> Client {
        let mut cmd = Command::new(BIN);
        cmd.args(["lab", "--name", &lab.name, "exec", "client", "--"])
            .args(["python3", "-u", "-c", script])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Client { child, out }
    }

    /// The next line the client prints (it prints nothing it does not mean).
    pub fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        assert!(!l.is_empty(), "the client ended without a word");
        l.trim().to_string()
    }

    pub fn say(&mut self, s: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(s.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
