//! Property and table tests of the protocol: every request and event round-trips, arbitrary
//! bytes never panic the decoders, op codes and header sizes are pinned.

use super::*;
use proptest::prelude::*;

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        (any::<[u8; 16]>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(|(ip, p, f, s)| {
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), p, f, s))
        }),
    ]
}

fn handle() -> impl Strategy<Value = Handle> {
    any::<u64>().prop_map(Handle)
}

proptest! {
    #[test]
    fn requests_round_trip(
        req in any::<u32>(), a in addr(), h in handle(), n in any::<u32>(),
        flags in 0..=listen_flags::ALL, data in proptest::collection::vec(any::<u8>(), 0..200),
        on in any::<bool>(), pick in 0..16u8, big in any::<u64>(),
    ) {
        let name = &data[..data.len().min(MAX_NAME)];
        let r = match pick {
            0 => Request::Hello { version: n as u16, name },
            1 => Request::Listen { req, addr: a, backlog: n, flags },
            2 => Request::Connect { req, addr: a },
            3 => Request::Send { handle: h, data: &data },
            4 => Request::ShutdownWrite { handle: h },
            5 => Request::Close { handle: h },
            6 => Request::SetOption { req, handle: h, opt: SockOpt::NoDelay(on) },
            7 => Request::SetOption { req, handle: h, opt: SockOpt::KeepAlive(on) },
            8 => Request::SendFile { handle: h, file: big, offset: big / 3, len: n as u64 },
            9 => Request::ReleaseFile { file: big },
            10 => Request::Pause { handle: h },
            11 => Request::Handoff { handle: h, data: &data },
            12 => Request::ServeFiles {
                req, listener: h, header_timeout_s: n, idle_timeout_s: n / 2,
                socket: b"/run/splitos/files.sock",
            },
            13 => Request::ServeDirect { handle: h, received: big },
            14 => Request::Answered { handle: h, received: big },
            _ => Request::Consumed { handle: h, bytes: n },
        };
        let mut buf = Vec::new();
        r.encode(&mut buf);
        prop_assert_eq!(buf[0], r.op());
        prop_assert_eq!(Request::decode(&buf), Ok(r));
    }

    #[test]
    fn events_round_trip(
        req in any::<u32>(), a in addr(), b in addr(), h in handle(), g in handle(),
        n in any::<u32>(), e in any::<i32>(), data in proptest::collection::vec(any::<u8>(), 0..200),
        pick in 0..10u8,
    ) {
        let ev = match pick {
            0 => Event::Done { req, handle: h, local: a, peer: b },
            1 => Event::Failed { req, errno: e },
            2 => Event::Accepted { listener: h, conn: g, local: a, peer: b },
            3 => Event::Data { handle: h, data: &data },
            4 => Event::Eof { handle: h },
            5 => Event::Sent { handle: h, bytes: n },
            6 => Event::Error { handle: h, errno: e },
            7 => Event::Closed { handle: h },
            8 => Event::Paused { handle: h },
            _ => Event::ProtocolError { op: n as u8, errno: e },
        };
        let mut buf = Vec::new();
        ev.encode(&mut buf);
        prop_assert_eq!(buf[0], ev.op());
        prop_assert_eq!(Event::decode(&buf), Ok(ev));
    }

    /// The server decodes whatever an application writes: arbitrary bytes must give a value or
    /// an error, never a panic, and a value must re-encode to the same bytes.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
        if let Ok(r) = Request::decode(&bytes) {
            let mut again = Vec::new();
            r.encode(&mut again);
            prop_assert_eq!(&again, &bytes);
        }
        let _ = Event::decode(&bytes);
        let _ = BufferMeta::decode(&bytes);
    }

    /// A hand-off carrying more than MAX_HANDOFF bytes is refused at decoding.
    #[test]
    fn oversized_handoff_is_refused(extra in 1..64usize, h in handle()) {
        let data = vec![7u8; MAX_HANDOFF + extra];
        let mut buf = Vec::new();
        Request::Handoff { handle: h, data: &data }.encode(&mut buf);
        prop_assert_eq!(Request::decode(&buf), Err(DecodeError::BadValue));
    }

    /// Every truncation of a valid request is rejected, not misread.
    #[test]
    fn truncations_are_rejected(req in any::<u32>(), a in addr(), h in handle()) {
        for r in [
            Request::Listen { req, addr: a, backlog: 1, flags: 0 },
            Request::Connect { req, addr: a },
            Request::Consumed { handle: h, bytes: 1 },
            Request::SetOption { req, handle: h, opt: SockOpt::NoDelay(true) },
        ] {
            let mut buf = Vec::new();
            r.encode(&mut buf);
            for cut in 0..buf.len() {
                prop_assert!(Request::decode(&buf[..cut]).is_err(), "{:?} cut at {}", r, cut);
            }
        }
    }
}

#[test]
fn handle_packs_index_and_generation() {
    let h = Handle::new(7, 3);
    assert_eq!((h.index(), h.generation()), (7, 3));
    assert_eq!(Handle::new(u32::MAX, u32::MAX).0, u64::MAX);
}

#[test]
fn specific_malformed_requests() {
    assert_eq!(Request::decode(&[]), Err(DecodeError::Truncated));
    assert_eq!(Request::decode(&[200]), Err(DecodeError::UnknownOp(200)));
    let mut buf = Vec::new();
    Request::Close { handle: Handle(1) }.encode(&mut buf);
    buf.push(0);
    assert_eq!(Request::decode(&buf), Err(DecodeError::Trailing));
    let mut listen = Vec::new();
    Request::Listen {
        req: 1,
        addr: NO_ADDR,
        backlog: 1,
        flags: 0,
    }
    .encode(&mut listen);
    listen[13] = 9; // address family
    assert_eq!(Request::decode(&listen), Err(DecodeError::BadAddress));
    let mut bad_flags = Vec::new();
    Request::Listen {
        req: 1,
        addr: NO_ADDR,
        backlog: 1,
        flags: 0,
    }
    .encode(&mut bad_flags);
    bad_flags[9] = 0x80;
    assert_eq!(Request::decode(&bad_flags), Err(DecodeError::BadValue));
    assert_eq!(
        Request::decode(&[1, 1, 0, b'x']).unwrap(),
        Request::Hello {
            version: 1,
            name: b"x"
        }
    );
}

#[test]
fn send_and_data_headers_are_as_documented() {
    let mut buf = Vec::new();
    Request::Send {
        handle: Handle(5),
        data: b"abc",
    }
    .encode(&mut buf);
    assert_eq!(buf.len(), Request::SEND_HEADER + 3);
    buf.clear();
    Event::Data {
        handle: Handle(5),
        data: b"abc",
    }
    .encode(&mut buf);
    assert_eq!(buf.len(), Event::DATA_HEADER + 3);
    let m = BufferMeta::Send(Handle(9));
    assert_eq!(BufferMeta::decode(&m.encode()), Ok(m));
    // Derived from the field widths; pinned because applications size inline sends with them.
    assert_eq!(
        (Request::SEND_HEADER, Event::DATA_HEADER, BufferMeta::BYTES),
        (9, 9, 9)
    );
}

/// The op codes are part of the protocol (a server reports them in `ProtocolError`): pinned.
#[test]
fn op_codes_are_pinned() {
    let requests = [
        op::HELLO,
        op::LISTEN,
        op::CONNECT,
        op::SEND,
        op::SHUTDOWN_WRITE,
        op::CLOSE,
        op::SET_OPTION,
        op::CONSUMED,
        op::SEND_FILE,
        op::RELEASE_FILE,
        op::PAUSE,
        op::HANDOFF,
        op::SERVE_FILES,
        op::SERVE_DIRECT,
        op::ANSWERED,
    ];
    assert_eq!(requests.to_vec(), (1..=15).collect::<Vec<u8>>());
    let events = [
        op::DONE,
        op::FAILED,
        op::ACCEPTED,
        op::DATA,
        op::EOF,
        op::SENT,
        op::ERROR,
        op::CLOSED,
        op::PROTOCOL_ERROR,
        op::PAUSED,
    ];
    assert_eq!(events.to_vec(), (64..=73).collect::<Vec<u8>>());
    assert_eq!((op::META_SEND, op::META_DATA), (128, 129));
}
