//! The connection record: the bytes that carry one TCP connection from a socket that was saved
//! to a socket that is restored, on this node or another. This file is the whole contract.
//!
//! Two views, in the style of smoltcp's `wire/` modules:
//! - [`Record`] wraps a byte buffer; [`Record::new_checked`] verifies the magic, the version,
//!   the header length and that every section lies inside the buffer, after which its field
//!   accessors cannot go out of bounds;
//! - [`RecordRepr`] is the parsed, validated meaning ([`RecordRepr::parse`]) and writes itself
//!   back ([`RecordRepr::emit`]). It borrows the byte sections from the buffer.
//!
//! Fixed little-endian, laid out in `mod field`. A record is a header of [`HEADER_LEN`] bytes
//! followed by six byte sections in this order: the kernel's receive queue (bytes received and
//! not yet read), the kernel's send queue (bytes written and not yet acknowledged, the last
//! `unsent_len` of which were never transmitted), and three opaque sections for user space —
//! what the TCP server still had to send, what it held back (e.g. recoverable request bytes),
//! and the bytes the application had received but not answered. Parsing never panics on any
//! input; a hostile record is an error ([`RecordError`]).
//!
//! Sequence numbers are unsigned 32-bit values, compared modulo 2^32 (never as `i32`).

use core::ops::Range;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The first eight bytes of every record.
pub const MAGIC: [u8; 8] = *b"SPOSTCPR";
/// The layout version this build reads and writes.
pub const VERSION: u16 = 1;
/// The largest record this build accepts (header and all sections), so that a lying length
/// cannot make a reader allocate or wait for gigabytes.
pub const MAX_RECORD_LEN: usize = 64 << 20;

/// Where each header field lies, in bytes: each starts where the previous one ends.
mod field {
    use super::Range;

    const fn next(prev: Range<usize>, len: usize) -> Range<usize> {
        prev.end..prev.end + len
    }

    pub const MAGIC: Range<usize> = 0..8;
    pub const VERSION: Range<usize> = next(MAGIC, 2);
    pub const HEADER_LEN: Range<usize> = next(VERSION, 2);
    pub const TOTAL_LEN: Range<usize> = next(HEADER_LEN, 4);
    /// 4 or 6.
    pub const FAMILY: Range<usize> = next(TOTAL_LEN, 1);
    /// The kernel's TCP state number (`TCP_ESTABLISHED` = 1, ...).
    pub const STATE: Range<usize> = next(FAMILY, 1);
    /// [`super::opt`] bits.
    pub const OPTIONS: Range<usize> = next(STATE, 1);
    pub const SND_WSCALE: Range<usize> = next(OPTIONS, 1);
    pub const RCV_WSCALE: Range<usize> = next(SND_WSCALE, 1);
    /// Must be zero.
    pub const RESERVED: Range<usize> = next(RCV_WSCALE, 3);
    pub const MSS: Range<usize> = next(RESERVED, 4);
    pub const LOCAL_PORT: Range<usize> = next(MSS, 2);
    pub const PEER_PORT: Range<usize> = next(LOCAL_PORT, 2);
    /// IPv4 addresses fill the first four bytes; the other twelve must be zero.
    pub const LOCAL_ADDR: Range<usize> = next(PEER_PORT, 16);
    pub const PEER_ADDR: Range<usize> = next(LOCAL_ADDR, 16);
    pub const TSVAL: Range<usize> = next(PEER_ADDR, 4);
    pub const SEND_SEQ: Range<usize> = next(TSVAL, 4);
    pub const RECV_SEQ: Range<usize> = next(SEND_SEQ, 4);
    pub const SND_WL1: Range<usize> = next(RECV_SEQ, 4);
    pub const SND_WND: Range<usize> = next(SND_WL1, 4);
    pub const MAX_WINDOW: Range<usize> = next(SND_WND, 4);
    pub const RCV_WND: Range<usize> = next(MAX_WINDOW, 4);
    pub const RCV_WUP: Range<usize> = next(RCV_WND, 4);
    pub const SAVED_AT_MS: Range<usize> = next(RCV_WUP, 8);
    pub const USER_FLAGS: Range<usize> = next(SAVED_AT_MS, 4);
    pub const RECV_LEN: Range<usize> = next(USER_FLAGS, 4);
    pub const SEND_LEN: Range<usize> = next(RECV_LEN, 4);
    pub const UNSENT_LEN: Range<usize> = next(SEND_LEN, 4);
    pub const SERVER_UNSENT_LEN: Range<usize> = next(UNSENT_LEN, 4);
    pub const SERVER_HELD_LEN: Range<usize> = next(SERVER_UNSENT_LEN, 4);
    pub const APP_UNANSWERED_LEN: Range<usize> = next(SERVER_HELD_LEN, 4);
    pub const END: usize = APP_UNANSWERED_LEN.end;
}

/// Bytes of the fixed header.
pub const HEADER_LEN: usize = field::END;

// The format in numbers: changing one changes the bytes between builds (bump VERSION).
const _: () = {
    assert!(HEADER_LEN == 132);
    assert!(field::LOCAL_ADDR.start == 32);
    assert!(field::SAVED_AT_MS.start == 96);
};

/// Option bits of the `OPTIONS` byte (the kernel's `TCPI_OPT_*` values).
pub mod opt {
    /// Timestamps were negotiated.
    pub const TIMESTAMPS: u8 = 1;
    /// Selective acknowledgements were negotiated.
    pub const SACK: u8 = 2;
    /// Window scaling was negotiated.
    pub const WSCALE: u8 = 4;
    /// Every bit this version knows.
    pub const ALL: u8 = TIMESTAMPS | SACK | WSCALE;
}

/// The largest window scale TCP allows (RFC 7323).
pub const MAX_WSCALE: u8 = 14;

/// The connection states a record can carry. The values are the kernel's TCP state numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TcpState {
    /// Both directions open.
    Established = 1,
    /// We sent our FIN and the peer acknowledged it; the peer may still send.
    FinWait2 = 5,
    /// The peer sent its FIN; we may still send.
    CloseWait = 8,
}

impl TcpState {
    /// The state with kernel number `v`, if a record can carry it.
    pub fn from_u8(v: u8) -> Option<TcpState> {
        match v {
            1 => Some(TcpState::Established),
            5 => Some(TcpState::FinWait2),
            8 => Some(TcpState::CloseWait),
            _ => None,
        }
    }

    /// Whether our FIN was sent (and, in the states carried, acknowledged).
    pub fn fin_sent(self) -> bool {
        self == TcpState::FinWait2
    }

    /// Whether the peer's FIN was received.
    pub fn fin_received(self) -> bool {
        self == TcpState::CloseWait
    }
}

/// The window fields of `TCP_REPAIR_WINDOW`, as the kernel reported them at save.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Window {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

/// What went wrong reading or writing a record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record truncated: {need} bytes needed, {have} present")]
    Truncated { need: usize, have: usize },
    #[error("not a connection record (bad magic)")]
    BadMagic,
    #[error("record version {0} is not supported (this build reads version {VERSION})")]
    Version(u16),
    #[error("header length {0} does not match this version's {HEADER_LEN}")]
    HeaderLen(u16),
    #[error("record length field {field} does not match its sections' total {sections}")]
    TotalLen { field: u64, sections: u64 },
    #[error("record of {0} bytes is larger than the limit of {MAX_RECORD_LEN}")]
    TooLarge(u64),
    #[error("address family {0} is neither 4 nor 6")]
    Family(u8),
    #[error("TCP state {0} cannot be carried in a record (ESTABLISHED, FIN_WAIT2 or CLOSE_WAIT)")]
    State(u8),
    #[error("unknown option bits {0:#04x}")]
    Options(u8),
    #[error("window scale {0} is above {MAX_WSCALE}")]
    WindowScale(u8),
    #[error("a window scale is set without the window-scale option")]
    StrayWindowScale,
    #[error("a timestamp value is set without the timestamp option")]
    StrayTimestamp,
    #[error("reserved bytes are not zero")]
    Reserved,
    #[error("MSS {0} is out of range (1..=65535)")]
    Mss(u32),
    #[error("an IPv4 address has non-zero padding")]
    AddressPadding,
    #[error("local and peer addresses are of different families")]
    MixedFamilies,
    #[error("port 0 in an established connection")]
    PortZero,
    #[error("{unsent} unsent bytes exceed the send queue's {send}")]
    Unsent { unsent: u32, send: u32 },
    #[error("state FIN_WAIT2 has an acknowledged FIN, so its send queue must be empty")]
    FinWithData,
    #[error("buffer of {have} bytes is too small for the record's {need}")]
    BufferTooSmall { need: usize, have: usize },
    #[error("a section of {0} bytes does not fit a record")]
    SectionTooLarge(usize),
}

/// A checked view over the bytes of a record. After [`Record::new_checked`] succeeds, every
/// accessor stays within the buffer.
#[derive(Debug, Clone, Copy)]
pub struct Record<T: AsRef<[u8]>> {
    buffer: T,
}

fn u16_at(b: &[u8], r: Range<usize>) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(r) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

fn u32_at(b: &[u8], r: Range<usize>) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(r) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], r: Range<usize>) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(r) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn u8_at(b: &[u8], at: Range<usize>) -> u8 {
    b.get(at.start).copied().unwrap_or(0)
}

impl<T: AsRef<[u8]>> Record<T> {
    /// Wraps `buffer` without checking it; accessors then return zeros past its end. Use
    /// [`Record::new_checked`] for anything read from outside.
    pub fn new_unchecked(buffer: T) -> Record<T> {
        Record { buffer }
    }

    /// Wraps `buffer` after checking the magic, the version, the header length, the total
    /// length against the sections and the buffer (trailing bytes are refused too).
    pub fn new_checked(buffer: T) -> Result<Record<T>, RecordError> {
        let r = Record { buffer };
        r.check_len()?;
        Ok(r)
    }

    /// The checks of [`Record::new_checked`].
    pub fn check_len(&self) -> Result<(), RecordError> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(RecordError::Truncated {
                need: HEADER_LEN,
                have: b.len(),
            });
        }
        if b.get(field::MAGIC) != Some(&MAGIC[..]) {
            return Err(RecordError::BadMagic);
        }
        if self.version() != VERSION {
            return Err(RecordError::Version(self.version()));
        }
        if usize::from(self.header_len()) != HEADER_LEN {
            return Err(RecordError::HeaderLen(self.header_len()));
        }
        let sections: u64 = HEADER_LEN as u64
            + self
                .section_lens()
                .iter()
                .map(|&l| u64::from(l))
                .sum::<u64>();
        let total = u64::from(self.total_len());
        if total != sections {
            return Err(RecordError::TotalLen {
                field: total,
                sections,
            });
        }
        if total > MAX_RECORD_LEN as u64 {
            return Err(RecordError::TooLarge(total));
        }
        // `total` ≤ MAX_RECORD_LEN, so it fits a usize.
        let total = total as usize;
        if b.len() != total {
            return Err(RecordError::Truncated {
                need: total,
                have: b.len(),
            });
        }
        Ok(())
    }

    /// The wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    pub fn version(&self) -> u16 {
        u16_at(self.b(), field::VERSION)
    }
    pub fn header_len(&self) -> u16 {
        u16_at(self.b(), field::HEADER_LEN)
    }
    pub fn total_len(&self) -> u32 {
        u32_at(self.b(), field::TOTAL_LEN)
    }
    pub fn family(&self) -> u8 {
        u8_at(self.b(), field::FAMILY)
    }
    pub fn state(&self) -> u8 {
        u8_at(self.b(), field::STATE)
    }
    pub fn options(&self) -> u8 {
        u8_at(self.b(), field::OPTIONS)
    }
    pub fn snd_wscale(&self) -> u8 {
        u8_at(self.b(), field::SND_WSCALE)
    }
    pub fn rcv_wscale(&self) -> u8 {
        u8_at(self.b(), field::RCV_WSCALE)
    }
    pub fn reserved(&self) -> [u8; 3] {
        let mut r = [0u8; 3];
        if let Some(s) = self.b().get(field::RESERVED) {
            r.copy_from_slice(s);
        }
        r
    }
    pub fn mss(&self) -> u32 {
        u32_at(self.b(), field::MSS)
    }
    pub fn local_port(&self) -> u16 {
        u16_at(self.b(), field::LOCAL_PORT)
    }
    pub fn peer_port(&self) -> u16 {
        u16_at(self.b(), field::PEER_PORT)
    }
    pub fn local_addr_bytes(&self) -> [u8; 16] {
        let mut r = [0u8; 16];
        if let Some(s) = self.b().get(field::LOCAL_ADDR) {
            r.copy_from_slice(s);
        }
        r
    }
    pub fn peer_addr_bytes(&self) -> [u8; 16] {
        let mut r = [0u8; 16];
        if let Some(s) = self.b().get(field::PEER_ADDR) {
            r.copy_from_slice(s);
        }
        r
    }
    pub fn tsval(&self) -> u32 {
        u32_at(self.b(), field::TSVAL)
    }
    pub fn send_seq(&self) -> u32 {
        u32_at(self.b(), field::SEND_SEQ)
    }
    pub fn recv_seq(&self) -> u32 {
        u32_at(self.b(), field::RECV_SEQ)
    }
    pub fn window(&self) -> Window {
        let b = self.b();
        Window {
            snd_wl1: u32_at(b, field::SND_WL1),
            snd_wnd: u32_at(b, field::SND_WND),
            max_window: u32_at(b, field::MAX_WINDOW),
            rcv_wnd: u32_at(b, field::RCV_WND),
            rcv_wup: u32_at(b, field::RCV_WUP),
        }
    }
    pub fn saved_at_ms(&self) -> u64 {
        u64_at(self.b(), field::SAVED_AT_MS)
    }
    pub fn user_flags(&self) -> u32 {
        u32_at(self.b(), field::USER_FLAGS)
    }
    pub fn unsent_len(&self) -> u32 {
        u32_at(self.b(), field::UNSENT_LEN)
    }

    /// The lengths of the six byte sections, in their order in the record.
    fn section_lens(&self) -> [u32; 6] {
        let b = self.b();
        [
            u32_at(b, field::RECV_LEN),
            u32_at(b, field::SEND_LEN),
            u32_at(b, field::SERVER_UNSENT_LEN),
            u32_at(b, field::SERVER_HELD_LEN),
            u32_at(b, field::APP_UNANSWERED_LEN),
            0,
        ]
    }

    /// Section `i` (in record order); empty if the buffer is shorter (only possible unchecked).
    fn section(&self, i: usize) -> &[u8] {
        section_of(self.b(), &self.section_lens(), i)
    }

    /// The kernel receive queue: received, not yet read by the application.
    pub fn recv_queue(&self) -> &[u8] {
        self.section(0)
    }
    /// The kernel send queue: written, not yet acknowledged (its tail never sent).
    pub fn send_queue(&self) -> &[u8] {
        self.section(1)
    }
    /// Bytes the TCP server had accepted from the application but not yet written.
    pub fn server_unsent(&self) -> &[u8] {
        self.section(2)
    }
    /// Bytes the TCP server held for the connection (e.g. a recoverable request).
    pub fn server_held(&self) -> &[u8] {
        self.section(3)
    }
    /// Bytes the application had received and not yet answered.
    pub fn app_unanswered(&self) -> &[u8] {
        self.section(4)
    }
}

fn section_of<'a>(b: &'a [u8], lens: &[u32; 6], i: usize) -> &'a [u8] {
    let start: usize = HEADER_LEN + lens[..i.min(6)].iter().map(|&l| l as usize).sum::<usize>();
    let len = lens.get(i).copied().unwrap_or(0) as usize;
    b.get(start..start.saturating_add(len)).unwrap_or(&[])
}

impl<'a> Record<&'a [u8]> {
    /// The five byte sections, borrowed for the buffer's lifetime.
    fn sections_for_buffer(&self) -> [&'a [u8]; 5] {
        let lens = self.section_lens();
        let b: &'a [u8] = self.buffer;
        [0, 1, 2, 3, 4].map(|i| section_of(b, &lens, i))
    }
}

/// A connection, as a record says it. Byte sections borrow from the record's buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordRepr<'a> {
    /// Our end: on a cluster node, the virtual IP and the service port.
    pub local: SocketAddr,
    /// The client.
    pub peer: SocketAddr,
    pub state: TcpState,
    /// Selective acknowledgements negotiated.
    pub sack: bool,
    /// Window scales (ours for sending, ours for receiving), if negotiated.
    pub wscale: Option<(u8, u8)>,
    /// The timestamp value (tsval) the socket would have sent at save, if timestamps were
    /// negotiated. A restore continues from it (plus the time the record spent in transit).
    pub tsval: Option<u32>,
    /// The MSS clamp.
    pub mss: u16,
    /// Sequence number of the first byte of the send queue (the oldest unacknowledged byte).
    /// A FIN we sent follows the queue's data.
    pub send_seq: u32,
    /// Sequence number of the first byte of the receive queue (the next byte the application
    /// reads). A FIN the peer sent follows the queue's data.
    pub recv_seq: u32,
    pub window: Window,
    /// Milliseconds since the Unix epoch when the connection was saved.
    pub saved_at_ms: u64,
    /// Opaque to this crate: the TCP server's flags for the connection.
    pub user_flags: u32,
    pub recv_queue: &'a [u8],
    pub send_queue: &'a [u8],
    /// How many bytes at the end of `send_queue` were never transmitted.
    pub unsent_len: u32,
    pub server_unsent: &'a [u8],
    pub server_held: &'a [u8],
    pub app_unanswered: &'a [u8],
}

fn addr_from(family: u8, bytes: [u8; 16], port: u16) -> Result<SocketAddr, RecordError> {
    match family {
        4 => {
            if bytes[4..].iter().any(|&b| b != 0) {
                return Err(RecordError::AddressPadding);
            }
            let ip = Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]);
            Ok(SocketAddr::new(IpAddr::V4(ip), port))
        }
        6 => Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(bytes)), port)),
        f => Err(RecordError::Family(f)),
    }
}

fn addr_bytes(a: &SocketAddr) -> [u8; 16] {
    let mut r = [0u8; 16];
    match a.ip() {
        IpAddr::V4(v4) => r[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => r = v6.octets(),
    }
    r
}

fn put(buf: &mut [u8], r: Range<usize>, bytes: &[u8]) {
    if let Some(s) = buf.get_mut(r) {
        s.copy_from_slice(bytes);
    }
}

impl<'a> RecordRepr<'a> {
    /// Parses and validates a checked record.
    pub fn parse(record: &Record<&'a [u8]>) -> Result<RecordRepr<'a>, RecordError> {
        record.check_len()?;
        let family = record.family();
        let state = TcpState::from_u8(record.state()).ok_or(RecordError::State(record.state()))?;
        let options = record.options();
        if options & !opt::ALL != 0 {
            return Err(RecordError::Options(options));
        }
        let (sw, rw) = (record.snd_wscale(), record.rcv_wscale());
        let wscale = if options & opt::WSCALE != 0 {
            for w in [sw, rw] {
                if w > MAX_WSCALE {
                    return Err(RecordError::WindowScale(w));
                }
            }
            Some((sw, rw))
        } else {
            if sw != 0 || rw != 0 {
                return Err(RecordError::StrayWindowScale);
            }
            None
        };
        let tsval = if options & opt::TIMESTAMPS != 0 {
            Some(record.tsval())
        } else {
            if record.tsval() != 0 {
                return Err(RecordError::StrayTimestamp);
            }
            None
        };
        if record.reserved() != [0; 3] {
            return Err(RecordError::Reserved);
        }
        let mss = u16::try_from(record.mss())
            .ok()
            .filter(|&m| m > 0)
            .ok_or(RecordError::Mss(record.mss()))?;
        let local = addr_from(family, record.local_addr_bytes(), record.local_port())?;
        let peer = addr_from(family, record.peer_addr_bytes(), record.peer_port())?;
        if local.port() == 0 || peer.port() == 0 {
            return Err(RecordError::PortZero);
        }
        let [recv_queue, send_queue, server_unsent, server_held, app_unanswered] =
            record.sections_for_buffer();
        let unsent_len = record.unsent_len();
        let send_len = send_queue.len() as u32;
        if unsent_len > send_len {
            return Err(RecordError::Unsent {
                unsent: unsent_len,
                send: send_len,
            });
        }
        if state.fin_sent() && send_len != 0 {
            return Err(RecordError::FinWithData);
        }
        Ok(RecordRepr {
            local,
            peer,
            state,
            sack: options & opt::SACK != 0,
            wscale,
            tsval,
            mss,
            send_seq: record.send_seq(),
            recv_seq: record.recv_seq(),
            window: record.window(),
            saved_at_ms: record.saved_at_ms(),
            user_flags: record.user_flags(),
            recv_queue,
            send_queue,
            unsent_len,
            server_unsent,
            server_held,
            app_unanswered,
        })
    }

    /// Checks what `parse` would refuse, for a repr built by hand or by `save`.
    pub fn validate(&self) -> Result<(), RecordError> {
        if self.local.is_ipv4() != self.peer.is_ipv4() {
            return Err(RecordError::MixedFamilies);
        }
        if self.local.port() == 0 || self.peer.port() == 0 {
            return Err(RecordError::PortZero);
        }
        if let Some((s, r)) = self.wscale {
            for w in [s, r] {
                if w > MAX_WSCALE {
                    return Err(RecordError::WindowScale(w));
                }
            }
        }
        if self.mss == 0 {
            return Err(RecordError::Mss(0));
        }
        for s in self.sections() {
            if s.len() > MAX_RECORD_LEN {
                return Err(RecordError::SectionTooLarge(s.len()));
            }
        }
        let total = self.buffer_len();
        if total > MAX_RECORD_LEN {
            return Err(RecordError::TooLarge(total as u64));
        }
        if self.unsent_len as usize > self.send_queue.len() {
            return Err(RecordError::Unsent {
                unsent: self.unsent_len,
                send: self.send_queue.len() as u32,
            });
        }
        if self.state.fin_sent() && !self.send_queue.is_empty() {
            return Err(RecordError::FinWithData);
        }
        Ok(())
    }

    fn sections(&self) -> [&'a [u8]; 5] {
        [
            self.recv_queue,
            self.send_queue,
            self.server_unsent,
            self.server_held,
            self.app_unanswered,
        ]
    }

    /// Bytes [`RecordRepr::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN
            + self
                .sections()
                .iter()
                .map(|s| s.len())
                .fold(0usize, usize::saturating_add)
    }

    /// Writes the record into the start of `buf` and returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, RecordError> {
        self.validate()?;
        let total = self.buffer_len();
        let have = buf.len();
        let buf = buf
            .get_mut(..total)
            .ok_or(RecordError::BufferTooSmall { need: total, have })?;
        let mut options = 0u8;
        if self.tsval.is_some() {
            options |= opt::TIMESTAMPS;
        }
        if self.sack {
            options |= opt::SACK;
        }
        if self.wscale.is_some() {
            options |= opt::WSCALE;
        }
        let (sw, rw) = self.wscale.unwrap_or((0, 0));
        put(buf, field::MAGIC, &MAGIC);
        put(buf, field::VERSION, &VERSION.to_le_bytes());
        put(buf, field::HEADER_LEN, &(HEADER_LEN as u16).to_le_bytes());
        put(buf, field::TOTAL_LEN, &(total as u32).to_le_bytes());
        let family = if self.local.is_ipv4() { 4u8 } else { 6 };
        put(buf, field::FAMILY, &[family]);
        put(buf, field::STATE, &[self.state as u8]);
        put(buf, field::OPTIONS, &[options]);
        put(buf, field::SND_WSCALE, &[sw]);
        put(buf, field::RCV_WSCALE, &[rw]);
        put(buf, field::RESERVED, &[0; 3]);
        put(buf, field::MSS, &u32::from(self.mss).to_le_bytes());
        put(buf, field::LOCAL_PORT, &self.local.port().to_le_bytes());
        put(buf, field::PEER_PORT, &self.peer.port().to_le_bytes());
        put(buf, field::LOCAL_ADDR, &addr_bytes(&self.local));
        put(buf, field::PEER_ADDR, &addr_bytes(&self.peer));
        put(buf, field::TSVAL, &self.tsval.unwrap_or(0).to_le_bytes());
        put(buf, field::SEND_SEQ, &self.send_seq.to_le_bytes());
        put(buf, field::RECV_SEQ, &self.recv_seq.to_le_bytes());
        let w = &self.window;
        put(buf, field::SND_WL1, &w.snd_wl1.to_le_bytes());
        put(buf, field::SND_WND, &w.snd_wnd.to_le_bytes());
        put(buf, field::MAX_WINDOW, &w.max_window.to_le_bytes());
        put(buf, field::RCV_WND, &w.rcv_wnd.to_le_bytes());
        put(buf, field::RCV_WUP, &w.rcv_wup.to_le_bytes());
        put(buf, field::SAVED_AT_MS, &self.saved_at_ms.to_le_bytes());
        put(buf, field::USER_FLAGS, &self.user_flags.to_le_bytes());
        let lens = [
            (field::RECV_LEN, self.recv_queue.len()),
            (field::SEND_LEN, self.send_queue.len()),
            (field::SERVER_UNSENT_LEN, self.server_unsent.len()),
            (field::SERVER_HELD_LEN, self.server_held.len()),
            (field::APP_UNANSWERED_LEN, self.app_unanswered.len()),
        ];
        for (r, l) in lens {
            put(buf, r, &(l as u32).to_le_bytes());
        }
        put(buf, field::UNSENT_LEN, &self.unsent_len.to_le_bytes());
        let mut at = HEADER_LEN;
        for s in self.sections() {
            put(buf, at..at + s.len(), s);
            at += s.len();
        }
        Ok(total)
    }

    /// The record as a new byte vector.
    pub fn to_vec(&self) -> Result<Vec<u8>, RecordError> {
        self.validate()?;
        let mut v = vec![0u8; self.buffer_len()];
        self.emit(&mut v)?;
        Ok(v)
    }
}

/// Parses `bytes` as a record in one step.
pub fn parse(bytes: &[u8]) -> Result<RecordRepr<'_>, RecordError> {
    RecordRepr::parse(&Record::new_checked(bytes)?)
}

#[cfg(test)]
mod tests;
