//! The shared-memory contract, in one place.
//!
//! Everything two processes agree on about a channel lives in this file: the magic and version,
//! the region header, where each ring and buffer pool sits, how a ring record is encoded, what a
//! buffer descriptor looks like, and the two kinds of message that travel on the setup socket
//! (the [`handshake`] hello and reply, and [`fd_message`]s carrying descriptors). Nothing else in
//! the crate invents an offset. Both sides compute the layout from the same three parameters
//! ([`Params`]) with [`Layout::new`], and the side that maps a region checks the header against
//! it before touching anything else.
//!
//! Each fixed-size format is declared as a `#[repr(C)]` struct that is never used in place (the
//! peer may change shared bytes, and socket bytes arrive as a buffer): it fixes the field
//! offsets, which `offset_of!` turns into constants and `const _` assertions pin, so a change to
//! any of them fails to compile until [`VERSION`] is considered. Next to each struct is its
//! parsed form (`Descriptor`, `FdMessage`, `Hello`, `Reply`) with `encode` and `decode`.
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

use core::mem::{offset_of, size_of};

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
/// on the return ring. On the message ring it may be followed by up to [`descriptor::MAX_META`]
/// bytes of caller metadata (e.g. which connection the bytes belong to).
pub mod descriptor {
    use super::{get_u32, get_u64, offset_of, put_u32, put_u64, size_of};

    /// The wire layout (little-endian): never used in place, it fixes the offsets below.
    #[repr(C)]
    pub struct Wire {
        /// From the start of the sender's pool.
        pub offset: u64,
        pub len: u32,
        pub generation: u32,
    }

    pub const BYTES: usize = size_of::<Wire>();
    pub const MAX_META: usize = 48;
    const OFFSET: usize = offset_of!(Wire, offset);
    const LEN: usize = offset_of!(Wire, len);
    const GENERATION: usize = offset_of!(Wire, generation);

    /// The parsed form. Decoding cannot fail (every 16 bytes are some descriptor); whether one
    /// names a buffer of the pool is for the pool to check.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Descriptor {
        pub offset: u64,
        pub len: u32,
        pub generation: u32,
    }

    impl Descriptor {
        pub fn encode(&self) -> [u8; BYTES] {
            let mut d = [0u8; BYTES];
            put_u64(&mut d, OFFSET, self.offset);
            put_u32(&mut d, LEN, self.len);
            put_u32(&mut d, GENERATION, self.generation);
            d
        }

        pub fn decode(d: &[u8; BYTES]) -> Descriptor {
            Descriptor {
                offset: get_u64(d, OFFSET),
                len: get_u32(d, LEN),
                generation: get_u32(d, GENERATION),
            }
        }
    }

    const _: () = assert!(BYTES == 16 && OFFSET == 0 && LEN == 8 && GENERATION == 12);
}

/// A descriptor message on the setup socket: file descriptors (SCM_RIGHTS) with a
/// caller-chosen tag, e.g. a sealed memfd and the id of the file it holds. Any other bytes on
/// the socket after the handshake end the channel as corrupt.
pub mod fd_message {
    use super::{get_u32, get_u64, offset_of, put_u32, put_u64, size_of, WireError};

    /// "M2FD" in little-endian byte order.
    pub const MAGIC: u32 = u32::from_le_bytes(*b"M2FD");
    /// Descriptors one message may carry.
    pub const MAX_FDS: usize = 4;

    /// The wire layout (little-endian): never used in place, it fixes the offsets below.
    #[repr(C)]
    pub struct Wire {
        pub magic: u32,
        /// How many descriptors ride with the message; must equal what the kernel delivered.
        pub count: u32,
        pub tag: u64,
    }

    pub const BYTES: usize = size_of::<Wire>();
    const MAGIC_AT: usize = offset_of!(Wire, magic);
    const COUNT: usize = offset_of!(Wire, count);
    const TAG: usize = offset_of!(Wire, tag);

    /// The parsed form.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct FdMessage {
        pub count: u32,
        pub tag: u64,
    }

    impl FdMessage {
        pub fn encode(&self) -> [u8; BYTES] {
            let mut m = [0u8; BYTES];
            put_u32(&mut m, MAGIC_AT, MAGIC);
            put_u32(&mut m, COUNT, self.count);
            put_u64(&mut m, TAG, self.tag);
            m
        }

        /// Parses a message that arrived with `fds` descriptors attached, and checks that the
        /// two agree (and that there is at least one, at most [`MAX_FDS`]).
        pub fn decode(m: &[u8; BYTES], fds: usize) -> Result<FdMessage, WireError> {
            if get_u32(m, MAGIC_AT) != MAGIC {
                return Err(WireError::Magic("descriptor message"));
            }
            let count = get_u32(m, COUNT);
            if count as usize != fds || !(1..=MAX_FDS).contains(&fds) {
                return Err(WireError::FdCount {
                    said: count,
                    got: fds,
                });
            }
            Ok(FdMessage {
                count,
                tag: get_u64(m, TAG),
            })
        }
    }

    const _: () = assert!(BYTES == 16 && MAGIC_AT == 0 && COUNT == 4 && TAG == 8);
}

/// The setup conversation on the Unix socket: the connecting side sends a [`Hello`] asking for
/// sizes, the accepting side answers with a [`Reply`] that grants (possibly smaller) sizes and
/// carries `[region memfd, acceptor doorbell, connector doorbell]` as SCM_RIGHTS when the
/// status is [`STATUS_OK`]. Both are fixed-size, little-endian:
///
/// ```text
/// hello  (client → server, 64 B): magic "SPOSHELO" | version u32 | 0 u32 |
///                                 ring_bytes u64 | buf_size u64 | buf_count u64 | 0 (24 B)
/// reply  (server → client, 128 B): magic "SPOSWELC" | version u32 | status u32 |
///                                 ring_bytes u64 | buf_size u64 | buf_count u64 |
///                                 region_size u64 | 0 (16 B) | reason, UTF-8, NUL-padded (64 B)
/// ```
pub mod handshake {
    use super::{get_u32, get_u64, offset_of, put_u32, put_u64, size_of, Params, WireError};

    /// "SPOSHELO" in little-endian byte order.
    pub const HELLO_MAGIC: u64 = u64::from_le_bytes(*b"SPOSHELO");
    /// "SPOSWELC" in little-endian byte order.
    pub const REPLY_MAGIC: u64 = u64::from_le_bytes(*b"SPOSWELC");

    pub const STATUS_OK: u32 = 0;
    /// The versions differ; the reason says which each side speaks.
    pub const STATUS_VERSION: u32 = 1;
    /// The server refused the client; the reason says why.
    pub const STATUS_REFUSED: u32 = 2;

    /// The hello's wire layout: never used in place, it fixes the offsets below.
    #[repr(C)]
    pub struct HelloWire {
        pub magic: u64,
        pub version: u32,
        _zero: u32,
        pub ring_bytes: u64,
        pub buf_size: u64,
        pub buf_count: u64,
        _reserved: [u64; 3],
    }

    /// The reply's wire layout: never used in place, it fixes the offsets below.
    #[repr(C)]
    pub struct ReplyWire {
        pub magic: u64,
        pub version: u32,
        pub status: u32,
        pub ring_bytes: u64,
        pub buf_size: u64,
        pub buf_count: u64,
        pub region_size: u64,
        _reserved: [u64; 2],
        /// Why the client was refused: UTF-8, NUL-padded, cut at a character boundary.
        pub reason: [u8; REASON_BYTES],
    }

    pub const HELLO_BYTES: usize = size_of::<HelloWire>();
    pub const REPLY_BYTES: usize = size_of::<ReplyWire>();
    pub const REASON_BYTES: usize = 64;

    mod hello_at {
        use super::{offset_of, HelloWire};
        pub const MAGIC: usize = offset_of!(HelloWire, magic);
        pub const VERSION: usize = offset_of!(HelloWire, version);
        pub const RING_BYTES: usize = offset_of!(HelloWire, ring_bytes);
        pub const BUF_SIZE: usize = offset_of!(HelloWire, buf_size);
        pub const BUF_COUNT: usize = offset_of!(HelloWire, buf_count);
    }

    mod reply_at {
        use super::{offset_of, ReplyWire};
        pub const MAGIC: usize = offset_of!(ReplyWire, magic);
        pub const VERSION: usize = offset_of!(ReplyWire, version);
        pub const STATUS: usize = offset_of!(ReplyWire, status);
        pub const RING_BYTES: usize = offset_of!(ReplyWire, ring_bytes);
        pub const BUF_SIZE: usize = offset_of!(ReplyWire, buf_size);
        pub const BUF_COUNT: usize = offset_of!(ReplyWire, buf_count);
        pub const REGION_SIZE: usize = offset_of!(ReplyWire, region_size);
        pub const REASON: usize = offset_of!(ReplyWire, reason);
    }

    // The documented format in numbers (the cross-process tests also build a hello by hand).
    const _: () = {
        assert!(HELLO_BYTES == 64 && REPLY_BYTES == 128);
        assert!(hello_at::MAGIC == 0 && hello_at::VERSION == 8 && hello_at::RING_BYTES == 16);
        assert!(hello_at::BUF_SIZE == 24 && hello_at::BUF_COUNT == 32);
        assert!(reply_at::MAGIC == 0 && reply_at::VERSION == 8 && reply_at::STATUS == 12);
        assert!(reply_at::RING_BYTES == 16 && reply_at::BUF_SIZE == 24);
        assert!(reply_at::BUF_COUNT == 32 && reply_at::REGION_SIZE == 40);
        assert!(reply_at::REASON == 64 && reply_at::REASON + REASON_BYTES == REPLY_BYTES);
    };

    /// What a client asks for. `params` are requests: the server clamps them to its limits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Hello {
        pub version: u32,
        pub params: Params,
    }

    impl Hello {
        pub fn encode(&self) -> [u8; HELLO_BYTES] {
            let mut h = [0u8; HELLO_BYTES];
            put_u64(&mut h, hello_at::MAGIC, HELLO_MAGIC);
            put_u32(&mut h, hello_at::VERSION, self.version);
            put_u64(&mut h, hello_at::RING_BYTES, self.params.ring_bytes);
            put_u64(&mut h, hello_at::BUF_SIZE, self.params.buf_size);
            put_u64(&mut h, hello_at::BUF_COUNT, self.params.buf_count);
            h
        }

        /// Checks the magic only: the version and sizes are the caller's to judge.
        pub fn decode(h: &[u8; HELLO_BYTES]) -> Result<Hello, WireError> {
            if get_u64(h, hello_at::MAGIC) != HELLO_MAGIC {
                return Err(WireError::Magic("client hello"));
            }
            Ok(Hello {
                version: get_u32(h, hello_at::VERSION),
                params: Params {
                    ring_bytes: get_u64(h, hello_at::RING_BYTES),
                    buf_size: get_u64(h, hello_at::BUF_SIZE),
                    buf_count: get_u64(h, hello_at::BUF_COUNT),
                },
            })
        }
    }

    /// The server's answer. `granted` and `region_size` are zero unless `status` is
    /// [`STATUS_OK`]; `reason` is empty unless it is not.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Reply {
        pub version: u32,
        pub status: u32,
        pub granted: Params,
        pub region_size: u64,
        pub reason: String,
    }

    impl Reply {
        /// The reply that hands a client its region (the descriptors ride with it).
        pub fn ok(granted: Params, region_size: u64) -> Reply {
            Reply {
                version: super::VERSION,
                status: STATUS_OK,
                granted,
                region_size,
                reason: String::new(),
            }
        }

        /// A refusal with `status` and a reason the client will see.
        pub fn refuse(status: u32, reason: &str) -> Reply {
            Reply {
                version: super::VERSION,
                status,
                granted: Params {
                    ring_bytes: 0,
                    buf_size: 0,
                    buf_count: 0,
                },
                region_size: 0,
                reason: reason.to_string(),
            }
        }

        /// Encodes a reply; `reason` is cut to [`REASON_BYTES`] at a character boundary.
        pub fn encode(&self) -> [u8; REPLY_BYTES] {
            let mut r = [0u8; REPLY_BYTES];
            put_u64(&mut r, reply_at::MAGIC, REPLY_MAGIC);
            put_u32(&mut r, reply_at::VERSION, self.version);
            put_u32(&mut r, reply_at::STATUS, self.status);
            put_u64(&mut r, reply_at::RING_BYTES, self.granted.ring_bytes);
            put_u64(&mut r, reply_at::BUF_SIZE, self.granted.buf_size);
            put_u64(&mut r, reply_at::BUF_COUNT, self.granted.buf_count);
            put_u64(&mut r, reply_at::REGION_SIZE, self.region_size);
            let mut n = self.reason.len().min(REASON_BYTES);
            while !self.reason.is_char_boundary(n) {
                n -= 1;
            }
            r[reply_at::REASON..reply_at::REASON + n].copy_from_slice(&self.reason.as_bytes()[..n]);
            r
        }

        /// Checks the magic only: the version and status are the caller's to judge. A reason
        /// that is not UTF-8 is shown with replacement characters.
        pub fn decode(r: &[u8; REPLY_BYTES]) -> Result<Reply, WireError> {
            if get_u64(r, reply_at::MAGIC) != REPLY_MAGIC {
                return Err(WireError::Magic("server reply"));
            }
            Ok(Reply {
                version: get_u32(r, reply_at::VERSION),
                status: get_u32(r, reply_at::STATUS),
                granted: Params {
                    ring_bytes: get_u64(r, reply_at::RING_BYTES),
                    buf_size: get_u64(r, reply_at::BUF_SIZE),
                    buf_count: get_u64(r, reply_at::BUF_COUNT),
                },
                region_size: get_u64(r, reply_at::REGION_SIZE),
                reason: String::from_utf8_lossy(&r[reply_at::REASON..])
                    .trim_end_matches('\0')
                    .to_string(),
            })
        }
    }
}

/// Why bytes from the setup socket are not a message of this contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{0} has the wrong magic")]
    Magic(&'static str),
    #[error("descriptor message says {said} descriptors, {got} arrived")]
    FdCount { said: u32, got: usize },
}

// Little-endian field access at offsets from the `Wire` structs above. The offsets are
// constants asserted to lie inside their buffers, so the slicing cannot fail.
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// The three numbers a channel is built from; everything else is derived.
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

/// Why three parameters do not make a channel. Each names the offending value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("ring size {0} must be a power of two in {MIN_RING_BYTES}..={MAX_RING_BYTES}")]
    RingBytes(u64),
    #[error("buffer size {0} must be a power of two in {MIN_BUF_SIZE}..={MAX_BUF_SIZE}")]
    BufSize(u64),
    #[error("buffer count {0} must be in 1..={MAX_BUF_COUNT}")]
    BufCount(u64),
    #[error("buffer pool of {count} x {size} bytes exceeds {MAX_POOL_BYTES} bytes")]
    PoolBytes { count: u64, size: u64 },
}

impl Layout {
    /// Validates the parameters and computes every offset.
    pub fn new(params: Params) -> Result<Layout, LayoutError> {
        let Params {
            ring_bytes,
            buf_size,
            buf_count,
        } = params;
        if !ring_bytes.is_power_of_two() || !(MIN_RING_BYTES..=MAX_RING_BYTES).contains(&ring_bytes)
        {
            return Err(LayoutError::RingBytes(ring_bytes));
        }
        if !buf_size.is_power_of_two() || !(MIN_BUF_SIZE..=MAX_BUF_SIZE).contains(&buf_size) {
            return Err(LayoutError::BufSize(buf_size));
        }
        if !(1..=MAX_BUF_COUNT).contains(&buf_count) {
            return Err(LayoutError::BufCount(buf_count));
        }
        if buf_size * buf_count > MAX_POOL_BYTES {
            return Err(LayoutError::PoolBytes {
                count: buf_count,
                size: buf_size,
            });
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
        let cases = [
            ((1000, 4096, 1), LayoutError::RingBytes(1000)),
            ((4096, 1000, 1), LayoutError::BufSize(1000)),
            ((4096, 4096, 0), LayoutError::BufCount(0)),
            ((1 << 40, 4096, 1), LayoutError::RingBytes(1 << 40)),
            (
                (4096, 16 << 20, 128),
                LayoutError::PoolBytes {
                    count: 128,
                    size: 16 << 20,
                },
            ),
        ];
        for (p, want) in cases {
            let r = Layout::new(Params {
                ring_bytes: p.0,
                buf_size: p.1,
                buf_count: p.2,
            });
            assert_eq!(r, Err(want), "{p:?}");
        }
        assert_eq!(
            LayoutError::BufCount(0).to_string(),
            "buffer count 0 must be in 1..=4096"
        );
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

    #[test]
    fn descriptor_round_trips_in_the_documented_byte_order() {
        use descriptor::Descriptor;
        let d = Descriptor {
            offset: 0x0102_0304_0506_0708,
            len: 0x1122_3344,
            generation: 0xaabb_ccdd,
        };
        let b = d.encode();
        assert_eq!(&b[..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[8..12], &0x1122_3344u32.to_le_bytes());
        assert_eq!(&b[12..], &0xaabb_ccddu32.to_le_bytes());
        assert_eq!(Descriptor::decode(&b), d);
    }

    #[test]
    fn fd_message_round_trips_and_rejects_garbage() {
        use fd_message::{FdMessage, BYTES, MAX_FDS};
        let m = FdMessage { count: 2, tag: 77 };
        let b = m.encode();
        assert_eq!(&b[..4], b"M2FD");
        assert_eq!(FdMessage::decode(&b, 2), Ok(m));
        // The count must match what the kernel delivered, and be 1..=MAX_FDS.
        assert!(matches!(
            FdMessage::decode(&b, 1),
            Err(WireError::FdCount { said: 2, got: 1 })
        ));
        let none = FdMessage { count: 0, tag: 1 }.encode();
        assert!(FdMessage::decode(&none, 0).is_err());
        let many = FdMessage {
            count: MAX_FDS as u32 + 1,
            tag: 1,
        }
        .encode();
        assert!(FdMessage::decode(&many, MAX_FDS + 1).is_err());
        assert_eq!(
            FdMessage::decode(&[0xab; BYTES], 1),
            Err(WireError::Magic("descriptor message"))
        );
    }

    #[test]
    fn hello_round_trips_and_matches_the_documented_bytes() {
        use handshake::{Hello, HELLO_BYTES};
        let h = Hello {
            version: VERSION,
            params: Params {
                ring_bytes: 16 << 10,
                buf_size: 4096,
                buf_count: 4,
            },
        };
        let b = h.encode();
        // The same bytes a client written from the module docs sends (see the cross-process
        // tests, which build one by hand).
        let mut want = [0u8; HELLO_BYTES];
        want[..8].copy_from_slice(b"SPOSHELO");
        want[8..12].copy_from_slice(&VERSION.to_le_bytes());
        want[16..24].copy_from_slice(&(16u64 << 10).to_le_bytes());
        want[24..32].copy_from_slice(&4096u64.to_le_bytes());
        want[32..40].copy_from_slice(&4u64.to_le_bytes());
        assert_eq!(b, want);
        assert_eq!(Hello::decode(&b), Ok(h));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(Hello::decode(&bad), Err(WireError::Magic("client hello")));
    }

    #[test]
    fn reply_round_trips_and_cuts_reasons_at_a_character() {
        use handshake::{Reply, REASON_BYTES, STATUS_OK, STATUS_REFUSED};
        let p = Params {
            ring_bytes: 65536,
            buf_size: 65536,
            buf_count: 8,
        };
        let ok = Reply::ok(p, 1 << 20);
        let b = ok.encode();
        assert_eq!(&b[..8], b"SPOSWELC");
        assert_eq!(&b[8..12], &VERSION.to_le_bytes());
        assert_eq!(&b[12..16], &STATUS_OK.to_le_bytes());
        assert_eq!(&b[40..48], &(1u64 << 20).to_le_bytes());
        assert_eq!(Reply::decode(&b), Ok(ok));

        let no = Reply::refuse(STATUS_REFUSED, "uid 1000 may not connect");
        assert_eq!(Reply::decode(&no.encode()), Ok(no));

        // 63 ASCII bytes then a two-byte character: only the ASCII fits.
        let long = format!("{}é and more", "x".repeat(REASON_BYTES - 1));
        let got = Reply::decode(&Reply::refuse(STATUS_REFUSED, &long).encode()).unwrap();
        assert_eq!(got.reason, "x".repeat(REASON_BYTES - 1));

        let mut bad = Reply::refuse(STATUS_REFUSED, "").encode();
        bad[7] = 0;
        assert_eq!(Reply::decode(&bad), Err(WireError::Magic("server reply")));
    }
}
