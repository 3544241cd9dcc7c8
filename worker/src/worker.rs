//! The lease loop and the per-item task with its lease heartbeat.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use wq_client::{Client, duration, pb};

use crate::{ExitPolicy, Handler, Outcome, WorkerConfig};

/// Longest pause between retries after the broker failed.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Attempts at reporting one outcome before leaving the item to lease expiry.
const REPORT_ATTEMPTS: u32 = 5;

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Items completed.
    pub completed: u64,
    /// Items failed (retried or dead-lettered).
    pub failed: u64,
    /// Items whose lease was lost before the outcome could be reported.
    pub lost: u64,
    /// Items released unfinished at shutdown.
    pub released: u64,
    /// The broker refused the worker for good (bad token, a role without Lease, a queue it may
    /// not use or cannot exist), so it stopped early: retrying would not help.
    pub refused: bool,
}

/// Status codes of a Lease that no retry can fix.
fn refused_for_good(error: &wq_client::Error) -> bool {
    use tonic::Code;
    matches!(
        error.code(),
        Some(
            Code::Unauthenticated
                | Code::PermissionDenied
                | Code::InvalidArgument
                | Code::Unimplemented
        )
    )
}

enum TaskEnd {
    Completed,
    Failed,
    Lost,
}

/// A worker on one queue.
#[derive(Debug, Clone)]
pub struct Worker {
    client: Client,
    config: WorkerConfig,
}

impl Worker {
    /// Creates a worker using `client`.
    pub fn new(client: Client, mut config: WorkerConfig) -> Self {
        config.concurrency = config.concurrency.max(1);
        if config.worker_id.is_empty() {
            config.worker_id = uuid::Uuid::new_v4().to_string();
        }
        Self { client, config }
    }

    /// The id this worker reports to the broker (its session id).
    pub fn worker_id(&self) -> &str {
        &self.config.worker_id
    }

    /// Works until the exit policy is met or `shutdown` is cancelled.
    pub async fn run<H: Handler>(
        &self,
        handler: Arc<H>,
        shutdown: CancellationToken,
    ) -> RunSummary {
        let queue = &self.config.queue;
        tracing::info!(session = %self.config.worker_id, queue = %queue, "worker started");
        match self.client.queue_state(queue).await {
            Ok(s) => tracing::info!(
                ready = s.ready,
                leased = s.leased,
                delayed = s.delayed,
                sealed = s.sealed,
                "initial queue state"
            ),
            Err(error) => tracing::warn!(%error, "cannot read the initial queue state"),
        }

        let (completions, pending) = mpsc::channel(MAX_COMPLETE_BATCH * 4);
        let batcher = tokio::spawn(complete_in_batches(
            self.client.clone(),
            queue.clone(),
            pending,
        ));
        let summary = self.work(handler, shutdown, completions).await;
        // The batcher ends once every sender (the loop's and each task's) is gone.
        let _ = batcher.await;
        summary
    }

    async fn work<H: Handler>(
        &self,
        handler: Arc<H>,
        shutdown: CancellationToken,
        completions: mpsc::Sender<PendingCompletion>,
    ) -> RunSummary {
        let queue = &self.config.queue;
        let slots = Arc::new(Semaphore::new(self.config.concurrency as usize));
        let in_work: Arc<Mutex<HashSet<String>>> = Arc::default();
        let mut tasks = JoinSet::new();
        let mut summary = RunSummary::default();
        let mut backoff = Duration::from_millis(100);

        loop {
            while let Some(ended) = tasks.try_join_next() {
                tally(&mut summary, ended);
            }
            let first = tokio::select! {
                permit = Arc::clone(&slots).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break, // the semaphore is never closed
                },
                () = shutdown.cancelled() => break,
                Some(ended) = tasks.join_next(), if !tasks.is_empty() => {
                    tally(&mut summary, ended);
                    continue;
                }
            };
            let mut held = vec![first];
            while let Ok(permit) = Arc::clone(&slots).try_acquire_owned() {
                held.push(permit);
            }
            let request = pb::LeaseRequest {
                queue: queue.clone(),
                max_items: held.len() as u32,
                lease_duration: Some(duration(self.config.lease_duration)),
                max_wait: Some(duration(self.config.max_wait)),
                worker_id: self.config.worker_id.clone(),
                // A worker that may exit hears of a drained queue at once instead of after
                // a full wait.
                return_if_drained: self.config.exit != ExitPolicy::Forever,
            };
            let reply = tokio::select! {
                reply = self.client.lease(request) => reply,
                // Dropping the call is safe: the broker gives back what it leased for us.
                () = shutdown.cancelled() => break,
            };
            let reply = match reply {
                Ok(reply) => {
                    backoff = Duration::from_millis(100);
                    reply
                }
                Err(error) if refused_for_good(&error) => {
                    tracing::error!(%error, "the broker refused this worker; stopping");
                    summary.refused = true;
                    drop(held);
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "lease failed");
                    drop(held);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            let got_items = !reply.items.is_empty();
            for item in reply.items {
                let Some(permit) = held.pop() else { break };
                let job = Job {
                    client: self.client.clone(),
                    queue: queue.clone(),
                    lease_duration: self.config.lease_duration,
                    in_work: Arc::clone(&in_work),
                    completions: completions.clone(),
                };
                let handler = Arc::clone(&handler);
                tasks.spawn(async move {
                    let ended = job.process(handler.as_ref(), item).await;
                    drop(permit);
                    ended
                });
            }
            drop(held);
            if got_items || !reply.drained {
                continue;
            }
            while let Some(ended) = tasks.try_join_next() {
                tally(&mut summary, ended);
            }
            // Drained: items in work may still fail and come back, so finish them first.
            if !tasks.is_empty() {
                while let Some(ended) = tasks.join_next().await {
                    tally(&mut summary, ended);
                }
                continue;
            }
            match self.config.exit {
                ExitPolicy::Forever => {}
                ExitPolicy::Drained => {
                    tracing::info!(queue = %queue, "queue drained, exiting");
                    return summary;
                }
                ExitPolicy::Sealed => match self.client.queue_state(queue).await {
                    Ok(state) if state.sealed && state.drained => {
                        tracing::info!(queue = %queue, "queue sealed and drained, exiting");
                        return summary;
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "cannot read the queue state"),
                },
            }
        }

        self.shut_down(&mut tasks, &in_work, &mut summary).await;
        summary
    }

    /// Lets running handlers finish within the grace period, then releases the rest.
    async fn shut_down(
        &self,
        tasks: &mut JoinSet<TaskEnd>,
        in_work: &Mutex<HashSet<String>>,
        summary: &mut RunSummary,
    ) {
        tracing::info!(
            running = tasks.len(),
            grace = ?self.config.shutdown_grace,
            "shutting down: no new leases"
        );
        let finish = async {
            while let Some(ended) = tasks.join_next().await {
                tally(summary, ended);
            }
        };
        if tokio::time::timeout(self.config.shutdown_grace, finish)
            .await
            .is_err()
        {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        let unfinished: Vec<String> = in_work
            .lock()
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        if unfinished.is_empty() {
            return;
        }
        match self
            .client
            .release(&self.config.queue, unfinished.clone())
            .await
        {
            Ok(results) => {
                let released = results
                    .iter()
                    .filter(|r| r.outcome() == pb::LeaseOutcome::Ok)
                    .count();
                summary.released += released as u64;
                tracing::info!(released, "released unfinished items");
            }
            Err(error) => tracing::warn!(
                %error,
                count = unfinished.len(),
                "releasing unfinished items failed; their leases will expire"
            ),
        }
    }
}

fn tally(summary: &mut RunSummary, ended: Result<TaskEnd, tokio::task::JoinError>) {
    match ended {
        Ok(TaskEnd::Completed) => summary.completed += 1,
        Ok(TaskEnd::Failed) => summary.failed += 1,
        Ok(TaskEnd::Lost) => summary.lost += 1,
        Err(error) if error.is_panic() => {
            tracing::error!("a handler panicked; its item will be released or reclaimed");
        }
        Err(_) => {}
    }
}

/// Everything one item's task needs.
struct Job {
    client: Client,
    queue: String,
    lease_duration: Duration,
    in_work: Arc<Mutex<HashSet<String>>>,
    completions: mpsc::Sender<PendingCompletion>,
}

/// A completion waiting for the batcher, with the way back to its task.
struct PendingCompletion {
    completion: pb::Completion,
    reply: oneshot::Sender<Result<pb::LeaseOutcome, tonic::Status>>,
}

/// Most completions one Complete call carries.
const MAX_COMPLETE_BATCH: usize = 256;

/// Sends completions in batches: whatever has queued up while the previous call was in flight
/// goes in the next call, so a busy worker makes one Complete call for many items and an idle
/// one adds no delay.
async fn complete_in_batches(
    client: Client,
    queue: String,
    mut pending: mpsc::Receiver<PendingCompletion>,
) {
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
        match client.complete(&queue, completions).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result.outcome()));
                }
            }
            Err(error) => {
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
}

impl Job {
    async fn process<H: Handler>(&self, handler: &H, item: pb::LeasedItem) -> TaskEnd {
        let lease_id = item.lease_id.clone();
        if let Ok(mut set) = self.in_work.lock() {
            set.insert(lease_id.clone());
        }
        tracing::info!(id = %item.id, attempt = item.attempt, "working on item");
        let lost = Arc::new(AtomicBool::new(false));
        let stop_heartbeat = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat(
            self.client.clone(),
            self.queue.clone(),
            lease_id.clone(),
            self.lease_duration,
            Arc::clone(&lost),
            stop_heartbeat.clone(),
        ));
        let outcome = handler.handle(&item).await;
        stop_heartbeat.cancel();
        let _ = heartbeat.await;
        let ended = if lost.load(Ordering::SeqCst) {
            tracing::warn!(id = %item.id, "lease lost while working; the outcome is not reported");
            TaskEnd::Lost
        } else {
            self.report(&item, outcome).await
        };
        if let Ok(mut set) = self.in_work.lock() {
            set.remove(&lease_id);
        }
        ended
    }

    async fn report(&self, item: &pb::LeasedItem, outcome: Outcome) -> TaskEnd {
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=REPORT_ATTEMPTS {
            let (result, ended) = match &outcome {
                Outcome::Complete(result) => (
                    self.complete(item, result.clone()).await,
                    TaskEnd::Completed,
                ),
                Outcome::Retry { error, delay } => {
                    (self.fail(item, error, *delay, false).await, TaskEnd::Failed)
                }
                Outcome::DeadLetter(error) => {
                    (self.fail(item, error, None, true).await, TaskEnd::Failed)
                }
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

/// Extends the lease at a third of its duration until stopped; flags a lost lease.
async fn heartbeat(
    client: Client,
    queue: String,
    lease_id: String,
    lease: Duration,
    lost: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let every = lease / 3;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match client
            .extend_lease(&queue, vec![lease_id.clone()], lease)
            .await
        {
            Ok(results)
                if results.first().map(pb::LeaseResult::outcome) == Some(pb::LeaseOutcome::Ok) => {}
            Ok(_) => {
                lost.store(true, Ordering::SeqCst);
                tracing::warn!("lease lost (expired and taken over, or the item is gone)");
                return;
            }
            Err(error) => tracing::warn!(%error, "heartbeat failed; retrying"),
        }
    }
}
