//! Byte accounts and the charges taken from them: the broker's budget, a connection's share
//! and the open services' share are each an [`Account`]; a [`Charge`] gives its bytes back to
//! every account it was taken from when it is dropped.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::Notify;

/// A count of bytes held against a limit.
///
/// Not a semaphore, for two reasons: a waiter queued inside a tokio semaphore takes every free
/// permit while it waits for the rest, so one large message waiting would refuse every small
/// call (waiters wait on [`Accounts::released`] instead and try again); and a reply that has
/// already been produced cannot be refused, so it is charged even past the limit
/// ([`Accounts::force`]), which a semaphore cannot express. While an account is over its
/// limit, nothing new fits, so new calls are refused until enough has been sent or dropped.
#[derive(Debug)]
pub(super) struct Account {
    limit: usize,
    used: AtomicUsize,
}

impl Account {
    pub(super) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Takes `bytes` if they fit under the limit.
    fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn force(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    fn give(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Bytes held now (for tests and logs).
    pub(super) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// Which account had too few bytes left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Short {
    Connection,
    Broker,
    OpenStreams,
}

/// The accounts one call is charged to: always the broker's budget, the connection's share
/// when the call came through [`super::incoming`], and the open services' share for their
/// long-lived calls.
#[derive(Debug)]
pub(super) struct Accounts {
    pub(super) global: Arc<Account>,
    pub(super) connection: Option<Arc<Account>>,
    pub(super) open_streams: Option<Arc<Account>>,
    /// Notified whenever a charge is released, for calls waiting for room.
    pub(super) released: Arc<Notify>,
}

impl Accounts {
    fn each(&self) -> impl Iterator<Item = (&Account, Short)> {
        [
            self.connection.as_deref().map(|a| (a, Short::Connection)),
            self.open_streams
                .as_deref()
                .map(|a| (a, Short::OpenStreams)),
            Some((&*self.global, Short::Broker)),
        ]
        .into_iter()
        .flatten()
    }

    /// Takes `bytes` from every account, or from none.
    pub(super) fn take(self: &Arc<Self>, bytes: usize) -> Result<Charge, Short> {
        let mut taken = Vec::with_capacity(3);
        for (account, short) in self.each() {
            if !account.try_take(bytes) {
                // Giving the bytes back wakes nobody: waking the other waiters here would have
                // them wake each other for ever. A waiter that found an account short meanwhile
                // is woken by the next release, or refused after ROOM_WAIT.
                for account in taken {
                    Account::give(account, bytes);
                }
                return Err(short);
            }
            taken.push(account);
        }
        Ok(Charge {
            accounts: Arc::clone(self),
            bytes,
        })
    }

    /// Charges `bytes` to every account even past its limit: for what the broker already
    /// holds and cannot refuse (a reply that has been produced).
    pub(super) fn force(self: &Arc<Self>, bytes: usize) -> Charge {
        let mut charge = Charge {
            accounts: Arc::clone(self),
            bytes: 0,
        };
        charge.set(bytes);
        charge
    }
}

/// Bytes taken from a call's [`Accounts`]; dropping the charge gives them back and wakes the
/// calls waiting for room.
#[derive(Debug)]
pub(super) struct Charge {
    accounts: Arc<Accounts>,
    bytes: usize,
}

impl Charge {
    /// Adds `other` (taken from the same accounts) to this charge.
    pub(super) fn merge(&mut self, mut other: Self) {
        debug_assert!(Arc::ptr_eq(&self.accounts, &other.accounts));
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// Makes this charge `bytes`: gives back the difference, or charges it even past the
    /// limits.
    pub(super) fn set(&mut self, bytes: usize) {
        if bytes > self.bytes {
            for (account, _) in self.accounts.each() {
                account.force(bytes - self.bytes);
            }
            self.bytes = bytes;
        } else if bytes < self.bytes {
            for (account, _) in self.accounts.each() {
                account.give(self.bytes - bytes);
            }
            self.bytes = bytes;
            self.accounts.released.notify_waiters();
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts(global: usize, connection: usize) -> Arc<Accounts> {
        Arc::new(Accounts {
            global: Account::new(global),
            connection: Some(Account::new(connection)),
            open_streams: None,
            released: Arc::new(Notify::new()),
        })
    }

    #[test]
    fn a_charge_is_taken_from_every_account_or_none() {
        let accounts = accounts(100, 50);
        let first = accounts.take(40).expect("fits");
        assert_eq!(accounts.take(20).err(), Some(Short::Connection));
        assert_eq!(
            accounts.global.used(),
            40,
            "nothing kept of a refused charge"
        );
        drop(first);
        assert_eq!(accounts.global.used(), 0);
    }

    #[test]
    fn a_forced_charge_passes_the_limit_and_refuses_new_charges_until_released() {
        let accounts = accounts(100, 100);
        let mut reply = accounts.force(150);
        assert_eq!(accounts.global.used(), 150);
        assert!(
            accounts.take(1).is_err(),
            "nothing fits while over the limit"
        );
        reply.set(60);
        let small = accounts.take(40).expect("fits again once under the limit");
        drop((reply, small));
        assert_eq!(accounts.global.used(), 0);
        assert_eq!(accounts.connection.as_ref().map(|a| a.used()), Some(0));
    }
}
