//! The successor's side of checkpoint streams: a listener on the node's checkpoint port (for
//! allowed networks only), one thread per node it succeeds (at most [`SOURCES_MAX`]), each
//! reading frames into the [`Store`] and noting when it last heard from its node.
//!
//! Hearing nothing is how a death is noticed early: a stream silent for longer than the
//! suspicion time, or closed without a goodbye, makes the node *suspect*; the agent then asks
//! etcd to end its lease. etcd still decides — the adoption is a transaction on the dead
//! incarnation — and a node wrongly suspected loses its lease, stops, and restarts as a new
//! incarnation; it can never answer beside its successor, because the switch fences it.

use crate::store::{Store, SOURCES_MAX};
use crate::stream::{self, Frame};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a stream from one node incarnation stands.
#[derive(Clone, Copy, Debug)]
pub struct Heard {
    pub last: Instant,
    /// The stream ended without a goodbye.
    pub broken: bool,
}

pub struct ReceiverCtx {
    pub store: Arc<Mutex<Store>>,
    pub heard: Arc<Mutex<HashMap<(String, i64), Heard>>>,
    pub allow: Vec<(IpAddr, u8)>,
    pub stop: Arc<AtomicBool>,
}

/// Binds the checkpoint port.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Accepts streams until `ctx.stop`.
pub fn run(listener: TcpListener, ctx: Arc<ReceiverCtx>) {
    let streams = Arc::new(AtomicUsize::new(0));
    while !ctx.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((s, peer)) => {
                if !splitos_migrate::node::allowed(&ctx.allow, peer.ip()) {
                    tracing::warn!(%peer, "a checkpoint stream from outside the allowed networks: closed");
                    continue;
                }
                if streams.load(Ordering::Acquire) >= SOURCES_MAX {
                    tracing::warn!(%peer, "more checkpoint streams than {SOURCES_MAX}: closed");
                    continue;
                }
                streams.fetch_add(1, Ordering::AcqRel);
                let (ctx2, n) = (ctx.clone(), streams.clone());
                let spawned = std::thread::Builder::new()
                    .name("checkpoints-in".into())
                    .spawn(move || {
                        if let Err(e) = serve(s, &ctx2) {
                            tracing::info!(%peer, "a checkpoint stream ended: {e}");
                        }
                        n.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    streams.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!("accepting a checkpoint stream: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve(mut s: TcpStream, ctx: &ReceiverCtx) -> Result<(), stream::StreamError> {
    s.set_nonblocking(false)?;
    // A stream that says nothing for this long is as good as gone; the suspicion comes
    // sooner, from `heard`.
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let hello = stream::read_hello(&mut s)?;
    let key = (hello.node.clone(), hello.incarnation);
    if let Ok(mut st) = ctx.store.lock() {
        st.begin(&hello.node, hello.incarnation);
    }
    let note = |broken: bool| {
        if let Ok(mut h) = ctx.heard.lock() {
            h.insert(
                key.clone(),
                Heard {
                    last: Instant::now(),
                    broken,
                },
            );
        }
    };
    note(false);
    tracing::info!(node = %hello.node, incarnation = hello.incarnation, "checkpoint stream from a node this one succeeds");
    let mut buf = Vec::new();
    loop {
        if ctx.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let frame = match stream::read_frame(&mut s, &mut buf) {
            Ok(f) => f,
            Err(e) => {
                note(true);
                return Err(e);
            }
        };
        note(false);
        let bye = frame == Frame::Bye;
        if let Ok(mut st) = ctx.store.lock() {
            st.apply(&hello.node, hello.incarnation, frame);
        }
        if bye {
            if let Ok(mut h) = ctx.heard.lock() {
                h.remove(&key);
            }
            return Ok(());
        }
    }
}
