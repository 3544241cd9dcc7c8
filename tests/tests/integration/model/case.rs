//! One case: the model of its two queues and the connections that drive the broker, the loop
//! that applies each step and checks the invariants after it, and the helpers every step shares.

use std::time::{SystemTime, UNIX_EPOCH};

use proptest::test_runner::{TestCaseError, TestCaseResult};
use redis::aio::MultiplexedConnection;
use wq_server::scripts::Scripts;
use wq_tests::{AdminClient, BrokerConfig, Client};

use super::{
    ops::{Op, Queue},
    queue_model::{QueueModel, Slot},
    world::Tally,
};

/// One case: the model of its two queues and the connections that drive the broker.
pub(super) struct CaseRun {
    pub(super) client: Client,
    pub(super) admin: AdminClient,
    /// Direct connections to the Redis server that holds each queue's keys, in queue order:
    /// on one server both are that server; on a cluster, the master serving the queue's slot.
    pub(super) conns: [MultiplexedConnection; 2],
    /// A direct connection to the server that holds the queue index.
    pub(super) index_conn: MultiplexedConnection,
    pub(super) key_prefix: String,
    /// The configuration of the broker the case talks to, for the scripts the case runs itself.
    pub(super) config: BrokerConfig,
    /// The broker's scripts, for the steps that run one directly (a reaper pass, the first
    /// step of DeleteQueue).
    pub(super) scripts: Scripts,
    pub(super) keep_completed: bool,
    pub(super) queues: [QueueModel; 2],
    pub(super) tally: Tally,
}

pub(super) fn failure(message: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(message.into())
}

pub(super) fn rpc_failed(call: &'static str) -> impl FnOnce(tonic::Status) -> TestCaseError {
    move |status| failure(format!("{call} failed: {status:?}"))
}

pub(super) fn with_context(context: String) -> impl FnOnce(TestCaseError) -> TestCaseError {
    move |error| match error {
        TestCaseError::Fail(reason) => failure(format!("{context}: {}", reason.message())),
        reject @ TestCaseError::Reject(_) => reject,
    }
}

/// The local clock in Unix ms. Redis runs on this machine, so its clock (which the scripts use)
/// agrees with it.
pub(super) fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    i64::try_from(since_epoch.as_millis()).expect("milliseconds since 1970 fit in i64")
}

pub(super) fn ms_of(time: Option<&prost_types::Timestamp>) -> Option<i64> {
    time.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

pub(super) fn pool_id(index: usize) -> String {
    format!("item-{index}")
}

impl CaseRun {
    pub(super) async fn run(&mut self, ops: &[Op]) -> TestCaseResult {
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

    /// The queue whose sets hold fewer items (the first on a tie).
    fn emptier_queue(&self) -> Queue {
        let [first, second] = &self.queues;
        let held = |model: &QueueModel| model.count(Slot::is_indexed);
        if held(second) < held(first) {
            Queue::Second
        } else {
            Queue::First
        }
    }

    async fn apply(&mut self, step: usize, op: &Op) -> TestCaseResult {
        match op {
            Op::Enqueue { queue, items } => self.enqueue(step, *queue, items).await,
            Op::Lease { queue, max_items } => self.lease(*queue, *max_items, None).await,
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
            Op::DeleteQueue { queue, deletion } => self.delete_queue(*queue, *deletion).await,
            Op::ForgetFinished { queue, pick, then } => {
                self.forget_finished(step, *queue, *pick, *then).await
            }
            Op::DropDead { queue, pick, by } => self.drop_dead(*queue, *pick, *by).await,
            Op::ExpireIdle {
                queue,
                windows_too,
                by,
            } => {
                let queue = queue.unwrap_or_else(|| self.emptier_queue());
                self.expire_idle(queue, *windows_too, *by).await
            }
        }
    }
}
