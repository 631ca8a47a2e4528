//! A real Redis Cluster for tests: `redis-server --cluster-enabled yes` processes on free
//! loopback ports (cluster bus ports chosen free too), joined by
//! `redis-cli --cluster create`, with replicas so that a shard can fail over.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::{RedisOptions, RedisServer, TestkitError};

/// A running cluster; every node is killed on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// For a replica: the id of its primary.
    pub master_id: Option<String>,
    /// Slot ranges served (primaries only).
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// `masters` primaries with `replicas` replicas each (3 primaries are the minimum
    /// Redis accepts).
    pub fn start(masters: usize, replicas: usize) -> Result<RedisCluster, TestkitError> {
        let total = masters * (1 + replicas);
        let mut nodes = Vec::with_capacity(total);
        for _ in 0..total {
            nodes.push(RedisServer::start_with(RedisOptions {
                appendonly: false,
                args: vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    "nodes.conf".into(),
                    "--cluster-port".into(),
                    crate::free_port().to_string(),
                    "--cluster-node-timeout".into(),
                    "2000".into(),
                ],
            })?);
        }
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())));
        args.extend([
            "--cluster-replicas".into(),
            replicas.to_string(),
            "--cluster-yes".into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        nodes[0].cli(&args)?;
        let cluster = RedisCluster { nodes };
        cluster.wait_settled(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// `redis-cluster://127.0.0.1:p1,127.0.0.1:p2,…` (every node).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis-cluster://{}", hosts.join(","))
    }

    /// The node listening on `port`.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .expect("a node of this cluster")
    }

    /// Any node (for cluster-wide commands).
    pub fn any(&self) -> &RedisServer {
        &self.nodes[0]
    }

    /// `CLUSTER NODES` as seen by the node on `port`.
    pub fn topology(&self, port: u16) -> Result<Vec<ClusterNode>, TestkitError> {
        let text = self.node(port).cli(&["CLUSTER", "NODES"])?;
        Ok(text.lines().filter_map(parse_node_line).collect())
    }

    /// The port of the primary serving `slot`, as the node on `seen_from` sees it.
    pub fn owner_of_slot(&self, slot: u16, seen_from: u16) -> Result<u16, TestkitError> {
        self.topology(seen_from)?
            .into_iter()
            .find(|n| n.master && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .map(|n| n.port)
            .ok_or_else(|| {
                TestkitError::Start("redis cluster", format!("slot {slot} has no owner"))
            })
    }

    /// `CLUSTER KEYSLOT key`.
    pub fn keyslot(&self, key: &str) -> Result<u16, TestkitError> {
        self.any()
            .cli(&["CLUSTER", "KEYSLOT", key])?
            .parse()
            .map_err(|_| TestkitError::Start("redis cluster", "bad KEYSLOT reply".into()))
    }

    /// The ports of the current primaries, in slot order.
    pub fn masters(&self) -> Result<Vec<u16>, TestkitError> {
        let mut masters: Vec<ClusterNode> = self
            .topology(self.any().port())?
            .into_iter()
            .filter(|n| n.master && !n.slots.is_empty())
            .collect();
        masters.sort_by_key(|n| n.slots.first().map(|s| s.0));
        Ok(masters.into_iter().map(|n| n.port).collect())
    }

    /// `CLUSTER FAILOVER` on a replica of the primary on `master`: the replica takes
    /// over its slots (a coordinated failover: no acknowledged write is lost). Returns
    /// the new primary's port once every node agrees.
    pub fn failover(&self, master: u16) -> Result<u16, TestkitError> {
        let nodes = self.topology(master)?;
        let master_id = nodes
            .iter()
            .find(|n| n.port == master)
            .map(|n| n.id.clone())
            .ok_or_else(|| TestkitError::Start("redis cluster", "unknown primary".into()))?;
        let replica = nodes
            .iter()
            .find(|n| n.master_id.as_deref() == Some(&master_id))
            .map(|n| n.port)
            .ok_or_else(|| TestkitError::Start("redis cluster", "primary has no replica".into()))?;
        self.node(replica).cli(&["CLUSTER", "FAILOVER"])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let agreed = self.nodes.iter().all(|n| {
                self.topology(n.port())
                    .map(|t| {
                        t.iter()
                            .any(|x| x.port == replica && x.master && !x.slots.is_empty())
                    })
                    .unwrap_or(false)
            });
            if agreed {
                self.wait_settled(Duration::from_secs(30))?;
                return Ok(replica);
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Start(
                    "redis cluster",
                    format!("failover of {master} to {replica} did not finish in 30 s"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Moves `slot` (and its keys) to the primary on `to`, as resharding does:
    /// IMPORTING/MIGRATING, MIGRATE of every key, then `SETSLOT … NODE` on every primary.
    pub fn move_slot(&self, slot: u16, to: u16) -> Result<(), TestkitError> {
        self.move_slot_paced(slot, to, Duration::ZERO)
    }

    /// [`move_slot`](Self::move_slot) with `pause` after marking the slot
    /// MIGRATING/IMPORTING (commands still run at the source) and again after its keys
    /// moved (commands on the slot's keys get `ASK` to the target), so that clients
    /// meet each phase.
    pub fn move_slot_paced(&self, slot: u16, to: u16, pause: Duration) -> Result<(), TestkitError> {
        let from = self.owner_of_slot(slot, to)?;
        let nodes = self.topology(to)?;
        let id_of = |port: u16| {
            nodes
                .iter()
                .find(|n| n.port == port)
                .map(|n| n.id.clone())
                .ok_or_else(|| TestkitError::Start("redis cluster", format!("no node {port}")))
        };
        let (from_id, to_id) = (id_of(from)?, id_of(to)?);
        let slot_s = slot.to_string();
        self.node(to)
            .cli(&["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &from_id])?;
        self.node(from)
            .cli(&["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &to_id])?;
        std::thread::sleep(pause);
        loop {
            let keys = self
                .node(from)
                .cli(&["CLUSTER", "GETKEYSINSLOT", &slot_s, "100"])?;
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            self.node(from).cli(&args)?;
        }
        std::thread::sleep(pause);
        for n in nodes.iter().filter(|n| n.master) {
            self.node(n.port)
                .cli(&["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id])?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .nodes
            .iter()
            .any(|n| self.owner_of_slot(slot, n.port()).ok() != Some(to))
        {
            if Instant::now() > deadline {
                return Err(TestkitError::Start(
                    "redis cluster",
                    format!("slot {slot} not moved to {to} within 30 s"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Waits until every node reports `cluster_state:ok`, all 16384 slots are served
    /// and every replica's link to its primary is up.
    fn wait_settled(&self, within: Duration) -> Result<(), TestkitError> {
        let deadline = Instant::now() + within;
        loop {
            if self.settled() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Start(
                    "redis cluster",
                    format!("not settled within {within:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn settled(&self) -> bool {
        self.nodes.iter().all(|n| {
            let info = n.cli(&["CLUSTER", "INFO"]).unwrap_or_default();
            let fields: HashMap<&str, &str> = info
                .lines()
                .filter_map(|l| l.trim().split_once(':'))
                .collect();
            let replication = n.cli(&["INFO", "replication"]).unwrap_or_default();
            let replica_ok = !replication.contains("role:slave")
                || replication.contains("master_link_status:up");
            fields.get("cluster_state") == Some(&"ok")
                && fields.get("cluster_slots_ok") == Some(&"16384")
                && replica_ok
        })
    }
}

fn parse_node_line(line: &str) -> Option<ClusterNode> {
    // <id> <ip:port@cport> <flags> <master> <ping-sent> <pong-recv> <epoch> <link> <slot>…
    let parts: Vec<&str> = line.split_whitespace().collect();
    if parts.len() < 8 {
        return None;
    }
    let port = parts[1]
        .split('@')
        .next()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()?;
    let flags = parts[2];
    let master = flags.split(',').any(|f| f == "master");
    let slots = parts[8..]
        .iter()
        .filter(|s| !s.starts_with('['))
        .filter_map(|s| match s.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => s.parse().ok().map(|x| (x, x)),
        })
        .collect();
    Some(ClusterNode {
        id: parts[0].to_string(),
        port,
        master,
        master_id: (parts[3] != "-").then(|| parts[3].to_string()),
        slots,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_cluster_nodes_lines() {
        let n = super::parse_node_line(
            "07c3 127.0.0.1:30004@31004 myself,master - 0 1426238316232 3 connected 0-5460 5461",
        )
        .unwrap();
        assert!(n.master && n.port == 30004 && n.master_id.is_none());
        assert_eq!(n.slots, vec![(0, 5460), (5461, 5461)]);
        let r = super::parse_node_line(
            "e7d1 127.0.0.1:30005@31005 slave 07c3 0 1426238317239 4 connected",
        )
        .unwrap();
        assert!(!r.master && r.master_id.as_deref() == Some("07c3"));
    }
}
