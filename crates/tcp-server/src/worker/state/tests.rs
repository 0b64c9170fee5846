//! Unit tests of `state`: the compound conditions of a connection, without a ring.

use super::*;

fn conn() -> Conn {
    let mut c = Conn::new();
    c.origin = Some("127.0.0.1:80".parse().unwrap());
    c
}

#[test]
fn a_new_connection_may_receive_until_the_window_fills_or_it_ends() {
    let mut c = conn();
    assert!(c.may_receive());
    c.unacked = RECV_WINDOW as u64 / 2 - 1;
    assert!(c.may_receive());
    c.unacked = RECV_WINDOW as u64 / 2;
    assert!(!c.may_receive(), "the receive window is full");
    c.unacked = 0;
    c.recv = Recv::Armed;
    assert!(!c.may_receive(), "one receive at a time");
    c.recv = Recv::Idle;
    c.eof = true;
    assert!(!c.may_receive(), "after end of stream");
    c.eof = false;
    c.failed = true;
    assert!(!c.may_receive(), "after a failure");
}

#[test]
fn a_paused_connection_stops_reading_at_its_held_limit_whatever_is_acknowledged() {
    let mut c = conn();
    c.paused = true;
    c.held = vec![0; super::super::recv::HELD_MAX / 2 - 1];
    assert!(c.may_receive());
    c.held.push(0);
    c.unacked = 0; // everything "acknowledged"
    assert!(!c.may_receive(), "held bytes are bounded on their own");
}

#[test]
fn a_direct_connection_stops_reading_when_blocked_or_holding_a_full_buffer() {
    let mut c = conn();
    let mut d = crate::direct::Direct::new(0, 1, Instant::now());
    d.conn.pending = vec![0; super::super::recv::DIRECT_BUF_MAX - 1];
    c.direct = Some(Box::new(d));
    assert!(c.may_receive());
    if let Some(d) = c.direct.as_mut() {
        d.conn.pending.push(0);
    }
    assert!(!c.may_receive(), "the buffer is full");
    if let Some(d) = c.direct.as_mut() {
        d.conn.pending.clear();
        d.blocked = true;
    }
    assert!(!c.may_receive(), "the send queue is full");
}

#[test]
fn untouched_means_nothing_read_written_or_ended_on_a_persistent_listener() {
    assert!(conn().untouched());
    assert!(!Conn::new().untouched(), "no listener to hand it to");
    let touched: [fn(&mut Conn); 5] = [
        |c| c.delivered = 1,
        |c| c.written = true,
        |c| c.eof = true,
        |c| c.failed = true,
        |c| c.shutdown_wanted = true,
    ];
    for touch in touched {
        let mut c = conn();
        touch(&mut c);
        assert!(!c.untouched());
    }
}

#[test]
fn a_connection_returns_to_the_direct_path_only_when_the_application_saw_everything() {
    let mut c = conn();
    c.delivered = 100;
    assert!(c.may_return_to_direct(100));
    assert!(!c.may_return_to_direct(99), "bytes still on their way");
    c.paused = true;
    assert!(!c.may_return_to_direct(100));
    c.paused = false;
    c.held = b"x".to_vec();
    assert!(!c.may_return_to_direct(100));
    c.held.clear();
    c.handoff = Some(Vec::new());
    assert!(!c.may_return_to_direct(100));
    c.handoff = None;
    c.eof = true;
    assert!(!c.may_return_to_direct(100));
}

#[test]
fn a_close_drops_queued_bytes_only_on_abort_without_hand_off_or_linger() {
    let mut c = conn();
    assert!(!c.abort_on_close(false));
    assert!(c.abort_on_close(true));
    c.linger = true;
    assert!(
        !c.abort_on_close(true),
        "closed by its application: owed to the client"
    );
    c.linger = false;
    c.handoff = Some(Vec::new());
    assert!(
        !c.abort_on_close(true),
        "the next owner's responses follow these"
    );
}

#[test]
fn the_send_in_flight_pins_what_it_reads() {
    let mut s = InflightSend::default();
    assert!(!s.busy());
    assert_eq!(s.cancel_op(), None);
    s.sending(2);
    assert!(s.busy());
    assert!(s.reads_last_of(1) && s.reads_last_of(2));
    assert!(!s.reads_last_of(3), "a chunk behind the send may grow");
    assert_eq!(s.cancel_op(), Some(Op::Send));
    s.finished();
    s.polling();
    assert!(s.busy() && !s.reads_last_of(1));
    assert_eq!(s.cancel_op(), Some(Op::SendPoll));
    s.finished();
    assert!(!s.busy());
}

#[test]
fn a_shutdown_waits_for_the_last_byte() {
    let mut c = conn();
    c.shutdown_wanted = true;
    assert!(c.may_shut_down_write());
    c.send.polling();
    assert!(!c.may_shut_down_write());
    c.send.finished();
    c.sendq.push_back(Chunk::Inline {
        data: b"x".to_vec(),
        off: 0,
    });
    assert!(!c.may_shut_down_write());
    c.sendq.clear();
    c.shutdown_done = true;
    assert!(!c.may_shut_down_write(), "once only");
}

fn deliver(c: &mut Conn, bytes: &[u8]) {
    c.delivering(bytes.len(), |dst| dst.copy_from_slice(bytes));
}

#[test]
fn a_recoverable_connection_keeps_what_follows_its_last_boundary() {
    let mut c = conn();
    c.recovery = Some(Recovery::default());
    deliver(&mut c, b"GET /a HTTP/1.1\r\n\r\n");
    deliver(&mut c, b"GET /b HTTP/1.1\r\n\r\n");
    c.written = true;
    c.recovery.as_mut().unwrap().sent();
    assert_eq!(c.successor_bytes(), None, "a response may be half queued");
    let first = b"GET /a HTTP/1.1\r\n\r\n".len() as u64;
    assert!(c.recovery.as_mut().unwrap().mark(first, c.delivered));
    assert_eq!(
        c.successor_bytes().as_deref(),
        Some(&b"GET /b HTTP/1.1\r\n\r\n"[..])
    );
}

#[test]
fn marks_must_move_forward_within_what_was_delivered() {
    let mut r = Recovery::default();
    r.delivering(10, |d| d.fill(b'x'));
    assert!(!r.mark(11, 10), "past what was delivered");
    assert!(r.mark(4, 10));
    assert!(!r.mark(3, 10), "behind the last mark");
    assert!(r.mark(10, 10));
    assert_eq!(r.unanswered(), Some(Vec::new()));
}

#[test]
fn a_connection_past_the_retain_limit_recovers_only_at_a_full_boundary() {
    let mut c = conn();
    c.recovery = Some(Recovery::default());
    deliver(&mut c, &vec![b'a'; RETAIN_LIMIT]);
    deliver(&mut c, b"b");
    assert_eq!(c.successor_bytes(), None);
    let delivered = c.delivered;
    assert!(c.recovery.as_mut().unwrap().mark(delivered - 1, delivered));
    assert_eq!(
        c.successor_bytes(),
        None,
        "the copy was dropped at the limit"
    );
    assert!(c.recovery.as_mut().unwrap().mark(delivered, delivered));
    deliver(&mut c, b"next");
    assert_eq!(c.successor_bytes().as_deref(), Some(&b"next"[..]));
}

#[test]
fn direct_and_untouched_connections_go_on_without_marks() {
    let mut c = conn();
    c.held = b"late".to_vec();
    assert_eq!(c.successor_bytes().as_deref(), Some(&b"late"[..]));
    let mut c = conn();
    c.delivered = 5;
    assert_eq!(c.successor_bytes(), None, "touched, not recoverable");
    let mut d = crate::direct::Direct::new(0, 1, std::time::Instant::now());
    d.conn.pending = b"GET / HTTP/1.1\r\n".to_vec();
    c.direct = Some(Box::new(d));
    assert_eq!(
        c.successor_bytes().as_deref(),
        Some(&b"GET / HTTP/1.1\r\n"[..])
    );
    let mut c = conn();
    c.origin = None;
    assert_eq!(c.successor_bytes(), None, "no listener to go on to");
}

#[test]
fn a_graceful_close_lingers_only_while_the_peer_may_still_send() {
    let mut c = conn();
    assert!(c.may_linger());
    c.eof = true;
    assert!(!c.may_linger(), "the peer has ended: closing sends no RST");
    c.eof = false;
    c.failed = true;
    assert!(
        !c.may_linger(),
        "a failed (reset) stream has nothing to protect"
    );
    c.failed = false;
    c.handoff = Some(Vec::new());
    assert!(!c.may_linger(), "the socket goes on to its next owner");
    c.handoff = None;
    c.export = Some(order());
    assert!(
        !c.may_linger(),
        "a connection moving to another node sends no FIN"
    );
    c.export = None;
    c.lingering = Some(Lingering::new(Instant::now()));
    assert!(!c.may_linger(), "once only");
}

fn order() -> Arc<crate::migration::Order> {
    Arc::new(crate::migration::Order {
        id: 1,
        what: crate::migration::What::List { limit: 0 },
        tx: std::sync::Mutex::new(std::sync::mpsc::channel().0),
    })
}

#[test]
fn only_a_connection_at_a_request_boundary_may_move() {
    let mut c = conn();
    assert!(c.movable().is_err(), "not from a persistent listener");
    c.origin = Some("198.19.0.1:80".parse().unwrap());
    c.flow = Some(crate::migration::Flow {
        local: "198.19.0.1:80".parse().unwrap(),
        peer: "198.18.0.2:4000".parse().unwrap(),
    });
    assert!(
        c.movable().is_err(),
        "its application may be in the middle of a request"
    );
    c.recovery = Some(Recovery::default());
    assert_eq!(c.movable(), Ok(()), "recoverable and at a boundary");
    c.recovery.as_mut().unwrap().sent();
    assert!(c.movable().is_err(), "a response may be half queued");
    c.recovery = Some(Recovery::default());
    for (set, why) in [
        (0, "failed"),
        (1, "paused for a hand-off"),
        (2, "shut down"),
        (3, "already moving"),
    ] {
        let mut d = conn();
        d.origin = c.origin;
        d.flow = c.flow;
        d.recovery = Some(Recovery::default());
        match set {
            0 => d.failed = true,
            1 => d.paused = true,
            2 => d.shutdown_wanted = true,
            _ => d.export = Some(order()),
        }
        assert!(d.movable().is_err(), "{why}");
    }
}

#[test]
fn lingering_ends_at_the_first_of_its_bounds() {
    let t0 = Instant::now();
    let l = Lingering::new(t0);
    assert!(!l.over(t0));
    assert!(!l.over(t0 + LINGER_IDLE - Duration::from_millis(1)));
    assert!(l.over(t0 + LINGER_IDLE), "idle too long");

    // Bytes keep it going past the idle bound, never past the total.
    let mut l = Lingering::new(t0);
    let mut t = t0;
    while t < t0 + LINGER_TOTAL - Duration::from_secs(1) {
        t += Duration::from_secs(1);
        l.discarded(1, t);
        assert!(!l.over(t), "bytes arrived a second ago");
    }
    assert!(l.over(t0 + LINGER_TOTAL), "lingered too long in all");

    let mut l = Lingering::new(t0);
    l.discarded(LINGER_BYTES as usize - 1, t0);
    assert!(!l.over(t0));
    l.discarded(1, t0);
    assert!(l.over(t0), "discarded enough");

    let mut l = Lingering::new(t0);
    l.end();
    assert!(l.over(t0), "ended: the peer's EOF, an error, or cut short");
}
