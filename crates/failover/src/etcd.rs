//! Who is alive and who owns what, kept in etcd: the one place where the cluster's nodes and
//! its switch agree. Consensus is etcd's; this module only names the keys and the few
//! transactions that change them.
//!
//! Keys, under `/splitos/CLUSTER/`:
//!
//! | key | value | written by |
//! |---|---|---|
//! | `nodes/NAME` | [`NodeInfo`], bound to the node's lease | the node, in a transaction that fails if `NAME` is registered |
//! | `switch` | [`SwitchInfo`]: the switch's nodes in ring order | the switch controller |
//! | `adopted/NAME/INCARNATION` | [`Adoption`]: the flows a successor took over | the successor, in the adoption transaction |
//! | `applied/NAME/INCARNATION` | [`Applied`] | the switch controller, once the switch follows the adoption |
//!
//! A node's **incarnation** is the revision at which its `nodes/NAME` key was created: a node
//! that restarts under the same name is a new incarnation, and a dead one is never confused
//! with its successor under that name. Flows are adopted only by [`Registry::adopt`], a
//! compare-and-swap on that revision: it succeeds once per incarnation, and only while the
//! incarnation holds no lease (its key is gone or belongs to a later incarnation).

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

/// Most flows one adoption record names: etcd's default request limit is 1.5 MiB, and a flow
/// takes about 22 bytes of JSON.
pub const ADOPTION_FLOWS_MAX: usize = 50_000;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {endpoints}: {source}")]
    Client {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("a node named {0:?} is registered already (and its lease is alive)")]
    NameTaken(String),
    #[error("etcd key {key}: {why}")]
    Value { key: String, why: String },
    #[error("an adoption may name at most {ADOPTION_FLOWS_MAX} flows, not {0}")]
    TooManyFlows(usize),
    #[error("the lease of this node is gone (it expired or was revoked)")]
    LeaseLost,
}

/// What a node publishes about itself while its lease lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// The address the switch routes to (its next hop for the node).
    pub addr: Ipv4Addr,
    /// Where its node link (migration) listens.
    pub link: Option<SocketAddr>,
    /// Where it accepts checkpoint streams from the nodes it succeeds.
    pub checkpoints: SocketAddr,
    pub pid: u32,
}

/// A registered node: its info, incarnation and lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub info: NodeInfo,
    pub incarnation: i64,
    pub lease: i64,
}

/// One node as the switch knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchNode {
    pub id: u32,
    pub addr: Ipv4Addr,
}

/// The switch's nodes in ring order (by id). A node's successor is the next one in the ring
/// that is registered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchInfo {
    pub table: String,
    pub nodes: Vec<SwitchNode>,
}

impl SwitchInfo {
    /// The successor of the node at `addr`: the next node of the ring (wrapping) whose address
    /// `alive` accepts. `None` if `addr` is not in the ring or nobody else is alive.
    pub fn successor(&self, addr: Ipv4Addr, alive: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
        let mut ring: Vec<&SwitchNode> = self.nodes.iter().collect();
        ring.sort_by_key(|n| n.id);
        let at = ring.iter().position(|n| n.addr == addr)?;
        (1..ring.len())
            .map(|k| ring[(at + k) % ring.len()].addr)
            .find(|a| *a != addr && alive(*a))
    }
}

/// Flows of a dead incarnation that a successor took over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adoption {
    pub dead: String,
    pub incarnation: i64,
    pub dead_addr: Ipv4Addr,
    pub adopter: String,
    pub adopter_addr: Ipv4Addr,
    /// Clients of connections restored at the adopter.
    pub restore: Vec<SocketAddrV4>,
    /// Clients of connections the adopter resets on purpose (they were not at rest).
    pub reset: Vec<SocketAddrV4>,
    pub at_ms: u64,
}

/// The switch follows an adoption.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub adopter_addr: Ipv4Addr,
    pub flows: usize,
    pub at_ms: u64,
}

/// A change seen by [`Registry::watch`].
#[derive(Clone, Debug)]
pub enum Change {
    Up(Member),
    /// `name`'s incarnation `incarnation` lost its key (lease expired or revoked).
    Down {
        name: String,
        incarnation: i64,
        addr: Option<Ipv4Addr>,
    },
    Switch(SwitchInfo),
    Adopted(Adoption),
    Applied {
        name: String,
        incarnation: i64,
        applied: Applied,
    },
}

/// Everything under the cluster's prefix at one revision.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub revision: i64,
    pub members: Vec<Member>,
    pub switch: Option<SwitchInfo>,
    pub adoptions: Vec<Adoption>,
    pub applied: Vec<(String, i64, Applied)>,
}

impl Snapshot {
    /// The successor of the node at `addr` among the registered members, by the switch's ring.
    pub fn successor(&self, addr: Ipv4Addr) -> Option<&Member> {
        let sw = self.switch.as_ref()?;
        let to = sw.successor(addr, |a| self.members.iter().any(|m| m.info.addr == a))?;
        self.members.iter().find(|m| m.info.addr == to)
    }
}

/// The cluster's keys in one etcd.
#[derive(Clone)]
pub struct Registry {
    client: Client,
    prefix: String,
    endpoints: String,
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Registry {
    /// Connects to etcd at `endpoints` (`http://HOST:PORT` or `HOST:PORT`), for cluster
    /// `cluster` (its keys' prefix).
    pub async fn connect(endpoints: &[String], cluster: &str) -> Result<Registry, EtcdError> {
        let joined = endpoints.join(",");
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(3));
        // HTTP/2 pings no more often than every 10 s: a stock etcd answers pings closer than
        // its --grpc-keepalive-min-time (5 s by default) with GOAWAY, which ends watches and
        // lease streams.
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(|source| EtcdError::Client {
                endpoints: joined.clone(),
                source,
            })?;
        Ok(Registry {
            client,
            prefix: format!("/splitos/{cluster}/"),
            endpoints: joined,
        })
    }

    fn err(&self) -> impl FnOnce(etcd_client::Error) -> EtcdError + '_ {
        move |source| EtcdError::Client {
            endpoints: self.endpoints.clone(),
            source,
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// Registers this node under a new lease of `ttl` (whole seconds, at least 1): fails with
    /// [`EtcdError::NameTaken`] while another incarnation of the name is alive.
    pub async fn register(&self, info: &NodeInfo, ttl: Duration) -> Result<Member, EtcdError> {
        let mut c = self.client.clone();
        let ttl_s = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = c.lease_grant(ttl_s, None).await.map_err(self.err())?.id();
        let key = self.key(&format!("nodes/{}", info.name));
        let value = serde_json::to_vec(info).map_err(|e| EtcdError::Value {
            key: key.clone(),
            why: e.to_string(),
        })?;
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let r = c.txn(txn).await.map_err(self.err())?;
        if !r.succeeded() {
            let _ = c.lease_revoke(lease).await;
            return Err(EtcdError::NameTaken(info.name.clone()));
        }
        let incarnation = r.header().map_or(0, |h| h.revision());
        Ok(Member {
            info: info.clone(),
            incarnation,
            lease,
        })
    }

    /// Keeps `lease` alive until it is lost: sends a keep-alive every third of `ttl` and
    /// returns [`EtcdError::LeaseLost`] when etcd says it is gone, or the last error once no
    /// keep-alive succeeded for `ttl` (the lease is then gone or about to be).
    pub async fn keep_alive(&self, lease: i64, ttl: Duration) -> EtcdError {
        let mut c = self.client.clone();
        let every = (ttl / 3).max(Duration::from_millis(100));
        let mut last_ok = tokio::time::Instant::now();
        let mut last_err = EtcdError::LeaseLost;
        loop {
            let round = async {
                let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                loop {
                    keeper.keep_alive().await?;
                    match stream.message().await? {
                        Some(r) if r.ttl() > 0 => {
                            last_ok = tokio::time::Instant::now();
                        }
                        _ => return Ok::<bool, etcd_client::Error>(false),
                    }
                    tokio::time::sleep(every).await;
                }
            };
            match tokio::time::timeout(ttl, round).await {
                Ok(Ok(false)) => return EtcdError::LeaseLost,
                Ok(Ok(true)) => {}
                Ok(Err(e)) => last_err = self.err()(e),
                Err(_) => {}
            }
            if last_ok.elapsed() >= ttl {
                return last_err;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends the lease of `accused`, which `me` suspects is dead — if etcd agrees that `me`
    /// may: its own incarnation is still registered and nobody has accused it. The accusation
    /// is a key bound to `me`'s lease, written in the same transaction as those checks, so of
    /// two nodes that suspect each other (a partition between them, both still reaching etcd)
    /// only the first to reach etcd ends the other's lease, never both. `Ok(false)`: etcd
    /// did not agree (this node was accused or is gone itself).
    pub async fn accuse(&self, me: &Member, accused: &Member) -> Result<bool, EtcdError> {
        let mine = self.key(&format!("nodes/{}", me.info.name));
        let against_me = self.key(&format!("suspect/{}/{}", me.info.name, me.incarnation));
        let key = self.key(&format!(
            "suspect/{}/{}",
            accused.info.name, accused.incarnation
        ));
        let txn = Txn::new()
            .when([
                Compare::create_revision(mine.as_str(), CompareOp::Equal, me.incarnation),
                Compare::version(against_me.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(
                key.as_str(),
                me.info.name.as_bytes(),
                Some(PutOptions::new().with_lease(me.lease)),
            )]);
        let mut c = self.client.clone();
        let r = c.txn(txn).await.map_err(self.err())?;
        if !r.succeeded() {
            return Ok(false);
        }
        let revoked = c.lease_revoke(accused.lease).await;
        // The accusation has served its purpose once the lease is gone (or was gone already).
        let _ = c.delete(key, None).await;
        match revoked {
            Ok(_) => Ok(true),
            // etcd's words when the lease expired meanwhile.
            Err(e) if e.to_string().contains("lease not found") => Ok(true),
            Err(e) => Err(self.err()(e)),
        }
    }

    /// Gives up `lease` (a clean shutdown): the node's key goes at once.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        c.lease_revoke(lease).await.map_err(self.err())?;
        Ok(())
    }

    /// Publishes the switch's ring.
    pub async fn put_switch(&self, info: &SwitchInfo) -> Result<(), EtcdError> {
        self.put_json("switch", info).await
    }

    async fn put_json<T: Serialize>(&self, rest: &str, v: &T) -> Result<(), EtcdError> {
        let key = self.key(rest);
        let value = serde_json::to_vec(v).map_err(|e| EtcdError::Value {
            key: key.clone(),
            why: e.to_string(),
        })?;
        let mut c = self.client.clone();
        c.put(key, value, None).await.map_err(self.err())?;
        Ok(())
    }

    /// Records that the switch follows `name`'s adoption.
    pub async fn put_applied(
        &self,
        name: &str,
        incarnation: i64,
        a: &Applied,
    ) -> Result<(), EtcdError> {
        self.put_json(&format!("applied/{name}/{incarnation}"), a)
            .await
    }

    /// Adopts the flows of `a.dead`'s incarnation `a.incarnation`: succeeds (with the
    /// transaction's revision) only if that incarnation holds no key any more and nobody
    /// adopted it before. `Ok(None)`: the compare failed (it is alive, or adopted already).
    pub async fn adopt(&self, a: &Adoption) -> Result<Option<i64>, EtcdError> {
        let n = a.restore.len() + a.reset.len();
        if n > ADOPTION_FLOWS_MAX {
            return Err(EtcdError::TooManyFlows(n));
        }
        let node = self.key(&format!("nodes/{}", a.dead));
        let key = self.key(&format!("adopted/{}/{}", a.dead, a.incarnation));
        let value = serde_json::to_vec(a).map_err(|e| EtcdError::Value {
            key: key.clone(),
            why: e.to_string(),
        })?;
        let txn = Txn::new()
            .when([
                Compare::create_revision(node.as_str(), CompareOp::NotEqual, a.incarnation),
                Compare::version(key.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(key.as_str(), value, None)]);
        let mut c = self.client.clone();
        let r = c.txn(txn).await.map_err(self.err())?;
        Ok(r.succeeded()
            .then(|| r.header().map_or(0, |h| h.revision())))
    }

    /// Everything under the prefix now.
    pub async fn snapshot(&self) -> Result<Snapshot, EtcdError> {
        let mut c = self.client.clone();
        let r = c
            .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(self.err())?;
        let mut s = Snapshot {
            revision: r.header().map_or(0, |h| h.revision()),
            ..Snapshot::default()
        };
        for kv in r.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match self.parse(&key, kv.value(), kv.create_revision(), kv.lease()) {
                Ok(Some(Change::Up(m))) => s.members.push(m),
                Ok(Some(Change::Switch(sw))) => s.switch = Some(sw),
                Ok(Some(Change::Adopted(a))) => s.adoptions.push(a),
                Ok(Some(Change::Applied {
                    name,
                    incarnation,
                    applied,
                })) => s.applied.push((name, incarnation, applied)),
                Ok(_) => {}
                Err(e) => tracing::warn!("{e}; ignored"),
            }
        }
        Ok(s)
    }

    fn parse(
        &self,
        key: &str,
        value: &[u8],
        create_revision: i64,
        lease: i64,
    ) -> Result<Option<Change>, EtcdError> {
        let Some(rest) = key.strip_prefix(&self.prefix) else {
            return Ok(None);
        };
        let bad = |e: serde_json::Error| EtcdError::Value {
            key: key.to_string(),
            why: e.to_string(),
        };
        let parts: Vec<&str> = rest.split('/').collect();
        Ok(match parts.as_slice() {
            ["nodes", _] => Some(Change::Up(Member {
                info: serde_json::from_slice(value).map_err(bad)?,
                incarnation: create_revision,
                lease,
            })),
            ["switch"] => Some(Change::Switch(serde_json::from_slice(value).map_err(bad)?)),
            ["adopted", _, _] => Some(Change::Adopted(serde_json::from_slice(value).map_err(bad)?)),
            ["applied", name, inc] => Some(Change::Applied {
                name: name.to_string(),
                incarnation: inc.parse().map_err(|_| EtcdError::Value {
                    key: key.to_string(),
                    why: "the incarnation is not a number".into(),
                })?,
                applied: serde_json::from_slice(value).map_err(bad)?,
            }),
            _ => None,
        })
    }

    /// Changes after revision `after`, in order, on `tx` until it closes or the watch fails
    /// (the error is returned; the caller takes a new snapshot and watches again).
    pub async fn watch(
        &self,
        after: i64,
        tx: tokio::sync::mpsc::Sender<Change>,
    ) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(after + 1);
        let mut stream = c
            .watch(self.prefix.as_str(), Some(opts))
            .await
            .map_err(self.err())?;
        while let Some(resp) = stream.message().await.map_err(self.err())? {
            if resp.canceled() {
                return Err(EtcdError::Value {
                    key: self.prefix.clone(),
                    why: format!("the watch was cancelled: {}", resp.cancel_reason()),
                });
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let change = match ev.event_type() {
                    EventType::Put => {
                        match self.parse(&key, kv.value(), kv.create_revision(), kv.lease()) {
                            Ok(c) => c,
                            Err(e) => {
                                tracing::warn!("{e}; ignored");
                                None
                            }
                        }
                    }
                    EventType::Delete => {
                        let rest = key.strip_prefix(&self.prefix).unwrap_or("");
                        match rest.split_once('/') {
                            Some(("nodes", name)) => {
                                let prev = ev.prev_kv();
                                let info: Option<NodeInfo> =
                                    prev.and_then(|p| serde_json::from_slice(p.value()).ok());
                                Some(Change::Down {
                                    name: name.to_string(),
                                    incarnation: prev.map_or(0, |p| p.create_revision()),
                                    addr: info.map(|i| i.addr),
                                })
                            }
                            _ => None,
                        }
                    }
                };
                if let Some(change) = change {
                    if tx.send(change).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[(u32, u8)]) -> SwitchInfo {
        SwitchInfo {
            table: "t".into(),
            nodes: ids
                .iter()
                .map(|&(id, last)| SwitchNode {
                    id,
                    addr: Ipv4Addr::new(198, 18, last, 2),
                })
                .collect(),
        }
    }

    #[test]
    fn successor_is_the_next_live_node_of_the_ring() {
        let sw = ring(&[(3, 3), (1, 1), (2, 2)]);
        let a = |n| Ipv4Addr::new(198, 18, n, 2);
        assert_eq!(sw.successor(a(1), |_| true), Some(a(2)));
        assert_eq!(sw.successor(a(3), |_| true), Some(a(1)));
        assert_eq!(sw.successor(a(1), |x| x != a(2)), Some(a(3)));
        assert_eq!(sw.successor(a(1), |x| x == a(1)), None);
        assert_eq!(sw.successor(a(9), |_| true), None);
    }
}
