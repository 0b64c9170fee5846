//! `splitos lab`: a cluster of network namespaces on this machine — a client, the steering
//! switch and N nodes each running `splitos serve` on the virtual IP — to try, test and
//! measure the cooperative servers. What it prints is here; the work is
//! `splitos_cluster::lab`'s.

use splitos_cluster::lab::{self, LabConfig, LabState, DEFAULT_PREFIX};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct LabArgs {
    /// The lab's name: the prefix of its namespaces (PREFIX-client, PREFIX-switch,
    /// PREFIX-node1, ...). Two labs with different names never collide.
    #[arg(long = "name", default_value = DEFAULT_PREFIX, global = true)]
    prefix: String,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(clap::Subcommand)]
enum LabCommand {
    /// Build the lab and start the switch and the nodes' servers (needs root).
    Up {
        /// How many nodes serve the virtual IP.
        #[arg(long, default_value_t = 2)]
        nodes: u16,
        /// The directory the nodes serve [default: a small demo site].
        #[arg(long)]
        site: Option<PathBuf>,
        /// The TCP port of the virtual IP.
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// Run the control plane a node failure needs: an etcd member in its own namespace
        /// (PREFIX-etcd), the switch controller (`splitos switch watch`) in the switch's, and
        /// the nodes registered in etcd with checkpoints to their successors. Needs a binary
        /// built with `--features failover` and etcd (apt-get install -y etcd-server).
        #[arg(long)]
        failover: bool,
        /// One more argument for every node's `splitos serve` (repeat for several; e.g.
        /// `--node-arg=--no-checkpoints`).
        #[arg(long = "node-arg", value_name = "ARG", allow_hyphen_values = true)]
        node_args: Vec<String>,
    },
    /// Run a command inside a member of the lab: client, switch or nodeK.
    Exec {
        /// client, switch, node1, node2, ...
        member: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Show the lab's namespaces and processes and whether they are alive.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move live connections from one node to another (`splitos migrate` in the switch
    /// namespace, with the nodes' link addresses filled in).
    Migrate {
        /// The node they leave: nodeK.
        #[arg(long)]
        from: String,
        /// The node they go to: nodeK.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        select: crate::migrate::SelectArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take a node out of service without a reset: new connections go to the other nodes at
    /// once, and its live connections move to them (`splitos drain` in the switch namespace).
    Drain {
        /// The node to drain: nodeK.
        node: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Kill a node as a machine dies: SIGKILL to all its processes and its link to the switch
    /// cut. (Its flows are not taken over by itself: `splitos switch remove-node K` in the
    /// switch namespace sends its buckets to the others.)
    Kill {
        /// The node to kill: nodeK.
        node: String,
    },
    /// Start a node again (after `lab kill`) with the arguments it was first started with;
    /// waits until it serves.
    Restart {
        /// The node to start: nodeK.
        node: String,
    },
    /// Cut a node off from the control plane (etcd and the other nodes' link and checkpoint
    /// ports) while it keeps running and its data path to the clients stays up (labs made
    /// with --failover).
    Partition {
        /// The node to cut off: nodeK.
        node: String,
    },
    /// Undo `lab partition`.
    Heal {
        /// The node to reconnect: nodeK.
        node: String,
    },
    /// Remove every namespace, process and file of the lab (also after a crash).
    Down,
}

fn name_flag(prefix: &str) -> String {
    if prefix == DEFAULT_PREFIX {
        String::new()
    } else {
        format!(" --name {prefix}")
    }
}

pub fn run(a: LabArgs) -> Result<(), String> {
    let p = a.prefix.as_str();
    match a.command {
        LabCommand::Up {
            nodes,
            site,
            port,
            failover,
            node_args,
        } => {
            if failover && !cfg!(feature = "failover") {
                return Err(format!("lab up --failover: {}", crate::switch::NO_FAILOVER));
            }
            let exe = std::env::current_exe()
                .map_err(|e| format!("lab: cannot find the splitos binary itself: {e}"))?;
            let cfg = LabConfig {
                prefix: p.to_string(),
                nodes,
                site,
                port,
                exe,
                node_args,
            };
            let st = lab::up_with(&cfg, failover).map_err(|e| format!("lab up: {e}"))?;
            print_up(&st);
        }
        LabCommand::Restart { node } => {
            let pr = lab::restart(p, &node).map_err(|e| format!("lab restart: {e}"))?;
            println!("{node} is running again (pid {}), serving", pr.pid);
        }
        LabCommand::Partition { node } => {
            lab::failover::partition(p, &node).map_err(|e| format!("lab partition: {e}"))?;
            println!(
                "{node} is cut off from etcd and its peers' link and checkpoint ports; its \
                 clients still reach it (`splitos lab{} heal {node}` undoes it)",
                name_flag(p)
            );
        }
        LabCommand::Heal { node } => {
            lab::failover::heal(p, &node).map_err(|e| format!("lab heal: {e}"))?;
            println!("{node} reaches the control plane again");
        }
        LabCommand::Exec { member, command } => {
            let (program, args) = command
                .split_first()
                .ok_or("lab exec: give the command after --")?;
            let e = lab::exec(p, &member, program, args);
            return Err(format!("lab exec: {e}"));
        }
        LabCommand::Status { json } => {
            let s = lab::status(p).map_err(|e| format!("lab status: {e}"))?;
            let etcd = s.state.failover.as_ref().map(cluster_status);
            if json {
                let mut v = serde_json::to_value(&s).map_err(|e| e.to_string())?;
                if let (Some(etcd), Some(o)) = (etcd, v.as_object_mut()) {
                    match etcd {
                        Ok(e) => {
                            o.insert("leases".into(), e["leases"].clone());
                            o.insert("adoptions".into(), e["adoptions"].clone());
                        }
                        Err(e) => {
                            o.insert("etcd_error".into(), e.into());
                        }
                    }
                }
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
                );
            } else {
                let st = &s.state;
                println!(
                    "lab {}: {} nodes behind http://{}:{}/ (serving {})",
                    st.prefix,
                    st.nodes,
                    st.vip,
                    st.port,
                    st.site.display()
                );
                for (n, ok) in st.namespaces.iter().zip(&s.namespaces_present) {
                    println!(
                        "  namespace {n:<28} {}",
                        if *ok { "present" } else { "MISSING" }
                    );
                }
                for (pr, ok) in st.processes.iter().zip(&s.processes_alive) {
                    println!(
                        "  pid {:<8} {:<24} {} ({})  log {}",
                        pr.pid,
                        pr.namespace,
                        if *ok { "running" } else { "DEAD" },
                        pr.what,
                        pr.log.display()
                    );
                }
                for n in &s.nodes {
                    match (&n.connections, &n.link_error) {
                        (Some(c), _) => println!(
                            "  node{}: {} connections, {} flows moved to it",
                            n.node,
                            c.len(),
                            n.owned_flows.len()
                        ),
                        (None, e) => println!(
                            "  node{}: its node link did not answer: {}",
                            n.node,
                            e.as_deref().unwrap_or("?")
                        ),
                    }
                    println!(
                        "         switch: {} buckets{}, {} packets forwarded to clients, {} \
                         dropped as dead{}",
                        n.buckets,
                        if n.dead { ", FENCED AS DEAD" } else { "" },
                        n.forwarded_packets,
                        n.dead_dropped_packets,
                        if n.partitioned { "; PARTITIONED" } else { "" }
                    );
                    if let Some(f) = &n.failover {
                        println!("         failover: {f}");
                    }
                }
                if let Some(h) = s.etcd_healthy {
                    println!("  etcd: {}", if h { "healthy" } else { "NOT HEALTHY" });
                }
                match etcd {
                    Some(Ok(e)) => print_etcd(&e),
                    Some(Err(e)) => println!("  etcd: {e}"),
                    None => {}
                }
            }
        }
        LabCommand::Migrate {
            from,
            to,
            select,
            json,
        } => {
            let r = lab::migrate(p, &from, &to, select.select())
                .map_err(|e| format!("lab migrate: {e}"))?;
            crate::migrate::print(&r, json)?;
        }
        LabCommand::Drain { node, json } => {
            let r = lab::drain(p, &node).map_err(|e| format!("lab drain: {e}"))?;
            crate::migrate::print_drain(&r, json)?;
        }
        LabCommand::Kill { node } => {
            let r = lab::kill(p, &node).map_err(|e| format!("lab kill: {e}"))?;
            println!(
                "node{} is dead: {} processes killed, its link cut",
                r.node,
                r.killed.len()
            );
        }
        LabCommand::Down => {
            let r = lab::down(p).map_err(|e| format!("lab down: {e}"))?;
            println!(
                "lab {p} is down: {} processes stopped, {} namespaces removed",
                r.processes,
                r.namespaces.len() - r.left.len()
            );
            if !r.left.is_empty() {
                return Err(format!(
                    "lab down: could not remove {} (try `ip netns del NAME`)",
                    r.left.join(", ")
                ));
            }
        }
    }
    Ok(())
}

fn print_up(st: &LabState) {
    let n = name_flag(&st.prefix);
    let port = if st.port == 80 {
        String::new()
    } else {
        format!(":{}", st.port)
    };
    println!(
        "lab {} is up: {} nodes serve {} behind the virtual IP {}, port {}",
        st.prefix,
        st.nodes,
        st.site.display(),
        st.vip,
        st.port
    );
    println!("  namespaces: {}", st.namespaces.join(", "));
    if let Some(f) = &st.failover {
        println!(
            "  failover: etcd at {} (namespace {}), the switch controller in the switch \
             namespace (log {}/controller.log), cluster {:?}",
            f.etcd,
            f.namespace,
            st.dir.display(),
            f.cluster
        );
        if !f.node_failover {
            println!(
                "  WARNING: this splitos serve has no --etcd: the nodes run without failover \
                 (no leases, checkpoints or takeover); etcd and the controller run"
            );
        }
        println!("  kill a node:     splitos lab{n} kill node1   (restart node1 brings it back)");
        println!("  cut one off:     splitos lab{n} partition node1   (heal node1 undoes it)");
    }
    println!("  reach it from the client namespace:");
    println!(
        "    splitos lab{n} exec client -- curl http://{}{port}/",
        st.vip
    );
    println!("  see the switch:  splitos lab{n} exec switch -- splitos switch status");
    println!("  see the lab:     splitos lab{n} status");
    println!("  remove it:       splitos lab{n} down");
}

/// Leases and adoptions from the lab's etcd (asked from inside its namespace), as JSON.
#[cfg(feature = "failover")]
fn cluster_status(f: &lab::failover::FailoverState) -> Result<serde_json::Value, String> {
    let ask = || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let st = rt
            .block_on(splitos_failover::controller::status::cluster_status(
                std::slice::from_ref(&f.etcd),
                &f.cluster,
            ))
            .map_err(|e| e.to_string())?;
        serde_json::to_value(st).map_err(|e| e.to_string())
    };
    splitos_cluster::netns::run_in(&f.namespace, ask).map_err(|e| e.to_string())?
}

#[cfg(not(feature = "failover"))]
fn cluster_status(_f: &lab::failover::FailoverState) -> Result<serde_json::Value, String> {
    Err(format!(
        "leases and adoptions not shown: {}",
        crate::switch::NO_FAILOVER
    ))
}

fn print_etcd(e: &serde_json::Value) {
    let none = Vec::new();
    let leases = e["leases"].as_array().unwrap_or(&none);
    println!("  leases: {}", leases.len());
    for l in leases {
        println!(
            "    {} at {}: incarnation {}, lease {}, {} s left of {}",
            l["name"].as_str().unwrap_or("?"),
            l["addr"].as_str().unwrap_or("?"),
            l["incarnation"],
            l["lease"].as_str().unwrap_or("?"),
            l["ttl_s"],
            l["granted_ttl_s"]
        );
    }
    let adoptions = e["adoptions"].as_array().unwrap_or(&none);
    println!("  owners (adoptions): {}", adoptions.len());
    for a in adoptions {
        println!(
            "    {} (incarnation {}) -> {}: {} restored, {} reset, applied: {}",
            a["dead"].as_str().unwrap_or("?"),
            a["incarnation"],
            a["adopter"].as_str().unwrap_or("?"),
            a["restored"],
            a["reset"],
            if a["applied"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            }
        );
    }
}
