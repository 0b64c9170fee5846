//! Budgets: what one session, one user (uid) and the whole server may make the TCP server
//! hold.
//!
//! The server is shared: every tenant's sockets, queued bytes and mapped segments live in its
//! one process. Each thing a tenant can make it hold has three limits ([`Limit`]): per session,
//! per user (across all of that user's sessions, and what outlives them: parked listeners and
//! handed-off connections), and for the whole server. A request over any of them fails for
//! that tenant alone, with an errno that says so (EMFILE for counts, ENOBUFS for bytes, EFBIG
//! for one segment too large), or, for bytes that arrive from the network (held for a paused
//! connection, queued for an application that reads its events slowly), reading stops until
//! there is room again.
//!
//! Descriptors are the scarcest: every connection, listener, parked listener, handed-off
//! connection and file segment is one, and each session holds [`FDS_PER_SESSION`]. The totals
//! of those budgets together must fit the process's descriptor limit ([`Budgets::fd_need`]):
//! the server raises its soft limit to that at start, or refuses to start. So a tenant that
//! reaches a budget gets EMFILE, and the process itself never does.
//!
//! Accounting: the per-user and total counts are shared by all workers ([`Ledger`], atomics);
//! a session's own counts are its worker's. Each resource is charged where it is created and
//! given back where it is released.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the budgets cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Res {
    Sessions = 0,
    Conns,
    Listeners,
    Parked,
    Handed,
    HandedBytes,
    Files,
    FileBytes,
    HeldBytes,
    OutboxBytes,
    FileRanges,
}

pub(crate) const RESOURCES: usize = 11;

impl Res {
    pub(crate) const ALL: [Res; RESOURCES] = [
        Res::Sessions,
        Res::Conns,
        Res::Listeners,
        Res::Parked,
        Res::Handed,
        Res::HandedBytes,
        Res::Files,
        Res::FileBytes,
        Res::HeldBytes,
        Res::OutboxBytes,
        Res::FileRanges,
    ];

    /// The name used in `--limit` and in messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Res::Sessions => "sessions",
            Res::Conns => "conns",
            Res::Listeners => "listeners",
            Res::Parked => "parked",
            Res::Handed => "handed",
            Res::HandedBytes => "handed-bytes",
            Res::Files => "files",
            Res::FileBytes => "file-bytes",
            Res::HeldBytes => "held-bytes",
            Res::OutboxBytes => "outbox-bytes",
            Res::FileRanges => "file-ranges",
        }
    }

    /// Whether a session has a limit of its own for this (what outlives sessions, parked
    /// listeners and handed-off connections, is counted per user only).
    pub(crate) fn per_session(self) -> bool {
        !matches!(
            self,
            Res::Sessions | Res::Parked | Res::Handed | Res::HandedBytes
        )
    }

    /// The errno a request over this budget fails with.
    pub(crate) fn errno(self) -> rustix::io::Errno {
        match self {
            Res::HandedBytes
            | Res::FileBytes
            | Res::HeldBytes
            | Res::OutboxBytes
            | Res::FileRanges => rustix::io::Errno::NOBUFS,
            _ => rustix::io::Errno::MFILE,
        }
    }
}

/// Descriptors a session holds itself (its channel: socket, two doorbells, wait set).
pub const FDS_PER_SESSION: u64 = 4;
/// Descriptors kept free of every budget: the control socket, eventfds, the io_uring, the
/// statistics file, handshakes in progress, the file-server readers of direct-path routes.
pub const FD_RESERVE: u64 = 256;

/// The three limits of one resource. `user: None` means "as the server decides at start":
/// the total when only this user can reach the control socket (mode 0600 or 0700), a quarter
/// of it when the socket is open to others, so that no one user can take everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub session: u64,
    pub user: Option<u64>,
    pub total: u64,
}

impl Limit {
    const fn new(session: u64, total: u64) -> Limit {
        Limit {
            session,
            user: None,
            total,
        }
    }

    /// The per-user limit in force.
    pub fn user_limit(&self, shared_socket: bool) -> u64 {
        match self.user {
            Some(u) => u,
            None if shared_socket => (self.total / 4).max(1),
            None => self.total,
        }
    }
}

/// Every budget of the server (see the module documentation). What has no per-session limit
/// (sessions, parked listeners, handed-off connections and their bytes) ignores `session`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// Application sessions (channels).
    pub sessions: Limit,
    /// Connections, accepted and outbound (each a descriptor).
    pub conns: Limit,
    /// Listening sockets (each a descriptor).
    pub listeners: Limit,
    /// Persistent listeners parked for a successor (per session: at its hand-off).
    pub parked: Limit,
    /// Connections handed off and waiting for their next owner.
    pub handed: Limit,
    /// Unprocessed bytes those connections carry.
    pub handed_bytes: Limit,
    /// File segments passed for `SendFile` and kept mapped (each a descriptor).
    pub files: Limit,
    /// Bytes of those segments (address space: they are mapped whole).
    pub file_bytes: Limit,
    /// Largest single segment accepted.
    pub segment_bytes: u64,
    /// Received bytes held for paused connections.
    pub held_bytes: Limit,
    /// Event bytes queued for applications whose event ring is full.
    pub outbox_bytes: Limit,
    /// `SendFile` ranges queued on connections and not yet sent (each a queue entry on the
    /// heap: they count against no send window).
    pub file_ranges: Limit,
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

impl Budgets {
    /// The defaults when `fds` descriptors may be open (the hard limit): the full defaults if
    /// they fit, else every descriptor budget scaled down alike so that they do.
    pub fn for_descriptors(fds: u64) -> Budgets {
        let full = Budgets::full();
        let need = full.fd_need();
        if fds >= need {
            return full;
        }
        let room = fds.saturating_sub(FD_RESERVE);
        let scale = |v: u64, floor: u64| (v * room / (need - FD_RESERVE)).max(floor);
        let mut b = full;
        b.sessions.total = scale(b.sessions.total, 4);
        b.conns.total = scale(b.conns.total, 16);
        b.listeners.total = scale(b.listeners.total, 4);
        b.parked.total = scale(b.parked.total, 1);
        b.handed.total = scale(b.handed.total, 1);
        b.files.total = scale(b.files.total, 4);
        b
    }

    /// The defaults with descriptors to spare.
    fn full() -> Budgets {
        Budgets {
            sessions: Limit::new(u64::MAX, 1024),
            conns: Limit::new(65536, 16384),
            listeners: Limit::new(256, 1024),
            parked: Limit::new(u64::MAX, 256),
            handed: Limit::new(u64::MAX, 1024),
            handed_bytes: Limit::new(u64::MAX, 256 * MIB),
            files: Limit::new(1024, 4096),
            file_bytes: Limit::new(16 * GIB, 256 * GIB),
            segment_bytes: GIB,
            held_bytes: Limit::new(16 * MIB, 256 * MIB),
            outbox_bytes: Limit::new(16 * MIB, 256 * MIB),
            file_ranges: Limit::new(65536, 1 << 20),
        }
    }

    /// Descriptors the totals allow the server to hold, with the reserve.
    pub fn fd_need(&self) -> u64 {
        self.conns.total
            + self.listeners.total
            + self.parked.total
            + self.handed.total
            + self.files.total
            + FDS_PER_SESSION * self.sessions.total
            + FD_RESERVE
    }

    pub(crate) fn limit(&self, r: Res) -> &Limit {
        match r {
            Res::Sessions => &self.sessions,
            Res::Conns => &self.conns,
            Res::Listeners => &self.listeners,
            Res::Parked => &self.parked,
            Res::Handed => &self.handed,
            Res::HandedBytes => &self.handed_bytes,
            Res::Files => &self.files,
            Res::FileBytes => &self.file_bytes,
            Res::HeldBytes => &self.held_bytes,
            Res::OutboxBytes => &self.outbox_bytes,
            Res::FileRanges => &self.file_ranges,
        }
    }

    fn limit_mut(&mut self, r: Res) -> &mut Limit {
        match r {
            Res::Sessions => &mut self.sessions,
            Res::Conns => &mut self.conns,
            Res::Listeners => &mut self.listeners,
            Res::Parked => &mut self.parked,
            Res::Handed => &mut self.handed,
            Res::HandedBytes => &mut self.handed_bytes,
            Res::Files => &mut self.files,
            Res::FileBytes => &mut self.file_bytes,
            Res::HeldBytes => &mut self.held_bytes,
            Res::OutboxBytes => &mut self.outbox_bytes,
            Res::FileRanges => &mut self.file_ranges,
        }
    }

    /// Applies one `--limit` setting.
    pub fn set(&mut self, s: &LimitSetting) {
        match s.scope {
            Scope::Segment => self.segment_bytes = s.value,
            Scope::Session(r) => self.limit_mut(r).session = s.value,
            Scope::User(r) => self.limit_mut(r).user = Some(s.value),
            Scope::Total(r) => self.limit_mut(r).total = s.value,
        }
    }

    /// A table of every budget, for `--help` and logs.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for r in Res::ALL {
            let l = self.limit(r);
            let user = match l.user {
                Some(u) => u.to_string(),
                None => "auto".into(),
            };
            let session = if r.per_session() {
                l.session.to_string()
            } else {
                "-".to_string()
            };
            out += &format!(
                "{:<13} session {session:<12} user {user:<12} total {}\n",
                r.name(),
                l.total
            );
        }
        out += &format!("segment-bytes {}\n", self.segment_bytes);
        out
    }
}

impl Default for Budgets {
    /// Sized to this process's hard descriptor limit (see [`Budgets::for_descriptors`]).
    fn default() -> Budgets {
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .maximum
            .unwrap_or(u64::MAX);
        Budgets::for_descriptors(hard)
    }
}

/// What a `--limit` setting names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    Session(Res),
    User(Res),
    Total(Res),
    Segment,
}

/// One `--limit` setting: `session.NAME=N`, `user.NAME=N`, `total.NAME=N` or
/// `segment-bytes=N`, where NAME is a resource (`conns`, `file-bytes`, ...) and N a number,
/// optionally with a binary suffix K, M, G or T.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitSetting {
    scope: Scope,
    value: u64,
}

/// The names `--limit` accepts, for help texts.
pub const LIMIT_NAMES: &str = "sessions, conns, listeners, parked, handed, handed-bytes, files, \
     file-bytes, held-bytes, outbox-bytes, file-ranges";

impl FromStr for LimitSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<LimitSetting, String> {
        let bad = || {
            format!(
                "invalid limit {s:?}: expected session.NAME=N, user.NAME=N, total.NAME=N or \
                 segment-bytes=N, NAME one of {LIMIT_NAMES}, N a number (suffix K, M, G, T)"
            )
        };
        let (key, value) = s.split_once('=').ok_or_else(bad)?;
        let value = parse_size(value.trim()).ok_or_else(bad)?;
        let scope = if key == "segment-bytes" {
            Scope::Segment
        } else {
            let (scope, name) = key.split_once('.').ok_or_else(bad)?;
            let r = Res::ALL
                .into_iter()
                .find(|r| r.name() == name)
                .ok_or_else(bad)?;
            match scope {
                "session" if r.per_session() => Scope::Session(r),
                "user" => Scope::User(r),
                "total" => Scope::Total(r),
                _ => return Err(bad()),
            }
        };
        Ok(LimitSetting { scope, value })
    }
}

impl fmt::Display for LimitSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scope {
            Scope::Segment => write!(f, "segment-bytes={}", self.value),
            Scope::Session(r) => write!(f, "session.{}={}", r.name(), self.value),
            Scope::User(r) => write!(f, "user.{}={}", r.name(), self.value),
            Scope::Total(r) => write!(f, "total.{}={}", r.name(), self.value),
        }
    }
}

fn parse_size(v: &str) -> Option<u64> {
    let (digits, shift) = match v.as_bytes().last()? {
        b'K' | b'k' => (&v[..v.len() - 1], 10),
        b'M' | b'm' => (&v[..v.len() - 1], 20),
        b'G' | b'g' => (&v[..v.len() - 1], 30),
        b'T' | b't' => (&v[..v.len() - 1], 40),
        _ => (v, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// Which limit a charge ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Over {
    Session,
    User,
    Total,
}

impl fmt::Display for Over {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Over::Session => "its session's",
            Over::User => "its user's",
            Over::Total => "the server's",
        })
    }
}

/// One user's use of every resource, shared by the workers (and by what outlives sessions:
/// parked listeners and handed-off connections carry their owner's account).
pub(crate) struct Account {
    pub(crate) uid: u32,
    used: [AtomicU64; RESOURCES],
}

impl Account {
    #[cfg(test)]
    pub(crate) fn used(&self, r: Res) -> u64 {
        self.used[r as usize].load(Ordering::Acquire)
    }
}

/// The shared side of the budgets: per-user and total use, and the limits in force.
pub(crate) struct Ledger {
    user_limits: [u64; RESOURCES],
    total_limits: [u64; RESOURCES],
    total: [AtomicU64; RESOURCES],
    accounts: Mutex<HashMap<u32, Arc<Account>>>,
}

/// Adds `n` to `counter` if the result stays within `limit`.
fn try_add(counter: &AtomicU64, n: u64, limit: u64) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            v.checked_add(n).filter(|&t| t <= limit)
        })
        .is_ok()
}

fn sub(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        Some(v.saturating_sub(n))
    });
}

impl Ledger {
    pub(crate) fn new(budgets: &Budgets, shared_socket: bool) -> Ledger {
        let mut user_limits = [0; RESOURCES];
        let mut total_limits = [0; RESOURCES];
        for r in Res::ALL {
            let l = budgets.limit(r);
            user_limits[r as usize] = l.user_limit(shared_socket);
            total_limits[r as usize] = l.total;
        }
        Ledger {
            user_limits,
            total_limits,
            total: Default::default(),
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// The account of user `uid` (created on first use).
    pub(crate) fn account(&self, uid: u32) -> Arc<Account> {
        let mut m = match self.accounts.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        m.entry(uid)
            .or_insert_with(|| {
                Arc::new(Account {
                    uid,
                    used: Default::default(),
                })
            })
            .clone()
    }

    /// Forgets accounts nobody holds and that hold nothing.
    pub(crate) fn prune(&self) {
        if let Ok(mut m) = self.accounts.lock() {
            m.retain(|_, a| {
                Arc::strong_count(a) > 1 || a.used.iter().any(|u| u.load(Ordering::Acquire) > 0)
            });
        }
    }

    /// Charges `n` of `r` to `acct` and to the total, if both stay within their limits.
    pub(crate) fn take(&self, acct: &Account, r: Res, n: u64) -> Result<(), Over> {
        let i = r as usize;
        if !try_add(&acct.used[i], n, self.user_limits[i]) {
            return Err(Over::User);
        }
        if !try_add(&self.total[i], n, self.total_limits[i]) {
            sub(&acct.used[i], n);
            return Err(Over::Total);
        }
        Ok(())
    }

    /// Whether `n` more of `r` would fit `acct` and the total (nothing is charged).
    pub(crate) fn fits(&self, acct: &Account, r: Res, n: u64) -> Result<(), Over> {
        let i = r as usize;
        if acct.used[i].load(Ordering::Acquire).saturating_add(n) > self.user_limits[i] {
            return Err(Over::User);
        }
        if self.total[i].load(Ordering::Acquire).saturating_add(n) > self.total_limits[i] {
            return Err(Over::Total);
        }
        Ok(())
    }

    /// Charges bytes that have already arrived (they must be kept): always succeeds, and says
    /// whether the user or the total is now at or over its limit.
    pub(crate) fn force(&self, acct: &Account, r: Res, n: u64) -> bool {
        let i = r as usize;
        let u = acct.used[i].fetch_add(n, Ordering::AcqRel) + n;
        let t = self.total[i].fetch_add(n, Ordering::AcqRel) + n;
        u >= self.user_limits[i] || t >= self.total_limits[i]
    }

    /// Whether the user or the total is at or over its limit for `r`.
    pub(crate) fn full(&self, acct: &Account, r: Res) -> bool {
        let i = r as usize;
        acct.used[i].load(Ordering::Acquire) >= self.user_limits[i]
            || self.total[i].load(Ordering::Acquire) >= self.total_limits[i]
    }

    /// Gives back `n` of `r`.
    pub(crate) fn give(&self, acct: &Account, r: Res, n: u64) {
        if n > 0 {
            sub(&acct.used[r as usize], n);
            sub(&self.total[r as usize], n);
        }
    }

    pub(crate) fn total_used(&self, r: Res) -> u64 {
        self.total[r as usize].load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fit_the_descriptor_limit() {
        let full = Budgets::for_descriptors(u64::MAX);
        assert_eq!(full, Budgets::full());
        for fds in [1024u64, 4096, 20000, 65536] {
            let b = Budgets::for_descriptors(fds);
            assert!(b.fd_need() <= fds, "{fds}: need {}", b.fd_need());
            assert!(b.conns.total >= 16 && b.sessions.total >= 4);
        }
        assert!(Budgets::for_descriptors(1 << 20).fd_need() <= 1 << 20);
    }

    #[test]
    fn settings_parse_and_apply() {
        let mut b = Budgets::for_descriptors(u64::MAX);
        for s in [
            "user.conns=100",
            "total.file-bytes=2G",
            "session.files=10",
            "segment-bytes=64M",
        ] {
            let set: LimitSetting = s.parse().unwrap();
            assert_eq!(set.to_string().split('=').next(), s.split('=').next());
            b.set(&set);
        }
        assert_eq!(b.conns.user, Some(100));
        assert_eq!(b.file_bytes.total, 2 << 30);
        assert_eq!(b.files.session, 10);
        assert_eq!(b.segment_bytes, 64 << 20);
        for bad in [
            "conns=1",
            "user.conns",
            "user.nope=1",
            "group.conns=1",
            "user.conns=x",
            "total.conns=99999999999999999999T",
            "session.parked=1",
        ] {
            assert!(bad.parse::<LimitSetting>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_user_is_limited_before_the_total_and_charges_are_given_back() {
        let mut b = Budgets::for_descriptors(u64::MAX);
        b.conns.user = Some(2);
        b.conns.total = 3;
        let ledger = Ledger::new(&b, true);
        let (a, c) = (ledger.account(1), ledger.account(2));
        assert_eq!(ledger.take(&a, Res::Conns, 1), Ok(()));
        assert_eq!(ledger.take(&a, Res::Conns, 1), Ok(()));
        assert_eq!(ledger.take(&a, Res::Conns, 1), Err(Over::User));
        assert_eq!(ledger.take(&c, Res::Conns, 1), Ok(()));
        assert_eq!(ledger.take(&c, Res::Conns, 1), Err(Over::Total));
        assert_eq!(
            c.used(Res::Conns),
            1,
            "a refused charge leaves nothing behind"
        );
        ledger.give(&a, Res::Conns, 2);
        assert_eq!(ledger.total_used(Res::Conns), 1);
        assert_eq!(ledger.take(&c, Res::Conns, 1), Ok(()));
    }

    #[test]
    fn the_automatic_user_limit_depends_on_who_can_reach_the_server() {
        let b = Budgets::for_descriptors(u64::MAX);
        assert_eq!(b.conns.user_limit(false), b.conns.total);
        assert_eq!(b.conns.user_limit(true), b.conns.total / 4);
    }

    #[test]
    fn forced_charges_report_fullness() {
        let mut b = Budgets::for_descriptors(u64::MAX);
        b.held_bytes.user = Some(10);
        let ledger = Ledger::new(&b, false);
        let a = ledger.account(5);
        assert!(!ledger.force(&a, Res::HeldBytes, 9));
        assert!(ledger.force(&a, Res::HeldBytes, 5));
        assert!(ledger.full(&a, Res::HeldBytes));
        ledger.give(&a, Res::HeldBytes, 14);
        assert!(!ledger.full(&a, Res::HeldBytes));
        drop(a);
        ledger.prune();
        assert!(ledger.accounts.lock().unwrap().is_empty());
    }
}
