//! What a reader keeps for later opens: mapped segments under a byte and a count budget, and
//! the descriptors of files passed by reference.

use super::*;

/// Segments kept mapped for later hits, by id, under a byte and a count budget; CLOCK
/// eviction (a segment hit since the hand last passed is spared once).
pub(super) struct SegmentCache {
    pub(super) map: HashMap<u64, (Arc<Segment>, bool)>,
    pub(super) clock: VecDeque<u64>,
    pub(super) bytes: u64,
    pub(super) max_bytes: u64,
    pub(super) max_count: usize,
}

impl SegmentCache {
    pub(super) fn get(&mut self, id: u64) -> Option<Arc<Segment>> {
        let (seg, referenced) = self.map.get_mut(&id)?;
        *referenced = true;
        Some(seg.clone())
    }

    pub(super) fn insert(&mut self, id: u64, seg: Arc<Segment>) {
        let len = seg.len();
        if len > self.max_bytes || self.max_count == 0 || self.map.contains_key(&id) {
            return;
        }
        // Each entry is passed over at most twice (once to clear its mark).
        let mut turns = 2 * self.clock.len() + 1;
        while (self.bytes + len > self.max_bytes || self.map.len() >= self.max_count) && turns > 0 {
            turns -= 1;
            let Some(old) = self.clock.pop_front() else {
                break;
            };
            match self.map.get_mut(&old) {
                Some((_, referenced)) if *referenced => {
                    *referenced = false;
                    self.clock.push_back(old);
                }
                Some(_) => {
                    if let Some((s, _)) = self.map.remove(&old) {
                        self.bytes -= s.len();
                    }
                }
                None => {}
            }
        }
        if self.bytes + len > self.max_bytes || self.map.len() >= self.max_count {
            return;
        }
        self.bytes += len;
        self.map.insert(id, (seg, false));
        self.clock.push_back(id);
    }
}

/// Files passed by reference, by path, so that opening one again (same version) reuses the
/// descriptor — and the TCP server, which keys what it was given by descriptor, sees one file.
pub(super) struct PlainCache {
    pub(super) map: HashMap<String, Arc<PlainFile>>,
    pub(super) order: VecDeque<String>,
    pub(super) max: usize,
}

impl PlainCache {
    pub(super) fn get(&self, path: &str, v: Version) -> Option<Arc<PlainFile>> {
        self.map.get(path).filter(|f| f.version() == v).cloned()
    }

    pub(super) fn insert(&mut self, path: &str, f: Arc<PlainFile>) {
        if self.max == 0 {
            return;
        }
        if self.map.insert(path.to_string(), f).is_none() {
            self.order.push_back(path.to_string());
        }
        while self.map.len() > self.max {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&old);
        }
    }
}
