//! Enqueueing any number of items: batches of a fixed size with a bounded number in flight.
//!
//! Batches in flight together are separate calls, which the broker may apply in any order: with
//! `in_flight` above 1 the queue's order is not the stream's. `wq seed` sends one batch at a
//! time for that reason.

use futures_util::{Stream, StreamExt, stream};

use crate::{Client, Result, pb};

/// Items per Enqueue call by default (the broker accepts up to 1000).
pub const DEFAULT_BATCH: usize = 500;
/// Batches in flight at once by default.
pub const DEFAULT_IN_FLIGHT: usize = 4;

/// What [`Client::enqueue_all`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EnqueueSummary {
    /// Items added.
    pub added: u64,
    /// Items whose id was already stored.
    pub duplicates: u64,
}

impl Client {
    /// Enqueues every item of `items` in batches of `batch_size`, keeping at most `in_flight`
    /// batches outstanding; `progress` is called with the items done so far after each batch.
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
        let batches = items.chunks(batch_size.max(1)).map(|batch| {
            let client = self.clone();
            let queue = queue.to_owned();
            async move { client.enqueue(&queue, batch).await }
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
