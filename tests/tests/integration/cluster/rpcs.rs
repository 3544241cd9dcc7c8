//! Every RPC of both services on a cluster, for a queue on each master, through two brokers.

use std::time::{Duration, Instant};

use wq_tests::{cluster::RedisCluster, *};

use super::{cluster_config, cluster_with_brokers};

/// The queues of the test land on three different masters, or the test proves nothing.
async fn assert_one_queue_per_master(cluster: &RedisCluster) {
    let mut masters = Vec::new();
    for queue in RedisCluster::queue_per_master() {
        masters.push(cluster.master_of(queue).await);
    }
    masters.sort_unstable();
    masters.dedup();
    assert_eq!(masters.len(), 3, "the test queues share a master");
}

#[tokio::test]
async fn every_rpc_works_on_queues_of_every_master_through_both_brokers() {
    let (cluster, first, second) = cluster_with_brokers(cluster_config()).await;
    assert_one_queue_per_master(&cluster).await;
    let mut producer = first.client().await;
    let mut worker = second.client().await;
    let mut admin = first.admin().await;
    let mut other_admin = second.admin().await;
    for queue in RedisCluster::queue_per_master() {
        let ids = enqueue(
            &mut producer,
            queue,
            vec![
                item_with_id("a", "1"),
                item_with_id("b", "2"),
                item_with_id("c", "3"),
            ],
        )
        .await;
        assert_eq!(ids, ["a", "b", "c"]);
        let again = producer
            .enqueue(pb::EnqueueRequest {
                queue: queue.into(),
                items: vec![item_with_id("a", "again")],
            })
            .await
            .expect("enqueue")
            .into_inner();
        assert!(again.results[0].duplicate, "{queue}: a duplicate id");

        let leased = lease(&mut worker, queue, 3, Duration::from_secs(30)).await;
        assert_eq!(leased.items.len(), 3, "{queue}");
        let lease_of = |id: &str| {
            leased
                .items
                .iter()
                .find(|item| item.id == id)
                .map(|item| item.lease_id.clone())
                .expect("leased")
        };
        let extended = worker
            .extend_lease(pb::ExtendLeaseRequest {
                queue: queue.into(),
                lease_ids: vec![lease_of("a")],
                lease_duration: Some(duration(Duration::from_secs(60))),
            })
            .await
            .expect("extend")
            .into_inner();
        assert_eq!(extended.results[0].outcome(), pb::LeaseOutcome::Ok);
        assert_eq!(
            complete(&mut worker, queue, &[lease_of("a")]).await,
            [pb::LeaseOutcome::Ok]
        );
        fail(&mut worker, queue, &lease_of("b"), None, true).await;
        let released = worker
            .release(pb::ReleaseRequest {
                queue: queue.into(),
                lease_ids: vec![lease_of("c")],
            })
            .await
            .expect("release")
            .into_inner();
        assert_eq!(released.results[0].outcome(), pb::LeaseOutcome::Ok);

        let item = get_item(&mut worker, queue, "b").await.expect("get item");
        assert_eq!(item.state(), pb::ItemState::Dead, "{queue}");
        let listed = admin
            .list_items(pb::ListItemsRequest {
                queue: queue.into(),
                state: pb::ItemState::Dead.into(),
                page_size: 10,
                include_payloads: true,
                ..Default::default()
            })
            .await
            .expect("list items")
            .into_inner();
        assert_eq!(listed.items.len(), 1);
        assert_eq!(&listed.items[0].payload[..], b"2");
        let requeued = admin
            .requeue_dead(pb::RequeueDeadRequest {
                queue: queue.into(),
                all: true,
                ..Default::default()
            })
            .await
            .expect("requeue")
            .into_inner();
        assert_eq!(requeued.requeued_count, 1);

        admin
            .pause_queue(pb::PauseQueueRequest {
                queue: queue.into(),
            })
            .await
            .expect("pause");
        let from_first = state(&mut producer, queue).await;
        let from_second = state(&mut worker, queue).await;
        assert_eq!(from_first, from_second, "both brokers see one queue");
        assert!(from_first.paused);
        assert_eq!(
            (from_first.ready, from_first.dead),
            (2, 0),
            "{from_first:?}"
        );
        assert_eq!(
            (from_first.enqueued_total, from_first.completed_total),
            (3, 1),
            "{from_first:?}"
        );
        other_admin
            .resume_queue(pb::ResumeQueueRequest {
                queue: queue.into(),
            })
            .await
            .expect("resume");
        let purged = other_admin
            .purge_queue(pb::PurgeQueueRequest {
                queue: queue.into(),
                states: vec![pb::ItemState::Ready.into()],
            })
            .await
            .expect("purge")
            .into_inner();
        assert_eq!(purged.purged_count, 2);
        other_admin
            .seal_queue(pb::SealQueueRequest {
                queue: queue.into(),
            })
            .await
            .expect("seal");
        let sealed = lease_waiting(&mut worker, queue, Duration::from_secs(1), true).await;
        assert!(sealed.items.is_empty() && sealed.drained, "{sealed:?}");
    }

    let listed = admin
        .list_queues(pb::ListQueuesRequest {
            page_size: 10,
            ..Default::default()
        })
        .await
        .expect("list queues")
        .into_inner();
    let mut names: Vec<&str> = listed.queues.iter().map(|q| q.queue.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["q1", "q2", "q4"]);
    for queue in RedisCluster::queue_per_master() {
        admin
            .delete_queue(pb::DeleteQueueRequest {
                queue: queue.into(),
            })
            .await
            .expect("delete");
    }
    eventually("deleted queues leave no keys on any master", async || {
        let mut conn = cluster.conn().await;
        for queue in RedisCluster::queue_per_master() {
            let pattern = format!("wq:{{{queue}}}*");
            let slot_keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if !slot_keys.is_empty() {
                return false;
            }
        }
        true
    })
    .await;
}

/// A Lease waiting in one broker wakes within tens of milliseconds of an enqueue through the
/// other, for a queue on each master: a script's SPUBLISH reaches the broker subscribed on the
/// queue's shard.
#[tokio::test]
async fn an_enqueue_through_one_broker_wakes_a_waiter_in_the_other_on_every_master() {
    // The reaper's safety net for lost notifications comes only every 10 s here.
    let config = BrokerConfig {
        reap_interval: Duration::from_secs(1),
        ..cluster_config()
    };
    let (_cluster, first, second) = cluster_with_brokers(config).await;
    let mut producer = first.client().await;
    for queue in RedisCluster::queue_per_master() {
        let mut waiter = second.client().await;
        let waiting = tokio::spawn({
            let queue = queue.to_owned();
            async move {
                let leased =
                    lease_waiting(&mut waiter, &queue, Duration::from_secs(10), false).await;
                (leased, Instant::now())
            }
        });
        // The waiter is parked once its first attempt found nothing.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = Instant::now();
        enqueue(&mut producer, queue, vec![item("wake")]).await;
        let (leased, woken) = waiting.await.expect("waiter");
        assert_eq!(leased.items.len(), 1, "{queue}");
        let latency = woken.duration_since(sent);
        println!("cluster: wake-up on {queue} in {latency:?}");
        assert!(
            latency < Duration::from_millis(100),
            "{queue}: woken after {latency:?}, not by the notification"
        );
    }
}

/// With `--redis-wait-replicas 1` on a cluster, each write is acknowledged once its own shard's
/// replica has it; while one shard's replica is frozen, that shard's writes answer UNAVAILABLE
/// (saying the replica did not confirm) and the other shards' writes go on.
#[tokio::test]
async fn writes_wait_for_the_replica_of_their_own_shard() {
    let cluster = RedisCluster::start().await;
    let config = BrokerConfig {
        redis_wait_replicas: 1,
        redis_wait_timeout: Duration::from_millis(500),
        ..cluster_config()
    };
    let broker = Broker::start_on(cluster.target(), config).await;
    let mut client = broker.client().await;
    let keys_of = |queue: &str| wq_server::keys::QueueKeys::new(&test_config().key_prefix, queue);
    for queue in RedisCluster::queue_per_master() {
        enqueue(&mut client, queue, vec![item_with_id("acked", "x")]).await;
        // Read on the replica itself, right after the acknowledgement.
        let replica = cluster.replica_of(cluster.master_of(queue).await).await;
        let (exists,): (u32,) = redis::pipe()
            .cmd("READONLY")
            .ignore()
            .cmd("EXISTS")
            .arg(keys_of(queue).item("acked"))
            .query_async(&mut redis_conn(&cluster.nodes[replica]).await)
            .await
            .expect("EXISTS on the replica");
        assert_eq!(
            exists, 1,
            "the replica of {queue}'s master has the acknowledged item"
        );
    }

    let [frozen_queue, other_queue, _] = RedisCluster::queue_per_master();
    let replica = cluster
        .replica_of(cluster.master_of(frozen_queue).await)
        .await;
    let pid = cluster.nodes[replica].pid().expect("replica runs");
    signal(pid, "-STOP");
    let refused = client
        .enqueue(pb::EnqueueRequest {
            queue: frozen_queue.into(),
            items: vec![item("unconfirmed")],
        })
        .await
        .expect_err("no replica confirms");
    let other = client
        .enqueue(pb::EnqueueRequest {
            queue: other_queue.into(),
            items: vec![item("confirmed")],
        })
        .await;
    signal(pid, "-CONT");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("--redis-wait-replicas"),
        "{}",
        refused.message()
    );
    assert!(other.is_ok(), "another shard's write: {other:?}");
}

/// Two idle brokers on a cluster cost its nodes next to nothing: each reaper reads the queue
/// index once per round and the health monitor pings every master once a second.
#[tokio::test]
async fn idle_brokers_cost_the_cluster_next_to_nothing() {
    let config = BrokerConfig {
        reap_interval: Duration::from_millis(500),
        ..cluster_config()
    };
    let (cluster, first, _second) = cluster_with_brokers(config).await;
    let mut client = first.client().await;
    for queue in RedisCluster::queue_per_master() {
        enqueue(&mut client, queue, vec![item("x")]).await;
    }
    // Let the first visits of the new queues pass.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = cluster.commands().await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let per_second = (cluster.commands().await - before) as f64 / started.elapsed().as_secs_f64();
    println!("cluster: two idle brokers: {per_second:.1} commands/s over six nodes");
    // 2 × 2 index reads and 2 × 3 pings a second, plus the nodes' own replication pings.
    assert!(per_second < 40.0, "{per_second:.1} commands/s at rest");
}
