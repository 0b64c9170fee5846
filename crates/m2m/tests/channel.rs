//! Channel behaviour within one process (both ends from `Channel::pair`, on two threads).

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use splitos_m2m::{Channel, ChannelConfig, Error, Message, WaitPolicy};
use std::thread;
use std::time::{Duration, Instant};

fn config(wait: WaitPolicy) -> ChannelConfig {
    ChannelConfig {
        ring_bytes: 16 << 10,
        buf_size: 16 << 10,
        buf_count: 4,
        wait,
    }
}

fn inline(m: Message<'_>) -> Vec<u8> {
    match m {
        Message::Inline(b) => b.to_vec(),
        Message::Buffer(b) => panic!("expected inline message, got {b:?}"),
    }
}

/// Deterministic message `i`: length varies so records land at every offset and wrap.
fn msg(i: u32, max: usize) -> Vec<u8> {
    let len = (i as usize * 37) % (max + 1);
    (0..len).map(|k| (i as usize + k * 7) as u8).collect()
}

#[test]
fn every_size_arrives_intact_in_order() {
    let (mut a, mut b) = Channel::pair(config(WaitPolicy::Poll)).unwrap();
    let max = a.max_message_len();
    assert_eq!(max, 4096);
    let n = 3000u32;
    let t = thread::spawn(move || {
        for i in 0..n {
            a.send(&msg(i, max)).unwrap();
        }
        a
    });
    for i in 0..n {
        assert_eq!(inline(b.recv().unwrap()), msg(i, max), "message {i}");
    }
    let _a = t.join().unwrap();
    assert!(b.try_recv().unwrap().is_none());
}

#[test]
fn oversize_message_is_refused_and_nothing_is_sent() {
    let (mut a, mut b) = Channel::pair(config(WaitPolicy::Poll)).unwrap();
    let too_big = vec![0u8; a.max_message_len() + 1];
    match a.try_send(&too_big) {
        Err(Error::MessageTooLarge { len, max }) => {
            assert_eq!((len, max), (4097, 4096));
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    assert!(b.try_recv().unwrap().is_none());
}

#[test]
fn full_ring_pushes_back_then_drains() {
    let (mut a, mut b) = Channel::pair(config(WaitPolicy::Poll)).unwrap();
    let mut sent = 0;
    while a.try_send(&[sent as u8; 100]).unwrap() {
        sent += 1;
    }
    // 16 KiB ring, 112-byte records (8 header + 104 padded payload): 146 fit.
    assert!((140..=150).contains(&sent), "{sent} messages fit");
    assert!(!a
        .wait_writable(100, Some(Duration::from_millis(20)))
        .unwrap());
    let mut got = 0;
    got += b
        .recv_batch(usize::MAX, |m| {
            assert!(matches!(m, Message::Inline(x) if x.len() == 100))
        })
        .unwrap();
    assert_eq!(got, sent);
    assert!(a.try_send(b"again").unwrap());
}

#[test]
fn batches_are_delivered_whole() {
    let (mut a, mut b) = Channel::pair(config(WaitPolicy::Poll)).unwrap();
    let mut batch = a.send_batch();
    for i in 0..50u8 {
        assert!(batch.try_push(&[i; 64]).unwrap());
    }
    assert_eq!(batch.len(), 50);
    batch.publish();
    let mut seen = Vec::new();
    let n = b
        .recv_batch(usize::MAX, |m| {
            if let Message::Inline(x) = m {
                seen.push(x[0]);
            }
        })
        .unwrap();
    assert_eq!(n, 50);
    assert_eq!(seen, (0..50).collect::<Vec<u8>>());
}

#[test]
fn buffers_travel_by_descriptor_and_come_back() {
    let (mut a, mut b) = Channel::pair(config(WaitPolicy::Poll)).unwrap();
    let mut held = Vec::new();
    for i in 0..4u8 {
        let mut buf = a.alloc_buffer().unwrap().expect("pool has 4 buffers");
        assert_eq!(buf.capacity(), 16 << 10);
        buf.write(0, &[i; 16 << 10]).unwrap();
        a.send_buffer(buf, 1000 + i as usize).unwrap();
    }
    assert!(
        a.alloc_buffer().unwrap().is_none(),
        "pool should be exhausted"
    );
    for i in 0..4u8 {
        match b.recv().unwrap() {
            Message::Buffer(rx) => {
                assert_eq!(rx.len(), 1000 + i as usize);
                assert_eq!(rx.to_vec(), vec![i; 1000 + i as usize]);
                held.push(rx);
            }
            Message::Inline(_) => panic!("expected a buffer"),
        }
    }
    assert!(
        a.alloc_buffer().unwrap().is_none(),
        "buffers held by the receiver"
    );
    drop(held);
    for _ in 0..4 {
        assert!(
            a.alloc_buffer().unwrap().is_some(),
            "returned buffer not reusable"
        );
    }
}

#[test]
fn unsent_buffer_is_freed_and_writes_are_bounded() {
    let (mut a, _b) = Channel::pair(config(WaitPolicy::Poll)).unwrap();
    let mut bufs: Vec<_> = (0..4).map(|_| a.alloc_buffer().unwrap().unwrap()).collect();
    assert!(matches!(
        bufs[0].write(16 << 10, b"x"),
        Err(Error::BufferOverflow { .. })
    ));
    assert!(matches!(
        bufs[0].write(usize::MAX, b"x"),
        Err(Error::BufferOverflow { .. })
    ));
    bufs.pop();
    assert!(a.alloc_buffer().unwrap().is_some());
}

fn ping_pong(policy: WaitPolicy, rounds: u32) {
    let (mut a, mut b) = Channel::pair(config(policy)).unwrap();
    let echo = thread::spawn(move || {
        for _ in 0..rounds {
            let m = inline(b.recv().unwrap());
            b.send(&m).unwrap();
        }
    });
    for i in 0..rounds {
        a.send(&i.to_le_bytes()).unwrap();
        assert_eq!(inline(a.recv().unwrap()), i.to_le_bytes());
    }
    echo.join().unwrap();
}

#[test]
fn ping_pong_poll() {
    ping_pong(WaitPolicy::Poll, 20_000);
}

#[test]
fn ping_pong_adaptive() {
    ping_pong(WaitPolicy::adaptive(), 20_000);
}

#[test]
fn ping_pong_block() {
    ping_pong(WaitPolicy::Block, 2_000);
}

#[test]
fn blocked_sender_is_woken_by_consumer() {
    let (mut a, mut b) = Channel::pair(config(WaitPolicy::Block)).unwrap();
    let t = thread::spawn(move || {
        for i in 0..5000u32 {
            a.send(&[i as u8; 1000]).unwrap();
        }
        a
    });
    for i in 0..5000u32 {
        thread::sleep(Duration::from_micros(if i % 500 == 0 { 2000 } else { 0 }));
        assert_eq!(inline(b.recv().unwrap()), vec![i as u8; 1000]);
    }
    drop(t.join().unwrap());
}

#[test]
fn dropping_one_end_wakes_the_other_with_peer_gone() {
    for policy in [WaitPolicy::Poll, WaitPolicy::adaptive(), WaitPolicy::Block] {
        let (a, mut b) = Channel::pair(config(policy)).unwrap();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            drop(a);
            Instant::now()
        });
        let err = b.recv().unwrap_err();
        let dropped_at = t.join().unwrap();
        assert!(matches!(err, Error::PeerGone), "{policy}: {err}");
        assert!(
            dropped_at.elapsed() < Duration::from_millis(100),
            "{policy}: slow"
        );
        assert!(matches!(b.try_send(b"x"), Err(Error::PeerGone)));
    }
}

/// `check_alive` asks about the peer without consuming anything: a reader that otherwise
/// only reads shared memory uses it to stop trusting what a dead peer left there.
#[test]
fn check_alive_reports_a_departed_peer_and_takes_no_message() {
    let (mut a, mut b) = Channel::pair(config(WaitPolicy::adaptive())).unwrap();
    a.send(b"kept").unwrap();
    assert!(b.check_alive().is_ok());
    drop(a);
    assert!(matches!(b.check_alive(), Err(Error::PeerGone)));
    match b.try_recv() {
        Ok(Some(Message::Inline(m))) => assert_eq!(m, b"kept"),
        other => panic!("the message left behind was lost: {other:?}"),
    }
}

#[test]
fn a_departed_peers_last_messages_are_delivered_even_after_a_send_noticed_it_left() {
    let (mut a, mut b) = Channel::pair(config(WaitPolicy::adaptive())).unwrap();
    for i in 0..100u8 {
        a.send(&[i; 100]).unwrap();
    }
    drop(a);
    // Sending notices the departure first (as a server answering a dying client would).
    assert!(matches!(b.try_send(b"x"), Err(Error::PeerGone)));
    let mut got = 0u8;
    let drained = b
        .recv_batch(10, |m| {
            assert_eq!(inline(m), vec![got; 100]);
            got += 1;
        })
        .unwrap();
    assert_eq!(drained, 10);
    loop {
        match b.try_recv() {
            Ok(Some(m)) => {
                assert_eq!(inline(m), vec![got; 100]);
                got += 1;
            }
            Ok(None) => panic!("a departed peer reads as empty, not gone"),
            Err(e) => {
                assert!(matches!(e, Error::PeerGone), "{e}");
                break;
            }
        }
    }
    assert_eq!(got, 100, "every message sent before the peer left");
    assert!(matches!(b.recv_batch(10, |_| {}), Err(Error::PeerGone)));
}

#[test]
fn recv_timeout_returns_none() {
    let (_a, mut b) = Channel::pair(config(WaitPolicy::Block)).unwrap();
    let start = Instant::now();
    assert!(b.recv_timeout(Duration::from_millis(30)).unwrap().is_none());
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(30) && waited < Duration::from_secs(2));
}

#[test]
fn receiver_waits_for_returned_buffers() {
    let (mut a, mut b) = Channel::pair(config(WaitPolicy::Block)).unwrap();
    let t = thread::spawn(move || {
        for i in 0..200u32 {
            let mut buf = a
                .alloc_buffer_wait(Some(Duration::from_secs(10)))
                .unwrap()
                .expect("a buffer came back");
            buf.write(0, &i.to_le_bytes()).unwrap();
            a.send_buffer(buf, 4).unwrap();
        }
        a
    });
    for i in 0..200u32 {
        match b.recv().unwrap() {
            Message::Buffer(rx) => assert_eq!(rx.to_vec(), i.to_le_bytes()),
            Message::Inline(_) => panic!("expected a buffer"),
        }
    }
    drop(t.join().unwrap());
}

#[test]
fn buffer_metadata_travels_with_the_descriptor() {
    let (mut a, mut b) = Channel::pair(config(WaitPolicy::Poll)).unwrap();
    let mut buf = a.alloc_buffer().unwrap().unwrap();
    buf.write(0, b"payload").unwrap();
    a.send_buffer_with(buf, 7, b"conn 42").unwrap();
    let buf = a.alloc_buffer().unwrap().unwrap();
    assert!(matches!(
        a.send_buffer_with(buf, 0, &[0; 49]),
        Err(Error::MessageTooLarge { len: 49, max: 48 })
    ));
    match b.recv().unwrap() {
        Message::Buffer(rx) => {
            assert_eq!(rx.meta(), b"conn 42");
            assert_eq!(rx.to_vec(), b"payload");
        }
        Message::Inline(_) => panic!("expected a buffer"),
    }
    assert!(
        b.try_recv().unwrap().is_none(),
        "refused send leaked a record"
    );
}

#[test]
fn file_descriptors_travel_with_a_tag() {
    use std::os::fd::AsFd;
    let (mut a, mut b) = Channel::pair(config(WaitPolicy::Block)).unwrap();
    let memfd = rustix::fs::memfd_create("fd-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::io::pwrite(&memfd, b"shared bytes", 0).unwrap();
    a.send_fds(7, &[memfd.as_fd()]).unwrap();
    a.send(b"after the fd").unwrap();
    // A blocking receive is not disturbed by the descriptor message waiting on the socket.
    let m = b
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("message");
    assert_eq!(inline(m), b"after the fd");
    let (tag, fds) = b.try_recv_fds().unwrap().expect("descriptors");
    assert_eq!(tag, 7);
    assert_eq!(fds.len(), 1);
    let mut got = [0u8; 12];
    rustix::io::pread(&fds[0], &mut got, 0).unwrap();
    assert_eq!(&got, b"shared bytes");
    assert!(b.try_recv_fds().unwrap().is_none());
    assert!(matches!(a.send_fds(1, &[]), Err(Error::Config(_))));
    let five = [memfd.as_fd(); 5];
    assert!(matches!(a.send_fds(1, &five), Err(Error::Config(_))));
    // Still a healthy channel both ways.
    b.send(b"ok").unwrap();
    assert_eq!(inline(a.recv().unwrap()), b"ok");
}
