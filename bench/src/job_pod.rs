//! The `pod` phase: the path a Kubernetes Job pod runs, measured as such. The `wq-worker`
//! binary with its defaults and the no-op built-in handler (`--work-time 0s`), at concurrency W,
//! drains N items of a queue that was filled in batches, in its own process, and the drain ends
//! when the binary exits 0 on the drained queue (its default exit policy).
//!
//! The worker is started on the filled queue while the queue is paused, so its start-up and
//! connection are outside the timed window, as BullMQ's worker is connected before its timer in
//! `../shared/peers`: the timer starts at Resume and stops when the process has exited. Redis CPU
//! (`INFO cpu`) is taken over the fill and the drain together, the whole life of the items.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use wq_client::Client;

/// How long the worker may take to start and reach the broker.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a drain may take before the phase gives up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

/// What one run of the phase measured.
#[derive(Debug)]
pub(crate) struct Report {
    /// Seconds from Resume to the worker's exit.
    pub(crate) drain_seconds: f64,
    /// Seconds the fill took.
    pub(crate) fill_seconds: f64,
    /// Redis CPU microseconds per item over the fill and the drain; None without a Redis to ask.
    pub(crate) redis_us_per_item: Option<f64>,
}

/// The `wq-worker` binary: `--worker-bin`, or the one built beside this benchmark.
pub(crate) fn worker_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()
            .context("locating wq-bench")?
            .with_file_name("wq-worker"),
    };
    anyhow::ensure!(
        path.is_file(),
        "no wq-worker binary at {} (build it with `cargo build --release -p wq-worker`, or give \
         --worker-bin)",
        path.display()
    );
    Ok(path)
}

/// Fills `queue` with `items` items, then drains it with the `wq-worker` binary at
/// `concurrency`, as described in the module docs.
///
/// # Errors
/// When a call fails, the worker does not start, exits with a failure, or leaves items behind.
pub(crate) async fn run(
    client: &Client,
    broker_url: &str,
    redis_url: Option<&str>,
    binary: &Path,
    queue: &str,
    concurrency: u32,
    args: &crate::Args,
) -> anyhow::Result<Report> {
    let before = crate::redis_counters(redis_url).await?;
    let fill_seconds = crate::fill(client, queue, args.items, args).await?;
    client.pause(queue).await?;
    let mut worker = tokio::process::Command::new(binary)
        .args([
            "--broker",
            broker_url,
            "--queue",
            queue,
            "--work-time",
            "0s",
        ])
        .args(["--concurrency", &concurrency.to_string()])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stderr = worker.stderr.take().context("the worker's stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    // The worker logs the queue's state once it reaches the broker, just before its first Lease.
    let reached = tokio::time::timeout(START_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("initial queue state") {
                return Ok(true);
            }
        }
        Ok::<_, std::io::Error>(false)
    })
    .await;
    anyhow::ensure!(
        matches!(reached, Ok(Ok(true))),
        "wq-worker did not reach the broker within {START_TIMEOUT:?}"
    );
    // Its log is read to the end, as a pod's runtime reads it, so the worker never blocks on it.
    let log = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if kept.len() < 20 {
                kept.push(line);
            }
        }
        kept
    });
    // Its first Lease is parked on the paused queue by now, give or take a loopback round trip.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    client.resume(queue).await?;
    let status = tokio::time::timeout(DRAIN_TIMEOUT, worker.wait())
        .await
        .with_context(|| format!("wq-worker did not finish within {DRAIN_TIMEOUT:?}"))??;
    let drain_seconds = started.elapsed().as_secs_f64();
    let log = log.await.unwrap_or_default();
    anyhow::ensure!(
        status.success(),
        "wq-worker exited with {status}; its first log lines:\n{}",
        log.join("\n")
    );
    let after = crate::redis_counters(redis_url).await?;
    let state = client.queue_state(queue).await?;
    anyhow::ensure!(
        state.drained && state.completed_total == args.items as u64,
        "the worker left the queue with {} ready, {} leased, {} completed of {}",
        state.ready,
        state.leased,
        state.completed_total,
        args.items
    );
    Ok(Report {
        drain_seconds,
        fill_seconds,
        redis_us_per_item: crate::redis_us_per_item(before, after, args.items),
    })
}
