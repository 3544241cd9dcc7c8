//! Cluster nodes dying under the brokers: a master SIGKILLed mid-drain, and the node that holds
//! a broker's notification subscription killed for good.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use wq_tests::*;

use super::{Pace, cluster_config, cluster_with_brokers, drain};

/// The master of a busy queue is SIGKILLed mid-drain: its replica takes over, the brokers ride
/// it out (calls in between answer UNAVAILABLE, never INTERNAL), and every item is completed in
/// the end; none is dead. Repeats (completions lost with the master's last writes) are
/// counted.
#[tokio::test]
async fn a_master_killed_mid_drain_fails_over_and_every_item_is_completed() {
    let (mut cluster, first, second) = cluster_with_brokers(cluster_config()).await;
    let queue = "q1";
    let master = cluster.master_of(queue).await;
    let mut producer = first.client().await;
    let ids: Vec<String> = (0..600).map(|i| format!("item-{i}")).collect();
    for chunk in ids.chunks(200) {
        enqueue(
            &mut producer,
            queue,
            chunk.iter().map(|id| item_with_id(id, "x")).collect(),
        )
        .await;
    }
    // Every enqueue has reached the replica before the kill (replication is asynchronous; the
    // guarantee for acknowledged writes is --redis-wait-replicas, tested elsewhere).
    let replicated = async || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut redis_conn(&cluster.nodes[master]).await)
            .await
            .expect("INFO");
        let field = |prefix: &str| info.lines().find_map(|line| line.strip_prefix(prefix));
        let replica_offset = field("slave0:")
            .and_then(|replica| replica.split(',').find_map(|kv| kv.strip_prefix("offset=")));
        replica_offset.is_some() && replica_offset == field("master_repl_offset:")
    };
    eventually("the enqueues reached the replica", replicated).await;

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
    let missing: Vec<&String> = ids.iter().filter(|id| !done.contains_key(*id)).collect();
    let repeats: usize = done.values().map(|n| n - 1).sum();
    let s = state(&mut producer, queue).await;
    println!(
        "cluster: master of {queue} killed mid-drain: {} of {} completed, {repeats} repeats, \
         drained {drained_after:?} after the kill, dead {}, {} calls failed meanwhile",
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
    assert!(missing.is_empty(), "never completed: {missing:?}");
    assert_eq!((s.dead, s.ready, s.leased), (0, 0, 0), "{s:?}");
    assert_ne!(
        cluster.master_of(queue).await,
        master,
        "the replica serves the queue now"
    );
}

/// The node holding a broker's notification subscription dies and stays down: the broker
/// subscribes on another node, and waiting Leases are woken by notifications again (well
/// within a second; the reaper's safety net would take 10 s here).
#[tokio::test]
async fn wake_ups_survive_the_death_of_the_subscribed_node() {
    let config = BrokerConfig {
        reap_interval: Duration::from_secs(1),
        ..cluster_config()
    };
    let (mut cluster, first, second) = cluster_with_brokers(config).await;
    // The node where `second` (the waiters' broker) subscribed: `first` may share it.
    let mut holders = Vec::new();
    for (index, node) in cluster.nodes.iter().enumerate() {
        let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("wq:notify")
            .query_async(&mut redis_conn(node).await)
            .await
            .expect("PUBSUB NUMSUB");
        if counts.first().is_some_and(|(_, n)| *n > 0) {
            holders.push(index);
        }
    }
    assert!(!holders.is_empty(), "the brokers subscribed somewhere");
    let killed: HashSet<usize> = holders.iter().copied().collect();
    for index in &killed {
        cluster.nodes[*index].kill().await;
    }
    // A queue whose master is alive, so the calls themselves need no failover.
    let mut queue = None;
    for candidate in ["q4", "q1", "q2", "q3", "q5", "q6", "q7"] {
        if !killed.contains(&cluster.master_of(candidate).await) {
            queue = Some(candidate);
            break;
        }
    }
    let queue = queue.expect("a queue on a surviving master");
    let mut producer = first.client().await;
    let started = Instant::now();
    let mut latency = Duration::MAX;
    // The brokers notice the loss, resubscribe elsewhere and wake their waiters; then a
    // notification must wake a fresh waiter.
    while started.elapsed() < Duration::from_secs(20) {
        let mut waiter = second.client().await;
        let waiting = tokio::spawn(async move {
            let leased = lease_waiting(&mut waiter, queue, Duration::from_secs(5), false).await;
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
        if leased.items.is_empty() {
            continue;
        }
        latency = woken.duration_since(sent);
        if latency < Duration::from_secs(1) {
            break;
        }
    }
    println!(
        "cluster: subscribed node(s) {killed:?} killed; a waiter woken in {latency:?}, {:?} \
         after the kill",
        started.elapsed()
    );
    assert!(
        latency < Duration::from_secs(1),
        "no notification woke a waiter within 20 s of the kill (last wake-up {latency:?})"
    );
    drop(cluster);
}
