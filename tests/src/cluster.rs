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
        let slot = self.slot_of(queue).await;
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
        panic!("no node knows who serves slot {slot} of {queue}");
    }

    /// The index in [`RedisCluster::nodes`] of the replica that follows the master
    /// `nodes[master]`.
    pub async fn replica_of(&self, master: usize) -> usize {
        let info: String = self
            .query(&self.nodes[master], redis::cmd("INFO").arg("replication"))
            .await
            .expect("INFO replication of a master");
        let port = info
            .lines()
            .find_map(|line| line.strip_prefix("slave0:"))
            .and_then(|replica| replica.split(',').find_map(|kv| kv.strip_prefix("port=")))
            .and_then(|port| port.trim().parse::<u16>().ok())
            .expect("the master has a replica");
        self.index_of_port(port)
            .expect("the replica is one of the nodes")
    }

    /// The slot of `queue`'s keys (`CLUSTER KEYSLOT`).
    pub async fn slot_of(&self, queue: &str) -> u16 {
        for node in self.nodes.iter().filter(|node| node.pid().is_some()) {
            let tag = format!("{{{queue}}}");
            if let Some(slot) = self
                .query(node, redis::cmd("CLUSTER").arg("KEYSLOT").arg(&tag))
                .await
            {
                return slot;
            }
        }
        panic!("no cluster node answers CLUSTER KEYSLOT");
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

    /// Sum of `calls=` of every command in `INFO commandstats` over the running nodes.
    pub async fn commands(&self) -> u64 {
        let mut total = 0;
        for node in self.nodes.iter().filter(|node| node.pid().is_some()) {
            total += crate::command_counts(node).await.values().sum::<u64>();
        }
        total
    }
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
