//! Who may listen on which ports.
//!
//! The control socket is created 0600 by default, so by default only the server's own user can
//! reach it at all; a wider socket mode lets others in, and this policy then decides what they
//! may bind. The default mirrors the kernel's own rule: the server's user may listen anywhere,
//! everyone else only on ports ≥ 1024 (and on port 0, which picks an ephemeral port).

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `None` matches every user.
    pub uid: Option<u32>,
    pub ports: RangeInclusive<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessPolicy {
    pub rules: Vec<Rule>,
}

impl AccessPolicy {
    /// The default for a server running as `server_uid`.
    pub fn default_for(server_uid: u32) -> AccessPolicy {
        AccessPolicy {
            rules: vec![
                Rule {
                    uid: Some(server_uid),
                    ports: 0..=u16::MAX,
                },
                Rule {
                    uid: None,
                    ports: 1024..=u16::MAX,
                },
            ],
        }
    }

    /// Whether `uid` may listen on `port`. Port 0 (kernel-chosen) is always allowed.
    pub fn may_listen(&self, uid: u32, port: u16) -> bool {
        port == 0
            || self
                .rules
                .iter()
                .any(|r| r.uid.is_none_or(|u| u == uid) && r.ports.contains(&port))
    }
}

impl FromStr for Rule {
    type Err = String;
    /// `UID:LOW-HIGH`, `UID:PORT` or `*:LOW-HIGH`.
    fn from_str(s: &str) -> Result<Rule, String> {
        let bad =
            || format!("invalid rule {s:?}: expected UID:PORT or UID:LOW-HIGH (UID may be *)");
        let (uid, ports) = s.split_once(':').ok_or_else(bad)?;
        let uid = match uid {
            "*" => None,
            u => Some(u.parse::<u32>().map_err(|_| bad())?),
        };
        let (lo, hi) = match ports.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (ports, ports),
        };
        let lo: u16 = lo.parse().map_err(|_| bad())?;
        let hi: u16 = hi.parse().map_err(|_| bad())?;
        if lo > hi {
            return Err(bad());
        }
        Ok(Rule {
            uid,
            ports: lo..=hi,
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.uid {
            Some(u) => write!(f, "{u}")?,
            None => f.write_str("*")?,
        }
        write!(f, ":{}-{}", self.ports.start(), self.ports.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_matches_the_kernel_rule() {
        let p = AccessPolicy::default_for(1000);
        assert!(p.may_listen(1000, 80));
        assert!(!p.may_listen(1001, 80));
        assert!(p.may_listen(1001, 8080));
        assert!(p.may_listen(1001, 0));
    }

    #[test]
    fn rules_parse_and_reject_nonsense() {
        assert_eq!(
            "*:8000-9000".parse::<Rule>().unwrap(),
            Rule {
                uid: None,
                ports: 8000..=9000
            }
        );
        assert_eq!("33:80".parse::<Rule>().unwrap().ports, 80..=80);
        for bad in ["80", "x:80", "1:90-80", "1:70000", "1:"] {
            assert!(bad.parse::<Rule>().is_err(), "{bad} accepted");
        }
    }
}
