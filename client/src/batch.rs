//! Enqueueing any number of items: batches of at most a count and [`MAX_BATCH_BYTES`], with a
//! bounded number, and bytes, in flight.
//!
//! Batches in flight together are separate calls, which the broker may apply in any order: with
//! `in_flight` above 1 the queue's order is not the stream's. `wq seed` sends one batch at a
//! time for that reason.
//!
//! Why bytes are bounded twice: the broker holds every request message it is receiving against
//! a byte budget, of which one connection may use `--max-buffered-bytes-per-connection` (24 MiB
//! by default), and refuses what does not fit. Four batches of nearly 16 MiB (its message
//! limit) on one connection did not fit, so a valid seed of large items failed. Batches are now
//! cut at [`MAX_BATCH_BYTES`] and at most [`MAX_IN_FLIGHT_BYTES`] are in flight per call of
//! [`Client::enqueue_all`], a third of that share; what still does not fit (other calls on the
//! same connection, a broker full with other callers) is refused before it is applied and is
//! retried with backoff (see [`Client::enqueue`]).

use std::sync::Arc;

use futures_util::{Stream, StreamExt, stream};
use prost::Message as _;
use tokio::sync::Semaphore;

use crate::{Client, Result, pb};

/// Items per Enqueue call by default (the broker accepts up to 1000).
pub const DEFAULT_BATCH: usize = 500;
/// Batches in flight at once by default.
pub const DEFAULT_IN_FLIGHT: usize = 4;
/// Most encoded bytes of one batch (a single larger item goes alone): gRPC's usual 4 MiB
/// message limit, well under the broker's 16 MiB, so a batch never meets `--max-message-bytes`
/// however many items of up to `--max-payload-bytes` (1 MiB) it holds.
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Most encoded bytes of batches in flight at once in one [`Client::enqueue_all`]: a third of
/// the broker's default per-connection share (24 MiB), leaving room for the connection's other
/// calls.
pub const MAX_IN_FLIGHT_BYTES: usize = 8 << 20;

/// The bytes `item` adds to an Enqueue request, field framing included.
pub fn item_bytes(item: &pb::EnqueueItem) -> usize {
    // A repeated message field: a tag byte and a length prefix of up to 5 bytes.
    item.encoded_len() + 6
}

/// What [`Client::enqueue_all`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EnqueueSummary {
    /// Items added.
    pub added: u64,
    /// Items whose id was already stored.
    pub duplicates: u64,
}

impl Client {
    /// Enqueues every item of `items` in batches of `batch_size` items and at most
    /// [`MAX_BATCH_BYTES`], keeping at most `in_flight` batches and [`MAX_IN_FLIGHT_BYTES`]
    /// outstanding; `progress` is called with the items done so far after each batch.
    /// With `in_flight` 1 the items are enqueued in stream order; with more, batches may
    /// overtake each other.
    /// Ids are assigned before sending (see [`Client::enqueue`]), so retried batches never
    /// duplicate. Stops at the first error; batches already sent stay enqueued.
    ///
    /// # Errors
    /// The first batch's error.
    pub async fn enqueue_all<S>(
        &self,
        queue: &str,
        items: S,
        batch_size: usize,
        in_flight: usize,
        mut progress: impl FnMut(u64),
    ) -> Result<EnqueueSummary>
    where
        S: Stream<Item = pb::EnqueueItem>,
    {
        let bytes_in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES));
        let batches = batches(items, batch_size.max(1), MAX_BATCH_BYTES).map(|(batch, bytes)| {
            let client = self.clone();
            let queue = queue.to_owned();
            let bytes_in_flight = Arc::clone(&bytes_in_flight);
            async move {
                // A batch over the whole allowance (one huge item) waits for all of it.
                let permits = u32::try_from(bytes.min(MAX_IN_FLIGHT_BYTES)).unwrap_or(u32::MAX);
                let _room = bytes_in_flight.acquire_many(permits).await;
                client.enqueue(&queue, batch).await
            }
        });
        let results = batches.buffered(in_flight.max(1));
        futures_util::pin_mut!(results);
        let mut summary = EnqueueSummary::default();
        while let Some(batch) = results.next().await {
            for result in batch? {
                if result.duplicate {
                    summary.duplicates += 1;
                } else {
                    summary.added += 1;
                }
            }
            progress(summary.added + summary.duplicates);
        }
        Ok(summary)
    }

    /// [`Client::enqueue_all`] for an iterator, [`DEFAULT_IN_FLIGHT`] batches at once (so not
    /// necessarily in order).
    ///
    /// # Errors
    /// The first batch's error.
    pub async fn enqueue_iter(
        &self,
        queue: &str,
        items: impl IntoIterator<Item = pb::EnqueueItem>,
        progress: impl FnMut(u64),
    ) -> Result<EnqueueSummary> {
        self.enqueue_all(
            queue,
            stream::iter(items),
            DEFAULT_BATCH,
            DEFAULT_IN_FLIGHT,
            progress,
        )
        .await
    }
}

/// Cuts `items` into batches of at most `max_items` items and `max_bytes` encoded bytes (an item
/// larger than that alone), each with its size.
fn batches<S>(
    items: S,
    max_items: usize,
    max_bytes: usize,
) -> impl Stream<Item = (Vec<pb::EnqueueItem>, usize)>
where
    S: Stream<Item = pb::EnqueueItem>,
{
    stream::unfold(Box::pin(items.peekable()), move |mut items| async move {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while batch.len() < max_items {
            let Some(next) = items.as_mut().peek().await else {
                break;
            };
            let size = item_bytes(next);
            if !batch.is_empty() && bytes + size > max_bytes {
                break;
            }
            if let Some(item) = items.next().await {
                bytes += size;
                batch.push(item);
            }
        }
        (!batch.is_empty()).then_some(((batch, bytes), items))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(bytes: usize) -> pb::EnqueueItem {
        pb::EnqueueItem {
            payload: vec![b'x'; bytes].into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn batches_are_cut_by_count_and_by_bytes() {
        let sizes = |items: Vec<pb::EnqueueItem>, max_items, max_bytes| async move {
            batches(stream::iter(items), max_items, max_bytes)
                .map(|(batch, _)| batch.len())
                .collect::<Vec<_>>()
                .await
        };
        assert_eq!(
            sizes((0..7).map(|_| item(1)).collect(), 3, 1 << 20).await,
            [3, 3, 1]
        );
        // 1000-byte payloads weigh a little more: three fit in 3100 bytes, not four.
        assert_eq!(
            sizes((0..7).map(|_| item(1000)).collect(), 100, 3100).await,
            [3, 3, 1]
        );
        // An item over the byte limit goes alone.
        assert_eq!(
            sizes(vec![item(1), item(5000), item(1)], 100, 3100).await,
            [1, 1, 1]
        );
    }
}
