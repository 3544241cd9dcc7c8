//! Cluster nodes dying under the brokers: a master SIGKILLed mid-drain, and the node that holds
//! a broker's notification subscription killed for good.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use wq_tests::{cluster::RedisCluster, *};

use super::{Pace, cluster_config, cluster_with_brokers, drain, seed_known_ids};

/// The master of a busy queue is SIGKILLed mid-drain, with `--redis-wait-replicas 1`: its
/// replica takes over, the brokers ride it out (calls in between answer UNAVAILABLE, never
/// INTERNAL), and every acknowledged item is completed in the end; none is dead. Acknowledged
/// enqueues and completions were on the replica before their acknowledgement, so repeats come
/// only from completions that failed at the kill (they may have applied) and leases the new
/// master never had (a Lease is not waited for: losing one only delivers the item again).
#[tokio::test]
async fn a_master_killed_mid_drain_fails_over_and_every_item_is_completed() {
    let config = BrokerConfig {
        redis_wait_replicas: 1,
        redis_wait_timeout: Duration::from_secs(1),
        // Completed items are kept, so each one's end can be read back.
        completed_retention: Duration::from_secs(3600),
        ..cluster_config()
    };
    let (mut cluster, first, second) = cluster_with_brokers(config).await;
    let queue = "q1";
    let master = cluster.master_of(queue).await;
    let mut producer = first.client().await;
    let ids = seed_known_ids(&mut producer, queue, 600).await;

    let done = Arc::new(Mutex::new(HashMap::new()));
    let mut running = Vec::new();
    for broker in [&first, &second, &first, &second] {
        let client = broker.client().await;
        // Slow enough that the kill lands mid-drain.
        let pace = Pace {
            max_items: 10,
            pause: Duration::from_millis(20),
        };
        running.push(tokio::spawn(drain(client, queue, Arc::clone(&done), pace)));
    }
    eventually("a third of the items are done", async || {
        done.lock().expect("lock").len() >= 200
    })
    .await;
    let killed_at = Instant::now();
    cluster.nodes[master].kill().await;
    // The other shards still serve, so the brokers stay SERVING throughout.
    let health = tokio::spawn({
        let url = first.url();
        async move {
            let mut statuses = Vec::new();
            while killed_at.elapsed() < Duration::from_secs(8) {
                statuses.push(health_of(&url, None).await);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            statuses
        }
    });
    // The promoted replica has no replica of its own, so no write to the shard is confirmed
    // (each answers UNAVAILABLE, and may have applied) until the old master is back and
    // follows it.
    let mut promoted_after = None;
    while killed_at.elapsed() < Duration::from_secs(30) {
        if cluster.master_of(queue).await != master {
            promoted_after = Some(killed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promoted_after = promoted_after.expect("the replica took over within 30 s");
    cluster.nodes[master]
        .restart()
        .await
        .expect("the old master restarts");
    let mut errors = Vec::new();
    for worker in running {
        errors.extend(
            tokio::time::timeout(Duration::from_secs(90), worker)
                .await
                .expect("the workers finish")
                .expect("worker task")
                .errors,
        );
    }
    let drained_after = killed_at.elapsed();
    let statuses = health.await.expect("health probe");
    assert!(
        statuses
            .iter()
            .all(|status| *status == Some(health::ServingStatus::Serving)),
        "health while one shard failed over: {statuses:?}"
    );
    cluster.wait_ok().await;
    let done = done.lock().expect("lock").clone();
    // A completion whose acknowledgement was lost at the kill may still have applied.
    let mut missing = Vec::new();
    for id in ids.iter().filter(|id| !done.contains_key(*id)) {
        let item = get_item(&mut producer, queue, id).await;
        if !item.is_ok_and(|item| item.state() == pb::ItemState::Completed) {
            missing.push(id);
        }
    }
    let unacknowledged = ids.len() - done.len() - missing.len();
    let repeats: usize = done.values().map(|n| n - 1).sum();
    let s = state(&mut producer, queue).await;
    println!(
        "cluster: master of {queue} killed mid-drain: {} of {} completions acknowledged, \
         {unacknowledged} more applied unacknowledged, {repeats} repeats, replica promoted \
         {promoted_after:?} and queue drained {drained_after:?} after the kill, dead {}, {} \
         calls failed meanwhile",
        done.len(),
        ids.len(),
        s.dead,
        errors.len()
    );
    assert!(
        errors.iter().all(|status| matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
        )),
        "a topology change answered {errors:?}"
    );
    assert!(
        missing.is_empty(),
        "never completed: {} ({:?}…); state {s:?}; errors {:?}",
        missing.len(),
        missing.first(),
        errors.iter().take(3).collect::<Vec<_>>()
    );
    assert_eq!((s.dead, s.ready, s.leased), (0, 0, 0), "{s:?}");
    assert_ne!(
        cluster.master_of(queue).await,
        master,
        "the replica serves the queue now"
    );
}

/// The node holding a broker's wake-up subscription dies and stays down. Subscriptions are
/// sharded, so that node is the master of the waiters' queue: its replica takes over, the
/// broker subscribes there, and waiting Leases are woken by notifications again (well within a
/// second of each enqueue; the reaper's safety net would take 10 s here).
#[tokio::test]
async fn wake_ups_survive_the_death_of_the_subscribed_node() {
    let config = BrokerConfig {
        reap_interval: Duration::from_secs(1),
        ..cluster_config()
    };
    let (mut cluster, first, second) = cluster_with_brokers(config).await;
    let queue = "q1";
    let channel = wq_server::keys::notify_channel(&test_config().key_prefix, queue);
    // A waiter parks through `second`, so that broker subscribes to the queue's channel.
    let mut parked = second.client().await;
    let parked = tokio::spawn(async move {
        lease_waiting(&mut parked, queue, Duration::from_secs(30), false).await
    });
    eventually("the broker subscribed to the queue's channel", async || {
        !subscribed_nodes(&cluster, &channel).await.is_empty()
    })
    .await;
    let killed = subscribed_nodes(&cluster, &channel).await;
    let master = cluster.master_of(queue).await;
    assert_eq!(
        killed,
        vec![master],
        "the subscription is on the queue's master"
    );
    cluster.nodes[master].kill().await;
    parked.abort();

    let mut producer = first.client().await;
    let started = Instant::now();
    let mut latency = Duration::MAX;
    // Enqueues fail until the replica took over; then a notification must wake a waiter.
    while started.elapsed() < Duration::from_secs(20) {
        let mut waiter = second.client().await;
        // Items of earlier rounds whose waiter failed are taken out of the way first.
        let cleared = producer
            .lease(pb::LeaseRequest {
                queue: queue.into(),
                max_items: 100,
                ..Default::default()
            })
            .await;
        if cleared.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        // Until the replica took over, the waiter's own call fails too.
        let waiting = tokio::spawn(async move {
            let leased = waiter
                .lease(pb::LeaseRequest {
                    queue: queue.into(),
                    max_wait: Some(duration(Duration::from_secs(5))),
                    ..Default::default()
                })
                .await;
            (leased, Instant::now())
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = Instant::now();
        let Ok(_) = producer
            .enqueue(pb::EnqueueRequest {
                queue: queue.into(),
                items: vec![item("wake")],
            })
            .await
        else {
            waiting.abort();
            continue;
        };
        let (leased, woken) = waiting.await.expect("waiter");
        if !leased.is_ok_and(|leased| !leased.get_ref().items.is_empty()) || woken < sent {
            continue;
        }
        latency = woken.duration_since(sent);
        if latency < Duration::from_secs(1) {
            break;
        }
    }
    let new_holders = subscribed_nodes(&cluster, &channel).await;
    println!(
        "cluster: subscribed node {killed:?} killed; a waiter woken in {latency:?}, {:?} after \
         the kill; the subscription is now on {new_holders:?}",
        started.elapsed()
    );
    assert!(
        latency < Duration::from_secs(1),
        "no notification woke a waiter within 20 s of the kill (last wake-up {latency:?})"
    );
    assert_eq!(
        new_holders,
        vec![cluster.master_of(queue).await],
        "resubscribed on the new master"
    );
    drop(cluster);
}

/// The running nodes on which some client subscribed to the shard channel `channel`.
async fn subscribed_nodes(cluster: &RedisCluster, channel: &str) -> Vec<usize> {
    let mut holders = Vec::new();
    for (index, node) in cluster.nodes.iter().enumerate() {
        if node.pid().is_none() {
            continue;
        }
        let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(channel)
            .query_async(&mut redis_conn(node).await)
            .await
            .expect("PUBSUB SHARDNUMSUB");
        if counts.first().is_some_and(|(_, n)| *n > 0) {
            holders.push(index);
        }
    }
    holders
}

/// A whole shard dies (its master and its replica): calls for its queues answer UNAVAILABLE
/// within the Redis timeout, the queues of the other shards keep serving every call, and health
/// stays SERVING (`cluster-require-full-coverage no`). The shard holding the queue index is
/// spared here: with it gone, ListQueues and the reapers' claims fail until it is back, while
/// the queues themselves still serve.
#[tokio::test]
async fn a_dead_shard_fails_only_its_own_queues_within_the_redis_timeout() {
    let config = cluster_config();
    let timeout = config.redis_timeout;
    let (mut cluster, first, _second) = cluster_with_brokers(config).await;
    let index_master = cluster
        .master_of_key(&wq_server::keys::queue_index(&test_config().key_prefix))
        .await;
    let mut dead_queue = None;
    let mut live_queues = Vec::new();
    for queue in RedisCluster::queue_per_master() {
        if dead_queue.is_none() && cluster.master_of(queue).await != index_master {
            dead_queue = Some(queue);
        } else {
            live_queues.push(queue);
        }
    }
    let dead_queue = dead_queue.expect("a shard without the index");
    let mut client = first.client().await;
    for queue in RedisCluster::queue_per_master() {
        enqueue(&mut client, queue, vec![item("before")]).await;
    }
    let master = cluster.master_of(dead_queue).await;
    let replica = cluster.replica_of(master).await;
    cluster.nodes[replica].kill().await;
    cluster.nodes[master].kill().await;

    let started = Instant::now();
    let refused = client
        .enqueue(pb::EnqueueRequest {
            queue: dead_queue.into(),
            items: vec![item("after")],
        })
        .await
        .expect_err("the dead shard's queue is not served");
    let took = started.elapsed();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        took < timeout + Duration::from_secs(1),
        "answered after {took:?} (Redis timeout {timeout:?})"
    );
    for queue in &live_queues {
        enqueue(&mut client, queue, vec![item("after")]).await;
        let leased = lease(&mut client, queue, 10, Duration::from_secs(30)).await;
        assert_eq!(leased.items.len(), 2, "{queue}: both items");
        let ids: Vec<String> = leased.items.iter().map(|i| i.lease_id.clone()).collect();
        complete(&mut client, queue, &ids).await;
        assert_eq!(state(&mut client, queue).await.completed_total, 2);
    }
    assert_eq!(
        health_of(&first.url(), None).await,
        Some(health::ServingStatus::Serving)
    );
    println!(
        "cluster: shard of {dead_queue} dead: its Enqueue answered UNAVAILABLE in {took:?}; \
         {live_queues:?} served every call"
    );
}
