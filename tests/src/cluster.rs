//! A real Redis Cluster for tests: three masters and three replicas, each a private
//! `redis-server` on free loopback ports (the cluster bus too), joined with
//! `redis-cli --cluster create`, with AOF `appendfsync always` so a restarted node keeps its
//! data. Dropping it stops every node.

use std::{process::Stdio, time::Duration};

use wq_server::{connection::RedisTarget, dev::RedisProcess};

use crate::{free_port, pki::Pki};

/// How long the cluster's nodes wait before they call a silent node failed (ms): short, so
/// failover tests take seconds; the replica is promoted about two such periods after the kill.
pub const NODE_TIMEOUT_MS: u64 = 2000;

/// A running cluster.
#[derive(Debug)]
pub struct RedisCluster {
    /// Every node; which of them are masters changes with failovers (see
    /// [`RedisCluster::master_of`]).
    pub nodes: Vec<RedisProcess>,
    /// The nodes' password, if they require one.
    password: Option<String>,
    /// The nodes' TLS ports, in the order of `nodes`, if they serve TLS.
    tls_ports: Vec<u16>,
}

/// What [`RedisCluster::start_tls`] adds to every node.
struct Secured<'a> {
    pki: &'a Pki,
    password: String,
}

impl Secured<'_> {
    fn node_args(&self, tls_port: u16) -> Vec<String> {
        let path = |file: &str| self.pki.path(file).display().to_string();
        [
            "--requirepass",
            &self.password,
            "--masterauth",
            &self.password,
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &path("server.pem"),
            "--tls-key-file",
            &path("server-key.pem"),
            "--tls-ca-cert-file",
            &path("ca.pem"),
            "--tls-auth-clients",
            "no",
            "--tls-replication",
            "yes",
            "--tls-cluster",
            "yes",
        ]
        .map(str::to_owned)
        .into()
    }
}

impl RedisCluster {
    /// Starts three masters with one replica each, or panics saying what is missing.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// As [`RedisCluster::start`], with every node requiring `password` and serving TLS (with
    /// `pki`'s server certificate) on a port of its own, for clients, replication and the
    /// cluster bus; the nodes announce their TLS ports, so clients are redirected there. The
    /// plain ports stay open for the harness's own queries.
    pub async fn start_tls(pki: &Pki, password: &str) -> Self {
        Self::start_with(Some(Secured {
            pki,
            password: password.to_owned(),
        }))
        .await
    }

    async fn start_with(secured: Option<Secured<'_>>) -> Self {
        let mut nodes = Vec::new();
        let mut tls_ports = Vec::new();
        for _ in 0..6 {
            let bus = free_port();
            let node_timeout = NODE_TIMEOUT_MS.to_string();
            let bus = bus.to_string();
            let mut args: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus,
                "--cluster-node-timeout",
                &node_timeout,
                // The healthy shards keep serving while one shard is down (the default `yes`
                // refuses every key then; docs/SCALING.md).
                "--cluster-require-full-coverage",
                "no",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ]
            .map(str::to_owned)
            .into();
            if let Some(secured) = &secured {
                let tls_port = free_port();
                tls_ports.push(tls_port);
                args.extend(secured.node_args(tls_port));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match RedisProcess::start_with(&args).await {
                Ok(node) => nodes.push(node),
                Err(error) => panic!("cannot start a cluster node: {error}"),
            }
        }
        let ports: Vec<u16> = match &secured {
            Some(_) => tls_ports.clone(),
            None => nodes.iter().map(RedisProcess::port).collect(),
        };
        let addresses: Vec<String> = ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let mut create = tokio::process::Command::new("redis-cli");
        if let Some(secured) = &secured {
            create
                .arg("--tls")
                .arg("--cacert")
                .arg(secured.pki.path("ca.pem"))
                .args(["--no-auth-warning", "-a", &secured.password]);
        }
        let created = create
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "cannot run redis-cli ({error}); install it with `sudo apt-get install \
                     redis-tools`"
                )
            });
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        let cluster = Self {
            nodes,
            password: secured.map(|secured| secured.password),
            tls_ports,
        };
        cluster.wait_ok().await;
        cluster.wait_replicas_online().await;
        cluster
    }

    /// The TLS nodes as a `--redis-url` list with the password (for [`RedisCluster::start_tls`]).
    pub fn tls_urls(&self) -> String {
        let password = self.password.as_deref().unwrap_or_default();
        self.tls_ports
            .iter()
            .map(|port| format!("rediss://:{password}@127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `cmd` on `node` (through its plain port, with the password), or `None` when the node
    /// does not answer within a second.
    async fn query<T: redis::FromRedisValue>(
        &self,
        node: &RedisProcess,
        cmd: &redis::Cmd,
    ) -> Option<T> {
        let client = redis::Client::open(self.plain_url(node)).ok()?;
        let attempt = async {
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            cmd.query_async::<T>(&mut conn).await.ok()
        };
        tokio::time::timeout(Duration::from_secs(1), attempt)
            .await
            .ok()
            .flatten()
    }

    /// The node listening on `port`, its plain or its TLS port (which nodes announce when they
    /// serve TLS).
    fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes
            .iter()
            .position(|node| node.port() == port)
            .or_else(|| self.tls_ports.iter().position(|tls| *tls == port))
    }

    /// `node`'s plain URL, with the password if the nodes require one.
    fn plain_url(&self, node: &RedisProcess) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", node.port()),
            None => node.url(),
        }
    }

    /// The nodes as a `--redis-url` list.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(RedisProcess::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The target a broker is given for this cluster.
    pub fn target(&self) -> RedisTarget {
        RedisTarget::parse(
            wq_server::connection::RedisMode::Cluster,
            &self.urls(),
            None,
        )
        .expect("cluster URLs")
    }

    /// Waits until every running node reports `cluster_state:ok` and agrees on three masters
    /// that cover every slot.
    pub async fn wait_ok(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut ok = true;
            for node in self.nodes.iter().filter(|node| node.pid().is_some()) {
                let info: String = match self.query(node, redis::cmd("CLUSTER").arg("INFO")).await {
                    Some(info) => info,
                    None => {
                        ok = false;
                        break;
                    }
                };
                ok &= info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384");
            }
            if ok {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every master has a replica that follows it (`state=online`), so that
    /// writes can be confirmed by `WAIT` from the start.
    async fn wait_replicas_online(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut masters = 0;
            let mut online = 0;
            for node in &self.nodes {
                let info: Option<String> = self
                    .query(node, redis::cmd("INFO").arg("replication"))
                    .await;
                let info = info.unwrap_or_default();
                if info.contains("role:master") {
                    masters += 1;
                    online += usize::from(info.contains("state=online"));
                }
            }
            if masters == 3 && online == 3 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the replicas did not follow their masters within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index in [`RedisCluster::nodes`] of the master that serves `queue` now.
    pub async fn master_of(&self, queue: &str) -> usize {
        self.master_of_key(&format!("{{{queue}}}")).await
    }

    /// The index in [`RedisCluster::nodes`] of the master that serves `key`'s slot now, as
    /// the first node that answers sees it.
    pub async fn master_of_key(&self, key: &str) -> usize {
        let slot = self.slot_of_key(key).await;
        for node in self.nodes.iter().filter(|node| node.pid().is_some()) {
            let Some(slots) = self
                .query::<redis::Value>(node, redis::cmd("CLUSTER").arg("SLOTS"))
                .await
            else {
                continue;
            };
            if let Some(port) = master_port_for(&slots, slot)
                && let Some(index) = self.index_of_port(port)
            {
                return index;
            }
        }
        panic!("no node knows who serves slot {slot} of {key}");
    }

    /// The slot of `queue`'s keys (`CLUSTER KEYSLOT`).
    pub async fn slot_of(&self, queue: &str) -> u16 {
        self.slot_of_key(&format!("{{{queue}}}")).await
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub async fn slot_of_key(&self, key: &str) -> u16 {
        for node in self.nodes.iter().filter(|node| node.pid().is_some()) {
            if let Some(slot) = self
                .query(node, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
                .await
            {
                return slot;
            }
        }
        panic!("no cluster node answers CLUSTER KEYSLOT");
    }

    /// The index in [`RedisCluster::nodes`] of the master that every running node says serves
    /// `slot`, or `None` while they disagree (a topology change spreading) or one does not
    /// answer.
    pub async fn agreed_owner(&self, slot: u16) -> Option<usize> {
        let mut owner = None;
        for node in self.nodes.iter().filter(|node| node.pid().is_some()) {
            let slots = self
                .query::<redis::Value>(node, redis::cmd("CLUSTER").arg("SLOTS"))
                .await?;
            let port = master_port_for(&slots, slot)?;
            if owner.is_some_and(|seen| seen != port) {
                return None;
            }
            owner = Some(port);
        }
        self.index_of_port(owner?)
    }

    /// Runs `cmd` on node `index` and returns its reply, failing the test with Redis's error.
    pub async fn on_node<T: redis::FromRedisValue>(&self, index: usize, cmd: &redis::Cmd) -> T {
        let node = &self.nodes[index];
        let what: Vec<String> = cmd
            .args_iter()
            .take(3)
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => "<cursor>".into(),
            })
            .collect();
        let attempt = async {
            let mut conn = crate::redis_conn(node).await;
            cmd.query_async::<T>(&mut conn).await
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => panic!(
                "node {index} (port {}) refused {}: {error}",
                node.port(),
                what.join(" ")
            ),
            Err(_) => panic!(
                "node {index} (port {}) did not answer {} within 10 s",
                node.port(),
                what.join(" ")
            ),
        }
    }

    /// The cluster node id of node `index` (`CLUSTER MYID`).
    pub async fn node_id(&self, index: usize) -> String {
        self.on_node(index, redis::cmd("CLUSTER").arg("MYID")).await
    }

    /// Whether node `index` is a master now (`ROLE`).
    pub async fn is_master(&self, index: usize) -> bool {
        let role: Vec<redis::Value> = self.on_node(index, &redis::cmd("ROLE")).await;
        role.into_iter()
            .next()
            .and_then(|role| redis::from_redis_value::<String>(role).ok())
            .is_some_and(|role| role == "master")
    }

    /// The index of a running replica that follows master `master` (`ROLE` of every other
    /// node: a replica answers `slave`, its master's host and port, ...).
    pub async fn replica_of(&self, master: usize) -> usize {
        let port = i64::from(self.nodes[master].port());
        for index in 0..self.nodes.len() {
            if index == master || self.nodes[index].pid().is_none() {
                continue;
            }
            let role: Vec<redis::Value> = self.on_node(index, &redis::cmd("ROLE")).await;
            let is_slave = role
                .first()
                .and_then(|role| redis::from_redis_value_ref::<String>(role).ok())
                .is_some_and(|role| role == "slave");
            let follows = role
                .get(2)
                .and_then(|port| redis::from_redis_value_ref::<i64>(port).ok())
                == Some(port);
            if is_slave && follows {
                return index;
            }
        }
        panic!("no running node replicates node {master}");
    }

    /// Has replica `replica` take over `slot`'s shard from its master with `CLUSTER FAILOVER`
    /// (the coordinated switch: the master holds its clients until the replica has caught up,
    /// so nothing acknowledged is lost), and returns once the roles have swapped and every node
    /// agrees that the replica serves `slot`.
    pub async fn manual_failover(&self, replica: usize, slot: u16) {
        let master = self
            .agreed_owner(slot)
            .await
            .unwrap_or_else(|| panic!("the nodes disagree on who serves slot {slot}"));
        let _: String = self
            .on_node(replica, redis::cmd("CLUSTER").arg("FAILOVER"))
            .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.is_master(replica).await
                && !self.is_master(master).await
                && self.agreed_owner(slot).await == Some(replica)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {replica} did not take over slot {slot} from node {master} within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Moves `slots` from the masters serving them to master `to` with the manual protocol
    /// that `redis-cli --cluster reshard` follows: `SETSLOT IMPORTING` on the target,
    /// `SETSLOT MIGRATING` on the source, `MIGRATE` of the slot's keys in batches of
    /// [`MIGRATE_BATCH`] in `GETKEYSINSLOT` order, then `SETSLOT NODE` on the target, the
    /// source and the other masters. Once about half of every slot's keys have moved it holds
    /// for `hold`, so that calls meet `ASK` (a key already moved) and `TRYAGAIN` (a script whose
    /// keys are split). Returns once every node agrees that `to` serves the slots.
    pub async fn migrate_slots(&self, slots: &[u16], to: usize, hold: Duration) -> Migration {
        let target_id = self.node_id(to).await;
        let mut sources = Vec::new();
        for &slot in slots {
            let source = self
                .agreed_owner(slot)
                .await
                .unwrap_or_else(|| panic!("the nodes disagree on who serves slot {slot}"));
            assert_ne!(source, to, "node {to} already serves slot {slot}");
            let source_id = self.node_id(source).await;
            let _: String = self
                .on_node(to, setslot(slot, "IMPORTING").arg(&source_id))
                .await;
            let _: String = self
                .on_node(source, setslot(slot, "MIGRATING").arg(&target_id))
                .await;
            sources.push(source);
        }
        let mut migration = Migration::default();
        for (&slot, &source) in slots.iter().zip(&sources) {
            let held: usize = self
                .on_node(
                    source,
                    redis::cmd("CLUSTER").arg("COUNTKEYSINSLOT").arg(slot),
                )
                .await;
            migration.keys += held;
            migration.before_hold += self
                .move_keys(source, to, slot, Some(held.div_ceil(2)))
                .await;
        }
        tokio::time::sleep(hold).await;
        for (&slot, &source) in slots.iter().zip(&sources) {
            migration.after_hold += self.move_keys(source, to, slot, None).await;
            let _: String = self
                .on_node(to, setslot(slot, "NODE").arg(&target_id))
                .await;
            // Keys the source still holds would be deleted when it learns it lost the slot.
            migration.after_hold += self.move_keys(source, to, slot, None).await;
            let _: String = self
                .on_node(source, setslot(slot, "NODE").arg(&target_id))
                .await;
            for index in 0..self.nodes.len() {
                let other_master = index != to
                    && index != source
                    && self.nodes[index].pid().is_some()
                    && self.is_master(index).await;
                if other_master {
                    let _: String = self
                        .on_node(index, setslot(slot, "NODE").arg(&target_id))
                        .await;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for &slot in slots {
            while self.agreed_owner(slot).await != Some(to) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the nodes did not agree within 30 s that node {to} serves slot {slot}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        migration
    }

    /// Moves the keys of `slot` from `source` to `to`, a batch at a time, until `source` holds
    /// none or at least `limit` have moved; returns how many moved (keys deleted between
    /// `GETKEYSINSLOT` and `MIGRATE` included).
    async fn move_keys(&self, source: usize, to: usize, slot: u16, limit: Option<usize>) -> usize {
        let port = self.nodes[to].port();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut moved = 0;
        while limit.is_none_or(|limit| moved < limit) {
            let keys: Vec<String> = self
                .on_node(
                    source,
                    redis::cmd("CLUSTER")
                        .arg("GETKEYSINSLOT")
                        .arg(slot)
                        .arg(MIGRATE_BATCH),
                )
                .await;
            if keys.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {source} still holds keys of slot {slot} after 30 s of MIGRATE"
            );
            // OK, or NOKEY when every key of the batch was deleted since it was listed.
            let _: String = self
                .on_node(
                    source,
                    redis::cmd("MIGRATE")
                        .arg("127.0.0.1")
                        .arg(port)
                        .arg("")
                        .arg(0)
                        .arg(MIGRATE_TIMEOUT_MS)
                        .arg("KEYS")
                        .arg(&keys),
                )
                .await;
            moved += keys.len();
        }
        moved
    }

    /// A queue name for each master at start-up (`{q4}`, `{q1}` and `{q2}` land on the three
    /// slot ranges `redis-cli --cluster create` gives).
    pub fn queue_per_master() -> [&'static str; 3] {
        ["q4", "q1", "q2"]
    }

    /// A client connection to the cluster, for inspecting keys.
    pub async fn conn(&self) -> redis::cluster_async::ClusterConnection {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .filter(|node| node.pid().is_some())
            .map(|node| self.plain_url(node))
            .collect();
        redis::cluster::ClusterClient::new(nodes)
            .expect("cluster client")
            .get_async_connection()
            .await
            .expect("connecting to the cluster")
    }

    /// Error replies by error code (`MOVED`, `ASK`, `TRYAGAIN`, ...) summed over the running
    /// nodes (`INFO errorstats`; a restarted node starts from zero).
    pub async fn error_counts(&self) -> std::collections::BTreeMap<String, u64> {
        let mut counts = std::collections::BTreeMap::new();
        for index in 0..self.nodes.len() {
            if self.nodes[index].pid().is_none() {
                continue;
            }
            let stats: String = self
                .on_node(index, redis::cmd("INFO").arg("errorstats"))
                .await;
            for line in stats.lines() {
                let Some((code, rest)) = line
                    .strip_prefix("errorstat_")
                    .and_then(|line| line.split_once(':'))
                else {
                    continue;
                };
                let count: u64 = rest
                    .strip_prefix("count=")
                    .and_then(|count| count.trim().parse().ok())
                    .unwrap_or(0);
                *counts.entry(code.to_owned()).or_default() += count;
            }
        }
        counts
    }

    /// Sum of `calls=` of every command in `INFO commandstats` over the running nodes.
    pub async fn commands(&self) -> u64 {
        let mut total = 0;
        for node in self.nodes.iter().filter(|node| node.pid().is_some()) {
            total += crate::command_counts(node).await.values().sum::<u64>();
        }
        total
    }
}

/// Keys per `MIGRATE` of [`RedisCluster::migrate_slots`] (`redis-cli --cluster reshard`'s
/// default `--cluster-pipeline`).
pub const MIGRATE_BATCH: usize = 10;

/// How long one `MIGRATE` may take (ms).
const MIGRATE_TIMEOUT_MS: u64 = 5000;

/// What [`RedisCluster::migrate_slots`] did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Migration {
    /// Keys the slots held when the migration began.
    pub keys: usize,
    /// Keys moved before the hold (keys deleted meanwhile included).
    pub before_hold: usize,
    /// Keys moved after the hold.
    pub after_hold: usize,
}

/// `CLUSTER SETSLOT <slot> <subcommand>`, to be completed with a node id.
fn setslot(slot: u16, subcommand: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("SETSLOT").arg(slot).arg(subcommand);
    cmd
}

/// The master's port in a `CLUSTER SLOTS` reply for `slot`.
fn master_port_for(slots: &redis::Value, slot: u16) -> Option<u16> {
    let redis::Value::Array(ranges) = slots else {
        return None;
    };
    for range in ranges {
        let redis::Value::Array(fields) = range else {
            continue;
        };
        let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
            (fields.first(), fields.get(1))
        else {
            continue;
        };
        if (*start..=*end).contains(&i64::from(slot))
            && let Some(redis::Value::Array(master)) = fields.get(2)
            && let Some(redis::Value::Int(port)) = master.get(1)
        {
            return u16::try_from(*port).ok();
        }
    }
    None
}
