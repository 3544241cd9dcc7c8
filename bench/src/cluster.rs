//! `--redis-mode cluster`: a private Redis Cluster of three masters with one replica each
//! (`--cluster-replicas 0`: none, to see what replication costs the masters), every node a private `redis-server` on free loopback ports (the cluster bus too), joined with
//! `redis-cli --cluster create`. The nodes persist nothing, as the standalone bench's Redis
//! ([`RedisProcess::start`]), so their CPU per item compares with its. Dropping it stops every
//! node.
//!
//! A compact counterpart of the test harness's cluster (`tests/src/cluster.rs`), which keeps AOF
//! on for its restart tests and offers failover helpers the bench does not need.

use std::{collections::BTreeMap, process::Stdio, time::Duration};

use anyhow::Context as _;
use wq_server::{
    connection::{RedisMode, RedisTarget},
    dev::RedisProcess,
};

/// Masters of the cluster.
const MASTERS: usize = 3;

/// How long nodes wait before they call a silent node failed (ms); Redis' default, as nothing
/// here fails.
const NODE_TIMEOUT_MS: &str = "15000";

/// Longest wait for the cluster to agree on its slots and for the replicas to follow.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// What a node is in the cluster (or the one standalone server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Role {
    /// The one server of a standalone setup.
    Standalone,
    /// A master, serving some slots.
    Master,
    /// A replica of the master at this `host:port`.
    Replica(String),
}

/// One Redis server whose counters the bench reads.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) url: String,
    /// `host:port`, as the cluster names it (`CLUSTER SLOTS`, `INFO replication`).
    pub(crate) address: String,
    pub(crate) role: Role,
}

impl Node {
    /// The one server at `url`.
    ///
    /// # Errors
    /// When `url` is not a Redis URL.
    pub(crate) fn standalone(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).context("Redis URL")?;
        Ok(Self {
            url: url.to_owned(),
            address: client.get_connection_info().addr().to_string(),
            role: Role::Standalone,
        })
    }

    /// The master whose queues this server's work is about: itself, or the one it replicates.
    pub(crate) fn master(&self) -> &str {
        match &self.role {
            Role::Replica(master) => master,
            Role::Standalone | Role::Master => &self.address,
        }
    }
}

/// A running private cluster.
#[derive(Debug)]
pub(crate) struct Cluster {
    nodes: Vec<RedisProcess>,
    /// Replicas of each master.
    replicas: usize,
}

impl Cluster {
    /// Starts the nodes, creates the cluster with `replicas` replicas of each master and waits
    /// until every slot is served and every replica is online.
    ///
    /// # Errors
    /// When a node does not start (e.g. `redis-server` is missing), `redis-cli` is missing or
    /// fails, or the cluster is not ready within 30 s.
    pub(crate) async fn start(replicas: usize) -> anyhow::Result<Self> {
        let count = MASTERS * (1 + replicas);
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            nodes.push(start_node().await?);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        let created = tokio::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await
            .context("running redis-cli (install it with `sudo apt-get install redis-tools`)")?;
        anyhow::ensure!(
            created.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        let cluster = Self { nodes, replicas };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// The target the broker is given: every node, as `--redis-url` would list them.
    pub(crate) fn target(&self) -> anyhow::Result<RedisTarget> {
        let urls: Vec<String> = self.nodes.iter().map(RedisProcess::url).collect();
        RedisTarget::parse(RedisMode::Cluster, &urls.join(","), None)
            .map_err(anyhow::Error::msg)
            .context("cluster URLs")
    }

    /// Every node with its role now, masters first.
    ///
    /// # Errors
    /// When a node does not answer `INFO replication`.
    pub(crate) async fn nodes(&self) -> anyhow::Result<Vec<Node>> {
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for process in &self.nodes {
            let info: String = query(&process.url(), redis::cmd("INFO").arg("replication"))
                .await
                .context("INFO replication")?;
            let role = match (field(&info, "master_host"), field(&info, "master_port")) {
                (Some(host), Some(port)) => Role::Replica(format!("{host}:{port}")),
                _ => Role::Master,
            };
            nodes.push(Node {
                url: process.url(),
                address: format!("127.0.0.1:{}", process.port()),
                role,
            });
        }
        nodes.sort_by_key(|node| (node.role != Role::Master, node.address.clone()));
        Ok(nodes)
    }

    /// The master serving each slot range now, from `CLUSTER SLOTS`: (first, last,
    /// `host:port`).
    ///
    /// # Errors
    /// When the first node does not answer or the reply has an unexpected shape.
    pub(crate) async fn slot_ranges(&self) -> anyhow::Result<Vec<(u16, u16, String)>> {
        let url = self.nodes.first().context("a cluster node")?.url();
        let ranges: Vec<Vec<redis::Value>> = query(&url, redis::cmd("CLUSTER").arg("SLOTS"))
            .await
            .context("CLUSTER SLOTS")?;
        ranges
            .into_iter()
            .map(|fields| {
                let number = |value: Option<&redis::Value>| -> anyhow::Result<u16> {
                    match value {
                        Some(redis::Value::Int(n)) => Ok(u16::try_from(*n)?),
                        _ => anyhow::bail!("CLUSTER SLOTS: not a number"),
                    }
                };
                let master: &[redis::Value] = match fields.get(2) {
                    Some(redis::Value::Array(master)) => master,
                    _ => anyhow::bail!("CLUSTER SLOTS: no master"),
                };
                let host: String = match master.first() {
                    Some(host) => redis::from_redis_value_ref(host)?,
                    None => anyhow::bail!("CLUSTER SLOTS: no master host"),
                };
                Ok((
                    number(fields.first())?,
                    number(fields.get(1))?,
                    format!("{host}:{}", number(master.get(1))?),
                ))
            })
            .collect()
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`, which honours its hash tag).
    ///
    /// # Errors
    /// When the first node does not answer.
    pub(crate) async fn slot_of(&self, key: &str) -> anyhow::Result<u16> {
        let url = self.nodes.first().context("a cluster node")?.url();
        query(&url, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await
            .context("CLUSTER KEYSLOT")
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        loop {
            if self.ready().await {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the cluster did not serve every slot with {MASTERS} masters and {} online \
                 replicas each within {READY_WITHIN:?}",
                self.replicas
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every node reports `cluster_state:ok` with all slots served, and every replica is online
    /// (so replication is part of what is measured from the first item on).
    async fn ready(&self) -> bool {
        let mut online = 0;
        let mut masters = 0;
        for node in &self.nodes {
            let url = node.url();
            let state = query::<String>(&url, redis::cmd("CLUSTER").arg("INFO")).await;
            let replication = query::<String>(&url, redis::cmd("INFO").arg("replication")).await;
            let (Ok(state), Ok(replication)) = (state, replication) else {
                return false;
            };
            if !state.contains("cluster_state:ok") || !state.contains("cluster_slots_ok:16384") {
                return false;
            }
            if replication.contains("role:master") {
                masters += 1;
                online += replication.matches("state=online").count();
            }
        }
        masters == MASTERS && online == MASTERS * self.replicas
    }
}

/// Starts one cluster node; a fresh bus port on each try, as another process may take it.
async fn start_node() -> anyhow::Result<RedisProcess> {
    let mut last = None;
    for _ in 0..3 {
        let bus = free_port()?.to_string();
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            &bus,
            "--cluster-node-timeout",
            NODE_TIMEOUT_MS,
            // As the standalone bench's Redis: nothing written to disk.
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        match RedisProcess::start_with(&args).await {
            Ok(node) => return Ok(node),
            Err(error) => last = Some(error),
        }
    }
    Err(last
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("cannot start a cluster node")))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The value of `name:` in an `INFO` reply.
pub(crate) fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.trim()
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
    })
}

/// The counters of one node that the `shards` phase compares before and after.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counters {
    /// `used_cpu_user` and `used_cpu_sys`: CPU seconds the server used since it started, all its
    /// threads together.
    cpu_user: f64,
    cpu_sys: f64,
    /// `total_reads_processed`: reads from client sockets (each `read()` may bring several
    /// commands, so fewer reads per command means more commands per batch).
    reads: u64,
    /// Calls by command (`INFO commandstats`, commands run inside scripts included).
    calls: BTreeMap<String, u64>,
}

/// What a node did between two [`Counters`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    pub(crate) cpu_user: f64,
    pub(crate) cpu_sys: f64,
    /// Commands, those inside scripts included, the `INFO` calls left out.
    pub(crate) commands: u64,
    /// Script calls among them (`EVALSHA`, `EVAL` and their read-only forms).
    pub(crate) scripts: u64,
    /// Reads from client sockets.
    pub(crate) reads: u64,
}

impl Usage {
    /// User and system CPU seconds together.
    pub(crate) fn cpu(&self) -> f64 {
        self.cpu_user + self.cpu_sys
    }
}

impl std::ops::Add for Usage {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            cpu_user: self.cpu_user + other.cpu_user,
            cpu_sys: self.cpu_sys + other.cpu_sys,
            commands: self.commands + other.commands,
            scripts: self.scripts + other.scripts,
            reads: self.reads + other.reads,
        }
    }
}

impl Counters {
    /// Reads the node's counters.
    ///
    /// # Errors
    /// When the node does not answer or the reply lacks the CPU or read fields.
    pub(crate) async fn read(url: &str) -> anyhow::Result<Self> {
        let info: String = query(
            url,
            redis::cmd("INFO")
                .arg("cpu")
                .arg("stats")
                .arg("commandstats"),
        )
        .await
        .with_context(|| format!("INFO cpu stats commandstats of {url}"))?;
        fn number<T: std::str::FromStr>(info: &str, name: &str) -> anyhow::Result<T> {
            field(info, name)
                .with_context(|| format!("INFO has no {name}"))?
                .parse()
                .map_err(|_| anyhow::anyhow!("{name} is not a number"))
        }
        Ok(Self {
            cpu_user: number(&info, "used_cpu_user")?,
            cpu_sys: number(&info, "used_cpu_sys")?,
            reads: number(&info, "total_reads_processed")?,
            calls: crate::idle::parse_commandstats(&info).into_iter().collect(),
        })
    }

    /// What happened between `before` and `self`.
    pub(crate) fn since(&self, before: &Self) -> Usage {
        let mut usage = Usage {
            cpu_user: self.cpu_user - before.cpu_user,
            cpu_sys: self.cpu_sys - before.cpu_sys,
            reads: self.reads.saturating_sub(before.reads),
            ..Usage::default()
        };
        for (name, calls) in &self.calls {
            let delta = calls.saturating_sub(before.calls.get(name).copied().unwrap_or(0));
            if name != "info" {
                usage.commands += delta;
            }
            if name.starts_with("eval") {
                usage.scripts += delta;
            }
        }
        usage
    }
}

/// One query on a fresh connection to one node, within a few seconds.
async fn query<T: redis::FromRedisValue>(url: &str, cmd: &redis::Cmd) -> anyhow::Result<T> {
    let client = redis::Client::open(url).context("node URL")?;
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        cmd.query_async::<T>(&mut conn).await
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .context("the node did not answer within 5 s")?
        .map_err(anyhow::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_fields_are_found_by_their_whole_name() {
        let info =
            "# CPU\r\nused_cpu_sys:1.5\r\nused_cpu_sys_children:9.0\r\nused_cpu_user:0.25\r\n";
        assert_eq!(field(info, "used_cpu_sys"), Some("1.5"));
        assert_eq!(field(info, "used_cpu_user"), Some("0.25"));
        assert_eq!(field(info, "used_cpu"), None);
    }

    #[test]
    fn counters_since_leave_out_info_and_count_scripts() {
        let before = Counters {
            cpu_user: 1.0,
            cpu_sys: 0.5,
            reads: 100,
            calls: [("evalsha".to_owned(), 10), ("info".to_owned(), 3)].into(),
        };
        let after = Counters {
            cpu_user: 1.25,
            cpu_sys: 0.75,
            reads: 130,
            calls: [
                ("evalsha".to_owned(), 30),
                ("info".to_owned(), 9),
                ("zadd".to_owned(), 5),
            ]
            .into(),
        };
        let usage = after.since(&before);
        assert!((usage.cpu() - 0.5).abs() < 1e-9);
        assert_eq!((usage.commands, usage.scripts, usage.reads), (25, 20, 30));
    }
}
