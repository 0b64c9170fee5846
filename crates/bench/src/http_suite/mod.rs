//! The `http` suite: `splitos serve` against the fastest static servers — nginx, lighttpd and
//! h2o — and against a ceiling (the least any server can do per request here, `ceiling.rs`),
//! all serving the same directory, driven by wrk (keep-alive, 50 connections per wrk thread)
//! for 1 KiB, 16 KiB and 1 MiB files. It installs nothing: it finds the peers and `wrk` on the
//! PATH (`scripts/setup-test-host` installs them) and the `splitos` binary next to this one
//! (`cargo build --release -p splitos-cli`); a peer that is missing is reported and skipped.
//!
//! Every server runs side by side for the whole suite and wrk visits each in turn, round after
//! round, so drift in the machine's speed falls on all alike. Server CPU is read from /proc
//! over each wrk run (for nginx and lighttpd: all their processes). The summary gives
//! `splitos` as a fraction of the best peer at each size and metric, and of the ceiling.

mod ceiling;
mod large;
mod servers;

pub use ceiling::main as ceiling_main;

use crate::report::Report;
use servers::{cpu_tree, which, wrk, Server};

pub struct Options {
    pub quick: bool,
    /// TCP-server threads for Split-OS, workers for each peer, wrk threads.
    pub threads: usize,
}

const FILES: [(&str, usize); 3] = [("1k", 1 << 10), ("16k", 16 << 10), ("1m", 1 << 20)];
const PEERS: [&str; 3] = ["nginx", "lighttpd", "h2o"];
const METRICS: [(&str, bool); 3] = [
    ("req_per_s", false),
    ("req_per_cpu_s", false),
    ("p99_us", true),
];

pub fn run(opts: &Options) -> Report {
    let mut r = Report::new("http");
    if let Err(e) = run_inner(opts, &mut r) {
        eprintln!("http: FAILED: {e}");
        r.note(format!("failed: {e}"));
    }
    for (size, _) in FILES {
        let me = format!("splitos_{size}");
        for (metric, lower_better) in METRICS {
            for peer in PEERS {
                r.ratio(metric, &me, &format!("{peer}_{size}"));
            }
            r.ratio(metric, &me, &format!("ceiling_{size}"));
            // The bar is the best peer at this size and metric, not nginx alone.
            let best = PEERS
                .iter()
                .map(|p| format!("{p}_{size}"))
                .filter_map(|n| r.get(&n, metric).map(|v| (n, v)))
                .min_by(|a, b| {
                    let ord = a.1.total_cmp(&b.1);
                    if lower_better {
                        ord
                    } else {
                        ord.reverse()
                    }
                });
            let Some((best, _)) = best else { continue };
            if lower_better {
                r.target(metric, &me, &best, 1.0, true);
            } else {
                r.target(metric, &me, &best, 1.1, false);
            }
        }
    }
    r.target("req_per_s", "splitos_1k", "ceiling_1k", 0.9, false);
    r
}

fn run_inner(opts: &Options, r: &mut Report) -> Result<(), String> {
    let wrk_bin = which("wrk").ok_or("wrk not found (scripts/setup-test-host installs it)")?;
    let bench = std::env::current_exe().map_err(|e| e.to_string())?;
    let splitos = bench.with_file_name("splitos");
    if !splitos.is_file() {
        return Err(format!(
            "{} not found (cargo build --release -p splitos-cli)",
            splitos.display()
        ));
    }
    let tmp = std::env::temp_dir().join(format!("splitos-bench-http-{}", std::process::id()));
    let result = measure(opts, r, &wrk_bin, &bench, &splitos, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn measure(
    opts: &Options,
    r: &mut Report,
    wrk_bin: &std::path::Path,
    bench: &std::path::Path,
    splitos: &std::path::Path,
    tmp: &std::path::Path,
) -> Result<(), String> {
    let root = tmp.join("site");
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    // World-readable: h2o, started as root, serves as `nobody`.
    let _ = rustix::fs::chmod(tmp, rustix::fs::Mode::from_raw_mode(0o755));
    for (name, size) in FILES {
        let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        std::fs::write(root.join(format!("{name}.bin")), body).map_err(|e| e.to_string())?;
    }
    let threads = opts.threads.max(1);
    let (rounds, secs) = if opts.quick { (2, 1) } else { (4, 5) };
    let mut servers: Vec<Server> = vec![servers::splitos(splitos, &root, threads)?];
    for peer in PEERS {
        let Some(bin) = which(peer) else {
            eprintln!("http: {peer} not found; skipped (scripts/setup-test-host installs it)");
            r.note(format!("{peer} not installed: not measured"));
            continue;
        };
        let started = match peer {
            "nginx" => servers::nginx(&bin, &root, tmp, threads),
            "lighttpd" => servers::lighttpd(&bin, &root, tmp, threads),
            _ => servers::h2o(&bin, &root, tmp, threads),
        };
        match started {
            Ok(s) => servers.push(s),
            Err(e) => {
                eprintln!("http: {peer} did not start: {e}; skipped");
                r.note(format!("{peer} did not start: {e}"));
            }
        }
    }
    for (size_name, size) in FILES {
        // The ceiling answers one size only: one per size, beside the others.
        let ceiling = servers::ceiling(bench, size, threads)?;
        let path = format!("{size_name}.bin");
        let all: Vec<&Server> = servers.iter().chain([&ceiling]).collect();
        let mut totals = vec![(0.0f64, 0.0f64, 0.0f64); all.len()]; // requests, CPU s, p99 sum
        for s in &all {
            wrk(wrk_bin, s.port, &path, 1, threads)?; // warm caches
        }
        for _ in 0..rounds {
            for (i, s) in all.iter().enumerate() {
                let pid = s.proc.0.id();
                let c0 = cpu_tree(pid);
                let (rps, p99) = wrk(wrk_bin, s.port, &path, secs, threads)
                    .map_err(|e| format!("{} {size_name}: {e}", s.name))?;
                totals[i].0 += rps * secs as f64;
                totals[i].1 += cpu_tree(pid) - c0;
                totals[i].2 += p99;
            }
        }
        for (i, s) in all.iter().enumerate() {
            let (reqs, cpu, p99s) = totals[i];
            let label = format!("{}_{size_name}", s.name);
            let rps = reqs / (rounds * secs) as f64;
            let per_cpu = reqs / cpu.max(1e-9);
            let p99 = p99s / rounds as f64;
            r.add(&label, "req_per_s", rps);
            r.add(&label, "req_per_cpu_s", per_cpu);
            r.add(&label, "p99_us", p99);
            eprintln!("http: {label}: {rps:.0} req/s, {per_cpu:.0} req/CPU-s, p99 {p99:.0} µs");
        }
        summarize(r, size_name);
    }
    let nginx = servers.iter().find(|s| s.name == "nginx");
    large::measure(r, opts.quick, splitos, &root, nginx)?;
    r.note(format!(
        "wrk -t{threads} -c{} keep-alive; per size {rounds} alternating rounds of {secs} s per server \
         (p99: mean of rounds); {threads} worker(s) per server (nginx: sendfile, tcp_nopush, \
         open_file_cache; lighttpd: sendfile backend, stat cache; h2o: file handler; \
         keep-alive without a cap, no access log); splitos serve with {threads} TCP server thread(s)",
        50 * threads
    ));
    Ok(())
}

/// Prints each server at `size` as a fraction of the best peer and of the ceiling.
fn summarize(r: &Report, size: &str) {
    let names: Vec<&str> = ["splitos", "nginx", "lighttpd", "h2o", "ceiling"].to_vec();
    let get = |n: &str, m: &str| r.get(&format!("{n}_{size}"), m);
    for (metric, lower_better) in METRICS {
        let best = PEERS.iter().filter_map(|p| get(p, metric)).reduce(|a, b| {
            if lower_better {
                a.min(b)
            } else {
                a.max(b)
            }
        });
        let ceiling = get("ceiling", metric);
        let line: Vec<String> = names
            .iter()
            .filter_map(|n| {
                let v = get(n, metric)?;
                let of_best = best.map_or(String::new(), |b| format!(" {:.2}x best", v / b));
                let of_ceiling =
                    ceiling.map_or(String::new(), |c| format!(" {:.2}x ceiling", v / c));
                Some(format!("{n}{of_best}{of_ceiling}"))
            })
            .collect();
        eprintln!("http: {size} {metric}: {}", line.join("; "));
    }
}
