//! How a blocked side waits for its peer.
//!
//! On the machines we target a cross-core cache-line hand-off costs ~0.3 µs while a kernel
//! sleep/wake costs ~28 µs, so spinning for about as long as a sleep would cost, then yielding,
//! then sleeping, is never more than ~2x worse than the best fixed choice (the classic
//! competitive-spinning argument) and is as fast as polling when the peer answers at once.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitPolicy {
    /// Spin on shared memory and never sleep: lowest latency, burns a core while waiting.
    Poll,
    /// Spin for `spin`, then `yields` rounds of `sched_yield`, then sleep on the doorbell.
    Adaptive { spin: Duration, yields: u32 },
    /// Sleep on the doorbell at once: no CPU while idle, a kernel wake-up per message.
    Block,
}

impl WaitPolicy {
    /// The default adaptive policy: spin about as long as one sleep/wake costs.
    pub const fn adaptive() -> WaitPolicy {
        WaitPolicy::Adaptive {
            spin: Duration::from_micros(30),
            yields: 16,
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
                // `adaptive:SPIN` with SPIN in microseconds (`adaptive:5us`), for tuning the
                // spin to a machine's measured sleep/wake cost.
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
                let WaitPolicy::Adaptive { yields, .. } = WaitPolicy::adaptive() else {
                    unreachable!("adaptive() is adaptive")
                };
                Ok(WaitPolicy::Adaptive {
                    spin: Duration::from_micros(us),
                    yields,
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
}
