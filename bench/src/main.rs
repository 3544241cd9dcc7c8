//! `wq-bench`: measures what wq does on this machine, against a real broker and a real Redis.
//!
//! By default it starts a private `redis-server` and an in-process broker; `--broker` points it
//! at a running broker instead. Phases (each on a fresh queue):
//!
//! - `enqueue`: N items of P bytes through `enqueue_all` in batches of B;
//! - `drain` W: W concurrent slots of one `wq-worker` Worker with a no-op handler, until drained;
//! - `e2e` W: enqueue and drain at the same time, until the sealed queue is drained.
//!
//! It prints a table and, with `--json FILE`, writes the figures as JSON.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use futures_util::stream;
use tokio_util::sync::CancellationToken;
use wq_client::{Client, pb};
use wq_worker::{ExitPolicy, Handler, LeasedItem, Outcome, Worker, WorkerConfig};

#[derive(Debug, Parser)]
#[command(name = "wq-bench", about = "Throughput benchmark of the wq broker")]
struct Args {
    /// Items per phase.
    #[arg(short = 'n', long, default_value_t = 20_000)]
    items: usize,
    /// Payload bytes per item.
    #[arg(short = 'p', long, default_value_t = 64)]
    payload: usize,
    /// Items per Enqueue call.
    #[arg(short = 'b', long, default_value_t = 500)]
    batch: usize,
    /// Worker concurrencies to measure, comma separated.
    #[arg(short = 'w', long, value_delimiter = ',', default_value = "1,4,16")]
    workers: Vec<u32>,
    /// A running broker to measure instead of a private one.
    #[arg(long)]
    broker: Option<String>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

struct Noop;

impl Handler for Noop {
    async fn handle(&self, _item: &LeasedItem) -> Outcome {
        Outcome::Complete(bytes::Bytes::new())
    }
}

struct Row {
    phase: &'static str,
    workers: u32,
    items: usize,
    seconds: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Kept alive for the whole run.
    let mut private = None;
    let url = match &args.broker {
        Some(url) => url.clone(),
        None => {
            let redis = wq_server::dev::RedisProcess::start().await?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let address = listener.local_addr()?;
            let stop = CancellationToken::new();
            let stopped = stop.clone();
            let server = tokio::spawn(wq_server::serve(
                listener,
                redis::Client::open(redis.url())?,
                wq_server::config::BrokerConfig::default(),
                async move { stopped.cancelled().await },
            ));
            private = Some((redis, stop, server));
            format!("http://{address}")
        }
    };
    let client = connect(&url).await?;
    let run = format!("bench-{}", std::process::id());
    let mut rows = Vec::new();

    let queue = format!("{run}-enqueue");
    let seconds = fill(&client, &queue, &args).await?;
    rows.push(Row {
        phase: "enqueue",
        workers: 0,
        items: args.items,
        seconds,
    });

    for &workers in &args.workers {
        let queue = format!("{run}-drain-{workers}");
        fill(&client, &queue, &args).await?;
        let started = Instant::now();
        let summary = worker(&client, &queue, workers, ExitPolicy::Drained)
            .run(Arc::new(Noop), CancellationToken::new())
            .await;
        anyhow::ensure!(
            summary.completed == args.items as u64,
            "drain completed {} of {}",
            summary.completed,
            args.items
        );
        rows.push(Row {
            phase: "drain",
            workers,
            items: args.items,
            seconds: started.elapsed().as_secs_f64(),
        });

        let queue = format!("{run}-e2e-{workers}");
        let started = Instant::now();
        let drain = tokio::spawn({
            let w = worker(&client, &queue, workers, ExitPolicy::Sealed);
            async move { w.run(Arc::new(Noop), CancellationToken::new()).await }
        });
        fill(&client, &queue, &args).await?;
        client.seal(&queue).await?;
        let summary = drain.await?;
        anyhow::ensure!(
            summary.completed == args.items as u64,
            "e2e completed {} of {}",
            summary.completed,
            args.items
        );
        rows.push(Row {
            phase: "e2e",
            workers,
            items: args.items,
            seconds: started.elapsed().as_secs_f64(),
        });
    }

    println!(
        "{:<8} {:>7} {:>9} {:>9} {:>12}",
        "phase", "workers", "items", "seconds", "items/s"
    );
    for row in &rows {
        println!(
            "{:<8} {:>7} {:>9} {:>9.3} {:>12.0}",
            row.phase,
            if row.workers == 0 {
                "-".to_owned()
            } else {
                row.workers.to_string()
            },
            row.items,
            row.seconds,
            row.items as f64 / row.seconds
        );
    }
    if let Some(path) = &args.json {
        let json: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "phase": r.phase, "workers": r.workers, "items": r.items,
                    "payload_bytes": args.payload, "batch": args.batch,
                    "seconds": r.seconds, "items_per_s": r.items as f64 / r.seconds,
                })
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    for queue in [format!("{run}-enqueue")].into_iter().chain(
        args.workers
            .iter()
            .flat_map(|w| [format!("{run}-drain-{w}"), format!("{run}-e2e-{w}")]),
    ) {
        client.delete_queue(&queue).await?;
    }
    if let Some((mut redis, stop, server)) = private {
        stop.cancel();
        server.await??;
        redis.kill().await;
    }
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    for _ in 0..50 {
        if let Ok(client) = Client::connect(url).await
            && client.queue_state("bench-ping").await.is_ok()
        {
            return Ok(client);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the broker at {url} does not answer")
}

/// Enqueues the phase's items; returns the seconds it took.
async fn fill(client: &Client, queue: &str, args: &Args) -> anyhow::Result<f64> {
    let payload = bytes::Bytes::from(vec![b'x'; args.payload]);
    let items = (0..args.items).map(move |_| pb::EnqueueItem {
        payload: payload.clone(),
        ..Default::default()
    });
    let started = Instant::now();
    let summary = client
        .enqueue_all(queue, stream::iter(items), args.batch, 4, |_| {})
        .await?;
    anyhow::ensure!(
        summary.added == args.items as u64,
        "enqueued {} of {}",
        summary.added,
        args.items
    );
    Ok(started.elapsed().as_secs_f64())
}

fn worker(client: &Client, queue: &str, concurrency: u32, exit: ExitPolicy) -> Worker {
    let mut config = WorkerConfig::new(queue);
    config.concurrency = concurrency;
    config.exit = exit;
    Worker::new(client.clone(), config)
}
