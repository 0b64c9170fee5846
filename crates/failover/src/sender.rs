//! The node's side of its checkpoint stream: drains the TCP server's checkpoint events and
//! sends them to whichever node is its successor now, with a heartbeat when there is nothing
//! else to say. On a new successor (or a broken stream) it says goodbye to the old one, sends
//! a hello to the new one and asks the TCP server to tell everything again (`resync`), so the
//! new successor's picture is complete.

use crate::stream::{self, Frame, Hello};
use splitos_tcp_server::checkpoint::{CheckpointEvent, Checkpoints};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Events moved per pass: bounds one write.
const BATCH: usize = 4096;
/// How often the sender looks for events.
const POLL_EVERY: Duration = Duration::from_millis(5);

/// What the sender shows in the node's status.
#[derive(Default)]
pub struct SenderStats {
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    pub writes: AtomicU64,
    pub connects: AtomicU64,
    pub connected: AtomicBool,
}

pub struct SenderCtx {
    pub hello: Hello,
    /// `None`: this node's connections are not checkpointed; the stream only says it lives.
    pub checkpoints: Option<Arc<Checkpoints>>,
    /// The successor's checkpoint address, as the agent's view of etcd says now.
    pub successor: Arc<Mutex<Option<SocketAddr>>>,
    pub stats: Arc<SenderStats>,
    pub stop: Arc<AtomicBool>,
}

fn frame_of(e: CheckpointEvent) -> Frame {
    match e {
        CheckpointEvent::Opened(f) => Frame::Opened(f),
        CheckpointEvent::Idle {
            flow,
            epoch,
            record,
        } => Frame::Idle {
            flow,
            epoch,
            record,
        },
        CheckpointEvent::Busy { flow, epoch } => Frame::Busy { flow, epoch },
        CheckpointEvent::Closed(f) => Frame::Closed(f),
    }
}

fn connect(to: SocketAddr, hello: &Hello) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
    stream::write_hello(&mut s, hello).map_err(std::io::Error::other)?;
    Ok(s)
}

fn bye(s: &mut TcpStream) {
    let mut b = Vec::new();
    Frame::Bye.encode(&mut b);
    let _ = s.write_all(&b);
}

/// Runs until `ctx.stop`; then says goodbye to the successor.
pub fn run(ctx: SenderCtx) {
    let mut conn: Option<(SocketAddr, TcpStream)> = None;
    let mut events = Vec::with_capacity(BATCH);
    let mut buf = Vec::with_capacity(64 << 10);
    let mut last_write = Instant::now();
    let mut retry_at = Instant::now();
    let mut last_dropped = ctx.checkpoints.as_ref().map_or(0, |c| c.dropped());
    while !ctx.stop.load(Ordering::Acquire) {
        let want = ctx.successor.lock().ok().and_then(|s| *s);
        if conn.as_ref().map(|c| c.0) != want {
            if let Some((_, mut s)) = conn.take() {
                bye(&mut s);
            }
            ctx.stats.connected.store(false, Ordering::Relaxed);
        }
        if conn.is_none() {
            match want {
                Some(to) if Instant::now() >= retry_at => match connect(to, &ctx.hello) {
                    Ok(s) => {
                        tracing::info!(successor = %to, "checkpoint stream to the successor open");
                        ctx.stats.connects.fetch_add(1, Ordering::Relaxed);
                        ctx.stats.connected.store(true, Ordering::Relaxed);
                        // Events queued for the old stream are now stale: start afresh.
                        if let Some(c) = &ctx.checkpoints {
                            events.clear();
                            c.drain(&mut events, usize::MAX);
                            events.clear();
                            c.resync();
                        }
                        conn = Some((to, s));
                    }
                    Err(e) => {
                        tracing::debug!(successor = %to, "cannot open the checkpoint stream: {e}");
                        retry_at = Instant::now() + Duration::from_millis(200);
                    }
                },
                _ => {}
            }
        }
        let Some((to, s)) = conn.as_mut() else {
            // Nobody to send to: the events are of no use.
            if let Some(c) = &ctx.checkpoints {
                events.clear();
                c.drain(&mut events, usize::MAX);
                events.clear();
            }
            std::thread::sleep(stream::BEAT_EVERY);
            continue;
        };
        events.clear();
        match &ctx.checkpoints {
            Some(c) => {
                // Polled, not woken per event: a wake-up costs ~28 µs of kernel time here, and
                // a connection per request makes two events (measured: 0.78x the requests per
                // second of a node without checkpoints when each event woke this thread).
                // An event waits at most POLL_EVERY; a BUSY that arrives late is caught by the
                // takeover's check with the client.
                std::thread::sleep(POLL_EVERY);
                // A lost event (the queue overflowed) may be a BUSY: have everything told
                // again.
                let dropped = c.dropped();
                if dropped > last_dropped {
                    last_dropped = dropped;
                    c.resync();
                }
                c.drain(&mut events, BATCH);
            }
            None => std::thread::sleep(POLL_EVERY),
        }
        buf.clear();
        for e in events.drain(..) {
            frame_of(e).encode(&mut buf);
            ctx.stats.frames.fetch_add(1, Ordering::Relaxed);
        }
        if buf.is_empty() && last_write.elapsed() >= stream::BEAT_EVERY {
            Frame::Beat.encode(&mut buf);
        }
        if buf.is_empty() {
            continue;
        }
        match s.write_all(&buf) {
            Ok(()) => {
                ctx.stats.writes.fetch_add(1, Ordering::Relaxed);
                ctx.stats
                    .bytes
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                last_write = Instant::now();
            }
            Err(e) => {
                tracing::warn!(successor = %to, "the checkpoint stream broke: {e}; reconnecting");
                conn = None;
                ctx.stats.connected.store(false, Ordering::Relaxed);
                retry_at = Instant::now() + Duration::from_millis(100);
            }
        }
    }
    if let Some((_, mut s)) = conn.take() {
        bye(&mut s);
    }
}
