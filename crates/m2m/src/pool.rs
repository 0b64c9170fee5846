//! Payload buffers passed by descriptor, for data too large to copy through a ring.
//!
//! Each side owns the pool of its sending direction. It allocates a slot, bumps the slot's
//! generation (kept privately, and published in the shared generation table), fills the slot and
//! sends a descriptor `(offset, len, generation)` on the message ring. The receiver checks the
//! descriptor against the pool's bounds and the published generation, reads the bytes in place,
//! and returns the descriptor on the direction's return ring when its [`RxBuffer`] is dropped.
//! The owner accepts a returned descriptor only for a slot it has in flight with that exact
//! generation, so a stale, forged or doubled return is a protocol error, not a double free.

use crate::layout::descriptor::{self, Descriptor};
use crate::layout::{record, DirectionLayout};
use crate::region::Region;
use crate::ring::{Consumer, Producer, RingError};
use crate::shm_ring::ShmRing;
use crate::{sys, Error};
use rustix::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// The sending side's pool.
pub(crate) struct TxPool {
    region: Arc<Region>,
    dir: DirectionLayout,
    buf_size: u64,
    generations: Vec<u32>,
    in_flight: Vec<bool>,
    free: Vec<u32>,
    /// Slots of `TxBuffer`s dropped unsent.
    abandoned: Arc<Mutex<Vec<u32>>>,
    pub(crate) returns: Consumer<ShmRing>,
}

impl TxPool {
    pub fn new(region: Arc<Region>, dir: DirectionLayout) -> TxPool {
        let l = *region.layout();
        let count = l.params.buf_count as usize;
        let returns = Consumer::new(
            ShmRing::new(
                region.clone(),
                dir.return_ctl,
                dir.return_data,
                l.return_ring_bytes,
            ),
            descriptor::BYTES as u64,
        );
        TxPool {
            region,
            dir,
            buf_size: l.params.buf_size,
            generations: vec![0; count],
            in_flight: vec![false; count],
            free: (0..count as u32).rev().collect(),
            abandoned: Arc::new(Mutex::new(Vec::new())),
            returns,
        }
    }

    /// Takes back every descriptor the receiver has returned. Returns true if any slot is free.
    pub fn reclaim(&mut self) -> Result<bool, RingError> {
        if let Ok(mut a) = self.abandoned.lock() {
            self.free.append(&mut a);
        }
        while let Some(p) = self.returns.peek()? {
            if p.len != descriptor::BYTES || p.kind != record::KIND_INLINE {
                return Err(RingError::Corrupt(
                    "malformed record on the buffer return ring",
                ));
            }
            let mut d = [0u8; descriptor::BYTES];
            self.returns.consume(&mut d);
            let Descriptor {
                offset, generation, ..
            } = Descriptor::decode(&d);
            let slot = offset / self.buf_size;
            let ok = offset % self.buf_size == 0
                && (slot as usize) < self.in_flight.len()
                && self.in_flight[slot as usize]
                && self.generations[slot as usize] == generation;
            if !ok {
                return Err(RingError::Corrupt(
                    "returned buffer descriptor is not in flight",
                ));
            }
            self.in_flight[slot as usize] = false;
            self.free.push(slot as u32);
        }
        // The return ring never fills for an honest receiver, so nobody waits for this head.
        self.returns.publish();
        Ok(!self.free.is_empty())
    }

    pub fn alloc(&mut self) -> Result<Option<TxBuffer>, RingError> {
        if self.free.is_empty() && !self.reclaim()? {
            return Ok(None);
        }
        let Some(slot) = self.free.pop() else {
            return Ok(None);
        };
        let s = slot as usize;
        self.generations[s] = self.generations[s].wrapping_add(1);
        self.region.store_u64(
            self.dir.gen_table + 8 * s,
            self.generations[s] as u64,
            Ordering::Release,
        );
        Ok(Some(TxBuffer {
            region: self.region.clone(),
            offset: slot as u64 * self.buf_size,
            abs: self.dir.pool + s * self.buf_size as usize,
            capacity: self.buf_size as usize,
            generation: self.generations[s],
            abandoned: Some(self.abandoned.clone()),
        }))
    }

    /// Marks `buf` in flight and returns its descriptor.
    pub fn commit(&mut self, mut buf: TxBuffer, len: usize) -> [u8; descriptor::BYTES] {
        buf.abandoned = None;
        self.in_flight[(buf.offset / self.buf_size) as usize] = true;
        Descriptor {
            offset: buf.offset,
            len: len as u32,
            generation: buf.generation,
        }
        .encode()
    }
}

/// A buffer from the local pool, being filled before it is sent with
/// [`Channel::send_buffer`](crate::Channel::send_buffer). Dropping it unsent frees it.
pub struct TxBuffer {
    region: Arc<Region>,
    offset: u64,
    abs: usize,
    capacity: usize,
    generation: u32,
    abandoned: Option<Arc<Mutex<Vec<u32>>>>,
}

impl TxBuffer {
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Copies `data` into the buffer at `offset`.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), Error> {
        match offset.checked_add(data.len()) {
            Some(end) if end <= self.capacity => {
                self.region.write_bytes(self.abs + offset, data);
                Ok(())
            }
            _ => Err(Error::BufferOverflow {
                offset,
                len: data.len(),
                capacity: self.capacity,
            }),
        }
    }

    /// Copies bytes from `offset` on into `dst`; returns how many (0 past the end). Used when
    /// the kernel filled the buffer (an io_uring receive) and the owner wants them back.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        let n = self.capacity.saturating_sub(offset).min(dst.len());
        if n > 0 {
            self.region.read_bytes(self.abs + offset, &mut dst[..n]);
        }
        n
    }

    /// Start of the buffer, for handing to the kernel (e.g. an io_uring receive straight into
    /// shared memory). Valid for `capacity()` bytes while this `TxBuffer` lives.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.region.addr(self.abs, self.capacity).cast_mut()
    }
}

impl Drop for TxBuffer {
    fn drop(&mut self) {
        if let Some(a) = self.abandoned.take() {
            if let Ok(mut a) = a.lock() {
                a.push((self.offset / self.capacity as u64) as u32);
            }
        }
    }
}

impl std::fmt::Debug for TxBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxBuffer")
            .field("offset", &self.offset)
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// The path by which received buffers go home: the return ring of the peer's pool.
pub(crate) struct ReturnPath {
    producer: Mutex<Producer<ShmRing>>,
    peer_doorbell: Arc<OwnedFd>,
}

/// The receiving side's view of the peer's pool.
pub(crate) struct RxPool {
    region: Arc<Region>,
    dir: DirectionLayout,
    buf_size: u64,
    count: u64,
    returns: Arc<ReturnPath>,
}

impl RxPool {
    pub fn new(region: Arc<Region>, dir: DirectionLayout, peer_doorbell: Arc<OwnedFd>) -> RxPool {
        let l = *region.layout();
        let producer = Producer::new(
            ShmRing::new(
                region.clone(),
                dir.return_ctl,
                dir.return_data,
                l.return_ring_bytes,
            ),
            descriptor::BYTES as u64,
        );
        RxPool {
            region,
            dir,
            buf_size: l.params.buf_size,
            count: l.params.buf_count,
            returns: Arc::new(ReturnPath {
                producer: Mutex::new(producer),
                peer_doorbell,
            }),
        }
    }

    /// Validates a descriptor (and its metadata) read from the ring.
    pub fn accept(&self, record: &[u8]) -> Result<RxBuffer, RingError> {
        let Some((d, meta)) = record.split_first_chunk::<{ descriptor::BYTES }>() else {
            return Err(RingError::Corrupt("buffer record too short"));
        };
        if meta.len() > descriptor::MAX_META {
            return Err(RingError::Corrupt("buffer metadata too long"));
        }
        let Descriptor {
            offset,
            len,
            generation,
        } = Descriptor::decode(d);
        let slot = offset / self.buf_size;
        if offset % self.buf_size != 0 || slot >= self.count || len as u64 > self.buf_size {
            return Err(RingError::Corrupt("buffer descriptor out of range"));
        }
        let published = self
            .region
            .load_u64(self.dir.gen_table + 8 * slot as usize, Ordering::Acquire);
        if published != generation as u64 {
            return Err(RingError::Corrupt("stale buffer descriptor"));
        }
        let mut meta_bytes = [0u8; descriptor::MAX_META];
        meta_bytes[..meta.len()].copy_from_slice(meta);
        Ok(RxBuffer {
            inner: Box::new(RxInner {
                region: self.region.clone(),
                abs: self.dir.pool + offset as usize,
                len: len as usize,
                descriptor: *d,
                meta: meta_bytes,
                meta_len: meta.len() as u8,
                returns: self.returns.clone(),
            }),
        })
    }
}

/// A received buffer, read in place in the sender's pool. Dropping it returns it to the sender.
///
/// The state lives behind one pointer so that a `Message` (and every `Result` carrying one)
/// stays two words wide: it is moved through several returns per received message, and a
/// 100-byte enum showed up as a tenth of the receive path in profiles.
pub struct RxBuffer {
    inner: Box<RxInner>,
}

struct RxInner {
    region: Arc<Region>,
    abs: usize,
    len: usize,
    descriptor: [u8; descriptor::BYTES],
    meta: [u8; descriptor::MAX_META],
    meta_len: u8,
    returns: Arc<ReturnPath>,
}

impl RxBuffer {
    /// The metadata the sender attached with `send_buffer_with` (a private copy).
    pub fn meta(&self) -> &[u8] {
        &self.inner.meta[..self.inner.meta_len as usize]
    }

    pub fn len(&self) -> usize {
        self.inner.len
    }

    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Copies the first `min(len, dst.len())` bytes into `dst`; returns how many.
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        self.read_at(0, dst)
    }

    /// Copies bytes from `offset` on; returns how many (0 past the end).
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        let n = self.inner.len.saturating_sub(offset).min(dst.len());
        if n > 0 {
            self.inner
                .region
                .read_bytes(self.inner.abs + offset, &mut dst[..n]);
        }
        n
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.inner.len];
        self.copy_to(&mut v);
        v
    }

    /// Start of the bytes, for handing to the kernel (e.g. an io_uring send straight from
    /// shared memory). Valid for `len()` bytes while this `RxBuffer` lives.
    pub fn as_ptr(&self) -> *const u8 {
        self.inner.region.addr(self.inner.abs, self.inner.len)
    }
}

impl Drop for RxBuffer {
    fn drop(&mut self) {
        let Ok(mut p) = self.inner.returns.producer.lock() else {
            return;
        };
        match p.try_push(record::KIND_INLINE, &[&self.inner.descriptor]) {
            Ok(true) => {
                if p.consumer_needs_wake() {
                    sys::ring_eventfd(self.inner.returns.peer_doorbell.as_fd());
                }
            }
            // Full only if the sender handed out more buffers than its pool has, i.e. lied;
            // corrupt means it scribbled on the return ring. Either way only it loses.
            Ok(false) | Err(_) => {
                tracing::debug!("dropping a buffer return: the peer's return ring is unusable")
            }
        }
    }
}

impl std::fmt::Debug for RxBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxBuffer")
            .field("len", &self.inner.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Params;

    fn pools() -> (TxPool, RxPool) {
        let (region, _fd) = Region::create(Params {
            ring_bytes: 4096,
            buf_size: 4096,
            buf_count: 4,
        })
        .unwrap();
        let region = Arc::new(region);
        let dir = region.layout().dirs[0];
        let bell = Arc::new(sys::new_eventfd().unwrap());
        (
            TxPool::new(region.clone(), dir),
            RxPool::new(region, dir, bell),
        )
    }

    #[test]
    fn receiver_rejects_out_of_range_and_stale_descriptors() {
        let (mut tx, rx) = pools();
        let buf = tx.alloc().unwrap().unwrap();
        let good = tx.commit(buf, 100);
        let Descriptor {
            offset: off,
            generation,
            ..
        } = Descriptor::decode(&good);
        let encode = |offset, len, generation| {
            Descriptor {
                offset,
                len,
                generation,
            }
            .encode()
        };
        assert!(rx.accept(&good).is_ok());
        for (bad, what) in [
            (encode(off + 1, 100, generation), "misaligned"),
            (encode(4 * 4096, 1, generation), "past the pool"),
            (encode(u64::MAX - 4095, 1, generation), "huge offset"),
            (encode(off, 4097, generation), "longer than a buffer"),
            (encode(off, 100, generation + 1), "wrong generation"),
        ] {
            assert!(
                matches!(rx.accept(&bad), Err(RingError::Corrupt(_))),
                "{what} accepted"
            );
        }
    }

    #[test]
    fn owner_rejects_double_and_forged_returns() {
        let (mut tx, rx) = pools();
        let buf = tx.alloc().unwrap().unwrap();
        let d = tx.commit(buf, 10);
        let received = rx.accept(&d).unwrap();
        drop(received); // returns it
        assert!(tx.reclaim().unwrap());
        // The same descriptor again: no longer in flight.
        let again = rx.accept(&d).unwrap();
        drop(again);
        assert!(matches!(tx.reclaim(), Err(RingError::Corrupt(_))));
    }

    #[test]
    fn every_slot_is_handed_out_once_until_returned() {
        let (mut tx, _rx) = pools();
        let bufs: Vec<_> = (0..4).map(|_| tx.alloc().unwrap().unwrap()).collect();
        let mut offsets: Vec<u64> = bufs.iter().map(|b| b.offset).collect();
        offsets.sort();
        assert_eq!(offsets, vec![0, 4096, 8192, 12288]);
        assert!(tx.alloc().unwrap().is_none());
        drop(bufs); // unsent: back to the pool
        assert!(tx.alloc().unwrap().is_some());
    }
}
