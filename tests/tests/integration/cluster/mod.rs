//! wq on a real Redis Cluster (three masters, three replicas; see `wq_tests::cluster`): every
//! RPC on queues of every master through two broker replicas, cross-replica wake-ups, and the
//! walkthrough with real binaries.

mod failover;
mod rpcs;
mod walkthrough;

use std::time::Duration;

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
