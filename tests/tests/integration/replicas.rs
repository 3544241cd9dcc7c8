//! `--redis-wait-replicas`: a write is acknowledged only once the replica has it, and a write
//! whose replica does not answer gets UNAVAILABLE (reads go on).

use std::time::{Duration, Instant};

use wq_tests::*;

/// A master, a replica that follows it, and a broker whose writes wait for that replica
/// (`--redis-wait-replicas 1`, 300 ms).
async fn master_replica_and_waiting_broker() -> (RedisProcess, RedisProcess, Broker) {
    let master = redis().await;
    let port = master.port().to_string();
    let replica = RedisProcess::start_with(&["--save", "", "--replicaof", "127.0.0.1", &port])
        .await
        .expect("a replica");
    eventually("the replica follows the master", async || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut redis_conn(&replica).await)
            .await
            .unwrap_or_default();
        info.contains("master_link_status:up")
    })
    .await;
    let config = BrokerConfig {
        redis_timeout: Duration::from_secs(2),
        redis_wait_replicas: 1,
        redis_wait_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let broker = Broker::start_with(&master.url(), config).await;
    (master, replica, broker)
}

#[tokio::test]
async fn writes_are_acknowledged_once_the_replica_has_them_and_unavailable_without_it() {
    let (_master, mut replica, broker) = master_replica_and_waiting_broker().await;
    let mut client = broker.client().await;

    // Every acknowledged write is on the replica when the call returns.
    let mut on_replica = redis_conn(&replica).await;
    for n in 0..50 {
        let id = format!("w-{n}");
        enqueue(&mut client, "q", vec![item_with_id(&id, "x")]).await;
        let there: bool = redis::cmd("EXISTS")
            .arg(format!("wq:{{q}}:i:{id}"))
            .query_async(&mut on_replica)
            .await
            .expect("EXISTS on the replica");
        assert!(there, "{id} acknowledged before the replica had it");
    }
    let leased = lease(&mut client, "q", 50, Duration::from_secs(30)).await;
    let ids: Vec<String> = leased.items.iter().map(|i| i.lease_id.clone()).collect();
    assert_eq!(complete(&mut client, "q", &ids).await.len(), 50);

    // Without the replica, writes answer UNAVAILABLE after the wait; reads still work.
    replica.kill().await;
    let started = Instant::now();
    let refused = client
        .enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: vec![item_with_id("lonely", "x")],
        })
        .await
        .expect_err("no replica confirms the write");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let s = state(&mut client, "q").await;
    assert_eq!(s.completed_total, 50);
    assert!(
        refused.message().contains("--redis-wait-replicas"),
        "{refused:?}"
    );
}

/// A script's error reply keeps its meaning when the write waits for replicas: a full Redis
/// still answers RESOURCE_EXHAUSTED, not INTERNAL (the write and its WAIT are one pipeline).
#[tokio::test]
async fn a_full_redis_answers_resource_exhausted_while_writes_wait_for_replicas() {
    let (master, _replica, broker) = master_replica_and_waiting_broker().await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item("x")]).await;
    let mut admin = redis_conn(&master).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut admin)
        .await
        .expect("CONFIG SET");
    let status = client
        .enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: vec![item("y")],
        })
        .await
        .expect_err("a full redis refuses writes");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
}
