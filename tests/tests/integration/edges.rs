//! The edges of the documented limits: items near the payload limit, a retry after the item
//! finished, thousands of queues that go idle, DeleteQueue racing with Enqueue, bulk work on huge
//! dead-letter sets, and the smaller contract points (oldest ready item over many priority
//! bands, Fail's retry time, drain news from purges and deletes, paused queues' waiters).

use std::time::{Duration, Instant};

use wq_tests::*;

fn payload_of(len: usize, tag: u8) -> Vec<u8> {
    vec![tag; len]
}

async fn enqueue_bytes(client: &mut Client, queue: &str, items: Vec<(String, Vec<u8>)>) {
    client
        .enqueue(pb::EnqueueRequest {
            queue: queue.into(),
            items: items
                .into_iter()
                .map(|(id, payload)| pb::EnqueueItem {
                    id,
                    payload: payload.into(),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .expect("enqueue");
}

/// A Lease of many items near the payload limit stops at the reply budget: what it grants fits a
/// client with gRPC's default 4 MiB receive limit, and the rest stays ready with no attempt
/// counted.
#[tokio::test]
async fn a_grant_of_large_items_stops_at_the_reply_budget_and_leaves_the_rest_untouched() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    // The harness's client keeps tonic's default 4 MiB receive limit.
    let mut client = broker.client().await;
    let big = 1000 * 1024;
    let items = (0..7)
        .map(|i| (format!("big-{i}"), payload_of(big, b'a' + i)))
        .collect();
    enqueue_bytes(&mut client, "q", items).await;
    let first = lease(&mut client, "q", 7, Duration::from_secs(30)).await;
    assert_eq!(
        first.items.len(),
        4,
        "4 × 1000 KiB fit 4 MiB, a fifth would not"
    );
    let s = state(&mut client, "q").await;
    assert_eq!((s.ready, s.leased), (3, 4));
    let second = lease(&mut client, "q", 7, Duration::from_secs(30)).await;
    assert_eq!(second.items.len(), 3);
    assert!(second.items.iter().all(|i| i.attempt == 1));
    let ids: Vec<&str> = first
        .items
        .iter()
        .chain(&second.items)
        .map(|i| i.id.as_str())
        .collect();
    assert_eq!(
        ids,
        (0..7).map(|i| format!("big-{i}")).collect::<Vec<_>>(),
        "FIFO is kept across the split"
    );
}

/// With the reply budget set to what one largest item needs (the least the broker accepts),
/// items near the payload limit are leased one per call, and each is leased.
#[tokio::test]
async fn items_at_the_payload_limit_are_leased_alone_under_the_smallest_budget() {
    let redis = redis().await;
    let payload_limit = 64 * 1024;
    let config = BrokerConfig {
        max_payload_bytes: payload_limit,
        max_header_bytes: 1024,
        max_reply_bytes: payload_limit + 2 * 1024 + 256 + 5 * 128,
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    let items = (0..3)
        .map(|i| (format!("max-{i}"), payload_of(payload_limit, b'm')))
        .collect();
    enqueue_bytes(&mut client, "q", items).await;
    for i in 0..3 {
        let got = lease(&mut client, "q", 3, Duration::from_secs(30)).await;
        assert_eq!(got.items.len(), 1, "lease {i}");
        assert_eq!(got.items[0].payload.len(), payload_limit);
    }
}

/// Concurrent Leases combined into one script call each get their own reply budget.
#[tokio::test]
async fn combined_leases_each_get_their_own_reply_budget() {
    let redis = redis().await;
    let config = BrokerConfig {
        max_reply_bytes: 300 * 1024,
        max_payload_bytes: 200 * 1024,
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    let items = (0..40)
        .map(|i| (format!("i{i}"), payload_of(100 * 1024, b'x')))
        .collect();
    enqueue_bytes(&mut client, "q", items).await;
    let calls = (0..8).map(|_| {
        let mut client = client.clone();
        async move { lease(&mut client, "q", 10, Duration::from_secs(30)).await }
    });
    let replies = futures_util::future::join_all(calls).await;
    for reply in &replies {
        assert!(
            (1..=2).contains(&reply.items.len()),
            "each within 300 KiB: {}",
            reply.items.len()
        );
    }
    let granted: usize = replies.iter().map(|r| r.items.len()).sum();
    let s = state(&mut client, "q").await;
    assert_eq!(s.leased as usize, granted);
    assert_eq!((s.ready + s.leased) as usize, 40);
}

/// A caller whose receive limit refuses the reply resets the stream; its items go back to the
/// queue at once with no attempt counted, instead of expiring into the dead letters.
#[tokio::test]
async fn items_of_a_lease_reply_the_caller_refused_are_released_uncounted() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut producer = broker.client().await;
    let items = (0..4)
        .map(|i| (format!("r{i}"), payload_of(900 * 1024, b'r')))
        .collect();
    enqueue_bytes(&mut producer, "q", items).await;
    let mut small =
        pb::work_queue_service_client::WorkQueueServiceClient::new(broker.channel().await)
            .max_decoding_message_size(512 * 1024);
    let refused = small
        .lease(pb::LeaseRequest {
            queue: "q".into(),
            max_items: 4,
            lease_duration: Some(duration(Duration::from_secs(600))),
            ..Default::default()
        })
        .await
        .expect_err("the reply is over this client's receive limit");
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    eventually("the refused items are ready again", async || {
        state(&mut producer, "q").await.ready == 4
    })
    .await;
    let again = lease(&mut producer, "q", 4, Duration::from_secs(30)).await;
    assert_eq!(again.items.len(), 4);
    assert!(again.items.iter().all(|i| i.attempt == 1), "not counted");
}

/// Ids stay known for the dedup window after their item finished: a retried Enqueue after the
/// item was completed (and, with retention 0, forgotten) or after its dead letter was dropped
/// adds nothing; after the window it adds the item again.
#[tokio::test]
async fn an_id_is_a_duplicate_for_the_dedup_window_after_its_item_finished() {
    let redis = redis().await;
    let config = BrokerConfig {
        dedup_window: Duration::from_millis(1500),
        dead_max_count: 1,
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item_with_id("done", "1")]).await;
    let leased = lease(&mut client, "q", 1, Duration::from_secs(30)).await;
    complete(&mut client, "q", &[leased.items[0].lease_id.clone()]).await;
    assert_eq!(
        get_item(&mut client, "q", "done")
            .await
            .expect_err("forgotten")
            .code(),
        tonic::Code::NotFound
    );

    // Two dead letters with a count bound of 1: the older is dropped, its id still known.
    enqueue(
        &mut client,
        "q",
        vec![item_with_id("dead-1", "x"), item_with_id("dead-2", "y")],
    )
    .await;
    for _ in 0..2 {
        let leased = lease(&mut client, "q", 1, Duration::from_secs(30)).await;
        fail(&mut client, "q", &leased.items[0].lease_id, None, true).await;
    }
    assert_eq!(state(&mut client, "q").await.dead_dropped_total, 1);

    let retry = enqueue_flags(&mut client, &["done", "dead-1", "dead-2", "fresh"]).await;
    assert_eq!(retry, [true, true, true, false]);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    // The window is over; the dead letter still stored stays a duplicate.
    let later = enqueue_flags(&mut client, &["done", "dead-1", "dead-2"]).await;
    assert_eq!(later, [false, false, true]);
}

/// With the window at 0 a finished id can be enqueued again at once.
#[tokio::test]
async fn a_zero_dedup_window_forgets_finished_ids_at_once() {
    let redis = redis().await;
    let config = BrokerConfig {
        dedup_window: Duration::ZERO,
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item_with_id("a", "1")]).await;
    let leased = lease(&mut client, "q", 1, Duration::from_secs(30)).await;
    complete(&mut client, "q", &[leased.items[0].lease_id.clone()]).await;
    assert_eq!(enqueue_flags(&mut client, &["a"]).await, [false]);
}

async fn enqueue_flags(client: &mut Client, ids: &[&str]) -> Vec<bool> {
    client
        .enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: ids.iter().map(|id| item_with_id(id, "again")).collect(),
        })
        .await
        .expect("enqueue")
        .into_inner()
        .results
        .iter()
        .map(|r| r.duplicate)
        .collect()
}

/// Thousands of queues used once and then left idle cost the reaper nothing, leave ListQueues
/// after the idle expiry (unless they hold something), and leave Redis idle.
#[tokio::test]
async fn thousands_of_idle_queues_are_forgotten_and_cost_nothing_at_rest() {
    let redis = redis().await;
    let config = BrokerConfig {
        queue_idle_ttl: Duration::from_secs(2),
        dedup_window: Duration::from_millis(500),
        reap_interval: Duration::from_millis(250),
        redis_timeout: Duration::from_secs(5),
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config.clone()).await;
    let second = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    let queues = 2000;
    let work = (0..queues).map(|i| {
        let mut client = client.clone();
        async move {
            let queue = format!("job-{i}");
            enqueue(&mut client, &queue, vec![item("x"), item("y")]).await;
            let leased = lease(&mut client, &queue, 2, Duration::from_secs(1)).await;
            let ids: Vec<String> = leased.items.iter().map(|i| i.lease_id.clone()).collect();
            complete(&mut client, &queue, &ids).await;
        }
    });
    use futures_util::StreamExt as _;
    futures_util::stream::iter(work)
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    // One queue keeps a dead letter, one is paused: both must stay.
    enqueue(&mut client, "keeps-dead", vec![item("d")]).await;
    let leased = lease(&mut client, "keeps-dead", 1, Duration::from_secs(30)).await;
    fail(
        &mut client,
        "keeps-dead",
        &leased.items[0].lease_id,
        None,
        true,
    )
    .await;
    let mut admin = broker.admin().await;
    admin
        .pause_queue(pb::PauseQueueRequest {
            queue: "keeps-paused".into(),
        })
        .await
        .expect("pause");
    // A mistyped resume creates nothing.
    admin
        .resume_queue(pb::ResumeQueueRequest {
            queue: "never-used-typo".into(),
        })
        .await
        .expect("resume");

    eventually("the idle queues leave ListQueues", async || {
        let listed = admin
            .list_queues(pb::ListQueuesRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        let names: Vec<&str> = listed.queues.iter().map(|q| q.queue.as_str()).collect();
        names == ["keeps-dead", "keeps-paused"] && listed.next_page_token.is_empty()
    })
    .await;
    let mut conn = redis_conn(&redis).await;
    // A queue leaves ListQueues as its reaper pass forgets it, and the index a moment later:
    // rest begins once the index holds only the two kept queues (under load the reapers can
    // still be busy with the last of the 2 000 for a while).
    eventually("the forgotten queues leave the queue index", async || {
        let indexed: u64 = redis::cmd("ZCARD")
            .arg("wq:queues:due")
            .query_async(&mut conn)
            .await
            .expect("ZCARD");
        indexed == 2
    })
    .await;
    let job_keys = redis_keys(&redis, "wq:{job-*").await;
    assert!(
        job_keys.is_empty(),
        "{} keys left, e.g. {:?}",
        job_keys.len(),
        job_keys.first()
    );

    // At rest: two idle brokers over two remaining queues.
    let before = command_counts(&redis).await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = command_counts(&redis).await;
    let ran = after.values().sum::<u64>() - before.values().sum::<u64>();
    let per_second = ran as f64 / started.elapsed().as_secs_f64();
    let ran = command_counts_since(&before, &after);
    println!("edges: at rest after {queues} queues: {per_second:.1} Redis commands/s ({ran})");
    // Each broker's reaper reads the queue index once per round (every 250 ms here, 500 ms by
    // default) and its health monitor pings once a second: 10 commands/s for both. The two
    // queues left are visited once per claim period (2 s here, the idle expiry; 1 h by
    // default) at about 15 commands each. Before the queue index, the reapers ran a script per
    // queue and round: some 170 000 commands/s here.
    assert!(
        per_second < 60.0,
        "{per_second:.1} commands/s at rest: {ran}"
    );
    drop(second);
}

/// `wq-worker --until sealed`, with its defaults, on a drained queue that is not sealed yet (the
/// deploy/ walkthrough when the worker Job starts before the seed Job seals) waits instead of
/// spinning, costs Redis a few commands per second, and exits as soon as the queue is sealed
/// through another broker replica.
#[tokio::test]
async fn an_idle_until_sealed_worker_costs_little_and_exits_at_the_seal() {
    let redis = redis().await;
    let config = BrokerConfig {
        reap_interval: Duration::from_millis(500),
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config.clone()).await;
    let other = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "job", vec![item("first")]).await;
    let leased = lease(&mut client, "job", 1, Duration::from_secs(30)).await;
    complete(&mut client, "job", &[leased.items[0].lease_id.clone()]).await;

    // The worker's own defaults, as a Job pod runs it.
    let worker = spawn_worker(&broker, "job", &["--until", "sealed"], &[]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = redis_commands(&redis).await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let per_second =
        (redis_commands(&redis).await - before) as f64 / started.elapsed().as_secs_f64();
    println!("edges: idle --until sealed worker and two brokers: {per_second:.1} Redis commands/s");
    // Two idle brokers cost about 6 commands/s; the worker's Lease every 5 s and the reaper's
    // waiter check of its queue every 5 s a few more. It spun at some 35 000 before.
    assert!(per_second < 40.0, "{per_second:.1} commands/s");

    let sealed_at = Instant::now();
    other
        .admin()
        .await
        .seal_queue(pb::SealQueueRequest {
            queue: "job".into(),
        })
        .await
        .expect("seal");
    let log = finish_ok(worker, Duration::from_secs(10)).await;
    assert!(
        sealed_at.elapsed() < Duration::from_secs(3),
        "woken by the seal, not its 5 s wait: {:?}",
        sealed_at.elapsed()
    );
    assert!(log.contains("sealed and drained"), "{log}");
}

/// One queue whose reaper pass fails (here its ready key holds the wrong type) is logged and
/// skipped; the round goes on and reclaims the other queues' expired leases.
#[tokio::test]
async fn one_failing_queue_does_not_stop_the_reaper_round() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "broken", vec![item("b")]).await;
    enqueue(&mut client, "fine", vec![item("f")]).await;
    lease(&mut client, "broken", 1, Duration::from_millis(200)).await;
    lease(&mut client, "fine", 1, Duration::from_millis(200)).await;
    let mut conn = redis_conn(&redis).await;
    let _: () = redis::cmd("SET")
        .arg("wq:{broken}:leased")
        .arg("not a sorted set")
        .query_async(&mut conn)
        .await
        .expect("SET");
    eventually("the healthy queue's lease is reclaimed", async || {
        state(&mut client, "fine").await.ready == 1
    })
    .await;
}

/// DeleteQueue is one atomic step: Enqueues racing with it through another broker land wholly
/// before (and are deleted) or wholly after (in a fresh queue whose sequence starts again), and
/// retained completed items and remembered ids go with the queue.
#[tokio::test]
async fn delete_queue_is_atomic_against_racing_enqueues_and_takes_retained_items() {
    let redis = redis().await;
    let config = BrokerConfig {
        completed_retention: Duration::from_secs(3600),
        reap_batch: 50,
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config.clone()).await;
    let other = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item_with_id("kept", "k")]).await;
    let leased = lease(&mut client, "q", 1, Duration::from_secs(30)).await;
    complete(&mut client, "q", &[leased.items[0].lease_id.clone()]).await;
    assert!(get_item(&mut client, "q", "kept").await.is_ok());
    let old: Vec<pb::EnqueueItem> = (0..3000)
        .map(|i| item_with_id(&format!("old-{i}"), "o"))
        .collect();
    for chunk in old.chunks(1000) {
        enqueue(&mut client, "q", chunk.to_vec()).await;
    }

    let racer = {
        let mut racer = other.client().await;
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..200 {
                let id = format!("new-{i}");
                enqueue(&mut racer, "q", vec![item_with_id(&id, "n")]).await;
                sent.push(id);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut admin = broker.admin().await;
    admin
        .delete_queue(pb::DeleteQueueRequest { queue: "q".into() })
        .await
        .expect("delete");
    let sent = racer.await.expect("racer");

    assert_eq!(
        get_item(&mut client, "q", "kept")
            .await
            .expect_err("retained item deleted")
            .code(),
        tonic::Code::NotFound
    );
    // Every surviving item is one of the racing ones; the survivors are a suffix of what was
    // sent (each enqueue wholly after the delete), in order, with a fresh sequence.
    let mut survivors = Vec::new();
    loop {
        let got = lease(&mut client, "q", 1000, Duration::from_secs(30)).await;
        if got.items.is_empty() {
            break;
        }
        survivors.extend(got.items.into_iter().map(|i| i.id));
    }
    assert!(
        survivors.iter().all(|id| id.starts_with("new-")),
        "{survivors:?}"
    );
    assert!(
        !survivors.is_empty() && survivors.len() < sent.len(),
        "the delete fell amid the racing enqueues: {} of {} survived",
        survivors.len(),
        sent.len()
    );
    assert_eq!(survivors, sent[sent.len() - survivors.len()..]);
    let s = state(&mut client, "q").await;
    assert_eq!(
        s.enqueued_total as usize,
        survivors.len(),
        "counters start again"
    );
    // Old items of the deleted generation are gone from Redis; the old ids are new again.
    let old_keys = redis_keys(&redis, "wq:{q}:i:*").await;
    assert!(old_keys.is_empty(), "{} old item keys left", old_keys.len());
    assert_eq!(
        enqueue_flags(&mut client, &["old-1", "kept"]).await,
        [false, false]
    );
}

/// Lowering the dead-letter bound on a queue with many dead letters trims them in steps of
/// --reap-batch: no single script drops them all at once.
#[tokio::test]
async fn trimming_a_huge_dead_letter_set_is_chunked_by_the_reap_batch() {
    let redis = redis().await;
    let unbounded = BrokerConfig {
        dead_max_count: 0,
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), unbounded).await;
    let mut client = broker.client().await;
    let items: Vec<pb::EnqueueItem> = (0..1500)
        .map(|i| item_with_id(&format!("d{i}"), "x"))
        .collect();
    for chunk in items.chunks(1000) {
        enqueue(&mut client, "q", chunk.to_vec()).await;
    }
    loop {
        let got = lease(&mut client, "q", 1000, Duration::from_secs(30)).await;
        if got.items.is_empty() {
            break;
        }
        for it in got.items {
            fail(&mut client, "q", &it.lease_id, None, true).await;
        }
    }
    assert_eq!(state(&mut client, "q").await.dead, 1500);
    broker.stop().await;

    let bounded = BrokerConfig {
        dead_max_count: 10,
        reap_batch: 100,
        reap_interval: Duration::from_secs(3600),
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), bounded).await;
    let mut client = broker.client().await;
    // One more dead letter through a Fail: the Fail trims one step only.
    enqueue(&mut client, "q", vec![item_with_id("last", "x")]).await;
    let leased = lease(&mut client, "q", 1, Duration::from_secs(30)).await;
    fail(&mut client, "q", &leased.items[0].lease_id, None, true).await;
    let s = state(&mut client, "q").await;
    assert_eq!(s.dead, 1501 - 100, "one step of 100 dropped by the Fail");
    assert_eq!(s.dead_dropped_total, 100);
}

/// QueueState's oldest ready item is right however many priority bands lie above it.
#[tokio::test]
async fn the_oldest_ready_item_is_found_under_many_priority_bands() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let mut oldest = item_with_id("oldest", "o");
    oldest.priority = -5;
    enqueue(&mut client, "q", vec![oldest]).await;
    let first = get_item(&mut client, "q", "oldest").await.expect("stored");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let higher: Vec<pb::EnqueueItem> = (0..300)
        .map(|p| pb::EnqueueItem {
            priority: p,
            ..item_with_id(&format!("p{p}"), "h")
        })
        .collect();
    enqueue(&mut client, "q", higher).await;
    let s = state(&mut client, "q").await;
    assert_eq!(s.oldest_ready_enqueue_time, first.enqueue_time);
    // Leasing the 300 higher items leaves the oldest the only one; leasing it clears the time.
    lease(&mut client, "q", 300, Duration::from_secs(30)).await;
    assert_eq!(
        state(&mut client, "q").await.oldest_ready_enqueue_time,
        first.enqueue_time
    );
    lease(&mut client, "q", 1, Duration::from_secs(30)).await;
    assert_eq!(
        state(&mut client, "q").await.oldest_ready_enqueue_time,
        None
    );
}

/// A Fail with `retry_delay` 0 says when the retry is ready (now).
#[tokio::test]
async fn fail_with_a_zero_retry_delay_returns_its_next_attempt_time() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item("x")]).await;
    let leased = lease(&mut client, "q", 1, Duration::from_secs(30)).await;
    let failed = fail(
        &mut client,
        "q",
        &leased.items[0].lease_id,
        Some(Duration::ZERO),
        false,
    )
    .await;
    assert_eq!(failed.state, pb::ItemState::Ready as i32);
    let next = failed.next_attempt_time.expect("a next attempt time");
    let expire = leased.items[0].lease_expire_time.expect("an expiry");
    // The lease ran for 30 s from about the same moment.
    assert!(
        (expire.seconds - next.seconds - 30).abs() <= 1,
        "{next:?} vs {expire:?}"
    );
}

/// PurgeQueue and DeleteQueue announce the drain: a waiter that returns on a drained queue
/// hears it at once instead of after its wait.
#[tokio::test]
async fn purge_and_delete_wake_waiters_that_return_on_a_drained_queue() {
    let redis = redis().await;
    // No reaper rounds during the test: only the announcement can end the wait.
    let config = BrokerConfig {
        reap_interval: Duration::from_secs(3600),
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    let mut admin = broker.admin().await;
    for purge in [true, false] {
        enqueue(
            &mut client,
            "q",
            vec![item_with_id("x", "x"), item_with_id("y", "y")],
        )
        .await;
        // One leased item keeps the queue from being drained; purging it drains it.
        lease(&mut client, "q", 1, Duration::from_secs(30)).await;
        admin
            .purge_queue(pb::PurgeQueueRequest {
                queue: "q".into(),
                states: vec![pb::ItemState::Ready as i32],
            })
            .await
            .expect("purge ready");
        let mut waiter = broker.client().await;
        let wait = tokio::spawn(async move {
            let started = Instant::now();
            let reply = waiter
                .lease(pb::LeaseRequest {
                    queue: "q".into(),
                    max_wait: Some(duration(Duration::from_secs(30))),
                    return_if_drained: true,
                    ..Default::default()
                })
                .await
                .expect("lease")
                .into_inner();
            (reply, started.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        if purge {
            admin
                .purge_queue(pb::PurgeQueueRequest {
                    queue: "q".into(),
                    states: vec![pb::ItemState::Leased as i32],
                })
                .await
                .expect("purge leased");
        } else {
            admin
                .delete_queue(pb::DeleteQueueRequest { queue: "q".into() })
                .await
                .expect("delete");
        }
        let (reply, waited) = tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the waiter returns")
            .expect("waiter task");
        assert!(reply.drained);
        assert!(waited < Duration::from_secs(5), "purge={purge}: {waited:?}");
        admin
            .delete_queue(pb::DeleteQueueRequest { queue: "q".into() })
            .await
            .expect("clean up");
    }
}

/// Enqueues to a paused queue wake none of its waiters (they could lease nothing); resuming
/// does.
#[tokio::test]
async fn a_paused_queues_waiters_are_not_woken_by_enqueues() {
    let redis = redis().await;
    let config = BrokerConfig {
        reap_interval: Duration::from_secs(3600),
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    let mut admin = broker.admin().await;
    admin
        .pause_queue(pb::PauseQueueRequest { queue: "q".into() })
        .await
        .expect("pause");
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let mut waiter = client.clone();
            tokio::spawn(async move {
                waiter
                    .lease(pb::LeaseRequest {
                        queue: "q".into(),
                        max_wait: Some(duration(Duration::from_secs(30))),
                        ..Default::default()
                    })
                    .await
                    .expect("lease")
                    .into_inner()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Loads the enqueue script, so no NOSCRIPT retry is counted below.
    enqueue(&mut client, "other", vec![item("load")]).await;
    let before = script_calls(&redis).await;
    for i in 0..20 {
        enqueue(&mut client, "q", vec![item(&i.to_string())]).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let scripts = script_calls(&redis).await - before;
    assert_eq!(scripts, 20, "the 20 enqueues and no waiter's lease script");
    admin
        .resume_queue(pb::ResumeQueueRequest { queue: "q".into() })
        .await
        .expect("resume");
    for waiter in waiters {
        let reply = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the resume")
            .expect("waiter task");
        assert_eq!(reply.items.len(), 1);
    }
}

/// ListItems with payloads keeps each page within the reply budget and pages through the rest.
#[tokio::test]
async fn list_items_with_payloads_pages_within_the_reply_budget() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let items = (0..12)
        .map(|i| (format!("l{i:02}"), payload_of(900 * 1024, b'l')))
        .collect();
    enqueue_bytes(&mut client, "q", items).await;
    let mut admin = broker.admin().await;
    let mut token = String::new();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = admin
            .list_items(pb::ListItemsRequest {
                queue: "q".into(),
                state: pb::ItemState::Ready as i32,
                page_size: 1000,
                page_token: token.clone(),
                include_payloads: true,
            })
            .await
            .expect("a page fits the 4 MiB receive limit")
            .into_inner();
        pages += 1;
        assert!((1..=4).contains(&page.items.len()), "{}", page.items.len());
        seen.extend(page.items.into_iter().map(|i| i.id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(
        seen,
        (0..12).map(|i| format!("l{i:02}")).collect::<Vec<_>>()
    );
    assert!(pages >= 3, "{pages} pages");
}

/// An ExtendLease that shortens a lease moves the reaper's visit forward: a worker that dies
/// after it gets its item reclaimed by the shorter expiry, not the original one.
#[tokio::test]
async fn a_shortened_lease_is_reclaimed_on_its_new_expiry() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item("x")]).await;
    let leased = lease(&mut client, "q", 1, Duration::from_secs(600)).await;
    client
        .extend_lease(pb::ExtendLeaseRequest {
            queue: "q".into(),
            lease_ids: vec![leased.items[0].lease_id.clone()],
            lease_duration: Some(duration(Duration::from_millis(300))),
        })
        .await
        .expect("extend");
    eventually("the shortened lease is reclaimed", async || {
        state(&mut client, "q").await.reclaimed_total == 1
    })
    .await;
}

/// A ready set written before the heads index existed (no `hv` in meta) gets its heads rebuilt,
/// so the oldest ready time is right from the first call.
#[tokio::test]
async fn a_ready_set_without_heads_gets_them_rebuilt() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let mut old = item_with_id("old", "o");
    old.priority = 1;
    enqueue(&mut client, "q", vec![old]).await;
    let first = get_item(&mut client, "q", "old").await.expect("stored");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut newer = item_with_id("new", "n");
    newer.priority = 7;
    enqueue(&mut client, "q", vec![newer]).await;
    let mut conn = redis_conn(&redis).await;
    let _: () = redis::pipe()
        .cmd("DEL")
        .arg("wq:{q}:heads")
        .ignore()
        .cmd("HDEL")
        .arg("wq:{q}:meta")
        .arg("hv")
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("rewind to the old layout");
    assert_eq!(
        state(&mut client, "q").await.oldest_ready_enqueue_time,
        first.enqueue_time
    );
}

/// An idle queue's expiry counts from its last completion, not its last enqueue; counters
/// written before the last-activity field existed are kept and count from the first visit.
#[tokio::test]
async fn idle_expiry_counts_from_the_last_completion() {
    let redis = redis().await;
    let config = BrokerConfig {
        queue_idle_ttl: Duration::from_secs(2),
        dedup_window: Duration::ZERO,
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "slow", vec![item("x")]).await;
    let leased = lease(&mut client, "slow", 1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    complete(&mut client, "slow", &[leased.items[0].lease_id.clone()]).await;
    let completed = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        state(&mut client, "slow").await.completed_total,
        1,
        "kept 1 s after"
    );
    eventually("the queue is forgotten after its idle expiry", async || {
        state(&mut client, "slow").await.completed_total == 0
    })
    .await;
    assert!(completed.elapsed() >= Duration::from_secs(2));
}

/// Queues an old broker replica still adds to the old registry during a rolling upgrade reach
/// the queue index, and one damaged queue does not hide the others from ListQueues.
#[tokio::test]
async fn queues_of_the_old_registry_are_indexed_and_a_damaged_one_hides_nobody() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "late", vec![item("x")]).await;
    enqueue(&mut client, "damaged", vec![item("y")]).await;
    let mut conn = redis_conn(&redis).await;
    let _: () = redis::pipe()
        .cmd("ZREM")
        .arg("wq:queues:due")
        .arg("late")
        .ignore()
        .cmd("SADD")
        .arg("wq:queues")
        .arg("late")
        .ignore()
        .cmd("SET")
        .arg("wq:{damaged}:dead")
        .arg("not a sorted set")
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("an old replica's registration, and a damaged key");
    let mut admin = broker.admin().await;
    eventually("the old registration is indexed", async || {
        let listed = admin
            .list_queues(pb::ListQueuesRequest::default())
            .await
            .expect("ListQueues answers despite the damaged queue")
            .into_inner();
        listed.queues.iter().any(|q| q.queue == "late")
    })
    .await;
}
