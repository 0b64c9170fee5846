//! Channels between real processes: echo, `kill -9` mid-stream, leak checks over repeated
//! kills, and a hostile peer that scribbles on the live region while this process reads.
//!
//! The peers are this test binary re-executed with `M2M_CHILD=<role>`; the `child_process_entry`
//! test is their entry point and does nothing in a normal run.

// Test code: helpers outside #[test] functions may unwrap too; a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use splitos_m2m::layout::{self, record, Layout, Params};
use splitos_m2m::{Channel, ChannelConfig, Error, Listener, ListenerConfig, Message, WaitPolicy};
use std::io::IoSlice;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_DEADLINE: Duration = Duration::from_secs(20);

/// A socket path of its own per test; the listener removes the file when dropped.
fn temp_socket(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("m2m-test-{}-{tag}.sock", std::process::id()))
}

fn spawn_child(role: &str, path: &Path, arg: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("M2M_CHILD", role)
        .env("M2M_PATH", path)
        .env("M2M_ARG", arg.to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn child")
}

fn test_config(wait: WaitPolicy) -> ChannelConfig {
    ChannelConfig {
        ring_bytes: 64 << 10,
        buf_size: 16 << 10,
        buf_count: 8,
        wait,
    }
}

/// Deterministic payload `i` of a length between 0 and `max`.
fn payload(i: u64, max: usize) -> Vec<u8> {
    let len = ((i * 7919) % (max as u64 + 1)) as usize;
    (0..len).map(|k| (i as usize ^ (k * 31)) as u8).collect()
}

#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var("M2M_CHILD") else {
        return;
    };
    let path = PathBuf::from(std::env::var("M2M_PATH").unwrap());
    let arg: u64 = std::env::var("M2M_ARG").unwrap().parse().unwrap();
    match role.as_str() {
        "echo" => child_echo(&path),
        "flood" => child_flood(&path, arg),
        "scribble" => child_scribble(&path, arg),
        "leakcheck" => leak_check(&path),
        other => panic!("unknown child role {other}"),
    }
    std::process::exit(0);
}

fn child_echo(path: &Path) {
    let mut ch = Channel::connect(path, test_config(WaitPolicy::adaptive())).unwrap();
    let start = Instant::now();
    while start.elapsed() < CHILD_DEADLINE {
        let reply = match ch.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(Message::Inline(b))) => Ok(b.to_vec()),
            Ok(Some(Message::Buffer(rx))) => Err(rx.to_vec()),
            Ok(None) => continue,
            Err(Error::PeerGone) => return,
            Err(e) => panic!("echo child: {e}"),
        };
        match reply {
            Ok(bytes) => ch.send(&bytes).unwrap(),
            Err(bytes) => {
                let mut tx = ch.alloc_buffer_wait(Some(CHILD_DEADLINE)).unwrap().unwrap();
                tx.write(0, &bytes).unwrap();
                ch.send_buffer(tx, bytes.len()).unwrap();
            }
        }
    }
}

fn child_flood(path: &Path, use_buffers: u64) {
    let mut ch = Channel::connect(path, test_config(WaitPolicy::adaptive())).unwrap();
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < CHILD_DEADLINE {
        let r = if use_buffers == 1 && i % 2 == 0 {
            match ch.alloc_buffer_wait(Some(Duration::from_millis(100))) {
                Ok(Some(mut b)) => {
                    b.write(0, &i.to_le_bytes()).unwrap();
                    ch.send_buffer(b, 8)
                }
                Ok(None) => continue,
                Err(e) => Err(e),
            }
        } else {
            ch.send(&i.to_le_bytes())
        };
        if r.is_err() {
            return;
        }
        i += 1;
    }
}

#[test]
fn echo_across_processes_checks_every_byte() {
    let path = temp_socket("echo");
    let listener = Listener::bind(&path, ListenerConfig::default()).unwrap();
    let mut child = spawn_child("echo", &path, 0);
    let incoming = listener.accept().unwrap();
    assert_eq!(incoming.peer().pid, child.id(), "SO_PEERCRED pid");
    assert_eq!(incoming.peer().uid, rustix::process::getuid().as_raw());
    let mut ch = incoming.establish().unwrap();
    ch.set_wait_policy(WaitPolicy::adaptive());
    let max = ch.max_message_len();
    for i in 0..3000u64 {
        let want = payload(i, max);
        if i % 10 == 0 {
            let big: Vec<u8> = (0..(i as usize * 13) % (16 << 10))
                .map(|k| (k ^ i as usize) as u8)
                .collect();
            let mut tx = ch
                .alloc_buffer_wait(Some(Duration::from_secs(5)))
                .unwrap()
                .unwrap();
            tx.write(0, &big).unwrap();
            ch.send_buffer(tx, big.len()).unwrap();
            match ch.recv().unwrap() {
                Message::Buffer(rx) => assert_eq!(rx.to_vec(), big, "buffer {i}"),
                Message::Inline(_) => panic!("buffer {i} came back inline"),
            }
        } else {
            ch.send(&want).unwrap();
            match ch.recv().unwrap() {
                Message::Inline(got) => assert_eq!(got, &want[..], "message {i}"),
                Message::Buffer(_) => panic!("message {i} came back as a buffer"),
            }
        }
    }
    drop(ch);
    assert!(child.wait().unwrap().success());
}

/// Receives until the channel fails; returns the error and how long after `killed_at` it came.
fn drain_until_error(ch: &mut Channel) -> Error {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "peer death not noticed in 10 s");
        match ch.recv() {
            Ok(_) => {}
            Err(e) => return e,
        }
    }
}

#[test]
fn kill_9_mid_stream_is_noticed_quickly() {
    for (n, policy) in [WaitPolicy::Poll, WaitPolicy::adaptive(), WaitPolicy::Block]
        .into_iter()
        .enumerate()
    {
        let path = temp_socket(&format!("kill{n}"));
        let listener = Listener::bind(&path, ListenerConfig::default()).unwrap();
        let mut child = spawn_child("flood", &path, 1);
        let mut ch = listener.accept().unwrap().establish().unwrap();
        ch.set_wait_policy(policy);
        let mut expected = 0u64;
        while expected < 2000 {
            let got = match ch.recv().unwrap() {
                Message::Inline(b) => b.to_vec(),
                Message::Buffer(rx) => rx.to_vec(),
            };
            assert_eq!(got, expected.to_le_bytes(), "{policy}: message {expected}");
            expected += 1;
        }
        child.kill().unwrap();
        let killed_at = Instant::now();
        let err = drain_until_error(&mut ch);
        let noticed = killed_at.elapsed();
        let _ = child.wait();
        assert!(matches!(err, Error::PeerGone), "{policy}: got {err}");
        eprintln!("{policy}: kill -9 noticed after {noticed:?}");
        // The contract is 100 ms; allow slack for a loaded CI machine reaping the child.
        assert!(
            noticed < Duration::from_millis(250),
            "{policy}: {noticed:?}"
        );
        assert!(matches!(ch.try_send(b"x"), Err(Error::PeerGone)));
    }
}

fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn count_region_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("memfd:splitos-m2m"))
        .count()
}

#[test]
fn repeated_kills_leak_neither_fds_nor_memory() {
    // fd and mapping counts are per process, so count in a process of its own, away from the
    // other tests running in parallel here.
    let path = temp_socket("leak");
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("M2M_CHILD", "leakcheck")
        .env("M2M_PATH", &path)
        .env("M2M_ARG", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "leak check failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn leak_check(path: &Path) {
    let listener = Listener::bind(path, ListenerConfig::default()).unwrap();
    // One round first so lazily created process state does not count as a leak.
    let mut rounds = Vec::new();
    for round in 0..12 {
        if round == 2 {
            rounds.push((count_fds(), count_region_mappings()));
        }
        let mut child = spawn_child("flood", path, 1);
        let mut ch = listener.accept().unwrap().establish().unwrap();
        let mut held = Vec::new();
        for _ in 0..50 {
            if let Message::Buffer(rx) = ch.recv().unwrap() {
                if held.len() < 4 {
                    held.push(rx); // hold half the pool across the kill
                }
            }
        }
        child.kill().unwrap();
        let _ = child.wait();
        assert!(matches!(drain_until_error(&mut ch), Error::PeerGone));
        drop(held);
        drop(ch);
    }
    let (fds, maps) = rounds[0];
    assert_eq!(count_fds(), fds, "file descriptors leaked");
    assert_eq!(count_region_mappings(), maps, "shared regions still mapped");
    assert_eq!(maps, 0);
}

// ---- the hostile peer ----

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: deterministic per seed, so a failing case replays.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Connects by hand (the documented wire format), maps the region, and then, for a while,
/// mixes well-formed records with garbage written anywhere in the region.
fn child_scribble(path: &Path, seed: u64) {
    use rustix::net::{recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    use rustix::net::{SendAncillaryBuffer, SendFlags};
    use std::io::IoSliceMut;
    use std::mem::MaybeUninit;

    let sock = UnixStream::connect(path).unwrap();
    let mut hello = [0u8; 64];
    hello[..8].copy_from_slice(b"SPOSHELO");
    hello[8..12].copy_from_slice(&layout::VERSION.to_le_bytes());
    hello[16..24].copy_from_slice(&(16u64 << 10).to_le_bytes());
    hello[24..32].copy_from_slice(&(4096u64).to_le_bytes());
    hello[32..40].copy_from_slice(&4u64.to_le_bytes());
    let mut none = SendAncillaryBuffer::new(&mut []);
    sendmsg(
        &sock,
        &[IoSlice::new(&hello)],
        &mut none,
        SendFlags::empty(),
    )
    .unwrap();
    let mut reply = [0u8; 128];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    recvmsg(
        &sock,
        &mut [IoSliceMut::new(&mut reply)],
        &mut anc,
        RecvFlags::empty(),
    )
    .unwrap();
    let mut fds = Vec::new();
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(r) = m {
            fds.extend(r);
        }
    }
    let word = |at: usize| u64::from_le_bytes(reply[at..at + 8].try_into().unwrap());
    let params = Params {
        ring_bytes: word(16),
        buf_size: word(24),
        buf_count: word(32),
    };
    let l = Layout::new(params).unwrap();
    let map = memmap2::MmapOptions::new()
        .len(l.region_size)
        .map_raw(&fds[0])
        .unwrap();
    let base = map.as_mut_ptr();
    let put = |off: usize, v: u64| {
        let off = off.min(l.region_size - 8) & !7;
        // SAFETY: `off` is 8-aligned and at most region_size - 8, inside our own mapping. This
        // process is the hostile party; the victim only ever sees the bytes.
        unsafe { std::ptr::write_volatile(base.add(off).cast::<u64>(), v) }
    };
    let get = |off: usize| {
        // SAFETY: as for `put`; the victim writes this word concurrently, hence volatile.
        unsafe { std::ptr::read_volatile(base.add(off).cast::<u64>()) }
    };
    let mut rng = Rng(seed | 1);
    // Each seed gets a garbage rate, from every other write down to one in a thousand, so some
    // cases break the channel at once and others run deep into valid traffic first.
    let garbage_one_in = [2, 8, 64, 1000][(seed % 4) as usize];
    let mine = l.dirs[1];
    let mut tail = 0u64;
    // Valid buffer records keep each slot's generation at 1, so they stay valid however
    // often the victim sees them.
    let generation = 1u64;
    for slot in 0..params.buf_count as usize {
        put(mine.gen_table + 8 * slot, generation);
    }
    let ring = params.ring_bytes;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(300) {
        // The head may be garbage (this process scribbles on control words too).
        let head = get(mine.ring_ctl);
        if tail.wrapping_sub(head).saturating_add(64 + 24 + 8) > ring {
            std::thread::yield_now();
            continue;
        }
        let at = (tail & (ring - 1)) as usize;
        if rng.below(garbage_one_in) != 0 {
            if rng.below(4) != 0 {
                // A well-formed inline record.
                let len = rng.below(64);
                for k in 0..len.div_ceil(8) {
                    put(
                        mine.ring_data + ((tail + 8 + 8 * k) & (ring - 1)) as usize,
                        rng.next(),
                    );
                }
                put(
                    mine.ring_data + ((tail + record::footprint(len)) & (ring - 1)) as usize,
                    0,
                );
                put(
                    mine.ring_data + at,
                    record::encode(record::KIND_INLINE, len as u32, tail),
                );
                tail += record::footprint(len);
            } else {
                // A well-formed buffer record (whether the slot is free is not our problem:
                // the victim only reads it).
                let slot = rng.below(params.buf_count);
                let len = rng.below(params.buf_size + 1);
                put(
                    mine.ring_data + ((tail + 8) & (ring - 1)) as usize,
                    slot * params.buf_size,
                );
                put(
                    mine.ring_data + ((tail + 16) & (ring - 1)) as usize,
                    len | (generation << 32),
                );
                put(mine.ring_data + ((tail + 24) & (ring - 1)) as usize, 0);
                put(
                    mine.ring_data + at,
                    record::encode(record::KIND_BUFFER, 16, tail),
                );
                tail += 24;
            }
            continue;
        }
        match rng.below(6) {
            // A buffer record whose descriptor is slightly off.
            0 => {
                let slot = rng.below(params.buf_count + 2);
                let gen = rng.below(3);
                put(mine.gen_table + 8 * slot as usize, gen);
                put(
                    mine.ring_data + ((tail + 8) & (ring - 1)) as usize,
                    slot * params.buf_size + rng.below(2),
                );
                put(
                    mine.ring_data + ((tail + 16) & (ring - 1)) as usize,
                    rng.below(2 * params.buf_size) | (gen << 32),
                );
                put(mine.ring_data + ((tail + 24) & (ring - 1)) as usize, 0);
                put(
                    mine.ring_data + at,
                    record::encode(record::KIND_BUFFER, 16, tail),
                );
                tail += 24;
            }
            // Garbage in a control word: heads, waiting flags.
            1 => {
                let d = l.dirs[rng.below(2) as usize];
                let ctl = [d.ring_ctl, d.return_ctl][rng.below(2) as usize];
                put(
                    ctl + 128 * rng.below(3) as usize,
                    rng.next() >> rng.below(64),
                );
            }
            // Garbage on the return ring of the victim's pool.
            2 => put(
                l.dirs[0].return_data + 8 * rng.below(64) as usize,
                rng.next(),
            ),
            // A record header with a random length, kind or stamp.
            3 => put(mine.ring_data + at, rng.next() | record::VALID),
            // Garbage anywhere, header page included.
            _ => put(rng.below(l.region_size as u64) as usize, rng.next()),
        }
    }
    drop(sock);
}

/// Drives every victim-side operation until the channel fails or time runs out.
fn victim(ch: &mut Channel, handled: &mut u64) -> Result<(), Error> {
    let start = Instant::now();
    let mut scratch = vec![0u8; 8192];
    while start.elapsed() < Duration::from_millis(500) {
        match ch.recv_timeout(Duration::from_millis(2))? {
            Some(Message::Inline(_)) => *handled += 1,
            Some(Message::Buffer(rx)) => {
                *handled += 1;
                let _ = rx.read_at(rx.len() / 2, &mut scratch);
                let _ = rx.copy_to(&mut scratch);
            }
            None => {}
        }
        let _ = ch.try_send(b"reply")?;
        if let Some(mut b) = ch.alloc_buffer()? {
            b.write(0, b"data")?;
            ch.send_buffer(b, 4)?;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn hostile_peer_ends_only_its_own_channel(seed in any::<u64>()) {
        let path = temp_socket(&format!("fuzz{seed:x}"));
        let listener = Listener::bind(&path, ListenerConfig {
            wait: WaitPolicy::Poll,
            ..ListenerConfig::default()
        }).unwrap();
        let mut child = spawn_child("scribble", &path, seed);
        let mut ch = listener.accept().unwrap().establish().unwrap();
        let mut handled = 0;
        let outcome = victim(&mut ch, &mut handled);
        eprintln!("seed {seed:#x}: {handled} messages, then {outcome:?}");
        let _ = child.kill();
        let _ = child.wait();
        match outcome {
            Ok(_) | Err(Error::Corrupt(_)) | Err(Error::PeerGone) => {}
            Err(e) => prop_assert!(false, "unexpected error kind: {e}"),
        }
        // The listener and this process are unaffected: a well-behaved client still works.
        let p2 = path.clone();
        let client = std::thread::spawn(move || {
            let mut c = Channel::connect(&p2, test_config(WaitPolicy::Poll)).unwrap();
            c.send(b"still here").unwrap();
            c.recv_timeout(Duration::from_secs(5)).unwrap().map(|m| matches!(m, Message::Inline(b"ok")))
        });
        let mut good = listener.accept().unwrap().establish().unwrap();
        let m = good.recv_timeout(Duration::from_secs(5)).unwrap();
        prop_assert!(matches!(m, Some(Message::Inline(b"still here"))));
        good.send(b"ok").unwrap();
        prop_assert_eq!(client.join().unwrap(), Some(true));
    }
}

#[test]
fn refused_and_mismatched_clients_get_clear_errors() {
    let path = temp_socket("refuse");
    let listener = Listener::bind(&path, ListenerConfig::default()).unwrap();
    let p2 = path.clone();
    let t = std::thread::spawn(move || Channel::connect(&p2, ChannelConfig::default()));
    listener
        .accept()
        .unwrap()
        .reject("uid 1000 may not connect")
        .unwrap();
    match t.join().unwrap() {
        Err(Error::Rejected(why)) => assert_eq!(why, "uid 1000 may not connect"),
        other => panic!("expected Rejected, got {other:?}"),
    }

    // A client speaking another version.
    let mut sock = UnixStream::connect(&path).unwrap();
    let mut hello = [0u8; 64];
    hello[..8].copy_from_slice(b"SPOSHELO");
    hello[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::io::Write::write_all(&mut sock, &hello).unwrap();
    let err = listener.accept().unwrap().establish().unwrap_err();
    assert!(err.to_string().contains("version 99"), "{err}");
    let mut reply = [0u8; 128];
    std::io::Read::read_exact(&mut sock, &mut reply).unwrap();
    assert!(String::from_utf8_lossy(&reply[64..]).contains("version 99"));

    // A client that says nothing is dropped after the handshake timeout.
    let listener2 = Listener::bind(
        temp_socket("silent"),
        ListenerConfig {
            handshake_timeout: Duration::from_millis(100),
            ..ListenerConfig::default()
        },
    )
    .unwrap();
    let _silent = UnixStream::connect(listener2.path()).unwrap();
    let err = listener2.accept().unwrap().establish().unwrap_err();
    assert!(err.to_string().contains("no hello in time"), "{err}");
}

#[test]
fn a_live_socket_is_not_stolen_but_a_stale_one_is_replaced() {
    let path = temp_socket("bind");
    let first = Listener::bind(&path, ListenerConfig::default()).unwrap();
    let err = Listener::bind(&path, ListenerConfig::default()).unwrap_err();
    assert!(
        err.to_string().contains("another server is listening"),
        "{err}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Leave a stale socket file behind, as a crashed server would.
    std::mem::forget(first);
    let second = Listener::bind(&path, ListenerConfig::default());
    // The forgotten listener still holds the socket open, so this one is still refused...
    assert!(second.is_err());
    let stale = temp_socket("stale");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    // ...while a socket file nobody listens on is replaced. (Another test thread forking a
    // child at the wrong moment holds a copy of the dropped socket until the child's exec, so
    // the socket can look alive for a few milliseconds: retry, bounded.)
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Listener::bind(&stale, ListenerConfig::default()) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                assert!(e.to_string().contains("another server"), "{e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("a stale socket file was not replaced: {e}"),
        }
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn junk_on_the_setup_socket_ends_only_that_channel() {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvFlags};
    use std::io::IoSliceMut;
    use std::mem::MaybeUninit;
    let path = temp_socket("junk");
    let listener = Listener::bind(&path, ListenerConfig::default()).unwrap();
    let mut sock = UnixStream::connect(&path).unwrap();
    let mut hello = [0u8; 64];
    hello[..8].copy_from_slice(b"SPOSHELO");
    hello[8..12].copy_from_slice(&layout::VERSION.to_le_bytes());
    hello[16..24].copy_from_slice(&(16u64 << 10).to_le_bytes());
    hello[24..32].copy_from_slice(&4096u64.to_le_bytes());
    hello[32..40].copy_from_slice(&4u64.to_le_bytes());
    std::io::Write::write_all(&mut sock, &hello).unwrap();
    let mut ch = listener.accept().unwrap().establish().unwrap();
    let mut reply = [0u8; 128];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    recvmsg(
        &sock,
        &mut [IoSliceMut::new(&mut reply)],
        &mut anc,
        RecvFlags::empty(),
    )
    .unwrap();
    // Sixteen bytes that are not a descriptor message, and no descriptors.
    std::io::Write::write_all(&mut sock, &[0xAB; 16]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let err = loop {
        match ch.recv_timeout(Duration::from_millis(20)) {
            Err(e) => break e,
            Ok(_) => assert!(Instant::now() < deadline, "junk never noticed"),
        }
    };
    assert!(matches!(err, Error::Corrupt(_)), "{err}");
}
