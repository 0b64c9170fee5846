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
    }
    Ok(())
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
