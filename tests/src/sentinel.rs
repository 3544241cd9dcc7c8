//! A real Sentinel setup for tests: a master and two replicas (private `redis-server`s with AOF
//! `appendfsync always`) watched by three `redis-sentinel`s on free loopback ports, each with
//! its own writable config file. Dropping it stops every process.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::process::{Child, Command};
use wq_server::{
    connection::{RedisMode, RedisTarget},
    dev::RedisProcess,
};

/// The master group's name.
pub const MASTER_NAME: &str = "wqmaster";

/// Replicas of the master: two, so that after a failover the new master still has one, and
/// writes that wait for a replica (`--redis-wait-replicas 1`) go on.
pub const REPLICAS: usize = 2;

/// How long sentinels wait before they call a silent master down (ms).
pub const DOWN_AFTER_MS: u64 = 1000;

/// A running Sentinel setup.
#[derive(Debug)]
pub struct RedisSentinels {
    /// The master at start-up, then its replicas ([`RedisSentinels::master`] says which
    /// serves now).
    pub servers: Vec<RedisProcess>,
    sentinels: Vec<(Child, u16)>,
    _dir: tempfile::TempDir,
}

impl RedisSentinels {
    /// Starts the master, its replica and three sentinels, and waits until the sentinels know
    /// both servers; panics saying what is missing.
    pub async fn start() -> Self {
        let persistent = [
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ];
        let master = RedisProcess::start_with(&persistent)
            .await
            .unwrap_or_else(|error| panic!("cannot start the master: {error}"));
        let master_port = master.port().to_string();
        let mut replica_args = persistent.to_vec();
        replica_args.extend(["--replicaof", "127.0.0.1", &master_port]);
        let mut servers = vec![master];
        for _ in 0..REPLICAS {
            let replica = RedisProcess::start_with(&replica_args)
                .await
                .unwrap_or_else(|error| panic!("cannot start a replica: {error}"));
            servers.push(replica);
        }
        let dir = tempfile::Builder::new()
            .prefix("wq-sentinels-")
            .tempdir()
            .expect("a temporary directory");
        let mut sentinels = Vec::new();
        for index in 0..3 {
            let port = crate::free_port();
            let conf = dir.path().join(format!("sentinel-{index}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
                     sentinel failover-timeout {MASTER_NAME} 5000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    dir = dir.path().display(),
                    log = log_of(&conf).display(),
                ),
            )
            .expect("writing a sentinel's config");
            let child = Command::new("redis-sentinel")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|error| {
                    panic!(
                        "cannot run redis-sentinel ({error}); install it with `sudo apt-get \
                         install redis-sentinel`"
                    )
                });
            sentinels.push((child, port));
        }
        let setup = Self {
            servers,
            sentinels,
            _dir: dir,
        };
        setup.wait_ready().await;
        setup
    }

    /// The sentinels as a `--redis-url` list.
    pub fn urls(&self) -> String {
        self.sentinels
            .iter()
            .map(|(_, port)| format!("redis://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The target a broker is given for this setup.
    pub fn target(&self) -> RedisTarget {
        RedisTarget::parse(RedisMode::Sentinel, &self.urls(), Some(MASTER_NAME))
            .expect("sentinel URLs")
    }

    /// The index in [`RedisSentinels::servers`] of the server the sentinels name as master.
    pub async fn master(&self) -> Option<usize> {
        let port = self.master_port().await?;
        self.servers.iter().position(|server| server.port() == port)
    }

    /// Asks a sentinel for a failover (`SENTINEL FAILOVER`), as an operator would.
    pub async fn failover(&self) {
        let (_, port) = self.sentinels.first().expect("a sentinel");
        let _: String = query(
            *port,
            redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER_NAME),
        )
        .await
        .expect("SENTINEL FAILOVER");
    }

    async fn master_port(&self) -> Option<u16> {
        for (_, port) in &self.sentinels {
            let address: Option<Vec<String>> = query(
                *port,
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(MASTER_NAME),
            )
            .await;
            if let Some(port) = address.and_then(|a| a.get(1).and_then(|p| p.parse().ok())) {
                return Some(port);
            }
        }
        None
    }

    /// Waits until every sentinel knows the master, its replicas and the other sentinels (so
    /// that a failover can be agreed on), and the replicas have synchronised with the master.
    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut ready = true;
            for (_, port) in &self.sentinels {
                let master: Option<Vec<redis::Value>> =
                    query(*port, redis::cmd("SENTINEL").arg("MASTER").arg(MASTER_NAME)).await;
                let fields = flat_pairs(master.unwrap_or_default());
                ready &= fields
                    .get("num-slaves")
                    .is_some_and(|n| *n == REPLICAS.to_string())
                    && fields.get("num-other-sentinels").is_some_and(|n| n == "2");
            }
            for replica in &self.servers[1..] {
                let replication: Option<String> =
                    query(replica.port(), redis::cmd("INFO").arg("replication")).await;
                ready &= replication.is_some_and(|info| info.contains("master_link_status:up"));
            }
            if ready {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the sentinels did not see the replica and each other within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn log_of(conf: &std::path::Path) -> PathBuf {
    conf.with_extension("log")
}

/// A sentinel's `KEY VALUE KEY VALUE …` reply as a map.
fn flat_pairs(values: Vec<redis::Value>) -> std::collections::HashMap<String, String> {
    let text: Vec<String> = values
        .into_iter()
        .map(|value| redis::from_redis_value(value).unwrap_or_default())
        .collect();
    text.chunks(2)
        .filter_map(|pair| Some((pair.first()?.clone(), pair.get(1)?.clone())))
        .collect()
}

async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Option<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        cmd.query_async::<T>(&mut conn).await.ok()
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}
