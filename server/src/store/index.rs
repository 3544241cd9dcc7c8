//! The queue index: which queues exist and when each next needs the reaper.
//!
//! One sorted set (see [`crate::store::keys::queue_index`]) holds every queue that holds anything,
//! scored by the Unix ms of its next reaper pass. Calls that create such a need lower the score
//! with `ZADD LT`, sent beside their script call; the reaper claims due queues, visits them and
//! lowers the score to the queue's next need (the claim moved it to the claim period first, so
//! a need announced while the reaper visits is never overwritten). An idle queue therefore
//! costs the reaper one visit per claim period, and nothing in between, however many queues
//! there are.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Value;

use crate::{
    error::Result,
    store::{Ack, Store, keys, reply},
};

/// Longest a queue goes unvisited: the claim period of a visit, and the visit of a queue with
/// nothing due. It bounds the harm of a need lost with a crashed broker between its script and
/// its index update.
const LONGEST_UNVISITED: Duration = Duration::from_secs(3600);

impl Store {
    /// This process's clock in Unix ms, for index scores only: the reaper recomputes every
    /// queue's real need from the Redis clock when it visits, so skew only moves a visit.
    pub(crate) fn local_now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }

    /// How long a claimed or idle queue waits for its next visit.
    pub(crate) fn idle_visit_period(&self) -> Duration {
        let ttl = self.config().queue_idle_ttl;
        if ttl.is_zero() {
            LONGEST_UNVISITED
        } else {
            ttl.min(LONGEST_UNVISITED)
        }
    }

    /// [`Store::idle_visit_period`] in ms.
    pub(crate) fn idle_visit_ms(&self) -> i64 {
        i64::try_from(self.idle_visit_period().as_millis()).unwrap_or(i64::MAX)
    }

    /// This process's clock `after` from now, in Unix ms (saturating).
    pub(crate) fn local_ms_after(&self, after: Duration) -> i64 {
        let after = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
        self.local_now_ms().saturating_add(after)
    }

    /// Runs a queue script and, in the same round trip, makes sure the reaper visits the queue
    /// by `at_ms`. The script's change stands whatever happens to the index update, so a failed
    /// update is logged (as `what`), never answered: an error would make a caller retry an
    /// applied Enqueue, or strand a Lease's items. Without its index entry a queue is still
    /// served, and reaped by its next Lease or its next visit (within [`LONGEST_UNVISITED`]).
    pub(crate) async fn invoke_scheduling(
        &self,
        call: &redis::ScriptInvocation<'_>,
        queue: &str,
        at_ms: i64,
        what: &str,
        ack: Ack,
    ) -> Result<Value> {
        let invoked = async {
            match ack {
                Ack::Replicas => self.invoke_write(queue, call).await,
                Ack::Primary => self.invoke(call).await,
            }
        };
        let (reply, scheduled) = tokio::join!(invoked, self.schedule(queue, at_ms));
        if let Err(error) = scheduled {
            tracing::warn!(queue = %queue, %error, "could not schedule the reaper for {what}");
        }
        reply
    }

    /// [`Store::schedule`] after a script whose change already stands: a failure is logged.
    pub(crate) async fn schedule_after_applied(&self, queue: &str, at_ms: i64, what: &str) {
        if let Err(error) = self.schedule(queue, at_ms).await {
            tracing::warn!(queue = %queue, %error, "could not schedule the reaper for {what}");
        }
    }

    /// Makes sure the reaper visits `queue` by `at_ms` (and that the queue is indexed).
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub(crate) async fn schedule(&self, queue: &str, at_ms: i64) -> Result<()> {
        let _: Value = self
            .command(
                redis::cmd("ZADD")
                    .arg(&self.index)
                    .arg("LT")
                    .arg(at_ms)
                    .arg(queue),
            )
            .await?;
        Ok(())
    }

    /// Claims up to `limit` queues whose pass is due; returns them.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn claim_due(&self, limit: usize) -> Result<Vec<String>> {
        // An idle round costs one read; the claim script runs only when something is due.
        let first: Vec<String> = self
            .command(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&self.index)
                    .arg("-inf")
                    .arg(self.local_now_ms())
                    .arg("LIMIT")
                    .arg(0)
                    .arg(1),
            )
            .await?;
        if first.is_empty() {
            return Ok(Vec::new());
        }
        let call = {
            let mut call = self.scripts().due.key(&self.index);
            call.arg(limit).arg(self.idle_visit_ms());
            call
        };
        let reply = reply::array("due", self.invoke(&call).await?)?;
        reply
            .into_iter()
            .skip(1)
            .map(|name| reply::text("due queue", name))
            .collect()
    }

    /// Takes `queue` out of the index after it was deleted or expired, unless it holds
    /// something again by then (an enqueue racing with its removal), in which case it is
    /// indexed again for a visit now.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub(crate) async fn unindex(&self, queue: &str) -> Result<()> {
        let _: i64 = self
            .command(redis::cmd("ZREM").arg(&self.index).arg(queue))
            .await?;
        let k = self.keys(queue);
        // After the ZREM: an enqueue whose own ZADD came before it has written its meta.
        let meta_fields: Vec<String> = self.command(redis::cmd("HKEYS").arg(&k.meta)).await?;
        let trash: i64 = self.command(redis::cmd("SCARD").arg(&k.trash)).await?;
        if meta_fields.iter().any(|f| f != "g") || trash > 0 {
            self.schedule(queue, self.local_now_ms()).await?;
        }
        Ok(())
    }

    /// Every indexed queue, in name order (ListQueues pages by position in it).
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn known_queues(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .command(redis::cmd("ZRANGE").arg(&self.index).arg(0).arg(-1))
            .await?;
        names.sort();
        Ok(names)
    }

    /// Moves the queue set of brokers before the index into the index, due at once, and deletes
    /// it. Safe to run in several replicas at once.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn migrate_legacy_registry(&self) -> Result<usize> {
        let legacy = keys::legacy_queue_registry(&self.config().key_prefix);
        let kind: String = self.command(redis::cmd("TYPE").arg(&legacy)).await?;
        if kind != "set" {
            return Ok(0);
        }
        let names: Vec<String> = self.command(redis::cmd("SMEMBERS").arg(&legacy)).await?;
        let now = self.local_now_ms();
        for chunk in names.chunks(1000) {
            let mut add = redis::cmd("ZADD");
            add.arg(&self.index).arg("NX");
            for name in chunk {
                add.arg(now).arg(name);
            }
            let _: i64 = self.command(&add).await?;
        }
        let _: i64 = self.command(redis::cmd("DEL").arg(&legacy)).await?;
        Ok(names.len())
    }
}
