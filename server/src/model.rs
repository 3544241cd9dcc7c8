//! The plain data the store takes and returns: validated new items, lease grants, outcomes and
//! snapshots. No Redis here.

use std::time::Duration;

use bytes::Bytes;

/// When a new item becomes ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// At once.
    Now,
    /// This long after the enqueue (measured on the Redis clock).
    After(Duration),
    /// At this Unix time in milliseconds.
    At(i64),
}

/// A validated item to enqueue.
#[derive(Debug, Clone)]
pub struct NewItem {
    /// The item's id (caller-supplied or assigned).
    pub id: String,
    /// The payload.
    pub payload: Bytes,
    /// Higher is leased first.
    pub priority: i32,
    /// When it becomes ready.
    pub due: Due,
    /// Attempts in all (resolved, >= 1).
    pub max_attempts: u32,
    /// Encoded headers; empty when none.
    pub headers: Bytes,
}

/// One item granted by a lease.
#[derive(Debug, Clone)]
pub struct Granted {
    /// The item's id.
    pub id: String,
    /// The grant's fencing token.
    pub token: String,
    /// The payload.
    pub payload: Bytes,
    /// Attempts that ended before this lease.
    pub attempts_ended: u32,
    /// Attempts in all.
    pub max_attempts: u32,
    /// The item's priority.
    pub priority: i32,
    /// Enqueue time, Unix ms.
    pub enqueue_ms: i64,
    /// Encoded headers, if any.
    pub headers: Option<Bytes>,
}

/// What a lease script call did.
#[derive(Debug, Clone)]
pub struct LeaseBatch {
    /// Redis time of the call, Unix ms.
    pub now_ms: i64,
    /// Expiry of the granted leases, Unix ms.
    pub expire_ms: i64,
    /// No item ready, leased or delayed after the call.
    pub drained: bool,
    /// Due time of the earliest delayed item, Unix ms.
    pub next_due_ms: Option<i64>,
    /// Ready items left after the call.
    pub ready_left: u64,
    /// The queue accepts no more items.
    pub sealed: bool,
    /// The granted items.
    pub items: Vec<Granted>,
}

/// What happened to a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// The lease was not live; nothing changed.
    LeaseLost,
    /// Ready again at once, at this Unix ms.
    Ready(i64),
    /// Retried at this Unix ms.
    Delayed(i64),
    /// Moved to the dead letters.
    Dead,
}

/// Counts and flags of one queue.
#[derive(Debug, Clone, Default)]
pub struct QueueSnapshot {
    /// Ready items.
    pub ready: u64,
    /// Leased items.
    pub leased: u64,
    /// Delayed items.
    pub delayed: u64,
    /// Dead letters.
    pub dead: u64,
    /// Items ever enqueued.
    pub enqueued_total: u64,
    /// Completions.
    pub completed_total: u64,
    /// Fail calls.
    pub failed_total: u64,
    /// Reclaimed expired leases.
    pub reclaimed_total: u64,
    /// Dead letters dropped by the bounds.
    pub dead_dropped_total: u64,
    /// Leases nothing.
    pub paused: bool,
    /// Accepts no items.
    pub sealed: bool,
    /// Enqueue time of the longest-waiting ready item, Unix ms.
    pub oldest_ready_enqueue_ms: Option<i64>,
    /// The queue holds anything: items, dead letters, remembered ids, flags or counters.
    pub exists: bool,
}

/// What one reaper step did.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReapOutcome {
    /// Expired leases reclaimed.
    pub reclaimed: u64,
    /// Delayed items promoted.
    pub promoted: u64,
    /// Dead letters dropped.
    pub dropped: u64,
    /// Ready items afterwards.
    pub ready: u64,
    /// A limit was hit: call again.
    pub more: bool,
    /// Nothing is ready, leased or delayed.
    pub drained: bool,
    /// The queue is paused: it grants nothing.
    pub paused: bool,
    /// When the queue next needs the reaper, Unix ms (None: not unless something changes).
    pub next_ms: Option<i64>,
    /// The queue held nothing for the idle expiry and was forgotten.
    pub expired: bool,
    /// Items of a deleted incarnation are still to be deleted.
    pub trash: bool,
}
