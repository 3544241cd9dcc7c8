//! One leased item's life in the worker: wait for a free slot (or, after the prefetch window,
//! give the item back), run the handler, report the outcome; and the batchers that carry
//! completions and give-backs to the broker many at a time.

use std::{
    any::Any,
    future::Future,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::FutureExt as _;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use wq_client::{Client, duration, pb};

use crate::{
    Handler, Outcome, chunked,
    in_work::{Held, InWork},
    lease_ahead::{LeaseAhead, Reserved},
};

/// Longest pause between retries after the broker failed.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Attempts at reporting one outcome before leaving the item to lease expiry.
const REPORT_ATTEMPTS: u32 = 5;
/// Most completions one Complete call carries.
pub(crate) const MAX_COMPLETE_BATCH: usize = 256;

/// What became of an item given back.
enum GiveBack {
    Ended(TaskEnd),
    /// The broker cannot take it back: it is run here after all.
    RunHere,
}

/// How an item's task ended.
pub(crate) enum TaskEnd {
    Completed,
    Failed,
    Lost,
    /// Shutdown came before a slot was free (or while the item was being given back): the
    /// item is still held, for release.
    Unstarted,
    /// It waited the whole prefetch window for a slot and went back to the queue.
    GivenBack,
}

/// Where items' reports go to be sent in batches.
#[derive(Clone)]
pub(crate) struct Reports {
    pub(crate) completions: mpsc::Sender<Pending<pb::Completion>>,
    /// Lease ids of items given back unstarted.
    pub(crate) releases: mpsc::Sender<Pending<String>>,
}

/// Everything one item's task needs.
pub(crate) struct Job {
    pub(crate) client: Client,
    pub(crate) queue: String,
    pub(crate) in_work: Arc<InWork>,
    pub(crate) reports: Reports,
    /// Slots for running handlers (the worker's concurrency).
    pub(crate) running: Arc<Semaphore>,
    pub(crate) lease_ahead: Arc<LeaseAhead>,
    /// The lease duration asked for: an item no longer extended is gone after it.
    pub(crate) lease_duration: Duration,
    pub(crate) shutdown: CancellationToken,
}

impl Job {
    /// Runs `handler` on `item` once a slot is free and reports the outcome. `held` is the
    /// item's entry in [`InWork`]; `leased` is its room among the worker's held items, given
    /// back as soon as the handler is done (so that the next Lease call overlaps this report),
    /// or when the item is given back to the queue.
    pub(crate) async fn process<H: Handler>(
        &self,
        handler: &H,
        item: pb::LeasedItem,
        held: Arc<Held>,
        leased: Reserved,
    ) -> TaskEnd {
        let mut leased = Some(leased);
        let slot = match self.slot_for(&item, &held, &mut leased).await {
            Ok(slot) => slot,
            Err(ended) => {
                if matches!(ended, TaskEnd::GivenBack | TaskEnd::Lost) {
                    self.in_work.forget(&item.lease_id);
                }
                return ended;
            }
        };
        // The heartbeat may have heard, while the item waited, that its lease is gone: someone
        // else may be running it by now.
        if held.is_lost() {
            tracing::warn!(id = %item.id, "lease lost while waiting for a slot; not running it");
            self.in_work.forget(&item.lease_id);
            return TaskEnd::Lost;
        }
        tracing::debug!(id = %item.id, attempt = item.attempt, "working on item");
        let started = Instant::now();
        // A panicking handler fails its attempt like an error would, so the item is retried
        // (and in the end dead-lettered) instead of held and extended for ever.
        let outcome = match AssertUnwindSafe(handler.handle(&item)).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(panic) => Outcome::Retry {
                error: format!("the handler panicked: {}", panic_message(panic.as_ref())),
                delay: None,
            },
        };
        self.lease_ahead.timed(started.elapsed());
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

    /// A handler slot for `item`, or how its task ends without one: at shutdown, or (with a
    /// prefetch window) given back to the queue once it has waited the whole window. Records
    /// the start, and how long the item waited, for the worker's pace.
    async fn slot_for(
        &self,
        item: &pb::LeasedItem,
        held: &Held,
        leased: &mut Option<Reserved>,
    ) -> Result<OwnedSemaphorePermit, TaskEnd> {
        if let Ok(slot) = Arc::clone(&self.running).try_acquire_owned() {
            self.lease_ahead.started(None);
            return Ok(slot);
        }
        let waiting = self.lease_ahead.waiting();
        let since = Instant::now();
        let window = self.lease_ahead.window();
        let overstay = async {
            match window {
                Some(window) => tokio::time::sleep(window).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return Err(TaskEnd::Unstarted),
            slot = Arc::clone(&self.running).acquire_owned() => {
                drop(waiting);
                self.lease_ahead.started(Some(since.elapsed()));
                return slot.map_err(|_| TaskEnd::Unstarted); // never closed
            }
            () = overstay => {}
        }
        drop(waiting);
        // Waited the whole window: the items ahead of it ran longer than the worker expected,
        // and another worker may be idle.
        self.lease_ahead.overstayed();
        match self.give_back(item, held, leased).await {
            GiveBack::Ended(ended) => Err(ended),
            GiveBack::RunHere => {
                // Its room again, so the worker does not lease another item in its place.
                *leased = Some(self.lease_ahead.reserve(1));
                let slot = tokio::select! {
                    biased;
                    () = self.shutdown.cancelled() => return Err(TaskEnd::Unstarted),
                    slot = Arc::clone(&self.running).acquire_owned() => slot,
                };
                // Not a measure of the slots' pace: the wait included the give-back.
                self.lease_ahead.started(None);
                slot.map_err(|_| TaskEnd::Unstarted)
            }
        }
    }

    /// Gives `item` back to the queue. Its room is freed at once and its lease no longer
    /// extended, so if the broker cannot be reached, the lease runs out within one lease
    /// duration and the item comes back by the reaper. Only a broker that refuses Release as
    /// such (at once, while the lease surely still holds) gets the item run here after all.
    async fn give_back(
        &self,
        item: &pb::LeasedItem,
        held: &Held,
        leased: &mut Option<Reserved>,
    ) -> GiveBack {
        held.set_handled();
        drop(leased.take());
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            if held.is_lost() {
                tracing::warn!(id = %item.id, "lease lost while giving the item back");
                return GiveBack::Ended(TaskEnd::Lost);
            }
            let error = match through(&self.reports.releases, item.lease_id.clone()).await {
                Ok(pb::LeaseOutcome::Ok) => {
                    tracing::info!(
                        id = %item.id,
                        window = ?self.lease_ahead.window(),
                        "waited the prefetch window for a slot; given back"
                    );
                    return GiveBack::Ended(TaskEnd::GivenBack);
                }
                Ok(_) => {
                    tracing::warn!(id = %item.id, "lease lost while waiting for a slot");
                    return GiveBack::Ended(TaskEnd::Lost);
                }
                Err(error) => error,
            };
            match error.code() {
                // The token may no longer report anything: running the item would be work
                // whose outcome cannot be told, and its lease runs out anyway.
                Some(tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) => {
                    tracing::warn!(id = %item.id, %error, "the broker refused to take an item back; leaving it to lease expiry");
                    return GiveBack::Ended(TaskEnd::Lost);
                }
                // Refused as such, so not released: still this worker's to run, while its lease
                // (no longer extended) surely holds.
                Some(tonic::Code::Unimplemented | tonic::Code::InvalidArgument)
                    if started.elapsed() < self.lease_duration / 3 =>
                {
                    tracing::warn!(id = %item.id, %error, "the broker cannot take an item back; running it here");
                    held.set_unhandled();
                    return GiveBack::RunHere;
                }
                // The broker may have released it without the answer getting here: running
                // it now could run it twice. Asking again is safe (a second release of the
                // same lease answers that it is no longer held).
                _ => {
                    tracing::warn!(id = %item.id, %error, retry_in = ?delay, "giving an item back failed; asking again");
                }
            }
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return GiveBack::Ended(TaskEnd::Unstarted),
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_BACKOFF);
            if started.elapsed() >= self.lease_duration {
                tracing::warn!(id = %item.id, "could not give an item back before its lease ran out; it comes back by the reaper");
                return GiveBack::Ended(TaskEnd::Lost);
            }
        }
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
        let completion = pb::Completion {
            lease_id: item.lease_id.clone(),
            result,
        };
        through(&self.reports.completions, completion)
            .await
            .map(Some)
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
                error: error_text(error).to_owned(),
                retry_delay: delay.map(duration),
                dead_letter,
            })
            .await?;
        Ok(reply.result.map(|r| r.outcome()))
    }
}

/// Most bytes of error text a Fail call carries: far more than the broker keeps (it cuts the
/// text to its --max-error-bytes), far less than a gRPC message may hold, so a handler's
/// error of any size still fails its attempt.
const MAX_FAIL_ERROR_BYTES: usize = 64 * 1024;

/// `error`, cut to [`MAX_FAIL_ERROR_BYTES`] at a character boundary.
fn error_text(error: &str) -> &str {
    if error.len() <= MAX_FAIL_ERROR_BYTES {
        return error;
    }
    let mut end = MAX_FAIL_ERROR_BYTES;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    &error[..end]
}

/// The text a panic was raised with, when it is text.
fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Complete(_) => "completed",
        Outcome::Retry { .. } => "failed, will retry",
        Outcome::DeadLetter(_) => "dead-lettered",
    }
}

/// A report waiting for its batcher, with the way back to its task.
pub(crate) struct Pending<T> {
    report: T,
    reply: oneshot::Sender<Result<pb::LeaseOutcome, tonic::Status>>,
}

/// Sends `report` through its batcher and waits for the broker's answer about it.
async fn through<T>(
    batcher: &mpsc::Sender<Pending<T>>,
    report: T,
) -> wq_client::Result<pb::LeaseOutcome> {
    let stopping = || tonic::Status::cancelled("the worker is stopping").into();
    let (reply, outcome) = oneshot::channel();
    if batcher.send(Pending { report, reply }).await.is_err() {
        return Err(stopping());
    }
    match outcome.await {
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(status)) => Err(status.into()),
        Err(_) => Err(stopping()),
    }
}

/// Sends completions in batches (see [`send_in_batches`]).
pub(crate) async fn complete_in_batches(
    client: Client,
    queue: String,
    pending: mpsc::Receiver<Pending<pb::Completion>>,
) {
    send_in_batches(
        pending,
        |c: &pb::Completion| c.lease_id.len() + c.result.len(),
        |chunk| client.complete(&queue, chunk),
    )
    .await;
}

/// Gives items back to the queue in batches (see [`send_in_batches`]).
pub(crate) async fn release_in_batches(
    client: Client,
    queue: String,
    pending: mpsc::Receiver<Pending<String>>,
) {
    send_in_batches(pending, String::len, |chunk| client.release(&queue, chunk)).await;
}

/// Sends reports in batches: whatever has queued up while the previous call was in flight goes
/// in the next call, so a busy worker makes one call for many items and an idle one adds no
/// delay.
async fn send_in_batches<T, F, Fut>(
    mut pending: mpsc::Receiver<Pending<T>>,
    bytes_of: impl Fn(&T) -> usize,
    mut call: F,
) where
    T: Clone,
    F: FnMut(Vec<T>) -> Fut,
    Fut: Future<Output = wq_client::Result<Vec<pb::LeaseResult>>>,
{
    let mut call_size = MAX_COMPLETE_BATCH;
    while let Some(first) = pending.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_COMPLETE_BATCH {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (reports, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.report, p.reply)).unzip();
        let (results, error) = chunked::send(reports, &mut call_size, &bytes_of, &mut call).await;
        let mut replies = replies.into_iter();
        // Results first: zipping the replies first would take (and drop) one reply more than
        // there are results, leaving that item without its answer.
        for (result, reply) in results.into_iter().zip(replies.by_ref()) {
            let _ = reply.send(Ok(result.outcome()));
        }
        let status = match error {
            Some(wq_client::Error::Status(status)) => status,
            Some(other) => tonic::Status::unavailable(other.to_string()),
            // Every call answered, yet with fewer results than items: the rest have no answer.
            None => tonic::Status::internal("the broker answered for fewer items than were sent"),
        };
        for reply in replies {
            let _ = reply.send(Err(status.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_is_cut_at_a_character_boundary_within_the_bound() {
        assert_eq!(error_text("short"), "short");
        let long = "é".repeat(MAX_FAIL_ERROR_BYTES);
        let cut = error_text(&long);
        assert!(cut.len() <= MAX_FAIL_ERROR_BYTES && cut.len() > MAX_FAIL_ERROR_BYTES - 2);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
