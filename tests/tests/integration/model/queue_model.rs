//! The in-memory model of a queue: where each item should be, with what attempts, priority,
//! payload, headers, error and times, which leases were issued and which of them are live, which
//! finished ids the queue remembers, its item generation and the deleted generations still in its
//! trash, whether its meta hash exists, and the totals. It also predicts what the broker's own
//! scripts do that no API call reports: how many items a Lease grants under the reply budget,
//! and what a reaper pass (reap.lua, delete_trash.lua) changes.

use std::collections::{BTreeMap, BTreeSet};

use proptest::test_runner::TestCaseError;
use wq_server::{config::REPLY_BYTES_PER_ITEM, keys::QueueKeys};
use wq_tests::pb;

use super::{
    DEDUP_WINDOW, REPLY_BUDGET, TRACE_HEADER,
    case::{failure, now_ms},
    ops::LeaseRef,
};

/// A time the model knows within bounds (Unix ms): exact when the broker reported it, bounded by
/// the local clock around the call when it did not, until a check reads the stored value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    pub(super) earliest: i64,
    pub(super) latest: i64,
}

impl Span {
    pub(super) fn exactly(ms: i64) -> Self {
        Self {
            earliest: ms,
            latest: ms,
        }
    }

    /// Checks a stored time against the bounds and, from now on, knows it exactly.
    pub(super) fn pin(&mut self, seen: i64, what: &str) -> Result<(), TestCaseError> {
        if seen < self.earliest || seen > self.latest {
            return Err(failure(format!(
                "{what} is {seen}, expected {}..={}",
                self.earliest, self.latest
            )));
        }
        *self = Self::exactly(seen);
        Ok(())
    }
}

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

    /// Whether the item is in one of the queue's sorted sets (ready, delayed, leased, dead):
    /// what DeleteQueue counts and what keeps a queue from being idle.
    pub(super) fn is_indexed(&self) -> bool {
        !matches!(self, Self::Completed { .. })
    }
}

#[derive(Debug, Clone)]
pub(super) struct ItemModel {
    pub(super) payload: Vec<u8>,
    /// The value of the one header the model sends (`TRACE_HEADER`), if any.
    pub(super) trace: Option<String>,
    pub(super) priority: i32,
    pub(super) max_attempts: u32,
    /// The queue's enqueue sequence number: the item's place in line among equal priorities,
    /// kept across release, retry and reclaim.
    pub(super) seq: u64,
    /// When the broker stored the item (its priority band's head time while it leads the band).
    pub(super) enqueued: Span,
    /// Attempts that ended (Fail or expiry).
    pub(super) attempts: u32,
    pub(super) last_error: String,
    pub(super) slot: Slot,
}

impl ItemModel {
    /// The headers as the API reports them.
    pub(super) fn headers(&self) -> std::collections::HashMap<String, String> {
        self.trace
            .iter()
            .map(|value| (TRACE_HEADER.to_owned(), value.clone()))
            .collect()
    }
}

/// The length of an item's headers as the broker stores them (a JSON object of the sorted
/// headers), which the reply estimate counts twice.
fn stored_headers_len(trace: Option<&str>) -> usize {
    let Some(value) = trace else {
        return 0;
    };
    let sorted: BTreeMap<&str, &str> = [(TRACE_HEADER, value)].into();
    serde_json::to_vec(&sorted)
        .expect("a map of strings encodes as JSON")
        .len()
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
    pub(super) dropped: u64,
}

/// What the queue's meta hash holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Meta {
    /// No meta hash: a queue never used, deleted with nothing left, or forgotten when idle.
    Absent,
    /// Only the item generation, right after the first step of a DeleteQueue.
    GenerationOnly,
    /// Counters, flags and the last activity time (`la`): the queue was written to.
    Active,
}

/// A deleted generation whose keys the trash still holds.
#[derive(Debug, Clone, Default)]
pub(super) struct Trashed {
    /// The sets that were not empty at the delete (renamed to `<set>:trash:<generation>`).
    pub(super) sets: Vec<String>,
    /// The ids of the item hashes of that generation.
    pub(super) items: Vec<String>,
}

/// What one reap.lua call reports that the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ReapPrediction {
    /// The queue was idle and held nothing: its meta is gone.
    pub(super) expired: bool,
    /// A deleted generation still waits in the trash.
    pub(super) trash: bool,
}

/// What one queue should hold.
#[derive(Debug, Clone)]
pub(super) struct QueueModel {
    pub(super) name: String,
    pub(super) keys: QueueKeys,
    /// Stored items of the current generation by id (completed ones only while the broker
    /// keeps them).
    pub(super) items: BTreeMap<String, ItemModel>,
    /// The done set: finished ids the queue remembers, by finish time. An entry whose time is
    /// past the dedup window is stale: no longer known, though still stored until a reaper
    /// pass forgets it.
    pub(super) finished: BTreeMap<String, Span>,
    /// The last enqueue sequence number handed out.
    pub(super) seq: u64,
    pub(super) paused: bool,
    /// The item generation (meta field `g`).
    pub(super) generation: u64,
    pub(super) meta: Meta,
    /// Within an idle-expiry step: the last activity (`la`) was moved to the far past, so the
    /// queue counts as idle. The step puts it back unless the queue was forgotten.
    pub(super) idle_forced: bool,
    /// Deleted generations whose items are still to be deleted, by generation.
    pub(super) trash: BTreeMap<u64, Trashed>,
    pub(super) issued: Vec<Issued>,
    pub(super) totals: Totals,
}

/// Whether a finished id's window has passed at `now`.
fn is_stale(finished: &Span, now: i64) -> bool {
    let window = i64::try_from(DEDUP_WINDOW.as_millis()).expect("the window fits in i64 ms");
    finished.latest + window <= now
}

impl QueueModel {
    pub(super) fn new(name: String, key_prefix: &str) -> Self {
        Self {
            keys: QueueKeys::new(key_prefix, &name),
            name,
            items: BTreeMap::new(),
            finished: BTreeMap::new(),
            seq: 0,
            paused: false,
            generation: 0,
            meta: Meta::Absent,
            idle_forced: false,
            trash: BTreeMap::new(),
            issued: Vec::new(),
            totals: Totals::default(),
        }
    }

    /// The prefix of the current generation's item keys.
    pub(super) fn item_prefix(&self) -> String {
        self.keys.item_prefix_of(self.generation)
    }

    /// A write that records activity (`la`): an Enqueue or a flag change.
    pub(super) fn activity(&mut self) {
        self.meta = Meta::Active;
        self.idle_forced = false;
    }

    /// Whether an Enqueue of `id` now is a duplicate: the id is stored, or finished within the
    /// dedup window, however late the reaper forgets it.
    pub(super) fn knows(&self, id: &str) -> bool {
        self.items.contains_key(id)
            || self
                .finished
                .get(id)
                .is_some_and(|finished| !is_stale(finished, now_ms()))
    }

    /// Finished ids still within their window, the ones a forced expiry can act on.
    pub(super) fn remembered(&self) -> Vec<String> {
        let now = now_ms();
        self.finished
            .iter()
            .filter(|(_, finished)| !is_stale(finished, now))
            .map(|(id, _)| id.clone())
            .collect()
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

    /// The bytes lease.lua counts for one granted item: payload, headers twice, id three times
    /// and the fixed per-item overhead, which covers the queue name twice.
    pub(super) fn reply_estimate(&self, id: &str, item: &ItemModel) -> usize {
        item.payload.len() + self.reply_overhead(id, item.trace.as_deref())
    }

    /// The reply estimate of an item of this queue besides its payload.
    pub(super) fn reply_overhead(&self, id: &str, trace: Option<&str>) -> usize {
        2 * stored_headers_len(trace) + 3 * id.len() + REPLY_BYTES_PER_ITEM + 2 * self.name.len()
    }

    /// The ids a Lease of up to `max_items` grants: ready items in lease order while they fit
    /// the reply budget, the first one whatever its size; nothing while paused. The first item
    /// that does not fit ends the grant, even if a smaller one behind it would fit.
    pub(super) fn lease_plan(&self, max_items: u32) -> Vec<String> {
        if self.paused {
            return Vec::new();
        }
        let mut granted = Vec::new();
        let mut bytes = 0;
        for (id, item) in self.ready_in_lease_order() {
            let size = self.reply_estimate(&id, item);
            if granted.len() >= max_items as usize
                || (!granted.is_empty() && bytes + size > REPLY_BUDGET)
            {
                break;
            }
            bytes += size;
            granted.push(id);
        }
        granted
    }

    pub(super) fn count(&self, wanted: impl Fn(&Slot) -> bool) -> u64 {
        self.items.values().filter(|i| wanted(&i.slot)).count() as u64
    }

    pub(super) fn drained(&self) -> bool {
        self.count(|s| matches!(s, Slot::Ready | Slot::Delayed { .. } | Slot::Leased { .. })) == 0
    }

    /// Whether the queue holds an item in any of its sorted sets.
    fn holds_items(&self) -> bool {
        self.items.values().any(|item| item.slot.is_indexed())
    }

    /// What QueueState's `exists` and ListQueues go by: items, remembered ids (stale ones
    /// included, until forgotten) or recorded activity.
    pub(super) fn exists(&self) -> bool {
        self.holds_items() || !self.finished.is_empty() || self.meta == Meta::Active
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

    /// The meta hash is gone: counters, flags and sequence start over in generation 0.
    fn forget_meta(&mut self) {
        self.meta = Meta::Absent;
        self.generation = 0;
        self.seq = 0;
        self.paused = false;
        self.idle_forced = false;
        self.totals = Totals::default();
    }

    /// One reap.lua call, for what is left once the step that forced a time has been applied:
    /// finished ids past their window are forgotten, and a queue that holds nothing (no items,
    /// remembered ids, flags or trash) and has been idle long enough is forgotten itself. A
    /// queue with no meta, or only its generation (which comes with trash), has no activity to
    /// count from: it is idle.
    pub(super) fn reap_script(&mut self) -> ReapPrediction {
        let now = now_ms();
        self.finished.retain(|_, finished| !is_stale(finished, now));
        let trash = !self.trash.is_empty();
        let idle = self.meta != Meta::Active || self.idle_forced;
        let expired =
            !trash && !self.holds_items() && self.finished.is_empty() && !self.paused && idle;
        if expired {
            self.forget_meta();
        }
        ReapPrediction { expired, trash }
    }

    /// One delete_trash.lua call (there are never more items than one step deletes): the
    /// deleted generations' keys are gone, and a queue holding nothing but its generation
    /// number loses its meta too, so its generations start again at 0.
    pub(super) fn delete_trash(&mut self) {
        self.trash.clear();
        if self.meta == Meta::GenerationOnly && !self.holds_items() && self.finished.is_empty() {
            self.forget_meta();
        }
    }

    /// One visit of the broker's reaper (after the step that forced a time was applied): a
    /// reap, the trash if it reported any, and another reap after it. Returns whether the queue
    /// was forgotten (and so left the queue index).
    pub(super) fn reaper_visit(&mut self) -> bool {
        let first = self.reap_script();
        if first.trash {
            self.delete_trash();
            return self.reap_script().expired;
        }
        first.expired
    }

    /// The first, atomic step of DeleteQueue: every set and item hash of the current generation
    /// goes to the trash, and the queue starts over, empty, in the next generation. Returns how
    /// many items the sets held.
    pub(super) fn delete_first_step(&mut self) -> Result<u64, TestCaseError> {
        let any_in = |slot: fn(&Slot) -> bool| self.items.values().any(|i| slot(&i.slot));
        let mut sets = Vec::new();
        for (name, nonempty) in [
            (&self.keys.ready, any_in(|s| *s == Slot::Ready)),
            (
                &self.keys.delayed,
                any_in(|s| matches!(s, Slot::Delayed { .. })),
            ),
            (
                &self.keys.leased,
                any_in(|s| matches!(s, Slot::Leased { .. })),
            ),
            (&self.keys.dead, any_in(|s| *s == Slot::Dead)),
            (&self.keys.done, !self.finished.is_empty()),
        ] {
            if nonempty {
                sets.push(name.clone());
            }
        }
        let deleted = self.count(Slot::is_indexed);
        let trashed = Trashed {
            sets,
            items: self.items.keys().cloned().collect(),
        };
        if self.trash.insert(self.generation, trashed).is_some() {
            return Err(failure(format!(
                "generation {} of {} was deleted twice",
                self.generation, self.name
            )));
        }
        let next = self.generation + 1;
        self.items.clear();
        self.finished.clear();
        self.forget_meta();
        self.meta = Meta::GenerationOnly;
        self.generation = next;
        Ok(deleted)
    }

    /// Every key of the queue the model expects in Redis.
    pub(super) fn expected_keys(&self) -> BTreeSet<String> {
        let k = &self.keys;
        let mut keys = BTreeSet::new();
        let mut add_if = |present: bool, key: &String| {
            if present {
                keys.insert(key.clone());
            }
        };
        add_if(self.count(|s| *s == Slot::Ready) > 0, &k.ready);
        // One head per priority band of the ready set.
        add_if(self.count(|s| *s == Slot::Ready) > 0, &k.heads);
        add_if(
            self.count(|s| matches!(s, Slot::Delayed { .. })) > 0,
            &k.delayed,
        );
        add_if(
            self.count(|s| matches!(s, Slot::Leased { .. })) > 0,
            &k.leased,
        );
        add_if(self.count(|s| *s == Slot::Dead) > 0, &k.dead);
        add_if(!self.finished.is_empty(), &k.done);
        add_if(self.meta != Meta::Absent, &k.meta);
        add_if(!self.trash.is_empty(), &k.trash);
        for (generation, trashed) in &self.trash {
            for set in &trashed.sets {
                keys.insert(format!("{set}:trash:{generation}"));
            }
            let prefix = k.item_prefix_of(*generation);
            keys.extend(trashed.items.iter().map(|id| format!("{prefix}{id}")));
        }
        let prefix = self.item_prefix();
        keys.extend(self.items.keys().map(|id| format!("{prefix}{id}")));
        keys
    }
}
