//! The limits that protect the broker: per-queue length, waiting Leases, Redis calls in flight
//! and request size. Each answers RESOURCE_EXHAUSTED naming the limit, writes nothing, and
//! leaves the broker serving.

use std::time::{Duration, Instant};

use tonic::Code;
use wq_tests::{
    Broker, complete, enqueue, item, item_with_id, lease, pb, redis, redis_dump, state, test_config,
};

#[tokio::test]
async fn a_full_queue_refuses_whole_batches_until_items_finish() {
    let redis = redis().await;
    let mut config = test_config();
    config.max_queue_length = 3;
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        vec![item_with_id("a", "a"), item_with_id("b", "b")],
    )
    .await;

    // Two new items (the duplicate does not count) would make four: nothing is written.
    let before = redis_dump(&redis).await;
    let refused = client
        .enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: vec![item_with_id("a", "a"), item_with_id("c", "c"), item("d")],
        })
        .await
        .expect_err("over the length limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-queue-length 3")
            && refused.message().contains("holds 2")
            && refused.message().contains("would add 2"),
        "{refused:?}"
    );
    assert_eq!(
        redis_dump(&redis).await,
        before,
        "a refused batch writes nothing"
    );
    // Another queue has its own room.
    enqueue(&mut client, "other", vec![item("x"), item("y"), item("z")]).await;

    // Duplicates, repeated within the batch too, count once: exactly full is allowed.
    enqueue(
        &mut client,
        "q",
        vec![
            item_with_id("b", "b"),
            item_with_id("c", "c"),
            item_with_id("c", "c"),
        ],
    )
    .await;
    // Leased items still occupy the queue; completed ones free their place.
    let leased = lease(&mut client, "q", 1, Duration::from_secs(60)).await;
    let full = client
        .enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: vec![item("e")],
        })
        .await
        .expect_err("still full while an item is leased");
    assert_eq!(full.code(), Code::ResourceExhausted);
    complete(&mut client, "q", &[leased.items[0].lease_id.clone()]).await;
    enqueue(&mut client, "q", vec![item("e")]).await;
    assert_eq!(state(&mut client, "q").await.ready, 3);
}

fn waiting_lease(queue: &str) -> pb::LeaseRequest {
    pb::LeaseRequest {
        queue: queue.into(),
        max_items: 1,
        max_wait: Some(wq_tests::duration(Duration::from_secs(10))),
        ..Default::default()
    }
}

#[tokio::test]
async fn waiting_leases_beyond_the_bound_are_refused_at_once_and_slots_come_back() {
    let redis = redis().await;
    let mut config = test_config();
    config.max_waiting_leases = 2;
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;

    let mut waiters = Vec::new();
    for _ in 0..2 {
        let mut waiter = broker.client().await;
        waiters.push(tokio::spawn(async move {
            waiter.lease(waiting_lease("q")).await
        }));
    }
    // Nothing shows how many calls wait; give both time to reach their wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        waiters.iter().all(|w| !w.is_finished()),
        "both waiters wait"
    );
    let started = Instant::now();
    let refused = client
        .lease(waiting_lease("q"))
        .await
        .expect_err("a third waiter is refused");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    assert!(
        refused.message().contains("--max-waiting-leases 2"),
        "{refused:?}"
    );
    // A Lease that finds work, or does not wait, needs no waiting slot.
    let empty = lease(&mut client, "empty", 1, Duration::from_secs(60)).await;
    assert!(empty.items.is_empty());

    enqueue(&mut client, "q", vec![item("a"), item("b")]).await;
    for waiter in waiters {
        let reply = waiter
            .await
            .expect("the waiter task")
            .expect("the waiter gets an item");
        assert_eq!(reply.into_inner().items.len(), 1);
    }
    // Their slots are free again.
    let mut waiter = broker.client().await;
    let again = tokio::spawn(async move { waiter.lease(waiting_lease("q")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    enqueue(&mut client, "q", vec![item("c")]).await;
    let reply = again
        .await
        .expect("task")
        .expect("a new waiter is admitted");
    assert_eq!(reply.into_inner().items.len(), 1);
}

#[tokio::test]
async fn a_request_over_the_message_limit_is_resource_exhausted_and_writes_nothing() {
    let redis = redis().await;
    let mut config = test_config();
    config.max_message_bytes = 4096;
    // The broker refuses to start with limits under which an item could not be leased.
    config.max_payload_bytes = 1024;
    config.max_header_bytes = 512;
    config.max_reply_bytes = 4096;
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    let before = redis_dump(&redis).await;
    let big = "x".repeat(1024);
    let refused = client
        .enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: (0..8).map(|_| item(&big)).collect(),
        })
        .await
        .expect_err("over the message limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("4096"), "{refused:?}");
    assert_eq!(redis_dump(&redis).await, before);
    enqueue(&mut client, "q", vec![item(&big)]).await;
}

#[tokio::test]
async fn calls_past_the_redis_in_flight_bound_end_with_resource_exhausted() {
    let redis = redis().await;
    let mut config = test_config();
    config.max_redis_in_flight = 1;
    let broker = Broker::start_with(&redis.url(), config).await;
    let client = broker.client().await;
    let pid = redis.pid().expect("redis runs");
    wq_tests::signal(pid, "-STOP");
    let started = Instant::now();
    let calls = (0..4).map(|_| {
        let mut client = client.clone();
        async move {
            client
                .queue_state(pb::QueueStateRequest { queue: "q".into() })
                .await
                .expect_err("frozen redis")
                .code()
        }
    });
    let codes = futures_util::future::join_all(calls).await;
    let took = started.elapsed();
    wq_tests::signal(pid, "-CONT");
    // Each call waits at most the Redis timeout (500 ms) for a slot, then as long for Redis.
    assert!(took < Duration::from_millis(2500), "{took:?}");
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Code::Unavailable | Code::ResourceExhausted)),
        "{codes:?}"
    );
    assert!(codes.contains(&Code::ResourceExhausted), "{codes:?}");
    wq_tests::eventually("calls succeed again", async || {
        client
            .clone()
            .queue_state(pb::QueueStateRequest { queue: "q".into() })
            .await
            .is_ok()
    })
    .await;
}
