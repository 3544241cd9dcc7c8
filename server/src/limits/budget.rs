//! The byte budget: what all calls together, and each connection's calls, may hold, and the
//! ledger of what one call holds.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use super::{ConnectionLimits, Peer, RECEIVE_OVERHEAD_BYTES, ROOM_WAIT};

/// The broker-wide budget of call bytes and the message limits it meters against.
#[derive(Debug)]
pub struct Budget {
    global: Arc<Semaphore>,
    /// Notified whenever a charge is released, for calls waiting for room.
    released: Arc<Notify>,
    global_bytes: usize,
    per_connection_bytes: usize,
    pub(super) message_bytes: usize,
    pub(super) open_message_bytes: usize,
    pub(super) receive_timeout: Duration,
}

impl Budget {
    /// The budget of `limits`; `max_message_bytes` caps what one announced message is charged.
    pub fn new(limits: &ConnectionLimits, max_message_bytes: usize) -> Self {
        Self {
            global: Arc::new(Semaphore::new(limits.max_buffered_bytes)),
            released: Arc::new(Notify::new()),
            global_bytes: limits.max_buffered_bytes,
            per_connection_bytes: limits.max_buffered_bytes_per_connection,
            message_bytes: max_message_bytes,
            open_message_bytes: limits.open_message_bytes(max_message_bytes),
            receive_timeout: limits.receive_timeout,
        }
    }

    /// Takes a new call's charges at once, or explains why not: `base` for the whole call,
    /// and [`RECEIVE_OVERHEAD_BYTES`] while its request is being received.
    pub(super) fn admit(
        &self,
        peer: Option<&Peer>,
        base: usize,
    ) -> Result<(Ledger, Charge), Status> {
        let connection = peer.map(|p| Arc::clone(&p.state.budget));
        let take = |bytes| {
            take(connection.as_ref(), &self.global, bytes, &self.released)
                .map_err(|short| self.refusal(short))
        };
        let base = take(base)?;
        let receiving = take(RECEIVE_OVERHEAD_BYTES)?;
        let ledger = Ledger {
            connection,
            global: Arc::clone(&self.global),
            released: Arc::clone(&self.released),
            held: Mutex::new(Held {
                _base: base,
                messages: None,
            }),
        };
        Ok((ledger, receiving))
    }
}

impl Budget {
    pub(super) fn refusal(&self, short: Short) -> Status {
        match short {
            Short::Connection => Status::resource_exhausted(format!(
                "this connection's calls hold too many bytes \
                 (--max-buffered-bytes-per-connection {}); retry when some have ended, or \
                 spread calls over more connections",
                self.per_connection_bytes
            )),
            Short::Broker => Status::resource_exhausted(format!(
                "the broker's calls hold too many bytes (--max-buffered-bytes {}); retry later \
                 or on another replica",
                self.global_bytes
            )),
        }
    }
}

/// Which share had too few bytes left.
pub(super) enum Short {
    Connection,
    Broker,
}

/// Takes `bytes` from the connection's share and the broker's budget, both or neither.
///
/// Only ever `try_acquire`: a waiter queued inside a tokio semaphore takes every free permit
/// while it waits for the rest, so one large message waiting would refuse every small call.
/// Waiters wait on `released` instead and try again.
fn take(
    connection: Option<&Arc<Semaphore>>,
    global: &Arc<Semaphore>,
    bytes: usize,
    released: &Arc<Notify>,
) -> Result<Charge, Short> {
    // Checked at start-up: every charge fits u32.
    let permits = u32::try_from(bytes).unwrap_or(u32::MAX);
    let local = match connection {
        Some(share) => Some(
            Arc::clone(share)
                .try_acquire_many_owned(permits)
                .map_err(|_| Short::Connection)?,
        ),
        None => None,
    };
    // Giving the connection's bytes back wakes nobody: waking the other waiters here would
    // have them wake each other for ever. A waiter of this connection that found its share short
    // meanwhile is woken by the next release, or refused after ROOM_WAIT.
    let global = Arc::clone(global)
        .try_acquire_many_owned(permits)
        .map_err(|_| Short::Broker)?;
    Ok(Charge {
        connection: local,
        global: Some(global),
        released: Arc::clone(released),
    })
}

/// Permits taken from a connection's share and from the broker's budget; dropping them wakes
/// the calls waiting for room.
#[derive(Debug)]
pub(super) struct Charge {
    connection: Option<OwnedSemaphorePermit>,
    global: Option<OwnedSemaphorePermit>,
    released: Arc<Notify>,
}

impl Charge {
    fn merge(&mut self, mut other: Self) {
        for (mine, theirs) in [
            (&mut self.connection, other.connection.take()),
            (&mut self.global, other.global.take()),
        ] {
            match (mine.as_mut(), theirs) {
                (Some(mine), Some(theirs)) => mine.merge(theirs),
                (None, theirs) => *mine = theirs,
                (Some(_), None) => {}
            }
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let freed = self.connection.take().is_some() | self.global.take().is_some();
        if freed {
            self.released.notify_waiters();
        }
    }
}

#[derive(Debug)]
struct Held {
    /// Headers and overhead, for the whole call (held for its drop).
    _base: Charge,
    /// The request messages announced so far (only the latest one for streaming requests).
    messages: Option<Charge>,
}

/// Everything one call holds; released when the last of its request body and its response
/// future is gone.
#[derive(Debug)]
pub(super) struct Ledger {
    connection: Option<Arc<Semaphore>>,
    global: Arc<Semaphore>,
    released: Arc<Notify>,
    held: Mutex<Held>,
}

pub(super) type Acquiring = Pin<Box<dyn Future<Output = Result<Charge, Status>> + Send>>;

impl Ledger {
    /// Waits up to [`ROOM_WAIT`] until `bytes` can be taken from the connection's share and
    /// the broker's budget.
    pub(super) fn acquire(&self, bytes: usize, shares: Arc<Budget>) -> Acquiring {
        let connection = self.connection.clone();
        let global = Arc::clone(&self.global);
        let released = Arc::clone(&self.released);
        Box::pin(async move {
            let give_up = tokio::time::sleep(ROOM_WAIT);
            tokio::pin!(give_up);
            loop {
                // Registered before trying, so a release in between is not missed.
                let notified = released.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                match take(connection.as_ref(), &global, bytes, &released) {
                    Ok(charge) => return Ok(charge),
                    Err(short) => {
                        tokio::select! {
                            () = &mut notified => {}
                            () = &mut give_up => return Err(shares.refusal(short)),
                        }
                    }
                }
            }
        })
    }

    pub(super) fn record(&self, charge: Charge, replace: bool) {
        let mut held = match self.held.lock() {
            Ok(held) => held,
            Err(poisoned) => poisoned.into_inner(),
        };
        match (&mut held.messages, replace) {
            (Some(messages), false) => messages.merge(charge),
            (slot, _) => *slot = Some(charge),
        }
    }
}
