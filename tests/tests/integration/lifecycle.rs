//! The rest of an item's life: extend, complete, fail, release, expiry, fencing, GetItem.

use std::time::Duration;

use wq_tests::*;

async fn lease_one(client: &mut Client, queue: &str, lease_for: Duration) -> pb::LeasedItem {
    let mut reply = lease(client, queue, 1, lease_for).await;
    assert_eq!(reply.items.len(), 1, "one item to lease");
    reply.items.remove(0)
}

#[tokio::test]
async fn stale_lease_after_expiry_and_re_lease_is_lost_and_changes_nothing() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item_with_id("a", "x")]).await;
    let first = lease_one(&mut client, "q", Duration::from_millis(150)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = lease_one(&mut client, "q", Duration::from_secs(30)).await;
    assert_eq!(second.id, "a");
    assert_eq!(second.attempt, 2, "the expiry counted as an attempt");
    assert_ne!(first.lease_id, second.lease_id);

    let before = redis_dump(&redis).await;
    assert_eq!(
        complete(&mut client, "q", std::slice::from_ref(&first.lease_id)).await,
        [pb::LeaseOutcome::LeaseLost]
    );
    let failed = fail(&mut client, "q", &first.lease_id, None, true).await;
    assert_eq!(
        failed.result.as_ref().expect("a result").outcome(),
        pb::LeaseOutcome::LeaseLost
    );
    assert_eq!(failed.state(), pb::ItemState::Unspecified);
    let extended = client
        .extend_lease(pb::ExtendLeaseRequest {
            queue: "q".into(),
            lease_ids: vec![first.lease_id.clone()],
            lease_duration: None,
        })
        .await
        .expect("extend")
        .into_inner();
    assert_eq!(extended.results[0].outcome(), pb::LeaseOutcome::LeaseLost);
    assert!(extended.results[0].lease_expire_time.is_none());
    let released = client
        .release(pb::ReleaseRequest {
            queue: "q".into(),
            lease_ids: vec![first.lease_id.clone()],
        })
        .await
        .expect("release")
        .into_inner();
    assert_eq!(released.results[0].outcome(), pb::LeaseOutcome::LeaseLost);
    let after = redis_dump(&redis).await;
    assert_eq!(before, after);

    assert_eq!(
        complete(&mut client, "q", std::slice::from_ref(&second.lease_id)).await,
        [pb::LeaseOutcome::Ok]
    );
    assert_eq!(
        complete(&mut client, "q", &[second.lease_id]).await,
        [pb::LeaseOutcome::LeaseLost],
        "completing twice"
    );
    let s = state(&mut client, "q").await;
    assert_eq!(
        (s.completed_total, s.reclaimed_total, s.drained),
        (1, 1, true)
    );
}

#[tokio::test]
async fn expiring_leases_count_attempts_until_the_item_is_dead() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        vec![pb::EnqueueItem {
            max_attempts: 2,
            ..item_with_id("poison", "x")
        }],
    )
    .await;
    let first = lease_one(&mut client, "q", Duration::from_millis(100)).await;
    assert_eq!(first.attempt, 1);
    // The background reaper reclaims it without any Lease call.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let s = state(&mut client, "q").await;
    assert_eq!((s.ready, s.leased, s.reclaimed_total), (1, 0, 1));
    let second = lease_one(&mut client, "q", Duration::from_millis(100)).await;
    assert_eq!(second.attempt, 2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let s = state(&mut client, "q").await;
    assert_eq!((s.ready, s.dead, s.drained), (0, 1, true));
    let dead = get_item(&mut client, "q", "poison")
        .await
        .expect("dead letters are kept");
    assert_eq!(dead.state(), pb::ItemState::Dead);
    assert_eq!(dead.attempts, 2);
    assert_eq!(dead.last_error, "lease expired");
}

#[tokio::test]
async fn extend_lease_keeps_the_item_past_its_first_expiry() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item("x")]).await;
    let leased = lease_one(&mut client, "q", Duration::from_millis(300)).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let reply = client
            .extend_lease(pb::ExtendLeaseRequest {
                queue: "q".into(),
                lease_ids: vec![leased.lease_id.clone()],
                lease_duration: Some(duration(Duration::from_millis(300))),
            })
            .await
            .expect("extend")
            .into_inner();
        assert_eq!(reply.results[0].outcome(), pb::LeaseOutcome::Ok);
        let expiry = reply.results[0].lease_expire_time.expect("new expiry");
        assert!(expiry.seconds >= leased.lease_expire_time.expect("expiry").seconds);
    }
    let s = state(&mut client, "q").await;
    assert_eq!((s.leased, s.reclaimed_total), (1, 0));
    assert_eq!(
        complete(&mut client, "q", &[leased.lease_id]).await,
        [pb::LeaseOutcome::Ok]
    );
}

#[tokio::test]
async fn fail_retries_with_backoff_then_dead_letters_when_attempts_run_out() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        vec![pb::EnqueueItem {
            max_attempts: 3,
            ..item_with_id("a", "x")
        }],
    )
    .await;

    let first = lease_one(&mut client, "q", Duration::from_secs(30)).await;
    let reply = fail(&mut client, "q", &first.lease_id, None, false).await;
    assert_eq!(reply.state(), pb::ItemState::Delayed);
    assert!(
        reply.next_attempt_time.is_some(),
        "backoff gives a retry time"
    );
    let item = get_item(&mut client, "q", "a").await.expect("stored");
    assert_eq!(
        (item.state(), item.attempts, item.last_error.as_str()),
        (pb::ItemState::Delayed, 1, "boom")
    );
    assert!(
        lease(&mut client, "q", 1, Duration::from_secs(30))
            .await
            .items
            .is_empty(),
        "not before the backoff"
    );

    // Backoff base is 100 ms in tests: the retry comes within about that.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = lease_one(&mut client, "q", Duration::from_secs(30)).await;
    assert_eq!(second.attempt, 2);
    // retry_delay zero: ready at once.
    let reply = fail(
        &mut client,
        "q",
        &second.lease_id,
        Some(Duration::ZERO),
        false,
    )
    .await;
    assert_eq!(reply.state(), pb::ItemState::Ready);
    let third = lease_one(&mut client, "q", Duration::from_secs(30)).await;
    assert_eq!(third.attempt, 3);
    let reply = fail(
        &mut client,
        "q",
        &third.lease_id,
        Some(Duration::ZERO),
        false,
    )
    .await;
    assert_eq!(reply.state(), pb::ItemState::Dead, "attempts exhausted");
    let s = state(&mut client, "q").await;
    assert_eq!((s.dead, s.failed_total, s.drained), (1, 3, true));
}

#[tokio::test]
async fn fail_with_dead_letter_skips_remaining_attempts_and_explicit_delay_is_used() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        vec![item_with_id("a", "x"), item_with_id("b", "y")],
    )
    .await;
    let a = lease_one(&mut client, "q", Duration::from_secs(30)).await;
    let reply = fail(&mut client, "q", &a.lease_id, None, true).await;
    assert_eq!(reply.state(), pb::ItemState::Dead);
    let b = lease_one(&mut client, "q", Duration::from_secs(30)).await;
    let reply = fail(
        &mut client,
        "q",
        &b.lease_id,
        Some(Duration::from_secs(60)),
        false,
    )
    .await;
    assert_eq!(reply.state(), pb::ItemState::Delayed);
    let next = reply.next_attempt_time.expect("retry time");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!((next.seconds - now - 60).abs() <= 2, "retry in about 60 s");
    let item = get_item(&mut client, "q", "b").await.expect("stored");
    assert_eq!(item.next_attempt_time, Some(next));
}

#[tokio::test]
async fn release_returns_items_in_original_order_without_counting_an_attempt() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        (1..=4).map(|i| item(&i.to_string())).collect(),
    )
    .await;
    let leased = lease(&mut client, "q", 3, Duration::from_secs(30)).await;
    let mut ids: Vec<String> = leased.items.iter().map(|i| i.lease_id.clone()).collect();
    ids.reverse();
    let reply = client
        .release(pb::ReleaseRequest {
            queue: "q".into(),
            lease_ids: ids,
        })
        .await
        .expect("release")
        .into_inner();
    assert!(
        reply
            .results
            .iter()
            .all(|r| r.outcome() == pb::LeaseOutcome::Ok)
    );
    let again = lease(&mut client, "q", 4, Duration::from_secs(30)).await;
    let order: Vec<&[u8]> = again.items.iter().map(|i| i.payload.as_ref()).collect();
    assert_eq!(order, [&b"1"[..], b"2", b"3", b"4"]);
    assert!(again.items.iter().all(|i| i.attempt == 1));
}

#[tokio::test]
async fn get_item_reports_every_state_and_retained_results() {
    let redis = redis().await;
    let config = BrokerConfig {
        completed_retention: Duration::from_secs(60),
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    let mut headers = std::collections::HashMap::new();
    headers.insert("trace".to_owned(), "abc".to_owned());
    enqueue(
        &mut client,
        "q",
        vec![pb::EnqueueItem {
            headers: headers.clone(),
            priority: 3,
            ..item_with_id("a", "payload")
        }],
    )
    .await;
    let ready = get_item(&mut client, "q", "a").await.expect("stored");
    assert_eq!(
        (ready.state(), ready.priority, ready.max_attempts),
        (pb::ItemState::Ready, 3, 5)
    );
    assert_eq!(ready.headers, headers);
    assert_eq!(ready.payload.as_ref(), b"payload");

    let leased = lease_one(&mut client, "q", Duration::from_secs(30)).await;
    assert_eq!(leased.headers, headers);
    let item = get_item(&mut client, "q", "a").await.expect("stored");
    assert_eq!(item.state(), pb::ItemState::Leased);
    assert_eq!(item.lease_expire_time, leased.lease_expire_time);

    client
        .complete(pb::CompleteRequest {
            queue: "q".into(),
            completions: vec![pb::Completion {
                lease_id: leased.lease_id,
                result: b"done".to_vec().into(),
            }],
        })
        .await
        .expect("complete");
    let done = get_item(&mut client, "q", "a").await.expect("retained");
    assert_eq!(done.state(), pb::ItemState::Completed);
    assert_eq!(done.result.as_ref(), b"done");
    assert!(done.complete_time.is_some());
    let mut conn = redis_conn(&redis).await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg("wq:{q}:i:a")
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    assert!(
        ttl > 50_000 && ttl <= 60_000,
        "retention sets an expiry: {ttl}"
    );

    let missing = get_item(&mut client, "q", "nope")
        .await
        .expect_err("unknown id");
    assert_eq!(missing.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn completed_items_are_forgotten_by_default() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item_with_id("a", "x")]).await;
    let leased = lease_one(&mut client, "q", Duration::from_secs(30)).await;
    complete(&mut client, "q", &[leased.lease_id]).await;
    assert_eq!(
        get_item(&mut client, "q", "a")
            .await
            .expect_err("forgotten")
            .code(),
        tonic::Code::NotFound
    );
}

#[tokio::test]
async fn dead_letters_are_bounded_in_count_oldest_dropped_first() {
    let redis = redis().await;
    let config = BrokerConfig {
        dead_max_count: 2,
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        (1..=3)
            .map(|i| item_with_id(&format!("d{i}"), "x"))
            .collect(),
    )
    .await;
    for _ in 0..3 {
        let leased = lease_one(&mut client, "q", Duration::from_secs(30)).await;
        fail(&mut client, "q", &leased.lease_id, None, true).await;
    }
    let s = state(&mut client, "q").await;
    assert_eq!((s.dead, s.dead_dropped_total), (2, 1));
    assert_eq!(
        get_item(&mut client, "q", "d1")
            .await
            .expect_err("dropped")
            .code(),
        tonic::Code::NotFound
    );
    assert!(get_item(&mut client, "q", "d3").await.is_ok());
}

#[tokio::test]
async fn dead_letters_older_than_the_age_bound_are_dropped_by_the_reaper() {
    let redis = redis().await;
    let config = BrokerConfig {
        dead_max_age: Duration::from_millis(200),
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item("x")]).await;
    let leased = lease_one(&mut client, "q", Duration::from_secs(30)).await;
    fail(&mut client, "q", &leased.lease_id, None, true).await;
    assert_eq!(state(&mut client, "q").await.dead, 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let s = state(&mut client, "q").await;
    assert_eq!((s.dead, s.dead_dropped_total), (0, 1));
}

#[tokio::test]
async fn queue_state_reports_the_oldest_ready_item_across_priorities() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item("old-low")]).await;
    let first = state(&mut client, "q")
        .await
        .oldest_ready_enqueue_time
        .expect("set");
    tokio::time::sleep(Duration::from_millis(20)).await;
    enqueue(
        &mut client,
        "q",
        vec![pb::EnqueueItem {
            priority: 9,
            ..item("new-high")
        }],
    )
    .await;
    assert_eq!(
        state(&mut client, "q").await.oldest_ready_enqueue_time,
        Some(first)
    );
    lease(&mut client, "q", 2, Duration::from_secs(30)).await;
    assert_eq!(
        state(&mut client, "q").await.oldest_ready_enqueue_time,
        None
    );
}
