//! The byte budget: what all calls together, each connection's calls, and the open services'
//! long-lived calls may hold, and the ledger of what one call holds.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;
use tonic::Status;

use super::{
    ConnectionLimits, Peer, RECEIVE_OVERHEAD_BYTES, ROOM_WAIT,
    account::{Account, Accounts, Charge, Short},
    connection::Busy,
};

/// The broker-wide budget of call bytes and the message limits it meters against.
#[derive(Debug)]
pub struct Budget {
    global: Arc<Account>,
    /// The share of `global` the open services' long-lived calls may hold.
    open_streams: Arc<Account>,
    /// As much again for their other calls (health Check): they need no token either, so a
    /// flood of half-sent ones must not take the budget from callers with one, nor the
    /// Watch share from probes' Checks.
    open_calls: Arc<Account>,
    released: Arc<Notify>,
    global_bytes: usize,
    per_connection_bytes: usize,
    open_stream_bytes: usize,
    pub(super) message_bytes: usize,
    pub(super) open_message_bytes: usize,
    pub(super) receive_timeout: Duration,
}

impl Budget {
    /// The budget of `limits`; `max_message_bytes` caps what one announced message is charged.
    pub fn new(limits: &ConnectionLimits, max_message_bytes: usize) -> Self {
        Self {
            global: Account::new(limits.max_buffered_bytes),
            open_streams: Account::new(limits.max_open_stream_bytes),
            open_calls: Account::new(limits.max_open_stream_bytes),
            released: Arc::new(Notify::new()),
            global_bytes: limits.max_buffered_bytes,
            per_connection_bytes: limits.max_buffered_bytes_per_connection,
            open_stream_bytes: limits.max_open_stream_bytes,
            message_bytes: max_message_bytes,
            open_message_bytes: limits.open_message_bytes(max_message_bytes),
            receive_timeout: limits.receive_timeout,
        }
    }

    /// Bytes all calls hold now, replies waiting to be sent included.
    pub fn held_bytes(&self) -> usize {
        self.global.used()
    }

    /// Takes a new call's charges at once, or explains why not: `base` for the whole call,
    /// and [`RECEIVE_OVERHEAD_BYTES`] while its request is being received. A call of the open
    /// services is charged to their share too (long-lived ones, `open_stream`, to one share,
    /// the others to a second of the same size); any other call keeps its connection busy (not
    /// evictable) while it lasts.
    pub(super) fn admit(
        &self,
        peer: Option<&Peer>,
        base: usize,
        open_stream: bool,
        open_service: bool,
    ) -> Result<(Ledger, Charge), Status> {
        let accounts = Arc::new(Accounts {
            global: Arc::clone(&self.global),
            connection: peer.map(|p| Arc::clone(&p.state.budget)),
            open_streams: if open_stream {
                Some(Arc::clone(&self.open_streams))
            } else if open_service {
                Some(Arc::clone(&self.open_calls))
            } else {
                None
            },
            released: Arc::clone(&self.released),
        });
        let take = |bytes| accounts.take(bytes).map_err(|short| self.refusal(short));
        let base = take(base)?;
        let receiving = take(RECEIVE_OVERHEAD_BYTES)?;
        let ledger = Ledger {
            accounts: Arc::clone(&accounts),
            held: Mutex::new(Held {
                _base: base,
                messages: None,
            }),
            _busy: peer.filter(|_| !open_service).map(Peer::busy),
        };
        Ok((ledger, receiving))
    }

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
            Short::OpenStreams => Status::resource_exhausted(format!(
                "the open services' calls (health, reflection) hold too many bytes \
                 (--max-open-stream-bytes {} for their long-lived calls, as much again for the \
                 others); retry later",
                self.open_stream_bytes
            )),
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

/// Everything one call holds; released when the last of its request body, its response
/// future and its reply body is gone.
#[derive(Debug)]
pub(super) struct Ledger {
    accounts: Arc<Accounts>,
    held: Mutex<Held>,
    /// Keeps the connection from being evicted as idle while the call lasts.
    _busy: Option<Busy>,
}

pub(super) type Acquiring = Pin<Box<dyn Future<Output = Result<Charge, Status>> + Send>>;

impl Ledger {
    /// Waits up to [`ROOM_WAIT`] until `bytes` can be taken from every account of the call.
    pub(super) fn acquire(&self, bytes: usize, shares: Arc<Budget>) -> Acquiring {
        let accounts = Arc::clone(&self.accounts);
        Box::pin(async move {
            let give_up = tokio::time::sleep(ROOM_WAIT);
            tokio::pin!(give_up);
            loop {
                // Registered before trying, so a release in between is not missed.
                let notified = accounts.released.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                match accounts.take(bytes) {
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

    /// Charges `bytes` of a reply that is waiting to be sent, past the limits if need be.
    pub(super) fn force(&self, bytes: usize) -> Charge {
        self.accounts.force(bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn small_budget() -> Budget {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            limits: ConnectionLimits,
        }
        let limits = <Flags as clap::Parser>::parse_from([
            "wq-server",
            "--max-buffered-bytes",
            "4194304",
            "--max-open-stream-bytes",
            "1048576",
        ])
        .limits;
        Budget::new(&limits, 1 << 20)
    }

    #[test]
    fn calls_without_a_token_cannot_take_the_budget_from_calls_with_one() {
        let budget = small_budget();
        let mut held = Vec::new();
        // Health Checks (open, not long-lived) until their share refuses one.
        let refused = loop {
            match budget.admit(None, 64 << 10, false, true) {
                Ok(call) => held.push(call),
                Err(status) => break status,
            }
            assert!(held.len() < 1000, "the open calls' share never ran out");
        };
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("--max-open-stream-bytes"),
            "{refused:?}"
        );
        assert!(
            budget.held_bytes() <= 1 << 20,
            "{} bytes",
            budget.held_bytes()
        );
        // Watch streams have a share of their own, and calls with a token the rest.
        budget
            .admit(None, 64 << 10, true, true)
            .expect("a Watch still fits its own share");
        budget
            .admit(None, 1 << 20, false, false)
            .expect("a worker's call still fits the budget");
    }
}
