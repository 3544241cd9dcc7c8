//! The background reaper that runs in every broker replica. At every interval it claims the
//! queues whose pass is due in the queue index (see [`crate::store::index`]): expired leases to
//! reclaim, delayed items to promote, dead letters and remembered ids past their bounds, deleted
//! items still to delete, idle queues to forget. Queues with nothing due cost it nothing. A claim
//! keeps other replicas off the queue meanwhile, and each step is one atomic script anyway.
//!
//! It is also the safety net for lost wake-up notifications (see [`crate::tasks::notify`]): waiting
//! Lease calls do not poll Redis themselves, so every few rounds the queues with waiters in this
//! process get a pass too.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::{error::Result, store::Store, tasks::notify::Notifier};

/// Most bounded steps one queue gets per visit, so one huge backlog cannot starve the others.
const MAX_STEPS_PER_VISIT: usize = 20;

/// Most due queues claimed per round; the rest wait for the next round.
const MAX_QUEUES_PER_ROUND: usize = 1000;

/// How long a queue whose visit failed waits for the next try, in ms: a queue that keeps
/// failing (a key of the wrong type, say) must not cost a script every round.
const RETRY_FAILED_VISIT_MS: i64 = 5_000;

/// Every this many rounds, queues with waiters in this process get a pass (the safety net for
/// lost notifications: 5 s at the default 500 ms interval).
const WAITER_CHECK_ROUNDS: u64 = 10;

/// Runs the reaper until `stop`.
pub async fn run(
    store: Arc<Store>,
    notifier: Arc<Notifier>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    for round in 0u64.. {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let with_waiters = round % WAITER_CHECK_ROUNDS == 0;
        if with_waiters {
            // Not once but every few rounds: during a rolling upgrade, replicas of the old
            // version keep adding queues to the old registry.
            match store.migrate_legacy_registry().await {
                Ok(0) => {}
                Ok(count) => {
                    tracing::info!(
                        count,
                        "moved queues of the old registry into the queue index"
                    )
                }
                Err(error) => tracing::debug!(%error, "queue registry migration failed"),
            }
        }
        match run_round(&store, &notifier, with_waiters).await {
            Ok(()) if failing => {
                tracing::info!("reaper recovered");
                failing = false;
            }
            Ok(()) => {}
            Err(error) if !failing => {
                tracing::warn!(%error, "reaper round failed; retrying every interval");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// One round: the due queues, and (when `with_waiters`) the queues this process has waiters on.
/// A queue whose visit fails is logged and left for its next visit; the round goes on.
async fn run_round(store: &Store, notifier: &Notifier, with_waiters: bool) -> Result<()> {
    let claimed_at = Instant::now();
    let claimed = store.claim_due(MAX_QUEUES_PER_ROUND).await?;
    // The claim keeps other replicas off these queues for one claim period only: a round
    // slower than that (a thousand queues under load) would visit queues another replica has
    // claimed, visited and forgotten since. The rest are due again, for whoever comes first.
    let claim_holds_for = store.idle_visit_period() / 2;
    let mut queues: Vec<(String, bool)> = claimed.into_iter().map(|q| (q, true)).collect();
    if with_waiters {
        for queue in notifier.waited_queues() {
            if !queues.iter().any(|(claimed, _)| *claimed == queue) {
                queues.push((queue, false));
            }
        }
    }
    for (queue, claimed) in queues {
        if claimed && claimed_at.elapsed() > claim_holds_for {
            continue;
        }
        if let Err(error) = visit(store, notifier, &queue).await {
            tracing::warn!(queue = %queue, %error, "reaping a queue failed; it is visited again");
            // If Redis is down this fails too, and the claim's period stands.
            let retry = store.local_now_ms().saturating_add(RETRY_FAILED_VISIT_MS);
            let _ = store.schedule(&queue, retry).await;
        }
    }
    Ok(())
}

async fn visit(store: &Store, notifier: &Notifier, queue: &str) -> Result<()> {
    for _ in 0..MAX_STEPS_PER_VISIT {
        let outcome = store.reap(queue).await?;
        if outcome.reclaimed + outcome.promoted + outcome.dropped > 0 {
            tracing::debug!(
                queue = %queue,
                reclaimed = outcome.reclaimed,
                promoted = outcome.promoted,
                dropped = outcome.dropped,
                "reaped"
            );
        }
        // The safety net for lost notifications, one script call per queue and visit however
        // many Lease calls wait: local waiters of a queue with leasable items look again, and
        // those that return on a drained queue hear that it is.
        if notifier.has_waiters(queue) {
            if outcome.ready > 0 && !outcome.paused {
                notifier.wake(queue, outcome.ready);
            } else if outcome.drained {
                notifier.wake(queue, 0);
            }
        }
        if outcome.trash {
            store.delete_trash(queue).await?;
        }
        if outcome.expired {
            tracing::debug!(queue = %queue, "forgot an idle queue");
            return store.unindex(queue).await;
        }
        if !outcome.more && !outcome.trash {
            if let Some(next) = outcome.next_ms {
                store.schedule(queue, next).await?;
            }
            return Ok(());
        }
    }
    // Steps left over: due again at once.
    store.schedule(queue, store.local_now_ms()).await
}
