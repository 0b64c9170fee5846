//! The bucket table: which node each hash bucket of new flows goes to, and how it changes
//! when nodes come and go. Pure arithmetic, no kernel.
//!
//! A flow's bucket is `jhash(client address . client port) mod N` (computed by nftables); the
//! table maps buckets to nodes. Changes move as few buckets as possible, which is what keeps
//! other nodes' flows in place (a plain `mod nodes` would remap most of them):
//! - a departing node's buckets go, one by one, to the least-loaded remaining node; no other
//!   bucket moves;
//! - a joining node takes buckets, one by one, from the most-loaded nodes until loads differ
//!   by at most one; no bucket moves between the old nodes.

use std::collections::BTreeMap;

/// A node's id, which is also its packet mark (never 0).
pub type NodeId = u16;

/// Buckets per node, for the nodes in `nodes` (a node with no bucket counts 0).
fn loads(table: &[NodeId], nodes: &[NodeId]) -> BTreeMap<NodeId, usize> {
    let mut l: BTreeMap<NodeId, usize> = nodes.iter().map(|&n| (n, 0)).collect();
    for b in table {
        if let Some(c) = l.get_mut(b) {
            *c += 1;
        }
    }
    l
}

/// The node with the fewest buckets (ties: the smallest id).
fn least(l: &BTreeMap<NodeId, usize>) -> Option<NodeId> {
    l.iter()
        .min_by_key(|(id, c)| (**c, **id))
        .map(|(id, _)| *id)
}

/// The node with the most buckets (ties: the largest id).
fn most(l: &BTreeMap<NodeId, usize>) -> Option<NodeId> {
    l.iter()
        .max_by_key(|(id, c)| (**c, **id))
        .map(|(id, _)| *id)
}

/// A table of `n` buckets spread round-robin over `nodes` (sorted first). Empty `nodes`: an
/// empty table.
pub fn initial(n: usize, nodes: &[NodeId]) -> Vec<NodeId> {
    let mut sorted = nodes.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.is_empty() {
        return Vec::new();
    }
    (0..n).map(|i| sorted[i % sorted.len()]).collect()
}

/// `table` after `gone` leaves, the others being `remaining`. Only `gone`'s buckets change.
/// With no node remaining, the table is returned unchanged (there is nowhere to move to).
pub fn without(table: &[NodeId], gone: NodeId, remaining: &[NodeId]) -> Vec<NodeId> {
    let others: Vec<NodeId> = remaining.iter().copied().filter(|&n| n != gone).collect();
    let mut l = loads(table, &others);
    let mut out = table.to_vec();
    for b in out.iter_mut() {
        if *b == gone {
            if let Some(to) = least(&l) {
                *b = to;
                if let Some(c) = l.get_mut(&to) {
                    *c += 1;
                }
            }
        }
    }
    out
}

/// `table` after `new` joins the nodes `existing`. Only buckets that move to `new` change.
pub fn with(table: &[NodeId], new: NodeId, existing: &[NodeId]) -> Vec<NodeId> {
    let mut nodes: Vec<NodeId> = existing.iter().copied().filter(|&n| n != new).collect();
    if nodes.is_empty() {
        return vec![new; table.len()];
    }
    nodes.push(new);
    let mut l = loads(table, &nodes);
    let mut out = table.to_vec();
    while let (Some(from), Some(new_load)) = (most(&l), l.get(&new).copied()) {
        let from_load = l.get(&from).copied().unwrap_or(0);
        if from == new || from_load <= new_load + 1 {
            break;
        }
        // Take `from`'s last bucket (spreads the taken buckets over the hash space).
        let Some(i) = out.iter().rposition(|&b| b == from) else {
            break;
        };
        out[i] = new;
        if let Some(c) = l.get_mut(&from) {
            *c -= 1;
        }
        if let Some(c) = l.get_mut(&new) {
            *c += 1;
        }
    }
    out
}

/// The buckets whose node differs between `old` and `new`.
pub fn moved(old: &[NodeId], new: &[NodeId]) -> Vec<usize> {
    old.iter()
        .zip(new)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spread(t: &[NodeId], nodes: &[NodeId]) -> (usize, usize) {
        let l = loads(t, nodes);
        (
            l.values().copied().min().unwrap_or(0),
            l.values().copied().max().unwrap_or(0),
        )
    }

    #[test]
    fn initial_is_round_robin() {
        assert_eq!(initial(6, &[2, 1]), vec![1, 2, 1, 2, 1, 2]);
        assert!(initial(4, &[]).is_empty());
    }

    #[test]
    fn removing_the_third_node_moves_only_its_buckets() {
        let t = initial(64, &[1, 2, 3]);
        let t2 = without(&t, 3, &[1, 2]);
        for i in moved(&t, &t2) {
            assert_eq!(t[i], 3);
        }
        assert!(!t2.contains(&3));
        assert_eq!(spread(&t2, &[1, 2]), (32, 32));
    }

    proptest! {
        #[test]
        fn changes_are_minimal_and_balanced(
            n in 1usize..256,
            nodes in proptest::collection::btree_set(1u16..50, 1..10),
            pick in any::<proptest::sample::Index>(),
            new in 50u16..60,
        ) {
            let nodes: Vec<NodeId> = nodes.into_iter().collect();
            let t = initial(n, &nodes);
            let (lo, hi) = spread(&t, &nodes);
            prop_assert!(hi - lo <= 1);

            let gone = nodes[pick.index(nodes.len())];
            let rest: Vec<NodeId> = nodes.iter().copied().filter(|&x| x != gone).collect();
            let t2 = without(&t, gone, &rest);
            if !rest.is_empty() {
                for i in moved(&t, &t2) {
                    prop_assert_eq!(t[i], gone);
                }
                prop_assert!(!t2.contains(&gone));
                let (lo, hi) = spread(&t2, &rest);
                prop_assert!(hi - lo <= 1);
            }

            let t3 = with(&t, new, &nodes);
            for i in moved(&t, &t3) {
                prop_assert_eq!(t3[i], new);
            }
            let mut all = nodes.clone();
            all.push(new);
            let (lo, hi) = spread(&t3, &all);
            prop_assert!(hi - lo <= 1);
        }
    }
}
