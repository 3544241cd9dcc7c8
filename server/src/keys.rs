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
    /// Prefix of the item hashes: the item key is this followed by the item id.
    pub item_prefix: String,
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
            item_prefix: format!("{base}:i:"),
        }
    }

    /// The hash of one item.
    pub fn item(&self, id: &str) -> String {
        format!("{}{id}", self.item_prefix)
    }
}

/// The set of every queue name ever used, which the reaper walks. It holds no queue's hash tag:
/// it is written with its own command, never from inside a queue's script.
pub fn queue_registry(prefix: &str) -> String {
    format!("{prefix}:queues")
}

/// The pub/sub channel on which scripts announce newly ready items as `<count>:<queue>`.
pub fn notify_channel(prefix: &str) -> String {
    format!("{prefix}:notify")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_key_shares_the_queue_hash_tag() {
        let keys = QueueKeys::new("wq", "job2");
        for key in [
            &keys.ready,
            &keys.delayed,
            &keys.leased,
            &keys.dead,
            &keys.meta,
        ] {
            assert!(key.starts_with("wq:{job2}:"), "{key}");
        }
        assert_eq!(keys.item("a{b}"), "wq:{job2}:i:a{b}");
    }
}
