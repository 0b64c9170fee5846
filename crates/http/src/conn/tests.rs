//! Unit tests of `conn`.

use super::*;

fn final_policy() -> Policy {
    Policy {
        limits: Limits::default(),
        role: Role::Final {
            max_body: MAX_DISCARD,
        },
        timeouts: Timeouts::from_secs(10, 60),
    }
}

fn fast_policy() -> Policy {
    Policy {
        role: Role::FastPath,
        ..final_policy()
    }
}

/// A response naming the target it answers, as one bytes part plus a one-byte "file".
fn echo(req: &Request) -> Option<Response<u8>> {
    Some(Response {
        parts: vec![
            Part::Bytes(req.target.clone().into_bytes()),
            Part::File(0, 0, 1),
        ],
        status: 200,
        body_bytes: 1,
    })
}

/// Serves `conn` and returns the outcome with the first bytes part of every response.
fn run(
    conn: &mut Conn,
    policy: &Policy,
    budget: Budget,
    answer: impl FnMut(&Request) -> Option<Response<u8>>,
) -> (Outcome, Vec<String>) {
    let mut out = Vec::new();
    let o = serve(conn, policy, budget, answer, |r| match r.parts.first() {
        Some(Part::Bytes(b)) => out.push(String::from_utf8_lossy(b).into_owned()),
        _ => out.push(String::new()),
    });
    (o, out)
}

fn get(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n")
}

#[test]
fn pipelined_requests_are_answered_in_order_and_a_partial_head_waits() {
    let t = Instant::now();
    let mut c = Conn::new(t);
    let bytes = get("/a") + &get("/b") + "GET /c HTTP/1.1\r\nHo";
    c.received(bytes.as_bytes(), t);
    let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), echo);
    assert_eq!(o, Outcome::Wait);
    assert_eq!(out, ["/a", "/b"]);
    assert_eq!(c.buffered(), b"GET /c HTTP/1.1\r\nHo");
    assert!(!c.at_boundary());
    c.received(b"st: x\r\n\r\n", t);
    let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), echo);
    assert_eq!((o, out), (Outcome::Wait, vec!["/c".to_string()]));
    assert!(c.at_boundary());
}

#[test]
fn budgets_slice_pipelines() {
    let t = Instant::now();
    let mut c = Conn::new(t);
    c.received((get("/1") + &get("/2") + &get("/3")).as_bytes(), t);
    let (o, out) = run(&mut c, &final_policy(), Budget::responses(2), echo);
    assert_eq!((o, out.len()), (Outcome::Budget, 2));
    let (o, out) = run(&mut c, &final_policy(), Budget::responses(2), echo);
    assert_eq!((o, out), (Outcome::Wait, vec!["/3".to_string()]));
    // Parts: each response is two, so a budget of three parts stops after two responses.
    c.received((get("/4") + &get("/5") + &get("/6")).as_bytes(), t);
    let (o, out) = run(&mut c, &fast_policy(), Budget::parts(3), echo);
    assert_eq!((o, out.len()), (Outcome::Budget, 2));
    // An exhausted budget with nothing left to answer is not "more to do".
    let (o, _) = run(&mut c, &fast_policy(), Budget::parts(2), echo);
    assert_eq!(o, Outcome::Wait);
    let (o, _) = run(&mut c, &fast_policy(), Budget::parts(0), echo);
    assert_eq!(o, Outcome::Wait);
}

#[test]
fn the_client_asking_to_close_ends_the_loop() {
    let t = Instant::now();
    let mut c = Conn::new(t);
    let bytes = "GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_string() + &get("/b");
    c.received(bytes.as_bytes(), t);
    for p in [final_policy(), fast_policy()] {
        let mut c2 = Conn::from_parts(c.buffered().to_vec(), t);
        let (o, out) = run(&mut c2, &p, Budget::responses(64), echo);
        assert_eq!(
            (o, out),
            (Outcome::Close(Close::Asked), vec!["/a".to_string()])
        );
    }
}

#[test]
fn the_final_answerer_refuses_what_it_cannot_serve() {
    let t = Instant::now();
    for (req, status) in [
        ("GET / HTTP/1.1\r\n\r\n", "400"),
        (
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "400",
        ),
        (
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577\r\n\r\n",
            "413",
        ),
    ] {
        let mut c = Conn::new(t);
        c.received(req.as_bytes(), t);
        let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), echo);
        assert_eq!(o, Outcome::Close(Close::Refused), "{req}");
        assert_eq!(out.len(), 1);
        assert!(
            out[0].starts_with(&format!("HTTP/1.1 {status} ")),
            "{}",
            out[0]
        );
        assert!(out[0].contains("Connection: close\r\n"), "{}", out[0]);
    }
    // A declined request gets a 500 and the connection closes.
    let mut c = Conn::new(t);
    c.received(get("/x").as_bytes(), t);
    let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), |_| None);
    assert_eq!(o, Outcome::Close(Close::Refused));
    assert!(out[0].starts_with("HTTP/1.1 500 "), "{}", out[0]);
}

#[test]
fn bodies_are_thrown_away_never_parsed_as_requests() {
    let t = Instant::now();
    let mut c = Conn::new(t);
    // The body looks like a request; it must not be answered.
    let body = get("/smuggled");
    let head = format!(
        "POST /form HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // Half the body arrives with the head, the rest later, then a real request.
    let (first, rest) = body.split_at(10);
    c.received((head + first).as_bytes(), t);
    let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), echo);
    // Answered once its body is in (see a_request_with_a_body_is_answered_when_the_body_is_in).
    assert_eq!((o, out), (Outcome::Wait, vec![]));
    assert!(c.discarding() && !c.at_boundary() && c.buffered().is_empty());
    c.received((rest.to_string() + &get("/next")).as_bytes(), t);
    assert!(!c.discarding());
    let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), echo);
    assert_eq!(
        (o, out),
        (
            Outcome::Wait,
            vec!["/form".to_string(), "/next".to_string()]
        )
    );
    // In place, too.
    let mut c = Conn::new(t);
    c.received(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab",
        t,
    );
    run(&mut c, &final_policy(), Budget::responses(64), echo);
    let more = get("/z");
    let tail = "cd".to_string() + &more;
    c.received_with(tail.len(), t, |b| b.copy_from_slice(tail.as_bytes()));
    assert_eq!(c.buffered(), more.as_bytes());
}

#[test]
fn the_fast_path_hands_over_at_the_first_odd_request_with_every_byte_after_it() {
    let t = Instant::now();
    let post = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi";
    let cases = [
        // Declined by the answer function.
        get("/miss") + &get("/b"),
        // A body.
        post.to_string() + &get("/b"),
        // Malformed (no Host).
        "GET / HTTP/1.1\r\n\r\n".to_string() + &get("/b"),
    ];
    for odd in cases {
        let mut c = Conn::new(t);
        let all = get("/a") + &odd;
        c.received(all.as_bytes(), t);
        let (o, out) = run(&mut c, &fast_policy(), Budget::parts(256), |r| {
            (r.target != "/miss").then(|| echo(r)).flatten()
        });
        assert_eq!(out, ["/a"]);
        assert_eq!(o, Outcome::HandOver(odd.clone().into_bytes()));
        assert!(c.buffered().is_empty());
    }
}

#[test]
fn timeouts_distinguish_a_slow_head_from_an_idle_connection() {
    let t = Instant::now();
    let to = Timeouts::from_secs(10, 60);
    let mut c = Conn::new(t);
    assert_eq!(c.expired(t + Duration::from_secs(59), &to), None);
    assert_eq!(
        c.expired(t + Duration::from_secs(61), &to),
        Some(Expiry::Idle)
    );
    c.received(b"GET / HT", t + Duration::from_secs(5));
    assert_eq!(c.expired(t + Duration::from_secs(14), &to), None);
    assert_eq!(
        c.expired(t + Duration::from_secs(16), &to),
        Some(Expiry::Head)
    );
    assert_eq!(c.last_active(), t + Duration::from_secs(5));
    // Zero means one second, not "expire at once".
    assert_eq!(Timeouts::from_secs(0, 0), Timeouts::from_secs(1, 1));
    let r = request_timeout::<u8>();
    assert_eq!(r.status, 408);
}

/// Finding A13: the header timeout measured inactivity, so one byte every
/// `header − 1` seconds kept a connection (and a `--max-conns` slot) for hours. It is a
/// deadline from the first byte of a request: the head, and a body being read, must arrive
/// whole within it however the bytes trickle in.
#[test]
fn a_trickled_head_expires_at_its_deadline_not_after_a_quiet_spell() {
    let t = Instant::now();
    let to = Timeouts::from_secs(10, 60);
    let s = |n: u64| t + Duration::from_secs(n);
    let mut c = Conn::new(t);
    c.received(b"G", s(1));
    for (i, b) in b"ET / HTTP/1.1\r\n".iter().enumerate() {
        let at = s(2) + Duration::from_millis(500 * i as u64);
        if at > s(11) {
            break;
        }
        assert_eq!(c.expired(at, &to), None, "byte {i}");
        c.received(&[*b], at);
    }
    // Bytes arrived a moment ago, but the head began 10 s ago.
    assert_eq!(
        c.expired(s(11) + Duration::from_millis(1), &to),
        Some(Expiry::Head)
    );
    assert_eq!(c.request_started(), Some(s(1)));
}

#[test]
fn each_request_has_its_own_deadline() {
    let t = Instant::now();
    let to = Timeouts::from_secs(10, 60);
    let s = |n: u64| t + Duration::from_secs(n);
    let mut c = Conn::new(t);
    // A request and the start of the next in one segment, at 9 s: the next one's deadline
    // runs from then.
    c.received(b"GET / HT", s(0));
    c.received(b"TP/1.1\r\nHost: x\r\n\r\nGET /b", s(9));
    let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), echo);
    assert_eq!((o, out.len()), (Outcome::Wait, 1));
    assert_eq!(c.request_started(), Some(s(9)));
    assert_eq!(c.expired(s(15), &to), None);
    assert_eq!(c.expired(s(20), &to), Some(Expiry::Head));
    // Answered whole: no deadline, the idle timeout applies.
    c.received(b" HTTP/1.1\r\nHost: x\r\n\r\n", s(12));
    run(&mut c, &final_policy(), Budget::responses(64), echo);
    assert_eq!(c.request_started(), None);
    assert_eq!(c.expired(s(30), &to), None);
    assert_eq!(c.expired(s(73), &to), Some(Expiry::Idle));
    // A body being read is part of its request: trickling it does not extend the deadline.
    c.received(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab",
        s(80),
    );
    run(&mut c, &final_policy(), Budget::responses(64), echo);
    for i in 0..9 {
        c.received(b"x", s(81 + i));
    }
    assert_eq!(c.expired(s(89), &to), None);
    assert_eq!(c.expired(s(91), &to), Some(Expiry::Head));
    // The direct path's adapter lends its state: the start travels with it.
    let lent = Conn::from_parts_started(b"GE".to_vec(), s(5), Some(s(2)));
    assert_eq!(lent.expired(s(13), &to), Some(Expiry::Head));
    assert_eq!(
        Conn::from_parts(b"GE".to_vec(), s(5)).request_started(),
        Some(s(5))
    );
}

/// The response to a request with a body goes out once the body is in: until then the
/// request can still be answered by someone else (an application's successor gets the
/// unanswered bytes, and must find a whole request there). Each response says how many
/// received bytes it leaves unanswered.
#[test]
fn a_request_with_a_body_is_answered_when_the_body_is_in() {
    let t = Instant::now();
    let mut c = Conn::new(t);
    c.received(
        b"POST /f HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc",
        t,
    );
    let mut marks = Vec::new();
    let serve_now = |c: &mut Conn, marks: &mut Vec<(String, usize)>| {
        serve_marked(
            c,
            &final_policy(),
            Budget::responses(64),
            echo,
            |r, rest| match r.parts.first() {
                Some(Part::Bytes(b)) => marks.push((String::from_utf8_lossy(b).into(), rest)),
                _ => marks.push((String::new(), rest)),
            },
        )
    };
    assert_eq!(serve_now(&mut c, &mut marks), Outcome::Wait);
    assert!(marks.is_empty(), "answered before its body was in");
    assert!(c.discarding() && !c.at_boundary());
    c.received(b"defGET /g HTTP/1.1\r\nHost: x\r\n\r\nGET /h", t);
    assert_eq!(serve_now(&mut c, &mut marks), Outcome::Wait);
    let rest_h = "GET /h".len();
    let with_g = rest_h + "GET /g HTTP/1.1\r\nHost: x\r\n\r\n".len();
    assert_eq!(
        marks,
        [("/f".to_string(), with_g), ("/g".to_string(), rest_h)]
    );
    assert_eq!(c.buffered(), b"GET /h");
    // A body wholly in the first segment: answered at once.
    let mut c = Conn::new(t);
    c.received(
        b"POST /i HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nz",
        t,
    );
    marks.clear();
    serve_now(&mut c, &mut marks);
    assert_eq!(marks, [("/i".to_string(), 0)]);
    assert!(c.at_boundary());
}

/// A client that asked for `100 Continue` waits for it before sending the body; rather
/// than make it wait, the final answer goes out at once and the connection closes after
/// it (the body will not be read).
#[test]
fn expect_continue_is_answered_at_once_and_closed() {
    let t = Instant::now();
    let mut c = Conn::new(t);
    c.received(
        b"POST /f HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
        t,
    );
    let mut got = Vec::new();
    let o = serve(&mut c, &final_policy(), Budget::responses(64), echo, |r| {
        if let Some(Part::Bytes(b)) = r.parts.first() {
            got.push(String::from_utf8_lossy(b).into_owned());
        }
    });
    assert_eq!(o, Outcome::Close(Close::Refused));
    assert_eq!(got, ["/f"]);
    // With the body already in, it is an ordinary request.
    let mut c = Conn::new(t);
    c.received(
        b"POST /f HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
        t,
    );
    let (o, out) = run(&mut c, &final_policy(), Budget::responses(64), echo);
    assert_eq!((o, out.len()), (Outcome::Wait, 1));
}

#[test]
fn body_policy() {
    assert_eq!(body_to_discard(Body::None, 10), Ok(0));
    assert_eq!(body_to_discard(Body::Length(10), 10), Ok(10));
    assert_eq!(
        body_to_discard(Body::Length(11), 10).map_err(|e| e.status),
        Err(413)
    );
    assert_eq!(
        body_to_discard(Body::Chunked, 10).map_err(|e| e.status),
        Err(400)
    );
}

#[test]
fn the_overload_answer_is_a_complete_closing_response() {
    let s = std::str::from_utf8(OVERLOADED).unwrap_or_default();
    assert!(s.starts_with("HTTP/1.1 503 "));
    assert!(s.contains("\r\nContent-Length: 0\r\n"));
    assert!(s.contains("\r\nConnection: close\r\n"));
    assert!(s.ends_with("\r\n\r\n"));
}

/// Feeds `bytes` cut at `cuts`, serving after each piece; returns every target answered.
fn fed_in_pieces(bytes: &[u8], cuts: &[usize], policy: &Policy) -> (Vec<String>, Outcome) {
    let t = Instant::now();
    let mut c = Conn::new(t);
    let mut cuts: Vec<usize> = cuts.iter().map(|x| x % (bytes.len() + 1)).collect();
    cuts.push(bytes.len());
    cuts.sort_unstable();
    let (mut at, mut all) = (0, Vec::new());
    let mut last = Outcome::Wait;
    for cut in cuts {
        c.received(&bytes[at..cut], t);
        at = cut;
        let (o, out) = run(&mut c, policy, Budget::responses(2), echo);
        all.extend(out);
        last = o;
        while last == Outcome::Budget {
            let (o, out) = run(&mut c, policy, Budget::responses(2), echo);
            all.extend(out);
            last = o;
        }
        if last != Outcome::Wait {
            break;
        }
    }
    (all, last)
}

proptest::proptest! {
    #[test]
    fn any_split_of_a_pipeline_gives_the_same_answers(
        cuts in proptest::collection::vec(0usize..1000, 0..12),
    ) {
        let pipeline = get("/a")
            + "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nGET /"
            + &get("/c")
            + "HEAD /d HTTP/1.0\r\n\r\n"
            + &get("/never");
        let (all, o) = fed_in_pieces(pipeline.as_bytes(), &cuts, &final_policy());
        proptest::prop_assert_eq!(all, vec!["/a", "/b", "/c", "/d"]);
        proptest::prop_assert_eq!(o, Outcome::Close(Close::Asked));
    }

    #[test]
    fn the_fast_path_loses_no_byte(
        data in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..400),
        prefix in 0usize..3,
        cuts in proptest::collection::vec(0usize..1000, 0..6),
    ) {
        // Some good requests, then anything: what is not answered is handed over or kept.
        let mut bytes = Vec::new();
        for _ in 0..prefix {
            bytes.extend_from_slice(get("/ok").as_bytes());
        }
        bytes.extend_from_slice(&data);
        let t = Instant::now();
        let mut c = Conn::new(t);
        let mut cuts: Vec<usize> = cuts.iter().map(|x| x % (bytes.len() + 1)).collect();
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let (mut at, mut consumed) = (0usize, 0usize);
        for cut in cuts {
            c.received(&bytes[at..cut], t);
            at = cut;
            let before = c.buffered().len();
            let mut answered = Vec::new();
            let o = serve(&mut c, &fast_policy(), Budget::parts(usize::MAX), |r: &Request| {
                answered.push(r.target.clone());
                echo(r)
            }, |_| {});
            match o {
                Outcome::HandOver(rest) => {
                    proptest::prop_assert!(rest.len() <= before);
                    proptest::prop_assert_eq!(&bytes[at - rest.len()..at], &rest[..]);
                    return Ok(());
                }
                Outcome::Close(_) | Outcome::Wait => {
                    consumed += before - c.buffered().len();
                    proptest::prop_assert_eq!(&bytes[consumed..at], c.buffered());
                    if o != Outcome::Wait {
                        return Ok(());
                    }
                }
                Outcome::Budget => proptest::prop_assert!(false, "unlimited budget ran out"),
            }
        }
    }
}
