//! Redis failing under load: SIGKILLed (with `appendfsync always`) and restarted from its
//! append-only file while a producer keeps enqueueing, and SIGSTOPped for longer than the broker's
//! Redis timeout and the workers' leases.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use tonic::Code;
use wq_tests::{health::ServingStatus, *};

use super::{
    fleet::{CONCURRENCY, Fleet, HELD_PER_WORKER, assert_each_ran, enqueue_work, work_time},
    harness::{Rng, scratch_dir, wait_until, within},
};

// ---------------------------------------------------------------------------------------------
// Redis dies under load.
// ---------------------------------------------------------------------------------------------

/// What a producer got acknowledged, and how its failed calls went.
#[derive(Debug, Default)]
struct Production {
    acknowledged: Vec<String>,
    failed_calls: usize,
    slowest_failure: Duration,
}

/// Enqueues batches of 10 items (ids `p-<batch>-<n>`) every 50 ms until `stop`, retrying a
/// failed batch with the same ids, as a careful producer does. Every failure must be
/// UNAVAILABLE.
async fn produce(
    mut client: Client,
    queue: &str,
    mut rng: Rng,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Production {
    let mut production = Production::default();
    let mut batch = 0;
    let mut retry: Option<Vec<pb::EnqueueItem>> = None;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let items = retry.take().unwrap_or_else(|| {
            batch += 1;
            (0..10)
                .map(|n| item_with_id(&format!("p-{batch:05}-{n}"), &work_time(&mut rng)))
                .collect()
        });
        let called = Instant::now();
        let reply = client
            .enqueue(pb::EnqueueRequest {
                queue: queue.to_owned(),
                items: items.clone(),
            })
            .await;
        match reply {
            Ok(reply) => production
                .acknowledged
                .extend(reply.into_inner().results.into_iter().map(|r| r.id)),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                production.failed_calls += 1;
                production.slowest_failure = production.slowest_failure.max(called.elapsed());
                retry = Some(items);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    production
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_keeps_every_acknowledged_item_and_nobody_restarts() {
    const WORKERS: usize = 3;
    let mut rng = Rng::new();
    let dir = scratch_dir();
    let mut redis = RedisProcess::start_with(&[
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ])
    .await
    .unwrap_or_else(|e| panic!("cannot start the test's redis-server: {e}"));
    let broker = Broker::start(&redis.url()).await;
    let mut fleet = Fleet::new(dir.path());
    let started = Instant::now();
    for _ in 0..WORKERS {
        fleet.spawn(&broker.url(), "q", &["--until", "sealed"]);
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = tokio::spawn(produce(
        broker.client().await,
        "q",
        Rng::from_seed(rng.next_u64()),
        Arc::clone(&stop),
    ));
    tokio::time::sleep(rng.between(Duration::from_secs(1), Duration::from_secs(2))).await;

    // SIGKILL: Redis keeps only what its append-only file already holds.
    redis.kill().await;
    let killed = Instant::now();
    let down_for = rng.between(Duration::from_secs(3), Duration::from_secs(4));
    let mut probe = broker.client().await;
    let called = Instant::now();
    let status = probe
        .queue_state(pb::QueueStateRequest { queue: "q".into() })
        .await
        .expect_err("Redis is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(called.elapsed() < Duration::from_secs(2), "fails fast");
    wait_until(
        Duration::from_secs(3),
        "health NOT_SERVING while Redis is down",
        async || health_of(&broker.url(), None).await == Some(ServingStatus::NotServing),
    )
    .await;
    tokio::time::sleep(down_for.saturating_sub(killed.elapsed())).await;
    let exited = fleet.exited();
    assert!(
        exited.is_empty(),
        "workers exited during the outage: {exited:?}"
    );

    redis.restart().await.expect("Redis restarts from its AOF");
    let restarted = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "health SERVING after Redis is back",
        async || health_of(&broker.url(), None).await == Some(ServingStatus::Serving),
    )
    .await;
    let recovery = restarted.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let production = within(Duration::from_secs(10), "the producer stops", producer)
        .await
        .expect("the producer does not panic");
    broker
        .admin()
        .await
        .seal_queue(pb::SealQueueRequest { queue: "q".into() })
        .await
        .expect("sealing the queue");
    fleet.all_exit_zero(Duration::from_secs(60)).await;
    let elapsed = started.elapsed();

    assert!(
        production.failed_calls > 0,
        "the producer ran into the outage"
    );
    assert!(
        production.slowest_failure < Duration::from_secs(2),
        "failed enqueues fail fast: the slowest took {:?}",
        production.slowest_failure
    );
    let acknowledged: Vec<String> = production
        .acknowledged
        .iter()
        .cloned()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let s = state(&mut probe, "q").await;
    assert_eq!(
        (s.sealed, s.drained, s.dead),
        (true, true, 0),
        "sealed and drained, nothing dead: {s:?}"
    );
    assert!(
        s.completed_total >= acknowledged.len() as u64,
        "{} completions for {} acknowledged items",
        s.completed_total,
        acknowledged.len()
    );
    let executions = assert_each_ran(&acknowledged, &fleet.executions());
    eprintln!(
        "faults: redis crash: acknowledged={} failed_enqueue_calls={} slowest_failure={}ms \
         down={:.1}s serving_again_after={}ms executions={executions} duplicates={} \
         reclaimed={} elapsed={:.1}s seed={}",
        acknowledged.len(),
        production.failed_calls,
        production.slowest_failure.as_millis(),
        down_for.as_secs_f64(),
        recovery.as_millis(),
        executions - acknowledged.len(),
        s.reclaimed_total,
        elapsed.as_secs_f64(),
        rng.seed
    );
}

// ---------------------------------------------------------------------------------------------
// Redis freezes under load.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_under_load_bounds_every_call_and_loses_nothing() {
    const ITEMS: usize = 800;
    const WORKERS: usize = 3;
    // Longer than the broker's Redis timeout (500 ms) and than the workers' 2 s leases.
    const FROZEN_FOR: Duration = Duration::from_secs(3);
    let mut rng = Rng::new();
    let dir = scratch_dir();
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let ids = enqueue_work(&mut client, "q", "item", ITEMS, &mut rng).await;
    let mut fleet = Fleet::new(dir.path());
    let started = Instant::now();
    for _ in 0..WORKERS {
        fleet.spawn(&broker.url(), "q", &[]);
    }
    let freeze_at = (ITEMS * (20 + rng.below(31) as usize) / 100) as u64;
    wait_until(Duration::from_secs(60), "the freeze point", async || {
        state(&mut client, "q").await.completed_total >= freeze_at
    })
    .await;

    let pid = redis.pid().expect("Redis runs");
    signal(pid, "-STOP");
    let frozen = Instant::now();
    // Probe while frozen: every call ends, UNAVAILABLE, soon after the Redis timeout. The
    // probe enqueues carry ids, so they can be retried safely afterwards.
    let mut probes = 0;
    let mut slowest = Duration::ZERO;
    let mut probe_ids = Vec::new();
    let mut saw_not_serving = false;
    while frozen.elapsed() < FROZEN_FOR {
        let id = format!("frozen-{probes}");
        let called = Instant::now();
        let enqueued = client
            .enqueue(pb::EnqueueRequest {
                queue: "probe".into(),
                items: vec![item_with_id(&id, "x")],
            })
            .await;
        let took = called.elapsed();
        let status = enqueued.expect_err("Redis is frozen");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        slowest = slowest.max(took);
        probe_ids.push(id);
        probes += 1;
        saw_not_serving |= health_of(&broker.url(), None).await == Some(ServingStatus::NotServing);
    }
    let exited = fleet.exited();
    assert!(
        exited.is_empty(),
        "workers exited while Redis was frozen: {exited:?}"
    );
    signal(pid, "-CONT");
    let thawed = Instant::now();
    fleet.all_exit_zero(Duration::from_secs(60)).await;
    let drained_after_thaw = thawed.elapsed();
    let elapsed = started.elapsed();

    assert!(
        slowest < Duration::from_secs(2),
        "calls are bounded by the Redis timeout: the slowest took {slowest:?}"
    );
    assert!(
        saw_not_serving,
        "health said NOT_SERVING while Redis was frozen"
    );
    let s = state(&mut client, "q").await;
    assert_eq!(
        (s.drained, s.dead, s.completed_total),
        (true, 0, ITEMS as u64),
        "every item completed exactly once: {s:?}"
    );
    let executions = assert_each_ran(&ids, &fleet.executions());
    let duplicates = executions - ITEMS;
    // Only items the workers held when Redis froze can run twice (their leases ran out
    // meanwhile, or their Complete timed out).
    let bound = WORKERS * HELD_PER_WORKER;
    assert!(
        duplicates <= bound,
        "{duplicates} repeated executions; the workers held at most {bound} items"
    );
    // An Enqueue answered UNAVAILABLE may still have been applied once Redis thawed: retrying
    // it with the same ids finds exactly those as duplicates and stores nothing twice.
    let mut applied = 0;
    for id in &probe_ids {
        if get_item(&mut client, "probe", id).await.is_ok() {
            applied += 1;
        }
    }
    let retried = client
        .enqueue(pb::EnqueueRequest {
            queue: "probe".into(),
            items: probe_ids.iter().map(|id| item_with_id(id, "x")).collect(),
        })
        .await
        .expect("retrying the probe enqueues")
        .into_inner()
        .results;
    let duplicates_on_retry = retried.iter().filter(|r| r.duplicate).count();
    assert_eq!(
        duplicates_on_retry, applied,
        "the retry reports as duplicates exactly the probes that were applied"
    );
    assert_eq!(
        state(&mut client, "probe").await.ready,
        probe_ids.len() as u64,
        "each probe item stored once"
    );
    eprintln!(
        "faults: redis frozen: items={ITEMS} workers={WORKERS}x{CONCURRENCY} frozen={:.1}s \
         probe_calls={probes} slowest_probe={}ms timed_out_enqueues_applied_after_thaw={applied}/{probes} \
         drained_after_thaw={:.1}s executions={executions} duplicates={duplicates} (bound {bound}) \
         reclaimed={} elapsed={:.1}s seed={}",
        FROZEN_FOR.as_secs_f64(),
        slowest.as_millis(),
        drained_after_thaw.as_secs_f64(),
        s.reclaimed_total,
        elapsed.as_secs_f64(),
        rng.seed
    );
}
