//! `--redis-wait-replicas`: state-changing scripts acknowledged only once `WAIT` confirms their
//! write reached that many replicas.
//!
//! Redis replicates asynchronously, so without this a failover loses the writes its new master
//! had not received yet, acknowledged or not (measured with `SENTINEL FAILOVER`: writes the
//! demoted master took before the broker heard of the switch). `WAIT` counts the replicas that
//! have the *connection's* last write, and blocks that connection while it waits; so these
//! writes do not share the store's multiplexed connection (a wait would hold up every other
//! call behind it) but take one of [`WRITE_CONNECTIONS`] connections of their own, one write
//! and its `WAIT` at a time. Reads, the reaper and the queue index stay on the shared
//! connection.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use redis::{ScriptInvocation, Value};
use tokio::sync::Mutex;

use crate::{
    connection::{RedisConnection, RedisTarget},
    error::{Error, Result},
    scripts::millis,
    sentinel::SentinelMaster,
};

/// How many writes may wait for their replicas at once.
pub const WRITE_CONNECTIONS: usize = 16;

/// One write connection.
enum Writer {
    /// A standalone or cluster connection of its own.
    Own(RedisConnection),
    /// Slot `.1` of the sentinels' master, which follows its failovers.
    Sentinel(Arc<SentinelMaster>, usize),
}

/// The write connections and what they wait for.
pub struct ReplicatedWrites {
    writers: Vec<Mutex<Writer>>,
    next: AtomicUsize,
    replicas: u32,
    wait: Duration,
}

impl std::fmt::Debug for ReplicatedWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedWrites")
            .field("connections", &self.writers.len())
            .field("replicas", &self.replicas)
            .field("wait", &self.wait)
            .finish()
    }
}

impl ReplicatedWrites {
    /// Write connections to `target` (through `conn`'s sentinel master in sentinel mode),
    /// waiting up to `wait` for `replicas` replicas.
    ///
    /// # Errors
    /// When the target's settings are rejected by redis-rs.
    pub fn new(
        target: &RedisTarget,
        conn: &RedisConnection,
        timeout: Duration,
        replicas: u32,
        wait: Duration,
    ) -> redis::RedisResult<Self> {
        let writers = (0..WRITE_CONNECTIONS)
            .map(|slot| {
                Ok(Mutex::new(match conn {
                    RedisConnection::Sentinel(master) => Writer::Sentinel(Arc::clone(master), slot),
                    _ => Writer::Own(RedisConnection::new(target, timeout)?.0),
                }))
            })
            .collect::<redis::RedisResult<_>>()?;
        Ok(Self {
            writers,
            next: AtomicUsize::new(0),
            replicas,
            wait,
        })
    }

    /// Runs `call`, a script of the queue whose keys include `key`, then waits for its write
    /// to reach the replicas.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer, or when fewer replicas confirmed the write in
    /// time (it may have applied).
    pub async fn invoke(&self, call: &ScriptInvocation<'_>, key: &str) -> Result<Value> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.writers.len();
        let mut writer = self.writers[index].lock().await;
        let wait = redis::cmd("WAIT")
            .arg(self.replicas)
            .arg(millis(self.wait))
            .clone();
        let (reply, confirmed) = match &mut *writer {
            Writer::Own(conn) => {
                let reply = call.invoke_async(conn).await?;
                (reply, conn.wait(&wait, key).await?)
            }
            Writer::Sentinel(master, slot) => {
                let (generation, mut conn) = master.slot_connection(*slot).await?;
                let done = async {
                    let reply: Value = call.invoke_async(&mut conn).await?;
                    let confirmed: i64 = wait.query_async(&mut conn).await?;
                    Ok::<_, redis::RedisError>((reply, confirmed))
                }
                .await;
                master.check(generation, done.as_ref().err());
                done?
            }
        };
        if confirmed < i64::from(self.replicas) {
            return Err(Error::NotReplicated(format!(
                "the write reached {confirmed} of --redis-wait-replicas {} replicas within \
                 --redis-wait-timeout {:?}; it may have applied (retrying with the same ids is \
                 safe)",
                self.replicas, self.wait
            )));
        }
        Ok(reply)
    }
}

impl RedisConnection {
    /// Sends `wait` where the last write to `key` went: on a cluster, to the master of `key`'s
    /// slot; elsewhere, down this connection.
    async fn wait(&mut self, wait: &redis::Cmd, key: &str) -> redis::RedisResult<i64> {
        match self {
            Self::Cluster(conn) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(key, SlotAddr::Master),
                ));
                let value = conn.route_command(wait.clone(), routing).await?;
                Ok(redis::from_redis_value(value)?)
            }
            other => wait.query_async(other).await,
        }
    }
}
