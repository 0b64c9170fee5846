//! The `splitos` command: runs the Split-OS servers and shows their state.

#![forbid(unsafe_code)]

mod failover_args;
mod lab;
mod migrate;
mod serve;
mod status;
mod switch;

use clap::{Parser, Subcommand};
use splitos_m2m::WaitPolicy;
use splitos_tcp_server::{AccessPolicy, LimitSetting, Rule, ServerConfig, TcpServer};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "splitos",
    version,
    about = "Split-OS: network and file services split out of the application's path",
    long_about = "Split-OS runs TCP/IP processing in a TCP server on its own cores; applications \
                  reach it through shared-memory rings with no system call on the fast path.\n\n\
                  Logging goes to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the TCP server: it owns the sockets of the applications that connect to it and
    /// drives the kernel TCP stack with io_uring on its own threads.
    TcpServer(TcpServerArgs),
    /// Show the TCP server's applications, connections, traffic and thread load (read from its
    /// statistics file; the server is not disturbed), and for `splitos serve`, its HTTP
    /// application, direct path, file cache hit ratio and budgets.
    Status(StatusArgs),
    /// Serve a directory over HTTP/1.1 on the split architecture: the TCP server and the file
    /// server run as threads of this process, the HTTP application as a child process, and file
    /// bytes go from the file cache to the network without passing through the application.
    /// SIGHUP or `splitos reload` replaces the application without dropping a connection;
    /// SIGUSR2 or `splitos upgrade` replaces the whole process with a new binary, also without
    /// dropping one.
    Serve(Box<serve::ServeArgs>),
    /// Replace the HTTP application of a running `splitos serve` with a new instance (a new
    /// binary, if it was rebuilt); the TCP server keeps every connection and hands each one to
    /// the new instance between requests. Prints the outcome.
    Reload(serve::ReloadArgs),
    /// Replace a running `splitos serve` as a whole — TCP server, file server and HTTP
    /// application — with the binary now at the path it was started from (install the new
    /// one there first), keeping every connection: the old process passes its listening
    /// socket and then each connection, with the bytes it held for it, to the new process over
    /// a private Unix socket, and exits. The new process runs with the same arguments, output
    /// and runtime files. If the new binary fails to start, the old one serves on and this
    /// command says why (exit status 1). SIGUSR2 to the server does the same. Prints the
    /// outcome: the new pid, connections handed over, how long it took.
    Upgrade(serve::UpgradeArgs),
    /// One instance of serve's HTTP application (started by `splitos serve`, not by hand).
    #[command(hide = true)]
    ServeApp(serve::AppArgs),
    /// Run the memory-mapped file server: it caches the files beneath ROOT in sealed shared
    /// memory that readers map directly; nothing outside ROOT is ever served.
    FileServer(FileServerArgs),
    /// Steer a virtual IP's TCP flows over several nodes with nftables (run on the router or
    /// the lab's switch namespace): hashed buckets for new flows, moved, held and fenced flows.
    Switch(switch::SwitchArgs),
    /// A cluster of network namespaces on this machine: a client, the switch and N nodes
    /// running `splitos serve` behind one virtual IP (up, exec, status, down; needs root).
    Lab(lab::LabArgs),
    /// Move live connections from one node to another (run where the switch is): the switch
    /// holds them, the source node saves them with TCP_REPAIR and the destination restores
    /// them, then one switch transaction sends their packets to the destination. Clients
    /// notice nothing but a pause of a few milliseconds.
    Migrate(migrate::MigrateArgs),
    /// Take a node out of service without a reset (run where the switch is): its buckets go
    /// to the other nodes for new connections at once, its established connections keep
    /// reaching it until they have moved to the `--to` nodes by migration.
    Drain(migrate::DrainArgs),
}

#[derive(clap::Args)]
struct FileServerArgs {
    /// The directory to serve.
    #[arg(long)]
    root: PathBuf,
    /// Unix socket readers connect to [default: $XDG_RUNTIME_DIR/splitos/files.sock, else
    /// /tmp/splitos-<uid>/files.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Most bytes of file contents kept in memory (suffixes K, M, G).
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    cache_size: u64,
    /// Files are cached in chunks of this size (suffixes K, M, G).
    #[arg(long, default_value = "4M", value_parser = parse_bytes)]
    chunk_size: u64,
}

pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{s:?} is not a size like 4096, 64K, 256M or 1G"))
}

fn run_file_server(a: FileServerArgs) -> Result<(), String> {
    let socket = a
        .socket
        .unwrap_or_else(splitos_file_server::default_socket_path);
    let mut cfg =
        splitos_file_server::server::FileServerConfig::new(a.root.clone(), socket.clone());
    cfg.cache_bytes = a.cache_size;
    cfg.chunk_size = a.chunk_size;
    let stop = stop_on_signals()?;
    let server = splitos_file_server::server::FileServer::start(cfg).map_err(|e| e.to_string())?;
    eprintln!(
        "splitos file-server: serving {} on {} (Ctrl-C to stop)",
        a.root.display(),
        socket.display()
    );
    let report = |s: &splitos_file_server::server::Stats| {
        let (hits, misses) = (
            s.hits.load(Ordering::Relaxed),
            s.misses.load(Ordering::Relaxed),
        );
        let ratio = if hits + misses > 0 {
            100.0 * hits as f64 / (hits + misses) as f64
        } else {
            0.0
        };
        eprintln!(
            "splitos file-server: {} opens reached the server, {hits} cache hits / {misses} misses ({ratio:.1}% hit ratio), {} evictions, {} retired, {} bytes cached (directory hits in readers are not counted here: they send no message)",
            s.requests.load(Ordering::Relaxed),
            s.evictions.load(Ordering::Relaxed),
            s.retired.load(Ordering::Relaxed),
            s.cached_bytes.load(Ordering::Relaxed),
        );
    };
    let mut last = 0;
    let mut next = std::time::Instant::now() + Duration::from_secs(10);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if std::time::Instant::now() >= next {
            next += Duration::from_secs(10);
            let now = server.stats().requests.load(Ordering::Relaxed);
            if now != last {
                last = now;
                report(server.stats());
            }
        }
    }
    report(server.stats());
    eprintln!("splitos file-server: shutting down");
    server.shutdown();
    Ok(())
}

#[derive(clap::Args)]
struct TcpServerArgs {
    /// Unix socket applications connect to [default: $SPLITOS_SOCKET, else
    /// $XDG_RUNTIME_DIR/splitos/tcp.sock, else /tmp/splitos-<uid>/tcp.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Event-loop threads; applications' sessions are spread across them.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// CPUs to pin the event-loop threads to, e.g. "1" or "2,3" (default: not pinned).
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// How idle threads wait: poll (spin, lowest latency, burns a core), adaptive (spin 2 µs,
    /// then yield the CPU until ~30 µs have passed — to a client or application that may share
    /// the core — then sleep), adaptive:<N>us (an N µs spin instead), block (sleep at once).
    #[arg(long, default_value = "adaptive")]
    wait: WaitPolicy,
    /// Who may listen on which ports, as UID:LOW-HIGH or *:LOW-HIGH (repeatable). Default:
    /// this user anywhere, everyone else on ports 1024 and up.
    #[arg(long = "allow", value_name = "RULE")]
    allow: Vec<Rule>,
    /// Permission bits of the socket, in octal (0600: only this user's applications).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// Seconds a dead application's persistent listeners stay open for its successor.
    #[arg(long, default_value_t = 30)]
    persist_grace: u64,
    /// Most applications connected at once (same as --limit total.sessions=N) [default: 1024,
    /// or fewer if the open-file limit is low].
    #[arg(long)]
    max_sessions: Option<u64>,
    /// Most connections per application (same as --limit session.conns=N) [default: 65536].
    #[arg(long)]
    max_conns: Option<u64>,
    /// A budget, as session.NAME=N, user.NAME=N (per uid, across its sessions and what
    /// outlives them), total.NAME=N (the whole server) or segment-bytes=N (largest file
    /// segment); N may end in K, M, G or T. Repeatable. NAME is one of: sessions, conns,
    /// listeners, parked (listeners kept for a restarting application), handed (connections
    /// handed off between instances), handed-bytes, files (segments passed for SendFile),
    /// file-bytes, held-bytes (received while a connection is paused), outbox-bytes (events
    /// queued for an application that reads them slowly), file-ranges (SendFile ranges queued
    /// and not yet sent). Over a count the tenant gets EMFILE,
    /// over bytes ENOBUFS (or reading stops), over segment-bytes EFBIG. Defaults: totals sized
    /// to the open-file limit (conns 16384, listeners 1024, parked 256, handed 1024, files
    /// 4096, sessions 1024 when it allows; the server raises its soft limit to fit them, or
    /// refuses to start) and handed-bytes 256M, file-bytes 256G, held-bytes 256M,
    /// outbox-bytes 256M; per user the total if only this user can reach the socket, else a
    /// quarter of it; per session conns 65536, listeners 256, files 1024, file-bytes 16G,
    /// held-bytes 16M, outbox-bytes 16M, file-ranges 65536 (1M in total); segment-bytes 1G.
    #[arg(long = "limit", value_name = "KEY=N")]
    limits: Vec<LimitSetting>,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Socket of a TCP server to look at. Without it (and without --listen), every server of
    /// this user is shown: the TCP server at the default socket (as for tcp-server), if it
    /// runs, and every `splitos serve`.
    #[arg(long, conflicts_with = "listen")]
    socket: Option<PathBuf>,
    /// The `splitos serve` listening on this address (as given to `splitos serve --listen`).
    #[arg(long)]
    listen: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal permission mode like 600 or 660"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::TcpServer(a) => run_tcp_server(a),
        Command::FileServer(a) => run_file_server(a),
        Command::Serve(a) => stop_on_signals().and_then(|stop| {
            let reload = flag_on(signal_hook::consts::SIGHUP)?;
            let upgrade = flag_on(signal_hook::consts::SIGUSR2)?;
            serve::run(*a, &stop, &reload, &upgrade)
        }),
        Command::Reload(a) => serve::reload(a),
        Command::Upgrade(a) => serve::upgrade(a),
        Command::ServeApp(a) => stop_on_signals().and_then(|stop| {
            let drain = flag_on(signal_hook::consts::SIGUSR2)?;
            serve::run_app(a, &stop, &drain)
        }),
        Command::Switch(a) => switch::run(a),
        Command::Lab(a) => lab::run(a),
        Command::Migrate(a) => migrate::run(a),
        Command::Drain(a) => migrate::run_drain(a),
        Command::Status(a) => status::run(
            status::Target {
                socket: a.socket,
                listen: a.listen,
            },
            a.json,
        ),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("splitos: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sets the returned flag on SIGINT or SIGTERM.
fn stop_on_signals() -> Result<Arc<AtomicBool>, String> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| format!("cannot install a signal handler: {e}"))?;
    }
    Ok(stop)
}

/// Sets the returned flag on `sig` (which then no longer has its default effect).
fn flag_on(sig: std::ffi::c_int) -> Result<Arc<AtomicBool>, String> {
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(sig, flag.clone())
        .map_err(|e| format!("cannot install a signal handler: {e}"))?;
    Ok(flag)
}

fn run_tcp_server(a: TcpServerArgs) -> Result<(), String> {
    let mut config = ServerConfig {
        threads: a.threads,
        cpus: a.cpus,
        wait: a.wait,
        socket_mode: a.socket_mode,
        persist_grace: Duration::from_secs(a.persist_grace),
        // Applications of this server may have it answer their static files (ServeFiles).
        direct: Some(std::sync::Arc::new(splitos_serve::direct::StaticFiles)),
        ..ServerConfig::default()
    };
    if let Some(n) = a.max_sessions {
        config.budgets.sessions.total = n;
    }
    if let Some(n) = a.max_conns {
        config.budgets.conns.session = n;
    }
    for l in &a.limits {
        config.budgets.set(l);
    }
    if let Some(s) = a.socket {
        config.socket = s;
    }
    if !a.allow.is_empty() {
        config.access = AccessPolicy { rules: a.allow };
    }
    let stop = stop_on_signals()?;
    let socket = config.socket.clone();
    let server = TcpServer::start(config).map_err(|e| e.to_string())?;
    eprintln!(
        "splitos tcp-server: listening for applications on {} (Ctrl-C to stop)",
        socket.display()
    );
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("splitos tcp-server: shutting down");
    server.shutdown();
    Ok(())
}
