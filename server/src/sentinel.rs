//! The master of a Sentinel-watched group, as one connection that follows failovers.
//!
//! Redis replication is asynchronous and a demoted master keeps accepting writes until the
//! sentinels convert it (about 10 s after a `SENTINEL FAILOVER` here); writes sent to it are
//! lost at its resync. So the connection to a master is dropped, and the sentinels asked again
//! on the next call, as soon as any of these says the master changed:
//!
//! - a sentinel publishes `+switch-master` for the group ([`SentinelMaster::watch_switches`]);
//! - a call answers `READONLY` (the master was demoted) or fails to reach it at all.
//!
//! What a write acknowledged just before the switch can still lose is what `WAIT` guards
//! (`--redis-wait-replicas`, docs/RELIABILITY.md).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, Pipeline, RedisResult, TlsMode, Value,
    aio::{ConnectionLike as _, ConnectionManager},
    sentinel::{Sentinel, SentinelNodeConnectionInfo},
};
use tokio_util::sync::CancellationToken;

use crate::{connection::manager_config, subscription::Subscription};

/// The channel sentinels announce a promoted master on.
const SWITCH_MASTER: &str = "+switch-master";

/// The connection to the master the sentinels named last.
#[derive(Debug)]
pub struct SentinelMaster {
    sentinels: Vec<ConnectionInfo>,
    master: String,
    timeout: Duration,
    /// Bumped whenever the master may have changed; a connection made in an older generation
    /// is not used again.
    generation: AtomicU64,
    current: Mutex<Option<(u64, ConnectionManager)>>,
    /// One lookup at a time: after a switch, every waiting call uses the one new connection
    /// instead of each asking the sentinels.
    lookup: tokio::sync::Mutex<()>,
}

impl SentinelMaster {
    /// A connection to the master group `master` of `sentinels`, made on first use.
    pub fn new(sentinels: Vec<ConnectionInfo>, master: String, timeout: Duration) -> Self {
        Self {
            sentinels,
            master,
            timeout,
            generation: AtomicU64::new(0),
            current: Mutex::new(None),
            lookup: tokio::sync::Mutex::new(()),
        }
    }

    /// Runs `cmd` on the master.
    pub(crate) async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let (generation, mut conn) = self.connection().await?;
        let result = conn.req_packed_command(cmd).await;
        self.check(generation, result.as_ref().err());
        result
    }

    /// Runs `count` replies' worth of `pipeline` on the master.
    pub(crate) async fn pipeline(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let (generation, mut conn) = self.connection().await?;
        let result = conn.req_packed_commands(pipeline, offset, count).await;
        self.check(generation, result.as_ref().err());
        result
    }

    /// A client of the master the sentinels name now (for a pub/sub subscription).
    ///
    /// # Errors
    /// When no sentinel answers, or none names a master that says it is one.
    pub async fn master_client(&self) -> RedisResult<redis::Client> {
        let mut sentinel = Sentinel::build(self.sentinels.clone())?;
        let first = self.sentinels.first();
        let mut node = SentinelNodeConnectionInfo::default();
        if let Some(first) = first {
            node = node.set_redis_connection_info(first.redis_settings().clone());
            if let ConnectionAddr::TcpTls { insecure, .. } = first.addr() {
                node = node.set_tls_mode(if *insecure {
                    TlsMode::Insecure
                } else {
                    TlsMode::Secure
                });
            }
        }
        sentinel.async_master_for(&self.master, Some(&node)).await
    }

    /// Forgets the connection to the current master: the next call asks the sentinels.
    pub fn forget(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut current) = self.current.lock() {
            *current = None;
        }
    }

    /// The connection of this generation, made if there is none.
    async fn connection(&self) -> RedisResult<(u64, ConnectionManager)> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let _one_lookup = self.lookup.lock().await;
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let lookup = async {
            let client = self.master_client().await?;
            ConnectionManager::new_lazy_with_config(client, manager_config(self.timeout))
        };
        let conn = match tokio::time::timeout(self.timeout, lookup).await {
            Ok(conn) => conn?,
            Err(_) => {
                return Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no sentinel named a master in time",
                )));
            }
        };
        if let Ok(mut current) = self.current.lock()
            && self.generation.load(Ordering::SeqCst) == generation
        {
            *current = Some((generation, conn.clone()));
        }
        Ok((generation, conn))
    }

    fn current(&self) -> Option<(u64, ConnectionManager)> {
        self.current.lock().ok()?.clone()
    }

    /// Forgets the connection of `generation` when `error` says its master is gone or demoted.
    fn check(&self, generation: u64, error: Option<&redis::RedisError>) {
        let Some(error) = error else { return };
        let gone = error.code() == Some("READONLY")
            || error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_timeout();
        if gone
            && self
                .generation
                .compare_exchange(
                    generation,
                    generation + 1,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
        {
            tracing::warn!(%error, master = %self.master, "the sentinels' master failed; asking them again");
            if let Ok(mut current) = self.current.lock() {
                *current = None;
            }
        }
    }

    /// Listens on every sentinel for `+switch-master` of this group until `stop`, forgetting
    /// the master's connection at each one.
    pub async fn watch_switches(self: Arc<Self>, stop: CancellationToken) {
        let watchers = self.sentinels.iter().cloned().map(|sentinel| {
            let this = Arc::clone(&self);
            let stop = stop.clone();
            async move { this.watch_one(sentinel, stop).await }
        });
        futures_util::future::join_all(watchers).await;
    }

    async fn watch_one(&self, sentinel: ConnectionInfo, stop: CancellationToken) {
        let subscription = Subscription {
            what: "the sentinel's master switches",
            channel: SWITCH_MASTER,
            timeout: self.timeout,
            max_backoff: Duration::from_secs(5),
        };
        subscription
            .keep(
                |_| std::future::ready(redis::Client::open(sentinel.clone())),
                // A switch announced while this sentinel was out of reach was missed.
                || self.forget(),
                |payload| {
                    let payload = String::from_utf8_lossy(payload);
                    // "<master-name> <old-ip> <old-port> <new-ip> <new-port>"
                    if payload.split(' ').next() == Some(self.master.as_str()) {
                        tracing::info!(switch = %payload, "the sentinels switched the master");
                        self.forget();
                    }
                },
                &stop,
            )
            .await;
    }
}
