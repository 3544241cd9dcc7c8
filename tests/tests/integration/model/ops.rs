//! The operations a case is made of, and the proptest strategies that generate them.

use proptest::{collection::vec, prelude::*};

use super::{HEADER_LIMIT, ID_POOL, PAYLOAD_LIMIT, TRACE_HEADER};

/// Which of the case's two queues a step acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Queue {
    First,
    Second,
}

impl Queue {
    pub(super) fn index(self) -> usize {
        match self {
            Self::First => 0,
            Self::Second => 1,
        }
    }

    pub(super) fn other(self) -> Self {
        match self {
            Self::First => Self::Second,
            Self::Second => Self::First,
        }
    }
}

/// One item of an Enqueue.
#[derive(Debug, Clone)]
pub(super) struct NewItem {
    /// Index into the id pool.
    pub(super) id: usize,
    pub(super) priority: i32,
    /// 0 asks for the broker's default.
    pub(super) max_attempts: u32,
    pub(super) delayed: bool,
    pub(super) payload: Payload,
    /// The length of the value of a `TRACE_HEADER` header, if the item has one.
    pub(super) trace_len: Option<usize>,
}

/// The size of an item's payload.
#[derive(Debug, Clone, Copy)]
pub(super) enum Payload {
    /// A short text naming the item and its step.
    Text,
    /// This many bytes: some at or over the broker's payload limit, so Lease grants run into
    /// the reply budget.
    Bytes(usize),
    /// Sized (from the model's reply estimate) so that the item's estimate is half the reply
    /// budget plus this many bytes: two such items fit one grant exactly when their offsets add
    /// up to at most zero, which pins the estimate down to the byte.
    HalfBudget(i32),
}

/// A lease id the step presents, resolved against the model when the step runs: a live lease
/// (or a lost one when `live` is false), or any lease the queue issued when there is none of
/// that kind; the step is skipped when the queue issued none.
/// Indexing modulo the candidates keeps a reference meaningful while proptest shrinks the steps
/// before it.
#[derive(Debug, Clone, Copy)]
pub(super) struct LeaseRef {
    pub(super) live: bool,
    pub(super) index: usize,
}

/// How a Fail asks for its retry.
#[derive(Debug, Clone, Copy)]
pub(super) enum Retry {
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
pub(super) enum Then {
    /// Wait until the background reaper has moved the item.
    WaitForReaper,
    /// Lease this many items at once: the Lease script reclaims and promotes before it grants,
    /// unless the reaper got there first.
    LeaseAtOnce(u32),
}

/// How a DeleteQueue step deletes the queue.
#[derive(Debug, Clone, Copy)]
pub(super) enum Deletion {
    /// The DeleteQueue call: the atomic step, then the old generation's keys are deleted.
    Whole,
    /// Only its atomic first step (delete_queue.lua, run directly), as if the broker died right
    /// after it: the old generation stays in the trash, next to the new one that later steps
    /// use, until a reaper visit or another DeleteQueue deletes it.
    FirstStepOnly,
}

/// Who makes the reaper pass after a step forced a time into the past.
#[derive(Debug, Clone, Copy)]
pub(super) enum Reap {
    /// The broker's reaper, in a visit of the queue (its index entry is made due).
    Reaper,
    /// One reap.lua call run directly, whose reply is checked against the model.
    Script,
}

/// What follows the forced end of finished ids' dedup window.
#[derive(Debug, Clone, Copy)]
pub(super) enum AfterWindow {
    /// Wait until the reaper has forgotten the ids.
    Reaper,
    /// Enqueue them again at once, before any reaper pass forgot them: they must be new.
    EnqueueAtOnce,
}

/// The calls that present a lease id.
#[derive(Debug, Clone, Copy)]
pub(super) enum LeaseCall {
    Extend,
    Complete,
    Fail,
    Release,
}

/// One step of a case.
#[derive(Debug, Clone)]
pub(super) enum Op {
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
    DeleteQueue {
        queue: Queue,
        deletion: Deletion,
    },
    /// Moves the finish time of a remembered id (or of all, when None) past the dedup window;
    /// a retained completed item's retention ends with it.
    ForgetFinished {
        queue: Queue,
        pick: Option<usize>,
        then: AfterWindow,
    },
    /// Moves a dead letter's time of death past the age bound (but not past the dedup
    /// window), so the next reaper pass drops it and remembers its id.
    DropDead {
        queue: Queue,
        pick: usize,
        by: Reap,
    },
    /// Moves the queue's last activity to the far past (and with `windows_too` the finish time
    /// of every remembered id, as if a month had passed), then a reaper pass: the queue is
    /// forgotten if and only if it holds nothing. `queue` None picks, when the step runs, the
    /// queue with fewer items, which is more often empty.
    ExpireIdle {
        queue: Option<Queue>,
        windows_too: bool,
        by: Reap,
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

/// Payloads: mostly short texts or large payloads (from a quarter of the limit up), of which two
/// mostly pass the reply budget; payloads that put two items a few bytes either side of the
/// budget; now and then exactly the limit, and rarely one byte over it, which the broker must
/// refuse.
fn payload_strategy() -> impl Strategy<Value = Payload> {
    prop_oneof![
        10 => Just(Payload::Text),
        8 => (PAYLOAD_LIMIT / 4..=PAYLOAD_LIMIT).prop_map(Payload::Bytes),
        8 => (-2..=2i32).prop_map(Payload::HalfBudget),
        3 => Just(Payload::Bytes(PAYLOAD_LIMIT)),
        1 => Just(Payload::Bytes(PAYLOAD_LIMIT + 1)),
    ]
}

/// Header value lengths: none mostly, short ones, and ones that fill the header limit (the
/// reply estimate counts headers twice).
fn trace_len_strategy() -> impl Strategy<Value = Option<usize>> {
    let longest = HEADER_LIMIT - TRACE_HEADER.len();
    prop_oneof![
        6 => Just(None),
        2 => (1..=64usize).prop_map(Some),
        1 => (longest / 2..=longest).prop_map(Some),
    ]
}

fn new_item_strategy() -> impl Strategy<Value = NewItem> {
    (
        0..ID_POOL,
        -1..=1i32,
        0..=4u32,
        prop::bool::weighted(0.2),
        payload_strategy(),
        trace_len_strategy(),
    )
        .prop_map(
            |(id, priority, max_attempts, delayed, payload, trace_len)| NewItem {
                id,
                priority,
                max_attempts,
                delayed,
                payload,
                trace_len,
            },
        )
}

fn reap_strategy() -> impl Strategy<Value = Reap> {
    prop_oneof![Just(Reap::Reaper), Just(Reap::Script)]
}

pub(super) fn op_strategy() -> impl Strategy<Value = Op> {
    let retry = prop_oneof![Just(Retry::Backoff), Just(Retry::Now), Just(Retry::Later)];
    let call = prop_oneof![
        Just(LeaseCall::Extend),
        Just(LeaseCall::Complete),
        Just(LeaseCall::Fail),
        Just(LeaseCall::Release),
    ];
    let deletion = prop_oneof![Just(Deletion::Whole), Just(Deletion::FirstStepOnly)];
    let after_window = prop_oneof![Just(AfterWindow::Reaper), Just(AfterWindow::EnqueueAtOnce)];
    let requeued = prop_oneof![1 => Just(None), 3 => vec(0..ID_POOL, 1..=2).prop_map(Some)];
    prop_oneof![
        10 => (queue_strategy(), vec(new_item_strategy(), 1..=3))
            .prop_map(|(queue, items)| Op::Enqueue { queue, items }),
        // Up to five: with large payloads the reply budget, not the count, ends most grants.
        12 => (queue_strategy(), 1..=5u32)
            .prop_map(|(queue, max_items)| Op::Lease { queue, max_items }),
        2 => (queue_strategy(), lease_refs_strategy())
            .prop_map(|(queue, leases)| Op::ExtendLease { queue, leases }),
        // Completions leave remembered ids behind, which later Enqueues run into.
        10 => (queue_strategy(), lease_refs_strategy())
            .prop_map(|(queue, leases)| Op::Complete { queue, leases }),
        6 => (queue_strategy(), lease_ref_strategy(), retry, prop::bool::weighted(0.2)).prop_map(
            |(queue, lease, retry, dead_letter)| Op::Fail { queue, lease, retry, dead_letter }
        ),
        4 => (queue_strategy(), lease_refs_strategy())
            .prop_map(|(queue, leases)| Op::Release { queue, leases }),
        4 => (queue_strategy(), 0..8usize, then_strategy())
            .prop_map(|(queue, pick, then)| Op::ExpireLease { queue, pick, then }),
        2 => (queue_strategy(), 0..8usize, then_strategy())
            .prop_map(|(queue, pick, then)| Op::MakeDue { queue, pick, then }),
        2 => (queue_strategy(), lease_ref_strategy(), call)
            .prop_map(|(owner, lease, call)| Op::WrongQueue { owner, lease, call }),
        // Mostly resumes, so a queue once paused is not paused for the rest of the case.
        2 => (queue_strategy(), prop::bool::weighted(0.3))
            .prop_map(|(queue, paused)| Op::SetPaused { queue, paused }),
        2 => (queue_strategy(), requeued).prop_map(|(queue, ids)| Op::RequeueDead { queue, ids }),
        // Rare: a delete wipes what the case built up.
        1 => (queue_strategy(), deletion)
            .prop_map(|(queue, deletion)| Op::DeleteQueue { queue, deletion }),
        2 => (queue_strategy(), prop::option::weighted(0.7, 0..8usize), after_window)
            .prop_map(|(queue, pick, then)| Op::ForgetFinished { queue, pick, then }),
        2 => (queue_strategy(), 0..8usize, reap_strategy())
            .prop_map(|(queue, pick, by)| Op::DropDead { queue, pick, by }),
        // Mostly with the windows: a queue whose ids are all remembered is never idle.
        2 => (prop::option::of(queue_strategy()), prop::bool::weighted(0.75), reap_strategy())
            .prop_map(|(queue, windows_too, by)| Op::ExpireIdle { queue, windows_too, by }),
    ]
}
