//! Every Redis key and channel name the broker uses, and nothing else.
//!
//! All keys of one queue share the hash tag `{<queue>}`, so every script touches a single Redis
//! Cluster slot. Queue names are restricted to `[A-Za-z0-9._-]`, so they can never contain a
//! brace and break out of the tag; item ids follow the tag, where braces are harmless.

/// The keys of one queue.
#[derive(Debug, Clone)]
pub struct QueueKeys {
    /// Sorted set of ready items (see `lua/lib.lua` for the member format).
    pub ready: String,
    /// Sorted set of delayed item ids by due time.
    pub delayed: String,
    /// Sorted set of leased item ids by lease expiry.
    pub leased: String,
    /// Sorted set of dead item ids by time of death.
    pub dead: String,
    /// Hash of the queue's counters and flags.
    pub meta: String,
    /// Sorted set of finished ids by finish time: the ids still known for deduplication, and
    /// the index of retained completed items.
    pub done: String,
    /// Sorted set of the ready set's priority bands by the enqueue time of each band's oldest
    /// item, so the oldest ready item is one lookup.
    pub heads: String,
    /// Set of item generations of deleted incarnations whose items are still being deleted.
    pub trash: String,
    /// Base of the item keys, followed by the item generation, `:` and the item id (see
    /// `lua/lib.lua`).
    pub item_base: String,
    /// Prefix of the item hashes of generation 0 (a queue never deleted): the item key is this
    /// followed by the item id.
    pub item_prefix: String,
    /// The shard channel the queue's scripts announce ready items on (see
    /// [`notify_channel`]).
    pub notify: String,
}

impl QueueKeys {
    /// Builds the keys of `queue` under `prefix`.
    pub fn new(prefix: &str, queue: &str) -> Self {
        let base = format!("{prefix}:{{{queue}}}");
        Self {
            ready: format!("{base}:ready"),
            delayed: format!("{base}:delayed"),
            leased: format!("{base}:leased"),
            dead: format!("{base}:dead"),
            meta: format!("{base}:meta"),
            done: format!("{base}:done"),
            heads: format!("{base}:heads"),
            trash: format!("{base}:trash"),
            item_base: format!("{base}:i"),
            item_prefix: format!("{base}:i:"),
            notify: notify_channel(prefix, queue),
        }
    }

    /// The keys every queue script gets, in the order `lua/lib.lua` documents.
    pub fn script_keys(&self) -> [&str; 8] {
        [
            &self.ready,
            &self.delayed,
            &self.leased,
            &self.dead,
            &self.meta,
            &self.done,
            &self.heads,
            &self.trash,
        ]
    }

    /// The prefix of the item hashes of `generation` (the meta field `g`).
    pub fn item_prefix_of(&self, generation: u64) -> String {
        if generation == 0 {
            self.item_prefix.clone()
        } else {
            format!("{}{generation}:", self.item_base)
        }
    }

    /// The hash of one item of generation 0.
    pub fn item(&self, id: &str) -> String {
        format!("{}{id}", self.item_prefix)
    }
}

/// The queue index: a sorted set of queue names scored by when each next needs the reaper
/// (Unix ms). Every queue that holds anything is in it; ListQueues reads it. It holds no queue's
/// hash tag: it is written with its own commands, never from inside a queue's script.
pub fn queue_index(prefix: &str) -> String {
    format!("{prefix}:queues:due")
}

/// The set of queue names that brokers before the queue index kept; read once to migrate.
pub fn legacy_queue_registry(prefix: &str) -> String {
    format!("{prefix}:queues")
}

/// The shard channel (`SPUBLISH`) on which `queue`'s scripts announce newly ready items as
/// `<count>:<queue>`, and its drain as `0:<queue>`. It has the queue's hash tag, so on a cluster
/// the message stays inside the queue's shard, and a script may publish it.
pub fn notify_channel(prefix: &str, queue: &str) -> String {
    format!("{prefix}:{{{queue}}}:notify")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_key_shares_the_queue_hash_tag() {
        let keys = QueueKeys::new("wq", "job2");
        for key in keys.script_keys() {
            assert!(key.starts_with("wq:{job2}:"), "{key}");
        }
        assert_eq!(keys.item("a{b}"), "wq:{job2}:i:a{b}");
        assert_eq!(keys.item_prefix_of(0), "wq:{job2}:i:");
        assert_eq!(keys.item_prefix_of(3), "wq:{job2}:i3:");
    }

    #[test]
    fn every_key_a_queue_script_touches_is_in_the_queue_slot() {
        use redis::cluster_routing::Slot;
        let get_slot = |key: &[u8]| Slot::for_key(key);
        for queue in ["q1", "q2", "q4", "a.b-c_d", &"x".repeat(128)] {
            let keys = QueueKeys::new("wq", queue);
            let slot = get_slot(keys.ready.as_bytes());
            assert_eq!(slot, get_slot(format!("{{{queue}}}").as_bytes()));
            let built_in_lua = [
                keys.notify.clone(),
                keys.item("some-id"),
                keys.item_prefix_of(7) + "some-id",
                format!("{}:trash:3", keys.ready),
            ];
            for key in keys
                .script_keys()
                .map(str::to_owned)
                .into_iter()
                .chain(built_in_lua)
            {
                assert_eq!(get_slot(key.as_bytes()), slot, "{key} of {queue}");
            }
        }
    }
}
