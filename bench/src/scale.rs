//! The `scale` phase (only with `--prefill P`): the `enqueue` and `drain` figures on a queue
//! that already holds P ready items, and the Redis memory each queued item takes
//! (`used_memory` growth over the prefill / P, so it includes the sorted-set entry).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};
use std::time::Instant;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use wq_client::Client;
use wq_worker::{ExitPolicy, Handler, LeasedItem, Outcome};

/// The phase's figures.
#[derive(Debug)]
pub(crate) struct Report {
    /// Seconds to enqueue N items on top of the prefill.
    pub(crate) enqueue_seconds: f64,
    /// Items the drain completed (N, give or take the last in-flight ones).
    pub(crate) drained: u64,
    /// Seconds to lease and complete them.
    pub(crate) drain_seconds: f64,
    /// Redis bytes per queued item; None without a Redis to ask.
    pub(crate) bytes_per_item: Option<f64>,
}

/// Completes every item and stops the worker once `target` items are done.
struct CountingNoop {
    done: AtomicU64,
    target: u64,
    stop: CancellationToken,
}

impl Handler for CountingNoop {
    async fn handle(&self, _item: &LeasedItem) -> Outcome {
        if self.done.fetch_add(1, Ordering::SeqCst) + 1 >= self.target {
            self.stop.cancel();
        }
        Outcome::Complete(bytes::Bytes::new())
    }
}

/// Prefills `queue` with `prefill` items, then measures an enqueue of N items and a drain of N
/// items with `workers` slots.
///
/// # Errors
/// When a call fails.
pub(crate) async fn run(
    client: &Client,
    redis_url: Option<&str>,
    queue: &str,
    prefill: usize,
    args: &crate::Args,
    workers: u32,
) -> anyhow::Result<Report> {
    let mut redis = match redis_url {
        Some(url) => Some(
            redis::Client::open(url)
                .context("Redis URL")?
                .get_multiplexed_async_connection()
                .await
                .context("connecting to Redis")?,
        ),
        None => None,
    };
    let before = match &mut redis {
        Some(conn) => Some(used_memory(conn).await?),
        None => None,
    };
    crate::fill(client, queue, prefill, args).await?;
    let bytes_per_item = match (&mut redis, before) {
        (Some(conn), Some(before)) => {
            let after = used_memory(conn).await?;
            Some(after.saturating_sub(before) as f64 / prefill.max(1) as f64)
        }
        _ => None,
    };

    let enqueue_seconds = crate::fill(client, queue, args.items, args).await?;

    let stop = CancellationToken::new();
    let handler = Arc::new(CountingNoop {
        done: AtomicU64::new(0),
        target: args.items as u64,
        stop: stop.clone(),
    });
    let started = Instant::now();
    let summary = crate::worker(client, queue, workers, args.prefetch, ExitPolicy::Drained)
        .run(handler, stop)
        .await;
    let drain_seconds = started.elapsed().as_secs_f64();
    Ok(Report {
        enqueue_seconds,
        drained: summary.completed,
        drain_seconds,
        bytes_per_item,
    })
}

/// `used_memory` from `INFO memory`, in bytes.
async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .context("INFO memory")?;
    info.lines()
        .find_map(|line| line.trim().strip_prefix("used_memory:"))
        .context("INFO memory has no used_memory")?
        .parse()
        .context("used_memory is not a number")
}
