//! The `idle` phase: what waiting Leases on an empty queue cost Redis. It counts Redis commands
//! (`INFO commandstats`, summed over every command, commands run inside scripts included)
//! during a quiet window without waiters, then during a window with L waiting Leases spread
//! over C connections; the `INFO` calls themselves are left out.
//!
//! The figure covers what happens inside the window only: against a broker started with
//! `--wait-recheck` (off by default), a window shorter than that period misses the re-checks.

use std::{collections::HashMap, time::Duration};

use anyhow::Context as _;
use tokio::task::JoinSet;
use wq_client::{Client, duration, pb};

/// Time for every Lease to reach the broker and park before the window opens.
const PARK_DELAY: Duration = Duration::from_secs(1);

/// What the phase measures.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Waiting Leases.
    pub(crate) leases: usize,
    /// Connections they are spread over.
    pub(crate) connections: usize,
    /// Length of each window.
    pub(crate) window: Duration,
}

/// Redis commands per second in each window.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) quiet_per_s: f64,
    pub(crate) waiting_per_s: f64,
    /// Commands per second by name in the window with waiters, busiest first.
    pub(crate) waiting_by_command: Vec<(String, f64)>,
}

/// Runs the phase against the broker at `broker_url` and its Redis at `redis_url`.
///
/// # Errors
/// When a connection or call fails, or a Lease ends before the window closes.
pub(crate) async fn run(
    broker_url: &str,
    redis_url: &str,
    queue: &str,
    settings: &Settings,
) -> anyhow::Result<Report> {
    let mut redis = redis::Client::open(redis_url)
        .context("Redis URL")?
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis")?;

    let quiet = window(&mut redis, settings.window).await?;

    let mut clients = Vec::with_capacity(settings.connections.max(1));
    for _ in 0..settings.connections.max(1) {
        clients.push(
            Client::connect(broker_url)
                .await
                .context("connecting a waiter")?,
        );
    }
    // They must outlast the window by far: one returning early would be a call in the window.
    let max_wait = settings.window + PARK_DELAY + Duration::from_secs(30);
    let mut waiters = JoinSet::new();
    for i in 0..settings.leases {
        let client = clients[i % clients.len()].clone();
        let request = pb::LeaseRequest {
            queue: queue.to_owned(),
            max_items: 1,
            lease_duration: Some(duration(Duration::from_secs(60))),
            max_wait: Some(duration(max_wait)),
            ..Default::default()
        };
        waiters.spawn(async move { client.lease(request).await });
    }
    tokio::time::sleep(PARK_DELAY).await;
    let waiting = window(&mut redis, settings.window).await;
    // A waiter that already returned was not waiting for the whole window.
    let returned_early = waiters.try_join_next();
    // Dropping the calls cancels them on the broker.
    waiters.abort_all();
    let waiting = waiting?;
    if let Some(returned) = returned_early {
        let answer = match returned {
            Ok(Ok(reply)) => format!("{} items", reply.items.len()),
            Ok(Err(error)) => error.to_string(),
            Err(error) => error.to_string(),
        };
        anyhow::bail!(
            "a waiting Lease returned during the idle window ({answer}; is --max-wait on the \
             broker shorter than {max_wait:?}, or --max-waiting-leases below {}?)",
            settings.leases
        );
    }

    let seconds = settings.window.as_secs_f64();
    let mut waiting_by_command: Vec<(String, f64)> = waiting
        .iter()
        .map(|(name, calls)| (name.clone(), *calls as f64 / seconds))
        .collect();
    waiting_by_command.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(Report {
        quiet_per_s: quiet.values().sum::<u64>() as f64 / seconds,
        waiting_per_s: waiting.values().sum::<u64>() as f64 / seconds,
        waiting_by_command,
    })
}

/// Redis commands by name during a window of `length`, without the INFO calls.
async fn window(
    redis: &mut redis::aio::MultiplexedConnection,
    length: Duration,
) -> anyhow::Result<HashMap<String, u64>> {
    let before = command_calls(redis).await?;
    tokio::time::sleep(length).await;
    let after = command_calls(redis).await?;
    Ok(after
        .into_iter()
        .filter(|(name, _)| name != "info")
        .map(|(name, calls)| {
            let delta = calls.saturating_sub(before.get(&name).copied().unwrap_or(0));
            (name, delta)
        })
        .filter(|(_, delta)| *delta > 0)
        .collect())
}

/// Calls per command since Redis started, from `INFO commandstats`.
async fn command_calls(
    redis: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<HashMap<String, u64>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await
        .context("INFO commandstats")?;
    Ok(parse_commandstats(&info))
}

/// Parses lines like `cmdstat_evalsha:calls=12,usec=345,...`.
pub(crate) fn parse_commandstats(info: &str) -> HashMap<String, u64> {
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_lines_give_calls_by_command() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=12,usec=345,usec_per_call=28.75,\
                    rejected_calls=0,failed_calls=0\r\ncmdstat_ping:calls=3,usec=1\r\n";
        let calls = parse_commandstats(info);
        assert_eq!(calls.get("evalsha"), Some(&12));
        assert_eq!(calls.get("ping"), Some(&3));
        assert_eq!(calls.len(), 2);
    }
}
