//! Unit tests of `record`.

use super::*;
use proptest::prelude::*;

fn sample<'a>(q: &'a [u8]) -> RecordRepr<'a> {
    RecordRepr {
        local: "198.18.0.1:80".parse().unwrap(),
        peer: "198.18.0.2:40000".parse().unwrap(),
        state: TcpState::Established,
        sack: true,
        wscale: Some((7, 9)),
        tsval: Some(0xfedc_ba98),
        mss: 1448,
        send_seq: 0x8000_0001,
        recv_seq: 0xffff_fff0,
        window: Window {
            snd_wl1: 1,
            snd_wnd: 2,
            max_window: 3,
            rcv_wnd: 4,
            rcv_wup: 5,
        },
        saved_at_ms: 1_800_000_000_000,
        user_flags: 7,
        recv_queue: &q[..3],
        send_queue: &q[3..10],
        unsent_len: 4,
        server_unsent: &q[10..11],
        server_held: &[],
        app_unanswered: &q[11..],
    }
}

#[test]
fn round_trip() {
    let q: Vec<u8> = (0..20).collect();
    let r = sample(&q);
    let bytes = r.to_vec().unwrap();
    assert_eq!(bytes.len(), HEADER_LEN + 20);
    assert_eq!(parse(&bytes).unwrap(), r);
}

#[test]
fn golden_header() {
    let r = sample(&[0u8; 20]);
    let b = r.to_vec().unwrap();
    assert_eq!(&b[..8], b"SPOSTCPR");
    assert_eq!(&b[8..12], &[1, 0, 132, 0]);
    assert_eq!(&b[16..19], &[4, 1, opt::ALL]);
    // Sequence numbers above 2^31 are plain unsigned values.
    assert_eq!(&b[68..72], &0x8000_0001u32.to_le_bytes());
}

#[test]
fn ipv6_round_trip() {
    let mut r = sample(&[0u8; 20]);
    r.recv_queue = &[];
    r.send_queue = &[];
    r.unsent_len = 0;
    r.server_unsent = &[];
    r.app_unanswered = &[];
    r.local = "[2001:db8::1]:443".parse().unwrap();
    r.peer = "[2001:db8::2]:5555".parse().unwrap();
    let b = r.to_vec().unwrap();
    assert_eq!(parse(&b).unwrap(), r);
}

#[test]
fn every_truncation_is_an_error() {
    let q: Vec<u8> = (0..20).collect();
    let b = sample(&q).to_vec().unwrap();
    for n in 0..b.len() {
        assert!(parse(&b[..n]).is_err(), "{n}");
    }
    let mut longer = b.clone();
    longer.push(0);
    assert!(parse(&longer).is_err());
}

#[test]
fn specific_refusals() {
    let q: Vec<u8> = (0..20).collect();
    let good = sample(&q).to_vec().unwrap();
    let with = |at: usize, v: u8| {
        let mut b = good.clone();
        b[at] = v;
        parse(&b).map(|_| ()).unwrap_err()
    };
    assert_eq!(with(0, b'X'), RecordError::BadMagic);
    assert_eq!(with(8, 2), RecordError::Version(2));
    assert_eq!(with(17, 10), RecordError::State(10));
    assert_eq!(with(16, 5), RecordError::Family(5));
    assert_eq!(with(18, 0x10 | opt::ALL), RecordError::Options(0x17));
    assert_eq!(with(19, 15), RecordError::WindowScale(15));
    assert_eq!(with(21, 1), RecordError::Reserved);
    assert_eq!(with(40, 1), RecordError::AddressPadding);
    // unsent longer than the send queue
    assert!(matches!(with(116, 200), RecordError::Unsent { .. }));
    // FIN_WAIT2 with data in the send queue
    assert_eq!(with(17, 5), RecordError::FinWithData);
}

proptest! {
    /// Any bytes: an error or a record, never a panic; a record that parses re-emits to
    /// the same bytes.
    #[test]
    fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(r) = parse(&data) {
            prop_assert_eq!(r.to_vec().unwrap(), data);
        }
    }

    /// A valid record with bytes flipped or its length fields rewritten: never a panic.
    #[test]
    fn mutated_records(
        flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..8),
        cut in 0usize..200,
    ) {
        let q: Vec<u8> = (0..40).collect();
        let mut b = sample(&q).to_vec().unwrap();
        for (at, v) in flips {
            if let Some(x) = b.get_mut(at) {
                *x = v;
            }
        }
        if let Ok(r) = parse(&b) {
            prop_assert_eq!(r.to_vec().unwrap(), b.clone());
        }
        let _ = parse(&b[..cut.min(b.len())]);
    }
}
