//! [`RingMemory`] over a shared region: the production backing of `ring.rs`.

use crate::layout::ring_ctl;
use crate::region::Region;
use crate::ring::{Ctl, RingMemory};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

pub(crate) struct ShmRing {
    region: Arc<Region>,
    ctl: usize,
    data: usize,
    capacity: u64,
}

impl ShmRing {
    pub fn new(region: Arc<Region>, ctl: usize, data: usize, capacity: u64) -> Self {
        ShmRing {
            region,
            ctl,
            data,
            capacity,
        }
    }

    fn ctl_off(&self, c: Ctl) -> usize {
        self.ctl
            + match c {
                Ctl::Head => ring_ctl::HEAD,
                Ctl::ConsumerWaiting => ring_ctl::CONSUMER_WAITING,
                Ctl::ProducerWaiting => ring_ctl::PRODUCER_WAITING,
            }
    }
}

impl RingMemory for ShmRing {
    #[inline]
    fn capacity(&self) -> u64 {
        self.capacity
    }
    #[inline]
    fn load_word(&self, off: u64, order: Ordering) -> u64 {
        self.region.load_u64(self.data + off as usize, order)
    }
    #[inline]
    fn store_word(&self, off: u64, value: u64, order: Ordering) {
        self.region
            .store_u64(self.data + off as usize, value, order)
    }
    #[inline]
    fn write_bytes(&self, off: u64, src: &[u8]) {
        self.region.write_bytes(self.data + off as usize, src)
    }
    #[inline]
    fn read_bytes(&self, off: u64, dst: &mut [u8]) {
        self.region.read_bytes(self.data + off as usize, dst)
    }
    #[inline]
    fn load_ctl(&self, ctl: Ctl, order: Ordering) -> u64 {
        self.region.load_u64(self.ctl_off(ctl), order)
    }
    #[inline]
    fn store_ctl(&self, ctl: Ctl, value: u64, order: Ordering) {
        self.region.store_u64(self.ctl_off(ctl), value, order)
    }
    #[inline]
    fn swap_ctl(&self, ctl: Ctl, value: u64, order: Ordering) -> u64 {
        self.region.swap_u64(self.ctl_off(ctl), value, order)
    }
    #[inline]
    fn fence_seqcst(&self) {
        fence(Ordering::SeqCst)
    }
}
