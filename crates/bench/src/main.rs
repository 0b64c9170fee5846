//! `splitos-bench`: the benchmark programs. Each suite runs its baselines in the same run,
//! prints a table with ratios and target checks, and writes JSON with `--json PATH`.

mod echo;
mod file_suite;
mod http_suite;
mod m2m_suite;
mod proc;
mod report;

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "splitos-bench",
    version,
    about = "Split-OS benchmarks: every suite measures its baselines in the same run and reports ratios"
)]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(clap::Args)]
struct Common {
    /// Finish in well under a minute (fewer iterations, shorter runs).
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Suite {
    /// Memory-to-memory channels vs a cache-line ping-pong, Unix sockets, pipes, eventfd and
    /// iceoryx2: one-way latency (64-byte ping-pong between two pinned processes) and
    /// throughput (64-byte messages, 64 KiB buffers).
    M2m(Common),
    /// 64-byte request/response over keep-alive connections (the client a separate process):
    /// Split-OS TCP server + application vs epoll (mio), tokio and io_uring echo servers;
    /// req/s, p50/p99 latency and requests per server CPU-second.
    Echo {
        #[command(flatten)]
        common: Common,
        /// Concurrent connections.
        #[arg(long, default_value_t = 50)]
        conns: usize,
        /// Wait policy of the Split-OS TCP server and application (poll, adaptive,
        /// adaptive:<N>us, block). Adaptive measured best here even with the client sharing
        /// the cores: a short spin and a few yields cost less than the ~28 µs sleep and
        /// wake-up they usually save.
        #[arg(long, default_value = "adaptive")]
        wait: String,
    },
    /// `splitos serve` vs nginx (same directory, wrk keep-alive, 50 connections) for 1 KiB,
    /// 16 KiB and 1 MiB files: req/s, p99 latency and requests per server CPU-second. Needs
    /// nginx and wrk on the PATH and the splitos binary built next to this one.
    Http(Common),
    /// Cached file reads (shared cache vs pread vs mmap) and file transmission (Split-OS
    /// send_file vs sendfile(2)) for 1 KiB, 64 KiB and 4 MiB files.
    File(Common),
    #[command(hide = true)]
    FilePeer {
        #[arg(long)]
        mode: String,
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        path: String,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        files: PathBuf,
    },
    #[command(hide = true)]
    M2mPeer {
        #[arg(long)]
        case: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        iters: usize,
    },
    #[command(hide = true)]
    EchoServer {
        #[arg(long)]
        kind: String,
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long, default_value = "block")]
        wait: String,
    },
    #[command(hide = true)]
    EchoIdle {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        conns: usize,
    },
    #[command(hide = true)]
    EchoClient {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        warmup_ms: u64,
        #[arg(long)]
        duration_ms: u64,
    },
}

fn finish(report: report::Report, json: Option<PathBuf>) -> Result<(), String> {
    report.print();
    if let Some(p) = json {
        report.write_json(&p)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let r = match Cli::parse().suite {
        Suite::M2m(c) => finish(
            m2m_suite::run(&m2m_suite::Options { quick: c.quick }),
            c.json,
        ),
        Suite::Echo {
            common,
            conns,
            wait,
        } => {
            let opts = echo::Options {
                quick: common.quick,
                conns,
                wait,
            };
            finish(echo::report(&opts), common.json)
        }
        Suite::Http(c) => finish(
            http_suite::run(&http_suite::Options { quick: c.quick }),
            c.json,
        ),
        Suite::File(c) => finish(
            file_suite::run(&file_suite::Options { quick: c.quick }),
            c.json,
        ),
        Suite::FilePeer {
            mode,
            root,
            path,
            count,
            socket,
            files,
        } => file_suite::peer_main(&mode, &root, &path, count, &socket, &files),
        Suite::M2mPeer { case, dir, iters } => m2m_suite::peer_main(&case, &dir, iters),
        Suite::EchoServer { kind, socket, wait } => echo::server_main(&kind, socket, &wait),
        Suite::EchoIdle { addr, conns } => echo::idle_client_main(addr, conns),
        Suite::EchoClient {
            addr,
            conns,
            warmup_ms,
            duration_ms,
        } => echo::client_main(addr, conns, warmup_ms, duration_ms),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("splitos-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
