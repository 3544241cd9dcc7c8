//! The items a worker holds, and the one heartbeat that keeps all their leases alive.
//!
//! An item is held from the moment its lease is granted until its outcome is reported, so a
//! shutdown can release whatever is unfinished. While it waits for a free slot or its handler
//! runs (not while it is being given back to the queue), its lease is extended: one ExtendLease call per period for all such items together (in
//! chunks the broker accepts), rather than a timer and a call per item.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use wq_client::{Client, pb};

use crate::chunked;

/// Most lease ids one heartbeat call carries (the broker's default batch limit is 1000).
const MAX_EXTEND_BATCH: usize = 500;

/// The state of one held item.
#[derive(Debug, Default)]
pub(crate) struct Held {
    lost: AtomicBool,
    handled: AtomicBool,
}

impl Held {
    /// The lease was lost (expired and taken over, or the item is gone): the outcome must not
    /// be reported.
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// The handler is done (or the item is being given back): the lease needs no more
    /// extending.
    pub(crate) fn set_handled(&self) {
        self.handled.store(true, Ordering::SeqCst);
    }

    /// The item is to run after all: its lease is extended again.
    pub(crate) fn set_unhandled(&self) {
        self.handled.store(false, Ordering::SeqCst);
    }
}

/// Every item the worker holds, by lease id.
#[derive(Debug, Default)]
pub(crate) struct InWork {
    leases: Mutex<HashMap<String, Arc<Held>>>,
}

impl InWork {
    /// Starts holding `lease_id`.
    pub(crate) fn hold(&self, lease_id: &str) -> Arc<Held> {
        let held = Arc::<Held>::default();
        if let Ok(mut leases) = self.leases.lock() {
            leases.insert(lease_id.to_owned(), Arc::clone(&held));
        }
        held
    }

    /// Stops holding `lease_id`: its outcome is reported, or it is lost.
    pub(crate) fn forget(&self, lease_id: &str) {
        if let Ok(mut leases) = self.leases.lock() {
            leases.remove(lease_id);
        }
    }

    /// Lease ids still held, for releasing at shutdown.
    pub(crate) fn unfinished(&self) -> Vec<String> {
        self.leases
            .lock()
            .map(|leases| leases.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn to_extend(&self) -> Vec<(String, Arc<Held>)> {
        self.leases
            .lock()
            .map(|leases| {
                leases
                    .iter()
                    .filter(|(_, held)| !held.handled.load(Ordering::SeqCst))
                    .map(|(id, held)| (id.clone(), Arc::clone(held)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Extends every held, unhandled lease at a third of the lease duration until `stop`; flags
/// the leases the broker reports as no longer live. A failed call is retried at the next beat,
/// which still comes before the lease expires.
pub(crate) async fn heartbeat(
    client: Client,
    queue: String,
    lease: Duration,
    in_work: Arc<InWork>,
    stop: CancellationToken,
) {
    let every = lease / 3;
    let mut chunk_size = MAX_EXTEND_BATCH;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let due = in_work.to_extend();
        let ids: Vec<String> = due.iter().map(|(id, _)| id.clone()).collect();
        let (results, error) = chunked::send(ids, &mut chunk_size, String::len, |chunk| {
            client.extend_lease(&queue, chunk, lease)
        })
        .await;
        for ((_, held), result) in due.iter().zip(results) {
            if result.outcome() != pb::LeaseOutcome::Ok {
                held.lost.store(true, Ordering::SeqCst);
                tracing::warn!("lease lost (expired and taken over, or the item is gone)");
            }
        }
        if let Some(error) = error {
            tracing::warn!(%error, "heartbeat failed; retrying");
        }
    }
}
