//! The Redis side of the broker: one typed async method per script, plus the few plain reads.
//!
//! All calls share one [`RedisConnection`] (standalone, cluster or sentinel; see
//! [`connection`]): a multiplexed connection that pipelines concurrent requests by itself
//! and reconnects in the background. A pool checkout per call would cost an
//! extra round trip (deadpool-redis pings on every recycle), and a single multiplexed connection
//! already keeps Redis busier than a pool does (see `../shared/notes/ecosystem.md`). Every call is
//! bounded by the configured Redis timeout and fails with UNAVAILABLE past it.
//!
//! # Layout
//!
//! - [`scripts`], [`keys`], [`reply`]: the Lua scripts, the keys they are given and the
//!   decoding of their replies.
//! - [`combined`]: Lease and Complete combined across callers (by `coalesce`, crate-private);
//!   [`admin`]: queue administration; [`index`]: the queue index the reaper works from.
//! - [`connection`]: the one connection in each `--redis-mode`; [`replicated`]: writes that
//!   wait for their replicas.

pub mod admin;
pub(crate) mod coalesce;
pub mod combined;
pub mod connection;
pub mod index;
pub mod keys;
pub mod replicated;
pub mod reply;
pub mod scripts;

use std::{future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use redis::Value;
use tokio::sync::Semaphore;

use crate::{
    config::BrokerConfig,
    error::{Error, Result},
    lease_id::LeaseId,
    model::{Due, FailOutcome, Granted, LeaseBatch, NewItem, QueueSnapshot, ReapOutcome},
};

use coalesce::Coalescer;
use connection::RedisConnection;
use keys::QueueKeys;
use replicated::ReplicatedWrites;
use scripts::{Scripts, millis, queue_invocation};

/// The broker's handle on Redis. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Store {
    conn: RedisConnection,
    scripts: Scripts,
    config: Arc<BrokerConfig>,
    /// The queue index (see [`keys::queue_index`]).
    pub(crate) index: String,
    /// Bounds the Redis calls in flight, so a slow Redis cannot pile up unbounded work here.
    in_flight: Semaphore,
    /// Lease calls waiting to be combined (see [`combined`]).
    pub(crate) lease_line: Arc<LeaseLine>,
    /// Complete calls waiting to be combined.
    pub(crate) complete_line: Arc<CompleteLine>,
    /// With `--redis-wait-replicas`, the connections writes wait for their replicas on.
    replicated: Option<ReplicatedWrites>,
}

/// Lease calls waiting to be combined, by queue and lease duration (ms): one script call
/// grants one duration.
pub(crate) type LeaseLine = Coalescer<(String, u64), u32, LeaseBatch>;
/// Complete calls waiting to be combined, by queue.
pub(crate) type CompleteLine = Coalescer<String, Vec<(LeaseId, Bytes)>, Vec<bool>>;

/// Whose confirmation a script's write waits for (see [`Store::invoke_write`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ack {
    /// The replicas', with `--redis-wait-replicas`.
    Replicas,
    /// The master's alone.
    Primary,
}

impl Store {
    /// Creates a store on `conn` (which connects lazily): the broker starts (NOT_SERVING) even
    /// while Redis is down, and connects when Redis answers.
    pub fn new(conn: RedisConnection, config: Arc<BrokerConfig>) -> Self {
        Self {
            conn,
            scripts: Scripts::new(),
            index: keys::queue_index(&config.key_prefix),
            in_flight: Semaphore::new(config.max_redis_in_flight),
            lease_line: Arc::new(LeaseLine::new(config.max_lease_items as usize)),
            complete_line: Arc::new(CompleteLine::new(config.max_batch)),
            replicated: None,
            config,
        }
    }

    /// Makes every state-changing script wait for its replicas through `writes` (see
    /// [`replicated`]).
    #[must_use]
    pub fn with_replicated_writes(mut self, writes: ReplicatedWrites) -> Self {
        self.replicated = Some(writes);
        self
    }

    pub(crate) fn keys(&self, queue: &str) -> QueueKeys {
        QueueKeys::new(&self.config.key_prefix, queue)
    }

    pub(crate) fn scripts(&self) -> &Scripts {
        &self.scripts
    }

    pub(crate) fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Runs one script call that only reads, or whose write needs no acknowledgement from
    /// the replicas (a lease, an extension, a release, the reaper's; see
    /// [`Store::invoke_write`]), bounded by the Redis timeout.
    pub(crate) async fn invoke(&self, call: &redis::ScriptInvocation<'_>) -> Result<Value> {
        let mut conn = self.conn.clone();
        self.bounded(call.invoke_async(&mut conn)).await
    }

    /// Runs one script call whose write loses work if a failover loses it (an enqueue, a
    /// completion, a failure, an operator's change), bounded by the Redis timeout; with
    /// `--redis-wait-replicas`, it answers only once the replicas have the write. A lost lease,
    /// extension or release only lets an item be delivered again, which at-least-once delivery
    /// allows anyway, so those use [`Store::invoke`]: waiting would strand the items of a Lease
    /// whose wait failed.
    pub(crate) async fn invoke_write(
        &self,
        queue: &str,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<Value> {
        match &self.replicated {
            None => self.invoke(call).await,
            Some(writes) => self.bounded(writes.invoke(queue, call)).await,
        }
    }

    /// Runs one plain command, bounded by the Redis timeout.
    pub(crate) async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        let mut conn = self.conn.clone();
        self.bounded(cmd.query_async(&mut conn)).await
    }

    /// Runs a pipeline in one round trip, bounded by the Redis timeout.
    pub(crate) async fn pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T> {
        let mut conn = self.conn.clone();
        self.bounded(pipe.query_async(&mut conn)).await
    }

    /// Bounds a Redis call by the configured timeout, after waiting (as long again at most)
    /// for one of the in-flight slots.
    async fn bounded<T, E: Into<Error>>(
        &self,
        call: impl Future<Output = std::result::Result<T, E>>,
    ) -> Result<T> {
        let timeout = self.config.redis_timeout;
        let _slot = match tokio::time::timeout(timeout, self.in_flight.acquire()).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(_)) => return Err(Error::Internal("the in-flight limit was closed".into())),
            Err(_) => {
                return Err(Error::ResourceExhausted(format!(
                    "the broker is busy: {} Redis calls in flight (--max-redis-in-flight) for \
                     over {timeout:?}; retry with backoff",
                    self.config.max_redis_in_flight
                )));
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result.map_err(Into::into),
            Err(_) => Err(Error::Unavailable(format!(
                "no reply within {:?}",
                self.config.redis_timeout
            ))),
        }
    }

    /// Checks that Redis answers.
    ///
    /// # Errors
    /// UNAVAILABLE when it does not within the Redis timeout.
    pub async fn ping(&self) -> Result<()> {
        self.bounded(self.conn.ping()).await
    }

    /// Starts a call of one of `queue`'s scripts with the keys and arguments they all take.
    pub(crate) fn queue_call<'a>(
        &self,
        script: &'a redis::Script,
        queue: &str,
    ) -> redis::ScriptInvocation<'a> {
        let keys = self.keys(queue);
        queue_invocation(script, &keys, &keys.notify, queue, &self.config)
    }

    /// Enqueues a validated batch; returns the duplicate flag of each item.
    ///
    /// # Errors
    /// FAILED_PRECONDITION when the queue is sealed; UNAVAILABLE when Redis does not answer.
    pub async fn enqueue(&self, queue: &str, items: &[NewItem]) -> Result<Vec<bool>> {
        let mut call = self.queue_call(&self.scripts.enqueue, queue);
        call.arg(items.len()).arg(self.config.max_queue_length);
        let now = self.local_now_ms();
        // The queue must be in the index from its first item on (ListQueues, idle expiry), and
        // the reaper must visit it by its earliest delayed item's due time.
        let mut visit = now.saturating_add(self.idle_visit_ms());
        for item in items {
            let (delay_ms, not_before_ms) = match item.due {
                Due::Now => (-1, -1),
                Due::After(d) => {
                    let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                    visit = visit.min(now.saturating_add(ms));
                    (ms, -1)
                }
                Due::At(ms) => {
                    visit = visit.min(ms);
                    (-1, ms)
                }
            };
            call.arg(&item.id)
                .arg(item.payload.as_ref())
                .arg(item.priority)
                .arg(delay_ms)
                .arg(not_before_ms)
                .arg(item.max_attempts)
                .arg(item.headers.as_ref());
        }
        let reply = self
            .invoke_scheduling(&call, queue, visit, "an enqueue", Ack::Replicas)
            .await?;
        let reply = reply::array("enqueue", reply)?;
        let (status, flags) = reply
            .split_first()
            .ok_or_else(|| Error::Internal("empty enqueue reply".into()))?;
        match reply::int("enqueue status", status)? {
            0 => {}
            1 => {
                return Err(Error::FailedPrecondition(format!(
                    "queue {queue:?} is sealed: it accepts no more items"
                )));
            }
            _ => {
                let held = reply::int("enqueue held", flags.first().unwrap_or(&Value::Nil))?;
                let fresh = reply::int("enqueue fresh", flags.get(1).unwrap_or(&Value::Nil))?;
                return Err(Error::ResourceExhausted(format!(
                    "queue {queue:?} is full: it holds {held} items and this batch would add \
                     {fresh}, past --max-queue-length {}; nothing was enqueued",
                    self.config.max_queue_length
                )));
            }
        }
        let flags = reply::flags("enqueue duplicate flags", flags.get(1..).unwrap_or(&[]))?;
        if flags.len() != items.len() {
            return Err(Error::Internal("enqueue reply has the wrong length".into()));
        }
        Ok(flags)
    }

    /// Leases for several callers in one script call: up to `wanted[i]` items for caller `i`,
    /// each caller's grant within the reply budget, for `lease`. Every grant of the call gets
    /// `token` as its fencing token, so it must be unique per call (each item is granted at
    /// most once per call, so the token still names one grant). Handlers use
    /// [`Store::lease_combined`].
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn lease_many(
        &self,
        queue: &str,
        wanted: &[u32],
        lease: Duration,
        token: &str,
    ) -> Result<Vec<LeaseBatch>> {
        let mut call = self.queue_call(&self.scripts.lease, queue);
        call.arg(millis(lease))
            .arg(token)
            .arg(self.config.max_reply_bytes)
            .arg(crate::config::REPLY_BYTES_PER_ITEM + 2 * queue.len())
            .arg(wanted.len());
        for want in wanted {
            call.arg((*want).max(1));
        }
        // The reaper must visit the queue when these leases expire, should their holder vanish.
        let expiry = self.local_ms_after(lease);
        let reply = self
            .invoke_scheduling(&call, queue, expiry, "new leases", Ack::Primary)
            .await?;
        let reply = reply::array("lease", reply)?;
        let [now, expire, drained, next_due, ready_left, sealed, grants]: [Value; 7] = reply
            .try_into()
            .map_err(|_| Error::Internal("lease reply has the wrong length".into()))?;
        let next_due = reply::int("lease next due", &next_due)?;
        let shared = LeaseBatch {
            now_ms: reply::int("lease now", &now)?,
            expire_ms: reply::int("lease expiry", &expire)?,
            drained: reply::int("lease drained", &drained)? == 1,
            next_due_ms: (next_due > 0).then_some(next_due),
            ready_left: reply::uint("lease ready left", &ready_left)?,
            sealed: reply::int("lease sealed", &sealed)? == 1,
            items: Vec::new(),
        };
        let batches = reply::array("lease grants", grants)?
            .into_iter()
            .map(|grant| {
                let items = reply::array("lease items", grant)?
                    .into_iter()
                    .map(granted)
                    .collect::<Result<Vec<_>>>()?;
                Ok(LeaseBatch {
                    items,
                    ..shared.clone()
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if batches.len() != wanted.len() {
            return Err(Error::Internal(
                "lease reply has the wrong grant count".into(),
            ));
        }
        Ok(batches)
    }

    /// Leases up to `max_items` items for `lease` in a script call of its own.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn lease(
        &self,
        queue: &str,
        max_items: u32,
        lease: Duration,
        token: &str,
    ) -> Result<LeaseBatch> {
        self.lease_many(queue, &[max_items], lease, token)
            .await?
            .pop()
            .ok_or_else(|| Error::Internal("lease reply has no grant".into()))
    }

    /// Extends live leases to now + `lease`; returns the new expiry (Unix ms) and which leases
    /// were live.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn extend_lease(
        &self,
        queue: &str,
        leases: &[LeaseId],
        lease: Duration,
    ) -> Result<(i64, Vec<bool>)> {
        let mut call = self.queue_call(&self.scripts.extend_lease, queue);
        call.arg(millis(lease));
        for l in leases {
            call.arg(&l.item_id).arg(&l.token);
        }
        // A heartbeat may also shorten a lease: the reaper must visit by the new expiry.
        let expiry = self.local_ms_after(lease);
        let reply = self
            .invoke_scheduling(&call, queue, expiry, "extended leases", Ack::Primary)
            .await?;
        let reply = reply::array("extend", reply)?;
        let (expire, flags) = reply
            .split_first()
            .ok_or_else(|| Error::Internal("empty extend reply".into()))?;
        Ok((
            reply::int("extend expiry", expire)?,
            reply::flags("extend flags", flags)?,
        ))
    }

    /// Completes live leases with their results in a script call of its own; returns which
    /// leases were live. Handlers use [`Store::complete_combined`].
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn complete(
        &self,
        queue: &str,
        completions: &[(LeaseId, Bytes)],
    ) -> Result<Vec<bool>> {
        let mut call = self.queue_call(&self.scripts.complete, queue);
        call.arg(millis(self.config.completed_retention));
        for (l, result) in completions {
            call.arg(&l.item_id).arg(&l.token).arg(result.as_ref());
        }
        let kept = self.config.finished_ids_kept();
        if kept.is_zero() {
            let reply = reply::array("complete", self.invoke_write(queue, &call).await?)?;
            return reply::flags("complete flags", &reply);
        }
        // The ids finished now are forgotten by the reaper when their window ends.
        let forget_at = self.local_ms_after(kept);
        let reply = self
            .invoke_scheduling(
                &call,
                queue,
                forget_at,
                "forgetting finished ids",
                Ack::Replicas,
            )
            .await?;
        reply::flags("complete flags", &reply::array("complete", reply)?)
    }

    /// Ends a live lease as a failed attempt (`retry` None = backoff).
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn fail(
        &self,
        queue: &str,
        lease: &LeaseId,
        error: &str,
        retry: Option<Duration>,
        dead_letter: bool,
    ) -> Result<FailOutcome> {
        let jitter: f64 = rand::random();
        let mut call = self.queue_call(&self.scripts.fail, queue);
        call.arg(&lease.item_id)
            .arg(&lease.token)
            .arg(error)
            .arg(retry.map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
            .arg(millis(self.config.backoff_base))
            .arg(self.config.backoff_factor)
            .arg(millis(self.config.backoff_cap))
            .arg(jitter)
            .arg(u8::from(dead_letter));
        let reply = reply::array("fail", self.invoke_write(queue, &call).await?)?;
        let [ok, state, next]: [Value; 3] = reply
            .try_into()
            .map_err(|_| Error::Internal("fail reply has the wrong length".into()))?;
        if reply::int("fail ok", &ok)? == 0 {
            return Ok(FailOutcome::LeaseLost);
        }
        match reply::text("fail state", state)?.as_str() {
            "r" => Ok(FailOutcome::Ready(reply::int("fail next", &next)?)),
            "d" => {
                let due = reply::int("fail next", &next)?;
                // Waiters sleep until a notification or a due time they know of; the reaper
                // promotes this retry on time.
                self.schedule_after_applied(queue, due, "a delayed retry")
                    .await;
                Ok(FailOutcome::Delayed(due))
            }
            "x" => {
                // The dead letter's age bound: the reaper drops it on time.
                if !self.config.dead_max_age.is_zero() {
                    let at = self.local_ms_after(self.config.dead_max_age);
                    self.schedule_after_applied(queue, at, "a dead letter's drop")
                        .await;
                }
                Ok(FailOutcome::Dead)
            }
            other => Err(Error::Internal(format!("fail returned state {other:?}"))),
        }
    }

    /// Gives live leases back; returns which leases were live.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn release(&self, queue: &str, leases: &[LeaseId]) -> Result<Vec<bool>> {
        let mut call = self.queue_call(&self.scripts.release, queue);
        for l in leases {
            call.arg(&l.item_id).arg(&l.token);
        }
        let reply = reply::array("release", self.invoke(&call).await?)?;
        reply::flags("release flags", &reply)
    }

    /// Reads a consistent snapshot of a queue.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn queue_state(&self, queue: &str) -> Result<QueueSnapshot> {
        let call = self.queue_call(&self.scripts.queue_state, queue);
        let reply = reply::array("state", self.invoke(&call).await?)?;
        let [ready, leased, delayed, dead, oldest, meta, exists]: [Value; 7] = reply
            .try_into()
            .map_err(|_| Error::Internal("state reply has the wrong length".into()))?;
        let mut snapshot = QueueSnapshot {
            ready: reply::uint("ready", &ready)?,
            leased: reply::uint("leased", &leased)?,
            delayed: reply::uint("delayed", &delayed)?,
            dead: reply::uint("dead", &dead)?,
            oldest_ready_enqueue_ms: Some(reply::int("oldest", &oldest)?).filter(|ms| *ms > 0),
            exists: reply::int("exists", &exists)? == 1,
            ..QueueSnapshot::default()
        };
        for (field, value) in reply::pairs("meta", meta)? {
            let number = || {
                std::str::from_utf8(&value)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            match field.as_str() {
                "enq" => snapshot.enqueued_total = number(),
                "done" => snapshot.completed_total = number(),
                "fail" => snapshot.failed_total = number(),
                "recl" => snapshot.reclaimed_total = number(),
                "dropped" => snapshot.dead_dropped_total = number(),
                "paused" => snapshot.paused = number() == 1,
                "sealed" => snapshot.sealed = number() == 1,
                _ => {}
            }
        }
        Ok(snapshot)
    }

    /// The prefix of `queue`'s current item keys (they change when the queue is deleted).
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn item_prefix(&self, queue: &str) -> Result<String> {
        let k = self.keys(queue);
        let generation: Option<u64> = self
            .command(redis::cmd("HGET").arg(&k.meta).arg("g"))
            .await?;
        Ok(k.item_prefix_of(generation.unwrap_or(0)))
    }

    /// Reads one item's hash as field/value pairs; None when the item is not stored.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn get_item(&self, queue: &str, id: &str) -> Result<Option<Vec<(String, Bytes)>>> {
        let key = format!("{}{id}", self.item_prefix(queue).await?);
        let value: Value = self.command(redis::cmd("HGETALL").arg(&key)).await?;
        let fields = reply::pairs("item", value)?;
        Ok((!fields.is_empty()).then_some(fields))
    }

    /// One bounded reaper step over a queue.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn reap(&self, queue: &str) -> Result<ReapOutcome> {
        let call = self.queue_call(&self.scripts.reap, queue);
        let reply = reply::array("reap", self.invoke(&call).await?)?;
        let [
            reclaimed,
            promoted,
            dropped,
            ready,
            more,
            drained,
            paused,
            next,
            expired,
            trash,
        ]: [Value; 10] = reply
            .try_into()
            .map_err(|_| Error::Internal("reap reply has the wrong length".into()))?;
        let next = reply::int("next", &next)?;
        Ok(ReapOutcome {
            reclaimed: reply::uint("reclaimed", &reclaimed)?,
            promoted: reply::uint("promoted", &promoted)?,
            dropped: reply::uint("dropped", &dropped)?,
            ready: reply::uint("ready", &ready)?,
            more: reply::int("more", &more)? == 1,
            drained: reply::int("drained", &drained)? == 1,
            paused: reply::int("paused", &paused)? == 1,
            next_ms: (next > 0).then_some(next),
            expired: reply::int("expired", &expired)? == 1,
            trash: reply::int("trash", &trash)? == 1,
        })
    }
}

fn granted(value: Value) -> Result<Granted> {
    let fields = reply::array("leased item", value)?;
    let [
        id,
        token,
        payload,
        attempts,
        max_attempts,
        priority,
        enqueued,
        headers,
    ]: [Value; 8] = fields
        .try_into()
        .map_err(|_| Error::Internal("leased item has the wrong length".into()))?;
    Ok(Granted {
        id: reply::text("id", id)?,
        token: reply::text("token", token)?,
        payload: reply::bytes("payload", payload)?,
        attempts_ended: reply::u32_of("attempts", &attempts)?,
        max_attempts: reply::u32_of("max attempts", &max_attempts)?,
        priority: i32::try_from(reply::int("priority", &priority)?)
            .map_err(|_| Error::Internal("priority out of range".into()))?,
        enqueue_ms: reply::int("enqueue time", &enqueued)?,
        headers: reply::opt_bytes("headers", headers)?,
    })
}
