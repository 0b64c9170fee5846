//! A node dies, and comes back: the switch's side of a takeover (issue 14).
//!
//! - [`Switch::fence_dead`]: a dead node is fenced wholly — the forward chain drops everything
//!   arriving from its interface with the virtual IP as source, counted per node — and its
//!   buckets go to the live nodes, as `remove_node` would move them, but the node stays known
//!   (its routing, its counters) so that it can come back.
//! - [`Switch::take_over`]: a successor adopted some of its flows; in one transaction they get
//!   the successor as owner (unheld, the successor unfenced from them) and the dead node is
//!   fenced wholly — or, when a new incarnation of it already runs at the same address, only
//!   from those flows.
//! - [`Switch::revive`]: the node is back. It is unfenced and takes its share of buckets again;
//!   each bucket it takes keeps sending its established flows to the node that held it, through
//!   a draining entry that expires (`fresh` in the steering chain lets the new connections of
//!   those buckets reach the returning node). Flows adopted away from it stay fenced from it,
//!   in the same transaction, so a stale socket it may still hold never answers a client.
//!
//! Every function here refreshes nothing itself: callers that let time pass (draining entries
//! expire in the kernel) call [`Switch::refresh`] first.

use super::{buckets, nft_apply, script, Change, Flow, NodeId, State, Switch, SwitchError};

/// What a takeover changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TakeoverReport {
    /// Flows that now go to the adopter.
    pub flows: usize,
    /// Whether the dead node is fenced wholly (else only from the adopted flows).
    pub fenced_wholly: bool,
    /// Buckets that left the dead node.
    pub moved: Vec<usize>,
}

/// A takeover as the switch sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Takeover {
    /// The dead node, if the switch knows it.
    pub dead: Option<NodeId>,
    /// The node that adopted the flows.
    pub adopter: NodeId,
    /// The adopted flows (restored and reset alike: both are the adopter's to answer).
    pub flows: Vec<Flow>,
    /// Fence the dead node wholly and take it out of the buckets (false: a new incarnation
    /// already runs there, so only the adopted flows are fenced from it).
    pub wholly: bool,
}

impl Switch {
    /// Whether node `id` is fenced as dead or holds no bucket.
    pub fn is_out(&self, id: NodeId) -> bool {
        self.state.dead.contains(&id) || !self.state.buckets.contains(&id)
    }

    fn need_failover(&self) -> Result<(), SwitchError> {
        if self.state.has_failover {
            Ok(())
        } else {
            Err(SwitchError::BadState(format!(
                "the switch table {:?} has no dead-node fence (it was made by an older splitos): \
                 re-create it with `splitos switch down` and `splitos switch init`",
                self.table
            )))
        }
    }

    /// The script that fences `id` wholly and gives its buckets to the live nodes, applied to
    /// `st`; the buckets that moved.
    fn plan_dead(&self, st: &mut State, id: NodeId) -> Result<(String, Vec<usize>), SwitchError> {
        let n = st.nodes.get(&id).cloned().ok_or(SwitchError::NoNode(id))?;
        let t = &self.table;
        let mut s = String::new();
        if st.dead.insert(id) {
            s.push_str(&script::add_dead(t, &n.dev));
        }
        let live = others_alive(st, id);
        // With no live node left the buckets stay: there is nowhere to send them, and the
        // fence already keeps the dead node from answering.
        let mut moved = Vec::new();
        if !live.is_empty() {
            let new = buckets::without(&st.buckets, id, &live);
            moved = buckets::moved(&st.buckets, &new);
            s.push_str(&script::rebucket(t, &st.buckets, &new));
            st.buckets = new;
        }
        // Nothing may send flows to it: its owner overrides and draining entries go.
        let owned: Vec<Flow> = st
            .owners
            .iter()
            .filter(|(_, &o)| o == id)
            .map(|(f, _)| *f)
            .collect();
        for f in owned {
            s.push_str(&script::clear_owner(t, &f));
            st.owners.remove(&f);
            // Its fences go with it: the flow is adopted (the adopter's transaction sets what
            // it needs) or over, and a new connection from the same client port must not find
            // its node fenced (measured: connects timed out once a node that had been fenced
            // from a port came back and the port's owner had died).
            let fenced: Vec<(NodeId, Flow)> =
                st.fences.iter().filter(|(_, g)| *g == f).copied().collect();
            for (node, g) in fenced {
                if let Some(n) = st.nodes.get(&node) {
                    s.push_str(&script::unfence(t, &n.dev, &g));
                }
                st.fences.remove(&(node, g));
            }
        }
        let draining: Vec<usize> = st
            .draining
            .iter()
            .filter(|(_, &o)| o == id)
            .map(|(&b, _)| b)
            .collect();
        s.push_str(&script::delete_draining(t, &draining));
        for b in draining {
            st.draining.remove(&b);
        }
        Ok((s, moved))
    }

    fn commit(&mut self, s: &str, st: State) -> Result<(), SwitchError> {
        if !s.is_empty() {
            nft_apply(s)?;
        }
        self.state = st;
        Ok(())
    }

    /// Fences node `id` wholly and gives its buckets to the live nodes, in one transaction.
    /// Already true: nothing happens. Returns the buckets that moved.
    pub fn fence_dead(&mut self, id: NodeId) -> Result<Vec<usize>, SwitchError> {
        self.need_failover()?;
        let mut st = self.state.clone();
        let (s, moved) = self.plan_dead(&mut st, id)?;
        self.commit(&s, st)?;
        Ok(moved)
    }

    /// Applies a takeover in one transaction (see the module's comment). Idempotent.
    pub fn take_over(&mut self, t: &Takeover) -> Result<TakeoverReport, SwitchError> {
        self.need_failover()?;
        if !self.state.nodes.contains_key(&t.adopter) {
            return Err(SwitchError::NoNode(t.adopter));
        }
        let mut changes = Vec::with_capacity(t.flows.len() * 4);
        for &f in &t.flows {
            changes.push(Change::Owner(f, t.adopter));
            changes.push(Change::Unfence(f, t.adopter));
            changes.push(Change::Release(f));
            if let (Some(d), false) = (t.dead, t.wholly) {
                if d != t.adopter {
                    changes.push(Change::Fence(f, d));
                }
            }
        }
        let (mut s, mut st) = self.plan(&changes)?;
        // The adopter answers for the flows now: a whole-node fence left on it from an earlier
        // death of its own would swallow that.
        if st.dead.remove(&t.adopter) {
            if let Some(n) = st.nodes.get(&t.adopter) {
                s.push_str(&script::delete_dead(&self.table, &n.dev));
            }
        }
        let mut moved = Vec::new();
        let wholly = match t.dead {
            Some(d) if t.wholly && d != t.adopter => {
                let (more, m) = self.plan_dead(&mut st, d)?;
                s.push_str(&more);
                moved = m;
                true
            }
            _ => false,
        };
        self.commit(&s, st)?;
        Ok(TakeoverReport {
            flows: t.flows.len(),
            fenced_wholly: wholly,
            moved,
        })
    }

    /// Node `id` is back: in one transaction it is unfenced, each flow of `stale` (flows
    /// adopted away from it) is fenced from it, and it takes its share of buckets from the live
    /// nodes; each bucket it takes keeps its established flows at the node that held it for
    /// `keep_s` seconds (at most [`script::RETURN_DRAIN_MAX_S`]). Returns the buckets that
    /// moved to it.
    pub fn revive(
        &mut self,
        id: NodeId,
        stale: &[Flow],
        keep_s: u32,
    ) -> Result<Vec<usize>, SwitchError> {
        self.need_failover()?;
        let changes: Vec<Change> = stale
            .iter()
            // Only flows still owned elsewhere: a flow whose owner override is gone is over,
            // and its port may carry a new connection that the bucket table sends here.
            .filter(|f| matches!(self.state.owners.get(f), Some(o) if *o != id))
            .map(|&f| Change::Fence(f, id))
            .collect();
        let (mut s, mut st) = self.plan(&changes)?;
        let n = st.nodes.get(&id).cloned().ok_or(SwitchError::NoNode(id))?;
        let t = &self.table;
        if st.dead.remove(&id) {
            s.push_str(&script::delete_dead(t, &n.dev));
        }
        let live = others_alive(&st, id);
        let new = buckets::with(&st.buckets, id, &live);
        let moved = buckets::moved(&st.buckets, &new);
        // A bucket already draining keeps its entry: the flows it keeps are older still.
        let keep: Vec<(usize, NodeId)> = moved
            .iter()
            .filter(|b| !st.draining.contains_key(b))
            .filter_map(|&b| st.buckets.get(b).map(|&from| (b, from)))
            .filter(|&(_, from)| from != 0 && from != id)
            .collect();
        s.push_str(&script::rebucket(t, &st.buckets, &new));
        let keep_s = keep_s.clamp(1, script::RETURN_DRAIN_MAX_S);
        s.push_str(&script::add_draining(t, &keep, keep_s));
        st.buckets = new;
        st.draining.extend(keep);
        self.commit(&s, st)?;
        Ok(moved)
    }
}

/// The nodes of `st` other than `id` that are not dead.
fn others_alive(st: &State, id: NodeId) -> Vec<NodeId> {
    st.nodes
        .keys()
        .copied()
        .filter(|k| *k != id && !st.dead.contains(k))
        .collect()
}
