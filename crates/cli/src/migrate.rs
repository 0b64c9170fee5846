//! `splitos migrate`: move connections between nodes, run where the switch is. The work is
//! `splitos_cluster::migrate`'s; this prints its report.

use splitos_cluster::migrate::{self, Report, Select, DEFAULT_LINK_PORT};
use splitos_cluster::switch::DEFAULT_TABLE;
use std::net::SocketAddr;

#[derive(clap::Args)]
pub struct MigrateArgs {
    /// The node the connections leave: its node link, IP[:PORT] (the IP is also how the
    /// switch knows the node; port 7411 if not given).
    #[arg(long)]
    from: String,
    /// The node they go to: its node link, IP[:PORT].
    #[arg(long)]
    to: String,
    #[command(flatten)]
    select: SelectArgs,
    /// The nft table of the switch (in this network namespace).
    #[arg(long, default_value = DEFAULT_TABLE)]
    table: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct SelectArgs {
    /// Move every connection that can move now.
    #[arg(long)]
    all: bool,
    /// Move at most K connections.
    #[arg(long, value_name = "K")]
    count: Option<usize>,
}

impl SelectArgs {
    pub fn select(&self) -> Select {
        match self.count {
            Some(k) if !self.all => Select::Count(k),
            _ => Select::All,
        }
    }
}

/// `IP` or `IP:PORT` of a node link.
pub fn link_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, DEFAULT_LINK_PORT))
        .map_err(|_| format!("{s:?} is not a node link address (IP or IP:PORT)"))
}

pub fn run(a: MigrateArgs) -> Result<(), String> {
    let (from, to) = (link_addr(&a.from)?, link_addr(&a.to)?);
    let r = migrate::migrate(&a.table, from, to, a.select.select())
        .map_err(|e| format!("migrate: {e}"))?;
    print(&r, a.json)
}

#[derive(clap::Args)]
pub struct DrainArgs {
    /// The node to drain: its node link, IP[:PORT].
    #[arg(long)]
    from: String,
    /// The nodes that take its connections (their node links, IP[:PORT]; repeatable).
    #[arg(long = "to", required = true)]
    to: Vec<String>,
    /// The nft table of the switch (in this network namespace).
    #[arg(long, default_value = DEFAULT_TABLE)]
    table: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run_drain(a: DrainArgs) -> Result<(), String> {
    let from = link_addr(&a.from)?;
    let to =
        a.to.iter()
            .map(|t| link_addr(t))
            .collect::<Result<Vec<_>, _>>()?;
    let r = migrate::drain(&a.table, from, &to).map_err(|e| format!("drain: {e}"))?;
    print_drain(&r, a.json)
}

pub fn print_drain(r: &migrate::DrainReport, json: bool) -> Result<(), String> {
    if json {
        return print_json(r);
    }
    println!(
        "drained node {}: {} buckets to the other nodes, {} connections moved in {} migrations, {:.1} ms",
        r.node, r.buckets_moved, r.moved, r.migrations, r.total_ms
    );
    for (f, why) in &r.refused {
        println!("  stayed: {f}: {why}");
    }
    Ok(())
}

fn print_json(r: &impl serde::Serialize) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string_pretty(r).map_err(|e| e.to_string())?
    );
    Ok(())
}

pub fn print(r: &Report, json: bool) -> Result<(), String> {
    if json {
        return print_json(r);
    }
    println!(
        "moved {} connections from node {} to node {} ({} live there); cut-over {:.2} ms, all {:.2} ms",
        r.moved.len(),
        r.from,
        r.to,
        r.live,
        r.cutover_ms,
        r.total_ms
    );
    for (f, why) in &r.refused {
        println!("  stayed: {f}: {why}");
    }
    Ok(())
}
