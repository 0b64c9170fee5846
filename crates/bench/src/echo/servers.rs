//! The echo servers compared by the `echo` suite, each run as a process of its own so that its
//! CPU time can be read from /proc: a plain epoll loop (mio), tokio, a single-thread io_uring
//! loop, and a Split-OS application (its TCP server runs in another process).
//!
//! Every server echoes whatever it reads. They stop when their standard input closes (the
//! benchmark holds it open) or after a hard deadline, so none can outlive the run.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest a benchmark server may live.
pub const DEADLINE: Duration = Duration::from_secs(300);

/// Sets the flag when stdin reaches EOF (the parent is done or dead) or the deadline passes.
pub fn stop_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        let _ = io::stdin().read(&mut b);
        s.store(true, Ordering::Relaxed);
    });
    let s = stop.clone();
    std::thread::spawn(move || {
        std::thread::sleep(DEADLINE);
        s.store(true, Ordering::Relaxed);
    });
    stop
}

pub fn announce(addr: SocketAddr) {
    println!("LISTENING {addr}");
    let _ = io::stdout().flush();
}

pub fn epoll(stop: Arc<AtomicBool>) -> io::Result<()> {
    use mio::net::TcpListener as MioListener;
    use mio::{Events, Interest, Poll, Token};
    let std = TcpListener::bind("127.0.0.1:0")?;
    std.set_nonblocking(true)?;
    announce(std.local_addr()?);
    let mut listener = MioListener::from_std(std);
    let mut poll = Poll::new()?;
    const LISTENER: Token = Token(usize::MAX);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut conns: Vec<Option<mio::net::TcpStream>> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        for ev in events.iter() {
            if ev.token() == LISTENER {
                while let Ok((mut s, _)) = listener.accept() {
                    s.set_nodelay(true)?;
                    let t = Token(conns.len());
                    poll.registry().register(&mut s, t, Interest::READABLE)?;
                    conns.push(Some(s));
                }
                continue;
            }
            let i = ev.token().0;
            let Some(s) = conns.get_mut(i).and_then(|c| c.as_mut()) else {
                continue;
            };
            let mut close = false;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        close = true;
                        break;
                    }
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            close = true;
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        close = true;
                        break;
                    }
                }
            }
            if close {
                conns[i] = None;
            }
        }
    }
    Ok(())
}

pub fn tokio(stop: Arc<AtomicBool>) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        announce(listener.local_addr()?);
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let accepted =
                tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
            let Ok(Ok((mut s, _))) = accepted else {
                continue;
            };
            s.set_nodelay(true)?;
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    })
}

/// A single-thread io_uring echo server: multishot accept, multishot receive into a provided
/// buffer ring, a send per received chunk straight from the receive buffer.
pub fn io_uring(stop: Arc<AtomicBool>) -> io::Result<()> {
    use io_uring::{cqueue, opcode, types, IoUring};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const BUFS: u16 = 1024;
    const BUF_SIZE: usize = 4096;
    const GROUP: u16 = 0;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    announce(listener.local_addr()?);
    let mut ring: IoUring = IoUring::builder().setup_single_issuer().build(4096)?;
    // Buffer memory and the ring of buffer descriptors the kernel takes them from.
    let mut pool = vec![0u8; BUFS as usize * BUF_SIZE];
    let mut descs = memmap2::MmapMut::map_anon(BUFS as usize * 16)?;
    let mut tail: u16 = 0;
    let provide = |descs: &mut memmap2::MmapMut, tail: &mut u16, pool: &mut [u8], bid: u16| {
        let slot = (*tail & (BUFS - 1)) as usize * 16;
        let addr = pool[bid as usize * BUF_SIZE..].as_mut_ptr() as u64;
        descs[slot..slot + 8].copy_from_slice(&addr.to_ne_bytes());
        descs[slot + 8..slot + 12].copy_from_slice(&(BUF_SIZE as u32).to_ne_bytes());
        descs[slot + 12..slot + 14].copy_from_slice(&bid.to_ne_bytes());
        *tail = tail.wrapping_add(1);
    };
    let publish = |descs: &mut memmap2::MmapMut, tail: u16| {
        // SAFETY: offset 14 of the first entry is the ring tail the kernel reads (2-aligned,
        // inside the mapping); a release store orders the entry writes before it.
        let t =
            unsafe { std::sync::atomic::AtomicU16::from_ptr(descs.as_mut_ptr().add(14).cast()) };
        t.store(tail, std::sync::atomic::Ordering::Release);
    };
    for bid in 0..BUFS {
        provide(&mut descs, &mut tail, &mut pool, bid);
    }
    publish(&mut descs, tail);
    // SAFETY: `descs` outlives the ring (declared before, dropped after `ring` goes out of
    // scope at the end of this function... the ring is dropped first because it is declared
    // later) and holds BUFS entries.
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(descs.as_ptr() as u64, BUFS, GROUP, 0)?;
    }
    const ACCEPT: u64 = u64::MAX;
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .build()
        .user_data(ACCEPT);
    // SAFETY: the listener outlives the ring's use of it.
    unsafe { ring.submission().push(&accept).map_err(io::Error::other)? };
    let mut socks: Vec<Option<OwnedFd>> = Vec::new();
    // user_data: conn index << 17 | kind (0 recv, 1 send) << 16 | buffer id.
    let recv = |fd: i32, i: usize| {
        opcode::RecvMulti::new(types::Fd(fd), GROUP)
            .build()
            .user_data((i as u64) << 17)
    };
    while !stop.load(Ordering::Relaxed) {
        let ts = types::Timespec::new().nsec(100_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(62) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        let cqes: Vec<cqueue::Entry> = ring.completion().collect();
        let mut republish = false;
        for cqe in cqes {
            let ud = cqe.user_data();
            let res = cqe.result();
            if ud == ACCEPT {
                if res >= 0 {
                    // SAFETY: a successful accept's result is a new fd we own.
                    let fd = unsafe { OwnedFd::from_raw_fd(res) };
                    let _ = rustix::net::sockopt::set_tcp_nodelay(&fd, true);
                    let i = socks.len();
                    let e = recv(fd.as_raw_fd(), i);
                    socks.push(Some(fd));
                    // SAFETY: the fd stays open while it has operations (closed only after
                    // its receive ends).
                    unsafe { ring.submission().push(&e).map_err(io::Error::other)? };
                }
                continue;
            }
            let i = (ud >> 17) as usize;
            let is_send = (ud >> 16) & 1 == 1;
            if is_send {
                let bid = ud as u16;
                provide(&mut descs, &mut tail, &mut pool, bid);
                republish = true;
                continue;
            }
            let Some(fd) = socks.get(i).and_then(|s| s.as_ref()).map(|s| s.as_raw_fd()) else {
                continue;
            };
            if res > 0 {
                let Some(bid) = cqueue::buffer_select(cqe.flags()) else {
                    continue;
                };
                let ptr = pool[bid as usize * BUF_SIZE..].as_ptr();
                let send = opcode::Send::new(types::Fd(fd), ptr, res as u32)
                    .build()
                    .user_data(((i as u64) << 17) | (1 << 16) | bid as u64);
                // SAFETY: the buffer is not provided back to the kernel until this send
                // completes, so its bytes stay put.
                unsafe { ring.submission().push(&send).map_err(io::Error::other)? };
                if !cqueue::more(cqe.flags()) {
                    // SAFETY: as above.
                    unsafe {
                        ring.submission()
                            .push(&recv(fd, i))
                            .map_err(io::Error::other)?
                    };
                }
            } else if res == -105 {
                // ENOBUFS: buffers come back as sends complete; re-arm.
                // SAFETY: as above.
                unsafe {
                    ring.submission()
                        .push(&recv(fd, i))
                        .map_err(io::Error::other)?
                };
            } else if !cqueue::more(cqe.flags()) {
                socks[i] = None;
            }
        }
        if republish {
            publish(&mut descs, tail);
        }
    }
    drop(ring);
    drop(pool);
    Ok(())
}

/// The TCP server half of the Split-OS case: the same code as `splitos tcp-server`.
pub fn split_tcp_server(
    stop: Arc<AtomicBool>,
    socket: &std::path::Path,
    wait: splitos_m2m::WaitPolicy,
) -> io::Result<()> {
    let server = splitos_tcp_server::TcpServer::start(splitos_tcp_server::ServerConfig {
        socket: socket.to_path_buf(),
        threads: 1,
        wait,
        ..Default::default()
    })
    .map_err(io::Error::other)?;
    println!("READY");
    let _ = io::stdout().flush();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    server.shutdown();
    Ok(())
}

/// The application half of the Split-OS case: an event-driven echo application that talks to
/// the TCP server over one m2m channel and makes no network system call. Events are drained in
/// batches; replies are published as one batch per drain; receive acknowledgements are batched
/// per connection.
pub fn split_app(
    stop: Arc<AtomicBool>,
    socket: &std::path::Path,
    wait: splitos_m2m::WaitPolicy,
) -> io::Result<()> {
    use splitos_m2m::{Channel, ChannelConfig, Message};
    use splitos_tcp_proto::{listen_flags, BufferMeta, Event, Handle, Request};
    use std::collections::HashMap;
    let err = |e: splitos_m2m::Error| io::Error::other(e.to_string());
    let mut chan = Channel::connect(
        socket,
        ChannelConfig {
            wait,
            ..ChannelConfig::default()
        },
    )
    .map_err(err)?;
    let mut out = Vec::new();
    Request::Hello {
        version: splitos_tcp_proto::VERSION,
        name: b"bench-echo",
    }
    .encode(&mut out);
    chan.send(&out).map_err(err)?;
    out.clear();
    Request::Listen {
        req: 1,
        addr: "127.0.0.1:0".parse().map_err(io::Error::other)?,
        backlog: 1024,
        flags: listen_flags::REUSE_ADDR,
    }
    .encode(&mut out);
    chan.send(&out).map_err(err)?;
    // Replies are encoded into one arena while the events are drained, then published in
    // ring-sized batches: one wake-up check per batch, no allocation per request.
    let mut reqs: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let mut unacked: HashMap<Handle, u32> = HashMap::new();
    const ACK_EVERY: u32 = 64 << 10;
    let push = |reqs: &mut Vec<u8>, spans: &mut Vec<(usize, usize)>, r: Request<'_>| {
        let start = reqs.len();
        r.encode(reqs);
        spans.push((start, reqs.len()));
    };
    while !stop.load(Ordering::Relaxed) {
        if !chan
            .wait_readable(Some(Duration::from_millis(100)))
            .map_err(err)?
        {
            continue;
        }
        let mut failure = None;
        reqs.clear();
        spans.clear();
        chan.recv_batch(1024, |m| {
            let (h, data): (Handle, &[u8]);
            let copied;
            match m {
                Message::Inline(b) => match Event::decode(b) {
                    Ok(Event::Data { handle, data: d }) => {
                        for part in d.chunks(32 << 10) {
                            push(&mut reqs, &mut spans, Request::Send { handle, data: part });
                        }
                        h = handle;
                        data = d;
                    }
                    Ok(Event::Done { local, .. }) => {
                        if local.port() != 0 {
                            announce(local);
                        }
                        return;
                    }
                    Ok(Event::Eof { handle }) => {
                        unacked.remove(&handle);
                        push(&mut reqs, &mut spans, Request::Close { handle });
                        return;
                    }
                    Ok(Event::Failed { errno, .. }) => {
                        failure = Some(io::Error::from_raw_os_error(errno));
                        return;
                    }
                    Ok(_) => return,
                    Err(e) => {
                        failure = Some(io::Error::other(e.to_string()));
                        return;
                    }
                },
                Message::Buffer(rx) => {
                    let Ok(BufferMeta::Data(handle)) = BufferMeta::decode(rx.meta()) else {
                        return;
                    };
                    copied = rx.to_vec();
                    for part in copied.chunks(32 << 10) {
                        push(&mut reqs, &mut spans, Request::Send { handle, data: part });
                    }
                    h = handle;
                    data = &copied;
                }
            }
            let u = unacked.entry(h).or_insert(0);
            *u += data.len() as u32;
            if *u >= ACK_EVERY {
                push(
                    &mut reqs,
                    &mut spans,
                    Request::Consumed {
                        handle: h,
                        bytes: *u,
                    },
                );
                *u = 0;
            }
        })
        .map_err(err)?;
        if let Some(e) = failure {
            return Err(e);
        }
        let mut next = 0;
        while next < spans.len() {
            let mut batch = chan.send_batch();
            while let Some(&(a, b)) = spans.get(next) {
                if !batch.try_push(&reqs[a..b]).map_err(err)? {
                    break;
                }
                next += 1;
            }
            drop(batch);
            if let Some(&(a, b)) = spans.get(next) {
                chan.wait_writable(b - a, Some(Duration::from_secs(1)))
                    .map_err(err)?;
            }
        }
    }
    Ok(())
}
