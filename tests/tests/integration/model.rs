//! Model-based property test: random sequences of operations run against a real Redis through a
//! real broker over gRPC, and after every step the broker must agree with a small in-memory model
//! of two queues.
//!
//! The operations are Enqueue (ids from a pool of five, so duplicates happen, with priorities,
//! attempt limits and sometimes a delay), Lease (1–3 items), ExtendLease, Complete, Fail (with
//! the broker's backoff, an immediate or a later retry, or dead-lettering), Release, a forced
//! lease expiry and a forced due time (the item's score is moved into the past with a direct
//! Redis command, then either the reaper or an immediate Lease moves it), pause and resume,
//! RequeueDead, and lease ids presented after they were lost or to the other queue. Lease
//! references pick live leases mostly and lost ones sometimes, so fencing is exercised all the
//! time.
//!
//! After every step, for both queues: QueueState's counts, totals and flags equal the model's;
//! the ready set holds exactly the model's ready items in lease order, and the delayed, leased
//! and dead sets and the item hashes hold exactly the model's ids (so no item is lost,
//! duplicated or in two states); only leased items store a lease token, and it is the token of
//! the one lease the model holds; GetItem reports the model's state, attempts, limit, priority,
//! payload, error, result and times; calls with only lost leases, or with a lease id of the other
//! queue, change no byte of the queues' keys.
//!
//! Nothing expires or becomes due by accident: leases last an hour, delays and backoffs are tens
//! of minutes, and only the forcing steps move time. One Redis and two brokers (one forgets
//! completed items, the other keeps them for an hour) serve the whole run, each case on two
//! fresh queues that are deleted when it ends.
//!
//! The default run is bounded for CI: `DEFAULT_CASES` cases of 1 to `DEFAULT_STEPS` steps, about
//! 10–20 s on a busy 2-core machine. A longer run, and the replay of a failure (the seed is
//! printed at the start and with the shrunk sequence; replay with the same cases and steps):
//!
//! ```sh
//! WQ_MODEL_CASES=1000 WQ_MODEL_STEPS=100 cargo test -p wq-tests --test integration model -- --nocapture
//! WQ_MODEL_SEED=<seed> cargo test -p wq-tests --test integration model -- --nocapture
//! ```
//!
//! Not modelled: dead-letter trimming (deaths in the same millisecond tie, so which one goes is
//! not predictable from outside), purging, sealing, `not_before`, headers, waiting Leases,
//! ExtendLease of a lease whose expiry has passed but which is not reclaimed yet (a race with
//! the reaper), and exact enqueue times.

use std::{
    cell::Cell,
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures_util::future::join_all;
use proptest::{
    collection::vec,
    prelude::*,
    test_runner::{Config, RngSeed, TestCaseError, TestCaseResult, TestError, TestRunner},
};
use redis::aio::MultiplexedConnection;
use wq_server::{keys::QueueKeys, lease_id::LeaseId};
use wq_tests::{
    AdminClient, Broker, BrokerConfig, Client, RedisProcess, duration, eventually, get_item, pb,
    redis_conn, state, test_config,
};

/// Cases of the default run: with `DEFAULT_STEPS`, 10–20 s on a busy 2-core machine.
const DEFAULT_CASES: u32 = 48;
/// Most steps per case in the default run (lengths are uniform in 1..=this).
const DEFAULT_STEPS: usize = 50;
/// Longest shrinking of a failure, so a failing CI run still ends.
const MAX_SHRINK_TIME: Duration = Duration::from_secs(300);

/// Item ids come from a pool this small, so duplicates and re-enqueues happen often.
const ID_POOL: usize = 5;
/// What the brokers resolve `max_attempts` 0 to.
const DEFAULT_MAX_ATTEMPTS: u32 = 2;
/// Every lease lasts this long: nothing expires unless a step forces it.
const LEASE_FOR: Duration = Duration::from_secs(3600);
/// ExtendLease asks for a different duration, so an extension is visible in the stored expiry.
const EXTEND_TO: Duration = Duration::from_secs(2 * 3600);
/// Delay of delayed enqueues.
const ENQUEUE_DELAY: Duration = Duration::from_secs(3600);
/// Explicit retry delay of `Retry::Later`.
const RETRY_LATER: Duration = Duration::from_secs(3600);
/// Backoff settings: long enough that a backed-off item never comes due by itself, and growing
/// so that attempt 3 reaches the cap.
const BACKOFF_BASE: Duration = Duration::from_secs(20 * 60);
const BACKOFF_FACTOR: f64 = 2.0;
const BACKOFF_CAP: Duration = Duration::from_secs(3600);
/// Completed-item retention of the broker that keeps completed items.
const KEEP_COMPLETED: Duration = Duration::from_secs(3600);
/// The error text the reaper stores on an item whose lease expired.
const LEASE_EXPIRED: &str = "lease expired";

// ---------------------------------------------------------------------------------------------
// Operations

/// Which of the case's two queues a step acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    First,
    Second,
}

impl Queue {
    fn index(self) -> usize {
        match self {
            Self::First => 0,
            Self::Second => 1,
        }
    }

    fn other(self) -> Self {
        match self {
            Self::First => Self::Second,
            Self::Second => Self::First,
        }
    }
}

/// One item of an Enqueue.
#[derive(Debug, Clone)]
struct NewItem {
    /// Index into the id pool.
    id: usize,
    priority: i32,
    /// 0 asks for the broker's default.
    max_attempts: u32,
    delayed: bool,
}

/// A lease id the step presents, resolved against the model when the step runs: a live lease
/// (or a lost one when `live` is false), or any lease the queue issued when there is none of
/// that kind; the step is skipped when the queue issued none.
/// Indexing modulo the candidates keeps a reference meaningful while proptest shrinks the steps
/// before it.
#[derive(Debug, Clone, Copy)]
struct LeaseRef {
    live: bool,
    index: usize,
}

/// How a Fail asks for its retry.
#[derive(Debug, Clone, Copy)]
enum Retry {
    /// No `retry_delay`: the broker's exponential backoff with jitter.
    Backoff,
    /// `retry_delay` zero: ready again at once.
    Now,
    /// `retry_delay` of `RETRY_LATER`.
    Later,
}

/// What follows a forced expiry or due time. Either way the item moves before anything else
/// is observed, so the model's expectation is the same; only the script that moves it differs.
#[derive(Debug, Clone, Copy)]
enum Then {
    /// Wait until the background reaper has moved the item.
    WaitForReaper,
    /// Lease this many items at once: the Lease script reclaims and promotes before it grants,
    /// unless the reaper got there first.
    LeaseAtOnce(u32),
}

/// The calls that present a lease id.
#[derive(Debug, Clone, Copy)]
enum LeaseCall {
    Extend,
    Complete,
    Fail,
    Release,
}

/// One step of a case.
#[derive(Debug, Clone)]
enum Op {
    Enqueue {
        queue: Queue,
        items: Vec<NewItem>,
    },
    Lease {
        queue: Queue,
        max_items: u32,
    },
    ExtendLease {
        queue: Queue,
        leases: Vec<LeaseRef>,
    },
    Complete {
        queue: Queue,
        leases: Vec<LeaseRef>,
    },
    Fail {
        queue: Queue,
        lease: LeaseRef,
        retry: Retry,
        dead_letter: bool,
    },
    Release {
        queue: Queue,
        leases: Vec<LeaseRef>,
    },
    /// Moves a leased item's expiry into the past; the reaper or a Lease reclaims it.
    ExpireLease {
        queue: Queue,
        pick: usize,
        then: Then,
    },
    /// Moves a delayed item's due time into the past; the reaper or a Lease promotes it.
    MakeDue {
        queue: Queue,
        pick: usize,
        then: Then,
    },
    /// Presents a lease id of `owner` to the other queue.
    WrongQueue {
        owner: Queue,
        lease: LeaseRef,
        call: LeaseCall,
    },
    SetPaused {
        queue: Queue,
        paused: bool,
    },
    /// RequeueDead of these pool ids (dead or not), or of all dead letters when None.
    RequeueDead {
        queue: Queue,
        ids: Option<Vec<usize>>,
    },
}

fn queue_strategy() -> impl Strategy<Value = Queue> {
    // The second queue is there to catch leaks between queues; most work goes to the first.
    prop_oneof![4 => Just(Queue::First), 1 => Just(Queue::Second)]
}

fn lease_ref_strategy() -> impl Strategy<Value = LeaseRef> {
    (prop::bool::weighted(0.75), 0..8usize).prop_map(|(live, index)| LeaseRef { live, index })
}

fn lease_refs_strategy() -> impl Strategy<Value = Vec<LeaseRef>> {
    vec(lease_ref_strategy(), 1..=2)
}

fn then_strategy() -> impl Strategy<Value = Then> {
    prop_oneof![
        Just(Then::WaitForReaper),
        (1..=3u32).prop_map(Then::LeaseAtOnce),
    ]
}

fn new_item_strategy() -> impl Strategy<Value = NewItem> {
    (0..ID_POOL, -1..=1i32, 0..=4u32, prop::bool::weighted(0.2)).prop_map(
        |(id, priority, max_attempts, delayed)| NewItem {
            id,
            priority,
            max_attempts,
            delayed,
        },
    )
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let retry = prop_oneof![Just(Retry::Backoff), Just(Retry::Now), Just(Retry::Later)];
    let call = prop_oneof![
        Just(LeaseCall::Extend),
        Just(LeaseCall::Complete),
        Just(LeaseCall::Fail),
        Just(LeaseCall::Release),
    ];
    let requeued = prop_oneof![1 => Just(None), 3 => vec(0..ID_POOL, 1..=2).prop_map(Some)];
    prop_oneof![
        5 => (queue_strategy(), vec(new_item_strategy(), 1..=3))
            .prop_map(|(queue, items)| Op::Enqueue { queue, items }),
        6 => (queue_strategy(), 1..=3u32)
            .prop_map(|(queue, max_items)| Op::Lease { queue, max_items }),
        1 => (queue_strategy(), lease_refs_strategy())
            .prop_map(|(queue, leases)| Op::ExtendLease { queue, leases }),
        3 => (queue_strategy(), lease_refs_strategy())
            .prop_map(|(queue, leases)| Op::Complete { queue, leases }),
        4 => (queue_strategy(), lease_ref_strategy(), retry, prop::bool::weighted(0.2)).prop_map(
            |(queue, lease, retry, dead_letter)| Op::Fail { queue, lease, retry, dead_letter }
        ),
        2 => (queue_strategy(), lease_refs_strategy())
            .prop_map(|(queue, leases)| Op::Release { queue, leases }),
        2 => (queue_strategy(), 0..8usize, then_strategy())
            .prop_map(|(queue, pick, then)| Op::ExpireLease { queue, pick, then }),
        1 => (queue_strategy(), 0..8usize, then_strategy())
            .prop_map(|(queue, pick, then)| Op::MakeDue { queue, pick, then }),
        1 => (queue_strategy(), lease_ref_strategy(), call)
            .prop_map(|(owner, lease, call)| Op::WrongQueue { owner, lease, call }),
        // Mostly resumes, so a queue once paused is not paused for the rest of the case.
        1 => (queue_strategy(), prop::bool::weighted(0.3))
            .prop_map(|(queue, paused)| Op::SetPaused { queue, paused }),
        1 => (queue_strategy(), requeued).prop_map(|(queue, ids)| Op::RequeueDead { queue, ids }),
    ]
}

// ---------------------------------------------------------------------------------------------
// The model

/// Where the model expects an item.
#[derive(Debug, Clone, PartialEq)]
enum Slot {
    Ready,
    /// Due within `[earliest, latest]` (Unix ms): exact after a Fail, which reports it; bounded
    /// by the local clock around an Enqueue, which does not, until the first check reads it.
    Delayed {
        earliest: i64,
        latest: i64,
    },
    Leased {
        lease_id: String,
        expire_ms: i64,
    },
    Dead,
    /// Completed and kept by the broker's retention.
    Completed {
        result: Vec<u8>,
    },
}

impl Slot {
    fn api_state(&self) -> pb::ItemState {
        match self {
            Self::Ready => pb::ItemState::Ready,
            Self::Delayed { .. } => pb::ItemState::Delayed,
            Self::Leased { .. } => pb::ItemState::Leased,
            Self::Dead => pb::ItemState::Dead,
            Self::Completed { .. } => pb::ItemState::Completed,
        }
    }
}

#[derive(Debug, Clone)]
struct ItemModel {
    payload: String,
    priority: i32,
    max_attempts: u32,
    /// The queue's enqueue sequence number: the item's place in line among equal priorities,
    /// kept across release, retry and reclaim.
    seq: u64,
    /// Attempts that ended (Fail or expiry).
    attempts: u32,
    last_error: String,
    slot: Slot,
}

/// A lease the broker granted, live or not.
#[derive(Debug, Clone)]
struct Issued {
    lease_id: String,
    item_id: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    enqueued: u64,
    completed: u64,
    failed: u64,
    reclaimed: u64,
}

/// What the run exercised, summed over all cases, so a passing run shows it did not pass by
/// skipping: steps whose lease reference or pick found nothing are counted as skipped.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    steps: u64,
    skipped: u64,
    duplicates: u64,
    granted: u64,
    completed: u64,
    failed: u64,
    dead: u64,
    reclaimed: u64,
    promoted: u64,
    requeued: u64,
    /// LEASE_LOST answers to lease ids the model knew to be lost.
    lost: u64,
    /// INVALID_ARGUMENT answers to lease ids of the other queue.
    wrong_queue: u64,
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

/// What one queue should hold.
#[derive(Debug)]
struct QueueModel {
    name: String,
    keys: QueueKeys,
    /// Stored items by id (completed ones only while the broker keeps them).
    items: BTreeMap<String, ItemModel>,
    /// The last enqueue sequence number handed out.
    seq: u64,
    paused: bool,
    issued: Vec<Issued>,
    totals: Totals,
}

impl QueueModel {
    fn new(name: String, key_prefix: &str) -> Self {
        Self {
            keys: QueueKeys::new(key_prefix, &name),
            name,
            items: BTreeMap::new(),
            seq: 0,
            paused: false,
            issued: Vec::new(),
            totals: Totals::default(),
        }
    }

    fn is_live(&self, lease_id: &str) -> bool {
        self.holder_of(lease_id).is_some()
    }

    /// The id of the item `lease_id` holds, if the lease is live.
    fn holder_of(&self, lease_id: &str) -> Option<String> {
        let issued = self.issued.iter().find(|l| l.lease_id == lease_id)?;
        let item = self.items.get(&issued.item_id)?;
        match &item.slot {
            Slot::Leased { lease_id: live, .. } if live == lease_id => Some(issued.item_id.clone()),
            _ => None,
        }
    }

    fn resolve(&self, reference: LeaseRef) -> Option<String> {
        let (live, lost): (Vec<&Issued>, Vec<&Issued>) =
            self.issued.iter().partition(|l| self.is_live(&l.lease_id));
        let preferred = if reference.live { live } else { lost };
        let candidates: Vec<&Issued> = if preferred.is_empty() {
            self.issued.iter().collect()
        } else {
            preferred
        };
        let chosen = candidates.get(reference.index % candidates.len().max(1))?;
        Some(chosen.lease_id.clone())
    }

    /// Resolves every reference, or None when the queue never issued a lease.
    fn resolve_all(&self, references: &[LeaseRef]) -> Option<Vec<String>> {
        references.iter().map(|r| self.resolve(*r)).collect()
    }

    fn ids_in(&self, wanted: impl Fn(&Slot) -> bool) -> Vec<String> {
        self.items
            .iter()
            .filter(|(_, item)| wanted(&item.slot))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Ready ids in the order Lease grants them: highest priority first, then enqueue order.
    fn ready_in_lease_order(&self) -> Vec<(String, &ItemModel)> {
        let mut ready: Vec<(String, &ItemModel)> = self
            .items
            .iter()
            .filter(|(_, item)| item.slot == Slot::Ready)
            .map(|(id, item)| (id.clone(), item))
            .collect();
        ready.sort_by_key(|(_, item)| (-item.priority, item.seq));
        ready
    }

    fn count(&self, wanted: impl Fn(&Slot) -> bool) -> u64 {
        self.items.values().filter(|i| wanted(&i.slot)).count() as u64
    }

    fn drained(&self) -> bool {
        self.count(|s| matches!(s, Slot::Ready | Slot::Delayed { .. } | Slot::Leased { .. })) == 0
    }

    fn item_mut(&mut self, id: &str) -> Result<&mut ItemModel, TestCaseError> {
        self.items
            .get_mut(id)
            .ok_or_else(|| failure(format!("the model lost track of {id}")))
    }

    /// An attempt ended without success (Fail or expiry): counts it and says whether the item
    /// has attempts left.
    fn end_attempt(&mut self, id: &str, error: &str) -> Result<bool, TestCaseError> {
        let item = self.item_mut(id)?;
        item.attempts += 1;
        item.last_error = error.to_owned();
        Ok(item.attempts < item.max_attempts)
    }
}

// ---------------------------------------------------------------------------------------------
// The run

/// What every case shares: one Redis and two brokers on it that differ only in whether they keep
/// completed items.
struct World {
    _redis: RedisProcess,
    brokers: Vec<Broker>,
    /// Clients of the forgetting and the keeping broker, in that order.
    clients: [Client; 2],
    admin: AdminClient,
    conn: MultiplexedConnection,
    key_prefix: String,
    tally: Cell<Tally>,
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
    async fn start() -> Self {
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

    async fn stop(self) {
        for broker in self.brokers {
            broker.stop().await;
        }
    }

    async fn run_case(&self, case: u64, keep_completed: bool, ops: &[Op]) -> TestCaseResult {
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

/// One case: the model of its two queues and the connections that drive the broker.
struct CaseRun {
    client: Client,
    admin: AdminClient,
    conn: MultiplexedConnection,
    key_prefix: String,
    keep_completed: bool,
    queues: [QueueModel; 2],
    tally: Tally,
}

fn failure(message: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(message.into())
}

fn rpc_failed(call: &'static str) -> impl FnOnce(tonic::Status) -> TestCaseError {
    move |status| failure(format!("{call} failed: {status:?}"))
}

fn with_context(context: String) -> impl FnOnce(TestCaseError) -> TestCaseError {
    move |error| match error {
        TestCaseError::Fail(reason) => failure(format!("{context}: {}", reason.message())),
        reject @ TestCaseError::Reject(_) => reject,
    }
}

fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    i64::try_from(since_epoch.as_millis()).expect("milliseconds since 1970 fit in i64")
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).expect("test durations fit in i64 milliseconds")
}

fn ms_of(time: Option<&prost_types::Timestamp>) -> Option<i64> {
    time.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn pool_id(index: usize) -> String {
    format!("item-{index}")
}

fn outcome(live: bool) -> pb::LeaseOutcome {
    if live {
        pb::LeaseOutcome::Ok
    } else {
        pb::LeaseOutcome::LeaseLost
    }
}

/// Every key of one queue with its serialized value, to show that a call changed nothing.
async fn queue_dump(
    conn: &mut MultiplexedConnection,
    key_prefix: &str,
    queue: &str,
) -> Vec<(String, Vec<u8>)> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{key_prefix}:{{{queue}}}:*"))
        .query_async(conn)
        .await
        .expect("KEYS of the queue");
    keys.sort();
    let mut dump = Vec::with_capacity(keys.len());
    for key in keys {
        let value: Vec<u8> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(conn)
            .await
            .expect("DUMP of a queue key");
        dump.push((key, value));
    }
    dump
}

impl CaseRun {
    async fn run(&mut self, ops: &[Op]) -> TestCaseResult {
        self.check()
            .await
            .map_err(with_context("before the first step".into()))?;
        for (step, op) in ops.iter().enumerate() {
            self.tally.steps += 1;
            let skipped_before = self.tally.skipped;
            self.apply(step, op)
                .await
                .map_err(with_context(format!("step {step} {op:?}")))?;
            if self.tally.skipped > skipped_before {
                // The step found nothing to act on and sent nothing: there is nothing new to check.
                continue;
            }
            self.check()
                .await
                .map_err(with_context(format!("after step {step} {op:?}")))?;
        }
        Ok(())
    }

    async fn apply(&mut self, step: usize, op: &Op) -> TestCaseResult {
        match op {
            Op::Enqueue { queue, items } => self.enqueue(step, *queue, items).await,
            Op::Lease { queue, max_items } => self.lease(*queue, *max_items).await,
            Op::ExtendLease { queue, leases } => self.extend(*queue, leases).await,
            Op::Complete { queue, leases } => self.complete(*queue, leases).await,
            Op::Fail {
                queue,
                lease,
                retry,
                dead_letter,
            } => self.fail(step, *queue, *lease, *retry, *dead_letter).await,
            Op::Release { queue, leases } => self.release(*queue, leases).await,
            Op::ExpireLease { queue, pick, then } => self.expire_lease(*queue, *pick, *then).await,
            Op::MakeDue { queue, pick, then } => self.make_due(*queue, *pick, *then).await,
            Op::WrongQueue { owner, lease, call } => self.wrong_queue(*owner, *lease, *call).await,
            Op::SetPaused { queue, paused } => self.set_paused(*queue, *paused).await,
            Op::RequeueDead { queue, ids } => self.requeue_dead(*queue, ids.as_deref()).await,
        }
    }

    async fn dump(&mut self, queue: Queue) -> Vec<(String, Vec<u8>)> {
        let name = self.queues[queue.index()].name.clone();
        queue_dump(&mut self.conn, &self.key_prefix, &name).await
    }

    async fn enqueue(&mut self, step: usize, queue: Queue, items: &[NewItem]) -> TestCaseResult {
        let model = &mut self.queues[queue.index()];
        let sent: Vec<pb::EnqueueItem> = items
            .iter()
            .enumerate()
            .map(|(position, spec)| pb::EnqueueItem {
                id: pool_id(spec.id),
                payload: format!("{} of step {step}.{position}", pool_id(spec.id))
                    .into_bytes()
                    .into(),
                priority: spec.priority,
                max_attempts: spec.max_attempts,
                delay: spec.delayed.then(|| duration(ENQUEUE_DELAY)),
                ..pb::EnqueueItem::default()
            })
            .collect();
        let before = now_ms();
        let reply = self
            .client
            .enqueue(pb::EnqueueRequest {
                queue: model.name.clone(),
                items: sent.clone(),
            })
            .await
            .map_err(rpc_failed("Enqueue"))?
            .into_inner();
        let after = now_ms();
        prop_assert_eq!(reply.results.len(), sent.len());
        for ((spec, item), result) in items.iter().zip(&sent).zip(&reply.results) {
            // Within one batch a repeated id is a duplicate of the copy added just before.
            let duplicate = model.items.contains_key(&item.id);
            prop_assert_eq!(&result.id, &item.id);
            prop_assert_eq!(
                result.duplicate,
                duplicate,
                "duplicate flag of {}",
                &item.id
            );
            if duplicate {
                self.tally.duplicates += 1;
                continue;
            }
            model.seq += 1;
            model.totals.enqueued += 1;
            let delay = millis(ENQUEUE_DELAY);
            model.items.insert(
                item.id.clone(),
                ItemModel {
                    payload: String::from_utf8_lossy(&item.payload).into_owned(),
                    priority: spec.priority,
                    max_attempts: if spec.max_attempts == 0 {
                        DEFAULT_MAX_ATTEMPTS
                    } else {
                        spec.max_attempts
                    },
                    seq: model.seq,
                    attempts: 0,
                    last_error: String::new(),
                    slot: if spec.delayed {
                        Slot::Delayed {
                            earliest: before + delay,
                            latest: after + delay,
                        }
                    } else {
                        Slot::Ready
                    },
                },
            );
        }
        Ok(())
    }

    async fn lease(&mut self, queue: Queue, max_items: u32) -> TestCaseResult {
        let model = &mut self.queues[queue.index()];
        let expected: Vec<String> = if model.paused {
            Vec::new()
        } else {
            model
                .ready_in_lease_order()
                .into_iter()
                .take(max_items as usize)
                .map(|(id, _)| id)
                .collect()
        };
        let reply = self
            .client
            .lease(pb::LeaseRequest {
                queue: model.name.clone(),
                max_items,
                lease_duration: Some(duration(LEASE_FOR)),
                worker_id: "model".into(),
                ..pb::LeaseRequest::default()
            })
            .await
            .map_err(rpc_failed("Lease"))?
            .into_inner();
        let granted: Vec<&str> = reply.items.iter().map(|i| i.id.as_str()).collect();
        prop_assert_eq!(
            &granted,
            &expected,
            "Lease grants the highest-priority, longest-waiting ready items (paused: {})",
            model.paused
        );
        for leased in &reply.items {
            prop_assert!(
                !model.issued.iter().any(|l| l.lease_id == leased.lease_id),
                "every grant has a fresh lease id: {} was issued before",
                &leased.lease_id
            );
            let expire_ms = ms_of(leased.lease_expire_time.as_ref())
                .ok_or_else(|| failure("a leased item has no lease_expire_time"))?;
            let item = model.item_mut(&leased.id)?;
            prop_assert_eq!(
                leased.attempt,
                item.attempts + 1,
                "attempt of {}",
                &leased.id
            );
            prop_assert_eq!(leased.max_attempts, item.max_attempts);
            prop_assert_eq!(leased.priority, item.priority);
            prop_assert_eq!(leased.payload.as_ref(), item.payload.as_bytes());
            item.slot = Slot::Leased {
                lease_id: leased.lease_id.clone(),
                expire_ms,
            };
            model.issued.push(Issued {
                lease_id: leased.lease_id.clone(),
                item_id: leased.id.clone(),
            });
        }
        prop_assert_eq!(reply.drained, model.drained(), "drained after Lease");
        self.tally.granted += reply.items.len() as u64;
        Ok(())
    }

    async fn extend(&mut self, queue: Queue, leases: &[LeaseRef]) -> TestCaseResult {
        let Some(lease_ids) = self.queues[queue.index()].resolve_all(leases) else {
            self.tally.skipped += 1;
            return Ok(());
        };
        let live: Vec<bool> = {
            let model = &self.queues[queue.index()];
            lease_ids.iter().map(|l| model.is_live(l)).collect()
        };
        let before = self.unchanged_baseline(queue, &live).await;
        let reply = self
            .client
            .extend_lease(pb::ExtendLeaseRequest {
                queue: self.queues[queue.index()].name.clone(),
                lease_ids: lease_ids.clone(),
                lease_duration: Some(duration(EXTEND_TO)),
            })
            .await
            .map_err(rpc_failed("ExtendLease"))?
            .into_inner();
        prop_assert_eq!(reply.results.len(), lease_ids.len());
        let model = &mut self.queues[queue.index()];
        for ((lease_id, &live), result) in lease_ids.iter().zip(&live).zip(&reply.results) {
            prop_assert_eq!(&result.lease_id, lease_id);
            prop_assert_eq!(
                result.outcome(),
                outcome(live),
                "ExtendLease of {}",
                lease_id
            );
            let new_expiry = ms_of(result.lease_expire_time.as_ref());
            if !live {
                prop_assert!(new_expiry.is_none(), "a lost lease reports no expiry");
                continue;
            }
            let new_expiry =
                new_expiry.ok_or_else(|| failure("an extended lease reports no expiry"))?;
            let id = model
                .holder_of(lease_id)
                .ok_or_else(|| failure("a live lease without holder"))?;
            model.item_mut(&id)?.slot = Slot::Leased {
                lease_id: lease_id.clone(),
                expire_ms: new_expiry,
            };
        }
        self.tally.lost += live.iter().filter(|l| !**l).count() as u64;
        self.check_unchanged(queue, before).await
    }

    async fn complete(&mut self, queue: Queue, leases: &[LeaseRef]) -> TestCaseResult {
        let keep_completed = self.keep_completed;
        let model = &mut self.queues[queue.index()];
        let Some(lease_ids) = model.resolve_all(leases) else {
            self.tally.skipped += 1;
            return Ok(());
        };
        // Completions take effect in request order: a lease given twice completes once.
        let mut live = Vec::with_capacity(lease_ids.len());
        for lease_id in &lease_ids {
            let holder = model.holder_of(lease_id);
            live.push(holder.is_some());
            if let Some(id) = holder {
                model.totals.completed += 1;
                self.tally.completed += 1;
                if keep_completed {
                    model.item_mut(&id)?.slot = Slot::Completed {
                        result: result_of(&id),
                    };
                } else {
                    model.items.remove(&id);
                }
            }
        }
        let before = self.unchanged_baseline(queue, &live).await;
        let completions = lease_ids
            .iter()
            .map(|lease_id| {
                let id = LeaseId::decode(lease_id)
                    .map(|l| l.item_id)
                    .unwrap_or_default();
                pb::Completion {
                    lease_id: lease_id.clone(),
                    result: result_of(&id).into(),
                }
            })
            .collect();
        let reply = self
            .client
            .complete(pb::CompleteRequest {
                queue: self.queues[queue.index()].name.clone(),
                completions,
            })
            .await
            .map_err(rpc_failed("Complete"))?
            .into_inner();
        let outcomes: Vec<pb::LeaseOutcome> = reply.results.iter().map(|r| r.outcome()).collect();
        let expected: Vec<pb::LeaseOutcome> = live.iter().map(|&l| outcome(l)).collect();
        prop_assert_eq!(outcomes, expected, "Complete outcomes of {:?}", &lease_ids);
        self.tally.lost += live.iter().filter(|l| !**l).count() as u64;
        self.check_unchanged(queue, before).await
    }

    async fn fail(
        &mut self,
        step: usize,
        queue: Queue,
        reference: LeaseRef,
        retry: Retry,
        dead_letter: bool,
    ) -> TestCaseResult {
        let Some(lease_id) = self.queues[queue.index()].resolve(reference) else {
            self.tally.skipped += 1;
            return Ok(());
        };
        let holder = self.queues[queue.index()].holder_of(&lease_id);
        let before_dump = self.unchanged_baseline(queue, &[holder.is_some()]).await;
        let error = format!("failed in step {step}");
        let before = now_ms();
        let reply = self
            .client
            .fail(pb::FailRequest {
                queue: self.queues[queue.index()].name.clone(),
                lease_id: lease_id.clone(),
                error: error.clone(),
                retry_delay: match retry {
                    Retry::Backoff => None,
                    Retry::Now => Some(duration(Duration::ZERO)),
                    Retry::Later => Some(duration(RETRY_LATER)),
                },
                dead_letter,
            })
            .await
            .map_err(rpc_failed("Fail"))?
            .into_inner();
        let after = now_ms();
        let result = reply
            .result
            .as_ref()
            .ok_or_else(|| failure("FailResponse without result"))?;
        prop_assert_eq!(&result.lease_id, &lease_id);
        let next_attempt = ms_of(reply.next_attempt_time.as_ref());
        let Some(id) = holder else {
            prop_assert_eq!(result.outcome(), pb::LeaseOutcome::LeaseLost);
            prop_assert_eq!(reply.state(), pb::ItemState::Unspecified);
            prop_assert_eq!(next_attempt, None);
            self.tally.lost += 1;
            return self.check_unchanged(queue, before_dump).await;
        };
        prop_assert_eq!(result.outcome(), pb::LeaseOutcome::Ok);
        let model = &mut self.queues[queue.index()];
        model.totals.failed += 1;
        self.tally.failed += 1;
        let attempts_left = model.end_attempt(&id, &error)?;
        let attempts = model.item_mut(&id)?.attempts;
        let slot = if dead_letter || !attempts_left {
            prop_assert_eq!(
                reply.state(),
                pb::ItemState::Dead,
                "{} is out of attempts",
                &id
            );
            prop_assert_eq!(next_attempt, None);
            self.tally.dead += 1;
            Slot::Dead
        } else {
            // The span the retry may be due in: the backoff step is base * factor^(attempts-1),
            // capped, and equal jitter puts the delay in [step/2, step).
            let (shortest, longest) = match retry {
                Retry::Now => (0, 0),
                Retry::Later => (millis(RETRY_LATER), millis(RETRY_LATER)),
                Retry::Backoff => {
                    let step = (BACKOFF_BASE.as_secs_f64()
                        * BACKOFF_FACTOR.powi(i32::try_from(attempts).unwrap_or(i32::MAX) - 1))
                    .min(BACKOFF_CAP.as_secs_f64());
                    let step_ms = millis(Duration::from_secs_f64(step));
                    (step_ms / 2, step_ms)
                }
            };
            if longest == 0 {
                prop_assert_eq!(reply.state(), pb::ItemState::Ready);
                prop_assert_eq!(next_attempt, None);
                Slot::Ready
            } else {
                prop_assert_eq!(reply.state(), pb::ItemState::Delayed);
                let due = next_attempt.ok_or_else(|| failure("a delayed retry has no time"))?;
                prop_assert!(
                    before + shortest <= due && due <= after + longest,
                    "retry of {} (attempt {}, {:?}) due {} ms after the call, expected {}..={}",
                    &id,
                    attempts,
                    retry,
                    due - before,
                    shortest,
                    longest + (after - before)
                );
                Slot::Delayed {
                    earliest: due,
                    latest: due,
                }
            }
        };
        model.item_mut(&id)?.slot = slot;
        Ok(())
    }

    async fn release(&mut self, queue: Queue, leases: &[LeaseRef]) -> TestCaseResult {
        let model = &mut self.queues[queue.index()];
        let Some(lease_ids) = model.resolve_all(leases) else {
            self.tally.skipped += 1;
            return Ok(());
        };
        // Releases take effect in request order: a lease given twice is released once.
        let mut live = Vec::with_capacity(lease_ids.len());
        for lease_id in &lease_ids {
            let holder = model.holder_of(lease_id);
            live.push(holder.is_some());
            if let Some(id) = holder {
                model.item_mut(&id)?.slot = Slot::Ready;
            }
        }
        let before = self.unchanged_baseline(queue, &live).await;
        let reply = self
            .client
            .release(pb::ReleaseRequest {
                queue: self.queues[queue.index()].name.clone(),
                lease_ids: lease_ids.clone(),
            })
            .await
            .map_err(rpc_failed("Release"))?
            .into_inner();
        let outcomes: Vec<pb::LeaseOutcome> = reply.results.iter().map(|r| r.outcome()).collect();
        let expected: Vec<pb::LeaseOutcome> = live.iter().map(|&l| outcome(l)).collect();
        prop_assert_eq!(outcomes, expected, "Release outcomes of {:?}", &lease_ids);
        self.tally.lost += live.iter().filter(|l| !**l).count() as u64;
        self.check_unchanged(queue, before).await
    }

    async fn expire_lease(&mut self, queue: Queue, pick: usize, then: Then) -> TestCaseResult {
        let model = &self.queues[queue.index()];
        let leased = model.ids_in(|s| matches!(s, Slot::Leased { .. }));
        let Some(id) = leased.get(pick % leased.len().max(1)).cloned() else {
            self.tally.skipped += 1;
            return Ok(());
        };
        let set = model.keys.leased.clone();
        self.force_past(&set, &id, then, "reclaims the expired lease of")
            .await;
        self.tally.reclaimed += 1;
        let model = &mut self.queues[queue.index()];
        model.totals.reclaimed += 1;
        let attempts_left = model.end_attempt(&id, LEASE_EXPIRED)?;
        model.item_mut(&id)?.slot = if attempts_left {
            Slot::Ready
        } else {
            self.tally.dead += 1;
            Slot::Dead
        };
        self.lease_at_once(queue, then).await
    }

    async fn make_due(&mut self, queue: Queue, pick: usize, then: Then) -> TestCaseResult {
        let model = &self.queues[queue.index()];
        let delayed = model.ids_in(|s| matches!(s, Slot::Delayed { .. }));
        let Some(id) = delayed.get(pick % delayed.len().max(1)).cloned() else {
            self.tally.skipped += 1;
            return Ok(());
        };
        let set = model.keys.delayed.clone();
        self.force_past(&set, &id, then, "promotes the due item")
            .await;
        self.tally.promoted += 1;
        self.queues[queue.index()].item_mut(&id)?.slot = Slot::Ready;
        self.lease_at_once(queue, then).await
    }

    async fn lease_at_once(&mut self, queue: Queue, then: Then) -> TestCaseResult {
        match then {
            Then::WaitForReaper => Ok(()),
            Then::LeaseAtOnce(max_items) => self.lease(queue, max_items).await,
        }
    }

    /// Moves `id`'s score in the time-scored set `set` to 1 ms after the epoch, as if its time had
    /// come long ago; with `Then::WaitForReaper`, waits until the broker's reaper has taken it out
    /// of the set.
    async fn force_past(&mut self, set: &str, id: &str, then: Then, what: &str) {
        let changed: i64 = redis::cmd("ZADD")
            .arg(set)
            .arg("XX")
            .arg("CH")
            .arg(1)
            .arg(id)
            .query_async(&mut self.conn)
            .await
            .expect("ZADD XX CH");
        assert_eq!(changed, 1, "{id} was in {set} with a future score");
        if let Then::LeaseAtOnce(_) = then {
            return;
        }
        let mut conn = self.conn.clone();
        eventually(&format!("the reaper {what} {id} ({set})"), async || {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(set)
                .arg(id)
                .query_async(&mut conn)
                .await
                .expect("ZSCORE");
            score.is_none()
        })
        .await;
    }

    async fn wrong_queue(
        &mut self,
        owner: Queue,
        reference: LeaseRef,
        call: LeaseCall,
    ) -> TestCaseResult {
        let Some(lease_id) = self.queues[owner.index()].resolve(reference) else {
            self.tally.skipped += 1;
            return Ok(());
        };
        let target = self.queues[owner.other().index()].name.clone();
        let before = (self.dump(owner).await, self.dump(owner.other()).await);
        let status = match call {
            LeaseCall::Extend => self
                .client
                .extend_lease(pb::ExtendLeaseRequest {
                    queue: target,
                    lease_ids: vec![lease_id],
                    lease_duration: Some(duration(EXTEND_TO)),
                })
                .await
                .err(),
            LeaseCall::Complete => self
                .client
                .complete(pb::CompleteRequest {
                    queue: target,
                    completions: vec![pb::Completion {
                        lease_id,
                        result: Default::default(),
                    }],
                })
                .await
                .err(),
            LeaseCall::Fail => self
                .client
                .fail(pb::FailRequest {
                    queue: target,
                    lease_id,
                    error: "presented to the wrong queue".into(),
                    retry_delay: None,
                    dead_letter: true,
                })
                .await
                .err(),
            LeaseCall::Release => self
                .client
                .release(pb::ReleaseRequest {
                    queue: target,
                    lease_ids: vec![lease_id],
                })
                .await
                .err(),
        };
        let code = status.map(|s| s.code());
        prop_assert_eq!(
            code,
            Some(tonic::Code::InvalidArgument),
            "a lease id of another queue is INVALID_ARGUMENT"
        );
        let after = (self.dump(owner).await, self.dump(owner.other()).await);
        prop_assert!(before == after, "a rejected call changed a queue");
        self.tally.wrong_queue += 1;
        Ok(())
    }

    async fn set_paused(&mut self, queue: Queue, paused: bool) -> TestCaseResult {
        let name = self.queues[queue.index()].name.clone();
        if paused {
            self.admin
                .pause_queue(pb::PauseQueueRequest { queue: name })
                .await
                .map_err(rpc_failed("PauseQueue"))?;
        } else {
            self.admin
                .resume_queue(pb::ResumeQueueRequest { queue: name })
                .await
                .map_err(rpc_failed("ResumeQueue"))?;
        }
        self.queues[queue.index()].paused = paused;
        Ok(())
    }

    async fn requeue_dead(&mut self, queue: Queue, ids: Option<&[usize]>) -> TestCaseResult {
        let model = &mut self.queues[queue.index()];
        let named: Vec<String> = ids
            .unwrap_or_default()
            .iter()
            .map(|&i| pool_id(i))
            .collect();
        let candidates = if ids.is_some() {
            named.clone()
        } else {
            model.ids_in(|s| *s == Slot::Dead)
        };
        // Requeued items start over: no attempts, no error, ready in their old place in line.
        // Named ids that are not dead letters (or named twice) are skipped.
        let mut requeued = 0;
        for id in &candidates {
            if let Some(item) = model.items.get_mut(id)
                && item.slot == Slot::Dead
            {
                item.attempts = 0;
                item.last_error.clear();
                item.slot = Slot::Ready;
                requeued += 1;
            }
        }
        let reply = self
            .admin
            .requeue_dead(pb::RequeueDeadRequest {
                queue: model.name.clone(),
                ids: named,
                all: ids.is_none(),
            })
            .await
            .map_err(rpc_failed("RequeueDead"))?
            .into_inner();
        prop_assert_eq!(
            reply.requeued_count,
            requeued,
            "requeued of {:?}",
            &candidates
        );
        self.tally.requeued += requeued;
        Ok(())
    }

    /// A dump of the queue when no lease of the call is live (so it must change nothing).
    async fn unchanged_baseline(
        &mut self,
        queue: Queue,
        live: &[bool],
    ) -> Option<Vec<(String, Vec<u8>)>> {
        if live.iter().any(|&l| l) {
            return None;
        }
        Some(self.dump(queue).await)
    }

    async fn check_unchanged(
        &mut self,
        queue: Queue,
        before: Option<Vec<(String, Vec<u8>)>>,
    ) -> TestCaseResult {
        if let Some(before) = before {
            let after = self.dump(queue).await;
            prop_assert!(
                before == after,
                "a call with only lost leases changed the queue's keys"
            );
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Invariants

    async fn check(&mut self) -> TestCaseResult {
        // Nothing changes between the reads (no step runs and nothing is due), so both queues
        // are read at once to keep steps cheap.
        let [first, second] = &self.queues;
        let (first_seen, second_seen) = tokio::join!(
            observe(&self.client, &self.conn, first),
            observe(&self.client, &self.conn, second),
        );
        for (model, seen) in self.queues.iter_mut().zip([first_seen, second_seen]) {
            let name = model.name.clone();
            check_counts(model, &seen.state)
                .map_err(with_context(format!("QueueState of {name}")))?;
            check_storage(model, &seen).map_err(with_context(format!("storage of {name}")))?;
            check_items(model, seen.items).map_err(with_context(format!("GetItem in {name}")))?;
        }
        Ok(())
    }
}

type Scored = Vec<(String, f64)>;

/// What the broker and Redis show of one queue at one moment.
struct Observed {
    state: pb::QueueStateResponse,
    ready: Scored,
    delayed: Scored,
    leased: Scored,
    dead: Vec<String>,
    item_keys: Vec<String>,
    /// The stored lease token of each pool id, in pool order.
    tokens: Vec<Option<String>>,
    /// GetItem of each pool id, in pool order.
    items: Vec<Result<pb::Item, tonic::Status>>,
}

async fn observe(client: &Client, conn: &MultiplexedConnection, model: &QueueModel) -> Observed {
    let k = &model.keys;
    let mut sets_conn = conn.clone();
    let sets = async move {
        let sets: (Scored, Scored, Scored, Vec<String>, Vec<String>) = redis::pipe()
            .cmd("ZRANGE")
            .arg(&k.ready)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("ZRANGE")
            .arg(&k.delayed)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("ZRANGE")
            .arg(&k.leased)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("ZRANGE")
            .arg(&k.dead)
            .arg(0)
            .arg(-1)
            .cmd("KEYS")
            .arg(format!("{}*", k.item_prefix))
            .query_async(&mut sets_conn)
            .await
            .expect("reading the queue's sets");
        sets
    };
    let mut tokens_conn = conn.clone();
    let tokens = async move {
        let mut pipe = redis::pipe();
        for id in (0..ID_POOL).map(pool_id) {
            pipe.cmd("HGET").arg(k.item(&id)).arg("k");
        }
        let tokens: Vec<Option<String>> = pipe
            .query_async(&mut tokens_conn)
            .await
            .expect("reading the stored lease tokens");
        tokens
    };
    let mut state_client = client.clone();
    let items = join_all((0..ID_POOL).map(|index| {
        let mut client = client.clone();
        async move { get_item(&mut client, &model.name, &pool_id(index)).await }
    }));
    let (state, (ready, delayed, leased, dead, item_keys), tokens, items) =
        tokio::join!(state(&mut state_client, &model.name), sets, tokens, items);
    Observed {
        state,
        ready,
        delayed,
        leased,
        dead,
        item_keys,
        tokens,
        items,
    }
}

fn check_counts(model: &QueueModel, s: &pb::QueueStateResponse) -> TestCaseResult {
    let counts = (s.ready, s.leased, s.delayed, s.dead);
    let expected = (
        model.count(|s| *s == Slot::Ready),
        model.count(|s| matches!(s, Slot::Leased { .. })),
        model.count(|s| matches!(s, Slot::Delayed { .. })),
        model.count(|s| *s == Slot::Dead),
    );
    prop_assert_eq!(counts, expected, "(ready, leased, delayed, dead)");
    let totals = Totals {
        enqueued: s.enqueued_total,
        completed: s.completed_total,
        failed: s.failed_total,
        reclaimed: s.reclaimed_total,
    };
    prop_assert_eq!(totals, model.totals);
    prop_assert_eq!(s.drained, model.drained(), "drained");
    prop_assert_eq!(s.paused, model.paused, "paused");
    prop_assert_eq!(s.oldest_ready_enqueue_time.is_some(), s.ready > 0);
    prop_assert_eq!((s.dead_dropped_total, s.sealed), (0, false));
    Ok(())
}

fn check_storage(model: &mut QueueModel, seen: &Observed) -> TestCaseResult {
    // Ready members are the 12-hex-digit enqueue sequence and the id, scored by -priority: the
    // whole list, in order, is what the model expects Lease to hand out next.
    let expected_ready: Scored = model
        .ready_in_lease_order()
        .into_iter()
        .map(|(id, item)| (format!("{:012x}{id}", item.seq), -f64::from(item.priority)))
        .collect();
    prop_assert_eq!(
        &seen.ready,
        &expected_ready,
        "the ready set, in lease order"
    );

    let ids =
        |scored: &Scored| -> Vec<String> { scored.iter().map(|(id, _)| id.clone()).collect() };
    let sorted = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };
    let prefix = &model.keys.item_prefix;
    let stored = sorted(
        seen.item_keys
            .iter()
            .map(|key| key.strip_prefix(prefix.as_str()).unwrap_or(key).to_owned())
            .collect(),
    );
    let expected_stored: Vec<String> = model.items.keys().cloned().collect();
    prop_assert_eq!(stored, expected_stored, "stored item hashes");
    prop_assert_eq!(
        sorted(seen.dead.clone()),
        model.ids_in(|s| *s == Slot::Dead),
        "the dead set"
    );
    prop_assert_eq!(
        sorted(ids(&seen.delayed)),
        model.ids_in(|s| matches!(s, Slot::Delayed { .. })),
        "the delayed set"
    );
    prop_assert_eq!(
        sorted(ids(&seen.leased)),
        model.ids_in(|s| matches!(s, Slot::Leased { .. })),
        "the leased set"
    );

    // Every id of the pool is in at most one set, and in one exactly when it is live or dead.
    let ready_ids: Vec<String> = seen
        .ready
        .iter()
        .map(|(m, _)| m.get(12..).unwrap_or_default().to_owned())
        .collect();
    for id in (0..ID_POOL).map(pool_id) {
        let places = [
            &ready_ids,
            &ids(&seen.delayed),
            &ids(&seen.leased),
            &seen.dead,
        ]
        .iter()
        .map(|set| set.iter().filter(|member| **member == id).count())
        .sum::<usize>();
        let expected = usize::from(matches!(
            model.items.get(&id).map(|i| &i.slot),
            Some(Slot::Ready | Slot::Delayed { .. } | Slot::Leased { .. } | Slot::Dead)
        ));
        prop_assert_eq!(places, expected, "places holding {}", &id);
    }

    let delayed: BTreeMap<&String, f64> = seen.delayed.iter().map(|(id, s)| (id, *s)).collect();
    let leased: BTreeMap<&String, f64> = seen.leased.iter().map(|(id, s)| (id, *s)).collect();
    for (index, id) in (0..ID_POOL).map(pool_id).enumerate() {
        let stored_token = seen.tokens.get(index).cloned().flatten();
        let Some(item) = model.items.get_mut(&id) else {
            continue;
        };
        let mut expected_token = None;
        match &mut item.slot {
            Slot::Delayed { earliest, latest } => {
                let due = delayed[&id] as i64;
                prop_assert!(
                    *earliest <= due && due <= *latest,
                    "{} is due at {}, expected {}..={}",
                    &id,
                    due,
                    earliest,
                    latest
                );
                // From now on the model knows the exact due time.
                (*earliest, *latest) = (due, due);
            }
            Slot::Leased {
                lease_id,
                expire_ms,
            } => {
                prop_assert_eq!(leased[&id] as i64, *expire_ms, "lease expiry of {}", &id);
                let decoded = LeaseId::decode(lease_id)
                    .map_err(|e| failure(format!("lease id {lease_id}: {e}")))?;
                expected_token = Some(decoded.token);
            }
            _ => {}
        }
        // Only the one lease the model holds has its fencing token stored, so no other lease id
        // can act on the item.
        prop_assert_eq!(
            stored_token,
            expected_token,
            "stored lease token of {}",
            &id
        );
    }
    Ok(())
}

fn check_items(model: &QueueModel, items: Vec<Result<pb::Item, tonic::Status>>) -> TestCaseResult {
    for (id, reply) in (0..ID_POOL).map(pool_id).zip(items) {
        let Some(expected) = model.items.get(&id) else {
            let code = reply.map(|_| ()).map_err(|s| s.code());
            prop_assert_eq!(code, Err(tonic::Code::NotFound), "GetItem of gone {}", &id);
            continue;
        };
        let item = reply.map_err(rpc_failed("GetItem"))?;
        prop_assert_eq!(item.state(), expected.slot.api_state(), "state of {}", &id);
        prop_assert_eq!(item.attempts, expected.attempts, "attempts of {}", &id);
        prop_assert_eq!(
            item.max_attempts,
            expected.max_attempts,
            "max_attempts of {}",
            &id
        );
        prop_assert_eq!(item.priority, expected.priority, "priority of {}", &id);
        prop_assert_eq!(
            item.payload.as_ref(),
            expected.payload.as_bytes(),
            "payload of {}",
            &id
        );
        prop_assert_eq!(
            &item.last_error,
            &expected.last_error,
            "last_error of {}",
            &id
        );
        let (next_attempt, lease_expiry, result) = match &expected.slot {
            Slot::Delayed { earliest, .. } => (Some(*earliest), None, Vec::new()),
            Slot::Leased { expire_ms, .. } => (None, Some(*expire_ms), Vec::new()),
            Slot::Completed { result } => (None, None, result.clone()),
            Slot::Ready | Slot::Dead => (None, None, Vec::new()),
        };
        prop_assert_eq!(
            ms_of(item.next_attempt_time.as_ref()),
            next_attempt,
            "next_attempt_time of {}",
            &id
        );
        prop_assert_eq!(
            ms_of(item.lease_expire_time.as_ref()),
            lease_expiry,
            "lease_expire_time of {}",
            &id
        );
        prop_assert_eq!(item.result.as_ref(), result.as_slice(), "result of {}", &id);
        prop_assert_eq!(
            item.complete_time.is_some(),
            matches!(expected.slot, Slot::Dead | Slot::Completed { .. }),
            "complete_time of {}",
            &id
        );
    }
    Ok(())
}

fn result_of(id: &str) -> Vec<u8> {
    format!("result of {id}").into_bytes()
}

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    let value = std::env::var(name).ok()?;
    match value.parse() {
        Ok(number) => Some(number),
        Err(_) => panic!("{name}={value:?} is not a number"),
    }
}

fn describe(keep_completed: bool, ops: &[Op]) -> String {
    let mut text = format!("keep_completed: {keep_completed}\n");
    for (step, op) in ops.iter().enumerate() {
        let _ = writeln!(text, "  step {step}: {op:?}");
    }
    text
}

#[test]
fn broker_agrees_with_the_queue_model_after_every_step() {
    let cases = env_number("WQ_MODEL_CASES").unwrap_or(DEFAULT_CASES);
    let steps = env_number("WQ_MODEL_STEPS").unwrap_or(DEFAULT_STEPS).max(1);
    let seed = env_number("WQ_MODEL_SEED").unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0);
    eprintln!(
        "model: {cases} cases of 1..={steps} steps, seed {seed} (WQ_MODEL_SEED={seed} replays them)"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let world = runtime.block_on(World::start());
    let mut runner = TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        // A failure is reported with its seed and its shrunk steps instead of a file beside the
        // sources.
        failure_persistence: None,
        max_shrink_time: u32::try_from(MAX_SHRINK_TIME.as_millis()).unwrap_or(u32::MAX),
        ..Config::default()
    });
    let next_case = Cell::new(0u64);
    let started = Instant::now();
    let outcome = runner.run(
        &(any::<bool>(), vec(op_strategy(), 1..=steps)),
        |(keep_completed, ops)| {
            let case = next_case.get();
            next_case.set(case + 1);
            runtime.block_on(world.run_case(case, keep_completed, &ops))
        },
    );
    let world_tally = world.tally.get();
    runtime.block_on(world.stop());
    match outcome {
        Ok(()) => eprintln!(
            "model: {} cases passed in {:.1?}; exercised {:?}",
            next_case.get(),
            started.elapsed(),
            world_tally
        ),
        Err(TestError::Fail(reason, (keep_completed, ops))) => panic!(
            "the broker disagreed with the model: {}\nminimal failing case (seed {seed}; {} \
             cases run, shrinking included):\n{}",
            reason.message(),
            next_case.get(),
            describe(keep_completed, &ops)
        ),
        Err(TestError::Abort(reason)) => panic!("the model test aborted: {}", reason.message()),
    }
}
