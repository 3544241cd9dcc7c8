//! Enqueue: ids, duplicates, ordering, delays, all-or-nothing.

use std::time::Duration;

use wq_tests::*;

#[tokio::test]
async fn assigns_uuid_v7_ids_and_reports_results_in_request_order() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let ids = enqueue(
        &mut client,
        "q",
        vec![item("a"), item_with_id("mine", "b"), item("c")],
    )
    .await;
    assert_eq!(ids[1], "mine");
    for id in [&ids[0], &ids[2]] {
        let uuid = uuid::Uuid::parse_str(id).expect("assigned ids are UUIDs");
        assert_eq!(uuid.get_version_num(), 7);
    }
    let s = state(&mut client, "q").await;
    assert_eq!((s.ready, s.enqueued_total, s.drained), (3, 3, false));
}

#[tokio::test]
async fn duplicate_ids_are_not_enqueued_again() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let first = client
        .enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: vec![
                item_with_id("x", "1"),
                item_with_id("x", "2"),
                item_with_id("y", "3"),
            ],
        })
        .await
        .expect("enqueue")
        .into_inner();
    let dups: Vec<bool> = first.results.iter().map(|r| r.duplicate).collect();
    assert_eq!(dups, [false, true, false]);

    // A retried call, also after the item was leased, adds nothing.
    let leased = lease(&mut client, "q", 1, Duration::from_secs(30)).await;
    assert_eq!(leased.items[0].payload.as_ref(), b"1");
    let retry = client
        .enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: vec![item_with_id("x", "again"), item_with_id("y", "again")],
        })
        .await
        .expect("enqueue")
        .into_inner();
    assert!(retry.results.iter().all(|r| r.duplicate));
    let s = state(&mut client, "q").await;
    assert_eq!((s.ready, s.leased, s.enqueued_total), (1, 1, 2));

    // Completed and forgotten, the id is still known for the dedup window.
    complete(&mut client, "q", &[leased.items[0].lease_id.clone()]).await;
    let retry = client
        .enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: vec![item_with_id("x", "late retry")],
        })
        .await
        .expect("enqueue")
        .into_inner();
    assert!(retry.results[0].duplicate, "a retry after completion");
    assert_eq!(state(&mut client, "q").await.ready, 1);
}

#[tokio::test]
async fn higher_priority_first_then_fifo() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let prio = |payload: &str, priority| pb::EnqueueItem {
        priority,
        ..item(payload)
    };
    enqueue(
        &mut client,
        "q",
        vec![
            prio("low1", -5),
            prio("mid1", 0),
            prio("high1", 7),
            prio("mid2", 0),
            prio("high2", 7),
            prio("low2", -5),
        ],
    )
    .await;
    let got = lease(&mut client, "q", 10, Duration::from_secs(30)).await;
    let order: Vec<&[u8]> = got.items.iter().map(|i| i.payload.as_ref()).collect();
    assert_eq!(
        order,
        [&b"high1"[..], b"high2", b"mid1", b"mid2", b"low1", b"low2"]
    );
    assert_eq!(got.items[0].priority, 7);
}

#[tokio::test]
async fn delayed_and_not_before_items_stay_invisible_until_due() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    let at = now + Duration::from_millis(400);
    let enqueued_at = std::time::Instant::now();
    enqueue(
        &mut client,
        "q",
        vec![
            pb::EnqueueItem {
                delay: Some(duration(Duration::from_millis(300))),
                ..item("delayed")
            },
            pb::EnqueueItem {
                not_before: Some(prost_types::Timestamp {
                    seconds: at.as_secs() as i64,
                    nanos: at.subsec_nanos() as i32,
                }),
                ..item("scheduled")
            },
        ],
    )
    .await;
    let s = state(&mut client, "q").await;
    assert_eq!((s.ready, s.delayed, s.drained), (0, 2, false));
    let early = lease(&mut client, "q", 10, Duration::from_secs(30)).await;
    assert!(early.items.is_empty());
    assert!(!early.drained, "delayed items keep the queue undrained");

    // A waiting Lease is woken when the delay elapses.
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    while got.len() < 2 && started.elapsed() < Duration::from_secs(5) {
        let reply = client
            .lease(pb::LeaseRequest {
                queue: "q".into(),
                max_items: 10,
                max_wait: Some(duration(Duration::from_secs(3))),
                ..Default::default()
            })
            .await
            .expect("lease")
            .into_inner();
        got.extend(reply.items);
    }
    assert_eq!(got.len(), 2);
    // Due 300 ms after the enqueue by Redis's clock (whole ms), never before.
    assert!(
        enqueued_at.elapsed() >= Duration::from_millis(299),
        "{:?}",
        enqueued_at.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn one_bad_item_rejects_the_whole_batch_and_writes_nothing() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item("existing")]).await;
    let before = redis_dump(&redis).await;
    let status = client
        .enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: vec![
                item("fine"),
                pb::EnqueueItem {
                    delay: Some(duration(Duration::from_secs(1))),
                    not_before: Some(prost_types::Timestamp::default()),
                    ..item("bad")
                },
            ],
        })
        .await
        .expect_err("both delay and not_before is invalid");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("items[1].delay"),
        "{}",
        status.message()
    );
    assert_eq!(redis_dump(&redis).await, before);
}

#[tokio::test]
async fn batch_of_the_maximum_size_is_one_call() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let items = (0..1000).map(|i| item(&format!("p{i}"))).collect();
    assert_eq!(enqueue(&mut client, "q", items).await.len(), 1000);
    let too_many = (0..1001).map(|i| item(&format!("p{i}"))).collect();
    let status = client
        .enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: too_many,
        })
        .await
        .expect_err("1001 items exceed the batch limit");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("items:"));
    assert_eq!(state(&mut client, "q").await.ready, 1000);
}
