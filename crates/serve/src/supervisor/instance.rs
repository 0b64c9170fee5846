//! One HTTP application instance as the supervisor sees it: a child process, its report
//! lines, its counters.

use super::{AppCommand, ServeError};
use crate::app::{AppConfig, COUNTERS};
use crate::rundir::AppCounters;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One running HTTP application instance.
pub(crate) struct Instance {
    pub(crate) child: Child,
    lines: mpsc::Receiver<String>,
    pub(super) started: Instant,
    /// The last counters it reported.
    pub(super) counters: AppCounters,
}

impl Instance {
    pub(super) fn spawn(
        cmd: &AppCommand,
        base: &AppConfig,
        takeover: bool,
    ) -> Result<Instance, ServeError> {
        let program = match &cmd.program {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(ServeError::FindExecutable)?,
        };
        let config = AppConfig {
            takeover,
            ..base.clone()
        };
        let mut c = Command::new(program);
        c.args(&cmd.args).args(config.to_args());
        // Its own process group: Ctrl-C in the terminal goes to the supervisor, which decides.
        c.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let mut child = c.spawn().map_err(ServeError::Spawn)?;
        let Some(out) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ServeError::NoStdout);
        };
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name("splitos-app-out".into())
            .spawn(move || forward_lines(out, tx))
            .map_err(ServeError::Io)?;
        Ok(Instance {
            child,
            lines,
            started: Instant::now(),
            counters: AppCounters::default(),
        })
    }

    /// Reads the report lines that arrived, keeping the last counters.
    pub(crate) fn read_reports(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            if let Some(c) = l.strip_prefix(COUNTERS).and_then(parse_counters) {
                self.counters = c;
            }
        }
    }

    /// Waits for the instance to report `report` (a line starting with it) and returns the
    /// rest of that line; fails if the instance exits or `limit` passes.
    pub(super) fn wait_for_report(
        &mut self,
        report: &'static str,
        limit: Duration,
    ) -> Result<String, ServeError> {
        self.wait_for_report_busy(report, limit, &mut || {})
    }

    /// [`Instance::wait_for_report`], calling `busy` every 100 ms at most meanwhile.
    pub(super) fn wait_for_report_busy(
        &mut self,
        report: &'static str,
        limit: Duration,
        busy: &mut dyn FnMut(),
    ) -> Result<String, ServeError> {
        let deadline = Instant::now() + limit;
        loop {
            busy();
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(l) => {
                    if let Some(rest) = l.strip_prefix(report) {
                        return Ok(rest.trim().to_string());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(st)) = self.child.try_wait() {
                        return Err(ServeError::Exited(st));
                    }
                    if left.is_zero() {
                        return Err(ServeError::Silent { report, limit });
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait().map_err(ServeError::Io)?;
                    return Err(ServeError::Exited(st));
                }
            }
        }
    }

    pub(crate) fn signal(&self, sig: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// Waits up to `limit` for the instance to exit, then kills it.
    pub(super) fn reap(self, limit: Duration) {
        self.reap_busy(limit, &mut || {})
    }

    /// [`Instance::reap`], calling `busy` every 10 ms meanwhile.
    pub(super) fn reap_busy(mut self, limit: Duration, busy: &mut dyn FnMut()) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            busy();
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(
            pid = self.child.id(),
            "HTTP application did not exit; killing it"
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `<connections> <responses> <directory hits>`, as [`crate::app`] reports them.
fn parse_counters(s: &str) -> Option<AppCounters> {
    let mut n = s.split_whitespace().map(|w| w.parse::<u64>().ok());
    let c = AppCounters {
        connections: n.next()??,
        responses: n.next()??,
        directory_hits: n.next()??,
    };
    n.next().is_none().then_some(c)
}

/// Counters of retired instances, plus the current one's.
pub(super) fn add(base: AppCounters, now: AppCounters) -> AppCounters {
    AppCounters {
        connections: now.connections,
        responses: base.responses + now.responses,
        directory_hits: base.directory_hits + now.directory_hits,
    }
}

fn forward_lines(out: ChildStdout, tx: mpsc::Sender<String>) {
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { return };
        if tx.send(line).is_err() {
            return;
        }
    }
}
