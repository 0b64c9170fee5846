//! What a successor knows of the nodes it succeeds: per node incarnation, every connection it
//! reported, and for the ones at rest the latest record. Kept within a byte budget shared by
//! all the nodes: past it, records are forgotten (oldest first) and their connections would be
//! reset on takeover rather than restored — a lost record costs one reconnect, never a wrong
//! answer.

use crate::stream::Frame;
use splitos_tcp_server::migration::Flow;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Bytes a flow costs besides its record (map entries, the eviction queue).
const FLOW_OVERHEAD: usize = 96;

/// Most node incarnations whose checkpoints are kept at once.
pub const SOURCES_MAX: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Known, not at rest (or its record was forgotten).
    Open,
    Idle {
        epoch: u64,
        record: Vec<u8>,
    },
}

#[derive(Default, Debug)]
struct Source {
    flows: HashMap<Flow, Entry>,
    /// Idle records in arrival order, for eviction (stale entries are skipped).
    order: VecDeque<(Flow, u64)>,
    bytes: usize,
}

/// A node incarnation's connections, taken out of the store for a takeover.
#[derive(Debug, Default)]
pub struct Taken {
    pub idle: Vec<(Flow, u64, Vec<u8>)>,
    pub open: Vec<Flow>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    pub sources: usize,
    pub flows: usize,
    pub idle: usize,
    pub bytes: usize,
    pub budget: usize,
    pub evicted: u64,
}

/// The successor's store. Not synchronised: the agent holds it behind one mutex.
#[derive(Debug)]
pub struct Store {
    sources: BTreeMap<(String, i64), Source>,
    budget: usize,
    bytes: usize,
    evicted: u64,
}

impl Store {
    pub fn new(budget: usize) -> Store {
        Store {
            sources: BTreeMap::new(),
            budget,
            bytes: 0,
            evicted: 0,
        }
    }

    /// Starts (or restarts, empty) the record of `node`'s `incarnation`. Older incarnations of
    /// the same node stay until taken or dropped; past [`SOURCES_MAX`] the oldest goes.
    pub fn begin(&mut self, node: &str, incarnation: i64) {
        self.drop_source(node, incarnation);
        if self.sources.len() >= SOURCES_MAX {
            if let Some(k) = self.sources.keys().min_by_key(|(_, inc)| *inc).cloned() {
                self.drop_source(&k.0, k.1);
            }
        }
        self.sources
            .insert((node.to_string(), incarnation), Source::default());
    }

    pub fn drop_source(&mut self, node: &str, incarnation: i64) {
        if let Some(s) = self.sources.remove(&(node.to_string(), incarnation)) {
            self.bytes -= s.bytes;
        }
    }

    pub fn has(&self, node: &str, incarnation: i64) -> bool {
        self.sources.contains_key(&(node.to_string(), incarnation))
    }

    /// Applies one frame from `node`'s `incarnation` (a frame for an unknown source is
    /// ignored: the stream's hello creates it).
    pub fn apply(&mut self, node: &str, incarnation: i64, frame: Frame) {
        let key = (node.to_string(), incarnation);
        let Some(src) = self.sources.get_mut(&key) else {
            return;
        };
        let before = src.bytes;
        match frame {
            // A flow's first event, or a resync's restatement (its record, if it is at rest,
            // follows): either way what was known of it is void.
            Frame::Opened(f) => match src.flows.insert(f, Entry::Open) {
                None => src.bytes += FLOW_OVERHEAD,
                Some(Entry::Idle { record, .. }) => src.bytes -= record.len(),
                Some(Entry::Open) => {}
            },
            Frame::Idle {
                flow,
                epoch,
                record,
            } => {
                let add = record.len();
                match src.flows.insert(flow, Entry::Idle { epoch, record }) {
                    None => src.bytes += FLOW_OVERHEAD + add,
                    Some(Entry::Open) => src.bytes += add,
                    Some(Entry::Idle { record: old, .. }) => {
                        src.bytes = src.bytes + add - old.len();
                    }
                }
                src.order.push_back((flow, epoch));
            }
            Frame::Busy { flow, epoch } => {
                if let Some(e) = src.flows.get_mut(&flow) {
                    // An older BUSY cannot make a newer record stale.
                    if let Entry::Idle {
                        epoch: have,
                        record,
                    } = e
                    {
                        if *have <= epoch {
                            src.bytes -= record.len();
                            *e = Entry::Open;
                        }
                    }
                }
            }
            Frame::Closed(f) => {
                if let Some(e) = src.flows.remove(&f) {
                    src.bytes -= FLOW_OVERHEAD;
                    if let Entry::Idle { record, .. } = e {
                        src.bytes -= record.len();
                    }
                }
            }
            Frame::Beat => {}
            Frame::Bye => {
                self.drop_source(node, incarnation);
                return;
            }
        }
        let after = src.bytes;
        self.bytes = self.bytes + after - before;
        self.enforce_budget();
    }

    /// Forgets idle records, oldest first, until the store fits its budget (then whole
    /// connections, if even those do not fit).
    fn enforce_budget(&mut self) {
        while self.bytes > self.budget {
            let mut freed = false;
            for src in self.sources.values_mut() {
                while let Some((f, epoch)) = src.order.pop_front() {
                    if let Some(Entry::Idle { epoch: e, record }) = src.flows.get(&f) {
                        if *e == epoch {
                            let n = record.len();
                            src.flows.insert(f, Entry::Open);
                            src.bytes -= n;
                            self.bytes -= n;
                            self.evicted += 1;
                            freed = true;
                            break;
                        }
                    }
                }
                if freed {
                    break;
                }
            }
            if !freed {
                // Only bare flows left: drop the oldest source whole.
                let Some(k) = self.sources.keys().min_by_key(|(_, i)| *i).cloned() else {
                    return;
                };
                self.evicted += self.sources.get(&k).map_or(0, |s| s.flows.len() as u64);
                self.drop_source(&k.0, k.1);
            }
        }
    }

    /// Takes everything known of `node`'s `incarnation` out of the store.
    pub fn take(&mut self, node: &str, incarnation: i64) -> Option<Taken> {
        let src = self.sources.remove(&(node.to_string(), incarnation))?;
        self.bytes -= src.bytes;
        let mut t = Taken::default();
        for (f, e) in src.flows {
            match e {
                Entry::Open => t.open.push(f),
                Entry::Idle { epoch, record } => t.idle.push((f, epoch, record)),
            }
        }
        t.idle.sort_by_key(|(f, _, _)| *f);
        t.open.sort();
        Some(t)
    }

    pub fn stats(&self) -> StoreStats {
        let mut s = StoreStats {
            sources: self.sources.len(),
            bytes: self.bytes,
            budget: self.budget,
            evicted: self.evicted,
            ..StoreStats::default()
        };
        for src in self.sources.values() {
            s.flows += src.flows.len();
            s.idle += src
                .flows
                .values()
                .filter(|e| matches!(e, Entry::Idle { .. }))
                .count();
        }
        s
    }

    /// Per source: (node, incarnation, flows, idle).
    pub fn sources(&self) -> Vec<(String, i64, usize, usize)> {
        self.sources
            .iter()
            .map(|((n, i), s)| {
                let idle = s
                    .flows
                    .values()
                    .filter(|e| matches!(e, Entry::Idle { .. }))
                    .count();
                (n.clone(), *i, s.flows.len(), idle)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flow(p: u16) -> Flow {
        Flow {
            local: "198.19.0.1:80".parse().unwrap(),
            peer: std::net::SocketAddr::from(([198, 18, 0, 2], p)),
        }
    }

    #[test]
    fn idle_busy_closed() {
        let mut s = Store::new(1 << 20);
        s.begin("n1", 5);
        s.apply("n1", 5, Frame::Opened(flow(1)));
        s.apply("n1", 5, Frame::Opened(flow(2)));
        s.apply(
            "n1",
            5,
            Frame::Idle {
                flow: flow(1),
                epoch: 1,
                record: vec![0; 100],
            },
        );
        s.apply(
            "n1",
            5,
            Frame::Idle {
                flow: flow(2),
                epoch: 1,
                record: vec![0; 100],
            },
        );
        s.apply(
            "n1",
            5,
            Frame::Busy {
                flow: flow(2),
                epoch: 1,
            },
        );
        s.apply("n1", 5, Frame::Opened(flow(3)));
        s.apply("n1", 5, Frame::Closed(flow(3)));
        // A frame for another incarnation changes nothing.
        s.apply("n1", 4, Frame::Opened(flow(9)));
        let t = s.take("n1", 5).unwrap();
        assert_eq!(t.idle.len(), 1);
        assert_eq!(t.idle[0].0, flow(1));
        assert_eq!(t.open, vec![flow(2)]);
        assert_eq!(s.stats().bytes, 0);
        assert!(s.take("n1", 5).is_none());
    }

    #[test]
    fn a_stale_busy_leaves_a_newer_record() {
        let mut s = Store::new(1 << 20);
        s.begin("n", 1);
        s.apply(
            "n",
            1,
            Frame::Idle {
                flow: flow(1),
                epoch: 3,
                record: vec![1],
            },
        );
        s.apply(
            "n",
            1,
            Frame::Busy {
                flow: flow(1),
                epoch: 2,
            },
        );
        assert_eq!(s.take("n", 1).unwrap().idle.len(), 1);
    }

    #[test]
    fn the_budget_forgets_the_oldest_records() {
        let mut s = Store::new(20 * FLOW_OVERHEAD + 10 * 100);
        s.begin("n", 1);
        for p in 0..20 {
            s.apply(
                "n",
                1,
                Frame::Idle {
                    flow: flow(p),
                    epoch: 1,
                    record: vec![0; 100],
                },
            );
        }
        let st = s.stats();
        assert!(st.bytes <= st.budget, "{st:?}");
        assert!(st.evicted > 0);
        let t = s.take("n", 1).unwrap();
        // The newest records stay.
        assert!(t.idle.iter().any(|(f, _, _)| *f == flow(19)));
        assert!(!t.idle.iter().any(|(f, _, _)| *f == flow(0)));
    }

    proptest! {
        #[test]
        fn bytes_always_add_up(ops in proptest::collection::vec((0u8..5, 0u16..8, 1u64..4, 0usize..300), 0..200)) {
            let mut s = Store::new(2000);
            s.begin("n", 1);
            for (k, p, e, n) in ops {
                let f = flow(p);
                let fr = match k {
                    0 => Frame::Opened(f),
                    1 => Frame::Idle { flow: f, epoch: e, record: vec![0; n] },
                    2 => Frame::Busy { flow: f, epoch: e },
                    3 => Frame::Closed(f),
                    _ => Frame::Beat,
                };
                s.apply("n", 1, fr);
                let st = s.stats();
                prop_assert!(st.bytes <= st.budget);
            }
            if let Some(t) = s.take("n", 1) {
                let _ = t;
            }
            prop_assert_eq!(s.stats().bytes, 0);
        }
    }
}
