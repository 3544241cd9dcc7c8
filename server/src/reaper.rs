//! The background reaper that runs in every broker replica: at every interval it visits every
//! known queue, reclaims expired leases, promotes due delayed items and trims dead letters, in
//! bounded script calls. Several replicas reaping at once is safe: each step is one atomic script.

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
            // The slow safety net for lost notifications: local waiters of a queue with ready
            // items look again.
            if outcome.ready > 0 && notifier.has_waiters(&queue) {
                notifier.wake(&queue, outcome.ready);
            }
            if !outcome.more {
                break;
            }
        }
    }
    Ok(())
}
