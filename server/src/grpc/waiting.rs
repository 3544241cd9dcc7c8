//! Fair limits on Lease calls that wait for work: broker-wide (`--max-waiting-leases`), per
//! connection (`--max-waiting-leases-per-connection`) and per grant of the token file
//! (`--max-waiting-leases-per-grant`), so that one token, or one connection, cannot take every
//! slot and starve the others.
//!
//! Two relations make the limits bind where they matter:
//!
//! - A connection's waiting Leases may take at most [`waiting_streams`] of its
//!   `--max-streams-per-connection` (three quarters), whatever the per-connection flag says: a
//!   waiting Lease holds its stream for up to `max_wait`, and the connection's Complete and
//!   ExtendLease calls must still find a stream, or a worker waiting for new items could not
//!   report the ones it finished, nor keep their leases.
//! - Without a token file there are no grants: callers are told apart by their connection only,
//!   and the per-grant limit does not apply (counting every caller as one grant would cap an open
//!   broker at `--max-waiting-leases-per-grant`, below `--max-waiting-leases`).
//!
//! A Lease call makes a [`Claim`] from its request (who is asking, on which connection) and,
//! only once it has to wait, turns it into a [`WaitingPermit`] holding a slot of every limit
//! that applies; dropping the permit gives them back.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{config::BrokerConfig, error::Error, grpc::auth, limits::Peer};

/// How many of a connection's `streams` its waiting Leases may hold: three quarters, at least
/// one. The rest stay free for the connection's other calls.
pub fn waiting_streams(streams: u32) -> usize {
    let streams = streams as usize;
    streams.saturating_sub((streams / 4).max(1)).max(1)
}

/// The broker's waiting-Lease limits and who holds their slots.
#[derive(Debug, Clone)]
pub struct WaitingLimits {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    broker: Arc<Semaphore>,
    broker_limit: usize,
    /// The per-connection limit in force: the flag, or [`waiting_streams`] when that is less.
    per_connection: usize,
    /// Whether the per-connection limit in force is the flag's (for the refusal's message).
    per_connection_is_flag: bool,
    /// The connection's stream limit, for the message when [`waiting_streams`] binds.
    streams: u32,
    per_grant: usize,
    /// Slots held per connection and per grant; entries vanish at zero.
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    connections: HashMap<u64, usize>,
    grants: HashMap<Arc<str>, usize>,
}

impl WaitingLimits {
    /// The limits of `config`.
    pub fn new(config: &BrokerConfig) -> Self {
        let limits = &config.security.limits;
        let stream_share = waiting_streams(limits.max_streams_per_connection);
        let flag = limits.max_waiting_leases_per_connection;
        Self {
            inner: Arc::new(Inner {
                broker: Arc::new(Semaphore::new(config.max_waiting_leases)),
                broker_limit: config.max_waiting_leases,
                per_connection: flag.min(stream_share),
                per_connection_is_flag: flag <= stream_share,
                streams: limits.max_streams_per_connection,
                per_grant: limits.max_waiting_leases_per_grant,
                held: Mutex::new(Held::default()),
            }),
        }
    }

    /// Who is asking in `request`: its grant (see [`auth::caller`]; none when the broker runs
    /// without tokens) and its connection (see [`Peer::of`]; a request that did not come through
    /// the broker's listener counts only against its grant and the broker).
    pub fn claim<T>(&self, request: &tonic::Request<T>) -> Claim {
        let grant = auth::caller(request).map(|caller| Arc::<str>::from(caller.name()));
        Claim {
            limits: self.clone(),
            connection: Peer::of(request.extensions()).map(Peer::id),
            grant,
        }
    }
}

/// A Lease call's right to ask for a waiting slot.
#[derive(Debug)]
pub struct Claim {
    limits: WaitingLimits,
    connection: Option<u64>,
    grant: Option<Arc<str>>,
}

impl Claim {
    /// Takes a slot of every limit, or none.
    ///
    /// # Errors
    /// RESOURCE_EXHAUSTED naming the limit that is full.
    pub fn try_acquire(&self) -> Result<WaitingPermit, Error> {
        let inner = &self.limits.inner;
        let mut held = inner.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(grant) = &self.grant {
            let grant_count = held.grants.get(grant).copied().unwrap_or(0);
            if grant_count >= inner.per_grant {
                return Err(Error::ResourceExhausted(format!(
                    "caller {:?} already has {grant_count} Lease calls waiting for work in this \
                     broker (--max-waiting-leases-per-grant {}); retry later, or lease without \
                     max_wait",
                    &**grant, inner.per_grant
                )));
            }
        }
        let connection_count = self
            .connection
            .and_then(|id| held.connections.get(&id).copied())
            .unwrap_or(0);
        if connection_count >= inner.per_connection {
            let limit = if inner.per_connection_is_flag {
                format!(
                    "--max-waiting-leases-per-connection {}",
                    inner.per_connection
                )
            } else {
                format!(
                    "three quarters of --max-streams-per-connection {}, so that its other calls \
                     find a stream",
                    inner.streams
                )
            };
            return Err(Error::ResourceExhausted(format!(
                "this connection already has {connection_count} Lease calls waiting for work \
                 ({limit}); spread waiting calls over more connections, or lease without max_wait"
            )));
        }
        let broker = Arc::clone(&inner.broker).try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "too many Lease calls are waiting for work in this broker (--max-waiting-leases \
                 {}); retry later, spread workers over more replicas, or lease without max_wait",
                inner.broker_limit
            ))
        })?;
        if let Some(grant) = &self.grant {
            *held.grants.entry(Arc::clone(grant)).or_default() += 1;
        }
        if let Some(id) = self.connection {
            *held.connections.entry(id).or_default() += 1;
        }
        Ok(WaitingPermit {
            limits: self.limits.clone(),
            connection: self.connection,
            grant: self.grant.clone(),
            _broker: broker,
        })
    }
}

/// A waiting slot of every limit, given back on drop.
#[derive(Debug)]
pub struct WaitingPermit {
    limits: WaitingLimits,
    connection: Option<u64>,
    grant: Option<Arc<str>>,
    _broker: OwnedSemaphorePermit,
}

impl Drop for WaitingPermit {
    fn drop(&mut self) {
        let mut held = self
            .limits
            .inner
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(grant) = &self.grant {
            release(&mut held.grants, grant);
        }
        if let Some(id) = self.connection {
            release(&mut held.connections, &id);
        }
    }
}

/// Counts one slot of `key` back, forgetting keys that hold none.
fn release<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(count) = counts.get_mut(key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            counts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(broker: usize, per_connection: usize, per_grant: usize) -> WaitingLimits {
        let mut config = BrokerConfig {
            max_waiting_leases: broker,
            ..BrokerConfig::default()
        };
        config.security.limits.max_waiting_leases_per_connection = per_connection;
        config.security.limits.max_waiting_leases_per_grant = per_grant;
        WaitingLimits::new(&config)
    }

    fn claim(limits: &WaitingLimits, connection: u64, grant: &str) -> Claim {
        Claim {
            limits: limits.clone(),
            connection: Some(connection),
            grant: Some(grant.into()),
        }
    }

    #[test]
    fn waiting_leases_leave_a_quarter_of_a_connections_streams_free() {
        assert_eq!(waiting_streams(100), 75);
        assert_eq!(waiting_streams(4), 3);
        assert_eq!(waiting_streams(3), 2);
        assert_eq!(waiting_streams(2), 1);
        assert_eq!(
            waiting_streams(1),
            1,
            "one stream: a waiting Lease may still use it"
        );
        // The flag's default (100) is above the share of the default 100 streams.
        let config = BrokerConfig::default();
        let limits = WaitingLimits::new(&config);
        assert_eq!(limits.inner.per_connection, 75);
        let error = (0..76)
            .map(|_| claim(&limits, 1, "a").try_acquire())
            .collect::<Result<Vec<_>, _>>()
            .expect_err("the 76th is refused")
            .to_string();
        assert!(
            error.contains("three quarters of --max-streams-per-connection 100"),
            "{error}"
        );
    }

    #[test]
    fn each_limit_refuses_on_its_own_and_slots_come_back_on_drop() {
        let limits = limits(5, 2, 3);
        let a1 = claim(&limits, 1, "a");
        let first = a1.try_acquire().expect("a slot");
        let second = a1.try_acquire().expect("a second slot on connection 1");
        let error = a1
            .try_acquire()
            .expect_err("connection 1 is full")
            .to_string();
        assert!(error.contains("per-connection 2"), "{error}");
        let third = claim(&limits, 2, "a")
            .try_acquire()
            .expect("grant a's third");
        let error = claim(&limits, 3, "a")
            .try_acquire()
            .expect_err("grant a is full")
            .to_string();
        assert!(
            error.contains("\"a\"") && error.contains("per-grant 3"),
            "{error}"
        );
        // Another grant still gets in, until the broker is full.
        let b = claim(&limits, 4, "b");
        let _b1 = b.try_acquire().expect("grant b waits beside a");
        let _b2 = b.try_acquire().expect("grant b's second");
        let error = claim(&limits, 5, "c")
            .try_acquire()
            .expect_err("the broker is full")
            .to_string();
        assert!(error.contains("--max-waiting-leases 5"), "{error}");
        drop((first, second, third));
        claim(&limits, 1, "a")
            .try_acquire()
            .expect("slots came back");
        let held = limits.inner.held.lock().expect("lock");
        assert_eq!(held.grants.get("a"), None, "released counts are forgotten");
    }
}
