//! `splitos serve`, `splitos reload`, `splitos upgrade` and the hidden `splitos serve-app`:
//! their arguments and what they print. The work is `splitos_serve`'s.
//!
//! `serve-app` is how the supervisor starts each HTTP application instance (this same binary,
//! [`app_command`]); its arguments are whatever [`AppConfig::to_args`] writes, which a test
//! below keeps in step with the parser.

use crate::parse_bytes;
use splitos_m2m::WaitPolicy;
use splitos_serve::app::{self, AppConfig};
use splitos_serve::control::{self, ReloadError};
use splitos_serve::supervisor::{self, AppCommand, Notice, ServeConfig};
use splitos_serve::upgrade::{UpgradeCommand, UPGRADE_LIMIT};
use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The directory to serve.
    dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// TCP server event-loop threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Most bytes of file contents kept in memory (suffixes K, M, G).
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    cache_size: u64,
    /// Write an access log in the common log format to this file (off by default).
    #[arg(long)]
    access_log: Option<PathBuf>,
    /// Most connections at once; more are answered 503 and closed.
    #[arg(long, default_value_t = 10_000)]
    max_conns: usize,
    /// Seconds a client may take to send a request (its head, and a body), from its first
    /// byte: a deadline, however slowly the bytes come.
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Seconds an idle keep-alive connection is kept.
    #[arg(long, default_value_t = 60)]
    idle_timeout: u64,
    /// List the contents of directories that have no index.html (names starting with "." are
    /// not shown).
    #[arg(long)]
    list_dirs: bool,
    /// Do not let the TCP server answer requests for cached files itself (the direct path);
    /// every request then goes through the HTTP application. The direct path is also off
    /// while an access log is written, since the log is the application's.
    #[arg(long)]
    no_direct: bool,
    /// Serve files and directories whose names start with "." (.git, .env, .htpasswd). By
    /// default they are answered 404, except under /.well-known/.
    #[arg(long)]
    dotfiles: bool,
    /// How the TCP server and the HTTP application wait: block (sleep at once; the default,
    /// best when cores are shared, e.g. with a load generator), adaptive (spin 2 µs, then
    /// yield until ~30 µs, then sleep), or poll (spin; only with cores to spare).
    #[arg(long, default_value = "block")]
    wait: WaitPolicy,
    /// Control socket for `splitos reload` and `splitos upgrade` [default: serve-ADDR.sock in
    /// $XDG_RUNTIME_DIR/splitos or /tmp/splitos-<uid>].
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Listen for the node link on ADDR (IP:PORT): the port on which other nodes send this
    /// one connections that move (live migration) and an operator's `splitos migrate` asks
    /// for them. Put it on the cluster's private network. Needs CAP_NET_ADMIN (TCP_REPAIR).
    #[arg(long, value_name = "ADDR")]
    link: Option<String>,
    /// A network (ADDR/LEN) whose hosts may use the node link; repeat for several. Required
    /// with --link: the link has no other authentication.
    #[arg(long = "link-allow", value_name = "NET")]
    link_allow: Vec<String>,
    /// Take over from the `splitos serve` whose hand-over socket this is (set by `splitos
    /// upgrade` when it starts the new binary; not meant to be typed).
    #[arg(long, hide = true, value_name = "SOCKET")]
    upgrade_from: Option<PathBuf>,
    #[command(flatten)]
    failover: crate::failover_args::FailoverArgs,
}

#[derive(clap::Args)]
pub struct ReloadArgs {
    /// The address the server was started with (`splitos serve --listen`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Its control socket, if it was given one with --control-socket.
    #[arg(long)]
    control_socket: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct UpgradeArgs {
    /// The address the server was started with (`splitos serve --listen`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Its control socket, if it was given one with --control-socket.
    #[arg(long)]
    control_socket: Option<PathBuf>,
}

/// Arguments `splitos serve` passes to each instance it starts (not meant to be typed).
#[derive(clap::Args, Clone, Debug)]
pub struct AppArgs {
    /// The served directory (for listings; files come from the file server).
    #[arg(long)]
    root: PathBuf,
    #[arg(long)]
    tcp_socket: PathBuf,
    #[arg(long)]
    files_socket: PathBuf,
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    access_log: Option<PathBuf>,
    #[arg(long, default_value_t = 10_000)]
    max_conns: usize,
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    #[arg(long, default_value_t = 60)]
    idle_timeout: u64,
    #[arg(long, default_value = "block")]
    wait: WaitPolicy,
    #[arg(long)]
    list_dirs: bool,
    /// Answer every request here, none in the TCP server.
    #[arg(long)]
    no_direct: bool,
    #[arg(long)]
    dotfiles: bool,
    /// Another instance holds the listener and is about to hand it over: retry until it does.
    #[arg(long)]
    takeover: bool,
}

impl From<AppArgs> for AppConfig {
    fn from(a: AppArgs) -> AppConfig {
        AppConfig {
            root: a.root,
            tcp_socket: a.tcp_socket,
            files_socket: a.files_socket,
            listen: a.listen,
            access_log: a.access_log,
            max_conns: a.max_conns,
            header_timeout: a.header_timeout,
            idle_timeout: a.idle_timeout,
            wait: a.wait,
            list_dirs: a.list_dirs,
            no_direct: a.no_direct,
            dotfiles: a.dotfiles,
            takeover: a.takeover,
        }
    }
}

/// How the supervisor starts an instance: this binary, `serve-app`.
fn app_command() -> AppCommand {
    AppCommand {
        program: None,
        args: vec!["serve-app".into()],
    }
}

fn parse_listen(listen: &str) -> Result<SocketAddr, String> {
    listen
        .parse()
        .map_err(|e| format!("--listen {listen:?}: {e} (expected IP:PORT)"))
}

/// How an upgrade starts the new binary: whatever is now at the path this one was started
/// from (argv[0] made absolute, symbolic links not followed, so that a link switched to a new
/// release is followed; the resolved executable if argv[0] has no slash), with the arguments
/// this process was given, less a previous `--upgrade-from`.
fn upgrade_command() -> Option<UpgradeCommand> {
    let mut argv = std::env::args_os();
    let argv0 = PathBuf::from(argv.next()?);
    let program = if argv0.as_os_str().as_encoded_bytes().contains(&b'/') {
        std::path::absolute(&argv0).ok()?
    } else {
        std::env::current_exe().ok()?
    };
    let mut args: Vec<OsString> = Vec::new();
    let mut skip = false;
    for a in argv {
        if std::mem::take(&mut skip) {
            continue;
        }
        if a == "--upgrade-from" {
            skip = true;
        } else if !a.as_encoded_bytes().starts_with(b"--upgrade-from=") {
            args.push(a);
        }
    }
    Some(UpgradeCommand { program, args })
}

/// Writes a line for a person on stderr; a closed stderr stops nobody (a server that was
/// upgraded may outlive the terminal or pipe it was started with).
fn say(s: std::fmt::Arguments) {
    let _ = writeln!(std::io::stderr(), "splitos serve: {s}");
}

/// `splitos serve`: runs until `stop`; `reload` is the SIGHUP flag, `upgrade` SIGUSR2's.
pub fn run(
    a: ServeArgs,
    stop: &AtomicBool,
    reload: &AtomicBool,
    upgrade: &AtomicBool,
) -> Result<(), String> {
    // The directory is judged before the address, so a mistyped directory is what a person
    // hears about first.
    supervisor::served_root(&a.dir).map_err(|e| e.to_string())?;
    let listen = parse_listen(&a.listen)?;
    let link = match &a.link {
        None if !a.link_allow.is_empty() && a.failover.etcd.is_empty() => {
            return Err("--link-allow needs --link ADDR (where the node link listens)".into())
        }
        None => None,
        Some(addr) => {
            let listen = addr
                .parse()
                .map_err(|e| format!("--link {addr:?}: {e} (expected IP:PORT)"))?;
            if a.link_allow.is_empty() {
                return Err(
                    "--link needs at least one --link-allow NET (who may use the link; \
                     e.g. the cluster's private network)"
                        .into(),
                );
            }
            let allow = a
                .link_allow
                .iter()
                .map(|n| {
                    splitos_migrate::node::parse_network(n)
                        .map_err(|e| format!("--link-allow: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(splitos_migrate::LinkConfig { listen, allow })
        }
    };
    let allow = match &link {
        Some(l) => l.allow.clone(),
        None => a
            .link_allow
            .iter()
            .map(|n| {
                splitos_migrate::node::parse_network(n).map_err(|e| format!("--link-allow: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let agent =
        crate::failover_args::agent_start(&a.failover, link.as_ref().map(|l| l.listen), &allow)?;
    let config = ServeConfig {
        dir: a.dir.clone(),
        listen,
        threads: a.threads,
        cache_size: a.cache_size,
        access_log: a.access_log,
        max_conns: a.max_conns,
        header_timeout: a.header_timeout,
        idle_timeout: a.idle_timeout,
        list_dirs: a.list_dirs,
        no_direct: a.no_direct,
        dotfiles: a.dotfiles,
        wait: a.wait,
        control_socket: a.control_socket,
        app: app_command(),
        link,
        agent,
        upgrade: upgrade_command(),
        upgrade_from: a.upgrade_from,
    };
    let dir = a.dir;
    supervisor::run(config, stop, reload, upgrade, |n| match n {
        Notice::Serving { addr } => {
            // The first line on stdout is the URL, for scripts (and the tests) to read.
            let mut out = std::io::stdout();
            let _ = writeln!(out, "http://{addr}/").and_then(|_| out.flush());
            say(format_args!(
                "serving {} at http://{addr}/ (Ctrl-C to stop; `splitos reload --listen {addr}` \
                 or SIGHUP to reload, `splitos upgrade --listen {addr}` or SIGUSR2 to upgrade)",
                dir.display()
            ));
        }
        // Nothing on stdout: whoever read the old process's first line may be gone.
        Notice::TookOver { addr, connections } => say(format_args!(
            "pid {} took over serving {} at http://{addr}/ with {connections} connections",
            std::process::id(),
            dir.display()
        )),
        Notice::Upgraded(u) => say(format_args!("pid {}: {u}; exiting", std::process::id())),
        Notice::UpgradeFailed(e) => {
            say(format_args!("upgrade failed, this process serves on: {e}"))
        }
        Notice::Reloaded(r) => say(format_args!("{r}")),
        Notice::ReloadFailed(e) => say(format_args!(
            "reload failed, the running instance stays: {e}"
        )),
        Notice::Restarting(st) => say(format_args!(
            "the HTTP application exited ({st}); starting a new one"
        )),
        Notice::RestartFailed(e) => say(format_args!("restart failed: {e}")),
        Notice::ShuttingDown => say(format_args!("shutting down")),
    })
    .map_err(|e| e.to_string())
}

/// `splitos serve-app`: one HTTP application instance; `drain` is the SIGUSR2 flag.
pub fn run_app(a: AppArgs, stop: &AtomicBool, drain: &AtomicBool) -> Result<(), String> {
    let exit =
        app::run(a.into(), stop, drain, &mut std::io::stdout()).map_err(|e| e.to_string())?;
    if let Some(n) = exit.handed_off {
        eprintln!(
            "splitos serve: instance {} handed off {n} connections and exits",
            std::process::id()
        );
    }
    Ok(())
}

/// `splitos reload`: asks a running `splitos serve` to replace its HTTP application.
pub fn reload(a: ReloadArgs) -> Result<(), String> {
    let path = match a.control_socket {
        Some(p) => p,
        None => control::default_control_socket(parse_listen(&a.listen)?),
    };
    match control::request_reload(&path, supervisor::RELOAD_LIMIT) {
        Ok(m) => {
            println!("{m}");
            Ok(())
        }
        Err(e @ ReloadError::NoServer { .. }) => {
            Err(format!("{e}; give the address it listens on with --listen"))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// `splitos upgrade`: asks a running `splitos serve` to replace itself with the binary now at
/// its path, and prints the outcome.
pub fn upgrade(a: UpgradeArgs) -> Result<(), String> {
    let path = match a.control_socket {
        Some(p) => p,
        None => control::default_control_socket(parse_listen(&a.listen)?),
    };
    match control::request(&path, control::Ask::Upgrade, UPGRADE_LIMIT) {
        Ok(m) => {
            println!("{m}");
            Ok(())
        }
        Err(e @ ReloadError::NoServer { .. }) => {
            Err(format!("{e}; give the address it listens on with --listen"))
        }
        Err(e) => Err(format!("upgrade failed, the running server serves on: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        app: AppArgs,
    }

    #[test]
    fn serve_app_parses_what_the_supervisor_passes() {
        let base = AppConfig {
            root: "/srv/a b".into(),
            tcp_socket: "/run/t.sock".into(),
            files_socket: "/run/f.sock".into(),
            listen: "[::1]:8443"
                .parse()
                .unwrap_or(SocketAddr::from(([0; 4], 0))),
            access_log: None,
            max_conns: 7,
            header_timeout: 3,
            idle_timeout: 9,
            wait: WaitPolicy::adaptive(),
            list_dirs: false,
            no_direct: false,
            dotfiles: false,
            takeover: false,
        };
        let all = AppConfig {
            access_log: Some("/var/log/x.log".into()),
            wait: "adaptive:50us".parse().unwrap_or(WaitPolicy::Poll),
            list_dirs: true,
            no_direct: true,
            dotfiles: true,
            takeover: true,
            ..base.clone()
        };
        for c in [base, all] {
            let argv = std::iter::once("serve-app".into()).chain(c.to_args());
            let parsed = Wrap::try_parse_from(argv).map(|w| AppConfig::from(w.app));
            assert_eq!(parsed.ok(), Some(c));
        }
    }
}
