//! Target M4: in one network namespace made by the test, a connection is silenced by an nft
//! drop rule, saved, closed silently in repair mode, restored on the same 4-tuple through its
//! record's bytes, and let through again; the client's next exchange works on the same socket
//! and no RST is ever seen (an nft counter counts every RST in the namespace). For
//! ESTABLISHED, CLOSE_WAIT and FIN_WAIT2, with data in the kernel queues in some iterations:
//! unread bytes in the receive queue; bytes written while silenced (lost, so sent-unacked,
//! and a never-sent tail); bytes delivered whose ACKs were lost (a cut-over's hold). It
//! prints how long the queued bytes took to arrive after the restore.
//!
//! Iterations: `SPLITOS_M4_ITERATIONS` (default 1000) per state, each state bounded to 150 s.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use splitos_repair::{record, socket, TcpState};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};
use support::{nft, sh, Netns};

const SERVER: &str = "198.18.0.1:7000";
const CLIENT_IP: &str = "198.18.0.2";
const STATE_BOUND: Duration = Duration::from_secs(150);

fn iterations() -> usize {
    std::env::var("SPLITOS_M4_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn setup_namespace() {
    sh("ip", &["link", "set", "lo", "mtu", "1500", "up"]);
    sh("ip", &["addr", "add", "198.18.0.1/32", "dev", "lo"]);
    sh("ip", &["addr", "add", "198.18.0.2/32", "dev", "lo"]);
    // Flows are named by the client's address and port (the server's are fixed). Injected
    // repair packets carry the repair mark and pass; every RST is counted.
    nft(&format!(
        "table inet m4 {{
            counter rsts {{}}
            counter dropped {{}}
            set silenced {{ type ipv4_addr . inet_service; }}
            set ackless {{ type ipv4_addr . inet_service; }}
            chain input {{
                type filter hook input priority -10; policy accept;
                tcp flags & rst == rst counter name \"rsts\"
                meta mark {:#x} accept
                ip saddr . tcp sport @silenced counter name \"dropped\" drop
                ip daddr . tcp dport @silenced counter name \"dropped\" drop
                ip saddr . tcp sport @ackless counter name \"dropped\" drop
            }}
        }}",
        splitos_repair::REPAIR_MARK
    ));
}

/// Silences the flow both ways (`set` "silenced") or only the client's packets ("ackless").
fn silence_in(set: &str, port: u16, on: bool) {
    let verb = if on { "add" } else { "delete" };
    nft(&format!(
        "{verb} element inet m4 {set} {{ {CLIENT_IP} . {port} }}"
    ));
}

fn silence(port: u16, on: bool) {
    silence_in("silenced", port, on);
}

fn counter(name: &str) -> u64 {
    let out = sh("nft", &["list", "counter", "inet", "m4", name]);
    let at = out.find("packets ").expect("counter output");
    out[at + 8..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn connect_client() -> TcpStream {
    use rustix::net::{AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    let local: SocketAddr = format!("{CLIENT_IP}:0").parse().unwrap();
    rustix::net::bind(&fd, &local).unwrap();
    let server: SocketAddr = SERVER.parse().unwrap();
    rustix::net::connect(&fd, &server).unwrap();
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn wait_state(s: &impl AsFd, want: u8) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let st = splitos_repair::tcp_state(s.as_fd()).unwrap();
        if st == want {
            return;
        }
        assert!(Instant::now() < until, "state {st}, waited for {want}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn read_exact(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

fn expect_eof(s: &mut TcpStream) {
    let mut b = [0u8; 16];
    assert_eq!(s.read(&mut b).unwrap(), 0, "expected the peer's FIN");
}

fn pattern(seed: usize, n: usize) -> Vec<u8> {
    (0..n).map(|i| (seed * 31 + i * 7) as u8).collect()
}

#[derive(Default, Debug)]
struct Tally {
    iterations: usize,
    with_recv_queue: usize,
    with_unacked: usize,
    with_unsent: usize,
    seq_above_2_31: usize,
    save_us: Vec<u128>,
    /// From finish() to the client holding every byte the server had queued while silenced.
    resync_ms: Vec<u128>,
    /// With only the client's ACKs lost: from finish() to the answer of the next request.
    acks_lost_ms: Vec<u128>,
    restore_us: Vec<u128>,
}

/// One iteration: connect, bring the server side to `state`, maybe fill queues, silence, save,
/// close silently, restore from the record's bytes, lift, finish, exchange, close.
fn iteration(listener: &TcpListener, state: TcpState, i: usize, tally: &mut Tally) {
    let mut client = connect_client();
    let (server, _) = listener.accept().unwrap();
    let mut server = Some(server);
    let port = client.local_addr().unwrap().port();
    client.write_all(b"hello").unwrap();
    assert_eq!(read_exact(server.as_mut().unwrap(), 5), b"hello");
    server.as_mut().unwrap().write_all(b"welcome").unwrap();
    assert_eq!(read_exact(&mut client, 7), b"welcome");

    let unread = if i % 4 == 1 {
        pattern(i, 3000)
    } else {
        Vec::new()
    };
    let queued_out = if i % 10 == 3 && state != TcpState::FinWait2 {
        pattern(i + 1, 40_000)
    } else {
        Vec::new()
    };
    // Every tenth iteration (7, 17, ...): the server's bytes reach the client but the client's
    // ACKs are lost, as when the switch holds a flow's client packets during a cut-over.
    let acks_lost = i % 10 == 7 && state != TcpState::FinWait2;
    client.write_all(&unread).unwrap();
    match state {
        TcpState::Established => {}
        TcpState::CloseWait => {
            client.shutdown(std::net::Shutdown::Write).unwrap();
            wait_state(server.as_ref().unwrap(), TcpState::CloseWait as u8);
        }
        TcpState::FinWait2 => {
            server
                .as_ref()
                .unwrap()
                .shutdown(std::net::Shutdown::Write)
                .unwrap();
            expect_eof(&mut client);
            wait_state(server.as_ref().unwrap(), TcpState::FinWait2 as u8);
        }
    }
    if !unread.is_empty() {
        // Wait until the bytes are in the server's receive queue.
        let until = Instant::now() + Duration::from_secs(5);
        let mut peek = vec![0u8; unread.len()];
        while server.as_ref().unwrap().peek(&mut peek).unwrap() < unread.len() {
            assert!(Instant::now() < until);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    let delivered = pattern(i + 3, 8000);
    if acks_lost {
        silence_in("ackless", port, true);
        server.as_mut().unwrap().write_all(&delivered).unwrap();
        assert_eq!(read_exact(&mut client, delivered.len()), delivered);
    }
    silence(port, true);
    let bang = i == 0 && state != TcpState::CloseWait;
    if bang {
        // The rule works: a byte sent now does not arrive.
        client.write_all(b"!").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        server.as_ref().unwrap().set_nonblocking(true).unwrap();
        let mut b = vec![0u8; unread.len() + 1];
        assert_eq!(
            server.as_ref().unwrap().peek(&mut b).unwrap_or(0),
            unread.len()
        );
        server.as_ref().unwrap().set_nonblocking(false).unwrap();
    }
    if !queued_out.is_empty() {
        // Written while silenced: the first window's worth is sent (and dropped), the rest
        // stays unsent.
        server.as_mut().unwrap().write_all(&queued_out).unwrap();
    }

    let t0 = Instant::now();
    let srv: OwnedFd = server.take().unwrap().into();
    let saved = socket::pause(srv.as_fd()).unwrap().save().unwrap();
    socket::close_silently(srv).unwrap();
    tally.save_us.push(t0.elapsed().as_micros());
    assert_eq!(saved.state, state);
    if acks_lost {
        assert_eq!(saved.send_queue, delivered, "delivered but unacknowledged");
    }
    if saved.send_seq >= 1 << 31 || saved.recv_seq >= 1 << 31 {
        tally.seq_above_2_31 += 1;
    }
    assert_eq!(saved.recv_queue, unread);
    if !queued_out.is_empty() {
        assert_eq!(saved.send_queue, queued_out);
        if (saved.unsent_len as usize) < saved.send_queue.len() {
            tally.with_unacked += 1;
        }
        if saved.unsent_len > 0 {
            tally.with_unsent += 1;
        }
    }
    if !unread.is_empty() {
        tally.with_recv_queue += 1;
    }
    let held = pattern(i + 2, i % 50);
    let bytes = saved
        .repr(socket::UserState {
            flags: i as u32,
            server_unsent: &held,
            server_held: &[],
            app_unanswered: b"GET / HTTP/1.1\r\n\r\n",
        })
        .to_vec()
        .unwrap();

    let t1 = Instant::now();
    let repr = record::parse(&bytes).unwrap();
    assert_eq!(repr.server_unsent, &held[..]);
    let restoring = match socket::restore(&repr, socket::RestoreOptions::default()) {
        Ok(r) => r,
        Err(e) => {
            let ss = sh("ss", &["-tanoi", "sport", "7000", "or", "dport", "7000"]);
            panic!("iteration {i}, client port {port}: {e}\n{ss}");
        }
    };
    tally.restore_us.push(t1.elapsed().as_micros());
    silence(port, false);
    if acks_lost {
        silence_in("ackless", port, false);
    }
    let t2 = Instant::now();
    let mut server = TcpStream::from(restoring.finish().unwrap());
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(
        splitos_repair::tcp_state(server.as_fd()).unwrap(),
        state as u8
    );

    // The next exchange, on the same client socket.
    if !unread.is_empty() {
        assert_eq!(read_exact(&mut server, unread.len()), unread);
    }
    if bang {
        // The byte sent while silenced arrives now, retransmitted by the client.
        assert_eq!(read_exact(&mut server, 1), b"!");
    }
    if !queued_out.is_empty() {
        assert_eq!(read_exact(&mut client, queued_out.len()), queued_out);
        tally.resync_ms.push(t2.elapsed().as_millis());
    }
    match state {
        TcpState::Established => {
            client.write_all(format!("ping {i}").as_bytes()).unwrap();
            let ping = format!("ping {i}");
            assert_eq!(read_exact(&mut server, ping.len()), ping.as_bytes());
            server.write_all(b"pong").unwrap();
            assert_eq!(read_exact(&mut client, 4), b"pong");
            if acks_lost {
                tally.acks_lost_ms.push(t2.elapsed().as_millis());
            }
            client.shutdown(std::net::Shutdown::Write).unwrap();
            expect_eof(&mut server);
            drop(server);
            expect_eof(&mut client);
        }
        TcpState::CloseWait => {
            expect_eof(&mut server);
            server.write_all(b"last words").unwrap();
            assert_eq!(read_exact(&mut client, 10), b"last words");
            if acks_lost {
                tally.acks_lost_ms.push(t2.elapsed().as_millis());
            }
            drop(server);
            expect_eof(&mut client);
        }
        TcpState::FinWait2 => {
            client.write_all(b"late data").unwrap();
            assert_eq!(read_exact(&mut server, 9), b"late data");
            drop(client);
            expect_eof(&mut server);
        }
    }
    tally.iterations += 1;
}

fn median(v: &mut [u128]) -> u128 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn run_state(state: TcpState) {
    support::require_root_and_nft();
    let ns = Netns::new("m4");
    let n = iterations();
    let tally = ns.run(|| {
        setup_namespace();
        let listener = TcpListener::bind(SERVER).unwrap();
        let mut tally = Tally::default();
        let start = Instant::now();
        for i in 0..n {
            assert!(
                start.elapsed() < STATE_BOUND,
                "{state:?}: only {i} of {n} iterations in {STATE_BOUND:?}"
            );
            iteration(&listener, state, i, &mut tally);
        }
        let rsts = counter("rsts");
        assert_eq!(rsts, 0, "{state:?}: {rsts} RST segments were seen");
        // The rule did silence something (the window probes and the ACKs of injected
        // segments at least), so the test is not passing around it.
        let dropped = counter("dropped");
        assert!(dropped > 0, "no packet was dropped");
        eprintln!(
            "M4 {state:?}: {} iterations in {:.1} s, 0 RST, {dropped} packets silenced; {} with a receive queue, {} with \
             unacked and {} with unsent send-queue bytes, {} with a sequence number ≥ 2^31; median save+close {} µs, parse+restore \
             {} µs; queued bytes delivered after restore in median {} ms, max {} ms; with only ACKs lost, the next answer after restore in median {} ms, max {} ms",
            tally.iterations,
            start.elapsed().as_secs_f64(),
            tally.with_recv_queue,
            tally.with_unacked,
            tally.with_unsent,
            tally.seq_above_2_31,
            median(&mut tally.save_us),
            median(&mut tally.restore_us),
            median(&mut tally.resync_ms),
            tally.resync_ms.iter().max().copied().unwrap_or(0),
            median(&mut tally.acks_lost_ms),
            tally.acks_lost_ms.iter().max().copied().unwrap_or(0),
        );
        tally
    });
    assert_eq!(tally.iterations, n);
    if n >= 10 && state != TcpState::FinWait2 {
        assert!(tally.with_unacked > 0 && tally.with_unsent > 0, "{tally:?}");
    }
}

#[test]
fn m4_established() {
    run_state(TcpState::Established);
}

#[test]
fn m4_close_wait() {
    run_state(TcpState::CloseWait);
}

#[test]
fn m4_fin_wait2() {
    run_state(TcpState::FinWait2);
}
