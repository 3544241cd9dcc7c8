//! Redis outages: calls fail fast with UNAVAILABLE, health says NOT_SERVING, and the broker
//! recovers by itself when Redis returns. Also graceful shutdown.

use std::time::{Duration, Instant};

use tonic::Code;
use wq_tests::{health::ServingStatus, *};

async fn health_status(broker: &Broker) -> ServingStatus {
    let mut health = tonic_health_client(broker.channel().await);
    let reply = health
        .check(health::HealthCheckRequest {
            service: "wq.v1.WorkQueueService".into(),
        })
        .await
        .expect("health answers even without redis");
    reply.into_inner().status()
}

#[tokio::test]
async fn stopped_redis_gives_unavailable_fast_and_the_broker_recovers() {
    let mut redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item("before")]).await;
    assert_eq!(health_status(&broker).await, ServingStatus::Serving);

    redis.kill().await;
    let started = Instant::now();
    let status = client
        .enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: vec![item("during")],
        })
        .await
        .expect_err("no redis");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "fails fast: {:?}",
        started.elapsed()
    );
    let status = client
        .queue_state(pb::QueueStateRequest { queue: "q".into() })
        .await
        .expect_err("no redis");
    assert_eq!(status.code(), Code::Unavailable);
    eventually("health NOT_SERVING", async || {
        health_status(&broker).await == ServingStatus::NotServing
    })
    .await;

    redis.restart().await.expect("redis restarts on its port");
    eventually("health SERVING again", async || {
        health_status(&broker).await == ServingStatus::Serving
    })
    .await;
    eventually("enqueue works again", async || {
        client
            .enqueue(pb::EnqueueRequest {
                queue: "q".into(),
                items: vec![item("after")],
            })
            .await
            .is_ok()
    })
    .await;
    // Notifications resume too: a waiter is woken by an enqueue through another broker.
    let other = Broker::start(&redis.url()).await;
    let mut producer = other.client().await;
    let mut waiter = broker.client().await;
    let wait = tokio::spawn(async move {
        lease_waiting(&mut waiter, "fresh", Duration::from_secs(8), false).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let enqueued = Instant::now();
    enqueue(&mut producer, "fresh", vec![item("wake")]).await;
    let reply = wait.await.expect("waiter");
    assert_eq!(reply.items.len(), 1);
    assert!(
        enqueued.elapsed() < Duration::from_secs(2),
        "{:?}",
        enqueued.elapsed()
    );
}

#[tokio::test]
async fn frozen_redis_bounds_every_call_and_all_recover() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item("x")]).await;
    let pid = redis.pid().expect("redis runs");
    wq_tests::signal(pid, "-STOP");
    let started = Instant::now();
    let status = client
        .lease(pb::LeaseRequest {
            queue: "q".into(),
            ..Default::default()
        })
        .await
        .expect_err("frozen redis");
    let took = started.elapsed();
    wq_tests::signal(pid, "-CONT");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // The test config's Redis timeout is 500 ms.
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "{took:?}"
    );
    eventually("calls succeed again", async || {
        client
            .queue_state(pb::QueueStateRequest { queue: "q".into() })
            .await
            .is_ok()
    })
    .await;
}

#[tokio::test]
async fn broker_starts_not_serving_while_redis_is_down() {
    let mut redis = redis().await;
    let url = redis.url();
    redis.kill().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(wq_server::serve(
        listener,
        redis::Client::open(url).expect("url"),
        test_config(),
        async {
            let _ = stopped.await;
        },
    ));
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health_client(channel.clone());
    for _ in 0..5 {
        let reply = health
            .check(health::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health");
        assert_eq!(reply.into_inner().status(), ServingStatus::NotServing);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    redis.restart().await.expect("redis comes up");
    eventually("SERVING once redis answers", async || {
        health
            .check(health::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status() == ServingStatus::Serving)
            .unwrap_or(false)
    })
    .await;
    let _ = stop.send(());
    server.await.expect("no panic").expect("clean stop");
}

#[tokio::test]
async fn shutdown_ends_waiting_leases_with_an_empty_reply() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let wait = tokio::spawn(async move {
        client
            .lease(pb::LeaseRequest {
                queue: "q".into(),
                max_wait: Some(duration(Duration::from_secs(30))),
                ..Default::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    broker.stop().await;
    let reply = wait.await.expect("waiter").expect("an OK, empty reply");
    assert!(reply.into_inner().items.is_empty());
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn redis_out_of_memory_answers_resource_exhausted() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item("x")]).await;
    let mut admin = redis_conn(&redis).await;
    let set = |value: &'static str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET").arg("maxmemory").arg(value);
        cmd
    };
    let _: () = set("1").query_async(&mut admin).await.expect("CONFIG SET");
    let status = client
        .enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: vec![item("y")],
        })
        .await
        .expect_err("a full redis refuses writes");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let _: () = set("0").query_async(&mut admin).await.expect("CONFIG SET");
    assert_eq!(
        state(&mut client, "q").await.ready,
        1,
        "nothing half-written"
    );
}

#[tokio::test]
async fn with_aof_always_every_acknowledged_enqueue_survives_a_redis_crash() {
    let mut redis = RedisProcess::start_with(&[
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ])
    .await
    .unwrap_or_else(|e| panic!("cannot start the test's redis-server: {e}"));
    let broker = Broker::start(&redis.url()).await;
    let client = broker.client().await;
    // A producer enqueues batches until Redis dies under it; it remembers what was acknowledged.
    let producer = tokio::spawn(async move {
        let mut client = client;
        let mut acknowledged = Vec::new();
        for batch in 0..10_000 {
            let items: Vec<pb::EnqueueItem> = (0..10)
                .map(|i| item_with_id(&format!("{batch}-{i}"), "x"))
                .collect();
            let reply = client
                .enqueue(pb::EnqueueRequest {
                    queue: "q".into(),
                    items,
                })
                .await;
            match reply {
                Ok(reply) => {
                    acknowledged.extend(reply.into_inner().results.into_iter().map(|r| r.id))
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                    break;
                }
            }
        }
        acknowledged
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    // SIGKILL: no chance to flush anything that was not already written.
    redis.kill().await;
    let acknowledged = producer.await.expect("producer");
    assert!(
        acknowledged.len() >= 10,
        "the producer got going: {}",
        acknowledged.len()
    );
    redis.restart().await.expect("redis restarts from its AOF");
    let mut client = broker.client().await;
    eventually("the broker serves again", async || {
        client
            .queue_state(pb::QueueStateRequest { queue: "q".into() })
            .await
            .is_ok()
    })
    .await;
    for id in &acknowledged {
        let stored = get_item(&mut client, "q", id).await;
        assert!(stored.is_ok(), "acknowledged item {id} was lost");
    }
    let s = state(&mut client, "q").await;
    assert!(s.ready >= acknowledged.len() as u64);
}
