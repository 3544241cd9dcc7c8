//! The background reaper that runs in every broker replica: at every interval it visits every
//! known queue, reclaims expired leases, promotes due delayed items and trims dead letters, in
//! bounded script calls. Several replicas reaping at once is safe: each step is one atomic script.
//! It is also the safety net for lost wake-up notifications (see [`crate::notify`]): waiting
//! Lease calls do not poll Redis themselves.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::{notify::Notifier, store::Store};

/// Most bounded steps one queue gets per round, so one huge backlog cannot starve the others.
const MAX_STEPS_PER_ROUND: usize = 20;

/// Runs the reaper until `stop`.
pub async fn run(
    store: Arc<Store>,
    notifier: Arc<Notifier>,
    interval: std::time::Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match round(&store, &notifier).await {
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

async fn round(store: &Store, notifier: &Notifier) -> crate::error::Result<()> {
    // Costs at most one SADD per active queue per round, and heals a registry entry that
    // another replica's DeleteQueue removed while this one kept enqueueing.
    store.forget_registrations();
    for queue in store.known_queues().await? {
        for _ in 0..MAX_STEPS_PER_ROUND {
            let outcome = store.reap(&queue).await?;
            if outcome.reclaimed + outcome.promoted + outcome.dropped > 0 {
                tracing::debug!(
                    queue = %queue,
                    reclaimed = outcome.reclaimed,
                    promoted = outcome.promoted,
                    dropped = outcome.dropped,
                    "reaped"
                );
            }
            // The safety net for lost notifications, one script call per queue and round
            // however many Lease calls wait: local waiters of a queue with leasable items look
            // again, and those that return on a drained queue hear that it is.
            if notifier.has_waiters(&queue) {
                if outcome.ready > 0 && !outcome.paused {
                    notifier.wake(&queue, outcome.ready);
                } else if outcome.drained {
                    notifier.wake(&queue, 0);
                }
            }
            if !outcome.more {
                break;
            }
        }
    }
    Ok(())
}
