//! How a blocked side waits for its peer.
//!
//! On the machines we target a cross-core cache-line hand-off costs ~0.3 µs while a kernel
//! sleep/wake costs ~28 µs, so waiting actively for about as long as a sleep would cost, then
//! sleeping, is never more than ~2x worse than the best fixed choice (the classic
//! competitive-spinning argument) and is as fast as polling when the peer answers at once.
//!
//! *Actively* is mostly `sched_yield`, not spinning: on a small machine the peer we wait for
//! often shares our core (two vCPUs, a load generator, a TCP server and an application), and a
//! spin there only keeps it from running. A yield with nobody else runnable returns at once, so
//! on a core of our own yielding costs about what spinning does. Measured on the 2-vCPU machine
//! (echo benchmark, TCP server + application): a 30 µs spin gave 111–129k req/s, a 2 µs spin
//! then yields up to 30 µs 132–173k, pinned or not.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitPolicy {
    /// Spin on shared memory and never sleep: lowest latency, burns a core while waiting.
    Poll,
    /// Spin for `spin`, then `sched_yield` until `patience` has passed since the wait began,
    /// then sleep on the doorbell.
    Adaptive { spin: Duration, patience: Duration },
    /// Sleep on the doorbell at once: no CPU while idle, a kernel wake-up per message.
    Block,
}

/// What a waiter does at a given point of a wait (see [`WaitPolicy::phase`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Spin,
    Yield,
    Sleep,
}

/// How long the default adaptive policy waits actively: about one sleep/wake.
const PATIENCE: Duration = Duration::from_micros(30);

impl WaitPolicy {
    /// The default adaptive policy: a 2 µs spin (a peer on another core answering at once),
    /// then yields until about one sleep/wake's worth of time has passed.
    pub const fn adaptive() -> WaitPolicy {
        WaitPolicy::Adaptive {
            spin: Duration::from_micros(2),
            patience: PATIENCE,
        }
    }

    /// What to do `waited` into a wait.
    pub fn phase(&self, waited: Duration) -> Phase {
        match *self {
            WaitPolicy::Poll => Phase::Spin,
            WaitPolicy::Adaptive { spin, .. } if waited < spin => Phase::Spin,
            WaitPolicy::Adaptive { patience, .. } if waited < patience => Phase::Yield,
            WaitPolicy::Adaptive { .. } | WaitPolicy::Block => Phase::Sleep,
        }
    }
}

impl Default for WaitPolicy {
    fn default() -> Self {
        WaitPolicy::adaptive()
    }
}

impl FromStr for WaitPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "poll" => Ok(WaitPolicy::Poll),
            "adaptive" => Ok(WaitPolicy::adaptive()),
            "block" => Ok(WaitPolicy::Block),
            other => {
                // `adaptive:SPIN` with SPIN in microseconds (`adaptive:20us`): a longer busy
                // spin for a waiter sure to have its core to itself, or none (`adaptive:0us`).
                let bad = || {
                    format!(
                        "unknown wait policy {other:?}: expected poll, adaptive, adaptive:<N>us \
                         (spin N microseconds, at most {MAX_SPIN_US}) or block"
                    )
                };
                let us = other
                    .strip_prefix("adaptive:")
                    .map(|v| v.strip_suffix("us").unwrap_or(v))
                    .ok_or_else(bad)?
                    .parse::<u64>()
                    .map_err(|_| bad())?;
                if us > MAX_SPIN_US {
                    return Err(bad());
                }
                let spin = Duration::from_micros(us);
                Ok(WaitPolicy::Adaptive {
                    spin,
                    patience: PATIENCE.max(spin),
                })
            }
        }
    }
}

impl fmt::Display for WaitPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitPolicy::Poll => f.write_str("poll"),
            p @ WaitPolicy::Adaptive { spin, .. } => {
                if *p == WaitPolicy::adaptive() {
                    f.write_str("adaptive")
                } else {
                    write!(f, "adaptive:{}us", spin.as_micros())
                }
            }
            WaitPolicy::Block => f.write_str("block"),
        }
    }
}

/// Longest spin `adaptive:<N>us` accepts: past a few sleep/wake costs spinning only burns CPU.
pub const MAX_SPIN_US: u64 = 10_000;

/// Longest single sleep: a backstop so that a peer that clears our "waiting" flag without
/// ringing (a bug or an attack) delays us, but never hangs us.
pub(crate) const MAX_SLEEP: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_rejects_others() {
        assert_eq!("poll".parse::<WaitPolicy>(), Ok(WaitPolicy::Poll));
        assert_eq!("block".parse::<WaitPolicy>(), Ok(WaitPolicy::Block));
        assert_eq!("adaptive".parse::<WaitPolicy>(), Ok(WaitPolicy::adaptive()));
        let e = "spin".parse::<WaitPolicy>().unwrap_err();
        assert!(e.contains("adaptive:<N>us"), "{e}");
        let p = "adaptive:5us".parse::<WaitPolicy>().unwrap();
        assert!(matches!(p, WaitPolicy::Adaptive { spin, .. } if spin == Duration::from_micros(5)));
        assert_eq!(p.to_string(), "adaptive:5us");
        assert_eq!(
            "adaptive:7".parse::<WaitPolicy>().unwrap().to_string(),
            "adaptive:7us"
        );
        assert_eq!(WaitPolicy::adaptive().to_string(), "adaptive");
        for bad in [
            "adaptive:",
            "adaptive:x",
            "adaptive:-1us",
            "adaptive:10001us",
        ] {
            assert!(bad.parse::<WaitPolicy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn phases_follow_the_policy() {
        let us = Duration::from_micros;
        let a = WaitPolicy::adaptive();
        assert_eq!(a.phase(us(0)), Phase::Spin);
        assert_eq!(a.phase(us(5)), Phase::Yield);
        assert_eq!(a.phase(us(29)), Phase::Yield);
        assert_eq!(a.phase(us(30)), Phase::Sleep);
        let none: WaitPolicy = "adaptive:0us".parse().unwrap();
        assert_eq!(none.phase(us(0)), Phase::Yield);
        // A spin longer than the default patience is all spin, then sleep.
        let long: WaitPolicy = "adaptive:100us".parse().unwrap();
        assert_eq!(long.phase(us(99)), Phase::Spin);
        assert_eq!(long.phase(us(100)), Phase::Sleep);
        assert_eq!(WaitPolicy::Poll.phase(us(1_000_000)), Phase::Spin);
        assert_eq!(WaitPolicy::Block.phase(us(0)), Phase::Sleep);
    }
}
