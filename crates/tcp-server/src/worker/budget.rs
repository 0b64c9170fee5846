//! Budgets on the worker side: charging a session (its own limit, then its user's and the
//! server's, in `crate::budget::Ledger`) and giving back. See `crate::budget`.

use super::*;
use crate::budget::{Over, Res, RESOURCES};

/// A session's own use of every budget (what its user's account also counts for it).
#[derive(Default)]
pub(super) struct Used([u64; RESOURCES]);

impl Used {
    pub(super) fn get(&self, r: Res) -> u64 {
        self.0[r as usize]
    }
}

impl Worker {
    /// Charges `n` of `r` to session `si`, if its own limit, its user's and the server's all
    /// allow it.
    pub(super) fn charge(&mut self, si: SessionIx, r: Res, n: u64) -> Result<(), Over> {
        let Worker {
            sessions, shared, ..
        } = self;
        let Some(s) = sessions.get_mut(si.ix()).and_then(|s| s.as_mut()) else {
            return Err(Over::Session);
        };
        let used = &mut s.used.0[r as usize];
        if used.saturating_add(n) > shared.config.budgets.limit(r).session {
            return Err(Over::Session);
        }
        shared.ledger.take(&s.acct, r, n)?;
        *used += n;
        Ok(())
    }

    /// Charges bytes that have arrived already and must be kept; returns whether session `si`
    /// is now at or over one of its limits for `r` (so the caller stops taking more).
    pub(super) fn charge_arrived(&mut self, si: SessionIx, r: Res, n: u64) -> bool {
        let Worker {
            sessions, shared, ..
        } = self;
        let Some(s) = sessions.get_mut(si.ix()).and_then(|s| s.as_mut()) else {
            return true;
        };
        let used = &mut s.used.0[r as usize];
        *used += n;
        let over_user_or_total = shared.ledger.force(&s.acct, r, n);
        over_user_or_total || *used >= shared.config.budgets.limit(r).session
    }

    /// Whether session `si` may take no more of `r` (its own limit, its user's or the total).
    pub(super) fn budget_full(&self, si: SessionIx, r: Res) -> bool {
        let Some(s) = self.sessions.get(si.ix()).and_then(|s| s.as_ref()) else {
            return true;
        };
        s.used.get(r) >= self.shared.config.budgets.limit(r).session
            || self.shared.ledger.full(&s.acct, r)
    }

    /// Gives back `n` of `r` that session `si` held.
    pub(super) fn refund(&mut self, si: SessionIx, r: Res, n: u64) {
        let Worker {
            sessions, shared, ..
        } = self;
        let Some(s) = sessions.get_mut(si.ix()).and_then(|s| s.as_mut()) else {
            return;
        };
        let used = &mut s.used.0[r as usize];
        let n = n.min(*used);
        *used -= n;
        shared.ledger.give(&s.acct, r, n);
    }

    /// Gives back everything a session still held, and the session itself (when its memory
    /// goes).
    pub(super) fn refund_all(&self, s: &Session) {
        for r in Res::ALL {
            self.shared.ledger.give(&s.acct, r, s.used.get(r));
        }
        self.shared.ledger.give(&s.acct, Res::Sessions, 1);
    }

    /// Logs a refusal over a budget (at debug level: a tenant at its limit must not flood the
    /// log) and returns the errno for it.
    pub(super) fn over_budget(&self, si: SessionIx, r: Res, over: Over) -> i32 {
        tracing::debug!(
            worker = self.id,
            session = si.0,
            "refused: over {over} budget of {}",
            r.name()
        );
        r.errno().raw_os_error()
    }
}
