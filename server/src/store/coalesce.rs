//! Coalescing of concurrent calls on one queue into one script call.
//!
//! While a script call for a key (a queue; for Lease, a queue and lease duration) is in flight,
//! further calls with the same key wait in line; when it returns, everything that waited goes
//! out together in the next call, up to a limit of items per call. A call that finds nothing in
//! flight goes at once, so an idle broker adds no delay, and a busy one makes one script call
//! for many callers: fewer script runs and round trips for Redis, and thousands of simultaneous
//! Leases become a few script calls instead of a queue of thousands on the shared connection.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// One call waiting for its turn.
struct Waiting<Req, Out> {
    weight: usize,
    request: Req,
    reply: oneshot::Sender<Result<Out>>,
}

type Line<Req, Out> = VecDeque<Waiting<Req, Out>>;

/// Lines of waiting calls by key. A key is present exactly while a runner task serves it.
pub(crate) struct Coalescer<K, Req, Out> {
    limit: usize,
    lines: Mutex<HashMap<K, Line<Req, Out>>>,
}

impl<K, Req, Out> std::fmt::Debug for Coalescer<K, Req, Out> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl<K, Req, Out> Coalescer<K, Req, Out>
where
    K: Eq + Hash + Clone + Send + 'static,
    Req: Send + 'static,
    Out: Send + 'static,
{
    /// A coalescer whose combined calls carry at most `limit` weight (items), unless a single
    /// call alone weighs more.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            lines: Mutex::default(),
        }
    }

    fn lines(&self) -> MutexGuard<'_, HashMap<K, Line<Req, Out>>> {
        // Nothing panics while holding the lock; a poisoned map is still consistent.
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `request` (weighing `weight` items) through `run`, together with the calls of the
    /// same key that wait meanwhile. `run` receives the requests in arrival order and returns
    /// one output per request. The combined call runs in its own task, so a caller that goes
    /// away does not cancel it for the others.
    pub(crate) async fn call<F, Fut>(
        self: &Arc<Self>,
        key: K,
        weight: usize,
        request: Req,
        run: F,
    ) -> Result<Out>
    where
        F: Fn(K, Vec<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<Out>>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let waiting = Waiting {
            weight,
            request,
            reply,
        };
        let start_runner = {
            let mut lines = self.lines();
            match lines.get_mut(&key) {
                Some(line) => {
                    line.push_back(waiting);
                    false
                }
                None => {
                    lines.insert(key.clone(), VecDeque::from([waiting]));
                    true
                }
            }
        };
        if start_runner {
            tokio::spawn(Arc::clone(self).serve(key, run));
        }
        answer
            .await
            .map_err(|_| Error::Internal("a coalesced call ended without a reply".into()))?
    }

    /// Serves the line of `key` until it is empty, one combined call at a time.
    async fn serve<F, Fut>(self: Arc<Self>, key: K, run: F)
    where
        F: Fn(K, Vec<Req>) -> Fut,
        Fut: Future<Output = Result<Vec<Out>>>,
    {
        // Should `run` panic, the line is dropped (its callers get an error) and the key freed,
        // so later calls start a new runner instead of waiting behind a dead one.
        let mut guard = Release {
            owner: &self,
            key: Some(key.clone()),
        };
        loop {
            let batch = match self.next_batch(&key) {
                Some(batch) => batch,
                None => {
                    guard.key = None;
                    return;
                }
            };
            let (requests, replies): (Vec<Req>, Vec<_>) =
                batch.into_iter().map(|w| (w.request, w.reply)).unzip();
            let count = replies.len();
            match run(key.clone(), requests).await {
                Ok(outputs) if outputs.len() == count => {
                    for (reply, output) in replies.into_iter().zip(outputs) {
                        let _ = reply.send(Ok(output));
                    }
                }
                Ok(_) => {
                    let error = Error::Internal("a combined call answered the wrong count".into());
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
                Err(error) => {
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        }
    }

    /// Takes the next combined call's requests off the line, or frees the key when the line is
    /// empty (then `None`).
    fn next_batch(&self, key: &K) -> Option<Vec<Waiting<Req, Out>>> {
        let mut lines = self.lines();
        let line = lines.get_mut(key)?;
        let mut batch = Vec::new();
        let mut weight = 0;
        while let Some(next) = line.front() {
            if !batch.is_empty() && weight + next.weight > self.limit {
                break;
            }
            weight += next.weight;
            batch.extend(line.pop_front());
        }
        if batch.is_empty() {
            lines.remove(key);
            return None;
        }
        Some(batch)
    }
}

/// Frees a key whose runner ended without emptying its line (a panic).
struct Release<'a, K: Eq + Hash, Req, Out> {
    owner: &'a Coalescer<K, Req, Out>,
    key: Option<K>,
}

impl<K: Eq + Hash, Req, Out> Drop for Release<'_, K, Req, Out> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut lines = self
                .owner
                .lines
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            lines.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Mutex as StdMutex, time::Duration};

    use tokio::sync::Notify;

    use super::*;

    /// Records each combined call's requests; the first call holds until `open` is notified.
    #[derive(Default)]
    struct Recorder {
        calls: StdMutex<Vec<Vec<u32>>>,
        open: Notify,
    }

    fn doubling(
        recorder: &Arc<Recorder>,
    ) -> impl Fn(
        &'static str,
        Vec<u32>,
    ) -> futures_util::future::BoxFuture<'static, Result<Vec<u32>>>
    + Send
    + 'static {
        let recorder = Arc::clone(recorder);
        move |_key, requests| {
            let recorder = Arc::clone(&recorder);
            Box::pin(async move {
                let first = {
                    let mut calls = recorder.calls.lock().expect("not poisoned");
                    calls.push(requests.clone());
                    calls.len() == 1
                };
                if first {
                    recorder.open.notified().await;
                }
                Ok(requests.iter().map(|r| r * 2).collect())
            })
        }
    }

    #[tokio::test]
    async fn calls_that_wait_behind_one_in_flight_go_out_together_within_the_limit() {
        let coalescer = Arc::new(Coalescer::<&str, u32, u32>::new(5));
        let recorder = Arc::<Recorder>::default();
        let submit = |request: u32| {
            let coalescer = Arc::clone(&coalescer);
            let run = doubling(&recorder);
            tokio::spawn(async move { coalescer.call("q", request as usize, request, run).await })
        };
        let mut answers = vec![submit(1)];
        while recorder.calls.lock().expect("not poisoned").is_empty() {
            tokio::task::yield_now().await;
        }
        // The first call is in flight (held); these wait in line, in this order.
        answers.extend([2, 3, 4, 5].map(submit));
        // Another key is not held up by the first.
        let other = tokio::time::timeout(
            Duration::from_secs(5),
            coalescer.call("other", 1, 7, doubling(&recorder)),
        )
        .await
        .expect("not held up");
        assert_eq!(other.ok(), Some(14));
        recorder.open.notify_one();
        let mut got = Vec::new();
        for answer in answers {
            got.push(answer.await.expect("task").ok());
        }
        assert_eq!(got, [2, 4, 6, 8, 10].map(Some));
        let calls = recorder.calls.lock().expect("not poisoned").clone();
        assert_eq!(calls, [vec![1], vec![7], vec![2, 3], vec![4], vec![5]]);
    }

    #[tokio::test]
    async fn one_failure_answers_every_caller_of_that_call_and_the_key_recovers() {
        let coalescer = Arc::new(Coalescer::<&str, u32, u32>::new(10));
        let failing = |_key, requests: Vec<u32>| async move {
            if requests.contains(&0) {
                Err(Error::Unavailable("down".into()))
            } else {
                Ok(requests)
            }
        };
        assert!(matches!(
            coalescer.call("q", 1, 0, failing).await,
            Err(Error::Unavailable(_))
        ));
        assert_eq!(coalescer.call("q", 1, 3, failing).await.ok(), Some(3));
    }

    #[tokio::test]
    async fn a_runner_that_panics_frees_its_key() {
        let coalescer = Arc::new(Coalescer::<&str, u32, u32>::new(10));
        let panicking = |_key, requests: Vec<u32>| async move {
            assert!(!requests.contains(&0), "boom");
            Ok(requests)
        };
        assert!(matches!(
            coalescer.call("q", 1, 0, panicking).await,
            Err(Error::Internal(_))
        ));
        let next =
            tokio::time::timeout(Duration::from_secs(5), coalescer.call("q", 1, 4, panicking));
        assert_eq!(next.await.expect("not stuck").ok(), Some(4));
    }

    #[tokio::test]
    async fn a_wrong_count_is_an_internal_error_for_everyone() {
        let coalescer = Arc::new(Coalescer::<&str, u32, u32>::new(10));
        let short = |_key, _requests: Vec<u32>| async move { Ok(Vec::new()) };
        assert!(matches!(
            coalescer.call("q", 1, 1, short).await,
            Err(Error::Internal(_))
        ));
    }
}
