//! `wq-bench`: measures what wq does on this machine, against a real broker and a real Redis.
//!
//! By default it starts a private `redis-server` and an in-process broker; `--broker` points it
//! at a running broker instead (`--redis` then names its Redis, for the phases that read Redis
//! or start brokers of their own). Phases (each on a fresh queue; `--phases` picks them):
//!
//! - `enqueue`: N items of P bytes through `enqueue_all` in batches of B;
//! - `drain` W: W concurrent slots of one `wq-worker` Worker with a no-op handler, until drained;
//! - `e2e` W: enqueue and drain at the same time, until the sealed queue is drained;
//! - `pod` W: the `wq-worker` binary with its defaults at concurrency W drains a filled queue,
//!   as a Job pod does ([`job_pod`]);
//! - `latency`: enqueue→lease and Complete latency at an offered rate ([`latency`]);
//! - `wakeup`: a waiting Lease on one replica woken by an Enqueue through another ([`wakeup`]);
//! - `idle`: Redis commands per second caused by idle waiting Leases ([`idle`]);
//! - `baseline`: the lease and complete scripts called directly, without gRPC ([`baseline`]);
//! - `scale` (only with `--prefill`): enqueue and drain on a queue already holding many items,
//!   and Redis bytes per queued item ([`scale`]);
//! - `shards`: many queues at once, and each Redis server's CPU and commands per item
//!   ([`shards`]).
//!
//! `--redis-mode cluster` makes the private Redis a Redis Cluster of three masters with a
//! replica each ([`cluster`]; `--cluster-replicas` changes that); the phases that read one Redis server (`idle`, `baseline`, the
//! bytes of `scale`) are skipped there, and `shards` also runs on a private standalone Redis in
//! the same invocation, for the standalone cost per item beside each master's.
//!
//! It prints tables and, with `--json FILE`, writes the figures as JSON; `--peers-csv FILE`
//! writes them in the line format of the peers' harness ([`peers`]).

mod baseline;
mod cluster;
mod idle;
mod job_pod;
mod latency;
mod peers;
mod scale;
mod shards;
mod stats;
mod wakeup;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use futures_util::stream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wq_client::{Client, pb};
use wq_server::{
    config::BrokerConfig,
    connection::{RedisMode, RedisTarget},
};
use wq_worker::{ExitPolicy, Handler, LeasedItem, Outcome, Prefetch, Worker, WorkerConfig};

use crate::stats::{Percentiles, ms};

/// A part of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    Enqueue,
    Drain,
    E2e,
    Pod,
    Latency,
    Wakeup,
    Idle,
    Baseline,
    Shards,
}

/// The phases run when `--phases` is not given.
const DEFAULT_PHASES: &[Phase] = &[
    Phase::Enqueue,
    Phase::Drain,
    Phase::E2e,
    Phase::Pod,
    Phase::Latency,
    Phase::Wakeup,
    Phase::Idle,
    Phase::Baseline,
];

/// The same on a cluster: those that read one Redis server are replaced by `shards`.
const DEFAULT_CLUSTER_PHASES: &[Phase] = &[
    Phase::Enqueue,
    Phase::Drain,
    Phase::E2e,
    Phase::Pod,
    Phase::Latency,
    Phase::Wakeup,
    Phase::Shards,
];

/// `--redis-mode`: the broker's own modes, of which the bench starts these two privately.
fn bench_redis_mode(value: &str) -> Result<RedisMode, String> {
    match RedisMode::from_str(value, true)? {
        mode @ (RedisMode::Standalone | RedisMode::Cluster) => Ok(mode),
        RedisMode::Sentinel => {
            Err("wq-bench starts standalone or cluster only (no sentinel)".to_owned())
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "wq-bench",
    about = "Throughput and latency benchmark of the wq broker"
)]
struct Args {
    /// Items per throughput phase.
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
    /// Items each benchmark worker leases ahead of its free slots: `auto` or a number
    /// (`wq-worker --prefetch`; the `pod` phase runs the binary with its own default).
    #[arg(long, default_value = "auto")]
    prefetch: Prefetch,
    /// The phases to run, comma separated [default: enqueue,drain,e2e,pod,latency,wakeup,idle,
    /// baseline; with `--redis-mode cluster`: enqueue,drain,e2e,pod,latency,wakeup,shards].
    #[arg(long, value_enum, value_delimiter = ',')]
    phases: Option<Vec<Phase>>,
    /// The private Redis: one server, or a Redis Cluster of three masters with a replica each
    /// (the broker's `--redis-mode`; `sentinel` is not offered here).
    #[arg(
        long,
        default_value = "standalone",
        value_parser = bench_redis_mode,
        conflicts_with = "broker"
    )]
    redis_mode: RedisMode,
    /// With `--redis-mode cluster`: replicas of each of the three masters [default: 1].
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=2))]
    cluster_replicas: Option<u8>,
    /// A running broker to measure instead of a private one.
    #[arg(long)]
    broker: Option<String>,
    /// The Redis of `--broker`; without it, `wakeup`, `idle` and `baseline` are skipped there.
    #[arg(long, requires = "broker")]
    redis: Option<String>,
    /// latency: offered items per second, one item per Enqueue call.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// latency: items to send [default: N/4, at least 20].
    #[arg(long)]
    latency_items: Option<usize>,
    /// latency: workers, each leasing one item per waiting Lease.
    #[arg(long, default_value_t = 8)]
    latency_workers: u32,
    /// wakeup: rounds [default: N/100, between 20 and 200].
    #[arg(long)]
    wakeup_rounds: Option<usize>,
    /// idle: waiting Leases on the empty queue.
    #[arg(long, default_value_t = 1000)]
    idle_leases: usize,
    /// idle: connections the waiting Leases are spread over [default: one per 64 Leases, as a
    /// broker takes at most 75 waiting Leases per connection by default].
    #[arg(long)]
    idle_connections: Option<usize>,
    /// idle: seconds of each measuring window (one without waiters, one with).
    #[arg(long, default_value_t = 5.0)]
    idle_seconds: f64,
    /// baseline: lease script calls per pipeline (the counterpart of W worker slots).
    #[arg(long, default_value_t = 16)]
    baseline_depth: usize,
    /// scale: ready items already in the queue when enqueue and drain (at the largest W) are
    /// measured; 0 skips the phase.
    #[arg(long, default_value_t = 0)]
    prefill: usize,
    /// shards: queues the N items are spread over (on a cluster, as many on each master).
    #[arg(long, default_value_t = 12)]
    shard_queues: usize,
    /// shards: worker slots on each queue.
    #[arg(long, default_value_t = 4)]
    shard_workers: u32,
    /// shards, with `--redis-mode cluster`: put the queues on this many of the masters only
    /// (1: all on one, the others idle) [default: all].
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=3))]
    shard_masters: Option<u8>,
    /// pod: the `wq-worker` binary [default: the one beside wq-bench].
    #[arg(long)]
    worker_bin: Option<std::path::PathBuf>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write the throughput results as `RESULT,<name>,...` lines of `../shared/peers` to this
    /// file.
    #[arg(long)]
    peers_csv: Option<std::path::PathBuf>,
    /// The system name in `--peers-csv` lines.
    #[arg(long, default_value = "wq")]
    peers_name: String,
}

impl Args {
    fn runs(&self, phase: Phase) -> bool {
        match &self.phases {
            Some(phases) => phases.contains(&phase),
            None if self.redis_mode == RedisMode::Cluster => {
                DEFAULT_CLUSTER_PHASES.contains(&phase)
            }
            None => DEFAULT_PHASES.contains(&phase),
        }
    }

    fn on_cluster(&self) -> bool {
        self.redis_mode == RedisMode::Cluster
    }

    /// Says why a phase that reads one Redis server is skipped.
    fn skip(&self, phase: &str) {
        if self.on_cluster() {
            eprintln!("{phase}: skipped on --redis-mode cluster (it reads one Redis server)");
        } else {
            eprintln!("{phase}: skipped (give --redis with --broker)");
        }
    }
}

struct Noop;

impl Handler for Noop {
    async fn handle(&self, _item: &LeasedItem) -> Outcome {
        Outcome::Complete(bytes::Bytes::new())
    }
}

/// One throughput figure.
pub(crate) struct Row {
    phase: &'static str,
    /// Worker slots (for `baseline`: lease calls per pipeline); 0 when none.
    workers: u32,
    items: usize,
    seconds: f64,
    /// Redis CPU microseconds per item over the items' whole life (fill, lease, complete),
    /// where the phase measures it.
    redis_us_per_item: Option<f64>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.items as f64 / self.seconds
    }
}

/// One latency figure.
struct LatencyRow {
    phase: &'static str,
    metric: &'static str,
    /// What the figure was measured at, for the table and JSON.
    setting: String,
    percentiles: Percentiles,
}

/// A broker served from this process.
struct InProcessBroker {
    url: String,
    stop: CancellationToken,
    server: JoinHandle<Result<(), wq_server::ServeError>>,
}

impl InProcessBroker {
    async fn start(redis: RedisTarget) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let server = tokio::spawn(wq_server::serve(
            listener,
            redis,
            BrokerConfig::default(),
            async move { stopped.cancelled().await },
        ));
        Ok(Self {
            url: format!("http://{address}"),
            stop,
            server,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.server.await.context("broker task")??;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.on_cluster() || (args.cluster_replicas.is_none() && args.shard_masters.is_none()),
        "--cluster-replicas and --shard-masters need --redis-mode cluster"
    );
    // Kept alive for the whole run.
    let mut private_redis = None;
    let mut private_cluster = None;
    let mut private_broker = None;
    // `redis_url` is the one Redis server that some phases read (none on a cluster); `target`
    // is what the brokers those phases start are given.
    let (url, redis_url, target) = match (&args.broker, args.redis_mode) {
        (Some(url), _) => {
            let target = args.redis.as_deref().map(standalone_target).transpose()?;
            (url.clone(), args.redis.clone(), target)
        }
        (None, RedisMode::Cluster) => {
            let replicas = args.cluster_replicas.map_or(1, usize::from);
            let cluster = cluster::Cluster::start(replicas).await?;
            let target = cluster.target()?;
            let broker = InProcessBroker::start(target.clone()).await?;
            let url = broker.url.clone();
            private_cluster = Some(cluster);
            private_broker = Some(broker);
            (url, None, Some(target))
        }
        (None, _) => {
            let redis = wq_server::dev::RedisProcess::start().await?;
            let redis_url = redis.url();
            let target = standalone_target(&redis_url)?;
            let broker = InProcessBroker::start(target.clone()).await?;
            let url = broker.url.clone();
            private_redis = Some(redis);
            private_broker = Some(broker);
            (url, Some(redis_url), Some(target))
        }
    };
    let client = connect(&url).await?;
    let run = format!("bench-{}", std::process::id());
    let mut queues = Vec::new();
    let mut rows = Vec::new();
    let mut latency_rows = Vec::new();
    let mut idle_report = None;
    let mut scale_report: Option<scale::Report> = None;
    let mut shard_reports = Vec::new();

    if args.runs(Phase::Enqueue) {
        let queue = format!("{run}-enqueue");
        queues.push(queue.clone());
        let seconds = fill(&client, &queue, args.items, &args).await?;
        rows.push(Row {
            phase: "enqueue",
            workers: 0,
            items: args.items,
            seconds,
            redis_us_per_item: None,
        });
    }

    for &workers in &args.workers {
        if args.runs(Phase::Drain) {
            let queue = format!("{run}-drain-{workers}");
            queues.push(queue.clone());
            let before = redis_counters(redis_url.as_deref()).await?;
            let fill_seconds = fill(&client, &queue, args.items, &args).await?;
            rows.push(Row {
                phase: "fill",
                workers,
                items: args.items,
                seconds: fill_seconds,
                redis_us_per_item: None,
            });
            let started = Instant::now();
            let summary = worker(&client, &queue, workers, args.prefetch, ExitPolicy::Drained)
                .run(Arc::new(Noop), CancellationToken::new())
                .await;
            anyhow::ensure!(
                summary.completed == args.items as u64,
                "drain completed {} of {}",
                summary.completed,
                args.items
            );
            let seconds = started.elapsed().as_secs_f64();
            let after = redis_counters(redis_url.as_deref()).await?;
            rows.push(Row {
                phase: "drain",
                workers,
                items: args.items,
                seconds,
                redis_us_per_item: redis_us_per_item(before, after, args.items),
            });
        }

        if args.runs(Phase::E2e) {
            let queue = format!("{run}-e2e-{workers}");
            queues.push(queue.clone());
            let started = Instant::now();
            let drain = tokio::spawn({
                let w = worker(&client, &queue, workers, args.prefetch, ExitPolicy::Sealed);
                async move { w.run(Arc::new(Noop), CancellationToken::new()).await }
            });
            fill(&client, &queue, args.items, &args).await?;
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
                redis_us_per_item: None,
            });
        }

        if args.runs(Phase::Pod) {
            let queue = format!("{run}-pod-{workers}");
            queues.push(queue.clone());
            let binary = job_pod::worker_binary(args.worker_bin.as_deref())?;
            let report = job_pod::run(
                &client,
                &url,
                redis_url.as_deref(),
                &binary,
                &queue,
                workers,
                &args,
            )
            .await?;
            rows.push(Row {
                phase: "pod fill",
                workers,
                items: args.items,
                seconds: report.fill_seconds,
                redis_us_per_item: None,
            });
            rows.push(Row {
                phase: "pod",
                workers,
                items: args.items,
                seconds: report.drain_seconds,
                redis_us_per_item: report.redis_us_per_item,
            });
        }
    }

    if args.runs(Phase::Baseline) {
        match &redis_url {
            Some(redis_url) => {
                let queue = format!("{run}-baseline");
                queues.push(queue.clone());
                fill(&client, &queue, args.items, &args).await?;
                let seconds = baseline::run(
                    redis_url,
                    &BrokerConfig::default(),
                    &queue,
                    args.items,
                    args.baseline_depth,
                )
                .await?;
                rows.push(Row {
                    phase: "baseline",
                    workers: u32::try_from(args.baseline_depth).unwrap_or(u32::MAX),
                    items: args.items,
                    seconds,
                    redis_us_per_item: None,
                });
            }
            None => args.skip("baseline"),
        }
    }

    if args.runs(Phase::Latency) {
        let queue = format!("{run}-latency");
        queues.push(queue.clone());
        let settings = latency::Settings {
            items: args.latency_items.unwrap_or((args.items / 4).max(20)),
            rate: args.rate,
            workers: args.latency_workers,
            payload: args.payload,
        };
        let workers_client = connect(&url).await?;
        let report = latency::run(&client, &workers_client, &queue, &settings).await?;
        let setting = format!(
            "{:.0}/s offered ({:.0} achieved), W={}",
            settings.rate, report.achieved_rate, settings.workers
        );
        latency_rows.push(LatencyRow {
            phase: "latency",
            metric: "enqueue→lease",
            setting: setting.clone(),
            percentiles: report.enqueue_to_lease,
        });
        latency_rows.push(LatencyRow {
            phase: "latency",
            metric: "complete call",
            setting,
            percentiles: report.complete_call,
        });
    }

    if args.runs(Phase::Wakeup) {
        match &target {
            Some(target) => {
                let queue = format!("{run}-wakeup");
                queues.push(queue.clone());
                // Two more replicas, so neither is the one the other phases warmed up.
                let replica_a = InProcessBroker::start(target.clone()).await?;
                let replica_b = InProcessBroker::start(target.clone()).await?;
                let waiter = connect(&replica_a.url).await?;
                let producer = connect(&replica_b.url).await?;
                let rounds = args
                    .wakeup_rounds
                    .unwrap_or((args.items / 100).clamp(20, 200));
                let percentiles = wakeup::run(&waiter, &producer, &queue, rounds).await?;
                latency_rows.push(LatencyRow {
                    phase: "wakeup",
                    metric: "enqueue B→lease A",
                    setting: "2 replicas, 1 waiter".to_owned(),
                    percentiles,
                });
                drop((waiter, producer));
                replica_a.stop().await?;
                replica_b.stop().await?;
            }
            None => args.skip("wakeup"),
        }
    }

    if args.runs(Phase::Idle) {
        match &redis_url {
            Some(redis_url) => {
                let queue = format!("{run}-idle");
                queues.push(queue.clone());
                let settings = idle::Settings {
                    leases: args.idle_leases,
                    connections: args
                        .idle_connections
                        .unwrap_or(args.idle_leases.div_ceil(64)),
                    window: Duration::try_from_secs_f64(args.idle_seconds)
                        .context("--idle-seconds")?,
                };
                idle_report = Some((
                    settings.clone(),
                    idle::run(&url, redis_url, &queue, &settings).await?,
                ));
            }
            None => args.skip("idle"),
        }
    }

    if args.prefill > 0 {
        let queue = format!("{run}-scale");
        queues.push(queue.clone());
        let workers = args.workers.iter().copied().max().unwrap_or(1);
        let report = scale::run(
            &client,
            redis_url.as_deref(),
            &queue,
            args.prefill,
            &args,
            workers,
        )
        .await?;
        rows.push(Row {
            phase: "enqueue+",
            workers: 0,
            items: args.items,
            seconds: report.enqueue_seconds,
            redis_us_per_item: None,
        });
        rows.push(Row {
            phase: "drain+",
            workers,
            items: usize::try_from(report.drained).unwrap_or(usize::MAX),
            seconds: report.drain_seconds,
            redis_us_per_item: None,
        });
        scale_report = Some(report);
    }

    if args.runs(Phase::Shards) {
        let stem = format!("{run}-shard");
        match &private_cluster {
            Some(cluster) => {
                let masters = args.shard_masters.map(usize::from);
                let (names, holder) =
                    spread_over(cluster, &stem, args.shard_queues, masters).await?;
                queues.extend(names.iter().cloned());
                let setup = shards::Setup {
                    name: "cluster",
                    client: &client,
                    nodes: cluster.nodes().await?,
                    holder,
                };
                shard_reports.push(shards::run(&setup, &names, args.shard_workers, &args).await?);
                shard_reports.push(shards_on_standalone(&names, &args).await?);
            }
            None => {
                let names: Vec<String> = (0..args.shard_queues)
                    .map(|i| format!("{stem}-{i}"))
                    .collect();
                queues.extend(names.iter().cloned());
                let nodes = match &redis_url {
                    Some(url) => vec![cluster::Node::standalone(url)?],
                    None => Vec::new(),
                };
                let holder = match nodes.first() {
                    Some(node) => names
                        .iter()
                        .map(|q| (q.clone(), node.address.clone()))
                        .collect(),
                    None => Default::default(),
                };
                let setup = shards::Setup {
                    name: "standalone",
                    client: &client,
                    nodes,
                    holder,
                };
                shard_reports.push(shards::run(&setup, &names, args.shard_workers, &args).await?);
            }
        }
    }

    print_tables(&rows, &latency_rows, idle_report.as_ref());
    for report in &shard_reports {
        shards::print(report, args.shard_workers);
    }
    let bytes_per_item = scale_report.as_ref().and_then(|r| r.bytes_per_item);
    if let Some(bytes) = bytes_per_item {
        println!(
            "scale: {bytes:.0} Redis bytes per queued item of {} payload bytes ({} items)",
            args.payload, args.prefill
        );
    }
    if let Some(path) = &args.peers_csv {
        let notes = format!(
            "wq-bench N={} P={} B={} prefetch={:?}; broker in-process",
            args.items, args.payload, args.batch, args.prefetch
        );
        std::fs::write(path, peers::result_lines(&args.peers_name, &rows, &notes))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.json {
        let mut json = to_json(&args, &rows, &latency_rows, idle_report.as_ref());
        if let serde_json::Value::Array(records) = &mut json {
            if let Some(bytes) = bytes_per_item {
                records.push(serde_json::json!({
                    "phase": "scale", "prefill": args.prefill, "payload_bytes": args.payload,
                    "redis_bytes_per_item": bytes,
                }));
            }
            for report in &shard_reports {
                records.extend(shards::to_json(report, args.shard_workers, &args));
            }
        }
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    for queue in &queues {
        client.delete_queue(queue).await?;
    }
    if let Some(broker) = private_broker {
        broker.stop().await?;
    }
    if let Some(mut redis) = private_redis {
        redis.kill().await;
    }
    drop(private_cluster);
    Ok(())
}

/// Redis CPU microseconds per item between two readings of [`redis_counters`], when both exist.
fn redis_us_per_item(
    before: Option<cluster::Counters>,
    after: Option<cluster::Counters>,
    items: usize,
) -> Option<f64> {
    let (before, after) = before.zip(after)?;
    Some(after.since(&before).cpu() * 1e6 / items as f64)
}

/// The counters of the one Redis server, when there is one to read.
async fn redis_counters(url: Option<&str>) -> anyhow::Result<Option<cluster::Counters>> {
    match url {
        Some(url) => Ok(Some(cluster::Counters::read(url).await?)),
        None => Ok(None),
    }
}

fn standalone_target(url: &str) -> anyhow::Result<RedisTarget> {
    RedisTarget::parse(RedisMode::Standalone, url, None)
        .map_err(anyhow::Error::msg)
        .context("--redis")
}

/// `count` queue names, as many on each of `cluster`'s masters (or of the first `masters` of
/// them by address), and the master of each.
async fn spread_over(
    cluster: &cluster::Cluster,
    stem: &str,
    count: usize,
    masters: Option<usize>,
) -> anyhow::Result<(Vec<String>, std::collections::HashMap<String, String>)> {
    let mut ranges = cluster.slot_ranges().await?;
    if let Some(masters) = masters {
        let mut chosen: Vec<String> = ranges.iter().map(|(_, _, m)| m.clone()).collect();
        chosen.sort_unstable();
        chosen.dedup();
        chosen.truncate(masters);
        ranges.retain(|(_, _, master)| chosen.contains(master));
    }
    let prefix = BrokerConfig::default().key_prefix;
    shards::balanced_queues(stem, count, &ranges, |queue| {
        // The slot of a key the broker uses, so the hash tag is the broker's own.
        let key = wq_server::keys::QueueKeys::new(&prefix, &queue).ready;
        async move { cluster.slot_of(&key).await }
    })
    .await
}

/// The `shards` workload on a private standalone Redis and broker of its own, with the same
/// queue names, for the standalone cost per item beside a cluster's.
async fn shards_on_standalone(names: &[String], args: &Args) -> anyhow::Result<shards::Report> {
    let mut redis = wq_server::dev::RedisProcess::start().await?;
    let broker = InProcessBroker::start(standalone_target(&redis.url())?).await?;
    let client = connect(&broker.url).await?;
    let node = cluster::Node::standalone(&redis.url())?;
    let holder = names
        .iter()
        .map(|q| (q.clone(), node.address.clone()))
        .collect();
    let setup = shards::Setup {
        name: "standalone",
        client: &client,
        nodes: vec![node],
        holder,
    };
    let report = shards::run(&setup, names, args.shard_workers, args).await;
    drop(client);
    broker.stop().await?;
    redis.kill().await;
    report
}

fn print_tables(
    rows: &[Row],
    latency_rows: &[LatencyRow],
    idle: Option<&(idle::Settings, idle::Report)>,
) {
    if !rows.is_empty() {
        println!(
            "{:<8} {:>7} {:>9} {:>9} {:>12} {:>14}",
            "phase", "workers", "items", "seconds", "items/s", "Redis µs/item"
        );
        for row in rows {
            println!(
                "{:<8} {:>7} {:>9} {:>9.3} {:>12.0} {:>14}",
                row.phase,
                if row.workers == 0 {
                    "-".to_owned()
                } else {
                    row.workers.to_string()
                },
                row.items,
                row.seconds,
                row.rate(),
                row.redis_us_per_item
                    .map_or_else(|| "-".to_owned(), |us| format!("{us:.1}"))
            );
        }
        if rows.iter().any(|r| r.phase == "fill") {
            println!("(fill W: the enqueue that filled the queue for drain W)");
        }
        if rows.iter().any(|r| r.phase == "pod") {
            println!(
                "(pod W: the wq-worker binary with its defaults and --work-time 0s at \
                 --concurrency W; pod fill W: the enqueue before it)"
            );
        }
        if rows.iter().any(|r| r.redis_us_per_item.is_some()) {
            println!("(Redis µs/item: Redis CPU (INFO cpu) over the fill and the drain, per item)");
        }
        if rows.iter().any(|r| r.phase.ends_with('+')) {
            println!("(enqueue+, drain+: on a queue already holding --prefill items)");
        }
        if rows.iter().any(|r| r.phase == "baseline") {
            println!("(baseline: scripts called directly; workers = lease calls per pipeline)");
        }
    }
    if !latency_rows.is_empty() {
        println!();
        println!(
            "{:<8} {:<18} {:>7} {:>9} {:>9} {:>9}  at",
            "phase", "metric", "samples", "p50 ms", "p99 ms", "max ms"
        );
        for row in latency_rows {
            let p = &row.percentiles;
            println!(
                "{:<8} {:<18} {:>7} {:>9.2} {:>9.2} {:>9.2}  {}",
                row.phase,
                row.metric,
                p.samples,
                ms(p.p50),
                ms(p.p99),
                ms(p.max),
                row.setting
            );
        }
    }
    if let Some((settings, report)) = idle {
        println!();
        println!(
            "idle: Redis commands/s over {:?}: {:.1} without waiters, {:.1} with {} waiting \
             Leases on {} connections (difference {:+.1})",
            settings.window,
            report.quiet_per_s,
            report.waiting_per_s,
            settings.leases,
            settings.connections,
            report.waiting_per_s - report.quiet_per_s
        );
        let busiest: Vec<String> = report
            .waiting_by_command
            .iter()
            .take(6)
            .map(|(name, per_s)| format!("{name} {per_s:.1}"))
            .collect();
        println!("idle: with waiters, by command: {}", busiest.join(", "));
    }
}

fn to_json(
    args: &Args,
    rows: &[Row],
    latency_rows: &[LatencyRow],
    idle: Option<&(idle::Settings, idle::Report)>,
) -> serde_json::Value {
    let throughput = rows.iter().map(|r| {
        serde_json::json!({
            "phase": r.phase, "workers": r.workers, "items": r.items,
            "payload_bytes": args.payload, "batch": args.batch,
            "seconds": r.seconds, "items_per_s": r.items as f64 / r.seconds,
            "redis_cpu_us_per_item": r.redis_us_per_item,
        })
    });
    let latency = latency_rows.iter().map(|r| {
        let p = &r.percentiles;
        serde_json::json!({
            "phase": r.phase, "metric": r.metric, "setting": r.setting,
            "samples": p.samples, "p50_ms": ms(p.p50), "p99_ms": ms(p.p99), "max_ms": ms(p.max),
        })
    });
    let idle = idle.map(|(settings, report)| {
        serde_json::json!({
            "phase": "idle", "waiting_leases": settings.leases,
            "connections": settings.connections, "window_s": settings.window.as_secs_f64(),
            "redis_commands_per_s_without_waiters": report.quiet_per_s,
            "redis_commands_per_s_with_waiters": report.waiting_per_s,
            "with_waiters_by_command": report.waiting_by_command.iter()
                .map(|(name, per_s)| (name.clone(), serde_json::json!(per_s)))
                .collect::<serde_json::Map<_, _>>(),
        })
    });
    // One flat list of records, each naming its phase, as the throughput-only output was.
    serde_json::Value::Array(throughput.chain(latency).chain(idle).collect())
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

/// Enqueues `count` items; returns the seconds it took.
async fn fill(client: &Client, queue: &str, count: usize, args: &Args) -> anyhow::Result<f64> {
    let payload = bytes::Bytes::from(vec![b'x'; args.payload]);
    let items = (0..count).map(move |_| pb::EnqueueItem {
        payload: payload.clone(),
        ..Default::default()
    });
    let started = Instant::now();
    let summary = client
        .enqueue_all(queue, stream::iter(items), args.batch, 4, |_| {})
        .await?;
    anyhow::ensure!(
        summary.added == count as u64,
        "enqueued {} of {count}",
        summary.added,
    );
    Ok(started.elapsed().as_secs_f64())
}

fn worker(
    client: &Client,
    queue: &str,
    concurrency: u32,
    prefetch: Prefetch,
    exit: ExitPolicy,
) -> Worker {
    let mut config = WorkerConfig::new(queue);
    config.concurrency = concurrency;
    config.prefetch = prefetch;
    config.exit = exit;
    Worker::new(client.clone(), config)
}
