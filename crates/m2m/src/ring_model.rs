//! Model test of the ring protocol with loom: every interleaving (and loom's model of weak
//! memory) of one producer and one consumer, on a ring small enough to lap several times.
//!
//! Checked: messages arrive whole and in order across laps (so the clear-next-header rule and
//! the head publication are right), and the sleep/wake handshake never loses a wake-up (a
//! consumer that armed and saw an empty ring is always rung).

use crate::ring::{Consumer, Ctl, Producer, RingMemory};
use loom::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;

struct LoomRing {
    words: Vec<AtomicU64>,
    ctl: [AtomicU64; 3],
}

#[derive(Clone)]
struct LoomMem(Arc<LoomRing>);

impl LoomMem {
    fn new(capacity: usize) -> Self {
        LoomMem(Arc::new(LoomRing {
            words: (0..capacity / 8).map(|_| AtomicU64::new(0)).collect(),
            ctl: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
        }))
    }
}

impl RingMemory for LoomMem {
    fn capacity(&self) -> u64 {
        self.0.words.len() as u64 * 8
    }
    fn load_word(&self, off: u64, order: Ordering) -> u64 {
        self.0.words[off as usize / 8].load(order)
    }
    fn store_word(&self, off: u64, value: u64, order: Ordering) {
        self.0.words[off as usize / 8].store(value, order)
    }
    // Payload copies always start 8-aligned (after a header, or at offset 0 after a wrap), so
    // they can be modelled word by word with relaxed accesses — the plain copies they stand for.
    fn write_bytes(&self, off: u64, src: &[u8]) {
        for (i, chunk) in src.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.0.words[off as usize / 8 + i].store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
    }
    fn read_bytes(&self, off: u64, dst: &mut [u8]) {
        for (i, chunk) in dst.chunks_mut(8).enumerate() {
            let w = self.0.words[off as usize / 8 + i].load(Ordering::Relaxed);
            chunk.copy_from_slice(&w.to_le_bytes()[..chunk.len()]);
        }
    }
    fn load_ctl(&self, ctl: Ctl, order: Ordering) -> u64 {
        self.0.ctl[ctl as usize].load(order)
    }
    fn store_ctl(&self, ctl: Ctl, value: u64, order: Ordering) {
        self.0.ctl[ctl as usize].store(value, order)
    }
    fn swap_ctl(&self, ctl: Ctl, value: u64, order: Ordering) -> u64 {
        self.0.ctl[ctl as usize].swap(value, order)
    }
    fn fence_seqcst(&self) {
        fence(Ordering::SeqCst)
    }
}

/// The first payload's bytes look like a valid header with the VALID bit set: if the producer
/// ever failed to clear the next header, the consumer would find them when it laps.
const MESSAGES: [&[u8]; 3] = [&[0xff; 8], b"bcdefghij", b"k"];

#[test]
fn messages_survive_every_interleaving_across_laps() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        // 32 bytes: footprints 16, 24, 16 (plus the cleared next header) force a head refresh
        // before each later message and a payload that wraps past the end.
        let mem = LoomMem::new(32);
        let mut producer = Producer::new(mem.clone(), 12);
        let mut consumer = Consumer::new(mem, 12);
        let t = thread::spawn(move || {
            for m in MESSAGES {
                while !producer.try_push(0, &[m]).expect("valid head") {
                    thread::yield_now();
                }
            }
        });
        for want in MESSAGES {
            let p = loop {
                match consumer.peek().expect("valid record") {
                    Some(p) => break p,
                    None => thread::yield_now(),
                }
            };
            let mut got = vec![0u8; p.len];
            consumer.consume(&mut got);
            assert_eq!(got, want);
            consumer.publish();
        }
        t.join().unwrap();
    });
}

#[test]
fn armed_consumer_is_always_woken() {
    loom::model(|| {
        let mem = LoomMem::new(64);
        let mut producer = Producer::new(mem.clone(), 16);
        let consumer = Consumer::new(mem, 16);
        let doorbell = Arc::new(AtomicBool::new(false));
        let bell = doorbell.clone();
        let t = thread::spawn(move || {
            assert!(producer.try_push(0, &[b"x"]).unwrap());
            if producer.consumer_needs_wake() {
                bell.store(true, Ordering::Release);
            }
        });
        if consumer.arm().unwrap() {
            // Asleep: only the doorbell can get us out. A lost wake-up spins here until loom
            // reports the execution as never finishing.
            while !doorbell.load(Ordering::Acquire) {
                thread::yield_now();
            }
            consumer.disarm();
        }
        assert!(
            consumer.peek().unwrap().is_some(),
            "woken (or not asleep) but no message"
        );
        t.join().unwrap();
    });
}
