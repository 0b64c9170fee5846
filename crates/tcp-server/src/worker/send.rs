//! The send path: bytes queued by the application (inline, in its buffers, or file ranges)
//! leave through the ring, or synchronously by `sendfile` for large file ranges; send credit
//! goes back to the application as the kernel takes bytes.

use super::*;

/// Segments refused (over a budget) that a session's later `SendFile`s may still name: they
/// fail their connection with the refusal's errno rather than count as protocol violations
/// (the application did nothing wrong). Past this, naming one is a violation again.
pub(super) const MAX_REFUSED_FILES: usize = 1024;

/// What `file_segment` found under a tag.
pub(super) enum FileLookup {
    Found(SessionFile),
    /// Refused over a budget (or too large): the errno to fail the connection with.
    Refused(i32),
    /// Never passed, or not sealed: a protocol violation.
    Unknown,
}

/// File ranges at least this long go out by `sendfile` (by page reference) rather than by a
/// send that copies them; below it the copy is cheaper than the extra system call.
pub(super) const SENDFILE_MIN: usize = 8 * 1024;

/// Chunks a connection may have queued for a `SendFile` to add more. File ranges count
/// against no send window (they hold a segment, not a copy), so this and the `file-ranges`
/// budget (per session, user and server) are what bound them; the other kinds are bounded
/// already (inline bytes by the window and coalescing, buffers by the application's pool,
/// direct-path responses by `direct::SENDQ_LIMIT`). A connection over either fails with
/// ENOBUFS, as a socket whose buffer the application overran.
pub(super) const MAX_QUEUED_CHUNKS: usize = 16384;

/// Synchronous sends one connection may make in a row before others get their turn.
pub(super) const SEND_NOW_ROUNDS: usize = 16;

/// Most bytes one `sendfile` of a file passed by reference (a large one) may move. On a
/// socket whose reader keeps up, one call for a whole large range does not return until the
/// range is sent (a 100 MB call took 57 ms here), holding the worker from every other
/// connection and the socket's lock from the ACKs arriving meanwhile: 1 GiB went at 1.67 GB/s
/// against nginx's 2.6 GB/s, which sends 2 MiB at a time (`sendfile_max_chunk`). Capped, in
/// `splitos-bench http --quick`'s `large` (512 MiB, alternating with nginx, 2-5 runs each):
/// 64 KiB 0.62-0.80x nginx, 128 KiB 0.97-1.25x, 256 KiB 0.91-1.09x, 512 KiB 0.71-0.89x,
/// 1 MiB 0.79-0.93x, 2 MiB 0.74-0.80x: small enough that ACKs are taken between calls, large
/// enough that the calls themselves do not dominate. Cached
/// segments are not capped: for them (at most a chunk, 4 MiB) the cap cost 3x in requests per
/// second with 50 connections fetching 1 MiB files (2.3k against 7.5k), where each call
/// ends at a full socket buffer anyway.
pub(super) const SENDFILE_PLAIN_MAX: usize = 128 << 10;

/// What [`Worker::send_now`] did.
pub(super) enum SendNow {
    /// No large file range near the front: use the ring.
    NotApplicable,
    Sent(usize),
    /// The socket takes nothing more now.
    Full,
    Failed(i32),
}

/// Whether a chunk goes out by `sendfile` rather than a send from memory: large ranges of
/// segments (by page reference), and plain files always (they are not in memory at all).
pub(super) fn by_sendfile(ch: &Chunk) -> bool {
    match ch {
        Chunk::File { off, end, .. } => end - off >= SENDFILE_MIN,
        Chunk::Plain { .. } => true,
        Chunk::Inline { .. } | Chunk::Buf { .. } | Chunk::Direct { .. } => false,
    }
}

/// Points `iov` at the unsent bytes of `chunks`; returns how many entries it filled.
pub(super) fn fill_iov<'a>(
    iov: &mut [libc::iovec],
    chunks: impl Iterator<Item = &'a Chunk>,
) -> usize {
    let mut n = 0;
    for (slot, chunk) in iov.iter_mut().zip(chunks) {
        let (ptr, len) = chunk.span();
        *slot = libc::iovec {
            iov_base: ptr as *mut libc::c_void,
            iov_len: len,
        };
        n += 1;
    }
    n
}

/// Keeps an emptied send buffer for reuse (a bounded number, of bounded size).
pub(super) fn recycle(spare: &mut Vec<Vec<u8>>, mut v: Vec<u8>) {
    if spare.len() < 1024 && v.capacity() <= 64 << 10 {
        v.clear();
        spare.push(v);
    }
}

impl Worker {
    /// The slot of connection `handle` if it belongs to session `si` and may still be written
    /// to; otherwise reports why on that handle (EBADF, or EPIPE after a shutdown or failure).
    pub(super) fn writable(&mut self, si: SessionIx, handle: Handle) -> Option<SlotIx> {
        let Some(slot) = self.owned(si, handle) else {
            self.bad_handle(si, handle);
            return None;
        };
        let errno = match self.conn_mut(slot) {
            None => Errno::BADF,
            Some(c) if c.shutdown_wanted || c.failed => Errno::PIPE,
            Some(c) => {
                c.written = true;
                if let Some(r) = c.recovery.as_mut() {
                    r.sent();
                }
                return Some(slot);
            }
        };
        self.emit(
            si,
            Event::Error {
                handle,
                errno: errno.raw_os_error(),
            },
        );
        None
    }

    /// Takes `n` bytes of `slot`'s send window, or reports the overrun as a violation of `op`
    /// and takes nothing. (The window bounds what the server buffers for a connection.)
    fn charge_window(&mut self, si: SessionIx, slot: SlotIx, n: u64, op: u8) -> bool {
        let Some(c) = self.conn_mut(slot) else {
            return false;
        };
        if c.unsent + n > SEND_WINDOW as u64 {
            let errno = Errno::NOBUFS.raw_os_error();
            self.violation(si, op, errno, "send window exceeded");
            return false;
        }
        c.unsent += n;
        true
    }

    pub(super) fn send_inline(&mut self, si: SessionIx, handle: Handle, data: &[u8]) {
        let Some(slot) = self.writable(si, handle) else {
            return;
        };
        if data.is_empty() {
            // Nothing to send, and an empty chunk would never leave the queue: the kernel
            // "sends" it as 0 bytes, which retires nothing, so it would be re-sent every pass
            // and whatever follows it (a close) would wait forever.
            return;
        }
        if !self.charge_window(si, slot, data.len() as u64, op::SEND) {
            return;
        }
        let mut spare = self.spare.pop();
        let Some(c) = self.conn_mut(slot) else {
            return;
        };
        // Coalesce into the last inline chunk unless the kernel is reading from it (growing it
        // could move its bytes).
        let busy_back = c.send.reads_last_of(c.sendq.len());
        match c.sendq.back_mut() {
            Some(Chunk::Inline { data: tail, .. }) if !busy_back && tail.len() < 64 << 10 => {
                tail.extend_from_slice(data)
            }
            _ => {
                let mut v = spare.take().unwrap_or_default();
                v.extend_from_slice(data);
                c.sendq.push_back(Chunk::Inline { data: v, off: 0 });
            }
        }
        if let Some(v) = spare {
            self.spare.push(v);
        }
        self.want_send(slot);
    }

    pub(super) fn send_buffer(&mut self, si: SessionIx, handle: Handle, rx: RxBuffer) {
        let Some(slot) = self.writable(si, handle) else {
            return;
        };
        if !self.charge_window(si, slot, rx.len() as u64, op::SEND) {
            return;
        }
        let Some(c) = self.conn_mut(slot) else {
            return;
        };
        if !rx.is_empty() {
            c.sendq.push_back(Chunk::Buf { rx, off: 0 });
        }
        self.want_send(slot);
    }

    /// The file the application tagged `file`, taking newly passed descriptors as needed
    /// (they were sent before the request that names them, so they are already here).
    pub(super) fn file_segment(&mut self, si: SessionIx, file: u64) -> FileLookup {
        loop {
            let Some(s) = self.live_session(si) else {
                return FileLookup::Unknown;
            };
            if let Some(f) = s.files.get(&file) {
                return FileLookup::Found(f.clone());
            }
            if let Some(&errno) = s.refused_files.get(&file) {
                return FileLookup::Refused(errno);
            }
            match s.chan.try_recv_fds() {
                Ok(Some((tag, fds))) => self.register_file(si, tag, fds),
                Ok(None) => return FileLookup::Unknown,
                Err(e) => {
                    self.session_failed(si, &e);
                    return FileLookup::Unknown;
                }
            }
        }
    }

    /// Takes every file the application has passed so far (at housekeeping: so that
    /// descriptors do not wait in the channel, uncounted, for a `SendFile` naming them).
    pub(super) fn take_passed_files(&mut self, si: SessionIx) {
        for _ in 0..splitos_m2m::MAX_FDS_PER_MESSAGE * 256 {
            let Some(s) = self.live_session(si) else {
                return;
            };
            match s.chan.try_recv_fds() {
                Ok(Some((tag, fds))) => self.register_file(si, tag, fds),
                Ok(None) => return,
                Err(e) => return self.session_failed(si, &e),
            }
        }
    }

    /// Takes a file the application passed under `tag`, within its budgets: every file counts
    /// (a descriptor); a segment's bytes count too (it is mapped whole), and one larger than
    /// `segment_bytes` is refused, all known from `fstat` before anything is mapped.
    fn register_file(&mut self, si: SessionIx, tag: u64, mut fds: Vec<OwnedFd>) {
        if fds.len() != 1 {
            return self.violation(
                si,
                op::SEND_FILE,
                Errno::INVAL.raw_os_error(),
                "a file message without exactly one descriptor",
            );
        }
        let fd = fds.remove(0);
        let plain = tag & PLAIN_FILE_TAG != 0;
        let size = if plain {
            0 // never mapped: only its descriptor counts
        } else {
            match rustix::fs::fstat(&fd) {
                Ok(st) => st.st_size as u64,
                Err(_) => return, // not a file: unknown, and a violation when named
            }
        };
        if size > self.shared.config.budgets.segment_bytes {
            tracing::debug!(session = si.0, size, "file segment larger than allowed");
            return self.refuse_file(si, tag, Errno::FBIG.raw_os_error());
        }
        if let Err(over) = self.charge(si, Res::Files, 1) {
            let errno = self.over_budget(si, Res::Files, over);
            return self.refuse_file(si, tag, errno);
        }
        if let Err(over) = self.charge(si, Res::FileBytes, size) {
            self.refund(si, Res::Files, 1);
            let errno = self.over_budget(si, Res::FileBytes, over);
            return self.refuse_file(si, tag, errno);
        }
        let got = if plain {
            // A plain file is never mapped (it could shrink under a mapping): it must be a
            // regular file, which `sendfile` reads, and not on FUSE, whose reads another
            // user's daemon could hold forever (this thread would wait with them).
            PlainFile::from_received(fd)
                .ok()
                .map(|p| SessionFile::Plain(Arc::new(p)))
        } else {
            // Only sealed segments are mapped: their bytes cannot change under a send. The
            // size was sealed when fstat read it iff it still is the segment's size now.
            Segment::from_received_sealed(fd)
                .ok()
                .filter(|seg| seg.len() == size)
                .map(|seg| SessionFile::Segment(Arc::new(seg)))
        };
        let Some(f) = got else {
            self.refund(si, Res::Files, 1);
            self.refund(si, Res::FileBytes, size);
            return; // unknown, and a violation when named
        };
        let Some(s) = self.live_session(si) else {
            return;
        };
        s.refused_files.remove(&tag);
        if let Some(old) = s.files.insert(tag, f) {
            self.release_file(si, old);
        }
    }

    fn refuse_file(&mut self, si: SessionIx, tag: u64, errno: i32) {
        let Some(s) = self.live_session(si) else {
            return;
        };
        if let Some(old) = s.files.remove(&tag) {
            self.release_file(si, old);
        }
        let Some(s) = self.live_session(si) else {
            return;
        };
        if s.refused_files.len() < MAX_REFUSED_FILES {
            s.refused_files.insert(tag, errno);
        }
    }

    /// Drops the session's hold on a file. Its budget comes back when no queued send reads it
    /// any more either (see `settle_released_files`): until then it is still open (a segment
    /// still mapped).
    pub(super) fn release_file(&mut self, si: SessionIx, f: SessionFile) {
        if f.last_holder() {
            self.refund(si, Res::Files, 1);
            self.refund(si, Res::FileBytes, f.mapped_bytes());
        } else if let Some(s) = self.session(si) {
            s.releasing.push(f);
        }
    }

    /// Gives back the budget of released files whose last queued send has gone.
    pub(super) fn settle_released_files(&mut self, si: SessionIx) {
        let Some(s) = self.session(si) else { return };
        if s.releasing.is_empty() {
            return;
        }
        let mut freed = (0u64, 0u64);
        s.releasing.retain(|f| {
            let last = f.last_holder();
            if last {
                freed.0 += 1;
                freed.1 += f.mapped_bytes();
            }
            !last
        });
        self.refund(si, Res::Files, freed.0);
        self.refund(si, Res::FileBytes, freed.1);
    }

    pub(super) fn send_file(
        &mut self,
        si: SessionIx,
        handle: Handle,
        file: u64,
        offset: u64,
        len: u64,
    ) {
        let f = match self.file_segment(si, file) {
            FileLookup::Found(f) => f,
            FileLookup::Refused(errno) => {
                // The connection fails, as the send would have: its stream would have a hole.
                if let Some(slot) = self.writable(si, handle) {
                    self.overrun(slot, errno);
                }
                return;
            }
            FileLookup::Unknown => {
                self.violation(
                    si,
                    op::SEND_FILE,
                    Errno::BADF.raw_os_error(),
                    "unknown or unsealed file segment",
                );
                return;
            }
        };
        // A plain file's size may change: a range past its end fails the connection when
        // `sendfile` finds the end, so only the arithmetic is checked here.
        let in_range = offset.checked_add(len).is_some_and(|end| match &f {
            SessionFile::Segment(seg) => end <= seg.len(),
            SessionFile::Plain(_) => end <= i64::MAX as u64,
        });
        if !in_range {
            self.violation(
                si,
                op::SEND_FILE,
                Errno::INVAL.raw_os_error(),
                "file range out of bounds",
            );
            return;
        }
        let Some(slot) = self.writable(si, handle) else {
            return;
        };
        let Some(c) = self.conn_mut(slot) else {
            return;
        };
        if len == 0 {
            return;
        }
        let queued = c.sendq.len();
        // A queued range costs window like bytes do: an application that keeps to its window
        // (the library waits for credit) never meets the caps below.
        if !self.charge_window(si, slot, SEND_FILE_COST as u64, op::SEND_FILE) {
            return;
        }
        if queued >= MAX_QUEUED_CHUNKS {
            tracing::debug!(
                session = si.0,
                slot = slot.0,
                "too many file ranges queued on a connection; failing it"
            );
            self.overrun(slot, Errno::NOBUFS.raw_os_error());
            return;
        }
        if let Err(over) = self.charge(si, Res::FileRanges, 1) {
            let errno = self.over_budget(si, Res::FileRanges, over);
            self.overrun(slot, errno);
            return;
        }
        let Some(c) = self.conn_mut(slot) else {
            return self.refund(si, Res::FileRanges, 1);
        };
        c.file_ranges += 1;
        let (off, end) = (offset as usize, (offset + len) as usize);
        c.sendq.push_back(match f {
            SessionFile::Segment(seg) => Chunk::File {
                seg,
                off,
                end,
                charged: true,
            },
            SessionFile::Plain(file) => Chunk::Plain {
                file,
                off,
                end,
                charged: true,
            },
        });
        self.want_send(slot);
    }

    pub(super) fn start_wanted_sends(&mut self) {
        for slot in std::mem::take(&mut self.send_wanted) {
            if let Some(c) = self.conn_mut(slot) {
                c.send_wanted = false;
            }
            self.start_send(slot);
        }
    }

    /// Defers the send of a connection that got bytes to the end of the pass, so that a head
    /// and the body requested right after it leave in one gathered send.
    pub(super) fn want_send(&mut self, slot: SlotIx) {
        self.ckpt_stale(slot);
        if let Some(c) = self.conn_mut(slot) {
            if !c.send_wanted {
                c.send_wanted = true;
                self.send_wanted.push(slot);
            }
        }
    }

    pub(super) fn start_send(&mut self, slot: SlotIx) {
        if self.exporting(slot) {
            self.try_finish_close(slot);
            return;
        }
        // Large file ranges go out synchronously by `sendfile` (see `send_now`) while the
        // socket takes them; everything else, and whatever is left, through the ring.
        for _ in 0..SEND_NOW_ROUNDS {
            match self.send_now(slot) {
                SendNow::NotApplicable => break,
                SendNow::Sent(n) => self.advance_sent(slot, n),
                SendNow::Full => {
                    self.poll_send(slot);
                    return;
                }
                SendNow::Failed(errno) => {
                    self.send_failed(slot, errno);
                    return;
                }
            }
        }
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let si = sock.session;
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        if c.send.busy() {
            return;
        }
        if c.failed {
            // Failed while a send was in flight (`overrun`): nothing more goes out.
            c.sendq.clear();
        }
        let Some(front) = c.sendq.front() else {
            self.try_shutdown(slot);
            self.try_finish_close(slot);
            return;
        };
        if by_sendfile(front) {
            // `SEND_NOW_ROUNDS` ran out with the socket still taking bytes: go on next pass
            // rather than copy a file range through the ring.
            self.want_send(slot);
            return;
        }
        let tag = Tag {
            op: Op::Send,
            session: si.0,
            socket: slot.0,
        };
        // A gathered send stops before a plain file, which only `sendfile` can send.
        let chunks = c
            .sendq
            .iter()
            .take(MAX_IOV)
            .take_while(|ch| !matches!(ch, Chunk::Plain { .. }))
            .count();
        let r = if chunks == 1 {
            let (ptr, len) = front.span();
            // SAFETY: the bytes belong to the chunk at the front of this connection's queue.
            // It is neither modified nor dropped until this send's completion is reaped
            // (`sent`), and an RxBuffer keeps the application's mapping alive.
            unsafe {
                self.ring
                    .send(sock.fd.as_fd(), ptr, len.min(u32::MAX as usize) as u32, tag)
            }
        } else {
            let msg = c.send.gather(c.sendq.iter().take(chunks));
            // SAFETY: as for a single send, for every chunk named; the iovecs and header live
            // in this connection's boxed `Gather` (inside `InflightSend`), which is not touched
            // or dropped before the completion is reaped (a connection is released only with
            // nothing in flight).
            unsafe { self.ring.sendmsg(sock.fd.as_fd(), msg, tag) }
        };
        match r {
            Ok(()) => {
                c.send.sending(chunks);
                sock.inflight += 1;
            }
            Err(e) => tracing::error!("cannot queue a send: {e}"),
        }
    }

    /// Sends the front of the queue synchronously when a large file range is at or near the
    /// front: `sendfile` hands the segment's pages to the socket by reference, where a send
    /// from the mapping would copy them (the copy was 16% of the server's CPU serving 16 KiB
    /// files). The bytes before the range (a response head) go first with `MSG_MORE`, so head
    /// and body still share segments. Sockets are non-blocking: a full socket answers `Full`
    /// and never sleeps.
    pub(super) fn send_now(&mut self, slot: SlotIx) -> SendNow {
        let Some(sock) = self.sockets[slot].sock.as_ref() else {
            return SendNow::NotApplicable;
        };
        let Kind::Conn(c) = &sock.kind else {
            return SendNow::NotApplicable;
        };
        if c.send.busy() || c.failed {
            return SendNow::NotApplicable;
        }
        let Some(pos) = c.sendq.iter().take(MAX_IOV).position(by_sendfile) else {
            return SendNow::NotApplicable;
        };
        let r = if pos == 0 {
            match c.sendq.front() {
                Some(Chunk::File { seg, off, end, .. }) => {
                    let mut at = *off as u64;
                    rustix::fs::sendfile(&sock.fd, seg.fd(), Some(&mut at), end - off)
                }
                Some(Chunk::Plain { file, off, end, .. }) => {
                    let mut at = *off as u64;
                    let n = (end - off).min(SENDFILE_PLAIN_MAX);
                    match rustix::fs::sendfile(&sock.fd, file.fd(), Some(&mut at), n) {
                        // The end of the file before the end of the range: it shrank. The
                        // client has a promise of more bytes that will never come, so the
                        // connection ends now (never retried: that would spin).
                        Ok(0) => {
                            tracing::debug!("a file sent by reference ended early");
                            let _ = rnet::shutdown(&sock.fd, rnet::Shutdown::Both);
                            return SendNow::Failed(Errno::IO.raw_os_error());
                        }
                        r => r,
                    }
                }
                _ => return SendNow::NotApplicable,
            }
        } else {
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOV];
            let n = fill_iov(&mut iov, c.sendq.iter().take(pos));
            // SAFETY: msghdr is plain old data; all-zero is its empty value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = n;
            // SAFETY: the iovecs name the unsent bytes of chunks this connection's queue
            // owns; nothing changes them during this call, which reads them and returns.
            let r = unsafe {
                libc::sendmsg(
                    std::os::fd::AsRawFd::as_raw_fd(&sock.fd),
                    &msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | libc::MSG_MORE,
                )
            };
            if r < 0 {
                Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO))
            } else {
                Ok(r as usize)
            }
        };
        match r {
            Ok(0) | Err(Errno::AGAIN) => SendNow::Full,
            Ok(n) => SendNow::Sent(n),
            Err(Errno::INTR) => SendNow::Sent(0),
            Err(e) => SendNow::Failed(e.raw_os_error()),
        }
    }

    /// Waits (in the ring) for a full socket to take bytes again; the wait counts as the
    /// connection's send in flight, so closing and cancelling treat it as one.
    pub(super) fn poll_send(&mut self, slot: SlotIx) {
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let tag = Tag {
            op: Op::SendPoll,
            session: sock.session.0,
            socket: slot.0,
        };
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        match self.ring.poll_writable(sock.fd.as_fd(), tag) {
            Ok(()) => {
                c.send.polling();
                sock.inflight += 1;
            }
            Err(e) => tracing::error!("cannot queue a poll: {e}"),
        }
    }

    pub(super) fn sent(&mut self, slot: SlotIx, res: i32) {
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        c.send.finished();
        if c.export.is_some() {
            // Cancelled (or done) for a migration: what was sent is sent, the rest travels.
            if res > 0 {
                self.advance_sent(slot, res as usize);
            }
            self.try_finish_close(slot);
            return;
        }
        if res == -Errno::AGAIN.raw_os_error() {
            // The socket is non-blocking (for `send_now`), and the ring may then give up on a
            // full socket instead of waiting: nothing was sent, so wait and try again.
            self.poll_send(slot);
            return;
        }
        if res < 0 {
            self.send_failed(slot, -res);
            return;
        }
        self.advance_sent(slot, res as usize);
        self.start_send(slot);
    }

    /// Fails a connection's sending — a send the kernel refused, or more queued than the server
    /// holds: its application gets `errno` on it and may write no more; its queue goes as soon
    /// as no send reads it (now, or in `start_send` after the one in flight).
    pub(super) fn overrun(&mut self, slot: SlotIx, errno: i32) {
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let si = sock.session;
        let closing = sock.closing;
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        c.failed = true;
        c.unsent = 0;
        if !c.send.busy() {
            c.sendq.clear();
        }
        // A connection being closed already has no one to tell.
        if !closing {
            let handle = self.handle(slot);
            self.emit(si, Event::Error { handle, errno });
        }
        self.try_finish_close(slot);
    }

    pub(super) fn send_failed(&mut self, slot: SlotIx, errno: i32) {
        tracing::debug!(errno, "send failed");
        self.overrun(slot, errno);
    }

    /// Retires `n` sent bytes from the front of the queue, returning send credit and
    /// resuming a direct connection the full queue had stopped.
    pub(super) fn advance_sent(&mut self, slot: SlotIx, n: usize) {
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let si = sock.session;
        let closing = sock.closing;
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        let mut n = n;
        let sent = n as u64;
        // Only window-counted bytes (inline and buffers) come back as credit.
        let mut credited = 0u64;
        let mut ranges_done = 0u64;
        while n > 0 {
            let Some(front) = c.sendq.front_mut() else {
                break;
            };
            let take = n.min(front.remaining());
            if front.counts_against_window() {
                credited += take as u64;
            }
            match front {
                Chunk::Inline { off, .. }
                | Chunk::Direct { off, .. }
                | Chunk::Buf { off, .. }
                | Chunk::File { off, .. }
                | Chunk::Plain { off, .. } => *off += take,
            }
            n -= take;
            if front.remaining() == 0 {
                match c.sendq.pop_front() {
                    Some(Chunk::Inline { data, .. }) => recycle(&mut self.spare, data),
                    // A range the application queued: its cost comes back as send credit.
                    Some(
                        Chunk::File { charged: true, .. } | Chunk::Plain { charged: true, .. },
                    ) => {
                        c.file_ranges = c.file_ranges.saturating_sub(1);
                        ranges_done += 1;
                        credited += SEND_FILE_COST as u64;
                    }
                    _ => {}
                }
            }
        }
        if c.sendq.is_empty() && self.ckpt.is_some() {
            c.ckpt.last = Some(self.now); // the start of a rest, maybe
        }
        c.unsent = c.unsent.saturating_sub(credited);
        // Send credit goes back in quarter-window steps, not per send: the application needs
        // it only before its window fills, and a Sent per small write would double the events.
        c.unreported += credited;
        let report = if c.unreported >= SEND_WINDOW as u64 / 4 {
            Some(std::mem::take(&mut c.unreported))
        } else {
            None
        };
        let queued = c.sendq.len();
        let unblock = match c.direct.as_mut() {
            Some(d) if d.blocked && queued < SENDQ_LIMIT / 2 => {
                d.blocked = false;
                true
            }
            _ => false,
        };
        if let Some(s) = self.session(si) {
            s.bytes_out += sent;
        }
        self.refund(si, Res::FileRanges, ranges_done);
        if unblock && !closing {
            self.serve_direct(slot);
            self.maybe_arm_recv(slot);
        }
        if let (false, Some(bytes)) = (closing, report) {
            let handle = self.handle(slot);
            self.emit(
                si,
                Event::Sent {
                    handle,
                    bytes: bytes as u32,
                },
            );
        }
    }

    pub(super) fn try_shutdown(&mut self, slot: SlotIx) {
        let Some(sock) = self.sockets[slot].sock.as_mut() else {
            return;
        };
        let Kind::Conn(c) = &mut sock.kind else {
            return;
        };
        if c.may_shut_down_write() {
            c.shutdown_done = true;
            let _ = rnet::shutdown(&sock.fd, rnet::Shutdown::Write);
        }
    }
}
