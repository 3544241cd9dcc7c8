//! The Lua scripts, one per operation (`server/lua/*.lua`), loaded once per process.
//!
//! Each script of one queue is `#!lua`, `lua/lib.lua` and the operation's own file, so the
//! shared helpers exist once in the source and every operation is still a single atomic
//! EVALSHA whose keys Redis confines to the queue's slot. redis-rs loads a script on its first NOSCRIPT reply, so a restarted or
//! failed-over Redis needs no special handling.

use redis::{Script, ScriptInvocation};

use crate::{config::BrokerConfig, store::keys::QueueKeys};

// `#!lua` on the first line makes Redis 7 check, at run time, that a script touches no key
// outside the slot of its declared keys; scripts without it may reach any key of the node they
// run on, which on a cluster breaks as soon as a slot moves.
macro_rules! script_with_lib {
    ($file:literal) => {
        Script::new(concat!(
            "#!lua\n",
            include_str!("../../lua/lib.lua"),
            "\n",
            include_str!(concat!("../../lua/", $file))
        ))
    };
}

/// Every script of the broker.
#[derive(Debug)]
pub struct Scripts {
    /// `lua/enqueue.lua`
    pub enqueue: Script,
    /// `lua/lease.lua`
    pub lease: Script,
    /// `lua/extend_lease.lua`
    pub extend_lease: Script,
    /// `lua/complete.lua`
    pub complete: Script,
    /// `lua/fail.lua`
    pub fail: Script,
    /// `lua/release.lua`
    pub release: Script,
    /// `lua/reap.lua`
    pub reap: Script,
    /// `lua/queue_state.lua`
    pub queue_state: Script,
    /// `lua/set_flag.lua`
    pub set_flag: Script,
    /// `lua/requeue_dead.lua`
    pub requeue_dead: Script,
    /// `lua/purge.lua`
    pub purge: Script,
    /// `lua/delete_queue.lua`
    pub delete_queue: Script,
    /// `lua/delete_trash.lua`
    pub delete_trash: Script,
    /// `lua/due.lua` (a global script: no lib, no queue keys)
    pub due: Script,
}

impl Scripts {
    /// Builds the script handles (hashes are computed here; nothing is sent to Redis).
    pub fn new() -> Self {
        Self {
            enqueue: script_with_lib!("enqueue.lua"),
            lease: script_with_lib!("lease.lua"),
            extend_lease: script_with_lib!("extend_lease.lua"),
            complete: script_with_lib!("complete.lua"),
            fail: script_with_lib!("fail.lua"),
            release: script_with_lib!("release.lua"),
            reap: script_with_lib!("reap.lua"),
            queue_state: script_with_lib!("queue_state.lua"),
            set_flag: script_with_lib!("set_flag.lua"),
            requeue_dead: script_with_lib!("requeue_dead.lua"),
            purge: script_with_lib!("purge.lua"),
            delete_queue: script_with_lib!("delete_queue.lua"),
            delete_trash: script_with_lib!("delete_trash.lua"),
            due: Script::new(concat!("#!lua\n", include_str!("../../lua/due.lua"))),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts a call of one queue's script with the keys and leading arguments every such script
/// takes (see the header of `lua/lib.lua`); the operation's own arguments follow.
pub fn queue_invocation<'a>(
    script: &'a Script,
    keys: &QueueKeys,
    channel: &str,
    queue: &str,
    config: &BrokerConfig,
) -> ScriptInvocation<'a> {
    let mut call = script.prepare_invoke();
    for key in keys.script_keys() {
        call.key(key);
    }
    call.arg(&keys.item_base)
        .arg(channel)
        .arg(queue)
        .arg(millis(config.finished_ids_kept()))
        .arg(config.reap_batch)
        .arg(config.dead_max_count)
        .arg(millis(config.dead_max_age))
        .arg(millis(config.queue_idle_ttl));
    call
}

/// A duration in whole milliseconds, saturating.
pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
