//! The Redis side of queue administration: flags, listing, requeue, purge and delete. Bulk
//! operations run as bounded script calls repeated until done, so Redis never blocks for long.

use bytes::Bytes;
use redis::Value;

use crate::{
    error::{Error, Result},
    reply,
    store::Store,
};

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
        self.register(queue).await?;
        let k = self.keys(queue);
        let mut call = self.scripts().set_flag.key(&k.meta);
        call.key(&k.ready)
            .arg(match flag {
                QueueFlag::Paused => "paused",
                QueueFlag::Sealed => "sealed",
            })
            .arg(if on { "1" } else { "0" })
            .arg(self.notify_channel())
            .arg(queue);
        let reply = self.invoke(&call).await?;
        reply::uint("set_flag", &reply)
    }

    /// Requeues the given dead letters, or all of them; returns how many.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn requeue_dead(&self, queue: &str, ids: Option<&[String]>) -> Result<u64> {
        let k = self.keys(queue);
        let mut total = 0;
        for _ in 0..MAX_CHUNKS {
            let mut call = self.scripts().requeue_dead.key(&k.ready);
            call.key(&k.dead)
                .arg(&k.item_prefix)
                .arg(self.notify_channel())
                .arg(queue)
                .arg(self.config().reap_batch);
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
            let (count, more) = count_and_more("requeue", self.invoke(&call).await?)?;
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
        let k = self.keys(queue);
        let mut total = 0;
        for _ in 0..MAX_CHUNKS {
            let mut call = self.scripts().purge.key(&k.ready);
            call.key(&k.delayed)
                .key(&k.leased)
                .key(&k.dead)
                .arg(&k.item_prefix)
                .arg(self.config().reap_batch);
            for state in states {
                call.arg(state.code());
            }
            let (count, more) = count_and_more("purge", self.invoke(&call).await?)?;
            total += count;
            if !more {
                break;
            }
        }
        Ok(total)
    }

    /// Deletes a queue: its items (in chunks), then its counters and flags, then its name.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn delete_queue(&self, queue: &str) -> Result<u64> {
        let deleted = self.purge(queue, &IndexedState::ALL).await?;
        let meta = self.keys(queue).meta;
        self.command::<i64>(redis::cmd("DEL").arg(&meta)).await?;
        self.unregister(queue).await?;
        Ok(deleted)
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

    /// The stored fields of several items, in one pipelined round trip; an item that vanished
    /// meanwhile has no fields.
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
        let k = self.keys(queue);
        let mut pipe = redis::pipe();
        for id in ids {
            if with_payloads {
                pipe.cmd("HGETALL").arg(k.item(id));
            } else {
                pipe.cmd("HMGET")
                    .arg(k.item(id))
                    .arg(&FIELDS_WITHOUT_PAYLOADS);
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
}

fn count_and_more(what: &str, value: Value) -> Result<(u64, bool)> {
    let reply = reply::array(what, value)?;
    let [count, more]: [Value; 2] = reply
        .try_into()
        .map_err(|_| Error::Internal(format!("{what} reply has the wrong length")))?;
    Ok((reply::uint(what, &count)?, reply::int(what, &more)? == 1))
}
