//! The `wakeup` phase: how fast a waiting Lease on one broker replica hears of an item enqueued
//! through another replica of the same Redis (the path is the enqueue script's PUBLISH, the
//! other replica's subscription, and its waiter's retry).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use wq_client::{Client, duration, pb};

use crate::stats::Percentiles;

/// Time given to the Lease to reach the broker and park before the item is enqueued. Were it
/// not parked yet, its first try would find the item, which would flatter the figure only by
/// the parking race, never hide a slow wake-up.
const PARK_DELAY: Duration = Duration::from_millis(10);
/// Far longer than any wake-up; a Lease that returns empty means the wake-up was lost.
const LEASE_WAIT: Duration = Duration::from_secs(10);

/// Runs `rounds` rounds on `queue`: Lease through `waiter` (replica A), Enqueue through
/// `producer` (replica B), time from the Enqueue's start to the Lease's reply.
///
/// # Errors
/// When a call fails or a wake-up is lost.
pub(crate) async fn run(
    waiter: &Client,
    producer: &Client,
    queue: &str,
    rounds: usize,
) -> anyhow::Result<Percentiles> {
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let lease = tokio::spawn({
            let waiter = waiter.clone();
            let request = pb::LeaseRequest {
                queue: queue.to_owned(),
                max_items: 1,
                lease_duration: Some(duration(Duration::from_secs(60))),
                max_wait: Some(duration(LEASE_WAIT)),
                ..Default::default()
            };
            async move {
                let response = waiter.lease(request).await;
                (response, Instant::now())
            }
        });
        tokio::time::sleep(PARK_DELAY).await;
        let started = Instant::now();
        producer
            .enqueue(queue, vec![pb::EnqueueItem::default()])
            .await
            .context("enqueue through replica B")?;
        let (response, returned) = lease.await.context("lease task")?;
        let response = response.context("lease through replica A")?;
        samples.push(returned.saturating_duration_since(started));
        let item = response
            .items
            .into_iter()
            .next()
            .context("the waiting Lease on replica A returned empty: the wake-up was lost")?;
        waiter
            .complete(
                queue,
                vec![pb::Completion {
                    lease_id: item.lease_id,
                    result: bytes::Bytes::new(),
                }],
            )
            .await
            .context("complete")?;
    }
    Percentiles::of(samples).context("no wake-up rounds")
}
