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

/// Runs one of the broker's scripts on `queue` the way the broker would, except that its
/// notifications go to a channel nobody listens on: a notification lost in transit, as far as
/// the brokers can tell. `args` follow the script's fixed leading arguments.
async fn run_script_unheard(redis: &RedisProcess, script: &redis::Script, args: &[&str]) {
    let mut conn = redis_conn(redis).await;
    let config = BrokerConfig::default();
    let mut call =
        wq_server::scripts::queue_invocation(script, &keys_of_q(), UNHEARD_CHANNEL, "q", &config);
    for arg in args {
        call.arg(*arg);
    }
    let _: redis::Value = call.invoke_async(&mut conn).await.expect("the script runs");
}

const UNHEARD_CHANNEL: &str = "wq-test:nobody-listens";

/// The broker's keys of queue `q`.
fn keys_of_q() -> wq_server::keys::QueueKeys {
    wq_server::keys::QueueKeys::new(&BrokerConfig::default().key_prefix, "q")
}

/// Starts a Lease on queue `q` that waits up to 30 s, and gives it time to park.
async fn parked_waiter(
    mut client: Client,
    return_if_drained: bool,
) -> tokio::task::JoinHandle<(pb::LeaseResponse, Duration)> {
    let wait = tokio::spawn(async move {
        let started = Instant::now();
        let reply =
            lease_waiting(&mut client, "q", Duration::from_secs(30), return_if_drained).await;
        (reply, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    wait
}

/// The parked waiter's reply and how long it waited, once it returns (well before its 30 s).
async fn reply_of(
    wait: tokio::task::JoinHandle<(pb::LeaseResponse, Duration)>,
) -> (pb::LeaseResponse, Duration) {
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the waiter returns long before its 30 s wait ends")
        .expect("waiter task")
}

/// Notifications are fire and forget, so one can be lost. Waiting Lease calls do not poll Redis
/// on their own (no --wait-recheck by default); the reaper, one script call per queue and round,
/// wakes local waiters of a queue that has ready items.
#[tokio::test]
async fn a_waiter_whose_notification_was_lost_is_woken_by_the_reaper() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut producer = broker.client().await;
    // Registers the queue, as every real enqueue does, so the reaper visits it.
    enqueue(&mut producer, "q", vec![item("first")]).await;
    let first = lease(&mut producer, "q", 1, Duration::from_secs(30)).await;
    complete(&mut producer, "q", &[first.items[0].lease_id.clone()]).await;

    let wait = parked_waiter(broker.client().await, false).await;
    run_script_unheard(
        &redis,
        &wq_server::scripts::Scripts::new().enqueue,
        &["1", "0", "quiet", "unheard", "0", "-1", "-1", "5", ""],
    )
    .await;
    let (reply, waited) = reply_of(wait).await;
    assert_eq!(reply.items.len(), 1);
    assert_eq!(reply.items[0].payload.as_ref(), b"unheard");
    assert!(
        waited < Duration::from_secs(5),
        "woken by the reaper (every 50 ms here): {waited:?}"
    );
}

/// The drain announcement can be lost too; a waiter that returns on a drained queue then hears
/// of it from the reaper instead of at the end of its wait.
#[tokio::test]
async fn a_lost_drain_announcement_is_made_up_for_by_the_reaper() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut holder = broker.client().await;
    enqueue(&mut holder, "q", vec![item("last")]).await;
    let held = lease(&mut holder, "q", 1, Duration::from_secs(30)).await;
    let lease_id = wq_server::lease_id::LeaseId::decode(&held.items[0].lease_id)
        .expect("a lease id the broker issued decodes");

    let wait = parked_waiter(broker.client().await, true).await;
    run_script_unheard(
        &redis,
        &wq_server::scripts::Scripts::new().complete,
        &["0", &lease_id.item_id, &lease_id.token, ""],
    )
    .await;
    let (reply, waited) = reply_of(wait).await;
    assert!(reply.items.is_empty());
    assert!(reply.drained);
    assert!(
        waited < Duration::from_secs(5),
        "told by the reaper (every 50 ms here): {waited:?}"
    );
}

/// Lease and Complete calls on one queue that arrive while a script call for it is in flight
/// are combined into the next one: many single-item callers (Job pods of concurrency 1) cost
/// Redis a few script calls, not one each, and every caller still gets its own items.
#[tokio::test]
async fn concurrent_single_item_leases_and_completes_share_script_calls() {
    const CALLERS: usize = 300;
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        (0..CALLERS).map(|i| item(&i.to_string())).collect(),
    )
    .await;
    let mut connections = Vec::new();
    for _ in 0..10 {
        connections.push(broker.client().await);
    }

    let before = script_calls(&redis).await;
    let leases = futures_util::future::join_all((0..CALLERS).map(|i| {
        let mut client = connections[i % connections.len()].clone();
        async move { lease(&mut client, "q", 1, Duration::from_secs(30)).await }
    }))
    .await;
    let lease_scripts = script_calls(&redis).await - before;
    let lease_ids: Vec<String> = leases
        .iter()
        .map(|reply| {
            assert_eq!(
                reply.items.len(),
                1,
                "every caller gets exactly its one item"
            );
            reply.items[0].lease_id.clone()
        })
        .collect();
    let payloads: HashSet<&[u8]> = leases
        .iter()
        .map(|reply| reply.items[0].payload.as_ref())
        .collect();
    assert_eq!(payloads.len(), CALLERS, "no item went to two callers");

    let before = script_calls(&redis).await;
    let outcomes = futures_util::future::join_all(lease_ids.iter().enumerate().map(|(i, id)| {
        let mut client = connections[i % connections.len()].clone();
        async move { complete(&mut client, "q", std::slice::from_ref(id)).await }
    }))
    .await;
    let complete_scripts = script_calls(&redis).await - before;
    assert!(outcomes.iter().all(|o| o == &[pb::LeaseOutcome::Ok]));
    let s = state(&mut client, "q").await;
    assert_eq!((s.completed_total, s.drained), (CALLERS as u64, true));

    eprintln!(
        "coalescing: {CALLERS} Lease calls took {lease_scripts} scripts, {CALLERS} Complete \
         calls {complete_scripts}"
    );
    // One each would be 300; the reaper adds a few of its own meanwhile.
    assert!(
        lease_scripts < CALLERS as u64 / 2,
        "{lease_scripts} lease scripts"
    );
    assert!(
        complete_scripts < CALLERS as u64 / 2,
        "{complete_scripts} complete scripts"
    );
}
