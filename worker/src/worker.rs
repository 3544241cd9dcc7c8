//! The lease loop: lease as many items as there is room for, start a task per item, stop by the
//! exit policy, and release what is unfinished at shutdown.
//!
//! Room is counted in held items, up to `concurrency` plus the items leased ahead
//! ([`crate::lease_ahead`]). An item takes its room when leased and gives it back when its
//! handler is done (its report goes on in the background), so Lease and Complete calls
//! overlap, and a Lease call carries every item that finished while the previous one was in
//! flight. With items leased ahead, the next Lease goes out once half of them have been taken
//! by the handlers, while the handlers still have work.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use wq_client::{Client, duration, pb};

use crate::{
    DEFAULT_LEASE, ExitPolicy, Handler, WorkerConfig, chunked,
    in_work::{self, InWork},
    job::{self, Job, MAX_BACKOFF, MAX_COMPLETE_BATCH, Reports, TaskEnd},
    lease_ahead::LeaseAhead,
};

/// Most items one Lease call asks for (the broker's default limit is 1000).
const MAX_LEASE_BATCH: u32 = 256;

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
    /// Items given back to the queue unstarted after waiting the whole prefetch window for a
    /// slot ([`crate::Prefetch::Auto`]).
    pub given_back: u64,
    /// The broker refused the worker for good (bad token, a role without Lease, a queue it may
    /// not use or cannot exist), so it stopped early: retrying would not help.
    pub refused: bool,
}

/// Lease failures that no retry can fix: settings that cannot work (TLS that fails for good:
/// an untrusted broker certificate, a missing or refused client certificate, a URL scheme the
/// port does not speak) and the status codes of a caller the broker refuses.
fn refused_for_good(error: &wq_client::Error) -> bool {
    use tonic::Code;
    error.is_settings_error()
        || matches!(
            error.code(),
            Some(
                Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::InvalidArgument
                    | Code::Unimplemented
            )
        )
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
        // The heartbeat beats at a third of it, and a give-back gives up after it.
        if config.lease_duration.is_zero() {
            config.lease_duration = DEFAULT_LEASE;
        }
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

        let (completions, pending_completions) = mpsc::channel(MAX_COMPLETE_BATCH * 4);
        let completer = tokio::spawn(job::complete_in_batches(
            self.client.clone(),
            queue.clone(),
            pending_completions,
        ));
        let (releases, pending_releases) = mpsc::channel(MAX_COMPLETE_BATCH * 4);
        let releaser = tokio::spawn(job::release_in_batches(
            self.client.clone(),
            queue.clone(),
            pending_releases,
        ));
        let reports = Reports {
            completions,
            releases,
        };
        let in_work = Arc::<InWork>::default();
        let stop_heartbeat = CancellationToken::new();
        let heartbeat = tokio::spawn(in_work::heartbeat(
            self.client.clone(),
            queue.clone(),
            self.config.lease_duration,
            Arc::clone(&in_work),
            stop_heartbeat.clone(),
        ));
        let summary = self.work(handler, shutdown, reports, &in_work).await;
        stop_heartbeat.cancel();
        let _ = heartbeat.await;
        // The batchers end once every sender (the loop's and each task's) is gone.
        let _ = completer.await;
        let _ = releaser.await;
        summary
    }

    async fn work<H: Handler>(
        &self,
        handler: Arc<H>,
        shutdown: CancellationToken,
        reports: Reports,
        in_work: &Arc<InWork>,
    ) -> RunSummary {
        let queue = &self.config.queue;
        let concurrency = self.config.concurrency;
        let lease_ahead = LeaseAhead::new(self.config.prefetch, concurrency);
        let running = Arc::new(Semaphore::new(concurrency as usize));
        // What every item's task shares, built once rather than cloned per item.
        let job = Arc::new(Job {
            client: self.client.clone(),
            queue: queue.clone(),
            in_work: Arc::clone(in_work),
            reports,
            running,
            lease_ahead: Arc::clone(&lease_ahead),
            lease_duration: self.config.lease_duration,
            shutdown: shutdown.clone(),
        });
        // Lowered when the broker's --max-lease-items is smaller (it answers INVALID_ARGUMENT).
        let mut lease_cap = MAX_LEASE_BATCH;
        // Set when a full batch left room unfilled (the cap was smaller than the room): the
        // next Lease then goes out at once for the rest.
        let mut top_up = false;
        let mut tasks = JoinSet::new();
        let mut summary = RunSummary::default();
        let mut backoff = Duration::from_millis(100);

        loop {
            while let Some(ended) = tasks.try_join_next() {
                tally(&mut summary, ended);
            }
            let wait = lease_ahead.room_for_a_call(lease_cap as usize, top_up);
            top_up = false;
            tokio::select! {
                () = wait => {}
                () = shutdown.cancelled() => break,
                Some(ended) = tasks.join_next(), if !tasks.is_empty() => {
                    tally(&mut summary, ended);
                    continue;
                }
            }
            let mut held = lease_ahead.reserve(lease_ahead.room().min(lease_cap as usize));
            if held.count() == 0 {
                // A handler's time shrank the room since the wait: wait again.
                continue;
            }
            let request = pb::LeaseRequest {
                queue: queue.clone(),
                max_items: u32::try_from(held.count()).unwrap_or(lease_cap),
                lease_duration: Some(duration(self.config.lease_duration)),
                max_wait: Some(duration(self.config.max_wait)),
                worker_id: self.config.worker_id.clone(),
                // A worker that may exit hears of a drained queue at once instead of after
                // a full wait; one that exits only once the queue is also sealed keeps waiting
                // on a drained, unsealed queue (asking again at once would spin) until an
                // enqueue or the seal wakes it.
                return_if_drained: self.config.exit == ExitPolicy::Drained,
                return_if_sealed_and_drained: self.config.exit == ExitPolicy::Sealed,
            };
            let asked = request.max_items;
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
                Err(error) if error.code() == Some(tonic::Code::InvalidArgument) && asked > 1 => {
                    lease_cap = asked / 2;
                    tracing::debug!(%error, lease_cap, "lease batch refused; asking for fewer");
                    drop(held);
                    continue;
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
            top_up =
                asked == lease_cap && reply.items.len() == asked as usize && lease_ahead.room() > 0;
            for item in reply.items {
                let Some(leased) = held.split_one(item.payload.len()) else {
                    break;
                };
                let item_held = in_work.hold(&item.lease_id);
                let job = Arc::clone(&job);
                let handler = Arc::clone(&handler);
                tasks.spawn(
                    async move { job.process(handler.as_ref(), item, item_held, leased).await },
                );
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
                ExitPolicy::Sealed if reply.sealed => {
                    tracing::info!(queue = %queue, "queue sealed and drained, exiting");
                    return summary;
                }
                // Drained but not sealed: the next Lease waits for an enqueue or the seal.
                ExitPolicy::Sealed => {}
            }
        }

        self.shut_down(&mut tasks, in_work, &mut summary).await;
        summary
    }

    /// Lets running handlers finish within the grace period, then releases the rest.
    async fn shut_down(
        &self,
        tasks: &mut JoinSet<TaskEnd>,
        in_work: &InWork,
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
        let unfinished = in_work.unfinished();
        if unfinished.is_empty() {
            return;
        }
        let mut call_size = MAX_COMPLETE_BATCH;
        let count = unfinished.len();
        let (results, error) = chunked::send(unfinished, &mut call_size, String::len, |chunk| {
            self.client.release(&self.config.queue, chunk)
        })
        .await;
        let released = results
            .iter()
            .filter(|r| r.outcome() == pb::LeaseOutcome::Ok)
            .count();
        summary.released += released as u64;
        tracing::info!(released, "released unfinished items");
        if let Some(error) = error {
            tracing::warn!(
                %error,
                count = count - results.len(),
                "releasing unfinished items failed; their leases will expire"
            );
        }
    }
}

fn tally(summary: &mut RunSummary, ended: Result<TaskEnd, tokio::task::JoinError>) {
    match ended {
        Ok(TaskEnd::Completed) => summary.completed += 1,
        Ok(TaskEnd::Failed) => summary.failed += 1,
        Ok(TaskEnd::Lost) => summary.lost += 1,
        Ok(TaskEnd::GivenBack) => summary.given_back += 1,
        Ok(TaskEnd::Unstarted) => {}
        Err(error) if error.is_panic() => {
            // Handlers' panics are caught in the task (they fail the attempt); this is the
            // worker's own code.
            tracing::error!("an item's task panicked; its item will be released or reclaimed");
        }
        Err(_) => {}
    }
}
