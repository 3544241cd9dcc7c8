//! Waiting-Lease limits against in-process brokers with their default stream limit: a
//! connection's waiting Leases leave it streams for its other calls, and a broker without
//! tokens limits waiting Leases per connection and per broker, not as one shared grant.

use std::time::Duration;

use tokio::task::JoinHandle;
use tonic::Code;
use wq_tests::*;

type Call = JoinHandle<Result<tonic::Response<pb::LeaseResponse>, tonic::Status>>;

/// Starts `count` Leases on `queue`, each waiting up to 30 s, on `client`'s connection.
fn waiting_leases(client: &Client, queue: &str, count: usize) -> Vec<Call> {
    (0..count)
        .map(|_| {
            let mut client = client.clone();
            let request = pb::LeaseRequest {
                queue: queue.to_owned(),
                max_wait: Some(duration(Duration::from_secs(30))),
                ..pb::LeaseRequest::default()
            };
            tokio::spawn(async move { client.lease(request).await })
        })
        .collect()
}

/// Waits until `refused` of `calls` have ended, checks that each ended with RESOURCE_EXHAUSTED
/// naming `limit`, and returns the calls still waiting.
async fn refused_then_waiting(calls: Vec<Call>, refused: usize, limit: &str) -> Vec<Call> {
    eventually(
        &format!("{refused} waiting Leases are refused"),
        async || calls.iter().filter(|c| c.is_finished()).count() >= refused,
    )
    .await;
    // Enough for any further refusal to have come: refusals are immediate.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut waiting = Vec::new();
    let mut ended = 0;
    for call in calls {
        if call.is_finished() {
            let status = call.await.expect("the task").expect_err("refused");
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(status.message().contains(limit), "{status:?}");
            ended += 1;
        } else {
            waiting.push(call);
        }
    }
    assert_eq!(ended, refused, "refused Leases");
    waiting
}

/// 100 waiting Leases on one connection (its whole stream limit) would leave the worker no
/// stream to Complete what it holds: three quarters are admitted, the rest refused at once,
/// and a Complete on the same connection is answered while 75 Leases wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_waiting_leases_leave_streams_for_its_completions() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "work", vec![item("held")]).await;
    let held = lease(&mut client, "work", 1, Duration::from_secs(60)).await;
    let lease_id = held.items[0].lease_id.clone();
    let calls = waiting_leases(&client, "idle", 100);
    let waiting = refused_then_waiting(
        calls,
        25,
        "three quarters of --max-streams-per-connection 100",
    )
    .await;
    assert_eq!(waiting.len(), 75);
    let outcomes = tokio::time::timeout(
        Duration::from_secs(3),
        complete(&mut client, "work", &[lease_id]),
    )
    .await
    .expect("the Complete finds a free stream while the Leases wait");
    assert_eq!(outcomes, vec![pb::LeaseOutcome::Ok]);
    assert!(waiting.iter().all(|c| !c.is_finished()));
}

/// Without a token file every caller used to be one grant ("anonymous"), so the per-grant limit
/// capped the whole open broker below --max-waiting-leases. Now 8 connections of 4 waiting
/// Leases each fill the broker's 30 slots, whatever --max-waiting-leases-per-grant says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_broker_limits_waiting_leases_per_connection_and_broker_only() {
    let redis = redis().await;
    let mut config = BrokerConfig {
        max_waiting_leases: 30,
        ..test_config()
    };
    config.security.limits.max_waiting_leases_per_grant = 10;
    config.security.limits.max_waiting_leases_per_connection = 4;
    let broker = Broker::start_with(&redis.url(), config).await;
    let first = waiting_leases(&broker.client().await, "open", 5);
    let mut waiting = refused_then_waiting(first, 1, "--max-waiting-leases-per-connection 4").await;
    let mut calls = Vec::new();
    for _ in 0..7 {
        calls.extend(waiting_leases(&broker.client().await, "open", 4));
    }
    waiting.extend(refused_then_waiting(calls, 2, "--max-waiting-leases 30").await);
    assert_eq!(waiting.len(), 30);
}
