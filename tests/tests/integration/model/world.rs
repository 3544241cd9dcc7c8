//! What the whole run shares: one Redis (a server or a cluster), two brokers on it (one
//! forgets completed items, the other keeps them) with small payload and reply limits, their
//! clients, the model's direct connections into Redis, and the tally of what the cases
//! exercised.

use std::{cell::Cell, time::Duration};

use proptest::test_runner::TestCaseResult;
use redis::aio::MultiplexedConnection;
use wq_server::{keys, scripts::Scripts};
use wq_tests::{
    AdminClient, Broker, BrokerConfig, Client, RedisProcess, RedisTarget, cluster::RedisCluster,
    pb, redis_conn, standalone, test_config,
};

use super::{
    BACKOFF_BASE, BACKOFF_CAP, BACKOFF_FACTOR, DEAD_MAX_AGE, DEDUP_WINDOW, DEFAULT_MAX_ATTEMPTS,
    HEADER_LIMIT, KEEP_COMPLETED, MESSAGE_LIMIT, PAYLOAD_LIMIT, QUEUE_IDLE_TTL, REPLY_BUDGET,
    case::CaseRun, ops::Op, queue_model::QueueModel,
};

/// The reap interval of the brokers the cases call: so long that their reapers never run
/// during a run. A broker's reaper also visits, every few rounds, the queues on which a Lease of
/// that broker is in flight (its safety net for lost wake-ups); such a visit would delete a
/// deleted generation's trash or forget an expired id at a moment no step chose.
const NO_OWN_REAPER: Duration = Duration::from_secs(3600);

/// The Redis timeout of the brokers on a cluster: as in the other cluster tests, long enough
/// for a slot map refresh (there is none during a run, but the first calls of a broker wait for
/// its first slot map).
const CLUSTER_REDIS_TIMEOUT: Duration = Duration::from_secs(3);

/// What the run's Redis is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Deployment {
    /// One server.
    Server,
    /// A cluster of three masters with a replica each (`wq_tests::cluster`).
    Cluster,
}

/// The run's Redis, and the model's direct connections into it.
enum Store {
    /// One server, and one connection to it for every key.
    Server {
        /// Boxed: a process handle is much larger than the cluster's list of nodes.
        redis: Box<RedisProcess>,
        conn: MultiplexedConnection,
    },
    /// A cluster, and a connection to each of its nodes (by index in `cluster.nodes`): a
    /// queue's keys are read and forced on the master that serves the queue's slot, so that
    /// KEYS of a queue's pattern, pipelines of a queue's keys and the scripts a step runs
    /// directly work as on one server. Nothing moves slots during a run.
    Cluster {
        cluster: RedisCluster,
        conns: Vec<MultiplexedConnection>,
    },
}

impl Store {
    async fn start(deployment: Deployment) -> Self {
        match deployment {
            Deployment::Server => {
                let redis = Box::new(wq_tests::redis().await);
                let conn = redis_conn(&redis).await;
                Self::Server { redis, conn }
            }
            Deployment::Cluster => {
                let cluster = RedisCluster::start().await;
                let mut conns = Vec::new();
                for node in &cluster.nodes {
                    conns.push(redis_conn(node).await);
                }
                Self::Cluster { cluster, conns }
            }
        }
    }

    /// Where the brokers find this Redis.
    fn target(&self) -> RedisTarget {
        match self {
            Self::Server { redis, .. } => standalone(&redis.url()),
            Self::Cluster { cluster, .. } => cluster.target(),
        }
    }

    /// The configuration of the run's brokers on this Redis.
    fn config(&self, config: BrokerConfig) -> BrokerConfig {
        match self {
            Self::Server { .. } => config,
            Self::Cluster { .. } => BrokerConfig {
                redis_timeout: CLUSTER_REDIS_TIMEOUT,
                ..config
            },
        }
    }

    /// The node serving `key`'s slot (always 0 on one server), and a connection to it.
    async fn node_of(&self, key: &str) -> (usize, MultiplexedConnection) {
        match self {
            Self::Server { conn, .. } => (0, conn.clone()),
            Self::Cluster { cluster, conns } => {
                let node = cluster.master_of_key(key).await;
                (node, conns[node].clone())
            }
        }
    }

    /// The names of case `case`'s two queues and connections to the servers holding their
    /// keys: `model-<case>-a` and `model-<case>-b`. On a cluster the second name ends in the
    /// first letter from `b` on that puts it on another master than the first, so that every
    /// case spans two shards (the names keep one length: a queue name's length is part of the
    /// reply estimate).
    async fn queues(&self, case: u64) -> ([String; 2], [MultiplexedConnection; 2]) {
        let first = format!("model-{case}-a");
        let (first_node, first_conn) = self.node_of(&format!("{{{first}}}")).await;
        let mut second = None;
        for letter in 'b'..='z' {
            let name = format!("model-{case}-{letter}");
            let (node, conn) = self.node_of(&format!("{{{name}}}")).await;
            if node != first_node || matches!(self, Self::Server { .. }) {
                second = Some((name, conn));
                break;
            }
        }
        let (second, second_conn) =
            second.expect("one of 25 queue names lands on another of three masters");
        ([first, second], [first_conn, second_conn])
    }
}

/// What every case shares: one Redis, two brokers on it that differ only in whether they keep
/// completed items and that leave reaping to a third broker, which no client calls, so that a
/// queue is visited exactly when a step makes its index entry due.
pub(super) struct World {
    store: Store,
    /// The forgetting broker, the keeping broker and the reaping broker.
    brokers: Vec<Broker>,
    /// The configurations of the forgetting and the keeping broker, in that order.
    configs: [BrokerConfig; 2],
    /// Clients of the forgetting and the keeping broker, in that order.
    clients: [Client; 2],
    admin: AdminClient,
    /// A direct connection to the server holding the queue index.
    index_conn: MultiplexedConnection,
    key_prefix: String,
    pub(super) tally: Cell<Tally>,
}

fn model_config(completed_retention: Duration) -> BrokerConfig {
    let config = BrokerConfig {
        default_max_attempts: DEFAULT_MAX_ATTEMPTS,
        backoff_base: BACKOFF_BASE,
        backoff_factor: BACKOFF_FACTOR,
        backoff_cap: BACKOFF_CAP,
        completed_retention,
        max_payload_bytes: PAYLOAD_LIMIT,
        max_header_bytes: HEADER_LIMIT,
        max_reply_bytes: REPLY_BUDGET,
        max_message_bytes: MESSAGE_LIMIT,
        dedup_window: DEDUP_WINDOW,
        dead_max_age: DEAD_MAX_AGE,
        queue_idle_ttl: QUEUE_IDLE_TTL,
        ..test_config()
    };
    // The limits are lowered together: the broker refuses a configuration in which one item of
    // the largest payload and headers could not be leased.
    if let Err(refusal) = config.check() {
        panic!("the model's broker configuration is inconsistent: {refusal}");
    }
    config
}

impl World {
    pub(super) async fn start(deployment: Deployment) -> Self {
        let store = Store::start(deployment).await;
        let configs = [model_config(Duration::ZERO), model_config(KEEP_COMPLETED)].map(|config| {
            store.config(BrokerConfig {
                reap_interval: NO_OWN_REAPER,
                ..config
            })
        });
        let forgetting = Broker::start_on(store.target(), configs[0].clone()).await;
        let keeping = Broker::start_on(store.target(), configs[1].clone()).await;
        // Reaping depends on neither retention: finished ids are kept for the dedup window,
        // which is the longer.
        let reaping =
            Broker::start_on(store.target(), store.config(model_config(Duration::ZERO))).await;
        let clients = [forgetting.client().await, keeping.client().await];
        let admin = forgetting.admin().await;
        let key_prefix = test_config().key_prefix;
        let (_, index_conn) = store.node_of(&keys::queue_index(&key_prefix)).await;
        Self {
            store,
            brokers: vec![forgetting, keeping, reaping],
            configs,
            clients,
            admin,
            index_conn,
            key_prefix,
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
        let (names, conns) = self.store.queues(case).await;
        let mut run = CaseRun {
            client: self.clients[usize::from(keep_completed)].clone(),
            admin: self.admin.clone(),
            conns,
            index_conn: self.index_conn.clone(),
            key_prefix: self.key_prefix.clone(),
            config: self.configs[usize::from(keep_completed)].clone(),
            scripts: Scripts::new(),
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
    /// Enqueues refused whole for a payload over the limit.
    pub(super) oversized: u64,
    /// Leases the reply budget ended before their count or the ready items did.
    pub(super) budget_cut: u64,
    /// Duplicates that were duplicates only because the id finished within the window.
    pub(super) finished_duplicates: u64,
    /// Finished ids whose window was forced to end.
    pub(super) windows_ended: u64,
    /// Ids enqueued again, as new items, after their window ended.
    pub(super) reenqueued: u64,
    /// Dead letters dropped by the age bound.
    pub(super) dropped: u64,
    /// DeleteQueue steps, and those that left the old generation in the trash.
    pub(super) deletes: u64,
    pub(super) trash_left: u64,
    /// Forced idle expiries that forgot the queue, and those that kept it.
    pub(super) idle_forgotten: u64,
    pub(super) idle_kept: u64,
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
        self.oversized += other.oversized;
        self.budget_cut += other.budget_cut;
        self.finished_duplicates += other.finished_duplicates;
        self.windows_ended += other.windows_ended;
        self.reenqueued += other.reenqueued;
        self.dropped += other.dropped;
        self.deletes += other.deletes;
        self.trash_left += other.trash_left;
        self.idle_forgotten += other.idle_forgotten;
        self.idle_kept += other.idle_kept;
    }
}
