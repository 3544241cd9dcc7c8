//! The Lease call's waiting and cancellation logic.
//!
//! A Lease with `max_wait` first tries to lease; when nothing is ready it waits for a
//! notification (see [`crate::tasks::notify`]), the due time of the earliest delayed item, the
//! caller's deadline, broker shutdown or (when configured) its own re-check, whichever comes
//! first, and tries again. A lost notification is made up for by the reaper, per queue.
//! With `return_if_drained` it also returns, empty, as soon as the queue is drained, and with
//! `return_if_sealed_and_drained` as soon as it is sealed and drained; scripts announce the
//! moment a queue drains (and sealing a drained queue), so such a waiter hears of it at once.
//! Each script call runs in its own task: if the caller goes away while items are being leased
//! for it, the task gives them back at once instead of leaving them to expire.

use std::{sync::Arc, time::Duration};

use tokio::{sync::oneshot, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    error::{Error, Result},
    grpc::waiting::Claim,
    lease_id::LeaseId,
    model::LeaseBatch,
    store::Store,
    tasks::notify::Notifier,
};

/// One validated Lease call.
#[derive(Debug, Clone)]
pub struct LeaseCall {
    /// The queue.
    pub queue: String,
    /// Most items to grant.
    pub max_items: u32,
    /// The lease duration.
    pub lease: Duration,
    /// How long to wait for work, already capped by the caller's deadline.
    pub max_wait: Duration,
    /// End the wait when the queue is drained.
    pub return_if_drained: bool,
    /// End the wait when the queue is sealed and drained.
    pub return_if_sealed_and_drained: bool,
}

impl LeaseCall {
    /// Whether this call ends its wait on `batch`'s drain news.
    fn ends_on(&self, batch: &LeaseBatch) -> bool {
        batch.drained
            && (self.return_if_drained || (self.return_if_sealed_and_drained && batch.sealed))
    }

    /// Whether drain announcements concern this call.
    fn hears_drains(&self) -> bool {
        self.return_if_drained || self.return_if_sealed_and_drained
    }
}

/// Leases with waiting, as described in the module docs.
///
/// # Errors
/// UNAVAILABLE when Redis does not answer; RESOURCE_EXHAUSTED when the call would wait and
/// a waiting slot of the broker, the caller's grant or its connection is not free.
pub async fn lease_or_wait(
    store: &Arc<Store>,
    notifier: &Notifier,
    call: &LeaseCall,
    waiting: &Claim,
    shutdown: &CancellationToken,
) -> Result<LeaseBatch> {
    if call.max_wait.is_zero() {
        // A call that never waits needs no wake-up point: registering one would make its queue
        // look waited on to the reaper's safety net.
        let batch = lease_once(store, call).await?;
        if batch.ready_left > 0 {
            notifier.wake(&call.queue, batch.ready_left);
        }
        return Ok(batch);
    }
    let deadline = Instant::now() + call.max_wait;
    let recheck = jittered(store.config().wait_recheck);
    let watch = notifier.watch(&call.queue);
    let mut waiting_slot = None;
    loop {
        // Registered before the attempt, so a notification sent while the script runs is kept.
        let notified = watch.ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let drained = watch.drained.notified();
        tokio::pin!(drained);
        drained.as_mut().enable();

        let batch = lease_once(store, call).await?;
        let now = Instant::now();
        let drained_news = call.ends_on(&batch);
        if !batch.items.is_empty() || now >= deadline || shutdown.is_cancelled() || drained_news {
            if batch.ready_left > 0 {
                // More work is ready: pass the baton to the next local waiter.
                notifier.wake(&call.queue, batch.ready_left);
            }
            return Ok(batch);
        }
        if waiting_slot.is_none() {
            // Held until the call ends: each waiter costs a task, a timer and a Notify entry.
            waiting_slot = Some(waiting.try_acquire()?);
            notifier.parked(&call.queue);
        }
        let mut wake_at = match recheck {
            Some(recheck) => deadline.min(now + recheck),
            None => deadline,
        };
        if let Some(due_ms) = batch.next_due_ms {
            let until_due = u64::try_from(due_ms.saturating_sub(batch.now_ms)).unwrap_or(0);
            wake_at = wake_at.min(now + Duration::from_millis(until_due));
        }
        tokio::select! {
            () = &mut notified => {}
            () = &mut drained, if call.hears_drains() => {}
            () = tokio::time::sleep_until(wake_at) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

/// This waiter's re-check period: uniform over the second half of `period`, so waiters that
/// started together do not re-check together; `None` when re-checks are off.
fn jittered(period: Duration) -> Option<Duration> {
    if period.is_zero() {
        return None;
    }
    Some(period.mul_f64(0.5 + rand::random::<f64>() / 2.0))
}

/// One lease script call that survives the caller's cancellation.
async fn lease_once(store: &Arc<Store>, call: &LeaseCall) -> Result<LeaseBatch> {
    let (reply, receiver) = oneshot::channel();
    let store = Arc::clone(store);
    let call = call.clone();
    tokio::spawn(async move {
        let result = store
            .lease_combined(&call.queue, call.max_items, call.lease)
            .await;
        if let Err(Ok(batch)) = reply.send(result)
            && !batch.items.is_empty()
        {
            give_back(&store, &call.queue, &batch).await;
        }
    });
    receiver
        .await
        .map_err(|_| Error::Internal("lease task ended without a reply".into()))?
}

async fn give_back(store: &Store, queue: &str, batch: &LeaseBatch) {
    let leases: Vec<LeaseId> = batch
        .items
        .iter()
        .map(|item| LeaseId {
            queue: queue.to_owned(),
            item_id: item.id.clone(),
            token: item.token.clone(),
        })
        .collect();
    match store.release(queue, &leases).await {
        Ok(_) => tracing::info!(
            queue = %queue,
            count = leases.len(),
            "caller went away during lease; released its items"
        ),
        Err(error) => tracing::warn!(
            queue = %queue,
            %error,
            "caller went away during lease and releasing failed; the leases will expire"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recheck_is_off_at_zero_and_spread_over_the_second_half_otherwise() {
        assert_eq!(jittered(Duration::ZERO), None);
        let period = Duration::from_secs(10);
        let spread: Vec<Duration> = (0..200).filter_map(|_| jittered(period)).collect();
        assert_eq!(spread.len(), 200);
        assert!(spread.iter().all(|d| *d >= period / 2 && *d <= period));
        let distinct: std::collections::HashSet<_> = spread.iter().collect();
        assert!(
            distinct.len() > 100,
            "not one shared instant: {}",
            distinct.len()
        );
    }
}
