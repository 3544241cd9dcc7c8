//! How the broker reaches Redis (`--redis-mode`): one server, a Redis Cluster, or the master of
//! a Sentinel-watched group.
//!
//! [`RedisTarget`] says where Redis is; [`RedisConnection`] is the one multiplexed connection
//! every store call shares, whatever the mode, so the store above it is the same code for all
//! three. Every mode connects lazily: the broker starts (NOT_SERVING) while Redis is down and
//! connects when it answers.
//!
//! - Standalone: redis-rs' `ConnectionManager`, which reconnects by itself.
//! - Cluster: redis-rs' cluster connection, which follows `MOVED`/`ASK`, waits out `TRYAGAIN`
//!   and `CLUSTERDOWN`, and refreshes its slot map after a failover. Its retries are spaced to
//!   fit the Redis timeout, which bounds every call anyway.
//! - Sentinel: the master the sentinels name, reached through a `ConnectionManager` that is
//!   dropped as soon as it answers `READONLY` (a demoted master) or the sentinels announce
//!   `+switch-master` (see [`sentinel`]); the next call asks the sentinels again.
//!
//! The notification listener and the sentinel watchers keep their pub/sub subscriptions up
//! with `subscription` (crate-private).

pub mod sentinel;
pub(crate) mod subscription;

use std::{sync::Arc, time::Duration};

use clap::ValueEnum;
use redis::{
    Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClientBuilder, ClusterConfig},
    cluster_async::ClusterConnection,
    cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo},
};

use sentinel::SentinelMaster;

/// Which kind of Redis deployment `--redis-url` names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum RedisMode {
    /// One Redis server (or a proxy in front of several).
    #[default]
    Standalone,
    /// A Redis Cluster: `--redis-url` lists seed nodes.
    Cluster,
    /// A master watched by Redis Sentinel: `--redis-url` lists the sentinels, and
    /// `--sentinel-master` names the master group.
    Sentinel,
}

/// Where the broker's Redis is.
#[derive(Debug, Clone)]
pub enum RedisTarget {
    /// One server.
    Standalone(redis::Client),
    /// A cluster, given by some of its nodes.
    Cluster(Vec<ConnectionInfo>),
    /// The master group `master` of these sentinels. Credentials and TLS of the URLs are used
    /// for the sentinels and for the master alike.
    Sentinel {
        /// The sentinels.
        sentinels: Vec<ConnectionInfo>,
        /// The master group's name (`sentinel monitor <name> ...`).
        master: String,
    },
}

impl From<redis::Client> for RedisTarget {
    fn from(client: redis::Client) -> Self {
        Self::Standalone(client)
    }
}

impl RedisTarget {
    /// Reads `--redis-mode`, `--redis-url` (comma-separated) and `--sentinel-master`.
    ///
    /// # Errors
    /// A one-line message naming the flag when the URLs or the mode's settings are invalid.
    pub fn parse(
        mode: RedisMode,
        urls: &str,
        sentinel_master: Option<&str>,
    ) -> Result<Self, String> {
        // One server's URL is taken whole: a comma may be part of its password.
        let urls: Vec<&str> = if mode == RedisMode::Standalone {
            vec![urls]
        } else {
            urls.split(',').collect()
        };
        let urls: Vec<&str> = urls
            .into_iter()
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .collect();
        if urls.is_empty() {
            return Err("--redis-url is empty".into());
        }
        let infos = urls
            .iter()
            .map(|url| {
                url.into_connection_info()
                    .map_err(|error| format!("invalid --redis-url {:?}: {error}", redact(url)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if mode != RedisMode::Sentinel && sentinel_master.is_some() {
            return Err("--sentinel-master is only for --redis-mode sentinel".into());
        }
        match mode {
            RedisMode::Standalone => {
                let [info] = <[ConnectionInfo; 1]>::try_from(infos)
                    .map_err(|_| "--redis-mode standalone takes one --redis-url".to_owned())?;
                let client = redis::Client::open(info).map_err(|error| error.to_string())?;
                Ok(Self::Standalone(client))
            }
            RedisMode::Cluster => Ok(Self::Cluster(infos)),
            RedisMode::Sentinel => {
                let master = sentinel_master
                    .filter(|name| !name.trim().is_empty())
                    .ok_or(
                        "--redis-mode sentinel needs --sentinel-master (the master group's name)",
                    )?;
                Ok(Self::Sentinel {
                    sentinels: infos,
                    master: master.to_owned(),
                })
            }
        }
    }

    /// The mode this target is in.
    pub fn mode(&self) -> RedisMode {
        match self {
            Self::Standalone(_) => RedisMode::Standalone,
            Self::Cluster(_) => RedisMode::Cluster,
            Self::Sentinel { .. } => RedisMode::Sentinel,
        }
    }

    /// The nodes (or sentinels) as `host:port`, without credentials, for logs.
    pub fn describe(&self) -> String {
        let nodes: Vec<String> = match self {
            Self::Standalone(client) => vec![client.get_connection_info().addr().to_string()],
            Self::Cluster(nodes)
            | Self::Sentinel {
                sentinels: nodes, ..
            } => nodes.iter().map(|info| info.addr().to_string()).collect(),
        };
        nodes.join(",")
    }
}

/// `url` with its user and password hidden, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// The connection every store call shares. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub enum RedisConnection {
    /// One server.
    Standalone(ConnectionManager),
    /// A cluster; routes each call by its first key.
    Cluster(ClusterConnection),
    /// The master the sentinels name.
    Sentinel(Arc<SentinelMaster>),
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self {
            Self::Standalone(_) => "standalone",
            Self::Cluster(_) => "cluster",
            Self::Sentinel(_) => "sentinel",
        };
        f.debug_tuple("RedisConnection").field(&mode).finish()
    }
}

/// Most retries of one cluster call on a topology change; their waits (below) keep them within
/// a Redis timeout of a few seconds, and the store's timeout bounds them in any case.
const CLUSTER_RETRIES: u32 = 12;

/// Shortest and longest wait between two such retries, in ms. redis-rs waits at least 1.28 s
/// by default, longer than most calls may take.
const CLUSTER_RETRY_WAIT_MS: (u64, u64) = (20, 500);

impl RedisConnection {
    /// Creates the connection without connecting (each call is answered within `timeout`),
    /// and says where the notification listener subscribes.
    ///
    /// # Errors
    /// When the target's settings are rejected by redis-rs (e.g. conflicting TLS settings).
    pub fn new(target: &RedisTarget, timeout: Duration) -> redis::RedisResult<(Self, Subscribers)> {
        Ok(match target {
            RedisTarget::Standalone(client) => (
                Self::Standalone(ConnectionManager::new_lazy_with_config(
                    client.clone(),
                    manager_config(timeout),
                )?),
                Subscribers::Server(Box::new(client.clone())),
            ),
            RedisTarget::Cluster(nodes) => {
                let client = ClusterClientBuilder::new(nodes.clone())
                    .retries(CLUSTER_RETRIES)
                    .min_retry_wait(CLUSTER_RETRY_WAIT_MS.0)
                    .max_retry_wait(CLUSTER_RETRY_WAIT_MS.1)
                    .retry_wait_formula(CLUSTER_RETRY_WAIT_MS.0, 2)
                    .overall_response_timeout(Some(timeout))
                    .build()?;
                let config = ClusterConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout);
                (
                    Self::Cluster(client.get_pending_async_connection_with_config(config)),
                    Subscribers::Nodes(nodes.clone()),
                )
            }
            RedisTarget::Sentinel { sentinels, master } => {
                let master = Arc::new(SentinelMaster::new(
                    sentinels.clone(),
                    master.clone(),
                    timeout,
                ));
                (
                    Self::Sentinel(Arc::clone(&master)),
                    Subscribers::Sentinel(master),
                )
            }
        })
    }

    /// Checks that Redis answers: on a cluster, that some master does. A shard without a
    /// master fails only its own queues' calls, so it must not take every broker out of
    /// service (redis-rs would send a plain PING to every node and need all of them).
    ///
    /// # Errors
    /// When no node answers.
    pub async fn ping(&self) -> redis::RedisResult<()> {
        match self {
            Self::Cluster(conn) => {
                let routing = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::OneSucceeded),
                ));
                conn.clone()
                    .route_command(redis::cmd("PING"), routing)
                    .await?;
            }
            other => {
                let _: String = redis::cmd("PING").query_async(&mut other.clone()).await?;
            }
        }
        Ok(())
    }
}

/// Settings of a standalone (or sentinel-named) connection: `timeout` to connect and per call.
pub(crate) fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        // Reconnects are retried by the next call; a long retry loop would outlast the caller's
        // timeout anyway.
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500))
}

/// Where the wake-up subscriptions are made (see [`crate::tasks::wakeups`]).
#[derive(Debug, Clone)]
pub enum Subscribers {
    /// The one server.
    Server(Box<redis::Client>),
    /// The cluster, given by some of its nodes: each queue's channel is subscribed on the node
    /// serving its slot.
    Nodes(Vec<ConnectionInfo>),
    /// The master the sentinels name at the time.
    Sentinel(Arc<SentinelMaster>),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
            Self::Sentinel(master) => Box::pin(master.command(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Standalone(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(master) => Box::pin(master.pipeline(pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
            Self::Sentinel(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_takes_its_urls() {
        let one = RedisTarget::parse(RedisMode::Standalone, "redis://127.0.0.1:1", None);
        assert!(matches!(one, Ok(RedisTarget::Standalone(_))));
        let comma_in_password =
            RedisTarget::parse(RedisMode::Standalone, "redis://u:pa,ss@127.0.0.1:1", None);
        assert!(matches!(comma_in_password, Ok(RedisTarget::Standalone(_))));
        let cluster = RedisTarget::parse(
            RedisMode::Cluster,
            " redis://127.0.0.1:1, redis://127.0.0.1:2 ",
            None,
        );
        assert!(matches!(cluster, Ok(RedisTarget::Cluster(nodes)) if nodes.len() == 2));
        let no_master = RedisTarget::parse(RedisMode::Sentinel, "redis://127.0.0.1:1", None);
        assert!(no_master.is_err_and(|e| e.contains("--sentinel-master")));
        let stray = RedisTarget::parse(RedisMode::Cluster, "redis://127.0.0.1:1", Some("m"));
        assert!(stray.is_err_and(|e| e.contains("--sentinel-master")));
        assert!(RedisTarget::parse(RedisMode::Cluster, " , ", None).is_err());
    }

    #[test]
    fn a_bad_url_is_reported_without_its_password() {
        let error = RedisTarget::parse(
            RedisMode::Cluster,
            "redis://127.0.0.1:1,redis://user:hunter2@127.0.0.1:99999",
            None,
        )
        .expect_err("port out of range");
        assert!(!error.contains("hunter2"), "{error}");
        assert!(error.contains("--redis-url"), "{error}");
    }
}
