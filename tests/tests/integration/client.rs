//! The wq-client library: batched enqueue with client-side ids, and retries where safe.

use std::time::Duration;

use futures_util::stream;
use wq_client::{Client, RetryPolicy};
use wq_tests::*;

#[tokio::test]
async fn enqueue_all_batches_a_stream_and_a_replay_only_finds_duplicates() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let client = Client::connect(&broker.url()).await.expect("connect");
    let items: Vec<pb::EnqueueItem> = (0..2500)
        .map(|i| item_with_id(&format!("id-{i}"), "x"))
        .collect();
    let mut progress = Vec::new();
    let summary = client
        .enqueue_all("q", stream::iter(items.clone()), 100, 4, |done| {
            progress.push(done)
        })
        .await
        .expect("enqueue_all");
    assert_eq!((summary.added, summary.duplicates), (2500, 0));
    assert_eq!(progress.len(), 25, "one progress call per batch");
    assert_eq!(progress.last(), Some(&2500));
    let replay = client
        .enqueue_iter("q", items, |_| {})
        .await
        .expect("replay");
    assert_eq!((replay.added, replay.duplicates), (0, 2500));
    assert_eq!(client.queue_state("q").await.expect("state").ready, 2500);
}

#[tokio::test]
async fn unavailable_is_retried_for_safe_calls_until_redis_returns() {
    let mut redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let client = Client::connect(&broker.url())
        .await
        .expect("connect")
        .with_retry(RetryPolicy {
            attempts: 30,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(300),
        });
    redis.kill().await;
    let restart = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        redis.restart().await.expect("redis restarts");
        redis
    });
    // Ids are assigned before the first try, so however many tries it takes, one item lands.
    let results = client
        .enqueue("q", vec![item("survives")])
        .await
        .expect("retried until redis is back");
    assert_eq!(results.len(), 1);
    let _redis = restart.await.expect("restart task");
    let state = client.queue_state("q").await.expect("state");
    assert_eq!((state.ready, state.enqueued_total), (1, 1));
    let not_found = client
        .get_item("q", "missing")
        .await
        .expect_err("unknown id");
    assert_eq!(not_found.code(), Some(tonic::Code::NotFound));
    assert!(
        not_found.to_string().starts_with("not found:"),
        "{not_found}"
    );
}

/// Items just under the broker's 1 MiB payload limit.
fn near_max_items(prefix: &str, count: usize) -> Vec<pb::EnqueueItem> {
    let payload = "x".repeat((1 << 20) - 1024);
    (0..count)
        .map(|i| item_with_id(&format!("{prefix}-{i}"), &payload))
        .collect()
}

/// Batches of 15 near-max items (15 MiB, under the 16 MiB message limit), four in flight, from
/// three callers sharing one connection, while Redis stalls for 2 s (SIGSTOP): the batches the
/// connection's 24 MiB share of the broker's byte budget admitted wait for Redis, and the others
/// wait for room longer than the broker lets them (1 s) and are refused with RESOURCE_EXHAUSTED.
/// Batches cut at 4 MiB, 8 MiB in flight per call, and retries of the budget's refusals let
/// every item in once Redis is back. Default limits otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_all_of_near_max_items_fits_the_brokers_byte_budget() {
    let redis = redis().await;
    let config = BrokerConfig {
        redis_timeout: Duration::from_secs(5),
        ..BrokerConfig::default()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let client = Client::connect(&broker.url()).await.expect("connect");
    let pid = redis.pid().expect("Redis runs");
    signal(pid, "-STOP");
    let calls: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|prefix| {
            let client = client.clone();
            let items = near_max_items(prefix, 16);
            tokio::spawn(async move {
                client
                    .enqueue_all("big", stream::iter(items), 15, 4, |_| {})
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(pid, "-CONT");
    for call in calls {
        let summary = call
            .await
            .expect("the task")
            .expect("a valid seed of large items succeeds");
        assert_eq!((summary.added, summary.duplicates), (16, 0));
    }
    assert_eq!(client.queue_state("big").await.expect("state").ready, 48);
}
