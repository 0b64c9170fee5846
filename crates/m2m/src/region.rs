//! A shared region: a size-sealed memfd mapped by both sides, and the only code in the crate
//! that turns offsets into pointers.
//!
//! Rule 2 of the design (no Rust references into shared memory) is enforced here: the API hands
//! out values, never `&T` to shared bytes. Control words are accessed through atomics that live
//! only for one operation; bulk bytes are copied with `ptr::copy_nonoverlapping` into or out of
//! private memory. The peer may change bulk bytes while we copy them; that can only give us
//! garbage bytes, never undefined control flow, because every decision is made on a private copy
//! (read once, then validate) — the same contract as a kernel's copy_from_user.

use crate::layout::{self, header, Layout, Params};
use crate::sys;
use crate::Error;
use memmap2::{MmapOptions, MmapRaw};
use rustix::fd::{AsFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) struct Region {
    map: MmapRaw,
    layout: Layout,
}

impl Region {
    /// Creates a region for `params`, with its header written, and returns the memfd to hand to
    /// the peer. The fd is the peer's only handle; we keep just the mapping, so the memory is
    /// released once both sides have unmapped it.
    pub fn create(params: Params) -> Result<(Region, OwnedFd), Error> {
        let layout = Layout::new(params).map_err(|e| Error::Config(e.to_string()))?;
        let fd = sys::create_sealed_memfd("splitos-m2m", layout.region_size as u64)
            .map_err(|e| Error::io("creating shared memory", e))?;
        let region = Region::map(&fd, layout)?;
        // VERSION and HEADER_SIZE share a word: the version is the low half.
        region.store_u64(
            header::VERSION,
            layout::VERSION as u64 | ((layout::PAGE as u64) << 32),
            Ordering::Relaxed,
        );
        region.store_u64(
            header::REGION_SIZE,
            layout.region_size as u64,
            Ordering::Relaxed,
        );
        region.store_u64(header::RING_BYTES, params.ring_bytes, Ordering::Relaxed);
        region.store_u64(header::BUF_SIZE, params.buf_size, Ordering::Relaxed);
        region.store_u64(header::BUF_COUNT, params.buf_count, Ordering::Relaxed);
        region.store_u64(
            header::RETURN_RING_BYTES,
            layout.return_ring_bytes,
            Ordering::Relaxed,
        );
        region.store_u64(header::MAGIC, layout::MAGIC, Ordering::Release);
        Ok((region, fd))
    }

    /// Maps a region received from the peer, who claims it was built from `params`. Checks the
    /// seals, the file size and every header field before returning.
    pub fn open(fd: OwnedFd, params: Params) -> Result<Region, Error> {
        let layout = Layout::new(params).map_err(|e| Error::Handshake(format!("peer sent {e}")))?;
        let size =
            sys::sealed_size(fd.as_fd()).map_err(|e| Error::io("checking shared memory", e))?;
        if size != layout.region_size as u64 {
            return Err(Error::Handshake(format!(
                "shared memory is {size} bytes, layout needs {}",
                layout.region_size
            )));
        }
        let region = Region::map(&fd, layout)?;
        let expect = [
            (header::MAGIC, layout::MAGIC, "magic"),
            (
                header::VERSION,
                layout::VERSION as u64 | ((layout::PAGE as u64) << 32),
                "version / header size",
            ),
            (
                header::REGION_SIZE,
                layout.region_size as u64,
                "region size",
            ),
            (header::RING_BYTES, params.ring_bytes, "ring size"),
            (header::BUF_SIZE, params.buf_size, "buffer size"),
            (header::BUF_COUNT, params.buf_count, "buffer count"),
            (
                header::RETURN_RING_BYTES,
                layout.return_ring_bytes,
                "return ring size",
            ),
        ];
        for (off, want, what) in expect {
            let got = region.load_u64(off, Ordering::Acquire);
            if got != want {
                return Err(Error::Handshake(format!(
                    "region header {what} is {got:#x}, expected {want:#x}"
                )));
            }
        }
        Ok(region)
        // `fd` drops here: the mapping keeps the memory alive, and nobody can map it again.
    }

    fn map(fd: &OwnedFd, layout: Layout) -> Result<Region, Error> {
        let map = MmapOptions::new()
            .len(layout.region_size)
            .map_raw(fd)
            .map_err(|e| Error::io("mapping shared memory", e))?;
        Ok(Region { map, layout })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Checks that `[off, off+len)` lies inside the mapping. Offsets come from the layout, never
    /// unvalidated from the peer, so failing this is a bug in this crate.
    #[inline]
    fn check(&self, off: usize, len: usize, align: usize) {
        assert!(
            off % align == 0 && off <= self.map.len() && len <= self.map.len() - off,
            "m2m internal error: access {off}+{len} outside region of {}",
            self.map.len()
        );
    }

    #[inline]
    fn atomic(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8, 8);
        // SAFETY: `off` is 8-aligned and inside the live mapping (checked above; the mapping
        // lives as long as `self`). AtomicU64 has the layout of u64 and every access to this
        // word, from either process, is atomic; the returned reference is confined to one
        // operation by the callers below.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(off).cast()) }
    }

    #[inline]
    pub fn load_u64(&self, off: usize, order: Ordering) -> u64 {
        self.atomic(off).load(order)
    }

    #[inline]
    pub fn store_u64(&self, off: usize, v: u64, order: Ordering) {
        self.atomic(off).store(v, order)
    }

    #[inline]
    pub fn swap_u64(&self, off: usize, v: u64, order: Ordering) -> u64 {
        self.atomic(off).swap(v, order)
    }

    #[inline]
    pub fn write_bytes(&self, off: usize, src: &[u8]) {
        self.check(off, src.len(), 1);
        // SAFETY: the destination range is inside the mapping (checked) and cannot overlap the
        // private source slice. Concurrent peer writes can only change the bytes we store.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), self.map.as_mut_ptr().add(off), src.len()) }
    }

    #[inline]
    pub fn read_bytes(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len(), 1);
        // SAFETY: the source range is inside the mapping (checked); the destination is private.
        // The copy is the single read of those bytes (see the module comment).
        unsafe { ptr::copy_nonoverlapping(self.map.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) }
    }

    /// Address of `off` for handing to the kernel (e.g. an io_uring send of a pool buffer).
    /// Reading or writing through it is up to the caller's own `unsafe` justification.
    pub fn addr(&self, off: usize, len: usize) -> *const u8 {
        self.check(off, len, 1);
        self.map.as_ptr().wrapping_add(off)
    }
}
