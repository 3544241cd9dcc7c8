//! What the whole run shares: one Redis, two brokers on it (one forgets completed items, the
//! other keeps them), their clients, and the tally of what the cases exercised.

use std::{cell::Cell, time::Duration};

use proptest::test_runner::TestCaseResult;
use redis::aio::MultiplexedConnection;
use wq_tests::{
    AdminClient, Broker, BrokerConfig, Client, RedisProcess, pb, redis_conn, test_config,
};

use super::{
    BACKOFF_BASE, BACKOFF_CAP, BACKOFF_FACTOR, DEFAULT_MAX_ATTEMPTS, KEEP_COMPLETED, case::CaseRun,
    ops::Op, queue_model::QueueModel,
};

/// What every case shares: one Redis and two brokers on it that differ only in whether they keep
/// completed items.
pub(super) struct World {
    _redis: RedisProcess,
    brokers: Vec<Broker>,
    /// Clients of the forgetting and the keeping broker, in that order.
    clients: [Client; 2],
    admin: AdminClient,
    conn: MultiplexedConnection,
    key_prefix: String,
    pub(super) tally: Cell<Tally>,
}

fn model_config(completed_retention: Duration) -> BrokerConfig {
    BrokerConfig {
        default_max_attempts: DEFAULT_MAX_ATTEMPTS,
        backoff_base: BACKOFF_BASE,
        backoff_factor: BACKOFF_FACTOR,
        backoff_cap: BACKOFF_CAP,
        completed_retention,
        ..test_config()
    }
}

impl World {
    pub(super) async fn start() -> Self {
        let redis = wq_tests::redis().await;
        let forgetting = Broker::start_with(&redis.url(), model_config(Duration::ZERO)).await;
        let keeping = Broker::start_with(&redis.url(), model_config(KEEP_COMPLETED)).await;
        let clients = [forgetting.client().await, keeping.client().await];
        let admin = forgetting.admin().await;
        let conn = redis_conn(&redis).await;
        Self {
            _redis: redis,
            brokers: vec![forgetting, keeping],
            clients,
            admin,
            conn,
            key_prefix: test_config().key_prefix,
            tally: Cell::new(Tally::default()),
        }
    }

    pub(super) async fn stop(self) {
        for broker in self.brokers {
            broker.stop().await;
        }
    }

    pub(super) async fn run_case(
        &self,
        case: u64,
        keep_completed: bool,
        ops: &[Op],
    ) -> TestCaseResult {
        let names = [format!("model-{case}-a"), format!("model-{case}-b")];
        let mut run = CaseRun {
            client: self.clients[usize::from(keep_completed)].clone(),
            admin: self.admin.clone(),
            conn: self.conn.clone(),
            key_prefix: self.key_prefix.clone(),
            keep_completed,
            queues: names.map(|name| QueueModel::new(name, &self.key_prefix)),
            tally: Tally::default(),
        };
        let result = run.run(ops).await;
        let mut tally = self.tally.get();
        tally += run.tally;
        self.tally.set(tally);
        // Deleted queues drop out of the reaper's round, so its rounds stay short all run long.
        for queue in &run.queues {
            let _ = run
                .admin
                .delete_queue(pb::DeleteQueueRequest {
                    queue: queue.name.clone(),
                })
                .await;
        }
        result
    }
}

/// What the run exercised, summed over all cases, so a passing run shows it did not pass by
/// skipping: steps whose lease reference or pick found nothing are counted as skipped.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Tally {
    pub(super) steps: u64,
    pub(super) skipped: u64,
    pub(super) duplicates: u64,
    pub(super) granted: u64,
    pub(super) completed: u64,
    pub(super) failed: u64,
    pub(super) dead: u64,
    pub(super) reclaimed: u64,
    pub(super) promoted: u64,
    pub(super) requeued: u64,
    /// LEASE_LOST answers to lease ids the model knew to be lost.
    pub(super) lost: u64,
    /// INVALID_ARGUMENT answers to lease ids of the other queue.
    pub(super) wrong_queue: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, other: Self) {
        self.steps += other.steps;
        self.skipped += other.skipped;
        self.duplicates += other.duplicates;
        self.granted += other.granted;
        self.completed += other.completed;
        self.failed += other.failed;
        self.dead += other.dead;
        self.reclaimed += other.reclaimed;
        self.promoted += other.promoted;
        self.requeued += other.requeued;
        self.lost += other.lost;
        self.wrong_queue += other.wrong_queue;
    }
}
