//! Network namespaces and the links between them, for the lab and the tests: named
//! namespaces (`ip netns`, so other tools see them), veth pairs created straight inside the two
//! namespaces they join (no name ever exists in the host's namespace, so parallel labs cannot
//! collide), commands run inside a namespace, and a thread that enters one with setns.
//!
//! Everything here shells out to `ip` (iproute2): the commands a person would type, in the
//! order they would type them.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// What went wrong with a namespace or a command.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN); run as root")]
    NotRoot,
    #[error("`{0}` is not installed (apt-get install -y iproute2 nftables)")]
    Missing(String),
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("cannot run `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter namespace {name}: {source}")]
    Enter {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad namespace name {0:?} (letters, digits, '-', '_' and '.', at most 64)")]
    BadName(String),
}

/// Fails unless this process is root and `ip` runs.
pub fn require_root() -> Result<(), NetnsError> {
    if !rustix::process::geteuid().is_root() {
        return Err(NetnsError::NotRoot);
    }
    require_tool("ip", "-V")
}

/// Fails unless `tool arg` runs and succeeds.
pub fn require_tool(tool: &str, arg: &str) -> Result<(), NetnsError> {
    let ok = Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(NetnsError::Missing(tool.to_string()))
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion; its stdout on success, its stderr in the error otherwise.
pub fn run(cmd: &mut Command) -> Result<String, NetnsError> {
    let out: Output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            cmd: describe(cmd),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetnsError::Command {
            cmd: describe(cmd),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// `ip ARGS...` in the current thread's namespace.
pub fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<String, NetnsError> {
    run(Command::new("ip").args(args))
}

/// Checks a namespace name: it becomes a file name under /run/netns and part of commands.
pub fn check_name(name: &str) -> Result<(), NetnsError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(NetnsError::BadName(name.to_string()))
    }
}

/// Creates namespace `name` with its loopback up.
pub fn create(name: &str) -> Result<(), NetnsError> {
    check_name(name)?;
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes namespace `name` (its interfaces go with it). Missing is not an error.
pub fn delete(name: &str) -> Result<(), NetnsError> {
    if !exists(name) {
        return Ok(());
    }
    ip(&["netns", "del", name]).map(|_| ())
}

/// Whether namespace `name` exists.
pub fn exists(name: &str) -> bool {
    check_name(name).is_ok() && Path::new("/run/netns").join(name).exists()
}

/// Every named namespace whose name starts with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Pids of the processes whose network namespace is `name`.
pub fn pids(name: &str) -> Vec<i32> {
    ip(&["netns", "pids", name])
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A veth pair: `a_dev` in namespace `a` with address `a_addr` (CIDR), `b_dev` in `b` with
/// `b_addr`, both up. The pair is created inside `a` with its peer placed in `b` directly.
pub fn veth(
    a: &str,
    a_dev: &str,
    a_addr: &str,
    b: &str,
    b_dev: &str,
    b_addr: &str,
) -> Result<(), NetnsError> {
    ip(&[
        "-n", a, "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", b,
    ])?;
    ip(&["-n", a, "addr", "add", a_addr, "dev", a_dev])?;
    ip(&["-n", b, "addr", "add", b_addr, "dev", b_dev])?;
    ip(&["-n", a, "link", "set", a_dev, "up"])?;
    ip(&["-n", b, "link", "set", b_dev, "up"])?;
    Ok(())
}

/// Writes a sysctl of namespace `ns` (`key` as in `net.ipv4.ip_forward`).
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), NetnsError> {
    run(Command::new("ip").args([
        "netns",
        "exec",
        ns,
        "sysctl",
        "-q",
        "-w",
        &format!("{key}={value}"),
    ]))
    .map(|_| ())
}

/// A command that runs `program args...` inside namespace `ns` (through `ip netns exec`).
pub fn command_in(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// Runs `f` on a new thread that has entered namespace `ns`: the sockets it makes and the
/// processes it spawns live there. Returns what `f` returns.
pub fn run_in<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> Result<R, NetnsError> {
    let path = Path::new("/run/netns").join(ns);
    let file = std::fs::File::open(&path).map_err(|source| NetnsError::Enter {
        name: ns.to_string(),
        source,
    })?;
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            rustix::thread::move_into_link_name_space(
                file.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| NetnsError::Enter {
                name: ns.to_string(),
                source: e.into(),
            })?;
            Ok(f())
        });
        match h.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Enters namespace `ns` on the calling thread for good (for a thread that serves inside it).
pub fn enter(ns: &str) -> Result<(), NetnsError> {
    let path = Path::new("/run/netns").join(ns);
    let file = std::fs::File::open(&path).map_err(|source| NetnsError::Enter {
        name: ns.to_string(),
        source,
    })?;
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| NetnsError::Enter {
        name: ns.to_string(),
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("splitos-lab-node1").is_ok());
        for bad in ["", "../x", "a b", "-x", ".x", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
