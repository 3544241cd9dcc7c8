//! The in-memory model of a queue: where each item should be, with what attempts, priority,
//! payload, error and times, which leases were issued and which of them are live, and the totals.

use std::collections::BTreeMap;

use proptest::test_runner::TestCaseError;
use wq_server::keys::QueueKeys;
use wq_tests::pb;

use super::{case::failure, ops::LeaseRef};

/// Where the model expects an item.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Slot {
    Ready,
    /// Due within `[earliest, latest]` (Unix ms): exact after a Fail, which reports it; bounded
    /// by the local clock around an Enqueue, which does not, until the first check reads it.
    Delayed {
        earliest: i64,
        latest: i64,
    },
    Leased {
        lease_id: String,
        expire_ms: i64,
    },
    Dead,
    /// Completed and kept by the broker's retention.
    Completed {
        result: Vec<u8>,
    },
}

impl Slot {
    pub(super) fn api_state(&self) -> pb::ItemState {
        match self {
            Self::Ready => pb::ItemState::Ready,
            Self::Delayed { .. } => pb::ItemState::Delayed,
            Self::Leased { .. } => pb::ItemState::Leased,
            Self::Dead => pb::ItemState::Dead,
            Self::Completed { .. } => pb::ItemState::Completed,
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct ItemModel {
    pub(super) payload: String,
    pub(super) priority: i32,
    pub(super) max_attempts: u32,
    /// The queue's enqueue sequence number: the item's place in line among equal priorities,
    /// kept across release, retry and reclaim.
    pub(super) seq: u64,
    /// Attempts that ended (Fail or expiry).
    pub(super) attempts: u32,
    pub(super) last_error: String,
    pub(super) slot: Slot,
}

/// A lease the broker granted, live or not.
#[derive(Debug, Clone)]
pub(super) struct Issued {
    pub(super) lease_id: String,
    pub(super) item_id: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Totals {
    pub(super) enqueued: u64,
    pub(super) completed: u64,
    pub(super) failed: u64,
    pub(super) reclaimed: u64,
}

/// What one queue should hold.
#[derive(Debug)]
pub(super) struct QueueModel {
    pub(super) name: String,
    pub(super) keys: QueueKeys,
    /// Stored items by id (completed ones only while the broker keeps them).
    pub(super) items: BTreeMap<String, ItemModel>,
    /// The last enqueue sequence number handed out.
    pub(super) seq: u64,
    pub(super) paused: bool,
    pub(super) issued: Vec<Issued>,
    pub(super) totals: Totals,
}

impl QueueModel {
    pub(super) fn new(name: String, key_prefix: &str) -> Self {
        Self {
            keys: QueueKeys::new(key_prefix, &name),
            name,
            items: BTreeMap::new(),
            seq: 0,
            paused: false,
            issued: Vec::new(),
            totals: Totals::default(),
        }
    }

    pub(super) fn is_live(&self, lease_id: &str) -> bool {
        self.holder_of(lease_id).is_some()
    }

    /// The id of the item `lease_id` holds, if the lease is live.
    pub(super) fn holder_of(&self, lease_id: &str) -> Option<String> {
        let issued = self.issued.iter().find(|l| l.lease_id == lease_id)?;
        let item = self.items.get(&issued.item_id)?;
        match &item.slot {
            Slot::Leased { lease_id: live, .. } if live == lease_id => Some(issued.item_id.clone()),
            _ => None,
        }
    }

    pub(super) fn resolve(&self, reference: LeaseRef) -> Option<String> {
        let (live, lost): (Vec<&Issued>, Vec<&Issued>) =
            self.issued.iter().partition(|l| self.is_live(&l.lease_id));
        let preferred = if reference.live { live } else { lost };
        let candidates: Vec<&Issued> = if preferred.is_empty() {
            self.issued.iter().collect()
        } else {
            preferred
        };
        let chosen = candidates.get(reference.index % candidates.len().max(1))?;
        Some(chosen.lease_id.clone())
    }

    /// Resolves every reference, or None when the queue never issued a lease.
    pub(super) fn resolve_all(&self, references: &[LeaseRef]) -> Option<Vec<String>> {
        references.iter().map(|r| self.resolve(*r)).collect()
    }

    pub(super) fn ids_in(&self, wanted: impl Fn(&Slot) -> bool) -> Vec<String> {
        self.items
            .iter()
            .filter(|(_, item)| wanted(&item.slot))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Ready ids in the order Lease grants them: highest priority first, then enqueue order.
    pub(super) fn ready_in_lease_order(&self) -> Vec<(String, &ItemModel)> {
        let mut ready: Vec<(String, &ItemModel)> = self
            .items
            .iter()
            .filter(|(_, item)| item.slot == Slot::Ready)
            .map(|(id, item)| (id.clone(), item))
            .collect();
        ready.sort_by_key(|(_, item)| (-item.priority, item.seq));
        ready
    }

    pub(super) fn count(&self, wanted: impl Fn(&Slot) -> bool) -> u64 {
        self.items.values().filter(|i| wanted(&i.slot)).count() as u64
    }

    pub(super) fn drained(&self) -> bool {
        self.count(|s| matches!(s, Slot::Ready | Slot::Delayed { .. } | Slot::Leased { .. })) == 0
    }

    pub(super) fn item_mut(&mut self, id: &str) -> Result<&mut ItemModel, TestCaseError> {
        self.items
            .get_mut(id)
            .ok_or_else(|| failure(format!("the model lost track of {id}")))
    }

    /// An attempt ended without success (Fail or expiry): counts it and says whether the item
    /// has attempts left.
    pub(super) fn end_attempt(&mut self, id: &str, error: &str) -> Result<bool, TestCaseError> {
        let item = self.item_mut(id)?;
        item.attempts += 1;
        item.last_error = error.to_owned();
        Ok(item.attempts < item.max_attempts)
    }
}
