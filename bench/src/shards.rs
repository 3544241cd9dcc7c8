//! The `shards` phase: many queues at once, and what each Redis server spends per item.
//!
//! N items are spread over Q queues (`--shard-queues`); every queue gets its own producer and a
//! worker with W slots (`--shard-workers`), all running at once until every sealed queue is
//! drained, as `e2e` does for one queue. Each Redis server's `INFO cpu` (`used_cpu_sys` +
//! `used_cpu_user`), `INFO stats` (`total_reads_processed`) and `INFO commandstats` are read
//! before and after, so the phase reports per server the items its queues held, its CPU seconds,
//! and CPU µs, commands, script calls and socket reads per item.
//!
//! With `--redis-mode cluster` it runs twice in one invocation: on the private cluster, whose
//! queue names are picked so that each master serves the same number of queues, then on a
//! private standalone Redis with the same names, so that a master's cost per item stands next
//! to the standalone server's. A replica's row relates its CPU to its master's items.

use std::{collections::HashMap, sync::Arc, time::Instant};

use anyhow::Context as _;
use futures_util::future::try_join_all;
use tokio_util::sync::CancellationToken;
use wq_client::Client;
use wq_worker::ExitPolicy;

use crate::cluster::{Counters, Node, Role, Usage};

/// Where the phase runs: a broker and the Redis servers behind it.
pub(crate) struct Setup<'a> {
    /// `cluster` or `standalone`, for the tables.
    pub(crate) name: &'static str,
    pub(crate) client: &'a Client,
    /// The servers whose counters are read; empty when the bench has no Redis to ask.
    pub(crate) nodes: Vec<Node>,
    /// The `host:port` of the server that holds each queue (for standalone, its one server).
    pub(crate) holder: HashMap<String, String>,
}

/// One server's figures over the phase.
#[derive(Debug)]
pub(crate) struct NodeFigures {
    pub(crate) node: Node,
    /// Queues it holds (a replica: its master's).
    pub(crate) queues: usize,
    /// Items those queues took (a replica: the items it replicated).
    pub(crate) items: usize,
    pub(crate) usage: Usage,
}

/// The phase's figures on one setup.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) setup: &'static str,
    pub(crate) queues: usize,
    pub(crate) items: usize,
    pub(crate) seconds: f64,
    pub(crate) nodes: Vec<NodeFigures>,
}

/// The items queue `index` of `queues` gets out of `items`.
fn share(items: usize, queues: usize, index: usize) -> usize {
    items / queues + usize::from(index < items % queues)
}

/// Runs the phase on `setup` with `queues`; every queue is left empty and sealed.
///
/// # Errors
/// When a call fails, a worker completes fewer items than its queue took, or a server does not
/// answer `INFO`.
pub(crate) async fn run(
    setup: &Setup<'_>,
    queues: &[String],
    workers: u32,
    args: &crate::Args,
) -> anyhow::Result<Report> {
    anyhow::ensure!(!queues.is_empty(), "--shard-queues must be at least 1");
    let before = read_all(&setup.nodes).await?;

    let started = Instant::now();
    let drains: Vec<_> = queues
        .iter()
        .map(|queue| {
            let worker = crate::worker(
                setup.client,
                queue,
                workers,
                args.prefetch,
                ExitPolicy::Sealed,
            );
            tokio::spawn(async move {
                worker
                    .run(Arc::new(crate::Noop), CancellationToken::new())
                    .await
            })
        })
        .collect();
    let fills = queues.iter().enumerate().map(|(index, queue)| async move {
        crate::fill(
            setup.client,
            queue,
            share(args.items, queues.len(), index),
            args,
        )
        .await?;
        setup.client.seal(queue).await.context("sealing a queue")
    });
    try_join_all(fills).await?;
    for (index, drain) in drains.into_iter().enumerate() {
        let summary = drain.await.context("worker task")?;
        let expected = share(args.items, queues.len(), index);
        anyhow::ensure!(
            summary.completed == expected as u64,
            "shards: {} completed {} of {expected}",
            queues[index],
            summary.completed
        );
    }
    let seconds = started.elapsed().as_secs_f64();

    let after = read_all(&setup.nodes).await?;
    let mut held: HashMap<&str, (usize, usize)> = HashMap::new();
    for (index, queue) in queues.iter().enumerate() {
        // Without a Redis to read (`--broker` without `--redis`) no server holds anything.
        let Some(address) = setup.holder.get(queue) else {
            continue;
        };
        let entry = held.entry(address.as_str()).or_default();
        entry.0 += 1;
        entry.1 += share(args.items, queues.len(), index);
    }
    let nodes = setup
        .nodes
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(node, (before, after))| {
            let (queues, items) = held.get(node.master()).copied().unwrap_or_default();
            NodeFigures {
                node: node.clone(),
                queues,
                items,
                usage: after.since(before),
            }
        })
        .collect();
    Ok(Report {
        setup: setup.name,
        queues: queues.len(),
        items: args.items,
        seconds,
        nodes,
    })
}

/// `host:port` as `:port` on loopback, to keep the role column narrow.
fn short(address: &str) -> &str {
    address.strip_prefix("127.0.0.1").unwrap_or(address)
}

async fn read_all(nodes: &[Node]) -> anyhow::Result<Vec<Counters>> {
    try_join_all(nodes.iter().map(|node| Counters::read(&node.url))).await
}

/// `count` queue names starting with `stem`, chosen so that each master in `ranges` (first
/// slot, last slot, master `host:port`) holds as many of them as the others, give or take one; and
/// which master holds each. `slot_of` gives the slot of a queue's keys; names whose slot is in
/// none of `ranges` are passed over (so `ranges` may leave masters out).
///
/// # Errors
/// When `slot_of` fails, or no balanced choice turns up among many candidates.
pub(crate) async fn balanced_queues<F, Fut>(
    stem: &str,
    count: usize,
    ranges: &[(u16, u16, String)],
    slot_of: F,
) -> anyhow::Result<(Vec<String>, HashMap<String, String>)>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u16>>,
{
    let mut masters: Vec<&str> = ranges
        .iter()
        .map(|(_, _, master)| master.as_str())
        .collect();
    masters.sort_unstable();
    masters.dedup();
    anyhow::ensure!(!masters.is_empty(), "the cluster has no master");
    let most = count.div_ceil(masters.len());
    let mut taken: HashMap<&str, usize> = HashMap::new();
    let mut names = Vec::with_capacity(count);
    let mut holder = HashMap::new();
    for candidate in 0..count * 50 + 100 {
        if names.len() == count {
            break;
        }
        let name = format!("{stem}-{candidate}");
        let slot = slot_of(name.clone()).await?;
        let Some(master) = ranges
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .map(|(_, _, master)| master.as_str())
        else {
            continue;
        };
        let held = taken.entry(master).or_default();
        if *held < most {
            *held += 1;
            names.push(name.clone());
            holder.insert(name, master.to_owned());
        }
    }
    anyhow::ensure!(
        names.len() == count,
        "could not spread {count} queues over the masters"
    );
    Ok((names, holder))
}

/// Prints one setup's table (see the module docs).
pub(crate) fn print(report: &Report, workers: u32) {
    println!();
    println!(
        "shards {}: {} queues, {} worker slots each, {} items, enqueue and drain at once: \
         {:.3} s, {:.0} items/s",
        report.setup,
        report.queues,
        workers,
        report.items,
        report.seconds,
        report.items as f64 / report.seconds
    );
    if report.nodes.is_empty() {
        println!("(no Redis to read: per-server figures need a private Redis or --redis)");
        return;
    }
    println!(
        "{:<10} {:<16} {:<18} {:>6} {:>6} {:>8} {:>7} {:>8} {:>9} {:>9} {:>10}",
        "setup",
        "server",
        "role",
        "queues",
        "items",
        "items/s",
        "cpu s",
        "µs/item",
        "cmds/item",
        "scripts/it",
        "reads/item"
    );
    let line = |server: &str, role: &str, queues: usize, items: usize, usage: &Usage| {
        let per = |x: f64, scale: f64, decimals: usize| {
            if items == 0 {
                "-".to_owned()
            } else {
                format!("{:.*}", decimals, x * scale / items as f64)
            }
        };
        println!(
            "{:<10} {:<16} {:<18} {:>6} {:>6} {:>8.0} {:>7.3} {:>8} {:>9} {:>9} {:>10}",
            report.setup,
            server,
            role,
            queues,
            items,
            items as f64 / report.seconds,
            usage.cpu(),
            per(usage.cpu(), 1e6, 1),
            per(usage.commands as f64, 1.0, 2),
            per(usage.scripts as f64, 1.0, 2),
            per(usage.reads as f64, 1.0, 2),
        );
    };
    for fig in &report.nodes {
        let role = match &fig.node.role {
            Role::Standalone => "standalone".to_owned(),
            Role::Master => "master".to_owned(),
            Role::Replica(master) => format!("replica of {}", short(master)),
        };
        line(&fig.node.address, &role, fig.queues, fig.items, &fig.usage);
    }
    for (label, replicas) in [("masters", false), ("replicas", true)] {
        let group: Vec<&NodeFigures> = report
            .nodes
            .iter()
            .filter(|fig| match fig.node.role {
                Role::Master => !replicas,
                Role::Replica(_) => replicas,
                Role::Standalone => false,
            })
            .collect();
        if group.is_empty() {
            continue;
        }
        let usage = group
            .iter()
            .fold(Usage::default(), |sum, fig| sum + fig.usage);
        let queues = group.iter().map(|fig| fig.queues).sum();
        let items = group.iter().map(|fig| fig.items).sum();
        line(&format!("all {label}"), "(sum)", queues, items, &usage);
    }
}

/// The report as JSON records, one per server, each naming its phase and setup.
pub(crate) fn to_json(report: &Report, workers: u32, args: &crate::Args) -> Vec<serde_json::Value> {
    report
        .nodes
        .iter()
        .map(|fig| {
            let (role, replica_of) = match &fig.node.role {
                Role::Standalone => ("standalone", None),
                Role::Master => ("master", None),
                Role::Replica(master) => ("replica", Some(master.as_str())),
            };
            let usage = &fig.usage;
            let per_item = |x: f64| (fig.items > 0).then(|| x / fig.items as f64);
            serde_json::json!({
                "phase": "shards", "setup": report.setup, "queues_total": report.queues,
                "items_total": report.items, "workers_per_queue": workers,
                "payload_bytes": args.payload, "batch": args.batch,
                "seconds": report.seconds,
                "items_per_s": report.items as f64 / report.seconds,
                "server": fig.node.address, "role": role, "replica_of": replica_of,
                "queues": fig.queues, "items": fig.items,
                "redis_cpu_s": usage.cpu(), "redis_cpu_user_s": usage.cpu_user,
                "redis_cpu_sys_s": usage.cpu_sys,
                "redis_cpu_us_per_item": per_item(usage.cpu() * 1e6),
                "commands_per_item": per_item(usage.commands as f64),
                "scripts_per_item": per_item(usage.scripts as f64),
                "reads_per_item": per_item(usage.reads as f64),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_differ_by_at_most_one() {
        let shares: Vec<usize> = (0..7).map(|i| share(100, 7, i)).collect();
        assert_eq!(shares.iter().sum::<usize>(), 100);
        let (most, least) = (shares.iter().max(), shares.iter().min());
        assert_eq!(most.zip(least).map(|(m, l)| m - l), Some(1));
    }

    #[tokio::test]
    async fn balanced_queues_give_each_master_the_same_count() {
        let ranges = [
            (0, 5460, "a:1".to_owned()),
            (5461, 10922, "a:2".to_owned()),
            (10923, 16383, "a:3".to_owned()),
        ];
        // A stand-in for CLUSTER KEYSLOT: the queue's slot from its name's trailing number.
        let slot_of = |name: String| async move {
            let n: u16 = name.rsplit('-').next().unwrap_or_default().parse()?;
            Ok(n.wrapping_mul(7919) % 16384)
        };
        let (names, holder) = balanced_queues("q", 12, &ranges, slot_of)
            .await
            .expect("the stand-in slots spread over all three masters");
        assert_eq!(names.len(), 12);
        for master in ["a:1", "a:2", "a:3"] {
            assert_eq!(holder.values().filter(|m| *m == master).count(), 4);
        }
    }
}
