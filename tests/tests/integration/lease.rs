//! Lease: batches, drained, waiting and wake-ups across replicas, cancellation, concurrency.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use wq_tests::*;

#[tokio::test]
async fn leases_up_to_max_items_and_reports_drained() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;

    let empty = lease(&mut client, "never-used", 0, Duration::from_secs(30)).await;
    assert!(empty.items.is_empty());
    assert!(empty.drained, "an unused queue is drained");

    enqueue(
        &mut client,
        "q",
        (0..5).map(|i| item(&format!("{i}"))).collect(),
    )
    .await;
    let one = lease(&mut client, "q", 0, Duration::from_secs(30)).await;
    assert_eq!(one.items.len(), 1, "max_items 0 means 1");
    assert_eq!(one.items[0].attempt, 1);
    assert_eq!(one.items[0].max_attempts, 5);
    assert!(one.items[0].lease_expire_time.is_some() && one.items[0].enqueue_time.is_some());
    let rest = lease(&mut client, "q", 10, Duration::from_secs(30)).await;
    assert_eq!(rest.items.len(), 4);
    assert!(!rest.drained, "leased items keep the queue undrained");

    let mut ids: Vec<String> = one
        .items
        .iter()
        .chain(&rest.items)
        .map(|i| i.lease_id.clone())
        .collect();
    let last = ids.pop().expect("five leases");
    complete(&mut client, "q", &ids).await;
    let s = state(&mut client, "q").await;
    assert_eq!((s.leased, s.drained), (1, false));
    complete(&mut client, "q", &[last]).await;
    let s = state(&mut client, "q").await;
    assert!(s.drained);
    assert_eq!(s.completed_total, 5);
    assert!(
        lease(&mut client, "q", 1, Duration::from_secs(30))
            .await
            .drained
    );
}

#[tokio::test]
async fn waiting_lease_wakes_on_enqueue_through_another_broker() {
    let redis = redis().await;
    let waiter_broker = Broker::start(&redis.url()).await;
    let producer_broker = Broker::start(&redis.url()).await;
    let mut waiter = waiter_broker.client().await;
    let mut producer = producer_broker.client().await;

    let wait = tokio::spawn(async move {
        let started = Instant::now();
        let reply = lease_waiting(&mut waiter, "q", Duration::from_secs(10), false).await;
        (reply, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let enqueued_at = Instant::now();
    enqueue(&mut producer, "q", vec![item("wake")]).await;
    let (reply, waited) = wait.await.expect("waiter task");
    let latency = enqueued_at.elapsed();
    assert_eq!(reply.items.len(), 1);
    assert_eq!(reply.items[0].payload.as_ref(), b"wake");
    assert!(
        waited >= Duration::from_millis(250),
        "it did wait: {waited:?}"
    );
    assert!(
        latency < Duration::from_millis(500),
        "woken by notification, not a poll: {latency:?}"
    );
}

#[tokio::test]
async fn waiting_lease_returns_empty_when_max_wait_ends() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let started = Instant::now();
    let reply = lease_waiting(&mut client, "q", Duration::from_millis(300), false).await;
    assert!(reply.items.is_empty() && reply.drained);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(280) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}

#[tokio::test]
async fn waiting_lease_honours_the_callers_deadline() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let mut request = tonic::Request::new(pb::LeaseRequest {
        queue: "q".into(),
        max_wait: Some(duration(Duration::from_secs(30))),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(400));
    let started = Instant::now();
    let reply = client
        .lease(request)
        .await
        .expect("an empty reply, not DEADLINE_EXCEEDED");
    assert!(reply.into_inner().items.is_empty());
    assert!(started.elapsed() < Duration::from_millis(1500));
}

#[tokio::test]
async fn caller_going_away_mid_wait_leaves_items_for_others() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    // Many waiters that give up; then an item arrives and must be leasable at once.
    let mut gone = Vec::new();
    for _ in 0..20 {
        let mut c = broker.client().await;
        gone.push(tokio::spawn(async move {
            let _ = c
                .lease(pb::LeaseRequest {
                    queue: "q".into(),
                    max_wait: Some(duration(Duration::from_secs(20))),
                    ..Default::default()
                })
                .await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for task in &gone {
        task.abort();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    enqueue(&mut client, "q", vec![item("x")]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = state(&mut client, "q").await;
    assert_eq!(
        (s.ready, s.leased),
        (1, 0),
        "no cancelled waiter kept the item"
    );
    assert_eq!(
        lease(&mut client, "q", 1, Duration::from_secs(30))
            .await
            .items
            .len(),
        1
    );
}

#[tokio::test]
async fn many_concurrent_leasers_never_share_a_live_lease() {
    let redis = redis().await;
    let broker_a = Broker::start(&redis.url()).await;
    let broker_b = Broker::start(&redis.url()).await;
    let mut producer = broker_a.client().await;
    let total = 2000;
    for chunk in 0..(total / 500) {
        enqueue(
            &mut producer,
            "q",
            (0..500)
                .map(|i| item_with_id(&format!("{chunk}-{i}"), "x"))
                .collect(),
        )
        .await;
    }
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let mut client = if worker % 2 == 0 {
            broker_a.client().await
        } else {
            broker_b.client().await
        };
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let reply = lease(&mut client, "q", 7, Duration::from_secs(60)).await;
                if reply.items.is_empty() {
                    break;
                }
                seen.extend(reply.items.iter().map(|i| i.id.clone()));
                let ids: Vec<String> = reply.items.iter().map(|i| i.lease_id.clone()).collect();
                assert!(
                    complete(&mut client, "q", &ids)
                        .await
                        .iter()
                        .all(|o| *o == pb::LeaseOutcome::Ok)
                );
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("worker task"));
    }
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), total, "every item leased exactly once");
    assert_eq!(distinct.len(), total);
    let s = state(&mut producer, "q").await;
    assert_eq!((s.completed_total, s.drained), (total as u64, true));
}

#[tokio::test]
async fn items_leased_for_a_caller_that_went_away_are_released() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item("x")]).await;
    // Hold Redis for a moment so the lease script runs only after the caller has gone.
    let mut admin = redis_conn(&redis).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(300)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .expect("CLIENT PAUSE");
    let mut leaser = broker.client().await;
    let call =
        tokio::spawn(async move { lease(&mut leaser, "q", 1, Duration::from_secs(60)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    call.abort();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let s = state(&mut client, "q").await;
    assert_eq!(
        (s.ready, s.leased),
        (1, 0),
        "the orphaned lease was given back"
    );
    let again = lease(&mut client, "q", 1, Duration::from_secs(60)).await;
    assert_eq!(
        again.items[0].attempt, 1,
        "a release does not count as an attempt"
    );
}

#[tokio::test]
async fn return_if_drained_ends_the_wait_when_the_last_item_completes_elsewhere() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item("last")]).await;
    let held = lease(&mut client, "q", 1, Duration::from_secs(30)).await;
    let mut waiter = broker.client().await;
    let wait = tokio::spawn(async move {
        let started = Instant::now();
        let reply = lease_waiting(&mut waiter, "q", Duration::from_secs(20), true).await;
        (reply, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    complete(&mut client, "q", &[held.items[0].lease_id.clone()]).await;
    let (reply, waited) = wait.await.expect("waiter");
    assert!(reply.items.is_empty() && reply.drained);
    assert!(
        waited < Duration::from_secs(3),
        "told of the drain at once: {waited:?}"
    );

    // Asked again, it returns at once; a waiter that did not ask waits its full max_wait.
    let started = Instant::now();
    let again = lease_waiting(&mut client, "q", Duration::from_secs(20), true).await;
    assert!(again.drained && started.elapsed() < Duration::from_secs(2));
    let started = Instant::now();
    let idle = lease_waiting(&mut client, "q", Duration::from_millis(400), false).await;
    assert!(idle.drained);
    assert!(
        started.elapsed() >= Duration::from_millis(380),
        "{:?}",
        started.elapsed()
    );
}
