//! `splitos switch`: sets up and changes the steering switch of a virtual IP in the current
//! network namespace (run it on the router, or in the lab's switch namespace). Every
//! subcommand is one nftables transaction; the state lives in the kernel, so each invocation
//! reads it back first. The work is `splitos_cluster::switch`'s.

use splitos_cluster::switch::{
    Change, Flow, Node, NodeId, Switch, SwitchConfig, DEFAULT_BUCKETS, DEFAULT_TABLE,
};
use std::net::{Ipv4Addr, SocketAddrV4};

#[derive(clap::Args)]
pub struct SwitchArgs {
    /// The nft table (`ip` family) the switch lives in.
    #[arg(long, default_value = DEFAULT_TABLE, global = true)]
    table: String,
    #[command(subcommand)]
    command: SwitchCommand,
}

#[derive(clap::Subcommand)]
enum SwitchCommand {
    /// Start steering VIP:PORT over the given nodes: forwarding on, one routing table per node
    /// (`ip rule fwmark ID`), and the nft table with the bucket table spread evenly.
    Init {
        /// The virtual IP the nodes hold on their loopback.
        #[arg(long)]
        vip: Ipv4Addr,
        /// A TCP port of the virtual IP to steer (repeatable).
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
        /// A node, as ID=NEXT_HOP@INTERFACE, e.g. 1=198.18.1.2@n1 (repeatable).
        #[arg(long = "node")]
        nodes: Vec<Node>,
        /// Hash buckets for new flows.
        #[arg(long, default_value_t = DEFAULT_BUCKETS)]
        buckets: u16,
        /// The hash seed.
        #[arg(long, default_value_t = 0x5eed_c1a5)]
        seed: u32,
    },
    /// Show nodes, bucket shares, moved, held and fenced flows and the drop counters.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a node (ID=NEXT_HOP@INTERFACE); it takes buckets only from the others' surplus.
    AddNode { node: Node },
    /// Remove a node; only its buckets move.
    RemoveNode { id: NodeId },
    /// Send a flow (the client's ADDR:PORT) to node ID from now on; every other node is fenced
    /// from it and a hold on it is released, in one transaction.
    Move {
        flow: SocketAddrV4,
        #[arg(long)]
        to: NodeId,
    },
    /// Drop the client's packets of a flow (while it moves).
    Hold { flow: SocketAddrV4 },
    /// Stop holding a flow.
    Release { flow: SocketAddrV4 },
    /// Drop what node ID still sends for a flow.
    Fence {
        flow: SocketAddrV4,
        #[arg(long)]
        node: NodeId,
    },
    /// Let node ID send for a flow again.
    Unfence {
        flow: SocketAddrV4,
        #[arg(long)]
        node: NodeId,
    },
    /// Forget a flow: it follows its bucket again, unheld and unfenced.
    Forget { flow: SocketAddrV4 },
    /// Remove the switch: its nft table and its routing.
    Down,
    /// Make the switch follow etcd (the switch controller): publish its ring, apply the
    /// adoptions of dead nodes' flows, fence nodes whose lease is gone, take back nodes that
    /// return. While it runs it is the only writer of the switch's table. Runs until
    /// SIGINT/SIGTERM. Needs a binary built with `--features failover`.
    Watch {
        /// etcd's client URLs, comma-separated (http://HOST:PORT,...).
        #[arg(long, value_delimiter = ',', required = true)]
        etcd: Vec<String>,
        /// The cluster's name: its keys live under /splitos/NAME/ in etcd.
        #[arg(long)]
        cluster: String,
        /// How long a dead node's successor has to adopt its flows before the switch fences
        /// the node and moves its buckets anyway (milliseconds).
        #[arg(long, default_value_t = 3000)]
        grace_ms: u64,
        /// How long the buckets a returning node takes keep sending their established flows
        /// to the node that held them (seconds, at most 120).
        #[arg(long, default_value_t = 90)]
        return_keep_s: u64,
    },
}

fn err(e: impl std::fmt::Display) -> String {
    format!("switch: {e}")
}

pub fn run(a: SwitchArgs) -> Result<(), String> {
    let t = a.table.as_str();
    let open = || Switch::open(t).map_err(err);
    match a.command {
        SwitchCommand::Init {
            vip,
            ports,
            nodes,
            buckets,
            seed,
        } => {
            let cfg = SwitchConfig {
                vip,
                ports,
                buckets,
                seed,
            };
            let sw = Switch::create(t, cfg, &nodes).map_err(err)?;
            print_status(&sw, false);
        }
        SwitchCommand::Status { json } => print_status(&open()?, json),
        SwitchCommand::AddNode { node } => {
            let id = node.id;
            let moved = open()?.add_node(node).map_err(err)?;
            println!("node {id} added; {} buckets moved to it", moved.len());
        }
        SwitchCommand::RemoveNode { id } => {
            let moved = open()?.remove_node(id).map_err(err)?;
            println!(
                "node {id} removed; its {} buckets moved to the others",
                moved.len()
            );
        }
        SwitchCommand::Move { flow, to } => {
            open()?.move_flow(Flow(flow), to).map_err(err)?;
            println!("{flow} now goes to node {to}; the other nodes are fenced from it");
        }
        SwitchCommand::Hold { flow } => {
            open()?.apply(&[Change::Hold(Flow(flow))]).map_err(err)?;
        }
        SwitchCommand::Release { flow } => {
            open()?.apply(&[Change::Release(Flow(flow))]).map_err(err)?;
        }
        SwitchCommand::Fence { flow, node } => {
            open()?
                .apply(&[Change::Fence(Flow(flow), node)])
                .map_err(err)?;
        }
        SwitchCommand::Unfence { flow, node } => {
            open()?
                .apply(&[Change::Unfence(Flow(flow), node)])
                .map_err(err)?;
        }
        SwitchCommand::Forget { flow } => {
            let mut sw = open()?;
            let f = Flow(flow);
            let mut c = vec![Change::ClearOwner(f), Change::Release(f)];
            c.extend(sw.state().nodes.keys().map(|&n| Change::Unfence(f, n)));
            sw.apply(&c).map_err(err)?;
        }
        SwitchCommand::Down => {
            open()?.destroy().map_err(err)?;
            println!("switch table {t} removed");
        }
        SwitchCommand::Watch {
            etcd,
            cluster,
            grace_ms,
            return_keep_s,
        } => watch(
            t,
            etcd,
            &cluster,
            std::time::Duration::from_millis(grace_ms),
            std::time::Duration::from_secs(return_keep_s),
        )?,
    }
    Ok(())
}

/// What a binary without the `failover` feature says when asked for it.
pub(crate) const NO_FAILOVER: &str = "this splitos was built without failover support; build \
     it with `cargo build --release -p splitos-cli --features failover` (which needs protoc: \
     apt-get install -y protobuf-compiler on Debian)";

#[cfg(not(feature = "failover"))]
fn watch(
    _table: &str,
    _etcd: Vec<String>,
    _cluster: &str,
    _grace: std::time::Duration,
    _keep: std::time::Duration,
) -> Result<(), String> {
    Err(format!("switch watch: {NO_FAILOVER}"))
}

/// Runs the switch controller until SIGINT/SIGTERM (or an error it cannot retry).
#[cfg(feature = "failover")]
fn watch(
    table: &str,
    etcd: Vec<String>,
    cluster: &str,
    grace: std::time::Duration,
    keep: std::time::Duration,
) -> Result<(), String> {
    use splitos_failover::controller::{self, ControllerOptions};
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let stop = crate::stop_on_signals()?;
    // Fails early, before etcd is reached, if the switch is missing or too old.
    let sw = Switch::open(table).map_err(err)?;
    if !sw.state().has_failover {
        return Err(format!(
            "switch watch: the switch table {table:?} has no dead-node fence (it was made by \
             an older splitos): re-create it with `splitos switch down` and `splitos switch init`"
        ));
    }
    let opts = ControllerOptions {
        grace,
        return_keep: keep,
        ..ControllerOptions::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("switch watch: cannot start the async runtime: {e}"))?;
    rt.block_on(async {
        let stopped = async {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let work = async {
            // etcd may come up after the switch: wait for it (with backoff) rather than fail.
            let mut backoff = Duration::from_millis(100);
            let registry = loop {
                match splitos_failover::etcd::Registry::connect(&etcd, cluster).await {
                    Ok(r) => break r,
                    Err(e) => {
                        eprintln!("splitos switch watch: {e}; trying again in {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            controller::run(registry, table, opts)
                .await
                .map_err(|e| format!("switch watch: {e}"))
        };
        tokio::select! {
            r = work => r,
            () = stopped => {
                eprintln!("splitos switch watch: stopping; the switch keeps its state");
                Ok(())
            }
        }
    })
}

fn print_status(sw: &Switch, json: bool) {
    let st = sw.state();
    if json {
        println!("{}", st.to_json());
        return;
    }
    if let Some(c) = &st.config {
        let ports: Vec<String> = c.ports.iter().map(u16::to_string).collect();
        println!(
            "switch {}: virtual IP {} port {} — {} buckets",
            sw.table(),
            c.vip,
            ports.join(","),
            st.buckets.len()
        );
    }
    let counts = st.bucket_counts();
    for n in st.nodes.values() {
        println!(
            "  node {:>3}  via {:<15} dev {:<15} {} buckets",
            n.id,
            n.via,
            n.dev,
            counts.get(&n.id).copied().unwrap_or(0)
        );
    }
    for (f, n) in &st.owners {
        println!("  moved  {} -> node {n}", f.0);
    }
    for f in &st.hold {
        println!("  held   {}", f.0);
    }
    for (n, f) in &st.fences {
        println!("  fenced {} from node {n}", f.0);
    }
    println!(
        "  dropped: {} held packets, {} fenced packets",
        st.held_packets, st.fenced_packets
    );
}
