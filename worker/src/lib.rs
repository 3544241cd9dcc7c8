//! wq-worker: leases items from a wq broker and runs a handler on each.
//!
//! A [`Worker`] keeps up to `concurrency` handlers running, and leases items ahead of them as
//! its [`Prefetch`] says: by default as many as its recent handler times and item starts say
//! it will start within 50 ms, giving an item back to the queue if it waits 100 ms for a slot
//! (see [`lease_ahead`]). It leases as many items as it has room for in one call, extends the
//! leases of all held items in the background (one heartbeat call at a third of the lease
//! duration), reports the handler's [`Outcome`] (completions batched), and exits according to
//! its [`ExitPolicy`]: when the queue is drained (the Kubernetes example's `while not q.empty()`),
//! when it is sealed and drained, or never. On shutdown it stops leasing, gives running handlers
//! a grace period, then releases what is unfinished so other workers get it at once. Broker
//! outages are retried with backoff; the worker never crashes on them and never drops an item
//! (an item it cannot report is released or, at worst, reclaimed when its lease expires).
//!
//! # Layout
//!
//! - this file: the public types;
//! - [`worker`]: the lease loop and shutdown;
//! - `job`: one item's task, and the batchers of completions and give-backs;
//! - [`lease_ahead`]: how many items the worker holds, and leases ahead of its slots;
//! - `in_work`: the held items and their shared heartbeat;
//! - `chunked`: batch calls that adapt to the broker's batch limit;
//! - [`command`]: the handler that runs an external command per item (the `wq-worker` binary's).

mod chunked;
pub mod command;
mod in_work;
mod job;
pub mod lease_ahead;
pub mod worker;

use std::{future::Future, time::Duration};

use bytes::Bytes;
pub use lease_ahead::Prefetch;
pub use worker::{RunSummary, Worker};
pub use wq_client::pb::LeasedItem;

/// The lease duration a worker asks for unless told otherwise.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// What a handler decided about one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done; the bytes are kept as the item's result (if the broker retains results).
    Complete(Bytes),
    /// Failed, worth another attempt: after `delay`, or the broker's backoff when None.
    Retry {
        /// What went wrong (stored as the item's last error).
        error: String,
        /// When to retry.
        delay: Option<Duration>,
    },
    /// Failed for good: dead-letter the item now.
    DeadLetter(String),
}

/// The work done on each item.
pub trait Handler: Send + Sync + 'static {
    /// Processes one leased item. Cancellation (at shutdown, after the grace period) drops the
    /// future; the item is then released.
    fn handle(&self, item: &LeasedItem) -> impl Future<Output = Outcome> + Send;
}

/// When a worker stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitPolicy {
    /// Once the queue has no ready, leased or delayed items (Job pods).
    Drained,
    /// Once the queue is sealed and drained: no more work will come.
    Sealed,
    /// Never; only a shutdown signal stops it (Deployment-style workers).
    Forever,
}

/// How a worker behaves.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The queue to work on.
    pub queue: String,
    /// Handlers running at once.
    pub concurrency: u32,
    /// Items leased ahead of free handler slots. Leasing ahead keeps handlers busy while the
    /// next Lease call is in flight, at the cost of holding items another worker could be
    /// running; [`Prefetch::Auto`] (the default) does it only for short items.
    pub prefetch: Prefetch,
    /// Lease duration asked for; heartbeats extend it while a handler runs. Zero counts as the
    /// default, 30 s.
    pub lease_duration: Duration,
    /// How long one Lease call waits for work.
    pub max_wait: Duration,
    /// When to stop.
    pub exit: ExitPolicy,
    /// How long running handlers may go on after shutdown is requested.
    pub shutdown_grace: Duration,
    /// Name in the broker's logs; a random session id when empty.
    pub worker_id: String,
}

impl WorkerConfig {
    /// A configuration with defaults for `queue`: concurrency 1, automatic prefetch (100 ms
    /// window), 30 s leases, 5 s waits, exit when drained, 20 s grace.
    pub fn new(queue: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            concurrency: 1,
            prefetch: Prefetch::default(),
            lease_duration: DEFAULT_LEASE,
            max_wait: Duration::from_secs(5),
            exit: ExitPolicy::Drained,
            shutdown_grace: Duration::from_secs(20),
            worker_id: String::new(),
        }
    }
}
