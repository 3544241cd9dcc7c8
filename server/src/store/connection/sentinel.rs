//! The master of a Sentinel-watched group, as one connection that follows failovers.
//!
//! Redis replication is asynchronous and a demoted master keeps accepting writes until the
//! sentinels convert it (about 10 s after a `SENTINEL FAILOVER` here); writes sent to it are
//! lost at its resync, even those a replica still following it confirmed to `WAIT`. So:
//!
//! - when a sentinel announces the replica a failover selected (`+selected-slave`, just before
//!   it turns the replica into a master), the connection to the old master is dropped and
//!   calls answer UNAVAILABLE until that replica answers as a master (`+promoted-slave`), which
//!   they then use, or until the sentinels name a master again (`+switch-master`, an aborted
//!   failover, or 15 s);
//! - `+switch-master`, a `READONLY` answer (a demoted master) or a master out of reach drop the
//!   connection too, and the next call asks the sentinels.
//!
//! Measured (tests/tests/integration/sentinel.rs, two replicas): an operator's `SENTINEL
//! FAILOVER` under a producer lost 156-220 of 500 acknowledged writes, with
//! `--redis-wait-replicas 1`, while only `+switch-master` and `+promoted-slave` were heeded
//! (the other replica kept confirming the old master's writes); none since. A SIGKILLed master
//! lost none. Writes the old master
//! took in the moment before the selection was announced are what `--redis-wait-replicas`
//! guards (see [`crate::store::replicated`] and docs/RELIABILITY.md).

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

use crate::store::connection::{manager_config, subscription::Subscription};

/// The channel sentinels announce the end of a failover on: they name the new master from then
/// on.
const SWITCH_MASTER: &str = "+switch-master";

/// The channel sentinels announce the replica a failover will promote on, just before they
/// turn it into a master. From then on the old master's writes are lost even when a replica
/// that still follows it confirms them to `WAIT` (measured: about 0.8 s of writes, until the
/// sentinels saw the promotion, then more until `+switch-master`), so writes stop until the
/// selected replica answers as a master.
const SELECTED: &str = "+selected-slave";

/// The channel sentinels announce the promoted replica on.
const PROMOTED: &str = "+promoted-slave";

/// Channels of a failover that ended without a switch.
const ABORTS: [&str; 3] = [
    "-failover-abort-not-elected",
    "-failover-abort-no-good-slave",
    "-failover-abort-slave-timeout",
];

/// Longest a selected replica is waited for before the sentinels are asked again, should its
/// promotion's end never be announced.
const PROMOTION_WAIT: Duration = Duration::from_secs(15);

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
    /// The replica a failover selected (and when), until the sentinels name it themselves.
    promoted: Mutex<Option<(String, u16, std::time::Instant)>>,
    /// Connections of their own for the writes that wait for replicas (see
    /// [`crate::store::replicated`]), each tagged with the generation it was made in.
    write_slots: Mutex<Vec<Option<(u64, ConnectionManager)>>>,
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
            promoted: Mutex::new(None),
            write_slots: Mutex::new(Vec::new()),
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
        let promoted = self.promoted.lock().ok().and_then(|p| p.clone());
        if let Some((host, port, selected_at)) = promoted {
            if let Some(client) = self.promoted_client(&host, port).await {
                return Ok(client);
            }
            if selected_at.elapsed() < PROMOTION_WAIT {
                // The old master still answers, but what it takes now is lost.
                return Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "a failover is promoting a replica",
                )));
            }
            self.settle_promotion();
        }
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

    /// A client of the promoted replica at `host:port`, with the sentinels' credentials and
    /// TLS, if it answers as a master.
    async fn promoted_client(&self, host: &str, port: u16) -> Option<redis::Client> {
        let first = self.sentinels.first()?;
        let addr = match first.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        let info = first.clone().set_addr(addr);
        let client = redis::Client::open(info).ok()?;
        let check = async {
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await.ok()?;
            let first: String = redis::from_redis_value(role.first()?.clone()).ok()?;
            (first == "master").then_some(())
        };
        // Half the Redis timeout, so that a promoted address that does not answer leaves the
        // caller time to ask the sentinels instead.
        tokio::time::timeout(self.timeout / 2, check).await.ok()??;
        Some(client)
    }

    /// The failover has ended (or the promoted replica is no master): ask the sentinels again.
    fn settle_promotion(&self) {
        if let Ok(mut promoted) = self.promoted.lock() {
            *promoted = None;
        }
    }

    /// The generation of the master's connections: it changes whenever the master may have.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
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
        // A failover announced during the lookup may have made its answer stale.
        if self.generation() != generation {
            return Err(changed_meanwhile());
        }
        if let Ok(mut current) = self.current.lock() {
            *current = Some((generation, conn.clone()));
        }
        Ok((generation, conn))
    }

    /// A connection of write slot `slot`'s own to the current master (one TCP connection per
    /// slot, so that its `WAIT` covers exactly its own writes), made if the slot has none of
    /// this generation.
    pub(crate) async fn slot_connection(
        &self,
        slot: usize,
    ) -> RedisResult<(u64, ConnectionManager)> {
        let generation = self.generation.load(Ordering::SeqCst);
        let cached = self
            .write_slots
            .lock()
            .ok()
            .and_then(|slots| slots.get(slot).cloned().flatten());
        if let Some((made_in, conn)) = cached
            && made_in == generation
        {
            return Ok((made_in, conn));
        }
        let client = match tokio::time::timeout(self.timeout, self.master_client()).await {
            Ok(client) => client?,
            Err(_) => {
                return Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no sentinel named a master in time",
                )));
            }
        };
        if self.generation() != generation {
            return Err(changed_meanwhile());
        }
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config(self.timeout))?;
        if let Ok(mut slots) = self.write_slots.lock() {
            if slots.len() <= slot {
                slots.resize(slot + 1, None);
            }
            slots[slot] = Some((generation, conn.clone()));
        }
        Ok((generation, conn))
    }

    fn current(&self) -> Option<(u64, ConnectionManager)> {
        self.current.lock().ok()?.clone()
    }

    /// Forgets the connection of `generation` when `error` says its master is gone or demoted.
    pub(crate) fn check(&self, generation: u64, error: Option<&redis::RedisError>) {
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

    /// Listens on every sentinel for this group's failovers until `stop` (see the module
    /// documentation).
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
            what: "the sentinel's failovers",
            channels: &[
                SWITCH_MASTER,
                SELECTED,
                PROMOTED,
                ABORTS[0],
                ABORTS[1],
                ABORTS[2],
            ],
            timeout: self.timeout,
            max_backoff: Duration::from_secs(5),
        };
        subscription
            .keep(
                |_| std::future::ready(redis::Client::open(sentinel.clone())),
                // A switch announced while this sentinel was out of reach was missed.
                || self.forget(),
                |channel, payload| {
                    let payload = String::from_utf8_lossy(payload);
                    let words: Vec<&str> = payload.split(' ').collect();
                    match (channel, words.as_slice()) {
                        // "<master-name> <old-ip> <old-port> <new-ip> <new-port>"
                        (SWITCH_MASTER, [name, ..]) if *name == self.master => {
                            tracing::info!(switch = %payload, "the sentinels switched the master");
                            self.settle_promotion();
                            self.forget();
                        }
                        // "slave <ip>:<port> <ip> <port> @ <master-name> <old-ip> <old-port>"
                        (SELECTED | PROMOTED, [_, _, ip, port, "@", name, ..])
                            if *name == self.master =>
                        {
                            if let Ok(port) = port.parse() {
                                tracing::info!(event = channel, %payload, "a failover picked a replica");
                                if let Ok(mut promoted) = self.promoted.lock() {
                                    let since = match promoted.as_ref() {
                                        Some((h, p, at)) if h == ip && *p == port => *at,
                                        _ => std::time::Instant::now(),
                                    };
                                    *promoted = Some(((*ip).to_owned(), port, since));
                                }
                                self.forget();
                            }
                        }
                        // "master <master-name> <ip> <port>"
                        (abort, [_, name, ..]) if ABORTS.contains(&abort) && *name == self.master => {
                            tracing::warn!(event = abort, "a failover was abandoned");
                            self.settle_promotion();
                            self.forget();
                        }
                        _ => {}
                    }
                },
                &stop,
            )
            .await;
    }
}

/// The error of a master lookup overtaken by a failover announcement.
fn changed_meanwhile() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::Interrupted,
        "a failover was announced while the master was looked up",
    ))
}
