//! The `direct` phase: the broker's own lease and complete scripts called straight through the
//! `redis` crate, without gRPC, to show what the gRPC layer costs next to `drain`.
//!
//! Each round pipelines D lease script calls of one item each (as D worker slots would), then
//! completes the items it got in one complete script call (as the worker batches completions),
//! until the queue is empty. Keys, scripts and the reply's layout are the broker's own
//! ([`wq_server::keys`], [`wq_server::scripts`], [`wq_server::reply`]).

use std::time::Instant;

use anyhow::Context as _;
use redis::Value;
use wq_server::{
    config::BrokerConfig,
    keys, reply,
    scripts::{self, Scripts},
};

/// Leases and completes every ready item of `queue` (already filled with `items` items) with
/// pipelines `depth` lease calls deep; returns the seconds it took.
///
/// # Errors
/// When Redis fails or an item is lost.
pub(crate) async fn run(
    redis_url: &str,
    config: &BrokerConfig,
    queue: &str,
    items: usize,
    depth: usize,
) -> anyhow::Result<f64> {
    let mut conn = redis::Client::open(redis_url)
        .context("Redis URL")?
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis")?;
    let scripts = Scripts::new();
    // Pipelined EVALSHA does not fall back to loading the script, so load them first.
    scripts
        .lease
        .load_async(&mut conn)
        .await
        .context("loading lease.lua")?;
    scripts
        .complete
        .load_async(&mut conn)
        .await
        .context("loading complete.lua")?;
    let keys = keys::QueueKeys::new(&config.key_prefix, queue);
    let channel = keys.notify.clone();
    let lease_ms = u64::try_from(config.default_lease.as_millis()).unwrap_or(u64::MAX);
    let retention_ms = u64::try_from(config.completed_retention.as_millis()).unwrap_or(u64::MAX);

    let started = Instant::now();
    let mut done = 0;
    for round in 0.. {
        let mut leases = redis::pipe();
        for slot in 0..depth.max(1) {
            let mut call =
                scripts::queue_invocation(&scripts.lease, &keys, &channel, queue, config);
            call.arg(lease_ms)
                // Unique per call, as the broker's random token is.
                .arg(format!("direct-{round}-{slot}-"))
                .arg(config.max_reply_bytes)
                .arg(wq_server::config::REPLY_BYTES_PER_ITEM)
                .arg(1)
                .arg(1);
            leases.invoke_script(&call);
        }
        let replies: Vec<Value> = leases
            .query_async(&mut conn)
            .await
            .context("lease pipeline")?;
        let mut granted = Vec::new();
        for reply in replies {
            granted.extend(granted_leases(reply)?);
        }
        if granted.is_empty() {
            break;
        }
        let mut complete =
            scripts::queue_invocation(&scripts.complete, &keys, &channel, queue, config);
        complete.arg(retention_ms);
        for (id, token) in &granted {
            complete.arg(id).arg(token).arg("");
        }
        let flags: Vec<Value> = complete
            .invoke_async(&mut conn)
            .await
            .context("complete script")?;
        let completed = reply::flags("complete flags", &flags)?
            .into_iter()
            .filter(|ok| *ok)
            .count();
        anyhow::ensure!(
            completed == granted.len(),
            "completed {completed} of {} leases",
            granted.len()
        );
        done += completed;
    }
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(done == items, "direct phase completed {done} of {items}");
    Ok(seconds)
}

/// The (id, token) of each item a lease script call granted (see the header of `lua/lease.lua`).
fn granted_leases(reply: Value) -> anyhow::Result<Vec<(String, String)>> {
    let grants = reply::array("lease", reply)?
        .into_iter()
        .nth(6)
        .context("lease reply has no grants")?;
    let items = reply::array("lease grants", grants)?
        .into_iter()
        .next()
        .context("lease reply has no grant")?;
    reply::array("lease items", items)?
        .into_iter()
        .map(|item| {
            let mut fields = reply::array("leased item", item)?.into_iter();
            let id = reply::text("id", fields.next().context("leased item has no id")?)?;
            let token = reply::text("token", fields.next().context("leased item has no token")?)?;
            Ok((id, token))
        })
        .collect()
}
