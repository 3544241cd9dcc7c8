//! wq on a Sentinel-watched master (see `wq_tests::sentinel`) with `--redis-wait-replicas 1`:
//! the broker follows a failover, whether the master dies (SIGKILL) or an operator moves it
//! (`SENTINEL FAILOVER`), and every Enqueue it acknowledged is still there afterwards. Without
//! the wait, the operator's failover lost 47 of 500 acknowledged writes here: those the demoted
//! master took before the broker heard of the switch.

use std::time::{Duration, Instant};

use wq_tests::{sentinel::RedisSentinels, *};

/// Broker settings on Sentinel: calls outlast a master lookup, and every write is
/// acknowledged only once the replica has it (`--redis-wait-replicas 1`).
fn sentinel_config() -> BrokerConfig {
    BrokerConfig {
        redis_timeout: Duration::from_secs(2),
        redis_wait_replicas: 1,
        redis_wait_timeout: Duration::from_millis(500),
        ..test_config()
    }
}

/// Enqueues `p-0`, `p-1`, … one at a time through `client`, retrying each id until it is
/// acknowledged (ids make retries safe), until `stop_after` more are acknowledged after
/// `event` has run (it runs once `before` are acknowledged). Returns the acknowledged ids and
/// how many calls failed.
async fn produce_around(
    client: &mut Client,
    queue: &str,
    before: usize,
    stop_after: usize,
    event: impl AsyncFnOnce(),
) -> (Vec<String>, usize) {
    let mut acked = Vec::new();
    let mut failed = 0;
    let mut event = Some(event);
    let mut acked_at_event = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if acked.len() == before
            && let Some(event) = event.take()
        {
            event().await;
            acked_at_event = Some(acked.len());
        }
        if acked_at_event.is_some_and(|at| acked.len() >= at + stop_after) {
            return (acked, failed);
        }
        let id = format!("p-{}", acked.len());
        let sent = client
            .enqueue(pb::EnqueueRequest {
                queue: queue.into(),
                items: vec![item_with_id(&id, "x")],
            })
            .await;
        match sent {
            Ok(_) => acked.push(id),
            Err(status) => {
                assert!(
                    matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ),
                    "a failover answered {status:?}"
                );
                failed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    panic!("the producer made no progress after the failover: {acked_at_event:?}");
}

/// Every acknowledged id is in the queue, and nothing else.
async fn assert_all_there(client: &mut Client, queue: &str, acked: &[String], failed: usize) {
    let mut missing = Vec::new();
    for id in acked {
        if get_item(client, queue, id).await.is_err() {
            missing.push(id.clone());
        }
    }
    let s = state(client, queue).await;
    println!(
        "sentinel: {queue}: {} acknowledged, {} missing, {failed} calls failed meanwhile",
        acked.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    assert_eq!(s.ready, acked.len() as u64, "{s:?}");
}

#[tokio::test]
async fn a_killed_master_is_replaced_and_every_acknowledged_enqueue_survives() {
    let mut setup = RedisSentinels::start().await;
    let broker = Broker::start_on(setup.target(), sentinel_config()).await;
    let mut client = broker.client().await;
    let first = setup.master().await.expect("a master");
    let started = Instant::now();
    let (acked, failed) = produce_around(&mut client, "killed", 200, 200, async || {
        setup.servers[first].kill().await;
    })
    .await;
    println!(
        "sentinel: master SIGKILLed; producing went on, {:?} in all",
        started.elapsed()
    );
    assert_ne!(
        setup.master().await,
        Some(first),
        "the replica was promoted"
    );
    assert_all_there(&mut client, "killed", &acked, failed).await;
}

#[tokio::test]
async fn an_operators_failover_sends_no_write_to_the_demoted_master() {
    let setup = RedisSentinels::start().await;
    let broker = Broker::start_on(setup.target(), sentinel_config()).await;
    let mut client = broker.client().await;
    let first = setup.master().await.expect("a master");
    let (acked, failed) = produce_around(&mut client, "moved", 200, 300, async || {
        setup.failover().await;
    })
    .await;
    eventually("the sentinels name the new master", async || {
        setup.master().await.is_some_and(|now| now != first)
    })
    .await;
    // The old master becomes a replica of the new one and drops what only it had: wait for
    // it, then count.
    eventually("the old master follows the new one", async || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut redis_conn(&setup.servers[first]).await)
            .await
            .unwrap_or_default();
        info.contains("role:slave") && info.contains("master_link_status:up")
    })
    .await;
    assert_all_there(&mut client, "moved", &acked, failed).await;
}
