//! Records under a sequence counter in a shared mapping that one process writes and others read
//! (a seqlock), for tables that readers consult without a message: the file server's directory
//! and the TCP server's statistics file.
//!
//! A record is a sequence word followed by value words. The writer makes the sequence odd,
//! stores the values, and makes it even again (one larger than before); a reader copies the
//! values between two loads of the same even sequence, and otherwise retries a bounded number of
//! times — so it never returns a torn record, and a writer that stops mid-update (or a hostile
//! one that keeps the sequence odd) can only make it give up. Readers may be other builds and
//! must treat what they copy as untrusted: this only promises a consistent copy.
//!
//! Every access to the mapping is an atomic load or store of one aligned 8-byte word, in this
//! process and (by contract) in every other that maps the same memory, and no Rust reference to
//! shared bytes outlives one operation (design rule 2). The protocol itself lives in
//! [`write_record`] and [`read_record`], generic over [`Words`] so the loom model below checks the
//! code that runs in shared memory.

use memmap2::{MmapOptions, MmapRaw};
use rustix::fd::BorrowedFd;
use std::io;
use std::sync::atomic::{fence, AtomicU64, Ordering};

/// Memory the seqlock protocol runs on: aligned 8-byte words addressed by byte offset.
pub(crate) trait Words {
    fn load(&self, off: usize, order: Ordering) -> u64;
    fn store(&self, off: usize, value: u64, order: Ordering);
    fn fence(&self, order: Ordering);
    /// Called while the writer holds a record (sequence odd).
    fn relax(&self) {
        std::hint::spin_loop();
    }
}

/// Writes `values` into the words after the sequence word at `seq`, under the sequence. Words
/// past `values.len()` keep what they held. One writer per record.
pub(crate) fn write_record<W: Words>(m: &W, seq: usize, values: &[u64]) {
    let s = m.load(seq, Ordering::Relaxed);
    m.store(seq, s.wrapping_add(1) | 1, Ordering::Relaxed);
    // Orders the odd sequence before the value stores: a reader that sees any new value and
    // then fences sees the odd (or a later) sequence, and retries.
    m.fence(Ordering::Release);
    for (i, v) in values.iter().enumerate() {
        m.store(seq + 8 * (i + 1), *v, Ordering::Relaxed);
    }
    // Publishes the values with the even sequence.
    m.store(seq, (s | 1).wrapping_add(1), Ordering::Release);
}

/// Copies the `out.len()` words after the sequence word at `seq` as one consistent snapshot.
/// Returns false (with `out` unspecified) if `tries` attempts all met a write in progress.
pub(crate) fn read_record<W: Words>(m: &W, seq: usize, out: &mut [u64], tries: usize) -> bool {
    for _ in 0..tries {
        let s1 = m.load(seq, Ordering::Acquire);
        if s1 % 2 == 1 {
            m.relax();
            continue;
        }
        for (i, v) in out.iter_mut().enumerate() {
            *v = m.load(seq + 8 * (i + 1), Ordering::Relaxed);
        }
        // Orders the value loads before the second sequence load (pairs with the writer's
        // release fence).
        m.fence(Ordering::Acquire);
        if m.load(seq, Ordering::Relaxed) == s1 {
            return true;
        }
    }
    false
}

/// A shared mapping seen as 64-bit words, each accessed atomically, with seqlock records.
///
/// Offsets are byte offsets from the start of the mapping and come from the caller's layout
/// constants or from header values it has validated; one outside the mapping or not 8-aligned is
/// a bug in the caller and panics rather than touching memory.
pub struct SharedWords {
    map: MmapRaw,
    writable: bool,
}

impl SharedWords {
    /// Maps `len` bytes of `fd` for reading and writing (the writer's side).
    pub fn map_writable(fd: BorrowedFd<'_>, len: usize) -> io::Result<SharedWords> {
        Ok(SharedWords {
            map: MmapOptions::new().len(len).map_raw(&fd)?,
            writable: true,
        })
    }

    /// Maps `len` bytes of `fd` read-only (a reader's side): [`store`](Self::store) and
    /// [`write_record`](Self::write_record) then panic instead of faulting.
    pub fn map_read_only(fd: BorrowedFd<'_>, len: usize) -> io::Result<SharedWords> {
        Ok(SharedWords {
            map: MmapOptions::new().len(len).map_raw_read_only(&fd)?,
            writable: false,
        })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        assert!(
            off % 8 == 0 && off <= self.map.len() && self.map.len() - off >= 8,
            "shared word at {off} outside a mapping of {} bytes",
            self.map.len()
        );
        // SAFETY: `off` is 8-aligned within a page-aligned mapping and the word lies inside it
        // (checked above); the mapping lives as long as `self`, and the reference does not
        // outlive the one operation our callers perform on it. Every access to these bytes, in
        // any process, is an atomic 8-byte access (the module's contract), so there is no
        // mixed atomic/non-atomic access. On a read-only mapping only loads are performed
        // (`store` checks `writable`); plain atomic loads of a natively supported size are
        // allowed on read-only memory.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(off).cast()) }
    }

    pub fn load(&self, off: usize, order: Ordering) -> u64 {
        self.word(off).load(order)
    }

    pub fn store(&self, off: usize, value: u64, order: Ordering) {
        assert!(self.writable, "store into a read-only shared mapping");
        self.word(off).store(value, order)
    }

    /// Writes a record whose sequence word is at `seq` (see [`write_record`]). The caller must
    /// be the record's only writer.
    pub fn write_record(&self, seq: usize, values: &[u64]) {
        assert!(self.writable, "store into a read-only shared mapping");
        write_record(self, seq, values)
    }

    /// Copies a record consistently (see [`read_record`]); false after `tries` failed attempts.
    pub fn read_record(&self, seq: usize, out: &mut [u64], tries: usize) -> bool {
        read_record(self, seq, out, tries)
    }
}

impl Words for SharedWords {
    fn load(&self, off: usize, order: Ordering) -> u64 {
        self.word(off).load(order)
    }
    fn store(&self, off: usize, value: u64, order: Ordering) {
        self.word(off).store(value, order)
    }
    fn fence(&self, order: Ordering) {
        fence(order)
    }
}

impl std::fmt::Debug for SharedWords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedWords")
            .field("len", &self.map.len())
            .field("writable", &self.writable)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fd::AsFd;

    fn memfd(len: u64) -> rustix::fd::OwnedFd {
        crate::sys::create_sealed_memfd("seqlock-test", len).unwrap()
    }

    #[test]
    fn records_round_trip_and_partial_writes_keep_the_rest() {
        let fd = memfd(4096);
        let w = SharedWords::map_writable(fd.as_fd(), 4096).unwrap();
        let r = SharedWords::map_read_only(fd.as_fd(), 4096).unwrap();
        w.write_record(64, &[1, 2, 3]);
        let mut out = [0u64; 3];
        assert!(r.read_record(64, &mut out, 4));
        assert_eq!(out, [1, 2, 3]);
        assert_eq!(
            r.load(64, Ordering::Relaxed),
            2,
            "one write: sequence 0 → 2"
        );
        w.write_record(64, &[9]);
        assert!(r.read_record(64, &mut out, 4));
        assert_eq!(out, [9, 2, 3]);
    }

    #[test]
    fn a_record_held_odd_is_never_returned() {
        let fd = memfd(4096);
        let w = SharedWords::map_writable(fd.as_fd(), 4096).unwrap();
        w.write_record(0, &[5]);
        // A writer that died (or a hostile one) mid-update leaves the sequence odd.
        w.store(0, 3, Ordering::Relaxed);
        let mut out = [0u64; 1];
        assert!(!w.read_record(0, &mut out, 8));
    }

    #[test]
    #[should_panic(expected = "outside a mapping")]
    fn offsets_outside_the_mapping_panic_instead_of_reading() {
        let fd = memfd(4096);
        let r = SharedWords::map_read_only(fd.as_fd(), 4096).unwrap();
        r.load(4096, Ordering::Relaxed);
    }

    #[test]
    #[should_panic(expected = "read-only")]
    fn a_read_only_mapping_refuses_stores() {
        let fd = memfd(4096);
        let r = SharedWords::map_read_only(fd.as_fd(), 4096).unwrap();
        r.write_record(0, &[1]);
    }

    #[test]
    fn concurrent_readers_never_see_a_torn_record() {
        let fd = memfd(4096);
        let w = SharedWords::map_writable(fd.as_fd(), 4096).unwrap();
        let r = SharedWords::map_read_only(fd.as_fd(), 4096).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            let (mut seen, mut torn) = (0u64, 0u64);
            let mut out = [0u64; 8];
            while !s2.load(Ordering::Relaxed) {
                if r.read_record(128, &mut out, 64) {
                    seen += 1;
                    if out.iter().any(|v| *v != out[0]) {
                        torn += 1;
                    }
                }
            }
            (seen, torn)
        });
        for i in 1..200_000u64 {
            w.write_record(128, &[i; 8]);
        }
        stop.store(true, Ordering::Relaxed);
        let (seen, torn) = t.join().unwrap();
        assert_eq!(torn, 0, "{torn} torn records out of {seen}");
        assert!(seen > 0);
    }

    /// Every interleaving (and loom's weak-memory model) of one writer updating a two-word
    /// record twice and one reader: whatever the reader returns is one whole write. Fails if
    /// either fence is removed.
    mod model {
        use super::super::{read_record, write_record, Words};
        use loom::sync::atomic::{fence, AtomicU64, Ordering};
        use loom::sync::Arc;
        use loom::thread;

        struct LoomWords([AtomicU64; 3]);

        impl Words for Arc<LoomWords> {
            fn load(&self, off: usize, order: Ordering) -> u64 {
                self.0[off / 8].load(order)
            }
            fn store(&self, off: usize, value: u64, order: Ordering) {
                self.0[off / 8].store(value, order)
            }
            fn fence(&self, order: Ordering) {
                fence(order)
            }
            fn relax(&self) {
                thread::yield_now();
            }
        }

        #[test]
        fn a_reader_returns_only_whole_writes() {
            let mut builder = loom::model::Builder::new();
            builder.preemption_bound = Some(3);
            builder.check(|| {
                let m = Arc::new(LoomWords([
                    AtomicU64::new(0),
                    AtomicU64::new(0),
                    AtomicU64::new(0),
                ]));
                let w = m.clone();
                let t = thread::spawn(move || {
                    write_record(&w, 0, &[1, 1]);
                    write_record(&w, 0, &[2, 2]);
                });
                let mut out = [0u64; 2];
                if read_record(&m, 0, &mut out, 2) {
                    assert_eq!(out[0], out[1], "torn read: {out:?}");
                }
                t.join().unwrap();
                assert!(read_record(&m, 0, &mut out, 1));
                assert_eq!(out, [2, 2]);
            });
        }
    }
}
