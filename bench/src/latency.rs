//! The `latency` phase: items enqueued one per call at a fixed offered rate while W workers
//! lease them one at a time with waiting Leases; per item, the time from the Enqueue call's
//! start to a worker holding the item, and the Complete call's round trip.
//!
//! The producer is open-loop: each Enqueue starts at its scheduled time in its own task, so a
//! slow call delays no later item and queueing shows up in the figures instead of being hidden
//! by a slower offered rate.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use wq_client::{Client, duration, pb};

use crate::stats::Percentiles;

/// How long a worker's Lease waits before it asks again; a worker stops as soon as the last
/// item is in, so this only bounds how stale a waiter may get.
const LEASE_WAIT: Duration = Duration::from_secs(5);
/// Long enough that no lease of this phase ever expires.
const LEASE_DURATION: Duration = Duration::from_secs(60);
/// How long the workers may take to receive the last items once every Enqueue has returned;
/// past it an item is taken as lost, so the benchmark fails instead of hanging.
const STRAGGLER_LIMIT: Duration = Duration::from_secs(60);
/// The enqueue time travels in the payload, as nanoseconds since the phase's start.
const STAMP_BYTES: usize = 8;

/// What the phase measures.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) items: usize,
    /// Offered items per second.
    pub(crate) rate: f64,
    pub(crate) workers: u32,
    /// Payload bytes; at least the 8 of the timestamp.
    pub(crate) payload: usize,
}

/// The phase's figures.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) enqueue_to_lease: Percentiles,
    pub(crate) complete_call: Percentiles,
    /// The rate the producer achieved (items / seconds from first to last Enqueue start).
    pub(crate) achieved_rate: f64,
}

#[derive(Default)]
struct Samples {
    enqueue_to_lease: Vec<Duration>,
    complete_call: Vec<Duration>,
}

/// Runs the phase on `queue`: the producer uses `producer`, the workers `workers_client` (a
/// separate connection, as separate processes would have).
///
/// # Errors
/// When a call fails or an item is lost.
pub(crate) async fn run(
    producer: &Client,
    workers_client: &Client,
    queue: &str,
    settings: &Settings,
) -> anyhow::Result<Report> {
    anyhow::ensure!(settings.rate > 0.0, "--rate must be > 0");
    let epoch = Instant::now();
    let received = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Samples::default()));
    let done = CancellationToken::new();

    let mut workers = JoinSet::new();
    for _ in 0..settings.workers {
        workers.spawn(work(
            workers_client.clone(),
            queue.to_owned(),
            settings.items,
            epoch,
            Arc::clone(&received),
            Arc::clone(&samples),
            done.clone(),
        ));
    }

    let mut enqueues = JoinSet::new();
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / settings.rate);
    for i in 0..settings.items {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let client = producer.clone();
        let queue = queue.to_owned();
        let payload_len = settings.payload.max(STAMP_BYTES);
        enqueues.spawn(async move {
            let stamp = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let mut payload = vec![b'x'; payload_len];
            payload[..STAMP_BYTES].copy_from_slice(&stamp.to_be_bytes());
            let item = pb::EnqueueItem {
                payload: payload.into(),
                ..Default::default()
            };
            client.enqueue(&queue, vec![item]).await.context("enqueue")
        });
    }
    let producer_seconds = started.elapsed().as_secs_f64();
    while let Some(result) = enqueues.join_next().await {
        result.context("enqueue task")??;
    }
    let all_in = async {
        while let Some(result) = workers.join_next().await {
            result.context("latency worker")??;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(STRAGGLER_LIMIT, all_in)
        .await
        .with_context(|| {
            format!(
                "latency phase: {} of {} items leased {STRAGGLER_LIMIT:?} after the last enqueue",
                received.load(Ordering::SeqCst),
                settings.items
            )
        })??;
    let samples = std::mem::take(
        &mut *samples
            .lock()
            .map_err(|_| anyhow::anyhow!("a worker panicked holding the samples"))?,
    );
    anyhow::ensure!(
        samples.enqueue_to_lease.len() == settings.items,
        "latency phase received {} of {} items",
        samples.enqueue_to_lease.len(),
        settings.items
    );
    Ok(Report {
        enqueue_to_lease: Percentiles::of(samples.enqueue_to_lease).context("no samples")?,
        complete_call: Percentiles::of(samples.complete_call).context("no samples")?,
        // The first Enqueue starts at 0: items-1 intervals span the producer's run.
        achieved_rate: (settings.items.saturating_sub(1)) as f64 / producer_seconds.max(1e-9),
    })
}

/// One worker: waiting Leases of one item, each completed at once, until every item is in.
async fn work(
    client: Client,
    queue: String,
    items: usize,
    epoch: Instant,
    received: Arc<AtomicUsize>,
    samples: Arc<Mutex<Samples>>,
    done: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let request = pb::LeaseRequest {
            queue: queue.clone(),
            max_items: 1,
            lease_duration: Some(duration(LEASE_DURATION)),
            max_wait: Some(duration(LEASE_WAIT)),
            ..Default::default()
        };
        let response = tokio::select! {
            // Dropping the call cancels it; the broker gives back anything it leased meanwhile.
            () = done.cancelled() => return Ok(()),
            response = client.lease(request) => response.context("lease")?,
        };
        let leased_at = epoch.elapsed();
        for item in response.items {
            let stamp: [u8; STAMP_BYTES] = item
                .payload
                .get(..STAMP_BYTES)
                .and_then(|s| s.try_into().ok())
                .context("a leased payload lacks the enqueue timestamp")?;
            let enqueued_at = Duration::from_nanos(u64::from_be_bytes(stamp));
            let completion = pb::Completion {
                lease_id: item.lease_id,
                result: bytes::Bytes::new(),
            };
            let call_started = Instant::now();
            let results = client
                .complete(&queue, vec![completion])
                .await
                .context("complete")?;
            let complete_call = call_started.elapsed();
            anyhow::ensure!(
                results.len() == 1 && results[0].outcome() == pb::LeaseOutcome::Ok,
                "complete did not take effect: {results:?}"
            );
            if let Ok(mut samples) = samples.lock() {
                samples
                    .enqueue_to_lease
                    .push(leased_at.saturating_sub(enqueued_at));
                samples.complete_call.push(complete_call);
            }
            if received.fetch_add(1, Ordering::SeqCst) + 1 >= items {
                done.cancel();
            }
        }
    }
}
