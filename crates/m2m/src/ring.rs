//! The single-producer / single-consumer ring of variable-length records.
//!
//! This is the protocol core, written against [`RingMemory`] so the same code runs on a shared
//! mapping in production and on loom's instrumented atomics in the model test.
//!
//! Why records carry their own validity (see `layout::record`) instead of a shared tail index:
//! the consumer spins on the very cache line the payload arrives in, so a message costs one
//! cache-line hand-off instead of two (index line, then data line), and the producer has no index
//! to publish at all. The consumer's head is the only shared index; it is published in batches
//! and read by the producer only when its cached copy says the ring looks full.
//!
//! Both sides treat what they read from the other side as hostile: the consumer checks each
//! header's stamp, kind and length before using it, and the producer checks that the head it
//! reads is aligned, monotonic and not past what it has written. A failed check returns
//! [`RingError::Corrupt`]; every memory access stays inside the ring by construction (offsets
//! are masked with the power-of-two capacity).

use crate::layout::record;
use std::sync::atomic::Ordering;

/// The control words of a ring, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ctl {
    Head,
    ConsumerWaiting,
    ProducerWaiting,
}

/// Memory a ring lives in. Offsets are byte offsets inside the data area, already reduced
/// modulo `capacity()`; word offsets are 8-aligned; byte ranges never cross the end.
pub(crate) trait RingMemory {
    fn capacity(&self) -> u64;
    fn load_word(&self, off: u64, order: Ordering) -> u64;
    fn store_word(&self, off: u64, value: u64, order: Ordering);
    fn write_bytes(&self, off: u64, src: &[u8]);
    fn read_bytes(&self, off: u64, dst: &mut [u8]);
    fn load_ctl(&self, ctl: Ctl, order: Ordering) -> u64;
    fn store_ctl(&self, ctl: Ctl, value: u64, order: Ordering);
    fn swap_ctl(&self, ctl: Ctl, value: u64, order: Ordering) -> u64;
    /// A sequentially consistent fence (the store→load barrier of the sleep/wake handshake).
    fn fence_seqcst(&self);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RingError {
    /// The peer wrote something the protocol does not allow; the string says what.
    Corrupt(&'static str),
}

/// A record that the consumer has validated but not yet consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Peeked {
    pub kind: u8,
    pub len: usize,
}

pub(crate) struct Producer<M: RingMemory> {
    mem: M,
    mask: u64,
    /// Stream position of the next record (private: the consumer never sees it).
    tail: u64,
    /// Last validated consumer head.
    head: u64,
    max_message: u64,
}

impl<M: RingMemory> Producer<M> {
    pub fn new(mem: M, max_message: u64) -> Self {
        let mask = mem.capacity() - 1;
        Producer {
            mem,
            mask,
            tail: 0,
            head: 0,
            max_message,
        }
    }

    pub fn max_message(&self) -> u64 {
        self.max_message
    }

    /// Bytes written and not yet released by the consumer, as of the last head refresh.
    pub fn backlog(&self) -> u64 {
        self.tail - self.head
    }

    fn free(&self) -> u64 {
        self.mem.capacity() - (self.tail - self.head)
    }

    /// Re-reads the consumer's head, validating it.
    pub fn refresh_head(&mut self) -> Result<(), RingError> {
        let h = self.mem.load_ctl(Ctl::Head, Ordering::Acquire);
        if h % 8 != 0 || h < self.head || h > self.tail {
            return Err(RingError::Corrupt("consumer head out of range"));
        }
        self.head = h;
        Ok(())
    }

    /// Whether a record of `len` bytes fits now (refreshing the head if needed).
    pub fn has_room(&mut self, len: usize) -> Result<bool, RingError> {
        let need = record::footprint(len as u64) + record::HEADER_BYTES;
        if self.free() >= need {
            return Ok(true);
        }
        self.refresh_head()?;
        Ok(self.free() >= need)
    }

    /// Writes one record made of `parts` and publishes it. `Ok(false)` means the ring is full.
    /// The caller has checked the total length against `max_message`.
    pub fn try_push(&mut self, kind: u8, parts: &[&[u8]]) -> Result<bool, RingError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        debug_assert!(len as u64 <= self.max_message);
        if !self.has_room(len)? {
            return Ok(false);
        }
        let mut pos = self.tail + record::HEADER_BYTES;
        for part in parts {
            self.write_wrapping(pos, part);
            pos += part.len() as u64;
        }
        let next = self.tail + record::footprint(len as u64);
        // Clear the following header before publishing this one: once the consumer has read
        // this record it looks at `next`, and must find "nothing yet", not an older lap's bytes.
        self.mem.store_word(next & self.mask, 0, Ordering::Relaxed);
        let word = record::encode(kind, len as u32, self.tail);
        self.mem
            .store_word(self.tail & self.mask, word, Ordering::Release);
        self.tail = next;
        Ok(true)
    }

    fn write_wrapping(&self, pos: u64, bytes: &[u8]) {
        let off = pos & self.mask;
        let first = (self.mem.capacity() - off).min(bytes.len() as u64) as usize;
        self.mem.write_bytes(off, &bytes[..first]);
        if first < bytes.len() {
            self.mem.write_bytes(0, &bytes[first..]);
        }
    }

    /// After a batch: returns true if the consumer is asleep and must be woken (the caller
    /// rings the doorbell). Pairs with [`Consumer::arm`].
    pub fn consumer_needs_wake(&self) -> bool {
        self.mem.fence_seqcst();
        self.mem.load_ctl(Ctl::ConsumerWaiting, Ordering::Relaxed) != 0
            && self.mem.swap_ctl(Ctl::ConsumerWaiting, 0, Ordering::AcqRel) != 0
    }

    /// Announces that the producer is about to sleep until `len` bytes fit. Returns false (and
    /// withdraws the announcement) if they already fit.
    pub fn arm(&mut self, len: usize) -> Result<bool, RingError> {
        self.mem
            .store_ctl(Ctl::ProducerWaiting, 1, Ordering::Relaxed);
        self.mem.fence_seqcst();
        if self.has_room(len)? {
            self.disarm();
            return Ok(false);
        }
        Ok(true)
    }

    pub fn disarm(&self) {
        self.mem
            .store_ctl(Ctl::ProducerWaiting, 0, Ordering::Relaxed);
    }
}

pub(crate) struct Consumer<M: RingMemory> {
    mem: M,
    mask: u64,
    head: u64,
    published: u64,
    max_message: u64,
}

impl<M: RingMemory> Consumer<M> {
    pub fn new(mem: M, max_message: u64) -> Self {
        let mask = mem.capacity() - 1;
        Consumer {
            mem,
            mask,
            head: 0,
            published: 0,
            max_message,
        }
    }

    /// Looks at the next record without consuming it.
    pub fn peek(&self) -> Result<Option<Peeked>, RingError> {
        let word = self.mem.load_word(self.head & self.mask, Ordering::Acquire);
        if word & record::VALID == 0 {
            return Ok(None);
        }
        if word as u32 != record::stamp(self.head) {
            return Err(RingError::Corrupt(
                "record stamp does not match its position",
            ));
        }
        let len = record::len(word) as u64;
        if len > self.max_message {
            return Err(RingError::Corrupt(
                "record length exceeds the ring's maximum",
            ));
        }
        let kind = record::kind(word);
        if kind != record::KIND_INLINE && kind != record::KIND_BUFFER {
            return Err(RingError::Corrupt("unknown record kind"));
        }
        Ok(Some(Peeked {
            kind,
            len: len as usize,
        }))
    }

    /// Copies the payload of the record last returned by `peek` (whose length is `dst.len()`)
    /// and consumes it. The head is not published; see [`Consumer::publish`].
    pub fn consume(&mut self, dst: &mut [u8]) {
        let off = (self.head + record::HEADER_BYTES) & self.mask;
        let first = (self.mem.capacity() - off).min(dst.len() as u64) as usize;
        let (a, b) = dst.split_at_mut(first);
        self.mem.read_bytes(off, a);
        if !b.is_empty() {
            self.mem.read_bytes(0, b);
        }
        self.head += record::footprint(dst.len() as u64);
    }

    /// Makes consumed space visible to the producer. Returns true if the producer is asleep
    /// waiting for space and must be woken.
    pub fn publish(&mut self) -> bool {
        if self.head == self.published {
            return false;
        }
        self.mem.store_ctl(Ctl::Head, self.head, Ordering::Release);
        self.published = self.head;
        self.mem.fence_seqcst();
        self.mem.load_ctl(Ctl::ProducerWaiting, Ordering::Relaxed) != 0
            && self.mem.swap_ctl(Ctl::ProducerWaiting, 0, Ordering::AcqRel) != 0
    }

    /// Bytes consumed since the head was last published.
    pub fn unpublished(&self) -> u64 {
        self.head - self.published
    }

    pub fn capacity(&self) -> u64 {
        self.mem.capacity()
    }

    /// Announces that the consumer is about to sleep. Returns false (and withdraws) if a record
    /// is already there. Pairs with [`Producer::consumer_needs_wake`].
    pub fn arm(&self) -> Result<bool, RingError> {
        self.mem
            .store_ctl(Ctl::ConsumerWaiting, 1, Ordering::Relaxed);
        self.mem.fence_seqcst();
        if self.peek()?.is_some() {
            self.disarm();
            return Ok(false);
        }
        Ok(true)
    }

    pub fn disarm(&self) {
        self.mem
            .store_ctl(Ctl::ConsumerWaiting, 0, Ordering::Relaxed);
    }
}

/// A ring in ordinary heap memory, for unit tests of the protocol logic.
#[cfg(test)]
pub(crate) mod heap {
    use super::*;
    use std::sync::atomic::{fence, AtomicU64};
    use std::sync::Arc;

    pub struct HeapRing {
        words: Vec<AtomicU64>,
        ctl: [AtomicU64; 3],
    }

    #[derive(Clone)]
    pub struct HeapMem(pub Arc<HeapRing>);

    impl HeapMem {
        pub fn new(capacity: usize) -> Self {
            HeapMem(Arc::new(HeapRing {
                words: (0..capacity / 8).map(|_| AtomicU64::new(0)).collect(),
                ctl: Default::default(),
            }))
        }
        pub fn poke(&self, off: u64, v: u64) {
            self.0.words[off as usize / 8].store(v, Ordering::SeqCst);
        }
        pub fn poke_ctl(&self, c: Ctl, v: u64) {
            self.0.ctl[c as usize].store(v, Ordering::SeqCst);
        }
    }

    impl RingMemory for HeapMem {
        fn capacity(&self) -> u64 {
            self.0.words.len() as u64 * 8
        }
        fn load_word(&self, off: u64, order: Ordering) -> u64 {
            self.0.words[off as usize / 8].load(order)
        }
        fn store_word(&self, off: u64, value: u64, order: Ordering) {
            self.0.words[off as usize / 8].store(value, order)
        }
        fn write_bytes(&self, off: u64, src: &[u8]) {
            for (i, b) in src.iter().enumerate() {
                let at = off as usize + i;
                let w = &self.0.words[at / 8];
                let shift = (at % 8) * 8;
                let old = w.load(Ordering::Relaxed);
                w.store(
                    (old & !(0xff << shift)) | ((*b as u64) << shift),
                    Ordering::Relaxed,
                );
            }
        }
        fn read_bytes(&self, off: u64, dst: &mut [u8]) {
            for (i, b) in dst.iter_mut().enumerate() {
                let at = off as usize + i;
                *b = (self.0.words[at / 8].load(Ordering::Relaxed) >> ((at % 8) * 8)) as u8;
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
}

#[cfg(test)]
mod tests {
    use super::heap::HeapMem;
    use super::*;

    fn pair(cap: usize) -> (Producer<HeapMem>, Consumer<HeapMem>, HeapMem) {
        let m = HeapMem::new(cap);
        let max = cap as u64 / 4;
        (
            Producer::new(m.clone(), max),
            Consumer::new(m.clone(), max),
            m,
        )
    }

    fn pop(c: &mut Consumer<HeapMem>) -> Option<Vec<u8>> {
        let p = c.peek().unwrap()?;
        let mut v = vec![0; p.len];
        c.consume(&mut v);
        Some(v)
    }

    #[test]
    fn messages_arrive_in_order_across_many_laps() {
        let (mut p, mut c, _) = pair(256);
        let mut sent = 0u32;
        let mut got = 0u32;
        while got < 2000 {
            // Sizes 0..=63 so records wrap at every possible offset.
            while sent < 2000 {
                let msg: Vec<u8> = (0..(sent % 64)).map(|i| (sent + i) as u8).collect();
                if !p.try_push(record::KIND_INLINE, &[&msg]).unwrap() {
                    break;
                }
                sent += 1;
            }
            while let Some(m) = pop(&mut c) {
                let want: Vec<u8> = (0..(got % 64)).map(|i| (got + i) as u8).collect();
                assert_eq!(m, want, "message {got}");
                got += 1;
            }
            c.publish();
        }
        assert!(pop(&mut c).is_none());
    }

    #[test]
    fn full_ring_reports_full_until_head_published() {
        let (mut p, mut c, _) = pair(128);
        let mut n = 0;
        while p.try_push(0, &[&[7u8; 16]]).unwrap() {
            n += 1;
        }
        assert!(n >= 4, "only {n} records fit");
        assert!(pop(&mut c).is_some());
        assert!(
            !p.try_push(0, &[&[7u8; 16]]).unwrap(),
            "space reused before publish"
        );
        c.publish();
        assert!(p.try_push(0, &[&[7u8; 16]]).unwrap());
    }

    #[test]
    fn hostile_head_is_rejected() {
        let (mut p, _c, m) = pair(128);
        while p.try_push(0, &[&[1u8; 8]]).unwrap() {}
        for bad in [3u64, 1 << 40, u64::MAX] {
            m.poke_ctl(Ctl::Head, bad);
            assert!(matches!(p.try_push(0, &[&[1]]), Err(RingError::Corrupt(_))));
        }
    }

    #[test]
    fn hostile_headers_are_rejected() {
        let (_p, c, m) = pair(256);
        for (word, what) in [
            (record::encode(0, 10, 8), "wrong stamp"),
            (record::encode(0, 65, 0), "too long"),
            (record::encode(5, 1, 0), "bad kind"),
        ] {
            m.poke(0, word);
            assert!(
                matches!(c.peek(), Err(RingError::Corrupt(_))),
                "{what} accepted"
            );
        }
    }

    #[test]
    fn wake_flags_pair_up() {
        let (mut p, mut c, _) = pair(128);
        assert!(c.arm().unwrap(), "empty ring must allow sleeping");
        p.try_push(0, &[b"x"]).unwrap();
        assert!(p.consumer_needs_wake());
        assert!(!p.consumer_needs_wake(), "woken twice");
        assert!(!c.arm().unwrap(), "armed although a record is waiting");
        while p.try_push(0, &[&[0; 8]]).unwrap() {}
        assert!(p.arm(8).unwrap());
        while pop(&mut c).is_some() {}
        assert!(c.publish(), "producer not woken");
    }
}
