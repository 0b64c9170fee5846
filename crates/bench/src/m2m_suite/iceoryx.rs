//! The iceoryx2 baseline of the `m2m` suite: the same 64-byte ping-pong through iceoryx2's
//! publish-subscribe ports (a shared-memory IPC library built for this), so that m2m's
//! latency is compared with a mature zero-copy transport and not only with the kernel's IPC.

use super::{deadline_passed, timed, Peer, MSG};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

fn ice_names(parent_pid: u32) -> (String, String) {
    (
        format!("splitos-bench/{parent_pid}/ping"),
        format!("splitos-bench/{parent_pid}/pong"),
    )
}

type IceResult<T> = Result<T, String>;

fn ice<T, E: std::fmt::Debug>(r: Result<T, E>) -> IceResult<T> {
    r.map_err(|e| format!("iceoryx2: {e:?}"))
}

type IcePorts = (
    iceoryx2::node::Node<iceoryx2::service::ipc::Service>,
    iceoryx2::port::publisher::Publisher<iceoryx2::service::ipc::Service, [u8; MSG], ()>,
    iceoryx2::port::subscriber::Subscriber<iceoryx2::service::ipc::Service, [u8; MSG], ()>,
);

/// The node and the two ports of one side: the parent publishes on "ping" and subscribes to
/// "pong", the peer the other way round.
fn ice_ports(parent_pid: u32, parent: bool) -> IceResult<IcePorts> {
    use iceoryx2::prelude::*;
    let (ping, pong) = ice_names(parent_pid);
    let (out, inn) = if parent { (ping, pong) } else { (pong, ping) };
    let node = ice(NodeBuilder::new().create::<ipc::Service>())?;
    let service = |name: &str| {
        ice(node
            .service_builder(&ice(name.try_into())?)
            .publish_subscribe::<[u8; MSG]>()
            .open_or_create())
    };
    let publisher = ice(service(&out)?.publisher_builder().create())?;
    let subscriber = ice(service(&inn)?.subscriber_builder().create())?;
    Ok((node, publisher, subscriber))
}

pub(super) fn iceoryx2_parent(peer: &mut Peer, iters: usize) -> Result<Vec<u64>, String> {
    let (_node, publisher, subscriber) = ice_ports(std::process::id(), true)?;
    peer.ctl.write_all(b"G").map_err(|e| e.to_string())?;
    peer.ready()?;
    let start = Instant::now();
    let mut payload = [7u8; MSG];
    timed(iters, |i| {
        payload[..8].copy_from_slice(&i.to_le_bytes());
        let sample = ice(publisher.loan_uninit())?;
        ice(sample.write_payload(payload).send())?;
        let mut n = 0u32;
        loop {
            if let Some(s) = ice(subscriber.receive())? {
                if s.payload()[..8] == i.to_le_bytes() {
                    return Ok(());
                }
            }
            n = n.wrapping_add(1);
            if n % (1 << 16) == 0 {
                peer.check(start)?;
            }
        }
    })
}

pub(super) fn iceoryx2_peer(ctl: &mut UnixStream, iters: usize) -> Result<(), String> {
    let mut go = [0u8; 1];
    ctl.read_exact(&mut go).map_err(|e| e.to_string())?;
    let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get() as u32);
    let (_node, publisher, subscriber) = ice_ports(parent, false)?;
    ctl.write_all(b"R").map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut done = 0;
    let mut n = 0u32;
    while done < iters {
        if let Some(s) = ice(subscriber.receive())? {
            let p = *s.payload();
            drop(s);
            let out = ice(publisher.loan_uninit())?;
            ice(out.write_payload(p).send())?;
            done += 1;
        }
        n = n.wrapping_add(1);
        if n % (1 << 16) == 0 && deadline_passed(start) {
            return Err("iceoryx2 parent stopped".into());
        }
    }
    Ok(())
}
