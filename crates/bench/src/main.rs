//! `splitos-bench`: the benchmark programs. Each suite runs its baselines in the same run,
//! prints a table with ratios and target checks, and writes JSON with `--json PATH`.

mod cluster_suite;
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
        /// adaptive:<N>us, block). poll needs --no-pin: pinned, the TCP server and the
        /// application share one core, where two spinners starve each other.
        #[arg(long, default_value = "adaptive")]
        wait: String,
        /// Let the scheduler place every process (by default each server runs on CPU 1 and
        /// the client on CPU 0, so that every server gets one core of its own and the same
        /// one, and none competes with the load generator).
        #[arg(long)]
        no_pin: bool,
    },
    /// `splitos serve` vs nginx, lighttpd and h2o, and a ceiling (a minimal server answering
    /// from memory), serving the same directory under wrk (keep-alive, 50 connections per wrk
    /// thread) for 1 KiB, 16 KiB and 1 MiB files: req/s, p99 latency and requests per server
    /// CPU-second, with splitos as a fraction of the best peer and of the ceiling. Needs wrk
    /// and the peers on the PATH (missing peers are skipped) and the splitos binary built next
    /// to this one.
    Http {
        #[command(flatten)]
        common: Common,
        /// Worker threads (processes) per server, and wrk threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    #[command(hide = true)]
    HttpCeiling {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Cached file reads (shared cache vs pread vs mmap) and file transmission (Split-OS
    /// send_file vs sendfile(2)) for 1 KiB, 64 KiB and 4 MiB files.
    File(Common),
    /// Live migration of TCP connections between the nodes of a lab (network namespaces: a
    /// client, the steering switch, two nodes running `splitos serve`): the cut-over of one
    /// busy keep-alive connection moved back and forth (with the client's request latency
    /// against the same client without migration), and 1,000 idle connections moved in one
    /// batch. Needs root and the splitos binary built next to this one.
    Cluster(Common),
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
        /// Pin the process (all its threads) to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
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
        /// Pin the client to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
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
            no_pin,
        } => {
            let pin = !no_pin && proc::online_cpus() >= 2;
            let opts = echo::Options {
                quick: common.quick,
                conns,
                wait,
                pin,
            };
            finish(echo::report(&opts), common.json)
        }
        Suite::Http { common, threads } => finish(
            http_suite::run(&http_suite::Options {
                quick: common.quick,
                threads,
            }),
            common.json,
        ),
        Suite::HttpCeiling {
            port,
            size,
            threads,
        } => http_suite::ceiling_main(port, size, threads),
        Suite::File(c) => finish(
            file_suite::run(&file_suite::Options { quick: c.quick }),
            c.json,
        ),
        Suite::Cluster(c) => {
            cluster_suite::main(&cluster_suite::Options { quick: c.quick }, c.json)
        }
        Suite::FilePeer {
            mode,
            root,
            path,
            count,
            socket,
            files,
        } => file_suite::peer_main(&mode, &root, &path, count, &socket, &files),
        Suite::M2mPeer { case, dir, iters } => m2m_suite::peer_main(&case, &dir, iters),
        Suite::EchoServer {
            kind,
            socket,
            wait,
            cpu,
        } => echo::server_main(&kind, socket, &wait, cpu),
        Suite::EchoIdle { addr, conns } => echo::idle_client_main(addr, conns),
        Suite::EchoClient {
            addr,
            conns,
            warmup_ms,
            duration_ms,
            cpu,
        } => echo::client_main(addr, conns, warmup_ms, duration_ms, cpu),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("splitos-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
