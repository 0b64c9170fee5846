//! Draining a node: its buckets go to the others for new flows, while its established flows
//! keep reaching it until they have moved (by migration) — a planned removal without a reset.
//!
//! `drain_begin` is one transaction: the bucket table without the node, and each of its old
//! buckets in the `draining` map, which the steering chain consults for every packet but a
//! first SYN. Migrations then give the node's connections owners elsewhere (the owners map
//! overrides both). `drain_end` empties the node's draining entries; the node stays known (its
//! routing too) until `remove_node`, so nothing in flight is cut.

use super::{buckets, nft_apply, NodeId, Switch, SwitchError};
use std::fmt::Write as _;

impl Switch {
    /// Gives node `id`'s buckets to the other nodes for new flows, keeping its established
    /// flows with it. Returns the buckets that moved.
    pub fn drain_begin(&mut self, id: NodeId) -> Result<Vec<usize>, SwitchError> {
        if !self.state.nodes.contains_key(&id) {
            return Err(SwitchError::NoNode(id));
        }
        let rest = self.others(id);
        if rest.is_empty() {
            return Err(SwitchError::BadConfig);
        }
        let new = buckets::without(&self.state.buckets, id, &rest);
        let moved = buckets::moved(&self.state.buckets, &new);
        let mut s = super::script::rebucket(&self.table, &self.state.buckets, &new);
        let fresh: Vec<usize> = moved
            .iter()
            .copied()
            .filter(|b| !self.state.draining.contains_key(b))
            .collect();
        if !fresh.is_empty() {
            let elems: Vec<String> = fresh
                .iter()
                .map(|&b| format!("{:#x} : {id}", super::script::BUCKET_MARK_BASE + b as u32))
                .collect();
            let _ = writeln!(
                s,
                "add element ip {} draining {{ {} }}",
                self.table,
                elems.join(", ")
            );
        }
        if !s.is_empty() {
            nft_apply(&s)?;
        }
        self.state.buckets = new;
        for b in fresh {
            self.state.draining.insert(b, id);
        }
        Ok(moved)
    }

    /// Node `id`'s established flows no longer need its old buckets (they have moved, or
    /// are given up): its draining entries go.
    pub fn drain_end(&mut self, id: NodeId) -> Result<usize, SwitchError> {
        let mine: Vec<usize> = self
            .state
            .draining
            .iter()
            .filter(|(_, &n)| n == id)
            .map(|(&b, _)| b)
            .collect();
        if mine.is_empty() {
            return Ok(0);
        }
        let elems: Vec<String> = mine
            .iter()
            .map(|&b| format!("{:#x}", super::script::BUCKET_MARK_BASE + b as u32))
            .collect();
        nft_apply(&format!(
            "delete element ip {} draining {{ {} }}\n",
            self.table,
            elems.join(", ")
        ))?;
        for b in &mine {
            self.state.draining.remove(b);
        }
        Ok(mine.len())
    }
}
