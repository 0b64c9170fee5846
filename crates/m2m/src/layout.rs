//! The shared-memory contract, in one place.
//!
//! Everything two processes agree on about a channel region lives in this file: the magic and
//! version, the header, where each ring and buffer pool sits, how a ring record is encoded and
//! what a buffer descriptor looks like. Nothing else in the crate invents an offset. Both sides
//! compute the layout from the same four parameters with [`Layout::new`], and the side that maps
//! a region checks the header against it before touching anything else.
//!
//! ```text
//! offset 0        RegionHeader (one page): magic, version, parameters, per-side state lines
//! for dir in [acceptor→connector, connector→acceptor]:
//!   ring control  4 × 128 B lines: consumer head | consumer-waiting | producer-waiting | spare
//!   ring data     ring_bytes (power of two), a byte stream of records
//!   return ctl    same control block, for the ring that returns buffer descriptors
//!   return data   return_ring_bytes (power of two)
//!   gen table     buf_count × u64: generation of each pool slot, written by the pool owner
//!   pool slots    buf_count × buf_size
//! ```
//! Every block starts on a page boundary. Control words that different sides write sit on
//! different 128-byte lines (two cache lines, so the adjacent-line prefetcher cannot couple
//! them).
//!
//! A ring carries records: an 8-byte header followed by the payload padded to 8 bytes. The
//! header is published last, with release ordering, and is self-validating so that the consumer
//! needs no producer index:
//!
//! ```text
//! bit 63      VALID   set on every published header; a zero word means "nothing here yet"
//! bits 60..63 kind    0 = inline bytes, 1 = buffer descriptor; others are a protocol error
//! bits 32..60 length  payload bytes, at most the ring's max_message
//! bits 0..32  stamp   (stream position / 8) as u32: catches a header from the wrong lap
//! ```
//! Before publishing a record the producer zeroes the header word that follows it, so the
//! consumer never mistakes bytes from an older lap for a new header.

/// "SPLITM2M" in little-endian byte order.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SPLITM2M");
/// Bumped on any change to this file that changes bytes in shared memory or on the socket.
pub const VERSION: u32 = 1;

pub const PAGE: usize = 4096;
/// Spacing of independently written control words: two cache lines.
pub const LINE: usize = 128;

/// The region header, as it lies at offset 0. Never referenced in place (the peer may change
/// it): the constants below are its field offsets, which is what the code uses.
#[repr(C)]
pub struct RegionHeader {
    pub magic: u64,
    /// Low half: [`VERSION`]; high half: the header size ([`PAGE`]).
    pub version_and_header_size: u64,
    pub region_size: u64,
    pub ring_bytes: u64,
    pub buf_size: u64,
    pub buf_count: u64,
    pub return_ring_bytes: u64,
    _reserved: [u64; 25],
    /// One line per side: that side's state (its `closed` word first).
    pub side_state: [CacheLine; 2],
}

/// One independently written 8-byte word, alone on a 128-byte line pair.
#[repr(C, align(128))]
pub struct CacheLine {
    pub word: u64,
    _pad: [u8; LINE - 8],
}

/// Offsets inside the region header page, derived from [`RegionHeader`].
pub mod header {
    use super::RegionHeader;
    use core::mem::offset_of;
    pub const MAGIC: usize = offset_of!(RegionHeader, magic);
    pub const VERSION: usize = offset_of!(RegionHeader, version_and_header_size);
    pub const REGION_SIZE: usize = offset_of!(RegionHeader, region_size);
    pub const RING_BYTES: usize = offset_of!(RegionHeader, ring_bytes);
    pub const BUF_SIZE: usize = offset_of!(RegionHeader, buf_size);
    pub const BUF_COUNT: usize = offset_of!(RegionHeader, buf_count);
    pub const RETURN_RING_BYTES: usize = offset_of!(RegionHeader, return_ring_bytes);
    /// Per-side state line: `side_state(side) + CLOSED` is a u64 that side sets when it leaves.
    pub const fn side_state(side: usize) -> usize {
        offset_of!(RegionHeader, side_state) + side * super::LINE
    }
    pub const CLOSED: usize = 0;
}

/// A ring's control block: each word written by one side only, each on its own line pair.
#[repr(C)]
pub struct RingControl {
    /// Stream position up to which the consumer has finished reading (consumer writes).
    pub head: CacheLine,
    /// Non-zero while the consumer is (about to be) asleep waiting for data (consumer sets,
    /// producer clears when it rings the doorbell).
    pub consumer_waiting: CacheLine,
    /// Non-zero while the producer is (about to be) asleep waiting for space.
    pub producer_waiting: CacheLine,
    _spare: CacheLine,
}

/// Offsets inside a ring control block, derived from [`RingControl`].
pub mod ring_ctl {
    use super::RingControl;
    use core::mem::offset_of;
    pub const HEAD: usize = offset_of!(RingControl, head);
    pub const CONSUMER_WAITING: usize = offset_of!(RingControl, consumer_waiting);
    pub const PRODUCER_WAITING: usize = offset_of!(RingControl, producer_waiting);
    pub const SIZE: usize = core::mem::size_of::<RingControl>();
}

// The contract in numbers: changing any of these changes bytes in shared memory (bump VERSION).
const _: () = {
    assert!(core::mem::size_of::<RegionHeader>() <= PAGE);
    assert!(header::side_state(0) == 256 && header::side_state(1) == 384);
    assert!(header::RETURN_RING_BYTES == 48);
    assert!(ring_ctl::HEAD == 0 && ring_ctl::CONSUMER_WAITING == 128);
    assert!(ring_ctl::PRODUCER_WAITING == 256 && ring_ctl::SIZE == 512);
};

/// Ring record header encoding.
pub mod record {
    pub const HEADER_BYTES: u64 = 8;
    pub const VALID: u64 = 1 << 63;
    pub const KIND_SHIFT: u32 = 60;
    pub const KIND_MASK: u64 = 0x7;
    pub const LEN_SHIFT: u32 = 32;
    pub const LEN_MASK: u64 = (1 << 28) - 1;

    pub const KIND_INLINE: u8 = 0;
    pub const KIND_BUFFER: u8 = 1;

    pub fn encode(kind: u8, len: u32, pos: u64) -> u64 {
        VALID
            | ((kind as u64 & KIND_MASK) << KIND_SHIFT)
            | ((len as u64 & LEN_MASK) << LEN_SHIFT)
            | stamp(pos) as u64
    }
    pub fn stamp(pos: u64) -> u32 {
        (pos >> 3) as u32
    }
    pub fn kind(word: u64) -> u8 {
        ((word >> KIND_SHIFT) & KIND_MASK) as u8
    }
    pub fn len(word: u64) -> u32 {
        ((word >> LEN_SHIFT) & LEN_MASK) as u32
    }
    /// Bytes a record with `len` payload bytes occupies in the ring.
    pub fn footprint(len: u64) -> u64 {
        HEADER_BYTES + len.div_ceil(8) * 8
    }
}

/// A buffer descriptor as it travels in a ring record of kind [`record::KIND_BUFFER`], and back
/// on the return ring: `offset` (u64, from the start of the sender's pool), `len` (u32),
/// `generation` (u32), little-endian. On the message ring it may be followed by up to
/// `MAX_META` bytes of caller metadata (e.g. which connection the bytes belong to).
pub mod descriptor {
    pub const BYTES: usize = 16;
    pub const MAX_META: usize = 48;
}

/// The four numbers a channel is built from; everything else is derived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub ring_bytes: u64,
    pub buf_size: u64,
    pub buf_count: u64,
}

pub const MIN_RING_BYTES: u64 = 4096;
pub const MAX_RING_BYTES: u64 = 64 << 20;
pub const MIN_BUF_SIZE: u64 = 4096;
pub const MAX_BUF_SIZE: u64 = 16 << 20;
pub const MAX_BUF_COUNT: u64 = 4096;
/// Upper bound on one direction's pool, so a peer cannot ask for an absurd mapping.
pub const MAX_POOL_BYTES: u64 = 1 << 30;

/// Offsets of one direction's blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectionLayout {
    pub ring_ctl: usize,
    pub ring_data: usize,
    pub return_ctl: usize,
    pub return_data: usize,
    pub gen_table: usize,
    pub pool: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub params: Params,
    pub return_ring_bytes: u64,
    /// Largest inline message: a quarter of the ring, so a full ring still holds several.
    pub max_message: u64,
    pub dirs: [DirectionLayout; 2],
    pub region_size: usize,
}

fn page_align(x: usize) -> usize {
    x.div_ceil(PAGE) * PAGE
}

impl Layout {
    /// Validates the parameters and computes every offset. Errors name the offending value.
    pub fn new(params: Params) -> Result<Layout, String> {
        let Params {
            ring_bytes,
            buf_size,
            buf_count,
        } = params;
        if !ring_bytes.is_power_of_two() || !(MIN_RING_BYTES..=MAX_RING_BYTES).contains(&ring_bytes)
        {
            return Err(format!(
                "ring size {ring_bytes} must be a power of two in {MIN_RING_BYTES}..={MAX_RING_BYTES}"
            ));
        }
        if !buf_size.is_power_of_two() || !(MIN_BUF_SIZE..=MAX_BUF_SIZE).contains(&buf_size) {
            return Err(format!(
                "buffer size {buf_size} must be a power of two in {MIN_BUF_SIZE}..={MAX_BUF_SIZE}"
            ));
        }
        if !(1..=MAX_BUF_COUNT).contains(&buf_count) {
            return Err(format!(
                "buffer count {buf_count} must be in 1..={MAX_BUF_COUNT}"
            ));
        }
        if buf_size * buf_count > MAX_POOL_BYTES {
            return Err(format!(
                "buffer pool of {buf_count} x {buf_size} bytes exceeds {MAX_POOL_BYTES} bytes"
            ));
        }
        // Room for every slot's descriptor record at once, plus the cleared next header.
        let need = buf_count * record::footprint(descriptor::BYTES as u64) + record::HEADER_BYTES;
        let return_ring_bytes = need.next_power_of_two().max(MIN_RING_BYTES);

        let mut at = PAGE;
        let mut dir = || {
            let ring_ctl = at;
            let ring_data = page_align(ring_ctl + ring_ctl::SIZE);
            let return_ctl = ring_data + ring_bytes as usize;
            let return_data = page_align(return_ctl + ring_ctl::SIZE);
            let gen_table = return_data + return_ring_bytes as usize;
            let pool = page_align(gen_table + 8 * buf_count as usize);
            at = pool + (buf_size * buf_count) as usize;
            DirectionLayout {
                ring_ctl,
                ring_data,
                return_ctl,
                return_data,
                gen_table,
                pool,
            }
        };
        let dirs = [dir(), dir()];
        Ok(Layout {
            params,
            return_ring_bytes,
            max_message: ring_bytes / 4,
            dirs,
            region_size: at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_page_aligned_and_disjoint() {
        let l = Layout::new(Params {
            ring_bytes: 65536,
            buf_size: 65536,
            buf_count: 8,
        })
        .unwrap();
        let mut spans = vec![(0usize, PAGE)];
        for d in l.dirs {
            for (start, len) in [
                (d.ring_ctl, ring_ctl::SIZE),
                (d.ring_data, 65536),
                (d.return_ctl, ring_ctl::SIZE),
                (d.return_data, l.return_ring_bytes as usize),
                (d.gen_table, 64),
                (d.pool, 8 * 65536),
            ] {
                assert_eq!(start % PAGE, 0, "block at {start} not page aligned");
                spans.push((start, start + len));
            }
        }
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "overlap: {:?}", w);
        }
        assert!(spans.last().unwrap().1 <= l.region_size);
    }

    #[test]
    fn rejects_bad_params() {
        for p in [
            (1000, 4096, 1),
            (4096, 1000, 1),
            (4096, 4096, 0),
            (1 << 40, 4096, 1),
        ] {
            let r = Layout::new(Params {
                ring_bytes: p.0,
                buf_size: p.1,
                buf_count: p.2,
            });
            assert!(r.is_err(), "{p:?} accepted");
        }
    }

    #[test]
    fn record_header_round_trips() {
        let w = record::encode(record::KIND_BUFFER, 12345, 8 * 77);
        assert_ne!(w & record::VALID, 0);
        assert_eq!(record::kind(w), record::KIND_BUFFER);
        assert_eq!(record::len(w), 12345);
        assert_eq!(record::stamp(8 * 77), 77);
        assert_eq!(w as u32, 77);
        assert_eq!(record::footprint(0), 8);
        assert_eq!(record::footprint(1), 16);
        assert_eq!(record::footprint(64), 72);
    }
}
