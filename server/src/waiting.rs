//! Fair limits on Lease calls that wait for work: broker-wide (`--max-waiting-leases`), per
//! connection (`--max-waiting-leases-per-connection`) and per grant of the token file
//! (`--max-waiting-leases-per-grant`; callers without a token are the grant "anonymous"), so
//! that one token, or one connection, cannot take every slot and starve the others.
//!
//! A Lease call makes a [`Claim`] from its request (who is asking, on which connection) and,
//! only once it has to wait, turns it into a [`WaitingPermit`] holding a slot of all three
//! limits; dropping the permit gives them back.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{auth, config::BrokerConfig, error::Error, limits::Peer};

/// The grant name of callers without a token.
pub const ANONYMOUS: &str = "anonymous";

/// The broker's waiting-Lease limits and who holds their slots.
#[derive(Debug, Clone)]
pub struct WaitingLimits {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    broker: Arc<Semaphore>,
    broker_limit: usize,
    per_connection: usize,
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
        Self {
            inner: Arc::new(Inner {
                broker: Arc::new(Semaphore::new(config.max_waiting_leases)),
                broker_limit: config.max_waiting_leases,
                per_connection: limits.max_waiting_leases_per_connection,
                per_grant: limits.max_waiting_leases_per_grant,
                held: Mutex::new(Held::default()),
            }),
        }
    }

    /// Who is asking in `request`: its grant (see [`auth::caller`]) and its connection (see
    /// [`Peer::of`]; a request that did not come through the broker's listener counts only
    /// against its grant and the broker).
    pub fn claim<T>(&self, request: &tonic::Request<T>) -> Claim {
        let grant: Arc<str> = auth::caller(request)
            .map_or(ANONYMOUS, auth::Caller::name)
            .into();
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
    grant: Arc<str>,
}

impl Claim {
    /// Takes a slot of every limit, or none.
    ///
    /// # Errors
    /// RESOURCE_EXHAUSTED naming the limit that is full.
    pub fn try_acquire(&self) -> Result<WaitingPermit, Error> {
        let inner = &self.limits.inner;
        let mut held = inner.held.lock().unwrap_or_else(|p| p.into_inner());
        let grant_count = held.grants.get(&self.grant).copied().unwrap_or(0);
        if grant_count >= inner.per_grant {
            return Err(Error::ResourceExhausted(format!(
                "caller {:?} already has {grant_count} Lease calls waiting for work in this broker \
                 (--max-waiting-leases-per-grant {}); retry later, or lease without max_wait",
                &*self.grant, inner.per_grant
            )));
        }
        let connection_count = self
            .connection
            .and_then(|id| held.connections.get(&id).copied())
            .unwrap_or(0);
        if connection_count >= inner.per_connection {
            return Err(Error::ResourceExhausted(format!(
                "this connection already has {connection_count} Lease calls waiting for work \
                 (--max-waiting-leases-per-connection {}); spread waiting calls over more \
                 connections, or lease without max_wait",
                inner.per_connection
            )));
        }
        let broker = Arc::clone(&inner.broker).try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "too many Lease calls are waiting for work in this broker (--max-waiting-leases \
                 {}); retry later, spread workers over more replicas, or lease without max_wait",
                inner.broker_limit
            ))
        })?;
        *held.grants.entry(Arc::clone(&self.grant)).or_default() += 1;
        if let Some(id) = self.connection {
            *held.connections.entry(id).or_default() += 1;
        }
        Ok(WaitingPermit {
            limits: self.limits.clone(),
            connection: self.connection,
            grant: Arc::clone(&self.grant),
            _broker: broker,
        })
    }
}

/// A waiting slot of every limit, given back on drop.
#[derive(Debug)]
pub struct WaitingPermit {
    limits: WaitingLimits,
    connection: Option<u64>,
    grant: Arc<str>,
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
        release(&mut held.grants, &self.grant);
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
            grant: grant.into(),
        }
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
