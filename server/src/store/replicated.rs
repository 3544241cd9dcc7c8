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
    error::{Error, Result},
    store::{
        connection::{RedisConnection, RedisTarget, sentinel::SentinelMaster},
        scripts::millis,
    },
};

/// How many writes may wait for their replicas at once.
pub const WRITE_CONNECTIONS: usize = 16;

/// One write connection.
enum Writer {
    /// A standalone connection of its own.
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
    /// waiting up to `wait` for `replicas` replicas. Not on a cluster: [`crate::serve`]
    /// refuses the flag there.
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

    /// Runs `call` and `WAIT` in one pipeline on one connection (so the `WAIT` covers that
    /// write and no other connection's), loading the script first if Redis lacks it.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer, when the sentinels' master changed meanwhile,
    /// or when fewer replicas confirmed the write in time (it may have applied).
    pub async fn invoke(&self, call: &ScriptInvocation<'_>) -> Result<Value> {
        let mut writer = self.free_writer().await;
        let wait = redis::cmd("WAIT")
            .arg(self.replicas)
            .arg(millis(self.wait))
            .clone();
        let (reply, confirmed) = match &mut *writer {
            Writer::Own(conn) => with_wait(conn, call, &wait).await?,
            Writer::Sentinel(master, slot) => {
                let (generation, mut conn) = master.slot_connection(*slot).await?;
                let done = with_wait(&mut conn, call, &wait).await;
                master.check(generation, done.as_ref().err());
                let done = done?;
                if master.generation() != generation {
                    // A failover began while the write waited: its replicas may be the old
                    // master's, whose writes are lost.
                    return Err(Error::NotReplicated(
                        "the sentinels' master changed while the write waited for its \
                         replicas; it may have applied"
                            .into(),
                    ));
                }
                done
            }
        };
        if confirmed < i64::from(self.replicas) {
            return Err(Error::NotReplicated(format!(
                "the write reached {confirmed} of --redis-wait-replicas {} replicas within \
                 --redis-wait-timeout {:?}; it may have applied",
                self.replicas, self.wait
            )));
        }
        Ok(reply)
    }

    /// A write connection nobody uses now, or (all busy) the next in turn.
    async fn free_writer(&self) -> tokio::sync::MutexGuard<'_, Writer> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for offset in 0..self.writers.len() {
            if let Ok(writer) = self.writers[(start + offset) % self.writers.len()].try_lock() {
                return writer;
            }
        }
        self.writers[start % self.writers.len()].lock().await
    }
}

/// `call` then `wait` down `conn` in one pipeline: the script's reply and the replicas that
/// confirmed it. A script's error reply comes back as the same error a lone call gives (so its
/// code maps as usual: OOM, BUSY, NOREPLICAS…). A pipelined script is not loaded by redis-rs,
/// so a NOSCRIPT (a restarted or new master) loads it and sends the pair again; the first
/// `WAIT` covered nothing, and may have waited its whole timeout.
async fn with_wait<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    call: &ScriptInvocation<'_>,
    wait: &redis::Cmd,
) -> redis::RedisResult<(Value, i64)> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors()
        .invoke_script(call)
        .add_command(wait.clone());
    match send(conn, &pipe).await {
        Err(error)
            if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
        {
            call.load_async(conn).await?;
            send(conn, &pipe).await
        }
        result => result,
    }
}

async fn send<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    pipe: &redis::Pipeline,
) -> redis::RedisResult<(Value, i64)> {
    let replies: Vec<Value> = pipe.query_async(conn).await?;
    let Ok([reply, confirmed]) = <[Value; 2]>::try_from(replies) else {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "a write and its WAIT got the wrong number of replies",
        )));
    };
    if let Value::ServerError(error) = reply {
        return Err(error.into());
    }
    let confirmed = match confirmed {
        Value::ServerError(error) => return Err(error.into()),
        confirmed => redis::from_redis_value(confirmed)?,
    };
    Ok((reply, confirmed))
}
