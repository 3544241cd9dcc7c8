//! One leased item's life in the worker: wait for a free slot, run the handler, report the
//! outcome; and the batcher that carries completions to the broker many at a time.

use std::{sync::Arc, time::Duration};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use wq_client::{Client, duration, pb};

use crate::{
    Handler, Outcome, chunked,
    in_work::{Held, InWork},
};

/// Longest pause between retries after the broker failed.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Attempts at reporting one outcome before leaving the item to lease expiry.
const REPORT_ATTEMPTS: u32 = 5;
/// Most completions one Complete call carries.
pub(crate) const MAX_COMPLETE_BATCH: usize = 256;

/// How an item's task ended.
pub(crate) enum TaskEnd {
    Completed,
    Failed,
    Lost,
    /// Shutdown came before a slot was free: the item is still held, for release.
    Unstarted,
}

/// Everything one item's task needs.
pub(crate) struct Job {
    pub(crate) client: Client,
    pub(crate) queue: String,
    pub(crate) in_work: Arc<InWork>,
    pub(crate) completions: mpsc::Sender<PendingCompletion>,
    /// Slots for running handlers (the worker's concurrency).
    pub(crate) running: Arc<Semaphore>,
    pub(crate) shutdown: CancellationToken,
}

impl Job {
    /// Runs `handler` on `item` once a slot is free and reports the outcome. `held` is the
    /// item's entry in [`InWork`]; `leased` is its place among the worker's leased items, given
    /// back as soon as the handler is done so that the next Lease call overlaps this report.
    pub(crate) async fn process<H: Handler>(
        &self,
        handler: &H,
        item: pb::LeasedItem,
        held: Arc<Held>,
        leased: OwnedSemaphorePermit,
    ) -> TaskEnd {
        let slot = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return TaskEnd::Unstarted,
            slot = Arc::clone(&self.running).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return TaskEnd::Unstarted, // never closed
            },
        };
        tracing::info!(id = %item.id, attempt = item.attempt, "working on item");
        let outcome = handler.handle(&item).await;
        held.set_handled();
        drop(slot);
        drop(leased);
        let ended = if held.is_lost() {
            tracing::warn!(id = %item.id, "lease lost while working; the outcome is not reported");
            TaskEnd::Lost
        } else {
            self.report(&item, outcome).await
        };
        self.in_work.forget(&item.lease_id);
        ended
    }

    async fn report(&self, item: &pb::LeasedItem, outcome: Outcome) -> TaskEnd {
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=REPORT_ATTEMPTS {
            // Fail is rare and its gRPC call's future is large: boxed, it does not inflate every
            // item's task, which is copied around at each spawn.
            let (result, ended) = match &outcome {
                Outcome::Complete(result) => (
                    self.complete(item, result.clone()).await,
                    TaskEnd::Completed,
                ),
                Outcome::Retry { error, delay } => (
                    Box::pin(self.fail(item, error, *delay, false)).await,
                    TaskEnd::Failed,
                ),
                Outcome::DeadLetter(error) => (
                    Box::pin(self.fail(item, error, None, true)).await,
                    TaskEnd::Failed,
                ),
            };
            match result {
                Ok(Some(pb::LeaseOutcome::Ok)) => {
                    if matches!(outcome, Outcome::Complete(_)) {
                        tracing::debug!(id = %item.id, "completed");
                    } else {
                        tracing::info!(id = %item.id, outcome = outcome_name(&outcome), "reported");
                    }
                    return ended;
                }
                Ok(_) => {
                    tracing::warn!(id = %item.id, "lease lost before the outcome was reported");
                    return TaskEnd::Lost;
                }
                Err(error) if attempt < REPORT_ATTEMPTS => {
                    tracing::warn!(id = %item.id, %error, "reporting failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
                Err(error) => {
                    tracing::warn!(
                        id = %item.id,
                        %error,
                        "reporting failed; the lease will expire and the item come back"
                    );
                }
            }
        }
        TaskEnd::Lost
    }

    async fn complete(
        &self,
        item: &pb::LeasedItem,
        result: bytes::Bytes,
    ) -> wq_client::Result<Option<pb::LeaseOutcome>> {
        let (reply, outcome) = oneshot::channel();
        let pending = PendingCompletion {
            completion: pb::Completion {
                lease_id: item.lease_id.clone(),
                result,
            },
            reply,
        };
        if self.completions.send(pending).await.is_err() {
            return Err(tonic::Status::cancelled("the worker is stopping").into());
        }
        match outcome.await {
            Ok(Ok(outcome)) => Ok(Some(outcome)),
            Ok(Err(status)) => Err(status.into()),
            Err(_) => Err(tonic::Status::cancelled("the worker is stopping").into()),
        }
    }

    async fn fail(
        &self,
        item: &pb::LeasedItem,
        error: &str,
        delay: Option<Duration>,
        dead_letter: bool,
    ) -> wq_client::Result<Option<pb::LeaseOutcome>> {
        let reply = self
            .client
            .fail(pb::FailRequest {
                queue: self.queue.clone(),
                lease_id: item.lease_id.clone(),
                error: error.to_owned(),
                retry_delay: delay.map(duration),
                dead_letter,
            })
            .await?;
        Ok(reply.result.map(|r| r.outcome()))
    }
}

fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Complete(_) => "completed",
        Outcome::Retry { .. } => "failed, will retry",
        Outcome::DeadLetter(_) => "dead-lettered",
    }
}

/// A completion waiting for the batcher, with the way back to its task.
pub(crate) struct PendingCompletion {
    completion: pb::Completion,
    reply: oneshot::Sender<Result<pb::LeaseOutcome, tonic::Status>>,
}

/// Sends completions in batches: whatever has queued up while the previous call was in flight
/// goes in the next call, so a busy worker makes one Complete call for many items and an idle
/// one adds no delay.
pub(crate) async fn complete_in_batches(
    client: Client,
    queue: String,
    mut pending: mpsc::Receiver<PendingCompletion>,
) {
    let mut call_size = MAX_COMPLETE_BATCH;
    while let Some(first) = pending.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_COMPLETE_BATCH {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (completions, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.completion, p.reply)).unzip();
        let (results, error) = chunked::send(
            completions,
            &mut call_size,
            |c: &pb::Completion| c.lease_id.len() + c.result.len(),
            |chunk| client.complete(&queue, chunk),
        )
        .await;
        let mut replies = replies.into_iter();
        // Results first: zipping the replies first would take (and drop) one reply more than
        // there are results, leaving that item without its answer.
        for (result, reply) in results.into_iter().zip(replies.by_ref()) {
            let _ = reply.send(Ok(result.outcome()));
        }
        if let Some(error) = error {
            let status = match error {
                wq_client::Error::Status(status) => status,
                other => tonic::Status::unavailable(other.to_string()),
            };
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}
