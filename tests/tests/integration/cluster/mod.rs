//! wq on a real Redis Cluster (three masters, three replicas; see `wq_tests::cluster`): every
//! RPC on queues of every master through two broker replicas, cross-replica wake-ups, nodes
//! dying, planned topology changes (a manual failover, a live slot migration) under load, and
//! the walkthrough with real binaries.

mod failover;
mod rpcs;
mod topology;
mod walkthrough;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use wq_tests::{cluster::RedisCluster, *};

/// Broker settings on a cluster: the Redis timeout must outlast a topology refresh.
pub(super) fn cluster_config() -> BrokerConfig {
    BrokerConfig {
        redis_timeout: Duration::from_secs(3),
        ..test_config()
    }
}

/// A cluster with two brokers on it.
pub(super) async fn cluster_with_brokers(config: BrokerConfig) -> (RedisCluster, Broker, Broker) {
    let cluster = RedisCluster::start().await;
    let first = Broker::start_on(cluster.target(), config.clone()).await;
    let second = Broker::start_on(cluster.target(), config).await;
    (cluster, first, second)
}

/// Enqueues `count` items with the ids `item-0`, `item-1`, … on `queue`, in batches of 200;
/// returns the ids.
pub(super) async fn seed_known_ids(client: &mut Client, queue: &str, count: usize) -> Vec<String> {
    let ids: Vec<String> = (0..count).map(|i| format!("item-{i}")).collect();
    for chunk in ids.chunks(200) {
        enqueue(
            client,
            queue,
            chunk.iter().map(|id| item_with_id(id, "x")).collect(),
        )
        .await;
    }
    ids
}

/// How long a drainer's Lease waits for items.
pub(super) const DRAIN_WAIT: Duration = Duration::from_millis(500);

/// How a drainer paces itself.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pace {
    /// Items per Lease.
    pub(super) max_items: u32,
    /// The pause after each Lease and Complete.
    pub(super) pause: Duration,
}

/// What one drainer met.
#[derive(Debug, Default)]
pub(super) struct Drained {
    /// The errors its calls answered.
    pub(super) errors: Vec<tonic::Status>,
    /// The ids of items whose Complete failed: it may have been applied all the same (a call
    /// that timed out in the broker can still run in Redis), so they are done or come back.
    pub(super) unconfirmed: Vec<String>,
    /// The slowest Lease and the slowest Complete, answered or failed.
    pub(super) slowest_lease: Duration,
    pub(super) slowest_complete: Duration,
}

/// Leases and completes on `queue` until it is drained, riding out errors (UNAVAILABLE while
/// the shard fails over); records every completion acknowledged to it in `done` (id → times),
/// and returns what it met.
pub(super) async fn drain(
    mut client: Client,
    queue: &'static str,
    done: Arc<Mutex<HashMap<String, usize>>>,
    pace: Pace,
) -> Drained {
    let mut drained = Drained::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let started = Instant::now();
        let leased = client
            .lease(pb::LeaseRequest {
                queue: queue.into(),
                max_items: pace.max_items,
                lease_duration: Some(duration(Duration::from_secs(5))),
                max_wait: Some(duration(DRAIN_WAIT)),
                return_if_drained: true,
                ..Default::default()
            })
            .await;
        drained.slowest_lease = drained.slowest_lease.max(started.elapsed());
        let leased = match leased {
            Ok(leased) => leased.into_inner(),
            Err(status) => {
                drained.errors.push(status);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if leased.items.is_empty() {
            if leased.drained {
                return drained;
            }
            continue;
        }
        let completions = leased
            .items
            .iter()
            .map(|item| pb::Completion {
                lease_id: item.lease_id.clone(),
                result: Default::default(),
            })
            .collect();
        let started = Instant::now();
        let completed = client
            .complete(pb::CompleteRequest {
                queue: queue.into(),
                completions,
            })
            .await;
        drained.slowest_complete = drained.slowest_complete.max(started.elapsed());
        match completed {
            Ok(completed) => {
                let mut done = done.lock().expect("lock");
                for (item, result) in leased.items.iter().zip(&completed.get_ref().results) {
                    if result.outcome() == pb::LeaseOutcome::Ok {
                        *done.entry(item.id.clone()).or_default() += 1;
                    }
                }
            }
            Err(status) => {
                drained.errors.push(status);
                drained
                    .unconfirmed
                    .extend(leased.items.iter().map(|item| item.id.clone()));
            }
        }
        tokio::time::sleep(pace.pause).await;
    }
    drained
}
