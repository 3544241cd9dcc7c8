//! The Redis side of queue administration: flags, listing, requeue, purge and delete. Bulk
//! operations run as bounded script calls repeated until done, so Redis never blocks for long.

use bytes::Bytes;
use redis::Value;

use crate::{
    error::{Error, Result},
    store::{Store, reply},
};

/// Reply bytes counted per stored field of a listed item besides the large ones (payload,
/// result, headers), which are weighed exactly.
const FIELD_REPLY_OVERHEAD: usize = 64;

/// A queue flag an operator can set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFlag {
    /// Leases nothing.
    Paused,
    /// Accepts no items.
    Sealed,
}

/// One of the indexed item states (completed items are not indexed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexedState {
    /// In the ready set.
    Ready,
    /// In the delayed set.
    Delayed,
    /// In the leased set.
    Leased,
    /// In the dead letters.
    Dead,
}

impl IndexedState {
    /// Every indexed state.
    pub const ALL: [Self; 4] = [Self::Ready, Self::Delayed, Self::Leased, Self::Dead];

    fn code(self) -> &'static str {
        match self {
            Self::Ready => "r",
            Self::Delayed => "d",
            Self::Leased => "l",
            Self::Dead => "x",
        }
    }
}

/// The item fields ListItems returns without payloads.
const FIELDS_WITHOUT_PAYLOADS: [&str; 11] =
    ["s", "a", "m", "pr", "n", "e", "t", "x", "h", "err", "ct"];

/// Most script calls one bulk operation makes before giving up (a safety net against a queue
/// that keeps refilling while it is purged).
const MAX_CHUNKS: usize = 100_000;

impl Store {
    /// Sets or clears a flag; returns the ready count.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn set_flag(&self, queue: &str, flag: QueueFlag, on: bool) -> Result<u64> {
        let mut call = self.queue_call(&self.scripts().set_flag, queue);
        call.arg(match flag {
            QueueFlag::Paused => "paused",
            QueueFlag::Sealed => "sealed",
        })
        .arg(if on { "1" } else { "0" });
        let reply = reply::array("set_flag", self.invoke_write(queue, &call).await?)?;
        let [ready, exists]: [Value; 2] = reply
            .try_into()
            .map_err(|_| Error::Internal("set_flag reply has the wrong length".into()))?;
        if reply::int("set_flag exists", &exists)? == 1 {
            let visit = self.local_now_ms().saturating_add(self.idle_visit_ms());
            self.schedule_after_applied(queue, visit, "a flag change")
                .await;
        }
        reply::uint("set_flag", &ready)
    }

    /// Requeues the given dead letters, or all of them; returns how many.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn requeue_dead(&self, queue: &str, ids: Option<&[String]>) -> Result<u64> {
        let mut total = 0;
        for _ in 0..MAX_CHUNKS {
            let mut call = self.queue_call(&self.scripts().requeue_dead, queue);
            match ids {
                None => {
                    call.arg("all");
                }
                Some(ids) => {
                    call.arg("ids");
                    for id in ids {
                        call.arg(id);
                    }
                }
            }
            let (count, more) = count_and_more("requeue", self.invoke_write(queue, &call).await?)?;
            total += count;
            if !more {
                break;
            }
        }
        Ok(total)
    }

    /// Deletes every item in `states`; returns how many.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn purge(&self, queue: &str, states: &[IndexedState]) -> Result<u64> {
        let mut total = 0;
        for _ in 0..MAX_CHUNKS {
            let mut call = self.queue_call(&self.scripts().purge, queue);
            for state in states {
                call.arg(state.code());
            }
            let (count, more) = count_and_more("purge", self.invoke_write(queue, &call).await?)?;
            total += count;
            if !more {
                break;
            }
        }
        Ok(total)
    }

    /// Deletes a queue: one atomic step leaves a fresh, empty queue in its place (see
    /// `lua/delete_queue.lua`), then the old items are deleted in bounded steps and the queue
    /// leaves the index unless an Enqueue has refilled it meanwhile. Returns how many items
    /// (ready, delayed, leased, dead) were deleted.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer. The queue is deleted all the same once the first
    /// step is done: the reaper deletes what is left.
    pub async fn delete_queue(&self, queue: &str) -> Result<u64> {
        let call = self.queue_call(&self.scripts().delete_queue, queue);
        let (deleted, _generation) =
            count_and_more("delete", self.invoke_write(queue, &call).await?)?;
        self.delete_trash(queue).await?;
        self.unindex(queue).await?;
        Ok(deleted)
    }

    /// Deletes the items of deleted generations of `queue`, in bounded steps.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn delete_trash(&self, queue: &str) -> Result<()> {
        for _ in 0..MAX_CHUNKS {
            let call = self.queue_call(&self.scripts().delete_trash, queue);
            let (_, more) = count_and_more("delete_trash", self.invoke_write(queue, &call).await?)?;
            if !more {
                break;
            }
        }
        Ok(())
    }

    /// The ids in `state` at positions `offset..offset + count` of the state's order.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn list_ids(
        &self,
        queue: &str,
        state: IndexedState,
        offset: u64,
        count: u64,
    ) -> Result<Vec<String>> {
        let k = self.keys(queue);
        let key = match state {
            IndexedState::Ready => &k.ready,
            IndexedState::Delayed => &k.delayed,
            IndexedState::Leased => &k.leased,
            IndexedState::Dead => &k.dead,
        };
        // Redis ranges are signed 64-bit.
        let stop = offset
            .saturating_add(count)
            .saturating_sub(1)
            .min(i64::MAX as u64);
        let members: Vec<String> = self
            .command(redis::cmd("ZRANGE").arg(key).arg(offset).arg(stop))
            .await?;
        Ok(if state == IndexedState::Ready {
            members
                .into_iter()
                .map(|m| m.get(12..).unwrap_or_default().to_owned())
                .collect()
        } else {
            members
        })
    }

    /// The stored fields of several items, in one pipelined round trip (two with payloads); an
    /// item that vanished meanwhile has no fields. With payloads, the list stops (after at least
    /// one item) before the fields pass the reply budget, so a page of large items stays
    /// readable.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn item_fields(
        &self,
        queue: &str,
        ids: &[String],
        with_payloads: bool,
    ) -> Result<Vec<Vec<(String, Bytes)>>> {
        if ids.is_empty() {
            // An empty pipeline is not a valid Redis request.
            return Ok(Vec::new());
        }
        let prefix = self.item_prefix(queue).await?;
        let keys: Vec<String> = ids.iter().map(|id| format!("{prefix}{id}")).collect();
        // With payloads, first weigh the large fields and fetch only the items that fit the
        // budget: fetching a page of large items whole would hold the shared Redis connection
        // (and the broker's memory) for megabytes it then throws away.
        let keys = if with_payloads {
            let fitting = self.items_within_budget(&keys).await?;
            &keys[..fitting]
        } else {
            &keys[..]
        };
        let mut pipe = redis::pipe();
        for key in keys {
            if with_payloads {
                pipe.cmd("HGETALL").arg(key);
            } else {
                pipe.cmd("HMGET").arg(key).arg(&FIELDS_WITHOUT_PAYLOADS);
            }
        }
        let replies: Vec<Value> = self.pipeline(&pipe).await?;
        replies
            .into_iter()
            .map(|value| {
                if with_payloads {
                    return reply::pairs("item", value);
                }
                let values = reply::array("item fields", value)?;
                FIELDS_WITHOUT_PAYLOADS
                    .iter()
                    .zip(values)
                    .filter_map(
                        |(field, value)| match reply::opt_bytes("item field", value) {
                            Ok(Some(bytes)) => Some(Ok(((*field).to_owned(), bytes))),
                            Ok(None) => None,
                            Err(e) => Some(Err(e)),
                        },
                    )
                    .collect()
            })
            .collect()
    }

    /// How many of the items at `keys`, from the first, fit the reply budget with their
    /// payloads, results and headers (at least one).
    async fn items_within_budget(&self, keys: &[String]) -> Result<usize> {
        let mut pipe = redis::pipe();
        for key in keys {
            for field in ["p", "res", "h"] {
                pipe.cmd("HSTRLEN").arg(key).arg(field);
            }
        }
        let lengths: Vec<usize> = self.pipeline(&pipe).await?;
        let budget = self.config().max_reply_bytes;
        let mut used = 0usize;
        for (index, (item, key)) in lengths.chunks(3).zip(keys).enumerate() {
            let size = item.iter().sum::<usize>()
                + FIELDS_WITHOUT_PAYLOADS.len() * FIELD_REPLY_OVERHEAD
                + 2 * key.len();
            used = used.saturating_add(size);
            if index > 0 && used > budget {
                return Ok(index);
            }
        }
        Ok(keys.len())
    }
}

fn count_and_more(what: &str, value: Value) -> Result<(u64, bool)> {
    let reply = reply::array(what, value)?;
    let [count, more]: [Value; 2] = reply
        .try_into()
        .map_err(|_| Error::Internal(format!("{what} reply has the wrong length")))?;
    Ok((reply::uint(what, &count)?, reply::int(what, &more)? == 1))
}
