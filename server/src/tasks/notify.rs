//! Long-poll wake-ups inside one broker process: the wake-up points of the Lease calls waiting
//! on each queue. Scripts that make items ready publish `<count>:<queue>` on the queue's
//! channel, and [`super::wakeups`] turns each message into a wake-up here, so idle waiters
//! never poll Redis.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, Weak},
};

use tokio::sync::Notify;

/// Most waiters one message wakes (a batch of thousands of items need not wake more).
const MAX_WAKE_PER_MESSAGE: u64 = 1024;

/// The wake-up points of one queue.
#[derive(Debug, Default)]
pub struct QueueWatch {
    /// Signalled once per item that became ready.
    pub ready: Notify,
    /// Signalled (to all) when the queue drains; only waiters that return on a drained queue
    /// listen, so a drain does not send every idle waiter back to Redis.
    pub drained: Notify,
}

/// Per-queue wake-up points shared by the waiting Lease calls of this process.
#[derive(Debug, Default)]
pub struct Notifier {
    queues: Mutex<HashMap<String, Weak<QueueWatch>>>,
    /// Queues on which a Lease call started to wait since the subscriptions last looked (see
    /// [`super::wakeups`]).
    parked: Mutex<HashSet<String>>,
    parked_changed: Notify,
}

impl Notifier {
    /// The wake-up points of `queue`; waiters hold the returned `Arc` while they wait.
    pub fn watch(&self, queue: &str) -> Arc<QueueWatch> {
        let Ok(mut queues) = self.queues.lock() else {
            // A poisoned map only means another thread panicked mid-update; a private watch
            // still works through the waiter's timed re-check.
            return Arc::default();
        };
        if let Some(existing) = queues.get(queue).and_then(Weak::upgrade) {
            return existing;
        }
        // Forget queues nobody waits on any more before adding one.
        queues.retain(|_, weak| weak.strong_count() > 0);
        let watch = Arc::<QueueWatch>::default();
        queues.insert(queue.to_owned(), Arc::downgrade(&watch));
        watch
    }

    fn get(&self, queue: &str) -> Option<Arc<QueueWatch>> {
        self.queues.lock().ok()?.get(queue).and_then(Weak::upgrade)
    }

    /// The queues some Lease call of this process waits on.
    pub fn waited_queues(&self) -> Vec<String> {
        match self.queues.lock() {
            Ok(queues) => queues
                .iter()
                .filter(|(_, weak)| weak.strong_count() > 0)
                .map(|(name, _)| name.clone())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// True when some Lease call of this process waits on `queue`.
    pub fn has_waiters(&self, queue: &str) -> bool {
        self.get(queue).is_some()
    }

    /// Wakes up to `count` waiters of `queue`: one per item that became ready, so a single
    /// item does not send every waiter to Redis. A count of 0 means the queue just drained: it
    /// wakes the waiters that asked to return on a drained queue, and only those.
    pub fn wake(&self, queue: &str, count: u64) {
        if let Some(watch) = self.get(queue) {
            if count == 0 {
                watch.drained.notify_waiters();
                return;
            }
            for _ in 0..count.min(MAX_WAKE_PER_MESSAGE) {
                watch.ready.notify_one();
            }
        }
    }

    /// Says that a Lease call parks on `queue`, so that its wake-ups are subscribed to.
    pub fn parked(&self, queue: &str) {
        if let Ok(mut parked) = self.parked.lock()
            && parked.insert(queue.to_owned())
        {
            self.parked_changed.notify_one();
        }
    }

    /// Waits until [`Notifier::parked`] was called.
    pub async fn parked_queues_changed(&self) {
        self.parked_changed.notified().await;
    }

    /// The queues parked on since the last call.
    pub fn take_parked(&self) -> Vec<String> {
        match self.parked.lock() {
            Ok(mut parked) => parked.drain().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Wakes every waiter of `queue` to look for itself, after its notifications may have been
    /// missed.
    pub fn wake_everyone(&self, queue: &str) {
        if let Some(watch) = self.get(queue) {
            watch.ready.notify_waiters();
            watch.drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn wake_reaches_a_registered_waiter_and_stale_queues_are_forgotten() {
        let notifier = Notifier::default();
        let watch = notifier.watch("q");
        assert!(notifier.has_waiters("q"));
        let waiter = watch.ready.notified();
        notifier.wake("q", 1);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken");
        drop(watch);
        assert!(!notifier.has_waiters("q"));
    }

    #[tokio::test]
    async fn drain_news_wakes_only_drain_listeners() {
        let notifier = Notifier::default();
        let watch = notifier.watch("q");
        let ready = watch.ready.notified();
        let drained = watch.drained.notified();
        tokio::pin!(ready, drained);
        ready.as_mut().enable();
        drained.as_mut().enable();
        notifier.wake("q", 0);
        tokio::time::timeout(Duration::from_secs(1), drained)
            .await
            .expect("a drain listener is woken");
        let still_waiting = tokio::time::timeout(Duration::from_millis(50), ready).await;
        assert!(
            still_waiting.is_err(),
            "a plain waiter sleeps through a drain"
        );
    }
}
