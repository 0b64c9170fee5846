//! Events to applications: written to the ring, or to the outbox while the ring is full;
//! protocol violations are reported here.

use super::*;

impl Worker {
    /// Answers request `req` of session `si` with `Failed` and the errno it gets.
    pub(super) fn fail_request(&mut self, si: SessionIx, req: u32, errno: i32) {
        self.emit(si, Event::Failed { req, errno });
    }

    pub(super) fn emit(&mut self, si: SessionIx, ev: Event<'_>) {
        self.ev.clear();
        ev.encode(&mut self.ev);
        self.emit_encoded(si);
    }

    /// Sends the event encoded in `self.ev`, queueing it if the ring is full.
    pub(super) fn emit_encoded(&mut self, si: SessionIx) {
        let buf = std::mem::take(&mut self.ev);
        let r = match self.live_session(si) {
            None => Ok(false),
            Some(s) if !s.outbox.is_empty() => {
                s.outbox.push_back(Out::Inline(buf.clone()));
                Ok(true)
            }
            Some(s) => match s.chan.try_send(&buf) {
                Ok(true) => Ok(false),
                Ok(false) => {
                    s.outbox.push_back(Out::Inline(buf.clone()));
                    Ok(true)
                }
                Err(e) => Err(e),
            },
        };
        let queued = buf.len() as u64;
        self.ev = buf;
        if let Ok(true) = r {
            // Queued on the heap: charged (receives stop over the budget, see `received`).
            self.charge_arrived(si, Res::OutboxBytes, queued);
        }
        self.after_emit(si, r.map(|_| ()));
    }

    /// Whether session `si` has queued as many events as it should: over its outbox budget,
    /// or half of `MAX_OUTBOX` events. Receives stop then (back-pressure to the clients, see
    /// `maybe_arm_recv`), long before `MAX_OUTBOX` would drop the session.
    pub(super) fn outbox_full(&self, si: SessionIx) -> bool {
        let Some(s) = self.sessions.get(si.ix()).and_then(|s| s.as_ref()) else {
            return true;
        };
        !s.outbox.is_empty()
            && (s.outbox.len() >= MAX_OUTBOX / 2 || self.budget_full(si, Res::OutboxBytes))
    }

    /// Bytes an outbox entry holds on the heap (a buffer is the application's pool memory).
    fn outbox_bytes(out: &Out) -> u64 {
        match out {
            Out::Inline(b) => b.len() as u64,
            Out::Buffer { .. } => 0,
        }
    }

    /// Empties a session's outbox (its application has gone), giving back its budget.
    pub(super) fn clear_outbox(&mut self, si: SessionIx) {
        let Some(s) = self.session(si) else { return };
        let bytes: u64 = s.outbox.iter().map(Worker::outbox_bytes).sum();
        s.outbox.clear();
        self.refund(si, Res::OutboxBytes, bytes);
    }

    pub(super) fn emit_buffer(
        &mut self,
        si: SessionIx,
        buf: TxBuffer,
        len: usize,
        meta: BufferMeta,
    ) {
        let meta = meta.encode();
        let r = match self.live_session(si) {
            None => Ok(()),
            Some(s) if !s.outbox.is_empty() => {
                s.outbox.push_back(Out::Buffer { buf, len, meta });
                Ok(())
            }
            Some(s) => match s.chan.try_send_buffer_with(buf, len, &meta) {
                Ok(None) => Ok(()),
                Ok(Some(buf)) => {
                    s.outbox.push_back(Out::Buffer { buf, len, meta });
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        self.after_emit(si, r);
    }

    pub(super) fn after_emit(&mut self, si: SessionIx, r: Result<(), M2mError>) {
        if let Err(e) = r {
            self.session_failed(si, &e);
            return;
        }
        let over = self
            .live_session(si)
            .is_some_and(|s| s.outbox.len() > MAX_OUTBOX);
        if over {
            tracing::warn!(
                worker = self.id,
                session = si.0,
                "application stopped reading events; dropping it"
            );
            self.kill_session(si);
        }
    }

    pub(super) fn flush_outbox(&mut self, si: SessionIx) {
        let Some(s) = self.live_session(si) else {
            return;
        };
        if s.outbox.is_empty() {
            return;
        }
        let before: u64 = s.outbox.iter().map(Worker::outbox_bytes).sum();
        self.flush_outbox_entries(si);
        let Some(s) = self.session(si) else { return };
        let after: u64 = s.outbox.iter().map(Worker::outbox_bytes).sum();
        self.refund(si, Res::OutboxBytes, before.saturating_sub(after));
        if !self.budget_waiters.is_empty() && !self.outbox_full(si) {
            self.retry_budget_waiters();
        }
    }

    fn flush_outbox_entries(&mut self, si: SessionIx) {
        let Some(s) = self.live_session(si) else {
            return;
        };
        while let Some(out) = s.outbox.pop_front() {
            let r = match out {
                Out::Inline(bytes) => match s.chan.try_send(&bytes) {
                    Ok(true) => Ok(None),
                    Ok(false) => Ok(Some(Out::Inline(bytes))),
                    Err(e) => Err(e),
                },
                Out::Buffer { buf, len, meta } => {
                    match s.chan.try_send_buffer_with(buf, len, &meta) {
                        Ok(None) => Ok(None),
                        Ok(Some(buf)) => Ok(Some(Out::Buffer { buf, len, meta })),
                        Err(e) => Err(e),
                    }
                }
            };
            match r {
                Ok(None) => {}
                Ok(Some(back)) => {
                    s.outbox.push_front(back);
                    return;
                }
                Err(e) => {
                    self.session_failed(si, &e);
                    return;
                }
            }
        }
    }

    pub(super) fn violation(&mut self, si: SessionIx, op: u8, errno: i32, what: &'static str) {
        let Some(s) = self.live_session(si) else {
            return;
        };
        s.violations += 1;
        let over = s.violations > MAX_VIOLATIONS;
        tracing::debug!(session = si.0, what, "protocol violation");
        self.emit(si, Event::ProtocolError { op, errno });
        if over {
            tracing::warn!(
                worker = self.id,
                session = si.0,
                "too many protocol violations; dropping the session"
            );
            self.kill_session(si);
        }
    }

    /// A request named a handle that is not (or no longer) this session's: a race with a
    /// close the application has not seen yet, or a forgery. Either way it gets EBADF on that
    /// handle and touches nothing.
    pub(super) fn bad_handle(&mut self, si: SessionIx, handle: Handle) {
        self.emit(
            si,
            Event::Error {
                handle,
                errno: Errno::BADF.raw_os_error(),
            },
        );
    }
}
