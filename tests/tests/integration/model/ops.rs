//! The operations a case is made of, and the proptest strategies that generate them.

use proptest::{collection::vec, prelude::*};

use super::ID_POOL;

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

pub(super) fn op_strategy() -> impl Strategy<Value = Op> {
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
